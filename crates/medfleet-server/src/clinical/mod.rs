//! The chart: patients, device–patient associations, ingest of reading batches, canonical observations and the
//! EMR outbox. Every path that creates chart entries (ingest, a retroactive association, a status change) goes
//! through [`chart`] and [`enqueue`], so the invariants live in one place:
//!
//! - a reading is charted to the patient whose association covers its observation time, and only once (its
//!   `observation_id` is set in the transaction that creates the observation, under the device's row lock);
//! - every chart event gets one outbox row per destination that covers it, in the same transaction;
//! - outbox ids are assigned in commit order (inserts hold the outbox lock until commit), so a feed cursor never
//!   skips an event that commits late.
//!
//! Patient identifiers never reach a log line or an error message from here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use medfleet_core::clinical::alarm::{AlarmLimitProblem, AlarmLimits};
use medfleet_core::clinical::association::{Period, check_patient_identifier};
use medfleet_core::clinical::chart::{ChartStatus, Measurement, group_measurements};
use medfleet_core::clinical::codes::Vital;
use medfleet_core::clinical::reading::{Reading, ReadingInput, validate};
use medfleet_core::validation::{Violations, printable};
use sea_orm::sea_query::{Expr, ExprTrait as _, OnConflict};
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait as _, ConnectionTrait, DatabaseConnection, DbBackend,
    EntityTrait as _, IntoActiveModel as _, PaginatorTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::audit::{Context, device_scope};
use crate::authz::visibility::Visibility;
use crate::error::{Error, Result};
use crate::persistence::db::now;
use crate::persistence::db::{begin_write, insert_all};
use crate::persistence::entity::{
    association, device, device_placement, emr_destination, emr_outbox, observation, patient, reading, reading_batch,
};
use crate::persistence::events::{Event, Events};
use crate::registry::store::lock_device;

mod backlog;
pub mod grpc;

/// Arbitrary but fixed key of the advisory lock that orders outbox inserts by commit on PostgreSQL.
const OUTBOX_LOCK_KEY: i64 = 0x6d65_6466_6c74_0005;

/// A patient as a request names them (validated).
#[derive(Clone, PartialEq, Eq)]
pub struct PatientKey {
    pub identifier: String,
    pub authority: String,
    pub display_name: Option<String>,
}

impl std::fmt::Debug for PatientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PatientKey(<redacted>)")
    }
}

impl PatientKey {
    pub fn parse(field: &str, identifier: &str, authority: &str, display_name: &str) -> Result<Self> {
        check_patient_identifier(identifier, authority).map_err(|reason| Violations::single(field, reason))?;
        if display_name.chars().count() > 200 || display_name.chars().any(char::is_control) {
            return Err(Violations::single(
                format!("{field}.display_name"),
                "the display name must be at most 200 characters without control characters",
            )
            .into());
        }
        Ok(Self {
            identifier: identifier.trim().to_owned(),
            authority: authority.to_owned(),
            display_name: (!display_name.is_empty()).then(|| display_name.to_owned()),
        })
    }
}

/// Where an association came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Clinician,
    /// An ADT event. `from_emr`: sent by an integration (service identity), whose patient names are
    /// authoritative; an ADT event a person sends (testing a feed from the CLI) only fills in missing names.
    Adt {
        from_emr: bool,
    },
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Clinician => "clinician",
            Source::Adt { .. } => "adt",
        }
    }
}

/// An association with its patient, as the API returns it.
#[derive(Debug, Clone)]
pub struct AssociationView {
    pub association: association::Model,
    pub patient: patient::Model,
    pub charted_retroactively: u64,
    /// Stored readings of its period left to the background charting when it was made.
    pub charting_backlog: u64,
}

/// The kinds of EMR destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationKind {
    Feed,
    Fhir,
    Mllp,
}

impl DestinationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationKind::Feed => "feed",
            DestinationKind::Fhir => "fhir",
            DestinationKind::Mllp => "mllp",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "feed" => DestinationKind::Feed,
            "fhir" => DestinationKind::Fhir,
            "mllp" => DestinationKind::Mllp,
            _ => return None,
        })
    }
}

