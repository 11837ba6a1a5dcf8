//! The passphrase that seals the offline root and targets keys at rest (`medfleet_core::firmware::keyfile`):
//! from `MEDFLEET_KEY_PASSPHRASE` for scripts, else asked at the terminal without echo, once per command.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use medfleet_core::firmware::keyfile;

use crate::error::{InvalidInput, UsageError};

/// The environment variable a script sets instead of typing the passphrase.
pub(crate) const ENV: &str = "MEDFLEET_KEY_PASSPHRASE";

/// A passphrase given up front, or asked for the first time a command needs it.
#[derive(Clone, Default)]
pub(crate) struct Passphrase(Arc<OnceLock<String>>);

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

impl Passphrase {
    /// One known already (tests, or read by the caller).
    #[cfg(test)]
    pub(crate) fn given(text: &str) -> Self {
        let cell = OnceLock::new();
        let _ = cell.set(text.to_owned());
        Self(Arc::new(cell))
    }

    fn get(&self, prompt: &str, confirm: bool) -> anyhow::Result<String> {
        if let Some(known) = self.0.get() {
            return Ok(known.clone());
        }
        let text = match std::env::var(ENV) {
            Ok(text) => text,
            Err(_) if std::io::IsTerminal::is_terminal(&std::io::stdin()) => {
                let term = console::Term::stderr();
                eprint!("{prompt}: ");
                let first = term.read_secure_line()?;
                if confirm {
                    eprint!("the same passphrase again: ");
                    if term.read_secure_line()? != first {
                        return Err(UsageError("the two passphrases differ; nothing was written".into()).into());
                    }
                }
                first
            }
            Err(_) => {
                return Err(UsageError(format!(
                    "the offline keys are sealed with a passphrase: run this at a terminal, or set {ENV}"
                ))
                .into());
            }
        };
        Ok(self.0.get_or_init(|| text).clone())
    }

    /// The PKCS#8 text of a key file: opened when sealed, as it is when in clear (with a warning).
    pub(super) fn open(&self, path: &Path, text: &str) -> anyhow::Result<String> {
        if !keyfile::is_sealed(text) {
            eprintln!(
                "warning: {} is a signing key stored in clear; anyone who copies the file can sign firmware",
                path.display()
            );
            return Ok(text.to_owned());
        }
        let passphrase = self.get(&format!("passphrase of {}", path.display()), false)?;
        keyfile::open(text, &passphrase).map_err(|e| InvalidInput(format!("--key {}: {e}", path.display())).into())
    }

    /// `pkcs8_pem` sealed for writing as a new key file.
    pub(super) fn seal(&self, pkcs8_pem: &str) -> anyhow::Result<String> {
        let passphrase = self.get("passphrase for the new keys (at least 12 characters)", true)?;
        let mut salt = [0u8; keyfile::SALT_LEN];
        let mut nonce = [0u8; keyfile::NONCE_LEN];
        let rng = ring::rand::SystemRandom::new();
        ring::rand::SecureRandom::fill(&rng, &mut salt).map_err(|_| anyhow::anyhow!("no system randomness"))?;
        ring::rand::SecureRandom::fill(&rng, &mut nonce).map_err(|_| anyhow::anyhow!("no system randomness"))?;
        keyfile::seal(pkcs8_pem, &passphrase, salt, nonce, keyfile::ITERATIONS)
            .map_err(|e| InvalidInput(format!("{ENV}: {e}")).into())
    }
}
