//! The device side of firmware updates. It owns the device's trust in firmware (the pinned TUF root, replaced
//! only by a verified rotation, and tough's datastore against rollback), the download of an update (resumable,
//! bounded by the signed length, checked through tough before it is staged), the A/B slots (`slots`), and the
//! answers to medfleetd's commands: FirmwareUpdate (fetch and verify, report `downloaded`), FirmwareInstall
//! (refused while the device is in clinical use; write the other slot, arm a trial, "reboot" — the session
//! ends and the device comes back on the new image), the health check after that boot (commit, or fall back to
//! the old slot by itself), and FirmwareCancel.
//!
//! Every (action, attempt) the device finished is remembered, so a replayed command is answered with how it
//! ended and never carried out twice. Fault injection (`Faults`) lets the simulator and the tests make installs
//! and health checks fail, downloads slow or cut.

mod download;
mod install;
mod slots;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use medfleet_core::firmware::state::ActionState;
use medfleet_core::firmware::target::Installed;
use medfleet_core::firmware::tuf;
use medfleet_proto::v1::{self, session_request, session_response};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::state::StateDir;
pub(crate) use slots::Slots;
use slots::{Boot, Finished, Paths, Trial};

/// What the device is and which faults to inject.
#[derive(Debug, Clone, Default)]
pub(crate) struct FirmwareOptions {
    /// The TUF root to pin on first start (`medfleet firmware keys init` writes it).
    pub(crate) tuf_root: Option<PathBuf>,
    /// The device model signed targets must name.
    pub(crate) hardware_id: String,
    /// The version of the factory image (before any signed firmware is installed).
    pub(crate) factory_version: String,
    pub(crate) faults: Faults,
}

/// Injected faults (simulation and tests). Decisions are derived from the device, action and attempt, so a run is
/// reproducible and a retry may succeed where the first attempt failed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Faults {
    /// Share of installs that fail (0–1).
    pub(crate) install_failure: f64,
    /// Share of health checks after an install that fail (the device rolls back by itself).
    pub(crate) health_failure: f64,
    /// Download at most this many bytes per second.
    pub(crate) download_rate: Option<u64>,
    /// Break off each download stream after this many bytes (the device resumes from where it stopped).
    pub(crate) cut_download_after: Option<u64>,
    /// Write the new slot at most this many bytes per second.
    pub(crate) write_rate: Option<u64>,
}

/// Why a step did not go through.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Worth another try (the network, the server): the partial download stays.
    Transient(String),
    /// The action fails with this stable reason.
    Final { reason: String, detail: String },
}

/// What firmware work may use of the current session.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) tx: mpsc::Sender<v1::SessionRequest>,
    pub(crate) channel: Channel,
    /// Asks the session to end so the device "reboots" onto the slot it should run.
    pub(crate) reboot: mpsc::Sender<()>,
    pub(crate) state: watch::Receiver<v1::OperationalState>,
}

#[derive(Debug)]
struct Job {
    action: String,
    attempt: u32,
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

/// An update fetched and verified this run, waiting for its install command.
#[derive(Debug, Clone)]
struct Prepared {
    action: String,
    attempt: u32,
    target: tuf::SignedTarget,
    staged: PathBuf,
}

#[derive(Debug)]
struct Shared {
    paths: Paths,
    options: FirmwareOptions,
    device_id: String,
    quiet: bool,
    slots: Mutex<Slots>,
    prepared: Mutex<Option<Prepared>>,
}

/// One device's firmware.
#[derive(Debug)]
pub(crate) struct Firmware {
    shared: Arc<Shared>,
    job: Option<Job>,
    /// A fallback found at boot, reported once the session is up.
    fell_back: Option<Finished>,
}

impl Firmware {
    /// Opens the device's firmware state; pins `options.tuf_root` when the device trusts no root yet.
    pub(crate) fn open(dir: &StateDir, options: FirmwareOptions, device_id: &str, quiet: bool) -> anyhow::Result<Self> {
        let paths = Paths::new(dir.root());
        std::fs::create_dir_all(paths.root()).with_context(|| format!("cannot create {}", paths.root().display()))?;
        if let Some(given) = &options.tuf_root {
            pin_root(&paths, given)?;
        }
        let slots = paths.load()?;
        Ok(Self {
            shared: Arc::new(Shared {
                paths,
                options,
                device_id: device_id.to_owned(),
                quiet,
                slots: Mutex::new(slots),
                prepared: Mutex::new(None),
            }),
            job: None,
            fell_back: None,
        })
    }

