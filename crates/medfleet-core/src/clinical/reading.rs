//! Validation of one reading item as a device sends it: the code and unit are normalised to a [`Vital`], the
//! value is checked against IEEE 11073 special values and a plausible range, the observation time against the
//! clock (neither too far ahead nor too old). Each refusal carries a reason a biomedical engineer can act on;
//! nothing refused is ever charted.

use chrono::{DateTime, Duration, Utc};

use super::alarm::AlarmLimits;
use super::codes::{Vital, parse_mdc_code};

/// The longest code (in characters) an item may carry: every form medfleet understands (a decimal MDC code, a
/// REFID, an MDIL pair) is far shorter, so a longer one is refused rather than cut to something that might parse.
pub const MAX_CODE_CHARS: usize = 64;
/// The longest unit (in characters) an item may carry, for the same reason.
pub const MAX_UNIT_CHARS: usize = 32;

/// How old an observation may be when it arrives, unless the caller says otherwise. A device buffers readings
/// while it cannot reach medfleet (store and forward); 30 days covers any outage or a device shelved with a
/// full buffer, while a time older than that is a device clock that was never set (1970, or garbage such as
/// years before 4713 BC that the database cannot even store and that would fail the whole group commit).
pub const DEFAULT_MAX_AGE: Duration = Duration::days(30);

/// IEEE 11073-20601 FLOAT-Type special values (mantissa with exponent 0). A device that sends one means "no
/// number", and medfleet must never chart it as one.
pub const SPECIAL_NAN: f64 = 8_388_607.0;
pub const SPECIAL_NRES: f64 = 8_388_608.0;
pub const SPECIAL_POS_INF: f64 = 8_388_606.0;
pub const SPECIAL_NEG_INF: f64 = 8_388_610.0;
/// The reserved value some devices emit for the 16-bit SFLOAT NaN (0x07FF).
pub const SPECIAL_SFLOAT_NAN: f64 = 2_047.0;

/// How the device qualified a measurement (a subset of 11073 MeasurementStatus).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quality {
    /// The device itself flags the value as invalid or unavailable.
    pub invalid: bool,
    /// The device doubts the value (artefact suspected); it is charted, marked as such.
    pub questionable: bool,
    /// Test, demo or calibration data: never belongs in a patient's chart.
    pub test_data: bool,
}

/// A reading item as received, before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingInput {
    pub code: String,
    pub value: f64,
    pub unit: String,
    /// `None` when the device did not say; such an item is refused (arrival time is not observation time).
    pub observed_at: Option<DateTime<Utc>>,
    pub quality: Quality,
}

/// A reading that passed validation: canonical vital, value in the vital's canonical unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub vital: Vital,
    pub value: f64,
    pub observed_at: DateTime<Utc>,
    pub questionable: bool,
}

/// Why an item was refused. The display text goes back to the device in its ack.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadingRejection {
    #[error("unknown code {0:?}: not one of the vital signs medfleet charts (MDC numeric code, REFID or MDIL hex)")]
    UnknownCode(String),
    #[error("unit {unit:?} does not match {vital}; expected {expected} (UCUM) or MDC unit {mdc_unit}")]
    WrongUnit {
        vital: Vital,
        unit: String,
        expected: &'static str,
        mdc_unit: u32,
    },
    #[error("{vital}: the device sent the 11073 special value {name} ({value}), not a measurement")]
    SpecialValue {
        vital: Vital,
        name: &'static str,
        value: f64,
    },
    #[error("{vital}: value is not a finite number")]
    NotFinite { vital: Vital },
    #[error("{vital}: {value} is outside the plausible range {low}..={high}")]
    Implausible {
        vital: Vital,
        value: f64,
        low: f64,
        high: f64,
    },
    #[error(
        "observation time {observed_at} is {ahead_secs} s in the future (tolerance {tolerance_secs} s); check the device clock"
    )]
    FromTheFuture {
        observed_at: DateTime<Utc>,
        ahead_secs: i64,
        tolerance_secs: i64,
    },
    #[error(
        "observation time {observed_at} is {age_secs} s old, older than the {max_age_secs} s medfleet accepts; \
         check the device clock"
    )]
    TooOld {
        observed_at: DateTime<Utc>,
        age_secs: i64,
        max_age_secs: i64,
    },
    #[error("{field} is {chars} characters long; at most {max} are accepted")]
    FieldTooLong {
        /// `code` or `unit`.
        field: &'static str,
        chars: usize,
        max: usize,
    },
    #[error("the item has no observation time; the patient association is resolved at that time")]
    MissingTime,
    #[error("the device marked the value invalid or unavailable")]
    MarkedInvalid,
    #[error("test, demo or calibration data is never charted")]
    TestData,
}

