//! medfleet's certificate authority and the data directory that holds its key material.
//!
//! The CA is ECDSA P-256 (widely supported by device TLS stacks and HSMs). Leaf certificates carry the principal's
//! identity as a `medfleet://` URI SAN; server certificates carry the configured DNS names and IPs.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use medfleet_core::identity::{Identity, SCHEME};
use medfleet_core::secrets::Keyring;

use crate::identity::files::{FileError, read, read_private, sync_dir, write_private, write_public};
use crate::identity::secrets;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

/// Lifetime of the CA certificate.
pub const CA_LIFETIME: Duration = Duration::from_hours(87600);
/// Certificates are valid from a little before issue so that clients with a slightly slow clock accept them.
const CLOCK_SKEW: Duration = Duration::from_mins(5);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate operation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0} is already initialised (it holds a CA); use another --data-dir or keep the existing CA")]
    AlreadyInitialised(PathBuf),
    #[error("{0} is not initialised; run `medfleetd init --data-dir {0}` first")]
    NotInitialised(PathBuf),
    #[error("{path}: not a usable certificate: {reason}")]
    InvalidCertificate { path: PathBuf, reason: String },
    #[error("{path}: the sealed CA key does not open: {source}")]
    CaKeySealed {
        path: PathBuf,
        #[source]
        source: medfleet_core::secrets::EnvelopeError,
    },
    #[error(
        "{plain} and {sealed} both exist and hold different keys; keep the one that signed ca.crt and remove the \
         other by hand"
    )]
    CaKeyConflict { plain: PathBuf, sealed: PathBuf },
    #[error("the system random number generator failed")]
    Random,
}

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

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Why a certificate signing request was refused. Every variant is the requester's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is not a DER-encoded PKCS#10 certification request")]
    Malformed,
    #[error("the CSR's signature does not verify with the key it carries")]
    BadSignature,
    #[error("{0}")]
    UnsupportedKey(String),
}

/// A verified CSR's public key, ready to be certified. Whatever identity the CSR claimed is discarded.
#[derive(Debug)]
pub struct RequestedKey(rcgen::SubjectPublicKeyInfo);

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

/// Parses a CSR, verifies its self-signature and applies the key policy: ECDSA P-256 or P-384, or Ed25519.
pub fn check_csr(der: &[u8]) -> Result<RequestedKey, CsrError> {
    use x509_parser::prelude::FromDer as _;
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der).map_err(|_| CsrError::Malformed)?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed);
    }
    // The key policy first: ring refuses to verify weak keys at all, which would hide the real reason.
    let spki = &csr.certification_request_info.subject_pki;
    let algorithm = spki.algorithm.algorithm.to_id_string();
    match algorithm.as_str() {
        OID_ED25519 => {}
        OID_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string())
                .unwrap_or_default();
            if curve != OID_P256 && curve != OID_P384 {
                return Err(CsrError::UnsupportedKey(format!(
                    "elliptic curve {curve} is not accepted; use ECDSA P-256 (or P-384, or Ed25519)"
                )));
            }
        }
        OID_RSA => {
            return Err(CsrError::UnsupportedKey(
                "RSA keys are not accepted (slow, and weak at the sizes devices use); use ECDSA P-256".to_owned(),
            ));
        }
        other => {
            return Err(CsrError::UnsupportedKey(format!(
                "key algorithm {other} is not accepted; use ECDSA P-256 (or P-384, or Ed25519)"
            )));
        }
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
        .map(RequestedKey)
        .map_err(|e| CsrError::UnsupportedKey(format!("unusable public key: {e}")))
}

/// A certificate medfleet issued, with what the registry records about it.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub cert_pem: String,
    pub ca_pem: String,
    /// Lower-case hex of the DER serial number (as [`serial_of`] reads it back).
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub issued_at: SystemTime,
}

impl IssuedCertificate {
    /// Reads back a certificate medfleet issued (the bootstrap admin's, written by `init`).
    pub fn from_pem(cert_pem: &str, ca_pem: &str) -> Result<(Identity, Self), String> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| e.to_string())?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
        let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
        let not_before = at(cert.validity().not_before.timestamp());
        Ok((
            identity_of(&der)?,
            Self {
                cert_pem: cert_pem.to_owned(),
                ca_pem: ca_pem.to_owned(),
                serial: serial_of(&der)?,
                not_before,
                not_after: at(cert.validity().not_after.timestamp()),
                issued_at: not_before + CLOCK_SKEW,
            },
        ))
    }
}

