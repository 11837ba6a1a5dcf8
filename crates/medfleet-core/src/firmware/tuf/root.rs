//! Root metadata: the roles and keys a root names ([`RootSpec`]), signing one offline ([`sign_root`]), reading
//! what one states ([`root_info`], [`root_spec`] for its next version), and following rotations: which root a
//! holder of an older one may trust next, the same walk tough makes.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tough::schema::{RoleKeys, RoleType, Root, Signed};

use super::{
    PublicKey, Refusal, SPEC_VERSION, SigningKey, TufError, chrono_time, hex, key_id, malformed, metadata_version,
    parse, refuse, timestamp, to_file, version,
};

/// Which keys may sign one role, and how many must.
#[derive(Debug, Clone)]
pub struct RoleSpec {
    pub keys: Vec<PublicKey>,
    pub threshold: u64,
}

/// A root metadata to sign: its version, expiry and the four roles.
#[derive(Debug, Clone)]
pub struct RootSpec {
    pub version: u64,
    pub expires: DateTime<Utc>,
    pub root: RoleSpec,
    pub targets: RoleSpec,
    pub snapshot: RoleSpec,
    pub timestamp: RoleSpec,
}

/// Root metadata signed by `signers` (for a new version of an existing root, include the previous root's keys
/// too: devices accept version N+1 only when both N's and N+1's root thresholds signed it).
pub async fn sign_root(spec: &RootSpec, signers: &[&SigningKey]) -> Result<Vec<u8>, TufError> {
    let mut keys = HashMap::new();
    let mut roles = HashMap::new();
    for (role, role_spec) in [
        (RoleType::Root, &spec.root),
        (RoleType::Targets, &spec.targets),
        (RoleType::Snapshot, &spec.snapshot),
        (RoleType::Timestamp, &spec.timestamp),
    ] {
        if role_spec.threshold == 0 || role_spec.threshold > role_spec.keys.len() as u64 {
            return Err(malformed(
                &format!("{role} role"),
                format!("threshold {} with {} keys", role_spec.threshold, role_spec.keys.len()),
            ));
        }
        let mut keyids = Vec::new();
        for key in &role_spec.keys {
            let id = key_id(&key.id()?)?;
            keys.insert(id.clone(), key.0.clone());
            if !keyids.contains(&id) {
                keyids.push(id);
            }
        }
        roles.insert(
            role,
            RoleKeys {
                keyids,
                threshold: version(role_spec.threshold)?,
                _extra: HashMap::new(),
            },
        );
    }
    let root = Root {
        spec_version: SPEC_VERSION.to_owned(),
        consistent_snapshot: false,
        version: version(spec.version)?,
        expires: timestamp(spec.expires)?,
        keys,
        roles,
        _extra: HashMap::new(),
    };
    let mut signatures = Vec::new();
    for signer in signers {
        signatures.push(signer.signature(&root).await?);
    }
    let signed = Signed {
        signed: root,
        signatures,
    };
    // Refuse to write a root its own keys do not sign to threshold: no device could ever load it.
    signed
        .signed
        .verify_role(&signed)
        .map_err(|e| refuse(Refusal::Signature, e))?;
    to_file(&signed)
}

/// The facts a root metadata file states, for people and for medfleetd's checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootInfo {
    pub version: u64,
    pub expires: DateTime<Utc>,
    /// Key ids per role and the role's threshold.
    pub roles: Vec<(String, Vec<String>, u64)>,
}

impl RootInfo {
    pub fn role_keys(&self, role: &str) -> &[String] {
        self.roles
            .iter()
            .find(|(name, _, _)| name == role)
            .map_or(&[][..], |(_, keys, _)| keys.as_slice())
    }
}

