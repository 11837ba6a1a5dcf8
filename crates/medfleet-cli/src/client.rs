//! Credentials and the connection to medfleetd for the CLI (the transport itself is `medfleet_proto::client`), and
//! [`Server`]: where medfleetd is, connected only when a command needs it (offline commands never do).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use medfleet_proto::client::{Bundle, ClientError};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::InvalidInput;

/// Where `medfleetd init`/`serve` puts the first admin's credentials when run with the default data dir.
pub(crate) const DEFAULT_CREDENTIALS: &str = "medfleet-data/admin.pem";

pub(crate) fn credentials_path(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(|| PathBuf::from(DEFAULT_CREDENTIALS))
}

pub(crate) fn load(path: &Path) -> anyhow::Result<Bundle> {
    Bundle::load(path).with_context(|| {
        format!(
            "cannot use credentials {}; pass --credentials FILE or set MEDFLEET_CREDENTIALS (medfleetd init writes \
             admin.pem into its data directory)",
            path.display()
        )
    })
}

pub(crate) async fn connect(server: &str, bundle: &Bundle) -> anyhow::Result<Channel> {
    medfleet_proto::client::connect(server, bundle).await.map_err(explain)
}

fn explain(error: ClientError) -> anyhow::Error {
    match error {
        ClientError::Unreachable { server, reason } => anyhow::anyhow!(
            "cannot reach medfleetd at {server}: {reason}; check that it is running and that --server (or \
             MEDFLEET_SERVER) names it as in its certificate"
        ),
        // A server address that is not an https:// URL with a host: what was given is wrong, not the network.
        ClientError::Address(message) => InvalidInput(message).into(),
        other => other.into(),
    }
}

/// medfleetd's address and the credentials to present, for commands that connect.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) address: String,
    pub(crate) credentials: PathBuf,
}

impl Server {
    /// The channel every call uses (each call must finish within the shared client's request timeout).
    pub(crate) async fn channel(&self) -> anyhow::Result<Channel> {
        connect(&self.address, &load(&self.credentials)?).await
    }

    /// A channel without the per-call timeout, for a client-streaming transfer (a firmware upload) that lasts as
    /// long as the image takes to send: the shared client's timeout covers a call until its response, which for an
    /// upload comes only after the last byte.
    pub(crate) async fn transfer_channel(&self) -> anyhow::Result<Channel> {
        let bundle = load(&self.credentials)?;
        // The shared client checks the address and refuses anything but https:// (its error is the one to show).
        let uri: http::Uri = self.address.parse().map_err(|_| {
            InvalidInput(format!(
                "'{}' is not a URL like https://medfleet.example:7443",
                self.address
            ))
        })?;
        if uri.scheme_str() != Some("https") {
            return Err(InvalidInput(format!(
                "'{}' must be an https:// URL: medfleetd only speaks TLS",
                self.address
            ))
            .into());
        }
        let host = uri
            .host()
            .ok_or_else(|| InvalidInput(format!("'{}' has no host", self.address)))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&bundle.ca_pem))
            .identity(Identity::from_pem(&bundle.cert_pem, &bundle.key_pem))
            .domain_name(host);
        let endpoint = Endpoint::from_shared(self.address.clone())
            .map_err(|e| InvalidInput(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| InvalidInput(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        endpoint.connect().await.map_err(|e| {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                reason.push_str(": ");
                reason.push_str(&cause.to_string());
                source = cause.source();
            }
            explain(ClientError::Unreachable {
                server: self.address.clone(),
                reason,
            })
        })
    }
}
