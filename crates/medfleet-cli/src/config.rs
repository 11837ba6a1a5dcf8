//! `medfleet config`: desired device configuration — layers, versions, schemas, drift.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use medfleet_proto::v1::{self, config_service_client::ConfigServiceClient};
use serde::Serialize;
use tonic::transport::Channel;

use crate::UsageError;
use crate::output::{self, Format};

/// Which layer a command works on; exactly one.
#[derive(Debug, Args, Clone)]
#[group(required = false, multiple = false)]
pub(crate) struct LayerArgs {
    /// The fleet-wide defaults.
    #[arg(long)]
    fleet: bool,
    /// A device model's layer.
    #[arg(long)]
    model: Option<String>,
    /// A site's layer.
    #[arg(long)]
    site: Option<String>,
    /// A ward's layer: SITE/WARD.
    #[arg(long)]
    ward: Option<String>,
    /// One device's override.
    #[arg(long)]
    device: Option<String>,
}

impl LayerArgs {
    fn layer(&self) -> Option<v1::ConfigLayer> {
        use v1::ConfigLayerKind as Kind;
        let (kind, key) = if self.fleet {
            (Kind::Fleet, String::new())
        } else if let Some(model) = &self.model {
            (Kind::Model, model.clone())
        } else if let Some(site) = &self.site {
            (Kind::Site, site.clone())
        } else if let Some(ward) = &self.ward {
            (Kind::Ward, ward.clone())
        } else if let Some(device) = &self.device {
            (Kind::Device, device.clone())
        } else {
            return None;
        };
        Some(v1::ConfigLayer { kind: kind.into(), key })
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Replace one layer's document with FILE (JSON object; "-" reads stdin). Validated against every affected
    /// model's schema first; connected devices get the result at once.
    #[command(
        after_help = "Examples:\n  medfleet config set --fleet defaults.json -m \"initial defaults\"\n  \
                            medfleet config set --ward stmarys/icu icu.json -m \"tighter HR alarm limits\"\n  \
                            medfleet config set --device 6f1c2d3e-0b1a-4c5d-8e9f-0a1b2c3d4e5f override.json"
    )]
    Set {
        #[command(flatten)]
        layer: LayerArgs,
        file: PathBuf,
        /// Why (kept with the version and in the audit trail).
        #[arg(short = 'm', long)]
        comment: Option<String>,
    },
    /// A device's resolved configuration (with --explain: where each value comes from), or one layer's document.
    #[command(
        after_help = "Examples:\n  medfleet config get 6f1c2d3e-0b1a-4c5d-8e9f-0a1b2c3d4e5f --explain\n  \
                            medfleet config get --ward stmarys/icu"
    )]
    Get {
        /// A device id (or name a layer instead).
        device_id: Option<String>,
        #[command(flatten)]
        layer: LayerArgs,
        /// Show the layer and version each value comes from.
        #[arg(long)]
        explain: bool,
    },
    /// Versions, newest first (all layers, or one).
    #[command(
        after_help = "Examples:\n  medfleet config history\n  medfleet config history --ward stmarys/icu --limit 5"
    )]
    History {
        #[command(flatten)]
        layer: LayerArgs,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// What changed between two versions' documents.
    #[command(after_help = "Example:\n  medfleet config diff 12 15")]
    Diff { from: u64, to: u64 },
    /// Make an earlier version's document current again for its layer (as a new version).
    #[command(after_help = "Example:\n  medfleet config rollback --to 12 -m \"alarm change caused nuisance alarms\"")]
    Rollback {
        #[arg(long)]
        to: u64,
        #[arg(short = 'm', long)]
        comment: Option<String>,
    },
    /// Devices whose reported configuration differs from the desired one.
    #[command(
        after_help = "Examples:\n  medfleet config drift\n  medfleet config drift --ward stmarys/icu --all -o json"
    )]
    Drift {
        #[arg(long)]
        site: Option<String>,
        /// SITE/WARD
        #[arg(long, conflicts_with = "site")]
        ward: Option<String>,
        /// Include devices that are in sync.
        #[arg(long)]
        all: bool,
    },
    /// A model's configuration schema (JSON Schema draft 2020-12).
    #[command(subcommand)]
    Schema(SchemaCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum SchemaCommand {
    /// Register or replace a model's schema; refused if a current configuration of the model violates it.
    #[command(after_help = "Example:\n  medfleet config schema set --model MX450 mx450.schema.json")]
    Set {
        #[arg(long)]
        model: String,
        file: PathBuf,
        #[arg(short = 'm', long)]
        comment: Option<String>,
    },
    /// Print a model's schema.
    #[command(after_help = "Example:\n  medfleet config schema get --model MX450")]
    Get {
        #[arg(long)]
        model: String,
    },
}

fn read_json(path: &Path) -> anyhow::Result<String> {
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        text
    } else {
        std::fs::read_to_string(path).map_err(|e| UsageError(format!("cannot read {}: {e}", path.display())))?
    };
    // Checked here for a clear local message; the server checks again.
    serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| UsageError(format!("{} is not valid JSON: {e}", path.display())))?;
    Ok(text)
}

