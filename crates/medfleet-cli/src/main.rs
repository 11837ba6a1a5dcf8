//! `medfleet`: the operator CLI for hospital IT, biomedical engineers and integration teams.
//!
//! Exit codes (stable, for scripts): 0 success, 1 other error, 2 usage error, 3 invalid input, 4 not found,
//! 5 conflict (already exists or not allowed in the current state), 6 not authorised, 7 server unavailable;
//! `rollouts watch`: 8 halted, 9 aborted, 10 the deadline left devices out.
//!
//! This file holds the top-level command line, hands each command group to its module (one per group, named after
//! it) and turns a failure into its exit code.

mod access;
mod args;
mod audit;
mod client;
mod clinical;
mod config;
mod confirm;
mod credentials;
mod devices;
mod emr;
mod error;
mod firmware;
mod output;
mod pager;
mod registry;
mod rollouts;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use medfleet_proto::v1;
use output::Format;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

use crate::error::{Hint, InvalidInput, UsageError};

/// Operate a medfleet device fleet.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Example:\n  medfleet --server https://medfleet.hospital.example:7443 --credentials ~/alice.pem devices list\n\n\
                  Exit codes: 0 ok, 1 error, 2 usage, 3 invalid input, 4 not found, 5 conflict, 6 not authorised, \
                  7 server unavailable; rollouts watch: 8 halted, 9 aborted, 10 deadline left devices out."
)]
struct Cli {
    /// medfleetd gRPC address.
    #[arg(
        long,
        global = true,
        env = "MEDFLEET_SERVER",
        default_value = "https://localhost:7443"
    )]
    server: String,
    /// Credentials bundle (private key, certificate, CA). Default: medfleet-data/admin.pem.
    #[arg(long, global = true, env = "MEDFLEET_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sites: the hospital campuses at the top of the location tree.
    #[command(subcommand)]
    Sites(registry::sites::SiteCommand),
    /// Wards inside a site, and their beds.
    #[command(subcommand)]
    Wards(registry::wards::WardCommand),
    /// The device registry, enrollment and revocation.
    #[command(subcommand)]
    Devices(devices::DeviceCommand),
    /// Operator credentials (medfleet://user/NAME).
    #[command(subcommand)]
    Users(credentials::principals::PrincipalCommand),
    /// Integration credentials (medfleet://service/NAME), e.g. for EMR interfaces.
    #[command(subcommand)]
    Services(credentials::principals::PrincipalCommand),
    /// Your own credentials.
    #[command(subcommand)]
    Credentials(credentials::CredentialCommand),
    /// Role-based access: who may do what, where.
    #[command(subcommand)]
    Access(access::AccessCommand),
    /// The tamper-evident audit trail.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Desired device configuration: layers, versions, schemas, drift.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Device–patient associations (which patient a device's readings chart to).
    #[command(subcommand)]
    Patients(clinical::patients::PatientCommand),
    /// The chart: observations from devices, and their validation.
    #[command(subcommand)]
    Observations(clinical::observations::ObservationCommand),
    /// EMR destinations (gRPC feed, FHIR R4, HL7 v2 over MLLP) and their deliveries.
    #[command(subcommand)]
    Emr(emr::EmrCommand),
    /// Watch an EMR feed live.
    #[command(subcommand)]
    Feed(emr::feed::FeedCommand),
    /// Firmware: TUF keys and signing (offline), the trusted root, and the signed images medfleetd stores.
    #[command(subcommand)]
    Firmware(firmware::FirmwareCommand),
    /// Staged firmware rollouts: waves, thresholds, maintenance windows, clinical-use rules.
    #[command(subcommand)]
    Rollouts(rollouts::RolloutCommand),
}

impl Cli {
    fn server(&self) -> client::Server {
        client::Server {
            address: self.server.clone(),
            credentials: client::credentials_path(self.credentials.clone()),
        }
    }
}

async fn channel(cli: &Cli) -> anyhow::Result<Channel> {
    cli.server().channel().await
}

