//! Files of the data directory that hold key material: written atomically (temporary file, fsync, rename,
//! directory fsync) so a crash never leaves half a key, and private ones read only while no other user can read
//! them.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by other users (mode {mode:o}); a private key must be mode 0600: run `chmod 600 {path}`"
    )]
    InsecureKey { path: PathBuf, mode: u32 },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Makes a rename or removal in `path`'s directory durable.
pub fn sync_dir(path: &Path) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

pub fn read(path: &Path) -> Result<String, FileError> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// Reads a private key file after checking that only its owner can read it.
pub fn read_private(path: &Path) -> Result<String, FileError> {
    let mode = fs::metadata(path).map_err(io_err(path))?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(FileError::InsecureKey {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    read(path)
}

/// Writes a file atomically (temp file + rename) with the given mode, so readers never see half a key.
fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        uuid::Uuid::new_v4().simple()
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(contents.as_bytes()).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    // The rename itself must survive a crash too (a key written then lost would be worse than none).
    sync_dir(path)
}

pub fn write_private(path: &Path, contents: &str) -> Result<(), FileError> {
    write_atomic(path, contents, 0o600)
}

pub fn write_public(path: &Path, contents: &str) -> Result<(), FileError> {
    write_atomic(path, contents, 0o644)
}
