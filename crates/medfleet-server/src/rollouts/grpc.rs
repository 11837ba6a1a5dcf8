//! `RolloutService`: request validation and conversion, then [`Rollouts`]; the RPC layer decided access (scopes
//! of a stored rollout, or the caller's visibility for creation and listings).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use medfleet_core::firmware::rollout::{APPROVAL_DEFAULT, APPROVAL_MAX, ClinicalUse, Share, Waves};
use medfleet_core::firmware::window::Window;
use medfleet_core::paging::{decode_token, encode_token, page_size};
use medfleet_core::validation::{Violations, check_text};
use medfleet_proto::convert;
use medfleet_proto::v1::{self, create_rollout_request, rollout_service_server::RolloutService};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;

use crate::authz::policy::visibility;
use crate::error::Error;
use crate::persistence::events::Event;
use crate::rollouts::places::Placed;
use crate::rollouts::store::{self, Command, Counts, Detail, NewRollout, Rollouts, Targeting, action_state};

type Reply<T> = Result<Response<T>, Status>;
type DetailStream = Pin<Box<dyn Stream<Item = Result<v1::RolloutDetail, Status>> + Send>>;

const MAX_COMMENT: usize = 1000;

#[derive(Debug, Clone)]
pub struct RolloutApi {
    rollouts: Rollouts,
    watchers: Arc<tokio::sync::Semaphore>,
}

impl RolloutApi {
    pub fn new(rollouts: Rollouts) -> Self {
        Self {
            rollouts,
            watchers: Arc::new(tokio::sync::Semaphore::new(WATCHERS)),
        }
    }
}

fn counts_to_wire(c: Counts) -> v1::RolloutCounts {
    v1::RolloutCounts {
        targeted: c.targeted,
        queued: c.queued,
        in_progress: c.in_progress,
        deferred: c.deferred,
        succeeded: c.succeeded,
        failed: c.failed,
        rolled_back: c.rolled_back,
        canceled: c.canceled,
        expired: c.expired,
    }
}

fn duration(seconds: i64) -> prost_types::Duration {
    convert::duration_to_wire(Duration::from_secs(u64::try_from(seconds).unwrap_or(0)))
}

fn rollout_to_wire(d: &Detail) -> v1::Rollout {
    let r = &d.rollout;
    let state = store::rollout_state(r).map_or(v1::RolloutState::Unspecified, convert::rollout_state_to_wire);
    v1::Rollout {
        id: r.id.to_string(),
        artifact_id: r.artifact_id.to_string(),
        target_name: d.artifact.as_ref().map(|a| a.target_name.clone()).unwrap_or_default(),
        version: d.artifact.as_ref().map(|a| a.version.clone()).unwrap_or_default(),
        state: state.into(),
        current_wave: u32::try_from(r.current_wave).unwrap_or(0),
        waves: serde_json::from_str(&r.waves).unwrap_or_default(),
        success_threshold: r.success_threshold.clone(),
        soak: Some(duration(r.soak_seconds)),
        halt_threshold: r.halt_threshold.clone(),
        min_executed: u32::try_from(r.min_executed).unwrap_or(0),
        window: r.window.clone(),
        timezone: r.timezone.clone(),
        clinical_use: match store::clinical_use_of(&r.clinical_use) {
            ClinicalUse::Defer => v1::ClinicalUsePolicy::Defer,
            ClinicalUse::Approve => v1::ClinicalUsePolicy::Approve,
        }
        .into(),
        deadline: Some(duration(r.deadline_seconds)),
        reason: r.reason.clone(),
        created_by: r.created_by.clone(),
        create_time: Some(convert::timestamp(r.created_at)),
        update_time: Some(convert::timestamp(r.updated_at)),
        rollback_of: r.rollback_of.map(|id| id.to_string()).unwrap_or_default(),
        comment: r.comment.clone(),
        counts: Some(counts_to_wire(store::counts(d.actions.iter()))),
    }
}

