//! `medfleet observations`: the chart — entries of a patient or a device, newest first — and their validation
//! (preliminary → final) or retraction; and how a chart entry is shown, here and in `feed tail`.

use clap::Subcommand;
use medfleet_proto::v1::{self, observation_service_client::ObservationServiceClient};
use serde::Serialize;
use tonic::transport::Channel;

use crate::clinical::patients::subject;
use crate::output::{self, Format};
use crate::pager::{self, Page};

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

#[derive(Debug, Serialize)]
pub(crate) struct ObservationView {
    pub(crate) id: String,
    pub(crate) observed_at: String,
    pub(crate) kind: String,
    pub(crate) values: String,
    pub(crate) status: String,
    pub(crate) patient: String,
    pub(crate) device_id: String,
    pub(crate) place: String,
    pub(crate) questionable: bool,
    pub(crate) validated_by: String,
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

pub(crate) async fn run(channel: Channel, command: &ObservationCommand, out: Format) -> anyhow::Result<()> {
    let mut api = ObservationServiceClient::new(channel);
    match command {
        ObservationCommand::List {
            device,
            patient: p,
            authority,
            limit,
        } => {
            let (device_id, patient) = subject(device.as_deref(), p.as_deref(), authority)?;
            let rows = pager::collect(Some(*limit), async |page_size, page_token| {
                let page = api
                    .list_observations(v1::ListObservationsRequest {
                        device_id: device_id.clone(),
                        patient: patient.clone(),
                        page_size,
                        page_token,
                    })
                    .await?
                    .into_inner();
                Ok(Page::new(page.observations, page.next_page_token))
            })
            .await?;
            let rows: Vec<ObservationView> = rows.into_iter().map(ObservationView::from).collect();
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
                "{} chart entries are now {status}; each enabled EMR destination that received them is sent the change",
                rows.len()
            );
            Ok(())
        }
    }
}
