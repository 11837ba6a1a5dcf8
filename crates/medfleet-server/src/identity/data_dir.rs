//! The data directory a replica keeps its key material in: the CA certificate and its sealed key, the server
//! certificate and key, the first admin's bundle. It is created once (`init`), opened at every start (the CA key
//! re-sealed under the current keyring key, the server certificate renewed when due), and holds nothing the
//! database should (durable fleet state lives there).

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use medfleet_core::identity::Identity;
use medfleet_core::secrets::Keyring;

use crate::identity::files::{FileError, read, read_private, sync_dir, write_private, write_public};
use crate::identity::secrets;
use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use x509_parser::extensions::GeneralName;

use crate::identity::pki::{CertificateAuthority, PkiError, io_err, serial_of};

/// The associated data the CA key's envelope is sealed for: it opens only as the CA key.
const CA_KEY_AAD: &str = "ca.key";

/// What [`DataDir::protect_ca_key`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaKeyChange {
    /// A plaintext `ca.key` (from an older medfleetd) was sealed and removed.
    Sealed { kid: String },
    /// The sealed key was re-encrypted under the current key (it used `from`).
    Resealed { from: String, kid: String },
}

/// The on-disk layout of a medfleetd data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// What `init` created, for the operator's summary.
#[derive(Debug)]
pub struct InitOutcome {
    pub admin_bundle: PathBuf,
    pub ca_cert: PathBuf,
    /// The sealed CA key; the keyring that opens it is the configured `secrets_key_file`.
    pub ca_key: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca/ca.crt")
    }
    /// Where older versions kept the CA key in clear; migrated to [`Self::ca_key_sealed`] at start.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca/ca.key")
    }
    /// The CA key (PEM), sealed with the secrets keyring.
    pub fn ca_key_sealed(&self) -> PathBuf {
        self.root.join("ca/ca.key.enc")
    }
    /// Where the secrets keyring lives unless `secrets_key_file` says otherwise.
    pub fn default_secrets_key_file(&self) -> PathBuf {
        self.root.join("secrets.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("tls/server.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.root.join("tls/server.key")
    }
    /// The first admin's credentials; also the CLI's default credentials path for the default data dir.
    pub fn admin_bundle(&self) -> PathBuf {
        self.root.join("admin.pem")
    }
    /// The first admin's certificate (public), kept so the server can record it for revocation.
    pub fn admin_cert(&self) -> PathBuf {
        self.root.join("ca/admin.crt")
    }
    pub fn sqlite_db(&self) -> PathBuf {
        self.root.join("medfleet.db")
    }

    pub fn is_initialised(&self) -> bool {
        self.ca_cert().exists()
    }

    /// Creates the CA, the server certificate and the first admin's credentials. Refuses to touch a directory
    /// that already holds a CA.
    pub fn init(
        &self,
        admin: &str,
        server_names: &[String],
        server_lifetime: Duration,
        admin_lifetime: Duration,
        secrets: &crate::identity::secrets::Secrets,
    ) -> Result<InitOutcome, PkiError> {
        if self.is_initialised() {
            return Err(PkiError::AlreadyInitialised(self.root.clone()));
        }
        for dir in [self.root.clone(), self.root.join("ca"), self.root.join("tls")] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
        }
        let (ca, ca_key_pem) = CertificateAuthority::generate("medfleet")?;
        // Key first: a crash between the two writes leaves no CA certificate, so init can simply be re-run. The
        // key is written only sealed: it never touches the disk in clear.
        write_private(&self.ca_key_sealed(), &seal_ca_key(secrets, &ca_key_pem)?)?;
        let server = ca.issue_server(server_names, server_lifetime)?;
        write_private(&self.server_key(), &server.key_pem)?;
        write_public(&self.server_cert(), &server.cert_pem)?;
        let admin = ca.issue_client(&Identity::User(admin.to_owned()), admin_lifetime)?;
        write_private(&self.admin_bundle(), &admin.to_pem())?;
        write_public(&self.admin_cert(), &admin.cert_pem)?;
        write_public(&self.ca_cert(), ca.cert_pem())?;
        Ok(InitOutcome {
            admin_bundle: self.admin_bundle(),
            ca_cert: self.ca_cert(),
            ca_key: self.ca_key_sealed(),
        })
    }

    /// Loads the CA, refusing a private key file that other users could read. The key is the sealed one, or the
    /// plaintext `ca.key` of an older version that [`Self::protect_ca_key`] has not migrated yet.
    pub fn load_ca(&self, keyring: &medfleet_core::secrets::Keyring) -> Result<CertificateAuthority, PkiError> {
        if !self.is_initialised() {
            return Err(PkiError::NotInitialised(self.root.clone()));
        }
        let sealed = self.ca_key_sealed();
        let key_pem = if sealed.exists() {
            open_ca_key(keyring, &sealed, &read_private(&sealed)?)?
        } else {
            read_private(&self.ca_key())?
        };
        let cert_pem = read(&self.ca_cert())?;
        CertificateAuthority::from_pem(&cert_pem, &key_pem)
    }

    /// Held while the server certificate and key are read or replaced, so that replicas sharing this directory
    /// never pair one replica's key with another's certificate (each file is replaced atomically, the pair is
    /// not). The lock is released when the file is closed.
    fn lock_server_files(&self) -> Result<fs::File, PkiError> {
        let path = self.root.join("tls/server.lock");
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        file.lock().map_err(io_err(&path))?;
        Ok(file)
    }

    /// The keyring a replica starts with: the configured file, created only while nothing is sealed under a key yet
    /// (a new data directory, or the first start after an upgrade from plaintext keys).
    pub fn open_keyring(&self, path: &Path) -> Result<Keyring, secrets::SecretsError> {
        if path.exists() {
            return secrets::load(path);
        }
        if let Some(kid) = self.ca_key_kid()? {
            return Err(secrets::SecretsError::Missing {
                path: path.to_owned(),
                sealed: format!("the CA key ({})", self.ca_key_sealed().display()),
                kid,
            });
        }
        secrets::create(path)
    }

    /// The key id the CA key is sealed with (none while it is still in clear).
    pub fn ca_key_kid(&self) -> Result<Option<String>, FileError> {
        let sealed = self.ca_key_sealed();
        if !sealed.exists() {
            return Ok(None);
        }
        Ok(medfleet_core::secrets::key_id_of(read_private(&sealed)?.trim()).map(str::to_owned))
    }

    /// Keeps the CA key sealed under the current key: seals a plaintext `ca.key` left by an older version (the
    /// sealed file is written and synced, checked to open to the same key, and only then is the plaintext
    /// removed), and re-encrypts a key sealed under an older key of the keyring.
    pub fn protect_ca_key(&self, secrets: &crate::identity::secrets::Secrets) -> Result<Option<CaKeyChange>, PkiError> {
        let (plain, sealed) = (self.ca_key(), self.ca_key_sealed());
        let current = secrets.current_kid().to_owned();
        if plain.exists() {
            let key_pem = read_private(&plain)?;
            if sealed.exists() {
                // A crash between writing the sealed key and removing the plaintext: finish only if they agree.
                let opened = open_ca_key(secrets.keyring(), &sealed, &read_private(&sealed)?)?;
                if opened != key_pem {
                    return Err(PkiError::CaKeyConflict { plain, sealed });
                }
            } else {
                write_private(&sealed, &seal_ca_key(secrets, &key_pem)?)?;
                let opened = open_ca_key(secrets.keyring(), &sealed, &read(&sealed)?)?;
                if opened != key_pem {
                    return Err(PkiError::CaKeyConflict { plain, sealed });
                }
            }
            fs::remove_file(&plain).map_err(io_err(&plain))?;
            sync_dir(&plain)?;
            return Ok(Some(CaKeyChange::Sealed { kid: current }));
        }
        let Some(kid) = self.ca_key_kid()? else {
            return Ok(None);
        };
        if kid == current {
            return Ok(None);
        }
        let key_pem = open_ca_key(secrets.keyring(), &sealed, &read_private(&sealed)?)?;
        write_private(&sealed, &seal_ca_key(secrets, &key_pem)?)?;
        Ok(Some(CaKeyChange::Resealed {
            from: kid,
            kid: current,
        }))
    }

    /// The server's certificate chain and key for start-up: the stored pair while it is not due for renewal
    /// ([`server_renewal_at`]) and names the configured names, otherwise a new pair from the CA.
    pub fn server_credentials(
        &self,
        ca: &CertificateAuthority,
        names: &[String],
        lifetime: Duration,
    ) -> Result<ServerCredentials, PkiError> {
        let _lock = self.lock_server_files()?;
        if let Some(stored) = self.stored_server_credentials(ca, names, lifetime, SystemTime::now())? {
            return Ok(stored);
        }
        tracing::info!(path = %self.server_cert().display(), "issuing a new server certificate");
        self.issue_server_credentials(ca, names, lifetime)
    }

    /// A successor for the server certificate `serving` (serial), which is due for renewal on a running replica.
    /// When another replica sharing this directory has already stored one that is not due, that one is adopted,
    /// so replicas on one directory converge on one certificate instead of overwriting each other's.
    pub fn renew_server_credentials(
        &self,
        ca: &CertificateAuthority,
        names: &[String],
        lifetime: Duration,
        serving: &str,
    ) -> Result<(ServerCredentials, Renewal), PkiError> {
        let _lock = self.lock_server_files()?;
        if let Some(stored) = self.stored_server_credentials(ca, names, lifetime, SystemTime::now())?
            && stored.serial != serving
        {
            return Ok((stored, Renewal::Adopted));
        }
        Ok((self.issue_server_credentials(ca, names, lifetime)?, Renewal::Issued))
    }

    /// The stored pair, if it can be served until its renewal: a readable certificate for exactly `names`, not
    /// due at `now`, with the key that belongs to it. An unreadable certificate or a key that is not its own (one
    /// of the two files replaced without the other) is replaced rather than served; an insecure key file is still
    /// refused.
    fn stored_server_credentials(
        &self,
        ca: &CertificateAuthority,
        names: &[String],
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Option<ServerCredentials>, PkiError> {
        let Ok(cert_pem) = read(&self.server_cert()) else {
            return Ok(None);
        };
        let Ok(summary) = server_cert_summary(&cert_pem) else {
            return Ok(None);
        };
        let mut wanted: Vec<String> = names.to_vec();
        wanted.sort();
        if summary.names != wanted || now >= server_renewal_at(summary.not_after, lifetime) {
            return Ok(None);
        }
        let key_pem = read_private(&self.server_key())?;
        let key_matches =
            KeyPair::from_pem(&key_pem).is_ok_and(|key| key.public_key_raw() == summary.public_key.as_slice());
        if !key_matches {
            tracing::warn!(path = %self.server_key().display(), "the server key does not belong to the server certificate; replacing both");
            return Ok(None);
        }
        Ok(Some(ServerCredentials {
            chain_pem: format!("{cert_pem}{}", ca.cert_pem()),
            key_pem,
            serial: summary.serial,
            not_after: summary.not_after,
        }))
    }

    /// Issues a server certificate and stores it, key first: a crash between the two writes leaves the old
    /// certificate, which is due (that is why it was being replaced), so the next start replaces the pair again.
    fn issue_server_credentials(
        &self,
        ca: &CertificateAuthority,
        names: &[String],
        lifetime: Duration,
    ) -> Result<ServerCredentials, PkiError> {
        let cert_path = self.server_cert();
        let server = ca.issue_server(names, lifetime)?;
        let summary = server_cert_summary(&server.cert_pem).map_err(|reason| PkiError::InvalidCertificate {
            path: cert_path.clone(),
            reason,
        })?;
        write_private(&self.server_key(), &server.key_pem)?;
        write_public(&cert_path, &server.cert_pem)?;
        Ok(ServerCredentials {
            chain_pem: format!("{}{}", server.cert_pem, ca.cert_pem()),
            key_pem: server.key_pem,
            serial: summary.serial,
            not_after: summary.not_after,
        })
    }
}