fn action_to_wire(a: &crate::persistence::entity::rollout_action::Model, place: Option<&Placed>) -> v1::RolloutDevice {
    v1::RolloutDevice {
        serial_number: place.map(|p| p.serial.clone()).unwrap_or_default(),
        location: place.map(|p| p.location.clone()).unwrap_or_default(),
        device_id: a.device_id.to_string(),
        wave: u32::try_from(a.wave).unwrap_or(0),
        state: convert::action_state_to_wire(action_state(a)).into(),
        reason: a.reason.clone(),
        detail: a.detail.clone(),
        bytes_downloaded: u64::try_from(a.bytes_downloaded).unwrap_or(0),
        update_time: Some(convert::timestamp(a.updated_at)),
        approved_by: a.approved_by.clone(),
        approved_until: a.approved_until.map(convert::timestamp),
        attempt: u32::try_from(a.attempt).unwrap_or(0),
    }
}

fn detail_to_wire(d: &Detail) -> v1::RolloutDetail {
    let shares: Vec<String> = serde_json::from_str(&d.rollout.waves).unwrap_or_default();
    let counts = store::wave_counts(d);
    let waves = shares
        .iter()
        .enumerate()
        .map(|(i, share)| {
            let index = i32::try_from(i).unwrap_or(i32::MAX);
            v1::RolloutWave {
                index: u32::try_from(i).unwrap_or(0),
                share: share.clone(),
                counts: Some(counts_to_wire(counts.get(&index).copied().unwrap_or_default())),
                start_time: (index == d.rollout.current_wave)
                    .then(|| d.rollout.wave_started_at.map(convert::timestamp))
                    .flatten(),
            }
        })
        .collect();
    v1::RolloutDetail {
        rollout: Some(rollout_to_wire(d)),
        waves,
        devices: d
            .shown
            .iter()
            .filter_map(|i| d.actions.get(*i))
            .map(|a| action_to_wire(a, d.places.get(&a.device_id)))
            .collect(),
        devices_total: u32::try_from(d.actions.len()).unwrap_or(u32::MAX),
    }
}

/// How many devices a rollout reply lists (0: the default).
fn device_limit(asked: u32) -> Result<usize, Error> {
    match usize::try_from(asked).unwrap_or(usize::MAX) {
        0 => Ok(store::DEFAULT_LISTED),
        n if n <= store::MAX_LISTED => Ok(n),
        _ => Err(Violations::single(
            "device_limit",
            format!(
                "at most {} devices per reply; the counts cover them all",
                store::MAX_LISTED
            ),
        )
        .into()),
    }
}

/// Rollout watches one replica follows at once.
const WATCHERS: usize = 256;

fn device_id(value: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(value).map_err(|_| Violations::single("device_id", "must be a device id").into())
}

fn rollout_id(field: &str, value: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(value)
        .map_err(|_| Violations::single(field, "must be a rollout id (medfleet rollouts list)").into())
}

fn comment(value: &str) -> Result<String, Error> {
    if value.is_empty() {
        return Ok(String::new());
    }
    check_text(value, MAX_COMMENT)
        .map(|()| value.to_owned())
        .map_err(|e| Violations::single("comment", e).into())
}

fn share(v: &mut Violations, field: &str, text: &str, default: &str) -> Option<Share> {
    let text = if text.is_empty() { default } else { text };
    match Share::parse(text) {
        Ok(share) => Some(share),
        Err(e) => {
            v.push(field, e.to_string());
            None
        }
    }
}

fn wire_duration(v: &mut Violations, field: &str, value: Option<prost_types::Duration>) -> Option<Duration> {
    let d = value?;
    if let (Ok(seconds), Ok(nanos)) = (u64::try_from(d.seconds), u32::try_from(d.nanos)) {
        Some(Duration::new(seconds, nanos))
    } else {
        v.push(field, "must not be negative");
        None
    }
}

