//! `PatientService`, `ObservationService`, `EmrService` and `FeedService`: request conversion and the
//! visibility checks that depend on stored rows, then [`Clinical`] and [`Emr`]. The RPC layer has already decided
//! the permission.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use medfleet_core::clinical::association::Period;
use medfleet_core::clinical::chart::{ChartEntry, ChartStatus, Measurement};
use medfleet_core::clinical::fhir;
use medfleet_core::paging::{decode_token, encode_token, page_size};
use medfleet_core::validation::{Violations, check_slug};
use medfleet_proto::convert;
use medfleet_proto::v1::{
    self, emr_service_server::EmrService, feed_service_server::FeedService,
    observation_service_server::ObservationService, patient_service_server::PatientService,
};
use sea_orm::EntityTrait as _;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;

use crate::audit::{Coalescer, Event, Outcome, device_scope};
use crate::authz::policy::{access_withdrawn, visibility};
use crate::authz::visibility::Visibility;
use crate::clinical::{
    AdtKind, AdtRequest, AssociationView, Clinical, DestinationKind, PatientKey, Source, decode_measurement,
};
use crate::emr::destinations::{NewDestination, Settings, secret_key_ids, stored_settings};
use crate::emr::{Emr, event_id};
use crate::error::{Error, Result};
use crate::identity::grpc::caller;
use crate::persistence::db::now;
use crate::persistence::entity::{device, emr_destination, emr_outbox, observation, patient};
use crate::transport::rpc::audit_context;

type Reply<T> = std::result::Result<Response<T>, Status>;

/// How often a feed stream looks for events when no notification woke it (the periodic reconcile).
const FEED_POLL: Duration = Duration::from_secs(1);
/// Events read per feed query.
const FEED_PAGE: u64 = 500;

#[derive(Debug, Clone)]
pub struct ClinicalApi {
    clinical: Clinical,
    emr: Arc<Emr>,
    access: Arc<crate::authz::access::Access>,
    reads: Coalescer,
}

/// How long reads of one patient's data by one principal (per kind of read) are counted into one audit row.
pub const PHI_READ_WINDOW: Duration = Duration::from_mins(5);

/// An audit event for `actor` reading patient `patient`'s data (named by internal id, never the MRN).
fn phi_read(actor: &str, request_id: &str, kind: &str, patient: Uuid, scope: String, detail: String) -> Event {
    Event {
        actor: actor.to_owned(),
        action: format!("phi.read.{kind}"),
        target: format!("patient/{patient}"),
        scope,
        outcome: Outcome::Allowed,
        request_id: request_id.to_owned(),
        detail,
    }
}

/// Whether `visibility` covers every place a destination's filter lets through (no filter: the whole fleet).
fn covers_destination(visibility: &Visibility, destination: &emr_destination::Model) -> bool {
    let sites: BTreeSet<String> = serde_json::from_str(&destination.sites).unwrap_or_default();
    let wards: BTreeSet<String> = serde_json::from_str(&destination.wards).unwrap_or_default();
    if sites.is_empty() && wards.is_empty() {
        return visibility.covers(&Visibility::All);
    }
    let Some(wards) = wards
        .iter()
        .map(|w| w.split_once('/').map(|(s, w)| (s.to_owned(), w.to_owned())))
        .collect::<Option<BTreeSet<_>>>()
    else {
        return false;
    };
    visibility.covers(&Visibility::Scopes { sites, wards })
}

impl ClinicalApi {
    pub fn new(clinical: Clinical, emr: Arc<Emr>, access: Arc<crate::authz::access::Access>, reads: Coalescer) -> Self {
        Self {
            clinical,
            emr,
            access,
            reads,
        }
    }

    /// What a listing is about: a device the caller may see, or a patient (at least one of them).
    async fn subject(
        &self,
        device_id: &str,
        patient: Option<&v1::PatientIdentifier>,
        visibility: &Visibility,
    ) -> Result<(Option<Uuid>, Option<PatientKey>)> {
        let device = if device_id.is_empty() {
            None
        } else {
            Some(convert::device_id("device_id", device_id)?)
        };
        let patient = patient
            .map(|p| PatientKey::parse("patient", &p.identifier, &p.authority, ""))
            .transpose()?;
        if device.is_none() && patient.is_none() {
            return Err(Violations::single("device_id", "name a device or a patient").into());
        }
        if let Some(device) = device {
            self.visible_device(device, visibility).await?;
        }
        Ok((device, patient))
    }

