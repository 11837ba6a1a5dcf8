//! Credentials and the connection to medfleetd for the CLI (the transport itself is `medfleet_proto::client`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use medfleet_proto::client::{Bundle, ClientError};
use tonic::transport::Channel;

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
    medfleet_proto::client::connect(server, bundle)
        .await
        .map_err(|e| match e {
            ClientError::Unreachable { server, reason } => anyhow::anyhow!(
                "cannot reach medfleetd at {server}: {reason}; check that it is running and that --server (or \
             MEDFLEET_SERVER) names it as in its certificate"
            ),
            // A server address that is not an https:// URL with a host: what was given is wrong, not the network.
            ClientError::Address(message) => InvalidInput(message).into(),
            other => other.into(),
        })
}
