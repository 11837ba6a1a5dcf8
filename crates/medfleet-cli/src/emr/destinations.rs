//! `medfleet emr create`, `list`, `update`, `enable`, `disable` and `delete`: the destinations themselves, their
//! filters and secrets (read from files, never shown back: only whether one is set and the key sealing it).

use std::path::PathBuf;

use medfleet_proto::v1;
use serde::Serialize;

use super::Emr;
use crate::args::mask;
use crate::error::UsageError;
use crate::output::{self, Format};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Kind {
    Feed,
    Fhir,
    Mllp,
}

#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    name: String,
    #[arg(long, value_enum)]
    kind: Kind,
    /// FHIR: base URL. MLLP: HOST:PORT.
    #[arg(long, default_value = "")]
    endpoint: String,
    /// Only chart entries from these sites (repeatable).
    #[arg(long = "site")]
    sites: Vec<String>,
    /// Only chart entries from these SITE/WARD wards (repeatable).
    #[arg(long = "ward")]
    wards: Vec<String>,
    /// Chart the median per interval instead of every reading, e.g. 15m (threshold breaches go at once).
    #[arg(long, value_parser = humantime::parse_duration)]
    interval: Option<std::time::Duration>,
    /// A file holding the FHIR bearer token (kept out of shell history).
    #[arg(long)]
    bearer_token_file: Option<PathBuf>,
    /// PEM CA of the receiver's TLS certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Mutual TLS: medfleet's client certificate chain (PEM) for this receiver.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Mutual TLS: the client certificate's private key (PEM).
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// MLLP MSH-5 / MSH-6.
    #[arg(long, default_value = "")]
    receiving_application: String,
    #[arg(long, default_value = "")]
    receiving_facility: String,
    /// Create it disabled.
    #[arg(long)]
    disabled: bool,
    /// MLLP without TLS (no --ca): chart entries cross the network in clear. For a receiver on an isolated
    /// integration network only; the audit trail records it.
    #[arg(long)]
    insecure_plaintext: bool,
}

impl CreateArgs {
    /// The destination to create, with its secrets read from their files.
    fn destination(&self) -> anyhow::Result<v1::EmrDestination> {
        Ok(v1::EmrDestination {
            name: self.name.clone(),
            kind: match self.kind {
                Kind::Feed => v1::EmrDestinationKind::Feed,
                Kind::Fhir => v1::EmrDestinationKind::Fhir,
                Kind::Mllp => v1::EmrDestinationKind::Mllp,
            }
            .into(),
            sites: self.sites.clone(),
            wards: self.wards.clone(),
            interval_seconds: self
                .interval
                .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
            endpoint: self.endpoint.clone(),
            bearer_token: read_file("bearer-token-file", self.bearer_token_file.as_ref())?,
            ca_pem: read_file("ca", self.ca.as_ref())?,
            receiving_application: self.receiving_application.clone(),
            receiving_facility: self.receiving_facility.clone(),
            enabled: Some(!self.disabled),
            insecure_plaintext: self.insecure_plaintext,
            client_certificate_pem: read_file("client-cert", self.client_cert.as_ref())?,
            client_key_pem: read_file("client-key", self.client_key.as_ref())?,
            ..Default::default()
        })
    }
}

/// `medfleet emr update`: each option given becomes one path of the update mask.
// Each flag is an independent command-line switch, not state that an enum would model better.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, clap::Args)]
pub(crate) struct UpdateArgs {
    name: String,
    /// FHIR: base URL. MLLP: HOST:PORT.
    #[arg(long)]
    endpoint: Option<String>,
    /// Replace the site filter (repeatable).
    #[arg(long = "site", conflicts_with = "everywhere")]
    sites: Vec<String>,
    /// Replace the ward filter, SITE/WARD (repeatable).
    #[arg(long = "ward", conflicts_with = "everywhere")]
    wards: Vec<String>,
    /// Remove both filters: chart entries from everywhere.
    #[arg(long)]
    everywhere: bool,
    /// Median per interval, e.g. 15m; 0s for every reading.
    #[arg(long, value_parser = humantime::parse_duration)]
    interval: Option<std::time::Duration>,
    /// A file holding the new FHIR bearer token (kept out of shell history).
    #[arg(long, conflicts_with = "remove_bearer_token")]
    bearer_token_file: Option<PathBuf>,
    #[arg(long)]
    remove_bearer_token: bool,
    /// New PEM CA of the receiver's TLS certificate.
    #[arg(long, conflicts_with = "remove_ca")]
    ca: Option<PathBuf>,
    /// Remove the CA (MLLP then sends in clear and needs --insecure-plaintext).
    #[arg(long)]
    remove_ca: bool,
    /// Mutual TLS: a new client certificate chain (PEM), with its key.
    #[arg(long, requires = "client_key", conflicts_with = "remove_client_cert")]
    client_cert: Option<PathBuf>,
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Stop presenting a client certificate.
    #[arg(long)]
    remove_client_cert: bool,
    #[arg(long)]
    receiving_application: Option<String>,
    #[arg(long)]
    receiving_facility: Option<String>,
    /// MLLP without TLS: accept again that chart entries cross the network in clear (needed with a new endpoint).
    #[arg(long)]
    insecure_plaintext: bool,
}

