//! Alarm limits per vital sign: a value outside them is a threshold breach (charted at once, whatever a
//! destination's charting interval) and HL7 OBX-7/OBX-8 report them. The defaults are conservative adult limits;
//! a device's resolved configuration can override them per vital and per bound under `alarm`, because a
//! neonatal or paediatric monitor needs different ones (a neonatal heart rate of 90 is bradycardia).
//!
//! Configuration shape (every part optional; what is absent or invalid keeps the default):
//!
//! ```json
//! {"alarm": {"heart_rate": {"low": 100, "high": 180}, "spo2": {"low": 88}}}
//! ```
//!
//! The vital names are [`Vital::config_name`]: `heart_rate`, `pulse_rate`, `spo2`, `nibp_systolic`,
//! `nibp_diastolic`, `nibp_mean`, `body_temperature`, `respiratory_rate`. [`alarm_schema`] describes the
//! `alarm` object as JSON Schema (draft 2020-12).

use serde_json::{Map, Value, json};

use super::codes::Vital;

/// The key of the alarm object in a device's configuration.
pub const CONFIG_KEY: &str = "alarm";

/// Inclusive `(low, high)` alarm limits for every vital.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlarmLimits {
    /// Indexed by the vital's position in [`Vital::ALL`] (its declaration order).
    limits: [(f64, f64); Vital::ALL.len()],
}

impl AlarmLimits {
    /// The adult limits medfleet applies when a device's configuration says nothing (the values
    /// `breaches_threshold` has always used).
    pub const ADULT: AlarmLimits = AlarmLimits {
        limits: [
            // HeartRate
            (40.0, 140.0),
            // PulseRate
            (40.0, 140.0),
            // SpO2
            (90.0, 100.0),
            // NibpSystolic
            (80.0, 180.0),
            // NibpDiastolic
            (40.0, 110.0),
            // NibpMean
            (60.0, 130.0),
            // BodyTemperature
            (35.0, 38.5),
            // RespiratoryRate
            (8.0, 30.0),
        ],
    };

    /// The inclusive `(low, high)` limits for `vital`.
    pub fn get(&self, vital: Vital) -> (f64, f64) {
        self.limits[index(vital)]
    }

    /// Whether `value` lies outside the limits for `vital` (the limits themselves are not a breach).
    pub fn breaches(&self, vital: Vital, value: f64) -> bool {
        let (low, high) = self.get(vital);
        !(low..=high).contains(&value)
    }

    /// Replaces the limits of one vital. Refuses non-finite bounds and `low > high`, which would make every
    /// value (or no value) a breach without anyone having meant it.
    pub fn set(&mut self, vital: Vital, low: f64, high: f64) -> Result<(), AlarmLimitProblem> {
        let path = format!("{CONFIG_KEY}.{}", vital.config_name());
        for (bound, value) in [("low", low), ("high", high)] {
            if !value.is_finite() {
                return Err(AlarmLimitProblem::NotANumber {
                    path: format!("{path}.{bound}"),
                });
            }
        }
        if low > high {
            return Err(AlarmLimitProblem::Inverted { path, low, high });
        }
        self.limits[index(vital)] = (low, high);
        Ok(())
    }

