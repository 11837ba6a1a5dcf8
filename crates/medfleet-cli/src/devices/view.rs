//! How a device is shown: the view of a device and its session presence (the `-o json` document), the
//! `devices list` table, the `devices show` sheet and the one-line events of `devices watch`.

use std::collections::BTreeMap;

use medfleet_proto::convert::{device_class_from_wire, device_state_from_wire};
use medfleet_proto::v1;
use serde::Serialize;

use crate::output::{self, Format, time};

#[derive(Debug, Serialize)]
pub(crate) struct DeviceView {
    pub(crate) id: String,
    pub(crate) serial_number: String,
    pub(crate) manufacturer: String,
    pub(crate) model: String,
    pub(crate) device_class: String,
    pub(crate) eui64: Option<String>,
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
    fn presence_text(&self) -> String {
        match &self.presence {
            Some(p) if p.online => "online".to_owned(),
            Some(_) => "offline".to_owned(),
            None => "never connected".to_owned(),
        }
    }

    /// A presence field for a table cell: "-" when the device never connected or did not say.
    fn presence_cell(&self, field: impl Fn(&PresenceView) -> &str) -> String {
        match self.presence.as_ref().map(field) {
            Some(value) if !value.is_empty() => value.to_owned(),
            _ => "-".to_owned(),
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

pub(super) fn print_devices(format: Format, devices: &[DeviceView]) -> anyhow::Result<()> {
    if format == Format::Json {
        return output::json(devices);
    }
    let mut t = output::table(&[
        "ID",
        "MANUFACTURER",
        "MODEL",
        "SERIAL",
        "CLASS",
        "LOCATION",
        "STATE",
        "SESSION",
        "REPLICA",
        "FIRMWARE",
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
            d.presence_cell(|p| p.replica.as_str()),
            d.presence_cell(|p| p.firmware_version.as_str()),
            d.config_text(),
            d.tags_text(),
        ]);
    }
    println!("{t}");
    eprintln!("{} device(s)", devices.len());
    Ok(())
}

pub(super) fn print_device(format: Format, d: &DeviceView) -> anyhow::Result<()> {
    if format == Format::Json {
        return output::json(d);
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
pub(super) fn print_event(format: Format, d: &DeviceView) -> anyhow::Result<()> {
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
