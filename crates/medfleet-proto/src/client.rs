//! The client side of the wire, shared by the CLI and the device agent: credential bundles, mTLS channels,
//! key and CSR generation, and private files written 0600.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Address(String),
    #[error("cannot reach medfleetd at {server}: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("generating a key or CSR failed: {0}")]
    Key(String),
}

fn file_error(path: &Path, message: impl Into<String>) -> ClientError {
    ClientError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// PEM blocks in order: (label, block text with its BEGIN/END lines).
pub fn pem_blocks(text: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let Some(label_end) = after.find("-----") else { break };
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

/// A credentials bundle: private key, certificate, CA certificate — the layout `medfleetd init`, `medfleet users
/// create` and the agent write.
#[derive(Clone)]
pub struct Bundle {
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle").finish_non_exhaustive()
    }
}

impl Bundle {
    pub fn parse(text: &str) -> Result<Self, String> {
        let blocks = pem_blocks(text);
        let key_pem = blocks
            .iter()
            .find(|(label, _)| label.ends_with("PRIVATE KEY"))
            .map(|(_, b)| b.clone())
            .ok_or("no private key; it is not a medfleet credentials bundle")?;
        let certs: Vec<&String> = blocks
            .iter()
            .filter(|(label, _)| label == "CERTIFICATE")
            .map(|(_, b)| b)
            .collect();
        match (certs.first(), certs.last()) {
            (Some(leaf), Some(ca)) if certs.len() >= 2 => Ok(Self {
                key_pem,
                cert_pem: (*leaf).clone(),
                ca_pem: (*ca).clone(),
            }),
            _ => Err("needs the client certificate followed by the CA certificate".to_owned()),
        }
    }

    /// Reads a bundle, warning (on stderr) when other users can read the key.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e.to_string()))?;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            eprintln!(
                "warning: {} holds a private key and is readable by other users; run: chmod 600 {}",
                path.display(),
                path.display()
            );
        }
        Self::parse(&text).map_err(|e| file_error(path, e))
    }

    pub fn to_pem(&self) -> String {
        format!("{}{}{}", self.key_pem, self.cert_pem, self.ca_pem)
    }
}

fn endpoint(server: &str, tls: ClientTlsConfig) -> Result<Endpoint, ClientError> {
    let uri: http::Uri = server
        .parse()
        .map_err(|_| ClientError::Address(format!("'{server}' is not a URL like https://medfleet.example:7443")))?;
    if uri.scheme_str() != Some("https") {
        return Err(ClientError::Address(format!(
            "'{server}' must be an https:// URL: medfleetd only speaks TLS"
        )));
    }
    let host = uri
        .host()
        .ok_or_else(|| ClientError::Address(format!("'{server}' has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok(Endpoint::from_shared(server.to_owned())
        .map_err(|e| ClientError::Address(e.to_string()))?
        .tls_config(tls.domain_name(host))
        .map_err(|e| ClientError::Address(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW))
}

/// HTTP/2 receive window of one stream. Firmware arrives in 1 MiB messages: with hyper's default (2 MiB) the
/// server stalls whenever this side is a message behind; several messages in flight keep the link busy, and the
/// window still bounds what one stream buffers here.
const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// HTTP/2 receive window of the whole connection: a download beside the device's session and readings.
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

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

async fn connect_with(server: &str, tls: ClientTlsConfig) -> Result<Channel, ClientError> {
    endpoint(server, tls)?
        .connect()
        .await
        .map_err(|e| ClientError::Unreachable {
            server: server.to_owned(),
            reason: error_chain(&e),
        })
}

/// An mTLS channel presenting `bundle`'s certificate and trusting only its CA.
pub async fn connect(server: &str, bundle: &Bundle) -> Result<Channel, ClientError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&bundle.ca_pem))
        .identity(Identity::from_pem(&bundle.cert_pem, &bundle.key_pem));
    connect_with(server, tls).await
}

/// A server-authenticated channel without a client certificate: enough for `Enroll`, nothing else.
pub async fn connect_anonymous(server: &str, ca_pem: &str) -> Result<Channel, ClientError> {
    connect_with(
        server,
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)),
    )
    .await
}

/// A fresh ECDSA P-256 key (PKCS#8 PEM) and a CSR for it (DER). The CSR names no identity: the server decides it.
pub fn new_key_and_csr() -> Result<(String, Vec<u8>), ClientError> {
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| ClientError::Key(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| ClientError::Key(e.to_string()))?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Writes a file atomically with mode 0600 (temp file in the same directory, fsync, rename).
pub fn write_private(path: &Path, contents: &str) -> Result<(), ClientError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e.to_string()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // A fresh, unpredictable name opened with O_EXCL: never an existing file, never a planted symlink.
    let tmp = dir.join(format!(".{name}.tmp-{}", uuid::Uuid::new_v4().simple()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| file_error(&tmp, e.to_string()))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| file_error(&tmp, e.to_string()))?;
    file.sync_all().map_err(|e| file_error(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| file_error(path, e.to_string()))
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
        let bundle = Bundle::parse(text).unwrap();
        assert!(bundle.ca_pem.contains("\nC\n"));
        assert!(bundle.cert_pem.contains("\nB\n"));
        assert!(!format!("{bundle:?}").contains('A'), "Debug must not print the key");
        assert!(Bundle::parse("-----BEGIN PRIVATE KEY-----\nA\n-----END PRIVATE KEY-----\n").is_err());
    }

    #[test]
    fn csr_is_a_valid_request() {
        let (key, csr) = new_key_and_csr().unwrap();
        assert!(key.contains("PRIVATE KEY"));
        assert_eq!(csr[0], 0x30, "DER SEQUENCE");
    }

    #[test]
    fn private_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key.pem");
        write_private(&path, "secret").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "secret");
    }
}
