//! `medfleet-agent`: the reference device agent. It enrolls (generating its own key and sending a CSR with a
//! one-time token), holds its session with medfleetd, applies the configurations pushed on it (atomically, into
//! its state directory) and renews its certificate in the background, reconnecting with the new one. `simulate`
//! runs many such devices in one process.

/// An event at info level for a single device and at debug level in a simulation (`quiet`), where thousands of
/// devices would drown the summary. Defined before the modules so each of them can use it.
macro_rules! event {
    ($quiet:expr, $($arg:tt)+) => {
        if $quiet {
            tracing::debug!($($arg)+);
        } else {
            tracing::info!($($arg)+);
        }
    };
}

mod device;
mod firmware;
mod readings;
mod simulate;
mod state;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use device::RunOptions;
use medfleet_proto::client::{Bundle, connect_anonymous, new_key_and_csr, write_private};
use medfleet_proto::v1::{self, enrollment_service_client::EnrollmentServiceClient};
use state::{AgentState, StateDir};
use tokio_util::sync::CancellationToken;

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
        after_help = "Examples:\n  medfleet-agent enroll --server https://medfleet.hospital.example:7443 --ca ca.crt \\\n    \
                            --token mft_… --state-dir /var/lib/medfleet-agent\n  \
                            medfleet-agent enroll --reenroll --server https://medfleet.hospital.example:7443 --ca ca.crt \\\n    \
                            --token mft_… --state-dir /var/lib/medfleet-agent   # token from enroll-token --replace"
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
        /// Enroll the device this state directory already belongs to again (after `medfleet devices
        /// enroll-token --replace`), keeping its buffered readings and applied configuration: a running agent
        /// picks the new certificate up on its next connection and delivers what it buffered.
        #[arg(long)]
        reenroll: bool,
    },
    /// Hold the session with medfleetd, renew the certificate in the background, reconnect after failures.
    #[command(
        after_help = "Examples:\n  medfleet-agent run --state-dir /var/lib/medfleet-agent\n  medfleet-agent run --state-dir ./monitor --vitals-interval 1s   # a simulated bedside monitor"
    )]
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
        #[command(flatten)]
        firmware: FirmwareArgs,
        /// Refuse configurations that set this top-level key (to exercise rejection reporting).
        #[arg(long)]
        reject_key: Option<String>,
        /// Act as a bedside monitor: measure HR, SpO2, NIBP, temperature and RR this often and publish them
        /// (buffered durably until the server acknowledges them).
        #[arg(long, value_parser = humantime::parse_duration)]
        vitals_interval: Option<Duration>,
        /// Stop measuring after this many batches (publishing goes on until all are acknowledged).
        #[arg(long, requires = "vitals_interval")]
        vitals_count: Option<u64>,
        /// This unit runs no clinical software (a bench or lab device): a missing
        /// `operational-state` file then means idle. Without it a missing file means unknown and firmware is
        /// never installed. Never use it on a device that can be connected to a patient.
        #[arg(long)]
        no_clinical_software: bool,
    },
    /// Run many simulated devices in one process, each with its own key, certificate and session.
    #[command(after_help = "Examples:\n  \
        medfleet-agent simulate --server https://medfleet.hospital.example:7443 --ca ca.crt \\\n    \
        --state-dir ./sim --devices 1000 --model MX800 --ward stmarys/icu --admin admin.pem\n  \
        medfleet-agent simulate --server https://medfleet.hospital.example:7443 --ca ca.crt \\\n    \
        --state-dir ./sim --devices 200 --tokens tokens.csv\n\n\
        Devices enrolled by an earlier run (in --state-dir) are reused.")]
    Simulate {
        #[arg(long, env = "MEDFLEET_SERVER")]
        server: String,
        /// The medfleet CA certificate (PEM) to trust.
        #[arg(long)]
        ca: PathBuf,
        /// One sub-directory per device (device-00000, …): keys, certificates, applied configurations.
        #[arg(long)]
        state_dir: PathBuf,
        /// How many devices to run.
        #[arg(long)]
        devices: usize,
        /// Enrollment tokens (CSV with a `token` column, e.g. from `medfleet devices import --tokens-out`).
        #[arg(long, conflicts_with = "admin")]
        tokens: Option<PathBuf>,
        /// An admin (or IT provisioner) bundle: register and enroll the devices without a tokens file.
        #[arg(long)]
        admin: Option<PathBuf>,
        /// Model of the devices registered with --admin.
        #[arg(long, default_value = "SIM-MONITOR")]
        model: String,
        /// SITE/WARD where devices registered with --admin stand (default: storage).
        #[arg(long)]
        ward: Option<String>,
        /// Enrollments in flight at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Interval between heartbeats until the server says otherwise.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        heartbeat: Duration,
        #[command(flatten)]
        firmware: FirmwareArgs,
        /// This share of the devices (0–1) starts in clinical use (written to their `operational-state` file
        /// unless one is there already); firmware never installs on them while they are.
        #[arg(long, default_value_t = 0.0, value_parser = share)]
        in_use_share: f64,
        /// Refuse configurations that set this top-level key (to exercise rejection reporting).
        #[arg(long)]
        reject_key: Option<String>,
        /// Act as a bedside monitor: measure HR, SpO2, NIBP, temperature and RR this often and publish them
        /// (buffered durably until the server acknowledges them).
        #[arg(long, value_parser = humantime::parse_duration)]
        vitals_interval: Option<Duration>,
        /// Stop measuring after this many batches (publishing goes on until all are acknowledged).
        #[arg(long, requires = "vitals_interval")]
        vitals_count: Option<u64>,
    },
}

