//! Rollouts and their device actions in the database: creation inside the caller's scopes, operator commands
//! through the state machine, and the reads behind `show`, `list` and `watch`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use medfleet_core::firmware::rollout::{ClinicalUse, Share, Waves};
use medfleet_core::firmware::state::{ActionState, RolloutState};
use medfleet_core::firmware::window::Window;
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait as _, ConnectionTrait, DatabaseConnection, EntityTrait as _,
    IntoActiveModel as _, QueryFilter as _, QueryOrder as _, QuerySelect as _, TryIntoModel as _,
};
use uuid::Uuid;

use crate::audit;
use crate::authz::visibility::Visibility;
use crate::error::{Error, Result};
use crate::firmware::artifacts::Artifacts;
use crate::persistence::db::{self, now};
use crate::persistence::entity::{device, device_presence, device_tag, firmware_artifact, rollout, rollout_action};
use crate::persistence::events::{Event, Events};
use crate::rollouts::places::{self, Placed};

mod abandon;
mod approval;
mod listing;
use listing::shown;
pub use listing::{DEFAULT_LISTED, MAX_LISTED};

/// The most devices one rollout targets.
pub const MAX_DEVICES: usize = 100_000;
/// Device ids per `IN (...)` list.
const IN_LIST: usize = 500;

/// Which devices a rollout targets.
#[derive(Debug, Clone)]
pub enum Targeting {
    Selector {
        hardware_id: Option<String>,
        site: Option<String>,
        ward: Option<(String, String)>,
        tags: Vec<(String, String)>,
    },
    Devices(Vec<Uuid>),
}

/// A rollout to create, validated.
#[derive(Debug, Clone)]
pub struct NewRollout {
    pub artifact: String,
    pub targeting: Targeting,
    pub waves: Waves,
    pub success: Share,
    pub halt_at: Share,
    pub min_executed: u32,
    pub soak: Duration,
    /// The window's text (kept as written) and the timezone it is read in.
    pub window: Option<String>,
    /// `None`: each device's site's time zone.
    pub timezone: Option<chrono_tz::Tz>,
    pub clinical_use: ClinicalUse,
    pub deadline: Option<Duration>,
    pub draft: bool,
    pub comment: String,
    /// Answer with what would be created; store nothing.
    pub validate_only: bool,
}

/// The reason of an action the rollout's deadline ended: not a verdict on the image (never halts, never retried).
pub const DEADLINE_PASSED: &str = "deadline_passed";

/// A rollout with everything `show` needs.
#[derive(Debug, Clone)]
pub struct Detail {
    pub rollout: rollout::Model,
    pub artifact: Option<firmware_artifact::Model>,
    pub actions: Vec<rollout_action::Model>,
    /// The actions a reply lists (indices into `actions`, in order): all of them, or with a device limit those
    /// that need attention first. The counts always cover every action.
    pub shown: Vec<usize>,
    /// Each shown device's serial and place now (not when the rollout was created).
    pub places: HashMap<Uuid, Placed>,
}

/// An operator command on a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Start,
    Pause,
    Resume,
    Abort,
    /// Queue failed devices again (and those that rolled back, when `include_rolled_back`).
    RetryFailed {
        include_rolled_back: bool,
    },
}

impl Command {
    fn audit_action(self) -> &'static str {
        match self {
            Self::Start => "rollout.start",
            Self::Pause => "rollout.pause",
            Self::Resume => "rollout.resume",
            Self::Abort => "rollout.abort",
            Self::RetryFailed { .. } => "rollout.retry_failed",
        }
    }
}

pub fn clinical_use_str(policy: ClinicalUse) -> &'static str {
    match policy {
        ClinicalUse::Defer => "defer",
        ClinicalUse::Approve => "approve",
    }
}

pub fn clinical_use_of(stored: &str) -> ClinicalUse {
    // Anything unexpected in storage fails closed: wait until the device is free.
    if stored == "approve" {
        ClinicalUse::Approve
    } else {
        ClinicalUse::Defer
    }
}

pub fn rollout_state(row: &rollout::Model) -> Result<RolloutState> {
    RolloutState::parse(&row.state)
        .ok_or_else(|| Error::Internal(format!("rollout {} has state {}", row.id, row.state)))
}

