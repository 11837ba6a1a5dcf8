//! `medfleetd`: initialise a data directory, apply migrations, or serve.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use medfleet_server::identity::data_dir::DataDir;
use medfleet_server::settings::{Overrides, Settings};
use medfleet_server::{Listeners, ensure_initialised, run, telemetry};

/// The medfleet control plane.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the CA, the server certificate and the first admin's credentials in a new data directory.
    #[command(
        after_help = "Example:\n  medfleetd init --data-dir /var/lib/medfleet --server-name medfleet.hospital.example --admin alice"
    )]
    Init {
        #[command(flatten)]
        overrides: Overrides,
        /// Name of the first administrator (their identity is medfleet://user/NAME).
        #[arg(long, default_value = "admin")]
        admin: String,
    },
    /// Serve gRPC (mTLS) and the operations endpoints. Initialises the data directory on first start.
    #[command(
        after_help = "Examples:\n  medfleetd serve\n  medfleetd serve --config /etc/medfleet/medfleetd.toml\n  \
                            MEDFLEET_DATABASE_URL=postgres://medfleet@db/medfleet medfleetd serve"
    )]
    Serve {
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Add a new current key to the secrets keyring (old keys stay, for decryption), or retire old keys no stored
    /// secret uses any more. Creates the keyring when it does not exist yet (an upgrade from before sealing, a
    /// keyring kept on a mount the service cannot write).
    #[command(after_help = "Rotation:\n  \
        medfleetd rotate-secrets-key --config /etc/medfleet/medfleetd.toml     # 1. new current key, old kept\n  \
        # 2. give every replica the same key file and restart them: each re-encrypts at start\n  \
        medfleetd rotate-secrets-key --config /etc/medfleet/medfleetd.toml --retire-unused   # 3. drop old keys")]
    RotateSecretsKey {
        #[command(flatten)]
        overrides: Overrides,
        /// Instead of adding a key, remove the old keys nothing sealed uses (checks the database and the CA key).
        #[arg(long)]
        retire_unused: bool,
    },
    /// Apply pending database migrations and exit.
    #[command(after_help = "Example:\n  medfleetd migrate --database-url postgres://medfleet@db/medfleet")]
    Migrate {
        #[command(flatten)]
        overrides: Overrides,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("medfleetd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("medfleetd: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    // Every TLS user in the process (OTLP exporter included) uses ring; installing it avoids a provider race.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Init { overrides, admin } => {
            medfleet_core::identity::Identity::check_name(&admin)
                .map_err(|e| anyhow::anyhow!("--admin {admin}: {e}"))?;
            let config = Settings::load(overrides)?;
            let outcome = ensure_initialised(&config, &admin)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "{} is already initialised; keep it, or choose another --data-dir",
                    config.data_dir.display()
                )
            })?;
            print_credentials_hint(&config, &outcome);
            Ok(())
        }
        Command::RotateSecretsKey {
            overrides,
            retire_unused,
        } => {
            let config = Settings::load(overrides)?;
            let path = &config.secrets_key_file;
            if retire_unused {
                let outcome = medfleet_server::retire_unused_keys(&config).await?;
                if outcome.retired.is_empty() {
                    eprintln!("medfleetd: no old key retired from {}", path.display());
                } else {
                    eprintln!(
                        "medfleetd: retired {} from {}",
                        outcome.retired.join(", "),
                        path.display()
                    );
                }
                if !outcome.still_used.is_empty() {
                    eprintln!(
                        "  still used: {} (restart every replica with the current key first, then run this again)",
                        outcome.still_used.join(", ")
                    );
                }
                if outcome.plaintext {
                    eprintln!("  some destination secrets are still in clear: a replica's restart seals them");
                }
                return Ok(());
            }
            if !path.exists() {
                // An install from before sealing (or a keyring moved to a read-only mount): create it here, as
                // the service user, before the first start that needs it. Refused when the CA key is sealed
                // already: a new key would not open it (the error names the key to restore).
                let dir = DataDir::new(&config.data_dir);
                let keyring = dir.open_keyring(path).with_context(|| {
                    format!(
                        "creating {} (run this as the user medfleetd runs as, with write access to that directory)",
                        path.display()
                    )
                })?;
                eprintln!(
                    "medfleetd: created {} with key {}; give every replica this file (mode 0600) and keep it apart \
                     from the database and the data directory's backups",
                    path.display(),
                    keyring.current().id()
                );
                return Ok(());
            }
            let keyring = medfleet_server::identity::secrets::rotate(path)
                .with_context(|| format!("rotating {}", path.display()))?;
            eprintln!(
                "medfleetd: {} now begins with the new key {} (kept for decryption: {}).\n  Next: give every replica \
                 this file and restart them (each re-encrypts what it stores at start), then run\n  medfleetd \
                 rotate-secrets-key --retire-unused to remove the old keys once nothing uses them.",
                path.display(),
                keyring.current().id(),
                keyring.ids()[1..].join(", ")
            );
            Ok(())
        }
        Command::Migrate { overrides } => {
            let config = Settings::load(overrides)?;
            let _guard = telemetry::init_tracing(config.log_format, &config.log_level, None)?;
            medfleet_server::persistence::db::migrate(&config.database_url)
                .await
                .context("applying migrations")?;
            tracing::info!("database schema is up to date");
            Ok(())
        }
        Command::Serve { overrides } => {
            let config = Settings::load(overrides)?;
            let _guard =
                telemetry::init_tracing(config.log_format, &config.log_level, config.otlp_endpoint.as_deref())?;
            if let Some(outcome) = ensure_initialised(&config, "admin")? {
                print_credentials_hint(&config, &outcome);
            }
            let listeners = Listeners::bind(&config)
                .await
                .with_context(|| format!("binding {} and {}", config.listen, config.http_listen))?;
            run(config, listeners, shutdown_signal()).await?;
            Ok(())
        }
    }
}

fn print_credentials_hint(config: &Settings, outcome: &medfleet_server::identity::data_dir::InitOutcome) {
    let dir = DataDir::new(&config.data_dir);
    eprintln!(
        "medfleetd: initialised {}\n  CA certificate:          {}\n  CA key (sealed):         {}\n  \
         secrets keyring (0600):  {}  (back it up apart from the database and this directory)\n  \
         admin credentials (0600): {}\n  use them with: medfleet --credentials {} sites list",
        dir.root().display(),
        outcome.ca_cert.display(),
        outcome.ca_key.display(),
        config.secrets_key_file.display(),
        outcome.admin_bundle.display(),
        outcome.admin_bundle.display(),
    );
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
