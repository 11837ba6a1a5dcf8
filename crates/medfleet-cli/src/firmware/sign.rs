//! `medfleet firmware sign` and `countersign`, both offline: a release added to the targets metadata of a metadata
//! directory as its next version and signed with the targets keys at hand, and more signatures added by the other
//! key holders until the root's targets threshold is reached. Keys are checked against DIR/root.json when it is
//! there, so a signature the root would not count is refused here rather than by medfleetd.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use medfleet_core::firmware::target::{self, TargetMeta};
use medfleet_core::firmware::tuf::{self, RootInfo, SignedTarget, SigningKey, TargetsInfo};
use serde::Serialize;

use super::passphrase::Passphrase;
use super::{ROOT_FILE, TARGETS_FILE, files, review};
use crate::args::parse_duration;
use crate::error::InvalidInput;
use crate::output::{self, Format};

#[derive(Debug, clap::Args)]
pub(crate) struct SignArgs {
    /// The firmware image file.
    pub(crate) image: PathBuf,
    /// The TUF target name (letters, digits, '.', '-', '_'), unique for ever.
    #[arg(long)]
    pub(crate) name: String,
    /// The device model (hardware id) the image is for, as devices report it.
    #[arg(long)]
    pub(crate) model: String,
    /// The vendor's version string (shown to people).
    #[arg(long)]
    pub(crate) version: String,
    /// The release counter: above every earlier release of the model (devices refuse anything not newer).
    #[arg(long)]
    pub(crate) counter: u64,
    /// A signed downgrade: the higher release counters this image may replace, e.g. 7,8.
    #[arg(long, value_delimiter = ',')]
    pub(crate) downgrade_from: Vec<u64>,
    /// The metadata directory (root.json, targets.json): from `keys init`, or `metadata pull`.
    #[arg(long)]
    pub(crate) metadata: PathBuf,
    /// A targets key (PEM) to sign with; repeat for each key at hand.
    #[arg(long = "key", required = true)]
    pub(crate) keys: Vec<PathBuf>,
    /// How long the targets metadata stays valid; devices refuse every image once it has expired, so sign the
    /// next release before then.
    #[arg(long, value_parser = parse_duration, default_value = "90d")]
    pub(crate) expires: Duration,
    #[arg(skip)]
    pub(crate) passphrase: Passphrase,
}