impl UpdateArgs {
    /// The request: the destination with the new values, and the mask naming them.
    fn request(&self) -> anyhow::Result<v1::UpdateDestinationRequest> {
        let mut paths: Vec<&str> = Vec::new();
        let mut d = v1::EmrDestination {
            name: self.name.clone(),
            ..Default::default()
        };
        if let Some(endpoint) = &self.endpoint {
            endpoint.clone_into(&mut d.endpoint);
            paths.push("endpoint");
        }
        if !self.sites.is_empty() || self.everywhere {
            d.sites.clone_from(&self.sites);
            paths.push("sites");
        }
        if !self.wards.is_empty() || self.everywhere {
            d.wards.clone_from(&self.wards);
            paths.push("wards");
        }
        if let Some(interval) = self.interval {
            d.interval_seconds = u32::try_from(interval.as_secs()).unwrap_or(u32::MAX);
            paths.push("interval_seconds");
        }
        if self.bearer_token_file.is_some() || self.remove_bearer_token {
            d.bearer_token = read_file("bearer-token-file", self.bearer_token_file.as_ref())?;
            if self.bearer_token_file.is_some() && d.bearer_token.is_empty() {
                return Err(
                    UsageError("--bearer-token-file is empty; use --remove-bearer-token to remove it".into()).into(),
                );
            }
            paths.push("bearer_token");
        }
        if self.ca.is_some() || self.remove_ca {
            d.ca_pem = read_file("ca", self.ca.as_ref())?;
            paths.push("ca_pem");
        }
        if self.client_cert.is_some() || self.remove_client_cert {
            d.client_certificate_pem = read_file("client-cert", self.client_cert.as_ref())?;
            d.client_key_pem = read_file("client-key", self.client_key.as_ref())?;
            paths.extend(["client_certificate_pem", "client_key_pem"]);
        }
        if let Some(application) = &self.receiving_application {
            application.clone_into(&mut d.receiving_application);
            paths.push("receiving_application");
        }
        if let Some(facility) = &self.receiving_facility {
            facility.clone_into(&mut d.receiving_facility);
            paths.push("receiving_facility");
        }
        if self.insecure_plaintext {
            d.insecure_plaintext = true;
            paths.push("insecure_plaintext");
        }
        if paths.is_empty() {
            return Err(UsageError("name at least one thing to change (see --help)".into()).into());
        }
        Ok(update_request(d, &paths))
    }
}

fn update_request(destination: v1::EmrDestination, paths: &[&str]) -> v1::UpdateDestinationRequest {
    v1::UpdateDestinationRequest {
        destination: Some(destination),
        update_mask: Some(mask(paths)),
    }
}

#[derive(Debug, Serialize)]
struct DestinationView {
    name: String,
    kind: String,
    endpoint: String,
    sites: Vec<String>,
    wards: Vec<String>,
    interval_seconds: u32,
    enabled: bool,
    created_by: String,
    bearer_token: &'static str,
    client_key: &'static str,
    /// The keyring keys sealing its secrets.
    secret_key_ids: Vec<String>,
    /// Why no replica delivers to it now; empty when fine.
    relay_error: String,
}

impl From<v1::EmrDestination> for DestinationView {
    fn from(d: v1::EmrDestination) -> Self {
        let kind = match v1::EmrDestinationKind::try_from(d.kind) {
            Ok(v1::EmrDestinationKind::Feed) => "feed",
            Ok(v1::EmrDestinationKind::Fhir) => "fhir",
            Ok(v1::EmrDestinationKind::Mllp) => "mllp",
            _ => "unknown",
        };
        Self {
            name: d.name,
            kind: kind.into(),
            endpoint: d.endpoint,
            sites: d.sites,
            wards: d.wards,
            interval_seconds: d.interval_seconds,
            enabled: d.enabled.unwrap_or(true),
            created_by: d.created_by,
            bearer_token: if d.bearer_token_set { "set" } else { "not set" },
            client_key: if d.client_key_set { "set" } else { "not set" },
            secret_key_ids: d.secret_key_ids,
            relay_error: d.relay_error,
        }
    }
}

