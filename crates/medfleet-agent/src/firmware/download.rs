//! Fetching an update: the signed metadata (verified against the trusted root, with tough's datastore in the state
//! directory so a restart cannot be rolled back), then the image into `download/<sha256>.part`, resumed from
//! where the file ends, never past the signed length, and checked through tough before it is staged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use medfleet_core::firmware::target::Installed;
use medfleet_core::firmware::tuf::{self, SignedTarget};
use medfleet_proto::v1::{self, firmware_service_client::FirmwareServiceClient};
use std::io::Write as _;
use tonic::transport::Channel;

use super::slots::{Paths, sync_dir};
use super::{Failure, Faults};

/// A refusal from TUF: final, with its stable code.
fn refused(error: &tuf::TufError) -> Failure {
    Failure::Final {
        reason: error.code.as_str().to_owned(),
        detail: error.detail.clone(),
    }
}

fn file_error(what: &str, path: &Path, error: impl std::fmt::Display) -> Failure {
    Failure::Final {
        reason: "storage_error".to_owned(),
        detail: format!("cannot {what} {}: {error}", path.display()),
    }
}

/// The trusted root (and its version) and the metadata medfleetd publishes now.
async fn published(channel: Channel, paths: &Paths) -> Result<(Vec<u8>, u64, tuf::MetadataSet), Failure> {
    let root_path = paths.trusted_root();
    let root = std::fs::read(&root_path).map_err(|e| Failure::Final {
        reason: "no_trust_root".to_owned(),
        detail: format!(
            "{} cannot be read ({e}): start the agent with --tuf-root ROOT.json (the root from `medfleet firmware \
             keys init`)",
            root_path.display()
        ),
    })?;
    let known = tuf::root_info(&root).map_err(|e| refused(&e))?.version;
    // A metadata set may be larger than tonic's default 4 MiB: targets up to 8 MiB and every root version.
    let published = FirmwareServiceClient::new(channel)
        .max_decoding_message_size(METADATA_REPLY_LIMIT)
        .get_metadata(v1::GetMetadataRequest {
            known_root_version: known,
        })
        .await
        .map_err(|status| Failure::Transient(format!("fetching the signed metadata: {}", status.message())))?
        .into_inner();
    let set = tuf::MetadataSet {
        roots: published.roots_json.into_iter().map(String::into_bytes).collect(),
        timestamp: published.timestamp_json.into_bytes(),
        snapshot: published.snapshot_json.into_bytes(),
        targets: published.targets_json.into_bytes(),
    };
    Ok((root, known, set))
}

/// `tuf::verify` against the device's datastore, one at a time and never cut short: it runs in its own task
/// holding the datastore lock, so a job aborted when its session breaks leaves no half-written datastore for the
/// next one.
async fn verify(
    paths: &Paths,
    root: Vec<u8>,
    set: tuf::MetadataSet,
    image: Option<(String, Arc<dyn tuf::ImageSource>)>,
) -> Result<tuf::Verified, Failure> {
    let guard = paths.datastore_lock().lock_owned().await;
    let datastore = paths.datastore();
    std::fs::create_dir_all(&datastore).map_err(|e| file_error("create", &datastore, e))?;
    let task = tokio::spawn(async move {
        let _guard = guard;
        tuf::verify(&root, &set, Some(&datastore), image).await
    });
    match task.await {
        Ok(verified) => verified.map_err(|e| refused(&e)),
        Err(error) => Err(Failure::Transient(format!("the verification stopped: {error}"))),
    }
}

/// How long a download may receive nothing before it is given up and resumed.
const DOWNLOAD_IDLE: Duration = Duration::from_mins(1);

/// The largest metadata reply taken: medfleetd's targets limit (8 MiB) with room for roots, snapshot, timestamp.
const METADATA_REPLY_LIMIT: usize = 24 * 1024 * 1024;

