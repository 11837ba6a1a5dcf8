//! EMR delivery (the destinations themselves are [`crate::emr::destinations`]): the outbox relays that send chart events
//! to FHIR R4 servers (transaction Bundles with conditional create) and HL7 v2 receivers (ORU^R01 over MLLP, waiting
//! for the ACK), and the feed that EMR systems subscribe to over gRPC with a cursor stored here.
//!
//! Exactly one replica relays a destination at a time: it holds a lease on the destination's row, renewed before
//! every round and taken over by another replica only once it has expired. Receivers must still be idempotent
//! (a delivery whose answer was lost is sent again): FHIR entries carry a conditional create on the
//! observation's identifier, HL7 messages a control id (MSH-10) that stays the same on every resend.

pub mod destinations;
pub mod grpc;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt as _, Full};
use medfleet_core::clinical::chart::{ChartEntry, ChartStatus, DeviceRef, PatientRef, PointOfCare};
use medfleet_core::clinical::{fhir, hl7};
use medfleet_core::validation::Violations;
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, DatabaseConnection, EntityTrait as _, QueryFilter as _, QueryOrder as _,
    QuerySelect as _,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::audit::Context;
use crate::clinical::{DestinationKind, decode_measurement, state};
use crate::emr::destinations::{Settings, open_settings, send_refusal, split_host_port};
use crate::error::{Error, Result};
use crate::identity::secrets::Secrets;
use crate::persistence::db::now;
use crate::persistence::entity::{device, emr_destination, emr_outbox, feed_subscription, observation, patient};
use crate::persistence::events::{Event, Events};
use crate::telemetry::Metrics;

/// How long a relay's claim on a destination lasts without renewal: longer than one whole exchange
/// (`EXCHANGE_TIMEOUT`), since the relay renews it before every send; and short, because a replica that died
/// holds its destinations until the lease runs out.
const LEASE: Duration = Duration::from_secs(30);
/// Bounds one whole delivery attempt (connect, TLS, request, answer), whatever each step takes.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);
/// How often relays look for work when no notification woke them (the periodic reconcile).
const RELAY_TICK: Duration = Duration::from_secs(1);
/// Chart events per FHIR transaction Bundle.
const FHIR_BATCH: u64 = 50;
/// Events per relay query for MLLP (sent one message at a time).
const MLLP_BATCH: u64 = 100;
/// Bounds one network exchange with a receiver.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest pause between retries of a failing delivery.
const MAX_BACKOFF: Duration = Duration::from_mins(5);
/// The most of a receiver's reply (FHIR response body, MLLP ACK) medfleetd reads; an ACK or an OperationOutcome is
/// a few KiB, a transaction-response for 50 entries some tens.
const MAX_REPLY: usize = 1 << 20;
/// How much of a receiver's answer is kept as the error of a failed delivery.
const ERROR_EXCERPT: usize = 300;

#[derive(Debug)]
pub struct Emr {
    pub(crate) db: DatabaseConnection,
    pub(crate) events: Arc<Events>,
    metrics: Metrics,
    replica: String,
    retry_max: chrono::Duration,
    pub(crate) allowed_hosts: Vec<String>,
    /// Seals destination secrets when they are stored, opens them when a relay sends.
    pub(crate) secrets: Arc<Secrets>,
    running: Mutex<HashSet<String>>,
}

