//! What a co-signer reviews before their signature counts: every signed fact a new targets version changes
//! against the published version it builds on. A signature covers the whole file, so a holder who sees only
//! target names could sign a downgrade or an image they never meant to release.

use std::path::{Path, PathBuf};

use medfleet_core::firmware::tuf::{self, SignedTarget, TargetsInfo};

use super::files;
use crate::error::InvalidInput;

/// Where `sign` and `resign` keep the version they built on: `DIR/N.targets.json`.
pub(super) fn previous_path(dir: &Path, version: u64) -> PathBuf {
    dir.join(format!("{version}.targets.json"))
}

/// Keeps `previous` (the published version a signing builds on) beside the new one, once.
pub(super) fn keep_previous(dir: &Path, previous: &[u8]) -> anyhow::Result<()> {
    let Ok(version) = tuf::metadata_version(previous) else {
        return Ok(());
    };
    let path = previous_path(dir, version);
    if files::read_optional(&path)?.is_none() {
        files::create_public(&path, previous)?;
    }
    Ok(())
}

/// Every fact a device acts on, in one line.
fn facts(t: &SignedTarget) -> String {
    let downgrade = if t.meta.downgrade_from.is_empty() {
        String::new()
    } else {
        format!(", DOWNGRADE from releases {:?}", t.meta.downgrade_from)
    };
    format!(
        "model {}, version {}, release {}, sha256 {}, {} bytes{downgrade}",
        t.meta.hardware_id, t.meta.version, t.meta.release_counter, t.sha256, t.length
    )
}

/// One line per target `next` adds (+), removes (-) or changes (~) against `previous`; with no previous
/// version, every target (=), since nothing can be compared.
pub(super) fn changes(previous: Option<&TargetsInfo>, next: &TargetsInfo) -> Vec<String> {
    let Some(previous) = previous else {
        return next
            .targets
            .iter()
            .map(|t| format!("= {}: {}", t.name, facts(t)))
            .collect();
    };
    let mut out = Vec::new();
    for t in &next.targets {
        match previous.targets.iter().find(|p| p.name == t.name) {
            None => out.push(format!("+ {}: {}", t.name, facts(t))),
            Some(p) if p != t => out.push(format!("~ {}: {} -> {}", t.name, facts(p), facts(t))),
            Some(_) => {}
        }
    }
    for p in &previous.targets {
        if !next.targets.iter().any(|t| t.name == p.name) {
            out.push(format!("- {}", p.name));
        }
    }
    out
}

/// The published version `info` builds on, from `DIR/(version-1).targets.json`, checked to be signed to the
/// threshold of DIR/root.json (what medfleetd published, not a file anyone could have written); `None` when the
/// directory does not hold it.
pub(super) fn published_base(dir: &Path, info: &TargetsInfo) -> anyhow::Result<Option<(PathBuf, TargetsInfo)>> {
    let Some(version) = info.version.checked_sub(1).filter(|v| *v > 0) else {
        return Ok(None);
    };
    let path = previous_path(dir, version);
    let Some(bytes) = files::read_optional(&path)? else {
        return Ok(None);
    };
    let root = files::read("--metadata", &dir.join(super::ROOT_FILE))?;
    tuf::check_signed_targets(&root, &bytes).map_err(|e| {
        InvalidInput(format!(
            "{}: {e}: it is not a published version, so what this signing changes cannot be trusted; pull again \
             with `medfleet firmware metadata pull`",
            path.display()
        ))
    })?;
    let base = tuf::targets_info(&bytes).map_err(|e| InvalidInput(format!("{}: {e}", path.display())))?;
    if base.version != version {
        return Err(InvalidInput(format!(
            "{} is version {}, not a published version {version} this signing builds on: remove it and pull again \
             with `medfleet firmware metadata pull`",
            path.display(),
            base.version
        ))
        .into());
    }
    Ok(Some((path, base)))
}

#[cfg(test)]
mod tests {
    use medfleet_core::firmware::target::TargetMeta;

    use super::*;

    fn target(name: &str, counter: u64, downgrade_from: Vec<u64>) -> SignedTarget {
        SignedTarget {
            name: name.to_owned(),
            sha256: "ab".repeat(32),
            length: 10,
            meta: TargetMeta {
                hardware_id: "IntelliVue MX450".into(),
                version: format!("2.{counter}"),
                release_counter: counter,
                downgrade_from,
            },
        }
    }

    fn info(version: u64, targets: Vec<SignedTarget>) -> TargetsInfo {
        TargetsInfo {
            version,
            expires: chrono::Utc::now(),
            signed_by: vec![],
            targets,
        }
    }

    #[test]
    fn a_co_signer_sees_every_fact_that_changed() {
        let before = info(3, vec![target("a.img", 1, vec![]), target("b.img", 2, vec![])]);
        // A new release, and an old image quietly turned into a downgrade.
        let after = info(
            4,
            vec![
                target("a.img", 1, vec![]),
                target("b.img", 2, vec![5]),
                target("c.img", 3, vec![]),
            ],
        );
        let lines = changes(Some(&before), &after);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("~ b.img:") && lines[0].ends_with("DOWNGRADE from releases [5]"),
            "{lines:?}"
        );
        assert!(
            lines[1].starts_with("+ c.img: model IntelliVue MX450, version 2.3, release 3"),
            "{lines:?}"
        );
        let removed = changes(Some(&after), &before);
        assert!(removed.contains(&"- c.img".to_owned()), "{removed:?}");
        // Nothing to compare with: everything is shown.
        assert_eq!(changes(None, &after).len(), 3);
    }
}
