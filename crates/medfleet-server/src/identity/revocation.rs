//! Revocation that takes effect at once, on every replica.
//!
//! The database's `revocations` table is an append-only log with a monotonic sequence. Each replica keeps the
//! revoked serials that have not expired yet in memory, refreshes them right after its own revocations and polls
//! the log every [`POLL_INTERVAL`] for other replicas' (a short indexed query, so a revocation made anywhere is
//! enforced everywhere well within a second). The TLS verifier consults the set on every handshake, and every live
//! connection of a revoked certificate is closed, which ends its streams.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use chrono::Utc;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sea_orm::{ColumnTrait as _, DatabaseConnection, EntityTrait as _, QueryFilter as _, QueryOrder as _};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use medfleet_core::identity::RevocationReason;

use crate::identity::pki::{CertificateAuthority, serial_of};
use crate::persistence::entity::revocation;

/// Arbitrary but fixed key of the advisory lock that orders writers of the revocation log on PostgreSQL.
const REVOCATION_LOG_LOCK_KEY: i64 = 0x6d65_6466_6c74_0003;
/// A CRL is re-signed at least this often even when nothing changed, well before its next-update time.
const CRL_MAX_AGE: Duration = Duration::from_mins(30);

/// How often a replica looks for revocations made by other replicas.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
struct RevokedSet {
    last_seq: i64,
    /// serial → (revoked at, certificate expiry, reason)
    serials: HashMap<String, (SystemTime, SystemTime, RevocationReason)>,
}

/// A signed CRL: the log position it covers, when it was signed, and its DER.
type SignedCrl = (i64, std::time::Instant, Arc<Vec<u8>>);

#[derive(Debug, Default)]
pub struct Revocations {
    set: RwLock<RevokedSet>,
    live: Mutex<HashMap<String, HashMap<u64, CancellationToken>>>,
    next_connection: AtomicU64,
    crl_cache: Mutex<Option<SignedCrl>>,
    /// The last CRL number this replica issued.
    crl_number: AtomicU64,
}

impl Revocations {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        self.set
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .serials
            .contains_key(serial)
    }

    /// Applies log entries this replica has not seen, closes live connections of newly revoked certificates and
    /// forgets expired ones. Returns how many entries were new.
    pub async fn refresh(&self, db: &DatabaseConnection) -> Result<usize, sea_orm::DbErr> {
        let last_seq = self.set.read().unwrap_or_else(PoisonError::into_inner).last_seq;
        let entries = revocation::Entity::find()
            .filter(revocation::Column::Seq.gt(last_seq))
            .order_by_asc(revocation::Column::Seq)
            .all(db)
            .await?;
        let now = SystemTime::now();
        let mut fresh = Vec::new();
        {
            let mut set = self.set.write().unwrap_or_else(PoisonError::into_inner);
            for entry in &entries {
                set.last_seq = set.last_seq.max(entry.seq);
                let not_after = SystemTime::from(entry.not_after);
                // A reason this build does not know (a newer replica's) is still a revocation.
                let reason = entry.reason.parse().unwrap_or(RevocationReason::Unspecified);
                if not_after > now
                    && set
                        .serials
                        .insert(
                            entry.serial.clone(),
                            (SystemTime::from(entry.revoked_at), not_after, reason),
                        )
                        .is_none()
                {
                    fresh.push(entry.serial.clone());
                }
            }
            // An expired certificate is refused by the verifier anyway; keep the set (and the CRL) small.
            set.serials.retain(|_, (_, not_after, _)| *not_after > now);
        }
        if !fresh.is_empty() {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            for serial in &fresh {
                if let Some(connections) = live.remove(serial) {
                    tracing::info!(serial = %serial, connections = connections.len(), "closing connections of a revoked certificate");
                    for token in connections.values() {
                        token.cancel();
                    }
                }
            }
        }
        Ok(entries.len())
    }

    /// Polls the log until `stop` is cancelled. Errors are logged and retried: a database blip must not stop
    /// revocations from propagating once it recovers.
    pub fn spawn_poller(self: &Arc<Self>, db: DatabaseConnection, stop: CancellationToken) {
        let this = Arc::clone(self);
        crate::persistence::db::spawn_poller("revocations", POLL_INTERVAL, stop, move || {
            let (this, db) = (Arc::clone(&this), db.clone());
            async move { this.refresh(&db).await.map(|_| ()) }
        });
    }

    /// Registers a live connection of the certificate `serial`; the returned watch completes when that
    /// certificate is revoked.
    pub fn watch(self: &Arc<Self>, serial: String) -> RevocationWatch {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        {
            // Checked and registered under the `live` lock: `refresh` marks a serial revoked before it takes this
            // lock to cut connections, so a connection is either seen revoked here or cut there.
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            if self.is_revoked(&serial) {
                token.cancel();
            } else {
                live.entry(serial.clone()).or_default().insert(id, token.clone());
            }
        }
        RevocationWatch {
            revocations: Arc::clone(self),
            serial,
            id,
            cancelled: Box::pin(token.cancelled_owned()),
        }
    }

    /// The DER CRL of every revoked, unexpired certificate, re-signed only when the set changed.
    pub fn crl(&self, ca: &CertificateAuthority) -> Result<Arc<Vec<u8>>, crate::identity::pki::PkiError> {
        let (seq, revoked) = {
            let set = self.set.read().unwrap_or_else(PoisonError::into_inner);
            let revoked: Vec<(String, SystemTime, RevocationReason)> = set
                .serials
                .iter()
                .map(|(s, (at, _, reason))| (s.clone(), *at, *reason))
                .collect();
            (set.last_seq, revoked)
        };
        let mut cache = self.crl_cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((cached_seq, signed_at, der)) = cache.as_ref()
            && *cached_seq == seq
            && signed_at.elapsed() < CRL_MAX_AGE
        {
            return Ok(Arc::clone(der));
        }
        // CRL numbers must increase with every CRL issued (RFC 5280 5.2.3), also when only the validity window
        // moves. Milliseconds since the epoch do across restarts and, with synchronised clocks, across replicas;
        // the last number this replica issued guards against its own clock stepping back.
        let now_ms = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
        let number = now_ms.max(self.crl_number.load(Ordering::Acquire) + 1);
        self.crl_number.store(number, Ordering::Release);
        let der = Arc::new(ca.crl(number, &revoked)?);
        *cache = Some((seq, std::time::Instant::now(), Arc::clone(&der)));
        Ok(der)
    }
}