    /// The limits a device's resolved configuration asks for, with every problem found on the way. The
    /// configuration never stops charting: a vital (or one bound) that is absent keeps the default, and so
    /// does a vital whose entry is invalid; the problems say what was ignored, for the server to log or to
    /// refuse when the configuration is written. `null` counts as absent (layer resolution never leaves one,
    /// and in a layer it means "delete").
    pub fn from_config(config: &Value) -> (AlarmLimits, Vec<AlarmLimitProblem>) {
        let mut limits = AlarmLimits::ADULT;
        let mut problems = Vec::new();
        let alarm = match config.get(CONFIG_KEY) {
            None | Some(Value::Null) => return (limits, problems),
            Some(Value::Object(alarm)) => alarm,
            Some(_) => {
                problems.push(AlarmLimitProblem::NotAnObject {
                    path: CONFIG_KEY.to_owned(),
                });
                return (limits, problems);
            }
        };
        for (name, entry) in alarm {
            let path = format!("{CONFIG_KEY}.{name}");
            let Some(vital) = Vital::from_config_name(name) else {
                problems.push(AlarmLimitProblem::UnknownVital { path });
                continue;
            };
            let bounds = match entry {
                Value::Null => continue,
                Value::Object(bounds) => bounds,
                _ => {
                    problems.push(AlarmLimitProblem::NotAnObject { path });
                    continue;
                }
            };
            let (default_low, default_high) = AlarmLimits::ADULT.get(vital);
            let low = bound(bounds, &path, "low", default_low, &mut problems);
            let high = bound(bounds, &path, "high", default_high, &mut problems);
            for key in bounds.keys().filter(|key| !matches!(key.as_str(), "low" | "high")) {
                problems.push(AlarmLimitProblem::UnknownBound {
                    path: format!("{path}.{key}"),
                });
            }
            if let Err(problem) = limits.set(vital, low, high) {
                // `bound` already refused non-finite values, so this is an inverted pair; the whole vital
                // keeps its default rather than a half-applied, possibly still inverted, mix.
                problems.push(problem);
            }
        }
        (limits, problems)
    }
}

/// What is wrong with the `alarm` part of one configuration layer, for refusing it when it is written (a layer
/// is checked on its own: a bound it leaves out may come from another layer, so a pair is compared only when the
/// layer gives both). Beyond what [`AlarmLimits::from_config`] reports: limits outside the vital's plausible
/// range, and SpO2 limits written as a fraction.
pub fn layer_problems(layer: &Value) -> Vec<AlarmLimitProblem> {
    let mut problems = Vec::new();
    let alarm = match layer.get(CONFIG_KEY) {
        None | Some(Value::Null) => return problems,
        Some(Value::Object(alarm)) => alarm,
        Some(_) => {
            problems.push(AlarmLimitProblem::NotAnObject {
                path: CONFIG_KEY.to_owned(),
            });
            return problems;
        }
    };
    for (name, entry) in alarm {
        let path = format!("{CONFIG_KEY}.{name}");
        let Some(vital) = Vital::from_config_name(name) else {
            problems.push(AlarmLimitProblem::UnknownVital { path });
            continue;
        };
        let bounds = match entry {
            Value::Null => continue,
            Value::Object(bounds) => bounds,
            _ => {
                problems.push(AlarmLimitProblem::NotAnObject { path });
                continue;
            }
        };
        let info = vital.info();
        let mut given = [None, None];
        for (key, value) in bounds {
            let slot = match key.as_str() {
                "low" => 0,
                "high" => 1,
                _ => {
                    problems.push(AlarmLimitProblem::UnknownBound {
                        path: format!("{path}.{key}"),
                    });
                    continue;
                }
            };
            if value.is_null() {
                continue;
            }
            let Some(number) = value.as_f64().filter(|n| n.is_finite()) else {
                problems.push(AlarmLimitProblem::NotANumber {
                    path: format!("{path}.{key}"),
                });
                continue;
            };
            if number < info.plausible.0 || number > info.plausible.1 {
                problems.push(AlarmLimitProblem::Implausible {
                    path: format!("{path}.{key}"),
                    value: number,
                    range: info.plausible,
                    unit: info.ucum,
                });
                continue;
            }
            given[slot] = Some(number);
        }
        if info.ucum == "%" && given.iter().flatten().count() > 0 && given.iter().flatten().all(|n| *n <= 1.0) {
            problems.push(AlarmLimitProblem::Fraction { path: path.clone() });
        }
        if let [Some(low), Some(high)] = given
            && low > high
        {
            problems.push(AlarmLimitProblem::Inverted { path, low, high });
        }
    }
    problems
}

impl Default for AlarmLimits {
    fn default() -> Self {
        AlarmLimits::ADULT
    }
}

fn index(vital: Vital) -> usize {
    // `Vital` is a fieldless enum declared in `Vital::ALL` order; a test checks the two agree.
    vital as usize
}