    /// Starting the device (process start, or after an install's reboot): runs a freshly installed slot once, or
    /// falls back from one that never proved healthy.
    pub(crate) fn boot(&mut self) -> anyhow::Result<()> {
        let shared = &self.shared;
        let mut slots = lock(&shared.slots);
        let boot = slots.boot();
        shared.paths.save(&slots)?;
        if let Boot::FellBack(finished) = boot {
            tracing::warn!(device = %shared.device_id, action = %finished.action, "the new firmware did not prove healthy before a restart; running the previous slot");
            self.fell_back = Some(finished);
        }
        Ok(())
    }

    /// The version and release counter the device runs.
    pub(crate) fn running(&self) -> (String, u64) {
        running_of(&self.shared)
    }

    /// The session is up: report a fallback found at boot, and check the health of a new image.
    pub(crate) fn connected(&mut self, link: &Link) {
        if let Some(finished) = self.fell_back.take() {
            let report = report_of(
                &self.shared,
                &finished.action,
                finished.attempt,
                finished.state(),
                0,
                &finished.reason,
                &finished.detail,
            );
            let tx = link.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(report).await;
            });
        }
        let trial = lock(&self.shared.slots).trial.clone();
        if let Some(trial) = trial.filter(|t| t.booted) {
            self.start(&trial.action.clone(), trial.attempt, link, |shared, link, _| {
                health(shared, link, trial)
            });
        }
    }

    /// The session ended: stop work in flight (a download resumes from its partial file next time).
    pub(crate) fn disconnected(&mut self) {
        if let Some(job) = self.job.take() {
            job.cancel.cancel();
            job.handle.abort();
        }
    }

    /// A firmware command from medfleetd.
    pub(crate) fn handle(&mut self, message: session_response::Message, link: &Link) {
        // While a new image is on trial, nothing else may run: its health check decides between it and the
        // known-good slot, and a second update would overwrite the only good image.
        let on_trial = lock(&self.shared.slots).trial.as_ref().map(|t| t.action.clone());
        if let Some(trial) = on_trial {
            let other = match &message {
                session_response::Message::FirmwareUpdate(m) => Some(&m.action_id),
                session_response::Message::FirmwareInstall(m) => Some(&m.action_id),
                session_response::Message::FirmwareCancel(m) => Some(&m.action_id),
                _ => None,
            };
            if let Some(other) = other
                && *other != trial
            {
                tracing::warn!(action = %other, trial = %trial, "firmware command ignored: another image is on trial");
                let attempt = match &message {
                    session_response::Message::FirmwareUpdate(m) => Some(m.attempt),
                    _ => None,
                };
                if let Some(attempt) = attempt {
                    // Said, so the server asks again once the trial is decided instead of waiting for a report.
                    let report = report_of(
                        &self.shared,
                        other,
                        attempt,
                        ActionState::Deferred,
                        0,
                        "busy_on_trial",
                        "another image is on trial on this device; it is offered again once that is decided",
                    );
                    let tx = link.tx.clone();
                    tokio::spawn(async move {
                        let _ = tx.send(report).await;
                    });
                }
                return;
            }
            if let session_response::Message::FirmwareCancel(cancel) = &message {
                // Armed but not yet booted: nothing new runs yet, so the cancel still holds (the server judged
                // the action before the device's `installing` reached it). Once booted, the health check goes on.
                self.disarm_unbooted(&cancel.action_id);
                return;
            }
        }
        match message {
            session_response::Message::FirmwareUpdate(update) => {
                if self.replayed(&update.action_id, update.attempt, link)
                    || self.busy(&update.action_id, update.attempt)
                {
                    return;
                }
                event!(self.shared.quiet, device = %self.shared.device_id, action = %update.action_id, target = %update.target_name, "firmware update offered");
                let action = update.action_id.clone();
                self.start(&action, update.attempt, link, move |shared, link, _| {
                    prepare(shared, link, update)
                });
            }
            session_response::Message::FirmwareInstall(install) => {
                if self.replayed(&install.action_id, install.attempt, link) {
                    return;
                }
                let action = install.action_id.clone();
                self.start(&action, install.attempt, link, move |shared, link, previous| {
                    install::install(shared, link, install, previous)
                });
            }
            session_response::Message::FirmwareCancel(cancel) => {
                let attempt = match &self.job {
                    Some(job) if job.action == cancel.action_id => {
                        job.cancel.cancel();
                        job.handle.abort();
                        job.attempt
                    }
                    Some(job) if !job.handle.is_finished() => {
                        // Another action is in flight: its job, download and staged image are not this cancel's.
                        tracing::info!(action = %cancel.action_id, running = %job.action, "cancel of an action not running here; recorded only");
                        let mut slots = lock(&self.shared.slots);
                        slots.finish(Finished {
                            action: cancel.action_id.clone(),
                            attempt: 0,
                            state: ActionState::Canceled.as_str().to_owned(),
                            reason: String::new(),
                            detail: "canceled by medfleetd".to_owned(),
                        });
                        if let Err(error) = self.shared.paths.save(&slots) {
                            tracing::warn!(%error, "cannot record the canceled firmware action");
                        }
                        return;
                    }
                    _ => 0,
                };
                if lock(&self.shared.slots).trial.is_some() {
                    // Installing: medfleetd never cancels that; nothing to undo.
                    return;
                }
                self.job = None;
                *lock(&self.shared.prepared) = None;
                self.shared.paths.discard_downloads();
                let mut slots = lock(&self.shared.slots);
                slots.finish(Finished {
                    action: cancel.action_id.clone(),
                    attempt,
                    state: ActionState::Canceled.as_str().to_owned(),
                    reason: String::new(),
                    detail: "canceled by medfleetd".to_owned(),
                });
                if let Err(error) = self.shared.paths.save(&slots) {
                    tracing::warn!(%error, "cannot record the canceled firmware action");
                }
                event!(self.shared.quiet, device = %self.shared.device_id, action = %cancel.action_id, "firmware update canceled; downloads discarded");
            }
            _ => {}
        }
    }

    /// A cancel for the trial that is armed but not booted: the job stops before its reboot, the trial is
    /// disarmed and the old slot runs on.
    fn disarm_unbooted(&mut self, action: &str) {
        let mut slots = lock(&self.shared.slots);
        let Some(trial) = slots.trial.clone().filter(|t| t.action == action && !t.booted) else {
            return;
        };
        if let Some(job) = self.job.take() {
            job.cancel.cancel();
            job.handle.abort();
        }
        slots.trial = None;
        slots.finish(Finished {
            action: trial.action.clone(),
            attempt: trial.attempt,
            state: ActionState::Canceled.as_str().to_owned(),
            reason: String::new(),
            detail: "canceled by medfleetd before the reboot onto the new image".to_owned(),
        });
        if let Err(error) = self.shared.paths.save(&slots) {
            tracing::warn!(%error, "cannot record the disarmed trial");
        }
        event!(self.shared.quiet, device = %self.shared.device_id, %action, "firmware install canceled before its reboot; the old image runs on");
    }

    /// Work for this (action, attempt) is in flight already.
    fn busy(&self, action: &str, attempt: u32) -> bool {
        self.job
            .as_ref()
            .is_some_and(|j| j.action == action && j.attempt == attempt && !j.handle.is_finished())
    }

    /// An install armed a trial but the device has not restarted onto it yet (its session broke first).
    pub(crate) fn reboot_pending(&self) -> bool {
        lock(&self.shared.slots).trial.as_ref().is_some_and(|t| !t.booted)
    }

    /// A command for an action this device finished (or is finishing) is answered, never carried out again.
    fn replayed(&self, action: &str, attempt: u32, link: &Link) -> bool {
        let (finished, installing) = {
            let slots = lock(&self.shared.slots);
            (
                slots.finished(action, attempt).cloned(),
                slots
                    .trial
                    .as_ref()
                    .is_some_and(|t| t.action == action && t.attempt == attempt),
            )
        };
        if let Some(finished) = finished {
            tracing::info!(device = %self.shared.device_id, %action, attempt, state = %finished.state, "firmware command for a finished action; reporting how it ended");
            let report = report_of(
                &self.shared,
                action,
                attempt,
                finished.state(),
                0,
                &finished.reason,
                &finished.detail,
            );
            let tx = link.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(report).await;
            });
            return true;
        }
        installing
    }

    /// Runs `work` as the device's one firmware job. A job for another action is canceled first; the previous
    /// job of the same action is handed over to be awaited (a download finishing as its install arrives).
    fn start<F, Fut>(&mut self, action: &str, attempt: u32, link: &Link, work: F)
    where
        F: FnOnce(Arc<Shared>, Link, Option<JoinHandle<()>>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let previous = match self.job.take() {
            Some(job) if job.action == action && job.attempt == attempt => Some(job.handle),
            Some(job) => {
                job.cancel.cancel();
                job.handle.abort();
                None
            }
            None => None,
        };
        let cancel = CancellationToken::new();
        let future = work(self.shared.clone(), link.clone(), previous);
        let stop = cancel.clone();
        let handle = tokio::spawn(async move {
            tokio::select! {
                () = future => {}
                () = stop.cancelled() => {}
            }
        });
        self.job = Some(Job {
            action: action.to_owned(),
            attempt,
            cancel,
            handle,
        });
    }
}

