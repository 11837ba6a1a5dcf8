//! The replica's session hub: the device sessions it holds and what they are sent.
//!
//! Each replica keeps the sessions it holds in a [`Hub`]. A session opens with a Hello naming the certificate's
//! own device; the hub records it as the device's current session in the database (so any older session, on this
//! or another replica, ends with ABORTED), sends the desired configuration if it differs from what the device
//! runs, then follows heartbeats and configuration reports. A session silent for the heartbeat timeout is closed
//! and the device marked offline; a replica that dies leaves rows that every replica's sweeper marks offline.
//!
//! Configuration pushes and firmware commands (asked of `rollouts::dispatch`) are driven by change events (local,
//! or PostgreSQL notifications from other replicas) and by a periodic reconcile that repairs whatever a lost
//! notification missed; the device's firmware reports go to `rollouts::dispatch` too.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use medfleet_core::device_config::LayerSet;
use medfleet_core::presence::{OperationalState, ReportedConfig};
use medfleet_core::validation::printable;
use medfleet_proto::convert;
use medfleet_proto::v1::{self, session_request, session_response};
use sea_orm::DatabaseConnection;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use uuid::Uuid;

use crate::device_config::store::{load_layers, load_placements};
use crate::devices::presence::{self, Opening};
use crate::error::Result;
use crate::persistence::events::{Event, Events};
use crate::rollouts::dispatch;
use crate::telemetry::Metrics;
use medfleet_core::firmware::state::ActionState;

/// A device must say hello this soon after opening its session.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Commands queued for one device before pushes wait for the next reconcile.
const OUTBOUND_CAPACITY: usize = 16;

#[derive(Debug, Clone, Copy)]
pub struct SessionSettings {
    /// A session silent this long is closed and its device marked offline.
    pub heartbeat_timeout: Duration,
    /// How often every session is re-checked against the database (lost notifications, missed takeovers).
    pub reconcile_interval: Duration,
}

impl SessionSettings {
    /// Devices are asked to beat three times per timeout, so one lost heartbeat never takes a device offline.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_timeout / 3
    }

    /// `last_seen` is written in batches this often; well inside the timeout so the sweeper never sees a live
    /// device as stale.
    fn flush_interval(&self) -> Duration {
        (self.heartbeat_timeout / 4).min(Duration::from_secs(5))
    }
}

/// How a session is told to end, and with which status.
#[derive(Debug, Default)]
struct Ending {
    token: CancellationToken,
    reason: Mutex<Option<Status>>,
}

impl Ending {
    fn end(&self, reason: Option<Status>) {
        if let Some(reason) = reason
            && let Ok(mut slot) = self.reason.lock()
        {
            slot.get_or_insert(reason);
        }
        self.token.cancel();
    }

