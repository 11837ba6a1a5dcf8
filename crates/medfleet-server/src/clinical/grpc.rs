//! `PatientService` and `ObservationService`: request conversion and the visibility checks that depend on stored
//! rows, then [`Clinical`]. Every read of patient data is audited ([`crate::audit::phi`]). The RPC layer has
//! already decided the permission.

use std::collections::{BTreeSet, HashMap};

use medfleet_core::clinical::association::Period;
use medfleet_core::clinical::chart::ChartStatus;
use medfleet_core::paging::{decode_token, encode_token, page_size};
use medfleet_core::validation::Violations;
use medfleet_proto::convert;
use medfleet_proto::v1::{
    self, observation_service_server::ObservationService, patient_service_server::PatientService,
};
use sea_orm::EntityTrait as _;
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;

use crate::audit::Coalescer;
use crate::audit::phi::{phi_read, read_events, unaudited};
use crate::authz::policy::visibility;
use crate::authz::visibility::Visibility;
use crate::clinical::{AdtKind, AdtRequest, AssociationView, Clinical, PatientKey, Source, decode_measurement};
use crate::error::{Error, Result};
use crate::persistence::db::now;
use crate::persistence::entity::{device, observation, patient};
use crate::transport::rpc::{audit_context, caller};

type Reply<T> = std::result::Result<Response<T>, Status>;

/// `PatientService` and `ObservationService`.
#[derive(Debug, Clone)]
pub struct ClinicalApi {
    clinical: Clinical,
    reads: Coalescer,
}

impl ClinicalApi {
    pub fn new(clinical: Clinical, reads: Coalescer) -> Self {
        Self { clinical, reads }
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

fn observation_to_wire(model: &observation::Model, patient: Option<&patient::Model>) -> Result<v1::Observation> {
    let measurement = decode_measurement(model)?;
    Ok(v1::Observation {
        id: model.id.to_string(),
        patient: patient.map(patient_to_wire),
        device_id: model.device_id.to_string(),
        kind: model.kind.clone(),
        components: convert::components_to_wire(&measurement),
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
