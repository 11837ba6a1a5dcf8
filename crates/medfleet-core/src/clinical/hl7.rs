//! HL7 v2.6 output per IHE PCD-01 (Device Enterprise Communication): one ORU^R01 per chart entry, with the
//! device containment tree (MDS, VMD, channel) as `X` rows above the metric rows, field escaping, the
//! acknowledgement a receiver sends back, and MLLP framing. Pure: the relay owns the socket.

use chrono::{DateTime, Utc};

use super::chart::ChartEntry;
use super::codes::Vital;

pub const PCD01_PROFILE: &str = "IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO";
/// OBR-4 universal service id for device observations.
pub const OBR4_MONITORING: &str = "182777000^monitoring of patient^SCT";
const MDS: (u32, &str) = (69_965, "MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS");

/// MLLP block start and end.
pub const MLLP_START: u8 = 0x0B;
pub const MLLP_END: [u8; 2] = [0x1C, 0x0D];

/// Sending and receiving application and facility names for MSH-3..6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub sending_application: String,
    pub sending_facility: String,
    pub receiving_application: String,
    pub receiving_facility: String,
}

/// The VMD and channel a vital belongs to (11073-10101 partition 1 object codes).
fn containment(vital: Vital) -> ((u32, &'static str), (u32, &'static str)) {
    match vital {
        Vital::HeartRate => ((69_798, "MDC_DEV_ECG_VMD"), (69_799, "MDC_DEV_ECG_CHAN")),
        Vital::PulseRate | Vital::SpO2 => (
            (69_642, "MDC_DEV_ANALY_SAT_O2_VMD"),
            (69_643, "MDC_DEV_ANALY_SAT_O2_CHAN"),
        ),
        Vital::NibpSystolic | Vital::NibpDiastolic | Vital::NibpMean => (
            (70_686, "MDC_DEV_PRESS_BLD_NONINV_VMD"),
            (70_687, "MDC_DEV_PRESS_BLD_NONINV_CHAN"),
        ),
        Vital::BodyTemperature => ((69_902, "MDC_DEV_METER_TEMP_VMD"), (69_903, "MDC_DEV_METER_TEMP_CHAN")),
        Vital::RespiratoryRate => (
            (69_722, "MDC_DEV_ANALY_RESP_RATE_VMD"),
            (69_723, "MDC_DEV_ANALY_RESP_RATE_CHAN"),
        ),
    }
}