/// The device's firmware identity and the faults to inject into its updates.
#[derive(Debug, clap::Args)]
struct FirmwareArgs {
    /// Version of the factory image, reported until a signed update is installed.
    #[arg(long, default_value = "0.0.0")]
    firmware_version: String,
    /// The TUF root this device pins on first start (the root.json from `medfleet firmware keys init`). Later
    /// roots replace it only when they verify against it. Without a trusted root the device refuses every update.
    #[arg(long, value_name = "ROOT.json")]
    tuf_root: Option<PathBuf>,
    /// The device model signed firmware must name (simulate: --model).
    #[arg(long)]
    hardware_id: Option<String>,
    /// Fault injection: this share (0–1) of installs fails.
    #[arg(long, default_value_t = 0.0, value_parser = share, help_heading = "Fault injection")]
    fault_install_failure: f64,
    /// Fault injection: this share (0–1) of health checks after an install fails; the device rolls back.
    #[arg(long, default_value_t = 0.0, value_parser = share, help_heading = "Fault injection")]
    fault_health_failure: f64,
    /// Fault injection: download at most this many bytes per second.
    #[arg(long, value_name = "BYTES", help_heading = "Fault injection")]
    fault_download_rate: Option<u64>,
    /// Fault injection: break off each download stream after this many bytes (the device resumes).
    #[arg(long, value_name = "BYTES", help_heading = "Fault injection")]
    fault_download_cut: Option<u64>,
    /// Fault injection: write the new slot at most this many bytes per second (slow flash: the install stays
    /// in `verifying` long enough to be interrupted).
    #[arg(long, value_name = "BYTES", help_heading = "Fault injection")]
    fault_write_rate: Option<u64>,
}

impl FirmwareArgs {
    fn options(self, model: Option<&str>) -> firmware::FirmwareOptions {
        firmware::FirmwareOptions {
            tuf_root: self.tuf_root,
            hardware_id: self
                .hardware_id
                .or_else(|| model.map(str::to_owned))
                .unwrap_or_default(),
            factory_version: self.firmware_version,
            faults: firmware::Faults {
                install_failure: self.fault_install_failure,
                health_failure: self.fault_health_failure,
                download_rate: self.fault_download_rate,
                cut_download_after: self.fault_download_cut,
                write_rate: self.fault_write_rate,
            },
        }
    }
}

fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("'{text}' is not a share between 0 and 1 (e.g. 0.2)")),
    }
}