/// Delivery states of an outbox row.
pub mod state {
    /// Waiting for (another) delivery attempt by the destination's relay.
    pub const PENDING: &str = "pending";
    pub const DELIVERED: &str = "delivered";
    /// Gave up: visible to admins, retried only on request.
    pub const DEAD: &str = "dead";
    /// Served by the feed to subscribers (each subscription keeps its own cursor).
    pub const FEED: &str = "feed";
    /// Never sent: a newer status of the same entry was queued for the destination first.
    pub const SUPERSEDED: &str = "superseded";
}

/// The routing part of a destination, enough to decide which chart events it receives.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub kind: DestinationKind,
    pub sites: BTreeSet<String>,
    pub wards: BTreeSet<String>,
    /// 0: every chart entry. Otherwise only threshold breaches are queued at once; the interval job queues the
    /// median of each window.
    pub interval_secs: i64,
}

impl Route {
    pub(crate) fn from_model(model: &emr_destination::Model) -> Result<Self> {
        let kind = DestinationKind::parse(&model.kind)
            .ok_or_else(|| Error::Internal(format!("destination '{}' has unknown kind", model.name)))?;
        let parse = |text: &str| -> Result<BTreeSet<String>> {
            serde_json::from_str(text)
                .map_err(|e| Error::Internal(format!("destination '{}' filter is corrupt: {e}", model.name)))
        };
        Ok(Self {
            name: model.name.clone(),
            kind,
            sites: parse(&model.sites)?,
            wards: parse(&model.wards)?,
            interval_secs: model.interval_secs,
        })
    }

    /// Whether chart entries from this place go to the destination (no filter: everywhere).
    pub fn covers(&self, site: Option<&str>, ward: Option<&str>) -> bool {
        if self.sites.is_empty() && self.wards.is_empty() {
            return true;
        }
        let site_match = site.is_some_and(|s| self.sites.contains(s));
        let ward_match = matches!((site, ward), (Some(s), Some(w)) if self.wards.contains(&format!("{s}/{w}")));
        site_match || ward_match
    }
}

/// The stored form of an observation's components: `[[refid, value], …]`.
#[derive(Debug, Serialize, Deserialize)]
struct Component(String, f64);

pub fn encode_components(measurement: &Measurement) -> String {
    let components: Vec<Component> = measurement
        .values()
        .into_iter()
        .map(|(vital, value)| Component(vital.info().mdc_refid.to_owned(), value))
        .collect();
    serde_json::to_string(&components).unwrap_or_else(|_| "[]".to_owned())
}

/// Reads an observation's stored components back into a measurement.
pub fn decode_measurement(model: &observation::Model) -> Result<Measurement> {
    let components: Vec<Component> = serde_json::from_str(&model.components)
        .map_err(|e| Error::Internal(format!("observation {} components are corrupt: {e}", model.id)))?;
    let mut values = Vec::with_capacity(components.len());
    for Component(refid, value) in components {
        let vital = vital_from_refid(&refid)
            .ok_or_else(|| Error::Internal(format!("observation {} has unknown code {refid}", model.id)))?;
        values.push((vital, value));
    }
    Ok(match values.as_slice() {
        [(vital, value)] if !vital.is_blood_pressure() => Measurement::Single {
            vital: *vital,
            value: *value,
        },
        _ => Measurement::BloodPressure { components: values },
    })
}

fn vital_from_refid(refid: &str) -> Option<Vital> {
    Vital::ALL.into_iter().find(|vital| vital.info().mdc_refid == refid)
}

/// Loads the routes of every enabled destination.
pub async fn routes(conn: &impl ConnectionTrait) -> Result<Vec<Route>> {
    emr_destination::Entity::find()
        .filter(emr_destination::Column::Enabled.eq(true))
        .all(conn)
        .await?
        .iter()
        .map(Route::from_model)
        .collect()
}

/// A chart event waiting to be queued: observation, the status it carries, and the place it was charted.
pub(crate) struct Pending {
    pub(crate) observation: Uuid,
    pub(crate) status: ChartStatus,
    pub(crate) site: Option<String>,
    pub(crate) ward: Option<String>,
    /// A value outside the alarm limits: charted at once even where a charting interval applies.
    pub(crate) breach: bool,
    /// A new status of an entry queued before: older undelivered rows of the same (destination, entry) are
    /// superseded, so a retried `final` can never overwrite a later `entered-in-error` at the receiver.
    pub(crate) status_change: bool,
}

