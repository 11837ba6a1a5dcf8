//! `medfleet firmware metadata pull`, `show` and `publish`. Pull: medfleetd's current TUF metadata written into a metadata directory, so the
//! next `sign` extends the targets medfleetd has. What is pulled is verified first against the root the directory
//! already trusts (DIR/root.json, e.g. from `keys init`): a signer extends targets.json by signing every target in
//! it again, so a targets.json the targets keys did not sign must never get that far.

use std::path::Path;

use medfleet_core::firmware::tuf::{self, MetadataSet};
use medfleet_proto::v1;
use serde::Serialize;

use super::{Firmware, ROOT_FILE, TARGETS_FILE, files};
use crate::error::{InvalidInput, UsageError};
use crate::output::{self, Format};

#[derive(Debug, Serialize)]
struct Pulled {
    dir: String,
    root_version: Option<u64>,
    targets_version: Option<u64>,
    /// The files written.
    files: Vec<String>,
    /// Whether the set verified against a root the directory held before (false: against the root whose SHA-256
    /// was given).
    verified_against_local_root: bool,
}

/// The version a metadata file states, for comparing before replacing.
fn version_of(bytes: &[u8]) -> Option<u64> {
    tuf::metadata_version(bytes).ok()
}

/// Refuses to replace a local file that is newer than, or as new as but different from, what medfleetd has:
/// that is signing work not uploaded yet.
fn check_replace(path: &Path, new: &[u8], force: bool) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    let Some(old) = files::read_optional(path)? else {
        return Ok(());
    };
    if old == new {
        return Ok(());
    }
    match (version_of(&old), version_of(new)) {
        (Some(local), Some(remote)) if local < remote => Ok(()),
        (local, remote) => Err(UsageError(format!(
            "{} is version {} but medfleetd has version {}: it holds signing work medfleetd does not have (upload \
             it first), or pass --force to replace it",
            path.display(),
            local.map_or_else(|| "unreadable".to_owned(), |v| v.to_string()),
            remote.map_or_else(|| "unknown".to_owned(), |v| v.to_string()),
        ))
        .into()),
    }
}

pub(super) async fn pull(
    api: &mut Firmware,
    dir: &Path,
    (force, allow_expired): (bool, bool),
    root_sha256: Option<&str>,
    out: Format,
) -> anyhow::Result<()> {
    let local_root = files::read_optional(&dir.join(ROOT_FILE))?;
    if local_root.is_none() && root_sha256.is_none() {
        return Err(UsageError(format!(
            "{} has no {ROOT_FILE} to verify medfleetd's metadata against: copy in the root.json you created \
             (`keys init`), or pass --root-sha256 with the sha256 it printed",
            dir.display()
        ))
        .into());
    }
    let known = local_root.as_deref().and_then(version_of).unwrap_or(0);
    let metadata = api
        .get_metadata(v1::GetMetadataRequest {
            // Every root version: the newest is written as root.json, the chain verified from the local one.
            known_root_version: 0,
        })
        .await?
        .into_inner();
    let roots: Vec<Vec<u8>> = metadata.roots_json.iter().map(|r| r.as_bytes().to_vec()).collect();
    let Some(first_root) = roots.first() else {
        return Err(anyhow::anyhow!(
            "medfleetd sent no root metadata; install one first with `medfleet firmware trust install`"
        ));
    };
    let (pinned, verified_against_local_root) = match (&local_root, root_sha256) {
        (Some(root), _) => (root.clone(), true),
        (None, Some(hex)) => {
            let wanted = hex.trim().to_ascii_lowercase();
            let root = roots
                .iter()
                .find(|r| medfleet_core::digest::sha256_hex(r) == wanted)
                .ok_or_else(|| {
                    InvalidInput(format!(
                        "none of medfleetd's {} root versions has sha256 {wanted}: it is not serving the root you \
                         trust; nothing was written (do not sign on top of it; compare `medfleet firmware trust show`)",
                        roots.len()
                    ))
                })?;
            (root.clone(), false)
        }
        (None, None) => (first_root.clone(), false),
    };
    // The root written is the one the chain from the pinned root reaches, as a device walks it: never simply the
    // last one sent, which a compromised medfleetd could have forged beyond a gap.
    let latest_root = &tuf::follow_root_chain(&pinned, &roots).map_err(|e| {
        InvalidInput(format!(
            "medfleetd's root metadata does not follow from the root you trust: {e}; nothing was written"
        ))
    })?;
    let pinned_version = version_of(&pinned).unwrap_or(known);
    let mut writes: Vec<(&str, Vec<u8>)> = vec![(ROOT_FILE, latest_root.clone())];
    let mut targets_version = None;
    if metadata.targets_json.is_empty() {
        // No image was uploaded yet: there is nothing to extend, the next `sign` writes version 1.
        tuf::root_info(latest_root).map_err(|e| anyhow::anyhow!("medfleetd's root metadata does not verify: {e}"))?;
    } else {
        let set = MetadataSet {
            roots: roots
                .iter()
                .filter(|r| version_of(r).is_some_and(|v| v > pinned_version))
                .cloned()
                .collect(),
            timestamp: metadata.timestamp_json.clone().into_bytes(),
            snapshot: metadata.snapshot_json.clone().into_bytes(),
            targets: metadata.targets_json.clone().into_bytes(),
        };
        let verified = if allow_expired {
            tuf::verify_ignoring_expiry(&pinned, &set).await
        } else {
            tuf::verify(&pinned, &set, None, None).await
        };
        let verified = verified.map_err(|e| {
            let hint = if e.code == tuf::Refusal::Expired {
                " (to re-sign expired metadata, pull with --allow-expired, then `medfleet firmware resign`)"
            } else {
                ""
            };
            InvalidInput(format!(
                "medfleetd's metadata does not verify against {}: {e}; nothing was written{hint}",
                if verified_against_local_root {
                    format!("{}/{ROOT_FILE}", dir.display())
                } else {
                    "its own first root".to_owned()
                }
            ))
        })?;
        if allow_expired
            && let Ok(expires) = tuf::metadata_expiry(&set.targets)
            && expires <= chrono::Utc::now()
        {
            eprintln!(
                "warning: the targets metadata expired at {}; devices refuse every update until it is re-signed: \
                 medfleet firmware resign --metadata {} --key TARGETS-KEY",
                expires.to_rfc3339(),
                dir.display()
            );
        }
        targets_version = Some(verified.targets_version());
        writes.push(("timestamp.json", set.timestamp));
        writes.push(("snapshot.json", set.snapshot));
        writes.push((TARGETS_FILE, set.targets));
    }
    for (name, bytes) in &writes {
        check_replace(&dir.join(name), bytes, force)?;
    }
    files::create_dir(dir)?;
    let mut written = Vec::new();
    for (name, bytes) in &writes {
        let path = dir.join(name);
        files::replace_public(&path, bytes)?;
        written.push(path.display().to_string());
    }
    let pulled = Pulled {
        dir: dir.display().to_string(),
        root_version: version_of(latest_root),
        targets_version,
        files: written,
        verified_against_local_root,
    };
    if out == Format::Json {
        return output::json(&pulled);
    }
    if !verified_against_local_root {
        eprintln!(
            "note: verified against the root with the sha256 you gave; {} now holds the root it leads to",
            dir.display()
        );
    }
    println!(
        "wrote {} (root version {}, {})",
        pulled.files.join(", "),
        pulled.root_version.unwrap_or_default(),
        targets_version.map_or_else(
            || "no targets yet: the next `sign` writes version 1".to_owned(),
            |v| format!("targets version {v}: the next `sign` writes version {}", v + 1)
        )
    );
    Ok(())
}

