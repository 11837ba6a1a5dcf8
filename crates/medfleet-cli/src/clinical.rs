//! `medfleet patients`, `observations`, `emr` and `feed`: device–patient associations, the chart, EMR
//! destinations and their deliveries, and a live view of a feed for integration teams.

use std::path::PathBuf;

use clap::Subcommand;
use medfleet_proto::convert::timestamp;
use medfleet_proto::v1::{
    self, emr_service_client::EmrServiceClient, feed_service_client::FeedServiceClient,
    observation_service_client::ObservationServiceClient, patient_service_client::PatientServiceClient,
};
use serde::Serialize;
use tonic::transport::Channel;

use crate::UsageError;
use crate::output::{self, Format};

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct PatientArgs {
    /// The patient's medical record number.
    patient: String,
    /// The MRN's assigning authority.
    #[arg(long, default_value = "MRN")]
    authority: String,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PatientCommand {
    /// Associate a device with a patient; readings observed from --from (default: now) chart to them.
    #[command(
        after_help = "Examples:\n  medfleet patients associate 0b7c…-uuid MRN-00042 --authority HOSP\n  \
                            medfleet patients associate 0b7c…-uuid MRN-00042 --from 2026-11-25T08:00:00Z   # retroactive"
    )]
    Associate {
        device: String,
        #[command(flatten)]
        patient: PatientArgs,
        /// Display name (Family^Given), kept with the identifier.
        #[arg(long)]
        name: Option<String>,
        /// RFC 3339 start (default: now). A past start charts the device's stored readings since then.
        #[arg(long)]
        from: Option<String>,
        /// RFC 3339 end (default: open).
        #[arg(long)]
        until: Option<String>,
    },
    /// End a device's current association (at --at, default now), or cancel a planned one.
    #[command(after_help = "Examples:\n  medfleet patients dissociate 0b7c…-uuid\n  \
                            medfleet patients dissociate 0b7c…-uuid --cancel-planned   # a start time typed by mistake")]
    Dissociate {
        device: String,
        #[arg(long)]
        at: Option<String>,
        /// Cancel the association planned to start after --at (default now; only one that has not started yet)
        /// instead of ending the open one.
        #[arg(long)]
        cancel_planned: bool,
    },
    /// Associations of a device (--device) or of a patient.
    #[command(after_help = "Examples:\n  medfleet patients associations --device 0b7c…-uuid\n  \
                            medfleet patients associations --patient MRN-00042 --authority HOSP -o json")]
    Associations {
        #[arg(long, conflicts_with = "patient")]
        device: Option<String>,
        #[arg(long)]
        patient: Option<String>,
        #[arg(long, default_value = "MRN")]
        authority: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ObservationCommand {
    /// Chart entries of a patient or a device, newest first.
    #[command(
        after_help = "Examples:\n  medfleet observations list --patient MRN-00042 --authority HOSP\n  \
                            medfleet observations list --device 0b7c…-uuid -o json"
    )]
    List {
        #[arg(long, conflicts_with = "patient")]
        device: Option<String>,
        #[arg(long)]
        patient: Option<String>,
        #[arg(long, default_value = "MRN")]
        authority: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Validate chart entries (preliminary → final), or retract them with --entered-in-error.
    #[command(after_help = "Examples:\n  medfleet observations validate 5f1e…-uuid 77aa…-uuid\n  \
                            medfleet observations validate 5f1e…-uuid --entered-in-error")]
    Validate {
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long)]
        entered_in_error: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Kind {
    Feed,
    Fhir,
    Mllp,
}

// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub(crate) enum EmrCommand {
    /// Define where chart entries go.
    #[command(after_help = "Examples:\n  medfleet emr create epic-feed --kind feed\n  \
                            medfleet emr create epic-fhir --kind fhir --endpoint https://fhir.hospital.example/R4 \\\n    \
                            --bearer-token-file token.txt --ca fhir-ca.pem --site stmarys\n  \
                            medfleet emr create lab-hl7 --kind mllp --endpoint hl7.hospital.example:2575 --ward stmarys/icu")]
    Create {
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
    },
    /// The destinations (secrets are never shown: only whether one is set and the key that seals it).
    #[command(after_help = "Example:\n  medfleet emr list -o json")]
    List,
    /// Change a destination: only the options given change, the rest keeps its value. Rotates a secret, repoints,
    /// narrows or widens its filter. Relays apply it from their next batch; the audit trail records what changed.
    #[command(
        after_help = "Examples:\n  medfleet emr update epic-fhir --bearer-token-file new-token.txt      # rotate the token\n  \
                            medfleet emr update epic-fhir --client-cert new.pem --client-key new.key\n  \
                            medfleet emr update icu-hl7 --endpoint hl7b.hospital.example:2575 --ward stmarys/icu -o json\n  \
                            medfleet emr update lab-hl7 --endpoint 10.0.5.9:2575 --insecure-plaintext  # MLLP in clear: say so again"
    )]
    Update(UpdateArgs),
    /// Stop delivering to a destination (pending deliveries wait; chart entries made meanwhile are not queued).
    #[command(after_help = "Example:\n  medfleet emr disable epic-fhir")]
    Disable { name: String },
    /// Resume delivering to a destination: what was pending when it was disabled is sent.
    #[command(after_help = "Example:\n  medfleet emr enable epic-fhir -o json")]
    Enable { name: String },
    /// Delete a destination and its delivery records; its pending deliveries are discarded, never sent. Refused
    /// while feed subscriptions follow it, unless --force (which deletes them too).
    #[command(
        after_help = "Examples:\n  medfleet emr delete old-fhir\n  medfleet emr delete epic-feed --force -o json"
    )]
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Deliveries, newest first; --failed shows the dead-lettered ones.
    #[command(after_help = "Examples:\n  medfleet emr deliveries --failed\n  \
                            medfleet emr deliveries --destination epic-fhir --limit 20 -o json")]
    Deliveries {
        #[arg(long)]
        destination: Option<String>,
        #[arg(long)]
        failed: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Send dead-lettered deliveries again (all of the destination's, or the given ids).
    #[command(
        after_help = "Examples:\n  medfleet emr retry epic-fhir\n  medfleet emr retry epic-fhir --id 1042 --id 1043"
    )]
    Retry {
        destination: String,
        #[arg(long = "id")]
        ids: Vec<u64>,
    },
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
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum FeedCommand {
    /// Print a feed's chart events live, acknowledging each (the subscription resumes after the last one);
    /// with -o json, one JSON object per line.
    #[command(
        after_help = "Examples:\n  medfleet feed tail --subscription it-debug --destination epic-feed\n  \
                            medfleet feed tail --subscription it-debug --no-ack -o json"
    )]
    Tail {
        #[arg(long)]
        subscription: String,
        /// Required when the subscription does not exist yet.
        #[arg(long, default_value = "")]
        destination: String,
        /// Do not move the subscription's cursor (look without consuming).
        #[arg(long)]
        no_ack: bool,
        /// Stop after this many events.
        #[arg(long)]
        limit: Option<usize>,
    },
}

fn time_arg(flag: &str, value: Option<&str>) -> anyhow::Result<Option<prost_types::Timestamp>> {
    value
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| timestamp(t.with_timezone(&chrono::Utc)))
                .map_err(|e| UsageError(format!("--{flag} '{s}' is not an RFC 3339 time: {e}")).into())
        })
        .transpose()
}

fn patient(identifier: &str, authority: &str, name: Option<&str>) -> v1::PatientIdentifier {
    v1::PatientIdentifier {
        identifier: identifier.to_owned(),
        authority: authority.to_owned(),
        display_name: name.unwrap_or_default().to_owned(),
    }
}

#[derive(Debug, Serialize)]
struct AssociationView {
    id: String,
    device_id: String,
    patient: String,
    authority: String,
    starts_at: String,
    ends_at: String,
    source: String,
    created_by: String,
    charted_retroactively: u64,
    charting_backlog: u64,
    status: String,
    ended_by: String,
}

impl From<v1::Association> for AssociationView {
    fn from(a: v1::Association) -> Self {
        let p = a.patient.unwrap_or_default();
        Self {
            id: a.id,
            device_id: a.device_id,
            patient: p.identifier,
            authority: p.authority,
            starts_at: output::time(a.starts_at.as_ref()),
            ends_at: output::time(a.ends_at.as_ref()),
            source: a.source,
            created_by: a.created_by,
            charted_retroactively: a.charted_retroactively,
            charting_backlog: a.charting_backlog,
            status: a.status,
            ended_by: a.ended_by,
        }
    }
}

