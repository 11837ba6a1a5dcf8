//! Following root rotations: which root a holder of an older one may trust next, the same walk tough makes.

use std::collections::HashMap;

use tough::schema::{Root, Signed};

use super::{Refusal, RootInfo, TufError, metadata_version, parse, refuse, root_info};

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