fn layer_text(layer: Option<&v1::ConfigLayer>) -> String {
    let Some(layer) = layer else {
        return String::new();
    };
    let kind = match v1::ConfigLayerKind::try_from(layer.kind) {
        Ok(v1::ConfigLayerKind::Fleet) => return "fleet".to_owned(),
        Ok(v1::ConfigLayerKind::Model) => "model",
        Ok(v1::ConfigLayerKind::Site) => "site",
        Ok(v1::ConfigLayerKind::Ward) => "ward",
        Ok(v1::ConfigLayerKind::Device) => "device",
        _ => "unknown",
    };
    format!("{kind} {}", layer.key)
}

fn pretty(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| json.to_owned())
}

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

#[derive(Debug, Serialize)]
struct DriftView {
    device_id: String,
    model: String,
    location: String,
    online: bool,
    in_sync: bool,
    desired_version: u64,
    reported_version: u64,
    desired_digest: String,
    reported_digest: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    rejection: String,
}

pub(crate) async fn run(channel: Channel, command: &ConfigCommand, out: Format) -> anyhow::Result<()> {
    let mut api = ConfigServiceClient::new(channel);
    match command {
        ConfigCommand::Set { layer, file, comment } => {
            let Some(layer) = layer.layer() else {
                return Err(UsageError("name the layer: --fleet, --model, --site, --ward or --device".into()).into());
            };
            let version = api
                .set_config(v1::SetConfigRequest {
                    layer: Some(layer),
                    document_json: read_json(file)?,
                    comment: comment.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if out == Format::Json {
                return output::json(&VersionView::from(version));
            }
            println!(
                "version {} of the {} layer stored; connected devices it affects receive it now",
                version.version,
                layer_text(version.layer.as_ref())
            );
            Ok(())
        }
        ConfigCommand::Get {
            device_id,
            layer,
            explain,
        } => match (device_id, layer.layer()) {
            (Some(id), None) => {
                let resolved = api
                    .resolve_config(v1::ResolveConfigRequest { device_id: id.clone() })
                    .await?
                    .into_inner();
                let view = ResolvedView {
                    document: serde_json::from_str(&resolved.document_json).unwrap_or(serde_json::Value::Null),
                    sources: if *explain {
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
                if *explain {
                    let mut t = output::table(&["KEY", "FROM LAYER", "VERSION"]);
                    for s in &view.sources {
                        t.add_row(vec![s.pointer.clone(), s.layer.clone(), s.version.to_string()]);
                    }
                    println!("{t}");
                }
                Ok(())
            }
            (None, Some(layer)) => {
                let version = api
                    .get_config_layer(v1::GetConfigLayerRequest { layer: Some(layer) })
                    .await?
                    .into_inner();
                print_version(out, &version.into())
            }
            _ => Err(
                UsageError("name a device id or one layer (--fleet, --model, --site, --ward, --device)".into()).into(),
            ),
        },
        ConfigCommand::History { layer, limit } => {
            let mut all: Vec<VersionView> = Vec::new();
            let mut token = String::new();
            while all.len() < *limit {
                let page = api
                    .list_config_versions(v1::ListConfigVersionsRequest {
                        layer: layer.layer(),
                        page_size: i32::try_from((*limit - all.len()).min(500)).unwrap_or(500),
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                all.extend(page.versions.into_iter().map(VersionView::from));
                token = page.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
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
        ConfigCommand::Diff { from, to } => {
            let diff = api
                .diff_config_versions(v1::DiffConfigVersionsRequest {
                    from_version: *from,
                    to_version: *to,
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
        ConfigCommand::Rollback { to, comment } => {
            let version = api
                .rollback_config(v1::RollbackConfigRequest {
                    to_version: *to,
                    comment: comment.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if out == Format::Json {
                return output::json(&VersionView::from(version));
            }
            println!(
                "version {} of the {} layer restores version {to}",
                version.version,
                layer_text(version.layer.as_ref())
            );
            Ok(())
        }
        ConfigCommand::Drift { site, ward, all } => {
            let (site, ward) = match (site, ward) {
                (_, Some(scope)) => {
                    let (s, w) = scope
                        .split_once('/')
                        .ok_or_else(|| UsageError("--ward must be SITE/WARD".into()))?;
                    (s.to_owned(), w.to_owned())
                }
                (Some(site), None) => (site.clone(), String::new()),
                (None, None) => (String::new(), String::new()),
            };
            let drift = api
                .list_config_drift(v1::ListConfigDriftRequest {
                    site,
                    ward,
                    include_in_sync: *all,
                })
                .await?
                .into_inner();
            let views: Vec<DriftView> = drift
                .devices
                .into_iter()
                .map(|d| DriftView {
                    location: d
                        .location
                        .map_or_else(|| "storage".to_owned(), |l| format!("{}/{}", l.site, l.ward)),
                    device_id: d.device_id,
                    model: d.model,
                    online: d.online,
                    in_sync: d.in_sync,
                    desired_version: d.desired_version,
                    reported_version: d.reported_version,
                    desired_digest: d.desired_digest,
                    reported_digest: d.reported_digest,
                    rejection: d.rejection_reason,
                })
                .collect();
            if out == Format::Json {
                return output::json(&views);
            }
            let mut t = output::table(&["DEVICE", "MODEL", "LOCATION", "ONLINE", "DESIRED", "REPORTED", "STATUS"]);
            for d in &views {
                let status = if d.in_sync {
                    "in sync".to_owned()
                } else if !d.rejection.is_empty() {
                    format!("rejected: {}", d.rejection)
                } else if d.online {
                    "applying".to_owned()
                } else {
                    "offline (gets it on reconnect)".to_owned()
                };
                t.add_row(vec![
                    d.device_id.clone(),
                    d.model.clone(),
                    d.location.clone(),
                    if d.online { "yes" } else { "no" }.to_owned(),
                    d.desired_version.to_string(),
                    if d.reported_digest.is_empty() {
                        "-".to_owned()
                    } else {
                        d.reported_version.to_string()
                    },
                    status,
                ]);
            }
            println!("{t}");
            eprintln!("{} device(s) drifting", views.iter().filter(|d| !d.in_sync).count());
            Ok(())
        }
        ConfigCommand::Schema(SchemaCommand::Set { model, file, comment }) => {
            let schema = api
                .set_config_schema(v1::SetConfigSchemaRequest {
                    model: model.clone(),
                    schema_json: read_json(file)?,
                    comment: comment.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if out == Format::Json {
                return output::json(&serde_json::json!({
                    "model": schema.model,
                    "author": schema.author,
                    "update_time": output::time(schema.update_time.as_ref()),
                }));
            }
            println!(
                "schema of model {} stored; every later change is validated against it",
                schema.model
            );
            Ok(())
        }
        ConfigCommand::Schema(SchemaCommand::Get { model }) => {
            let schema = api
                .get_config_schema(v1::GetConfigSchemaRequest { model: model.clone() })
                .await?
                .into_inner();
            if out == Format::Json {
                let value: serde_json::Value = serde_json::from_str(&schema.schema_json)?;
                return output::json(&value);
            }
            println!("{}", pretty(&schema.schema_json));
            Ok(())
        }
    }
}

fn kind_text(kind: i32) -> &'static str {
    match v1::config_change::Kind::try_from(kind) {
        Ok(v1::config_change::Kind::Added) => "added",
        Ok(v1::config_change::Kind::Removed) => "removed",
        _ => "changed",
    }
}
