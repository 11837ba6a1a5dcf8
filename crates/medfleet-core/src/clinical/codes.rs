//! The vital signs medfleet charts: IEEE 11073-10101 (MDC) metric and unit codes, LOINC and UCUM, and the vendor
//! variants a gateway meets in the field (normalised here, once, so nothing downstream sees them).

use std::fmt;

/// MDC numeric codes are `partition × 65536 + term`; the vital-signs metrics live in partition 2 (SCADA).
pub const MDC_PARTITION_SCADA: u32 = 2;
/// Units live in partition 4 (DIM).
pub const MDC_PARTITION_DIM: u32 = 4;

/// The numeric vitals medfleet accepts from devices. Anything else is refused at ingest with a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Vital {
    HeartRate,
    PulseRate,
    SpO2,
    NibpSystolic,
    NibpDiastolic,
    NibpMean,
    BodyTemperature,
    RespiratoryRate,
}

/// Everything the mappers need to know about one vital, from the standards' tables.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VitalInfo {
    pub vital: Vital,
    /// The canonical MDC metric code and its reference id.
    pub mdc_code: u32,
    pub mdc_refid: &'static str,
    pub mdc_unit_code: u32,
    pub mdc_unit_refid: &'static str,
    pub loinc: &'static str,
    pub loinc_display: &'static str,
    pub ucum: &'static str,
    /// Human-readable UCUM unit, as FHIR's `valueQuantity.unit`.
    pub unit_display: &'static str,
    /// Values outside this closed range are physiologically implausible and are never charted.
    pub plausible: (f64, f64),
}

const TABLE: [VitalInfo; 8] = [
    VitalInfo {
        vital: Vital::HeartRate,
        mdc_code: 147_842,
        mdc_refid: "MDC_ECG_HEART_RATE",
        mdc_unit_code: 264_864,
        mdc_unit_refid: "MDC_DIM_BEAT_PER_MIN",
        loinc: "8867-4",
        loinc_display: "Heart rate",
        ucum: "/min",
        unit_display: "beats/minute",
        plausible: (0.0, 350.0),
    },
    VitalInfo {
        vital: Vital::PulseRate,
        mdc_code: 149_530,
        mdc_refid: "MDC_PULS_OXIM_PULS_RATE",
        mdc_unit_code: 264_864,
        mdc_unit_refid: "MDC_DIM_BEAT_PER_MIN",
        loinc: "8889-8",
        loinc_display: "Heart rate by Pulse oximetry",
        ucum: "/min",
        unit_display: "beats/minute",
        plausible: (0.0, 350.0),
    },
    VitalInfo {
        vital: Vital::SpO2,
        mdc_code: 150_456,
        mdc_refid: "MDC_PULS_OXIM_SAT_O2",
        mdc_unit_code: 262_688,
        mdc_unit_refid: "MDC_DIM_PERCENT",
        loinc: "59408-5",
        loinc_display: "Oxygen saturation in Arterial blood by Pulse oximetry",
        ucum: "%",
        unit_display: "%",
        plausible: (0.0, 100.0),
    },
    VitalInfo {
        vital: Vital::NibpSystolic,
        mdc_code: 150_021,
        mdc_refid: "MDC_PRESS_BLD_NONINV_SYS",
        mdc_unit_code: 266_016,
        mdc_unit_refid: "MDC_DIM_MMHG",
        loinc: "8480-6",
        loinc_display: "Systolic blood pressure",
        ucum: "mm[Hg]",
        unit_display: "mmHg",
        plausible: (10.0, 300.0),
    },
    VitalInfo {
        vital: Vital::NibpDiastolic,
        mdc_code: 150_022,
        mdc_refid: "MDC_PRESS_BLD_NONINV_DIA",
        mdc_unit_code: 266_016,
        mdc_unit_refid: "MDC_DIM_MMHG",
        loinc: "8462-4",
        loinc_display: "Diastolic blood pressure",
        ucum: "mm[Hg]",
        unit_display: "mmHg",
        plausible: (5.0, 250.0),
    },
    VitalInfo {
        vital: Vital::NibpMean,
        mdc_code: 150_023,
        mdc_refid: "MDC_PRESS_BLD_NONINV_MEAN",
        mdc_unit_code: 266_016,
        mdc_unit_refid: "MDC_DIM_MMHG",
        loinc: "8478-0",
        loinc_display: "Mean blood pressure",
        ucum: "mm[Hg]",
        unit_display: "mmHg",
        plausible: (5.0, 280.0),
    },
    VitalInfo {
        vital: Vital::BodyTemperature,
        mdc_code: 150_364,
        mdc_refid: "MDC_TEMP_BODY",
        mdc_unit_code: 268_192,
        mdc_unit_refid: "MDC_DIM_DEGC",
        loinc: "8310-5",
        loinc_display: "Body temperature",
        ucum: "Cel",
        unit_display: "C",
        plausible: (20.0, 46.0),
    },
    VitalInfo {
        vital: Vital::RespiratoryRate,
        mdc_code: 151_562,
        mdc_refid: "MDC_RESP_RATE",
        mdc_unit_code: 264_928,
        mdc_unit_refid: "MDC_DIM_RESP_PER_MIN",
        loinc: "9279-1",
        loinc_display: "Respiratory rate",
        ucum: "/min",
        unit_display: "breaths/minute",
        plausible: (0.0, 150.0),
    },
];

