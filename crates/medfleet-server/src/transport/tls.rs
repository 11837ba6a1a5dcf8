//! TLS 1.3 termination, done here rather than in tonic so that the client-certificate verifier is ours (it consults
//! the revocation set), the caller's identity is extracted once per connection, and a connection can be closed the
//! moment its certificate is revoked.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use medfleet_core::identity::Identity;
use rustls::RootCertStore;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::identity::data_dir::ServerCredentials;
use crate::identity::pki::{identity_of, not_after_of, serial_of};
use crate::identity::revocation::{RevocationAwareVerifier, RevocationWatch, Revocations};
use crate::telemetry::Metrics;

/// A handshake that takes longer than this is dropped (slowloris protection).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many handshakes run at once; further connections wait in the kernel backlog.
const MAX_CONCURRENT_HANDSHAKES: usize = 512;
/// Open connections per replica, of any kind. Measured: 10,000 device sessions; twice that leaves room for
/// operators and integrations while bounding memory (≈ 100 KiB per idle TLS + HTTP/2 connection).
pub const MAX_CONNECTIONS: usize = 20_000;
/// Open connections without a client certificate (enrollment only), per replica and per client address (an IPv6
/// /64 counts as one). A ward enrolling its monitors in bulk behind one NAT address (`medfleet-agent simulate` and
/// bulk provisioning tools run 32 enrollments at once) stays under the per-address cap.
pub const MAX_ANONYMOUS_CONNECTIONS: usize = 1_024;
pub const MAX_ANONYMOUS_PER_ADDRESS: usize = 64;
/// An anonymous connection lives this long at most: enough for an Enroll, too little to hoard connections.
pub const ANONYMOUS_LIFETIME: Duration = Duration::from_mins(1);

/// The client a connection counts against: its address, with an IPv6 /64 as one client (whole /64s are handed
/// to one host, so per-address limits on IPv6 would be evaded by rotating addresses).
pub fn client_key(address: std::net::IpAddr) -> std::net::IpAddr {
    match address {
        std::net::IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            std::net::IpAddr::from(octets)
        }
        v4 @ std::net::IpAddr::V4(_) => v4,
    }
}

/// Counts anonymous connections per client; a slot is given back when its connection closes.
#[derive(Debug, Default)]
struct Anonymous {
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One anonymous connection's slot.
#[derive(Debug)]
struct AnonymousSlot {
    anonymous: Arc<Anonymous>,
    client: std::net::IpAddr,
}

impl Anonymous {
    /// A slot for one more anonymous connection from `address`, or the limit that refuses it.
    fn admit(self: &Arc<Self>, address: std::net::IpAddr) -> Result<AnonymousSlot, &'static str> {
        let client = client_key(address);
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if open.values().sum::<usize>() >= MAX_ANONYMOUS_CONNECTIONS {
            return Err("anonymous_total");
        }
        let count = open.entry(client).or_default();
        if *count >= MAX_ANONYMOUS_PER_ADDRESS {
            return Err("anonymous_per_address");
        }
        *count += 1;
        Ok(AnonymousSlot {
            anonymous: Arc::clone(self),
            client,
        })
    }
}

