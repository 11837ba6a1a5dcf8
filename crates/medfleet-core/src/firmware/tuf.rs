//! TUF (The Update Framework) metadata for firmware, on the `tough` crate.
//!
//! Who signs what: the root and targets keys are offline (the vendor's or the hospital biomed team's machine runs
//! [`sign_root`] and [`sign_targets`]/[`countersign`]); medfleetd holds only the snapshot and timestamp keys and
//! runs [`sign_snapshot`]/[`sign_timestamp`] for freshness. A compromised medfleetd can therefore delay updates
//! but never make a device take an image the targets role did not sign to its threshold.
//!
//! One verification serves both sides: [`verify`] runs tough's `RepositoryLoader` (root chain, signatures and
//! thresholds, expiry, version rollback against a datastore, snapshot/targets consistency, size limits) over
//! metadata the caller already holds, through an in-memory transport; [`Verified::check_image`] streams an image
//! through tough's target reader (signed length and SHA-256). medfleetd verifies before it stores an upload, the
//! agent before it installs. Nothing here touches the network or a database; tough keeps its rollback datastore
//! in the directory the caller names (or a temporary one).

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU64;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::Ed25519KeyPair;
use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::key::Key;
use tough::schema::{Hashes, Metafile, Role, Root, Signature, Signed, Snapshot, Target, Targets, Timestamp};
use tough::sign::{Sign, parse_keypair};
use tough::{
    ExpirationEnforcement, Limits, RepositoryLoader, TargetName, Transport, TransportError, TransportErrorKind,
};
use url::Url;

use super::target::{self, TargetMeta};
use crate::digest::hex;

/// The TUF specification version medfleet writes.
pub const SPEC_VERSION: &str = "1.0.0";

/// Bounds on what a verifier reads (endless-data attack): generous for a fleet's metadata, small for a device.
pub const LIMITS: Limits = Limits {
    max_root_size: 512 * 1024,
    max_targets_size: 8 * 1024 * 1024,
    max_timestamp_size: 64 * 1024,
    max_snapshot_size: 256 * 1024,
    max_root_updates: 64,
};

const PEM_LABEL: &str = "PRIVATE KEY";
const METADATA_BASE: &str = "file:///metadata/";
const TARGETS_BASE: &str = "file:///targets/";

/// Why metadata or an image was refused, as a stable code (reported by devices, counted by rollouts) and the
/// verifier's own words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct TufError {
    pub code: Refusal,
    pub detail: String,
}

/// The stable reasons. `as_str` is what crosses the wire and lands in rollout failure reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Signatures missing, made by keys the root does not trust for the role, or below its threshold.
    Signature,
    /// Some role's metadata has expired (indefinite-freeze protection).
    Expired,
    /// A role's version is older than one already trusted (metadata rollback).
    Rollback,
    /// Snapshot, timestamp and targets do not describe each other (mix-and-match).
    Inconsistent,
    /// More bytes than allowed (endless data): metadata over its limit, or an image longer than signed.
    TooLarge,
    /// The image's SHA-256 is not the signed one (partial or corrupt image).
    HashMismatch,
    /// Not TUF metadata medfleet understands.
    Malformed,
    /// The target is not in the signed targets metadata.
    UnknownTarget,
    /// The target is for another device model.
    WrongModel,
    /// The target is not newer than what runs and no signed downgrade allows it.
    NotNewer,
    /// A signing key could not be read or used.
    Key,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signature => "untrusted_signature",
            Self::Expired => "expired_metadata",
            Self::Rollback => "metadata_rollback",
            Self::Inconsistent => "inconsistent_metadata",
            Self::TooLarge => "too_large",
            Self::HashMismatch => "hash_mismatch",
            Self::Malformed => "malformed_metadata",
            Self::UnknownTarget => "unknown_target",
            Self::WrongModel => "wrong_model",
            Self::NotNewer => "not_newer",
            Self::Key => "signing_key",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn refuse(code: Refusal, detail: impl fmt::Display) -> TufError {
    TufError {
        code,
        detail: detail.to_string(),
    }
}

