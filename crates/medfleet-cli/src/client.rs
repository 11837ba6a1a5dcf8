//! Credentials and the mTLS connection to medfleetd.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where `medfleetd init`/`serve` puts the first admin's credentials when run with the default data dir.
pub(crate) const DEFAULT_CREDENTIALS: &str = "medfleet-data/admin.pem";

/// A credentials bundle: the private key, the certificate, then the CA certificate (as `medfleetd init` and
/// `medfleet users create` write it).
pub(crate) struct Credentials {
    key_pem: String,
    cert_pem: String,
    ca_pem: String,
}

fn pem_blocks(text: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let Some(label_end) = after.find("-----") else {
            break;
        };
        let label = after[..label_end].to_owned();
        let end_marker = format!("-----END {label}-----");
        let Some(end) = rest[start..].find(&end_marker) else {
            break;
        };
        let stop = start + end + end_marker.len();
        blocks.push((label, format!("{}\n", &rest[start..stop])));
        rest = &rest[stop..];
    }
    blocks
}

impl Credentials {
    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read credentials {}; pass --credentials FILE or set MEDFLEET_CREDENTIALS \
                 (medfleetd init writes admin.pem into its data directory)",
                path.display()
            )
        })?;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            eprintln!(
                "warning: {} holds a private key and is readable by other users; run: chmod 600 {}",
                path.display(),
                path.display()
            );
        }
        let blocks = pem_blocks(&text);
        let key_pem = blocks
            .iter()
            .find(|(label, _)| label.ends_with("PRIVATE KEY"))
            .map(|(_, b)| b.clone())
            .ok_or_else(|| {
                anyhow!(
                    "{} has no private key; it is not a medfleet credentials bundle",
                    path.display()
                )
            })?;
        let certs: Vec<&String> = blocks
            .iter()
            .filter(|(label, _)| label == "CERTIFICATE")
            .map(|(_, b)| b)
            .collect();
        let (Some(leaf), Some(ca)) = (certs.first(), certs.last()) else {
            bail!(
                "{} has no certificate; it is not a medfleet credentials bundle",
                path.display()
            );
        };
        if certs.len() < 2 {
            bail!(
                "{} has one certificate but needs the client certificate followed by the CA certificate",
                path.display()
            );
        }
        Ok(Self {
            key_pem,
            cert_pem: (*leaf).clone(),
            ca_pem: (*ca).clone(),
        })
    }
}

pub(crate) fn credentials_path(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(|| PathBuf::from(DEFAULT_CREDENTIALS))
}

pub(crate) async fn connect(server: &str, credentials: &Credentials) -> anyhow::Result<Channel> {
    let uri: http::Uri = server
        .parse()
        .with_context(|| format!("--server {server} is not a URL like https://medfleet.example:7443"))?;
    if uri.scheme_str() != Some("https") {
        bail!("--server {server} must be an https:// URL: medfleetd only speaks TLS");
    }
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("--server {server} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&credentials.ca_pem))
        .identity(Identity::from_pem(&credentials.cert_pem, &credentials.key_pem))
        .domain_name(host);
    let endpoint = Endpoint::from_shared(server.to_owned())
        .with_context(|| format!("--server {server} is not a valid URL"))?
        .tls_config(tls)
        .context("TLS settings")?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    endpoint.connect().await.map_err(|e| {
        anyhow!(
            "cannot reach medfleetd at {server}: {}; check that it is running and that --server (or MEDFLEET_SERVER) \
             names it as in its certificate",
            error_chain(&e)
        )
    })
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_pem_blocks_in_order() {
        let text = "-----BEGIN PRIVATE KEY-----\nA\n-----END PRIVATE KEY-----\njunk\n-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nC\n-----END CERTIFICATE-----\n";
        let blocks = pem_blocks(text);
        let labels: Vec<_> = blocks.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"]);
        assert!(blocks[2].1.contains("\nC\n"));
    }
}
