//! `medfleet config set`, `get`, `history`, `diff` and `rollback`: the versions of the layers, and the document a
//! device resolves to from them.

use std::path::Path;

use medfleet_proto::v1;
use serde::Serialize;

use super::{Configs, LayerArgs, layer_text, read_json};
use crate::error::UsageError;
use crate::output::{self, Format};
use crate::pager::{self, Page};

#[derive(Debug, Serialize)]
struct VersionView {
    version: u64,
    layer: String,
    document: serde_json::Value,
    author: String,
    create_time: String,
    comment: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    rollback_of: Option<u64>,
}

impl From<v1::ConfigVersion> for VersionView {
    fn from(v: v1::ConfigVersion) -> Self {
        Self {
            version: v.version,
            layer: layer_text(v.layer.as_ref()),
            document: serde_json::from_str(&v.document_json).unwrap_or(serde_json::Value::Null),
            author: v.author,
            create_time: output::time(v.create_time.as_ref()),
            comment: v.comment,
            rollback_of: (v.rollback_of != 0).then_some(v.rollback_of),
        }
    }
}

fn print_version(out: Format, v: &VersionView) -> anyhow::Result<()> {
    if out == Format::Json {
        return output::json(v);
    }
    let rollback = v
        .rollback_of
        .map(|r| format!(" (restores version {r})"))
        .unwrap_or_default();
    println!(
        "version {}{rollback}\nlayer:   {}\nauthor:  {}\ntime:    {}\ncomment: {}\n{}",
        v.version,
        v.layer,
        v.author,
        v.create_time,
        v.comment,
        serde_json::to_string_pretty(&v.document)?
    );
    Ok(())
}

/// A version just made: its view as JSON, or "version N of the LAYER layer" and what it does.
fn print_made(out: Format, version: v1::ConfigVersion, what: &str) -> anyhow::Result<()> {
    if out == Format::Json {
        return output::json(&VersionView::from(version));
    }
    println!(
        "version {} of the {} layer {what}",
        version.version,
        layer_text(version.layer.as_ref())
    );
    Ok(())
}

#[derive(Debug, Serialize)]
struct SourceView {
    pointer: String,
    layer: String,
    version: u64,
}

#[derive(Debug, Serialize)]
struct ResolvedView {
    device_id: String,
    version: u64,
    digest: String,
    document: serde_json::Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sources: Vec<SourceView>,
}

pub(super) async fn set(
    api: &mut Configs,
    layer: &LayerArgs,
    file: &Path,
    comment: Option<&str>,
    out: Format,
) -> anyhow::Result<()> {
    let Some(layer) = layer.layer() else {
        return Err(UsageError("name the layer: --fleet, --model, --site, --ward or --device".into()).into());
    };
    let version = api
        .set_config(v1::SetConfigRequest {
            layer: Some(layer),
            document_json: read_json(file)?,
            comment: comment.unwrap_or_default().to_owned(),
        })
        .await?
        .into_inner();
    print_made(out, version, "stored; connected devices it affects receive it now")
}

/// `config get DEVICE`: the document the device resolves to, with --explain the layer each value comes from.
pub(super) async fn resolved(api: &mut Configs, id: &str, explain: bool, out: Format) -> anyhow::Result<()> {
    let resolved = api
        .resolve_config(v1::ResolveConfigRequest {
            device_id: id.to_owned(),
        })
        .await?
        .into_inner();
    let view = ResolvedView {
        document: serde_json::from_str(&resolved.document_json).unwrap_or(serde_json::Value::Null),
        sources: if explain {
            resolved
                .sources
                .iter()
                .map(|s| SourceView {
                    pointer: s.pointer.clone(),
                    layer: layer_text(s.layer.as_ref()),
                    version: s.version,
                })
                .collect()
        } else {
            Vec::new()
        },
        device_id: resolved.device_id,
        version: resolved.version,
        digest: resolved.digest,
    };
    if out == Format::Json {
        return output::json(&view);
    }
    println!(
        "device {} — desired version {} (digest {})",
        view.device_id, view.version, view.digest
    );
    println!("{}", serde_json::to_string_pretty(&view.document)?);
    if explain {
        let mut t = output::table(&["KEY", "FROM LAYER", "VERSION"]);
        for s in &view.sources {
            t.add_row(vec![s.pointer.clone(), s.layer.clone(), s.version.to_string()]);
        }
        println!("{t}");
    }
    Ok(())
}

