//! The device registry model: the location tree (site → ward → bed) and devices, with their validation rules.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::validation::{Violations, check_slug, check_text, printable};

pub const MAX_DISPLAY_NAME: usize = 200;
pub const MAX_BEDS_PER_WARD: usize = 500;
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_VALUE: usize = 128;
pub const MAX_SERIAL: usize = 64;
pub const MAX_MANUFACTURER: usize = 100;
pub const MAX_MODEL: usize = 100;

/// A site: one hospital campus, the top of the location tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub name: String,
    pub display_name: String,
    /// The IANA time zone the campus keeps (maintenance windows are read in it).
    pub timezone: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSite {
    pub name: String,
    pub display_name: String,
    pub timezone: String,
}

/// The time zone of a site that names none.
pub const DEFAULT_TIMEZONE: &str = "UTC";

/// An IANA region time zone (`Europe/London`, or `UTC`), as chrono-tz knows it.
pub fn check_timezone(text: &str) -> Result<(), String> {
    // Region names only: `Etc/GMT+5` is UTC-5 by POSIX's reversed sign, and abbreviations such as `EST` ignore
    // daylight saving — both would read a maintenance window at the wrong hour.
    let region = text == "UTC" || (text.contains('/') && !text.starts_with("Etc/"));
    if region && text.parse::<chrono_tz::Tz>().is_ok() {
        Ok(())
    } else {
        Err(format!(
            "{:?} is not an IANA region time zone; write one such as Europe/London or America/New_York (or UTC)",
            printable(text)
        ))
    }
}

impl NewSite {
    /// An empty `timezone` is UTC.
    pub fn parse(name: &str, display_name: &str, timezone: &str) -> Result<Self, Violations> {
        let mut v = Violations::new();
        v.check("site.name", check_slug(name));
        v.check("site.display_name", check_text(display_name, MAX_DISPLAY_NAME));
        let timezone = if timezone.is_empty() {
            DEFAULT_TIMEZONE
        } else {
            timezone
        };
        v.check("site.timezone", check_timezone(timezone));
        v.finish(|| {
            Some(Self {
                name: name.to_owned(),
                display_name: display_name.to_owned(),
                timezone: timezone.to_owned(),
            })
        })
    }
}

/// What an update of a site changes (the fields its mask names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteUpdate {
    pub name: String,
    pub display_name: Option<String>,
    pub timezone: Option<String>,
}

/// A ward inside a site; `<site>/<ward>` is the scope that access rules use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ward {
    pub site: String,
    pub name: String,
    pub display_name: String,
    pub beds: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Ward {
    pub fn scope(&self) -> String {
        format!("{}/{}", self.site, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewWard {
    pub site: String,
    pub name: String,
    pub display_name: String,
    pub beds: Vec<String>,
}

impl NewWard {
    pub fn parse(site: &str, name: &str, display_name: &str, beds: &[String]) -> Result<Self, Violations> {
        let mut v = Violations::new();
        v.check("ward.site", check_slug(site));
        v.check("ward.name", check_slug(name));
        v.check("ward.display_name", check_text(display_name, MAX_DISPLAY_NAME));
        let beds = check_beds(&mut v, "ward.beds", beds);
        v.finish(|| {
            Some(Self {
                site: site.to_owned(),
                name: name.to_owned(),
                display_name: display_name.to_owned(),
                beds: beds?,
            })
        })
    }
}

/// Validates a ward's bed list: each label valid, no duplicates, bounded. Keeps the caller's order.
pub fn check_beds(v: &mut Violations, field: &str, beds: &[String]) -> Option<Vec<String>> {
    let before = v.clone();
    if beds.len() > MAX_BEDS_PER_WARD {
        v.push(field, format!("a ward has at most {MAX_BEDS_PER_WARD} beds"));
    }
    let mut seen = BTreeSet::new();
    for (i, bed) in beds.iter().enumerate() {
        let item = format!("{field}[{i}]");
        if v.check(&item, check_bed(bed)).is_some() && !seen.insert(bed.as_str()) {
            v.push(item, format!("bed '{bed}' is listed twice"));
        }
    }
    (v == &before).then(|| beds.to_vec())
}

/// A bed label: 1–32 ASCII letters, digits, `-`, `_`, `.`, starting with a letter or digit.
pub fn check_bed(bed: &str) -> Result<(), String> {
    let valid = !bed.is_empty()
        && bed.len() <= 32
        && bed.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bed
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "bed '{}' is not valid; use 1-32 letters, digits, '-', '_' or '.', starting with a letter or digit",
            printable(bed)
        ))
    }
}

