//! Wire ↔ domain conversions. Requests become validated domain values (or every violation at once); domain
//! values become wire messages.

use chrono::{DateTime, Utc};
use medfleet_core::device_config::{Layer, LayerKey};
use medfleet_core::identity::{Identity, RevocationReason};
use medfleet_core::presence::{OperationalState, Presence};
use medfleet_core::registry::{
    Device, DeviceClass, DeviceFields, DeviceFilter, DeviceState, DeviceUpdate, Location, NewDevice, NewSite, NewWard,
    Site, SiteUpdate, Tags, Ward, WardUpdate, check_beds,
};
use medfleet_core::validation::{Violations, check_slug, check_text};
use uuid::Uuid;

use crate::v1;

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A wire time at the precision both databases store (microseconds): a time that went in and came back out
/// compares equal, so half-open periods that meet at a boundary never overlap by a few nanoseconds.
pub fn datetime(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    use chrono::SubsecRound as _;
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?).map(|t| t.trunc_subsecs(6))
}

pub fn device_class_to_wire(class: DeviceClass) -> v1::DeviceClass {
    match class {
        DeviceClass::PatientMonitor => v1::DeviceClass::PatientMonitor,
        DeviceClass::InfusionPump => v1::DeviceClass::InfusionPump,
        DeviceClass::Ventilator => v1::DeviceClass::Ventilator,
        DeviceClass::PulseOximeter => v1::DeviceClass::PulseOximeter,
        DeviceClass::AnesthesiaWorkstation => v1::DeviceClass::AnesthesiaWorkstation,
        DeviceClass::Other => v1::DeviceClass::Other,
    }
}

/// `None` for UNSPECIFIED and for numbers this build does not know.
pub fn device_class_from_wire(value: i32) -> Option<DeviceClass> {
    match v1::DeviceClass::try_from(value).ok()? {
        v1::DeviceClass::Unspecified => None,
        v1::DeviceClass::PatientMonitor => Some(DeviceClass::PatientMonitor),
        v1::DeviceClass::InfusionPump => Some(DeviceClass::InfusionPump),
        v1::DeviceClass::Ventilator => Some(DeviceClass::Ventilator),
        v1::DeviceClass::PulseOximeter => Some(DeviceClass::PulseOximeter),
        v1::DeviceClass::AnesthesiaWorkstation => Some(DeviceClass::AnesthesiaWorkstation),
        v1::DeviceClass::Other => Some(DeviceClass::Other),
    }
}

pub fn device_state_to_wire(state: DeviceState) -> v1::DeviceState {
    match state {
        DeviceState::Registered => v1::DeviceState::Registered,
        DeviceState::Enrolled => v1::DeviceState::Enrolled,
        DeviceState::Active => v1::DeviceState::Active,
        DeviceState::Decommissioned => v1::DeviceState::Decommissioned,
    }
}

/// `Ok(None)` for UNSPECIFIED (no filter); an error for numbers this build does not know.
pub fn device_state_from_wire(value: i32) -> Result<Option<DeviceState>, String> {
    match v1::DeviceState::try_from(value) {
        Ok(v1::DeviceState::Unspecified) => Ok(None),
        Ok(v1::DeviceState::Registered) => Ok(Some(DeviceState::Registered)),
        Ok(v1::DeviceState::Enrolled) => Ok(Some(DeviceState::Enrolled)),
        Ok(v1::DeviceState::Active) => Ok(Some(DeviceState::Active)),
        Ok(v1::DeviceState::Decommissioned) => Ok(Some(DeviceState::Decommissioned)),
        Err(_) => Err(format!("{value} is not a known device state")),
    }
}

impl From<Site> for v1::Site {
    fn from(site: Site) -> Self {
        Self {
            name: site.name,
            display_name: site.display_name,
            timezone: site.timezone,
            create_time: Some(timestamp(site.created_at)),
            update_time: Some(timestamp(site.updated_at)),
        }
    }
}

impl From<Ward> for v1::Ward {
    fn from(ward: Ward) -> Self {
        Self {
            site: ward.site,
            name: ward.name,
            display_name: ward.display_name,
            beds: ward.beds,
            create_time: Some(timestamp(ward.created_at)),
            update_time: Some(timestamp(ward.updated_at)),
        }
    }
}

