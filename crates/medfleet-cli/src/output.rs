//! How results are shown: human tables by default, stable JSON with `-o json` for scripts.

use std::collections::BTreeMap;

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use medfleet_proto::convert::{datetime, device_class_from_wire, device_state_from_wire};
use medfleet_proto::v1;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Tables and sentences for people.
    Table,
    /// JSON for scripts (one document on stdout).
    Json,
}

pub(crate) fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(datetime).map(|t| t.to_rfc3339()).unwrap_or_default()
}

#[derive(Debug, Serialize)]
pub(crate) struct SiteView {
    pub(crate) name: String,
    pub(crate) display_name: String,
    pub(crate) create_time: String,
    pub(crate) update_time: String,
}

impl From<v1::Site> for SiteView {
    fn from(s: v1::Site) -> Self {
        Self {
            create_time: time(s.create_time.as_ref()),
            update_time: time(s.update_time.as_ref()),
            name: s.name,
            display_name: s.display_name,
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct WardView {
    pub(crate) site: String,
    pub(crate) name: String,
    pub(crate) display_name: String,
    pub(crate) beds: Vec<String>,
    pub(crate) create_time: String,
    pub(crate) update_time: String,
}

impl From<v1::Ward> for WardView {
    fn from(w: v1::Ward) -> Self {
        Self {
            create_time: time(w.create_time.as_ref()),
            update_time: time(w.update_time.as_ref()),
            site: w.site,
            name: w.name,
            display_name: w.display_name,
            beds: w.beds,
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct DeviceView {
    pub(crate) id: String,
    pub(crate) serial_number: String,
    pub(crate) manufacturer: String,
    pub(crate) model: String,
    pub(crate) device_class: String,
    pub eui64: Option<String>,
    pub(crate) site: Option<String>,
    pub(crate) ward: Option<String>,
    pub(crate) bed: Option<String>,
    pub(crate) tags: BTreeMap<String, String>,
    pub(crate) state: String,
    pub(crate) create_time: String,
    pub(crate) update_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) presence: Option<PresenceView>,
}

/// A device's session presence as the CLI shows it.
#[derive(Debug, Serialize)]
pub(crate) struct PresenceView {
    pub(crate) online: bool,
    pub(crate) last_seen: String,
    pub(crate) connect_time: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) disconnect_time: String,
    pub(crate) replica: String,
    pub(crate) operational_state: String,
    pub(crate) firmware_version: String,
    pub(crate) config_version: u64,
    pub(crate) config_digest: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) config_rejection: String,
}

impl From<v1::DevicePresence> for PresenceView {
    fn from(p: v1::DevicePresence) -> Self {
        let state = match v1::OperationalState::try_from(p.operational_state) {
            Ok(v1::OperationalState::Idle) => "idle",
            Ok(v1::OperationalState::InClinicalUse) => "in_clinical_use",
            Ok(v1::OperationalState::Alarming) => "alarming",
            Ok(v1::OperationalState::Maintenance) => "maintenance",
            _ => "unknown",
        };
        Self {
            online: p.online,
            last_seen: time(p.last_seen.as_ref()),
            connect_time: time(p.connect_time.as_ref()),
            disconnect_time: time(p.disconnect_time.as_ref()),
            replica: p.replica,
            operational_state: state.to_owned(),
            firmware_version: p.firmware_version,
            config_version: p.reported_config_version,
            config_digest: p.reported_config_digest,
            config_rejection: p.config_rejection,
        }
    }
}

impl From<v1::Device> for DeviceView {
    fn from(d: v1::Device) -> Self {
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        let (site, ward, bed) = match d.location {
            Some(l) => (non_empty(l.site), non_empty(l.ward), non_empty(l.bed)),
            None => (None, None, None),
        };
        Self {
            device_class: device_class_from_wire(d.device_class)
                .map_or_else(|| "unspecified".into(), |c| c.to_string()),
            state: device_state_from_wire(d.state)
                .ok()
                .flatten()
                .map_or_else(|| "unspecified".into(), |s| s.to_string()),
            create_time: time(d.create_time.as_ref()),
            update_time: time(d.update_time.as_ref()),
            eui64: non_empty(d.eui64),
            tags: d.tags.into_iter().collect(),
            id: d.id,
            serial_number: d.serial_number,
            manufacturer: d.manufacturer,
            model: d.model,
            site,
            ward,
            bed,
            presence: d.presence.map(Into::into),
        }
    }
}

impl DeviceView {
    fn location(&self) -> String {
        match (&self.site, &self.ward, &self.bed) {
            (Some(s), Some(w), Some(b)) => format!("{s}/{w}/{b}"),
            (Some(s), Some(w), None) => format!("{s}/{w}"),
            _ => "(storage)".to_owned(),
        }
    }

    /// "online", "offline" or "never connected".
    pub(crate) fn presence_text(&self) -> String {
        match &self.presence {
            Some(p) if p.online => "online".to_owned(),
            Some(_) => "offline".to_owned(),
            None => "never connected".to_owned(),
        }
    }

    fn config_text(&self) -> String {
        match &self.presence {
            Some(p) if !p.config_rejection.is_empty() => format!("v{} rejected", p.config_version),
            Some(p) if !p.config_digest.is_empty() => format!("v{}", p.config_version),
            _ => "-".to_owned(),
        }
    }

    fn tags_text(&self) -> String {
        self.tags
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(header.to_vec());
    t
}

pub(crate) fn json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub(crate) fn sites(format: Format, sites: &[SiteView]) -> anyhow::Result<()> {
    if format == Format::Json {
        return json(sites);
    }
    let mut t = table(&["NAME", "DISPLAY NAME", "CREATED"]);
    for s in sites {
        t.add_row(vec![s.name.as_str(), s.display_name.as_str(), s.create_time.as_str()]);
    }
    println!("{t}");
    Ok(())
}

pub(crate) fn site(format: Format, site: &SiteView) -> anyhow::Result<()> {
    if format == Format::Json {
        return json(site);
    }
    println!(
        "site:     {}\nname:     {}\ncreated:  {}\nupdated:  {}",
        site.name, site.display_name, site.create_time, site.update_time
    );
    Ok(())
}

pub(crate) fn wards(format: Format, wards: &[WardView]) -> anyhow::Result<()> {
    if format == Format::Json {
        return json(wards);
    }
    let mut t = table(&["SCOPE", "DISPLAY NAME", "BEDS"]);
    for w in wards {
        t.add_row(vec![
            format!("{}/{}", w.site, w.name),
            w.display_name.clone(),
            w.beds.len().to_string(),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub(crate) fn ward(format: Format, ward: &WardView) -> anyhow::Result<()> {
    if format == Format::Json {
        return json(ward);
    }
    println!(
        "ward:     {}/{}\nname:     {}\nbeds:     {}\ncreated:  {}\nupdated:  {}",
        ward.site,
        ward.name,
        ward.display_name,
        if ward.beds.is_empty() {
            "(none)".to_owned()
        } else {
            ward.beds.join(", ")
        },
        ward.create_time,
        ward.update_time
    );
    Ok(())
}

pub(crate) fn devices(format: Format, devices: &[DeviceView]) -> anyhow::Result<()> {
    if format == Format::Json {
        return json(devices);
    }
    let mut t = table(&[
        "ID",
        "MANUFACTURER",
        "MODEL",
        "SERIAL",
        "CLASS",
        "LOCATION",
        "STATE",
        "SESSION",
        "CONFIG",
        "TAGS",
    ]);
    for d in devices {
        t.add_row(vec![
            d.id.clone(),
            d.manufacturer.clone(),
            d.model.clone(),
            d.serial_number.clone(),
            d.device_class.clone(),
            d.location(),
            d.state.clone(),
            d.presence_text(),
            d.config_text(),
            d.tags_text(),
        ]);
    }
    println!("{t}");
    eprintln!("{} device(s)", devices.len());
    Ok(())
}

pub(crate) fn device(format: Format, d: &DeviceView) -> anyhow::Result<()> {
    if format == Format::Json {
        return json(d);
    }
    println!(
        "id:            {}\nmanufacturer:  {}\nmodel:         {}\nserial number: {}\nclass:         {}\nEUI-64:        {}\n\
         location:      {}\nstate:         {}\ntags:          {}\ncreated:       {}\nupdated:       {}",
        d.id,
        d.manufacturer,
        d.model,
        d.serial_number,
        d.device_class,
        d.eui64.as_deref().unwrap_or("-"),
        d.location(),
        d.state,
        d.tags_text(),
        d.create_time,
        d.update_time
    );
    if let Some(p) = &d.presence {
        println!(
            "session:       {} (replica {}, last seen {}, connected {})
operational:   {}
firmware:      {}
             configuration: {}{}",
            d.presence_text(),
            p.replica,
            p.last_seen,
            p.connect_time,
            p.operational_state,
            p.firmware_version,
            d.config_text(),
            if p.config_rejection.is_empty() {
                String::new()
            } else {
                format!(" ({})", p.config_rejection)
            }
        );
    } else {
        println!("session:       never connected");
    }
    Ok(())
}

/// One line per presence change, for `devices watch`.
pub(crate) fn device_event(format: Format, d: &DeviceView) -> anyhow::Result<()> {
    if format == Format::Json {
        println!("{}", serde_json::to_string(d)?);
        return Ok(());
    }
    let (state, replica, last_seen) = d.presence.as_ref().map_or(("-", "-", "-"), |p| {
        (p.operational_state.as_str(), p.replica.as_str(), p.last_seen.as_str())
    });
    println!(
        "{last_seen}  {}  {:<15}  {:<16}  config {:<12}  {}  {}  replica {replica}",
        d.id,
        d.presence_text(),
        state,
        d.config_text(),
        d.location(),
        d.model
    );
    Ok(())
}
