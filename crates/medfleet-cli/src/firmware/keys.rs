//! `medfleet firmware keys init` (offline: the root and targets keys and the first root metadata) and
//! `medfleet firmware online-keys` (medfleetd's snapshot and timestamp public keys, in the file `keys init` reads).

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use medfleet_core::digest::sha256_hex;
use medfleet_core::firmware::tuf::{self, PublicKey, RoleSpec, RootSpec, SigningKey};
use medfleet_proto::v1;
use serde::{Deserialize, Serialize};

use super::passphrase::Passphrase;
use super::{Firmware, ROOT_FILE, files};
use crate::args::parse_duration;
use crate::error::{InvalidInput, UsageError};
use crate::output::{self, Format};

/// The most keys one role may have here (k-of-n among people, not machines).
const MAX_KEYS: u32 = 16;

#[derive(Debug, clap::Args)]
pub(crate) struct InitArgs {
    /// The directory to create: DIR/root.json and DIR/keys/*.pem.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// medfleetd's online keys: the file `medfleet firmware online-keys -o json` prints.
    #[arg(long)]
    pub(crate) online_keys: PathBuf,
    /// How many root keys to create.
    #[arg(long, default_value_t = 1)]
    pub(crate) root_keys: u32,
    /// How many root keys must sign a new root.
    #[arg(long, default_value_t = 1)]
    pub(crate) root_threshold: u32,
    /// How many targets keys to create (one per person who signs releases).
    #[arg(long, default_value_t = 1)]
    pub(crate) targets_keys: u32,
    /// How many targets keys must sign a release.
    #[arg(long, default_value_t = 1)]
    pub(crate) targets_threshold: u32,
    /// How long the root stays valid; devices refuse an expired root, so install a new root version before.
    #[arg(long, value_parser = parse_duration, default_value = "365d")]
    pub(crate) expires: Duration,
    /// Write the keys in clear instead of sealed under a passphrase: only onto storage that is encrypted itself.
    #[arg(long)]
    pub(crate) unencrypted: bool,
    #[arg(skip)]
    pub(crate) passphrase: Passphrase,
}

/// One online key as `online-keys -o json` prints it and `keys init --online-keys` reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OnlineKey {
    pub(crate) key_id: String,
    /// The TUF key object, as it goes into root metadata.
    pub(crate) key: PublicKey,
}

/// `medfleet firmware online-keys -o json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OnlineKeysFile {
    pub(crate) snapshot: OnlineKey,
    pub(crate) timestamp: OnlineKey,
}

impl OnlineKeysFile {
    /// Reads the file and checks that each key id is the id of its key (a file edited by hand, or mixed up, is
    /// refused rather than put into a root that medfleetd would then refuse).
    pub(super) fn read(path: &Path) -> anyhow::Result<Self> {
        let bytes = files::read("--online-keys", path)?;
        let keys: Self = serde_json::from_slice(&bytes).map_err(|e| {
            InvalidInput(format!(
                "--online-keys {}: not the JSON `medfleet firmware online-keys -o json` prints: {e}",
                path.display()
            ))
        })?;
        for (role, key) in [("snapshot", &keys.snapshot), ("timestamp", &keys.timestamp)] {
            let id = key
                .key
                .id()
                .map_err(|e| InvalidInput(format!("--online-keys {}: {role} key: {e}", path.display())))?;
            if id != key.key_id {
                return Err(InvalidInput(format!(
                    "--online-keys {}: the {role} key's id is {id}, the file says {}; get the file again with \
                     `medfleet firmware online-keys -o json`",
                    path.display(),
                    key.key_id
                ))
                .into());
            }
        }
        Ok(keys)
    }
}

