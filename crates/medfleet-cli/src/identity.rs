//! Identity commands: enrollment tokens, bulk import, revocation, operator/service credentials, renewal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use medfleet_core::identity::RevocationReason;
use medfleet_proto::client::{Bundle, new_key_and_csr, write_private};
use medfleet_proto::convert::{self, datetime, device_class_to_wire, duration_to_wire, revocation_reason_to_wire};
use medfleet_proto::v1::{self, credential_service_client::CredentialServiceClient};
use serde::Serialize;
use tonic::transport::Channel;

use crate::output::{self, DeviceView, Format};
use crate::{UsageError, location};

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration like 30m, 24h or 7days: {e}"))
}

fn parse_reason(s: &str) -> Result<RevocationReason, String> {
    s.parse()
}

fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(datetime).map(|t| t.to_rfc3339()).unwrap_or_default()
}

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

pub(crate) async fn import(channel: Channel, args: &ImportArgs, out: Format) -> anyhow::Result<()> {
    let mut reader =
        csv::Reader::from_path(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    // Check every row before sending anything, so a typo in row 900 does not leave 800 devices imported.
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

    let mut api = v1::registry_service_client::RegistryServiceClient::new(channel);
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
                failure = Some(status);
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

#[derive(Debug, Serialize)]
struct TokenView {
    device_id: String,
    token: String,
    expire_time: String,
}

pub(crate) async fn enroll_token(
    channel: Channel,
    device: &str,
    ttl: Duration,
    replace: bool,
    out: Format,
) -> anyhow::Result<()> {
    let mut api = v1::registry_service_client::RegistryServiceClient::new(channel);
    let token = api
        .issue_enrollment_token(v1::IssueEnrollmentTokenRequest {
            device_id: device.to_owned(),
            ttl: Some(duration_to_wire(ttl)),
            replace,
        })
        .await?
        .into_inner();
    let view = TokenView {
        device_id: token.device_id,
        token: token.token,
        expire_time: time(token.expire_time.as_ref()),
    };
    if out == Format::Json {
        return output::json(&view);
    }
    println!("{}", view.token);
    eprintln!(
        "one-time enrollment token for device {}, valid until {}; give it only to the device's installer:\n  \
         medfleet-agent enroll --server URL --ca ca.crt --token TOKEN --state-dir DIR",
        view.device_id, view.expire_time
    );
    if replace {
        eprintln!(
            "when it is used, the device's current certificate is revoked and the device is cut off; to keep its \
             buffered readings, re-enroll its own agent keeping its state directory:\n  \
             medfleet-agent enroll --reenroll --server URL --ca ca.crt --token TOKEN --state-dir DIR"
        );
    }
    Ok(())
}

pub(crate) async fn revoke_device(
    channel: Channel,
    device: &str,
    reason: Option<RevocationReason>,
    out: Format,
) -> anyhow::Result<()> {
    let mut api = v1::registry_service_client::RegistryServiceClient::new(channel);
    let device = match reason {
        Some(reason) => api
            .revoke_device(v1::RevokeDeviceRequest {
                id: device.to_owned(),
                reason: revocation_reason_to_wire(reason).into(),
            })
            .await?
            .into_inner(),
        None => api
            .decommission_device(v1::DecommissionDeviceRequest { id: device.to_owned() })
            .await?
            .into_inner(),
    };
    output::device(out, &device.into())
}

#[derive(Debug, Subcommand)]
pub(crate) enum PrincipalCommand {
    /// Create credentials: the key is generated here and written with the certificate to --out (mode 0600).
    #[command(after_help = "Example:\n  medfleet users create alice --out alice.pem\n  \
                            medfleet services create epic-bridge --out epic.pem --lifetime 90days")]
    Create {
        name: String,
        /// Where to write the bundle (key, certificate, CA).
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime (default: the server's setting for the kind).
        #[arg(long, value_parser = parse_duration)]
        lifetime: Option<Duration>,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Revoke every certificate of this principal, at once, on every replica, and disable it.
    #[command(after_help = "Example:\n  medfleet users revoke alice --reason affiliation-changed")]
    Revoke {
        name: String,
        /// compromised, superseded, retired, affiliation-changed or unspecified.
        #[arg(long, value_parser = parse_reason, default_value = "unspecified")]
        reason: RevocationReason,
    },
}

#[derive(Debug, Serialize)]
struct CertificateView {
    identity: String,
    serial: String,
    not_after: String,
    file: String,
}

pub(crate) async fn principal(
    channel: Channel,
    kind: v1::PrincipalKind,
    command: &PrincipalCommand,
    out: Format,
) -> anyhow::Result<()> {
    let mut api = CredentialServiceClient::new(channel);
    match command {
        PrincipalCommand::Create {
            name,
            out: path,
            lifetime,
            force,
        } => {
            if path.exists() && !force {
                return Err(UsageError(format!(
                    "{} exists; choose another --out or pass --force",
                    path.display()
                ))
                .into());
            }
            let (key_pem, csr_der) = new_key_and_csr()?;
            let response = api
                .issue_credentials(v1::IssueCredentialsRequest {
                    kind: kind.into(),
                    name: name.clone(),
                    csr_der,
                    lifetime: lifetime.map(duration_to_wire),
                })
                .await?
                .into_inner();
            write_bundle(path, &key_pem, &response)?;
            show_certificate(out, &response, path)
        }
        PrincipalCommand::Revoke { name, reason } => {
            let response = api
                .revoke_credentials(v1::RevokeCredentialsRequest {
                    kind: kind.into(),
                    name: name.clone(),
                    reason: revocation_reason_to_wire(*reason).into(),
                })
                .await?
                .into_inner();
            if out == Format::Json {
                return output::json(
                    &serde_json::json!({ "name": name, "revoked_certificates": response.revoked_certificates }),
                );
            }
            println!(
                "revoked {} certificate(s) of {name}; it can no longer connect",
                response.revoked_certificates
            );
            Ok(())
        }
    }
}

fn write_bundle(path: &Path, key_pem: &str, response: &v1::CertificateResponse) -> anyhow::Result<()> {
    let bundle = Bundle::parse(&format!("{key_pem}{}", response.certificate_chain_pem))
        .map_err(|e| anyhow::anyhow!("the server's answer is not a usable bundle: {e}"))?;
    write_private(path, &bundle.to_pem())?;
    Ok(())
}

fn show_certificate(out: Format, response: &v1::CertificateResponse, path: &Path) -> anyhow::Result<()> {
    let view = CertificateView {
        identity: response.identity.clone(),
        serial: response.serial.clone(),
        not_after: time(response.not_after.as_ref()),
        file: path.display().to_string(),
    };
    if out == Format::Json {
        return output::json(&view);
    }
    println!(
        "{} — certificate {} valid until {}, written to {} (mode 0600)",
        view.identity, view.serial, view.not_after, view.file
    );
    Ok(())
}

/// Renews the caller's own certificate with a fresh key and replaces the bundle atomically.
pub(crate) async fn renew(channel: Channel, target: &Path, out: Format) -> anyhow::Result<()> {
    let mut api = CredentialServiceClient::new(channel);
    let (key_pem, csr_der) = new_key_and_csr()?;
    let response = api.renew(v1::RenewRequest { csr_der }).await?.into_inner();
    write_bundle(target, &key_pem, &response)?;
    show_certificate(out, &response, target)
}