/// Sorts tough's errors into the stable reasons; the detail keeps tough's own chain of causes.
fn classify(error: &tough::error::Error) -> TufError {
    use tough::error::Error as E;
    let code = match error {
        E::ExpiredMetadata { .. } => Refusal::Expired,
        E::VerifyMetadata { .. }
        | E::VerifyTrustedMetadata { .. }
        | E::VerifyRoleMetadata { .. }
        | E::SigningKeysNotFound { .. } => Refusal::Signature,
        E::OlderMetadata { .. }
        | E::OlderSnapshotInTimestamp { .. }
        | E::SnapshotRoleRollback { .. }
        | E::SystemTimeSteppedBackward { .. } => Refusal::Rollback,
        E::MaxSizeExceeded { .. } | E::MaxUpdatesExceeded { .. } => Refusal::TooLarge,
        // A hash mismatch of metadata named by the timestamp or snapshot is mix-and-match; of the image, corruption.
        E::HashMismatch { context, .. } if context.contains("/targets/") => Refusal::HashMismatch,
        E::Transport { source, .. } if source.kind() != TransportErrorKind::FileNotFound => Refusal::Malformed,
        E::VersionMismatch { .. }
        | E::MetaMissing { .. }
        | E::MissingSnapshotMeta { .. }
        | E::SnapshotTargetsMetaMissing { .. }
        | E::SnapshotRoleMissing { .. }
        | E::TimestampMetaLength { .. }
        | E::HashMismatch { .. }
        | E::Transport { .. } => Refusal::Inconsistent,
        _ => Refusal::Malformed,
    };
    let mut detail = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !detail.contains(&text) {
            detail.push_str(": ");
            detail.push_str(&text);
        }
        source = cause.source();
    }
    // tough reports limits and digests hit while streaming a target as transport errors; their words say which.
    let code = match code {
        Refusal::Malformed if detail.contains("Maximum size") => Refusal::TooLarge,
        Refusal::Malformed if detail.contains("ash mismatch") && detail.contains("/metadata/") => Refusal::Inconsistent,
        Refusal::Malformed if detail.contains("ash mismatch") => Refusal::HashMismatch,
        other => other,
    };
    refuse(code, detail)
}

fn malformed(what: &str, error: impl fmt::Display) -> TufError {
    refuse(Refusal::Malformed, format!("{what}: {error}"))
}

fn timestamp(at: DateTime<Utc>) -> Result<jiff::Timestamp, TufError> {
    jiff::Timestamp::from_second(at.timestamp()).map_err(|e| malformed("expiry", e))
}

fn version(number: u64) -> Result<NonZeroU64, TufError> {
    NonZeroU64::new(number).ok_or_else(|| malformed("version", "must be 1 or more"))
}

/// A public key as TUF writes it in root metadata.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct PublicKey(Key);

impl PublicKey {
    /// The TUF key id (hex SHA-256 of the key's canonical JSON).
    pub fn id(&self) -> Result<String, TufError> {
        self.0
            .key_id()
            .map(|id| hex(id.as_ref()))
            .map_err(|e| malformed("public key", e))
    }
}