/// "token set, key not set (k20261202-ab12)": whether each secret is stored, and the keys that seal them.
fn secrets_column(d: &DestinationView) -> String {
    let keys = if d.secret_key_ids.is_empty() {
        String::new()
    } else {
        format!(" ({})", d.secret_key_ids.join(", "))
    };
    format!("token {}, key {}{keys}", d.bearer_token, d.client_key)
}

fn read_file(flag: &str, path: Option<&PathBuf>) -> anyhow::Result<String> {
    path.map(|p| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .map_err(|e| UsageError(format!("cannot read --{flag} {}: {e}", p.display())).into())
    })
    .transpose()
    .map(Option::unwrap_or_default)
}

pub(super) async fn create(api: &mut Emr, args: &CreateArgs, out: Format) -> anyhow::Result<()> {
    let created = api.create_destination(args.destination()?).await?.into_inner();
    let view = DestinationView::from(created);
    if out == Format::Json {
        return output::json(&view);
    }
    println!("EMR destination {} ({}) created", view.name, view.kind);
    Ok(())
}

pub(super) async fn list(api: &mut Emr, out: Format) -> anyhow::Result<()> {
    let rows: Vec<DestinationView> = api
        .list_destinations(v1::ListDestinationsRequest {})
        .await?
        .into_inner()
        .destinations
        .into_iter()
        .map(DestinationView::from)
        .collect();
    if out == Format::Json {
        return output::json(&rows);
    }
    let mut table = output::table(&[
        "NAME", "KIND", "ENDPOINT", "FILTER", "INTERVAL", "ENABLED", "SECRETS", "STATUS",
    ]);
    for d in &rows {
        let filter = [d.sites.clone(), d.wards.clone()].concat().join(", ");
        table.add_row(vec![
            d.name.clone(),
            d.kind.clone(),
            d.endpoint.clone(),
            if filter.is_empty() { "everywhere".into() } else { filter },
            if d.interval_seconds == 0 {
                "every reading".into()
            } else {
                format!("{} s", d.interval_seconds)
            },
            d.enabled.to_string(),
            secrets_column(d),
            if d.relay_error.is_empty() {
                "ok".into()
            } else {
                d.relay_error.clone()
            },
        ]);
    }
    println!("{table}");
    Ok(())
}

pub(super) async fn update(api: &mut Emr, args: &UpdateArgs, out: Format) -> anyhow::Result<()> {
    let updated = api.update_destination(args.request()?).await?.into_inner();
    let view = DestinationView::from(updated);
    if out == Format::Json {
        return output::json(&view);
    }
    println!("EMR destination {} updated", view.name);
    Ok(())
}

/// `emr enable` and `emr disable`.
pub(super) async fn set_enabled(api: &mut Emr, name: &str, enable: bool, out: Format) -> anyhow::Result<()> {
    let request = update_request(
        v1::EmrDestination {
            name: name.to_owned(),
            enabled: Some(enable),
            ..Default::default()
        },
        &["enabled"],
    );
    let view = DestinationView::from(api.update_destination(request).await?.into_inner());
    if out == Format::Json {
        return output::json(&view);
    }
    if enable {
        println!("EMR destination {name} enabled: pending deliveries are sent now");
    } else {
        println!(
            "EMR destination {name} disabled: nothing is sent to it until `medfleet emr enable {name}`; \
             deliveries already queued wait, but chart entries made while it is disabled are never sent to it"
        );
    }
    Ok(())
}

pub(super) async fn delete(api: &mut Emr, name: &str, force: bool, out: Format) -> anyhow::Result<()> {
    let deleted = api
        .delete_destination(v1::DeleteDestinationRequest {
            name: name.to_owned(),
            force,
        })
        .await?
        .into_inner();
    if out == Format::Json {
        return output::json(&serde_json::json!({
            "name": name,
            "deleted_subscriptions": deleted.deleted_subscriptions,
            "discarded_deliveries": deleted.discarded_deliveries,
        }));
    }
    println!(
        "EMR destination {name} deleted; {} pending deliveries discarded{}",
        deleted.discarded_deliveries,
        if deleted.deleted_subscriptions.is_empty() {
            String::new()
        } else {
            format!("; subscriptions deleted: {}", deleted.deleted_subscriptions.join(", "))
        }
    );
    Ok(())
}