/// Fetches the published metadata, verifies it from the trusted root and checks that `target_name` may replace
/// what the device runs (its model, a newer release counter or a signed downgrade).
pub(super) async fn check(
    channel: Channel,
    paths: &Paths,
    target_name: &str,
    installed: &Installed,
) -> Result<SignedTarget, Failure> {
    let (root, known, set) = published(channel, paths).await?;
    let root_path = paths.trusted_root();
    // The root saved is the one the chain from the pinned root reaches (the same walk tough makes, which refuses
    // two roots of one version), never merely one the server sent with the right version number.
    let newest = tuf::follow_root_chain(&root, &set.roots).map_err(|e| refused(&e))?;
    let verified = verify(paths, root, set.clone(), None).await?;
    // A verified rotation becomes the root trusted from now on.
    if verified.root_version() > known {
        if tuf::metadata_version(&newest).ok() != Some(verified.root_version()) {
            return Err(refused(&tuf::TufError {
                code: tuf::Refusal::Malformed,
                detail: format!(
                    "the verifier trusted root version {}, the root chain reaches another: nothing is saved",
                    verified.root_version()
                ),
            }));
        }
        let text = String::from_utf8_lossy(&newest);
        medfleet_proto::client::write_private(&root_path, &text).map_err(|e| file_error("write", &root_path, e))?;
        tracing::info!(version = verified.root_version(), "trusted a rotated TUF root");
    }
    let target = verified.target(target_name).map_err(|e| refused(&e))?;
    tuf::accepts(installed, &target).map_err(|e| refused(&e))?;
    Ok(target)
}

/// An image file read by tough.
#[derive(Debug)]
struct FileSource(PathBuf);

#[async_trait::async_trait]
impl tuf::ImageSource for FileSource {
    async fn open(&self) -> Result<tuf::ImageStream, std::io::Error> {
        let file = tokio::fs::File::open(&self.0).await?;
        Ok(Box::pin(tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024)))
    }
}

/// Reads `image` through tough against metadata that verified: the signed length and SHA-256, nothing else.
pub(super) async fn check_image(
    channel: Channel,
    paths: &Paths,
    target_name: &str,
    image: &Path,
) -> Result<(), Failure> {
    let (root, _, set) = published(channel, paths).await?;
    let source: Arc<dyn tuf::ImageSource> = Arc::new(FileSource(image.to_owned()));
    let verified = verify(paths, root, set, Some((target_name.to_owned(), source))).await?;
    verified
        .check_image(target_name)
        .await
        .map(|_| ())
        .map_err(|e| refused(&e))
}

/// Progress while downloading, at most once a second.
pub(super) trait Progress: Send {
    fn downloading(&mut self, bytes: u64) -> impl std::future::Future<Output = ()> + Send;
}