/// Completes when the watched certificate is revoked; unregisters itself when dropped.
pub struct RevocationWatch {
    revocations: Arc<Revocations>,
    serial: String,
    id: u64,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl std::fmt::Debug for RevocationWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationWatch")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl RevocationWatch {
    pub fn poll_revoked(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.cancelled.as_mut().poll(cx)
    }
}

impl Drop for RevocationWatch {
    fn drop(&mut self) {
        let mut live = self.revocations.live.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(connections) = live.get_mut(&self.serial) {
            connections.remove(&self.id);
            if connections.is_empty() {
                live.remove(&self.serial);
            }
        }
    }
}

/// rustls's WebPKI verifier plus the revocation set. Client certificates are optional at the TLS layer so that a
/// device without one can reach `Enroll`; the RPC layer refuses every other method to such a connection.
#[derive(Debug)]
pub struct RevocationAwareVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl RevocationAwareVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, revocations: Arc<Revocations>) -> Self {
        Self { inner, revocations }
    }
}

impl ClientCertVerifier for RevocationAwareVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let serial =
            serial_of(end_entity).map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.revocations.is_revoked(&serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Appends revocation log entries for `certs` (serial, expiry) inside the caller's transaction.
pub async fn log_revocations(
    txn: &impl sea_orm::ConnectionTrait,
    identity: &str,
    reason: &str,
    certs: &[(String, chrono::DateTime<Utc>)],
) -> Result<(), sea_orm::DbErr> {
    use sea_orm::ActiveValue::{NotSet, Set};
    if certs.is_empty() {
        return Ok(());
    }
    // Replicas read the log by `seq > last seen`. Sequence numbers are taken at insert, commits land in any order,
    // so an entry committed after a higher one would be skipped for good. Serialising writers of the log until
    // their commit makes commit order equal seq order (SQLite's write transactions are serial already).
    if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
        txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({REVOCATION_LOG_LOCK_KEY})"))
            .await?;
    }
    let at = crate::persistence::db::now();
    revocation::Entity::insert_many(certs.iter().map(|(serial, not_after)| revocation::ActiveModel {
        seq: NotSet,
        serial: Set(serial.clone()),
        identity: Set(identity.to_owned()),
        reason: Set(reason.to_owned()),
        revoked_at: Set(at),
        not_after: Set(*not_after),
    }))
    .exec(txn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use x509_parser::prelude::FromDer as _;
    use x509_parser::revocation_list::CertificateRevocationList;

    use super::*;

    fn num_bigint_be(n: &x509_parser::num_bigint::BigUint) -> Vec<u8> {
        n.to_bytes_be()
    }

    fn number_and_reasons(der: &[u8]) -> (Vec<u8>, Vec<Option<x509_parser::x509::ReasonCode>>) {
        let (_, crl) = CertificateRevocationList::from_der(der).unwrap();
        let number = crl.crl_number().map(num_bigint_be).unwrap_or_default();
        let reasons = crl
            .iter_revoked_certificates()
            .map(|r| r.reason_code().map(|(_, c)| c))
            .collect();
        (number, reasons)
    }

    /// Every CRL this replica signs has a higher number than the last (RFC 5280 5.2.3), and its entries carry their
    /// revocation reason.
    #[test]
    fn crl_numbers_increase_and_entries_carry_reasons() {
        let (ca, _) = CertificateAuthority::generate("test").unwrap();
        let revocations = Revocations::new();
        {
            let mut set = revocations.set.write().unwrap();
            let later = SystemTime::now() + Duration::from_hours(1);
            set.serials.insert(
                "0a0b".into(),
                (SystemTime::now(), later, RevocationReason::KeyCompromise),
            );
            set.last_seq = 1;
        }
        let mut last = Vec::new();
        for _ in 0..3 {
            // A changed set forces a new signature each time.
            revocations.set.write().unwrap().last_seq += 1;
            let (number, reasons) = number_and_reasons(&revocations.crl(&ca).unwrap());
            assert!(
                (number.len(), number.as_slice()) > (last.len(), last.as_slice()),
                "{number:?} after {last:?}"
            );
            assert_eq!(reasons, vec![Some(x509_parser::x509::ReasonCode::KeyCompromise)]);
            last = number;
        }
    }
}
