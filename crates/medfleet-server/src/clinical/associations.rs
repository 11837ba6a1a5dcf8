//! Device–patient associations: which patient a device's readings chart to, from when until when. Opening one
//! with a past start charts the readings already stored (retroactively, in chunks: [`super::backlog`]); ending
//! or cancelling one is audited.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use medfleet_core::clinical::association::Period;
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait as _, ConnectionTrait, EntityTrait as _, IntoActiveModel as _,
    PaginatorTrait as _, QueryFilter as _, QueryOrder as _,
};
use uuid::Uuid;

use crate::audit::{Context, device_scope};
use crate::error::{Error, Result};
use crate::persistence::db::begin_write;
use crate::persistence::db::now;
use crate::persistence::entity::{association, device, observation, patient};
use crate::persistence::events::Event;
use crate::registry::store::lock_device;

use super::{Clinical, PatientKey, Source};

/// An association with its patient, as the API returns it.
#[derive(Debug, Clone)]
pub struct AssociationView {
    pub association: association::Model,
    pub patient: patient::Model,
    pub charted_retroactively: u64,
    /// Stored readings of its period left to the background charting when it was made.
    pub charting_backlog: u64,
}

/// Creates the chart entries for readings of one device covered by one association. Returns, per measurement,
/// the new observation id and the indexes (into `readings`) of the readings it holds.
/// The device's earliest association that is not open yet at `at` (it starts then or later).
pub(super) async fn planned_after(
    txn: &impl ConnectionTrait,
    device: Uuid,
    at: DateTime<Utc>,
) -> Result<Option<association::Model>> {
    Ok(association::Entity::find()
        .filter(association::Column::DeviceId.eq(device))
        .filter(association::Column::StartsAt.gte(at))
        // Planned means not started yet, whatever `at` the caller named: a past `at` must not reach an
        // association that is open or over.
        .filter(association::Column::StartsAt.gt(now()))
        .order_by_asc(association::Column::StartsAt)
        .one(txn)
        .await?)
}