/// A private Ed25519 signing key, held as PKCS#8. Debug output shows the key id only.
pub struct SigningKey {
    pair: Box<dyn Sign>,
    public: PublicKey,
    id: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new key and its PKCS#8 PEM, which the caller writes somewhere only its owner reads.
    pub fn generate() -> Result<(Self, String), TufError> {
        let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|e| refuse(Refusal::Key, format!("could not generate an Ed25519 key: {e}")))?;
        let der = document.as_ref();
        let key = Self::from_der(der)?;
        Ok((key, pem(der)))
    }

    /// Reads a key written by [`SigningKey::generate`] (PKCS#8 PEM of an Ed25519 or ECDSA P-256 key).
    pub fn from_pem(text: &str) -> Result<Self, TufError> {
        let body: String = text
            .lines()
            .map(str::trim)
            .skip_while(|line| !line.starts_with("-----BEGIN"))
            .skip(1)
            .take_while(|line| !line.starts_with("-----END"))
            .collect();
        if body.is_empty() {
            return Err(refuse(Refusal::Key, format!("not a PEM \"{PEM_LABEL}\" block")));
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| refuse(Refusal::Key, format!("the PEM body is not base64: {e}")))?;
        Self::from_der(&der)
    }

    fn from_der(der: &[u8]) -> Result<Self, TufError> {
        let pair = parse_keypair(der).map_err(|e| refuse(Refusal::Key, format!("unusable private key: {e}")))?;
        let public = PublicKey(pair.tuf_key());
        let id = public.id()?;
        Ok(Self {
            pair: Box::new(pair),
            public,
            id,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn public(&self) -> PublicKey {
        self.public.clone()
    }

    async fn signature<T: Role>(&self, role: &T) -> Result<Signature, TufError> {
        let message = role.canonical_form().map_err(|e| malformed("metadata", e))?;
        let sig = self
            .pair
            .sign(&message, &SystemRandom::new())
            .await
            .map_err(|e| refuse(Refusal::Key, format!("signing failed: {e}")))?;
        Ok(Signature {
            keyid: key_id(&self.id)?,
            sig: sig.into(),
        })
    }
}

fn pem(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {PEM_LABEL}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(PEM_LABEL);
    out.push_str("-----\n");
    out
}

fn key_id(id: &str) -> Result<Decoded<Hex>, TufError> {
    id.parse().map_err(|e| malformed("key id", e))
}

fn to_file<T: serde::Serialize>(signed: &Signed<T>) -> Result<Vec<u8>, TufError> {
    let mut bytes = serde_json::to_vec_pretty(signed).map_err(|e| malformed("metadata", e))?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<Signed<T>, TufError> {
    serde_json::from_slice(bytes).map_err(|e| malformed(what, e))
}

fn chrono_time(at: jiff::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(at.as_second(), 0).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// One firmware image as the targets role signs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedTarget {
    /// The target name (a file name: letters, digits, `.`, `-`, `_`).
    pub name: String,
    /// Lowercase hex SHA-256 of the image.
    pub sha256: String,
    pub length: u64,
    pub meta: TargetMeta,
}

/// Whether `name` is a target name medfleet signs and serves: one path component, no dot-files.
pub fn valid_target_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

fn target_of(name: &TargetName, target: &Target) -> Result<SignedTarget, TufError> {
    let custom = serde_json::Value::Object(target.custom.clone().into_iter().collect());
    let meta: TargetMeta =
        serde_json::from_value(custom).map_err(|e| malformed(&format!("custom fields of target {}", name.raw()), e))?;
    target::validate(&meta).map_err(|v| malformed(&format!("custom fields of target {}", name.raw()), v))?;
    Ok(SignedTarget {
        name: name.raw().to_owned(),
        sha256: hex(target.hashes.sha256.as_ref()),
        length: target.length,
        meta,
    })
}

/// The facts a targets metadata file states, without verifying it (see [`verify`] for that).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetsInfo {
    pub version: u64,
    pub expires: DateTime<Utc>,
    pub signed_by: Vec<String>,
    pub targets: Vec<SignedTarget>,
}

pub fn targets_info(bytes: &[u8]) -> Result<TargetsInfo, TufError> {
    let targets: Signed<Targets> = parse("targets metadata", bytes)?;
    let mut list = targets
        .signed
        .targets
        .iter()
        .map(|(name, target)| target_of(name, target))
        .collect::<Result<Vec<_>, _>>()?;
    list.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(TargetsInfo {
        version: targets.signed.version.get(),
        expires: chrono_time(targets.signed.expires),
        signed_by: targets.signatures.iter().map(|s| hex(s.keyid.as_ref())).collect(),
        targets: list,
    })
}

/// Targets metadata with `add` added to what `previous` lists (a new version one above it, or version 1), expiring
/// at `expires`, signed by `signers`. Fewer signers than the threshold is allowed: other key holders add theirs
/// with [`countersign`], and nothing below the threshold verifies.
pub async fn sign_targets(
    previous: Option<&[u8]>,
    add: &SignedTarget,
    expires: DateTime<Utc>,
    signers: &[&SigningKey],
) -> Result<Vec<u8>, TufError> {
    if !valid_target_name(&add.name) {
        return Err(malformed(
            "target name",
            format!(
                "{:?}: use letters, digits, '.', '-' and '_' only (at most 128)",
                add.name
            ),
        ));
    }
    target::validate(&add.meta).map_err(|v| malformed("target", v))?;
    let sha256 = decode_hex(&add.sha256)?;
    let mut targets = match previous {
        Some(bytes) => {
            let mut old = parse::<Targets>("previous targets metadata", bytes)?.signed;
            old.version = version(old.version.get().saturating_add(1))?;
            old.expires = timestamp(expires)?;
            old
        }
        None => Targets::new(SPEC_VERSION.to_owned(), version(1)?, timestamp(expires)?),
    };
    let name = TargetName::new(add.name.clone()).map_err(|e| malformed("target name", e))?;
    let custom = match serde_json::to_value(&add.meta) {
        Ok(serde_json::Value::Object(map)) => map.into_iter().collect(),
        Ok(_) | Err(_) => return Err(malformed("target", "custom fields do not serialize to an object")),
    };
    targets.targets.insert(
        name,
        Target {
            length: add.length,
            hashes: Hashes {
                sha256: sha256.into(),
                _extra: HashMap::new(),
            },
            custom,
            _extra: HashMap::new(),
        },
    );
    let mut signatures = Vec::new();
    for signer in signers {
        signatures.push(signer.signature(&targets).await?);
    }
    to_file(&Signed {
        signed: targets,
        signatures,
    })
}

/// Checks that `previous` targets metadata is signed to threshold by the targets keys of the trusted `root`: what
/// an offline key holder builds on (a new release, a re-signing) must be what the key holders signed, not a list
/// a compromised medfleetd made up for them to sign.
pub fn check_signed_targets(root: &[u8], previous: &[u8]) -> Result<(), TufError> {
    let root: Signed<Root> = parse("trusted root metadata", root)?;
    let targets: Signed<Targets> = parse("previous targets metadata", previous)?;
    root.signed.verify_role(&targets).map_err(|e| {
        refuse(
            Refusal::Signature,
            format!("the targets metadata is not signed to threshold by the targets keys of the trusted root: {e}"),
        )
    })
}

/// The targets metadata `previous` again as its next version, listing the same targets, expiring at `expires`,
/// signed by `signers` (more with [`countersign`]): how an offline key holder keeps the metadata valid when no
/// new release is due before it expires. An expiry in the past is refused.
pub async fn resign_targets(
    previous: &[u8],
    expires: DateTime<Utc>,
    signers: &[&SigningKey],
) -> Result<Vec<u8>, TufError> {
    resign_targets_without(previous, &[], expires, signers).await
}

/// [`resign_targets`] without the targets named in `remove` (images deleted from medfleetd: what devices can no
/// longer fetch leaves the signed list). A name it does not list is refused.
pub async fn resign_targets_without(
    previous: &[u8],
    remove: &[String],
    expires: DateTime<Utc>,
    signers: &[&SigningKey],
) -> Result<Vec<u8>, TufError> {
    resign_targets_changed(previous, remove, &[], expires, signers).await
}

/// As [`resign_targets_without`], also authorising each `(target, release)` of `downgrades`: that stored image may
/// then replace `release` although its counter is lower (a signed downgrade of an image already listed, so a fleet
/// rollback can put back the very bytes devices ran before).
pub async fn resign_targets_changed(
    previous: &[u8],
    remove: &[String],
    downgrades: &[(String, u64)],
    expires: DateTime<Utc>,
    signers: &[&SigningKey],
) -> Result<Vec<u8>, TufError> {
    let mut targets = parse::<Targets>("previous targets metadata", previous)?.signed;
    for (name, release) in downgrades {
        let Some((_, target)) = targets.targets.iter_mut().find(|(listed, _)| listed.raw() == name) else {
            return Err(refuse(
                Refusal::UnknownTarget,
                format!("the targets metadata does not list {name}"),
            ));
        };
        let custom = serde_json::Value::Object(target.custom.clone().into_iter().collect());
        let mut meta: TargetMeta =
            serde_json::from_value(custom).map_err(|e| malformed(&format!("custom fields of target {name}"), e))?;
        if *release <= meta.release_counter {
            return Err(malformed(
                "downgrade",
                format!(
                    "{name} is release {}; a downgrade replaces a higher release, not {release}",
                    meta.release_counter
                ),
            ));
        }
        if !meta.downgrade_from.contains(release) {
            meta.downgrade_from.push(*release);
            meta.downgrade_from.sort_unstable();
        }
        target::validate(&meta).map_err(|v| malformed(&format!("custom fields of target {name}"), v))?;
        match serde_json::to_value(&meta) {
            Ok(serde_json::Value::Object(map)) => target.custom = map.into_iter().collect(),
            Ok(_) | Err(_) => return Err(malformed("target", "custom fields do not serialize to an object")),
        }
    }
    for name in remove {
        let before = targets.targets.len();
        targets.targets.retain(|listed, _| listed.raw() != name);
        if targets.targets.len() == before {
            return Err(refuse(
                Refusal::UnknownTarget,
                format!("the targets metadata does not list {name}"),
            ));
        }
    }
    if expires <= Utc::now() {
        return Err(malformed(
            "expiry",
            "it is in the past: devices would refuse the metadata at once",
        ));
    }
    targets.version = version(targets.version.get().saturating_add(1))?;
    targets.expires = timestamp(expires)?;
    let mut signatures = Vec::new();
    for signer in signers {
        signatures.push(signer.signature(&targets).await?);
    }
    to_file(&Signed {
        signed: targets,
        signatures,
    })
}

fn decode_hex(text: &str) -> Result<Vec<u8>, TufError> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(malformed("sha256", "expected 64 hex digits"));
    }
    (0..32)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| malformed("sha256", e)))
        .collect()
}