fn vitals_options(interval: Option<Duration>, count: Option<u64>) -> Option<readings::VitalsOptions> {
    interval.map(|interval| readings::VitalsOptions { interval, count })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Colour codes only help a person at a terminal; in a file or a journal they are noise.
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
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
                reenroll,
            } => {
                let dir = StateDir::new(state_dir);
                if reenroll {
                    reenroll_device(&server, &ca, &token, &dir, device_id).await
                } else {
                    enroll(&server, &ca, &token, &dir, device_id).await
                }
            }
            Command::Run {
                state_dir,
                server,
                heartbeat,
                renew_after,
                firmware,
                reject_key,
                vitals_interval,
                vitals_count,
                no_clinical_software,
            } => {
                let options = RunOptions {
                    server,
                    heartbeat,
                    renew_after,
                    firmware: firmware.options(None),
                    reject_key,
                    quiet: false,
                    vitals: vitals_options(vitals_interval, vitals_count),
                    missing_state_is_idle: no_clinical_software,
                };
                device::run(&StateDir::new(state_dir), &options, stop_token(), None).await
            }
            Command::Simulate {
                server,
                ca,
                state_dir,
                devices,
                tokens,
                admin,
                model,
                ward,
                concurrency,
                heartbeat,
                firmware,
                in_use_share,
                reject_key,
                vitals_interval,
                vitals_count,
            } => {
                let firmware = firmware.options(Some(&model));
                let simulation = simulate::Simulation {
                    server,
                    ca,
                    state_dir,
                    devices,
                    tokens,
                    admin,
                    model,
                    ward,
                    concurrency,
                    in_use_share,
                    options: RunOptions {
                        server: None,
                        heartbeat,
                        renew_after: None,
                        firmware,
                        reject_key,
                        quiet: true,
                        vitals: vitals_options(vitals_interval, vitals_count),
                        // Simulated devices have no clinical software: only those the simulator (or a test)
                        // marks with a state file are in use.
                        missing_state_is_idle: true,
                    },
                };
                simulate::simulate(simulation, stop_token()).await
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
            "{} already holds a device identity; to enroll that device again keeping its buffered readings, add \
             --reenroll; to enroll a different device, use another --state-dir",
            dir.root().display()
        );
    }
    let ca_pem =
        std::fs::read_to_string(ca).with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
    let device_id = enroll_with(server, &ca_pem, token, dir, expected_device_id).await?;
    println!("enrolled as device {device_id}");
    Ok(())
}

/// Enrolls the state directory's own device again with a token issued with `--replace`. The buffer and the
/// applied configuration stay; the identity file is replaced atomically, so a running agent uses either the old
/// or the new certificate, and the device id cannot change under its buffered batches.
async fn reenroll_device(
    server: &str,
    ca: &std::path::Path,
    token: &str,
    dir: &StateDir,
    expected_device_id: Option<String>,
) -> anyhow::Result<()> {
    let state = dir.load().with_context(|| {
        format!(
            "--reenroll needs a state directory that was enrolled before; {} is not (drop --reenroll to enroll it \
             for the first time)",
            dir.root().display()
        )
    })?;
    if let Some(expected) = &expected_device_id
        && expected != &state.device_id
    {
        bail!(
            "{} belongs to device {}, not {expected}; its buffered readings cannot move to another device",
            dir.root().display(),
            state.device_id
        );
    }
    let ca_pem =
        std::fs::read_to_string(ca).with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
    // Writable before the one-time token is spent; the stored device id stays valid throughout.
    dir.save(&state)
        .with_context(|| format!("cannot write to the state directory {}", dir.root().display()))?;
    let (key_pem, csr_der) = new_key_and_csr()?;
    let channel = connect_anonymous(server, &ca_pem).await?;
    let response = EnrollmentServiceClient::new(channel)
        .enroll(v1::EnrollRequest {
            token: token.to_owned(),
            csr_der,
            // The server refuses a token issued for another device, so batches stay with their device.
            expected_device_id: state.device_id.clone(),
        })
        .await
        .map_err(|status| anyhow::anyhow!("enrollment refused: {}", status.message()))?
        .into_inner();
    let bundle = Bundle::parse(&format!("{key_pem}{}", response.certificate_chain_pem))
        .map_err(|e| anyhow::anyhow!("the server's answer is not a usable certificate: {e}"))?;
    write_private(&dir.identity(), &bundle.to_pem())?;
    dir.save(&AgentState {
        server: server.to_owned(),
        device_id: state.device_id.clone(),
    })?;
    let buffered = readings::Buffer::open(dir)?.pending()?.len();
    println!(
        "re-enrolled device {} (certificate {}); {buffered} buffered batches will be delivered under it",
        state.device_id, response.serial
    );
    Ok(())
}

/// Enrolls the device whose state lives in `dir`; returns its id.
pub(crate) async fn enroll_with(
    server: &str,
    ca_pem: &str,
    token: &str,
    dir: &StateDir,
    expected_device_id: Option<String>,
) -> anyhow::Result<String> {
    // Everything that can fail locally fails before the one-time token is spent.
    dir.save(&AgentState {
        server: server.to_owned(),
        device_id: String::new(),
    })
    .with_context(|| format!("cannot write to the state directory {}", dir.root().display()))?;
    // The key is generated here and never leaves the device; only the CSR is sent.
    let (key_pem, csr_der) = new_key_and_csr()?;
    let channel = connect_anonymous(server, ca_pem).await?;
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
    tracing::debug!(device = %device_id, serial = %response.serial, "enrolled");
    Ok(device_id)
}

/// Cancelled on SIGTERM or Ctrl-C.
fn stop_token() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        stop_signal().await;
        tracing::info!("stopping");
        cancel.cancel();
    });
    token
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