/// What kind of bedside device this is; decides which readings and configuration schema apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceClass {
    PatientMonitor,
    InfusionPump,
    Ventilator,
    PulseOximeter,
    AnesthesiaWorkstation,
    Other,
}

impl DeviceClass {
    pub const ALL: [Self; 6] = [
        Self::PatientMonitor,
        Self::InfusionPump,
        Self::Ventilator,
        Self::PulseOximeter,
        Self::AnesthesiaWorkstation,
        Self::Other,
    ];

    /// Stable storage and CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PatientMonitor => "patient-monitor",
            Self::InfusionPump => "infusion-pump",
            Self::Ventilator => "ventilator",
            Self::PulseOximeter => "pulse-oximeter",
            Self::AnesthesiaWorkstation => "anesthesia-workstation",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for DeviceClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeviceClass {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|c| c.as_str()).collect();
            format!(
                "unknown device class '{}'; use one of {}",
                printable(s),
                names.join(", ")
            )
        })
    }
}

/// Lifecycle: registered → enrolled → active → decommissioned. Decommissioned is terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceState {
    Registered,
    Enrolled,
    Active,
    Decommissioned,
}

impl DeviceState {
    pub const ALL: [Self; 4] = [Self::Registered, Self::Enrolled, Self::Active, Self::Decommissioned];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::Enrolled => "enrolled",
            Self::Active => "active",
            Self::Decommissioned => "decommissioned",
        }
    }

    /// Whether the lifecycle allows moving from `self` to `next`. Re-enrolment (a replaced certificate) keeps a
    /// device enrolled or active; nothing leaves decommissioned.
    pub fn can_become(self, next: Self) -> bool {
        use DeviceState::{Active, Decommissioned, Enrolled, Registered};
        matches!(
            (self, next),
            (Registered, Enrolled | Decommissioned) | (Enrolled | Active, Enrolled | Active | Decommissioned)
        )
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeviceState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|c| c.as_str()).collect();
            format!(
                "unknown device state '{}'; use one of {}",
                printable(s),
                names.join(", ")
            )
        })
    }
}

/// An IEEE EUI-64, normalised to upper-case hex pairs joined by `-` (the IEEE 11073 / PCD-01 spelling).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Eui64(String);

