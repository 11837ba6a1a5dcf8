//! The local files of the firmware commands: private keys written 0600 atomically and never over an existing file,
//! metadata written atomically (a reader never sees half a targets.json), keys read with a warning when other users
//! can read them, and SHA-256 of an image streamed from disk with a progress bar for big files.

use super::passphrase::Passphrase;
use std::fs::{DirBuilder, File, Permissions};
use std::io::{ErrorKind, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use medfleet_core::digest::hex;
use medfleet_core::firmware::tuf::SigningKey;

use crate::error::{InvalidInput, UsageError};

/// Images at least this big get a progress bar while they are hashed.
const PROGRESS_FROM: u64 = 16 * 1024 * 1024;
const BLOCK: usize = 1024 * 1024;

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."))
}

fn write_error(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot write {}: {e}", path.display())
}

/// Writes `contents` to a new temporary file beside `path` with `mode`, synced, and returns it for persisting.
fn staged(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<tempfile::NamedTempFile> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut file = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .permissions(Permissions::from_mode(mode))
        .tempfile_in(parent(path))
        .map_err(|e| write_error(path, e))?;
    file.write_all(contents).map_err(|e| write_error(path, e))?;
    file.as_file().sync_all().map_err(|e| write_error(path, e))?;
    Ok(file)
}

/// Creates `path` with `contents` atomically, refusing if anything exists there (never a replaced key).
fn create_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    staged(path, contents, mode)?.persist_noclobber(path).map_err(|e| {
        if e.error.kind() == ErrorKind::AlreadyExists {
            UsageError(format!(
                "{} exists already; nothing is ever overwritten",
                path.display()
            ))
            .into()
        } else {
            write_error(path, e.error)
        }
    })?;
    Ok(())
}

/// A private key file: created 0600, atomically, never over an existing file.
pub(super) fn create_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    create_new(path, contents.as_bytes(), 0o600)
}

/// A metadata file that must not replace one (the first root.json).
pub(super) fn create_public(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    create_new(path, contents, 0o644)
}

/// A metadata file replaced atomically.
pub(super) fn replace_public(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    staged(path, contents, 0o644)?
        .persist(path)
        .map_err(|e| write_error(path, e.error))?;
    Ok(())
}

/// A directory only its owner can enter (for keys); an existing one is kept as it is.
pub(super) fn private_dir(path: &Path) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))
}

pub(super) fn create_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))
}

/// A file the command was given: one that cannot be read is a usage error (`--flag` names it).
pub(super) fn read(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| UsageError(format!("cannot read {flag} {}: {e}", path.display())).into())
}

/// A metadata file in a directory, if it is there.
pub(super) fn read_optional(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(UsageError(format!("cannot read {}: {e}", path.display())).into()),
    }
}

/// Whether anything (a file, a directory, a dangling symlink) is at `path`.
pub(super) fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// The signing keys of `--key` files, each once. Their contents are never printed, not even in errors.
pub(super) fn read_keys(paths: &[PathBuf], passphrase: &Passphrase) -> anyhow::Result<Vec<SigningKey>> {
    let mut keys: Vec<SigningKey> = Vec::new();
    for path in paths {
        let bytes = read("--key", path)?;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            eprintln!(
                "warning: {} is a private key readable by other users; run: chmod 600 {}",
                path.display(),
                path.display()
            );
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| InvalidInput(format!("--key {}: not a PEM private key", path.display())))?;
        let text = passphrase.open(path, &text)?;
        let key =
            SigningKey::from_pem(&text).map_err(|e| InvalidInput(format!("--key {}: {}", path.display(), e.detail)))?;
        if keys.iter().all(|k| k.id() != key.id()) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// An image's SHA-256 (lower-case hex) and length, read in 1 MiB blocks; `progress` shows a bar for big images.
pub(super) fn hash_image(path: &Path, progress: bool) -> anyhow::Result<(String, u64)> {
    let mut file = File::open(path).map_err(|e| UsageError(format!("cannot read {}: {e}", path.display())))?;
    let total = file.metadata().map_or(0, |m| m.len());
    let bar = if progress && total >= PROGRESS_FROM {
        bar(total, "hashing")
    } else {
        ProgressBar::hidden()
    };
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; BLOCK];
    let mut length = 0u64;
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        };
        context.update(&buffer[..n]);
        length += n as u64;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok((hex(context.finish().as_ref()), length))
}

/// A byte progress bar on stderr (hidden when stderr is not a terminal).
pub(super) fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:10} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root-1.pem");
        create_private(&path, "secret").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let error = create_private(&path, "other").unwrap_err();
        assert!(error.downcast_ref::<UsageError>().is_some(), "{error}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "secret");
        // Nothing staged is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn images_hash_like_the_one_shot_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.img");
        let image: Vec<u8> = (0..3 * BLOCK + 17).map(|i| u8::try_from(i % 251).unwrap()).collect();
        std::fs::write(&path, &image).unwrap();
        let (sha256, length) = hash_image(&path, false).unwrap();
        assert_eq!(sha256, medfleet_core::digest::sha256_hex(&image));
        assert_eq!(length, image.len() as u64);
    }
}