impl From<Location> for v1::Location {
    fn from(location: Location) -> Self {
        Self {
            site: location.site,
            ward: location.ward,
            bed: location.bed.unwrap_or_default(),
        }
    }
}

impl From<Device> for v1::Device {
    fn from(device: Device) -> Self {
        Self {
            id: device.id.to_string(),
            serial_number: device.serial_number,
            manufacturer: device.manufacturer,
            model: device.model,
            device_class: device_class_to_wire(device.class).into(),
            eui64: device.eui64.map(|e| e.to_string()).unwrap_or_default(),
            location: device.location.map(Into::into),
            tags: device.tags.into_inner().into_iter().collect(),
            state: device_state_to_wire(device.state).into(),
            create_time: Some(timestamp(device.created_at)),
            update_time: Some(timestamp(device.updated_at)),
            presence: None,
        }
    }
}

/// A required slug-shaped name (site, ward) in a request.
pub fn slug(field: &str, value: &str) -> Result<String, Violations> {
    check_slug(value)
        .map(|()| value.to_owned())
        .map_err(|e| Violations::single(field, e))
}

/// A device id in a request: the canonical UUID text.
pub fn device_id(field: &str, value: &str) -> Result<Uuid, Violations> {
    if value.is_empty() {
        return Err(Violations::single(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| {
        Violations::single(
            field,
            format!(
                "'{}' is not a device id (a UUID such as 6f1c2d3e-…)",
                medfleet_core::validation::printable(value)
            ),
        )
    })
}

pub fn new_site(request: &v1::CreateSiteRequest) -> Result<NewSite, Violations> {
    let site = request
        .site
        .as_ref()
        .ok_or_else(|| Violations::single("site", "is required"))?;
    NewSite::parse(&site.name, &site.display_name, &site.timezone)
}

pub fn new_ward(request: &v1::CreateWardRequest) -> Result<NewWard, Violations> {
    let ward = request
        .ward
        .as_ref()
        .ok_or_else(|| Violations::single("ward", "is required"))?;
    NewWard::parse(&ward.site, &ward.name, &ward.display_name, &ward.beds)
}

pub fn new_device(request: &v1::RegisterDeviceRequest) -> Result<NewDevice, Violations> {
    let fields = DeviceFields {
        serial_number: &request.serial_number,
        manufacturer: &request.manufacturer,
        model: &request.model,
        class: device_class_from_wire(request.device_class),
        // A number this build does not know is a different mistake from leaving the class out (UNSPECIFIED, 0):
        // a newer client, or a typo in a raw request, and the message should say which.
        unknown_class: v1::DeviceClass::try_from(request.device_class)
            .is_err()
            .then_some(request.device_class),
        eui64: &request.eui64,
        location: request
            .location
            .as_ref()
            .map(|l| (l.site.as_str(), l.ward.as_str(), l.bed.as_str())),
    };
    NewDevice::parse(&fields, &request.tags)
}

pub fn device_filter(request: &v1::ListDevicesRequest) -> Result<DeviceFilter, Violations> {
    let state = device_state_from_wire(request.state).map_err(|e| Violations::single("state", e))?;
    let mut filter = DeviceFilter::parse(&request.site, &request.ward, &request.model, state, &request.tags)?;
    filter.online = request.online;
    Ok(filter)
}

pub fn operational_state_to_wire(state: OperationalState) -> v1::OperationalState {
    match state {
        OperationalState::Unknown => v1::OperationalState::Unspecified,
        OperationalState::Idle => v1::OperationalState::Idle,
        OperationalState::InClinicalUse => v1::OperationalState::InClinicalUse,
        OperationalState::Alarming => v1::OperationalState::Alarming,
        OperationalState::Maintenance => v1::OperationalState::Maintenance,
    }
}

/// A device's reported state; values this build does not know are kept as unknown rather than refused, so a
/// newer device does not lose its session over a new state.
pub fn operational_state_from_wire(value: i32) -> OperationalState {
    match v1::OperationalState::try_from(value) {
        Ok(v1::OperationalState::Idle) => OperationalState::Idle,
        Ok(v1::OperationalState::InClinicalUse) => OperationalState::InClinicalUse,
        Ok(v1::OperationalState::Alarming) => OperationalState::Alarming,
        Ok(v1::OperationalState::Maintenance) => OperationalState::Maintenance,
        Ok(v1::OperationalState::Unspecified) | Err(_) => OperationalState::Unknown,
    }
}

impl From<Presence> for v1::DevicePresence {
    fn from(p: Presence) -> Self {
        Self {
            online: p.online,
            last_seen: Some(timestamp(p.last_seen)),
            connect_time: Some(timestamp(p.connected_at)),
            disconnect_time: p.disconnected_at.map(timestamp),
            replica: p.replica,
            operational_state: operational_state_to_wire(p.state).into(),
            firmware_version: p.firmware_version,
            reported_config_version: p.reported.version,
            reported_config_digest: p.reported.digest,
            config_rejection: p.reported.rejection.unwrap_or_default(),
        }
    }
}

pub fn layer_to_wire(key: &LayerKey) -> v1::ConfigLayer {
    let kind = match key.layer {
        Layer::Fleet => v1::ConfigLayerKind::Fleet,
        Layer::Model => v1::ConfigLayerKind::Model,
        Layer::Site => v1::ConfigLayerKind::Site,
        Layer::Ward => v1::ConfigLayerKind::Ward,
        Layer::Device => v1::ConfigLayerKind::Device,
    };
    v1::ConfigLayer {
        kind: kind.into(),
        key: key.key.clone(),
    }
}

/// A layer named in a request, with its key checked for the kind (a slug, `site/ward`, a device id, a model).
pub fn layer_from_wire(field: &str, layer: Option<&v1::ConfigLayer>) -> Result<LayerKey, Violations> {
    let layer = layer.ok_or_else(|| Violations::single(field, "is required (fleet, model, site, ward or device)"))?;
    let key_field = format!("{field}.key");
    let kind = match v1::ConfigLayerKind::try_from(layer.kind) {
        Ok(v1::ConfigLayerKind::Fleet) => Layer::Fleet,
        Ok(v1::ConfigLayerKind::Model) => Layer::Model,
        Ok(v1::ConfigLayerKind::Site) => Layer::Site,
        Ok(v1::ConfigLayerKind::Ward) => Layer::Ward,
        Ok(v1::ConfigLayerKind::Device) => Layer::Device,
        Ok(v1::ConfigLayerKind::Unspecified) | Err(_) => {
            return Err(Violations::single(
                format!("{field}.kind"),
                "name the layer: fleet, model, site, ward or device",
            ));
        }
    };
    let key = layer.key.as_str();
    let checked = match kind {
        Layer::Fleet if key.is_empty() => Ok(()),
        Layer::Fleet => Err("the fleet layer has no key".to_owned()),
        Layer::Model => check_text(key, medfleet_core::registry::MAX_MODEL).and_then(|()| {
            if key.is_empty() {
                Err("name the model".to_owned())
            } else {
                Ok(())
            }
        }),
        Layer::Site => check_slug(key),
        Layer::Ward => match key.split_once('/') {
            Some((site, ward)) => check_slug(site).and_then(|()| check_slug(ward)),
            None => Err(format!(
                "'{}' is not a ward; write it as site/ward",
                medfleet_core::validation::printable(key)
            )),
        },
        Layer::Device => return device_id(&key_field, key).map(|id| LayerKey::new(Layer::Device, id.to_string())),
    };
    checked.map_err(|e| Violations::single(&key_field, e))?;
    Ok(LayerKey::new(kind, key))
}

/// The mask's paths, each checked against the fields this RPC may change.
fn mask_paths(mask: Option<&prost_types::FieldMask>, allowed: &[&str]) -> Result<Vec<String>, Violations> {
    let paths = mask.map(|m| m.paths.clone()).unwrap_or_default();
    let allowed_list = allowed.join(", ");
    if paths.is_empty() {
        return Err(Violations::single(
            "update_mask",
            format!("name the fields to change: {allowed_list}"),
        ));
    }
    let mut v = Violations::new();
    for path in &paths {
        if !allowed.contains(&path.as_str()) {
            v.push(
                "update_mask",
                format!("'{path}' cannot be updated; updatable fields: {allowed_list}"),
            );
        }
    }
    v.finish(|| Some(paths))
}

pub fn site_update(request: &v1::UpdateSiteRequest) -> Result<SiteUpdate, Violations> {
    let site = request
        .site
        .as_ref()
        .ok_or_else(|| Violations::single("site", "is required"))?;
    let mut v = Violations::new();
    v.check("site.name", check_slug(&site.name));
    let paths = mask_paths(request.update_mask.as_ref(), &["display_name", "timezone"])?;
    let display_name = paths
        .iter()
        .any(|p| p == "display_name")
        .then(|| site.display_name.clone());
    if let Some(display_name) = &display_name {
        v.check("site.display_name", check_text(display_name, 200));
    }
    let timezone = paths.iter().any(|p| p == "timezone").then(|| site.timezone.clone());
    if let Some(timezone) = &timezone {
        v.check("site.timezone", medfleet_core::registry::check_timezone(timezone));
    }
    v.finish(|| {
        Some(SiteUpdate {
            name: site.name.clone(),
            display_name,
            timezone,
        })
    })
}

pub fn ward_update(request: &v1::UpdateWardRequest) -> Result<(String, String, WardUpdate), Violations> {
    let ward = request
        .ward
        .as_ref()
        .ok_or_else(|| Violations::single("ward", "is required"))?;
    let paths = mask_paths(request.update_mask.as_ref(), &["display_name", "beds"])?;
    let mut v = Violations::new();
    v.check("ward.site", check_slug(&ward.site));
    v.check("ward.name", check_slug(&ward.name));
    let mut update = WardUpdate::default();
    if paths.iter().any(|p| p == "display_name") {
        update.display_name = v
            .check("ward.display_name", check_text(&ward.display_name, 200))
            .map(|()| ward.display_name.clone());
    }
    if paths.iter().any(|p| p == "beds") {
        update.beds = check_beds(&mut v, "ward.beds", &ward.beds);
    }
    v.finish(|| Some((ward.site.clone(), ward.name.clone(), update)))
}

pub fn device_update(request: &v1::UpdateDeviceRequest) -> Result<(Uuid, DeviceUpdate), Violations> {
    let device = request
        .device
        .as_ref()
        .ok_or_else(|| Violations::single("device", "is required"))?;
    let id = device_id("device.id", &device.id)?;
    let paths = mask_paths(request.update_mask.as_ref(), &["location", "tags"])?;
    let mut v = Violations::new();
    let mut update = DeviceUpdate::default();
    if paths.iter().any(|p| p == "location") {
        update.location = match &device.location {
            None => Some(None),
            Some(l) => Location::parse(&mut v, "device.location", &l.site, &l.ward, &l.bed),
        };
    }
    if paths.iter().any(|p| p == "tags") {
        update.tags = Tags::parse(&mut v, "device.tags", &device.tags);
    }
    v.finish(|| Some((id, update)))
}

/// The fields `UpdateDestination` may change (wire names, as in the update mask).
pub const DESTINATION_UPDATE_FIELDS: &[&str] = &[
    "endpoint",
    "sites",
    "wards",
    "interval_seconds",
    "bearer_token",
    "ca_pem",
    "receiving_application",
    "receiving_facility",
    "client_certificate_pem",
    "client_key_pem",
    "insecure_plaintext",
    "enabled",
];

/// The destination an update names and what it changes. Only the masked fields are read; an empty secret or CA
/// removes it; the client certificate and its key change together. Whether the result is a valid destination is
/// the server's check, made on the whole definition exactly as on creation.
pub fn destination_update(
    request: &v1::UpdateDestinationRequest,
) -> Result<(String, medfleet_core::clinical::destination::DestinationUpdate), Violations> {
    use medfleet_core::clinical::destination::{ClientIdentity, DestinationUpdate};
    let destination = request
        .destination
        .as_ref()
        .ok_or_else(|| Violations::single("destination", "is required: its name and the fields to change"))?;
    let name = slug("destination.name", &destination.name)?;
    let paths = mask_paths(request.update_mask.as_ref(), DESTINATION_UPDATE_FIELDS)?;
    let has = |field: &str| paths.iter().any(|p| p == field);
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let mut v = Violations::new();
    let client_identity = match (has("client_certificate_pem"), has("client_key_pem")) {
        (false, false) => None,
        (true, true) => match (
            non_empty(&destination.client_certificate_pem),
            non_empty(&destination.client_key_pem),
        ) {
            (None, None) => Some(None),
            (Some(certificate_pem), Some(key_pem)) => Some(Some(ClientIdentity {
                certificate_pem,
                key_pem,
            })),
            _ => {
                v.push(
                    "destination.client_key_pem",
                    "give both the client certificate chain and its key, or neither to remove mutual TLS",
                );
                None
            }
        },
        _ => {
            v.push(
                "update_mask",
                "client_certificate_pem and client_key_pem change together: name both",
            );
            None
        }
    };
    let enabled = if has("enabled") {
        if destination.enabled.is_none() {
            v.push("destination.enabled", "is in the update mask, so say true or false");
        }
        destination.enabled
    } else {
        None
    };
    let update = DestinationUpdate {
        endpoint: has("endpoint").then(|| destination.endpoint.clone()),
        sites: has("sites").then(|| destination.sites.iter().cloned().collect()),
        wards: has("wards").then(|| destination.wards.iter().cloned().collect()),
        interval_secs: has("interval_seconds").then_some(destination.interval_seconds),
        bearer_token: has("bearer_token").then(|| non_empty(&destination.bearer_token)),
        ca_pem: has("ca_pem").then(|| non_empty(&destination.ca_pem)),
        receiving_application: has("receiving_application").then(|| destination.receiving_application.clone()),
        receiving_facility: has("receiving_facility").then(|| destination.receiving_facility.clone()),
        client_identity,
        insecure_plaintext: has("insecure_plaintext").then_some(destination.insecure_plaintext),
        enabled,
    };
    v.finish(|| Some((name, update)))
}

/// An optional duration field with a default and bounds.
pub fn duration(
    field: &str,
    value: Option<&prost_types::Duration>,
    default: std::time::Duration,
    min: std::time::Duration,
    max: std::time::Duration,
) -> Result<std::time::Duration, Violations> {
    let Some(value) = value else {
        return Ok(default);
    };
    let human = |d: std::time::Duration| format!("{}s", d.as_secs());
    let parsed = u64::try_from(value.seconds)
        .ok()
        .zip(u32::try_from(value.nanos).ok())
        .map(|(secs, nanos)| std::time::Duration::new(secs, nanos))
        .filter(|d| *d >= min && *d <= max);
    parsed.ok_or_else(|| Violations::single(field, format!("must be between {} and {}", human(min), human(max))))
}

pub fn duration_to_wire(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub fn revocation_reason_from_wire(value: i32) -> Result<RevocationReason, Violations> {
    match v1::RevocationReason::try_from(value) {
        Ok(v1::RevocationReason::Unspecified) => Ok(RevocationReason::Unspecified),
        Ok(v1::RevocationReason::KeyCompromise) => Ok(RevocationReason::KeyCompromise),
        Ok(v1::RevocationReason::AffiliationChanged) => Ok(RevocationReason::AffiliationChanged),
        Ok(v1::RevocationReason::Superseded) => Ok(RevocationReason::Superseded),
        Ok(v1::RevocationReason::CessationOfOperation) => Ok(RevocationReason::CessationOfOperation),
        Err(_) => Err(Violations::single(
            "reason",
            format!("{value} is not a known revocation reason"),
        )),
    }
}

pub fn revocation_reason_to_wire(reason: RevocationReason) -> v1::RevocationReason {
    match reason {
        RevocationReason::Unspecified => v1::RevocationReason::Unspecified,
        RevocationReason::KeyCompromise => v1::RevocationReason::KeyCompromise,
        RevocationReason::AffiliationChanged => v1::RevocationReason::AffiliationChanged,
        RevocationReason::Superseded => v1::RevocationReason::Superseded,
        RevocationReason::CessationOfOperation => v1::RevocationReason::CessationOfOperation,
    }
}

/// An operator or integration named in a request.
pub fn principal(kind: i32, name: &str) -> Result<Identity, Violations> {
    let mut v = Violations::new();
    let kind = match v1::PrincipalKind::try_from(kind) {
        Ok(v1::PrincipalKind::User) => Some(true),
        Ok(v1::PrincipalKind::Service) => Some(false),
        _ => {
            v.push("kind", "choose user or service");
            None
        }
    };
    v.check("name", Identity::check_name(name));
    v.finish(|| {
        Some(if kind? {
            Identity::User(name.to_owned())
        } else {
            Identity::Service(name.to_owned())
        })
    })
}

/// A reading item as the domain validates it. Code and unit are passed on whole: cutting them here would
/// silently chart a truncated field, so the domain refuses an oversized one for this item alone
/// (`field_too_long` in the ack) and the rest of the batch is kept. A missing observation time stays missing
/// (the item is then refused too).
pub fn reading_input(item: &v1::ReadingItem) -> medfleet_core::clinical::reading::ReadingInput {
    let quality = item
        .quality
        .iter()
        .fold(medfleet_core::clinical::reading::Quality::default(), |mut q, flag| {
            match v1::ReadingQuality::try_from(*flag) {
                Ok(v1::ReadingQuality::Invalid) => q.invalid = true,
                Ok(v1::ReadingQuality::Questionable) => q.questionable = true,
                Ok(v1::ReadingQuality::TestData) => q.test_data = true,
                Ok(v1::ReadingQuality::Unspecified) | Err(_) => {}
            }
            q
        });
    medfleet_core::clinical::reading::ReadingInput {
        code: item.code.clone(),
        value: item.value,
        unit: item.unit.clone(),
        observed_at: item.observed_at.as_ref().and_then(datetime),
        quality,
    }
}

/// The components of a measurement with their codes (MDC, LOINC) and UCUM units.
pub fn components_to_wire(measurement: &medfleet_core::clinical::chart::Measurement) -> Vec<v1::ObservationComponent> {
    measurement
        .values()
        .into_iter()
        .map(|(vital, value)| {
            let info = vital.info();
            v1::ObservationComponent {
                mdc_code: info.mdc_code,
                mdc_refid: info.mdc_refid.to_owned(),
                loinc: info.loinc.to_owned(),
                value,
                ucum: info.ucum.to_owned(),
            }
        })
        .collect()
}

/// A chart entry as the feed carries it (status: the one of this event).
pub fn entry_to_wire(entry: &medfleet_core::clinical::chart::ChartEntry) -> v1::Observation {
    let poc = entry.point_of_care.clone().unwrap_or_default();
    v1::Observation {
        id: entry.id.to_string(),
        patient: Some(v1::PatientIdentifier {
            identifier: entry.patient.identifier.clone(),
            authority: entry.patient.authority.clone(),
            display_name: entry.patient.display_name.clone().unwrap_or_default(),
        }),
        device_id: entry.device.id.to_string(),
        kind: entry.measurement.kind().to_owned(),
        components: components_to_wire(&entry.measurement),
        observed_at: Some(timestamp(entry.observed_at)),
        status: entry.status.as_str().to_owned(),
        questionable: entry.questionable,
        validated_by: entry.validated_by.clone().unwrap_or_default(),
        site: poc.site,
        ward: poc.ward,
        bed: poc.bed.unwrap_or_default(),
    }
}

/// A firmware action state on the wire.
pub fn action_state_to_wire(state: medfleet_core::firmware::state::ActionState) -> v1::ActionState {
    use medfleet_core::firmware::state::ActionState as S;
    match state {
        S::Queued => v1::ActionState::Queued,
        S::Notified => v1::ActionState::Notified,
        S::Downloading => v1::ActionState::Downloading,
        S::Downloaded => v1::ActionState::Downloaded,
        S::Verifying => v1::ActionState::Verifying,
        S::Installing => v1::ActionState::Installing,
        S::Rebooting => v1::ActionState::Rebooting,
        S::VerifyingHealth => v1::ActionState::VerifyingHealth,
        S::Succeeded => v1::ActionState::Succeeded,
        S::Failed => v1::ActionState::Failed,
        S::Deferred => v1::ActionState::Deferred,
        S::RolledBack => v1::ActionState::RolledBack,
        S::Canceled => v1::ActionState::Canceled,
    }
}

/// A firmware action state a device reported; `None` for unspecified or unknown values (the report is ignored).
pub fn action_state_from_wire(value: i32) -> Option<medfleet_core::firmware::state::ActionState> {
    use medfleet_core::firmware::state::ActionState as S;
    Some(match v1::ActionState::try_from(value).ok()? {
        v1::ActionState::Unspecified => return None,
        v1::ActionState::Queued => S::Queued,
        v1::ActionState::Notified => S::Notified,
        v1::ActionState::Downloading => S::Downloading,
        v1::ActionState::Downloaded => S::Downloaded,
        v1::ActionState::Verifying => S::Verifying,
        v1::ActionState::Installing => S::Installing,
        v1::ActionState::Rebooting => S::Rebooting,
        v1::ActionState::VerifyingHealth => S::VerifyingHealth,
        v1::ActionState::Succeeded => S::Succeeded,
        v1::ActionState::Failed => S::Failed,
        v1::ActionState::Deferred => S::Deferred,
        v1::ActionState::RolledBack => S::RolledBack,
        v1::ActionState::Canceled => S::Canceled,
    })
}

pub fn rollout_state_to_wire(state: medfleet_core::firmware::state::RolloutState) -> v1::RolloutState {
    use medfleet_core::firmware::state::RolloutState as S;
    match state {
        S::Draft => v1::RolloutState::Draft,
        S::Running => v1::RolloutState::Running,
        S::Paused => v1::RolloutState::Paused,
        S::Halted => v1::RolloutState::Halted,
        S::Completed => v1::RolloutState::Completed,
        S::Aborted => v1::RolloutState::Aborted,
    }
}

pub fn rollout_state_from_wire(value: i32) -> Option<medfleet_core::firmware::state::RolloutState> {
    use medfleet_core::firmware::state::RolloutState as S;
    Some(match v1::RolloutState::try_from(value).ok()? {
        v1::RolloutState::Unspecified => return None,
        v1::RolloutState::Draft => S::Draft,
        v1::RolloutState::Running => S::Running,
        v1::RolloutState::Paused => S::Paused,
        v1::RolloutState::Halted => S::Halted,
        v1::RolloutState::Completed => S::Completed,
        v1::RolloutState::Aborted => S::Aborted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_class_round_trips() {
        for class in DeviceClass::ALL {
            assert_eq!(device_class_from_wire(device_class_to_wire(class).into()), Some(class));
        }
        assert_eq!(device_class_from_wire(0), None);
        assert_eq!(device_class_from_wire(99), None);
    }

    #[test]
    fn every_wire_state_round_trips() {
        for state in DeviceState::ALL {
            assert_eq!(
                device_state_from_wire(device_state_to_wire(state).into()),
                Ok(Some(state))
            );
        }
        assert!(device_state_from_wire(42).is_err());
    }

    #[test]
    fn unknown_device_class_is_not_called_missing() {
        let mut request = v1::RegisterDeviceRequest {
            serial_number: "SN-1".into(),
            manufacturer: "Acme".into(),
            model: "M".into(),
            device_class: 99,
            ..Default::default()
        };
        let err = new_device(&request).unwrap_err();
        let class: Vec<_> = err.iter().filter(|v| v.field == "device_class").collect();
        assert_eq!(class.len(), 1);
        assert!(class[0].description.starts_with("unknown value 99"), "{err}");
        assert!(!class[0].description.contains("is required"), "{err}");
        request.device_class = v1::DeviceClass::Unspecified.into();
        let err = new_device(&request).unwrap_err();
        assert!(
            err.iter()
                .any(|v| v.field == "device_class" && v.description.starts_with("is required"))
        );
        request.device_class = v1::DeviceClass::PatientMonitor.into();
        assert!(new_device(&request).is_ok());
    }

    #[test]
    fn oversized_code_and_unit_reach_validation_whole() {
        use medfleet_core::clinical::reading::{MAX_CODE_CHARS, validate};
        let now = Utc::now();
        let item = |code: String, unit: &str| v1::ReadingItem {
            code,
            value: 70.0,
            unit: unit.into(),
            observed_at: Some(timestamp(now)),
            quality: Vec::new(),
        };
        // Cut to 64 characters this would have been a valid heart rate.
        let long = item(format!("147842{}", " ".repeat(MAX_CODE_CHARS)), "/min");
        let input = reading_input(&long);
        assert_eq!(input.code.chars().count(), MAX_CODE_CHARS + 6);
        let rejection = validate(&input, now, chrono::Duration::seconds(30)).unwrap_err();
        assert_eq!(rejection.code(), "field_too_long");
        let long_unit = item("147842".into(), &format!("/min{}", " ".repeat(40)));
        let rejection = validate(&reading_input(&long_unit), now, chrono::Duration::seconds(30)).unwrap_err();
        assert_eq!(rejection.code(), "field_too_long");
        // The other items of a batch are untouched by one oversized item.
        assert!(
            validate(
                &reading_input(&item("147842".into(), "/min")),
                now,
                chrono::Duration::seconds(30)
            )
            .is_ok()
        );
    }

    #[test]
    fn destination_update_reads_only_the_mask() {
        let request = |paths: &[&str], destination: v1::EmrDestination| v1::UpdateDestinationRequest {
            destination: Some(destination),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            }),
        };
        let full = v1::EmrDestination {
            name: "epic".into(),
            endpoint: "https://emr.example/fhir".into(),
            bearer_token: "t2".into(),
            enabled: Some(false),
            ..Default::default()
        };
        let (name, update) = destination_update(&request(&["bearer_token"], full.clone())).unwrap();
        assert_eq!(name, "epic");
        assert_eq!(update.bearer_token, Some(Some("t2".into())));
        assert!(update.endpoint.is_none() && update.enabled.is_none());
        let (_, toggle) = destination_update(&request(&["enabled"], full.clone())).unwrap();
        assert!(toggle.only_enabled() && toggle.enabled == Some(false));
        let (_, removal) = destination_update(&request(
            &["bearer_token", "ca_pem"],
            v1::EmrDestination {
                name: "epic".into(),
                ..Default::default()
            },
        ))
        .unwrap();
        assert_eq!((removal.bearer_token, removal.ca_pem), (Some(None), Some(None)));
        for (paths, field) in [
            (&["client_key_pem"][..], "update_mask"),
            (&["name"][..], "update_mask"),
            (&[][..], "update_mask"),
        ] {
            let err = destination_update(&request(paths, full.clone())).unwrap_err();
            assert!(err.iter().any(|v| v.field == field), "{paths:?}: {err}");
        }
        let unset = destination_update(&request(
            &["enabled"],
            v1::EmrDestination {
                name: "epic".into(),
                ..Default::default()
            },
        ))
        .unwrap_err();
        assert!(unset.iter().any(|v| v.field == "destination.enabled"), "{unset}");
    }

    #[test]
    fn update_mask_is_required_and_checked() {
        let mut request = v1::UpdateDeviceRequest {
            device: Some(v1::Device {
                id: Uuid::new_v4().to_string(),
                ..Default::default()
            }),
            update_mask: None,
        };
        assert!(device_update(&request).is_err());
        request.update_mask = Some(prost_types::FieldMask {
            paths: vec!["serial_number".into()],
        });
        let err = device_update(&request).unwrap_err();
        assert!(err.to_string().contains("cannot be updated"));
        request.update_mask = Some(prost_types::FieldMask {
            paths: vec!["location".into()],
        });
        assert_eq!(device_update(&request).unwrap().1.location, Some(None));
    }

    #[test]
    fn timestamps_round_trip_at_storage_precision() {
        use chrono::SubsecRound as _;
        let now = Utc::now().trunc_subsecs(6);
        assert_eq!(datetime(&timestamp(now)), Some(now));
        // Finer than microseconds is cut, as both databases would.
        let fine = prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 123_456_789,
        };
        assert_eq!(datetime(&fine).map(|t| t.timestamp_subsec_nanos()), Some(123_456_000));
    }
}