/// The blood-pressure panel that groups systolic, diastolic and mean taken by one cuff inflation.
pub const NIBP_PANEL_MDC: u32 = 150_020;
pub const NIBP_PANEL_MDC_REFID: &str = "MDC_PRESS_BLD_NONINV";
pub const NIBP_PANEL_LOINC: &str = "85354-9";
pub const NIBP_PANEL_LOINC_DISPLAY: &str = "Blood pressure panel with all children optional";

impl Vital {
    pub const ALL: [Vital; 8] = [
        Vital::HeartRate,
        Vital::PulseRate,
        Vital::SpO2,
        Vital::NibpSystolic,
        Vital::NibpDiastolic,
        Vital::NibpMean,
        Vital::BodyTemperature,
        Vital::RespiratoryRate,
    ];

    pub fn info(self) -> &'static VitalInfo {
        // The table is in `ALL` order; the match keeps that tie checked by the compiler rather than by an index.
        let index = match self {
            Vital::HeartRate => 0,
            Vital::PulseRate => 1,
            Vital::SpO2 => 2,
            Vital::NibpSystolic => 3,
            Vital::NibpDiastolic => 4,
            Vital::NibpMean => 5,
            Vital::BodyTemperature => 6,
            Vital::RespiratoryRate => 7,
        };
        &TABLE[index]
    }

    /// The canonical vital for an MDC metric code, including the vendor variants the reference lists.
    pub fn from_mdc(code: u32) -> Option<Vital> {
        Some(match code {
            // MDC_ECG_CARD_BEAT_RATE is an alias of the same term.
            147_842 => Vital::HeartRate,
            149_530 => Vital::PulseRate,
            150_456 => Vital::SpO2,
            // Some monitors report the cuff pressures (MDC_PRESS_CUFF_*) instead of NONINV.
            150_021 | 150_301 => Vital::NibpSystolic,
            150_022 | 150_302 => Vital::NibpDiastolic,
            150_023 | 150_303 => Vital::NibpMean,
            // Many monitors send the generic MDC_TEMP.
            150_364 | 150_344 => Vital::BodyTemperature,
            151_562 => Vital::RespiratoryRate,
            _ => return None,
        })
    }

    /// The vital's stable snake_case name in device configuration (`alarm.<name>.low`). Configuration written
    /// by people outlives this enum's Rust names, so these strings never change once released.
    pub fn config_name(self) -> &'static str {
        match self {
            Vital::HeartRate => "heart_rate",
            Vital::PulseRate => "pulse_rate",
            Vital::SpO2 => "spo2",
            Vital::NibpSystolic => "nibp_systolic",
            Vital::NibpDiastolic => "nibp_diastolic",
            Vital::NibpMean => "nibp_mean",
            Vital::BodyTemperature => "body_temperature",
            Vital::RespiratoryRate => "respiratory_rate",
        }
    }

    /// The vital a configuration name (see [`Vital::config_name`]) stands for.
    pub fn from_config_name(name: &str) -> Option<Vital> {
        Vital::ALL.into_iter().find(|vital| vital.config_name() == name)
    }

    /// True for the members of the NIBP panel.
    pub fn is_blood_pressure(self) -> bool {
        matches!(self, Vital::NibpSystolic | Vital::NibpDiastolic | Vital::NibpMean)
    }

    /// Whether `unit` names this vital's unit: the MDC unit code (decimal), its REFID, or the UCUM code (some
    /// devices put UCUM where the MDC unit belongs).
    pub fn accepts_unit(self, unit: &str) -> bool {
        let info = self.info();
        let unit = unit.trim();
        unit == info.ucum
            || unit.eq_ignore_ascii_case(info.mdc_unit_refid)
            || unit.parse::<u32>().is_ok_and(|code| code == info.mdc_unit_code)
            // `mmHg` is what people and several devices write for mm[Hg].
            || (info.ucum == "mm[Hg]" && unit == "mmHg")
    }
}

