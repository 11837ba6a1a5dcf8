//! One device's life with medfleetd: hold the session, beat, apply pushed configurations, renew the certificate,
//! reconnect with backoff. Shared by `run` (one device) and `simulate` (many in one process).

use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use medfleet_proto::client::{Bundle, connect, new_key_and_csr, write_private};
use medfleet_proto::v1::{
    self, credential_service_client::CredentialServiceClient, device_service_client::DeviceServiceClient,
    session_request, session_response,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::firmware::{Firmware, FirmwareOptions, Link};
use crate::state::{self, AppliedConfig, StateDir};

#[derive(Debug, Clone)]
pub(crate) struct RunOptions {
    pub(crate) server: Option<String>,
    /// Used until the server's Welcome says otherwise.
    pub(crate) heartbeat: Duration,
    pub(crate) renew_after: Option<Duration>,
    /// The device's model, trust root, factory version and injected faults.
    pub(crate) firmware: FirmwareOptions,
    /// Refuse configurations that set this top-level key (simulates a device that cannot take a setting).
    pub(crate) reject_key: Option<String>,
    /// Per-device events at debug level (the simulator reports aggregates instead).
    pub(crate) quiet: bool,
    /// Measure and publish vital signs (a simulated bedside monitor).
    pub(crate) vitals: Option<crate::readings::VitalsOptions>,
    /// No operational-state file means idle (a bench unit without clinical software) instead of unknown.
    pub(crate) missing_state_is_idle: bool,
}

/// What a device is doing, for the simulator's summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Status {
    pub(crate) connected: bool,
    pub(crate) applied_version: Option<u64>,
}

/// How a session ended.
enum SessionEnd {
    /// The certificate was renewed: reconnect at once with the new one.
    Renewed,
    /// An install asked for a reboot: start again on the slot the device should run.
    Rebooted,
    /// Asked to stop.
    Stop,
}

/// Runs the device until `stop`: sessions, reconnecting with exponential backoff (1 s to 30 s) after failures.
pub(crate) async fn run(
    dir: &StateDir,
    options: &RunOptions,
    stop: CancellationToken,
    status: Option<watch::Sender<Status>>,
) -> anyhow::Result<()> {
    // This device's own token: ending it must not stop the other devices of a simulation.
    let stop = stop.child_token();
    let state = dir.load()?;
    let server = options.server.clone().unwrap_or_else(|| state.server.clone());
    // Batches buffered by an earlier run (before a restart or a re-enrollment) are delivered even when this run
    // measures nothing.
    let readings = if options.vitals.is_some() || !crate::readings::Buffer::open(dir)?.pending()?.is_empty() {
        Some(start_readings(
            dir,
            &server,
            options.vitals.as_ref(),
            options.quiet,
            &stop,
        )?)
    } else {
        None
    };
    let mut firmware = Firmware::open(dir, options.firmware.clone(), &state.device_id, options.quiet)?;
    firmware.boot()?;
    let result = sessions(
        dir,
        &server,
        &state.device_id,
        options,
        &mut firmware,
        &stop,
        status.as_ref(),
    )
    .await;
    stop.cancel();
    if let Some(readings) = readings {
        readings.await??;
    }
    result
}

/// Starts publishing from the buffer (and measuring into it, with `vitals`); the returned task ends after `stop`.
fn start_readings(
    dir: &StateDir,
    server: &str,
    vitals: Option<&crate::readings::VitalsOptions>,
    quiet: bool,
    stop: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let buffer = crate::readings::Buffer::open(dir)?;
    let (new, receiver) = mpsc::unbounded_channel();
    let measuring = vitals.map(|vitals| {
        tokio::spawn(crate::readings::measure(
            buffer.clone(),
            vitals.clone(),
            new,
            stop.clone(),
        ))
    });
    let (dir, server, stop) = (dir.clone(), server.to_owned(), stop.clone());
    Ok(tokio::spawn(async move {
        let published = crate::readings::publish(&dir, &server, &buffer, receiver, quiet, &stop).await;
        if let Some(measuring) = measuring {
            measuring.await??;
        }
        published
    }))
}