/// Extra subject attributes of a device certificate (the identity itself is always the URI SAN).
#[derive(Debug, Clone, Default)]
pub struct SubjectDetails {
    pub serial_number: Option<String>,
    pub eui64: Option<String>,
}

/// A certificate and its private key, PEM-encoded, plus the CA that issued it: what a principal needs to connect.
#[derive(Clone)]
pub struct CredentialBundle {
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for CredentialBundle {
    // Never print the private key, even in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialBundle").finish_non_exhaustive()
    }
}

impl CredentialBundle {
    /// One PEM file: private key, certificate, then the CA certificate. The CLI and agents read this layout.
    pub fn to_pem(&self) -> String {
        format!("{}{}{}", self.key_pem, self.cert_pem, self.ca_pem)
    }
}

/// medfleet's issuing CA, loaded into memory.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").finish_non_exhaustive()
    }
}

fn random_serial() -> (SerialNumber, String) {
    let mut bytes: [u8; 16] = *uuid::Uuid::new_v4().as_bytes();
    // A positive DER integer of fixed length, so its DER content bytes are exactly these bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    let hex = medfleet_core::digest::hex(&bytes);
    (SerialNumber::from_slice(&bytes), hex)
}

/// The serial number of a DER certificate as lower-case hex of its DER content bytes.
pub fn serial_of(cert_der: &[u8]) -> Result<String, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| format!("unreadable certificate: {e}"))?;
    Ok(medfleet_core::digest::hex(cert.raw_serial()))
}

/// Expiry of a DER certificate.
pub fn not_after_of(cert_der: &[u8]) -> Result<SystemTime, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).map_err(|e| e.to_string())?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn window(lifetime: Duration) -> (OffsetDateTime, OffsetDateTime) {
    let now = SystemTime::now();
    (
        OffsetDateTime::from(now - CLOCK_SKEW),
        OffsetDateTime::from(now + lifetime),
    )
}

impl CertificateAuthority {
    /// Creates a new CA with a fresh P-256 key. Returns the CA and its private key PEM (to be stored 0600).
    pub fn generate(organization: &str) -> Result<(Self, String), PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, organization);
        dn.push(DnType::CommonName, "medfleet CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial().0);
        (params.not_before, params.not_after) = window(CA_LIFETIME);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let ca = Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        };
        Ok((ca, key_pem))
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| PkiError::InvalidCertificate {
                path: PathBuf::from("ca.crt"),
                reason: e.to_string(),
            })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A TLS server certificate for the given DNS names and IP addresses, with a fresh key.
    pub fn issue_server(&self, names: &[String], lifetime: Duration) -> Result<CredentialBundle, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().map_or("medfleetd", String::as_str));
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial().0);
        (params.not_before, params.not_after) = window(lifetime);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CredentialBundle {
            key_pem: key.serialize_pem(),
            cert_pem: cert.pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }

    /// A client certificate for `identity` with a freshly generated key, valid for `lifetime` from now.
    pub fn issue_client(&self, identity: &Identity, lifetime: Duration) -> Result<CredentialBundle, PkiError> {
        let now = SystemTime::now();
        self.issue_client_for_window(identity, now - CLOCK_SKEW, now + lifetime)
    }

    /// A client certificate with an explicit validity window (tests use it for expired and not-yet-valid
    /// certificates without waiting).
    pub fn issue_client_for_window(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CredentialBundle, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let issued = self.sign(identity, &key, not_before, not_after, &SubjectDetails::default())?;
        Ok(CredentialBundle {
            key_pem: key.serialize_pem(),
            cert_pem: issued.cert_pem,
            ca_pem: issued.ca_pem,
        })
    }

    /// Certifies a requester's key (from a verified CSR) for `identity`, valid for `lifetime` from now.
    pub fn issue_for_key(
        &self,
        identity: &Identity,
        key: &RequestedKey,
        lifetime: Duration,
        details: &SubjectDetails,
    ) -> Result<IssuedCertificate, PkiError> {
        let now = SystemTime::now();
        self.sign(identity, &key.0, now - CLOCK_SKEW, now + lifetime, details)
    }

    fn sign(
        &self,
        identity: &Identity,
        public_key: &impl rcgen::PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
        details: &SubjectDetails,
    ) -> Result<IssuedCertificate, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationalUnitName, identity.kind());
        dn.push(DnType::CommonName, identity.to_string());
        if let Some(serial) = &details.serial_number {
            // X.520 serialNumber (2.5.4.5), as IEEE 802.1AR device identities carry it.
            dn.push(DnType::CustomDnType(vec![2, 5, 4, 5]), serial.as_str());
        }
        if let Some(eui64) = &details.eui64 {
            dn.push(DnType::OrganizationalUnitName, format!("EUI-64 {eui64}"));
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let (serial_number, serial) = random_serial();
        params.serial_number = Some(serial_number);
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            ca_pem: self.cert_pem.clone(),
            serial,
            not_before,
            not_after,
            issued_at: SystemTime::now(),
        })
    }

    /// A DER CRL of the given revoked serials (hex), signed by the CA.
    pub fn crl(
        &self,
        number: u64,
        revoked: &[(String, SystemTime, medfleet_core::identity::RevocationReason)],
    ) -> Result<Vec<u8>, PkiError> {
        let now = SystemTime::now();
        let revoked_certs = revoked
            .iter()
            .filter_map(|(hex, at, reason)| {
                let bytes: Vec<u8> = (0..hex.len() / 2)
                    .map(|i| u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok())
                    .collect::<Option<_>>()?;
                Some(rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: OffsetDateTime::from(*at),
                    reason_code: crl_reason(*reason),
                    invalidity_date: None,
                })
            })
            .collect();
        let params = rcgen::CertificateRevocationListParams {
            this_update: OffsetDateTime::from(now - CLOCK_SKEW),
            next_update: OffsetDateTime::from(now + Duration::from_hours(1)),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.der().to_vec())
    }
}

