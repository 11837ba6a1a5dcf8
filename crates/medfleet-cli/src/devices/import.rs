//! `medfleet devices import`: many devices registered from a CSV file in all-or-nothing batches, every row checked
//! before the first is sent, with their enrollment tokens written to a private file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use medfleet_proto::client::write_private;
use medfleet_proto::convert::{self, device_class_to_wire, duration_to_wire};
use medfleet_proto::v1;
use serde::Serialize;

use super::view::DeviceView;
use super::{Registry, missing_place};
use crate::args::{location, parse_duration};
use crate::error::UsageError;
use crate::output::{self, Format, time};

#[derive(Debug, Args)]
pub(crate) struct ImportArgs {
    /// CSV with a header: manufacturer,model,serial_number,device_class,eui64,location,tags
    /// (location SITE/WARD[/BED]; tags k=v;k=v; eui64, location and tags may be empty).
    pub(crate) file: PathBuf,
    /// Issue an enrollment token per device and write device_id,manufacturer,serial_number,token,expires_at here
    /// (mode 0600: tokens are secrets).
    #[arg(long)]
    pub(crate) tokens_out: Option<PathBuf>,
    /// Lifetime of the tokens.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    pub(crate) ttl: Duration,
}

#[derive(Debug, serde::Deserialize)]
struct ImportRow {
    manufacturer: String,
    model: String,
    serial_number: String,
    device_class: String,
    #[serde(default)]
    eui64: String,
    #[serde(default)]
    location: String,
    #[serde(default)]
    tags: String,
}

/// Devices sent per `ImportDevices` call; each call is all-or-nothing.
const IMPORT_BATCH: usize = 100;

fn import_request(row: &ImportRow) -> Result<v1::RegisterDeviceRequest, String> {
    let class = row.device_class.parse().map(device_class_to_wire)?;
    let mut tags = HashMap::new();
    for term in row.tags.split(';').filter(|t| !t.is_empty()) {
        let (k, v) = medfleet_core::registry::parse_tag_term(term)?;
        tags.insert(k, v);
    }
    Ok(v1::RegisterDeviceRequest {
        serial_number: row.serial_number.clone(),
        manufacturer: row.manufacturer.clone(),
        model: row.model.clone(),
        device_class: class.into(),
        eui64: row.eui64.clone(),
        location: if row.location.is_empty() {
            None
        } else {
            Some(location(&row.location).map_err(|e| e.to_string())?)
        },
        tags,
    })
}

#[derive(Debug, Serialize)]
struct ImportSummary {
    imported: usize,
    tokens_file: Option<String>,
    devices: Vec<DeviceView>,
}

/// Every row of the file as a registration, checked before anything is sent so that a typo in row 900 does not
/// leave 800 devices imported.
fn requests(args: &ImportArgs) -> anyhow::Result<Vec<v1::RegisterDeviceRequest>> {
    // A file that cannot be opened is a usage error, as for every other file the CLI is given.
    let mut reader = csv::Reader::from_path(&args.file)
        .map_err(|e| UsageError(format!("cannot read {}: {e}", args.file.display())))?;
    let mut requests = Vec::new();
    let mut problems = Vec::new();
    for (i, row) in reader.deserialize::<ImportRow>().enumerate() {
        let line = i + 2;
        match row.map_err(|e| e.to_string()).and_then(|r| import_request(&r)) {
            Ok(request) => match convert::new_device(&request) {
                Ok(_) => requests.push(request),
                Err(violations) => problems.push(format!("line {line}: {violations}")),
            },
            Err(e) => problems.push(format!("line {line}: {e}")),
        }
    }
    // The columns are the options of `devices register`: a bad row is the usage error a bad option would be.
    if !problems.is_empty() {
        return Err(UsageError(format!(
            "{} has {} invalid row(s); nothing was imported:\n  {}",
            args.file.display(),
            problems.len(),
            problems.join("\n  ")
        ))
        .into());
    }
    if requests.is_empty() {
        return Err(UsageError(format!("{} has no devices", args.file.display())).into());
    }
    Ok(requests)
}

pub(super) async fn run(api: &mut Registry, args: &ImportArgs, out: Format) -> anyhow::Result<()> {
    let requests = requests(args)?;
    let bar = if out == Format::Table {
        ProgressBar::new(requests.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} devices {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut imported: Vec<v1::ImportedDevice> = Vec::new();
    let mut failure = None;
    for batch in requests.chunks(IMPORT_BATCH) {
        let response = api
            .import_devices(v1::ImportDevicesRequest {
                devices: batch.to_vec(),
                issue_tokens: args.tokens_out.is_some(),
                token_ttl: Some(duration_to_wire(args.ttl)),
            })
            .await;
        match response {
            Ok(response) => {
                let devices = response.into_inner().devices;
                bar.inc(devices.len() as u64);
                imported.extend(devices);
            }
            Err(status) => {
                failure = Some(missing_place(status));
                break;
            }
        }
    }
    bar.finish_and_clear();

    // Tokens of what was imported are written even after a failure, so no device is left without its token.
    let tokens_file = match &args.tokens_out {
        Some(path) if !imported.is_empty() => {
            write_tokens(path, &imported)?;
            Some(path.display().to_string())
        }
        _ => None,
    };
    if let Some(status) = failure {
        eprintln!(
            "imported {} of {} devices before the server refused a batch{}",
            imported.len(),
            requests.len(),
            tokens_file
                .as_deref()
                .map(|f| format!("; their tokens are in {f}"))
                .unwrap_or_default()
        );
        return Err(status.into());
    }
    let devices: Vec<DeviceView> = imported
        .into_iter()
        .filter_map(|d| d.device)
        .map(DeviceView::from)
        .collect();
    if out == Format::Json {
        return output::json(&ImportSummary {
            imported: devices.len(),
            tokens_file,
            devices,
        });
    }
    println!(
        "imported {} devices{}",
        devices.len(),
        tokens_file
            .map(|f| format!("; enrollment tokens in {f} (keep it secret)"))
            .unwrap_or_default()
    );
    Ok(())
}

fn write_tokens(path: &Path, imported: &[v1::ImportedDevice]) -> anyhow::Result<()> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(["device_id", "manufacturer", "serial_number", "token", "expires_at"])?;
    for item in imported {
        let Some(device) = &item.device else { continue };
        writer.write_record([
            device.id.as_str(),
            device.manufacturer.as_str(),
            device.serial_number.as_str(),
            item.token.as_str(),
            time(item.token_expire_time.as_ref()).as_str(),
        ])?;
    }
    let text = String::from_utf8(writer.into_inner()?)?;
    write_private(path, &text)?;
    Ok(())
}
