//! Retroactive charting in bounded chunks. An association made for a period that already holds stored readings
//! (a device that charted to nobody for a while, then an association backdated to cover it) charts them; a month
//! of a monitor's readings in one transaction would hold the device lock — and block its ingest — for as long as
//! the whole chart takes. So one chunk is charted in the association's own transaction and the association is
//! marked `charting_backlog`; the rest is charted here, one chunk per transaction, each under the device lock.
//!
//! Exactly once without bookkeeping: a chunk charts only readings whose `observation_id` is still NULL, read
//! under the device lock, and sets it in the same transaction as the chart entries; so a replica that dies
//! mid-chunk leaves nothing behind, and two replicas working the same backlog chart every reading once. The
//! marker is the resumption point: every replica works marked associations when woken and on a periodic
//! reconcile, including after a restart.

use std::time::Duration;

use chrono::{DateTime, Utc};
use medfleet_core::clinical::codes::Vital;
use medfleet_core::clinical::reading::Reading;
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait as _, ConnectionTrait, EntityTrait as _, IntoActiveModel as _,
    PaginatorTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _, Select,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Clinical;
use super::chart::{Placements, chart, insert_observations, vital_from_refid};
use super::outbox::{enqueue, routes};
use crate::audit::{Context, device_scope};
use crate::error::Result;
use crate::persistence::db::begin_write;
use crate::persistence::entity::{association, device, observation, reading};
use crate::persistence::events::Event;
use crate::registry::store::lock_device;

/// Readings charted per transaction (plus the rest of the last chunk's observation time, so one measurement's
/// components are never split across two chart entries).
pub(crate) const CHUNK: u64 = 2_000;
/// Backlogs other replicas marked, or that a restart left, are picked up at least this often.
const RECONCILE: Duration = Duration::from_secs(5);
/// Marked associations read per pass.
const PASS: u64 = 100;

/// What charting one chunk of stored readings did.
pub(crate) struct StoredCharting {
    pub(crate) charted: u64,
    /// Readings of the period still uncharted after this chunk.
    pub(crate) remaining: u64,
}

/// Uncharted readings of `device` inside `association`'s period, measured where the device stands now. What it
/// measured at an earlier place (another bed, another ward) is some other patient's, or nobody's: a backdated
/// association — a late ADT transfer, a clinician's correction — never reaches across a move.
fn uncharted(device: &device::Model, association: &association::Model) -> Select<reading::Entity> {
    let codes: Vec<&str> = Vital::ALL.iter().map(|v| v.info().mdc_refid).collect();
    let mut query = reading::Entity::find()
        .filter(reading::Column::DeviceId.eq(device.id))
        .filter(reading::Column::ObservationId.is_null())
        // Only codes that chart: anything else would stay uncharted and keep a backlog alive forever.
        .filter(reading::Column::Code.is_in(codes))
        .filter(reading::Column::ObservedAt.gte(association.starts_at));
    if let Some(moved) = moved_at(device) {
        query = query.filter(reading::Column::ObservedAt.gte(moved));
    }
    if let Some(end) = association.ends_at {
        query = query.filter(reading::Column::ObservedAt.lt(end));
    }
    query
}

/// When the device last moved; none for one that never did (where it was registered is the only place its
/// readings can be from).
fn moved_at(device: &device::Model) -> Option<DateTime<Utc>> {
    device.placed_at.filter(|placed| *placed > device.created_at)
}

