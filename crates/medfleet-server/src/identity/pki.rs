//! medfleet's certificate authority and the CSR policy (the data directory that holds its key material is
//! [`crate::identity::data_dir`]).
//!
//! The CA is ECDSA P-256 (widely supported by device TLS stacks and HSMs). Leaf certificates carry the principal's
//! identity as a `medfleet://` URI SAN; server certificates carry the configured DNS names and IPs.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use medfleet_core::identity::{Identity, SCHEME};

use crate::identity::files::FileError;
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

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
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
}