fn associations(out: Format, rows: &[AssociationView]) -> anyhow::Result<()> {
    if out == Format::Json {
        return output::json(rows);
    }
    let mut table = output::table(&["ID", "DEVICE", "PATIENT", "FROM", "UNTIL", "STATUS", "SOURCE", "BY"]);
    for a in rows {
        table.add_row(vec![
            a.id.clone(),
            a.device_id.clone(),
            format!("{} ({})", a.patient, a.authority),
            a.starts_at.clone(),
            if a.ends_at.is_empty() {
                "open".into()
            } else {
                a.ends_at.clone()
            },
            a.status.clone(),
            a.source.clone(),
            a.created_by.clone(),
        ]);
    }
    println!("{table}");
    Ok(())
}

pub(crate) async fn patients(channel: Channel, command: &PatientCommand, out: Format) -> anyhow::Result<()> {
    let mut api = PatientServiceClient::new(channel);
    match command {
        PatientCommand::Associate {
            device,
            patient: p,
            name,
            from,
            until,
        } => {
            let made = api
                .associate(v1::AssociateRequest {
                    device_id: device.clone(),
                    patient: Some(patient(&p.patient, &p.authority, name.as_deref())),
                    from: time_arg("from", from.as_deref())?,
                    until: time_arg("until", until.as_deref())?,
                })
                .await?
                .into_inner();
            let view = AssociationView::from(made);
            if out == Format::Json {
                return output::json(&view);
            }
            println!(
                "device {} is associated from {}{}; {} stored readings charted retroactively",
                view.device_id,
                view.starts_at,
                if view.ends_at.is_empty() {
                    String::new()
                } else {
                    format!(" until {}", view.ends_at)
                },
                view.charted_retroactively
            );
            if view.charting_backlog > 0 {
                println!(
                    "{} more stored readings are being charted in the background (audited as \
                     association.chart.complete when done)",
                    view.charting_backlog
                );
            }
            Ok(())
        }
        PatientCommand::Dissociate {
            device,
            at,
            cancel_planned,
        } => {
            let ended = api
                .dissociate(v1::DissociateRequest {
                    device_id: device.clone(),
                    at: time_arg("at", at.as_deref())?,
                    cancel_planned: *cancel_planned,
                })
                .await?
                .into_inner();
            let view = AssociationView::from(ended);
            if out == Format::Json {
                return output::json(&view);
            }
            if *cancel_planned {
                println!(
                    "device {}: the association planned from {} is cancelled",
                    view.device_id, view.starts_at
                );
            } else {
                println!(
                    "device {} is no longer associated (ended {})",
                    view.device_id, view.ends_at
                );
            }
            Ok(())
        }
        PatientCommand::Associations {
            device,
            patient: p,
            authority,
        } => {
            if device.is_none() && p.is_none() {
                return Err(UsageError("name a device (--device) or a patient (--patient)".into()).into());
            }
            let rows = api
                .list_associations(v1::ListAssociationsRequest {
                    device_id: device.clone().unwrap_or_default(),
                    patient: p.as_ref().map(|p| patient(p, authority, None)),
                })
                .await?
                .into_inner()
                .associations;
            associations(out, &rows.into_iter().map(AssociationView::from).collect::<Vec<_>>())
        }
    }
}

#[derive(Debug, Serialize)]
struct ObservationView {
    id: String,
    observed_at: String,
    kind: String,
    values: String,
    status: String,
    patient: String,
    device_id: String,
    place: String,
    questionable: bool,
    validated_by: String,
}

impl From<v1::Observation> for ObservationView {
    fn from(o: v1::Observation) -> Self {
        let values = o
            .components
            .iter()
            .map(|c| format!("{} {} {}", c.loinc, c.value, c.ucum))
            .collect::<Vec<_>>()
            .join(", ");
        Self {
            id: o.id,
            observed_at: output::time(o.observed_at.as_ref()),
            kind: o.kind,
            values,
            status: o.status,
            patient: o.patient.map(|p| p.identifier).unwrap_or_default(),
            device_id: o.device_id,
            place: if o.site.is_empty() {
                String::new()
            } else {
                format!("{}/{} bed {}", o.site, o.ward, o.bed)
            },
            questionable: o.questionable,
            validated_by: o.validated_by,
        }
    }
}