async fn sessions(
    dir: &StateDir,
    server: &str,
    device_id: &str,
    options: &RunOptions,
    firmware: &mut Firmware,
    stop: &CancellationToken,
    status: Option<&watch::Sender<Status>>,
) -> anyhow::Result<()> {
    let state_device = device_id;
    let mut backoff = Duration::from_secs(1);
    loop {
        if firmware.reboot_pending() {
            firmware.boot()?;
        }
        let outcome = session(dir, server, state_device, options, firmware, stop, status).await;
        firmware.disconnected();
        if let Some(status) = status {
            status.send_modify(|s| s.connected = false);
        }
        match outcome {
            Ok(SessionEnd::Stop) => return Ok(()),
            Ok(SessionEnd::Renewed) => backoff = Duration::from_secs(1),
            Ok(SessionEnd::Rebooted) => {
                event!(options.quiet, device = %state_device, "restarting onto the firmware slot it should run");
                firmware.boot()?;
                backoff = Duration::from_secs(1);
            }
            Err(error) => {
                tracing::warn!(device = %state_device, error = %format!("{error:#}"), retry_in = ?backoff, "session failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn session(
    dir: &StateDir,
    server: &str,
    device_id: &str,
    options: &RunOptions,
    firmware: &mut Firmware,
    stop: &CancellationToken,
    status: Option<&watch::Sender<Status>>,
) -> anyhow::Result<SessionEnd> {
    let bundle = Bundle::load(&dir.identity())?;
    let (not_before, not_after) = state::validity(&bundle.cert_pem)?;
    let now = SystemTime::now();
    if not_after <= now {
        bail!(
            "the device certificate expired at {}; this device must be enrolled again with a new token",
            humantime::format_rfc3339_seconds(not_after)
        );
    }
    let mut applied = dir.applied()?;
    let channel = tokio::select! {
        channel = connect(server, &bundle) => channel?,
        () = stop.cancelled() => return Ok(SessionEnd::Stop),
    };
    let (tx, rx) = mpsc::channel(8);
    let (running_version, running_counter) = firmware.running();
    let mut operational = dir.operational_state(options.missing_state_is_idle);
    tx.send(v1::SessionRequest {
        message: Some(session_request::Message::Hello(v1::Hello {
            device_id: device_id.to_owned(),
            firmware_version: running_version,
            operational_state: operational.into(),
            applied_config_version: applied.as_ref().map_or(0, |a| a.version),
            applied_config_digest: applied.as_ref().map(|a| a.digest.clone()).unwrap_or_default(),
            firmware_release_counter: running_counter,
        })),
    })
    .await?;
    let mut inbound = DeviceServiceClient::new(channel.clone())
        .session(ReceiverStream::new(rx))
        .await
        .context("opening the session")?
        .into_inner();
    let welcome = match inbound.message().await.context("waiting for the server's welcome")? {
        Some(v1::SessionResponse {
            message: Some(session_response::Message::Welcome(welcome)),
        }) => welcome,
        other => bail!("unexpected first message from the server: {other:?}"),
    };
    event!(options.quiet, device = %device_id, "session established");
    if let Some(status) = status {
        status.send_modify(|s| {
            s.connected = true;
            s.applied_version = applied.as_ref().map(|a| a.version);
        });
    }

    // Renew at 60% of the lifetime: comfortably before two thirds, so a failed attempt has time to be retried.
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let renew_at = options
        .renew_after
        .map_or(not_before + lifetime.mul_f64(0.6), |after| now + after);
    let renew_in = renew_at.duration_since(SystemTime::now()).unwrap_or_default();
    let renew = tokio::time::sleep(renew_in);
    tokio::pin!(renew);
    let beat_every = welcome
        .heartbeat_interval
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(options.heartbeat);
    let mut heartbeat = tokio::time::interval(beat_every);
    heartbeat.tick().await;
    let (state_tx, state_rx) = watch::channel(operational);
    let (reboot_tx, mut reboot_rx) = mpsc::channel(1);
    let link = Link {
        tx: tx.clone(),
        channel: channel.clone(),
        reboot: reboot_tx,
        state: state_rx,
    };
    firmware.connected(&link);
    // The device's clinical software may change its state at any moment; a change is reported at once, since it
    // decides whether an update may install.
    let mut look = tokio::time::interval(Duration::from_secs(1));
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut renew => {
                renew_certificate(dir, channel.clone()).await?;
                return Ok(SessionEnd::Renewed);
            }
            _ = heartbeat.tick() => {
                let beat = v1::SessionRequest {
                    message: Some(session_request::Message::Heartbeat(v1::Heartbeat {
                        operational_state: operational.into(),
                    })),
                };
                if tx.send(beat).await.is_err() {
                    bail!("the session closed");
                }
            }
            _ = look.tick() => {
                let now = dir.operational_state(options.missing_state_is_idle);
                if now != operational {
                    operational = now;
                    state_tx.send_replace(now);
                    event!(options.quiet, device = %device_id, state = ?now, "operational state changed");
                    let beat = v1::SessionRequest {
                        message: Some(session_request::Message::Heartbeat(v1::Heartbeat {
                            operational_state: now.into(),
                        })),
                    };
                    if tx.send(beat).await.is_err() {
                        bail!("the session closed");
                    }
                }
            }
            Some(()) = reboot_rx.recv() => {
                // The reports queued before the reboot (rebooting, rolled back) must reach the server: close our
                // side and let the server finish the call instead of dropping it with them in flight.
                firmware.disconnected();
                drop(link);
                drop(tx);
                let drained = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Ok(Some(_)) = inbound.message().await {}
                });
                let _ = drained.await;
                return Ok(SessionEnd::Rebooted);
            }
            message = inbound.message() => match message {
                Ok(Some(v1::SessionResponse { message: Some(session_response::Message::ApplyConfig(command)) })) => {
                    let report = apply(dir, options, device_id, &mut applied, command);
                    if let (Some(status), true) = (status, report.applied) {
                        status.send_modify(|s| s.applied_version = Some(report.version));
                    }
                    let report = v1::SessionRequest {
                        message: Some(session_request::Message::ConfigReport(report)),
                    };
                    if tx.send(report).await.is_err() {
                        bail!("the session closed");
                    }
                }
                Ok(Some(v1::SessionResponse { message: Some(command @ (
                    session_response::Message::FirmwareUpdate(_)
                    | session_response::Message::FirmwareInstall(_)
                    | session_response::Message::FirmwareCancel(_)
                )) })) => firmware.handle(command, &link),
                Ok(Some(_)) => {}
                Ok(None) => bail!("the server closed the session"),
                Err(status) => bail!("the session ended: {} ({:?})", status.message(), status.code()),
            },
            () = stop.cancelled() => {
                event!(options.quiet, device = %device_id, "stopping");
                return Ok(SessionEnd::Stop);
            }
        }
    }
}