pub fn action_state(row: &rollout_action::Model) -> ActionState {
    // An unknown stored state counts as failed: never installed, never retried silently.
    ActionState::parse(&row.state).unwrap_or(ActionState::Failed)
}

/// Whether every place a rollout touched is visible to `visibility`.
pub fn visible(visibility: &Visibility, row: &rollout::Model) -> bool {
    let scopes: Vec<String> = serde_json::from_str(&row.scopes).unwrap_or_else(|_| vec!["*".to_owned()]);
    scopes.iter().all(|scope| match scope.split_once('/') {
        Some((site, ward)) => visibility.sees_ward(site, ward),
        None => *visibility == Visibility::All,
    })
}

#[derive(Debug, Clone)]
pub struct Rollouts {
    db: DatabaseConnection,
    events: Arc<Events>,
    artifacts: Artifacts,
}

impl Rollouts {
    /// The serial and place of the devices `ids`.
    pub async fn places(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Placed>> {
        places::lookup(&self.db, ids).await
    }
}

fn db_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Rollouts {
    pub fn new(db: DatabaseConnection, events: Arc<Events>, artifacts: Artifacts) -> Self {
        Self { db, events, artifacts }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }

    /// The devices a selector or list names, inside `visibility`, of the artifact's model.
    async fn targets(&self, visibility: &Visibility, targeting: &Targeting, model: &str) -> Result<Vec<device::Model>> {
        let in_scope = |d: &device::Model| visibility.sees_place(d.site.as_deref(), d.ward.as_deref());
        match targeting {
            Targeting::Selector {
                hardware_id,
                site,
                ward,
                tags,
            } => {
                if let Some(wanted) = hardware_id
                    && wanted != model
                {
                    return Err(Error::FailedPrecondition(format!(
                        "the selector names model {wanted}, the artifact is for model {model}"
                    )));
                }
                let mut query = device::Entity::find()
                    .filter(device::Column::Model.eq(model))
                    .filter(device::Column::State.ne("decommissioned"));
                if let Some(site) = site {
                    query = query.filter(device::Column::Site.eq(site));
                }
                if let Some((site, ward)) = ward {
                    query = query
                        .filter(device::Column::Site.eq(site))
                        .filter(device::Column::Ward.eq(ward));
                }
                let mut found: Vec<device::Model> = query
                    .order_by_asc(device::Column::Id)
                    .limit(u64::try_from(MAX_DEVICES).unwrap_or(u64::MAX) + 1)
                    .all(&self.db)
                    .await?
                    .into_iter()
                    .filter(in_scope)
                    .collect();
                for (key, value) in tags {
                    let tagged: BTreeSet<Uuid> = device_tag::Entity::find()
                        .filter(device_tag::Column::Key.eq(key))
                        .filter(device_tag::Column::Value.eq(value))
                        .select_only()
                        .column(device_tag::Column::DeviceId)
                        .into_tuple::<Uuid>()
                        .all(&self.db)
                        .await?
                        .into_iter()
                        .collect();
                    found.retain(|d| tagged.contains(&d.id));
                }
                Ok(found)
            }
            Targeting::Devices(ids) => {
                let mut found = Vec::with_capacity(ids.len());
                for chunk in ids.chunks(IN_LIST) {
                    found.extend(
                        device::Entity::find()
                            .filter(device::Column::Id.is_in(chunk.iter().copied()))
                            .all(&self.db)
                            .await?,
                    );
                }
                let by_id: HashMap<Uuid, &device::Model> = found.iter().map(|d| (d.id, d)).collect();
                let missing: Vec<String> = ids
                    .iter()
                    .filter(|id| by_id.get(id).is_none_or(|d| !in_scope(d)))
                    .take(10)
                    .map(Uuid::to_string)
                    .collect();
                if !missing.is_empty() {
                    return Err(Error::PermissionDenied(format!(
                        "device(s) {} do not exist or are outside the scopes you may create rollouts in",
                        missing.join(", ")
                    )));
                }
                let wrong: Vec<String> = found
                    .iter()
                    .filter(|d| d.model != model || d.state == "decommissioned")
                    .take(10)
                    .map(|d| format!("{} ({}, {})", d.id, d.model, d.state))
                    .collect();
                if !wrong.is_empty() {
                    return Err(Error::FailedPrecondition(format!(
                        "the artifact is for model {model}; these devices cannot take it: {}",
                        wrong.join(", ")
                    )));
                }
                found.sort_by_key(|d| d.id);
                Ok(found)
            }
        }
    }

    /// Creates a rollout and its device actions in one transaction.
    pub async fn create(&self, ctx: &audit::Context, visibility: &Visibility, new: NewRollout) -> Result<Detail> {
        let artifact = self.artifacts.resolve(&new.artifact).await?;
        let devices = self.targets(visibility, &new.targeting, &artifact.hardware_id).await?;
        if devices.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "no device of model {} inside your scopes matches; check the selector (medfleet devices list)",
                artifact.hardware_id
            )));
        }
        if devices.len() > MAX_DEVICES {
            return Err(Error::FailedPrecondition(format!(
                "more than {MAX_DEVICES} devices match; narrow the selector (one site or ward at a time)"
            )));
        }
        let ids: Vec<Uuid> = devices.iter().map(|d| d.id).collect();
        let busy = self.busy(&ids).await?;
        if !busy.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "device(s) already in an unfinished rollout: {} (finish or abort it first, or leave them out; a device \
                 still installing after an abort, or that will never report again, is freed with `medfleet rollouts \
                 abandon R --device D -m REASON`)",
                busy.iter()
                    .take(10)
                    .map(|(d, r)| format!("{d} in {r}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let mut versions: HashMap<Uuid, String> = HashMap::new();
        for chunk in ids.chunks(IN_LIST) {
            for p in device_presence::Entity::find()
                .filter(device_presence::Column::DeviceId.is_in(chunk.iter().copied()))
                .all(&self.db)
                .await?
            {
                versions.insert(p.device_id, p.firmware_version);
            }
        }
        let id = Uuid::new_v4();
        let at = now();
        let scopes: BTreeSet<String> = devices
            .iter()
            .map(|d| audit::device_scope(d.site.as_deref(), d.ward.as_deref()))
            .collect();
        let sizes = new.waves.sizes(devices.len());
        let mut actions = Vec::with_capacity(devices.len());
        let mut next = devices.iter();
        for (wave, size) in sizes.iter().enumerate() {
            for d in next.by_ref().take(*size) {
                actions.push(rollout_action::ActiveModel {
                    id: Set(Uuid::new_v4()),
                    rollout_id: Set(id),
                    device_id: Set(d.id),
                    wave: Set(i32::try_from(wave).unwrap_or(i32::MAX)),
                    state: Set(ActionState::Queued.as_str().to_owned()),
                    reason: Set(String::new()),
                    detail: Set(String::new()),
                    bytes_downloaded: Set(0),
                    approved_by: Set(String::new()),
                    active_device: Set(Some(d.id)),
                    from_version: Set(versions.get(&d.id).cloned().unwrap_or_default()),
                    from_release_counter: Set(0),
                    updated_at: Set(at),
                    attempt: Set(1),
                    approved_until: Set(None),
                    approved_association: Set(None),
                });
            }
        }
        let state = if new.draft {
            RolloutState::Draft
        } else {
            RolloutState::Running
        };
        let running = state == RolloutState::Running;
        let waves: Vec<String> = new.waves.shares().iter().map(ToString::to_string).collect();
        let row = rollout::ActiveModel {
            id: Set(id),
            artifact_id: Set(artifact.id),
            state: Set(state.as_str().to_owned()),
            waves: Set(serde_json::to_string(&waves).map_err(|e| Error::Internal(e.to_string()))?),
            success_threshold: Set(new.success.to_string()),
            halt_threshold: Set(new.halt_at.to_string()),
            min_executed: Set(i32::try_from(new.min_executed).unwrap_or(i32::MAX)),
            soak_seconds: Set(db_int(new.soak.as_secs())),
            window: Set(new.window.clone().unwrap_or_default()),
            timezone: Set(new.timezone.map(|z| z.name().to_owned()).unwrap_or_default()),
            clinical_use: Set(clinical_use_str(new.clinical_use).to_owned()),
            deadline_seconds: Set(new.deadline.map_or(0, |d| db_int(d.as_secs()))),
            current_wave: Set(0),
            wave_started_at: Set(running.then_some(at)),
            wave_succeeded_at: Set(None),
            reason: Set(String::new()),
            scopes: Set(serde_json::to_string(&scopes).map_err(|e| Error::Internal(e.to_string()))?),
            created_by: Set(ctx.actor.clone()),
            comment: Set(new.comment.clone()),
            created_at: Set(at),
            started_at: Set(running.then_some(at)),
            updated_at: Set(at),
            rollback_of: Set(None),
            halt_judged_since: Set(None),
        };
        if new.validate_only {
            let model = |e: sea_orm::DbErr| Error::Internal(format!("a rollout preview: {e}"));
            let actions: Vec<rollout_action::Model> = actions
                .into_iter()
                .map(|a| a.try_into_model().map_err(model))
                .collect::<Result<_>>()?;
            let shown = shown(&actions, DEFAULT_LISTED);
            let ids: Vec<Uuid> = shown.iter().map(|i| actions[*i].device_id).collect();
            return Ok(Detail {
                rollout: row.try_into_model().map_err(model)?,
                artifact: Some(artifact),
                actions,
                shown,
                places: places::lookup(&self.db, &ids).await?,
            });
        }
        self.insert(ctx, (id, state), row, actions, &artifact, (&scopes, &sizes))
            .await?;
        self.detail(id).await
    }

    async fn insert(
        &self,
        ctx: &audit::Context,
        (id, state): (Uuid, RolloutState),
        row: rollout::ActiveModel,
        actions: Vec<rollout_action::ActiveModel>,
        artifact: &firmware_artifact::Model,
        (scopes, sizes): (&BTreeSet<String>, &[usize]),
    ) -> Result<()> {
        let count = actions.len();
        let txn = db::begin_write(&self.db).await?;
        rollout::Entity::insert(row).exec_without_returning(&txn).await?;
        db::insert_all::<rollout_action::Entity>(&txn, actions)
            .await
            .map_err(|e| match e.sql_err() {
                Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => Error::FailedPrecondition(
                    "a targeted device joined another rollout meanwhile; nothing was created, try again".to_owned(),
                ),
                _ => Error::from(e),
            })?;
        ctx.record(
            &txn,
            "rollout.create",
            format!("rollout {id}"),
            scopes.iter().cloned().collect::<Vec<_>>().join(","),
            format!(
                "{} ({} release {}) to {count} devices in waves {sizes:?}, {state}",
                artifact.target_name, artifact.version, artifact.release_counter
            ),
        )
        .await?;
        self.events.announce(&txn, &Event::Firmware).await?;
        txn.commit().await?;
        self.events.emit(Event::Firmware);
        tracing::info!(rollout = %id, devices = count, "rollout created");
        Ok(())
    }

    /// Devices among `ids` in an unfinished rollout, with that rollout.
    async fn busy(&self, ids: &[Uuid]) -> Result<Vec<(Uuid, Uuid)>> {
        let mut busy = Vec::new();
        for chunk in ids.chunks(IN_LIST) {
            busy.extend(
                rollout_action::Entity::find()
                    .filter(rollout_action::Column::ActiveDevice.is_in(chunk.iter().copied()))
                    .all(&self.db)
                    .await?
                    .into_iter()
                    .map(|a| (a.device_id, a.rollout_id)),
            );
        }
        Ok(busy)
    }

    async fn find(&self, conn: &impl ConnectionTrait, id: Uuid) -> Result<rollout::Model> {
        rollout::Entity::find_by_id(id)
            .one(conn)
            .await?
            .ok_or_else(|| Error::NotFound(format!("rollout {id} does not exist (medfleet rollouts list)")))
    }

    pub async fn detail(&self, id: Uuid) -> Result<Detail> {
        self.detail_listing(id, DEFAULT_LISTED).await
    }

    /// The rollout with at most `listed` of its devices (`Detail::shown`).
    pub async fn detail_listing(&self, id: Uuid, listed: usize) -> Result<Detail> {
        let rollout = self.find(&self.db, id).await?;
        let artifact = firmware_artifact::Entity::find_by_id(rollout.artifact_id)
            .one(&self.db)
            .await?;
        let actions = rollout_action::Entity::find()
            .filter(rollout_action::Column::RolloutId.eq(id))
            .order_by_asc(rollout_action::Column::Wave)
            .order_by_asc(rollout_action::Column::DeviceId)
            .all(&self.db)
            .await?;
        let shown = shown(&actions, listed);
        let ids: Vec<Uuid> = shown.iter().map(|i| actions[*i].device_id).collect();
        Ok(Detail {
            rollout,
            artifact,
            actions,
            shown,
            places: places::lookup(&self.db, &ids).await?,
        })
    }

    /// Rollouts the caller sees, newest first, after the rollout `after`.
    pub async fn list(
        &self,
        visibility: &Visibility,
        state: Option<RolloutState>,
        after: Option<(chrono::DateTime<chrono::Utc>, Uuid)>,
        limit: usize,
    ) -> Result<Vec<Detail>> {
        let mut out = Vec::new();
        let mut cursor = after;
        // Invisible rollouts are skipped; a bounded number of batches keeps one call bounded.
        for _ in 0..20 {
            let mut query = rollout::Entity::find()
                .order_by_desc(rollout::Column::CreatedAt)
                .order_by_desc(rollout::Column::Id);
            if let Some(state) = state {
                query = query.filter(rollout::Column::State.eq(state.as_str()));
            }
            if let Some((at, id)) = cursor {
                query = query.filter(
                    sea_orm::Condition::any().add(rollout::Column::CreatedAt.lt(at)).add(
                        sea_orm::Condition::all()
                            .add(rollout::Column::CreatedAt.eq(at))
                            .add(rollout::Column::Id.lt(id)),
                    ),
                );
            }
            let batch = query.limit(200).all(&self.db).await?;
            let done = batch.len() < 200;
            for row in batch {
                cursor = Some((row.created_at, row.id));
                if visible(visibility, &row) {
                    // A listing shows no devices: their places are not looked up.
                    out.push(self.detail_listing(row.id, 0).await?);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
            if done {
                break;
            }
        }
        Ok(out)
    }

    /// Applies an operator command.
    pub async fn command(&self, ctx: &audit::Context, id: Uuid, command: Command, comment: &str) -> Result<Detail> {
        let txn = db::begin_write(&self.db).await?;
        let row = self.find(&txn, id).await?;
        let from = rollout_state(&row)?;
        let at = now();
        let refused = |e: medfleet_core::firmware::state::Transition| {
            Error::FailedPrecondition(format!("rollout {id} is {from}: {e}"))
        };
        let mut detail = String::new();
        let mut active = row.clone().into_active_model();
        match command {
            Command::Start => {
                from.to(RolloutState::Running).map_err(refused)?;
                if from != RolloutState::Draft {
                    return Err(Error::FailedPrecondition(format!(
                        "rollout {id} is {from}: only a draft is started (medfleet rollouts resume for a paused one)"
                    )));
                }
                active.state = Set(RolloutState::Running.as_str().to_owned());
                active.started_at = Set(Some(at));
                active.wave_started_at = Set(Some(at));
            }
            Command::Pause => {
                if from != RolloutState::Running {
                    return Err(Error::FailedPrecondition(format!(
                        "rollout {id} is {from}, not running"
                    )));
                }
                active.state = Set(RolloutState::Paused.as_str().to_owned());
            }
            Command::Resume => {
                if !matches!(from, RolloutState::Paused | RolloutState::Halted) {
                    return Err(Error::FailedPrecondition(format!(
                        "rollout {id} is {from}: only a paused or halted rollout resumes"
                    )));
                }
                detail = format!("resumed from {from} ({})", row.reason);
                active.state = Set(RolloutState::Running.as_str().to_owned());
                active.reason = Set(String::new());
                if from == RolloutState::Halted {
                    // The operator looked at the failures that halted it: judge what finishes from now on.
                    active.halt_judged_since = Set(Some(at));
                    detail.push_str("; the halt threshold now judges devices that finish from here on");
                }
                // The soak starts again: the operator looked at why it stopped.
                active.wave_succeeded_at = Set(None);
            }
            Command::Abort => {
                from.to(RolloutState::Aborted).map_err(refused)?;
                active.state = Set(RolloutState::Aborted.as_str().to_owned());
                active.reason = Set(if comment.is_empty() {
                    "aborted by an operator".to_owned()
                } else {
                    format!("aborted: {comment}")
                });
                let canceled = cancel_pending(&txn, id, "rollout_aborted", at).await?;
                detail = format!("{canceled} devices canceled");
            }
            Command::RetryFailed { include_rolled_back } => {
                if from.is_final() {
                    return Err(Error::FailedPrecondition(format!(
                        "rollout {id} is {from}: nothing to retry"
                    )));
                }
                let retried = retry_failed(&txn, id, row.current_wave, include_rolled_back, at).await?;
                detail = if include_rolled_back {
                    format!("{retried} failed or rolled-back devices queued again")
                } else {
                    format!("{retried} failed devices queued again")
                };
            }
        }
        active.updated_at = Set(at);
        active.update(&txn).await?;
        let scope = scopes_text(&row);
        let detail = if comment.is_empty() {
            detail
        } else {
            format!("{detail}; comment: {comment}")
        };
        ctx.record(&txn, command.audit_action(), format!("rollout {id}"), scope, detail)
            .await?;
        self.events.announce(&txn, &Event::Firmware).await?;
        txn.commit().await?;
        self.events.emit(Event::Firmware);
        self.detail(id).await
    }

    /// A new rollout that takes the devices `id` updated back to the image they ran before, through an image the
    /// targets role signed for that: a downgrade from this release, or the old version re-released with a higher
    /// counter. Nothing signed so → FAILED_PRECONDITION saying what to sign.
    pub async fn rollback(
        &self,
        ctx: &audit::Context,
        visibility: &Visibility,
        id: Uuid,
        (comment, draft): (&str, bool),
    ) -> Result<Detail> {
        let detail = self.detail(id).await?;
        let state = rollout_state(&detail.rollout)?;
        if !state.is_final() && state != RolloutState::Halted && state != RolloutState::Paused {
            return Err(Error::FailedPrecondition(format!(
                "rollout {id} is {state}: pause or abort it before rolling it back"
            )));
        }
        let Some(current) = detail.artifact.clone() else {
            return Err(Error::FailedPrecondition(format!(
                "the artifact of rollout {id} was deleted"
            )));
        };
        let updated: Vec<Uuid> = detail
            .actions
            .iter()
            .filter(|a| action_state(a) == ActionState::Succeeded)
            .map(|a| a.device_id)
            .collect();
        if updated.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "rollout {id} updated no device: nothing to roll back"
            )));
        }
        let previous: BTreeSet<&str> = detail
            .actions
            .iter()
            .filter(|a| action_state(a) == ActionState::Succeeded)
            .map(|a| a.from_version.as_str())
            .collect();
        let candidates = firmware_artifact::Entity::find()
            .filter(firmware_artifact::Column::HardwareId.eq(&current.hardware_id))
            .filter(firmware_artifact::Column::Id.ne(current.id))
            .order_by_desc(firmware_artifact::Column::ReleaseCounter)
            .all(&self.db)
            .await?;
        let allowed = |a: &&firmware_artifact::Model| {
            let downgrade: Vec<i64> = serde_json::from_str(&a.downgrade_from).unwrap_or_default();
            downgrade.contains(&current.release_counter)
                || (a.release_counter > current.release_counter && previous.contains(a.version.as_str()))
        };
        // The image the devices ran before, when it is allowed back; else the highest one that is.
        let back = candidates
            .iter()
            .filter(allowed)
            .find(|a| previous.contains(a.version.as_str()))
            .or_else(|| candidates.iter().find(allowed))
            .cloned();
        let Some(back) = back else {
            return Err(Error::FailedPrecondition(format!(
                "no stored image of model {} may replace release {} on the devices: authorise the image they ran \
                 before as a downgrade (medfleet firmware resign --allow-downgrade OLD.img={} …, countersign, \
                 metadata publish), then roll back again",
                current.hardware_id, current.release_counter, current.release_counter
            )));
        };
        let waves: Vec<String> = serde_json::from_str(&detail.rollout.waves).unwrap_or_else(|_| vec!["100%".into()]);
        let parse_share = |text: &str| Share::parse(text).map_err(|e| Error::Internal(format!("stored rollout: {e}")));
        let new =
            NewRollout {
                artifact: back.id.to_string(),
                targeting: Targeting::Devices(updated),
                waves: Waves::parse(&waves.join(",")).map_err(|e| Error::Internal(format!("stored rollout: {e}")))?,
                success: parse_share(&detail.rollout.success_threshold)?,
                halt_at: parse_share(&detail.rollout.halt_threshold)?,
                min_executed: u32::try_from(detail.rollout.min_executed).unwrap_or(0),
                soak: Duration::from_secs(u64::try_from(detail.rollout.soak_seconds).unwrap_or(0)),
                window: (!detail.rollout.window.is_empty()).then(|| detail.rollout.window.clone()),
                timezone: if detail.rollout.timezone.is_empty() {
                    None
                } else {
                    Some(detail.rollout.timezone.parse().map_err(|_| {
                        Error::Internal(format!("stored rollout: time zone {:?}", detail.rollout.timezone))
                    })?)
                },
                clinical_use: clinical_use_of(&detail.rollout.clinical_use),
                deadline: (detail.rollout.deadline_seconds > 0)
                    .then(|| Duration::from_secs(u64::try_from(detail.rollout.deadline_seconds).unwrap_or(0))),
                draft,
                comment: format!("rollback of {id}{}", note(comment)),
                validate_only: false,
            };
        let created = self.create(ctx, visibility, new).await?;
        let mut active = created.rollout.clone().into_active_model();
        active.rollback_of = Set(Some(id));
        active.update(&self.db).await?;
        self.detail(created.rollout.id).await
    }
}

