//! `medfleet firmware keys rotate-root`, offline: the next root version, before the current one expires or when a
//! root key must go. Devices follow it only when the old root's threshold and the new one's both signed it, so the
//! command takes the current root keys, checks them against DIR/root.json, and verifies the result the way a
//! device will before it writes anything. The old root stays beside it as DIR/N.root.json.

use std::path::PathBuf;
use std::time::Duration;

use medfleet_core::digest::sha256_hex;
use medfleet_core::firmware::tuf::{self, RoleSpec, SigningKey};
use serde::Serialize;

use super::keys::{CreatedKey, OnlineKeysFile, check_role, expiry, generate, sealed};
use super::passphrase::Passphrase;
use super::{ROOT_FILE, files};
use crate::args::parse_duration;
use crate::error::{InvalidInput, UsageError};
use crate::output::{self, Format};

#[derive(Debug, clap::Args)]
pub(crate) struct RotateRootArgs {
    /// The metadata directory holding the current root.json (from `keys init`, or `metadata pull`).
    #[arg(long)]
    pub(crate) metadata: PathBuf,
    /// A current root key (PEM); repeat until the current root's threshold is reached.
    #[arg(long = "key", required = true)]
    pub(crate) keys: Vec<PathBuf>,
    /// Replace the root keys with this many new ones (written to DIR/keys/root-vN-*.pem); without it the
    /// current root keys stay.
    #[arg(long)]
    pub(crate) new_root_keys: Option<u32>,
    /// How many of the new root keys must sign the root after this one (default: the current threshold, or 1).
    #[arg(long, requires = "new_root_keys")]
    pub(crate) root_threshold: Option<u32>,
    /// medfleetd's online keys, when they changed (the file `medfleet firmware online-keys -o json` prints).
    #[arg(long)]
    pub(crate) online_keys: Option<PathBuf>,
    /// How long the new root stays valid.
    #[arg(long, value_parser = parse_duration, default_value = "365d")]
    pub(crate) expires: Duration,
    /// Write new root keys in clear instead of sealed under the passphrase: only onto encrypted storage.
    #[arg(long)]
    pub(crate) unencrypted: bool,
    #[arg(skip)]
    pub(crate) passphrase: Passphrase,
}

/// What `rotate-root` made.
#[derive(Debug, Serialize)]
pub(crate) struct Rotated {
    pub(crate) root_file: String,
    /// The root it follows, kept for the record.
    pub(crate) previous_file: String,
    pub(crate) version: u64,
    pub(crate) expires: String,
    pub(crate) root_sha256: String,
    pub(crate) root_threshold: u64,
    /// Keys created for the new root (empty when the root keys stayed).
    pub(crate) new_root_keys: Vec<CreatedKey>,
}

/// The signing keys given, each one a key of the current root, and at least its threshold of them.
fn current_signers(root: &tuf::RootSpec, keys: Vec<SigningKey>) -> anyhow::Result<Vec<SigningKey>> {
    let ids: Vec<String> = root.root.keys.iter().filter_map(|k| k.id().ok()).collect();
    if let Some(stranger) = keys.iter().find(|k| !ids.iter().any(|id| id == k.id())) {
        return Err(InvalidInput(format!(
            "--key {} is not a root key of the current root (its root keys are {}); give the root keys, not \
             targets keys",
            stranger.id(),
            ids.join(", ")
        ))
        .into());
    }
    if (keys.len() as u64) < root.root.threshold {
        return Err(InvalidInput(format!(
            "the current root needs {} of its {} root keys to sign the next root, {} given; repeat --key with \
             each key holder's key",
            root.root.threshold,
            ids.len(),
            keys.len()
        ))
        .into());
    }
    Ok(keys)
}

