//! Patients as medfleet knows them (identifier, assigning authority, display name) and the ADT events an
//! integration sends: admit, transfer and discharge bind and unbind the bed's devices.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use medfleet_core::clinical::association::Period;
use medfleet_core::validation::printable;
use sea_orm::sea_query::ExprTrait as _;
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, ConnectionTrait, EntityTrait as _, QueryFilter as _, QueryOrder as _,
};
use uuid::Uuid;

use crate::audit::Context;
use crate::authz::visibility::Visibility;
use crate::error::{Error, Result};
use crate::persistence::db::begin_write;
use crate::persistence::db::now;
use crate::persistence::entity::{association, device, patient};
use crate::persistence::events::Event;
use crate::registry::store::lock_device;

use super::associations::AssociationView;
use super::{Clinical, PatientKey, Source};

/// An ADT event as the EMR sends it: what happened to which patient, into which bed (admit, transfer), when.
#[derive(Debug)]
pub struct AdtRequest {
    pub kind: AdtKind,
    pub key: PatientKey,
    pub bed: Option<(String, String, String)>,
    pub at: DateTime<Utc>,
}

/// What an ADT event changed.
#[derive(Debug, Default)]
pub struct AdtOutcome {
    pub started: Vec<AssociationView>,
    pub ended: Vec<AssociationView>,
    /// The patient's open associations on devices outside the caller's scopes, left as they were.
    pub left_out_of_scope: u32,
}

/// ADT event kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdtKind {
    Admit,
    Transfer,
    Discharge,
}

impl Clinical {
    /// The patient a request names, created if new. The display name an EMR's ADT feed sends is authoritative and
    /// replaces the stored one; a clinician's request may only fill in a name that is missing (a typo on one ward
    /// must not rename the patient in every later PID-5 and subject.display). Every change is audited, without
    /// the name.
    pub(super) async fn upsert_patient(
        &self,
        txn: &impl ConnectionTrait,
        key: &PatientKey,
        source: Source,
        scope: &str,
        audit: &Context,
    ) -> Result<patient::Model> {
        if let Some(existing) = patient::Entity::find()
            .filter(patient::Column::Authority.eq(&key.authority))
            .filter(patient::Column::Identifier.eq(&key.identifier))
            .one(txn)
            .await?
        {
            let may_rename = source == Source::Adt { from_emr: true } || existing.display_name.is_none();
            if key.display_name.is_some() && existing.display_name != key.display_name && may_rename {
                let id = existing.id;
                let had_name = existing.display_name.is_some();
                let mut update: patient::ActiveModel = existing.into();
                update.display_name = Set(key.display_name.clone());
                let saved = patient::Entity::update(update).exec(txn).await?;
                audit
                    .record(
                        txn,
                        "patient.update",
                        format!("patient/{id}"),
                        scope.to_owned(),
                        format!(
                            "display name {} ({})",
                            if had_name { "changed" } else { "set" },
                            source.as_str()
                        ),
                    )
                    .await?;
                return Ok(saved);
            }
            return Ok(existing);
        }
        let model = patient::ActiveModel {
            id: Set(Uuid::new_v4()),
            authority: Set(key.authority.clone()),
            identifier: Set(key.identifier.clone()),
            display_name: Set(key.display_name.clone()),
            created_at: Set(now()),
        };
        Ok(patient::Entity::insert(model).exec_with_returning(txn).await?)
    }

    pub async fn find_patient(&self, key: &PatientKey) -> Result<Option<patient::Model>> {
        Ok(patient::Entity::find()
            .filter(patient::Column::Authority.eq(&key.authority))
            .filter(patient::Column::Identifier.eq(&key.identifier))
            .one(&self.db)
            .await?)
    }

