//! The one rollout scheduler across replicas. Every replica runs this loop; only the holder of the lease row in
//! `leases` acts, renewing it at every tick. A replica that dies or stalls stops renewing and another takes the
//! lease once it has expired, so at most one scheduler decides at any time and a rollout keeps going when its
//! replica goes away. Each decision (advance, halt, complete, a passed deadline) is one transaction, audited.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use medfleet_core::firmware::rollout::{Progress, Share, Step, Tally, Thresholds, step};
use medfleet_core::firmware::state::{ActionState, RolloutState};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait as _, DatabaseConnection, EntityTrait as _,
    IntoActiveModel as _, QueryFilter as _,
};
use tokio_util::sync::CancellationToken;

use crate::audit;
use crate::error::{Error, Result};
use crate::persistence::db::{self, now};
use crate::persistence::entity::{lease, rollout, rollout_action};
use crate::persistence::events::{Event, Events};
use crate::rollouts::store::{DEADLINE_PASSED, action_state, rollout_state, scopes_text};
use crate::telemetry::Metrics;

/// How long the leader lets reports gather after the first wakes it, before it decides.
const EVENT_COALESCE: Duration = Duration::from_millis(50);

const LEASE: &str = "rollout-scheduler";

#[derive(Debug, Clone)]
pub struct Scheduler {
    db: DatabaseConnection,
    events: Arc<Events>,
    metrics: Metrics,
    holder: String,
    tick: Duration,
    lease_for: Duration,
}

impl Scheduler {
    /// `holder` names this replica in the lease (unique per process).
    pub fn new(db: DatabaseConnection, events: Arc<Events>, metrics: Metrics, holder: String, tick: Duration) -> Self {
        Self {
            db,
            events,
            metrics,
            holder,
            tick,
            // Several ticks: one slow tick does not hand the lease over, a dead replica's does within seconds.
            lease_for: (tick * 5).max(Duration::from_secs(3)),
        }
    }

    /// Takes or renews the lease; true while this replica leads.
    pub async fn lead(&self) -> Result<bool> {
        let at = now();
        let until = at + chrono::Duration::from_std(self.lease_for).unwrap_or(chrono::Duration::seconds(10));
        lease::Entity::insert(lease::ActiveModel {
            name: Set(LEASE.to_owned()),
            holder: Set(String::new()),
            expires_at: Set(at),
        })
        .on_conflict(OnConflict::column(lease::Column::Name).do_nothing().to_owned())
        .exec_without_returning(&self.db)
        .await?;
        let taken = lease::Entity::update_many()
            .col_expr(lease::Column::Holder, Expr::value(self.holder.clone()))
            .col_expr(lease::Column::ExpiresAt, Expr::value(until))
            .filter(lease::Column::Name.eq(LEASE))
            .filter(
                sea_orm::Condition::any()
                    .add(lease::Column::Holder.eq(self.holder.clone()))
                    .add(lease::Column::ExpiresAt.lt(at)),
            )
            .exec(&self.db)
            .await?;
        Ok(taken.rows_affected == 1)
    }

    /// Hands the lease back (shutdown), so another replica leads at once.
    pub async fn release(&self) {
        let released = lease::Entity::update_many()
            .col_expr(lease::Column::ExpiresAt, Expr::value(now()))
            .filter(lease::Column::Name.eq(LEASE))
            .filter(lease::Column::Holder.eq(self.holder.clone()))
            .exec(&self.db)
            .await;
        if let Err(error) = released {
            tracing::warn!(%error, "rollout scheduler lease not released; it expires by itself");
        }
    }