/// One bound of a vital's entry: the configured number, or `default` (with a problem when the value is there
/// but unusable).
fn bound(
    bounds: &Map<String, Value>,
    path: &str,
    key: &str,
    default: f64,
    problems: &mut Vec<AlarmLimitProblem>,
) -> f64 {
    match bounds.get(key) {
        None | Some(Value::Null) => default,
        Some(value) => {
            if let Some(number) = value.as_f64().filter(|number| number.is_finite()) {
                number
            } else {
                problems.push(AlarmLimitProblem::NotANumber {
                    path: format!("{path}.{key}"),
                });
                default
            }
        }
    }
}

/// Something in a device's `alarm` configuration that medfleet ignored. `path` is dotted from the top of the
/// configuration (`alarm.heart_rate.low`); the text never contains configured values other than the limits.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AlarmLimitProblem {
    #[error("{path} must be an object; the default alarm limits apply")]
    NotAnObject { path: String },
    #[error(
        "{path} is not a vital sign medfleet charts (heart_rate, pulse_rate, spo2, nibp_systolic, nibp_diastolic, \
         nibp_mean, body_temperature, respiratory_rate); it is ignored"
    )]
    UnknownVital { path: String },
    #[error("{path} is not an alarm limit (use low or high); it is ignored")]
    UnknownBound { path: String },
    #[error("{path} must be a finite number; the default applies")]
    NotANumber { path: String },
    #[error("{path}: low {low} is above high {high}; the default limits of this vital apply")]
    Inverted { path: String, low: f64, high: f64 },
    #[error("{path} = {value} is outside what this vital can be ({} to {} {unit})", range.0, range.1)]
    Implausible {
        path: String,
        value: f64,
        range: (f64, f64),
        unit: &'static str,
    },
    #[error("{path} looks like a fraction; SpO2 limits are in percent (e.g. 90, not 0.9)")]
    Fraction { path: String },
}

impl AlarmLimitProblem {
    /// Where in the configuration the problem is, dotted (`alarm.spo2.high`).
    pub fn path(&self) -> &str {
        match self {
            AlarmLimitProblem::NotAnObject { path }
            | AlarmLimitProblem::UnknownVital { path }
            | AlarmLimitProblem::UnknownBound { path }
            | AlarmLimitProblem::NotANumber { path }
            | AlarmLimitProblem::Inverted { path, .. }
            | AlarmLimitProblem::Implausible { path, .. }
            | AlarmLimitProblem::Fraction { path } => path,
        }
    }
}