#[derive(Debug, clap::Args)]
pub(crate) struct CountersignArgs {
    /// The metadata directory holding targets.json.
    #[arg(long)]
    pub(crate) metadata: PathBuf,
    /// Your targets key (PEM); repeatable.
    #[arg(long = "key", required = true)]
    pub(crate) keys: Vec<PathBuf>,
    #[arg(skip)]
    pub(crate) passphrase: Passphrase,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ResignArgs {
    /// The metadata directory: pull the published metadata into it first (`medfleet firmware metadata pull`).
    #[arg(long)]
    pub(crate) metadata: PathBuf,
    /// A targets key (PEM) to sign with; repeat for each key at hand.
    #[arg(long = "key", required = true)]
    pub(crate) keys: Vec<PathBuf>,
    /// How long the re-signed targets metadata stays valid.
    #[arg(long, value_parser = parse_duration, default_value = "90d")]
    pub(crate) expires: Duration,
    /// Leave this target out (an image deleted with `medfleet firmware delete`); repeatable.
    #[arg(long = "remove", value_name = "TARGET")]
    pub(crate) remove: Vec<String>,
    /// Let a listed image replace a higher release, e.g. mx450-2.4.0.img=41: a signed downgrade of the very bytes
    /// devices ran before, for `medfleet rollouts rollback` (FDA: only when necessary for safety); repeatable.
    #[arg(long = "allow-downgrade", value_name = "TARGET=RELEASE", value_parser = parse_downgrade)]
    pub(crate) allow_downgrade: Vec<(String, u64)>,
    #[arg(skip)]
    pub(crate) passphrase: Passphrase,
}

fn parse_downgrade(text: &str) -> Result<(String, u64), String> {
    let (name, release) = text
        .rsplit_once('=')
        .ok_or_else(|| format!("'{text}' is not TARGET=RELEASE, e.g. mx450-2.4.0.img=41"))?;
    let release = release
        .parse()
        .map_err(|_| format!("'{release}' is not a release counter (a whole number)"))?;
    Ok((name.to_owned(), release))
}

/// Where signing stands after `sign`, `resign` or `countersign`.
#[derive(Debug, Serialize)]
pub(crate) struct SignatureStatus {
    pub(crate) targets_file: String,
    pub(crate) version: u64,
    pub(crate) expires: String,
    /// The target just signed (`sign` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) target: Option<TargetView>,
    /// Every target the metadata lists (all of them are signed again by each signature).
    pub(crate) targets: Vec<String>,
    /// Key ids of the signatures it holds.
    pub(crate) signed_by: Vec<String>,
    /// Signatures by keys the root trusts for the targets role, and how many it needs (unknown without root.json).
    pub(crate) counted: Option<usize>,
    pub(crate) threshold: Option<u64>,
    pub(crate) complete: Option<bool>,
    /// `countersign`: what this version changes against the published one it builds on (`+`, `-`, `~`), or every
    /// target (`=`) when that version is not in the directory.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) changes: Vec<String>,
    /// The published version `changes` compares with (empty: none held, nothing compared).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) compared_with: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct TargetView {
    pub(crate) name: String,
    pub(crate) sha256: String,
    pub(crate) length: u64,
    pub(crate) hardware_id: String,
    pub(crate) version: String,
    pub(crate) release_counter: u64,
    pub(crate) downgrade_from: Vec<u64>,
}

impl From<&SignedTarget> for TargetView {
    fn from(t: &SignedTarget) -> Self {
        Self {
            name: t.name.clone(),
            sha256: t.sha256.clone(),
            length: t.length,
            hardware_id: t.meta.hardware_id.clone(),
            version: t.meta.version.clone(),
            release_counter: t.meta.release_counter,
            downgrade_from: t.meta.downgrade_from.clone(),
        }
    }
}

/// DIR/root.json, if the directory has one (verified to be signed by its own root threshold).
pub(super) fn local_root(dir: &Path) -> anyhow::Result<Option<RootInfo>> {
    let path = dir.join(ROOT_FILE);
    files::read_optional(&path)?
        .map(|bytes| tuf::root_info(&bytes).map_err(|e| InvalidInput(format!("{}: {e}", path.display())).into()))
        .transpose()
}

/// Refuses to build on targets metadata the targets keys of DIR/root.json did not sign to threshold: a new release
/// or a re-signing extends what the key holders signed, never a list someone else put in DIR.
fn check_built_on(dir: &Path, path: &Path, previous: &[u8]) -> anyhow::Result<()> {
    let root_path = dir.join(ROOT_FILE);
    let Some(root) = files::read_optional(&root_path)? else {
        return Err(InvalidInput(format!(
            "{} is missing, so {} cannot be checked before it is extended: pull the metadata again with \
             `medfleet firmware metadata pull --out {}` (or put the trusted root there)",
            root_path.display(),
            path.display(),
            dir.display()
        ))
        .into());
    };
    tuf::check_signed_targets(&root, previous).map_err(|e| {
        InvalidInput(format!(
            "{}: {e}; nothing was signed. Pull what medfleetd publishes again, and finish a version still being \
             signed with `medfleet firmware countersign` first",
            path.display()
        ))
        .into()
    })
}

/// When metadata signed now for `lifetime` (`--expires`) expires.
fn expiry(lifetime: std::time::Duration) -> anyhow::Result<chrono::DateTime<Utc>> {
    Ok(Utc::now()
        + chrono::Duration::from_std(lifetime)
            .ok()
            .filter(|d| *d > chrono::Duration::zero())
            .ok_or_else(|| InvalidInput("--expires: must be a positive duration such as 90d".into()))?)
}

fn targets_of(path: &Path, bytes: &[u8]) -> anyhow::Result<TargetsInfo> {
    tuf::targets_info(bytes).map_err(|e| InvalidInput(format!("{}: {e}", path.display())).into())
}

/// Refuses keys the root does not trust for the targets role: their signatures would never count.
fn check_keys(root: Option<&RootInfo>, keys: &[SigningKey]) -> anyhow::Result<()> {
    let Some(root) = root else { return Ok(()) };
    let trusted = root.role_keys("targets");
    for key in keys {
        if !trusted.iter().any(|id| id == key.id()) {
            return Err(InvalidInput(format!(
                "--key: key {} is not a targets key of root.json version {} (its targets keys: {}); use a \
                 targets key, not a root key, and pull the current root with `medfleet firmware metadata pull`",
                key.id(),
                root.version,
                trusted.join(", ")
            ))
            .into());
        }
    }
    Ok(())
}

fn status(path: &Path, info: &TargetsInfo, root: Option<&RootInfo>, target: Option<&SignedTarget>) -> SignatureStatus {
    let threshold = root.and_then(|r| {
        r.roles
            .iter()
            .find(|(name, _, _)| name == "targets")
            .map(|(_, _, threshold)| *threshold)
    });
    let counted = root.map(|r| {
        let trusted = r.role_keys("targets");
        let mut ids: Vec<&String> = info.signed_by.iter().filter(|id| trusted.contains(id)).collect();
        ids.sort();
        ids.dedup();
        ids.len()
    });
    SignatureStatus {
        targets_file: path.display().to_string(),
        version: info.version,
        expires: info.expires.to_rfc3339(),
        target: target.map(TargetView::from),
        targets: info.targets.iter().map(|t| t.name.clone()).collect(),
        signed_by: info.signed_by.clone(),
        counted,
        threshold,
        complete: counted.zip(threshold).map(|(c, t)| c as u64 >= t),
        changes: Vec::new(),
        compared_with: String::new(),
    }
}

/// Maps the fields of the target rule onto the flags that set them.
fn flag_of(field: &str) -> &'static str {
    match field {
        "custom.hardware_id" => "--model",
        "custom.version" => "--version",
        "custom.release_counter" => "--counter",
        "custom.downgrade_from" => "--downgrade-from",
        _ => "--name",
    }
}