impl Eui64 {
    pub fn parse(input: &str) -> Result<Self, String> {
        let err = || {
            format!(
                "'{}' is not an EUI-64; use 16 hex digits, optionally as 8 pairs separated by ':' or '-'",
                printable(input)
            )
        };
        let hex: String = if input.len() == 16 {
            input.to_owned()
        } else if input.len() == 23 {
            let sep = input.as_bytes()[2];
            if sep != b':' && sep != b'-' {
                return Err(err());
            }
            let parts: Vec<&str> = input.split(sep as char).collect();
            if parts.len() != 8 || parts.iter().any(|p| p.len() != 2) {
                return Err(err());
            }
            parts.concat()
        } else {
            return Err(err());
        };
        if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(err());
        }
        let hex = hex.to_ascii_uppercase();
        if hex.chars().all(|c| c == '0') || hex.chars().all(|c| c == 'F') {
            return Err(format!(
                "'{}' is a reserved EUI-64 (all zeros or all ones)",
                printable(input)
            ));
        }
        let pairs: Vec<&str> = (0..8).map(|i| &hex[i * 2..i * 2 + 2]).collect();
        Ok(Self(pairs.join("-")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Eui64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a device stands. `bed` must be one of the ward's beds; that is checked against stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub site: String,
    pub ward: String,
    pub bed: Option<String>,
}

impl Location {
    /// `None` for an all-empty location (the device is in storage).
    pub fn parse(v: &mut Violations, field: &str, site: &str, ward: &str, bed: &str) -> Option<Option<Self>> {
        if site.is_empty() && ward.is_empty() && bed.is_empty() {
            return Some(None);
        }
        let site_ok = v.check(&format!("{field}.site"), check_slug(site)).is_some();
        let ward_ok = v.check(&format!("{field}.ward"), check_slug(ward)).is_some();
        let bed_ok = bed.is_empty() || v.check(&format!("{field}.bed"), check_bed(bed)).is_some();
        (site_ok && ward_ok && bed_ok).then(|| {
            Some(Self {
                site: site.to_owned(),
                ward: ward.to_owned(),
                bed: (!bed.is_empty()).then(|| bed.to_owned()),
            })
        })
    }

    pub fn scope(&self) -> String {
        format!("{}/{}", self.site, self.ward)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.site, self.ward)?;
        if let Some(bed) = &self.bed {
            write!(f, "/{bed}")?;
        }
        Ok(())
    }
}

/// Validated `key=value` labels used to select devices (rollout targets, filters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags(BTreeMap<String, String>);

impl Tags {
    pub fn parse<'a>(
        v: &mut Violations,
        field: &str,
        tags: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Option<Self> {
        let before = v.clone();
        let map: BTreeMap<String, String> = tags.into_iter().map(|(k, val)| (k.clone(), val.clone())).collect();
        if map.len() > MAX_TAGS {
            v.push(field, format!("a device has at most {MAX_TAGS} tags"));
        }
        for (key, value) in &map {
            v.check(&format!("{field}[{}]", printable(key)), check_tag(key, value));
        }
        (v == &before).then_some(Self(map))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }

    pub fn into_inner(self) -> BTreeMap<String, String> {
        self.0
    }

    pub fn from_stored(map: BTreeMap<String, String>) -> Self {
        Self(map)
    }
}

/// Tag key: lowercase letter first, then lowercase letters, digits, `_`, `.`, `-` (≤ 63). Value: ≤ 128 chars, no
/// control characters (may be empty).
pub fn check_tag(key: &str, value: &str) -> Result<(), String> {
    let key_ok = !key.is_empty()
        && key.len() <= 63
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'));
    if !key_ok {
        return Err(format!(
            "tag key '{}' is not valid; use 1-63 lowercase letters, digits, '_', '.', '-', starting with a letter",
            printable(key)
        ));
    }
    if value.chars().count() > MAX_TAG_VALUE {
        return Err(format!("tag value is longer than {MAX_TAG_VALUE} characters"));
    }
    if value.chars().any(char::is_control) {
        return Err("tag value must not contain control characters".to_owned());
    }
    Ok(())
}

/// Parses one `key=value` filter term.
pub fn parse_tag_term(term: &str) -> Result<(String, String), String> {
    let (key, value) = term
        .split_once('=')
        .ok_or_else(|| format!("'{}' is not a key=value term", printable(term)))?;
    check_tag(key, value)?;
    Ok((key.to_owned(), value.to_owned()))
}

/// Serial number: 1–64 ASCII letters, digits and `.`, `_`, `-`, `/`, `:`.
pub fn check_serial(serial: &str) -> Result<(), String> {
    if serial.is_empty() {
        return Err("is required".to_owned());
    }
    let valid = serial.len() <= MAX_SERIAL
        && serial
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "'{}' is not valid; use 1-{MAX_SERIAL} letters, digits, '.', '_', '-', '/' or ':'",
            printable(serial)
        ))
    }
}