    /// The stored device, if the caller may see where it stands (otherwise it "does not exist").
    async fn visible_device(&self, id: Uuid, visibility: &Visibility) -> Result<device::Model> {
        let missing = || Error::NotFound(format!("device {id} does not exist"));
        let device = device::Entity::find_by_id(id)
            .one(self.clinical.db())
            .await?
            .ok_or_else(missing)?;
        if visibility.sees_place(device.site.as_deref(), device.ward.as_deref()) {
            Ok(device)
        } else {
            Err(missing())
        }
    }
}

fn patient_key(field: &str, patient: Option<&v1::PatientIdentifier>) -> Result<PatientKey> {
    let patient = patient.ok_or_else(|| Violations::single(field, "is required: identifier and authority"))?;
    PatientKey::parse(field, &patient.identifier, &patient.authority, &patient.display_name)
}

fn optional_time(field: &str, value: Option<&prost_types::Timestamp>) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    value
        .map(|t| convert::datetime(t).ok_or_else(|| Error::from(Violations::single(field, "is not a valid time"))))
        .transpose()
}

fn patient_to_wire(patient: &patient::Model) -> v1::PatientIdentifier {
    v1::PatientIdentifier {
        identifier: patient.identifier.clone(),
        authority: patient.authority.clone(),
        display_name: patient.display_name.clone().unwrap_or_default(),
    }
}

fn association_to_wire(view: &AssociationView) -> v1::Association {
    let a = &view.association;
    let at = now();
    let status = if a.starts_at > at {
        "planned"
    } else if a.ends_at.is_some_and(|end| end <= at) {
        "ended"
    } else {
        "active"
    };
    v1::Association {
        id: a.id.to_string(),
        device_id: a.device_id.to_string(),
        patient: Some(patient_to_wire(&view.patient)),
        starts_at: Some(convert::timestamp(a.starts_at)),
        ends_at: a.ends_at.map(convert::timestamp),
        source: a.source.clone(),
        created_by: a.created_by.clone(),
        charted_retroactively: view.charted_retroactively,
        charting_backlog: view.charting_backlog,
        status: status.to_owned(),
        ended_by: a.ended_by.clone().unwrap_or_default(),
    }
}

fn components_to_wire(measurement: &Measurement) -> Vec<v1::ObservationComponent> {
    measurement
        .values()
        .into_iter()
        .map(|(vital, value)| {
            let info = vital.info();
            v1::ObservationComponent {
                mdc_code: info.mdc_code,
                mdc_refid: info.mdc_refid.to_owned(),
                loinc: info.loinc.to_owned(),
                value,
                ucum: info.ucum.to_owned(),
            }
        })
        .collect()
}

fn observation_to_wire(model: &observation::Model, patient: Option<&patient::Model>) -> Result<v1::Observation> {
    let measurement = decode_measurement(model)?;
    Ok(v1::Observation {
        id: model.id.to_string(),
        patient: patient.map(patient_to_wire),
        device_id: model.device_id.to_string(),
        kind: model.kind.clone(),
        components: components_to_wire(&measurement),
        observed_at: Some(convert::timestamp(model.observed_at)),
        status: model.status.clone(),
        questionable: model.questionable,
        validated_by: model.validated_by.clone().unwrap_or_default(),
        site: model.site.clone().unwrap_or_default(),
        ward: model.ward.clone().unwrap_or_default(),
        bed: model.bed.clone().unwrap_or_default(),
    })
}

#[tonic::async_trait]
impl PatientService for ClinicalApi {
    #[instrument(skip_all)]
    async fn associate(&self, request: Request<v1::AssociateRequest>) -> Reply<v1::Association> {
        let audit = audit_context(&request);
        let r = request.into_inner();
        let device = convert::device_id("device_id", &r.device_id).map_err(Error::from)?;
        let key = patient_key("patient", r.patient.as_ref())?;
        let from = optional_time("from", r.from.as_ref())?.unwrap_or_else(now);
        let until = optional_time("until", r.until.as_ref())?;
        let period = Period::new(from, until).map_err(|reason| Error::from(Violations::single("until", reason)))?;
        let view = self
            .clinical
            .associate(device, &key, period, Source::Clinician, &audit)
            .await?;
        tracing::info!(%device, association = %view.association.id, charted = view.charted_retroactively, "device associated");
        Ok(Response::new(association_to_wire(&view)))
    }

