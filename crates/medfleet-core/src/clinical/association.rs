//! Device–patient association periods and patient identifiers. A reading charts to the patient whose
//! association covers its observation time; the periods of one device never overlap, so that patient is unique.

use chrono::{DateTime, Utc};

/// A half-open period `[start, end)`; an open end means "still associated".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start: DateTime<Utc>,
    pub end: Option<DateTime<Utc>>,
}

impl Period {
    pub fn new(start: DateTime<Utc>, end: Option<DateTime<Utc>>) -> Result<Self, String> {
        if let Some(end) = end
            && end <= start
        {
            return Err(format!(
                "the association ends ({end}) before or when it starts ({start})"
            ));
        }
        Ok(Self { start, end })
    }

    pub fn covers(&self, at: DateTime<Utc>) -> bool {
        self.start <= at && self.end.is_none_or(|end| at < end)
    }

    pub fn overlaps(&self, other: &Period) -> bool {
        let starts_before_other_ends = other.end.is_none_or(|end| self.start < end);
        let other_starts_before_self_ends = self.end.is_none_or(|end| other.start < end);
        starts_before_other_ends && other_starts_before_self_ends
    }
}

/// Checks a patient identifier (MRN) and its assigning authority as the EMR sends them. The messages never echo
/// the identifier: it is PHI, and error texts end up in logs.
pub fn check_patient_identifier(identifier: &str, authority: &str) -> Result<(), String> {
    if identifier.trim().is_empty() {
        return Err("the patient identifier is empty".into());
    }
    if identifier.chars().count() > 64 {
        return Err("the patient identifier is longer than 64 characters".into());
    }
    if identifier.chars().any(char::is_control) {
        return Err("the patient identifier contains control characters".into());
    }
    if authority.is_empty() || authority.len() > 64 {
        return Err("the assigning authority must be 1 to 64 characters".into());
    }
    if !authority
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
    {
        return Err(
            "the assigning authority may hold only letters, digits and - _ . : / (a namespace or an OID URN)".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(minute: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + minute * 60, 0).unwrap_or_default()
    }

    #[test]
    fn half_open_periods() {
        let first = Period::new(at(0), Some(at(10))).unwrap();
        let next = Period::new(at(10), None).unwrap();
        assert!(!first.overlaps(&next) && !next.overlaps(&first));
        assert!(first.covers(at(0)) && first.covers(at(9)) && !first.covers(at(10)));
        assert!(next.covers(at(10)) && next.covers(at(100_000)));
        let open = Period::new(at(5), None).unwrap();
        assert!(open.overlaps(&first) && open.overlaps(&next));
        assert!(Period::new(at(3), Some(at(3))).is_err());
    }

    #[test]
    fn identifier_errors_do_not_echo_the_identifier() {
        let error = check_patient_identifier("MRN\u{7}123", "HOSP").unwrap_err();
        assert!(!error.contains("MRN"));
        assert!(check_patient_identifier("MRN123", "urn:oid:1.2.3").is_ok());
        assert!(check_patient_identifier("MRN123", "bad authority").is_err());
    }

    proptest! {
        // Overlap is symmetric and agrees with "some instant is covered by both".
        #[test]
        fn overlap_agrees_with_coverage(a in 0i64..50, alen in prop::option::of(1i64..50), b in 0i64..50, blen in prop::option::of(1i64..50)) {
            let p = Period::new(at(a), alen.map(|l| at(a + l))).unwrap();
            let q = Period::new(at(b), blen.map(|l| at(b + l))).unwrap();
            prop_assert_eq!(p.overlaps(&q), q.overlaps(&p));
            let shared = (0..200).any(|m| p.covers(at(m)) && q.covers(at(m)));
            prop_assert_eq!(p.overlaps(&q), shared);
        }
    }
}
