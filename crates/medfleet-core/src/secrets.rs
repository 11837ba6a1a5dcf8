//! Secrets at rest: a keyring of 256-bit key-encryption keys and the envelope a secret is stored as.
//!
//! A keyring is a text file, one key per line (`KID BASE64KEY`; `#` comments and blank lines are ignored). The
//! first key is the current one: everything sealed from now on uses it. The later lines are older keys, kept so
//! that what they sealed still opens while it is re-encrypted; an operator removes them once nothing uses them.
//!
//! An envelope is `enc:v1:<kid>:<base64 nonce>:<base64 ciphertext and tag>`: AES-256-GCM with a 96-bit nonce
//! and, as associated data, the place the secret belongs to (for example `emr_destination/epic/bearer_token`). The
//! associated data binds a ciphertext to its place: copied into another row or file it does not open.
//!
//! Everything here is pure: the caller supplies the nonce (from a CSPRNG) and does the file I/O, so the format is
//! unit- and property-tested on its own.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use crate::validation::{check_slug, printable};

/// Length of a key-encryption key (AES-256).
pub const KEY_LEN: usize = 32;
/// Length of an envelope's nonce (the 96 bits AES-GCM is specified for).
pub const NONCE_BYTES: usize = NONCE_LEN;
/// What every envelope of this format starts with.
pub const PREFIX: &str = "enc:v1:";

/// One key-encryption key and its id. The key bytes never appear in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    id: String,
    bytes: [u8; KEY_LEN],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Key {
    /// A key with a checked id (lower-case letters, digits and '-', starting with a letter).
    pub fn new(id: &str, bytes: [u8; KEY_LEN]) -> Result<Self, KeyringError> {
        check_slug(id).map_err(KeyringError::InvalidId)?;
        Ok(Self {
            id: id.to_owned(),
            bytes,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn aead(&self) -> LessSafeKey {
        // AES-256-GCM accepts every 32-byte key: the length is fixed by the type.
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.bytes).unwrap_or_else(|_| unreachable!()))
    }
}

/// Why a keyring file cannot be used. Line numbers count from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    #[error("the keyring holds no key; its first line must be `KID BASE64KEY` (medfleetd creates one)")]
    Empty,
    #[error("line {line}: expected `KID BASE64KEY` (a key id, one space, the base64 of 32 random bytes)")]
    Malformed { line: usize },
    #[error("line {line}: the key id {reason}")]
    BadKeyId { line: usize, reason: String },
    #[error("the key id {0}")]
    InvalidId(String),
    #[error("line {line}: the key is not the base64 of exactly 32 bytes (generate one with `openssl rand -base64 32`)")]
    BadKey { line: usize },
    #[error("line {line}: key id '{id}' appears twice; every key needs its own id")]
    DuplicateId { line: usize, id: String },
    #[error("key '{0}' is the current key (the first line); rotate to a new key before retiring it")]
    RetiringCurrent(String),
}

/// The keys medfleetd seals and opens secrets with; the first is the current one.
#[derive(Clone, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys.iter().map(Key::id)).finish()
    }
}

impl Keyring {
    /// A keyring of one (current) key.
    pub fn single(key: Key) -> Self {
        Self { keys: vec![key] }
    }

    /// Reads a keyring file's text.
    pub fn parse(text: &str) -> Result<Self, KeyringError> {
        let mut keys: Vec<Key> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let mut fields = content.split_whitespace();
            let (Some(id), Some(encoded), None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(KeyringError::Malformed { line });
            };
            check_slug(id).map_err(|reason| KeyringError::BadKeyId { line, reason })?;
            let bytes: [u8; KEY_LEN] = STANDARD
                .decode(encoded)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or(KeyringError::BadKey { line })?;
            if keys.iter().any(|k| k.id == id) {
                return Err(KeyringError::DuplicateId {
                    line,
                    id: id.to_owned(),
                });
            }
            keys.push(Key {
                id: id.to_owned(),
                bytes,
            });
        }
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        Ok(Self { keys })
    }

    /// The file text of this keyring: a comment saying what it is, then one key per line, current first.
    pub fn to_text(&self) -> String {
        let mut text = String::from(
            "# medfleet secrets keyring: the first key encrypts, every key decrypts. Keep it out of the database and\n\
             # its backups, mode 0600. Rotate with `medfleetd rotate-secrets-key`.\n",
        );
        for key in &self.keys {
            text.push_str(&key.id);
            text.push(' ');
            text.push_str(&STANDARD.encode(key.bytes));
            text.push('\n');
        }
        text
    }

    /// The key everything is sealed with now.
    pub fn current(&self) -> &Key {
        // Never empty: every constructor refuses an empty keyring.
        &self.keys[0]
    }

    pub fn get(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// Key ids, current first.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(Key::id).collect()
    }

    /// This keyring with `key` as the new current key; the old keys stay for decryption.
    pub fn rotated(&self, key: Key) -> Result<Self, KeyringError> {
        if self.get(&key.id).is_some() {
            return Err(KeyringError::DuplicateId { line: 1, id: key.id });
        }
        let mut keys = Vec::with_capacity(self.keys.len() + 1);
        keys.push(key);
        keys.extend(self.keys.iter().cloned());
        Ok(Self { keys })
    }

    /// This keyring without the (old) key `id`. The current key cannot be retired.
    pub fn without(&self, id: &str) -> Result<Self, KeyringError> {
        if self.current().id == id {
            return Err(KeyringError::RetiringCurrent(id.to_owned()));
        }
        Ok(Self {
            keys: self.keys.iter().filter(|k| k.id != id).cloned().collect(),
        })
    }
}