    #[instrument(skip_all)]
    async fn dissociate(&self, request: Request<v1::DissociateRequest>) -> Reply<v1::Association> {
        let audit = audit_context(&request);
        let r = request.into_inner();
        let device = convert::device_id("device_id", &r.device_id).map_err(Error::from)?;
        let at = optional_time("at", r.at.as_ref())?.unwrap_or_else(now);
        let view = self.clinical.dissociate(device, at, r.cancel_planned, &audit).await?;
        tracing::info!(%device, association = %view.association.id, cancelled = r.cancel_planned, "device dissociated");
        let mut reply = association_to_wire(&view);
        if r.cancel_planned {
            "cancelled".clone_into(&mut reply.status);
        }
        Ok(Response::new(reply))
    }

    #[instrument(skip_all)]
    async fn list_associations(
        &self,
        request: Request<v1::ListAssociationsRequest>,
    ) -> Reply<v1::ListAssociationsResponse> {
        let visibility = visibility(&request);
        let audit = audit_context(&request);
        let r = request.into_inner();
        let (device, patient) = self.subject(&r.device_id, r.patient.as_ref(), &visibility).await?;
        let views = self.clinical.list_associations(device, patient.as_ref()).await?;
        // Associations of devices the caller cannot see are left out.
        let ids: BTreeSet<Uuid> = views.iter().map(|v| v.association.device_id).collect();
        let mut seen = HashMap::new();
        for id in ids {
            seen.insert(id, self.visible_device(id, &visibility).await.is_ok());
        }
        let read: BTreeSet<Uuid> = views
            .iter()
            .filter(|v| seen.get(&v.association.device_id).copied().unwrap_or(false))
            .map(|v| v.patient.id)
            .collect();
        let audited = self
            .reads
            .record(
                read.into_iter()
                    .map(|patient| {
                        phi_read(
                            &audit.actor,
                            &audit.request_id,
                            "associations",
                            patient,
                            "*".into(),
                            String::new(),
                        )
                    })
                    .collect(),
            )
            .await;
        if !audited {
            return Err(unaudited().into());
        }
        Ok(Response::new(v1::ListAssociationsResponse {
            associations: views
                .iter()
                .filter(|v| seen.get(&v.association.device_id).copied().unwrap_or(false))
                .map(association_to_wire)
                .collect(),
        }))
    }

    #[instrument(skip_all)]
    async fn record_adt_event(&self, request: Request<v1::AdtEvent>) -> Reply<v1::AdtEventResult> {
        let audit = audit_context(&request);
        let scopes = visibility(&request);
        let from_emr = matches!(
            caller(&request)?.identity,
            medfleet_core::identity::Identity::Service(_)
        );
        let r = request.into_inner();
        let mut v = Violations::new();
        let kind = match v1::AdtEventType::try_from(r.r#type) {
            Ok(v1::AdtEventType::Admit) => Some(AdtKind::Admit),
            Ok(v1::AdtEventType::Transfer) => Some(AdtKind::Transfer),
            Ok(v1::AdtEventType::Discharge) => Some(AdtKind::Discharge),
            _ => {
                v.push("type", "must be ADMIT, TRANSFER or DISCHARGE");
                None
            }
        };
        let bed = if kind == Some(AdtKind::Discharge) {
            None
        } else {
            if r.site.is_empty() || r.ward.is_empty() || r.bed.is_empty() {
                v.push("bed", "admit and transfer name the patient's bed: site, ward and bed");
            }
            Some((r.site.clone(), r.ward.clone(), r.bed.clone()))
        };
        let at = optional_time("occurred_at", r.occurred_at.as_ref())?.unwrap_or_else(now);
        let key = patient_key("patient", r.patient.as_ref());
        let (Some(kind), Ok(key)) = (kind, key) else {
            return Err(Error::from(v).into());
        };
        if !v.is_empty() {
            return Err(Error::from(v).into());
        }
        let source = Source::Adt { from_emr };
        let outcome = self
            .clinical
            .adt(AdtRequest { kind, key, bed, at }, &scopes, source, &audit)
            .await?;
        tracing::info!(
            event = ?kind,
            started = outcome.started.len(),
            ended = outcome.ended.len(),
            left_out_of_scope = outcome.left_out_of_scope,
            "ADT event applied"
        );
        Ok(Response::new(v1::AdtEventResult {
            started: outcome.started.iter().map(association_to_wire).collect(),
            ended: outcome.ended.iter().map(association_to_wire).collect(),
            left_out_of_scope: outcome.left_out_of_scope,
        }))
    }
}