/// A device as hospital IT registers it, before it has an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDevice {
    pub serial_number: String,
    pub manufacturer: String,
    pub model: String,
    pub class: DeviceClass,
    pub eui64: Option<Eui64>,
    pub location: Option<Location>,
    pub tags: Tags,
}

/// The raw fields of a registration, as they arrive from any front end.
#[derive(Debug, Clone, Default)]
pub struct DeviceFields<'a> {
    pub serial_number: &'a str,
    pub manufacturer: &'a str,
    pub model: &'a str,
    /// `None` when the class was not given or not recognised.
    pub class: Option<DeviceClass>,
    /// The number a front end received for the class when it was not one this build knows (then `class` is
    /// `None`): the violation says "unknown value N" instead of claiming that no class was given.
    pub unknown_class: Option<i32>,
    pub eui64: &'a str,
    pub location: Option<(&'a str, &'a str, &'a str)>,
}

impl NewDevice {
    pub fn parse<'a>(
        fields: &DeviceFields<'_>,
        tags: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Self, Violations> {
        let mut v = Violations::new();
        v.check("serial_number", check_serial(fields.serial_number));
        v.check("manufacturer", check_text(fields.manufacturer, MAX_MANUFACTURER));
        v.check("model", check_text(fields.model, MAX_MODEL));
        match (fields.class, fields.unknown_class) {
            (Some(_), _) => {}
            (None, Some(number)) => v.push(
                "device_class",
                format!("unknown value {number}; choose one of the device classes this server knows"),
            ),
            (None, None) => v.push("device_class", "is required; choose the device's class"),
        }
        let eui64 = if fields.eui64.is_empty() {
            Some(None)
        } else {
            v.check("eui64", Eui64::parse(fields.eui64)).map(Some)
        };
        let location = match fields.location {
            Some((site, ward, bed)) => Location::parse(&mut v, "location", site, ward, bed),
            None => Some(None),
        };
        let tags = Tags::parse(&mut v, "tags", tags);
        v.finish(|| {
            Some(Self {
                serial_number: fields.serial_number.to_owned(),
                manufacturer: fields.manufacturer.to_owned(),
                model: fields.model.to_owned(),
                class: fields.class?,
                eui64: eui64?,
                location: location?,
                tags: tags?,
            })
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: Uuid,
    pub serial_number: String,
    pub manufacturer: String,
    pub model: String,
    pub class: DeviceClass,
    pub eui64: Option<Eui64>,
    pub location: Option<Location>,
    pub tags: Tags,
    pub state: DeviceState,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A partial update of a device; `None` leaves the field alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceUpdate {
    /// `Some(None)` moves the device to storage.
    pub location: Option<Option<Location>>,
    pub tags: Option<Tags>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WardUpdate {
    pub display_name: Option<String>,
    pub beds: Option<Vec<String>>,
}

/// Filters of a device listing; every given filter must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFilter {
    pub site: Option<String>,
    pub ward: Option<String>,
    pub model: Option<String>,
    pub state: Option<DeviceState>,
    pub tags: Vec<(String, String)>,
    /// Only devices with (true) or without (false) an open session.
    pub online: Option<bool>,
}

impl DeviceFilter {
    pub fn parse(
        site: &str,
        ward: &str,
        model: &str,
        state: Option<DeviceState>,
        tags: &[String],
    ) -> Result<Self, Violations> {
        let mut v = Violations::new();
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        if !site.is_empty() {
            v.check("site", check_slug(site));
        }
        if !ward.is_empty() {
            v.check("ward", check_slug(ward));
            if site.is_empty() {
                v.push(
                    "ward",
                    "a ward filter needs the site too (ward names are unique only within a site)",
                );
            }
        }
        if !model.is_empty() {
            v.check("model", check_text(model, MAX_MODEL));
        }
        let mut terms = Vec::new();
        for (i, term) in tags.iter().enumerate() {
            if let Some(t) = v.check(&format!("tags[{i}]"), parse_tag_term(term)) {
                terms.push(t);
            }
        }
        terms.sort();
        terms.dedup();
        v.finish(|| {
            Some(Self {
                site: non_empty(site),
                ward: non_empty(ward),
                model: non_empty(model),
                state,
                tags: terms,
                online: None,
            })
        })
    }

    /// A stable description of the filter, bound into page tokens so a token cannot be replayed on a different
    /// listing.
    pub fn fingerprint(&self) -> String {
        let tags: Vec<String> = self.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "site={:?};ward={:?};model={:?};state={:?};tags={:?};online={:?}",
            self.site,
            self.ward,
            self.model,
            self.state.map(DeviceState::as_str),
            tags,
            self.online
        )
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn only_region_time_zones_are_accepted() {
        for good in [
            "UTC",
            "Europe/London",
            "Asia/Kathmandu",
            "America/Argentina/Buenos_Aires",
        ] {
            assert_eq!(check_timezone(good), Ok(()), "{good}");
        }
        for bad in ["", "EST", "Etc/GMT+5", "GMT", "Mars/Olympus", "europe/london"] {
            assert!(check_timezone(bad).is_err(), "{bad}");
        }
    }

    fn fields<'a>() -> DeviceFields<'a> {
        DeviceFields {
            serial_number: "SN-0001",
            manufacturer: "Philips",
            model: "IntelliVue MX450",
            class: Some(DeviceClass::PatientMonitor),
            unknown_class: None,
            eui64: "",
            location: None,
        }
    }

    #[test]
    fn eui64_normalises_all_spellings() {
        for input in ["0012a3fffe4b5c6d", "00:12:A3:FF:FE:4B:5C:6D", "00-12-a3-ff-fe-4b-5c-6d"] {
            assert_eq!(
                Eui64::parse(input).map(|e| e.to_string()),
                Ok("00-12-A3-FF-FE-4B-5C-6D".to_owned())
            );
        }
        for bad in [
            "",
            "0012a3fffe4b5c6",
            "0012a3fffe4b5c6dz",
            "00:12-a3:ff:fe:4b:5c:6d",
            "00.12.a3.ff.fe.4b.5c.6d",
            "0g12a3fffe4b5c6d",
            "0000000000000000",
            "FFFFFFFFFFFFFFFF",
            "001:2a3:ff:fe:4b:5c:6d:",
        ] {
            assert!(Eui64::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn device_collects_all_problems() {
        let tags: BTreeMap<String, String> = [("Bad Key".to_owned(), "x".to_owned())].into();
        let f = DeviceFields {
            serial_number: "",
            manufacturer: " Philips",
            model: "",
            class: None,
            unknown_class: None,
            eui64: "nope",
            location: Some(("StMarys", "", "bed 1")),
        };
        let err = NewDevice::parse(&f, &tags).unwrap_err();
        let fields: Vec<_> = err.iter().map(|f| f.field.clone()).collect();
        assert_eq!(
            fields,
            [
                "serial_number",
                "manufacturer",
                "model",
                "device_class",
                "eui64",
                "location.site",
                "location.ward",
                "location.bed",
                "tags[Bad Key]"
            ]
        );
    }

    #[test]
    fn unknown_class_is_not_reported_as_missing() {
        let mut f = fields();
        f.class = None;
        f.unknown_class = Some(42);
        let err = NewDevice::parse(&f, &BTreeMap::new()).unwrap_err();
        let descriptions: Vec<_> = err.iter().map(|v| (v.field.as_str(), v.description.as_str())).collect();
        assert_eq!(descriptions.len(), 1);
        assert_eq!(descriptions[0].0, "device_class");
        assert!(descriptions[0].1.starts_with("unknown value 42"), "{descriptions:?}");
        f.unknown_class = None;
        let err = NewDevice::parse(&f, &BTreeMap::new()).unwrap_err();
        assert!(err.iter().any(|v| v.description.starts_with("is required")));
    }

    #[test]
    fn device_valid_with_location_and_tags() {
        let tags: BTreeMap<String, String> = [("asset".to_owned(), "A-17".to_owned())].into();
        let mut f = fields();
        f.location = Some(("stmarys", "icu", "bed-3"));
        f.eui64 = "0012a3fffe4b5c6d";
        let d = NewDevice::parse(&f, &tags).unwrap();
        assert_eq!(d.location.unwrap().to_string(), "stmarys/icu/bed-3");
        assert_eq!(d.eui64.unwrap().as_str(), "00-12-A3-FF-FE-4B-5C-6D");
    }

    #[test]
    fn empty_location_means_storage() {
        let mut f = fields();
        f.location = Some(("", "", ""));
        assert_eq!(NewDevice::parse(&f, &BTreeMap::new()).unwrap().location, None);
    }

    #[test]
    fn too_many_tags_rejected() {
        let tags: BTreeMap<String, String> = (0..=MAX_TAGS).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(NewDevice::parse(&fields(), &tags).is_err());
    }

    #[test]
    fn beds_must_be_unique_and_valid() {
        assert!(NewWard::parse("stmarys", "icu", "ICU", &["1".into(), "2".into()]).is_ok());
        let err = NewWard::parse("stmarys", "icu", "ICU", &["1".into(), "1".into(), String::new()]).unwrap_err();
        let fields: Vec<_> = err.iter().map(|f| f.field.clone()).collect();
        assert_eq!(fields, ["ward.beds[1]", "ward.beds[2]"]);
    }

    #[test]
    fn lifecycle() {
        use DeviceState::*;
        assert!(Registered.can_become(Enrolled));
        assert!(Enrolled.can_become(Active));
        assert!(Active.can_become(Decommissioned));
        assert!(!Registered.can_become(Active));
        for s in DeviceState::ALL {
            assert!(!Decommissioned.can_become(s));
        }
    }

    #[test]
    fn filter_requires_site_with_ward() {
        assert!(DeviceFilter::parse("", "icu", "", None, &[]).is_err());
        let f = DeviceFilter::parse("stmarys", "icu", "", None, &["b=2".into(), "a=1".into(), "a=1".into()]).unwrap();
        assert_eq!(f.tags, [("a".into(), "1".into()), ("b".into(), "2".into())]);
        assert!(DeviceFilter::parse("", "", "", None, &["novalue".into()]).is_err());
    }

    #[test]
    fn enums_round_trip() {
        for c in DeviceClass::ALL {
            assert_eq!(c.as_str().parse(), Ok(c));
        }
        for s in DeviceState::ALL {
            assert_eq!(s.as_str().parse(), Ok(s));
        }
        assert!("toaster".parse::<DeviceClass>().is_err());
    }

    proptest! {
        #[test]
        fn eui64_parse_is_idempotent(bytes in any::<[u8; 8]>()) {
            let hex = crate::digest::hex(&bytes);
            if let Ok(e) = Eui64::parse(&hex) {
                prop_assert_eq!(Eui64::parse(e.as_str()), Ok(e.clone()));
                prop_assert_eq!(e.as_str().len(), 23);
            }
        }

        #[test]
        fn validation_never_panics(serial in ".{0,80}", manufacturer in ".{0,120}", eui in ".{0,30}", key in ".{0,10}") {
            let tags: BTreeMap<String, String> = [(key, String::new())].into();
            let f = DeviceFields { serial_number: &serial, manufacturer: &manufacturer, model: "M", class: Some(DeviceClass::Other), unknown_class: None, eui64: &eui, location: None };
            let _ = NewDevice::parse(&f, &tags);
        }
    }
}