/// Why an envelope does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the stored secret is not an envelope (expected enc:v1:KID:NONCE:CIPHERTEXT)")]
    Malformed,
    #[error("the stored secret uses envelope format '{0}', which this medfleetd does not know; upgrade medfleetd")]
    UnsupportedVersion(String),
    #[error(
        "the secret is encrypted with key '{kid}', which is not in the secrets keyring (it holds {held}); put the \
         line of key '{kid}' back into the secrets key file and restart, or set the secret again"
    )]
    UnknownKey { kid: String, held: String },
    #[error(
        "the secret does not decrypt with key '{kid}': it was altered or copied from another place; set the secret \
         again"
    )]
    Rejected { kid: String },
}

/// Whether a stored value is an envelope (of any version) rather than a plaintext written by an older medfleetd.
pub fn is_envelope(stored: &str) -> bool {
    stored.starts_with("enc:")
}

/// The key id an envelope of this format was sealed with.
pub fn key_id_of(envelope: &str) -> Option<&str> {
    envelope.strip_prefix(PREFIX)?.split(':').next()
}

/// Seals `plaintext` for `aad` (the secret's place) with `key` and a nonce that must never repeat under it
/// (96 random bits from a CSPRNG per secret).
pub fn seal(key: &Key, nonce: [u8; NONCE_BYTES], aad: &str, plaintext: &[u8]) -> String {
    let mut in_out = plaintext.to_vec();
    // Sealing fails only when the plaintext exceeds AES-GCM's 64 GiB per nonce: never for a secret.
    key.aead()
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_bytes()),
            &mut in_out,
        )
        .unwrap_or_else(|_| unreachable!());
    format!(
        "{PREFIX}{}:{}:{}",
        key.id,
        STANDARD.encode(nonce),
        STANDARD.encode(&in_out)
    )
}