/// Queues chart events for every route that covers them, holding the outbox lock until the caller commits.
/// `only` names the routes to use regardless of their filters and intervals (status changes go where the entry
/// went before).
pub(crate) async fn enqueue(
    txn: &impl ConnectionTrait,
    events: &Events,
    routes: &[Route],
    pending: &[Pending],
    only: Option<&BTreeSet<String>>,
) -> Result<u64> {
    let at = now();
    let mut rows = Vec::new();
    for event in pending {
        for route in routes {
            let wanted = match only {
                Some(only) => only.contains(&route.name),
                None => {
                    route.covers(event.site.as_deref(), event.ward.as_deref())
                        && (route.interval_secs == 0 || event.breach)
                }
            };
            if !wanted {
                continue;
            }
            rows.push(emr_outbox::ActiveModel {
                destination: Set(route.name.clone()),
                observation_id: Set(event.observation),
                status: Set(event.status.as_str().to_owned()),
                state: Set(if route.kind == DestinationKind::Feed {
                    state::FEED
                } else {
                    state::PENDING
                }
                .to_owned()),
                attempts: Set(0),
                next_attempt_at: Set(at),
                last_error: Set(None),
                created_at: Set(at),
                delivered_at: Set(None),
                ..Default::default()
            });
        }
    }
    if rows.is_empty() {
        return Ok(0);
    }
    supersede(txn, pending, &rows).await?;
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({OUTBOX_LOCK_KEY})"))
            .await?;
    }
    let count = rows.len() as u64;
    insert_all::<emr_outbox::Entity>(txn, rows).await?;
    events.announce(txn, &Event::Outbox).await?;
    Ok(count)
}

/// Deliveries of one entry to one destination reach it in the order they were queued: before a status change is
/// queued, the entry's undelivered rows for the same destinations stop being sent (the newest row carries the
/// entry's whole current state: a FHIR conditional update, an ORU with the current OBX-11). The relay also never
/// sends a row while an older one of the same entry is pending (see `emr::Emr::round`), which covers a row that
/// is in flight while this runs.
async fn supersede(txn: &impl ConnectionTrait, pending: &[Pending], rows: &[emr_outbox::ActiveModel]) -> Result<()> {
    for event in pending.iter().filter(|e| e.status_change) {
        let destinations: BTreeSet<String> = rows
            .iter()
            .filter(|r| r.observation_id.as_ref() == &event.observation)
            .filter(|r| r.state.as_ref() != state::FEED)
            .map(|r| r.destination.as_ref().clone())
            .collect();
        if destinations.is_empty() {
            continue;
        }
        emr_outbox::Entity::update_many()
            .col_expr(emr_outbox::Column::State, Expr::value(state::SUPERSEDED))
            .col_expr(
                emr_outbox::Column::LastError,
                Expr::value(Some(format!(
                    "superseded: the entry became {} before this was delivered",
                    event.status.as_str()
                ))),
            )
            .filter(emr_outbox::Column::ObservationId.eq(event.observation))
            .filter(emr_outbox::Column::Destination.is_in(destinations))
            .filter(emr_outbox::Column::State.is_in([state::PENDING, state::DEAD]))
            .exec(txn)
            .await?;
    }
    Ok(())
}

/// New observation rows, their chart events, and per observation the indexes of the readings it holds.
type Charted = (Vec<observation::ActiveModel>, Vec<Pending>, Vec<(Uuid, Vec<usize>)>);

/// Creates the chart entries for readings of one device covered by one association. Returns, per measurement,
/// the new observation id and the indexes (into `readings`) of the readings it holds.
/// The device's earliest association that is not open yet at `at` (it starts then or later).
async fn planned_after(
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

/// The applied limits of a measurement's vitals, stored with the entry (the shape of the `alarm` configuration).
fn encode_limits(limits: &AlarmLimits, measurement: &Measurement) -> String {
    let mut map = serde_json::Map::new();
    for (vital, _) in measurement.values() {
        let (low, high) = limits.get(vital);
        map.insert(
            vital.config_name().to_owned(),
            serde_json::json!({"low": low, "high": high}),
        );
    }
    serde_json::Value::Object(map).to_string()
}

/// The limits stored with an entry; the adult defaults for entries charted before limits were stored.
pub(crate) fn decode_limits(stored: Option<&str>) -> AlarmLimits {
    stored
        .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        .map_or_else(AlarmLimits::default, |value| {
            AlarmLimits::from_config(&serde_json::json!({ medfleet_core::clinical::alarm::CONFIG_KEY: value })).0
        })
}

/// Where a device stood, as a chart entry records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Place {
    pub(crate) site: Option<String>,
    pub(crate) ward: Option<String>,
    pub(crate) bed: Option<String>,
}