fn parse_create(request: v1::CreateRolloutRequest) -> Result<NewRollout, Error> {
    let mut v = Violations::new();
    if request.artifact.is_empty() {
        v.push(
            "artifact",
            "name the artifact (id or target name; medfleet firmware list)",
        );
    }
    let targeting = match request.target {
        Some(create_rollout_request::Target::Selector(s)) => {
            let mut tags = Vec::new();
            for (i, tag) in s.tags.iter().enumerate() {
                match tag.split_once('=') {
                    Some((k, value)) if !k.is_empty() => tags.push((k.to_owned(), value.to_owned())),
                    _ => v.push(format!("selector.tags[{i}]"), "must be key=value"),
                }
            }
            let ward = if s.ward.is_empty() {
                None
            } else if let Some((site, ward)) = s.ward.split_once('/') {
                Some((site.to_owned(), ward.to_owned()))
            } else {
                v.push("selector.ward", "must be site/ward");
                None
            };
            if s.hardware_id.is_empty() && s.site.is_empty() && ward.is_none() && tags.is_empty() {
                v.push(
                    "selector",
                    "name at least a model, site, ward or tag (a rollout to everything is never implied)",
                );
            }
            Targeting::Selector {
                hardware_id: (!s.hardware_id.is_empty()).then_some(s.hardware_id),
                site: (!s.site.is_empty()).then_some(s.site),
                ward,
                tags,
            }
        }
        Some(create_rollout_request::Target::Devices(list)) => {
            let mut ids = Vec::new();
            for (i, id) in list.device_ids.iter().enumerate() {
                match Uuid::parse_str(id) {
                    Ok(id) if !ids.contains(&id) => ids.push(id),
                    Ok(_) => v.push(format!("devices.device_ids[{i}]"), "is listed twice"),
                    Err(_) => v.push(format!("devices.device_ids[{i}]"), "is not a device id"),
                }
            }
            if ids.is_empty() {
                v.push("devices.device_ids", "list at least one device");
            }
            if ids.len() > store::MAX_DEVICES {
                v.push("devices.device_ids", "at most 100000 devices per rollout");
            }
            Targeting::Devices(ids)
        }
        None => {
            v.push("target", "give a selector or a device list");
            Targeting::Devices(Vec::new())
        }
    };
    let waves_text = if request.waves.is_empty() {
        "100%".to_owned()
    } else {
        request.waves.join(",")
    };
    let waves = match Waves::parse(&waves_text) {
        Ok(w) => Some(w),
        Err(e) => {
            v.push("waves", e.to_string());
            None
        }
    };
    let success = share(&mut v, "success_threshold", &request.success_threshold, "95%");
    let halt_at = share(&mut v, "halt_threshold", &request.halt_threshold, "5%");
    let soak = wire_duration(&mut v, "soak", request.soak).unwrap_or_default();
    let deadline = wire_duration(&mut v, "deadline", request.deadline).filter(|d| !d.is_zero());
    let window = if request.window.is_empty() {
        None
    } else {
        if let Err(e) = Window::parse(&request.window) {
            v.push("window", e.to_string());
        }
        Some(request.window.clone())
    };
    // No time zone: the window is read in each device's site's.
    let timezone = if request.timezone.is_empty() {
        None
    } else {
        request.timezone.parse().map_or_else(
            |_| {
                v.push("timezone", "must be an IANA time zone such as Europe/London");
                None
            },
            Some,
        )
    };
    let clinical_use = match v1::ClinicalUsePolicy::try_from(request.clinical_use) {
        Ok(v1::ClinicalUsePolicy::Approve) => ClinicalUse::Approve,
        Ok(v1::ClinicalUsePolicy::Defer | v1::ClinicalUsePolicy::Unspecified) => ClinicalUse::Defer,
        Err(_) => {
            v.push("clinical_use", "must be defer or approve");
            ClinicalUse::Defer
        }
    };
    let comment = comment(&request.comment).unwrap_or_else(|_| {
        v.push("comment", format!("at most {MAX_COMMENT} printable characters"));
        String::new()
    });
    v.finish(|| {
        Some(NewRollout {
            artifact: request.artifact,
            targeting,
            waves: waves?,
            success: success?,
            halt_at: halt_at?,
            min_executed: if request.min_executed == 0 {
                3
            } else {
                request.min_executed
            },
            soak,
            window,
            timezone,
            clinical_use,
            deadline,
            draft: request.draft,
            validate_only: request.validate_only,
            comment,
        })
    })
    .map_err(Error::from)
}

impl RolloutApi {
    async fn command(&self, request: Request<v1::RolloutCommandRequest>, command: Command) -> Reply<v1::Rollout> {
        let ctx = crate::transport::rpc::audit_context(&request);
        let request = request.into_inner();
        let id = rollout_id("rollout", &request.rollout)?;
        let note = comment(&request.comment)?;
        let detail = self.rollouts.command(&ctx, id, command, &note).await?;
        Ok(Response::new(rollout_to_wire(&detail)))
    }
}

