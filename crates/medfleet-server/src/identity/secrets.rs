//! The key-encryption keyring (`secrets_key_file`) and sealing with it: destination secrets in the database and
//! the CA key on disk are stored only as envelopes (`medfleet_core::secrets`), under a key kept outside the
//! database.
//!
//! The file is created (0600) by `medfleetd init`, or at the first start of a data directory that has nothing
//! sealed yet (an upgrade from a version that kept secrets in clear). Once something is sealed, a missing file is
//! an error that says what to restore: creating a fresh key then would make every sealed secret unreadable.
//! Rotation prepends a new key (`medfleetd rotate-secrets-key`); each replica re-encrypts at start
//! ([`crate::emr::destinations::reseal`], [`crate::identity::data_dir::DataDir::protect_ca_key`]), and old keys are retired once
//! nothing uses them ([`retire_unused`]).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use medfleet_core::secrets::{self as envelope, EnvelopeError, KEY_LEN, Key, Keyring, KeyringError, NONCE_BYTES};
use ring::rand::{SecureRandom as _, SystemRandom};

use crate::identity::files::{self, FileError};

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("secrets key file {path}: {source}")]
    Keyring {
        path: PathBuf,
        #[source]
        source: KeyringError,
    },
    #[error(
        "secrets key file {path} does not exist, but {sealed} is sealed with key '{kid}': restore the key file from \
         where you keep it (or point secrets_key_file / MEDFLEET_SECRETS_KEY_FILE at it); a new key could not open \
         what is sealed"
    )]
    Missing { path: PathBuf, sealed: String, kid: String },
    #[error("the system random number generator failed")]
    Random,
}

/// Reads the keyring, refusing a file other users could read (like every private key of medfleetd).
pub fn load(path: &Path) -> Result<Keyring, SecretsError> {
    let text = files::read_private(path)?;
    Keyring::parse(&text).map_err(|source| SecretsError::Keyring {
        path: path.to_owned(),
        source,
    })
}

/// A new key with a recognisable, unique id: `k` + the UTC date + 4 random hex digits.
pub fn new_key(rng: &SystemRandom) -> Result<Key, SecretsError> {
    let mut bytes = [0u8; KEY_LEN];
    rng.fill(&mut bytes).map_err(|_| SecretsError::Random)?;
    let mut tag = [0u8; 2];
    rng.fill(&mut tag).map_err(|_| SecretsError::Random)?;
    let id = format!("k{}-{:02x}{:02x}", chrono::Utc::now().format("%Y%m%d"), tag[0], tag[1]);
    Key::new(&id, bytes).map_err(|source| SecretsError::Keyring {
        path: PathBuf::new(),
        source,
    })
}

/// Creates a keyring file with one fresh key; an existing file is kept and read instead.
pub fn create(path: &Path) -> Result<Keyring, SecretsError> {
    if path.exists() {
        return load(path);
    }
    let keyring = Keyring::single(new_key(&SystemRandom::new())?);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::create_dir_all(dir).map_err(|source| FileError::Io {
            path: dir.to_owned(),
            source,
        })?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| FileError::Io {
            path: dir.to_owned(),
            source,
        })?;
    }
    files::write_private(path, &keyring.to_text())?;
    tracing::info!(path = %path.display(), kid = keyring.current().id(), "created the secrets keyring");
    Ok(keyring)
}

/// Prepends a new current key to the keyring file (the old keys stay, for decryption). Returns the new keyring.
pub fn rotate(path: &Path) -> Result<Keyring, SecretsError> {
    let keyring = load(path)?;
    let rotated = keyring
        .rotated(new_key(&SystemRandom::new())?)
        .map_err(|source| SecretsError::Keyring {
            path: path.to_owned(),
            source,
        })?;
    files::write_private(path, &rotated.to_text())?;
    Ok(rotated)
}

/// Removes every old key whose id is not in `in_use` from the keyring file; returns the retired ids.
pub fn retire_unused(path: &Path, in_use: &BTreeSet<String>) -> Result<Vec<String>, SecretsError> {
    let mut keyring = load(path)?;
    let current = keyring.current().id().to_owned();
    let retired: Vec<String> = keyring
        .ids()
        .into_iter()
        .filter(|id| *id != current && !in_use.contains(*id))
        .map(str::to_owned)
        .collect();
    for id in &retired {
        keyring = keyring.without(id).map_err(|source| SecretsError::Keyring {
            path: path.to_owned(),
            source,
        })?;
    }
    if !retired.is_empty() {
        files::write_private(path, &keyring.to_text())?;
    }
    Ok(retired)
}

/// The keyring of a running replica, and a CSPRNG for nonces.
pub struct Secrets {
    keyring: Keyring,
    rng: SystemRandom,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("keys", &self.keyring)
            .finish_non_exhaustive()
    }
}

impl Secrets {
    pub fn new(keyring: Keyring) -> Self {
        Self {
            keyring,
            rng: SystemRandom::new(),
        }
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    pub fn current_kid(&self) -> &str {
        self.keyring.current().id()
    }

    /// Seals `plaintext` for the place `aad` under the current key, with a fresh random nonce.
    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> Result<String, SecretsError> {
        let mut nonce = [0u8; NONCE_BYTES];
        self.rng.fill(&mut nonce).map_err(|_| SecretsError::Random)?;
        Ok(envelope::seal(self.keyring.current(), nonce, aad, plaintext))
    }

    pub fn open(&self, aad: &str, sealed: &str) -> Result<Vec<u8>, EnvelopeError> {
        envelope::open(&self.keyring, aad, sealed)
    }

    /// Opens an envelope holding text.
    pub fn open_text(&self, aad: &str, sealed: &str) -> Result<String, EnvelopeError> {
        String::from_utf8(self.open(aad, sealed)?).map_err(|_| EnvelopeError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_rotate_retire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/secrets.key");
        let first = create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(create(&path).unwrap(), first, "an existing keyring is kept");
        let rotated = rotate(&path).unwrap();
        assert_eq!(rotated.ids().len(), 2);
        assert_eq!(rotated.ids()[1], first.current().id());
        assert_eq!(load(&path).unwrap(), rotated);
        let in_use: BTreeSet<String> = [first.current().id().to_owned()].into();
        assert!(retire_unused(&path, &in_use).unwrap().is_empty());
        let retired = retire_unused(&path, &BTreeSet::new()).unwrap();
        assert_eq!(retired, [first.current().id()]);
        assert_eq!(load(&path).unwrap().ids(), [rotated.current().id()]);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn seals_with_fresh_nonces() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Secrets::new(create(&dir.path().join("secrets.key")).unwrap());
        let a = secrets.seal("x", b"same").unwrap();
        let b = secrets.seal("x", b"same").unwrap();
        assert_ne!(a, b);
        assert_eq!(secrets.open_text("x", &a).unwrap(), "same");
    }
}