/// The RFC 5280 reason code a CRL entry carries (none for "unspecified", as the RFC recommends).
fn crl_reason(reason: medfleet_core::identity::RevocationReason) -> Option<rcgen::RevocationReason> {
    use medfleet_core::identity::RevocationReason as Reason;
    match reason {
        Reason::Unspecified => None,
        Reason::KeyCompromise => Some(rcgen::RevocationReason::KeyCompromise),
        Reason::AffiliationChanged => Some(rcgen::RevocationReason::AffiliationChanged),
        Reason::Superseded => Some(rcgen::RevocationReason::Superseded),
        Reason::CessationOfOperation => Some(rcgen::RevocationReason::CessationOfOperation),
    }
}

/// The medfleet identity a certificate speaks for: its single `medfleet://` URI SAN.
pub fn identity_of(cert_der: &[u8]) -> Result<Identity, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subjectAltName: {e}"))?
        .ok_or("certificate has no subjectAltName; it was not issued by medfleet for a principal")?;
    let mut uris = san.value.general_names.iter().filter_map(|name| match name {
        GeneralName::URI(uri) if uri.starts_with(SCHEME) => Some(*uri),
        _ => None,
    });
    let uri = uris
        .next()
        .ok_or("certificate has no medfleet:// identity in its subjectAltName")?;
    if uris.next().is_some() {
        return Err("certificate names more than one medfleet:// identity".to_owned());
    }
    uri.parse()
        .map_err(|e| format!("certificate identity {uri} is invalid: {e}"))
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
    use super::*;

    #[test]
    fn client_cert_carries_identity() {
        let (ca, _) = CertificateAuthority::generate("test").unwrap();
        let identity = Identity::User("alice".into());
        let bundle = ca.issue_client(&identity, Duration::from_hours(1)).unwrap();
        let der = CertificateDer::from_pem_slice(bundle.cert_pem.as_bytes()).unwrap();
        assert_eq!(identity_of(&der), Ok(identity));
        assert!(!format!("{bundle:?}").contains("PRIVATE"));
    }

    #[test]
    fn server_cert_has_no_identity() {
        let (ca, _) = CertificateAuthority::generate("test").unwrap();
        let bundle = ca.issue_server(&["localhost".into()], Duration::from_hours(1)).unwrap();
        let der = CertificateDer::from_pem_slice(bundle.cert_pem.as_bytes()).unwrap();
        assert!(identity_of(&der).unwrap_err().contains("no medfleet://"));
    }

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