/// The target the flags describe (hash and length still to come), checked as devices and medfleetd check it.
fn check_target(args: &SignArgs, previous: Option<&TargetsInfo>) -> anyhow::Result<TargetMeta> {
    if !tuf::valid_target_name(&args.name) {
        return Err(InvalidInput(format!(
            "--name {:?}: use 1-128 letters, digits, '.', '-' and '_', not starting with '.'",
            args.name
        ))
        .into());
    }
    let meta = TargetMeta {
        hardware_id: args.model.clone(),
        version: args.version.clone(),
        release_counter: args.counter,
        downgrade_from: args.downgrade_from.clone(),
    };
    if let Err(violations) = target::validate(&meta) {
        let problems: Vec<String> = violations
            .iter()
            .map(|v| format!("{}: {}", flag_of(&v.field), v.description))
            .collect();
        return Err(InvalidInput(problems.join("; ")).into());
    }
    let Some(previous) = previous else { return Ok(meta) };
    if previous.targets.iter().any(|t| t.name == args.name) {
        return Err(InvalidInput(format!(
            "--name {}: targets.json version {} signs a target of that name already; a target name is used once \
             (upload that one with `medfleet firmware upload`, or choose a new --name)",
            args.name, previous.version
        ))
        .into());
    }
    let highest = previous
        .targets
        .iter()
        .filter(|t| t.meta.hardware_id == args.model)
        .map(|t| t.meta.release_counter)
        .max();
    if let Some(highest) = highest
        && args.counter <= highest
        && args.downgrade_from.is_empty()
    {
        return Err(InvalidInput(format!(
            "--counter {}: targets.json already signs release {highest} of {}; the next release needs --counter {} \
             or more (or sign a downgrade with --downgrade-from)",
            args.counter,
            args.model,
            highest + 1
        ))
        .into());
    }
    Ok(meta)
}