/// Adds `signer`'s signature to targets metadata (k-of-n signing by separate key holders); a key that already
/// signed is not added twice.
pub async fn countersign(targets: &[u8], signer: &SigningKey) -> Result<Vec<u8>, TufError> {
    let mut signed: Signed<Targets> = parse("targets metadata", targets)?;
    if signed.signatures.iter().all(|s| hex(s.keyid.as_ref()) != signer.id()) {
        let signature = signer.signature(&signed.signed).await?;
        signed.signatures.push(signature);
    }
    to_file(&signed)
}

fn metafile(version_number: u64, file: Option<&[u8]>) -> Result<Metafile, TufError> {
    Ok(Metafile {
        length: file.map(|bytes| bytes.len() as u64),
        hashes: file.map(|bytes| Hashes {
            sha256: aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
                .as_ref()
                .to_vec()
                .into(),
            _extra: HashMap::new(),
        }),
        version: version(version_number)?,
        _extra: HashMap::new(),
    })
}

/// Snapshot metadata naming `targets` (the online snapshot key signs it in medfleetd).
pub async fn sign_snapshot(
    targets: &[u8],
    snapshot_version: u64,
    expires: DateTime<Utc>,
    signer: &SigningKey,
) -> Result<Vec<u8>, TufError> {
    let listed: Signed<Targets> = parse("targets metadata", targets)?;
    let mut snapshot = Snapshot::new(SPEC_VERSION.to_owned(), version(snapshot_version)?, timestamp(expires)?);
    snapshot.meta.insert(
        "targets.json".to_owned(),
        metafile(listed.signed.version.get(), Some(targets))?,
    );
    let signature = signer.signature(&snapshot).await?;
    to_file(&Signed {
        signed: snapshot,
        signatures: vec![signature],
    })
}

