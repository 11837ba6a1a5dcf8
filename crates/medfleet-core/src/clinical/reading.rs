//! Validation of one reading item as a device sends it: the code and unit are normalised to a [`Vital`], the
//! value is checked against IEEE 11073 special values and a plausible range, the observation time against the
//! clock. Each refusal carries a reason a biomedical engineer can act on; nothing refused is ever charted.

use chrono::{DateTime, Duration, Utc};

use super::codes::{Vital, parse_mdc_code};

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

/// Validates one item against the clock `now`, accepting observation times up to `future_tolerance` ahead.
pub fn validate(
    input: &ReadingInput,
    now: DateTime<Utc>,
    future_tolerance: Duration,
) -> Result<Reading, ReadingRejection> {
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
    Ok(Reading {
        vital,
        value: input.value,
        observed_at,
        questionable: input.quality.questionable,
    })
}

/// Default alarm limits: a value outside them is a threshold breach, charted at once whatever a destination's
/// charting interval. Conservative adult limits; a ward can chart more often through its destination interval.
pub fn breaches_threshold(vital: Vital, value: f64) -> bool {
    let (low, high) = alarm_limits(vital);
    !(low..=high).contains(&value)
}

/// The default alarm limits (inclusive) behind [`breaches_threshold`]; HL7 OBX-7 reports them as the reference
/// range, so OBX-8's abnormal flag agrees with it.
pub fn alarm_limits(vital: Vital) -> (f64, f64) {
    match vital {
        Vital::HeartRate | Vital::PulseRate => (40.0, 140.0),
        Vital::SpO2 => (90.0, 100.0),
        Vital::NibpSystolic => (80.0, 180.0),
        Vital::NibpDiastolic => (40.0, 110.0),
        Vital::NibpMean => (60.0, 130.0),
        Vital::BodyTemperature => (35.0, 38.5),
        Vital::RespiratoryRate => (8.0, 30.0),
    }
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