/// Builds, signs and verifies version N+1, then writes it over DIR/root.json with the old one kept as
/// DIR/N.root.json. Nothing is written unless everything checks.
pub(crate) async fn rotate(args: &RotateRootArgs) -> anyhow::Result<Rotated> {
    let root_file = args.metadata.join(ROOT_FILE);
    let current = files::read("--metadata", &root_file)?;
    let mut spec = tuf::root_spec(&current).map_err(|e| {
        InvalidInput(format!(
            "{}: not a root this command can follow: {}",
            root_file.display(),
            e.detail
        ))
    })?;
    let signers = current_signers(&spec, files::read_keys(&args.keys, &args.passphrase)?)?;
    let version = spec.version.saturating_add(1);
    let previous_file = args.metadata.join(format!("{}.{ROOT_FILE}", spec.version));
    if files::exists(&previous_file) {
        return Err(UsageError(format!(
            "{} exists already; this directory has rotated from version {} before: pull the current metadata \
             (`medfleet firmware metadata pull`) into a new directory",
            previous_file.display(),
            spec.version
        ))
        .into());
    }

    let mut generated = Vec::new();
    if let Some(count) = args.new_root_keys {
        let threshold = args
            .root_threshold
            .unwrap_or_else(|| u32::try_from(spec.root.threshold).unwrap_or(1).min(count).max(1));
        check_role("root", count, threshold)
            .map_err(|e| InvalidInput(e.to_string().replace("--root-keys", "--new-root-keys")))?;
        generated = generate(&args.metadata.join("keys"), &format!("root-v{version}"), count)?;
        if let Some(taken) = generated.iter().find(|g| files::exists(&g.path)) {
            return Err(UsageError(format!(
                "{} exists already; rotate-root never overwrites a key",
                taken.path.display()
            ))
            .into());
        }
        spec.root = RoleSpec {
            keys: generated.iter().map(|g| g.key.public()).collect(),
            threshold: u64::from(threshold),
        };
    }
    if let Some(path) = &args.online_keys {
        let online = OnlineKeysFile::read(path)?;
        let one = |key: &super::keys::OnlineKey| RoleSpec {
            keys: vec![key.key.clone()],
            threshold: 1,
        };
        spec.snapshot = one(&online.snapshot);
        spec.timestamp = one(&online.timestamp);
    }
    spec.version = version;
    spec.expires = expiry("expires", args.expires)?;

    let mut all: Vec<&SigningKey> = signers.iter().collect();
    all.extend(generated.iter().map(|g| &g.key));
    let next = tuf::sign_root(&spec, &all)
        .await
        .map_err(|e| anyhow::anyhow!("could not sign the new root: {e}"))?;
    // What a device holding the current root will check: exactly one version up, both thresholds signed.
    tuf::verify_root_update(&current, &next).map_err(|e| anyhow::anyhow!("the new root would not be followed: {e}"))?;

    let contents = generated
        .iter()
        .map(|g| sealed(&args.passphrase, args.unencrypted, &g.pem))
        .collect::<anyhow::Result<Vec<String>>>()?;
    if !generated.is_empty() {
        files::private_dir(&args.metadata.join("keys"))?;
        for (key, contents) in generated.iter().zip(&contents) {
            files::create_private(&key.path, contents)?;
        }
    }
    files::create_public(&previous_file, &current)?;
    files::replace_public(&root_file, &next)?;
    Ok(Rotated {
        root_file: root_file.display().to_string(),
        previous_file: previous_file.display().to_string(),
        version,
        expires: spec.expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        root_sha256: sha256_hex(&next),
        root_threshold: spec.root.threshold,
        new_root_keys: generated
            .iter()
            .map(|g| CreatedKey {
                id: g.key.id().to_owned(),
                file: g.path.display().to_string(),
            })
            .collect(),
    })
}

