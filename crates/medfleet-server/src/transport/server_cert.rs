//! Live renewal of the server certificate. A running replica replaces its certificate when it is due by the rule
//! start-up applies ([`data_dir::server_renewal_at`]: two thirds into its life), stores the new pair where start-up
//! reads it, and swaps it into the TLS configuration: new handshakes present the new certificate, connections
//! already open keep theirs. Nothing goes through the database: a server certificate concerns only the clients of
//! the replica that presents it, and every replica can issue its own from the CA in its data directory.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::identity::data_dir::{self, DataDir, Renewal, ServerCredentials};
use crate::identity::pki::{self, CertificateAuthority};
use crate::telemetry::Metrics;
use crate::transport::tls::{self, ServerCertificate, TlsError};

/// The renewal instant is a wall-clock one (notAfter is), but tokio sleeps on the monotonic clock, which stands
/// still while the host is suspended: a long wait is re-measured against the wall clock at least this often.
const MAX_WAIT: Duration = Duration::from_hours(1);
/// After a failed renewal the next attempt waits this long, doubling with every further failure up to
/// [`RETRY_MAX`]. Even the shortest configurable lifetime (1 h) leaves 20 minutes, several attempts, once due.
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_mins(10);

#[derive(Debug, thiserror::Error)]
pub enum RenewalError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("renewal task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How long to sleep at `now` before looking at the renewal instant `due` again (zero: renew now).
pub fn wait_until(now: SystemTime, due: SystemTime) -> Duration {
    due.duration_since(now).unwrap_or(Duration::ZERO).min(MAX_WAIT)
}

/// The pause before the next attempt after `failures` consecutive failed renewals (at least one).
pub fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    RETRY_FIRST.saturating_mul(1 << doublings).min(RETRY_MAX)
}

/// What a replica needs to issue a successor the way start-up would: the same CA, names and lifetime.
#[derive(Debug, Clone)]
pub struct Renewer {
    pub dir: DataDir,
    pub ca: Arc<CertificateAuthority>,
    pub names: Vec<String>,
    pub lifetime: Duration,
    /// Where new handshakes get the certificate from.
    pub certificate: Arc<ServerCertificate>,
    pub metrics: Metrics,
}

impl Renewer {
    /// Renews `serving` (the certificate `certificate` presents now) and each successor when due, until `stop`.
    pub fn spawn(self, serving: &ServerCredentials, stop: CancellationToken) {
        self.metrics.set_server_certificate_expiry(serving.not_after);
        let mut serial = serving.serial.clone();
        let mut due = data_dir::server_renewal_at(serving.not_after, self.lifetime);
        tokio::spawn(async move {
            let mut failures = 0;
            loop {
                let wait = wait_until(SystemTime::now(), due);
                if !wait.is_zero() {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(wait) => continue,
                    }
                }
                match self.renew(&serial).await {
                    Ok(renewed) => {
                        failures = 0;
                        due = data_dir::server_renewal_at(renewed.not_after, self.lifetime);
                        serial = renewed.serial;
                    }
                    Err(error) => {
                        failures += 1;
                        let retry = retry_delay(failures);
                        self.metrics.record_server_certificate_renewal("failed");
                        tracing::error!(
                            %error,
                            %serial,
                            failures,
                            retry_in = %humantime::format_duration(retry),
                            "server certificate renewal failed; the current certificate stays in use"
                        );
                        due = SystemTime::now() + retry;
                    }
                }
            }
        });
    }

    async fn renew(&self, serving: &str) -> Result<ServerCredentials, RenewalError> {
        let (dir, ca, names, lifetime, serving) = (
            self.dir.clone(),
            Arc::clone(&self.ca),
            self.names.clone(),
            self.lifetime,
            serving.to_owned(),
        );
        // Key generation, fsyncs and waiting for the data directory's lock block: keep them off the workers.
        let (credentials, how) =
            tokio::task::spawn_blocking(move || dir.renew_server_credentials(&ca, &names, lifetime, &serving))
                .await??;
        self.certificate.replace(tls::certified_key(&credentials)?);
        self.metrics.set_server_certificate_expiry(credentials.not_after);
        let source = match how {
            Renewal::Issued => "issued",
            Renewal::Adopted => "adopted",
        };
        self.metrics.record_server_certificate_renewal(source);
        tracing::info!(
            serial = %credentials.serial,
            not_after = %humantime::format_rfc3339_seconds(credentials.not_after),
            source,
            "server certificate renewed"
        );
        Ok(credentials)
    }
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::pem::PemObject as _;

    use super::*;

    #[test]
    fn waits_until_the_renewal_instant_re_measuring_long_waits() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_hours(480_000);
        assert_eq!(wait_until(now, now + Duration::from_secs(4)), Duration::from_secs(4));
        assert_eq!(wait_until(now, now + Duration::from_hours(60 * 24)), MAX_WAIT);
        assert_eq!(wait_until(now, now), Duration::ZERO);
        assert_eq!(wait_until(now, now - Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn a_failed_renewal_is_retried_with_backoff() {
        assert_eq!(retry_delay(1), Duration::from_secs(5));
        assert_eq!(retry_delay(2), Duration::from_secs(10));
        assert_eq!(retry_delay(4), Duration::from_secs(40));
        assert_eq!(retry_delay(8), RETRY_MAX);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
        // Never called with zero, but it must not misbehave.
        assert_eq!(retry_delay(0), RETRY_FIRST);
    }

    /// The whole loop on a real data directory: a certificate issued for seconds is replaced in the resolver
    /// two thirds into its life, and the stored pair is the new one.
    #[tokio::test]
    async fn renews_in_place_when_due() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        let lifetime = Duration::from_secs(3);
        let names = vec!["localhost".to_owned()];
        let secrets = crate::identity::secrets::Secrets::new(
            crate::identity::secrets::create(&tmp.path().join("secrets.key")).unwrap(),
        );
        dir.init("admin", &names, lifetime, Duration::from_hours(1), &secrets)
            .unwrap();
        let ca = Arc::new(dir.load_ca(secrets.keyring()).unwrap());
        let serving = dir.server_credentials(&ca, &names, lifetime).unwrap();
        let certificate = ServerCertificate::new(&serving).unwrap();
        let metrics = Metrics::new(None).unwrap();
        let stop = CancellationToken::new();
        Renewer {
            dir: dir.clone(),
            ca: Arc::clone(&ca),
            names: names.clone(),
            lifetime,
            certificate: Arc::clone(&certificate),
            metrics: metrics.clone(),
        }
        .spawn(&serving, stop.clone());
        let presented = || pki::serial_of(certificate.current().end_entity_cert().unwrap()).unwrap();
        assert_eq!(presented(), serving.serial);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while presented() == serving.serial {
            assert!(std::time::Instant::now() < deadline, "not renewed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        let stored = std::fs::read_to_string(dir.server_cert()).unwrap();
        let stored = rustls_pki_types::CertificateDer::from_pem_slice(stored.as_bytes()).unwrap();
        assert_ne!(pki::serial_of(&stored).unwrap(), serving.serial);
        assert!(metrics.render().contains("medfleet_server_certificate_renewals_total"));
    }
}
