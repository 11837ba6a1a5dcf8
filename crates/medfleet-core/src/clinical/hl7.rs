//! HL7 v2.6 output per IHE PCD-01 (Device Enterprise Communication): one ORU^R01 per chart entry, with the
//! device containment tree (MDS, VMD, channel) as `X` rows above the metric rows, field escaping, the
//! acknowledgement a receiver sends back, and MLLP framing. Pure: the relay owns the socket.
//!
//! OBX-8 (abnormal flags, repeating) of a metric row carries two things: `L`/`H` when the value is below/above
//! the alarm limits that applied to the entry (OBX-7 shows those limits as `low-high`), and [`OBX8_QUESTIONABLE`]
//! when the device doubted the value. IHE PCD-01 maps the IEEE 11073 MeasurementStatus of a metric to OBX-8
//! (`QUES` questionable, `INV` invalid, `TEST`, `DEMO`, `CAL`, ...), and keeps OBX-11 for the result status
//! (`R` unvalidated, `F` validated, `X` for the containment rows). A questionable value is still a result, so
//! OBX-11 stays `R`/`F`/`W`; invalid and test data never get here (ingest refuses them).

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::chart::ChartEntry;
use super::codes::Vital;

pub const PCD01_PROFILE: &str = "IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO";
/// OBR-4 universal service id for device observations.
pub const OBR4_MONITORING: &str = "182777000^monitoring of patient^SCT";
const MDS: (u32, &str) = (69_965, "MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS");
/// OBX-8 flag for a value the device marked questionable (11073 MeasurementStatus `questionable`, PCD-01).
pub const OBX8_QUESTIONABLE: &str = "QUES";
/// OBX-8 flags for a value below / above the applied alarm limits (HL7 table 0078).
pub const OBX8_LOW: &str = "L";
pub const OBX8_HIGH: &str = "H";

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
            // A CR would end the segment, a LF splits it for receivers that tolerate LF endings, and 0x0B/0x1C
            // would break the MLLP frame. HL7 hexadecimal data (`\Xhh\`, the message's character set, here
            // UTF-8) carries every control character instead, so `\n` is `\X0A\` and `\r` is `\X0D\`: distinct,
            // and both come back as they went in. (`\.br\` is formatted-text markup, only valid in FT/TX
            // fields, and independent parsers turn it into CR, so it would not round-trip a LF.)
            c if c.is_control() => {
                let mut utf8 = [0; 4];
                out.push_str("\\X");
                for byte in c.encode_utf8(&mut utf8).bytes() {
                    // Writing to a String cannot fail.
                    let _ = write!(out, "{byte:02X}");
                }
                out.push('\\');
            }
            c => out.push(c),
        }
    }
    out
}

/// The text of an `\Xhh..\` escape (the part between the backslashes, after the `X`): the bytes it spells,
/// when they are whole hex pairs forming UTF-8.
fn hex_data(hex: &str) -> Option<String> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&hex[at..at + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// Reverses [`escape`] in one pass (so an escaped backslash next to a letter is never read as another escape).
/// Hexadecimal data (`\Xhh..\`) is decoded as UTF-8; unknown or malformed escape sequences are kept as they are.
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
            other => {
                if let Some(decoded) = other.strip_prefix('X').and_then(hex_data) {
                    out.push_str(&decoded);
                } else {
                    out.push('\\');
                    out.push_str(other);
                    out.push('\\');
                }
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

/// One segment as a receiver splits it: the segment id and its fields, still escaped. Fields are numbered as
/// HL7 numbers them, from 1: for MSH, field 1 is the field separator itself and field 2 the encoding
/// characters, so `field(10)` is MSH-10 in every segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment<'a> {
    pub id: &'a str,
    fields: Vec<&'a str>,
}

impl<'a> Segment<'a> {
    /// Field `n` (1-based) as sent, `""` when the segment is shorter.
    pub fn field(&self, n: usize) -> &'a str {
        n.checked_sub(1)
            .and_then(|at| self.fields.get(at))
            .copied()
            .unwrap_or_default()
    }

    /// How many fields the segment has (trailing empty fields are not sent, so they do not count).
    pub fn field_count(&self) -> usize {
        self.fields.len()
    }

    /// The components of field `n` (first repetition), unescaped.
    pub fn components(&self, n: usize) -> Vec<String> {
        let field = self.field(n);
        field
            .split('~')
            .next()
            .unwrap_or_default()
            .split('^')
            .map(unescape)
            .collect()
    }

    /// The repetitions of field `n`, unescaped (an empty field has none).
    pub fn repetitions(&self, n: usize) -> Vec<String> {
        let field = self.field(n);
        if field.is_empty() {
            return Vec::new();
        }
        field.split('~').map(unescape).collect()
    }
}