impl Drop for AnonymousSlot {
    fn drop(&mut self) {
        let mut open = self
            .anonymous
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("server certificate or key PEM: {0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// What the server knows about the peer of one connection, attached to every request on it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    /// The identity in the client certificate, or why it has none.
    pub identity: Result<Identity, String>,
    /// Serial (hex) and expiry of the client certificate, when one was presented.
    pub certificate: Option<(String, std::time::SystemTime)>,
}

/// The server certificate that new handshakes present. Renewal swaps it in place: connections already open keep
/// the session they negotiated, and the listener never restarts.
pub struct ServerCertificate {
    current: ArcSwap<CertifiedKey>,
}

impl std::fmt::Debug for ServerCertificate {
    // The certified key holds the private key: print nothing of it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCertificate").finish_non_exhaustive()
    }
}

impl ServerCertificate {
    pub fn new(credentials: &ServerCredentials) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: ArcSwap::new(certified_key(credentials)?),
        }))
    }

    /// The certificate and key the next handshake presents.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// From the next handshake on, present `key` (made by [`certified_key`], so it is known to be usable).
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Parses a server chain and key for serving, refusing a key that does not belong to the certificate (what
/// rustls' single-certificate configuration checked).
pub fn certified_key(credentials: &ServerCredentials) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(credentials.chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(credentials.key_pem.as_bytes())?;
    Ok(Arc::new(CertifiedKey::from_der(
        chain,
        key,
        &rustls::crypto::ring::default_provider(),
    )?))
}

/// Server TLS settings: TLS 1.3 only, ALPN h2, the current server certificate of `certificate`, client
/// certificates from medfleet's CA verified against the revocation set. A connection without a certificate is
/// accepted at the TLS layer only so that devices can reach `Enroll`; the RPC layer refuses it everything else.
pub fn server_config(
    ca: &CertificateDer<'static>,
    certificate: Arc<ServerCertificate>,
    revocations: Arc<Revocations>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let verifier = Arc::new(RevocationAwareVerifier::new(webpki, revocations));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed session would skip the verifier, letting a revoked or expired certificate
    // back in. Every connection performs a full handshake.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// One accepted TLS connection. Its I/O fails, and so it closes, as soon as its certificate is revoked or
/// reaches its notAfter: the handshake checked validity once, the connection may live for days.
#[derive(Debug)]
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
    revoked: Option<RevocationWatch>,
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Held for the connection's life: its place under the connection limits.
    _slot: (tokio::sync::OwnedSemaphorePermit, Option<AnonymousSlot>),
}

impl TlsConnection {
    fn check_revoked(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let revoked = self
            .revoked
            .as_mut()
            .is_some_and(|watch| watch.poll_revoked(cx).is_ready());
        if revoked {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the client certificate was revoked",
            ));
        }
        let expired = self
            .expires
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
        if expired {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the client certificate expired (or an anonymous connection reached its lifetime)",
            ));
        }
        Ok(())
    }
}

/// A timer that fires at the certificate's notAfter (at once if that has passed).
fn expiry_timer(not_after: std::time::SystemTime) -> Pin<Box<tokio::time::Sleep>> {
    let left = not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Box::pin(tokio::time::sleep(left))
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Err(error) = self.check_revoked(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Err(error) = self.check_revoked(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(error) = self.check_revoked(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Err(error) = self.check_revoked(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections and completes each TLS handshake in its own task, so one slow or hostile client
/// cannot stall the others. The stream ends when the receiver is dropped (server shutdown).
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    revocations: Arc<Revocations>,
    metrics: Metrics,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let anonymous = Arc::new(Anonymous::default());
    metrics.set_connection_limits(MAX_CONNECTIONS, MAX_ANONYMOUS_CONNECTIONS, MAX_ANONYMOUS_PER_ADDRESS);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote_addr) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over capacity the connection is closed at once: cheaper than a handshake, and the client retries.
            let Ok(connection) = connections.clone().try_acquire_owned() else {
                metrics.record_connection_refused("total");
                drop(tcp);
                continue;
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let (tx, acceptor, metrics, revocations, anonymous) = (
                tx.clone(),
                acceptor.clone(),
                metrics.clone(),
                revocations.clone(),
                anonymous.clone(),
            );
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let leaf = stream.get_ref().1.peer_certificates().and_then(|certs| certs.first());
                        let identity =
                            leaf.map_or_else(|| Err("no client certificate".to_owned()), |cert| identity_of(cert));
                        let certificate = leaf.and_then(|cert| Some((serial_of(cert).ok()?, not_after_of(cert).ok()?)));
                        let revoked = certificate
                            .as_ref()
                            .map(|(serial, _)| revocations.watch(serial.clone()));
                        let (expires, slot) = match &certificate {
                            Some((_, not_after)) => (expiry_timer(*not_after), None),
                            None => match anonymous.admit(remote_addr.ip()) {
                                Ok(slot) => (Box::pin(tokio::time::sleep(ANONYMOUS_LIFETIME)), Some(slot)),
                                Err(limit) => {
                                    metrics.record_connection_refused(limit);
                                    tracing::info!(%remote_addr, limit, "anonymous connection refused: over its limit");
                                    return;
                                }
                            },
                        };
                        metrics.record_handshake("ok");
                        let peer = PeerInfo {
                            remote_addr,
                            identity,
                            certificate,
                        };
                        let _ = tx
                            .send(Ok(TlsConnection {
                                stream,
                                peer,
                                revoked,
                                expires: Some(expires),
                                _slot: (connection, slot),
                            }))
                            .await;
                    }
                    Ok(Err(error)) => {
                        metrics.record_handshake("failed");
                        tracing::info!(%remote_addr, %error, "TLS handshake refused");
                    }
                    Err(_) => {
                        metrics.record_handshake("timeout");
                        tracing::info!(%remote_addr, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
