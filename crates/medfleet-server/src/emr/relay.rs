//! The outbox relays: one per destination, leased through the database so exactly one replica sends to it;
//! each round claims undelivered rows in outbox order, sends them ([`super::fhir`], [`super::mllp`]) and
//! settles each as delivered, retried with backoff, or dead-lettered. The connection (TLS, client identity)
//! both kinds share is made here.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use medfleet_core::clinical::chart::{ChartEntry, ChartStatus, DeviceRef, PatientRef, PointOfCare};
use medfleet_core::clinical::fhir;
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clinical::{DestinationKind, decode_measurement, state};
use crate::emr::destinations::{Settings, open_settings, send_refusal};
use crate::error::{Error, Result};
use crate::persistence::db::now;
use crate::persistence::entity::{device, emr_destination, emr_outbox, observation, patient};
use crate::persistence::events::Event;

use super::connection::{Failure, Io};
use super::fhir::post_bundle;
use super::mllp::send_mllp;
use super::{EXCHANGE_TIMEOUT, Emr, FHIR_BATCH, LEASE, MAX_BACKOFF, MLLP_BATCH, RELAY_TICK};

impl Emr {
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
}

/// A chart entry from stored rows. `status` overrides the observation's current status (an outbox row carries
/// the status of its own event).
pub(crate) fn chart_entry(
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