impl Emr {
    pub fn new(
        db: DatabaseConnection,
        events: Arc<Events>,
        metrics: Metrics,
        replica: String,
        retry_max: Duration,
        allowed_hosts: Vec<String>,
        secrets: Arc<Secrets>,
    ) -> Arc<Self> {
        Arc::new(Self {
            db,
            events,
            metrics,
            replica,
            retry_max: chrono::Duration::from_std(retry_max).unwrap_or(chrono::Duration::hours(24)),
            allowed_hosts,
            secrets,
            running: Mutex::new(HashSet::new()),
        })
    }

    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }

    /// Deliveries newest first, after the keyset `before` (an outbox id).
    pub async fn deliveries(
        &self,
        destination: Option<&str>,
        failed_only: bool,
        before: Option<i64>,
        limit: u64,
    ) -> Result<Vec<emr_outbox::Model>> {
        let mut query = emr_outbox::Entity::find();
        if let Some(destination) = destination {
            query = query.filter(emr_outbox::Column::Destination.eq(destination));
        }
        if failed_only {
            query = query.filter(emr_outbox::Column::State.eq(state::DEAD));
        }
        if let Some(before) = before {
            query = query.filter(emr_outbox::Column::Id.lt(before));
        }
        Ok(query
            .order_by_desc(emr_outbox::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// Puts dead-lettered deliveries back in the queue.
    pub async fn retry(&self, destination: &str, ids: &[i64], audit: &Context) -> Result<u64> {
        self.destination(destination).await?;
        let txn = crate::persistence::db::begin_write(&self.db).await?;
        let mut update = emr_outbox::Entity::update_many()
            .col_expr(emr_outbox::Column::State, Expr::value(state::PENDING))
            .col_expr(emr_outbox::Column::Attempts, Expr::value(0))
            .col_expr(emr_outbox::Column::NextAttemptAt, Expr::value(now()))
            .filter(emr_outbox::Column::Destination.eq(destination))
            .filter(emr_outbox::Column::State.eq(state::DEAD));
        if !ids.is_empty() {
            update = update.filter(emr_outbox::Column::Id.is_in(ids.iter().copied()));
        }
        let retried = update.exec(&txn).await?.rows_affected;
        audit
            .record(
                &txn,
                "emr_delivery.retry",
                format!("emr_destination/{destination}"),
                "*",
                format!("{retried} dead-lettered deliveries queued again"),
            )
            .await?;
        self.events.announce(&txn, &Event::Outbox).await?;
        txn.commit().await?;
        self.events.emit(Event::Outbox);
        Ok(retried)
    }

    /// The chart entries behind outbox rows (each with the status its row carries), by outbox id.
    pub async fn entries(&self, rows: &[emr_outbox::Model]) -> Result<HashMap<i64, ChartEntry>> {
        let ids: BTreeSet<Uuid> = rows.iter().map(|r| r.observation_id).collect();
        let observations: HashMap<Uuid, observation::Model> = observation::Entity::find()
            .filter(observation::Column::Id.is_in(ids))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|o| (o.id, o))
            .collect();
        let patient_ids: BTreeSet<Uuid> = observations.values().map(|o| o.patient_id).collect();
        let device_ids: BTreeSet<Uuid> = observations.values().map(|o| o.device_id).collect();
        let patients: HashMap<Uuid, patient::Model> = patient::Entity::find()
            .filter(patient::Column::Id.is_in(patient_ids))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|p| (p.id, p))
            .collect();
        let devices: HashMap<Uuid, device::Model> = device::Entity::find()
            .filter(device::Column::Id.is_in(device_ids))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|d| (d.id, d))
            .collect();
        let mut out = HashMap::new();
        for row in rows {
            let observation = observations
                .get(&row.observation_id)
                .ok_or_else(|| Error::Internal(format!("outbox row {} has no observation", row.id)))?;
            let entry = chart_entry(observation, &patients, &devices, ChartStatus::parse(&row.status))?;
            out.insert(row.id, entry);
        }
        Ok(out)
    }

    /// Starts the relays of this replica: each tick (or change notification) it claims the destinations whose
    /// lease is free and runs a delivery round for each one it holds.
    /// The relay loop until `stop`; the handle ends once this replica's leases are released.
    pub fn spawn_relays(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let emr = self.clone();
        tokio::spawn(async move {
            let mut events = emr.events.subscribe();
            let mut tick = tokio::time::interval(RELAY_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {}
                    event = events.recv() => {
                        if matches!(event, Ok(Event::Config | Event::SessionOpened { .. } | Event::Presence { .. })) {
                            continue;
                        }
                    }
                }
                if let Err(error) = emr.relay_tick(&stop).await {
                    tracing::warn!(%error, "EMR relay round failed; retrying at the next tick");
                }
            }
            emr.release_leases().await;
        })
    }

    async fn relay_tick(self: &Arc<Self>, stop: &CancellationToken) -> Result<()> {
        for destination in emr_destination::Entity::find()
            .filter(emr_destination::Column::Enabled.eq(true))
            .filter(emr_destination::Column::IntervalSecs.gt(0))
            .all(&self.db)
            .await?
        {
            // Only take the write lock when a window has closed since the last run.
            let interval = std::cmp::max(destination.interval_secs, 1);
            let closed = (now() - chrono::Duration::seconds(interval))
                .timestamp()
                .div_euclid(interval)
                * interval;
            if destination.charted_until.is_some_and(|at| at.timestamp() >= closed) {
                continue;
            }
            if let Err(error) = self.chart_interval(&destination.name).await {
                tracing::warn!(destination = %destination.name, %error, "interval charting failed; retrying at the next tick");
            }
        }
        let destinations = emr_destination::Entity::find()
            .filter(emr_destination::Column::Enabled.eq(true))
            .filter(
                emr_destination::Column::Kind.is_in([DestinationKind::Fhir.as_str(), DestinationKind::Mllp.as_str()]),
            )
            .all(&self.db)
            .await?;
        for destination in destinations {
            if self.lock_running().contains(&destination.name) {
                continue;
            }
            // A destination whose secrets this replica cannot open is never sent to (not even without them): it
            // is left to a replica whose keyring has the key, or marked for the admin when none relays it.
            let settings = match self.relayable(&destination) {
                Ok(settings) => settings,
                Err(error) => {
                    self.mark_unrelayable(&destination, &error).await;
                    continue;
                }
            };
            if !self.claim(&destination.name).await? {
                continue;
            }
            self.lock_running().insert(destination.name.clone());
            let (emr, stop) = (self.clone(), stop.clone());
            tokio::spawn(async move {
                let name = destination.name.clone();
                if let Err(error) = emr.round(destination, settings, &stop).await {
                    tracing::warn!(destination = %name, %error, "delivery round failed; retrying at the next tick");
                }
                emr.lock_running().remove(&name);
            });
        }
        Ok(())
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The destination's settings with its secrets opened, if the server's rules let it be sent to.
    fn relayable(&self, destination: &emr_destination::Model) -> Result<Settings> {
        let settings = open_settings(destination, &self.secrets)?;
        let kind = DestinationKind::parse(&destination.kind)
            .ok_or_else(|| Error::Internal(format!("destination '{}' has unknown kind", destination.name)))?;
        match send_refusal(kind, &settings, &self.allowed_hosts) {
            Some(reason) => Err(Error::FailedPrecondition(reason)),
            None => Ok(settings),
        }
    }

    /// Records (once per new reason) why this replica cannot relay a destination, unless another replica holds
    /// its lease (and so can open its secrets). The reason says which key is missing and what to do.
    async fn mark_unrelayable(&self, destination: &emr_destination::Model, error: &Error) {
        let at = now();
        let held_elsewhere = destination.relay_owner.as_deref().is_some_and(|o| o != self.replica)
            && destination.relay_lease_until.is_some_and(|until| until > at);
        if held_elsewhere {
            tracing::debug!(destination = %destination.name, %error, "cannot open this destination's secrets; another replica relays it");
            return;
        }
        let reason = format!("replica {}: {error}", self.replica);
        if destination.relay_error.as_deref() == Some(reason.as_str()) {
            return;
        }
        tracing::error!(destination = %destination.name, %error, "EMR destination cannot be relayed: nothing is sent to it until this is fixed");
        let marked = emr_destination::Entity::update_many()
            .col_expr(emr_destination::Column::RelayError, Expr::value(Some(reason)))
            .filter(emr_destination::Column::Name.eq(destination.name.as_str()))
            .exec(&self.db)
            .await;
        if let Err(error) = marked {
            tracing::warn!(destination = %destination.name, %error, "could not record the relay error");
        }
    }

    /// Takes or renews the lease on a destination; false if another replica holds it.
    async fn claim(&self, name: &str) -> Result<bool> {
        let at = now();
        let until = at + chrono::Duration::from_std(LEASE).unwrap_or(chrono::Duration::seconds(30));
        let claimed = emr_destination::Entity::update_many()
            .col_expr(emr_destination::Column::RelayOwner, Expr::value(self.replica.clone()))
            .col_expr(emr_destination::Column::RelayLeaseUntil, Expr::value(until))
            .filter(emr_destination::Column::Name.eq(name))
            // A disabled destination is not renewed: the relay stops before its next message, not its next batch.
            .filter(emr_destination::Column::Enabled.eq(true))
            .filter(
                emr_destination::Column::RelayOwner
                    .is_null()
                    .or(emr_destination::Column::RelayOwner.eq(self.replica.clone()))
                    .or(emr_destination::Column::RelayLeaseUntil.lt(at)),
            )
            .exec(&self.db)
            .await?;
        Ok(claimed.rows_affected == 1)
    }

    async fn release_leases(&self) {
        let released = emr_destination::Entity::update_many()
            .col_expr(emr_destination::Column::RelayOwner, Expr::value(Option::<String>::None))
            .col_expr(
                emr_destination::Column::RelayLeaseUntil,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .filter(emr_destination::Column::RelayOwner.eq(self.replica.clone()))
            .exec(&self.db)
            .await;
        if let Err(error) = released {
            tracing::debug!(%error, "relay leases not released; they expire on their own");
        }
    }

    /// Delivers what is due for one destination, batch after batch, while this replica holds the lease. The
    /// destination is re-read before every batch, so an update (a new endpoint or token), a disable or a delete
    /// applies from the next batch on, without a restart.
    async fn round(
        &self,
        mut destination: emr_destination::Model,
        mut settings: Settings,
        stop: &CancellationToken,
    ) -> Result<()> {
        let kind = DestinationKind::parse(&destination.kind)
            .ok_or_else(|| Error::Internal(format!("destination '{}' has unknown kind", destination.name)))?;
        if destination.relay_error.is_some() {
            emr_destination::Entity::update_many()
                .col_expr(emr_destination::Column::RelayError, Expr::value(Option::<String>::None))
                .filter(emr_destination::Column::Name.eq(destination.name.as_str()))
                .exec(&self.db)
                .await?;
        }
        let mut mllp: Option<Box<dyn Io>> = None;
        loop {
            if stop.is_cancelled() || !self.claim(&destination.name).await? {
                return Ok(());
            }
            let Some(current) = emr_destination::Entity::find_by_id(destination.name.clone())
                .one(&self.db)
                .await?
                .filter(|d| d.enabled)
            else {
                return Ok(());
            };
            if current.settings != destination.settings {
                settings = match self.relayable(&current) {
                    Ok(settings) => settings,
                    Err(error) => {
                        self.mark_unrelayable(&current, &error).await;
                        return Ok(());
                    }
                };
                mllp = None;
            }
            destination = current;
            let limit = if kind == DestinationKind::Fhir {
                FHIR_BATCH
            } else {
                MLLP_BATCH
            };
            let due = emr_outbox::Entity::find()
                .filter(emr_outbox::Column::Destination.eq(destination.name.as_str()))
                .filter(emr_outbox::Column::State.eq(state::PENDING))
                .filter(emr_outbox::Column::NextAttemptAt.lte(now()))
                // Head of line per entry: a row waits while an older row of the same entry is pending (backing
                // off), so the receiver sees an entry's statuses in the order they happened.
                .filter(Expr::cust(
                    "NOT EXISTS (SELECT 1 FROM emr_outbox AS older WHERE older.destination = emr_outbox.destination \
                     AND older.observation_id = emr_outbox.observation_id AND older.state = 'pending' \
                     AND older.id < emr_outbox.id)",
                ))
                .order_by_asc(emr_outbox::Column::Id)
                .limit(limit)
                .all(&self.db)
                .await?;
            if due.is_empty() {
                return Ok(());
            }
            let entries = self.entries(&due).await?;
            match kind {
                DestinationKind::Fhir => {
                    // A Bundle may name each resource once: of several pending events of one entry only the
                    // newest is sent (a conditional update creates it if the earlier one never arrived); the
                    // older rows share its fate.
                    let mut newest: HashMap<Uuid, &emr_outbox::Model> = HashMap::new();
                    for row in &due {
                        newest.insert(row.observation_id, row);
                    }
                    let ordered: Vec<ChartEntry> = due
                        .iter()
                        .filter(|r| newest.get(&r.observation_id).is_some_and(|n| n.id == r.id))
                        .filter_map(|r| entries.get(&r.id).cloned())
                        .collect();
                    let bundle = fhir::transaction_bundle(&ordered);
                    let outcome = tokio::time::timeout(EXCHANGE_TIMEOUT, post_bundle(&settings, &bundle))
                        .await
                        .unwrap_or_else(|_| Err(Failure::retry("the FHIR exchange took too long; sent again later")));
                    self.settle(&due, &outcome, kind).await?;
                }
                DestinationKind::Mllp => {
                    for row in &due {
                        let Some(entry) = entries.get(&row.id) else { continue };
                        // Each message may wait for its ACK up to the timeout: hold the lease for every one.
                        if stop.is_cancelled() || !self.claim(&destination.name).await? {
                            return Ok(());
                        }
                        let outcome =
                            tokio::time::timeout(EXCHANGE_TIMEOUT, send_mllp(&mut mllp, &settings, entry, row.id))
                                .await
                                .unwrap_or_else(|_| {
                                    Err(Failure::retry("the HL7 exchange took too long; sent again later"))
                                });
                        if outcome.is_err() {
                            mllp = None;
                        }
                        self.settle(std::slice::from_ref(row), &outcome, kind).await?;
                    }
                }
                DestinationKind::Feed => return Ok(()),
            }
        }
    }

    /// Records the result of one delivery attempt for `rows`.
    async fn settle(
        &self,
        rows: &[emr_outbox::Model],
        outcome: &Result<(), Failure>,
        kind: DestinationKind,
    ) -> Result<()> {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let at = now();
        match outcome {
            Ok(()) => {
                emr_outbox::Entity::update_many()
                    .col_expr(emr_outbox::Column::State, Expr::value(state::DELIVERED))
                    .col_expr(emr_outbox::Column::DeliveredAt, Expr::value(Some(at)))
                    .col_expr(emr_outbox::Column::LastError, Expr::value(Option::<String>::None))
                    .col_expr(
                        emr_outbox::Column::Attempts,
                        Expr::col(emr_outbox::Column::Attempts).add(1),
                    )
                    .filter(emr_outbox::Column::Id.is_in(ids))
                    .exec(&self.db)
                    .await?;
                self.metrics
                    .record_delivery(kind.as_str(), "delivered", rows.len() as u64);
            }
            Err(failure) => {
                for row in rows {
                    let attempts = row.attempts.saturating_add(1);
                    let expired = at - row.created_at > self.retry_max;
                    let dead = failure.permanent || expired;
                    let backoff = Duration::from_secs(1u64 << attempts.clamp(0, 16)).min(MAX_BACKOFF);
                    let reason = if expired && !failure.permanent {
                        format!("gave up after {attempts} attempts: {}", failure.reason)
                    } else {
                        failure.reason.clone()
                    };
                    emr_outbox::Entity::update_many()
                        .col_expr(
                            emr_outbox::Column::State,
                            Expr::value(if dead { state::DEAD } else { state::PENDING }),
                        )
                        .col_expr(emr_outbox::Column::Attempts, Expr::value(attempts))
                        .col_expr(emr_outbox::Column::LastError, Expr::value(Some(reason)))
                        .col_expr(
                            emr_outbox::Column::NextAttemptAt,
                            Expr::value(
                                at + chrono::Duration::from_std(backoff).unwrap_or(chrono::Duration::seconds(1)),
                            ),
                        )
                        .filter(emr_outbox::Column::Id.eq(row.id))
                        // Superseded while in flight: it stays superseded (never sent again).
                        .filter(emr_outbox::Column::State.eq(state::PENDING))
                        .exec(&self.db)
                        .await?;
                }
                let outcome = if failure.permanent { "dead" } else { "retry" };
                // The reason holds only medfleet's own words and the receiver's structured codes (never its free
                // text, which may echo a patient identifier).
                tracing::warn!(kind = kind.as_str(), deliveries = rows.len(), reason = %failure.reason, outcome, "EMR delivery failed");
                self.metrics.record_delivery(kind.as_str(), outcome, rows.len() as u64);
            }
        }
        Ok(())
    }

    /// Charts the median of every closed window of a destination with a charting interval. A window closes one
    /// interval after it ends (grace for readings still in devices' buffers); the destination row is locked for
    /// the run, so replicas never chart a window twice.
    async fn chart_interval(&self, name: &str) -> Result<()> {
        let txn = crate::persistence::db::begin_write(&self.db).await?;
        let Some(destination) = emr_destination::Entity::find_by_id(name.to_owned())
            .lock_exclusive()
            .one(&txn)
            .await?
        else {
            return Ok(());
        };
        let interval = std::cmp::max(destination.interval_secs, 1);
        let floor = |at: DateTime<Utc>| {
            let seconds = at.timestamp().div_euclid(interval) * interval;
            DateTime::from_timestamp(seconds, 0).unwrap_or(at)
        };
        let ready_until = floor(now() - chrono::Duration::seconds(interval));
        let from = if let Some(at) = destination.charted_until {
            at
        } else {
            // First run: from the window of the earliest entry charted since the destination exists.
            let earliest = observation::Entity::find()
                .filter(observation::Column::CreatedAt.gte(destination.created_at))
                .order_by_asc(observation::Column::ObservedAt)
                .one(&txn)
                .await?;
            let Some(first) = earliest else { return Ok(()) };
            floor(first.observed_at)
        };
        if from >= ready_until {
            return Ok(());
        }
        let route = crate::clinical::Route::from_model(&destination)?;
        let candidates: Vec<observation::Model> = observation::Entity::find()
            .filter(observation::Column::ObservedAt.gte(from))
            .filter(observation::Column::ObservedAt.lt(ready_until))
            .all(&txn)
            .await?
            .into_iter()
            .filter(|o| route.covers(o.site.as_deref(), o.ward.as_deref()))
            // A retracted entry is never a window's median.
            .filter(|o| o.status != ChartStatus::EnteredInError.as_str())
            .collect();
        let already: HashSet<Uuid> = emr_outbox::Entity::find()
            .select_only()
            .column(emr_outbox::Column::ObservationId)
            .filter(emr_outbox::Column::Destination.eq(name))
            .filter(emr_outbox::Column::ObservationId.is_in(candidates.iter().map(|o| o.id)))
            .into_tuple::<Uuid>()
            .all(&txn)
            .await?
            .into_iter()
            .collect();
        let mut windows: HashMap<WindowKey, Vec<(f64, &observation::Model)>> = HashMap::new();
        for candidate in &candidates {
            let value = decode_measurement(candidate)?.values().first().map_or(0.0, |(_, v)| *v);
            let window = candidate.observed_at.timestamp().div_euclid(interval);
            windows
                .entry((
                    candidate.patient_id,
                    candidate.device_id,
                    candidate.kind.clone(),
                    window,
                ))
                .or_default()
                .push((value, candidate));
        }
        let mut pending = Vec::new();
        for members in windows.values_mut() {
            members.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.observed_at.cmp(&b.1.observed_at)));
            // The lower median is a value the device really measured (no synthetic average in a chart).
            let (_, median) = members[(members.len() - 1) / 2];
            if already.contains(&median.id) {
                continue;
            }
            pending.push(crate::clinical::Pending {
                observation: median.id,
                status: ChartStatus::parse(&median.status).unwrap_or(ChartStatus::Preliminary),
                site: median.site.clone(),
                ward: median.ward.clone(),
                breach: true,
                status_change: false,
            });
        }
        let only: BTreeSet<String> = [name.to_owned()].into();
        let queued = crate::clinical::enqueue(&txn, &self.events, &[route], &pending, Some(&only)).await?;
        let mut update: emr_destination::ActiveModel = destination.into();
        update.charted_until = Set(Some(ready_until));
        emr_destination::Entity::update(update).exec(&txn).await?;
        txn.commit().await?;
        if queued > 0 {
            self.events.emit(Event::Outbox);
        }
        Ok(())
    }

    /// The owner's subscription of this name, if it exists. Names are per owner: another principal's
    /// subscription of the same name is a different one, never visible here.
    pub async fn find_subscription(&self, name: &str, owner: &str) -> Result<Option<feed_subscription::Model>> {
        Ok(
            feed_subscription::Entity::find_by_id((owner.to_owned(), name.to_owned()))
                .one(&self.db)
                .await?,
        )
    }

    /// The feed destination a subscription follows (or would follow, if `destination` names it for a new one).
    /// Nothing is created here: the caller checks access to the destination first.
    pub async fn subscription_target(
        &self,
        existing: Option<&feed_subscription::Model>,
        name: &str,
        destination: &str,
    ) -> Result<emr_destination::Model> {
        if let Some(existing) = existing {
            if !destination.is_empty() && existing.destination != destination {
                return Err(Error::FailedPrecondition(format!(
                    "subscription '{name}' follows destination '{}', not '{destination}'",
                    existing.destination
                )));
            }
            return self.destination(&existing.destination).await;
        }
        if destination.is_empty() {
            return Err(Error::NotFound(format!(
                "you have no feed subscription '{name}'; name the feed destination to create it"
            )));
        }
        let target = self.destination(destination).await?;
        if target.kind != DestinationKind::Feed.as_str() {
            return Err(Error::FailedPrecondition(format!(
                "destination '{destination}' is a {} destination, not a feed",
                target.kind
            )));
        }
        Ok(target)
    }

    /// Creates the owner's subscription to a feed destination the caller was allowed to follow (or returns the
    /// one a concurrent call created).
    pub async fn create_subscription(
        &self,
        name: &str,
        destination: &str,
        owner: &str,
    ) -> Result<feed_subscription::Model> {
        let at = now();
        let model = feed_subscription::ActiveModel {
            name: Set(name.to_owned()),
            destination: Set(destination.to_owned()),
            cursor: Set(0),
            owner: Set(owner.to_owned()),
            created_at: Set(at),
            updated_at: Set(at),
        };
        feed_subscription::Entity::insert(model)
            .on_conflict_do_nothing()
            .exec_without_returning(&self.db)
            .await?;
        self.find_subscription(name, owner)
            .await?
            .ok_or_else(|| Error::Internal("a created subscription vanished".into()))
    }

    /// The chart entries (observation rows) that outbox rows carry.
    pub async fn observations_of(&self, rows: &[emr_outbox::Model]) -> Result<Vec<observation::Model>> {
        let ids: BTreeSet<Uuid> = rows.iter().map(|r| r.observation_id).collect();
        Ok(observation::Entity::find()
            .filter(observation::Column::Id.is_in(ids))
            .all(&self.db)
            .await?)
    }

    /// Feed events of a destination after `cursor`, oldest first.
    pub async fn feed_page(&self, destination: &str, cursor: i64, limit: u64) -> Result<Vec<emr_outbox::Model>> {
        Ok(emr_outbox::Entity::find()
            .filter(emr_outbox::Column::Destination.eq(destination))
            .filter(emr_outbox::Column::Id.gt(cursor))
            .order_by_asc(emr_outbox::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// Moves a subscription's cursor forward (never back) to an event that exists.
    pub async fn acknowledge(&self, name: &str, owner: &str, cursor: i64) -> Result<i64> {
        let subscription = self
            .find_subscription(name, owner)
            .await?
            .ok_or_else(|| Error::NotFound(format!("feed subscription '{name}' does not exist")))?;
        let exists = emr_outbox::Entity::find()
            .filter(emr_outbox::Column::Destination.eq(subscription.destination.as_str()))
            .filter(emr_outbox::Column::Id.eq(cursor))
            .one(&self.db)
            .await?
            .is_some();
        if !exists {
            return Err(Violations::single(
                "cursor",
                format!(
                    "cursor {cursor} is not an event of this subscription's feed; acknowledge a cursor you received"
                ),
            )
            .into());
        }
        feed_subscription::Entity::update_many()
            .col_expr(feed_subscription::Column::Cursor, Expr::value(cursor))
            .col_expr(feed_subscription::Column::UpdatedAt, Expr::value(now()))
            .filter(feed_subscription::Column::Owner.eq(owner))
            .filter(feed_subscription::Column::Name.eq(name))
            .filter(feed_subscription::Column::Cursor.lt(cursor))
            .exec(&self.db)
            .await?;
        Ok(self.find_subscription(name, owner).await?.map_or(cursor, |s| s.cursor))
    }
}

/// A chart entry from stored rows. `status` overrides the observation's current status (an outbox row carries
/// the status of its own event).
fn chart_entry(
    observation: &observation::Model,
    patients: &HashMap<Uuid, patient::Model>,
    devices: &HashMap<Uuid, device::Model>,
    status: Option<ChartStatus>,
) -> Result<ChartEntry> {
    let patient = patients
        .get(&observation.patient_id)
        .ok_or_else(|| Error::Internal(format!("observation {} has no patient", observation.id)))?;
    let device = devices
        .get(&observation.device_id)
        .ok_or_else(|| Error::Internal(format!("observation {} has no device", observation.id)))?;
    let status = status
        .or_else(|| ChartStatus::parse(&observation.status))
        .unwrap_or(ChartStatus::Preliminary);
    Ok(ChartEntry {
        id: observation.id,
        patient: PatientRef {
            identifier: patient.identifier.clone(),
            authority: patient.authority.clone(),
            display_name: patient.display_name.clone(),
        },
        device: DeviceRef {
            id: device.id,
            serial_number: device.serial_number.clone(),
            manufacturer: device.manufacturer.clone(),
            model: device.model.clone(),
            eui64: device.eui64.clone(),
        },
        point_of_care: match (&observation.site, &observation.ward) {
            (Some(site), Some(ward)) => Some(PointOfCare {
                site: site.clone(),
                ward: ward.clone(),
                bed: observation.bed.clone(),
            }),
            _ => None,
        },
        measurement: decode_measurement(observation)?,
        observed_at: observation.observed_at,
        status,
        questionable: observation.questionable,
        validated_by: if status == ChartStatus::Final {
            observation.validated_by.clone()
        } else {
            None
        },
        alarm_limits: crate::clinical::decode_limits(observation.alarm_limits.as_deref()),
    })
}

/// One charting window: patient, device, measurement kind, window index.
type WindowKey = (Uuid, Uuid, String, i64);

/// Why a delivery failed, and whether sending the same thing again could help.
#[derive(Debug)]
struct Failure {
    reason: String,
    permanent: bool,
}

impl Failure {
    fn retry(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            permanent: false,
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type ClientIdentity = (
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
);

pub(crate) fn client_identity(certs: &str, key: &str) -> std::result::Result<ClientIdentity, String> {
    use rustls_pki_types::pem::PemObject as _;
    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(certs.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if chain.is_empty() {
        return Err("no certificate".into());
    }
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| e.to_string())?;
    Ok((chain, key))
}

/// TCP, then TLS if the destination has a CA (FHIR over https always has one), with medfleet's client
/// certificate when the destination has one.
async fn connect(host: &str, port: u16, settings: &Settings, tls: bool) -> Result<Box<dyn Io>, Failure> {
    let ca_pem = settings.ca_pem.as_deref();
    let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| Failure::retry(format!("connecting to {host}:{port} timed out")))?
        .map_err(|e| Failure::retry(format!("cannot connect to {host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    if !tls {
        return Ok(Box::new(tcp));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(ca_pem.unwrap_or_default().as_bytes()) {
        let cert: rustls_pki_types::CertificateDer<'_> =
            cert.map_err(|e| Failure::retry(format!("the destination's CA PEM is unreadable: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Failure::retry(format!("the destination's CA certificate is unusable: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Failure {
            reason: "TLS needs the receiver's CA: set ca_pem on the destination".into(),
            permanent: true,
        });
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match (&settings.client_certificate_pem, &settings.client_key_pem) {
        (Some(certs), Some(key)) => {
            let (chain, key) = client_identity(certs, key).map_err(|e| Failure {
                reason: format!("the destination's client certificate is unusable: {e}"),
                permanent: true,
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| Failure {
                reason: format!("the destination's client certificate does not match its key: {e}"),
                permanent: true,
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| Failure::retry(format!("'{host}' is not a valid TLS server name: {e}")))?;
    let stream = tokio::time::timeout(
        IO_TIMEOUT,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| Failure::retry(format!("TLS handshake with {host}:{port} timed out")))?
    .map_err(|e| Failure::retry(format!("TLS handshake with {host}:{port} failed: {e}")))?;
    Ok(Box::new(stream))
}

/// POSTs a transaction Bundle to the FHIR base URL.
async fn post_bundle(settings: &Settings, bundle: &serde_json::Value) -> Result<(), Failure> {
    let uri: http::Uri = settings
        .endpoint
        .parse()
        .map_err(|e| Failure::retry(format!("the FHIR endpoint is not a URL: {e}")))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let io = connect(&host, port, settings, https).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| Failure::retry(format!("HTTP handshake with the FHIR server failed: {e}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let body = serde_json::to_vec(bundle).unwrap_or_default();
    let mut request = http::Request::post(uri.path_and_query().map_or("/", http::uri::PathAndQuery::as_str))
        .header(
            http::header::HOST,
            uri.authority().map_or(host.clone(), ToString::to_string),
        )
        .header(http::header::CONTENT_TYPE, "application/fhir+json")
        .header(http::header::ACCEPT, "application/fhir+json");
    if let Some(token) = &settings.bearer_token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Failure::retry(format!("cannot build the FHIR request: {e}")))?;
    let response = tokio::time::timeout(IO_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| Failure::retry("the FHIR server did not answer in time"))?
        .map_err(|e| Failure::retry(format!("the FHIR request failed: {e}")))?;
    let status = response.status();
    // Only the status and an OperationOutcome's codes are used: a receiver cannot make medfleetd buffer more.
    let body = tokio::time::timeout(
        IO_TIMEOUT,
        http_body_util::Limited::new(response.into_body(), MAX_REPLY).collect(),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .map(http_body_util::Collected::to_bytes)
    .unwrap_or_default();
    if status.is_success() {
        return Ok(());
    }
    let excerpt = operation_outcome_codes(&body);
    // 4xx other than timeouts, conflicts under load and rate limits will fail the same way again.
    let permanent = status.is_client_error()
        && !matches!(status.as_u16(), 408 | 409 | 425 | 429)
        && status != http::StatusCode::UNAUTHORIZED;
    Err(Failure {
        reason: format!("FHIR server answered HTTP {}{excerpt}", status.as_u16()),
        permanent,
    })
}

/// The structured part of a FHIR OperationOutcome: each issue's severity, code and expression (element paths).
/// Its free text (`diagnostics`, `details.text`) is left out: servers echo patient identifiers in it.
fn operation_outcome_codes(body: &[u8]) -> String {
    let Ok(outcome) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    let issues: Vec<String> = outcome["issue"]
        .as_array()
        .map(|issues| {
            issues
                .iter()
                .take(5)
                .map(|issue| {
                    let expression = issue["expression"]
                        .as_array()
                        .map(|e| e.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
                        .unwrap_or_default();
                    format!(
                        "{} {} {}",
                        issue["severity"].as_str().unwrap_or_default(),
                        issue["code"].as_str().unwrap_or_default(),
                        expression
                    )
                    .trim()
                    .chars()
                    .take(ERROR_EXCERPT)
                    .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    if issues.is_empty() {
        String::new()
    } else {
        format!(": {}", issues.join("; "))
    }
}

/// Sends one ORU^R01 and waits for its ACK, over a connection kept open across messages.
async fn send_mllp(
    connection: &mut Option<Box<dyn Io>>,
    settings: &Settings,
    entry: &ChartEntry,
    outbox_id: i64,
) -> Result<(), Failure> {
    let control_id = format!("MF{outbox_id}");
    let endpoints = hl7::Endpoints {
        sending_application: "MEDFLEET".into(),
        sending_facility: entry.point_of_care.as_ref().map(|p| p.site.clone()).unwrap_or_default(),
        receiving_application: settings.receiving_application.clone(),
        receiving_facility: settings.receiving_facility.clone(),
    };
    let message = hl7::oru_r01(entry, &endpoints, &control_id, now());
    if connection.is_none() {
        let (host, port) =
            split_host_port(&settings.endpoint).ok_or_else(|| Failure::retry("the MLLP endpoint is not HOST:PORT"))?;
        *connection = Some(connect(&host, port, settings, settings.ca_pem.is_some()).await?);
    }
    let Some(io) = connection.as_mut() else {
        return Err(Failure::retry("no MLLP connection"));
    };
    let exchange = async {
        io.write_all(&hl7::mllp_frame(&message)).await?;
        io.flush().await?;
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((reply, _)) = hl7::mllp_deframe(&buffer) {
                return Ok::<_, std::io::Error>(Some(reply));
            }
            let read = io.read(&mut chunk).await?;
            if read == 0 {
                return Ok(None);
            }
            if buffer.len() + read > MAX_REPLY {
                return Err(std::io::Error::other(format!(
                    "the receiver sent more than {MAX_REPLY} bytes without a complete ACK"
                )));
            }
            buffer.extend_from_slice(&chunk[..read]);
        }
    };
    let reply = tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .map_err(|_| Failure::retry("no ACK from the HL7 receiver in time; the message is sent again"))?
        .map_err(|e| Failure::retry(format!("MLLP connection failed: {e}")))?
        .ok_or_else(|| Failure::retry("the HL7 receiver closed the connection without an ACK"))?;
    let ack = hl7::parse_ack(&reply).map_err(|e| Failure::retry(format!("unreadable ACK: {e}")))?;
    if ack.control_id != control_id {
        return Err(Failure::retry(format!(
            "the ACK acknowledges {} instead of {control_id}",
            ack.control_id
        )));
    }
    // Only the ERR-3 error code goes into the reason; the ACK's text may echo patient data.
    let code = if ack.error_code.is_empty() {
        String::new()
    } else {
        format!(" (error code {})", ack.error_code)
    };
    match ack.code {
        hl7::AckCode::Accept => Ok(()),
        hl7::AckCode::Error => Err(Failure::retry(format!("the receiver answered AE{code}"))),
        hl7::AckCode::Reject => Err(Failure {
            reason: format!("the receiver answered AR{code}"),
            permanent: true,
        }),
    }
}

/// For the feed: the observation ids of outbox rows, to render them with [`Emr::entries`].
pub fn event_id(row: &emr_outbox::Model) -> String {
    format!("{}:{}", row.observation_id, row.status)
}