impl Clinical {
    /// Charts the oldest chunk of `association`'s uncharted stored readings inside the caller's transaction, which
    /// holds the device lock.
    pub(crate) async fn chart_stored(
        &self,
        txn: &impl ConnectionTrait,
        device: &device::Model,
        association: &association::Model,
    ) -> Result<StoredCharting> {
        let cutoff: Option<DateTime<Utc>> = uncharted(device, association)
            .select_only()
            .column(reading::Column::ObservedAt)
            .order_by_asc(reading::Column::ObservedAt)
            .offset(CHUNK - 1)
            .limit(1)
            .into_tuple()
            .one(txn)
            .await?;
        let mut query = uncharted(device, association);
        if let Some(cutoff) = cutoff {
            query = query.filter(reading::Column::ObservedAt.lte(cutoff));
        }
        let stored = query.order_by_asc(reading::Column::ObservedAt).all(txn).await?;
        let remaining = match cutoff {
            Some(cutoff) => {
                uncharted(device, association)
                    .filter(reading::Column::ObservedAt.gt(cutoff))
                    .count(txn)
                    .await?
            }
            None => 0,
        };
        if stored.is_empty() {
            return Ok(StoredCharting { charted: 0, remaining });
        }
        // (row id, reading) pairs: the grouping's indexes must point at the rows they came from.
        let pairs: Vec<(i64, Reading)> = stored
            .iter()
            .filter_map(|row| {
                Some((
                    row.id,
                    Reading {
                        vital: vital_from_refid(&row.code)?,
                        value: row.value,
                        observed_at: row.observed_at,
                        questionable: row.questionable,
                    },
                ))
            })
            .collect();
        let readings: Vec<Reading> = pairs.iter().map(|(_, r)| *r).collect();
        let limits = self.alarms.limits_for(txn, &self.events, device).await?;
        let from = readings
            .iter()
            .map(|r| r.observed_at)
            .min()
            .unwrap_or(association.starts_at);
        let placements = Placements::load(txn, device, from).await?;
        let (rows, pending, members) = chart(device, &placements, association, &readings, &limits);
        insert_observations(txn, rows).await?;
        for (observation, indexes) in members {
            let ids: Vec<i64> = indexes.iter().map(|i| pairs[*i].0).collect();
            reading::Entity::update_many()
                .col_expr(reading::Column::ObservationId, Expr::value(observation))
                .filter(reading::Column::Id.is_in(ids))
                .exec(txn)
                .await?;
        }
        enqueue(txn, &self.events, &routes(txn).await?, &pending, None).await?;
        Ok(StoredCharting {
            charted: pairs.len() as u64,
            remaining,
        })
    }

    /// Wakes this replica's backlog worker (a new association left a backlog).
    pub(crate) fn wake_backlog(&self) {
        self.backlog_wake.notify_one();
    }

    /// Works marked associations until `stop`: when woken, and every [`RECONCILE`] for other replicas' marks and
    /// those a restart left.
    pub fn spawn_backlog(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let clinical = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(error) = clinical.work_backlog(&stop).await {
                    tracing::warn!(%error, "retroactive charting failed; it resumes on the next pass");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = clinical.backlog_wake.notified() => {}
                    () = tokio::time::sleep(RECONCILE) => {}
                }
            }
        })
    }

    async fn work_backlog(&self, stop: &CancellationToken) -> Result<()> {
        loop {
            let marked: Vec<(Uuid, Uuid)> = association::Entity::find()
                .select_only()
                .column(association::Column::Id)
                .column(association::Column::DeviceId)
                .filter(association::Column::ChartingBacklog.eq(true))
                .limit(PASS)
                .into_tuple()
                .all(&self.db)
                .await?;
            if marked.is_empty() {
                return Ok(());
            }
            for (association, device) in marked {
                while !stop.is_cancelled() {
                    if self.backlog_chunk(association, device).await? {
                        break;
                    }
                }
                if stop.is_cancelled() {
                    return Ok(());
                }
            }
        }
    }

    /// Charts one chunk of `association`'s backlog; true when the backlog is done (or gone).
    async fn backlog_chunk(&self, association_id: Uuid, device_id: Uuid) -> Result<bool> {
        let txn = begin_write(&self.db).await?;
        let device = lock_device(&txn, device_id).await?;
        // Re-read under the lock: a dissociation may have shortened the period, another replica finished it.
        let Some(association) = association::Entity::find_by_id(association_id).one(&txn).await? else {
            return Ok(true);
        };
        if !association.charting_backlog {
            return Ok(true);
        }
        let stored = self.chart_stored(&txn, &device, &association).await?;
        let done = stored.remaining == 0;
        if done {
            let charted = reading::Entity::find()
                .filter(
                    reading::Column::ObservationId.in_subquery(
                        sea_orm::sea_query::Query::select()
                            .column(observation::Column::Id)
                            .from(observation::Entity)
                            .and_where(Expr::col(observation::Column::AssociationId).eq(Expr::value(association.id)))
                            .to_owned(),
                    ),
                )
                .count(&txn)
                .await?;
            let id = association.id;
            let mut model = association.into_active_model();
            model.charting_backlog = Set(false);
            model.update(&txn).await?;
            Context::system("retroactive charting")
                .record(
                    &txn,
                    "association.chart.complete",
                    format!("device/{device_id}"),
                    device_scope(device.site.as_deref(), device.ward.as_deref()),
                    format!("association {id}: retroactive charting finished; {charted} readings charted in all"),
                )
                .await?;
        }
        txn.commit().await?;
        if stored.charted > 0 {
            self.events.emit(Event::Outbox);
        }
        Ok(done)
    }
}