/// Applies a pushed configuration and says how it went. The same document twice is applied once: the file is
/// not rewritten and the device is not disturbed.
fn apply(
    dir: &StateDir,
    options: &RunOptions,
    device_id: &str,
    applied: &mut Option<AppliedConfig>,
    command: v1::ApplyConfig,
) -> v1::ConfigReport {
    let rejected = |reason: String| {
        tracing::warn!(device = %device_id, version = command.version, %reason, "configuration rejected");
        v1::ConfigReport {
            version: command.version,
            digest: command.digest.clone(),
            applied: false,
            rejection_reason: reason,
        }
    };
    if applied.as_ref().is_some_and(|a| a.digest == command.digest) {
        event!(options.quiet, device = %device_id, version = command.version, "configuration already applied");
        return v1::ConfigReport {
            version: command.version,
            digest: command.digest.clone(),
            applied: true,
            rejection_reason: String::new(),
        };
    }
    let document: serde_json::Value = match serde_json::from_str(&command.document_json) {
        Ok(document @ serde_json::Value::Object(_)) => document,
        Ok(_) => return rejected("the configuration is not a JSON object".to_owned()),
        Err(e) => return rejected(format!("the configuration is not JSON: {e}")),
    };
    // The digest proves the document arrived as the server resolved it.
    if medfleet_core::device_config::digest(&document) != command.digest {
        return rejected("the configuration does not match its digest".to_owned());
    }
    if let Some(key) = &options.reject_key
        && document.get(key).is_some()
    {
        return rejected(format!("this device does not support the setting '{key}'"));
    }
    let next = AppliedConfig {
        version: command.version,
        digest: command.digest.clone(),
        document,
    };
    if let Err(error) = dir.save_applied(&next) {
        return rejected(format!("cannot store the configuration: {error:#}"));
    }
    event!(options.quiet, device = %device_id, version = command.version, "configuration applied");
    *applied = Some(next);
    v1::ConfigReport {
        version: command.version,
        digest: command.digest,
        applied: true,
        rejection_reason: String::new(),
    }
}

/// A fresh key and certificate over the current authenticated channel; the files are replaced atomically, so a
/// crash leaves either the old or the new identity, never half of one.
async fn renew_certificate(dir: &StateDir, channel: tonic::transport::Channel) -> anyhow::Result<()> {
    let (key_pem, csr_der) = new_key_and_csr()?;
    let response = CredentialServiceClient::new(channel)
        .renew(v1::RenewRequest { csr_der })
        .await
        .map_err(|status| anyhow::anyhow!("renewal refused: {}", status.message()))?
        .into_inner();
    let bundle = Bundle::parse(&format!("{key_pem}{}", response.certificate_chain_pem))
        .map_err(|e| anyhow::anyhow!("the renewed certificate is not usable: {e}"))?;
    write_private(&dir.identity(), &bundle.to_pem())?;
    tracing::info!(serial = %response.serial, "certificate renewed");
    Ok(())
}