/// Timestamp metadata naming `snapshot` (the online timestamp key signs it in medfleetd, re-signed well before it
/// expires so devices see fresh metadata).
pub async fn sign_timestamp(
    snapshot: &[u8],
    timestamp_version: u64,
    expires: DateTime<Utc>,
    signer: &SigningKey,
) -> Result<Vec<u8>, TufError> {
    let listed: Signed<Snapshot> = parse("snapshot metadata", snapshot)?;
    let mut stamp = Timestamp::new(
        SPEC_VERSION.to_owned(),
        version(timestamp_version)?,
        timestamp(expires)?,
    );
    stamp.meta.insert(
        "snapshot.json".to_owned(),
        metafile(listed.signed.version.get(), Some(snapshot))?,
    );
    let signature = signer.signature(&stamp).await?;
    to_file(&Signed {
        signed: stamp,
        signatures: vec![signature],
    })
}

/// The version a metadata file states, without verifying it (for storing and naming files).
pub fn metadata_version(bytes: &[u8]) -> Result<u64, TufError> {
    #[derive(serde::Deserialize)]
    struct Outer {
        signed: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        version: u64,
    }
    serde_json::from_slice::<Outer>(bytes)
        .map(|outer| outer.signed.version)
        .map_err(|e| malformed("metadata", e))
}

