//! `medfleet firmware upload`: a signed image streamed to medfleetd (a header with the targets metadata, then the
//! image in 1 MiB chunks). The image is checked against the signed hash and length first, so a wrong file is not
//! sent for minutes only to be refused at the end.

use std::path::PathBuf;

use medfleet_proto::v1::{self, upload_artifact_request::Message};
use tokio::io::AsyncReadExt as _;

use super::artifacts::{ArtifactView, print_artifact};
use super::sign::local_root;
use super::{Firmware, TARGETS_FILE, files};
use crate::error::{InvalidInput, UsageError};
use crate::output::{self, Format};

/// The chunk size the proto allows.
const CHUNK: usize = 1024 * 1024;

#[derive(Debug, clap::Args)]
pub(crate) struct UploadArgs {
    /// The image file, as signed.
    pub(crate) image: PathBuf,
    /// The metadata directory whose targets.json signs the image.
    #[arg(long)]
    pub(crate) metadata: PathBuf,
    /// The image's target name in targets.json.
    #[arg(long)]
    pub(crate) name: String,
    /// Why this release (kept with the artifact and in the audit trail).
    #[arg(long, default_value = "")]
    pub(crate) comment: String,
}

/// Reads the image into the request stream; an error reading it ends the stream early and is returned here.
async fn send_image(
    mut file: tokio::fs::File,
    sender: tokio::sync::mpsc::Sender<v1::UploadArtifactRequest>,
    bar: indicatif::ProgressBar,
) -> std::io::Result<()> {
    loop {
        let mut chunk = Vec::with_capacity(CHUNK);
        // Fill whole chunks (a read may return less than asked for).
        while chunk.len() < CHUNK {
            let read = (&mut file)
                .take((CHUNK - chunk.len()) as u64)
                .read_to_end(&mut chunk)
                .await?;
            if read == 0 {
                break;
            }
        }
        if chunk.is_empty() {
            return Ok(());
        }
        let sent = chunk.len() as u64;
        let request = v1::UploadArtifactRequest {
            message: Some(Message::Chunk(chunk)),
        };
        if sender.send(request).await.is_err() {
            // medfleetd ended the call (it refused the upload); its answer says why.
            return Ok(());
        }
        bar.inc(sent);
    }
}

/// Whether the caller can see any device of `model` (a warning, not a refusal: the devices may come later).
async fn model_in_fleet(channel: tonic::transport::Channel, model: &str) -> bool {
    let mut registry = v1::registry_service_client::RegistryServiceClient::new(channel);
    registry
        .list_devices(v1::ListDevicesRequest {
            page_size: 1,
            model: model.to_owned(),
            ..Default::default()
        })
        .await
        .map_or(true, |reply| !reply.into_inner().devices.is_empty())
}

pub(super) async fn upload(channel: tonic::transport::Channel, args: &UploadArgs, out: Format) -> anyhow::Result<()> {
    let mut api = Firmware::new(channel.clone());
    let path = args.metadata.join(TARGETS_FILE);
    let targets_json = files::read("--metadata", &path)?;
    let info = medfleet_core::firmware::tuf::targets_info(&targets_json)
        .map_err(|e| InvalidInput(format!("{}: {e}", path.display())))?;
    let Some(target) = info.targets.iter().find(|t| t.name == args.name) else {
        let names: Vec<&str> = info.targets.iter().map(|t| t.name.as_str()).collect();
        return Err(InvalidInput(format!(
            "--name {}: {} (version {}) does not sign a target of that name; it signs: {}",
            args.name,
            path.display(),
            info.version,
            names.join(", ")
        ))
        .into());
    };
    if let Some(root) = local_root(&args.metadata)? {
        let trusted = root.role_keys("targets");
        let counted = trusted.iter().filter(|id| info.signed_by.contains(id)).count();
        let threshold = root
            .roles
            .iter()
            .find(|(role, _, _)| role == "targets")
            .map_or(1, |(_, _, t)| *t);
        if (counted as u64) < threshold {
            eprintln!(
                "warning: {} has {counted} of the {threshold} targets signatures root.json version {} requires; \
                 medfleetd will refuse it unless its root differs (countersign with `medfleet firmware \
                 countersign --metadata {} --key KEY`)",
                path.display(),
                root.version,
                args.metadata.display()
            );
        }
    }
    let progress = out == Format::Table;
    let (sha256, length) = files::hash_image(&args.image, progress)?;
    if length != target.length || sha256 != target.sha256 {
        return Err(InvalidInput(format!(
            "{} is not the image signed as {}: it has {length} bytes and sha256 {sha256}, the signed image {} \
             bytes and sha256 {}",
            args.image.display(),
            target.name,
            target.length,
            target.sha256
        ))
        .into());
    }
    let targets_json =
        String::from_utf8(targets_json).map_err(|_| InvalidInput(format!("{} is not UTF-8", path.display())))?;
    let file = tokio::fs::File::open(&args.image)
        .await
        .map_err(|e| UsageError(format!("cannot read {}: {e}", args.image.display())))?;

    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let header = v1::UploadArtifactRequest {
        message: Some(Message::Header(v1::UploadArtifactHeader {
            target_name: args.name.clone(),
            targets_json,
            length,
            comment: args.comment.clone(),
        })),
    };
    sender
        .send(header)
        .await
        .map_err(|_| anyhow::anyhow!("the upload stream closed before it started"))?;
    let bar = if progress {
        files::bar(length, "uploading")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let reader = tokio::spawn(send_image(file, sender, bar.clone()));
    let response = api
        .upload_artifact(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await;
    bar.finish_and_clear();
    // A local read error explains a refused upload better than medfleetd's "too short".
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(anyhow::anyhow!(
                "reading {} failed during the upload: {e}",
                args.image.display()
            ));
        }
        Err(e) => return Err(anyhow::anyhow!("the upload was interrupted: {e}")),
    }
    let artifact = ArtifactView::from(response.map_err(super::refusal)?.into_inner());
    if !model_in_fleet(channel, &artifact.hardware_id).await {
        eprintln!(
            "warning: no device you can see is registered with model {:?}; a rollout matches the model string \
             exactly as devices were registered (compare `medfleet devices list -o json`)",
            artifact.hardware_id
        );
    }
    if out == Format::Json {
        return output::json(&artifact);
    }
    print_artifact(&artifact);
    println!(
        "\nRoll it out with, e.g.:\n  medfleet rollouts create --artifact {} --select 'model={}' --waves 1%,10%,50%,100% \
         --window 'Mon-Fri 02:00-05:00' --dry-run",
        artifact.id, artifact.hardware_id
    );
    Ok(())
}
