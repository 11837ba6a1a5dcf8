//! The canonical chart entry: what medfleet writes into a patient's record for one measurement, independent of
//! the format a destination speaks. The FHIR and HL7 mappers read only this.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::alarm::AlarmLimits;
use super::codes::Vital;
use super::reading::Reading;

/// A patient as the EMR knows them. The identifier is PHI: it goes to EMR destinations and nowhere else (never
/// into logs, spans or metric labels).
#[derive(Clone, PartialEq, Eq)]
pub struct PatientRef {
    /// The medical record number.
    pub identifier: String,
    /// The assigning authority of the identifier (for example the hospital's MRN namespace).
    pub authority: String,
    pub display_name: Option<String>,
}

// Deliberately opaque: a stray `{:?}` in a log line must not print a patient identifier.
impl std::fmt::Debug for PatientRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PatientRef(<redacted>)")
    }
}

/// The device that measured, as the PoCD profile and PCD-01 want it identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRef {
    pub id: Uuid,
    pub serial_number: String,
    pub manufacturer: String,
    pub model: String,
    /// EUI-64 in `XX-XX-…` form. When absent the mappers identify the device by its medfleet id instead: FHIR as
    /// `urn:uuid:<id>` under the `urn:ietf:rfc:3986` system, HL7 (OBX-18, OBR-3) as the id's 32 hex digits in
    /// upper case. The serial number only appears in the FHIR device reference's display text.
    pub eui64: Option<String>,
}

/// Where the patient was (PV1-3): the device's location at the time of charting.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PointOfCare {
    pub site: String,
    pub ward: String,
    pub bed: Option<String>,
}

/// FHIR Observation.status / HL7 OBX-11.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChartStatus {
    /// Captured automatically, not yet validated by a clinician (OBX-11 `R`).
    Preliminary,
    /// Validated by a clinician (OBX-11 `F`).
    Final,
    /// Retracted (OBX-11 `W`).
    EnteredInError,
}

impl ChartStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ChartStatus::Preliminary => "preliminary",
            ChartStatus::Final => "final",
            ChartStatus::EnteredInError => "entered-in-error",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "preliminary" => ChartStatus::Preliminary,
            "final" => ChartStatus::Final,
            "entered-in-error" => ChartStatus::EnteredInError,
            _ => return None,
        })
    }

    /// The HL7 v2 observation result status.
    pub fn obx11(self) -> &'static str {
        match self {
            ChartStatus::Preliminary => "R",
            ChartStatus::Final => "F",
            ChartStatus::EnteredInError => "W",
        }
    }
}

/// One measurement: a single vital, or the parts of one blood-pressure cuff inflation.
#[derive(Debug, Clone, PartialEq)]
pub enum Measurement {
    Single { vital: Vital, value: f64 },
    BloodPressure { components: Vec<(Vital, f64)> },
}

impl Measurement {
    /// The (vital, value) pairs, in a stable order.
    pub fn values(&self) -> Vec<(Vital, f64)> {
        match self {
            Measurement::Single { vital, value } => vec![(*vital, *value)],
            Measurement::BloodPressure { components } => components.clone(),
        }
    }

    /// The name used for the measurement in storage and in metrics (never patient data).
    pub fn kind(&self) -> &'static str {
        match self {
            Measurement::Single { vital, .. } => vital.info().mdc_refid,
            Measurement::BloodPressure { .. } => super::codes::NIBP_PANEL_MDC_REFID,
        }
    }
}

/// Everything a destination needs to chart one measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartEntry {
    /// Stable for the life of the entry: the idempotency key at every destination.
    pub id: Uuid,
    pub patient: PatientRef,
    pub device: DeviceRef,
    pub point_of_care: Option<PointOfCare>,
    pub measurement: Measurement,
    pub observed_at: DateTime<Utc>,
    pub status: ChartStatus,
    pub questionable: bool,
    /// Who validated it, when status is final.
    pub validated_by: Option<String>,
    /// The alarm limits that applied to this entry (the device's configured ones, or
    /// [`AlarmLimits::default`]): HL7 OBX-7 shows them and OBX-8 flags a value outside them, so what the EMR
    /// sees agrees with the breach decision medfleet made.
    pub alarm_limits: AlarmLimits,
}

/// Groups the accepted readings of one batch into measurements: the NIBP parts with the same observation time
/// become one blood-pressure panel; every other reading stands alone. Order follows the first reading of each
/// measurement, so the mapping is deterministic.
pub fn group_measurements(readings: &[Reading]) -> Vec<(Measurement, DateTime<Utc>, bool, Vec<usize>)> {
    let mut out: Vec<(Measurement, DateTime<Utc>, bool, Vec<usize>)> = Vec::new();
    for (index, reading) in readings.iter().enumerate() {
        if reading.vital.is_blood_pressure() {
            let panel = out.iter_mut().find(|(measurement, at, _, _)| {
                *at == reading.observed_at
                    && matches!(measurement, Measurement::BloodPressure { components }
                        if !components.iter().any(|(vital, _)| *vital == reading.vital))
            });
            if let Some((Measurement::BloodPressure { components }, _, questionable, members)) = panel {
                components.push((reading.vital, reading.value));
                components.sort_by_key(|(vital, _)| *vital);
                *questionable |= reading.questionable;
                members.push(index);
                continue;
            }
            out.push((
                Measurement::BloodPressure {
                    components: vec![(reading.vital, reading.value)],
                },
                reading.observed_at,
                reading.questionable,
                vec![index],
            ));
        } else {
            out.push((
                Measurement::Single {
                    vital: reading.vital,
                    value: reading.value,
                },
                reading.observed_at,
                reading.questionable,
                vec![index],
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(vital: Vital, value: f64, second: i64) -> Reading {
        Reading {
            vital,
            value,
            observed_at: DateTime::from_timestamp(1_800_000_000 + second, 0).unwrap_or_default(),
            questionable: false,
        }
    }

    #[test]
    fn blood_pressure_parts_with_one_time_form_a_panel() {
        let readings = [
            reading(Vital::HeartRate, 70.0, 0),
            reading(Vital::NibpDiastolic, 80.0, 0),
            reading(Vital::NibpSystolic, 120.0, 0),
            reading(Vital::NibpMean, 93.0, 0),
            reading(Vital::NibpSystolic, 125.0, 60),
        ];
        let grouped = group_measurements(&readings);
        assert_eq!(grouped.len(), 3);
        assert_eq!(
            grouped[1].0,
            Measurement::BloodPressure {
                components: vec![
                    (Vital::NibpSystolic, 120.0),
                    (Vital::NibpDiastolic, 80.0),
                    (Vital::NibpMean, 93.0)
                ]
            }
        );
        assert_eq!(grouped[1].3, vec![1, 2, 3]);
        assert_eq!(grouped[2].3, vec![4]);
    }

    #[test]
    fn patient_debug_is_redacted() {
        let patient = PatientRef {
            identifier: "MRN12345".into(),
            authority: "HOSP".into(),
            display_name: Some("Jane Doe".into()),
        };
        let text = format!("{patient:?}");
        assert!(!text.contains("MRN12345") && !text.contains("Jane"));
    }
}
