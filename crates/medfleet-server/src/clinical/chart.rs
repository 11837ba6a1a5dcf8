//! Charting: readings into chart entries. A batch is stored once (dedup by device and sequence, told apart from
//! a reused sequence by its digest), each reading is charted to the patient whose association covers its
//! observation time at the place the device stood then ([`Placements`]), with the alarm limits of the device's
//! configuration, and status changes by a clinician are queued for the destinations that received the entry.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use medfleet_core::clinical::alarm::{AlarmLimitProblem, AlarmLimits};
use medfleet_core::clinical::chart::{ChartStatus, Measurement, group_measurements};
use medfleet_core::clinical::codes::Vital;
use medfleet_core::clinical::reading::{Reading, ReadingInput, validate};
use medfleet_core::validation::Violations;
use sea_orm::sea_query::{ExprTrait as _, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, ConnectionTrait, EntityTrait as _, QueryFilter as _, QueryOrder as _,
    QuerySelect as _,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::audit::{Context, device_scope};
use crate::error::{Error, Result};
use crate::persistence::db::now;
use crate::persistence::db::{begin_write, insert_all};
use crate::persistence::entity::{
    association, device, device_placement, emr_outbox, observation, reading, reading_batch,
};
use crate::persistence::events::{Event, Events};
use crate::registry::store::lock_device;

use super::Clinical;
use super::associations::{associations_between, period_of};
use super::outbox::{Pending, enqueue, routes};

/// The stored form of an observation's components: `[[refid, value], …]`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Component(String, f64);

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

pub(super) fn vital_from_refid(refid: &str) -> Option<Vital> {
    Vital::ALL.into_iter().find(|vital| vital.info().mdc_refid == refid)
}

/// New observation rows, their chart events, and per observation the indexes of the readings it holds.
pub(super) type Charted = (Vec<observation::ActiveModel>, Vec<Pending>, Vec<(Uuid, Vec<usize>)>);

/// The applied limits of a measurement's vitals, stored with the entry (the shape of the `alarm` configuration).
pub(super) fn encode_limits(limits: &AlarmLimits, measurement: &Measurement) -> String {
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

pub(super) fn chart(
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

pub(super) async fn insert_observations(txn: &impl ConnectionTrait, rows: Vec<observation::ActiveModel>) -> Result<()> {
    Ok(insert_all::<observation::Entity>(txn, rows).await?)
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
pub(super) fn batch_digest(items: &[ReadingInput]) -> String {
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

/// Each device's alarm limits, from its resolved configuration (`alarm.*`), kept until a configuration layer
/// changes or a device moves (the events' configuration generation moves, on any replica): resolving layers per
/// batch would cost the ingest path a query per device.
#[derive(Clone, Default)]
pub(super) struct AlarmCache {
    inner: Arc<std::sync::Mutex<AlarmState>>,
}

#[derive(Default)]
pub(super) struct AlarmState {
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
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, AlarmState> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) async fn limits_for(
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
    pub(super) async fn chart_batch(
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
    pub(super) async fn stored_outcome(
        &self,
        txn: &impl ConnectionTrait,
        batch: &Batch,
        sequence: i64,
    ) -> Result<Outcome> {
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