fn observation_rows(out: Format, rows: &[ObservationView]) -> anyhow::Result<()> {
    if out == Format::Json {
        return output::json(rows);
    }
    let mut table = output::table(&["ID", "OBSERVED", "MEASUREMENT", "VALUES", "STATUS", "PATIENT", "PLACE"]);
    for o in rows {
        table.add_row(vec![
            o.id.clone(),
            o.observed_at.clone(),
            o.kind.clone(),
            o.values.clone(),
            o.status.clone(),
            o.patient.clone(),
            o.place.clone(),
        ]);
    }
    println!("{table}");
    Ok(())
}

pub(crate) async fn observations(channel: Channel, command: &ObservationCommand, out: Format) -> anyhow::Result<()> {
    let mut api = ObservationServiceClient::new(channel);
    match command {
        ObservationCommand::List {
            device,
            patient: p,
            authority,
            limit,
        } => {
            if device.is_none() && p.is_none() {
                return Err(UsageError("name a device (--device) or a patient (--patient)".into()).into());
            }
            let mut rows = Vec::new();
            let mut token = String::new();
            while rows.len() < *limit {
                let page = api
                    .list_observations(v1::ListObservationsRequest {
                        device_id: device.clone().unwrap_or_default(),
                        patient: p.as_ref().map(|p| patient(p, authority, None)),
                        page_size: i32::try_from((*limit - rows.len()).min(500)).unwrap_or(500),
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                rows.extend(page.observations.into_iter().map(ObservationView::from));
                token = page.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            observation_rows(out, &rows)
        }
        ObservationCommand::Validate { ids, entered_in_error } => {
            let status = if *entered_in_error { "entered-in-error" } else { "final" };
            let updated = api
                .set_observation_status(v1::SetObservationStatusRequest {
                    observation_ids: ids.clone(),
                    status: status.into(),
                })
                .await?
                .into_inner()
                .observations;
            let rows: Vec<ObservationView> = updated.into_iter().map(ObservationView::from).collect();
            if out == Format::Json {
                return output::json(&rows);
            }
            println!(
                "{} chart entries are now {status}; every EMR destination receives the change",
                rows.len()
            );
            Ok(())
        }
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

#[derive(Debug, Serialize)]
struct DeliveryView {
    id: u64,
    destination: String,
    observation_id: String,
    status: String,
    state: String,
    attempts: u32,
    last_error: String,
    created_at: String,
    next_attempt_at: String,
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

pub(crate) async fn emr(channel: Channel, command: &EmrCommand, out: Format) -> anyhow::Result<()> {
    let mut api = EmrServiceClient::new(channel);
    match command {
        EmrCommand::Create {
            name,
            kind,
            endpoint,
            sites,
            wards,
            interval,
            bearer_token_file,
            ca,
            receiving_application,
            receiving_facility,
            disabled,
            client_cert,
            client_key,
            insecure_plaintext,
        } => {
            let created = api
                .create_destination(v1::EmrDestination {
                    name: name.clone(),
                    kind: match kind {
                        Kind::Feed => v1::EmrDestinationKind::Feed,
                        Kind::Fhir => v1::EmrDestinationKind::Fhir,
                        Kind::Mllp => v1::EmrDestinationKind::Mllp,
                    }
                    .into(),
                    sites: sites.clone(),
                    wards: wards.clone(),
                    interval_seconds: interval.map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
                    endpoint: endpoint.clone(),
                    bearer_token: read_file("bearer-token-file", bearer_token_file.as_ref())?,
                    ca_pem: read_file("ca", ca.as_ref())?,
                    receiving_application: receiving_application.clone(),
                    receiving_facility: receiving_facility.clone(),
                    enabled: Some(!disabled),
                    insecure_plaintext: *insecure_plaintext,
                    client_certificate_pem: read_file("client-cert", client_cert.as_ref())?,
                    client_key_pem: read_file("client-key", client_key.as_ref())?,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let view = DestinationView::from(created);
            if out == Format::Json {
                return output::json(&view);
            }
            println!("EMR destination {} ({}) created", view.name, view.kind);
            Ok(())
        }
        EmrCommand::List => {
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
        EmrCommand::Update(args) => {
            let updated = api.update_destination(args.request()?).await?.into_inner();
            let view = DestinationView::from(updated);
            if out == Format::Json {
                return output::json(&view);
            }
            println!("EMR destination {} updated", view.name);
            Ok(())
        }
        EmrCommand::Disable { name } | EmrCommand::Enable { name } => {
            let enable = matches!(command, EmrCommand::Enable { .. });
            let request = update_request(
                v1::EmrDestination {
                    name: name.clone(),
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
        EmrCommand::Delete { name, force } => {
            let deleted = api
                .delete_destination(v1::DeleteDestinationRequest {
                    name: name.clone(),
                    force: *force,
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
        EmrCommand::Deliveries {
            destination,
            failed,
            limit,
        } => {
            let mut rows = Vec::new();
            let mut token = String::new();
            while rows.len() < *limit {
                let page = api
                    .list_deliveries(v1::ListDeliveriesRequest {
                        destination: destination.clone().unwrap_or_default(),
                        failed_only: *failed,
                        page_size: i32::try_from((*limit - rows.len()).min(500)).unwrap_or(500),
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                rows.extend(page.deliveries.into_iter().map(|d| DeliveryView {
                    id: d.id,
                    destination: d.destination,
                    observation_id: d.observation_id,
                    status: d.status,
                    state: d.state,
                    attempts: d.attempts,
                    last_error: d.last_error,
                    created_at: output::time(d.created_at.as_ref()),
                    next_attempt_at: output::time(d.next_attempt_at.as_ref()),
                }));
                token = page.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            if out == Format::Json {
                return output::json(&rows);
            }
            let mut table = output::table(&[
                "ID",
                "DESTINATION",
                "OBSERVATION",
                "STATUS",
                "STATE",
                "ATTEMPTS",
                "ERROR",
            ]);
            for d in &rows {
                table.add_row(vec![
                    d.id.to_string(),
                    d.destination.clone(),
                    d.observation_id.clone(),
                    d.status.clone(),
                    d.state.clone(),
                    d.attempts.to_string(),
                    d.last_error.clone(),
                ]);
            }
            println!("{table}");
            if *failed && !rows.is_empty() {
                println!("fix the cause, then send them again: medfleet emr retry DESTINATION");
            }
            Ok(())
        }
        EmrCommand::Retry { destination, ids } => {
            let retried = api
                .retry_deliveries(v1::RetryDeliveriesRequest {
                    destination: destination.clone(),
                    ids: ids.clone(),
                })
                .await?
                .into_inner()
                .retried;
            if out == Format::Json {
                return output::json(&serde_json::json!({ "retried": retried }));
            }
            println!("{retried} deliveries queued again for {destination}");
            Ok(())
        }
    }
}

pub(crate) async fn feed(channel: Channel, command: &FeedCommand, out: Format) -> anyhow::Result<()> {
    let mut api = FeedServiceClient::new(channel);
    let FeedCommand::Tail {
        subscription,
        destination,
        no_ack,
        limit,
    } = command;
    let mut stream = api
        .subscribe(v1::SubscribeRequest {
            subscription: subscription.clone(),
            destination: destination.clone(),
        })
        .await?
        .into_inner();
    let mut seen = 0usize;
    while limit.is_none_or(|limit| seen < limit) {
        let Some(event) = stream.message().await? else { break };
        seen += 1;
        let cursor = event.cursor;
        let observation = ObservationView::from(event.observation.unwrap_or_default());
        if out == Format::Json {
            // One compact object per line (JSON Lines): a stream stays parseable while it runs.
            let line = serde_json::json!({
                "cursor": cursor,
                "event_id": event.event_id,
                "observation": observation,
                "fhir": serde_json::from_str::<serde_json::Value>(&event.fhir_json).unwrap_or_default(),
            });
            println!("{line}");
        } else {
            println!(
                "{cursor:>8}  {}  {:<28} {:<40} {:<12} patient {}  {}",
                observation.observed_at,
                observation.kind,
                observation.values,
                observation.status,
                observation.patient,
                observation.place
            );
        }
        if !no_ack {
            api.acknowledge(v1::AcknowledgeRequest {
                subscription: subscription.clone(),
                cursor,
            })
            .await?;
        }
    }
    Ok(())
}
