//! The device registry over real mTLS on both backends: CRUD, validation (nothing changes on bad input),
//! uniqueness, preconditions, filters and stable paging.

use std::collections::{BTreeSet, HashMap};

use medfleet_e2e::fleet::{self, location};
use medfleet_e2e::{Backend, TestServer, both_backends};
use medfleet_proto::v1::{self, registry_service_client::RegistryServiceClient};
use sea_orm::{ConnectionTrait as _, Statement};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

type Api = RegistryServiceClient<Channel>;

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

async fn site(api: &mut Api, name: &str) -> v1::Site {
    fleet::create_site(api, name, &format!("{name} hospital")).await
}

async fn ward(api: &mut Api, site: &str, name: &str, beds: &[&str]) -> v1::Ward {
    fleet::create_ward(api, site, name, &name.to_uppercase(), beds).await
}

fn device_request(serial: &str) -> v1::RegisterDeviceRequest {
    fleet::monitor(serial, "IntelliVue MX450")
}

/// The fields an INVALID_ARGUMENT status names in its BadRequest detail.
fn violated_fields(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("INVALID_ARGUMENT carries a BadRequest detail")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

async fn sites_and_wards(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut api = server.admin().await;

    let created = site(&mut api, "stmarys").await;
    assert_eq!(created.display_name, "stmarys hospital");
    let fetched = api
        .get_site(v1::GetSiteRequest { name: "stmarys".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched, created, "a read returns exactly what the write returned");

    let dup = api
        .create_site(v1::CreateSiteRequest {
            site: Some(created.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);

    let updated = api
        .update_site(v1::UpdateSiteRequest {
            site: Some(v1::Site {
                name: "stmarys".into(),
                display_name: "St Mary's".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.display_name, "St Mary's");
    assert_eq!(updated.create_time, created.create_time);
    let seconds = |s: &v1::Site| s.update_time.map(|t| (t.seconds, t.nanos));
    assert!(seconds(&updated) >= seconds(&created));

    let missing = api
        .get_site(v1::GetSiteRequest { name: "nowhere".into() })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let no_parent = api
        .create_ward(v1::CreateWardRequest {
            ward: Some(v1::Ward {
                site: "nowhere".into(),
                name: "icu".into(),
                display_name: "ICU".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(no_parent.code(), Code::NotFound);

    let icu = ward(&mut api, "stmarys", "icu", &["1", "2"]).await;
    assert_eq!(icu.beds, ["1", "2"]);
    ward(&mut api, "stmarys", "ed", &[]).await;
    let dup_ward = api
        .create_ward(v1::CreateWardRequest {
            ward: Some(icu.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(dup_ward.code(), Code::AlreadyExists);

    let widened = api
        .update_ward(v1::UpdateWardRequest {
            ward: Some(v1::Ward {
                site: "stmarys".into(),
                name: "icu".into(),
                beds: vec!["1".into(), "2".into(), "3".into()],
                ..Default::default()
            }),
            update_mask: mask(&["beds"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(widened.beds, ["1", "2", "3"]);
    assert_eq!(widened.display_name, "ICU", "fields outside the mask are kept");

    let wards = api
        .list_wards(v1::ListWardsRequest {
            site: "stmarys".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = wards.wards.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["ed", "icu"]);

    let sites = api
        .list_sites(v1::ListSitesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sites.sites.len(), 1);
    assert!(sites.next_page_token.is_empty());
}
both_backends!(sites_and_wards_crud, sites_and_wards);

async fn devices(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut api = server.admin().await;
    site(&mut api, "stmarys").await;
    ward(&mut api, "stmarys", "icu", &["1", "2"]).await;

    let mut request = device_request("SN-1");
    request.eui64 = "00:12:a3:ff:fe:4b:5c:6d".into();
    request.location = location("stmarys", "icu", "1");
    request.tags = HashMap::from([("asset".into(), "A-17".into())]);
    let device = api.register_device(request).await.unwrap().into_inner();
    assert!(uuid::Uuid::parse_str(&device.id).is_ok());
    assert_eq!(device.state, i32::from(v1::DeviceState::Registered));
    assert_eq!(device.eui64, "00-12-A3-FF-FE-4B-5C-6D", "EUI-64 is normalised");
    assert_eq!(device.location, location("stmarys", "icu", "1"));

    let fetched = api
        .get_device(v1::GetDeviceRequest { id: device.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched, device);

    let moved = api
        .update_device(v1::UpdateDeviceRequest {
            device: Some(v1::Device {
                id: device.id.clone(),
                location: location("stmarys", "icu", "2"),
                tags: HashMap::from([("asset".into(), "A-18".into()), ("owner".into(), "biomed".into())]),
                // Outside the mask: must be ignored.
                serial_number: "CHANGED".into(),
                ..Default::default()
            }),
            update_mask: mask(&["location", "tags"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.location, location("stmarys", "icu", "2"));
    assert_eq!(moved.tags.len(), 2);
    assert_eq!(moved.serial_number, "SN-1");

    let stored = api
        .update_device(v1::UpdateDeviceRequest {
            device: Some(v1::Device {
                id: device.id.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["location"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.location, None, "an empty location puts the device in storage");
    assert_eq!(stored.tags, moved.tags, "tags outside the mask are kept");

    let missing = api
        .get_device(v1::GetDeviceRequest {
            id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}
both_backends!(device_register_get_update, devices);

async fn invalid_input(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut api = server.admin().await;
    site(&mut api, "stmarys").await;
    ward(&mut api, "stmarys", "icu", &["1"]).await;
    api.register_device(device_request("SN-1")).await.unwrap();
    let before = server.snapshot().await;

    // Each case: the request and the fields its rejection must name.
    let bad_sites = [
        (
            v1::Site {
                name: "St Marys".into(),
                display_name: "x".into(),
                ..Default::default()
            },
            "site.name",
        ),
        (
            v1::Site {
                name: "ok".into(),
                display_name: String::new(),
                ..Default::default()
            },
            "site.display_name",
        ),
        (
            v1::Site {
                name: "ok".into(),
                display_name: "a\nb".into(),
                ..Default::default()
            },
            "site.display_name",
        ),
        (
            v1::Site {
                name: "x".repeat(64),
                display_name: "x".into(),
                ..Default::default()
            },
            "site.name",
        ),
    ];
    for (site, field) in bad_sites {
        let status = api
            .create_site(v1::CreateSiteRequest { site: Some(site) })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
    }
    let status = api.create_site(v1::CreateSiteRequest { site: None }).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["site"]);

    let status = api
        .create_ward(v1::CreateWardRequest {
            ward: Some(v1::Ward {
                site: "stmarys".into(),
                name: "ICU 2".into(),
                display_name: " ".into(),
                beds: vec!["1".into(), "1".into(), "bed 2".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["ward.name", "ward.display_name", "ward.beds[1]", "ward.beds[2]"]
    );

    let cases: Vec<(v1::RegisterDeviceRequest, Vec<&str>)> = vec![
        (
            v1::RegisterDeviceRequest::default(),
            vec!["serial_number", "manufacturer", "model", "device_class"],
        ),
        (
            v1::RegisterDeviceRequest {
                serial_number: "has space".into(),
                ..device_request("")
            },
            vec!["serial_number"],
        ),
        (device_request(&"9".repeat(65)), vec!["serial_number"]),
        (
            v1::RegisterDeviceRequest {
                eui64: "00:11:22".into(),
                ..device_request("SN-2")
            },
            vec!["eui64"],
        ),
        (
            v1::RegisterDeviceRequest {
                eui64: "0000000000000000".into(),
                ..device_request("SN-2")
            },
            vec!["eui64"],
        ),
        (
            v1::RegisterDeviceRequest {
                device_class: 99,
                ..device_request("SN-2")
            },
            vec!["device_class"],
        ),
        (
            v1::RegisterDeviceRequest {
                manufacturer: "Philips ".into(),
                ..device_request("SN-2")
            },
            vec!["manufacturer"],
        ),
        (
            v1::RegisterDeviceRequest {
                location: location("StMarys", "", "bed 1"),
                ..device_request("SN-2")
            },
            vec!["location.site", "location.ward", "location.bed"],
        ),
        (
            v1::RegisterDeviceRequest {
                tags: HashMap::from([("Bad Key".into(), "v".into())]),
                ..device_request("SN-2")
            },
            vec!["tags[Bad Key]"],
        ),
        (
            v1::RegisterDeviceRequest {
                tags: (0..33).map(|i| (format!("k{i}"), String::new())).collect(),
                ..device_request("SN-2")
            },
            vec!["tags"],
        ),
        (
            v1::RegisterDeviceRequest {
                tags: HashMap::from([("note".into(), "x".repeat(129))]),
                ..device_request("SN-2")
            },
            vec!["tags[note]"],
        ),
    ];
    for (request, fields) in cases {
        let status = api.register_device(request.clone()).await.unwrap_err();
        assert_eq!(violated_fields(&status), fields, "{request:?}");
    }

    let status = api
        .get_device(v1::GetDeviceRequest {
            id: "not-a-uuid".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["id"]);
    let status = api
        .list_devices(v1::ListDevicesRequest {
            ward: "icu".into(),
            tags: vec!["novalue".into()],
            state: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["state"]);
    let status = api
        .list_devices(v1::ListDevicesRequest {
            ward: "icu".into(),
            tags: vec!["novalue".into()],
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["ward", "tags[0]"]);
    let status = api
        .list_devices(v1::ListDevicesRequest {
            page_size: -1,
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_size", "page_token"]);

    let existing = api
        .list_devices(v1::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices[0]
        .clone();
    for (update_mask, field) in [(None, "update_mask"), (mask(&["serial_number"]), "update_mask")] {
        let status = api
            .update_device(v1::UpdateDeviceRequest {
                device: Some(existing.clone()),
                update_mask,
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
    }
    let status = api
        .update_device(v1::UpdateDeviceRequest {
            device: Some(v1::Device {
                id: existing.id.clone(),
                location: location("stmarys", "icu", "no such bed!"),
                ..Default::default()
            }),
            update_mask: mask(&["location"]),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["device.location.bed"]);
    let status = api
        .update_site(v1::UpdateSiteRequest {
            site: Some(v1::Site {
                name: "stmarys".into(),
                display_name: String::new(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["site.display_name"]);

    assert_eq!(
        server.snapshot().await,
        before,
        "rejected requests changed the database"
    );
}
both_backends!(invalid_input_changes_nothing, invalid_input);

async fn uniqueness_and_preconditions(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut api = server.admin().await;
    site(&mut api, "stmarys").await;
    ward(&mut api, "stmarys", "icu", &["1", "2"]).await;

    let mut first = device_request("SN-1");
    first.eui64 = "0012A3FFFE4B5C6D".into();
    first.location = location("stmarys", "icu", "1");
    let first = api.register_device(first).await.unwrap().into_inner();
    let before = server.snapshot().await;

    let same_serial = api.register_device(device_request("SN-1")).await.unwrap_err();
    assert_eq!(same_serial.code(), Code::AlreadyExists);
    assert!(
        !same_serial.message().contains(&first.id),
        "the existing device's id must not leak: {}",
        same_serial.message()
    );

    let mut same_eui = device_request("SN-2");
    same_eui.eui64 = "00-12-a3-ff-fe-4b-5c-6d".into();
    assert_eq!(
        api.register_device(same_eui).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    let mut no_ward = device_request("SN-3");
    no_ward.location = location("stmarys", "cardiology", "");
    assert_eq!(
        api.register_device(no_ward).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    let mut no_bed = device_request("SN-3");
    no_bed.location = location("stmarys", "icu", "9");
    let status = api.register_device(no_bed).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("no bed '9'"), "{}", status.message());

    let occupied = api
        .update_ward(v1::UpdateWardRequest {
            ward: Some(v1::Ward {
                site: "stmarys".into(),
                name: "icu".into(),
                beds: vec!["2".into()],
                ..Default::default()
            }),
            update_mask: mask(&["beds"]),
        })
        .await
        .unwrap_err();
    assert_eq!(occupied.code(), Code::FailedPrecondition);
    assert_eq!(server.snapshot().await, before, "refused requests changed the database");

    // The same serial from another manufacturer is a different device.
    let mut other = device_request("SN-1");
    other.manufacturer = "GE HealthCare".into();
    api.register_device(other).await.unwrap();

    // A decommissioned device (the lifecycle's end, reached through later RPCs) cannot be changed.
    let db = server.db().await;
    let sql = "UPDATE devices SET state = 'decommissioned' WHERE serial_number = 'SN-1' AND manufacturer = 'Philips'"
        .to_string();
    db.execute_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap();
    let status = api
        .update_device(v1::UpdateDeviceRequest {
            device: Some(v1::Device {
                id: first.id.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["location"]),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}
both_backends!(uniqueness_and_state_preconditions, uniqueness_and_preconditions);

async fn list_all(api: &mut Api, mut request: v1::ListDevicesRequest) -> Vec<v1::Device> {
    let mut all = Vec::new();
    loop {
        let page = api.list_devices(request.clone()).await.unwrap().into_inner();
        all.extend(page.devices);
        if page.next_page_token.is_empty() {
            return all;
        }
        request.page_token = page.next_page_token;
    }
}

async fn filters_and_paging(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut api = server.admin().await;
    site(&mut api, "stmarys").await;
    site(&mut api, "stjohns").await;
    ward(&mut api, "stmarys", "icu", &[]).await;
    ward(&mut api, "stmarys", "ed", &[]).await;
    ward(&mut api, "stjohns", "icu", &[]).await;

    let places = [("stmarys", "icu"), ("stmarys", "ed"), ("stjohns", "icu")];
    let mut ids = BTreeSet::new();
    for i in 0..24 {
        let (s, w) = places[i % 3];
        let mut request = device_request(&format!("SN-{i:03}"));
        request.model = if i % 2 == 0 { "MX450".into() } else { "MX800".into() };
        request.location = location(s, w, "");
        request.tags = HashMap::from([
            ("fleet".into(), if i % 4 == 0 { "a".into() } else { "b".into() }),
            ("floor".into(), (i % 3).to_string()),
        ]);
        ids.insert(api.register_device(request).await.unwrap().into_inner().id);
    }

    // Paging in sevens returns every device exactly once, in id order.
    let paged = list_all(
        &mut api,
        v1::ListDevicesRequest {
            page_size: 7,
            ..Default::default()
        },
    )
    .await;
    let paged_ids: Vec<_> = paged.iter().map(|d| d.id.clone()).collect();
    assert_eq!(paged_ids, ids.iter().cloned().collect::<Vec<_>>());

    let count = |devices: Vec<v1::Device>| devices.len();
    let filter = |site: &str, ward: &str, model: &str, tags: &[&str]| v1::ListDevicesRequest {
        page_size: 5,
        site: site.into(),
        ward: ward.into(),
        model: model.into(),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        ..Default::default()
    };
    assert_eq!(count(list_all(&mut api, filter("stmarys", "", "", &[])).await), 16);
    assert_eq!(count(list_all(&mut api, filter("stmarys", "icu", "", &[])).await), 8);
    assert_eq!(count(list_all(&mut api, filter("stjohns", "icu", "", &[])).await), 8);
    assert_eq!(count(list_all(&mut api, filter("", "", "MX450", &[])).await), 12);
    assert_eq!(count(list_all(&mut api, filter("", "", "", &["fleet=a"])).await), 6);
    assert_eq!(
        count(list_all(&mut api, filter("", "", "", &["fleet=a", "floor=0"])).await),
        2
    );
    assert_eq!(
        count(list_all(&mut api, filter("stmarys", "icu", "MX450", &["fleet=a"])).await),
        2
    );
    assert_eq!(count(list_all(&mut api, filter("", "", "", &["fleet=zzz"])).await), 0);
    let registered = v1::ListDevicesRequest {
        state: v1::DeviceState::Registered.into(),
        ..Default::default()
    };
    assert_eq!(count(list_all(&mut api, registered).await), 24);
    let enrolled = v1::ListDevicesRequest {
        state: v1::DeviceState::Enrolled.into(),
        ..Default::default()
    };
    assert_eq!(count(list_all(&mut api, enrolled).await), 0);

    // A token is bound to its filters.
    let first = api
        .list_devices(filter("stmarys", "", "", &[]))
        .await
        .unwrap()
        .into_inner();
    let mut other = filter("stjohns", "", "", &[]);
    other.page_token = first.next_page_token.clone();
    let status = api.list_devices(other).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Paging stays stable while devices are added between pages: nothing twice, nothing that existed skipped.
    let mut request = v1::ListDevicesRequest {
        page_size: 5,
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut added = 0;
    loop {
        let page = api.list_devices(request.clone()).await.unwrap().into_inner();
        seen.extend(page.devices.into_iter().map(|d| d.id));
        api.register_device(device_request(&format!("LATE-{added}")))
            .await
            .unwrap();
        added += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "a device was returned twice");
    assert!(ids.is_subset(&unique), "a device that existed throughout was skipped");

    // Oversized pages are capped, not refused.
    let big = api
        .list_devices(v1::ListDevicesRequest {
            page_size: 100_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(big.devices.len(), 24 + added);
}
both_backends!(list_filters_and_stable_paging, filters_and_paging);
