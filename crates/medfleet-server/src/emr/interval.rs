//! Interval charting: a destination with an interval receives one chart entry per vital and window (the median
//! of the window's readings) instead of every reading, as flowsheets expect.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use medfleet_core::clinical::chart::ChartStatus;
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, EntityTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
};
use uuid::Uuid;

use crate::clinical::decode_measurement;
use crate::error::Result;
use crate::persistence::db::now;
use crate::persistence::entity::{emr_destination, emr_outbox, observation};
use crate::persistence::events::Event;

use super::Emr;

impl Emr {
    /// Charts the median of every closed window of a destination with a charting interval. A window closes one
    /// interval after it ends (grace for readings still in devices' buffers); the destination row is locked for
    /// the run, so replicas never chart a window twice.
    pub(super) async fn chart_interval(&self, name: &str) -> Result<()> {
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
}

/// One charting window: patient, device, measurement kind, window index.
type WindowKey = (Uuid, Uuid, String, i64);
