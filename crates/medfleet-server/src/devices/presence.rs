//! Device presence storage: which device holds a session on which replica, what it last reported, and when it
//! was last heard from. Rows are keyed by device; every update from a session is conditional on that session
//! still being the device's current one, so a replaced session cannot overwrite its successor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use medfleet_core::presence::{OperationalState, Presence, ReportedConfig};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, ConnectionTrait, DatabaseConnection, EntityTrait as _, QueryFilter as _,
    QuerySelect as _,
};
use uuid::Uuid;

use crate::error::Result;
use crate::persistence::db::begin_write;
use crate::persistence::db::now;
use crate::persistence::entity::device_presence;
use crate::persistence::events::{Event, Events};

/// What a device says when its session opens.
#[derive(Debug, Clone)]
pub struct Opening {
    pub device: Uuid,
    pub session: Uuid,
    pub replica: String,
    pub state: OperationalState,
    pub firmware_version: String,
    pub reported: ReportedConfig,
}

pub fn reported_of(row: device_presence::Model) -> ReportedConfig {
    ReportedConfig {
        version: u64::try_from(row.reported_version).unwrap_or_default(),
        digest: row.reported_digest,
        rejection: row.rejection,
    }
}

fn presence_of(row: device_presence::Model) -> Presence {
    Presence {
        online: row.online,
        last_seen: row.last_seen,
        connected_at: row.connected_at,
        disconnected_at: row.disconnected_at,
        replica: row.replica.clone(),
        // A state this build does not know reads as unknown rather than failing the listing.
        state: row.operational_state.parse().unwrap_or_default(),
        firmware_version: row.firmware_version.clone(),
        reported: reported_of(row),
    }
}

/// Writes one change and announces it (to other replicas on commit, then locally).
async fn announce_write<F, Fut>(
    db: &DatabaseConnection,
    events: &Events,
    extra: Option<Event>,
    device: Uuid,
    write: F,
) -> Result<bool>
where
    F: FnOnce(sea_orm::DatabaseTransaction) -> Fut,
    Fut: std::future::Future<Output = Result<(bool, sea_orm::DatabaseTransaction)>>,
{
    let txn = begin_write(db).await?;
    let (changed, txn) = write(txn).await?;
    if !changed {
        txn.rollback().await?;
        return Ok(false);
    }
    if let Some(extra) = &extra {
        events.announce(&txn, extra).await?;
    }
    events.announce(&txn, &Event::Presence { device }).await?;
    txn.commit().await?;
    if let Some(extra) = extra {
        events.emit(extra);
    }
    events.emit(Event::Presence { device });
    Ok(true)
}

/// Records a new session as the device's current one (replacing any other, wherever it is).
pub async fn open(db: &DatabaseConnection, events: &Events, opening: &Opening) -> Result<()> {
    let at = now();
    let row = device_presence::ActiveModel {
        device_id: Set(opening.device),
        online: Set(true),
        session_id: Set(opening.session),
        replica: Set(opening.replica.clone()),
        connected_at: Set(at),
        last_seen: Set(at),
        disconnected_at: Set(None),
        operational_state: Set(opening.state.as_str().to_owned()),
        firmware_version: Set(opening.firmware_version.clone()),
        reported_version: Set(i64::try_from(opening.reported.version).unwrap_or(i64::MAX)),
        reported_digest: Set(opening.reported.digest.clone()),
        rejection: Set(None),
    };
    let opened = Event::SessionOpened {
        device: opening.device,
        session: opening.session,
    };
    announce_write(db, events, Some(opened), opening.device, |txn| async move {
        device_presence::Entity::insert(row)
            .on_conflict(
                OnConflict::column(device_presence::Column::DeviceId)
                    .update_columns([
                        device_presence::Column::Online,
                        device_presence::Column::SessionId,
                        device_presence::Column::Replica,
                        device_presence::Column::ConnectedAt,
                        device_presence::Column::LastSeen,
                        device_presence::Column::DisconnectedAt,
                        device_presence::Column::OperationalState,
                        device_presence::Column::FirmwareVersion,
                        device_presence::Column::ReportedVersion,
                        device_presence::Column::ReportedDigest,
                        device_presence::Column::Rejection,
                    ])
                    .to_owned(),
            )
            .exec(&txn)
            .await?;
        Ok((true, txn))
    })
    .await
    .map(|_| ())
}

/// Applies `update` to the device's row if `session` is still its current session.
async fn update_current(
    db: &DatabaseConnection,
    events: &Events,
    device: Uuid,
    session: Uuid,
    update: sea_orm::UpdateMany<device_presence::Entity>,
) -> Result<bool> {
    announce_write(db, events, None, device, |txn| async move {
        let result = update
            .filter(device_presence::Column::DeviceId.eq(device))
            .filter(device_presence::Column::SessionId.eq(session))
            .exec(&txn)
            .await?;
        Ok((result.rows_affected > 0, txn))
    })
    .await
}

pub async fn set_state(
    db: &DatabaseConnection,
    events: &Events,
    device: Uuid,
    session: Uuid,
    state: OperationalState,
) -> Result<bool> {
    let update = device_presence::Entity::update_many()
        .col_expr(device_presence::Column::OperationalState, Expr::value(state.as_str()))
        .col_expr(device_presence::Column::LastSeen, Expr::value(now()));
    update_current(db, events, device, session, update).await
}

/// One device's answer to a pushed configuration, from its current session.
#[derive(Debug, Clone)]
pub struct Report {
    pub device: Uuid,
    pub session: Uuid,
    pub reported: ReportedConfig,
}

