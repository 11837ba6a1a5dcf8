//! What a connected device is told about its rollout action, and what its reports do.
//!
//! The hub of the replica that holds a device's session asks [`due`] for the commands its devices should get
//! (on connect, on a firmware change event, at every reconcile, after each report) and remembers per session what
//! it sent, so a command goes once per session. The clinical-use gate and the window are evaluated here, at the
//! moment an install would be sent, from the database (patient associations) and the session (the state the
//! device reports), and fail closed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use medfleet_core::firmware::rollout::{Approval, DeviceNow, may_install};
use medfleet_core::firmware::state::{ActionState, RolloutState};
use medfleet_core::presence::OperationalState;
use medfleet_core::validation::printable;
use medfleet_proto::v1::{self, session_response};
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait as _, Condition, ConnectionTrait, DatabaseConnection,
    EntityTrait as _, IntoActiveModel as _, QueryFilter as _, QuerySelect as _,
};
use uuid::Uuid;

use crate::audit;
use crate::error::Result;
use crate::persistence::db::{self, now};
use crate::persistence::entity::{association, device, firmware_artifact, rollout, rollout_action, site};
use crate::persistence::events::{Event, Events};
use crate::rollouts::store::{action_state, clinical_use_of, in_window};

const IN_LIST: usize = 500;

/// What this session was last sent about an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub action: Uuid,
    pub install: bool,
}

/// A device whose session this replica holds.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub device: Uuid,
    pub state: OperationalState,
    pub sent: Option<Sent>,
}

/// A command for one device and what the session has been sent once it goes out.
#[derive(Debug, Clone)]
pub struct Due {
    pub device: Uuid,
    pub message: session_response::Message,
    pub sent: Option<Sent>,
}

/// The steps an action takes in order: a report may skip ahead (a device that verified while it downloaded
/// reports `downloaded` straight after `notified`), never back.
const PATH: [ActionState; 8] = [
    ActionState::Notified,
    ActionState::Downloading,
    ActionState::Downloaded,
    ActionState::Verifying,
    ActionState::Installing,
    ActionState::Rebooting,
    ActionState::VerifyingHealth,
    ActionState::Succeeded,
];

/// Whether `from` may reach `to` by allowed moves along the path (or directly).
pub fn reachable(from: ActionState, to: ActionState) -> bool {
    if from.to(to).is_ok() {
        return true;
    }
    let mut at = from;
    for step in PATH {
        if at.to(to).is_ok() {
            return true;
        }
        if let Ok(next) = at.to(step) {
            at = next;
        }
    }
    at == to
}

async fn active_actions(db: &DatabaseConnection, devices: &[Uuid]) -> Result<Vec<rollout_action::Model>> {
    let mut out = Vec::new();
    for chunk in devices.chunks(IN_LIST) {
        out.extend(
            rollout_action::Entity::find()
                .filter(rollout_action::Column::ActiveDevice.is_in(chunk.iter().copied()))
                .all(db)
                .await?,
        );
    }
    Ok(out)
}

/// How long a device may take, from being told to install, before it starts writing: the clinical-use gate and
/// the window were judged at that moment, and a verification that takes longer (a slow device re-hashing a large
/// image) must not act on a judgement that old. Long enough for any image medfleet accepts to verify.
const INSTALL_VALID_FOR: std::time::Duration = std::time::Duration::from_mins(5);

/// Why an install did not go through when its session ended before the device committed to it, or the device
/// came back without it.
pub const INSTALL_INTERRUPTED: &str = "install_interrupted";

/// A device's answer to an update while another image (of an action given up) is on trial on it.
const BUSY_ON_TRIAL: &str = "busy_on_trial";

/// The patient associations open at `at` of each device among `devices` that has any (sorted: an approval is
/// compared with them).
pub(crate) async fn open_associations<C: ConnectionTrait>(
    conn: &C,
    devices: &[Uuid],
    at: chrono::DateTime<chrono::Utc>,
) -> Result<HashMap<Uuid, Vec<Uuid>>> {
    let mut out: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for chunk in devices.chunks(IN_LIST) {
        let rows: Vec<(Uuid, Uuid)> = association::Entity::find()
            .filter(association::Column::DeviceId.is_in(chunk.iter().copied()))
            .filter(association::Column::StartsAt.lte(at))
            .filter(
                Condition::any()
                    .add(association::Column::EndsAt.is_null())
                    .add(association::Column::EndsAt.gt(at)),
            )
            .select_only()
            .column(association::Column::DeviceId)
            .column(association::Column::Id)
            .into_tuple()
            .all(conn)
            .await?;
        for (device, association) in rows {
            out.entry(device).or_default().push(association);
        }
    }
    for open in out.values_mut() {
        open.sort_unstable();
    }
    Ok(out)
}