pub(super) async fn rotate_root(args: &RotateRootArgs, out: Format) -> anyhow::Result<()> {
    let made = rotate(args).await?;
    if out == Format::Json {
        return output::json(&made);
    }
    println!(
        "Signed root version {} (expires {}):\n  {}  sha256 {}\n  (version {} kept as {})",
        made.version,
        made.expires,
        made.root_file,
        made.root_sha256,
        made.version - 1,
        made.previous_file
    );
    if !made.new_root_keys.is_empty() {
        println!("  new root keys ({} must sign the next root):", made.root_threshold);
        for key in &made.new_root_keys {
            println!("    {}  {}", key.id, key.file);
        }
        println!("  Store the new root keys offline; the old ones sign nothing from now on.");
    }
    println!(
        "\nNext:\n  \
         medfleet firmware trust install {root}\n\
         Devices fetch the new root with their next metadata and follow it by themselves (each checks both \
         signatures); a device that was offline longer follows every version in between. Pin {root} on devices \
         you install from now on.",
        root = made.root_file
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::firmware::keys::create;
    use crate::firmware::tests::{init_args, online};

    async fn initialized(dir: &Path) -> PathBuf {
        let online = online(dir);
        let out = dir.join("fw");
        let mut init = init_args(&out, &online.file, 1);
        (init.root_keys, init.root_threshold, init.targets_keys) = (3, 2, 1);
        init.expires = Duration::from_hours(24);
        create(&init).await.unwrap();
        out
    }

    fn args(dir: &Path, keys: &[&str]) -> RotateRootArgs {
        RotateRootArgs {
            metadata: dir.to_owned(),
            keys: keys.iter().map(|k| dir.join("keys").join(k)).collect(),
            new_root_keys: None,
            root_threshold: None,
            online_keys: None,
            expires: Duration::from_hours(730 * 24),
            unencrypted: false,
            passphrase: crate::firmware::passphrase::Passphrase::given(crate::firmware::tests::PASSPHRASE),
        }
    }

    #[tokio::test]
    async fn a_rotation_is_signed_by_the_old_threshold_and_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = initialized(tmp.path()).await;
        let v1 = std::fs::read(dir.join(ROOT_FILE)).unwrap();

        // One key of a 2-of-3 root is not enough, a targets key is not a root key, and nothing is written.
        let error = rotate(&args(&dir, &["root-1.pem"])).await.unwrap_err();
        assert!(error.to_string().contains("needs 2 of its 3"), "{error}");
        let error = rotate(&args(&dir, &["root-1.pem", "targets-1.pem"])).await.unwrap_err();
        assert!(error.to_string().contains("not a root key"), "{error}");
        assert_eq!(std::fs::read(dir.join(ROOT_FILE)).unwrap(), v1);
        assert!(!dir.join("1.root.json").exists());

        // Same keys, longer life.
        let made = rotate(&args(&dir, &["root-1.pem", "root-3.pem"])).await.unwrap();
        assert_eq!(made.version, 2);
        let v2 = std::fs::read(dir.join(ROOT_FILE)).unwrap();
        assert_eq!(std::fs::read(dir.join("1.root.json")).unwrap(), v1);
        assert_eq!(tuf::follow_root_chain(&v1, std::slice::from_ref(&v2)).unwrap(), v2);
        assert!(tuf::root_info(&v2).unwrap().expires > tuf::root_info(&v1).unwrap().expires);

        // New root keys: the old threshold and the new keys sign; the old keys alone cannot sign version 4.
        let mut new_keys = args(&dir, &["root-2.pem", "root-3.pem"]);
        new_keys.new_root_keys = Some(2);
        let made = rotate(&new_keys).await.unwrap();
        assert_eq!((made.version, made.root_threshold, made.new_root_keys.len()), (3, 2, 2));
        let v3 = std::fs::read(dir.join(ROOT_FILE)).unwrap();
        assert_eq!(tuf::follow_root_chain(&v1, &[v2, v3.clone()]).unwrap(), v3);
        let error = rotate(&args(&dir, &["root-1.pem", "root-2.pem"])).await.unwrap_err();
        assert!(error.to_string().contains("not a root key"), "{error}");
        let made = rotate(&args(&dir, &["root-v3-1.pem", "root-v3-2.pem"])).await.unwrap();
        assert_eq!(made.version, 4);
    }
}
