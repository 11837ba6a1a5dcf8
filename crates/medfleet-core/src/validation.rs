//! Field-level validation that collects every problem of a request instead of stopping at the first.

use std::fmt;

/// One rejected field: a path such as `device.location.bed` and a sentence a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// Every problem found in one request. Empty means the request is valid.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    /// A single violation, for callers that detect one problem on its own.
    pub fn single(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut violations = Self::new();
        violations.push(field, description);
        violations
    }

    pub fn push(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &FieldViolation> {
        self.0.iter()
    }

    /// Records the error of a fallible parse and returns its value, so several fields can be checked in a row.
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(description) => {
                self.push(field, description);
                None
            }
        }
    }

    /// `Ok(value())` when nothing was recorded. The closure runs only then, so it may unwrap the `Option`s that
    /// [`Violations::check`] returned via `Option::zip`/pattern matching without a panic path.
    pub fn finish<T>(self, value: impl FnOnce() -> Option<T>) -> Result<T, Self> {
        if self.is_empty() {
            value().ok_or_else(|| Self::single("request", "invalid request"))
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid request: ")?;
        for (i, violation) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", violation.field, violation.description)?;
        }
        Ok(())
    }
}

/// A short identifier for sites, wards and principals: lowercase ASCII letter first, then lowercase letters,
/// digits and `-`, not ending in `-`, at most 63 characters (a DNS label, so it is safe in URIs and paths).
pub fn check_slug(value: &str) -> Result<(), String> {
    const RULE: &str = "use 1-63 lowercase letters, digits and '-', starting with a letter and not ending with '-'";
    if value.is_empty() {
        return Err(format!("is required; {RULE}"));
    }
    let valid = value.len() <= 63
        && value.starts_with(|c: char| c.is_ascii_lowercase())
        && !value.ends_with('-')
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if valid {
        Ok(())
    } else {
        Err(format!("'{}' is not valid; {RULE}", printable(value)))
    }
}

/// Free text a person reads (display names, manufacturer, model): trimmed, no control characters.
pub fn check_text(value: &str, max_chars: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err("is required".to_owned());
    }
    if value.chars().count() > max_chars {
        return Err(format!("is longer than {max_chars} characters"));
    }
    if value.trim() != value {
        return Err("must not start or end with white space".to_owned());
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    Ok(())
}

/// Echoes user input in an error message without letting it forge lines or run on for pages.
pub fn printable(value: &str) -> String {
    let mut out: String = value
        .chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if value.chars().count() > 64 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slug_rules() {
        for ok in ["a", "stmarys", "icu-2", &"a".repeat(63)] {
            assert_eq!(check_slug(ok), Ok(()), "{ok}");
        }
        for bad in ["", "1abc", "ICU", "icu-", "-icu", "i_cu", "ic u", "é", &"a".repeat(64)] {
            assert!(check_slug(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_rules() {
        assert_eq!(check_text("St Mary's Hospital", 200), Ok(()));
        assert!(check_text("", 200).is_err());
        assert!(check_text(" padded", 200).is_err());
        assert!(check_text("line\nbreak", 200).is_err());
        assert!(check_text(&"x".repeat(201), 200).is_err());
    }

    #[test]
    fn collects_every_violation() {
        let mut v = Violations::new();
        assert_eq!(v.check("a", check_slug("BAD")), None);
        assert_eq!(v.check("b", check_slug("good")), Some(()));
        assert_eq!(v.check("c", check_text("", 10)), None);
        let err = v.finish(|| Some(())).unwrap_err();
        let fields: Vec<_> = err.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["a", "c"]);
        assert!(err.to_string().contains("a: 'BAD' is not valid"));
    }

    #[test]
    fn printable_neutralises_control_characters() {
        assert_eq!(printable("a\nb"), "a?b");
        assert_eq!(printable(&"x".repeat(70)).chars().count(), 65);
    }
}
