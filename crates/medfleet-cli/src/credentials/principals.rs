//! `medfleet users` and `medfleet services`: credentials for operators (medfleet://user/NAME) and integrations
//! (medfleet://service/NAME) — one set of commands, the principal kind told apart by the group it is run under.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use medfleet_core::identity::RevocationReason;
use medfleet_proto::client::new_key_and_csr;
use medfleet_proto::convert::{duration_to_wire, revocation_reason_to_wire};
use medfleet_proto::v1::{self, credential_service_client::CredentialServiceClient};
use tonic::transport::Channel;

use super::{show_certificate, write_bundle};
use crate::args;
use crate::error::UsageError;
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub(crate) enum PrincipalCommand {
    /// Create credentials: the key is generated here and written with the certificate to --out (mode 0600).
    #[command(after_help = "Example:\n  medfleet users create alice --out alice.pem\n  \
                            medfleet services create epic-bridge --out epic.pem --lifetime 90days")]
    Create {
        name: String,
        /// Where to write the bundle (key, certificate, CA).
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime (default: the server's setting for the kind).
        #[arg(long, value_parser = args::parse_duration)]
        lifetime: Option<Duration>,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Revoke every certificate of this principal, at once, on every replica, and disable it.
    #[command(after_help = "Example:\n  medfleet users revoke alice --reason affiliation-changed")]
    Revoke {
        name: String,
        /// compromised, superseded, retired, affiliation-changed or unspecified.
        #[arg(long, value_parser = args::parse_reason, default_value = "unspecified")]
        reason: RevocationReason,
    },
}

pub(crate) async fn run(
    channel: Channel,
    kind: v1::PrincipalKind,
    command: &PrincipalCommand,
    out: Format,
) -> anyhow::Result<()> {
    let mut api = CredentialServiceClient::new(channel);
    match command {
        PrincipalCommand::Create {
            name,
            out: path,
            lifetime,
            force,
        } => {
            if path.exists() && !force {
                return Err(UsageError(format!(
                    "{} exists; choose another --out or pass --force",
                    path.display()
                ))
                .into());
            }
            let (key_pem, csr_der) = new_key_and_csr()?;
            let response = api
                .issue_credentials(v1::IssueCredentialsRequest {
                    kind: kind.into(),
                    name: name.clone(),
                    csr_der,
                    lifetime: lifetime.map(duration_to_wire),
                })
                .await?
                .into_inner();
            write_bundle(path, &key_pem, &response)?;
            show_certificate(out, &response, path)
        }
        PrincipalCommand::Revoke { name, reason } => {
            let response = api
                .revoke_credentials(v1::RevokeCredentialsRequest {
                    kind: kind.into(),
                    name: name.clone(),
                    reason: revocation_reason_to_wire(*reason).into(),
                })
                .await?
                .into_inner();
            if out == Format::Json {
                return output::json(
                    &serde_json::json!({ "name": name, "revoked_certificates": response.revoked_certificates }),
                );
            }
            println!(
                "revoked {} certificate(s) of {name}; it can no longer connect",
                response.revoked_certificates
            );
            Ok(())
        }
    }
}