/// Installs `given` as the trusted root on first start; a root already trusted stays unless `given` is newer
/// (an operator re-pinning a device by hand).
fn pin_root(paths: &Paths, given: &std::path::Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(given).with_context(|| format!("cannot read the TUF root {}", given.display()))?;
    let info = tuf::root_info(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a TUF root ({e}); pass the root.json that `medfleet firmware keys init` wrote",
            given.display()
        )
    })?;
    let trusted = paths.trusted_root();
    let current = std::fs::read(&trusted)
        .ok()
        .and_then(|b| tuf::root_info(&b).ok())
        .map(|i| i.version);
    if current.is_none_or(|v| info.version > v) {
        let text = String::from_utf8(bytes).context("the TUF root is not UTF-8 JSON")?;
        medfleet_proto::client::write_private(&trusted, &text)?;
        tracing::info!(version = info.version, "pinned the TUF root");
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn running_of(shared: &Shared) -> (String, u64) {
    lock(&shared.slots).running().map_or_else(
        || (shared.options.factory_version.clone(), 0),
        |image| (image.version.clone(), image.release_counter),
    )
}

fn report_of(
    shared: &Shared,
    action: &str,
    attempt: u32,
    state: ActionState,
    bytes: u64,
    reason: &str,
    detail: &str,
) -> v1::SessionRequest {
    let (running_version, running_release_counter) = running_of(shared);
    v1::SessionRequest {
        message: Some(session_request::Message::FirmwareReport(v1::FirmwareReport {
            action_id: action.to_owned(),
            state: medfleet_proto::convert::action_state_to_wire(state).into(),
            bytes_downloaded: bytes,
            reason: reason.to_owned(),
            detail: detail.to_owned(),
            running_version,
            running_release_counter,
            attempt,
        })),
    }
}

async fn send(shared: &Shared, link: &Link, action: &str, attempt: u32, state: ActionState, bytes: u64) {
    let _ = link
        .tx
        .send(report_of(shared, action, attempt, state, bytes, "", ""))
        .await;
}

/// Records and reports a final outcome.
async fn finish(
    shared: &Shared,
    link: &Link,
    action: &str,
    attempt: u32,
    state: ActionState,
    reason: &str,
    detail: &str,
) {
    {
        let mut slots = lock(&shared.slots);
        slots.finish(Finished {
            action: action.to_owned(),
            attempt,
            state: state.as_str().to_owned(),
            reason: reason.to_owned(),
            detail: detail.to_owned(),
        });
        if let Err(error) = shared.paths.save(&slots) {
            tracing::warn!(%error, "cannot record how the firmware action ended");
        }
    }
    if state == ActionState::Succeeded {
        event!(shared.quiet, device = %shared.device_id, %action, "firmware update succeeded");
    } else {
        tracing::warn!(device = %shared.device_id, %action, %state, %reason, %detail, "firmware update did not succeed");
    }
    let _ = link
        .tx
        .send(report_of(shared, action, attempt, state, 0, reason, detail))
        .await;
}

/// A share in [0, 1) fixed by the device, the action, its attempt and what is decided.
fn chance(device: &str, action: &str, attempt: u32, what: &str) -> f64 {
    let digest = medfleet_core::digest::sha256_hex(format!("{device}/{action}/{attempt}/{what}").as_bytes());
    let head = u32::from_str_radix(&digest[..8], 16).unwrap_or(0);
    f64::from(head) / (f64::from(u32::MAX) + 1.0)
}

fn installed(shared: &Shared) -> Installed {
    let running = running_of(shared).1;
    Installed {
        hardware_id: shared.options.hardware_id.clone(),
        release_counter: running,
        highest: lock(&shared.slots).highest_release.max(running),
    }
}

struct Downloading<'a> {
    shared: &'a Shared,
    link: &'a Link,
    action: &'a str,
    attempt: u32,
}

