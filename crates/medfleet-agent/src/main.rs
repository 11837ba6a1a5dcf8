//! `medfleet-agent`: the reference device agent. It enrolls (generating its own key and sending a CSR with a
//! one-time token), holds its session with medfleetd, and renews its certificate in the background, reconnecting
//! with the new one.

mod state;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use medfleet_proto::client::{Bundle, connect, connect_anonymous, new_key_and_csr, write_private};
use medfleet_proto::v1::{
    self, credential_service_client::CredentialServiceClient, device_service_client::DeviceServiceClient,
    enrollment_service_client::EnrollmentServiceClient, session_request, session_response,
};
use state::{AgentState, StateDir};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The medfleet reference device agent.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Example:\n  medfleet-agent enroll --server https://medfleet.hospital.example:7443 \\\n    \
                                       --ca ca.crt --token mft_… --state-dir /var/lib/medfleet-agent\n  \
                                       medfleet-agent run --state-dir /var/lib/medfleet-agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text")]
    log_format: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate this device's key, enroll with a one-time token and store the certificate.
    #[command(
        after_help = "Example:\n  medfleet-agent enroll --server https://medfleet.hospital.example:7443 --ca ca.crt \\\n    \
                            --token mft_… --state-dir /var/lib/medfleet-agent"
    )]
    Enroll {
        /// medfleetd address.
        #[arg(long, env = "MEDFLEET_SERVER")]
        server: String,
        /// The medfleet CA certificate (PEM) to trust.
        #[arg(long)]
        ca: PathBuf,
        /// The one-time enrollment token from hospital IT.
        #[arg(long, env = "MEDFLEET_ENROLLMENT_TOKEN", hide_env_values = true)]
        token: String,
        /// Where the agent keeps its key, certificate and settings.
        #[arg(long)]
        state_dir: PathBuf,
        /// The device id this token is expected to be for (refused if it is for another device).
        #[arg(long)]
        device_id: Option<String>,
    },
    /// Hold the session with medfleetd, renew the certificate in the background, reconnect after failures.
    #[command(after_help = "Example:\n  medfleet-agent run --state-dir /var/lib/medfleet-agent")]
    Run {
        #[arg(long)]
        state_dir: PathBuf,
        /// Override the server address stored at enrollment.
        #[arg(long)]
        server: Option<String>,
        /// Interval between heartbeats.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        heartbeat: Duration,
        /// Renew this long after connecting instead of at 60% of the certificate's lifetime (demos, tests).
        #[arg(long, value_parser = humantime::parse_duration, hide = true)]
        renew_after: Option<Duration>,
        /// Firmware version reported in the session hello.
        #[arg(long, default_value = "0.0.0")]
        firmware_version: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let subscriber = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_env("MEDFLEET_AGENT_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    if cli.log_format == "json" {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("medfleet-agent: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Enroll {
                server,
                ca,
                token,
                state_dir,
                device_id,
            } => enroll(&server, &ca, &token, &StateDir::new(state_dir), device_id).await,
            Command::Run {
                state_dir,
                server,
                heartbeat,
                renew_after,
                firmware_version,
            } => {
                let options = RunOptions {
                    server,
                    heartbeat,
                    renew_after,
                    firmware_version,
                };
                run(&StateDir::new(state_dir), &options).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("medfleet-agent: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn enroll(
    server: &str,
    ca: &std::path::Path,
    token: &str,
    dir: &StateDir,
    expected_device_id: Option<String>,
) -> anyhow::Result<()> {
    if dir.identity().exists() {
        bail!(
            "{} already holds an identity; use another --state-dir or remove it to enroll again",
            dir.root().display()
        );
    }
    let ca_pem =
        std::fs::read_to_string(ca).with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
    // Everything that can fail locally fails before the one-time token is spent.
    dir.save(&AgentState {
        server: server.to_owned(),
        device_id: String::new(),
    })
    .with_context(|| format!("cannot write to the state directory {}", dir.root().display()))?;
    // The key is generated here and never leaves the device; only the CSR is sent.
    let (key_pem, csr_der) = new_key_and_csr()?;
    let channel = connect_anonymous(server, &ca_pem).await?;
    let response = EnrollmentServiceClient::new(channel)
        .enroll(v1::EnrollRequest {
            token: token.to_owned(),
            csr_der,
            expected_device_id: expected_device_id.unwrap_or_default(),
        })
        .await
        .map_err(|status| anyhow::anyhow!("enrollment refused: {}", status.message()))?
        .into_inner();
    let bundle = Bundle::parse(&format!("{key_pem}{}", response.certificate_chain_pem))
        .map_err(|e| anyhow::anyhow!("the server's answer is not a usable certificate: {e}"))?;
    let device_id = response
        .identity
        .strip_prefix("medfleet://device/")
        .ok_or_else(|| anyhow::anyhow!("the server issued a non-device identity {}", response.identity))?
        .to_owned();
    write_private(&dir.identity(), &bundle.to_pem())?;
    dir.save(&AgentState {
        server: server.to_owned(),
        device_id: device_id.clone(),
    })?;
    tracing::info!(device = %device_id, serial = %response.serial, "enrolled");
    println!("enrolled as device {device_id}");
    Ok(())
}

#[derive(Debug)]
struct RunOptions {
    server: Option<String>,
    heartbeat: Duration,
    renew_after: Option<Duration>,
    firmware_version: String,
}

/// How a session ended.
enum SessionEnd {
    /// The certificate was renewed: reconnect at once with the new one.
    Renewed,
    /// Asked to stop.
    Stop,
}

async fn run(dir: &StateDir, options: &RunOptions) -> anyhow::Result<()> {
    let state = dir.load()?;
    let server = options.server.clone().unwrap_or_else(|| state.server.clone());
    let mut backoff = Duration::from_secs(1);
    loop {
        match session(dir, &server, &state.device_id, options).await {
            Ok(SessionEnd::Stop) => return Ok(()),
            Ok(SessionEnd::Renewed) => backoff = Duration::from_secs(1),
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), retry_in = ?backoff, "session failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop_signal() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn session(dir: &StateDir, server: &str, device_id: &str, options: &RunOptions) -> anyhow::Result<SessionEnd> {
    let bundle = Bundle::load(&dir.identity())?;
    let (not_before, not_after) = state::validity(&bundle.cert_pem)?;
    let now = SystemTime::now();
    if not_after <= now {
        bail!(
            "the device certificate expired at {}; this device must be enrolled again with a new token",
            humantime::format_rfc3339_seconds(not_after)
        );
    }
    let channel = connect(server, &bundle).await?;
    let (tx, rx) = mpsc::channel(8);
    tx.send(v1::SessionRequest {
        message: Some(session_request::Message::Hello(v1::Hello {
            device_id: device_id.to_owned(),
            firmware_version: options.firmware_version.clone(),
            operational_state: v1::OperationalState::Idle.into(),
        })),
    })
    .await?;
    let mut inbound = DeviceServiceClient::new(channel.clone())
        .session(ReceiverStream::new(rx))
        .await
        .context("opening the session")?
        .into_inner();
    match inbound.message().await.context("waiting for the server's welcome")? {
        Some(v1::SessionResponse {
            message: Some(session_response::Message::Welcome(_)),
        }) => {}
        other => bail!("unexpected first message from the server: {other:?}"),
    }
    tracing::info!(device = %device_id, "session established");

    // Renew at 60% of the lifetime: comfortably before two thirds, so a failed attempt has time to be retried.
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let renew_at = options
        .renew_after
        .map_or(not_before + lifetime.mul_f64(0.6), |after| now + after);
    let renew_in = renew_at.duration_since(SystemTime::now()).unwrap_or_default();
    let renew = tokio::time::sleep(renew_in);
    tokio::pin!(renew);
    let mut heartbeat = tokio::time::interval(options.heartbeat);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            () = &mut renew => {
                renew_certificate(dir, channel.clone()).await?;
                return Ok(SessionEnd::Renewed);
            }
            _ = heartbeat.tick() => {
                let beat = v1::SessionRequest {
                    message: Some(session_request::Message::Heartbeat(v1::Heartbeat {
                        operational_state: v1::OperationalState::Idle.into(),
                    })),
                };
                if tx.send(beat).await.is_err() {
                    bail!("the session closed");
                }
            }
            message = inbound.message() => match message {
                Ok(Some(_command)) => {}
                Ok(None) => bail!("the server closed the session"),
                Err(status) => bail!("the session ended: {} ({:?})", status.message(), status.code()),
            },
            () = stop_signal() => {
                tracing::info!("stopping");
                return Ok(SessionEnd::Stop);
            }
        }
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

async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