/// Where a device stood over a span of observation times: its current place since `placed_at`, and the earlier
/// places that span reaches back into.
pub(crate) struct Placements {
    current: Place,
    since: DateTime<Utc>,
    /// Closed periods, oldest first.
    earlier: Vec<device_placement::Model>,
}

impl Placements {
    /// The places of `device` from `from` on; history is read only when `from` precedes its current placement
    /// (a buffered upload after a move), so live ingest pays nothing for it.
    pub(crate) async fn load(conn: &impl ConnectionTrait, device: &device::Model, from: DateTime<Utc>) -> Result<Self> {
        let since = device.placed_at.unwrap_or(device.created_at);
        let earlier = if from < since {
            device_placement::Entity::find()
                .filter(device_placement::Column::DeviceId.eq(device.id))
                .filter(device_placement::Column::EndsAt.gt(from))
                .order_by_asc(device_placement::Column::StartsAt)
                .all(conn)
                .await?
        } else {
            Vec::new()
        };
        Ok(Self {
            current: Place {
                site: device.site.clone(),
                ward: device.ward.clone(),
                bed: device.bed.clone(),
            },
            since,
            earlier,
        })
    }

    /// The place at `at`. Before the first recorded place (a clock set wrong before registration) the first
    /// place is the best answer there is.
    pub(crate) fn at(&self, at: DateTime<Utc>) -> Place {
        if at >= self.since {
            return self.current.clone();
        }
        let period = self
            .earlier
            .iter()
            .find(|p| p.starts_at <= at && at < p.ends_at)
            .or_else(|| self.earlier.first().filter(|first| at < first.starts_at));
        period.map_or_else(
            || self.current.clone(),
            |p| Place {
                site: p.site.clone(),
                ward: p.ward.clone(),
                bed: p.bed.clone(),
            },
        )
    }
}

fn chart(
    device: &device::Model,
    placements: &Placements,
    association: &association::Model,
    readings: &[Reading],
    limits: &AlarmLimits,
) -> Charted {
    let at = now();
    let mut rows = Vec::new();
    let mut pending = Vec::new();
    let mut members = Vec::new();
    for (measurement, observed_at, questionable, indexes) in group_measurements(readings) {
        let id = Uuid::new_v4();
        // Where the device stood when it measured: PV1-3, the FHIR location, routing and visibility follow it.
        let place = placements.at(observed_at);
        rows.push(observation::ActiveModel {
            id: Set(id),
            patient_id: Set(association.patient_id),
            device_id: Set(device.id),
            association_id: Set(association.id),
            kind: Set(measurement.kind().to_owned()),
            components: Set(encode_components(&measurement)),
            observed_at: Set(observed_at),
            questionable: Set(questionable),
            status: Set(ChartStatus::Preliminary.as_str().to_owned()),
            validated_by: Set(None),
            validated_at: Set(None),
            site: Set(place.site.clone()),
            ward: Set(place.ward.clone()),
            bed: Set(place.bed),
            created_at: Set(at),
            updated_at: Set(at),
            alarm_limits: Set(Some(encode_limits(limits, &measurement))),
        });
        let breach = measurement
            .values()
            .iter()
            .any(|(vital, value)| limits.breaches(*vital, *value));
        pending.push(Pending {
            observation: id,
            status: ChartStatus::Preliminary,
            site: place.site,
            ward: place.ward,
            breach,
            status_change: false,
        });
        members.push((id, indexes));
    }
    (rows, pending, members)
}

async fn insert_observations(txn: &impl ConnectionTrait, rows: Vec<observation::ActiveModel>) -> Result<()> {
    Ok(insert_all::<observation::Entity>(txn, rows).await?)
}