impl ReadingRejection {
    /// A stable machine-readable reason (for metrics labels and the ack), with no patient data in it.
    pub fn code(&self) -> &'static str {
        match self {
            ReadingRejection::UnknownCode(_) => "unknown_code",
            ReadingRejection::WrongUnit { .. } => "wrong_unit",
            ReadingRejection::SpecialValue { .. } => "special_value",
            ReadingRejection::NotFinite { .. } => "not_finite",
            ReadingRejection::Implausible { .. } => "implausible",
            ReadingRejection::FromTheFuture { .. } => "future_time",
            ReadingRejection::TooOld { .. } => "too_old",
            ReadingRejection::FieldTooLong { .. } => "field_too_long",
            ReadingRejection::MissingTime => "missing_time",
            ReadingRejection::MarkedInvalid => "marked_invalid",
            ReadingRejection::TestData => "test_data",
        }
    }
}

fn special_value_name(value: f64) -> Option<&'static str> {
    // Exact comparisons: the special values are integers that the wire carries exactly.
    #[allow(clippy::float_cmp)]
    let name = if value == SPECIAL_NAN || value == SPECIAL_SFLOAT_NAN {
        "NaN"
    } else if value == SPECIAL_NRES {
        "NRes"
    } else if value == SPECIAL_POS_INF {
        "+INF"
    } else if value == SPECIAL_NEG_INF {
        "-INF"
    } else {
        return None;
    };
    Some(name)
}

/// Validates one item against the clock `now`, accepting observation times up to `future_tolerance` ahead and
/// up to [`DEFAULT_MAX_AGE`] old.
pub fn validate(
    input: &ReadingInput,
    now: DateTime<Utc>,
    future_tolerance: Duration,
) -> Result<Reading, ReadingRejection> {
    validate_with_max_age(input, now, future_tolerance, DEFAULT_MAX_AGE)
}

/// [`validate`] with the oldest acceptable observation time `now - max_age` chosen by the caller.
pub fn validate_with_max_age(
    input: &ReadingInput,
    now: DateTime<Utc>,
    future_tolerance: Duration,
    max_age: Duration,
) -> Result<Reading, ReadingRejection> {
    // Checked first: an oversized field is refused as such, not as whatever a cut-down copy would parse to.
    for (field, text, max) in [
        ("code", &input.code, MAX_CODE_CHARS),
        ("unit", &input.unit, MAX_UNIT_CHARS),
    ] {
        let chars = text.chars().count();
        if chars > max {
            return Err(ReadingRejection::FieldTooLong { field, chars, max });
        }
    }
    let vital = parse_mdc_code(&input.code)
        .and_then(Vital::from_mdc)
        .ok_or_else(|| ReadingRejection::UnknownCode(input.code.chars().take(64).collect()))?;
    if input.quality.test_data {
        return Err(ReadingRejection::TestData);
    }
    if input.quality.invalid {
        return Err(ReadingRejection::MarkedInvalid);
    }
    let info = vital.info();
    if !vital.accepts_unit(&input.unit) {
        return Err(ReadingRejection::WrongUnit {
            vital,
            unit: input.unit.chars().take(32).collect(),
            expected: info.ucum,
            mdc_unit: info.mdc_unit_code,
        });
    }
    if !input.value.is_finite() {
        return Err(ReadingRejection::NotFinite { vital });
    }
    // SFLOAT NaN (2047) is only special where no real value can be 2047; every vital here qualifies, and the
    // plausible range would refuse it anyway, but the reason should say what the device meant.
    if let Some(name) = special_value_name(input.value) {
        return Err(ReadingRejection::SpecialValue {
            vital,
            name,
            value: input.value,
        });
    }
    let (low, high) = info.plausible;
    if !(low..=high).contains(&input.value) {
        return Err(ReadingRejection::Implausible {
            vital,
            value: input.value,
            low,
            high,
        });
    }
    let observed_at = input.observed_at.ok_or(ReadingRejection::MissingTime)?;
    let ahead = observed_at - now;
    if ahead > future_tolerance {
        return Err(ReadingRejection::FromTheFuture {
            observed_at,
            ahead_secs: ahead.num_seconds(),
            tolerance_secs: future_tolerance.num_seconds(),
        });
    }
    // Per item, here, because the database refuses some of these times outright and one such row would fail the
    // commit of every batch grouped with it.
    let age = now - observed_at;
    if age > max_age {
        return Err(ReadingRejection::TooOld {
            observed_at,
            age_secs: age.num_seconds(),
            max_age_secs: max_age.num_seconds(),
        });
    }
    Ok(Reading {
        vital,
        value: input.value,
        observed_at,
        questionable: input.quality.questionable,
    })
}

