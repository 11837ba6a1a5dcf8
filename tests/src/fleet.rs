//! The registry a scenario starts from — sites, wards and the devices in them — created over the API as an admin
//! would, for the tests and the bench alike. A helper panics with what failed: nothing can go on without it.

use medfleet_proto::v1::{self, registry_service_client::RegistryServiceClient};
use tonic::transport::Channel;

pub type Registry = RegistryServiceClient<Channel>;

pub async fn create_site(api: &mut Registry, name: &str, display_name: &str) -> v1::Site {
    api.create_site(v1::CreateSiteRequest {
        site: Some(v1::Site {
            name: name.into(),
            display_name: display_name.into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap_or_else(|e| panic!("create site {name}: {e:?}"))
    .into_inner()
}

pub async fn create_ward(api: &mut Registry, site: &str, name: &str, display_name: &str, beds: &[&str]) -> v1::Ward {
    api.create_ward(v1::CreateWardRequest {
        ward: Some(v1::Ward {
            site: site.into(),
            name: name.into(),
            display_name: display_name.into(),
            beds: beds.iter().map(|b| (*b).to_owned()).collect(),
            ..Default::default()
        }),
    })
    .await
    .unwrap_or_else(|e| panic!("create ward {site}/{name}: {e:?}"))
    .into_inner()
}

/// A Philips patient monitor of `model` — the device most scenarios need — in storage; give it a `location` (and
/// whatever else differs) with struct update syntax.
pub fn monitor(serial: &str, model: &str) -> v1::RegisterDeviceRequest {
    v1::RegisterDeviceRequest {
        serial_number: serial.into(),
        manufacturer: "Philips".into(),
        model: model.into(),
        device_class: v1::DeviceClass::PatientMonitor.into(),
        ..Default::default()
    }
}

/// A ward, or with a non-empty `bed` one of its beds, as a request's location.
pub fn location(site: &str, ward: &str, bed: &str) -> Option<v1::Location> {
    Some(v1::Location {
        site: site.into(),
        ward: ward.into(),
        bed: bed.into(),
    })
}

/// Registers the device; its server-assigned id.
pub async fn register(api: &mut Registry, device: v1::RegisterDeviceRequest) -> String {
    let serial = device.serial_number.clone();
    api.register_device(device)
        .await
        .unwrap_or_else(|e| panic!("register device {serial}: {e:?}"))
        .into_inner()
        .id
}

/// A one-time enrollment token for the device (the server's default lifetime).
pub async fn enrollment_token(api: &mut Registry, device_id: &str) -> String {
    api.issue_enrollment_token(v1::IssueEnrollmentTokenRequest {
        device_id: device_id.to_owned(),
        ttl: None,
        replace: false,
    })
    .await
    .unwrap_or_else(|e| panic!("enrollment token for {device_id}: {e:?}"))
    .into_inner()
    .token
}