/// Escapes field content so a delimiter in data can never be read as structure (HL7 v2 section 2.7).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\E\\"),
            '|' => out.push_str("\\F\\"),
            '^' => out.push_str("\\S\\"),
            '&' => out.push_str("\\T\\"),
            '~' => out.push_str("\\R\\"),
            // A segment terminator or line break inside data would split the segment.
            '\r' | '\n' => out.push_str("\\X0D\\"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Reverses [`escape`] in one pass (so an escaped backslash next to a letter is never read as another escape).
/// Unknown escape sequences are kept as they are.
pub fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('\\') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('\\') else {
            out.push_str(&rest[start..]);
            return out;
        };
        match &after[..end] {
            "F" => out.push('|'),
            "S" => out.push('^'),
            "T" => out.push('&'),
            "R" => out.push('~'),
            "E" => out.push('\\'),
            "X0D" => out.push('\r'),
            other => {
                out.push('\\');
                out.push_str(other);
                out.push('\\');
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// HL7 DTM with seconds and the UTC offset.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y%m%d%H%M%S%.3f+0000").to_string()
}

fn segment(name: &str, fields: &[&str]) -> String {
    let mut out = String::from(name);
    for field in fields {
        out.push('|');
        out.push_str(field);
    }
    // Trailing empty fields are noise; receivers treat them as absent either way.
    while out.ends_with('|') {
        out.pop();
    }
    out
}

/// An ORU^R01 for one chart entry. `control_id` is MSH-10: the caller keeps it stable across resends of the same
/// message (so a receiver can drop duplicates) and unique across messages.
pub fn oru_r01(entry: &ChartEntry, endpoints: &Endpoints, control_id: &str, sent_at: DateTime<Utc>) -> String {
    let equipment = entry.device.eui64.as_ref().map_or_else(
        || entry.device.id.simple().to_string().to_ascii_uppercase(),
        |eui| eui.replace('-', ""),
    );
    let equipment_ei = format!("{}^^{}^EUI-64", escape(&equipment), escape(&equipment));
    let observed = timestamp(entry.observed_at);
    let msh9 = "ORU^R01^ORU_R01";
    let sending_app = escape(&endpoints.sending_application);
    let sending_facility = escape(&endpoints.sending_facility);
    let receiving_app = escape(&endpoints.receiving_application);
    let receiving_facility = escape(&endpoints.receiving_facility);
    let sent = timestamp(sent_at);
    let control = escape(control_id);
    let msh = format!(
        "MSH|^~\\&|{}",
        segment(
            "",
            &[
                &sending_app,
                &sending_facility,
                &receiving_app,
                &receiving_facility,
                &sent,
                "",
                msh9,
                &control,
                "P",
                "2.6",
                "",
                "",
                "AL",
                "NE",
                "",
                "UNICODE UTF-8",
                "",
                "",
                PCD01_PROFILE,
            ],
        )
        .trim_start_matches('|')
    );
    let patient = &entry.patient;
    let pid3 = format!("{}^^^{}^MR", escape(&patient.identifier), escape(&patient.authority));
    let pid5 = patient
        .display_name
        .as_deref()
        .map(|name| name.split('^').map(escape).collect::<Vec<_>>().join("^"))
        .unwrap_or_default();
    let pid = segment("PID", &["", "", &pid3, "", &pid5]);
    let pv1_3 = entry
        .point_of_care
        .as_ref()
        .map(|poc| {
            format!(
                "{}^^{}^{}",
                escape(&poc.ward),
                escape(poc.bed.as_deref().unwrap_or_default()),
                escape(&poc.site)
            )
        })
        .unwrap_or_default();
    let pv1 = segment("PV1", &["", "I", &pv1_3]);
    let filler = format!("{}^MEDFLEET^{}^EUI-64", entry.id.simple(), escape(&equipment));
    let obr = segment("OBR", &["1", "", &filler, OBR4_MONITORING, "", "", &observed]);

    let values = entry.measurement.values();
    let first_vital = values.first().map_or(Vital::HeartRate, |(vital, _)| *vital);
    let ((vmd_code, vmd_refid), (chan_code, chan_refid)) = containment(first_vital);
    let status = entry.status.obx11();
    let mut segments = vec![msh, pid, pv1, obr];
    let container = |set_id: usize, code: u32, refid: &str, sub_id: &str| {
        segment(
            "OBX",
            &[
                &set_id.to_string(),
                "",
                &format!("{code}^{refid}^MDC"),
                sub_id,
                "",
                "",
                "",
                "",
                "",
                "",
                "X",
                "",
                "",
                &observed,
                "",
                "",
                "",
                &equipment_ei,
            ],
        )
    };
    segments.push(container(1, MDS.0, MDS.1, "1.0.0.0"));
    segments.push(container(2, vmd_code, vmd_refid, "1.1.0.0"));
    segments.push(container(3, chan_code, chan_refid, "1.1.1.0"));
    for (index, (vital, value)) in values.iter().enumerate() {
        let info = vital.info();
        let set_id = (index + 4).to_string();
        let sub_id = format!("1.1.1.{}", index + 1);
        let obx3 = format!("{}^{}^MDC", info.mdc_code, info.mdc_refid);
        let obx6 = format!("{}^{}^MDC", info.mdc_unit_code, info.mdc_unit_refid);
        let (low, high) = super::reading::alarm_limits(*vital);
        let obx7 = format!("{}-{}", format_value(low), format_value(high));
        let obx8 = if super::reading::breaches_threshold(*vital, *value) {
            "A"
        } else {
            ""
        };
        segments.push(segment(
            "OBX",
            &[
                &set_id,
                "NM",
                &obx3,
                &sub_id,
                &format_value(*value),
                &obx6,
                &obx7,
                obx8,
                "",
                "",
                status,
                "",
                "",
                &observed,
                "",
                "",
                "",
                &equipment_ei,
            ],
        ));
    }
    let mut message = segments.join("\r");
    message.push('\r');
    message
}

/// An NM value without float noise (`72` not `72.0`, `36.8` not `36.800000000000004`).
pub fn format_value(value: f64) -> String {
    let text = format!("{value}");
    if text.contains('e') {
        format!("{value:.6}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    } else {
        text
    }
}

/// What a receiver answered (MSA-1), with MSA-2 (the control id it acknowledges) and any error text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acknowledgement {
    pub code: AckCode,
    pub control_id: String,
    pub text: String,
    /// ERR-3 (HL7 error code), first component: structured, safe to log.
    pub error_code: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCode {
    /// AA / CA: accepted.
    Accept,
    /// AE / CE: an error the sender may retry.
    Error,
    /// AR / CR: rejected; resending the same message will not help.
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("the reply has no MSA segment")]
    NoMsa,
    #[error("unknown acknowledgement code {0:?} in MSA-1")]
    UnknownCode(String),
}

/// Parses an ACK message (segments separated by `\r`; `\n` is tolerated).
pub fn parse_ack(message: &str) -> Result<Acknowledgement, AckError> {
    let msa = message
        .split(['\r', '\n'])
        .find(|segment| segment.starts_with("MSA|"))
        .ok_or(AckError::NoMsa)?;
    let fields: Vec<&str> = msa.split('|').collect();
    let code = match fields.get(1).copied().unwrap_or_default() {
        "AA" | "CA" => AckCode::Accept,
        "AE" | "CE" => AckCode::Error,
        "AR" | "CR" => AckCode::Reject,
        other => return Err(AckError::UnknownCode(other.chars().take(8).collect())),
    };
    let err = message.split(['\r', '\n']).find(|segment| segment.starts_with("ERR|"));
    let text = err
        .map(unescape)
        .or_else(|| fields.get(3).map(|text| unescape(text)))
        .unwrap_or_default();
    let error_code = err
        .and_then(|segment| segment.split('|').nth(3))
        .and_then(|field| field.split('^').next())
        .map(|code| code.chars().filter(char::is_ascii_alphanumeric).take(16).collect())
        .unwrap_or_default();
    Ok(Acknowledgement {
        code,
        control_id: unescape(fields.get(2).copied().unwrap_or_default()),
        text,
        error_code,
    })
}

/// Wraps a message in an MLLP block.
pub fn mllp_frame(message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 3);
    out.push(MLLP_START);
    out.extend_from_slice(message.as_bytes());
    out.extend_from_slice(&MLLP_END);
    out
}

/// Finds a complete MLLP block at the start of `buffer`: `Some((message, bytes consumed))`, `None` until the
/// end marker has arrived. Bytes before the start marker are skipped (line noise after a reconnect).
pub fn mllp_deframe(buffer: &[u8]) -> Option<(String, usize)> {
    let start = buffer.iter().position(|b| *b == MLLP_START)?;
    let body = &buffer[start + 1..];
    let end = body.windows(2).position(|w| w == MLLP_END)?;
    Some((String::from_utf8_lossy(&body[..end]).into_owned(), start + 1 + end + 2))
}

#[cfg(test)]
mod tests {
    use super::super::chart::{ChartStatus, DeviceRef, Measurement, PatientRef, PointOfCare};
    use super::*;
    use proptest::prelude::*;
    use uuid::Uuid;

    fn endpoints() -> Endpoints {
        Endpoints {
            sending_application: "MEDFLEET".into(),
            sending_facility: "HOSP".into(),
            receiving_application: "EMR".into(),
            receiving_facility: "HOSP".into(),
        }
    }

    fn entry(measurement: Measurement) -> ChartEntry {
        ChartEntry {
            id: Uuid::from_u128(0xABCD),
            patient: PatientRef {
                identifier: "MRN|42".into(),
                authority: "HOSP".into(),
                display_name: Some("Doe^Jane".into()),
            },
            device: DeviceRef {
                id: Uuid::from_u128(1),
                serial_number: "SN".into(),
                manufacturer: "Acme".into(),
                model: "M".into(),
                eui64: Some("00-11-22-33-44-55-66-77".into()),
            },
            point_of_care: Some(PointOfCare {
                site: "north".into(),
                ward: "icu".into(),
                bed: Some("3".into()),
            }),
            measurement,
            observed_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default(),
            status: ChartStatus::Preliminary,
            questionable: false,
            validated_by: None,
        }
    }

    fn field<'a>(message: &'a str, segment: &str, nth: usize, index: usize) -> &'a str {
        let seg = message
            .split('\r')
            .filter(|s| s.starts_with(segment))
            .nth(nth)
            .unwrap_or_default();
        let offset = usize::from(segment == "MSH");
        seg.split('|').nth(index - offset).unwrap_or_default()
    }

    #[test]
    fn oru_fields_follow_pcd01() {
        let message = oru_r01(
            &entry(Measurement::Single {
                vital: Vital::HeartRate,
                value: 72.0,
            }),
            &endpoints(),
            "MF1",
            DateTime::from_timestamp(1_800_000_001, 0).unwrap_or_default(),
        );
        assert!(message.starts_with("MSH|^~\\&|MEDFLEET|HOSP|EMR|HOSP|"));
        assert_eq!(field(&message, "MSH", 0, 9), "ORU^R01^ORU_R01");
        assert_eq!(field(&message, "MSH", 0, 10), "MF1");
        assert_eq!(field(&message, "MSH", 0, 12), "2.6");
        assert_eq!(field(&message, "MSH", 0, 15), "AL");
        assert_eq!(field(&message, "MSH", 0, 16), "NE");
        assert_eq!(field(&message, "MSH", 0, 21), PCD01_PROFILE);
        // The delimiter inside the MRN is escaped, so PID-3 still has its components.
        assert_eq!(field(&message, "PID", 0, 3), "MRN\\F\\42^^^HOSP^MR");
        assert_eq!(field(&message, "PID", 0, 5), "Doe^Jane");
        assert_eq!(field(&message, "PV1", 0, 3), "icu^^3^north");
        assert_eq!(field(&message, "OBR", 0, 4), OBR4_MONITORING);
        assert_eq!(field(&message, "OBX", 0, 4), "1.0.0.0");
        assert_eq!(field(&message, "OBX", 0, 11), "X");
        assert_eq!(field(&message, "OBX", 3, 2), "NM");
        assert_eq!(field(&message, "OBX", 3, 3), "147842^MDC_ECG_HEART_RATE^MDC");
        assert_eq!(field(&message, "OBX", 3, 4), "1.1.1.1");
        assert_eq!(field(&message, "OBX", 3, 5), "72");
        assert_eq!(field(&message, "OBX", 3, 6), "264864^MDC_DIM_BEAT_PER_MIN^MDC");
        assert_eq!(field(&message, "OBX", 3, 11), "R");
        assert_eq!(field(&message, "OBX", 3, 14), "20270115080000.000+0000");
        assert_eq!(
            field(&message, "OBX", 3, 18),
            "0011223344556677^^0011223344556677^EUI-64"
        );
        assert!(message.ends_with('\r'));
    }

    #[test]
    fn blood_pressure_has_one_row_per_part() {
        let message = oru_r01(
            &entry(Measurement::BloodPressure {
                components: vec![(Vital::NibpSystolic, 120.0), (Vital::NibpDiastolic, 80.0)],
            }),
            &endpoints(),
            "MF2",
            DateTime::from_timestamp(1_800_000_001, 0).unwrap_or_default(),
        );
        assert_eq!(field(&message, "OBX", 1, 3), "70686^MDC_DEV_PRESS_BLD_NONINV_VMD^MDC");
        assert_eq!(field(&message, "OBX", 3, 3), "150021^MDC_PRESS_BLD_NONINV_SYS^MDC");
        assert_eq!(field(&message, "OBX", 4, 3), "150022^MDC_PRESS_BLD_NONINV_DIA^MDC");
        assert_eq!(field(&message, "OBX", 4, 4), "1.1.1.2");
    }

    #[test]
    fn acks_parse() {
        let ack = parse_ack("MSH|^~\\&|EMR|HOSP|MEDFLEET|HOSP|20270101||ACK|9|P|2.6\rMSA|AA|MF1\r").unwrap();
        assert_eq!(ack.code, AckCode::Accept);
        assert_eq!(ack.control_id, "MF1");
        let ack = parse_ack("MSH|^~\\&|x\rMSA|AE|MF2|bad \\F\\ thing\r").unwrap();
        assert_eq!(ack.code, AckCode::Error);
        assert_eq!(ack.text, "bad | thing");
        let ack = parse_ack("MSH|^~\\&|x\rMSA|AR|MF3\rERR|||207^Application internal error^HL70357|E\r").unwrap();
        assert_eq!((ack.code, ack.error_code.as_str()), (AckCode::Reject, "207"));
        assert_eq!(parse_ack("MSH|x\r"), Err(AckError::NoMsa));
        assert!(matches!(parse_ack("MSA|ZZ|1"), Err(AckError::UnknownCode(_))));
    }

    #[test]
    fn mllp_round_trip() {
        let mut stream = b"noise".to_vec();
        stream.extend(mllp_frame("MSH|a\r"));
        stream.extend(mllp_frame("MSH|b\r"));
        let (first, used) = mllp_deframe(&stream).unwrap();
        assert_eq!(first, "MSH|a\r");
        let (second, _) = mllp_deframe(&stream[used..]).unwrap();
        assert_eq!(second, "MSH|b\r");
        assert_eq!(mllp_deframe(&stream[..stream.len() - 1][used..]), None);
    }

    #[test]
    fn values_print_without_float_noise() {
        assert_eq!(format_value(72.0), "72");
        assert_eq!(format_value(36.8), "36.8");
        assert_eq!(format_value(0.1 + 0.2), "0.30000000000000004");
    }

    proptest! {
        // No data can add a field, component, repetition or segment: escaped text contains no delimiter.
        #[test]
        fn escaping_is_total_and_reversible(text in "[ -~\\r]{0,64}") {
            let escaped = escape(&text);
            prop_assert!(!escaped.contains(['|', '^', '~', '&', '\r']));
            prop_assert_eq!(unescape(&escaped), text);
        }
    }
}