/// Signs `args.image` into DIR/targets.json; `progress` shows a bar while a big image is hashed.
pub(crate) async fn sign_release(args: &SignArgs, progress: bool) -> anyhow::Result<SignatureStatus> {
    let expires = expiry(args.expires)?;
    let root = local_root(&args.metadata)?;
    let keys = files::read_keys(&args.keys, &args.passphrase)?;
    check_keys(root.as_ref(), &keys)?;
    let path = args.metadata.join(TARGETS_FILE);
    let previous_bytes = files::read_optional(&path)?;
    let previous = previous_bytes.as_deref().map(|b| targets_of(&path, b)).transpose()?;
    if let Some(bytes) = &previous_bytes {
        check_built_on(&args.metadata, &path, bytes)?;
    }
    let meta = check_target(args, previous.as_ref())?;

    let (sha256, length) = files::hash_image(&args.image, progress)?;
    if length == 0 {
        return Err(InvalidInput(format!("{} is empty", args.image.display())).into());
    }
    let target = SignedTarget {
        name: args.name.clone(),
        sha256,
        length,
        meta,
    };
    let signers: Vec<&SigningKey> = keys.iter().collect();
    let signed = tuf::sign_targets(previous_bytes.as_deref(), &target, expires, &signers)
        .await
        .map_err(|e| InvalidInput(format!("cannot sign: {e}")))?;
    files::create_dir(&args.metadata)?;
    if let Some(previous) = &previous_bytes {
        review::keep_previous(&args.metadata, previous)?;
    }
    files::replace_public(&path, &signed)?;
    Ok(status(
        &path,
        &targets_of(&path, &signed)?,
        root.as_ref(),
        Some(&target),
    ))
}

/// Adds the signatures of `args.keys` to DIR/targets.json.
pub(crate) async fn countersign_release(args: &CountersignArgs) -> anyhow::Result<SignatureStatus> {
    let path = args.metadata.join(TARGETS_FILE);
    let bytes = files::read("--metadata", &path)?;
    let info = targets_of(&path, &bytes)?;
    if info.expires <= Utc::now() {
        return Err(InvalidInput(format!(
            "{} expired at {}; devices would refuse it: sign it again as a new version with `medfleet firmware \
             resign --metadata DIR --key KEY` (or `sign` the next release on top), then countersign that",
            path.display(),
            info.expires.to_rfc3339()
        ))
        .into());
    }
    let root = local_root(&args.metadata)?;
    let keys = files::read_keys(&args.keys, &args.passphrase)?;
    check_keys(root.as_ref(), &keys)?;
    let base = if root.is_some() {
        review::published_base(&args.metadata, &info)?
    } else {
        None
    };
    let changes = review::changes(base.as_ref().map(|(_, b)| b), &info);
    let compared_with = base.map(|(p, _)| p.display().to_string()).unwrap_or_default();
    let mut signed = bytes;
    for key in &keys {
        if info.signed_by.iter().any(|id| id == key.id()) {
            eprintln!("note: key {} has signed this version already", key.id());
        }
        signed = tuf::countersign(&signed, key)
            .await
            .map_err(|e| InvalidInput(format!("cannot countersign {}: {e}", path.display())))?;
    }
    files::replace_public(&path, &signed)?;
    Ok(SignatureStatus {
        changes,
        compared_with,
        ..status(&path, &targets_of(&path, &signed)?, root.as_ref(), None)
    })
}