async fn execute(cli: &Cli) -> anyhow::Result<()> {
    let out = cli.output;
    // Firmware connects only for its server commands: keys, signing and countersigning run offline.
    // Rollouts check a new rollout's flags before connecting.
    match &cli.command {
        Command::Firmware(command) => return firmware::run(&cli.server(), command, out).await,
        Command::Rollouts(command) => return rollouts::run(&cli.server(), command, out).await,
        _ => {}
    }
    let channel = channel(cli).await?;
    match &cli.command {
        Command::Sites(command) => registry::sites::run(channel, command, out).await,
        Command::Wards(command) => registry::wards::run(channel, command, out).await,
        Command::Devices(command) => devices::run(channel, command, out).await,
        Command::Users(command) => credentials::principals::run(channel, v1::PrincipalKind::User, command, out).await,
        Command::Services(command) => {
            credentials::principals::run(channel, v1::PrincipalKind::Service, command, out).await
        }
        Command::Credentials(command) => {
            let current = client::credentials_path(cli.credentials.clone());
            credentials::run(channel, command, &current, out).await
        }
        Command::Access(command) => access::run(channel, command, out).await,
        Command::Audit(command) => audit::run(channel, command, out).await,
        Command::Config(command) => config::run(channel, command, out).await,
        Command::Patients(command) => clinical::patients::run(channel, command, out).await,
        Command::Observations(command) => clinical::observations::run(channel, command, out).await,
        Command::Emr(command) => emr::run(channel, command, out).await,
        Command::Feed(command) => emr::feed::run(channel, command, out).await,
        // Run above.
        Command::Firmware(_) | Command::Rollouts(_) => Ok(()),
    }
}

/// Whether a transport failure was the server rejecting our client certificate (a TLS alert after the handshake).
fn certificate_refused(status: &tonic::Status) -> bool {
    let mut text = status.message().to_lowercase();
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        text.push_str(&error.to_string().to_lowercase());
        source = error.source();
    }
    ["certificate", "revoked", "expired", "unknown ca", "bad certificate"]
        .iter()
        .any(|needle| text.contains(needle))
}

/// Prints the error for a person and picks the exit code scripts rely on.
fn report(error: &anyhow::Error) -> u8 {
    if let Some(usage) = error.downcast_ref::<UsageError>() {
        eprintln!("error: {usage}");
        return 2;
    }
    if let Some(invalid) = error.downcast_ref::<InvalidInput>() {
        eprintln!("error: {invalid}");
        return 3;
    }
    if let Some(ended) = error.downcast_ref::<crate::error::RolloutEnded>() {
        eprintln!("error: {ended}");
        return ended.code;
    }
    let Some(status) = error.downcast_ref::<tonic::Status>() else {
        eprintln!("error: {error:#}");
        return if error.to_string().starts_with("cannot reach medfleetd") {
            7
        } else {
            1
        };
    };
    match status.get_details_bad_request() {
        Some(bad_request) if !bad_request.field_violations.is_empty() => {
            eprintln!("error: the server rejected the request; nothing was changed:");
            for violation in &bad_request.field_violations {
                eprintln!("  {}: {}", violation.field, violation.description);
            }
        }
        _ => eprintln!("error: {}", status.message()),
    }
    let (code, hint) = match status.code() {
        Code::InvalidArgument | Code::OutOfRange => (3, None),
        Code::NotFound => (4, None),
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => (5, None),
        Code::Unauthenticated => (6, Some("your credentials were not accepted; check --credentials")),
        Code::PermissionDenied => (6, Some("ask an administrator for the permission named above")),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled if certificate_refused(status) => {
            (
                6,
                Some(
                    "medfleetd refused your certificate (revoked, expired or not issued by its CA); renew it \
                 (medfleet credentials renew) or ask an administrator for new credentials",
                ),
            )
        }
        Code::Unavailable | Code::DeadlineExceeded => (
            7,
            Some("medfleetd is not reachable or not ready; check --server and that it is running"),
        ),
        _ => (1, None),
    };
    if let Some(hint) = hint {
        eprintln!("hint: {hint}");
    }
    if let Some(hint) = error.downcast_ref::<Hint>() {
        eprintln!("hint: {hint}");
    }
    code
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match execute(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => ExitCode::from(report(&error)),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_leaf_command_has_an_example() {
        fn walk(cmd: &clap::Command, path: &str) {
            let name = format!("{path} {}", cmd.get_name());
            if cmd.get_subcommands().next().is_none() {
                let help = cmd.get_after_help().map(ToString::to_string).unwrap_or_default();
                assert!(help.contains("Example"), "`{name}` has no example in its --help");
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &name);
            }
        }
        walk(&Cli::command(), "");
    }
}