    fn reason(&self) -> Option<Status> {
        self.reason.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// What a device receives on its session: the hub's messages, then why the session ended.
pub type SessionStream = Pin<Box<dyn Stream<Item = std::result::Result<v1::SessionResponse, Status>> + Send>>;

type Outbound = mpsc::Sender<Result<v1::SessionResponse, Status>>;

#[derive(Debug)]
struct Live {
    session: Uuid,
    tx: Outbound,
    ending: Arc<Ending>,
    /// The digest last sent to, or reported by, the device: a push is due when the desired digest differs.
    sent: Option<String>,
    state: OperationalState,
    /// Heard from since `last_seen` was last written.
    heard: bool,
    /// The firmware action this session was told about, and whether it was told to install.
    firmware: Option<dispatch::Sent>,
}

/// The sessions this replica holds.
#[derive(Debug)]
pub struct Hub {
    db: DatabaseConnection,
    events: Arc<Events>,
    replica: String,
    settings: SessionSettings,
    live: Mutex<HashMap<Uuid, Live>>,
    /// Layers cached between configuration changes; `generation` moves on every change event.
    layers: Mutex<Option<(u64, Arc<LayerSet>)>>,
    generation: AtomicU64,
    /// Serialises pushes, so a push computed from older layers can never overtake a newer one.
    pushing: tokio::sync::Mutex<()>,
    /// Serialises firmware dispatch, so two triggers never send one command twice.
    dispatching: tokio::sync::Mutex<()>,
    /// Configuration reports waiting to be written; the writer takes whatever has queued (group commit).
    reports: Mutex<Vec<presence::Report>>,
    reported: tokio::sync::Notify,
    metrics: Metrics,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the map half-updated (single inserts and removes).
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Hub {
    pub fn new(
        db: DatabaseConnection,
        events: Arc<Events>,
        replica: String,
        settings: SessionSettings,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            reports: Mutex::new(Vec::new()),
            reported: tokio::sync::Notify::new(),
            metrics,
            db,
            events,
            replica,
            settings,
            live: Mutex::new(HashMap::new()),
            layers: Mutex::new(None),
            generation: AtomicU64::new(0),
            pushing: tokio::sync::Mutex::new(()),
            dispatching: tokio::sync::Mutex::new(()),
        })
    }

    pub fn settings(&self) -> SessionSettings {
        self.settings
    }

    /// Sessions open on this replica.
    pub fn open_sessions(&self) -> usize {
        lock(&self.live).len()
    }

    /// Writes queued configuration reports until `stop`, each batch in one transaction.
    fn spawn_report_writer(self: &Arc<Self>, stop: CancellationToken) {
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                let batch = std::mem::take(&mut *lock(&hub.reports));
                if batch.is_empty() {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = hub.reported.notified() => continue,
                    }
                }
                for report in &batch {
                    let outcome = if report.reported.rejection.is_some() {
                        "rejected"
                    } else {
                        "applied"
                    };
                    hub.metrics.record_config_report(outcome);
                }
                if let Err(error) = presence::record_reports(&hub.db, &hub.events, &batch).await {
                    // The device repeats what it runs in its next hello; drift shows it until then.
                    tracing::warn!(%error, reports = batch.len(), "configuration reports not recorded");
                }
            }
        });
    }

    /// Follows change events, writes heartbeats, sweeps stale devices and reconciles, until `stop`.
    pub fn spawn(self: &Arc<Self>, stop: CancellationToken) {
        self.spawn_report_writer(stop.clone());
        let hub = self.clone();
        let mut events = self.events.subscribe();
        tokio::spawn(async move {
            let mut flush = tokio::time::interval(hub.settings.flush_interval());
            let mut reconcile = tokio::time::interval(hub.settings.reconcile_interval);
            flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let outcome = tokio::select! {
                    () = stop.cancelled() => break,
                    event = events.recv() => match event {
                        Ok(Event::Config) => {
                            hub.invalidate();
                            hub.push_all().await
                        }
                        Ok(Event::SessionOpened { device, session }) => hub.superseded(device, session).await,
                        Ok(Event::Firmware) => hub.dispatch_firmware(None).await,
                        Ok(Event::FirmwareDevice { device }) => hub.dispatch_firmware(Some(&[device])).await,
                        Ok(Event::Presence { .. } | Event::Outbox | Event::FirmwareProgress) => Ok(()),
                        Ok(Event::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => hub.reconcile().await,
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = flush.tick() => hub.flush().await,
                    _ = reconcile.tick() => hub.reconcile().await,
                };
                if let Err(error) = outcome {
                    tracing::warn!(%error, "session hub: step failed; the next reconcile retries");
                }
            }
            // Shutting down: end every session so devices reconnect to another replica at once.
            let sessions: Vec<(Uuid, Uuid, Arc<Ending>)> = lock(&hub.live)
                .iter()
                .map(|(d, l)| (*d, l.session, l.ending.clone()))
                .collect();
            for (_, _, ending) in &sessions {
                ending.end(Some(Status::unavailable(
                    "this medfleetd replica is shutting down; reconnect",
                )));
            }
        });
    }

    fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    async fn layers(&self) -> Result<Arc<LayerSet>> {
        let generation = self.generation.load(Ordering::Acquire);
        if let Some((cached, set)) = lock(&self.layers).as_ref()
            && *cached == generation
        {
            return Ok(set.clone());
        }
        let set = Arc::new(load_layers(&self.db).await?);
        // A change event that arrived while loading makes this set stale: use it once, do not cache it.
        if self.generation.load(Ordering::Acquire) == generation {
            *lock(&self.layers) = Some((generation, set.clone()));
        }
        Ok(set)
    }

    /// Sends every held session whose desired configuration differs from what it runs (or was last sent).
    async fn push_all(&self) -> Result<()> {
        let devices: Vec<Uuid> = lock(&self.live).keys().copied().collect();
        self.push(&devices).await
    }

    async fn push(&self, devices: &[Uuid]) -> Result<()> {
        if devices.is_empty() {
            return Ok(());
        }
        let _serial = self.pushing.lock().await;
        let layers = self.layers().await?;
        let placements = load_placements(&self.db, devices).await?;
        let mut live = lock(&self.live);
        let mut pushed = 0_usize;
        for (device, placement) in placements {
            let Some(entry) = live.get_mut(&device) else {
                continue;
            };
            let desired = layers.desired(&placement);
            // No layer applies and the device runs nothing: there is nothing to send.
            let nothing = desired.version == 0 && entry.sent.is_none();
            if nothing || entry.sent.as_deref() == Some(desired.digest.as_str()) {
                continue;
            }
            let command = v1::SessionResponse {
                message: Some(session_response::Message::ApplyConfig(v1::ApplyConfig {
                    version: desired.version,
                    digest: desired.digest.clone(),
                    document_json: desired.resolved.document.to_string(),
                })),
            };
            // A device whose queue is full gets it at the next reconcile instead of stalling everyone else.
            if entry.tx.try_send(Ok(command)).is_ok() {
                entry.sent = Some(desired.digest);
                pushed += 1;
            } else {
                self.metrics.record_config_push("deferred");
            }
        }
        drop(live);
        if pushed > 0 {
            self.metrics.record_config_pushes(pushed);
            tracing::debug!(pushed, "configuration pushed");
        }
        Ok(())
    }

    /// Another session of `device` opened somewhere: end ours if the database agrees it is no longer current.
    async fn superseded(&self, device: Uuid, session: Uuid) -> Result<()> {
        let ours = lock(&self.live).get(&device).map(|l| l.session);
        match ours {
            Some(ours) if ours != session => {
                let current = presence::current_sessions(&self.db, &[device]).await?;
                if current.get(&device) != Some(&ours) {
                    self.end_replaced(device, ours);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn end_replaced(&self, device: Uuid, session: Uuid) {
        let mut live = lock(&self.live);
        if live.get(&device).is_some_and(|l| l.session == session)
            && let Some(old) = live.remove(&device)
        {
            tracing::info!(%device, "session replaced by a newer session of the same device");
            old.ending.end(Some(replaced()));
        }
    }

    /// Writes `last_seen` for the sessions heard from, then marks stale devices offline.
    async fn flush(&self) -> Result<()> {
        let heard: Vec<Uuid> = lock(&self.live)
            .values_mut()
            .filter_map(|l| std::mem::take(&mut l.heard).then_some(l.session))
            .collect();
        presence::touch(&self.db, &heard).await?;
        presence::sweep(&self.db, &self.events, self.settings.heartbeat_timeout).await?;
        Ok(())
    }

    /// Ends sessions the database no longer names as current (a takeover whose notification was lost), then pushes
    /// whatever differs.
    async fn reconcile(&self) -> Result<()> {
        let held: Vec<(Uuid, Uuid)> = lock(&self.live).iter().map(|(d, l)| (*d, l.session)).collect();
        let devices: Vec<Uuid> = held.iter().map(|(d, _)| *d).collect();
        let current = presence::current_sessions(&self.db, &devices).await?;
        for (device, session) in held {
            if current.get(&device) != Some(&session) {
                self.end_replaced(device, session);
            }
        }
        self.invalidate();
        self.push_all().await?;
        self.dispatch_firmware(None).await
    }

    /// Sends held sessions (all, or `only`) the firmware commands due for them, each once per session.
    async fn dispatch_firmware(&self, only: Option<&[Uuid]>) -> Result<()> {
        let _serial = self.dispatching.lock().await;
        let held: Vec<dispatch::Held> = {
            let live = lock(&self.live);
            let held = |(device, l): (&Uuid, &Live)| dispatch::Held {
                device: *device,
                state: l.state,
                sent: l.firmware,
            };
            match only {
                Some(devices) => devices.iter().filter_map(|d| live.get_key_value(d)).map(held).collect(),
                None => live.iter().map(held).collect(),
            }
        };
        let due = dispatch::due(&self.db, &self.events, &held).await?;
        let mut live = lock(&self.live);
        for command in due {
            let Some(entry) = live.get_mut(&command.device) else {
                continue;
            };
            let message = v1::SessionResponse {
                message: Some(command.message),
            };
            // A full queue retries at the next dispatch: nothing is marked sent.
            if entry.tx.try_send(Ok(message)).is_ok() {
                entry.firmware = command.sent;
            }
        }
        Ok(())
    }

    /// Makes `live` the device's session here, ending any older one this replica holds.
    fn register(&self, device: Uuid, live: Live) {
        let mut sessions = lock(&self.live);
        let old = sessions.insert(device, live);
        self.metrics.set_device_sessions(sessions.len());
        drop(sessions);
        if let Some(old) = old {
            tracing::info!(%device, "session replaced by a newer session of the same device");
            old.ending.end(Some(replaced()));
        }
    }

    fn unregister(&self, device: Uuid, session: Uuid) {
        let mut live = lock(&self.live);
        if live.get(&device).is_some_and(|l| l.session == session) {
            live.remove(&device);
        }
        self.metrics.set_device_sessions(live.len());
    }

    fn with_live<T>(&self, device: Uuid, session: Uuid, f: impl FnOnce(&mut Live) -> T) -> Option<T> {
        let mut live = lock(&self.live);
        live.get_mut(&device).filter(|l| l.session == session).map(f)
    }
}

impl Hub {
    /// Opens the session a device said Hello on: records it as the device's current session (ending any older
    /// one, on any replica), welcomes it, pushes the desired configuration if it differs, and follows the rest
    /// of the stream. The stream returned is what the device receives, ending with the reason the session ended.
    pub async fn open(
        self: Arc<Self>,
        id: Uuid,
        hello: &v1::Hello,
        not_after: Option<std::time::SystemTime>,
        inbound: Streaming<v1::SessionRequest>,
    ) -> Result<SessionStream> {
        let session = Uuid::new_v4();
        let reported = ReportedConfig {
            version: hello.applied_config_version,
            digest: bounded(&hello.applied_config_digest, 64),
            rejection: None,
        };
        let state = convert::operational_state_from_wire(hello.operational_state);
        presence::open(
            &self.db,
            &self.events,
            &Opening {
                device: id,
                session,
                replica: self.replica.clone(),
                state,
                firmware_version: bounded(&hello.firmware_version, 200),
                reported: reported.clone(),
            },
        )
        .await?;
        tracing::info!(device = %id, firmware = %printable(&hello.firmware_version), "session opened");

        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        let welcome = v1::SessionResponse {
            message: Some(session_response::Message::Welcome(v1::Welcome {
                server_time: Some(convert::timestamp(crate::persistence::db::now())),
                certificate_not_after: not_after.map(|at| convert::timestamp(at.into())),
                heartbeat_interval: Some(convert::duration_to_wire(self.settings.heartbeat_interval())),
            })),
        };
        // The channel is empty: the welcome always fits and goes first.
        let _ = tx.try_send(Ok(welcome));
        let ending = Arc::new(Ending::default());
        self.register(
            id,
            Live {
                session,
                tx: tx.clone(),
                ending: ending.clone(),
                sent: (!reported.digest.is_empty()).then(|| reported.digest.clone()),
                state,
                heard: false,
                firmware: None,
            },
        );
        if let Err(error) = self.push(&[id]).await {
            tracing::warn!(device = %id, %error, "initial configuration push failed; the next reconcile retries");
        }
        if let Err(error) = self.dispatch_firmware(Some(&[id])).await {
            tracing::warn!(device = %id, %error, "firmware dispatch failed; the next reconcile retries");
        }
        tokio::spawn(follow(self, id, session, inbound, ending.clone(), tx));

        let closing = ending.clone();
        let end = futures::stream::once(async move {
            closing.token.cancelled().await;
            closing.reason().map(Err)
        })
        .filter_map(std::future::ready);
        let outbound = futures::stream::select(ReceiverStream::new(rx), end);
        Ok(Box::pin(outbound))
    }
}

fn replaced() -> Status {
    Status::aborted("a newer session of this device was opened; this one is closed")
}

/// Reads the device's side of the session until it leaves, falls silent, or the session is ended.
async fn follow(
    hub: Arc<Hub>,
    device: Uuid,
    session: Uuid,
    mut inbound: Streaming<v1::SessionRequest>,
    ending: Arc<Ending>,
    tx: Outbound,
) {
    let timeout = hub.settings.heartbeat_timeout;
    let mut pace = super::pace::Pace::new(
        super::pace::WRITES_PER_SECOND,
        super::pace::BURST,
        std::time::Instant::now(),
    );
    let mut paced = false;
    loop {
        let message = tokio::select! {
            () = ending.token.cancelled() => break,
            message = tokio::time::timeout(timeout, inbound.message()) => message,
        };
        let message = match message {
            Err(_) => {
                tracing::info!(%device, ?timeout, "session closed: no heartbeat within the timeout");
                ending.end(Some(Status::deadline_exceeded(format!(
                    "no heartbeat for {}; the device is marked offline, reconnect",
                    humantime::format_duration(timeout)
                ))));
                break;
            }
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => break,
            Ok(Err(status)) => {
                tracing::debug!(%device, code = ?status.code(), "session stream ended");
                break;
            }
        };
        let wait = pace.take(std::time::Instant::now());
        if !wait.is_zero() {
            if !paced {
                paced = true;
                tracing::warn!(%device, per_second = super::pace::WRITES_PER_SECOND, "the device sends faster than a device needs; its session is slowed");
            }
            tokio::select! {
                () = ending.token.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        if let Err(error) = handle(&hub, device, session, message).await {
            tracing::warn!(%device, %error, "session message not recorded");
        }
    }
    // The outbound side ends with the session: the hub's sender goes with unregister, ours here.
    drop(tx);
    hub.unregister(device, session);
    ending.token.cancel();
    match presence::close(&hub.db, &hub.events, device, session).await {
        Ok(true) => tracing::info!(%device, "session closed; device offline"),
        Ok(false) => tracing::info!(%device, "session closed (replaced)"),
        Err(error) => {
            tracing::warn!(%device, %error, "could not mark the device offline; the sweeper will");
        }
    }
}

async fn handle(hub: &Hub, device: Uuid, session: Uuid, message: v1::SessionRequest) -> Result<()> {
    match message.message {
        Some(session_request::Message::Heartbeat(beat)) => {
            let state = convert::operational_state_from_wire(beat.operational_state);
            let changed = hub
                .with_live(device, session, |l| {
                    l.heard = true;
                    std::mem::replace(&mut l.state, state) != state
                })
                .unwrap_or(false);
            if changed {
                presence::set_state(&hub.db, &hub.events, device, session, state).await?;
                // A device that became free may install what waits for it.
                hub.dispatch_firmware(Some(&[device])).await?;
            }
        }
        Some(session_request::Message::ConfigReport(report)) => {
            let digest = bounded(&report.digest, 64);
            let rejection = (!report.applied).then(|| {
                let reason = bounded(&report.rejection_reason, 1000);
                if reason.is_empty() {
                    "rejected without a reason".to_owned()
                } else {
                    reason
                }
            });
            if let Some(reason) = &rejection {
                tracing::warn!(%device, version = report.version, reason = %printable(reason), "device rejected its configuration");
            } else {
                tracing::debug!(%device, version = report.version, "configuration applied");
            }
            hub.with_live(device, session, |l| {
                l.heard = true;
                l.sent = Some(digest.clone());
            });
            lock(&hub.reports).push(presence::Report {
                device,
                session,
                reported: ReportedConfig {
                    version: report.version,
                    digest,
                    rejection,
                },
            });
            hub.reported.notify_one();
        }
        Some(session_request::Message::Hello(_)) => {
            return Err(crate::error::Error::FailedPrecondition(
                "Hello was sent twice; ignored".to_owned(),
            ));
        }
        Some(session_request::Message::FirmwareReport(report)) => {
            hub.with_live(device, session, |l| l.heard = true);
            let state = dispatch::report(&hub.db, &hub.events, device, &report).await?;
            if let Some(state) = state {
                hub.metrics.record_firmware_report(state.as_str());
                hub.with_live(device, session, |l| {
                    if state.is_final() {
                        l.firmware = None;
                    } else if state == ActionState::Deferred
                        && let Some(sent) = l.firmware.as_mut()
                    {
                        // The device refused to install (in use by its own account): ask again when it may.
                        sent.install = false;
                    }
                });
            }
            hub.dispatch_firmware(Some(&[device])).await?;
        }
        None => {}
    }
    Ok(())
}

/// A device-supplied string, cut to what storage holds.
fn bounded(value: &str, max: usize) -> String {
    value.chars().take(max).collect()
}