/// DIR/targets.json again as its next version with a new expiry, the same targets, signed by `args.keys`.
pub(crate) async fn resign_release(args: &ResignArgs) -> anyhow::Result<SignatureStatus> {
    let expires = expiry(args.expires)?;
    let root = local_root(&args.metadata)?;
    let keys = files::read_keys(&args.keys, &args.passphrase)?;
    check_keys(root.as_ref(), &keys)?;
    let path = args.metadata.join(TARGETS_FILE);
    let Some(previous) = files::read_optional(&path)? else {
        return Err(InvalidInput(format!(
            "{} does not exist: pull what medfleetd publishes first with `medfleet firmware metadata pull --out {}`",
            path.display(),
            args.metadata.display()
        ))
        .into());
    };
    targets_of(&path, &previous)?;
    check_built_on(&args.metadata, &path, &previous)?;
    let signers: Vec<&SigningKey> = keys.iter().collect();
    let signed = tuf::resign_targets_changed(&previous, &args.remove, &args.allow_downgrade, expires, &signers)
        .await
        .map_err(|e| InvalidInput(format!("cannot re-sign {}: {e}", path.display())))?;
    review::keep_previous(&args.metadata, &previous)?;
    files::replace_public(&path, &signed)?;
    Ok(status(&path, &targets_of(&path, &signed)?, root.as_ref(), None))
}

fn print_status(dir: &Path, status: &SignatureStatus) {
    if !status.changes.is_empty() {
        if status.compared_with.is_empty() {
            println!(
                "The published version this builds on is not in {}: check every target you signed (all are):",
                dir.display()
            );
        } else {
            println!("What you signed, against the published {}:", status.compared_with);
        }
        for line in &status.changes {
            println!("  {line}");
        }
    }
    if let Some(t) = &status.target {
        println!(
            "Signed {} (model {}, version {}, release {}{}): sha256 {}, {} bytes",
            t.name,
            t.hardware_id,
            t.version,
            t.release_counter,
            if t.downgrade_from.is_empty() {
                String::new()
            } else {
                format!(", may replace releases {:?}", t.downgrade_from)
            },
            t.sha256,
            t.length
        );
    }
    println!(
        "{} is version {} (expires {}) listing {} target(s): {}",
        status.targets_file,
        status.version,
        status.expires,
        status.targets.len(),
        status.targets.join(", ")
    );
    let dir = dir.display();
    match (status.counted, status.threshold) {
        (Some(counted), Some(threshold)) if counted as u64 >= threshold => match &status.target {
            Some(target) => println!(
                "Signatures: {counted} of the {threshold} required. Upload it with:\n  \
                 medfleet firmware upload IMAGE --metadata {dir} --name {}",
                target.name
            ),
            None => println!(
                "Signatures: {counted} of the {threshold} required. Upload the image it adds with\n  \
                 medfleet firmware upload IMAGE --metadata {dir} --name TARGET\n\
                 or, when it only re-signs the stored images (`resign`), publish it with\n  \
                 medfleet firmware metadata publish --metadata {dir}"
            ),
        },
        (Some(counted), Some(threshold)) => println!(
            "Signatures: {counted} of the {threshold} required. {} more targets key holder(s) must run:\n  \
             medfleet firmware countersign --metadata {dir} --key THEIR-TARGETS-KEY.pem",
            threshold - counted as u64
        ),
        _ => println!(
            "Signatures: {} ({}); the threshold is unknown without {dir}/{ROOT_FILE}: get it with \
             `medfleet firmware metadata pull --out {dir}`",
            status.signed_by.len(),
            status.signed_by.join(", ")
        ),
    }
}

pub(super) async fn sign(args: &SignArgs, out: Format) -> anyhow::Result<()> {
    let status = sign_release(args, out == Format::Table).await?;
    if out == Format::Json {
        return output::json(&status);
    }
    print_status(&args.metadata, &status);
    Ok(())
}

pub(super) async fn resign(args: &ResignArgs, out: Format) -> anyhow::Result<()> {
    let status = resign_release(args).await?;
    if out == Format::Json {
        return output::json(&status);
    }
    print_status(&args.metadata, &status);
    Ok(())
}

pub(super) async fn countersign(args: &CountersignArgs, out: Format) -> anyhow::Result<()> {
    let status = countersign_release(args).await?;
    if out == Format::Json {
        return output::json(&status);
    }
    print_status(&args.metadata, &status);
    Ok(())
}
