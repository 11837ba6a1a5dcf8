//! `medfleet patients`: device–patient associations — which patient a device's readings chart to, from when until
//! when — made, ended and listed by device or by patient.

use clap::Subcommand;
use medfleet_proto::v1::{self, patient_service_client::PatientServiceClient};
use serde::Serialize;
use tonic::transport::Channel;

use crate::args::time_arg;
use crate::error::UsageError;
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

/// A patient as the API names one: the identifier, its assigning authority and, optionally, a display name.
fn identifier(identifier: &str, authority: &str, name: Option<&str>) -> v1::PatientIdentifier {
    v1::PatientIdentifier {
        identifier: identifier.to_owned(),
        authority: authority.to_owned(),
        display_name: name.unwrap_or_default().to_owned(),
    }
}

/// Whom a listing is about, `--device` or `--patient` (of `authority`): the device id (empty when a patient is
/// named) and the patient.
pub(crate) fn subject(
    device: Option<&str>,
    patient: Option<&str>,
    authority: &str,
) -> anyhow::Result<(String, Option<v1::PatientIdentifier>)> {
    if device.is_none() && patient.is_none() {
        return Err(UsageError("name a device (--device) or a patient (--patient)".into()).into());
    }
    Ok((
        device.unwrap_or_default().to_owned(),
        patient.map(|p| identifier(p, authority, None)),
    ))
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

pub(crate) async fn run(channel: Channel, command: &PatientCommand, out: Format) -> anyhow::Result<()> {
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
                    patient: Some(identifier(&p.patient, &p.authority, name.as_deref())),
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
            let (device_id, patient) = subject(device.as_deref(), p.as_deref(), authority)?;
            let rows = api
                .list_associations(v1::ListAssociationsRequest { device_id, patient })
                .await?
                .into_inner()
                .associations;
            associations(out, &rows.into_iter().map(AssociationView::from).collect::<Vec<_>>())
        }
    }
}
