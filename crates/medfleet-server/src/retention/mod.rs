//! Retention: medfleetd forgets clinical data only when the hospital's policy says so, and never what has not
//! reached the chart. Off by default (the EMR is the legal record; medfleet is a relay with a working copy): a
//! hospital that wants bounded storage sets `retention_delivered_outbox` and `retention_clinical`.
//!
//! What goes, oldest first, in bounded transactions (each [`CHUNK`] rows, audited in the same transaction with
//! counts and the cutoff, never a patient):
//! - after `retention_delivered_outbox`: delivery history — rows that are done with (delivered, superseded, or a
//!   feed event every subscription of its feed acknowledged) and that a newer row of the same (destination, entry)
//!   follows. The newest row of each pair stays with its entry: it is what says where the entry went, so a later
//!   validation or retraction still reaches every receiver that has it.
//! - after `retention_clinical`: chart entries observed before the cutoff whose every delivery row is done with
//!   (none pending, dead-lettered, or unacknowledged by a feed — nor a feed nobody subscribed to yet), with those
//!   rows and their readings; then uncharted readings that old that no backdated association is still charting.
//!   Pending and dead-lettered deliveries are never purged: an admin must see and retry what never arrived.
//!
//! One replica purges at a time (a transaction-scoped PostgreSQL advisory lock tried, not waited for; SQLite's
//! writes are serial), so the trail records each purge once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait as _, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait as _, QueryFilter as _,
    QueryOrder as _, QuerySelect as _,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::audit::Context;
use crate::clinical::state;
use crate::error::{Error, Result};
use crate::persistence::db::now;
use crate::persistence::entity::{emr_outbox, observation, reading};
use crate::settings::RetentionPolicy;
use crate::telemetry::Metrics;

/// Arbitrary but fixed key of the advisory lock one purging replica holds on PostgreSQL.
const RETENTION_LOCK_KEY: i64 = 0x6d65_6466_6c74_0010;
/// Rows deleted per transaction: short enough not to stall ingest behind SQLite's write lock.
pub const CHUNK: u64 = 5_000;

/// What one pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub deliveries: u64,
    pub observations: u64,
    pub readings: u64,
}

#[derive(Debug, Clone)]
pub struct Retention {
    db: DatabaseConnection,
    policy: RetentionPolicy,
    metrics: Metrics,
}

fn cutoff(keep: Duration) -> Result<DateTime<Utc>> {
    let keep = chrono::Duration::from_std(keep).map_err(|e| Error::Internal(format!("retention period: {e}")))?;
    Ok(now() - keep)
}

impl Retention {
    pub fn new(db: DatabaseConnection, policy: RetentionPolicy, metrics: Metrics) -> Self {
        Self { db, policy, metrics }
    }

    /// Purges every `policy.interval` until `stop`; does nothing when no retention is configured.
    pub fn spawn(self, stop: CancellationToken) {
        if !self.policy.enabled() {
            return;
        }
        tokio::spawn(async move {
            loop {
                match self.run_once(&stop).await {
                    Ok(purged) if purged != Purged::default() => {
                        tracing::info!(
                            deliveries = purged.deliveries,
                            observations = purged.observations,
                            readings = purged.readings,
                            "retention purge"
                        );
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "retention purge failed; it is tried again next interval"),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(self.policy.interval) => {}
                }
            }
        });
    }

    /// One pass of every configured purge.
    pub async fn run_once(&self, stop: &CancellationToken) -> Result<Purged> {
        let mut purged = Purged::default();
        if let Some(keep) = self.policy.delivered_outbox {
            let before = cutoff(keep)?;
            while !stop.is_cancelled() {
                let Some(n) = self.purge_deliveries(before).await? else {
                    break;
                };
                purged.deliveries += n;
                if n < CHUNK {
                    break;
                }
            }
        }
        if let Some(keep) = self.policy.clinical {
            let before = cutoff(keep)?;
            while !stop.is_cancelled() {
                let Some((entries, readings)) = self.purge_observations(before).await? else {
                    break;
                };
                purged.observations += entries;
                purged.readings += readings;
                if entries < CHUNK {
                    break;
                }
            }
            while !stop.is_cancelled() {
                let Some(n) = self.purge_uncharted(before).await? else {
                    break;
                };
                purged.readings += n;
                if n < CHUNK {
                    break;
                }
            }
        }
        self.metrics.record_purged("delivery", purged.deliveries);
        self.metrics.record_purged("observation", purged.observations);
        self.metrics.record_purged("reading", purged.readings);
        Ok(purged)
    }

    /// A write transaction holding the purge lock, or none when another replica is purging.
    async fn begin(&self) -> Result<Option<sea_orm::DatabaseTransaction>> {
        let txn = crate::persistence::db::begin_write(&self.db).await?;
        if txn.get_database_backend() == DbBackend::Postgres {
            let row = txn
                .query_one_raw(sea_orm::Statement::from_string(
                    DbBackend::Postgres,
                    format!("SELECT pg_try_advisory_xact_lock({RETENTION_LOCK_KEY})"),
                ))
                .await?;
            let locked = row.map(|r| r.try_get_by_index::<bool>(0)).transpose()?.unwrap_or(false);
            if !locked {
                return Ok(None);
            }
        }
        Ok(Some(txn))
    }

