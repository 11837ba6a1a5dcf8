//! `medfleet config`: desired device configuration — the layers a device's document is merged from (fleet, model,
//! site, ward, device), their versions (`versions`), the devices that differ from them (`drift`) and each model's
//! schema (`schema`). Configuration here always means a device's.

mod drift;
mod schema;
mod versions;

use std::io::Read as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use medfleet_proto::v1::{self, config_service_client::ConfigServiceClient};
use tonic::transport::Channel;

use crate::error::{InvalidInput, UsageError};
use crate::output::Format;

type Configs = ConfigServiceClient<Channel>;

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

pub(crate) async fn run(channel: Channel, command: &ConfigCommand, out: Format) -> anyhow::Result<()> {
    let mut api = ConfigServiceClient::new(channel);
    match command {
        ConfigCommand::Set { layer, file, comment } => {
            versions::set(&mut api, layer, file, comment.as_deref(), out).await
        }
        ConfigCommand::Get {
            device_id,
            layer,
            explain,
        } => match (device_id, layer.layer()) {
            (Some(id), None) => versions::resolved(&mut api, id, *explain, out).await,
            (None, Some(layer)) => versions::layer(&mut api, layer, out).await,
            _ => Err(
                UsageError("name a device id or one layer (--fleet, --model, --site, --ward, --device)".into()).into(),
            ),
        },
        ConfigCommand::History { layer, limit } => versions::history(&mut api, layer, *limit, out).await,
        ConfigCommand::Diff { from, to } => versions::diff(&mut api, *from, *to, out).await,
        ConfigCommand::Rollback { to, comment } => versions::rollback(&mut api, *to, comment.as_deref(), out).await,
        ConfigCommand::Drift { site, ward, all } => {
            drift::run(&mut api, site.as_deref(), ward.as_deref(), *all, out).await
        }
        ConfigCommand::Schema(command) => schema::run(&mut api, command, out).await,
    }
}

fn read_json(path: &Path) -> anyhow::Result<String> {
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        text
    } else {
        std::fs::read_to_string(path).map_err(|e| UsageError(format!("cannot read {}: {e}", path.display())))?
    };
    // Checked here for a clear local message; the server checks again, and would refuse it as invalid input too.
    serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| InvalidInput(format!("{} is not valid JSON: {e}", path.display())))?;
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