/// `config get --LAYER`: that layer's current document.
pub(super) async fn layer(api: &mut Configs, layer: v1::ConfigLayer, out: Format) -> anyhow::Result<()> {
    let version = api
        .get_config_layer(v1::GetConfigLayerRequest { layer: Some(layer) })
        .await?
        .into_inner();
    print_version(out, &version.into())
}

pub(super) async fn history(api: &mut Configs, layer: &LayerArgs, limit: usize, out: Format) -> anyhow::Result<()> {
    let all = pager::collect(Some(limit), async |page_size, page_token| {
        let page = api
            .list_config_versions(v1::ListConfigVersionsRequest {
                layer: layer.layer(),
                page_size,
                page_token,
            })
            .await?
            .into_inner();
        Ok(Page::new(page.versions, page.next_page_token))
    })
    .await?;
    let all: Vec<VersionView> = all.into_iter().map(VersionView::from).collect();
    if out == Format::Json {
        return output::json(&all);
    }
    let mut t = output::table(&["VERSION", "LAYER", "AUTHOR", "TIME", "COMMENT"]);
    for v in &all {
        let comment = match v.rollback_of {
            Some(r) => format!("rollback to {r}: {}", v.comment),
            None => v.comment.clone(),
        };
        t.add_row(vec![
            v.version.to_string(),
            v.layer.clone(),
            v.author.clone(),
            v.create_time.clone(),
            comment,
        ]);
    }
    println!("{t}");
    Ok(())
}

pub(super) async fn diff(api: &mut Configs, from: u64, to: u64, out: Format) -> anyhow::Result<()> {
    let diff = api
        .diff_config_versions(v1::DiffConfigVersionsRequest {
            from_version: from,
            to_version: to,
        })
        .await?
        .into_inner();
    if out == Format::Json {
        let changes: Vec<serde_json::Value> = diff
            .changes
            .iter()
            .map(|c| {
                let value = |s: &str| serde_json::from_str(s).unwrap_or(serde_json::Value::Null);
                serde_json::json!({
                    "pointer": c.pointer,
                    "kind": kind_text(c.kind),
                    "from": value(&c.from_json),
                    "to": value(&c.to_json),
                })
            })
            .collect();
        return output::json(&changes);
    }
    if diff.changes.is_empty() {
        println!("versions {from} and {to} hold the same document");
    }
    for c in &diff.changes {
        match kind_text(c.kind) {
            "added" => println!("+ {} = {}", c.pointer, c.to_json),
            "removed" => println!("- {} (was {})", c.pointer, c.from_json),
            _ => println!("~ {}: {} → {}", c.pointer, c.from_json, c.to_json),
        }
    }
    Ok(())
}

pub(super) async fn rollback(api: &mut Configs, to: u64, comment: Option<&str>, out: Format) -> anyhow::Result<()> {
    let version = api
        .rollback_config(v1::RollbackConfigRequest {
            to_version: to,
            comment: comment.unwrap_or_default().to_owned(),
        })
        .await?
        .into_inner();
    print_made(out, version, &format!("restores version {to}"))
}

fn kind_text(kind: i32) -> &'static str {
    match v1::config_change::Kind::try_from(kind) {
        Ok(v1::config_change::Kind::Added) => "added",
        Ok(v1::config_change::Kind::Removed) => "removed",
        _ => "changed",
    }
}