/// Opens an envelope sealed for `aad` with a key of `keyring`.
pub fn open(keyring: &Keyring, aad: &str, envelope: &str) -> Result<Vec<u8>, EnvelopeError> {
    let Some(rest) = envelope.strip_prefix(PREFIX) else {
        return Err(match envelope.strip_prefix("enc:").and_then(|r| r.split(':').next()) {
            Some(version) => EnvelopeError::UnsupportedVersion(printable(version)),
            None => EnvelopeError::Malformed,
        });
    };
    let mut parts = rest.split(':');
    let (Some(kid), Some(nonce), Some(sealed), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(EnvelopeError::Malformed);
    };
    let key = keyring.get(kid).ok_or_else(|| EnvelopeError::UnknownKey {
        kid: printable(kid),
        held: keyring
            .ids()
            .iter()
            .map(|id| format!("'{id}'"))
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let nonce: [u8; NONCE_BYTES] = STANDARD
        .decode(nonce)
        .ok()
        .and_then(|n| n.try_into().ok())
        .ok_or(EnvelopeError::Malformed)?;
    let mut in_out = STANDARD.decode(sealed).map_err(|_| EnvelopeError::Malformed)?;
    let plaintext = key
        .aead()
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_bytes()),
            &mut in_out,
        )
        .map_err(|_| EnvelopeError::Rejected { kid: kid.to_owned() })?;
    Ok(plaintext.to_vec())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(id: &str, byte: u8) -> Key {
        Key::new(id, [byte; KEY_LEN]).unwrap()
    }

    const AAD: &str = "emr_destination/epic/bearer_token";

    #[test]
    fn round_trip_and_key_id() {
        let ring = Keyring::single(key("k1", 7));
        let envelope = seal(ring.current(), [1; NONCE_BYTES], AAD, b"s3cret");
        assert!(envelope.starts_with("enc:v1:k1:"), "{envelope}");
        assert!(!envelope.contains("s3cret"));
        assert_eq!(key_id_of(&envelope), Some("k1"));
        assert!(is_envelope(&envelope) && !is_envelope("s3cret"));
        assert_eq!(open(&ring, AAD, &envelope).unwrap(), b"s3cret");
    }

    #[test]
    fn an_old_key_still_opens_after_rotation_and_a_retired_one_does_not() {
        let old = Keyring::single(key("k1", 7));
        let envelope = seal(old.current(), [2; NONCE_BYTES], AAD, b"token");
        let rotated = old.rotated(key("k2", 9)).unwrap();
        assert_eq!(rotated.current().id(), "k2");
        assert_eq!(rotated.ids(), ["k2", "k1"]);
        assert_eq!(open(&rotated, AAD, &envelope).unwrap(), b"token");
        let retired = rotated.without("k1").unwrap();
        let err = open(&retired, AAD, &envelope).unwrap_err();
        assert_eq!(
            err,
            EnvelopeError::UnknownKey {
                kid: "k1".into(),
                held: "'k2'".into()
            }
        );
        assert!(err.to_string().contains("put the line of key 'k1' back"), "{err}");
        assert_eq!(
            rotated.without("k2").unwrap_err(),
            KeyringError::RetiringCurrent("k2".into())
        );
        assert!(matches!(
            rotated.rotated(key("k1", 1)),
            Err(KeyringError::DuplicateId { .. })
        ));
    }

    #[test]
    fn same_id_other_bytes_is_rejected_not_garbage() {
        let envelope = seal(&key("k1", 7), [3; NONCE_BYTES], AAD, b"token");
        let impostor = Keyring::single(key("k1", 8));
        assert_eq!(
            open(&impostor, AAD, &envelope).unwrap_err(),
            EnvelopeError::Rejected { kid: "k1".into() }
        );
    }

    #[test]
    fn malformed_and_unknown_versions() {
        let ring = Keyring::single(key("k1", 7));
        for bad in [
            "",
            "plain",
            "enc:v1:",
            "enc:v1:k1:AAAA",
            "enc:v1:k1:!!:AAAA",
            "enc:v1:k1:AAAA:BBBB:CCCC",
        ] {
            assert!(matches!(open(&ring, AAD, bad), Err(EnvelopeError::Malformed)), "{bad}");
        }
        assert_eq!(
            open(&ring, AAD, "enc:v9:k1:AAAA:BBBB").unwrap_err(),
            EnvelopeError::UnsupportedVersion("v9".into())
        );
    }

    #[test]
    fn keyring_file_round_trips_and_names_bad_lines() {
        let ring = Keyring::single(key("k1", 7)).rotated(key("k2", 9)).unwrap();
        let text = ring.to_text();
        assert_eq!(Keyring::parse(&text).unwrap(), ring);
        assert!(!format!("{ring:?}").contains(&STANDARD.encode([9u8; KEY_LEN])));
        let good = STANDARD.encode([1u8; KEY_LEN]);
        for (text, expected) in [
            ("# nothing\n\n".to_owned(), KeyringError::Empty),
            ("k1\n".to_owned(), KeyringError::Malformed { line: 1 }),
            (format!("\nk1 {good} extra\n"), KeyringError::Malformed { line: 2 }),
            ("k1 c2hvcnQ=\n".to_owned(), KeyringError::BadKey { line: 1 }),
            (
                format!("k1 {good}\nk1 {good}\n"),
                KeyringError::DuplicateId {
                    line: 2,
                    id: "k1".into(),
                },
            ),
        ] {
            assert_eq!(Keyring::parse(&text).unwrap_err(), expected, "{text}");
        }
        assert!(matches!(
            Keyring::parse(&format!("K_1 {good}")),
            Err(KeyringError::BadKeyId { line: 1, .. })
        ));
    }

    proptest! {
        #[test]
        fn sealed_secrets_open_only_in_their_place(
            plaintext in proptest::collection::vec(any::<u8>(), 0..512),
            aad in "[a-z_/]{1,40}",
            other in "[a-z_/]{1,40}",
            nonce in any::<[u8; NONCE_BYTES]>(),
            byte in any::<u8>(),
        ) {
            let ring = Keyring::single(key("k1", byte));
            let envelope = seal(ring.current(), nonce, &aad, &plaintext);
            prop_assert_eq!(open(&ring, &aad, &envelope).unwrap(), plaintext.clone());
            if other != aad {
                prop_assert_eq!(
                    open(&ring, &other, &envelope).unwrap_err(),
                    EnvelopeError::Rejected { kid: "k1".into() }
                );
            }
        }

        #[test]
        fn any_altered_byte_is_detected(
            plaintext in proptest::collection::vec(any::<u8>(), 1..128),
            position in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let ring = Keyring::single(key("k1", 5));
            let envelope = seal(ring.current(), [4; NONCE_BYTES], AAD, &plaintext);
            let sealed = envelope.rsplit(':').next().unwrap();
            let mut bytes = STANDARD.decode(sealed).unwrap();
            let at = position.index(bytes.len());
            bytes[at] ^= flip;
            let head = &envelope[..envelope.len() - sealed.len()];
            let altered = format!("{head}{}", STANDARD.encode(&bytes));
            prop_assert_eq!(
                open(&ring, AAD, &altered).unwrap_err(),
                EnvelopeError::Rejected { kid: "k1".into() }
            );
        }
    }
}