impl fmt::Display for Vital {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.info().mdc_refid)
    }
}

/// Parses the code forms devices send: a decimal MDC code (`147842`), a REFID (`MDC_ECG_HEART_RATE`), or a legacy
/// Philips MDIL `partition-term` pair in hex (`0002-4182`).
pub fn parse_mdc_code(text: &str) -> Option<u32> {
    let text = text.trim();
    if let Ok(code) = text.parse::<u32>() {
        return Some(code);
    }
    if let Some((partition, term)) = text.split_once('-') {
        let partition = u32::from_str_radix(partition, 16).ok()?;
        let term = u32::from_str_radix(term, 16).ok()?;
        if partition > 0xFFFF || term > 0xFFFF {
            return None;
        }
        return Some(partition * 65_536 + term);
    }
    let refid = text.to_ascii_uppercase();
    match refid.as_str() {
        "MDC_ECG_CARD_BEAT_RATE" => Some(147_842),
        "MDC_PRESS_CUFF_SYS" => Some(150_301),
        "MDC_PRESS_CUFF_DIA" => Some(150_302),
        "MDC_PRESS_CUFF_MEAN" => Some(150_303),
        "MDC_TEMP" => Some(150_344),
        _ => TABLE
            .iter()
            .find(|info| info.mdc_refid == refid)
            .map(|info| info.mdc_code),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_codes_follow_the_partition_rule() {
        for vital in Vital::ALL {
            let info = vital.info();
            assert_eq!(info.vital, vital);
            assert_eq!(info.mdc_code / 65_536, MDC_PARTITION_SCADA, "{vital}");
            assert_eq!(info.mdc_unit_code / 65_536, MDC_PARTITION_DIM, "{vital}");
            assert_eq!(Vital::from_mdc(info.mdc_code), Some(vital));
            assert_eq!(parse_mdc_code(info.mdc_refid), Some(info.mdc_code));
            assert!(vital.accepts_unit(info.ucum));
            assert!(vital.accepts_unit(&info.mdc_unit_code.to_string()));
            assert!(vital.accepts_unit(info.mdc_unit_refid));
        }
    }

    #[test]
    fn config_names_are_unique_and_round_trip() {
        let names: std::collections::BTreeSet<_> = Vital::ALL.iter().map(|v| v.config_name()).collect();
        assert_eq!(names.len(), Vital::ALL.len());
        for vital in Vital::ALL {
            assert_eq!(Vital::from_config_name(vital.config_name()), Some(vital));
        }
        assert_eq!(Vital::from_config_name("HeartRate"), None);
    }

    #[test]
    fn vendor_variants_normalise() {
        assert_eq!(parse_mdc_code("0002-4182"), Some(147_842));
        assert_eq!(Vital::from_mdc(150_301), Some(Vital::NibpSystolic));
        assert_eq!(Vital::from_mdc(150_302), Some(Vital::NibpDiastolic));
        assert_eq!(Vital::from_mdc(150_303), Some(Vital::NibpMean));
        assert_eq!(Vital::from_mdc(150_344), Some(Vital::BodyTemperature));
        assert_eq!(
            parse_mdc_code("MDC_ECG_CARD_BEAT_RATE").and_then(Vital::from_mdc),
            Some(Vital::HeartRate)
        );
        assert!(Vital::NibpSystolic.accepts_unit("mmHg"));
        assert!(!Vital::HeartRate.accepts_unit("%"));
        assert!(!Vital::BodyTemperature.accepts_unit("[degF]"));
        assert_eq!(parse_mdc_code("ZZZZ-1"), None);
        assert_eq!(parse_mdc_code("10000-1"), None);
        assert_eq!(Vital::from_mdc(1), None);
    }
}