/// Associations of a device that overlap `[from, to]`.
pub(super) async fn associations_between(
    conn: &impl ConnectionTrait,
    device: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<association::Model>> {
    Ok(association::Entity::find()
        .filter(association::Column::DeviceId.eq(device))
        .filter(association::Column::StartsAt.lte(to))
        .filter(
            association::Column::EndsAt
                .is_null()
                .or(association::Column::EndsAt.gt(from)),
        )
        .all(conn)
        .await?)
}

pub(super) fn period_of(model: &association::Model) -> Period {
    Period {
        start: model.starts_at,
        end: model.ends_at,
    }
}

impl Clinical {
    /// Associates a device with a patient for `period`, charting the stored readings the period covers.
    pub async fn associate(
        &self,
        device: Uuid,
        key: &PatientKey,
        period: Period,
        source: Source,
        audit: &Context,
    ) -> Result<AssociationView> {
        let txn = begin_write(&self.db).await?;
        let device = lock_device(&txn, device).await?;
        let view = self.associate_locked(&txn, &device, key, period, source, audit).await?;
        txn.commit().await?;
        if view.charted_retroactively > 0 {
            self.events.emit(Event::Outbox);
        }
        if view.charting_backlog > 0 {
            self.wake_backlog();
        }
        Ok(view)
    }

    pub(super) async fn associate_locked(
        &self,
        txn: &impl ConnectionTrait,
        device: &device::Model,
        key: &PatientKey,
        period: Period,
        source: Source,
        audit: &Context,
    ) -> Result<AssociationView> {
        let existing = association::Entity::find()
            .filter(association::Column::DeviceId.eq(device.id))
            .all(txn)
            .await?;
        if let Some(clash) = existing.iter().find(|a| period_of(a).overlaps(&period)) {
            let how = if clash.starts_at > now() {
                format!(
                    "it is planned: cancel it first (medfleet patients dissociate {} --cancel-planned)",
                    device.id
                )
            } else {
                "end that association first (medfleet patients dissociate)".to_owned()
            };
            return Err(Error::FailedPrecondition(format!(
                "device {} is already associated with a patient from {}{}; {how} or choose a period that does not \
                 overlap it",
                device.id,
                clash.starts_at.to_rfc3339(),
                clash
                    .ends_at
                    .map(|e| format!(" until {}", e.to_rfc3339()))
                    .unwrap_or_default(),
            )));
        }
        let scope = device_scope(device.site.as_deref(), device.ward.as_deref());
        let patient = self.upsert_patient(txn, key, source, &scope, audit).await?;
        let model = association::ActiveModel {
            id: Set(Uuid::new_v4()),
            device_id: Set(device.id),
            patient_id: Set(patient.id),
            starts_at: Set(period.start),
            ends_at: Set(period.end),
            source: Set(source.as_str().to_owned()),
            created_by: Set(audit.actor.clone()),
            created_at: Set(now()),
            ended_by: Set(None),
            charting_backlog: Set(false),
        };
        let mut association = association::Entity::insert(model).exec_with_returning(txn).await?;
        // Readings stored while nobody was associated and inside the new period are charted now, up to one chunk;
        // the rest in the background (backlog.rs), so no transaction holds the device lock for a month of readings.
        let stored = self.chart_stored(txn, device, &association).await?;
        let charted = stored.charted;
        if stored.remaining > 0 {
            let mut model = association.into_active_model();
            model.charting_backlog = Set(true);
            association = model.update(txn).await?;
        }
        let backlog = if stored.remaining > 0 {
            format!("; {} more being charted in the background", stored.remaining)
        } else {
            String::new()
        };
        audit
            .record(
                txn,
                "association.create",
                format!("device/{}", device.id),
                scope,
                format!(
                    "patient {} ({}) from {}{}; {charted} stored readings charted retroactively{backlog}",
                    patient.id,
                    source.as_str(),
                    period.start.to_rfc3339(),
                    period
                        .end
                        .map(|e| format!(" until {}", e.to_rfc3339()))
                        .unwrap_or_default()
                ),
            )
            .await?;
        Ok(AssociationView {
            association,
            patient,
            charted_retroactively: charted,
            charting_backlog: stored.remaining,
        })
    }

    /// Ends the device's association that is open at `at`, or (with `cancel_planned`) cancels the one planned to
    /// start after `at`.
    pub async fn dissociate(
        &self,
        device: Uuid,
        at: DateTime<Utc>,
        cancel_planned: bool,
        audit: &Context,
    ) -> Result<AssociationView> {
        let txn = begin_write(&self.db).await?;
        let device = lock_device(&txn, device).await?;
        let view = if cancel_planned {
            self.cancel_planned_locked(&txn, &device, at, audit).await?
        } else {
            let open = association::Entity::find()
                .filter(association::Column::DeviceId.eq(device.id))
                .filter(association::open_at(at))
                .one(&txn)
                .await?;
            let Some(open) = open else {
                return Err(Error::FailedPrecondition(self.nothing_open(&txn, &device, at).await?));
            };
            self.end_locked(&txn, &device, open, at, audit).await?
        };
        txn.commit().await?;
        Ok(view)
    }

    /// Why nothing can be ended at `at`, and what to do about a planned association if there is one.
    pub(super) async fn nothing_open(
        &self,
        txn: &impl ConnectionTrait,
        device: &device::Model,
        at: DateTime<Utc>,
    ) -> Result<String> {
        Ok(match planned_after(txn, device.id, at).await? {
            Some(planned) => format!(
                "device {} has no association open at {}, but one is planned from {}; cancel it with \
                 `medfleet patients dissociate {} --cancel-planned`",
                device.id,
                at.to_rfc3339(),
                planned.starts_at.to_rfc3339(),
                device.id
            ),
            None => format!("device {} has no association open at {}", device.id, at.to_rfc3339()),
        })
    }

    /// Removes the device's earliest association that starts after `at`. It never covered a reading (none may
    /// be charted to it), so nothing in the chart changes; the audit trail keeps who planned and who cancelled.
    pub(super) async fn cancel_planned_locked(
        &self,
        txn: &impl ConnectionTrait,
        device: &device::Model,
        at: DateTime<Utc>,
        audit: &Context,
    ) -> Result<AssociationView> {
        let planned = planned_after(txn, device.id, at).await?.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "device {} has no association planned to start after {}; to end one that is open, leave out \
                     --cancel-planned",
                device.id,
                at.to_rfc3339()
            ))
        })?;
        let charted = observation::Entity::find()
            .filter(observation::Column::AssociationId.eq(planned.id))
            .count(txn)
            .await?;
        if charted > 0 {
            return Err(Error::FailedPrecondition(format!(
                "the association from {} already holds {charted} chart entries; end it instead (leave out \
                 --cancel-planned)",
                planned.starts_at.to_rfc3339()
            )));
        }
        let patient = patient::Entity::find_by_id(planned.patient_id)
            .one(txn)
            .await?
            .ok_or_else(|| Error::Internal("an association refers to a missing patient".into()))?;
        association::Entity::delete_by_id(planned.id).exec(txn).await?;
        audit
            .record(
                txn,
                "association.cancel",
                format!("device/{}", device.id),
                device_scope(device.site.as_deref(), device.ward.as_deref()),
                format!(
                    "planned association {} of patient {} from {} cancelled",
                    planned.id,
                    patient.id,
                    planned.starts_at.to_rfc3339()
                ),
            )
            .await?;
        let mut cancelled = planned;
        cancelled.ended_by = Some(audit.actor.clone());
        Ok(AssociationView {
            association: cancelled,
            patient,
            charted_retroactively: 0,
            charting_backlog: 0,
        })
    }

    pub(super) async fn end_locked(
        &self,
        txn: &impl ConnectionTrait,
        device: &device::Model,
        open: association::Model,
        at: DateTime<Utc>,
        audit: &Context,
    ) -> Result<AssociationView> {
        let later = observation::Entity::find()
            .filter(observation::Column::AssociationId.eq(open.id))
            .filter(observation::Column::ObservedAt.gte(at))
            .count(txn)
            .await?;
        if later > 0 {
            return Err(Error::FailedPrecondition(format!(
                "{later} chart entries observed at or after {} already belong to this association; end it at a \
                 later time, or mark those entries entered-in-error first",
                at.to_rfc3339()
            )));
        }
        // Conditional on the row still being open at `at`: an end never moves later (which could make it overlap
        // a newer association), whatever a concurrent writer did since this transaction read it.
        let updated = association::Entity::update_many()
            .col_expr(association::Column::EndsAt, Expr::value(Some(at)))
            .col_expr(association::Column::EndedBy, Expr::value(Some(audit.actor.clone())))
            .filter(association::Column::Id.eq(open.id))
            .filter(association::open_at(at))
            .exec(txn)
            .await?;
        if updated.rows_affected != 1 {
            return Err(Error::FailedPrecondition(format!(
                "the association of device {} changed concurrently; retry",
                device.id
            )));
        }
        let ended = association::Entity::find_by_id(open.id)
            .one(txn)
            .await?
            .ok_or_else(|| Error::Internal("an ended association vanished".into()))?;
        let patient = patient::Entity::find_by_id(ended.patient_id)
            .one(txn)
            .await?
            .ok_or_else(|| Error::Internal("an association refers to a missing patient".into()))?;
        audit
            .record(
                txn,
                "association.end",
                format!("device/{}", device.id),
                device_scope(device.site.as_deref(), device.ward.as_deref()),
                format!("patient {} until {}", patient.id, at.to_rfc3339()),
            )
            .await?;
        Ok(AssociationView {
            association: ended,
            patient,
            charted_retroactively: 0,
            charting_backlog: 0,
        })
    }

    /// Associations of a device, or of a patient, oldest first.
    pub async fn list_associations(
        &self,
        device: Option<Uuid>,
        patient: Option<&PatientKey>,
    ) -> Result<Vec<AssociationView>> {
        let mut query = association::Entity::find();
        if let Some(device) = device {
            query = query.filter(association::Column::DeviceId.eq(device));
        }
        if let Some(key) = patient {
            let Some(found) = self.find_patient(key).await? else {
                return Ok(Vec::new());
            };
            query = query.filter(association::Column::PatientId.eq(found.id));
        }
        let rows = query.order_by_asc(association::Column::StartsAt).all(&self.db).await?;
        let ids: BTreeSet<Uuid> = rows.iter().map(|a| a.patient_id).collect();
        let patients: HashMap<Uuid, patient::Model> = patient::Entity::find()
            .filter(patient::Column::Id.is_in(ids))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|p| (p.id, p))
            .collect();
        rows.into_iter()
            .map(|association| {
                let patient = patients
                    .get(&association.patient_id)
                    .cloned()
                    .ok_or_else(|| Error::Internal("an association refers to a missing patient".into()))?;
                Ok(AssociationView {
                    association,
                    patient,
                    charted_retroactively: 0,
                    charting_backlog: 0,
                })
            })
            .collect()
    }
}