    async fn purge_deliveries(&self, before: DateTime<Utc>) -> Result<Option<u64>> {
        let Some(txn) = self.begin().await? else {
            return Ok(None);
        };
        let ids: Vec<i64> = emr_outbox::Entity::find()
            .select_only()
            .column(emr_outbox::Column::Id)
            .filter(emr_outbox::Column::CreatedAt.lt(before))
            .filter(Expr::cust(finished("emr_outbox")))
            // Only history: the newest row of each (destination, entry) stays with the entry, because it is what
            // says where the entry went, and a later validation or retraction must follow it there.
            .filter(Expr::cust(
                "EXISTS (SELECT 1 FROM emr_outbox AS newer WHERE newer.destination = emr_outbox.destination \
                 AND newer.observation_id = emr_outbox.observation_id AND newer.id > emr_outbox.id)",
            ))
            .order_by_asc(emr_outbox::Column::Id)
            .limit(CHUNK)
            .into_tuple()
            .all(&txn)
            .await?;
        let n = ids.len() as u64;
        let delete = emr_outbox::Entity::delete_many().filter(emr_outbox::Column::Id.is_in(ids));
        let detail = |n| {
            format!(
                "{n} superseded or repeated deliveries created before {} purged",
                before.to_rfc3339()
            )
        };
        finish(txn, n, delete, "emr_outbox", detail).await
    }

    async fn purge_observations(&self, before: DateTime<Utc>) -> Result<Option<(u64, u64)>> {
        let Some(txn) = self.begin().await? else {
            return Ok(None);
        };
        let ids: Vec<Uuid> = observation::Entity::find()
            .select_only()
            .column(observation::Column::Id)
            .filter(observation::Column::ObservedAt.lt(before))
            // Nothing of it still queued, dead-lettered or unacknowledged by a feed.
            .filter(Expr::cust(format!(
                "NOT EXISTS (SELECT 1 FROM emr_outbox AS o WHERE o.observation_id = observations.id AND NOT {})",
                finished("o")
            )))
            .order_by_asc(observation::Column::ObservedAt)
            .limit(CHUNK)
            // Held until commit: a status change on another replica (which locks the entry) waits and then finds
            // it gone, instead of queueing a delivery for an entry being deleted.
            .lock_exclusive()
            .into_tuple()
            .all(&txn)
            .await?;
        if ids.is_empty() {
            return Ok(Some((0, 0)));
        }
        emr_outbox::Entity::delete_many()
            .filter(emr_outbox::Column::ObservationId.is_in(ids.iter().copied()))
            .exec(&txn)
            .await?;
        let readings = reading::Entity::delete_many()
            .filter(reading::Column::ObservationId.is_in(ids.iter().copied()))
            .exec(&txn)
            .await?
            .rows_affected;
        let n = ids.len() as u64;
        let delete = observation::Entity::delete_many().filter(observation::Column::Id.is_in(ids));
        let detail = |n| {
            format!(
                "{n} delivered chart entries, their delivery records and their {readings} readings observed before \
                 {} purged",
                before.to_rfc3339()
            )
        };
        Ok(finish(txn, n, delete, "observations", detail)
            .await?
            .map(|n| (n, readings)))
    }

    async fn purge_uncharted(&self, before: DateTime<Utc>) -> Result<Option<u64>> {
        let Some(txn) = self.begin().await? else {
            return Ok(None);
        };
        // Oldest ids first: ids follow arrival, so the scan starts where the old rows are.
        let ids: Vec<i64> = reading::Entity::find()
            .select_only()
            .column(reading::Column::Id)
            .filter(reading::Column::ObservationId.is_null())
            .filter(reading::Column::ObservedAt.lt(before))
            .filter(Expr::cust(UNCHARTED_LEFT_OVER))
            .order_by_asc(reading::Column::Id)
            .limit(CHUNK)
            .into_tuple()
            .all(&txn)
            .await?;
        let n = ids.len() as u64;
        // The conditions again in the delete: a backdated association on another replica may have charted (or
        // marked for charting) some of them since the select.
        let delete = reading::Entity::delete_many()
            .filter(reading::Column::Id.is_in(ids))
            .filter(reading::Column::ObservationId.is_null())
            .filter(Expr::cust(UNCHARTED_LEFT_OVER));
        let detail = |n| format!("{n} uncharted readings observed before {} purged", before.to_rfc3339());
        finish(txn, n, delete, "readings", detail).await
    }
}

/// A delivery row that is done with: delivered, superseded by a newer status, or a feed event that has at least
/// one subscription and that every subscription of its feed acknowledged (a feed nobody follows yet keeps its
/// events for the first subscriber).
fn finished(row: &str) -> String {
    format!(
        "({row}.state IN ('{delivered}', '{superseded}') OR ({row}.state = '{feed}' \
         AND EXISTS (SELECT 1 FROM feed_subscriptions AS s WHERE s.destination = {row}.destination) \
         AND NOT EXISTS (SELECT 1 FROM feed_subscriptions AS s WHERE s.destination = {row}.destination \
         AND s.cursor < {row}.id)))",
        delivered = state::DELIVERED,
        superseded = state::SUPERSEDED,
        feed = state::FEED,
    )
}

/// An uncharted reading nobody will chart: no backdated association of its device is still charting.
const UNCHARTED_LEFT_OVER: &str =
    "NOT EXISTS (SELECT 1 FROM associations AS a WHERE a.device_id = readings.device_id AND a.charting_backlog)";

/// Deletes one chunk and audits it in the same transaction; nothing to delete commits nothing.
async fn finish<E: sea_orm::EntityTrait>(
    txn: sea_orm::DatabaseTransaction,
    n: u64,
    delete: sea_orm::DeleteMany<E>,
    target: &str,
    detail: impl FnOnce(u64) -> String,
) -> Result<Option<u64>> {
    if n == 0 {
        return Ok(Some(0));
    }
    let deleted = delete.exec(&txn).await?.rows_affected;
    if deleted == 0 {
        return Ok(Some(0));
    }
    Context::system("retention")
        .record(&txn, "retention.purge", target, "*", detail(deleted))
        .await?;
    txn.commit().await?;
    Ok(Some(deleted))
}