/// Associations of a device that overlap `[from, to]`.
async fn associations_between(
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

fn period_of(model: &association::Model) -> Period {
    Period {
        start: model.starts_at,
        end: model.ends_at,
    }
}

/// One batch from a device, validated and waiting for its group commit.
#[derive(Debug)]
pub struct Batch {
    pub device: Uuid,
    pub sequence: u64,
    pub items: Vec<ReadingInput>,
}

/// What a batch's ack says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub accepted: u32,
    pub rejected: Vec<Rejected>,
    #[serde(skip)]
    pub duplicate: bool,
    /// Chart entries created (not part of the stored ack).
    #[serde(skip)]
    pub charted: u32,
    /// When the sequence was used before for other readings: the first sequence the device may use.
    #[serde(skip)]
    pub next_sequence: Option<u64>,
}

/// SHA-256 over a batch's items in a fixed layout, to tell a resend from a reused sequence number.
fn batch_digest(items: &[ReadingInput]) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for item in items {
        for part in [item.code.as_bytes(), item.unit.as_bytes()] {
            context.update(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
            context.update(part);
        }
        context.update(&item.value.to_bits().to_be_bytes());
        let at = item.observed_at.map_or(i64::MIN, |t| t.timestamp_micros());
        context.update(&at.to_be_bytes());
        context.update(&[
            u8::from(item.quality.invalid),
            u8::from(item.quality.questionable),
            u8::from(item.quality.test_data),
        ]);
    }
    medfleet_core::digest::hex(context.finish().as_ref())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejected {
    pub index: u32,
    pub code: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Clinical {
    db: DatabaseConnection,
    events: Arc<Events>,
    future_tolerance: chrono::Duration,
    alarms: AlarmCache,
    backlog_wake: Arc<tokio::sync::Notify>,
}

/// Each device's alarm limits, from its resolved configuration (`alarm.*`), kept until a configuration layer
/// changes or a device moves (the events' configuration generation moves, on any replica): resolving layers per
/// batch would cost the ingest path a query per device.
#[derive(Clone, Default)]
struct AlarmCache {
    inner: Arc<std::sync::Mutex<AlarmState>>,
}

#[derive(Default)]
struct AlarmState {
    generation: u64,
    layers: Option<Arc<medfleet_core::device_config::LayerSet>>,
    devices: HashMap<Uuid, AlarmLimits>,
}

impl std::fmt::Debug for AlarmCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlarmCache").finish_non_exhaustive()
    }
}

impl AlarmCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, AlarmState> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn limits_for(
        &self,
        conn: &impl ConnectionTrait,
        events: &Events,
        device: &device::Model,
    ) -> Result<AlarmLimits> {
        let generation = events.config_generation();
        let layers = {
            let mut cache = self.lock();
            if cache.generation != generation {
                *cache = AlarmState {
                    generation,
                    ..AlarmState::default()
                };
            }
            if let Some(limits) = cache.devices.get(&device.id) {
                return Ok(*limits);
            }
            cache.layers.clone()
        };
        let layers = if let Some(layers) = layers {
            layers
        } else {
            let loaded = Arc::new(crate::device_config::store::load_layers(conn).await?);
            let mut cache = self.lock();
            if cache.generation == generation {
                cache.layers = Some(Arc::clone(&loaded));
            }
            loaded
        };
        let desired = layers.desired(&crate::device_config::store::placement_of(device));
        let (limits, problems) = AlarmLimits::from_config(&desired.resolved.document);
        if !problems.is_empty() {
            let paths: Vec<&str> = problems.iter().map(AlarmLimitProblem::path).collect();
            tracing::warn!(device = %device.id, ?paths, "alarm limits in the device's configuration are invalid; the defaults apply for them");
        }
        let mut cache = self.lock();
        // Kept only if nothing changed while resolving (else the next batch resolves again).
        if cache.generation == generation {
            cache.devices.insert(device.id, limits);
        }
        Ok(limits)
    }
}