/// When a metadata file (any role) says it expires, unverified: for showing people, never for trusting.
pub fn metadata_expiry(bytes: &[u8]) -> Result<DateTime<Utc>, TufError> {
    #[derive(serde::Deserialize)]
    struct Outer {
        signed: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        expires: String,
    }
    let outer: Outer = serde_json::from_slice(bytes).map_err(|e| malformed("metadata", e))?;
    DateTime::parse_from_rfc3339(&outer.signed.expires)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| malformed("expires", e))
}

/// The metadata a verifier holds: every root version after the pinned one (in order), and the current timestamp,
/// snapshot and targets.
#[derive(Debug, Clone, Default)]
pub struct MetadataSet {
    pub roots: Vec<Vec<u8>>,
    pub timestamp: Vec<u8>,
    pub snapshot: Vec<u8>,
    pub targets: Vec<u8>,
}

/// Where the bytes of an image come from when tough reads it (a file on the device, chunks in medfleetd).
#[async_trait]
pub trait ImageSource: fmt::Debug + Send + Sync {
    async fn open(&self) -> Result<ImageStream, std::io::Error>;
}

/// The bytes of an image, in chunks.
pub type ImageStream = std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<Bytes>> + Send + Sync>>;

#[derive(Debug, Clone)]
struct MemoryTransport {
    files: Arc<HashMap<String, Bytes>>,
    image: Option<(String, Arc<dyn ImageSource>)>,
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn fetch(&self, url: Url) -> Result<tough::TransportStream, TransportError> {
        let path = url.path();
        if let Some(name) = path.strip_prefix("/targets/") {
            let Some((image, source)) = &self.image else {
                return Err(TransportError::new(TransportErrorKind::FileNotFound, url));
            };
            if image != name {
                return Err(TransportError::new(TransportErrorKind::FileNotFound, url));
            }
            let stream = source
                .open()
                .await
                .map_err(|e| TransportError::new_with_cause(TransportErrorKind::Other, url.clone(), e))?;
            let url_for_errors = url.clone();
            return Ok(Box::pin(stream.map(move |chunk| {
                chunk.map_err(|e| TransportError::new_with_cause(TransportErrorKind::Other, url_for_errors.clone(), e))
            })));
        }
        let Some(file) = path.strip_prefix("/metadata/").and_then(|name| self.files.get(name)) else {
            return Err(TransportError::new(TransportErrorKind::FileNotFound, url));
        };
        let bytes = file.clone();
        Ok(Box::pin(futures::stream::iter([Ok(bytes)])))
    }
}

/// Metadata that verified against a pinned root.
#[derive(Debug)]
pub struct Verified {
    repository: tough::Repository,
}

/// Verifies `set` against `pinned_root` with tough. `datastore` is the directory where the verifier keeps the
/// versions it trusted last (the agent's state directory, so a restart cannot be rolled back); `None` uses a
/// temporary one (medfleetd checking an upload). `image` is the image tough reads in [`Verified::check_image`].
pub async fn verify(
    pinned_root: &[u8],
    set: &MetadataSet,
    datastore: Option<&Path>,
    image: Option<(String, Arc<dyn ImageSource>)>,
) -> Result<Verified, TufError> {
    load(pinned_root, set, datastore, image, ExpirationEnforcement::Safe).await
}

/// [`verify`] of everything but expiry (signatures, thresholds, the root chain and consistency are still
/// checked): how a key holder pulls metadata that expired to re-sign it. Never for installing.
pub async fn verify_ignoring_expiry(pinned_root: &[u8], set: &MetadataSet) -> Result<Verified, TufError> {
    load(pinned_root, set, None, None, ExpirationEnforcement::Unsafe).await
}