/// Splits a message with the standard delimiters (`|^~\&`) into segments (`\r`-terminated; a `\n` is tolerated
/// as a terminator, which is safe because [`escape`] never leaves one in data). Empty lines are skipped.
pub fn segments(message: &str) -> Vec<Segment<'_>> {
    message
        .split(['\r', '\n'])
        .filter(|line| !line.is_empty())
        .map(|line| {
            let mut parts = line.split('|');
            let id = parts.next().unwrap_or_default();
            let mut fields: Vec<&str> = Vec::new();
            if id == "MSH" {
                // MSH-1 is the separator between "MSH" and MSH-2; it has no text of its own in the split.
                fields.push("|");
            }
            fields.extend(parts);
            Segment { id, fields }
        })
        .collect()
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
    // MSH-1 is the `|` that `segment` puts after the name, so the list starts at MSH-2 and every field keeps
    // its position, empty ones included (an empty MSH-3 must not turn the facility into the application).
    let msh = segment(
        "MSH",
        &[
            "^~\\&",
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
        // The limits that applied to this entry, so OBX-7, OBX-8 and medfleet's breach decision agree.
        let (low, high) = entry.alarm_limits.get(*vital);
        let obx7 = format!("{}-{}", format_value(low), format_value(high));
        let mut flags = Vec::with_capacity(2);
        if *value < low {
            flags.push(OBX8_LOW);
        } else if *value > high {
            flags.push(OBX8_HIGH);
        }
        if entry.questionable {
            flags.push(OBX8_QUESTIONABLE);
        }
        let obx8 = flags.join("~");
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
                &obx8,
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

/// What a receiver answered (MSA-1), with MSA-2 (the control id it acknowledges). The receiver's free text
/// (MSA-3, ERR-8) is not kept: receivers echo patient identifiers in it, and what is not kept cannot be logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acknowledgement {
    pub code: AckCode,
    pub control_id: String,
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
    let error_code = err
        .and_then(|segment| segment.split('|').nth(3))
        .and_then(|field| field.split('^').next())
        .map(|code| code.chars().filter(char::is_ascii_alphanumeric).take(16).collect())
        .unwrap_or_default();
    Ok(Acknowledgement {
        code,
        control_id: unescape(fields.get(2).copied().unwrap_or_default()),
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
    use super::super::alarm::AlarmLimits;
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
            alarm_limits: AlarmLimits::default(),
        }
    }

    fn field<'a>(message: &'a str, segment: &str, nth: usize, index: usize) -> &'a str {
        segments(message)
            .into_iter()
            .filter(|s| s.id == segment)
            .nth(nth)
            .map(|s| s.field(index))
            .unwrap_or_default()
    }

    fn sent() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_001, 0).unwrap_or_default()
    }

    fn heart_rate(value: f64) -> ChartEntry {
        entry(Measurement::Single {
            vital: Vital::HeartRate,
            value,
        })
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
    fn questionable_values_are_flagged_in_obx8() {
        let mut doubted = heart_rate(72.0);
        doubted.questionable = true;
        let message = oru_r01(&doubted, &endpoints(), "MF3", sent());
        assert_eq!(field(&message, "OBX", 3, 8), "QUES");
        // Still a result: OBX-11 keeps the result status, and the containment rows stay unflagged.
        assert_eq!(field(&message, "OBX", 3, 11), "R");
        assert_eq!(field(&message, "OBX", 0, 8), "");
        // Together with a breach, as two repetitions.
        let mut both = heart_rate(150.0);
        both.questionable = true;
        let message = oru_r01(&both, &endpoints(), "MF4", sent());
        let obx = segments(&message).into_iter().filter(|s| s.id == "OBX").nth(3).unwrap();
        assert_eq!(obx.repetitions(8), ["H", "QUES"]);
        // Every row of a panel carries the flag: the doubt is about the cuff inflation.
        let mut panel = entry(Measurement::BloodPressure {
            components: vec![(Vital::NibpSystolic, 120.0), (Vital::NibpDiastolic, 80.0)],
        });
        panel.questionable = true;
        let message = oru_r01(&panel, &endpoints(), "MF5", sent());
        assert_eq!(field(&message, "OBX", 3, 8), "QUES");
        assert_eq!(field(&message, "OBX", 4, 8), "QUES");
        // An undoubted value in range has no flag at all.
        let message = oru_r01(&heart_rate(72.0), &endpoints(), "MF6", sent());
        assert_eq!(field(&message, "OBX", 3, 8), "");
    }

    #[test]
    fn obx7_and_obx8_show_the_limits_that_applied() {
        // No configuration: the adult table.
        let message = oru_r01(&heart_rate(90.0), &endpoints(), "MF7", sent());
        assert_eq!(field(&message, "OBX", 3, 7), "40-140");
        assert_eq!(field(&message, "OBX", 3, 8), "");
        let message = oru_r01(&heart_rate(30.0), &endpoints(), "MF8", sent());
        assert_eq!(field(&message, "OBX", 3, 8), "L");
        // A neonatal monitor: 90 is bradycardia.
        let config = serde_json::json!({"alarm": {"heart_rate": {"low": 100, "high": 180}}});
        let (limits, problems) = AlarmLimits::from_config(&config);
        assert!(problems.is_empty());
        let mut neonatal = heart_rate(90.0);
        neonatal.alarm_limits = limits;
        assert!(limits.breaches(Vital::HeartRate, 90.0));
        let message = oru_r01(&neonatal, &endpoints(), "MF9", sent());
        assert_eq!(field(&message, "OBX", 3, 7), "100-180");
        assert_eq!(field(&message, "OBX", 3, 8), "L");
        neonatal.measurement = Measurement::Single {
            vital: Vital::HeartRate,
            value: 150.0,
        };
        let message = oru_r01(&neonatal, &endpoints(), "MF10", sent());
        assert_eq!(field(&message, "OBX", 3, 8), "", "150 is within the neonatal limits");
        // Fractional limits print without float noise.
        let temperature = entry(Measurement::Single {
            vital: Vital::BodyTemperature,
            value: 38.6,
        });
        let message = oru_r01(&temperature, &endpoints(), "MF11", sent());
        assert_eq!(field(&message, "OBX", 3, 7), "35-38.5");
        assert_eq!(field(&message, "OBX", 3, 8), "H");
    }

    #[test]
    fn msh_fields_keep_their_positions_when_leading_ones_are_empty() {
        let mut names = endpoints();
        names.sending_application = String::new();
        let message = oru_r01(&heart_rate(72.0), &names, "MF12", sent());
        assert!(message.starts_with("MSH|^~\\&||HOSP|EMR|HOSP|"), "{message:?}");
        assert_eq!(field(&message, "MSH", 0, 2), "^~\\&");
        assert_eq!(field(&message, "MSH", 0, 3), "");
        assert_eq!(field(&message, "MSH", 0, 4), "HOSP");
        assert_eq!(field(&message, "MSH", 0, 9), "ORU^R01^ORU_R01");
        assert_eq!(field(&message, "MSH", 0, 10), "MF12");
        assert_eq!(field(&message, "MSH", 0, 21), PCD01_PROFILE);
        let empty = Endpoints {
            sending_application: String::new(),
            sending_facility: String::new(),
            receiving_application: String::new(),
            receiving_facility: String::new(),
        };
        let message = oru_r01(&heart_rate(72.0), &empty, "MF13", sent());
        assert!(message.starts_with("MSH|^~\\&|||||2027"), "{message:?}");
        assert_eq!(field(&message, "MSH", 0, 12), "2.6");
        assert_eq!(segments(&message)[0].field_count(), 21);
    }

    #[test]
    fn line_breaks_round_trip_as_hex_data() {
        assert_eq!(escape("a\nb"), "a\\X0A\\b");
        assert_eq!(escape("a\rb"), "a\\X0D\\b");
        assert_eq!(unescape("a\\X0A\\b"), "a\nb");
        assert_eq!(unescape(&escape("one\r\ntwo\n")), "one\r\ntwo\n");
        // Other control characters (MLLP's 0x0B and 0x1C among them) are carried, not dropped.
        assert_eq!(escape("\u{0B}\u{1C}\t"), "\\X0B\\\\X1C\\\\X09\\");
        assert_eq!(escape("\u{85}"), "\\XC285\\");
        assert_eq!(unescape("\\XC285\\"), "\u{85}");
        // Malformed hex data is kept as it came.
        for odd in ["\\X0\\", "\\XZZ\\", "\\X\\", "\\XFF\\"] {
            assert_eq!(unescape(odd), odd);
        }
    }

    #[test]
    fn acks_parse() {
        let ack = parse_ack("MSH|^~\\&|EMR|HOSP|MEDFLEET|HOSP|20270101||ACK|9|P|2.6\rMSA|AA|MF1\r").unwrap();
        assert_eq!(ack.code, AckCode::Accept);
        assert_eq!(ack.control_id, "MF1");
        let ack = parse_ack("MSH|^~\\&|x\rMSA|AE|MF2|bad \\F\\ thing\r").unwrap();
        assert_eq!(ack.code, AckCode::Error);
        assert_eq!(ack.control_id, "MF2");
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

    /// Printable ASCII with line breaks and tabs: what people type into names, ids and locations.
    const TEXT: &str = "[ -~\\r\\n\\t]{0,24}";
    /// The same without `^`, for the parts of a name (the display name's own `^` separates its components).
    const NAME_PART: &str = "[ -\\]_-~\\r\\n\\t]{0,24}";

    fn text_entry(
        patient: (String, String, Option<String>),
        place: (String, String, Option<String>),
        measurement: Measurement,
        questionable: bool,
    ) -> ChartEntry {
        let mut entry = entry(measurement);
        entry.patient = PatientRef {
            identifier: patient.0,
            authority: patient.1,
            display_name: patient.2,
        };
        entry.point_of_care = Some(PointOfCare {
            site: place.0,
            ward: place.1,
            bed: place.2,
        });
        entry.questionable = questionable;
        entry
    }

    fn measurement() -> impl Strategy<Value = Measurement> {
        prop_oneof![
            (prop::sample::select(Vital::ALL.to_vec()), 0.0f64..300.0)
                .prop_map(|(vital, value)| Measurement::Single { vital, value }),
            (60.0f64..200.0, 30.0f64..120.0).prop_map(|(sys, dia)| Measurement::BloodPressure {
                components: vec![(Vital::NibpSystolic, sys), (Vital::NibpDiastolic, dia)],
            }),
        ]
    }

    proptest! {
        // No data can add a field, component, repetition or segment: escaped text contains no delimiter and no
        // control character, and unescaping gives back exactly what went in.
        #[test]
        fn escaping_is_total_and_reversible(text in "[ -~\\r\\n\\t\\u{0}-\\u{1f}\\u{7f}-\\u{a0}é€]{0,64}") {
            let escaped = escape(&text);
            prop_assert!(!escaped.contains(['|', '^', '~', '&', '\r', '\n']));
            prop_assert!(!escaped.chars().any(char::is_control));
            prop_assert_eq!(unescape(&escaped), text);
        }

        // A whole message, read back with this module's parser: every segment is where PCD-01 puts it, every
        // segment has the fields it was built with, and every escaped field reads back as the text that went in.
        #[test]
        fn messages_round_trip_through_the_parser(
            names in prop::array::uniform4(TEXT),
            control in TEXT,
            patient in (TEXT, TEXT, prop::option::of((NAME_PART, NAME_PART))),
            place in (TEXT, TEXT, prop::option::of(TEXT)),
            measurement in measurement(),
            questionable in any::<bool>(),
        ) {
            let [sending_application, sending_facility, receiving_application, receiving_facility] = names;
            let endpoints = Endpoints { sending_application, sending_facility, receiving_application, receiving_facility };
            // PID-5 is `family^given`: the name's own `^` is the component separator, so build it from parts.
            let display_name = patient.2.as_ref().map(|(family, given)| format!("{family}^{given}"));
            let entry = text_entry(
                (patient.0.clone(), patient.1.clone(), display_name),
                place.clone(),
                measurement.clone(),
                questionable,
            );
            let message = oru_r01(&entry, &endpoints, &control, sent());
            prop_assert!(message.ends_with('\r'));
            prop_assert_eq!(message.matches('\r').count(), segments(&message).len(), "one CR per segment");
            prop_assert!(!message.contains('\n'));
            let parsed = segments(&message);
            let ids: Vec<&str> = parsed.iter().map(|s| s.id).collect();
            let values = measurement.values();
            let mut expected = vec!["MSH", "PID", "PV1", "OBR"];
            expected.extend(std::iter::repeat_n("OBX", 3 + values.len()));
            prop_assert_eq!(ids, expected);

            let msh = &parsed[0];
            prop_assert_eq!(msh.field_count(), 21);
            prop_assert_eq!(msh.field(1), "|");
            prop_assert_eq!(msh.field(2), "^~\\&");
            prop_assert_eq!(&unescape(msh.field(3)), &endpoints.sending_application);
            prop_assert_eq!(&unescape(msh.field(4)), &endpoints.sending_facility);
            prop_assert_eq!(&unescape(msh.field(5)), &endpoints.receiving_application);
            prop_assert_eq!(&unescape(msh.field(6)), &endpoints.receiving_facility);
            prop_assert_eq!(msh.field(9), "ORU^R01^ORU_R01");
            prop_assert_eq!(&unescape(msh.field(10)), &control);
            prop_assert_eq!(msh.field(12), "2.6");
            prop_assert_eq!(msh.field(21), PCD01_PROFILE);

            let pid = &parsed[1];
            prop_assert_eq!(pid.components(3), vec![patient.0.clone(), String::new(), String::new(), patient.1.clone(), "MR".to_owned()]);
            if let Some((family, given)) = &patient.2 {
                prop_assert_eq!(pid.field_count(), 5);
                prop_assert_eq!(pid.components(5), vec![family.clone(), given.clone()]);
            } else {
                prop_assert_eq!(pid.field_count(), 3);
            }

            let pv1 = &parsed[2];
            prop_assert_eq!(pv1.field_count(), 3);
            prop_assert_eq!(pv1.field(2), "I");
            let bed = place.2.clone().unwrap_or_default();
            prop_assert_eq!(pv1.components(3), vec![place.1.clone(), String::new(), bed, place.0.clone()]);

            for (row, obx) in parsed[4..].iter().enumerate() {
                prop_assert_eq!(obx.field_count(), 18);
                prop_assert_eq!(obx.field(1), (row + 1).to_string());
                prop_assert_eq!(obx.field(14), timestamp(entry.observed_at));
                if row < 3 {
                    prop_assert_eq!(obx.field(11), "X");
                    prop_assert_eq!(obx.field(8), "");
                } else {
                    let (vital, value) = values[row - 3];
                    prop_assert_eq!(obx.field(2), "NM");
                    prop_assert_eq!(obx.field(5).parse::<f64>().ok(), Some(value));
                    let (low, high) = entry.alarm_limits.get(vital);
                    prop_assert_eq!(obx.field(7), format!("{}-{}", format_value(low), format_value(high)));
                    let flags = obx.repetitions(8);
                    prop_assert_eq!(flags.iter().any(|f| f == "QUES"), questionable);
                    prop_assert_eq!(flags.iter().any(|f| f == "L" || f == "H"), entry.alarm_limits.breaches(vital, value));
                    prop_assert_eq!(obx.field(11), "R");
                }
            }
        }
    }
}