/// The rows of `devices` (where each stands now).
async fn devices_now(db: &DatabaseConnection, devices: &[Uuid]) -> Result<HashMap<Uuid, device::Model>> {
    let mut out = HashMap::new();
    for chunk in devices.chunks(IN_LIST) {
        for d in device::Entity::find()
            .filter(device::Column::Id.is_in(chunk.iter().copied()))
            .all(db)
            .await?
        {
            out.insert(d.id, d);
        }
    }
    Ok(out)
}

/// Whether a device standing at `place` (`audit::device_scope`) is inside the places `rollout` was created for:
/// the creator's authority covered those and no other, so a device moved elsewhere is not changed by it.
fn within_scopes(rollout: &rollout::Model, place: &str) -> bool {
    let scopes: Vec<String> = serde_json::from_str(&rollout.scopes).unwrap_or_default();
    scopes.iter().any(|s| s == "*" || s == place)
}

/// Why an action was canceled when its device moved out of the places its rollout was created for.
pub const MOVED_OUT_OF_SCOPE: &str = "moved_out_of_scope";

/// The time zone of each device's site, for devices among `devices` that stand in one.
async fn site_timezones(
    db: &DatabaseConnection,
    rows: &HashMap<Uuid, device::Model>,
    devices: &[Uuid],
) -> Result<HashMap<Uuid, String>> {
    let sites: HashMap<Uuid, String> = devices
        .iter()
        .filter_map(|id| rows.get(id).and_then(|d| d.site.clone()).map(|s| (*id, s)))
        .collect();
    let names: HashSet<&String> = sites.values().collect();
    let zones: HashMap<String, String> = site::Entity::find()
        .filter(site::Column::Name.is_in(names.into_iter().cloned()))
        .all(db)
        .await?
        .into_iter()
        .map(|s| (s.name, s.timezone))
        .collect();
    Ok(sites
        .into_iter()
        .filter_map(|(device, site)| zones.get(&site).map(|z| (device, z.clone())))
        .collect())
}

fn update_message(action: &rollout_action::Model, artifact: &firmware_artifact::Model) -> session_response::Message {
    session_response::Message::FirmwareUpdate(v1::FirmwareUpdate {
        action_id: action.id.to_string(),
        artifact_id: artifact.id.to_string(),
        target_name: artifact.target_name.clone(),
        sha256: artifact.sha256.clone(),
        length: u64::try_from(artifact.length).unwrap_or(0),
        version: artifact.version.clone(),
        release_counter: u64::try_from(artifact.release_counter).unwrap_or(0),
        attempt: attempt_of(action),
    })
}

/// The update command for `action`, remembered as told (with `install`: as told to install, so nothing more is
/// sent this session).
fn offer(device: Uuid, action: &rollout_action::Model, artifact: &firmware_artifact::Model, install: bool) -> Due {
    Due {
        device,
        message: update_message(action, artifact),
        sent: Some(Sent {
            action: action.id,
            install,
        }),
    }
}

fn attempt_of(action: &rollout_action::Model) -> u32 {
    u32::try_from(action.attempt).unwrap_or(0)
}