/// `device`'s action in rollout `id`.
async fn action_of(conn: &impl ConnectionTrait, (id, device): (Uuid, Uuid)) -> Result<rollout_action::Model> {
    rollout_action::Entity::find()
        .filter(rollout_action::Column::RolloutId.eq(id))
        .filter(rollout_action::Column::DeviceId.eq(device))
        .one(conn)
        .await?
        .ok_or_else(|| Error::NotFound(format!("device {device} is not in rollout {id}")))
}

fn note(comment: &str) -> String {
    if comment.is_empty() {
        String::new()
    } else {
        format!("; comment: {comment}")
    }
}

pub fn scopes_text(row: &rollout::Model) -> String {
    serde_json::from_str::<Vec<String>>(&row.scopes).map_or_else(|_| "*".to_owned(), |s| s.join(","))
}

/// Cancels every action of the rollout that has not started installing, with `reason`; returns how many.
pub(super) async fn cancel_pending(
    conn: &impl ConnectionTrait,
    rollout: Uuid,
    reason: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<usize> {
    let actions = rollout_action::Entity::find()
        .filter(rollout_action::Column::RolloutId.eq(rollout))
        .filter(rollout_action::Column::ActiveDevice.is_not_null())
        .all(conn)
        .await?;
    let mut canceled = 0;
    for action in actions {
        let state = action_state(&action);
        if state.to(ActionState::Canceled).is_ok() {
            let mut active = action.into_active_model();
            active.state = Set(ActionState::Canceled.as_str().to_owned());
            active.reason = Set(reason.to_owned());
            active.active_device = Set(None);
            active.updated_at = Set(at);
            active.update(conn).await?;
            canceled += 1;
        }
    }
    Ok(canceled)
}

/// Queues failed actions of the waves so far again (and rolled-back ones when asked), not devices that joined
/// another rollout since nor those that only missed the deadline (retrying them would miss it again).
async fn retry_failed(
    conn: &impl ConnectionTrait,
    rollout: Uuid,
    current_wave: i32,
    include_rolled_back: bool,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<usize> {
    let mut states = vec![ActionState::Failed.as_str()];
    if include_rolled_back {
        states.push(ActionState::RolledBack.as_str());
    }
    let failed = rollout_action::Entity::find()
        .filter(rollout_action::Column::RolloutId.eq(rollout))
        .filter(rollout_action::Column::State.is_in(states))
        .filter(rollout_action::Column::Reason.ne(DEADLINE_PASSED))
        .filter(rollout_action::Column::Wave.lte(current_wave))
        .all(conn)
        .await?;
    let devices: Vec<Uuid> = failed.iter().map(|a| a.device_id).collect();
    let mut elsewhere = BTreeSet::new();
    for chunk in devices.chunks(IN_LIST) {
        elsewhere.extend(
            rollout_action::Entity::find()
                .filter(rollout_action::Column::ActiveDevice.is_in(chunk.iter().copied()))
                .all(conn)
                .await?
                .into_iter()
                .map(|a| a.device_id),
        );
    }
    let mut retried = 0;
    for action in failed {
        if elsewhere.contains(&action.device_id) {
            continue;
        }
        let device = action.device_id;
        let attempt = action.attempt.saturating_add(1);
        let mut active = action.into_active_model();
        active.attempt = Set(attempt);
        active.state = Set(ActionState::Queued.as_str().to_owned());
        active.reason = Set(String::new());
        // An approval judged the attempt it was given for; a new attempt needs its own.
        active.approved_by = Set(String::new());
        active.approved_until = Set(None);
        active.approved_association = Set(None);
        active.detail = Set(String::new());
        active.bytes_downloaded = Set(0);
        active.active_device = Set(Some(device));
        active.updated_at = Set(at);
        active.update(conn).await?;
        retried += 1;
    }
    Ok(retried)
}

/// Counts of a set of actions by what the tallies need.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub targeted: u32,
    pub queued: u32,
    pub in_progress: u32,
    pub deferred: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub rolled_back: u32,
    pub canceled: u32,
    pub expired: u32,
}

pub fn counts<'a>(actions: impl Iterator<Item = &'a rollout_action::Model>) -> Counts {
    let mut c = Counts::default();
    for a in actions {
        c.targeted += 1;
        match action_state(a) {
            ActionState::Queued => c.queued += 1,
            ActionState::Deferred => c.deferred += 1,
            ActionState::Succeeded => c.succeeded += 1,
            ActionState::Failed if a.reason == DEADLINE_PASSED => c.expired += 1,
            ActionState::Failed => c.failed += 1,
            ActionState::RolledBack => c.rolled_back += 1,
            ActionState::Canceled => c.canceled += 1,
            _ => c.in_progress += 1,
        }
    }
    c
}