/// The server certificate and key a replica serves, as stored in its data directory.
#[derive(Clone)]
pub struct ServerCredentials {
    /// The server certificate followed by the CA certificate.
    pub chain_pem: String,
    pub key_pem: String,
    /// Lower-case hex, as [`serial_of`] reads it.
    pub serial: String,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for ServerCredentials {
    // Never print the private key, even in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCredentials")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Where a running replica's next server certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Newly issued from the CA and stored.
    Issued,
    /// Stored by another replica sharing the data directory, which renewed first.
    Adopted,
}

/// When a server certificate expiring at `not_after` is replaced: once less than a third of the configured
/// `lifetime` is left, which for a certificate issued with that lifetime is two thirds into its life. Start-up
/// and the running replica apply this one rule, so a restart keeps exactly the certificates a running replica
/// would keep.
pub fn server_renewal_at(not_after: SystemTime, lifetime: Duration) -> SystemTime {
    not_after.checked_sub(lifetime / 3).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// What start-up and renewal read from a stored server certificate.
#[derive(Debug)]
struct ServerCertSummary {
    not_after: SystemTime,
    /// DNS names and IP addresses, sorted.
    names: Vec<String>,
    serial: String,
    /// The subject public key (for EC keys, the encoded point), to match against the stored private key.
    public_key: Vec<u8>,
}

fn server_cert_summary(pem: &str) -> Result<ServerCertSummary, String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string())?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    GeneralName::IPAddress(bytes) => ip_from_bytes(bytes).map(|ip| ip.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    Ok(ServerCertSummary {
        not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(not_after),
        names,
        serial: serial_of(&der)?,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

fn ip_from_bytes(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

fn seal_ca_key(secrets: &crate::identity::secrets::Secrets, key_pem: &str) -> Result<String, PkiError> {
    secrets
        .seal(CA_KEY_AAD, key_pem.as_bytes())
        .map(|sealed| format!("{sealed}\n"))
        .map_err(|_| PkiError::Random)
}

fn open_ca_key(keyring: &medfleet_core::secrets::Keyring, path: &Path, text: &str) -> Result<String, PkiError> {
    medfleet_core::secrets::open(keyring, CA_KEY_AAD, text.trim())
        .and_then(|pem| String::from_utf8(pem).map_err(|_| medfleet_core::secrets::EnvelopeError::Malformed))
        .map_err(|source| PkiError::CaKeySealed {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use rcgen::PKCS_ECDSA_P256_SHA256;

    fn secrets(dir: &Path) -> crate::identity::secrets::Secrets {
        crate::identity::secrets::Secrets::new(crate::identity::secrets::create(&dir.join("secrets.key")).unwrap())
    }

    /// A data directory initialised for `localhost` with hour-long certificates, its CA and its stored server pair.
    fn initialised(root: &Path) -> (DataDir, CertificateAuthority, Vec<String>, ServerCredentials) {
        let dir = DataDir::new(root);
        let hour = Duration::from_hours(1);
        let names = vec!["localhost".to_owned()];
        let secrets = secrets(root);
        dir.init("admin", &names, hour, hour, &secrets).unwrap();
        let ca = dir.load_ca(secrets.keyring()).unwrap();
        let stored = dir.server_credentials(&ca, &names, hour).unwrap();
        (dir, ca, names, stored)
    }

    #[test]
    fn init_writes_private_files_0600_and_refuses_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("data"));
        let secrets = secrets(tmp.path());
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let hour = Duration::from_hours(1);
        dir.init("admin", &names, hour, hour, &secrets).unwrap();
        for path in [dir.ca_key_sealed(), dir.server_key(), dir.admin_bundle()] {
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        assert!(!dir.ca_key().exists(), "the CA key is never written in clear");
        assert!(matches!(
            dir.init("admin", &names, hour, hour, &secrets),
            Err(PkiError::AlreadyInitialised(_))
        ));
        dir.load_ca(secrets.keyring()).unwrap();
        fs::set_permissions(dir.ca_key_sealed(), fs::Permissions::from_mode(0o644)).unwrap();
        let err = dir.load_ca(secrets.keyring()).unwrap_err();
        assert!(matches!(err, PkiError::File(FileError::InsecureKey { .. })), "{err}");
        assert!(err.to_string().contains("chmod 600"));
    }

    /// A plaintext CA key of an older version is sealed and removed; after a rotation it is re-encrypted; with
    /// the wrong keyring it does not open, and says so.
    #[test]
    fn ca_key_is_sealed_migrated_and_resealed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("data"));
        let first = secrets(tmp.path());
        let hour = Duration::from_hours(1);
        dir.init("admin", &["localhost".into()], hour, hour, &first).unwrap();
        let cert = dir.load_ca(first.keyring()).unwrap().cert_pem().to_owned();
        // Back to how an older version left it: the key in clear, nothing sealed.
        let key_pem = open_ca_key(
            first.keyring(),
            &dir.ca_key_sealed(),
            &read(&dir.ca_key_sealed()).unwrap(),
        )
        .unwrap();
        write_private(&dir.ca_key(), &key_pem).unwrap();
        fs::remove_file(dir.ca_key_sealed()).unwrap();
        assert_eq!(
            dir.protect_ca_key(&first).unwrap(),
            Some(CaKeyChange::Sealed {
                kid: first.current_kid().to_owned()
            })
        );
        assert!(!dir.ca_key().exists());
        let sealed = read(&dir.ca_key_sealed()).unwrap();
        assert!(
            !sealed.contains("PRIVATE KEY") && sealed.starts_with("enc:v1:"),
            "{sealed}"
        );
        assert_eq!(dir.protect_ca_key(&first).unwrap(), None);

        let path = tmp.path().join("secrets.key");
        let rotated = crate::identity::secrets::Secrets::new(crate::identity::secrets::rotate(&path).unwrap());
        assert_eq!(
            dir.protect_ca_key(&rotated).unwrap(),
            Some(CaKeyChange::Resealed {
                from: first.current_kid().to_owned(),
                kid: rotated.current_kid().to_owned()
            })
        );
        assert_eq!(dir.ca_key_kid().unwrap().as_deref(), Some(rotated.current_kid()));
        assert_eq!(dir.load_ca(rotated.keyring()).unwrap().cert_pem(), cert);
        let err = dir.load_ca(first.keyring()).unwrap_err();
        assert!(err.to_string().contains("is not in the secrets keyring"), "{err}");
    }

    #[test]
    fn server_cert_reissued_when_names_change() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("data"));
        let secrets = secrets(tmp.path());
        let hour = Duration::from_hours(1);
        dir.init("admin", &["localhost".into()], hour, hour, &secrets).unwrap();
        let ca = dir.load_ca(secrets.keyring()).unwrap();
        let first = dir.server_credentials(&ca, &["localhost".into()], hour).unwrap();
        let same = dir.server_credentials(&ca, &["localhost".into()], hour).unwrap();
        assert_eq!(first.chain_pem, same.chain_pem);
        assert_eq!(first.serial, same.serial);
        let renamed = dir
            .server_credentials(&ca, &["localhost".into(), "medfleet.example".into()], hour)
            .unwrap();
        assert_ne!(first.chain_pem, renamed.chain_pem);
        assert!(!format!("{renamed:?}").contains("PRIVATE"));
    }

    #[test]
    fn server_renewal_is_due_two_thirds_into_the_life() {
        let lifetime = Duration::from_hours(90 * 24);
        let issued = SystemTime::UNIX_EPOCH + Duration::from_hours(500_000);
        let not_after = issued + lifetime;
        assert_eq!(
            server_renewal_at(not_after, lifetime),
            issued + Duration::from_hours(60 * 24)
        );
        // A certificate issued with a shorter lifetime than now configured is due at once, as at start-up
        // before: less than a third of the configured lifetime is left.
        let short = issued + Duration::from_hours(20 * 24);
        assert!(server_renewal_at(short, lifetime) < issued);
        // Seconds-long lifetimes (tests) follow the same rule.
        let six = Duration::from_secs(6);
        assert_eq!(server_renewal_at(issued + six, six), issued + Duration::from_secs(4));
        // Never a panic, however early the notAfter.
        assert!(server_renewal_at(SystemTime::UNIX_EPOCH + Duration::from_secs(1), lifetime) <= SystemTime::UNIX_EPOCH);
    }

    #[test]
    fn stored_server_cert_is_kept_until_its_renewal_and_replaced_after() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, ca, names, stored) = initialised(tmp.path());
        let hour = Duration::from_hours(1);
        let due = server_renewal_at(stored.not_after, hour);
        let before = dir
            .stored_server_credentials(&ca, &names, hour, due - Duration::from_secs(1))
            .unwrap();
        assert_eq!(before.map(|c| c.serial), Some(stored.serial.clone()));
        assert!(dir.stored_server_credentials(&ca, &names, hour, due).unwrap().is_none());

        // A renewal stores its pair, which start-up then serves (a restart keeps the renewed certificate).
        let (renewed, how) = dir.renew_server_credentials(&ca, &names, hour, &stored.serial).unwrap();
        assert_eq!(how, Renewal::Issued);
        assert_ne!(renewed.serial, stored.serial);
        assert!(renewed.not_after >= stored.not_after);
        let restarted = dir.server_credentials(&ca, &names, hour).unwrap();
        assert_eq!(restarted.serial, renewed.serial);
        assert_eq!(restarted.key_pem, renewed.key_pem);
        // Another replica on this directory still serving the old certificate adopts the renewed one.
        let (adopted, how) = dir.renew_server_credentials(&ca, &names, hour, &stored.serial).unwrap();
        assert_eq!(
            (how, adopted.serial.as_str()),
            (Renewal::Adopted, renewed.serial.as_str())
        );
    }

    #[test]
    fn a_key_that_does_not_match_the_stored_server_cert_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, ca, names, stored) = initialised(tmp.path());
        let hour = Duration::from_hours(1);
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        write_private(&dir.server_key(), &other.serialize_pem()).unwrap();
        let replaced = dir.server_credentials(&ca, &names, hour).unwrap();
        assert_ne!(replaced.serial, stored.serial);
        assert_eq!(read_private(&dir.server_key()).unwrap(), replaced.key_pem);
    }
}