impl Clinical {
    pub fn new(db: DatabaseConnection, events: Arc<Events>, future_tolerance: std::time::Duration) -> Self {
        Self {
            db,
            events,
            future_tolerance: chrono::Duration::from_std(future_tolerance).unwrap_or(chrono::Duration::seconds(30)),
            alarms: AlarmCache::default(),
            backlog_wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Stores a group of batches (from any devices) in one transaction: dedup by (device, sequence), readings,
    /// chart entries for the associated ones, outbox rows. The outcomes are in the order of `batches`.
    pub async fn ingest(&self, batches: &[Batch]) -> Result<Vec<Outcome>> {
        let clock = now();
        let txn = begin_write(&self.db).await?;
        // Device rows are locked in id order, the order every multi-device writer uses, so groups never deadlock.
        let device_ids: BTreeSet<Uuid> = batches.iter().map(|b| b.device).collect();
        let mut devices = HashMap::new();
        for id in device_ids {
            devices.insert(id, lock_device(&txn, id).await?);
        }
        let routes = routes(&txn).await?;
        let mut outcomes = Vec::with_capacity(batches.len());
        let mut pending = Vec::new();
        for batch in batches {
            let device = devices
                .get(&batch.device)
                .ok_or_else(|| Error::Internal("device row vanished during ingest".into()))?;
            let mut accepted = Vec::new();
            let mut outcome = Outcome {
                accepted: 0,
                rejected: Vec::new(),
                duplicate: false,
                charted: 0,
                next_sequence: None,
            };
            for (index, item) in batch.items.iter().enumerate() {
                let index = u32::try_from(index).unwrap_or(u32::MAX);
                match validate(item, clock, self.future_tolerance) {
                    Ok(reading) => accepted.push((index, reading)),
                    Err(rejection) => outcome.rejected.push(Rejected {
                        index,
                        code: rejection.code().to_owned(),
                        reason: rejection.to_string(),
                    }),
                }
            }
            outcome.accepted = u32::try_from(accepted.len()).unwrap_or(u32::MAX);
            let sequence = i64::try_from(batch.sequence)
                .map_err(|_| Violations::single("sequence", "the sequence number is larger than 2^63 - 1"))?;
            let inserted = reading_batch::Entity::insert(reading_batch::ActiveModel {
                device_id: Set(batch.device),
                sequence: Set(sequence),
                received_at: Set(clock),
                accepted: Set(i32::try_from(outcome.accepted).unwrap_or(i32::MAX)),
                rejections: Set(serde_json::to_string(&outcome.rejected).unwrap_or_else(|_| "[]".into())),
                digest: Set(batch_digest(&batch.items)),
            })
            .on_conflict(
                OnConflict::columns([reading_batch::Column::DeviceId, reading_batch::Column::Sequence])
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
            if inserted == 0 {
                outcomes.push(self.stored_outcome(&txn, batch, sequence).await?);
                continue;
            }
            let readings: Vec<Reading> = accepted.iter().map(|(_, r)| *r).collect();
            let chart_of = self.chart_batch(&txn, device, &readings, &mut pending).await?;
            outcome.charted = u32::try_from(chart_of.iter().flatten().collect::<BTreeSet<_>>().len()).unwrap_or(0);
            let rows: Vec<reading::ActiveModel> = accepted
                .iter()
                .zip(chart_of)
                .map(|((index, reading), observation)| reading::ActiveModel {
                    device_id: Set(batch.device),
                    sequence: Set(sequence),
                    item_index: Set(i32::try_from(*index).unwrap_or(i32::MAX)),
                    code: Set(reading.vital.info().mdc_refid.to_owned()),
                    value: Set(reading.value),
                    observed_at: Set(reading.observed_at),
                    received_at: Set(clock),
                    questionable: Set(reading.questionable),
                    observation_id: Set(observation),
                    ..Default::default()
                })
                .collect();
            insert_all::<reading::Entity>(&txn, rows).await?;
            outcomes.push(outcome);
        }
        let queued = enqueue(&txn, &self.events, &routes, &pending, None).await?;
        txn.commit().await?;
        if queued > 0 {
            self.events.emit(Event::Outbox);
        }
        Ok(outcomes)
    }

    /// Charts the readings of one device that associations cover; returns each reading's observation, if any.
    async fn chart_batch(
        &self,
        txn: &impl ConnectionTrait,
        device: &device::Model,
        readings: &[Reading],
        pending: &mut Vec<Pending>,
    ) -> Result<Vec<Option<Uuid>>> {
        let mut chart_of = vec![None; readings.len()];
        let (Some(from), Some(to)) = (
            readings.iter().map(|r| r.observed_at).min(),
            readings.iter().map(|r| r.observed_at).max(),
        ) else {
            return Ok(chart_of);
        };
        let associations = associations_between(txn, device.id, from, to).await?;
        if associations.is_empty() {
            return Ok(chart_of);
        }
        let placements = Placements::load(txn, device, from).await?;
        for association in &associations {
            let period = period_of(association);
            // Periods never overlap; should stored data ever break that, a reading still charts only once.
            let covered: Vec<usize> = (0..readings.len())
                .filter(|i| chart_of[*i].is_none() && period.covers(readings[*i].observed_at))
                .collect();
            if covered.is_empty() {
                continue;
            }
            let subset: Vec<Reading> = covered.iter().map(|i| readings[*i]).collect();
            let limits = self.alarms.limits_for(txn, &self.events, device).await?;
            let (rows, events, members) = chart(device, &placements, association, &subset, &limits);
            insert_observations(txn, rows).await?;
            pending.extend(events);
            for (observation, indexes) in members {
                for index in indexes {
                    chart_of[covered[index]] = Some(observation);
                }
            }
        }
        Ok(chart_of)
    }

    /// The answer to a sequence that is already stored: the original outcome for a true resend; for different
    /// readings under a used sequence (a device whose buffer was reset), a refusal of every item with the first
    /// free sequence, so the device renumbers instead of losing them as "duplicates".
    async fn stored_outcome(&self, txn: &impl ConnectionTrait, batch: &Batch, sequence: i64) -> Result<Outcome> {
        let stored = reading_batch::Entity::find_by_id((batch.device, sequence))
            .one(txn)
            .await?
            .ok_or_else(|| Error::Internal("a conflicting reading batch vanished".into()))?;
        if stored.digest != batch_digest(&batch.items) {
            let highest: Option<i64> = reading_batch::Entity::find()
                .select_only()
                .column_as(reading_batch::Column::Sequence.max(), "highest")
                .filter(reading_batch::Column::DeviceId.eq(batch.device))
                .into_tuple()
                .one(txn)
                .await?
                .flatten();
            let next = u64::try_from(highest.unwrap_or(sequence))
                .unwrap_or(0)
                .saturating_add(1);
            tracing::warn!(device = %batch.device, sequence, next, "a device reused a sequence number for other readings");
            return Ok(Outcome {
                accepted: 0,
                rejected: (0..batch.items.len())
                    .map(|index| Rejected {
                        index: u32::try_from(index).unwrap_or(u32::MAX),
                        code: "sequence_reused".into(),
                        reason: format!(
                            "sequence {sequence} was already used for other readings; resend from sequence {next}"
                        ),
                    })
                    .collect(),
                duplicate: false,
                charted: 0,
                next_sequence: Some(next),
            });
        }
        let rejected: Vec<Rejected> = serde_json::from_str(&stored.rejections)
            .map_err(|e| Error::Internal(format!("stored rejections of a batch are corrupt: {e}")))?;
        Ok(Outcome {
            accepted: u32::try_from(stored.accepted).unwrap_or(0),
            rejected,
            duplicate: true,
            charted: 0,
            next_sequence: None,
        })
    }

    /// The patient a request names, created if new. The display name an EMR's ADT feed sends is authoritative and
    /// replaces the stored one; a clinician's request may only fill in a name that is missing (a typo on one ward
    /// must not rename the patient in every later PID-5 and subject.display). Every change is audited, without
    /// the name.
    async fn upsert_patient(
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

    async fn associate_locked(
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
    async fn nothing_open(
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
    async fn cancel_planned_locked(
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

    async fn end_locked(
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

    /// Sets the status of chart entries (validation or retraction) and queues the change for every destination
    /// that received the entry.
    pub async fn set_status(
        &self,
        ids: &[Uuid],
        status: ChartStatus,
        visible: impl Fn(Option<&str>, Option<&str>) -> bool,
        audit: &Context,
    ) -> Result<Vec<observation::Model>> {
        let txn = begin_write(&self.db).await?;
        let rows = observation::Entity::find()
            .filter(observation::Column::Id.is_in(ids.iter().copied()))
            .lock_exclusive()
            .all(&txn)
            .await?;
        for id in ids {
            let row = rows.iter().find(|r| r.id == *id);
            if row.is_none_or(|r| !visible(r.site.as_deref(), r.ward.as_deref())) {
                return Err(Error::NotFound(format!("observation {id} does not exist")));
            }
        }
        let routes = routes(&txn).await?;
        let mut updated = Vec::new();
        for row in rows {
            let current = ChartStatus::parse(&row.status);
            if current == Some(status) {
                updated.push(row);
                continue;
            }
            if current == Some(ChartStatus::EnteredInError) {
                return Err(Error::FailedPrecondition(format!(
                    "observation {} was marked entered-in-error; a retracted entry cannot change again",
                    row.id
                )));
            }
            let delivered_to: BTreeSet<String> = emr_outbox::Entity::find()
                .select_only()
                .column(emr_outbox::Column::Destination)
                .filter(emr_outbox::Column::ObservationId.eq(row.id))
                .distinct()
                .into_tuple::<String>()
                .all(&txn)
                .await?
                .into_iter()
                .collect();
            let at = now();
            let mut update: observation::ActiveModel = row.clone().into();
            update.status = Set(status.as_str().to_owned());
            update.updated_at = Set(at);
            if status == ChartStatus::Final {
                update.validated_by = Set(Some(audit.actor.clone()));
                update.validated_at = Set(Some(at));
            }
            let saved = observation::Entity::update(update).exec(&txn).await?;
            enqueue(
                &txn,
                &self.events,
                &routes,
                &[Pending {
                    observation: saved.id,
                    status,
                    site: saved.site.clone(),
                    ward: saved.ward.clone(),
                    breach: false,
                    status_change: true,
                }],
                Some(&delivered_to),
            )
            .await?;
            audit
                .record(
                    &txn,
                    "observation.status",
                    format!("observation/{}", saved.id),
                    device_scope(saved.site.as_deref(), saved.ward.as_deref()),
                    format!("{} → {}", row.status, status.as_str()),
                )
                .await?;
            updated.push(saved);
        }
        txn.commit().await?;
        self.events.emit(Event::Outbox);
        Ok(updated)
    }

    /// Chart entries of a patient or a device, newest first, after the keyset `after` (observed_at, id).
    pub async fn list_observations(
        &self,
        device: Option<Uuid>,
        patient: Option<Uuid>,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: u64,
    ) -> Result<Vec<observation::Model>> {
        let mut query = observation::Entity::find();
        if let Some(device) = device {
            query = query.filter(observation::Column::DeviceId.eq(device));
        }
        if let Some(patient) = patient {
            query = query.filter(observation::Column::PatientId.eq(patient));
        }
        if let Some((at, id)) = after {
            query = query.filter(
                observation::Column::ObservedAt
                    .lt(at)
                    .or(observation::Column::ObservedAt
                        .eq(at)
                        .and(observation::Column::Id.lt(id))),
            );
        }
        Ok(query
            .order_by_desc(observation::Column::ObservedAt)
            .order_by_desc(observation::Column::Id)
            .limit(limit)
            .all(&self.db)
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
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn place(ward: &str) -> Place {
        Place {
            site: Some("stmarys".into()),
            ward: Some(ward.into()),
            bed: None,
        }
    }

    fn period(ward: &str, from: i64, until: i64) -> device_placement::Model {
        device_placement::Model {
            id: Uuid::new_v4(),
            device_id: Uuid::nil(),
            site: Some("stmarys".into()),
            ward: Some(ward.into()),
            bed: None,
            starts_at: DateTime::from_timestamp(from, 0).unwrap_or_default(),
            ends_at: DateTime::from_timestamp(until, 0).unwrap_or_default(),
            ended_by: "test".into(),
        }
    }

    #[test]
    fn the_place_at_a_time_is_the_period_that_covers_it() {
        let t = |s: i64| DateTime::from_timestamp(s, 0).unwrap_or_default();
        let placements = Placements {
            current: place("ed"),
            since: t(300),
            earlier: vec![period("icu", 100, 200), period("or", 200, 300)],
        };
        assert_eq!(placements.at(t(150)), place("icu"));
        // Periods are half-open: the moment of a move belongs to the new place.
        assert_eq!(placements.at(t(200)), place("or"));
        assert_eq!(placements.at(t(300)), place("ed"));
        assert_eq!(placements.at(t(10_000)), place("ed"));
        // Before anything was recorded: the first place.
        assert_eq!(placements.at(t(5)), place("icu"));
        let never_moved = Placements {
            current: place("ed"),
            since: t(300),
            earlier: Vec::new(),
        };
        assert_eq!(never_moved.at(t(5)), place("ed"));
    }
}
