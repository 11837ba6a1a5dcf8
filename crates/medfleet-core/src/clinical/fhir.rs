//! HL7 FHIR R4 output: a vital-signs Observation per chart entry (LOINC first, the MDC code as a second coding,
//! UCUM quantities, blood pressure as the 85354-9 panel with components, the device by its EUI-64) and the
//! transaction Bundle a FHIR server receives, with conditional create on `Observation.identifier` so a resend
//! never creates a second chart entry.

use serde_json::{Value, json};

use super::chart::{ChartEntry, ChartStatus, DeviceRef, Measurement, PatientRef};
use super::codes::{NIBP_PANEL_LOINC, NIBP_PANEL_LOINC_DISPLAY, NIBP_PANEL_MDC, NIBP_PANEL_MDC_REFID, Vital};

pub const LOINC: &str = "http://loinc.org";
pub const MDC: &str = "urn:iso:std:iso:11073:10101";
pub const UCUM: &str = "http://unitsofmeasure.org";
pub const URI_SYSTEM: &str = "urn:ietf:rfc:3986";
/// The 11073 object identifier for EUI-64 device identifiers, as the HL7 PoCD implementation guide uses it.
pub const EUI64_SYSTEM: &str = "urn:oid:1.2.840.10004.1.1.1.0.0.1.0.0.1.2680";
pub const VITAL_SIGNS_PROFILE: &str = "http://hl7.org/fhir/StructureDefinition/vitalsigns";
pub const BP_PROFILE: &str = "http://hl7.org/fhir/StructureDefinition/bp";

/// `Observation.identifier` value: the entry's id as a URN, unique and stable across resends.
pub fn identifier_value(entry: &ChartEntry) -> String {
    format!("urn:uuid:{}", entry.id)
}

/// The search a conditional create or update matches on.
pub fn identifier_query(entry: &ChartEntry) -> String {
    format!("identifier={URI_SYSTEM}|{}", identifier_value(entry))
}

/// The system of a patient identifier: the assigning authority when it is already a URI, otherwise a URN
/// naming it, so identifiers from different authorities never collide.
pub fn patient_identifier_system(authority: &str) -> String {
    if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("urn:medfleet:assigning-authority:{authority}")
    }
}

fn patient_reference(patient: &PatientRef) -> Value {
    let mut reference = json!({
        "type": "Patient",
        "identifier": {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
            "system": patient_identifier_system(&patient.authority),
            "value": patient.identifier,
            "assigner": {"display": patient.authority},
        },
    });
    if let Some(name) = &patient.display_name {
        reference["display"] = json!(name);
    }
    reference
}

fn device_reference(device: &DeviceRef) -> Value {
    let identifier = match &device.eui64 {
        Some(eui64) => json!({"system": EUI64_SYSTEM, "value": eui64}),
        None => json!({"system": URI_SYSTEM, "value": format!("urn:uuid:{}", device.id)}),
    };
    json!({
        "type": "Device",
        "identifier": identifier,
        "display": format!("{} {} (serial {})", device.manufacturer, device.model, device.serial_number),
    })
}

/// The LOINC code the R4 vital-signs profile requires where it differs from the more specific one we chart
/// (oxygen saturation profile: 2708-6; heart rate profile: 8867-4).
fn profile_loinc(vital: Vital) -> Option<(&'static str, &'static str)> {
    match vital {
        Vital::SpO2 => Some(("2708-6", "Oxygen saturation in Arterial blood")),
        Vital::PulseRate => Some(("8867-4", "Heart rate")),
        _ => None,
    }
}

fn code_of(vital: Vital) -> Value {
    let info = vital.info();
    let mut coding = vec![json!({"system": LOINC, "code": info.loinc, "display": info.loinc_display})];
    if let Some((code, display)) = profile_loinc(vital) {
        coding.push(json!({"system": LOINC, "code": code, "display": display}));
    }
    coding.push(json!({"system": MDC, "code": info.mdc_code.to_string(), "display": info.mdc_refid}));
    json!({"coding": coding, "text": info.loinc_display})
}