/// One role's metadata as `metadata show` reports it.
#[derive(Debug, Serialize)]
struct RoleView {
    role: &'static str,
    version: u64,
    expires: String,
    expired: bool,
}

#[derive(Debug, Serialize)]
struct TargetLine {
    name: String,
    model: String,
    version: String,
    release_counter: u64,
    length: u64,
}

#[derive(Debug, Serialize)]
struct Shown {
    roles: Vec<RoleView>,
    targets: Vec<TargetLine>,
    /// The root the set was checked against.
    verified_against: String,
    /// Empty when it verifies; otherwise why devices would refuse it.
    problem: String,
}

fn role_view(role: &'static str, bytes: &[u8]) -> anyhow::Result<RoleView> {
    let version = tuf::metadata_version(bytes).map_err(|e| anyhow::anyhow!("medfleetd's {role} metadata: {e}"))?;
    let expires = tuf::metadata_expiry(bytes).map_err(|e| anyhow::anyhow!("medfleetd's {role} metadata: {e}"))?;
    Ok(RoleView {
        role,
        version,
        expires: expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        expired: expires <= chrono::Utc::now(),
    })
}

/// What medfleetd serves devices, each role's expiry, and whether it verifies.
pub(super) async fn show(api: &mut Firmware, dir: Option<&Path>, out: Format) -> anyhow::Result<()> {
    let metadata = api
        .get_metadata(v1::GetMetadataRequest { known_root_version: 0 })
        .await?
        .into_inner();
    let roots: Vec<Vec<u8>> = metadata.roots_json.iter().map(|r| r.as_bytes().to_vec()).collect();
    let Some(first_root) = roots.first() else {
        return Err(anyhow::anyhow!(
            "medfleetd has no trusted root yet; install one with `medfleet firmware trust install`"
        ));
    };
    let (pinned, verified_against) = match dir {
        Some(dir) => {
            let path = dir.join(ROOT_FILE);
            (files::read("--metadata", &path)?, path.display().to_string())
        }
        None => (first_root.clone(), "medfleetd's first root".to_owned()),
    };
    // The root a device pinned to `pinned` would reach, not merely the newest one listed: a root beyond a gap or
    // signed by the wrong keys is not what devices trust.
    let mut problem = String::new();
    let latest = tuf::follow_root_chain(&pinned, &roots).unwrap_or_else(|e| {
        problem = format!("devices cannot follow medfleetd's root versions: {e}");
        pinned.clone()
    });
    let mut roles = vec![role_view("root", &latest)?];
    let mut targets = Vec::new();
    if metadata.targets_json.is_empty() {
        if problem.is_empty() {
            "no image was uploaded yet: there is no targets metadata".clone_into(&mut problem);
        }
    } else {
        let pinned_version = tuf::metadata_version(&pinned).unwrap_or(0);
        let set = MetadataSet {
            roots: roots
                .iter()
                .filter(|r| version_of(r).is_some_and(|v| v > pinned_version))
                .cloned()
                .collect(),
            timestamp: metadata.timestamp_json.into_bytes(),
            snapshot: metadata.snapshot_json.into_bytes(),
            targets: metadata.targets_json.into_bytes(),
        };
        roles.push(role_view("targets", &set.targets)?);
        roles.push(role_view("snapshot", &set.snapshot)?);
        roles.push(role_view("timestamp", &set.timestamp)?);
        if let Err(e) = tuf::verify(&pinned, &set, None, None).await
            && problem.is_empty()
        {
            problem = e.to_string();
        }
        if let Ok(info) = tuf::targets_info(&set.targets) {
            targets = info
                .targets
                .into_iter()
                .map(|t| TargetLine {
                    name: t.name,
                    model: t.meta.hardware_id,
                    version: t.meta.version,
                    release_counter: t.meta.release_counter,
                    length: t.length,
                })
                .collect();
        }
    }
    let shown = Shown {
        roles,
        targets,
        verified_against,
        problem,
    };
    if out == Format::Json {
        return output::json(&shown);
    }
    println!("{:<10} {:>8}  {:<21} ", "ROLE", "VERSION", "EXPIRES");
    for role in &shown.roles {
        println!(
            "{:<10} {:>8}  {:<21} {}",
            role.role,
            role.version,
            role.expires,
            if role.expired { "EXPIRED" } else { "" }
        );
    }
    if !shown.targets.is_empty() {
        println!(
            "\n{:<32} {:<20} {:<12} {:>8} {:>12}",
            "TARGET", "MODEL", "VERSION", "COUNTER", "BYTES"
        );
        for t in &shown.targets {
            println!(
                "{:<32} {:<20} {:<12} {:>8} {:>12}",
                t.name, t.model, t.version, t.release_counter, t.length
            );
        }
    }
    if shown.problem.is_empty() {
        println!("\nverifies against {}", shown.verified_against);
    } else {
        println!(
            "\ndevices would refuse it (checked against {}): {}",
            shown.verified_against, shown.problem
        );
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct Published {
    targets_version: u64,
    expires: String,
    targets: Vec<String>,
}

/// Sends DIR/targets.json (re-signed, no new image) to medfleetd.
pub(super) async fn publish(api: &mut Firmware, dir: &Path, comment: &str, out: Format) -> anyhow::Result<()> {
    let path = dir.join(TARGETS_FILE);
    let bytes = files::read("--metadata", &path)?;
    let targets_json =
        String::from_utf8(bytes).map_err(|_| InvalidInput(format!("{} is not UTF-8 JSON", path.display())))?;
    let reply = api
        .publish_targets(v1::PublishTargetsRequest {
            targets_json,
            comment: comment.to_owned(),
        })
        .await
        .map_err(super::refusal)?
        .into_inner();
    let published = Published {
        targets_version: reply.targets_version,
        expires: reply
            .expire_time
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
        targets: reply.targets,
    };
    if out == Format::Json {
        return output::json(&published);
    }
    println!(
        "published targets version {} (expires {}) listing {} image(s): {}",
        published.targets_version,
        published.expires,
        published.targets.len(),
        published.targets.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(version: u64, extra: &str) -> Vec<u8> {
        format!("{{\"signed\":{{\"version\":{version},\"x\":\"{extra}\"}},\"signatures\":[]}}").into_bytes()
    }

    #[test]
    fn local_signing_work_is_not_replaced_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TARGETS_FILE);
        // Nothing local: fine.
        check_replace(&path, &targets(4, "a"), false).unwrap();
        std::fs::write(&path, targets(4, "a")).unwrap();
        // The same, or newer from the server: fine.
        check_replace(&path, &targets(4, "a"), false).unwrap();
        check_replace(&path, &targets(5, "b"), false).unwrap();
        // Local is newer, or as new but different: refused unless forced.
        std::fs::write(&path, targets(6, "mine")).unwrap();
        assert!(check_replace(&path, &targets(5, "b"), false).is_err());
        std::fs::write(&path, targets(5, "mine")).unwrap();
        let error = check_replace(&path, &targets(5, "theirs"), false).unwrap_err();
        assert!(error.to_string().contains("--force"), "{error}");
        check_replace(&path, &targets(5, "theirs"), true).unwrap();
    }
}