#[tonic::async_trait]
impl RolloutService for RolloutApi {
    #[instrument(skip_all)]
    async fn create_rollout(&self, request: Request<v1::CreateRolloutRequest>) -> Reply<v1::Rollout> {
        let ctx = crate::transport::rpc::audit_context(&request);
        let seen = visibility(&request);
        let new = parse_create(request.into_inner())?;
        let preview = new.validate_only;
        let detail = self.rollouts.create(&ctx, &seen, new).await?;
        let mut wire = rollout_to_wire(&detail);
        if preview {
            // Nothing was stored: there is no rollout to name.
            wire.id.clear();
        }
        Ok(Response::new(wire))
    }

    #[instrument(skip_all)]
    async fn list_rollouts(&self, request: Request<v1::ListRolloutsRequest>) -> Reply<v1::ListRolloutsResponse> {
        let seen = visibility(&request);
        let request = request.into_inner();
        let size = page_size(request.page_size).map_err(|e| Error::from(Violations::single("page_size", e)))?;
        let state = convert::rollout_state_from_wire(request.state);
        let fingerprint = format!("rollouts\n{}", request.state);
        let after = decode_token(&request.page_token, &fingerprint)
            .map_err(|e| Error::from(Violations::single("page_token", e)))?
            .and_then(|key| {
                let (at, id) = key.split_once(' ')?;
                Some((
                    chrono::DateTime::parse_from_rfc3339(at).ok()?.to_utc(),
                    Uuid::parse_str(id).ok()?,
                ))
            });
        let limit = usize::try_from(size).unwrap_or(100);
        let items = self.rollouts.list(&seen, state, after, limit + 1).await?;
        let more = items.len() > limit;
        let items: Vec<Detail> = items.into_iter().take(limit).collect();
        let next_page_token = if more {
            items
                .last()
                .map(|d| {
                    encode_token(
                        &format!("{} {}", d.rollout.created_at.to_rfc3339(), d.rollout.id),
                        &fingerprint,
                    )
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(v1::ListRolloutsResponse {
            rollouts: items.iter().map(rollout_to_wire).collect(),
            next_page_token,
        }))
    }

    #[instrument(skip_all)]
    async fn get_rollout(&self, request: Request<v1::GetRolloutRequest>) -> Reply<v1::RolloutDetail> {
        let request = request.into_inner();
        let id = rollout_id("rollout", &request.rollout)?;
        let listed = device_limit(request.device_limit)?;
        Ok(Response::new(detail_to_wire(
            &self.rollouts.detail_listing(id, listed).await?,
        )))
    }

    type WatchRolloutStream = DetailStream;

    #[instrument(skip_all)]
    async fn watch_rollout(&self, request: Request<v1::WatchRolloutRequest>) -> Reply<Self::WatchRolloutStream> {
        let request = request.into_inner();
        let id = rollout_id("rollout", &request.rollout)?;
        let listed = device_limit(request.device_limit)?;
        // Each watcher re-reads the rollout on every change: a bounded number per replica.
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this server already follows {WATCHERS} rollout watches; end one, or use rollouts show"
            ))
        })?;
        let first = self.rollouts.detail_listing(id, listed).await?;
        let rollouts = self.rollouts.clone();
        let mut events = rollouts.events().subscribe();
        let stream = async_stream(move |tx| async move {
            let _permit = permit;
            let mut last = detail_to_wire(&first);
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            let mut ticks = tokio::time::interval(Duration::from_secs(2));
            loop {
                if let Some(rollout) = &last.rollout
                    && matches!(
                        v1::RolloutState::try_from(rollout.state),
                        Ok(v1::RolloutState::Completed | v1::RolloutState::Aborted)
                    )
                {
                    return;
                }
                tokio::select! {
                    () = tx.closed() => return,
                    event = events.recv() => match event {
                        Ok(
                            Event::Firmware
                            | Event::FirmwareDevice { .. }
                            | Event::FirmwareProgress
                            | Event::Resync,
                        )
                        | Err(broadcast::error::RecvError::Lagged(_)) => {
                            // A wave's reports come in bursts: one re-read answers all that are already here.
                            while events.try_recv().is_ok() {}
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    // Another replica's changes arrive by notification; this re-read covers a lost one.
                    _ = ticks.tick() => {}
                }
                let now = match rollouts.detail_listing(id, listed).await {
                    Ok(detail) => detail_to_wire(&detail),
                    Err(error) => {
                        let _ = tx.send(Err(Status::from(error))).await;
                        return;
                    }
                };
                if now != last {
                    last = now;
                    if tx.send(Ok(last.clone())).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn start_rollout(&self, request: Request<v1::RolloutCommandRequest>) -> Reply<v1::Rollout> {
        self.command(request, Command::Start).await
    }

    async fn pause_rollout(&self, request: Request<v1::RolloutCommandRequest>) -> Reply<v1::Rollout> {
        self.command(request, Command::Pause).await
    }

    async fn resume_rollout(&self, request: Request<v1::RolloutCommandRequest>) -> Reply<v1::Rollout> {
        self.command(request, Command::Resume).await
    }

    async fn abort_rollout(&self, request: Request<v1::RolloutCommandRequest>) -> Reply<v1::Rollout> {
        self.command(request, Command::Abort).await
    }

    async fn retry_failed(&self, request: Request<v1::RolloutCommandRequest>) -> Reply<v1::Rollout> {
        let include_rolled_back = request.get_ref().include_rolled_back;
        self.command(request, Command::RetryFailed { include_rolled_back })
            .await
    }

    #[instrument(skip_all)]
    async fn approve_device(&self, request: Request<v1::ApproveDeviceRequest>) -> Reply<v1::RolloutDevice> {
        let ctx = crate::transport::rpc::audit_context(&request);
        let request = request.into_inner();
        let id = rollout_id("rollout", &request.rollout)?;
        let device = device_id(&request.device_id)?;
        let note = comment(&request.comment)?;
        let mut v = Violations::new();
        if note.is_empty() {
            v.push(
                "comment",
                "say why installing now is safe for this patient (it is kept in the audit trail)",
            );
        }
        let valid_for = wire_duration(&mut v, "valid_for", request.valid_for)
            .filter(|d| !d.is_zero())
            .unwrap_or(APPROVAL_DEFAULT);
        if valid_for < Duration::from_mins(1) || valid_for > APPROVAL_MAX {
            v.push(
                "valid_for",
                "must be 1 minute to 24 hours: an approval judges one patient's situation now, not for days",
            );
        }
        let valid_for = v.finish(|| Some(valid_for)).map_err(Error::from)?;
        let action = self.rollouts.approve(&ctx, (id, device), valid_for, &note).await?;
        let places = self.rollouts.places(&[device]).await?;
        Ok(Response::new(action_to_wire(&action, places.get(&device))))
    }

    #[instrument(skip_all)]
    async fn abandon_device(&self, request: Request<v1::AbandonDeviceRequest>) -> Reply<v1::RolloutDevice> {
        let ctx = crate::transport::rpc::audit_context(&request);
        let request = request.into_inner();
        let id = rollout_id("rollout", &request.rollout)?;
        let device = device_id(&request.device_id)?;
        let note = comment(&request.comment)?;
        if note.trim().is_empty() {
            return Err(Error::from(Violations::single(
                "comment",
                "say why the device will not finish (it is kept in the audit trail)",
            ))
            .into());
        }
        let action = self.rollouts.abandon(&ctx, (id, device), &note).await?;
        let places = self.rollouts.places(&[device]).await?;
        Ok(Response::new(action_to_wire(&action, places.get(&device))))
    }

    #[instrument(skip_all)]
    async fn rollback_rollout(&self, request: Request<v1::RollbackRolloutRequest>) -> Reply<v1::Rollout> {
        let ctx = crate::transport::rpc::audit_context(&request);
        // The RPC layer checked rollout:create on every place the rollout touched; the devices it updated may have
        // moved since, so the new rollout is bounded by the caller's own scopes (a device outside them refuses it).
        let seen = visibility(&request);
        let request = request.into_inner();
        let id = rollout_id("rollout", &request.rollout)?;
        let note = comment(&request.comment)?;
        let detail = self.rollouts.rollback(&ctx, &seen, id, (&note, request.draft)).await?;
        Ok(Response::new(rollout_to_wire(&detail)))
    }
}

/// A stream fed by a task through a small channel (backpressure: a slow watcher is sent less often, not more).
fn async_stream<F, Fut>(body: F) -> DetailStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<v1::RolloutDetail, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