    pub fn spawn(self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(self.tick);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut events = self.events.subscribe();
            let mut leading = false;
            loop {
                let ticked = tokio::select! {
                    () = stop.cancelled() => break,
                    _ = ticks.tick() => true,
                    // Reports wake the leader early, so a wave advances as soon as it may.
                    event = events.recv() => if matches!(event, Ok(Event::Firmware | Event::FirmwareDevice { .. })) {
                        false
                    } else {
                        continue
                    },
                };
                if !ticked {
                    // A wave's devices report in bursts: one decision answers the burst, not one per report.
                    tokio::time::sleep(EVENT_COALESCE).await;
                    while events.try_recv().is_ok() {}
                }
                match self.lead().await {
                    Ok(now_leading) => {
                        if now_leading != leading {
                            tracing::info!(leading = now_leading, "rollout scheduler lease");
                            leading = now_leading;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "rollout scheduler lease check failed");
                        leading = false;
                    }
                }
                self.metrics.set_scheduler_leader(leading);
                if leading && let Err(error) = self.run_once(ticked).await {
                    tracing::warn!(%error, "rollout scheduler step failed; retrying at the next tick");
                }
            }
            if leading {
                self.release().await;
            }
        })
    }

    /// One decision per running rollout. On a timer tick (`nudge`), deferred devices also make the sessions look
    /// again, since what keeps them waiting (a patient association, the window) changes without a firmware event.
    /// Never on an event's wake-up: that would wake itself for ever.
    pub async fn run_once(&self, nudge: bool) -> Result<()> {
        let running = rollout::Entity::find()
            .filter(rollout::Column::State.eq(RolloutState::Running.as_str()))
            .all(&self.db)
            .await?;
        let mut changed = false;
        let ids: Vec<uuid::Uuid> = running.iter().map(|r| r.id).collect();
        for row in running {
            changed |= self.decide(row).await?;
        }
        if !changed && nudge && !ids.is_empty() {
            changed = rollout_action::Entity::find()
                .filter(rollout_action::Column::RolloutId.is_in(ids))
                .filter(rollout_action::Column::State.eq(ActionState::Deferred.as_str()))
                .one(&self.db)
                .await?
                .is_some();
        }
        if changed {
            self.events.publish(&self.db, Event::Firmware).await;
        }
        Ok(())
    }

    async fn decide(&self, row: rollout::Model) -> Result<bool> {
        let txn = db::begin_write(&self.db).await?;
        // Re-read inside the transaction: an operator may have paused it since the listing.
        let Some(row) = rollout::Entity::find_by_id(row.id).one(&txn).await? else {
            return Ok(false);
        };
        if rollout_state(&row)? != RolloutState::Running {
            return Ok(false);
        }
        let ctx = audit::Context::system("rollout scheduler");
        let at = now();
        let actions = rollout_action::Entity::find()
            .filter(rollout_action::Column::RolloutId.eq(row.id))
            .all(&txn)
            .await?;
        let mut changed = false;
        let deadline_passed = row.deadline_seconds > 0
            && row
                .started_at
                .is_some_and(|started| at > started + chrono::Duration::seconds(row.deadline_seconds));
        if deadline_passed {
            let mut late = 0;
            for action in actions.iter().filter(|a| a.wave <= row.current_wave) {
                let state = action_state(action);
                // Verifying: told to install, and it may be writing by now; its report decides, not the clock.
                if !state.is_final() && !state.is_installing() && state != ActionState::Verifying {
                    let mut active = action.clone().into_active_model();
                    active.state = Set(ActionState::Failed.as_str().to_owned());
                    active.reason = Set(DEADLINE_PASSED.to_owned());
                    active.detail = Set("not updated before the rollout's deadline".to_owned());
                    active.active_device = Set(None);
                    active.updated_at = Set(at);
                    active.update(&txn).await?;
                    late += 1;
                }
            }
            if late > 0 {
                ctx.record(
                    &txn,
                    "rollout.deadline",
                    format!("rollout {}", row.id),
                    scopes_text(&row),
                    format!("{late} devices failed: deadline passed"),
                )
                .await?;
                txn.commit().await?;
                return Ok(true);
            }
        }
        let waves: Vec<String> = serde_json::from_str(&row.waves).map_err(|e| Error::Internal(e.to_string()))?;
        let thresholds = Thresholds {
            success: Share::parse(&row.success_threshold).map_err(|e| Error::Internal(e.to_string()))?,
            halt_at: Share::parse(&row.halt_threshold).map_err(|e| Error::Internal(e.to_string()))?,
            min_executed: usize::try_from(row.min_executed).unwrap_or(0),
            soak: Duration::from_secs(u64::try_from(row.soak_seconds).unwrap_or(0)),
        };
        let tally = |filter: &dyn Fn(&rollout_action::Model) -> bool| {
            let mut t = Tally::default();
            for a in actions.iter().filter(|a| filter(a)) {
                t.targeted += 1;
                match action_state(a) {
                    ActionState::Succeeded => t.succeeded += 1,
                    ActionState::Failed if a.reason == DEADLINE_PASSED => t.expired += 1,
                    ActionState::Failed | ActionState::RolledBack => t.failed += 1,
                    // A canceled device neither succeeded nor failed; it no longer counts towards the wave.
                    ActionState::Canceled => t.targeted -= 1,
                    _ => {}
                }
            }
            t
        };
        let mut by_state = std::collections::BTreeMap::new();
        for a in &actions {
            *by_state.entry(action_state(a).as_str()).or_insert(0_usize) += 1;
        }
        for state in ActionState::ALL {
            let count = by_state.get(state.as_str()).copied().unwrap_or(0);
            self.metrics
                .set_rollout_devices(&row.id.to_string(), state.as_str(), count);
        }
        let wave = row.current_wave;
        let current = tally(&|a| a.wave == wave);
        let so_far = tally(&|a| a.wave <= wave);
        // After a resume from a halt only what finished since counts (a final action's updated_at is when it
        // finished).
        let judged = tally(&|a| a.wave <= wave && row.halt_judged_since.is_none_or(|since| a.updated_at > since));
        let reached = thresholds.success.reached_by(current.succeeded, current.targeted);
        let mut active = row.clone().into_active_model();
        let succeeded_at = match (reached, row.wave_succeeded_at) {
            (true, None) => {
                active.wave_succeeded_at = Set(Some(at));
                changed = true;
                Some(at)
            }
            (true, since) => since,
            (false, Some(_)) => {
                active.wave_succeeded_at = Set(None);
                changed = true;
                None
            }
            (false, None) => None,
        };
        let held = succeeded_at.map(|since| (at - since).to_std().unwrap_or_default());
        let index = usize::try_from(wave).unwrap_or(0);
        let progress = Progress {
            current,
            so_far,
            judged,
            successful_for: held,
            deadline_passed,
        };
        let decision = step(&thresholds, index, waves.len(), progress);
        let (audit_action, detail) = match decision {
            Step::Wait { .. } => (None, String::new()),
            Step::Advance => {
                active.current_wave = Set(wave + 1);
                active.wave_started_at = Set(Some(at));
                active.wave_succeeded_at = Set(None);
                (
                    Some("rollout.advance"),
                    format!(
                        "wave {} done ({} of {} succeeded); wave {} starts",
                        wave + 1,
                        current.succeeded,
                        current.targeted,
                        wave + 2
                    ),
                )
            }
            Step::Complete => {
                active.state = Set(RolloutState::Completed.as_str().to_owned());
                (
                    Some("rollout.complete"),
                    format!("{} of {} devices updated", so_far.succeeded, so_far.targeted),
                )
            }
            Step::Expired => {
                // Later waves were never told anything: they end here too.
                let canceled = super::store::cancel_pending(&txn, row.id, DEADLINE_PASSED, at).await?;
                let reason = format!(
                    "deadline passed: {} of {} devices updated, {} not updated in time, {} failed{}",
                    so_far.succeeded,
                    so_far.targeted,
                    so_far.expired,
                    so_far.failed,
                    if canceled > 0 {
                        format!(", {canceled} of later waves canceled")
                    } else {
                        String::new()
                    }
                );
                active.state = Set(RolloutState::Completed.as_str().to_owned());
                active.reason = Set(reason.clone());
                (Some("rollout.expire"), reason)
            }
            Step::Halt { reason } => {
                active.state = Set(RolloutState::Halted.as_str().to_owned());
                active.reason = Set(reason.clone());
                (Some("rollout.halt"), reason)
            }
        };
        if audit_action.is_none() && !changed {
            return Ok(false);
        }
        active.updated_at = Set(at);
        active.update(&txn).await?;
        if let Some(action) = audit_action {
            ctx.record(
                &txn,
                action,
                format!("rollout {}", row.id),
                scopes_text(&row),
                detail.clone(),
            )
            .await?;
            tracing::info!(rollout = %row.id, %action, %detail, "rollout decision");
            self.metrics
                .record_rollout_decision(action.trim_start_matches("rollout."));
        }
        txn.commit().await?;
        Ok(audit_action.is_some())
    }
}

/// When this lease row says the scheduler is held (for status pages and tests).
pub async fn leader(db: &DatabaseConnection) -> Result<Option<(String, chrono::DateTime<Utc>)>> {
    Ok(lease::Entity::find_by_id(LEASE.to_owned())
        .one(db)
        .await?
        .filter(|l| l.expires_at > now())
        .map(|l| (l.holder, l.expires_at)))
}
