//! The connection both deliveries share: TCP to the receiver, TLS with the destination's CA and client identity
//! (or in clear only where the destination says so), and the failure a delivery reports (retry or permanent).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::emr::destinations::Settings;
use crate::error::Result;

use super::IO_TIMEOUT;
use super::destinations::client_identity;

/// Why a delivery failed, and whether sending the same thing again could help.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) reason: String,
    pub(crate) permanent: bool,
}

impl Failure {
    pub(crate) fn retry(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            permanent: false,
        }
    }
}

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

/// TCP, then TLS if the destination has a CA (FHIR over https always has one), with medfleet's client
/// certificate when the destination has one.
pub(crate) async fn connect(host: &str, port: u16, settings: &Settings, tls: bool) -> Result<Box<dyn Io>, Failure> {
    let ca_pem = settings.ca_pem.as_deref();
    let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| Failure::retry(format!("connecting to {host}:{port} timed out")))?
        .map_err(|e| Failure::retry(format!("cannot connect to {host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    if !tls {
        return Ok(Box::new(tcp));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(ca_pem.unwrap_or_default().as_bytes()) {
        let cert: rustls_pki_types::CertificateDer<'_> =
            cert.map_err(|e| Failure::retry(format!("the destination's CA PEM is unreadable: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Failure::retry(format!("the destination's CA certificate is unusable: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Failure {
            reason: "TLS needs the receiver's CA: set ca_pem on the destination".into(),
            permanent: true,
        });
    }
    // Named, not the process default: the tree links a second provider (aws-lc-rs, for TUF) and TLS stays on ring.
    let builder =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Failure {
                reason: format!("TLS setup failed: {e}"),
                permanent: true,
            })?
            .with_root_certificates(roots);
    let config = match (&settings.client_certificate_pem, &settings.client_key_pem) {
        (Some(certs), Some(key)) => {
            let (chain, key) = client_identity(certs, key).map_err(|e| Failure {
                reason: format!("the destination's client certificate is unusable: {e}"),
                permanent: true,
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| Failure {
                reason: format!("the destination's client certificate does not match its key: {e}"),
                permanent: true,
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| Failure::retry(format!("'{host}' is not a valid TLS server name: {e}")))?;
    let stream = tokio::time::timeout(
        IO_TIMEOUT,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| Failure::retry(format!("TLS handshake with {host}:{port} timed out")))?
    .map_err(|e| Failure::retry(format!("TLS handshake with {host}:{port} failed: {e}")))?;
    Ok(Box::new(stream))
}