async fn load(
    pinned_root: &[u8],
    set: &MetadataSet,
    datastore: Option<&Path>,
    image: Option<(String, Arc<dyn ImageSource>)>,
    expiry: ExpirationEnforcement,
) -> Result<Verified, TufError> {
    let mut files = HashMap::new();
    for root in &set.roots {
        let version = metadata_version(root)?;
        if files
            .insert(format!("{version}.root.json"), Bytes::from(root.clone()))
            .is_some_and(|other| other != root.as_slice())
        {
            return Err(refuse(
                Refusal::Malformed,
                format!("two different roots of version {version} were sent"),
            ));
        }
    }
    files.insert("timestamp.json".to_owned(), Bytes::from(set.timestamp.clone()));
    files.insert("snapshot.json".to_owned(), Bytes::from(set.snapshot.clone()));
    files.insert("targets.json".to_owned(), Bytes::from(set.targets.clone()));
    let transport = MemoryTransport {
        files: Arc::new(files),
        image,
    };
    let base = |text: &str| Url::parse(text).map_err(|e| malformed("base URL", e));
    let mut loader = RepositoryLoader::new(&pinned_root, base(METADATA_BASE)?, base(TARGETS_BASE)?)
        .transport(transport)
        .limits(LIMITS)
        .expiration_enforcement(expiry);
    if let Some(dir) = datastore {
        loader = loader.datastore(dir);
    }
    let repository = loader.load().await.map_err(|e| classify(&e))?;
    Ok(Verified { repository })
}

impl Verified {
    pub fn targets_version(&self) -> u64 {
        self.repository.targets().signed.version.get()
    }

    pub fn root_version(&self) -> u64 {
        self.repository.root().signed.version.get()
    }

    /// The earliest expiry of any role: after it, devices refuse the set until medfleetd re-signs.
    pub fn expires(&self) -> DateTime<Utc> {
        let r = &self.repository;
        let earliest = [
            r.root().signed.expires,
            r.timestamp().signed.expires,
            r.snapshot().signed.expires,
            r.targets().signed.expires,
        ]
        .into_iter()
        .min()
        .unwrap_or(r.timestamp().signed.expires);
        chrono_time(earliest)
    }

    /// Every signed target, by name.
    pub fn targets(&self) -> Result<Vec<SignedTarget>, TufError> {
        let mut list = self
            .repository
            .all_targets()
            .map(|(name, target)| target_of(name, target))
            .collect::<Result<Vec<_>, _>>()?;
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(list)
    }

    /// The signed target called `name`.
    pub fn target(&self, name: &str) -> Result<SignedTarget, TufError> {
        let wanted = TargetName::new(name).map_err(|e| malformed("target name", e))?;
        self.repository
            .targets()
            .signed
            .find_target(&wanted, false)
            .map_err(|_| refuse(Refusal::UnknownTarget, format!("no signed target is called {name:?}")))
            .and_then(|target| target_of(&wanted, target))
    }

    /// Reads the image named `name` through tough, which stops at the signed length and checks the signed SHA-256;
    /// the bytes are discarded (callers stored them already and only need the verdict).
    pub async fn check_image(&self, name: &str) -> Result<SignedTarget, TufError> {
        let target = self.target(name)?;
        let wanted = TargetName::new(name).map_err(|e| malformed("target name", e))?;
        let Some(mut stream) = self.repository.read_target(&wanted).await.map_err(|e| classify(&e))? else {
            return Err(refuse(
                Refusal::UnknownTarget,
                format!("no signed target is called {name:?}"),
            ));
        };
        while let Some(chunk) = stream.next().await {
            chunk.map_err(|e| classify(&e))?;
        }
        Ok(target)
    }
}

/// The target rule of [`super::target`] with TUF's refusal codes, for callers that report one reason.
pub fn accepts(installed: &target::Installed, candidate: &SignedTarget) -> Result<(), TufError> {
    target::accepts(installed, &candidate.meta).map_err(|refusal| {
        let code = match refusal {
            target::TargetRefusal::WrongModel { .. } => Refusal::WrongModel,
            target::TargetRefusal::NotNewer { .. } | target::TargetRefusal::Withdrawn { .. } => Refusal::NotNewer,
        };
        refuse(code, refusal)
    })
}

mod root;
pub use root::{RoleSpec, RootInfo, RootSpec, follow_root_chain, root_info, root_spec, sign_root, verify_root_update};

#[cfg(test)]
mod tests;