impl download::Progress for Downloading<'_> {
    async fn downloading(&mut self, bytes: u64) {
        send(
            self.shared,
            self.link,
            self.action,
            self.attempt,
            ActionState::Downloading,
            bytes,
        )
        .await;
    }
}

/// Retries a transient failure with backoff while the session lasts (the job is canceled when it ends).
async fn backoff(attempt: &mut u32, why: &str, shared: &Shared) {
    let wait = Duration::from_secs(1 << (*attempt).min(5));
    *attempt += 1;
    tracing::warn!(device = %shared.device_id, %why, retry_in = ?wait, "firmware download interrupted");
    tokio::time::sleep(wait).await;
}

/// FirmwareUpdate: verify the metadata, download (resuming), check the image, stage it, report `downloaded`.
async fn prepare(shared: Arc<Shared>, link: Link, update: v1::FirmwareUpdate) {
    let (action, attempt) = (update.action_id.as_str(), update.attempt);
    let mut tries = 0;
    loop {
        let outcome = async {
            let target = download::check(
                link.channel.clone(),
                &shared.paths,
                &update.target_name,
                &installed(&shared),
            )
            .await?;
            let mut progress = Downloading {
                shared: &shared,
                link: &link,
                action,
                attempt,
            };
            let staged = download::fetch(
                link.channel.clone(),
                &shared.paths,
                &update.artifact_id,
                &target,
                &shared.options.faults,
                &mut progress,
            )
            .await?;
            Ok::<_, Failure>((target, staged))
        }
        .await;
        match outcome {
            Ok((target, staged)) => {
                let length = target.length;
                *lock(&shared.prepared) = Some(Prepared {
                    action: action.to_owned(),
                    attempt,
                    target,
                    staged,
                });
                event!(shared.quiet, device = %shared.device_id, %action, bytes = length, "firmware downloaded and verified");
                send(&shared, &link, action, attempt, ActionState::Downloaded, length).await;
                return;
            }
            Err(Failure::Transient(why)) => backoff(&mut tries, &why, &shared).await,
            Err(Failure::Final { reason, detail }) => {
                finish(&shared, &link, action, attempt, ActionState::Failed, &reason, &detail).await;
                return;
            }
        }
    }
}