fn quantity(vital: Vital, value: f64) -> Value {
    let info = vital.info();
    json!({"value": value, "unit": info.unit_display, "system": UCUM, "code": info.ucum})
}

/// The Observation resource for one chart entry.
pub fn observation(entry: &ChartEntry) -> Value {
    let mut resource = json!({
        "resourceType": "Observation",
        "identifier": [{"system": URI_SYSTEM, "value": identifier_value(entry)}],
        "status": entry.status.as_str(),
        "category": [{
            "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs",
                "display": "Vital Signs",
            }],
            "text": "Vital Signs",
        }],
        "subject": patient_reference(&entry.patient),
        "effectiveDateTime": entry.observed_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "device": device_reference(&entry.device),
    });
    match &entry.measurement {
        Measurement::Single { vital, value } => {
            resource["meta"] = json!({"profile": [VITAL_SIGNS_PROFILE]});
            resource["code"] = code_of(*vital);
            resource["valueQuantity"] = quantity(*vital, *value);
        }
        Measurement::BloodPressure { components } => {
            // The bp profile requires both systolic and diastolic; a lone mean pressure is a plain vital sign.
            let has = |wanted: Vital| components.iter().any(|(vital, _)| *vital == wanted);
            let profiles = if has(Vital::NibpSystolic) && has(Vital::NibpDiastolic) {
                json!([VITAL_SIGNS_PROFILE, BP_PROFILE])
            } else {
                json!([VITAL_SIGNS_PROFILE])
            };
            resource["meta"] = json!({"profile": profiles});
            resource["code"] = json!({
                "coding": [
                    {"system": LOINC, "code": NIBP_PANEL_LOINC, "display": NIBP_PANEL_LOINC_DISPLAY},
                    {"system": MDC, "code": NIBP_PANEL_MDC.to_string(), "display": NIBP_PANEL_MDC_REFID},
                ],
                "text": "Blood pressure",
            });
            resource["component"] = components
                .iter()
                .map(|(vital, value)| json!({"code": code_of(*vital), "valueQuantity": quantity(*vital, *value)}))
                .collect();
        }
    }
    if entry.questionable {
        resource["note"] = json!([{"text": "The device flagged this value as questionable (possible artefact)."}]);
    }
    if let (ChartStatus::Final, Some(validator)) = (entry.status, &entry.validated_by) {
        resource["performer"] = json!([{"display": validator}]);
    }
    resource
}

/// A transaction Bundle for a set of entries. A preliminary entry is a conditional create (`ifNoneExist` on its
/// identifier): a resend after a lost response matches the stored one and creates nothing. A validated or
/// retracted entry is a conditional update on the same identifier, which creates it if the receiver never saw
/// the preliminary version.
pub fn transaction_bundle(entries: &[ChartEntry]) -> Value {
    let entry_values: Vec<Value> = entries
        .iter()
        .map(|entry| {
            let request = match entry.status {
                ChartStatus::Preliminary => json!({
                    "method": "POST",
                    "url": "Observation",
                    "ifNoneExist": identifier_query(entry),
                }),
                ChartStatus::Final | ChartStatus::EnteredInError => json!({
                    "method": "PUT",
                    "url": format!("Observation?{}", identifier_query(entry)),
                }),
            };
            json!({
                "fullUrl": identifier_value(entry),
                "resource": observation(entry),
                "request": request,
            })
        })
        .collect();
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entry_values})
}

#[cfg(test)]
mod tests {
    use super::super::alarm::AlarmLimits;
    use super::super::chart::PointOfCare;
    use super::*;
    use chrono::DateTime;
    use uuid::Uuid;

    pub(crate) fn entry(measurement: Measurement, status: ChartStatus) -> ChartEntry {
        ChartEntry {
            id: Uuid::from_u128(0x1234),
            patient: PatientRef {
                identifier: "MRN-0042".into(),
                authority: "HOSP".into(),
                display_name: Some("Doe^Jane".into()),
            },
            device: DeviceRef {
                id: Uuid::from_u128(7),
                serial_number: "SN1".into(),
                manufacturer: "Acme".into(),
                model: "M1".into(),
                eui64: Some("00-11-22-33-44-55-66-77".into()),
            },
            point_of_care: Some(PointOfCare {
                site: "north".into(),
                ward: "icu".into(),
                bed: Some("3".into()),
            }),
            measurement,
            observed_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default(),
            status,
            questionable: false,
            validated_by: None,
            alarm_limits: AlarmLimits::default(),
        }
    }