/// JSON Schema (draft 2020-12) of the `alarm` object, to embed under `properties.alarm` of a device model's
/// configuration schema. It carries no `$schema` of its own because it is a subschema. What it cannot say
/// (JSON Schema does not compare two values) is that `low` must not exceed `high`; [`AlarmLimits::from_config`]
/// reports that as [`AlarmLimitProblem::Inverted`].
pub fn alarm_schema() -> Value {
    let properties: Map<String, Value> = Vital::ALL
        .into_iter()
        .map(|vital| {
            let (low, high) = AlarmLimits::ADULT.get(vital);
            let unit = vital.info().ucum;
            let schema = json!({
                "type": "object",
                "description": format!(
                    "Inclusive alarm limits for {} in {unit} (UCUM); low must not exceed high.",
                    vital.info().loinc_display.to_lowercase()
                ),
                "properties": {
                    "low": {"type": "number", "default": low, "description": "A value below this is a breach."},
                    "high": {"type": "number", "default": high, "description": "A value above this is a breach."},
                },
                "additionalProperties": false,
            });
            (vital.config_name().to_owned(), schema)
        })
        .collect();
    json!({
        "type": "object",
        "description": "Alarm limits per vital sign. A value outside them is a threshold breach, charted at once and \
                        flagged in HL7 OBX-8; OBX-7 shows them. Absent vitals and bounds keep the adult defaults.",
        "properties": properties,
        "additionalProperties": false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_with_limits_medfleet_would_ignore_is_refused() {
        let problems = |layer: serde_json::Value| {
            layer_problems(&layer)
                .iter()
                .map(|p| p.path().to_owned())
                .collect::<Vec<_>>()
        };
        assert!(problems(serde_json::json!({"alarm": {"heart_rate": {"low": 100, "high": 180}}})).is_empty());
        // One bound per layer is fine: the other may come from another layer.
        assert!(problems(serde_json::json!({"alarm": {"heart_rate": {"low": 150}}})).is_empty());
        assert!(problems(serde_json::json!({"alarm": {"heart_rate": {"low": null}}})).is_empty());
        assert_eq!(
            problems(serde_json::json!({"alarm": {"heart_rate": {"low": 180, "high": 100}}})),
            ["alarm.heart_rate"]
        );
        assert_eq!(
            problems(serde_json::json!({"alarm": {"heart_rate": {"low": "100"}}})),
            ["alarm.heart_rate.low"]
        );
        assert_eq!(
            problems(serde_json::json!({"alarm": {"heartrate": {"low": 100}}})),
            ["alarm.heartrate"]
        );
        assert_eq!(
            problems(serde_json::json!({"alarm": {"spo2": {"low": 0.9, "high": 1.0}}})),
            ["alarm.spo2"]
        );
        assert_eq!(
            problems(serde_json::json!({"alarm": {"heart_rate": {"high": 900}}})),
            ["alarm.heart_rate.high"]
        );
    }
    use crate::device_config::ConfigSchema;
    use proptest::prelude::*;

    #[test]
    fn index_follows_the_declaration_order() {
        for (position, vital) in Vital::ALL.into_iter().enumerate() {
            assert_eq!(index(vital), position, "{vital}");
        }
    }

    #[test]
    fn absent_config_gives_the_adult_table() {
        for config in [
            json!({}),
            json!({"alarm": null}),
            json!({"alarm": {}}),
            json!({"sampling_hz": 1}),
        ] {
            let (limits, problems) = AlarmLimits::from_config(&config);
            assert_eq!(limits, AlarmLimits::default());
            assert!(problems.is_empty(), "{problems:?}");
        }
        let adult = AlarmLimits::default();
        assert_eq!(adult.get(Vital::HeartRate), (40.0, 140.0));
        assert_eq!(adult.get(Vital::SpO2), (90.0, 100.0));
        assert_eq!(adult.get(Vital::BodyTemperature), (35.0, 38.5));
        assert!(!adult.breaches(Vital::HeartRate, 90.0));
        assert!(!adult.breaches(Vital::HeartRate, 40.0), "limits are inclusive");
        assert!(adult.breaches(Vital::HeartRate, 39.0));
    }

    #[test]
    fn neonatal_config_makes_a_heart_rate_of_90_a_breach() {
        let config = json!({"alarm": {"heart_rate": {"low": 100, "high": 180}}});
        let (limits, problems) = AlarmLimits::from_config(&config);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(limits.get(Vital::HeartRate), (100.0, 180.0));
        assert!(limits.breaches(Vital::HeartRate, 90.0));
        assert!(!limits.breaches(Vital::HeartRate, 170.0));
        // Other vitals keep their defaults.
        assert_eq!(limits.get(Vital::SpO2), AlarmLimits::ADULT.get(Vital::SpO2));
    }

    #[test]
    fn one_bound_falls_back_on_its_own() {
        let (limits, problems) = AlarmLimits::from_config(&json!({"alarm": {"spo2": {"low": 88}}}));
        assert!(problems.is_empty());
        assert_eq!(limits.get(Vital::SpO2), (88.0, 100.0));
        let (limits, problems) = AlarmLimits::from_config(&json!({"alarm": {"spo2": {"low": "88", "high": 99}}}));
        assert_eq!(limits.get(Vital::SpO2), (90.0, 99.0));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].path(), "alarm.spo2.low");
    }

    #[test]
    fn invalid_entries_keep_the_default_and_are_reported() {
        let config = json!({"alarm": {
            "heart_rate": {"low": 150, "high": 100},
            "respiratory_rate": 12,
            "heartrate": {"low": 1},
            "spo2": {"lo": 80, "high": true},
        }});
        let (limits, problems) = AlarmLimits::from_config(&config);
        assert_eq!(limits, AlarmLimits::ADULT);
        let mut paths: Vec<&str> = problems.iter().map(AlarmLimitProblem::path).collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            [
                "alarm.heart_rate",
                "alarm.heartrate",
                "alarm.respiratory_rate",
                "alarm.spo2.high",
                "alarm.spo2.lo"
            ]
        );
        assert!(problems.iter().any(|p| matches!(p, AlarmLimitProblem::Inverted { .. })));
        // A low above the default high is inverted too once the high falls back.
        let (limits, problems) = AlarmLimits::from_config(&json!({"alarm": {"heart_rate": {"low": 150}}}));
        assert_eq!(limits.get(Vital::HeartRate), (40.0, 140.0));
        assert_eq!(problems.len(), 1);
        let (_, problems) = AlarmLimits::from_config(&json!({"alarm": [1]}));
        assert_eq!(problems[0].path(), "alarm");
    }

    #[test]
    fn set_refuses_what_could_never_be_meant() {
        let mut limits = AlarmLimits::default();
        assert!(limits.set(Vital::HeartRate, f64::NAN, 10.0).is_err());
        assert!(limits.set(Vital::HeartRate, 10.0, f64::INFINITY).is_err());
        assert!(limits.set(Vital::HeartRate, 11.0, 10.0).is_err());
        assert_eq!(limits, AlarmLimits::ADULT);
        assert!(limits.set(Vital::HeartRate, 10.0, 10.0).is_ok());
    }

    fn document_schema() -> ConfigSchema {
        let schema = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {"alarm": alarm_schema()},
        });
        ConfigSchema::compile(&schema).unwrap()
    }

    #[test]
    fn the_schema_compiles_and_describes_the_same_shape() {
        let schema = document_schema();
        assert!(
            schema
                .check(&json!({"alarm": {"heart_rate": {"low": 100, "high": 180}}}))
                .is_ok()
        );
        assert!(schema.check(&json!({"alarm": {"heart_rate": {"low": "100"}}})).is_err());
        assert!(schema.check(&json!({"alarm": {"heartrate": {}}})).is_err());
        assert!(schema.check(&json!({"alarm": {"spo2": {"lo": 1}}})).is_err());
        let schema = alarm_schema();
        let names: Vec<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(names.len(), Vital::ALL.len());
    }

    fn bound_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            (-500.0f64..500.0).prop_map(|n| json!(n)),
            (0i64..300).prop_map(|n| json!(n)),
            Just(json!("70")),
            Just(json!(true)),
            Just(json!([1])),
        ]
    }

    fn vital_entry() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => prop::collection::btree_map(prop::sample::select(vec!["low", "high", "lo"]), bound_value(), 0..3)
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            1 => Just(json!(12)),
        ]
    }

    fn alarm_config() -> impl Strategy<Value = Value> {
        let names: Vec<&str> = Vital::ALL
            .iter()
            .map(|v| v.config_name())
            .chain(["heartrate"])
            .collect();
        prop::collection::btree_map(prop::sample::select(names), vital_entry(), 0..4)
            .prop_map(|m| json!({"alarm": Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())}))
    }

    proptest! {
        // The schema and the parser agree: the schema refuses exactly what the parser reports, except an inverted
        // pair, which only the parser can see. And whatever the configuration, the limits are usable.
        #[test]
        fn schema_and_parser_agree(config in alarm_config()) {
            let (limits, problems) = AlarmLimits::from_config(&config);
            let shape_problems = problems.iter().filter(|p| !matches!(p, AlarmLimitProblem::Inverted { .. })).count();
            prop_assert_eq!(document_schema().check(&config).is_ok(), shape_problems == 0);
            for vital in Vital::ALL {
                let (low, high) = limits.get(vital);
                prop_assert!(low.is_finite() && high.is_finite() && low <= high);
            }
        }
    }
}