#[tonic::async_trait]
impl ObservationService for ClinicalApi {
    #[instrument(skip_all)]
    async fn list_observations(
        &self,
        request: Request<v1::ListObservationsRequest>,
    ) -> Reply<v1::ListObservationsResponse> {
        let visibility = visibility(&request);
        let audit = audit_context(&request);
        let r = request.into_inner();
        let (device, patient_key) = self.subject(&r.device_id, r.patient.as_ref(), &visibility).await?;
        let patient = match &patient_key {
            Some(key) => match self.clinical.find_patient(key).await? {
                Some(found) => Some(found.id),
                None => {
                    return Ok(Response::new(v1::ListObservationsResponse::default()));
                }
            },
            None => None,
        };
        let size = page_size(r.page_size).map_err(|e| Error::from(Violations::single("page_size", e)))?;
        let fingerprint = format!("observations:{device:?}:{patient:?}");
        let after = decode_token(&r.page_token, &fingerprint)
            .map_err(|e| Error::from(Violations::single("page_token", e)))?
            .map(|key| {
                let (at, id) = key.split_once('|').unwrap_or_default();
                let at = chrono::DateTime::parse_from_rfc3339(at).map(|t| t.to_utc());
                match (at, Uuid::parse_str(id)) {
                    (Ok(at), Ok(id)) => Ok((at, id)),
                    _ => Err(Error::from(Violations::single(
                        "page_token",
                        "is not a token this listing issued",
                    ))),
                }
            })
            .transpose()?;
        let mut rows = self
            .clinical
            .list_observations(device, patient, after, size + 1)
            .await?;
        let next = if rows.len() as u64 > size {
            rows.truncate(usize::try_from(size).unwrap_or(usize::MAX));
            rows.last()
                .map(|last| encode_token(&format!("{}|{}", last.observed_at.to_rfc3339(), last.id), &fingerprint))
        } else {
            None
        };
        let patients = self.clinical.patients(rows.iter().map(|o| o.patient_id)).await?;
        let shown: Vec<&observation::Model> = rows
            .iter()
            .filter(|o| visibility.sees_place(o.site.as_deref(), o.ward.as_deref()))
            .collect();
        let observations = shown
            .iter()
            .map(|o| observation_to_wire(o, patients.get(&o.patient_id)))
            .collect::<Result<Vec<_>>>()?;
        if !self
            .reads
            .record(read_events(&audit.actor, &audit.request_id, "observations", &shown))
            .await
        {
            return Err(unaudited().into());
        }
        Ok(Response::new(v1::ListObservationsResponse {
            observations,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn set_observation_status(
        &self,
        request: Request<v1::SetObservationStatusRequest>,
    ) -> Reply<v1::SetObservationStatusResponse> {
        let visibility = visibility(&request);
        let audit = audit_context(&request);
        let r = request.into_inner();
        let mut v = Violations::new();
        let status =
            if let Some(status @ (ChartStatus::Final | ChartStatus::EnteredInError)) = ChartStatus::parse(&r.status) {
                Some(status)
            } else {
                v.push("status", "must be final (validated) or entered-in-error (retracted)");
                None
            };
        if r.observation_ids.is_empty() || r.observation_ids.len() > 1000 {
            v.push("observation_ids", "name 1 to 1000 observations");
        }
        let ids: Vec<Uuid> = r
            .observation_ids
            .iter()
            .filter_map(|id| {
                v.check(
                    "observation_ids",
                    Uuid::parse_str(id).map_err(|_| format!("'{id}' is not an observation id")),
                )
            })
            .collect();
        let Some(status) = status.filter(|_| v.is_empty()) else {
            return Err(Error::from(v).into());
        };
        let updated = self
            .clinical
            .set_status(&ids, status, |site, ward| visibility.sees_place(site, ward), &audit)
            .await?;
        tracing::info!(
            count = updated.len(),
            status = status.as_str(),
            "observation status set"
        );
        let patients = self.clinical.patients(updated.iter().map(|o| o.patient_id)).await?;
        Ok(Response::new(v1::SetObservationStatusResponse {
            observations: updated
                .iter()
                .map(|o| observation_to_wire(o, patients.get(&o.patient_id)))
                .collect::<Result<Vec<_>>>()?,
        }))
    }
}

/// A destination as the API shows it: never a secret, only whether one is set and which keys seal them.
fn destination_to_wire(model: &emr_destination::Model) -> Result<v1::EmrDestination> {
    let settings = stored_settings(model)?;
    let secret_key_ids: BTreeSet<String> = secret_key_ids(&settings)
        .into_iter()
        .map(|kid| kid.unwrap_or_else(|| "plaintext".to_owned()))
        .collect();
    let list = |text: &str| -> Vec<String> { serde_json::from_str(text).unwrap_or_default() };
    let kind = match DestinationKind::parse(&model.kind) {
        Some(DestinationKind::Feed) => v1::EmrDestinationKind::Feed,
        Some(DestinationKind::Fhir) => v1::EmrDestinationKind::Fhir,
        Some(DestinationKind::Mllp) => v1::EmrDestinationKind::Mllp,
        None => v1::EmrDestinationKind::Unspecified,
    };
    Ok(v1::EmrDestination {
        name: model.name.clone(),
        kind: kind.into(),
        sites: list(&model.sites),
        wards: list(&model.wards),
        interval_seconds: u32::try_from(model.interval_secs).unwrap_or(0),
        endpoint: settings.endpoint,
        bearer_token: String::new(),
        ca_pem: settings.ca_pem.unwrap_or_default(),
        receiving_application: settings.receiving_application,
        receiving_facility: settings.receiving_facility,
        enabled: Some(model.enabled),
        created_at: Some(convert::timestamp(model.created_at)),
        created_by: model.created_by.clone(),
        client_certificate_pem: settings.client_certificate_pem.unwrap_or_default(),
        client_key_pem: String::new(),
        insecure_plaintext: settings.insecure_plaintext,
        bearer_token_set: settings.bearer_token.is_some(),
        client_key_set: settings.client_key_pem.is_some(),
        secret_key_ids: secret_key_ids.into_iter().collect(),
        relay_error: model.relay_error.clone().unwrap_or_default(),
    })
}

fn delivery_to_wire(row: &emr_outbox::Model) -> v1::Delivery {
    v1::Delivery {
        id: u64::try_from(row.id).unwrap_or(0),
        destination: row.destination.clone(),
        observation_id: row.observation_id.to_string(),
        status: row.status.clone(),
        state: row.state.clone(),
        attempts: u32::try_from(row.attempts).unwrap_or(0),
        last_error: row.last_error.clone().unwrap_or_default(),
        created_at: Some(convert::timestamp(row.created_at)),
        delivered_at: row.delivered_at.map(convert::timestamp),
        next_attempt_at: Some(convert::timestamp(row.next_attempt_at)),
    }
}

#[tonic::async_trait]
impl EmrService for ClinicalApi {
    #[instrument(skip_all)]
    async fn create_destination(&self, request: Request<v1::EmrDestination>) -> Reply<v1::EmrDestination> {
        let audit = audit_context(&request);
        let r = request.into_inner();
        let kind = match v1::EmrDestinationKind::try_from(r.kind) {
            Ok(v1::EmrDestinationKind::Feed) => DestinationKind::Feed,
            Ok(v1::EmrDestinationKind::Fhir) => DestinationKind::Fhir,
            Ok(v1::EmrDestinationKind::Mllp) => DestinationKind::Mllp,
            _ => return Err(Error::from(Violations::single("kind", "must be FEED, FHIR or MLLP")).into()),
        };
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        let new = NewDestination {
            name: r.name,
            kind,
            sites: r.sites.into_iter().collect(),
            wards: r.wards.into_iter().collect(),
            interval_secs: r.interval_seconds,
            settings: Settings {
                endpoint: r.endpoint,
                bearer_token: non_empty(r.bearer_token),
                ca_pem: non_empty(r.ca_pem),
                receiving_application: r.receiving_application,
                receiving_facility: r.receiving_facility,
                client_certificate_pem: non_empty(r.client_certificate_pem),
                client_key_pem: non_empty(r.client_key_pem),
                insecure_plaintext: r.insecure_plaintext,
            },
            enabled: r.enabled.unwrap_or(true),
        };
        let stored = self.emr.create_destination(new, &audit).await?;
        tracing::info!(destination = %stored.name, kind = %stored.kind, "EMR destination created");
        Ok(Response::new(destination_to_wire(&stored)?))
    }

    #[instrument(skip_all)]
    async fn list_destinations(
        &self,
        _request: Request<v1::ListDestinationsRequest>,
    ) -> Reply<v1::ListDestinationsResponse> {
        let destinations = self.emr.destinations().await?;
        Ok(Response::new(v1::ListDestinationsResponse {
            destinations: destinations
                .iter()
                .map(destination_to_wire)
                .collect::<Result<Vec<_>>>()?,
        }))
    }

    #[instrument(skip_all)]
    async fn update_destination(&self, request: Request<v1::UpdateDestinationRequest>) -> Reply<v1::EmrDestination> {
        let audit = audit_context(&request);
        let (name, update) = convert::destination_update(request.get_ref()).map_err(Error::from)?;
        let stored = self.emr.update_destination(&name, &update, &audit).await?;
        tracing::info!(destination = %stored.name, fields = ?update.fields(), "EMR destination updated");
        Ok(Response::new(destination_to_wire(&stored)?))
    }

    #[instrument(skip_all)]
    async fn delete_destination(
        &self,
        request: Request<v1::DeleteDestinationRequest>,
    ) -> Reply<v1::DeleteDestinationResponse> {
        let audit = audit_context(&request);
        let r = request.into_inner();
        let name = convert::slug("name", &r.name).map_err(Error::from)?;
        let deleted = self.emr.delete_destination(&name, r.force, &audit).await?;
        tracing::info!(destination = %name, discarded = deleted.discarded, subscriptions = deleted.subscriptions.len(), "EMR destination deleted");
        Ok(Response::new(v1::DeleteDestinationResponse {
            deleted_subscriptions: deleted.subscriptions,
            discarded_deliveries: deleted.discarded,
        }))
    }

    #[instrument(skip_all)]
    async fn list_deliveries(&self, request: Request<v1::ListDeliveriesRequest>) -> Reply<v1::ListDeliveriesResponse> {
        let r = request.into_inner();
        if !r.destination.is_empty() {
            self.emr.destination(&r.destination).await?;
        }
        let size = page_size(r.page_size).map_err(|e| Error::from(Violations::single("page_size", e)))?;
        let fingerprint = format!("deliveries:{}:{}", r.destination, r.failed_only);
        let before = decode_token(&r.page_token, &fingerprint)
            .map_err(|e| Error::from(Violations::single("page_token", e)))?
            .map(|key| key.parse::<i64>())
            .transpose()
            .map_err(|_| Error::from(Violations::single("page_token", "is not a token this listing issued")))?;
        let destination = (!r.destination.is_empty()).then_some(r.destination.as_str());
        let mut rows = self
            .emr
            .deliveries(destination, r.failed_only, before, size + 1)
            .await?;
        let next = if rows.len() as u64 > size {
            rows.truncate(usize::try_from(size).unwrap_or(usize::MAX));
            rows.last().map(|last| encode_token(&last.id.to_string(), &fingerprint))
        } else {
            None
        };
        Ok(Response::new(v1::ListDeliveriesResponse {
            deliveries: rows.iter().map(delivery_to_wire).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn retry_deliveries(
        &self,
        request: Request<v1::RetryDeliveriesRequest>,
    ) -> Reply<v1::RetryDeliveriesResponse> {
        let audit = audit_context(&request);
        let r = request.into_inner();
        if r.destination.is_empty() {
            return Err(Error::from(Violations::single("destination", "is required")).into());
        }
        let ids: Vec<i64> = r.ids.iter().filter_map(|id| i64::try_from(*id).ok()).collect();
        let retried = self.emr.retry(&r.destination, &ids, &audit).await?;
        tracing::info!(destination = %r.destination, retried, "dead-lettered deliveries queued again");
        Ok(Response::new(v1::RetryDeliveriesResponse { retried }))
    }
}

type FeedStream = Pin<Box<dyn Stream<Item = std::result::Result<v1::FeedEvent, Status>> + Send>>;

#[tonic::async_trait]
impl FeedService for ClinicalApi {
    type SubscribeStream = FeedStream;

    #[instrument(skip_all)]
    async fn subscribe(&self, request: Request<v1::SubscribeRequest>) -> Reply<Self::SubscribeStream> {
        let audit = audit_context(&request);
        let owner = caller(&request)?.identity.to_string();
        let visibility = visibility(&request);
        let r = request.into_inner();
        check_slug(&r.subscription).map_err(|e| Error::from(Violations::single("subscription", e)))?;
        // Access first, then any effect: a refused caller creates nothing and learns nothing of the cursors.
        let existing = self.emr.find_subscription(&r.subscription, &owner).await?;
        let destination = self
            .emr
            .subscription_target(existing.as_ref(), &r.subscription, &r.destination)
            .await?;
        // A subscriber sees chart entries only from places its grants cover: the destination's filter must lie
        // inside them (no filter means the whole fleet).
        let covered = covers_destination(&visibility, &destination);
        if !covered {
            return Err(Status::permission_denied(format!(
                "feed '{}' carries chart entries from places your grants do not cover; ask for feed:subscribe on \
                 them",
                destination.name
            )));
        }
        let subscription = if let Some(existing) = existing {
            existing
        } else {
            let created = self
                .emr
                .create_subscription(&r.subscription, &destination.name, &owner)
                .await?;
            self.reads
                .record(vec![Event {
                    actor: owner.clone(),
                    action: "feed_subscription.create".into(),
                    target: format!("feed_subscription/{}", created.name),
                    scope: "*".into(),
                    outcome: Outcome::Allowed,
                    request_id: audit.request_id.clone(),
                    detail: format!("follows {}", created.destination),
                }])
                .await;
            created
        };
        tracing::info!(subscription = %subscription.name, cursor = subscription.cursor, "feed subscription resumed");
        let (tx, rx) = mpsc::channel(usize::try_from(FEED_PAGE).unwrap_or(500));
        let (emr, access) = (self.emr.clone(), self.access.clone());
        let reader = Reader {
            reads: self.reads.clone(),
            actor: owner.clone(),
            request_id: audit.request_id.clone(),
        };
        tokio::spawn(async move {
            let outcome = tokio::select! {
                followed = follow_feed(emr, subscription.destination, subscription.cursor, &tx, &reader, |now| {
                    // The feed as it is now (an admin may have widened its filter or recreated it under the same
                    // name), against what the subscriber holds now.
                    now.created_at == destination.created_at
                        && covers_destination(&access.visibility(&owner, "feed", "subscribe"), now)
                }) => followed,
                withdrawn = access_withdrawn(&access, &owner, "feed", "subscribe", |now| {
                    covers_destination(now, &destination)
                }) => Err(withdrawn),
            };
            if let Err(status) = outcome {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[instrument(skip_all)]
    async fn acknowledge(&self, request: Request<v1::AcknowledgeRequest>) -> Reply<v1::AcknowledgeResponse> {
        let owner = caller(&request)?.identity.to_string();
        let request_id = audit_context(&request).request_id;
        let r = request.into_inner();
        let cursor = i64::try_from(r.cursor)
            .map_err(|_| Error::from(Violations::single("cursor", "is not a cursor this feed issued")))?;
        let stored = self.emr.acknowledge(&r.subscription, &owner, cursor).await?;
        self.reads
            .record(vec![Event {
                actor: owner.clone(),
                action: "feed.acknowledge".into(),
                target: format!("feed_subscription/{}", r.subscription),
                scope: "*".into(),
                outcome: Outcome::Allowed,
                request_id,
                detail: format!("cursor {stored}"),
            }])
            .await;
        Ok(Response::new(v1::AcknowledgeResponse {
            cursor: u64::try_from(stored).unwrap_or(0),
        }))
    }
}

/// Sends feed events after `cursor` until the subscriber goes away: each page as soon as it is read, then waits
/// for a change notification or the poll interval.
async fn follow_feed(
    emr: Arc<Emr>,
    destination: String,
    mut cursor: i64,
    tx: &mpsc::Sender<std::result::Result<v1::FeedEvent, Status>>,
    reader: &Reader,
    still_covered: impl Fn(&emr_destination::Model) -> bool,
) -> std::result::Result<(), Status> {
    let mut events = emr.events().subscribe();
    loop {
        // Before every page: a deleted destination ends its feeds (rather than leaving them idle forever), and
        // one whose filter now reaches past the subscriber's grants stops disclosing.
        match emr.destination(&destination).await {
            Err(Error::NotFound(message)) => {
                return Err(Status::not_found(format!(
                    "{message}: it was deleted; this feed has ended"
                )));
            }
            Err(error) => return Err(error.into()),
            Ok(current) if !still_covered(&current) => {
                return Err(Status::permission_denied(format!(
                    "feed '{destination}' changed while this stream was open and now carries chart entries from \
                     places your grants do not cover (or it was recreated); subscribe again to have it checked"
                )));
            }
            Ok(_) => {}
        }
        let rows = emr.feed_page(&destination, cursor, FEED_PAGE).await?;
        if !rows.is_empty() {
            let entries = emr.entries(&rows).await?;
            // Audited before it is sent: a disclosure the trail does not know of must not happen.
            let disclosed = emr.observations_of(&rows).await?;
            let audited = reader
                .reads
                .record(read_events(
                    &reader.actor,
                    &reader.request_id,
                    "feed",
                    &disclosed.iter().collect::<Vec<_>>(),
                ))
                .await;
            if !audited {
                return Err(Status::unavailable(
                    "the audit trail cannot record this disclosure now; the feed resumes from your cursor when you \
                     reconnect",
                ));
            }
            for row in &rows {
                let Some(entry) = entries.get(&row.id) else { continue };
                let event = v1::FeedEvent {
                    cursor: u64::try_from(row.id).unwrap_or(0),
                    event_id: event_id(row),
                    observation: Some(entry_to_wire(entry)),
                    fhir_json: fhir::observation(entry).to_string(),
                };
                if tx.send(Ok(event)).await.is_err() {
                    return Ok(());
                }
                cursor = row.id;
            }
            continue;
        }
        tokio::select! {
            () = tx.closed() => return Ok(()),
            () = tokio::time::sleep(FEED_POLL) => {}
            event = events.recv() => {
                // Any event (or a lag) just means: look again; a closed channel means the server is stopping.
                if let Err(broadcast::error::RecvError::Closed) = event {
                    return Ok(());
                }
            }
        }
    }
}

/// A read of patient data the audit trail cannot record is not served (HIPAA: reads are audited like writes).
fn unaudited() -> Error {
    Error::Unavailable("the audit trail cannot record this read of patient data now; try again shortly".into())
}

/// Who reads a feed, for its audit rows.
struct Reader {
    reads: Coalescer,
    actor: String,
    request_id: String,
}

/// One PHI-read event per patient among `shown`, scoped where the entries were charted.
fn read_events(actor: &str, request_id: &str, kind: &str, shown: &[&observation::Model]) -> Vec<Event> {
    let mut per_patient: HashMap<Uuid, (String, usize)> = HashMap::new();
    for o in shown {
        let entry = per_patient
            .entry(o.patient_id)
            .or_insert_with(|| (device_scope(o.site.as_deref(), o.ward.as_deref()), 0));
        entry.1 += 1;
    }
    per_patient
        .into_iter()
        .map(|(patient, (scope, entries))| {
            phi_read(
                actor,
                request_id,
                kind,
                patient,
                scope,
                format!("{entries} chart entries"),
            )
        })
        .collect()
}

/// A chart entry as the feed carries it (status: the one of this event).
fn entry_to_wire(entry: &ChartEntry) -> v1::Observation {
    let poc = entry.point_of_care.clone().unwrap_or_default();
    v1::Observation {
        id: entry.id.to_string(),
        patient: Some(v1::PatientIdentifier {
            identifier: entry.patient.identifier.clone(),
            authority: entry.patient.authority.clone(),
            display_name: entry.patient.display_name.clone().unwrap_or_default(),
        }),
        device_id: entry.device.id.to_string(),
        kind: entry.measurement.kind().to_owned(),
        components: components_to_wire(&entry.measurement),
        observed_at: Some(convert::timestamp(entry.observed_at)),
        status: entry.status.as_str().to_owned(),
        questionable: entry.questionable,
        validated_by: entry.validated_by.clone().unwrap_or_default(),
        site: poc.site,
        ward: poc.ward,
        bed: poc.bed.unwrap_or_default(),
    }
}