/// One key `keys init` created.
#[derive(Debug, Serialize)]
pub(crate) struct CreatedKey {
    pub(crate) id: String,
    pub(crate) file: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct CreatedRole {
    pub(crate) threshold: u32,
    pub(crate) keys: Vec<CreatedKey>,
}

/// What `keys init` made.
#[derive(Debug, Serialize)]
pub(crate) struct Initialized {
    pub(crate) root_file: String,
    pub(crate) version: u64,
    pub(crate) expires: String,
    /// SHA-256 of root.json, to compare out of band where it is installed and pinned.
    pub(crate) root_sha256: String,
    pub(crate) root: CreatedRole,
    pub(crate) targets: CreatedRole,
    pub(crate) snapshot_key_id: String,
    pub(crate) timestamp_key_id: String,
}

pub(super) fn check_role(role: &str, keys: u32, threshold: u32) -> anyhow::Result<()> {
    if keys == 0 || keys > MAX_KEYS {
        return Err(InvalidInput(format!("--{role}-keys {keys}: create 1 to {MAX_KEYS} keys")).into());
    }
    if threshold == 0 || threshold > keys {
        return Err(InvalidInput(format!(
            "--{role}-threshold {threshold}: must be 1 to --{role}-keys ({keys})"
        ))
        .into());
    }
    Ok(())
}

pub(super) fn expiry(flag: &str, duration: Duration) -> anyhow::Result<DateTime<Utc>> {
    chrono::Duration::from_std(duration)
        .ok()
        .filter(|d| *d > chrono::Duration::zero())
        .and_then(|d| Utc::now().checked_add_signed(d))
        .ok_or_else(|| InvalidInput(format!("--{flag}: must be a positive duration such as 365d")).into())
}

pub(super) struct Generated {
    pub(super) key: SigningKey,
    pub(super) pem: String,
    pub(super) path: PathBuf,
}

/// What a new key file holds: the key sealed under the passphrase, or in clear when asked to.
pub(super) fn sealed(passphrase: &Passphrase, unencrypted: bool, pem: &str) -> anyhow::Result<String> {
    if unencrypted {
        Ok(pem.to_owned())
    } else {
        passphrase.seal(pem)
    }
}

pub(super) fn generate(dir: &Path, role: &str, count: u32) -> anyhow::Result<Vec<Generated>> {
    (1..=count)
        .map(|i| {
            let (key, pem) = SigningKey::generate().map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(Generated {
                key,
                pem,
                path: dir.join(format!("{role}-{i}.pem")),
            })
        })
        .collect()
}

fn role(keys: &[Generated], threshold: u32) -> (RoleSpec, CreatedRole) {
    (
        RoleSpec {
            keys: keys.iter().map(|g| g.key.public()).collect(),
            threshold: u64::from(threshold),
        },
        CreatedRole {
            threshold,
            keys: keys
                .iter()
                .map(|g| CreatedKey {
                    id: g.key.id().to_owned(),
                    file: g.path.display().to_string(),
                })
                .collect(),
        },
    )
}

/// Creates the keys and root.json in `args.out`. Everything is checked and signed before the first file is
/// written, and nothing that exists is replaced.
pub(crate) async fn create(args: &InitArgs) -> anyhow::Result<Initialized> {
    check_role("root", args.root_keys, args.root_threshold)?;
    check_role("targets", args.targets_keys, args.targets_threshold)?;
    let expires = expiry("expires", args.expires)?;
    let online = OnlineKeysFile::read(&args.online_keys)?;

    let keys_dir = args.out.join("keys");
    let root_file = args.out.join(ROOT_FILE);
    let root_keys = generate(&keys_dir, "root", args.root_keys)?;
    let targets_keys = generate(&keys_dir, "targets", args.targets_keys)?;
    let taken: Vec<&Path> = std::iter::once(root_file.as_path())
        .chain(root_keys.iter().chain(&targets_keys).map(|g| g.path.as_path()))
        .filter(|p| files::exists(p))
        .collect();
    if let Some(first) = taken.first() {
        return Err(UsageError(format!(
            "{} exists already; keys init never overwrites anything: choose a new --out directory",
            first.display()
        ))
        .into());
    }

    let (root_spec, root_view) = role(&root_keys, args.root_threshold);
    let (targets_spec, targets_view) = role(&targets_keys, args.targets_threshold);
    let one = |key: &OnlineKey| RoleSpec {
        keys: vec![key.key.clone()],
        threshold: 1,
    };
    let spec = RootSpec {
        version: 1,
        expires,
        root: root_spec,
        targets: targets_spec,
        snapshot: one(&online.snapshot),
        timestamp: one(&online.timestamp),
    };
    let signers: Vec<&SigningKey> = root_keys.iter().map(|g| &g.key).collect();
    let root = tuf::sign_root(&spec, &signers)
        .await
        .map_err(|e| anyhow::anyhow!("could not sign the root: {e}"))?;

    let contents = root_keys
        .iter()
        .chain(&targets_keys)
        .map(|g| sealed(&args.passphrase, args.unencrypted, &g.pem))
        .collect::<anyhow::Result<Vec<String>>>()?;
    files::create_dir(&args.out)?;
    files::private_dir(&keys_dir)?;
    for (generated, contents) in root_keys.iter().chain(&targets_keys).zip(&contents) {
        files::create_private(&generated.path, contents)?;
    }
    files::create_public(&root_file, &root)?;
    Ok(Initialized {
        root_file: root_file.display().to_string(),
        version: 1,
        expires: expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        root_sha256: sha256_hex(&root),
        root: root_view,
        targets: targets_view,
        snapshot_key_id: online.snapshot.key_id,
        timestamp_key_id: online.timestamp.key_id,
    })
}

pub(super) async fn init(args: &InitArgs, out: Format) -> anyhow::Result<()> {
    let made = create(args).await?;
    if out == Format::Json {
        return output::json(&made);
    }
    let dir = args.out.display();
    println!(
        "Created TUF root version {} (expires {}) in {dir}:\n  {}  sha256 {}",
        made.version, made.expires, made.root_file, made.root_sha256
    );
    for (name, role) in [("root", &made.root), ("targets", &made.targets)] {
        println!("  {name} keys ({} of {} must sign):", role.threshold, role.keys.len());
        for key in &role.keys {
            println!("    {}  {}", key.id, key.file);
        }
    }
    println!(
        "  snapshot key (medfleetd)   {}\n  timestamp key (medfleetd)  {}\n  \
         (compare these two with `medfleet firmware online-keys` before installing)",
        made.snapshot_key_id, made.timestamp_key_id
    );
    let first_targets = made.targets.keys.first().map_or("TARGETS-KEY.pem", |k| k.file.as_str());
    println!(
        "\nNext:\n  \
         1. Install the root on medfleetd (root.json holds no secrets; copy only it to a connected machine):\n       \
         medfleet firmware trust install {root}\n  \
         2. Pin the same root.json on every device as the root its agent verifies updates against;\n     \
         check its sha256 ({sha}) where you install it.\n  \
         3. Store {dir}/keys/root-*.pem offline (e.g. encrypted media in a safe): they are needed only\n     \
         to sign a new root version. Never copy a key to medfleetd.\n  \
         4. Give each targets key to the person who signs releases with it, then:\n       \
         medfleet firmware sign IMAGE --name TARGET --model MODEL --version V --counter N --metadata {dir} --key \
         {first_targets}",
        root = made.root_file,
        sha = made.root_sha256,
    );
    Ok(())
}

/// The online keys as medfleetd sent them, checked to be TUF keys with the ids it names.
fn online_file(keys: v1::OnlineKeys) -> anyhow::Result<OnlineKeysFile> {
    let key = |role: &str, json: &str, id: String| -> anyhow::Result<OnlineKey> {
        let key: PublicKey = serde_json::from_str(json)
            .map_err(|e| anyhow::anyhow!("medfleetd sent a {role} key that is not a TUF key: {e}"))?;
        let computed = key
            .id()
            .map_err(|e| anyhow::anyhow!("medfleetd sent an unusable {role} key: {e}"))?;
        if !id.is_empty() && computed != id {
            return Err(anyhow::anyhow!(
                "medfleetd names its {role} key {id}, but the key's id is {computed}; do not use it and tell \
                 whoever runs medfleetd"
            ));
        }
        Ok(OnlineKey { key_id: computed, key })
    };
    Ok(OnlineKeysFile {
        snapshot: key("snapshot", &keys.snapshot_key_json, keys.snapshot_key_id)?,
        timestamp: key("timestamp", &keys.timestamp_key_json, keys.timestamp_key_id)?,
    })
}

pub(super) async fn online_keys(api: &mut Firmware, out: Format) -> anyhow::Result<()> {
    let keys = online_file(api.get_online_keys(v1::GetOnlineKeysRequest {}).await?.into_inner())?;
    if out == Format::Json {
        return output::json(&keys);
    }
    println!(
        "snapshot key   {}\ntimestamp key  {}\n\nFor `medfleet firmware keys init --online-keys FILE`, save them with:\n  \
         medfleet firmware online-keys -o json > online-keys.json",
        keys.snapshot.key_id, keys.timestamp.key_id
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_must_fit_the_keys() {
        assert!(check_role("root", 3, 2).is_ok());
        for (keys, threshold) in [(0, 0), (2, 3), (2, 0), (MAX_KEYS + 1, 1)] {
            let error = check_role("targets", keys, threshold).unwrap_err();
            assert!(error.downcast_ref::<InvalidInput>().is_some());
            assert!(error.to_string().contains("--targets-"), "{error}");
        }
    }

    #[test]
    fn online_keys_from_the_server_round_trip_through_the_file() {
        let (snapshot, _) = SigningKey::generate().unwrap();
        let (timestamp, _) = SigningKey::generate().unwrap();
        let wire = v1::OnlineKeys {
            snapshot_key_json: serde_json::to_string(&snapshot.public()).unwrap(),
            timestamp_key_json: serde_json::to_string(&timestamp.public()).unwrap(),
            snapshot_key_id: snapshot.id().to_owned(),
            timestamp_key_id: timestamp.id().to_owned(),
        };
        let file = online_file(wire.clone()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("online-keys.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&file).unwrap()).unwrap();
        let read = OnlineKeysFile::read(&path).unwrap();
        assert_eq!(read.snapshot.key_id, snapshot.id());
        assert_eq!(read.timestamp.key, timestamp.public());

        // An id that is not the key's is refused, from the server and in the file.
        let mut lying = wire;
        lying.snapshot_key_id.clone_from(&lying.timestamp_key_id);
        assert!(online_file(lying).is_err());
        let mut edited = file;
        edited.snapshot.key_id = timestamp.id().to_owned();
        std::fs::write(&path, serde_json::to_vec(&edited).unwrap()).unwrap();
        let error = OnlineKeysFile::read(&path).unwrap_err();
        assert!(error.downcast_ref::<InvalidInput>().is_some(), "{error}");
    }
}