fn report_update(reported: &ReportedConfig, at: DateTime<Utc>) -> sea_orm::UpdateMany<device_presence::Entity> {
    let update = device_presence::Entity::update_many().col_expr(device_presence::Column::LastSeen, Expr::value(at));
    match &reported.rejection {
        Some(reason) => update.col_expr(
            device_presence::Column::Rejection,
            Expr::value(Some(format!("version {} rejected: {reason}", reported.version))),
        ),
        None => update
            .col_expr(
                device_presence::Column::ReportedVersion,
                Expr::value(i64::try_from(reported.version).unwrap_or(i64::MAX)),
            )
            .col_expr(
                device_presence::Column::ReportedDigest,
                Expr::value(reported.digest.clone()),
            )
            .col_expr(device_presence::Column::Rejection, Expr::value(Option::<String>::None)),
    }
}

/// Records what devices said about pushed configurations, many in one transaction (a push to a whole ward comes
/// back as a burst of reports). An applied document becomes what the device runs; a rejected one leaves that alone
/// and records the reason with the refused version, so drift shows both. Reports from sessions that are no longer
/// current are dropped.
pub async fn record_reports(db: &DatabaseConnection, events: &Events, reports: &[Report]) -> Result<usize> {
    if reports.is_empty() {
        return Ok(0);
    }
    let at = now();
    let txn = begin_write(db).await?;
    let mut recorded = Vec::with_capacity(reports.len());
    for report in reports {
        let result = report_update(&report.reported, at)
            .filter(device_presence::Column::DeviceId.eq(report.device))
            .filter(device_presence::Column::SessionId.eq(report.session))
            .exec(&txn)
            .await?;
        if result.rows_affected > 0 {
            events
                .announce(&txn, &Event::Presence { device: report.device })
                .await?;
            recorded.push(report.device);
        }
    }
    txn.commit().await?;
    let count = recorded.len();
    for device in recorded {
        events.emit(Event::Presence { device });
    }
    Ok(count)
}

/// Marks the device offline if `session` is still its current session.
pub async fn close(db: &DatabaseConnection, events: &Events, device: Uuid, session: Uuid) -> Result<bool> {
    let at = now();
    let update = device_presence::Entity::update_many()
        .col_expr(device_presence::Column::Online, Expr::value(false))
        .col_expr(device_presence::Column::DisconnectedAt, Expr::value(Some(at)))
        .filter(device_presence::Column::Online.eq(true));
    update_current(db, events, device, session, update).await
}

/// Refreshes `last_seen` of the sessions heard from since the last call (batched: heartbeats are frequent).
pub async fn touch(db: &impl ConnectionTrait, sessions: &[Uuid]) -> Result<()> {
    let at = now();
    for chunk in sessions.chunks(500) {
        device_presence::Entity::update_many()
            .col_expr(device_presence::Column::LastSeen, Expr::value(at))
            .filter(device_presence::Column::SessionId.is_in(chunk.iter().copied()))
            .filter(device_presence::Column::Online.eq(true))
            .exec(db)
            .await?;
    }
    Ok(())
}

/// Marks offline every device not heard from for `timeout` (its replica died or lost it without noticing).
pub async fn sweep(db: &DatabaseConnection, events: &Arc<Events>, timeout: Duration) -> Result<Vec<Uuid>> {
    let cutoff: DateTime<Utc> =
        now() - chrono::Duration::from_std(timeout).unwrap_or_else(|_| chrono::Duration::days(1));
    let stale: Vec<(Uuid, Uuid)> = device_presence::Entity::find()
        .select_only()
        .column(device_presence::Column::DeviceId)
        .column(device_presence::Column::SessionId)
        .filter(device_presence::Column::Online.eq(true))
        .filter(device_presence::Column::LastSeen.lt(cutoff))
        .into_tuple()
        .all(db)
        .await?;
    let mut swept = Vec::new();
    for (device, session) in stale {
        let at = now();
        let update = device_presence::Entity::update_many()
            .col_expr(device_presence::Column::Online, Expr::value(false))
            .col_expr(device_presence::Column::DisconnectedAt, Expr::value(Some(at)))
            .filter(device_presence::Column::Online.eq(true))
            .filter(device_presence::Column::LastSeen.lt(cutoff));
        if update_current(db, events, device, session, update).await? {
            tracing::info!(%device, "device marked offline: no heartbeat within the timeout");
            swept.push(device);
        }
    }
    Ok(swept)
}

/// The current session of each of the given devices that is online.
pub async fn current_sessions(db: &impl ConnectionTrait, devices: &[Uuid]) -> Result<HashMap<Uuid, Uuid>> {
    let mut current = HashMap::new();
    for chunk in devices.chunks(500) {
        let rows: Vec<(Uuid, Uuid)> = device_presence::Entity::find()
            .select_only()
            .column(device_presence::Column::DeviceId)
            .column(device_presence::Column::SessionId)
            .filter(device_presence::Column::DeviceId.is_in(chunk.iter().copied()))
            .filter(device_presence::Column::Online.eq(true))
            .into_tuple()
            .all(db)
            .await?;
        current.extend(rows);
    }
    Ok(current)
}

pub async fn load(db: &impl ConnectionTrait, devices: &[Uuid]) -> Result<HashMap<Uuid, Presence>> {
    let mut presence = HashMap::new();
    for chunk in devices.chunks(500) {
        for row in device_presence::Entity::find()
            .filter(device_presence::Column::DeviceId.is_in(chunk.iter().copied()))
            .all(db)
            .await?
        {
            presence.insert(row.device_id, presence_of(row));
        }
    }
    Ok(presence)
}