    #[test]
    fn alarm_limits_do_not_change_the_observation() {
        // Alarm limits are device settings, not the reference range FHIR's referenceRange means; the FHIR
        // output stays what it was whatever limits applied.
        let adult = entry(
            Measurement::Single {
                vital: Vital::HeartRate,
                value: 90.0,
            },
            ChartStatus::Preliminary,
        );
        let mut neonatal = adult.clone();
        neonatal.alarm_limits.set(Vital::HeartRate, 100.0, 180.0).unwrap();
        assert_eq!(observation(&neonatal), observation(&adult));
    }

    #[test]
    fn single_vital_observation() {
        let value = observation(&entry(
            Measurement::Single {
                vital: Vital::HeartRate,
                value: 72.0,
            },
            ChartStatus::Preliminary,
        ));
        assert_eq!(value["status"], "preliminary");
        assert_eq!(value["code"]["coding"][0]["code"], "8867-4");
        assert_eq!(value["code"]["coding"][1]["code"], "147842");
        assert_eq!(value["valueQuantity"]["code"], "/min");
        assert_eq!(value["valueQuantity"]["system"], UCUM);
        assert_eq!(value["subject"]["identifier"]["value"], "MRN-0042");
        assert_eq!(value["device"]["identifier"]["system"], EUI64_SYSTEM);
        assert_eq!(value["effectiveDateTime"], "2027-01-15T08:00:00.000Z");
        assert_eq!(
            value["identifier"][0]["value"],
            format!("urn:uuid:{}", Uuid::from_u128(0x1234))
        );
    }

    #[test]
    fn blood_pressure_is_a_panel_with_components() {
        let value = observation(&entry(
            Measurement::BloodPressure {
                components: vec![(Vital::NibpSystolic, 120.0), (Vital::NibpDiastolic, 80.0)],
            },
            ChartStatus::Final,
        ));
        assert_eq!(value["code"]["coding"][0]["code"], "85354-9");
        assert!(value.get("valueQuantity").is_none());
        assert_eq!(value["component"][0]["code"]["coding"][0]["code"], "8480-6");
        assert_eq!(value["component"][1]["code"]["coding"][0]["code"], "8462-4");
        assert_eq!(value["component"][1]["valueQuantity"]["code"], "mm[Hg]");
        assert_eq!(value["status"], "final");
        assert_eq!(value["meta"]["profile"][1], BP_PROFILE);
        let mean_only = observation(&entry(
            Measurement::BloodPressure {
                components: vec![(Vital::NibpMean, 93.0)],
            },
            ChartStatus::Preliminary,
        ));
        assert_eq!(mean_only["meta"]["profile"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn profile_codes_are_present() {
        let spo2 = observation(&entry(
            Measurement::Single {
                vital: Vital::SpO2,
                value: 97.0,
            },
            ChartStatus::Preliminary,
        ));
        let codes: Vec<&str> = spo2["code"]["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["code"].as_str())
            .collect();
        assert_eq!(codes, vec!["59408-5", "2708-6", "150456"]);
    }

    #[test]
    fn bundle_requests_are_conditional() {
        let preliminary = entry(
            Measurement::Single {
                vital: Vital::SpO2,
                value: 97.0,
            },
            ChartStatus::Preliminary,
        );
        let mut retracted = preliminary.clone();
        retracted.status = ChartStatus::EnteredInError;
        let bundle = transaction_bundle(&[preliminary, retracted]);
        assert_eq!(bundle["type"], "transaction");
        assert_eq!(bundle["entry"][0]["request"]["method"], "POST");
        assert!(
            bundle["entry"][0]["request"]["ifNoneExist"]
                .as_str()
                .is_some_and(|q| q.starts_with("identifier=urn:ietf:rfc:3986|urn:uuid:"))
        );
        assert_eq!(bundle["entry"][1]["request"]["method"], "PUT");
    }
}