/// Downloads `target` (artifact `artifact`) into its partial file from where it ends; returns the staged image
/// once tough accepted it. Transient failures leave the partial file for the next attempt.
pub(super) async fn fetch(
    channel: Channel,
    paths: &Paths,
    artifact: &str,
    target: &SignedTarget,
    faults: &Faults,
    progress: &mut impl Progress,
) -> Result<PathBuf, Failure> {
    let staged = paths.staged(&target.sha256);
    if staged.exists() {
        match check_image(channel.clone(), paths, &target.name, &staged).await {
            Ok(()) => return Ok(staged),
            Err(Failure::Transient(e)) => return Err(Failure::Transient(e)),
            Err(Failure::Final { .. }) => {
                tracing::warn!(image = %staged.display(), "staged image no longer verifies; downloading it again");
                let _ = std::fs::remove_file(&staged);
            }
        }
    }
    let partial = paths.partial(&target.sha256);
    if let Some(dir) = partial.parent() {
        std::fs::create_dir_all(dir).map_err(|e| file_error("create", dir, e))?;
    }
    let mut offset = std::fs::metadata(&partial).map_or(0, |m| m.len());
    if offset > target.length {
        let _ = std::fs::remove_file(&partial);
        offset = 0;
    }
    if offset > 0 {
        tracing::info!(target = %target.name, offset, "resuming the download");
    }
    let resumed = offset > 0;
    // Plain blocking writes, on purpose: a job is aborted at an await point when its session breaks, and a
    // tokio::fs write still in flight then would land after the next job measured where the file ends, splicing
    // bytes into the wrong place. A write of one chunk to the page cache is short.
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&partial)
        .map_err(|e| file_error("open", &partial, e))?;
    progress.downloading(offset).await;
    if offset < target.length {
        let mut stream = FirmwareServiceClient::new(channel.clone())
            .read_artifact(v1::ReadArtifactRequest {
                artifact: artifact.to_owned(),
                offset,
            })
            .await
            .map_err(|status| Failure::Transient(format!("starting the download: {}", status.message())))?
            .into_inner();
        let started = Instant::now();
        let mut last_report = Instant::now();
        let mut received = 0u64;
        loop {
            // A stream that stops sending is given up (and resumed from its offset) rather than waited on forever.
            let Ok(next) = tokio::time::timeout(DOWNLOAD_IDLE, stream.message()).await else {
                file.sync_all().map_err(|e| file_error("sync", &partial, e))?;
                return Err(Failure::Transient(format!(
                    "no image data for {} s; resuming from byte {offset}",
                    DOWNLOAD_IDLE.as_secs()
                )));
            };
            let chunk = match next {
                Ok(Some(chunk)) if chunk.data.is_empty() => {
                    return Err(Failure::Transient(
                        "the server sent an empty piece of the image".to_owned(),
                    ));
                }
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(status) => {
                    file.sync_all().map_err(|e| file_error("sync", &partial, e))?;
                    return Err(Failure::Transient(format!(
                        "the download broke off: {}",
                        status.message()
                    )));
                }
            };
            if chunk.offset != offset {
                return Err(Failure::Transient(format!(
                    "the server sent bytes from offset {} where {offset} was expected",
                    chunk.offset
                )));
            }
            let length = u64::try_from(chunk.data.len()).unwrap_or(u64::MAX);
            if offset.saturating_add(length) > target.length {
                drop(file);
                let _ = std::fs::remove_file(&partial);
                return Err(Failure::Final {
                    reason: tuf::Refusal::TooLarge.as_str().to_owned(),
                    detail: format!(
                        "the server sent more than the {} bytes {} is signed for",
                        target.length, target.name
                    ),
                });
            }
            file.write_all(&chunk.data)
                .map_err(|e| file_error("write", &partial, e))?;
            offset += length;
            received += length;
            if faults.cut_download_after.is_some_and(|cut| received >= cut) && offset < target.length {
                file.sync_all().map_err(|e| file_error("sync", &partial, e))?;
                return Err(Failure::Transient(format!(
                    "the download was cut after {received} bytes (fault injection)"
                )));
            }
            if let Some(rate) = faults.download_rate.filter(|r| *r > 0) {
                // A slow link: hold back until the bytes so far fit the rate.
                let due = Duration::from_millis(received.saturating_mul(1000) / rate);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                progress.downloading(offset).await;
            }
        }
        file.sync_all().map_err(|e| file_error("sync", &partial, e))?;
        if offset < target.length {
            return Err(Failure::Transient(format!(
                "the download ended after {offset} of {} bytes",
                target.length
            )));
        }
    }
    drop(file);
    if let Err(failure) = check_image(channel, paths, &target.name, &partial).await {
        if matches!(failure, Failure::Final { .. }) {
            // What is on disk is not the signed image: start over next time.
            let _ = std::fs::remove_file(&partial);
            if resumed {
                // The part kept from before may be what is wrong (a crash mid-write): one whole download decides.
                return Err(Failure::Transient(
                    "the resumed image did not verify; downloading it whole".to_owned(),
                ));
            }
        }
        return Err(failure);
    }
    if let Some(dir) = staged.parent() {
        std::fs::create_dir_all(dir).map_err(|e| file_error("create", dir, e))?;
        std::fs::rename(&partial, &staged).map_err(|e| file_error("stage", &staged, e))?;
        sync_dir(dir).map_err(|e| file_error("sync", dir, e))?;
    }
    Ok(staged)
}