    /// Patients by id (for rendering observations).
    pub async fn patients(&self, ids: impl IntoIterator<Item = Uuid>) -> Result<HashMap<Uuid, patient::Model>> {
        Ok(patient::Entity::find()
            .filter(patient::Column::Id.is_in(ids.into_iter().collect::<BTreeSet<_>>()))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|p| (p.id, p))
            .collect())
    }

    /// An ADT event: admit/transfer bind the bed's devices to the patient; discharge (and transfer, for the old
    /// bed) end the patient's open associations. Only devices inside `scopes` (where the caller holds
    /// `association:update`) change: the patient's associations elsewhere are left alone and counted. A bed whose
    /// device is bound to another patient is refused, never silently re-charted.
    pub async fn adt(
        &self,
        event: AdtRequest,
        scopes: &Visibility,
        source: Source,
        audit: &Context,
    ) -> Result<AdtOutcome> {
        let AdtRequest { kind, key, bed, at } = event;
        let key = &key;
        if let Some((site, ward, _)) = bed.as_ref().filter(|_| kind != AdtKind::Discharge)
            && !scopes.sees_ward(site, ward)
        {
            return Err(Error::PermissionDenied(format!(
                "you lack permission association:update on {}/{}, where this event puts the patient; ask an \
                 administrator for a role that grants it (medfleet access grant)",
                printable(site),
                printable(ward)
            )));
        }
        let txn = begin_write(&self.db).await?;
        // A bed medfleet does not know (a label that differs from the EMR's) would bind nothing, silently: the
        // sender is told which beds the ward has.
        if let Some((site, ward, bed)) = bed.as_ref().filter(|_| kind != AdtKind::Discharge) {
            crate::registry::store::check_location(
                &txn,
                &medfleet_core::registry::Location {
                    site: site.clone(),
                    ward: ward.clone(),
                    bed: Some(bed.clone()),
                },
            )
            .await?;
        }
        let mut outcome = AdtOutcome::default();
        let mut patient = patient::Entity::find()
            .filter(patient::Column::Authority.eq(&key.authority))
            .filter(patient::Column::Identifier.eq(&key.identifier))
            .one(&txn)
            .await?;
        let bed_devices: Vec<device::Model> = match &bed {
            Some((site, ward, bed)) if kind != AdtKind::Discharge => {
                device::Entity::find()
                    .filter(device::Column::Site.eq(site.as_str()))
                    .filter(device::Column::Ward.eq(ward.as_str()))
                    .filter(device::Column::Bed.eq(bed.as_str()))
                    .order_by_asc(device::Column::Id)
                    .all(&txn)
                    .await?
            }
            _ => Vec::new(),
        };
        // The patient's open associations; those on devices that are not at the new bed end now.
        let mut open: BTreeMap<Uuid, association::Model> = BTreeMap::new();
        if let Some(patient) = &patient {
            for association in association::Entity::find()
                .filter(association::Column::PatientId.eq(patient.id))
                .filter(association::open_at(at))
                .all(&txn)
                .await?
            {
                open.insert(association.device_id, association);
            }
        }
        let mut lock_order: BTreeSet<Uuid> = open.keys().copied().collect();
        lock_order.extend(bed_devices.iter().map(|d| d.id));
        let mut locked = HashMap::new();
        for id in lock_order {
            locked.insert(id, lock_device(&txn, id).await?);
        }
        // Where each device stands is read again under its lock: a move committed on another replica since the
        // lookup takes the device away from this bed.
        let at_bed = |device: &device::Model| match (&bed, kind) {
            (Some((site, ward, bed)), AdtKind::Admit | AdtKind::Transfer) => {
                device.site.as_deref() == Some(site.as_str())
                    && device.ward.as_deref() == Some(ward.as_str())
                    && device.bed.as_deref() == Some(bed.as_str())
            }
            _ => false,
        };
        let placed: Vec<&device::Model> = bed_devices
            .iter()
            .filter_map(|d| locked.get(&d.id))
            .filter(|d| at_bed(d))
            .collect();
        // The EMR's ADT feed is the authority for a known patient's name when it places the patient on a device
        // at a bed the caller's scopes cover (checked above); an event that places them nowhere, or a discharge,
        // renames nobody.
        if patient.is_some() && key.display_name.is_some() && !placed.is_empty() {
            let scope = bed
                .as_ref()
                .map_or_else(|| "*".to_owned(), |(site, ward, _)| format!("{site}/{ward}"));
            patient = Some(self.upsert_patient(&txn, key, source, &scope, audit).await?);
        }
        for (device_id, open) in open {
            let Some(device) = locked.get(&device_id) else { continue };
            if at_bed(device) {
                continue;
            }
            // Scoped by where the device stands now, under its lock: another ward's monitor keeps charting.
            if !scopes.sees_place(device.site.as_deref(), device.ward.as_deref()) {
                outcome.left_out_of_scope += 1;
                continue;
            }
            outcome
                .ended
                .push(self.end_locked(&txn, device, open, at, audit).await?);
        }
        for device in placed {
            let current = association::Entity::find()
                .filter(association::Column::DeviceId.eq(device.id))
                .filter(
                    association::Column::EndsAt
                        .is_null()
                        .or(association::Column::EndsAt.gt(at)),
                )
                .one(&txn)
                .await?;
            if let Some(current) = current {
                if patient.as_ref().is_some_and(|p| p.id == current.patient_id) {
                    continue;
                }
                // Charting a monitor to the next patient while the EMR still has the previous one in the bed
                // would mix two charts; the EMR resolves it (a discharge or transfer of that patient first).
                return Err(Error::FailedPrecondition(format!(
                    "device {} at this bed is associated with another patient from {}; send the discharge or \
                     transfer of that patient first (or end it: medfleet patients dissociate {})",
                    device.id,
                    current.starts_at.to_rfc3339(),
                    device.id
                )));
            }
            outcome.started.push(
                self.associate_locked(
                    &txn,
                    device,
                    key,
                    Period::new(at, None).map_err(Error::FailedPrecondition)?,
                    source,
                    audit,
                )
                .await?,
            );
        }
        txn.commit().await?;
        if outcome.started.iter().any(|s| s.charted_retroactively > 0) {
            self.events.emit(Event::Outbox);
        }
        if outcome.started.iter().any(|s| s.charting_backlog > 0) {
            self.wake_backlog();
        }
        Ok(outcome)
    }
}
