//! `medfleet credentials`: renewing your own certificate; and the credentials bundle every issuing command writes
//! (this renewal, and `users`/`services create` in `principals`).

pub(crate) mod principals;

use std::path::{Path, PathBuf};

use clap::Subcommand;
use medfleet_proto::client::{Bundle, new_key_and_csr, write_private};
use medfleet_proto::v1::{self, credential_service_client::CredentialServiceClient};
use serde::Serialize;
use tonic::transport::Channel;

use crate::output::{self, Format, time};

#[derive(Debug, Subcommand)]
pub(crate) enum CredentialCommand {
    /// Renew your certificate with a fresh key; replaces the credentials file (or writes --out).
    #[command(after_help = "Example:\n  medfleet --credentials ~/alice.pem credentials renew")]
    Renew {
        /// Write the renewed bundle here instead of replacing the current one.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `current` is the credentials file the CLI runs with, replaced unless `--out` names another.
pub(crate) async fn run(
    channel: Channel,
    command: &CredentialCommand,
    current: &Path,
    out: Format,
) -> anyhow::Result<()> {
    let CredentialCommand::Renew { out: target } = command;
    renew(channel, target.as_deref().unwrap_or(current), out).await
}

/// Renews the caller's own certificate with a fresh key and replaces the bundle atomically.
async fn renew(channel: Channel, target: &Path, out: Format) -> anyhow::Result<()> {
    let mut api = CredentialServiceClient::new(channel);
    let (key_pem, csr_der) = new_key_and_csr()?;
    let response = api.renew(v1::RenewRequest { csr_der }).await?.into_inner();
    write_bundle(target, &key_pem, &response)?;
    show_certificate(out, &response, target)
}

#[derive(Debug, Serialize)]
struct CertificateView {
    identity: String,
    serial: String,
    not_after: String,
    file: String,
}

fn write_bundle(path: &Path, key_pem: &str, response: &v1::CertificateResponse) -> anyhow::Result<()> {
    let bundle = Bundle::parse(&format!("{key_pem}{}", response.certificate_chain_pem))
        .map_err(|e| anyhow::anyhow!("the server's answer is not a usable bundle: {e}"))?;
    write_private(path, &bundle.to_pem())?;
    Ok(())
}

fn show_certificate(out: Format, response: &v1::CertificateResponse, path: &Path) -> anyhow::Result<()> {
    let view = CertificateView {
        identity: response.identity.clone(),
        serial: response.serial.clone(),
        not_after: time(response.not_after.as_ref()),
        file: path.display().to_string(),
    };
    if out == Format::Json {
        return output::json(&view);
    }
    println!(
        "{} — certificate {} valid until {}, written to {} (mode 0600)",
        view.identity, view.serial, view.not_after, view.file
    );
    Ok(())
}