/// Whether `value` breaches the default adult alarm limits ([`AlarmLimits::ADULT`]). A device whose
/// configuration sets limits (neonatal, paediatric) needs [`AlarmLimits::from_config`] and
/// [`AlarmLimits::breaches`] instead; this stays for callers that have no configuration at hand.
pub fn breaches_threshold(vital: Vital, value: f64) -> bool {
    AlarmLimits::ADULT.breaches(vital, value)
}

/// The default adult alarm limits (inclusive) behind [`breaches_threshold`]; see [`AlarmLimits::get`] for a
/// device's own.
pub fn alarm_limits(vital: Vital) -> (f64, f64) {
    AlarmLimits::ADULT.get(vital)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input(code: &str, value: f64, unit: &str) -> ReadingInput {
        ReadingInput {
            code: code.into(),
            value,
            unit: unit.into(),
            observed_at: Some(now()),
            quality: Quality::default(),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }

    fn check(item: &ReadingInput) -> Result<Reading, ReadingRejection> {
        validate(item, now(), Duration::seconds(30))
    }

    #[test]
    fn accepts_every_vital_in_its_units() {
        for vital in Vital::ALL {
            let info = vital.info();
            let value = f64::midpoint(info.plausible.0, info.plausible.1);
            for unit in [
                info.ucum.to_string(),
                info.mdc_unit_code.to_string(),
                info.mdc_unit_refid.to_string(),
            ] {
                let reading = check(&input(&info.mdc_code.to_string(), value, &unit)).unwrap();
                assert_eq!(reading.vital, vital);
            }
        }
    }

    #[test]
    fn refuses_with_reasons() {
        assert_eq!(check(&input("999999", 1.0, "/min")).unwrap_err().code(), "unknown_code");
        assert_eq!(check(&input("147842", 70.0, "%")).unwrap_err().code(), "wrong_unit");
        assert_eq!(
            check(&input("147842", SPECIAL_NAN, "/min")).unwrap_err().code(),
            "special_value"
        );
        assert_eq!(
            check(&input("150456", SPECIAL_NRES, "%")).unwrap_err().code(),
            "special_value"
        );
        assert_eq!(check(&input("150456", f64::NAN, "%")).unwrap_err().code(), "not_finite");
        assert_eq!(check(&input("150456", 140.0, "%")).unwrap_err().code(), "implausible");
        let mut future = input("150456", 97.0, "%");
        future.observed_at = Some(now() + Duration::minutes(5));
        let rejection = check(&future).unwrap_err();
        assert_eq!(rejection.code(), "future_time");
        assert!(rejection.to_string().contains("300 s in the future"), "{rejection}");
        let mut demo = input("150456", 97.0, "%");
        demo.quality.test_data = true;
        assert_eq!(check(&demo).unwrap_err().code(), "test_data");
        let mut timeless = input("150456", 97.0, "%");
        timeless.observed_at = None;
        assert_eq!(check(&timeless).unwrap_err().code(), "missing_time");
        let mut invalid = input("150456", 97.0, "%");
        invalid.quality.invalid = true;
        assert_eq!(check(&invalid).unwrap_err().code(), "marked_invalid");
        // Within tolerance is fine: device clocks drift a little.
        let mut close = input("150456", 97.0, "%");
        close.observed_at = Some(now() + Duration::seconds(10));
        assert!(check(&close).is_ok());
    }

    #[test]
    fn implausibly_old_times_are_refused_per_item() {
        let mut old = input("150456", 97.0, "%");
        old.observed_at = DateTime::from_timestamp(0, 0);
        let rejection = check(&old).unwrap_err();
        assert_eq!(rejection.code(), "too_old");
        assert!(rejection.to_string().contains("check the device clock"), "{rejection}");
        // Before 4713 BC: what PostgreSQL cannot store at all.
        old.observed_at = chrono::NaiveDate::from_ymd_opt(-5000, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc());
        assert_eq!(check(&old).unwrap_err().code(), "too_old");
        // Inside the default window: a device that was offline for a week.
        old.observed_at = Some(now() - Duration::days(7));
        assert!(check(&old).is_ok());
        old.observed_at = Some(now() - DEFAULT_MAX_AGE);
        assert!(check(&old).is_ok(), "the bound itself is accepted");
        old.observed_at = Some(now() - DEFAULT_MAX_AGE - Duration::seconds(1));
        assert_eq!(check(&old).unwrap_err().code(), "too_old");
        // The caller can choose the window.
        old.observed_at = Some(now() - Duration::hours(2));
        let rejection = validate_with_max_age(&old, now(), Duration::seconds(30), Duration::hours(1)).unwrap_err();
        assert_eq!(
            rejection,
            ReadingRejection::TooOld {
                observed_at: now() - Duration::hours(2),
                age_secs: 7_200,
                max_age_secs: 3_600
            }
        );
    }

    #[test]
    fn oversized_code_or_unit_is_refused_not_cut() {
        // A code that would parse once cut to 64 characters must not be charted as that code.
        let padded = format!("147842{}", " ".repeat(MAX_CODE_CHARS));
        let rejection = check(&input(&padded, 70.0, "/min")).unwrap_err();
        assert_eq!(rejection.code(), "field_too_long");
        assert_eq!(
            rejection,
            ReadingRejection::FieldTooLong {
                field: "code",
                chars: 70,
                max: MAX_CODE_CHARS
            }
        );
        let unit = format!("/min{}", " ".repeat(MAX_UNIT_CHARS));
        let rejection = check(&input("147842", 70.0, &unit)).unwrap_err();
        assert!(matches!(
            rejection,
            ReadingRejection::FieldTooLong { field: "unit", .. }
        ));
        assert!(
            !rejection.to_string().contains("/min"),
            "the text does not echo the field"
        );
        // Exactly at the limit is fine (and then judged on its content).
        let at_limit = format!("147842{}", " ".repeat(MAX_CODE_CHARS - 6));
        assert!(check(&input(&at_limit, 70.0, "/min")).is_ok());
        // Characters, not bytes.
        let wide = "é".repeat(MAX_UNIT_CHARS);
        assert_eq!(check(&input("147842", 70.0, &wide)).unwrap_err().code(), "wrong_unit");
    }

    #[test]
    fn rejection_codes_are_stable() {
        let codes = [
            ReadingRejection::TooOld {
                observed_at: now(),
                age_secs: 1,
                max_age_secs: 0,
            }
            .code(),
            ReadingRejection::FieldTooLong {
                field: "code",
                chars: 65,
                max: 64,
            }
            .code(),
        ];
        assert_eq!(codes, ["too_old", "field_too_long"]);
    }

    #[test]
    fn default_threshold_helpers_keep_the_adult_table() {
        assert_eq!(alarm_limits(Vital::HeartRate), (40.0, 140.0));
        assert!(!breaches_threshold(Vital::HeartRate, 90.0));
        assert!(breaches_threshold(Vital::SpO2, 85.0));
    }

    #[test]
    fn vendor_codes_become_canonical() {
        let reading = check(&input("150301", 120.0, "mmHg")).unwrap();
        assert_eq!(reading.vital, Vital::NibpSystolic);
        let reading = check(&input("0002-4182", 70.0, "264864")).unwrap();
        assert_eq!(reading.vital, Vital::HeartRate);
        let reading = check(&input("MDC_TEMP", 37.0, "Cel")).unwrap();
        assert_eq!(reading.vital, Vital::BodyTemperature);
    }

    proptest! {
        // Whatever a device sends, an accepted reading is a finite, plausible, non-special number.
        #[test]
        fn accepted_values_are_chartable(code in prop::sample::select(vec!["147842", "150456", "150021", "150364", "151562", "150301"]),
                                          value in prop::num::f64::ANY,
                                          unit in prop::sample::select(vec!["/min", "%", "mm[Hg]", "Cel", "264864", "x"])) {
            if let Ok(reading) = check(&input(code, value, unit)) {
                let (low, high) = reading.vital.info().plausible;
                prop_assert!(reading.value.is_finite());
                prop_assert!((low..=high).contains(&reading.value));
                prop_assert!(special_value_name(reading.value).is_none());
            }
        }
    }
}