/// The commands due for `held` devices. Moves queued actions to notified and deferred ones to their reason as a
/// side effect (in one transaction, announced).
pub async fn due(db: &DatabaseConnection, events: &Arc<Events>, held: &[Held]) -> Result<Vec<Due>> {
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let devices: Vec<Uuid> = held.iter().map(|h| h.device).collect();
    let actions = active_actions(db, &devices).await?;
    let by_device: HashMap<Uuid, &rollout_action::Model> = actions.iter().map(|a| (a.device_id, a)).collect();
    let mut out = Vec::new();

    // A session told about an action that is no longer active: cancel it on the device if it was canceled, or
    // ended by the deadline before it installed (a device told to install may not have reported it yet).
    let stale: Vec<Uuid> = held
        .iter()
        .filter_map(|h| {
            h.sent
                .filter(|s| by_device.get(&h.device).is_none_or(|a| a.id != s.action))
        })
        .map(|s| s.action)
        .collect();
    if !stale.is_empty() {
        let finished = rollout_action::Entity::find()
            .filter(rollout_action::Column::Id.is_in(stale))
            .all(db)
            .await?;
        for action in finished {
            let state = action_state(&action);
            if state == ActionState::Canceled
                || (state == ActionState::Failed && action.reason == crate::rollouts::store::DEADLINE_PASSED)
            {
                out.push(Due {
                    device: action.device_id,
                    message: session_response::Message::FirmwareCancel(v1::FirmwareCancel {
                        action_id: action.id.to_string(),
                    }),
                    sent: None,
                });
            }
        }
    }
    if actions.is_empty() {
        return Ok(out);
    }

    let rollout_ids: HashSet<Uuid> = actions.iter().map(|a| a.rollout_id).collect();
    let rollouts: HashMap<Uuid, rollout::Model> = rollout::Entity::find()
        .filter(rollout::Column::Id.is_in(rollout_ids))
        .all(db)
        .await?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    let artifact_ids: HashSet<Uuid> = rollouts.values().map(|r| r.artifact_id).collect();
    let artifacts: HashMap<Uuid, firmware_artifact::Model> = firmware_artifact::Entity::find()
        .filter(firmware_artifact::Column::Id.is_in(artifact_ids))
        .all(db)
        .await?
        .into_iter()
        .map(|a| (a.id, a))
        .collect();
    let waiting: Vec<Uuid> = actions
        .iter()
        .filter(|a| matches!(action_state(a), ActionState::Downloaded | ActionState::Deferred))
        .map(|a| a.device_id)
        .collect();
    let at = now();
    let bound = open_associations(db, &waiting, at).await?;
    let rows = devices_now(db, &actions.iter().map(|a| a.device_id).collect::<Vec<_>>()).await?;
    let zones = site_timezones(db, &rows, &waiting).await?;

    let mut notified = Vec::new();
    let mut deferred = Vec::new();
    let mut moved = Vec::new();
    for h in held {
        let Some(action) = by_device.get(&h.device) else {
            continue;
        };
        let Some(rollout) = rollouts.get(&action.rollout_id) else {
            continue;
        };
        if RolloutState::parse(&rollout.state) != Some(RolloutState::Running) || action.wave > rollout.current_wave {
            continue;
        }
        let Some(artifact) = artifacts.get(&rollout.artifact_id) else {
            continue;
        };
        let told = h.sent.filter(|s| s.action == action.id);
        let state = action_state(action);
        let place = rows.get(&h.device).map_or_else(
            || "*".to_owned(),
            |d| audit::device_scope(d.site.as_deref(), d.ward.as_deref()),
        );
        if !state.is_installing() && !state.is_final() && !within_scopes(rollout, &place) {
            // Moved to a ward the rollout's creator had no say over: the rollout changes nothing there. Canceled
            // (it may join a rollout of that ward's own), and a device already told hears so.
            moved.push((action.id, h.device, place, crate::rollouts::store::scopes_text(rollout)));
            if told.is_some() {
                out.push(Due {
                    device: h.device,
                    message: session_response::Message::FirmwareCancel(v1::FirmwareCancel {
                        action_id: action.id.to_string(),
                    }),
                    sent: None,
                });
            }
            continue;
        }
        match state {
            // Told to install in an earlier session that ended before the device committed to it (it verifies and
            // writes the other slot while `verifying`, all of which it abandons with the session): the go-ahead
            // lapsed with it. The device confirms what it holds and is judged again.
            ActionState::Verifying if told.is_none() => {
                out.push(offer(h.device, action, artifact, false));
                deferred.push((action.id, state, INSTALL_INTERRUPTED));
            }
            // Installing in an earlier session: a device that finished answers with how it ended (its report may
            // have been lost with the session), one on trial runs its health check, and one that lost track of it
            // starts over, which `report` judges as an interrupted install.
            ActionState::Installing | ActionState::Rebooting | ActionState::VerifyingHealth if told.is_none() => {
                out.push(offer(h.device, action, artifact, true));
            }
            // Queued means not yet told, whatever this session heard before (a retried action keeps its id).
            ActionState::Queued | ActionState::Notified | ActionState::Downloading
                if told.is_none() || state == ActionState::Queued =>
            {
                out.push(offer(h.device, action, artifact, false));
                if state == ActionState::Queued {
                    notified.push(action.id);
                }
            }
            ActionState::Downloaded | ActionState::Deferred => {
                let Some(told) = told.filter(|_| action.reason != BUSY_ON_TRIAL) else {
                    // A new session: the device confirms what it holds before it is told to install. A device busy
                    // with another image's trial never fetched this one: it is offered again (each tick) until
                    // that trial is decided.
                    out.push(offer(h.device, action, artifact, false));
                    continue;
                };
                if told.install {
                    continue;
                }
                let open = bound.get(&h.device).map_or(&[][..], Vec::as_slice);
                let approval = action.approved_until.map(|until| Approval {
                    until,
                    association: action.approved_association,
                });
                let now_facts = DeviceNow {
                    bound: !open.is_empty(),
                    state: h.state,
                    approved: !action.approved_by.is_empty() && approval.is_some_and(|a| a.holds(at, open)),
                    in_window: in_window(rollout, zones.get(&h.device).map(String::as_str), at),
                };
                match may_install(now_facts, clinical_use_of(&rollout.clinical_use)) {
                    Ok(()) => out.push(Due {
                        device: h.device,
                        message: session_response::Message::FirmwareInstall(v1::FirmwareInstall {
                            action_id: action.id.to_string(),
                            attempt: attempt_of(action),
                            valid_for: Some(medfleet_proto::convert::duration_to_wire(INSTALL_VALID_FOR)),
                        }),
                        sent: Some(Sent {
                            action: action.id,
                            install: true,
                        }),
                    }),
                    Err(deferral) => {
                        if state != ActionState::Deferred || action.reason != deferral.as_str() {
                            deferred.push((action.id, state, deferral.as_str()));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    if !notified.is_empty() || !deferred.is_empty() || !moved.is_empty() {
        let txn = db::begin_write(db).await?;
        for (id, device, place, scopes) in &moved {
            let canceled = rollout_action::Entity::update_many()
                .col_expr(
                    rollout_action::Column::State,
                    sea_orm::sea_query::Expr::value(ActionState::Canceled.as_str()),
                )
                .col_expr(
                    rollout_action::Column::Reason,
                    sea_orm::sea_query::Expr::value(MOVED_OUT_OF_SCOPE),
                )
                .col_expr(
                    rollout_action::Column::Detail,
                    sea_orm::sea_query::Expr::value(format!(
                        "the device moved to {place}, outside the places this rollout was created for ({scopes})"
                    )),
                )
                .col_expr(
                    rollout_action::Column::ActiveDevice,
                    sea_orm::sea_query::Expr::value(None::<Uuid>),
                )
                .col_expr(rollout_action::Column::UpdatedAt, sea_orm::sea_query::Expr::value(at))
                .filter(rollout_action::Column::Id.eq(*id))
                .filter(rollout_action::Column::ActiveDevice.is_not_null())
                .filter(
                    rollout_action::Column::State.is_not_in(
                        [
                            ActionState::Installing,
                            ActionState::Rebooting,
                            ActionState::VerifyingHealth,
                        ]
                        .map(ActionState::as_str),
                    ),
                )
                .exec(&txn)
                .await?;
            if canceled.rows_affected > 0 {
                audit::Context::system("rollout scheduler")
                    .record(
                        &txn,
                        "rollout.device.canceled",
                        format!("device {device}"),
                        place.clone(),
                        format!("{MOVED_OUT_OF_SCOPE}: moved outside the rollout's places ({scopes})"),
                    )
                    .await?;
            }
        }
        for chunk in notified.chunks(IN_LIST) {
            rollout_action::Entity::update_many()
                .col_expr(
                    rollout_action::Column::State,
                    sea_orm::sea_query::Expr::value(ActionState::Notified.as_str()),
                )
                .col_expr(rollout_action::Column::UpdatedAt, sea_orm::sea_query::Expr::value(at))
                .filter(rollout_action::Column::Id.is_in(chunk.iter().copied()))
                .filter(rollout_action::Column::State.eq(ActionState::Queued.as_str()))
                .exec(&txn)
                .await?;
        }
        for (id, from, reason) in &deferred {
            rollout_action::Entity::update_many()
                .col_expr(
                    rollout_action::Column::State,
                    sea_orm::sea_query::Expr::value(ActionState::Deferred.as_str()),
                )
                .col_expr(rollout_action::Column::Reason, sea_orm::sea_query::Expr::value(*reason))
                .col_expr(rollout_action::Column::UpdatedAt, sea_orm::sea_query::Expr::value(at))
                .filter(rollout_action::Column::Id.eq(*id))
                .filter(rollout_action::Column::ActiveDevice.is_not_null())
                // Only from the state judged: a report handled meanwhile (the device's health check after a
                // reboot this session never heard of) is not overwritten.
                .filter(rollout_action::Column::State.eq(from.as_str()))
                .exec(&txn)
                .await?;
        }
        events.announce(&txn, &Event::Firmware).await?;
        txn.commit().await?;
        events.emit(Event::Firmware);
    }
    Ok(out)
}

/// Ends an action the device lost track of while installing as failed (`INSTALL_INTERRUPTED`), audited.
async fn interrupted(
    txn: &sea_orm::DatabaseTransaction,
    events: &Arc<Events>,
    (device, action): (Uuid, rollout_action::Model),
    report: &v1::FirmwareReport,
) -> Result<ActionState> {
    let was = action_state(&action);
    let rollout_id = action.rollout_id;
    let running = format!(
        "{} (release {})",
        printable(&bounded(&report.running_version, 200)),
        report.running_release_counter
    );
    let detail = format!(
        "the device came back from {was} with no record of the install and runs {running}; retry-failed tries again"
    );
    let mut active = action.into_active_model();
    active.state = Set(ActionState::Failed.as_str().to_owned());
    active.reason = Set(INSTALL_INTERRUPTED.to_owned());
    active.detail = Set(detail.clone());
    active.active_device = Set(None);
    active.updated_at = Set(now());
    active.update(txn).await?;
    let scope = device::Entity::find_by_id(device).one(txn).await?.map_or_else(
        || "*".to_owned(),
        |d| audit::device_scope(d.site.as_deref(), d.ward.as_deref()),
    );
    audit::Context::new(format!("medfleet://device/{device}"), "")
        .record(
            txn,
            "rollout.device.failed",
            format!("device {device}"),
            scope,
            format!("rollout {rollout_id}; {INSTALL_INTERRUPTED}: {detail}"),
        )
        .await?;
    let event = Event::FirmwareDevice { device };
    events.announce(txn, &event).await?;
    tracing::warn!(%device, rollout = %rollout_id, from = %was, "firmware install interrupted: the device lost track of it");
    Ok(ActionState::Failed)
}

fn bounded(value: &str, max: usize) -> String {
    value.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// Records a device's report on its own action. A report on another device's action or of an earlier attempt, an
/// unknown state or a move the state machine does not allow (a replayed or out-of-order report) changes nothing. Returns the new state.
pub async fn report(
    db: &DatabaseConnection,
    events: &Arc<Events>,
    device: Uuid,
    report: &v1::FirmwareReport,
) -> Result<Option<ActionState>> {
    let Ok(id) = Uuid::parse_str(&report.action_id) else {
        return Ok(None);
    };
    let Some(next) = medfleet_proto::convert::action_state_from_wire(report.state) else {
        return Ok(None);
    };
    let txn = db::begin_write(db).await?;
    let Some(action) = rollout_action::Entity::find_by_id(id)
        .filter(rollout_action::Column::DeviceId.eq(device))
        .one(&txn)
        .await?
    else {
        tracing::warn!(%device, "firmware report for an action that is not this device's; ignored");
        return Ok(None);
    };
    if report.attempt != attempt_of(&action) {
        tracing::debug!(%device, attempt = report.attempt, current = action.attempt, "firmware report of an earlier attempt; ignored");
        return Ok(None);
    }
    let current = action_state(&action);
    let bytes = i64::try_from(report.bytes_downloaded).unwrap_or(i64::MAX);
    if next == current {
        if next == ActionState::Downloading && bytes != action.bytes_downloaded {
            let mut active = action.into_active_model();
            active.bytes_downloaded = Set(bytes);
            active.updated_at = Set(now());
            active.update(&txn).await?;
            txn.commit().await?;
            events.emit(Event::FirmwareProgress);
        }
        return Ok(Some(next));
    }
    if current.is_installing()
        && matches!(
            next,
            ActionState::Notified | ActionState::Downloading | ActionState::Downloaded
        )
    {
        // The device started this action over: it came back (a crash, a restored state directory) with no trial
        // armed and no record of how the install ended, so it never ran the new image.
        let state = interrupted(&txn, events, (device, action), report).await?;
        txn.commit().await?;
        events.emit(Event::FirmwareDevice { device });
        return Ok(Some(state));
    }
    if !reachable(current, next) {
        tracing::debug!(%device, from = %current, to = %next, "firmware report out of order; ignored");
        return Ok(None);
    }
    let mut next = next;
    let mut reason = bounded(&report.reason, 64);
    let mut detail = bounded(&report.detail, 1000);
    let rollout_id = action.rollout_id;
    if next == ActionState::Succeeded {
        // Success counts towards a wave only from a device that says it runs the rollout's release; anything else
        // (a confused or compromised device) is a failure the operators see.
        let expected = match rollout::Entity::find_by_id(rollout_id).one(&txn).await? {
            Some(r) => firmware_artifact::Entity::find_by_id(r.artifact_id)
                .one(&txn)
                .await?
                .map(|a| a.release_counter),
            None => None,
        };
        let running = i64::try_from(report.running_release_counter).unwrap_or(-1);
        if expected != Some(running) {
            next = ActionState::Failed;
            "not_running_release".clone_into(&mut reason);
            detail = format!(
                "reported success while running release {} ({})",
                report.running_release_counter,
                printable(&bounded(&report.running_version, 200))
            );
        }
    }
    let mut active = action.into_active_model();
    active.state = Set(next.as_str().to_owned());
    active.reason = Set(reason.clone());
    active.detail = Set(detail.clone());
    if bytes > 0 {
        active.bytes_downloaded = Set(bytes);
    }
    if next.is_final() {
        active.active_device = Set(None);
    }
    active.updated_at = Set(now());
    active.update(&txn).await?;
    let scope = device::Entity::find_by_id(device).one(&txn).await?.map_or_else(
        || "*".to_owned(),
        |d| audit::device_scope(d.site.as_deref(), d.ward.as_deref()),
    );
    audit::Context::new(format!("medfleet://device/{device}"), "")
        .record(
            &txn,
            &format!("rollout.device.{}", next.as_str()),
            format!("device {device}"),
            scope,
            format!(
                "rollout {rollout_id}; running {} (release {}){}",
                printable(&bounded(&report.running_version, 200)),
                report.running_release_counter,
                if reason.is_empty() {
                    String::new()
                } else {
                    format!("; {reason}: {}", printable(&detail))
                }
            ),
        )
        .await?;
    let event = Event::FirmwareDevice { device };
    events.announce(&txn, &event).await?;
    txn.commit().await?;
    events.emit(event);
    if matches!(next, ActionState::Failed | ActionState::RolledBack) {
        tracing::warn!(%device, rollout = %rollout_id, state = %next, reason = %reason, "firmware update did not succeed");
    } else {
        tracing::info!(%device, rollout = %rollout_id, state = %next, "firmware action");
    }
    Ok(Some(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_may_skip_ahead_but_never_go_back() {
        use ActionState::*;
        assert!(reachable(Notified, Downloaded));
        assert!(reachable(Deferred, Installing));
        assert!(reachable(Downloaded, Installing));
        assert!(reachable(Installing, RolledBack));
        assert!(reachable(Downloading, Failed));
        assert!(!reachable(Succeeded, Downloading));
        assert!(!reachable(Installing, Downloaded));
        assert!(!reachable(Installing, Deferred));
        assert!(!reachable(Canceled, Notified));
        assert!(!reachable(Failed, Succeeded));
    }
}