/// After the reboot onto a new image: the image in the slot is the signed one and the device came back to its
/// control plane; commit, or fall back to the old slot and reboot onto it.
async fn health(shared: Arc<Shared>, link: Link, trial: Trial) {
    let (action, attempt) = (trial.action.as_str(), trial.attempt);
    send(&shared, &link, action, attempt, ActionState::VerifyingHealth, 0).await;
    let expected = lock(&shared.slots).image(trial.slot).map(|i| i.sha256.clone());
    let path = shared.paths.slot(trial.slot);
    let intact = tokio::task::spawn_blocking(move || {
        std::fs::File::open(&path)
            .and_then(medfleet_core::digest::sha256_hex_of)
            .ok()
    })
    .await
    .ok()
    .flatten();
    let failure = if intact.is_none() || intact != expected {
        Some("the new slot does not hold the signed image after the reboot")
    } else if chance(&shared.device_id, action, attempt, "health") < shared.options.faults.health_failure {
        Some("the device's self-test failed on the new image (fault injection)")
    } else {
        None
    };
    let committed = {
        let mut slots = lock(&shared.slots);
        slots.trial = None;
        if failure.is_none() {
            slots.active = trial.slot;
            let committed = slots.image(trial.slot).map_or(0, |i| i.release_counter);
            slots.highest_release = slots.highest_release.max(committed);
        }
        shared.paths.save(&slots)
    };
    if let Err(error) = committed {
        tracing::warn!(%error, "cannot record the health check; the next boot falls back");
        return;
    }
    match failure {
        None => finish(&shared, &link, action, attempt, ActionState::Succeeded, "", "").await,
        Some(detail) => {
            finish(
                &shared,
                &link,
                action,
                attempt,
                ActionState::RolledBack,
                "health_check_failed",
                detail,
            )
            .await;
            let _ = link.reboot.send(()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::install::past;
    use super::{Duration, chance};

    #[test]
    fn a_go_ahead_runs_out_at_its_end_and_none_never_does() {
        let now = std::time::Instant::now();
        let end = now + Duration::from_mins(5);
        assert!(!past(Some(end), now));
        assert!(past(Some(end), end));
        assert!(!past(None, now + Duration::from_hours(24)));
    }

    #[test]
    fn fault_decisions_are_reproducible_and_spread() {
        assert_eq!(
            chance("d", "a", 1, "install").to_bits(),
            chance("d", "a", 1, "install").to_bits()
        );
        assert_ne!(
            chance("d", "a", 1, "install").to_bits(),
            chance("d", "a", 2, "install").to_bits()
        );
        let below = (0..1000)
            .filter(|i| chance(&format!("device-{i}"), "a", 1, "install") < 0.3)
            .count();
        assert!((200..400).contains(&below), "{below} of 1000 below 0.3");
    }
}
