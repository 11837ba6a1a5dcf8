//! EMR delivery (the destinations themselves are [`crate::emr::destinations`]): the outbox relays that send chart events
//! to FHIR R4 servers (transaction Bundles with conditional create) and HL7 v2 receivers (ORU^R01 over MLLP, waiting
//! for the ACK), and the feed that EMR systems subscribe to over gRPC with a cursor stored here.
//!
//! Exactly one replica relays a destination at a time: it holds a lease on the destination's row, renewed before
//! every round and taken over by another replica only once it has expired. Receivers must still be idempotent
//! (a delivery whose answer was lost is sent again): FHIR entries carry a conditional create on the
//! observation's identifier, HL7 messages a control id (MSH-10) that stays the same on every resend.

mod connection;
pub mod destinations;
pub mod feed;
mod fhir;
pub mod grpc;
mod interval;
mod mllp;
mod relay;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medfleet_core::clinical::chart::{ChartEntry, ChartStatus};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait as _, DatabaseConnection, EntityTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
};
use tokio::io::{AsyncRead, AsyncWrite};
use uuid::Uuid;

use crate::audit::Context;
use crate::clinical::state;
use crate::error::{Error, Result};
use crate::identity::secrets::Secrets;
use crate::persistence::db::now;
use crate::persistence::entity::{device, emr_outbox, observation, patient};
use crate::persistence::events::{Event, Events};
use crate::telemetry::Metrics;
use connection::Io;
use relay::chart_entry;

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
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// For the feed: the observation ids of outbox rows, to render them with [`Emr::entries`].
pub fn event_id(row: &emr_outbox::Model) -> String {
    format!("{}:{}", row.observation_id, row.status)
}
