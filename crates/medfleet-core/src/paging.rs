//! Opaque, filter-bound page tokens for keyset pagination.
//!
//! A token carries the sort key of the last item returned and a fingerprint of the listing's filters. Keyset
//! paging (`WHERE key > last ORDER BY key`) stays stable when rows are added or removed between pages: nothing
//! is returned twice and nothing that existed throughout is skipped.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

pub const DEFAULT_PAGE_SIZE: u64 = 50;
pub const MAX_PAGE_SIZE: u64 = 500;

/// Page size from the request: 0 means the default, larger than the maximum is capped (AIP-158).
pub fn page_size(requested: i32) -> Result<u64, String> {
    match u64::try_from(requested) {
        Err(_) => Err("must not be negative".to_owned()),
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(n) => Ok(n.min(MAX_PAGE_SIZE)),
    }
}

/// Encodes the position after `last_key` for a listing with the given filter fingerprint.
pub fn encode_token(last_key: &str, fingerprint: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("v1\n{}\n{last_key}", fingerprint_hash(fingerprint)))
}

/// The last key of the previous page, or `None` for the first page.
pub fn decode_token(token: &str, fingerprint: &str) -> Result<Option<String>, String> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || "is not a page token from this listing; start again without page_token".to_owned();
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let mut parts = text.splitn(3, '\n');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("v1"), Some(hash), Some(key)) if hash == fingerprint_hash(fingerprint) => Ok(Some(key.to_owned())),
        (Some("v1"), Some(_), Some(_)) => {
            Err("was issued for different filters; repeat the same filters or start without page_token".to_owned())
        }
        _ => Err(invalid()),
    }
}

// FNV-1a: a stable, dependency-free digest; tokens are not secrets, only a guard against misuse.
fn fingerprint_hash(fingerprint: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in fingerprint.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(page_size(0), Ok(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(7), Ok(7));
        assert_eq!(page_size(100_000), Ok(MAX_PAGE_SIZE));
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn token_bound_to_filters() {
        let t = encode_token("abc", "site=a");
        assert_eq!(decode_token(&t, "site=a"), Ok(Some("abc".into())));
        assert!(decode_token(&t, "site=b").is_err());
        assert!(decode_token("garbage!", "site=a").is_err());
        assert_eq!(decode_token("", "x"), Ok(None));
    }

    proptest! {
        #[test]
        fn round_trip(key in ".*", fp in ".*") {
            prop_assert_eq!(decode_token(&encode_token(&key, &fp), &fp), Ok(Some(key)));
        }
    }
}