/// Reads a root metadata file and checks that it is signed by its own root threshold.
pub fn root_info(bytes: &[u8]) -> Result<RootInfo, TufError> {
    let root: Signed<Root> = parse("root metadata", bytes)?;
    root.signed
        .verify_role(&root)
        .map_err(|e| refuse(Refusal::Signature, e))?;
    let mut roles: Vec<(String, Vec<String>, u64)> = root
        .signed
        .roles
        .iter()
        .map(|(role, keys)| {
            (
                role.to_string(),
                keys.keyids.iter().map(|id| hex(id.as_ref())).collect(),
                keys.threshold.get(),
            )
        })
        .collect();
    roles.sort();
    Ok(RootInfo {
        version: root.signed.version.get(),
        expires: chrono_time(root.signed.expires),
        roles,
    })
}

/// The roles of a root signed to its own threshold, as a spec to sign the next version from (a root rotation
/// keeps what it does not change).
pub fn root_spec(bytes: &[u8]) -> Result<RootSpec, TufError> {
    let root: Signed<Root> = parse("root metadata", bytes)?;
    root.signed
        .verify_role(&root)
        .map_err(|e| refuse(Refusal::Signature, e))?;
    let role = |role: RoleType| -> Result<RoleSpec, TufError> {
        let keys = root
            .signed
            .roles
            .get(&role)
            .ok_or_else(|| malformed("root metadata", format!("no {role} role")))?;
        let public = keys
            .keyids
            .iter()
            .map(|id| {
                root.signed
                    .keys
                    .get(id)
                    .map(|key| PublicKey(key.clone()))
                    .ok_or_else(|| malformed("root metadata", format!("the {role} role names a key it does not list")))
            })
            .collect::<Result<_, _>>()?;
        Ok(RoleSpec {
            keys: public,
            threshold: keys.threshold.get(),
        })
    };
    Ok(RootSpec {
        version: root.signed.version.get(),
        expires: chrono_time(root.signed.expires),
        root: role(RoleType::Root)?,
        targets: role(RoleType::Targets)?,
        snapshot: role(RoleType::Snapshot)?,
        timestamp: role(RoleType::Timestamp)?,
    })
}

/// Checks that `new` may follow the trusted root `old`, as a device following the chain would: version N+1, signed
/// by the root threshold of N and of N+1.
pub fn verify_root_update(old: &[u8], new: &[u8]) -> Result<RootInfo, TufError> {
    let trusted: Signed<Root> = parse("trusted root metadata", old)?;
    let next: Signed<Root> = parse("new root metadata", new)?;
    let info = root_info(new)?;
    if next.signed.version.get() != trusted.signed.version.get().saturating_add(1) {
        return Err(refuse(
            Refusal::Rollback,
            format!(
                "the new root is version {}, the trusted one {}: a new root must be exactly one version above",
                next.signed.version, trusted.signed.version
            ),
        ));
    }
    trusted.signed.verify_role(&next).map_err(|e| {
        refuse(
            Refusal::Signature,
            format!("not signed by the current root's keys: {e}"),
        )
    })?;
    Ok(info)
}

/// The newest root reachable from `pinned` through `roots`, as tough walks them: version N+1 signed by the keys
/// of N and its own, one step at a time, stopping at the first version missing (a root beyond a gap is never
/// trusted). Two roots of one version are refused: whoever saves "the root that verified" must save the one that
/// was checked.
pub fn follow_root_chain(pinned: &[u8], roots: &[Vec<u8>]) -> Result<Vec<u8>, TufError> {
    let mut by_version: HashMap<u64, &Vec<u8>> = HashMap::new();
    for root in roots {
        let version = metadata_version(root)?;
        if by_version.insert(version, root).is_some_and(|other| other != root) {
            return Err(refuse(
                Refusal::Malformed,
                format!("two different roots of version {version} were sent"),
            ));
        }
    }
    let mut current = pinned.to_vec();
    loop {
        let next_version = metadata_version(&current)?.saturating_add(1);
        let Some(next) = by_version.get(&next_version) else {
            return Ok(current);
        };
        verify_root_update(&current, next)?;
        let own: Signed<Root> = parse("new root metadata", next)?;
        own.signed.verify_role(&own).map_err(|e| {
            refuse(
                Refusal::Signature,
                format!("root version {next_version} is not signed to threshold by its own keys: {e}"),
            )
        })?;
        current.clone_from(next);
    }
}
