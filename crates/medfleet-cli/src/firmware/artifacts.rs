//! `medfleet firmware list`, `show` and `delete`: the signed images medfleetd stores, and how they are shown.

use medfleet_proto::v1;
use serde::Serialize;

use super::Firmware;
use crate::confirm::confirm;
use crate::output::{self, Format, time};
use crate::pager::{self, Page};

#[derive(Debug, Serialize)]
pub(super) struct ArtifactView {
    pub(super) id: String,
    pub(super) target_name: String,
    pub(super) hardware_id: String,
    pub(super) version: String,
    pub(super) release_counter: u64,
    pub(super) downgrade_from: Vec<u64>,
    pub(super) sha256: String,
    pub(super) length: u64,
    pub(super) upload_time: String,
    pub(super) uploaded_by: String,
    pub(super) comment: String,
    pub(super) targets_version: u64,
    pub(super) active_rollouts: Vec<String>,
}

impl From<v1::Artifact> for ArtifactView {
    fn from(a: v1::Artifact) -> Self {
        Self {
            upload_time: time(a.upload_time.as_ref()),
            id: a.id,
            target_name: a.target_name,
            hardware_id: a.hardware_id,
            version: a.version,
            release_counter: a.release_counter,
            downgrade_from: a.downgrade_from,
            sha256: a.sha256,
            length: a.length,
            uploaded_by: a.uploaded_by,
            comment: a.comment,
            targets_version: a.targets_version,
            active_rollouts: a.active_rollouts,
        }
    }
}

fn downgrade_text(from: &[u64]) -> String {
    if from.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = from.iter().map(ToString::to_string).collect();
        format!(" (signed downgrade from {})", list.join(", "))
    }
}

pub(super) fn print_artifact(a: &ArtifactView) {
    println!(
        "artifact {}\n  target:     {}\n  model:      {}\n  version:    {} (release {}{})\n  sha256:     {}\n  \
         length:     {} bytes\n  uploaded:   {} by {}\n  targets:    version {}\n  comment:    {}\n  rollouts:   {}",
        a.id,
        a.target_name,
        a.hardware_id,
        a.version,
        a.release_counter,
        downgrade_text(&a.downgrade_from),
        a.sha256,
        a.length,
        a.upload_time,
        a.uploaded_by,
        a.targets_version,
        a.comment,
        if a.active_rollouts.is_empty() {
            "none unfinished".to_owned()
        } else {
            a.active_rollouts.join(", ")
        }
    );
}

pub(super) async fn list(
    api: &mut Firmware,
    model: Option<&str>,
    limit: Option<usize>,
    out: Format,
) -> anyhow::Result<()> {
    let all = pager::collect(limit, async |page_size, page_token| {
        let page = api
            .list_artifacts(v1::ListArtifactsRequest {
                hardware_id: model.unwrap_or_default().to_owned(),
                page_size,
                page_token,
            })
            .await?
            .into_inner();
        Ok(Page::new(page.artifacts, page.next_page_token))
    })
    .await?;
    let rows: Vec<ArtifactView> = all.into_iter().map(ArtifactView::from).collect();
    if out == Format::Json {
        return output::json(&rows);
    }
    let mut table = output::table(&[
        "ID", "TARGET", "MODEL", "VERSION", "RELEASE", "SIZE", "UPLOADED", "ROLLOUTS",
    ]);
    for a in &rows {
        table.add_row(vec![
            a.id.clone(),
            a.target_name.clone(),
            a.hardware_id.clone(),
            a.version.clone(),
            format!("{}{}", a.release_counter, downgrade_text(&a.downgrade_from)),
            indicatif::HumanBytes(a.length).to_string(),
            a.upload_time.clone(),
            a.active_rollouts.len().to_string(),
        ]);
    }
    println!("{table}");
    Ok(())
}

pub(super) async fn show(api: &mut Firmware, artifact: &str, out: Format) -> anyhow::Result<()> {
    let view = ArtifactView::from(
        api.get_artifact(v1::GetArtifactRequest {
            artifact: artifact.to_owned(),
        })
        .await?
        .into_inner(),
    );
    if out == Format::Json {
        return output::json(&view);
    }
    print_artifact(&view);
    Ok(())
}

pub(super) async fn delete(api: &mut Firmware, artifact: &str, yes: bool, out: Format) -> anyhow::Result<()> {
    // Looked up first: the question names what goes, and a wrong name fails before anyone is asked.
    let found = ArtifactView::from(
        api.get_artifact(v1::GetArtifactRequest {
            artifact: artifact.to_owned(),
        })
        .await?
        .into_inner(),
    );
    confirm(
        &format!(
            "Delete firmware {} ({} version {}, artifact {})? Its image is removed from medfleetd",
            found.target_name, found.hardware_id, found.version, found.id
        ),
        yes,
    )?;
    api.delete_artifact(v1::DeleteArtifactRequest {
        artifact: found.id.clone(),
    })
    .await?;
    // The signed targets metadata still lists it (only the key holders can change that): a re-signing that keeps
    // it would be refused, so say now how the next one leaves it out.
    eprintln!(
        "note: the signed targets metadata still lists {name}; when you next re-sign, leave it out: medfleet \
         firmware resign --metadata DIR --key KEY --remove {name}",
        name = found.target_name
    );
    if out == Format::Json {
        return output::json(&serde_json::json!({ "deleted": found }));
    }
    println!("deleted artifact {} ({})", found.id, found.target_name);
    Ok(())
}
