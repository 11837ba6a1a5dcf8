//! Offline signing keys at rest: a TUF root or targets key (PKCS#8 PEM) sealed under its holder's passphrase, so a
//! lost USB stick or a copied backup is not a signing key. PBKDF2-HMAC-SHA256 derives a 256-bit key from the
//! passphrase and a random salt; AES-256-GCM seals the PKCS#8 text, the format tag bound as associated data.
//!
//! The file is one PEM block `MEDFLEET ENCRYPTED TUF KEY` whose body is `MFK1 | iterations (u32 BE) | salt (16) |
//! nonce (12) | ciphertext and tag`. Pure: the caller supplies salt and nonce (from a CSPRNG) and does the I/O.

use std::num::NonZeroU32;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::pbkdf2;

/// The PEM label of a sealed key.
pub const LABEL: &str = "MEDFLEET ENCRYPTED TUF KEY";
/// PBKDF2 rounds for keys sealed now (OWASP's figure for PBKDF2-HMAC-SHA256).
pub const ITERATIONS: u32 = 600_000;
/// The fewest a file may state (weaker files are refused rather than opened), and the most (a hostile file must
/// not keep the CPU busy for hours).
const MIN_ITERATIONS: u32 = 100_000;
const MAX_ITERATIONS: u32 = 10_000_000;
/// The shortest passphrase a new key is sealed with.
pub const MIN_PASSPHRASE: usize = 12;
pub const SALT_LEN: usize = 16;
pub const NONCE_LEN: usize = 12;
const MAGIC: &[u8; 4] = b"MFK1";
const HEADER: usize = 4 + 4 + SALT_LEN + NONCE_LEN;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    #[error("the passphrase is wrong, or the key file was changed")]
    WrongPassphrase,
    #[error("a passphrase needs at least {MIN_PASSPHRASE} characters")]
    WeakPassphrase,
    #[error("not a sealed medfleet key: {0}")]
    Malformed(String),
}

/// Whether `text` is a sealed key (rather than a PKCS#8 key in clear).
pub fn is_sealed(text: &str) -> bool {
    text.contains(&format!("-----BEGIN {LABEL}-----"))
}

fn derive(passphrase: &str, salt: &[u8], iterations: u32) -> Result<LessSafeKey, KeyFileError> {
    let rounds = NonZeroU32::new(iterations).ok_or_else(|| KeyFileError::Malformed("zero iterations".into()))?;
    let mut key = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        rounds,
        salt,
        passphrase.as_bytes(),
        &mut key,
    );
    let unbound = UnboundKey::new(&AES_256_GCM, &key).map_err(|_| KeyFileError::Malformed("key length".into()))?;
    Ok(LessSafeKey::new(unbound))
}

/// `pkcs8_pem` sealed under `passphrase`.
pub fn seal(
    pkcs8_pem: &str,
    passphrase: &str,
    salt: [u8; SALT_LEN],
    nonce: [u8; NONCE_LEN],
    iterations: u32,
) -> Result<String, KeyFileError> {
    if passphrase.chars().count() < MIN_PASSPHRASE {
        return Err(KeyFileError::WeakPassphrase);
    }
    let key = derive(passphrase, &salt, iterations)?;
    let mut body = Vec::with_capacity(HEADER + pkcs8_pem.len() + 16);
    body.extend_from_slice(MAGIC);
    body.extend_from_slice(&iterations.to_be_bytes());
    body.extend_from_slice(&salt);
    body.extend_from_slice(&nonce);
    let mut sealed = pkcs8_pem.as_bytes().to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(MAGIC), &mut sealed)
        .map_err(|_| KeyFileError::Malformed("sealing failed".into()))?;
    body.extend_from_slice(&sealed);
    let encoded = STANDARD.encode(&body);
    let lines: Vec<String> = encoded
        .as_bytes()
        .chunks(64)
        .map(|line| String::from_utf8_lossy(line).into_owned())
        .collect();
    Ok(format!(
        "-----BEGIN {LABEL}-----\n{}\n-----END {LABEL}-----\n",
        lines.join("\n")
    ))
}

/// The PKCS#8 PEM inside a sealed key.
pub fn open(text: &str, passphrase: &str) -> Result<String, KeyFileError> {
    let begin = format!("-----BEGIN {LABEL}-----");
    let encoded: String = text
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != begin)
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let body = STANDARD
        .decode(encoded)
        .map_err(|e| KeyFileError::Malformed(format!("the PEM body is not base64: {e}")))?;
    if body.len() < HEADER + 16 || &body[..4] != MAGIC {
        return Err(KeyFileError::Malformed("unknown format or truncated".into()));
    }
    let iterations = u32::from_be_bytes([body[4], body[5], body[6], body[7]]);
    if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
        return Err(KeyFileError::Malformed(format!(
            "{iterations} key-derivation rounds is outside {MIN_ITERATIONS}–{MAX_ITERATIONS}"
        )));
    }
    let salt = &body[8..8 + SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&body[8 + SALT_LEN..HEADER]);
    let key = derive(passphrase, salt, iterations)?;
    let mut sealed = body[HEADER..].to_vec();
    let plain = key
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(MAGIC), &mut sealed)
        .map_err(|_| KeyFileError::WrongPassphrase)?;
    String::from_utf8(plain.to_vec()).map_err(|_| KeyFileError::Malformed("the sealed key is not text".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";

    #[test]
    fn a_sealed_key_opens_only_with_its_passphrase() {
        let sealed = seal(
            PEM,
            "correct horse battery",
            [7; SALT_LEN],
            [9; NONCE_LEN],
            MIN_ITERATIONS,
        )
        .unwrap();
        assert!(is_sealed(&sealed));
        assert!(!is_sealed(PEM));
        assert!(!sealed.contains("MC4CAQAw"), "the key is not in clear");
        assert_eq!(open(&sealed, "correct horse battery").unwrap(), PEM);
        assert_eq!(
            open(&sealed, "correct horse batterz"),
            Err(KeyFileError::WrongPassphrase)
        );
        assert_eq!(
            seal(PEM, "short", [7; SALT_LEN], [9; NONCE_LEN], MIN_ITERATIONS),
            Err(KeyFileError::WeakPassphrase)
        );
    }

    #[test]
    fn a_changed_or_hostile_file_is_refused() {
        let sealed = seal(
            PEM,
            "correct horse battery",
            [1; SALT_LEN],
            [2; NONCE_LEN],
            MIN_ITERATIONS,
        )
        .unwrap();
        let body: String = sealed.lines().filter(|l| !l.starts_with("-----")).collect();
        let mut bytes = STANDARD.decode(&body).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let tampered = format!(
            "-----BEGIN {LABEL}-----\n{}\n-----END {LABEL}-----\n",
            STANDARD.encode(&bytes)
        );
        assert_eq!(
            open(&tampered, "correct horse battery"),
            Err(KeyFileError::WrongPassphrase)
        );
        // A file asking for billions of rounds is refused before any are run.
        bytes[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        let greedy = format!(
            "-----BEGIN {LABEL}-----\n{}\n-----END {LABEL}-----\n",
            STANDARD.encode(&bytes)
        );
        assert!(matches!(
            open(&greedy, "correct horse battery"),
            Err(KeyFileError::Malformed(_))
        ));
        assert!(matches!(
            open("junk", "correct horse battery"),
            Err(KeyFileError::Malformed(_))
        ));
    }
}