/// Per-wave counts of a detail, in wave order.
pub fn wave_counts(detail: &Detail) -> BTreeMap<i32, Counts> {
    let mut waves: BTreeMap<i32, Vec<&rollout_action::Model>> = BTreeMap::new();
    for a in &detail.actions {
        waves.entry(a.wave).or_default().push(a);
    }
    waves.into_iter().map(|(w, a)| (w, counts(a.into_iter()))).collect()
}

/// Whether the rollout's maintenance window is open at `at` for a device whose site keeps `site_timezone`: in the
/// rollout's time zone if it names one, else in the site's (UTC for a device in no site). No window: always. A
/// window or zone that does not parse (stored by another version): never — an install outside the intended hours
/// is the worse mistake.
pub fn in_window(row: &rollout::Model, site_timezone: Option<&str>, at: chrono::DateTime<chrono::Utc>) -> bool {
    if row.window.is_empty() {
        return true;
    }
    let zone = if row.timezone.is_empty() {
        site_timezone.unwrap_or(medfleet_core::registry::DEFAULT_TIMEZONE)
    } else {
        row.timezone.as_str()
    };
    match (Window::parse(&row.window), zone.parse::<chrono_tz::Tz>()) {
        (Ok(window), Ok(zone)) => window.contains(at.with_timezone(&zone).naive_local()),
        _ => false,
    }
}
