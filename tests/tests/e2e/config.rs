//! Configuration push end to end: layered, schema-validated versions; the real agent and simulator applying them;
//! presence, takeover and heartbeat timeouts; pushes across replicas.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use medfleet_core::identity::Identity;
use medfleet_e2e::{Backend, Storage, TestServer, binary, both_backends, fleet};
use medfleet_proto::v1::{
    self, config_service_client::ConfigServiceClient, device_service_client::DeviceServiceClient,
    registry_service_client::RegistryServiceClient, session_request, session_response,
};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

use crate::binaries::Process;

/// Bounds a broken run; never a synchronisation point.
const GUARD: Duration = Duration::from_secs(90);

/// St Mary's with two wards without beds, icu and ed.
async fn setup(server: &TestServer) {
    let mut admin = server.admin().await;
    fleet::create_site(&mut admin, "stmarys", "St Mary's").await;
    for ward in ["icu", "ed"] {
        fleet::create_ward(&mut admin, "stmarys", ward, ward, &[]).await;
    }
}

async fn configs(server: &TestServer) -> ConfigServiceClient<Channel> {
    ConfigServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap())
}

fn layer(kind: v1::ConfigLayerKind, key: &str) -> Option<v1::ConfigLayer> {
    Some(v1::ConfigLayer {
        kind: kind.into(),
        key: key.into(),
    })
}

fn ward(key: &str) -> Option<v1::ConfigLayer> {
    layer(v1::ConfigLayerKind::Ward, key)
}

async fn set(
    api: &mut ConfigServiceClient<Channel>,
    layer: Option<v1::ConfigLayer>,
    document: &str,
) -> Result<v1::ConfigVersion, tonic::Status> {
    api.set_config(v1::SetConfigRequest {
        layer,
        document_json: document.into(),
        comment: "test".into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn drift(api: &mut ConfigServiceClient<Channel>) -> Vec<v1::DeviceConfigStatus> {
    api.list_config_drift(v1::ListConfigDriftRequest {
        include_in_sync: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .devices
}

/// Waits until `done` holds for the drift listing, re-reading it on every presence event (so each device's
/// report wakes the check), and returns the listing.
async fn converge(
    server: &TestServer,
    mut done: impl FnMut(&[v1::DeviceConfigStatus]) -> bool,
) -> Vec<v1::DeviceConfigStatus> {
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let mut watch = RegistryServiceClient::new(channel.clone())
        .watch_devices(v1::WatchDevicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut api = ConfigServiceClient::new(channel);
    let wait = async {
        loop {
            let rows = drift(&mut api).await;
            if done(&rows) {
                return rows;
            }
            watch.message().await.unwrap().expect("the watch ended");
        }
    };
    if let Ok(rows) = tokio::time::timeout(GUARD, wait).await {
        return rows;
    }
    panic!(
        "no convergence within {GUARD:?}: {:#?}",
        drift(&mut configs(server).await).await
    );
}

fn all_in_sync(rows: &[v1::DeviceConfigStatus], count: usize, digest: &str) -> bool {
    rows.len() == count
        && rows
            .iter()
            .all(|r| r.online && r.in_sync && r.reported_digest == digest)
}

fn simulator(server: &TestServer, state: &Path, devices: usize) -> Process {
    let data = server.data_dir();
    let mut command = Command::new(binary("medfleet-agent"));
    command.args([
        "simulate",
        "--server",
        &server.url(),
        "--ca",
        data.ca_cert().to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--devices",
        &devices.to_string(),
        "--admin",
        data.admin_bundle().to_str().unwrap(),
        "--model",
        "MX450",
        "--ward",
        "stmarys/icu",
    ]);
    Process::spawn(command)
}

fn applied_document(state: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(state.join("config.json")).expect("config.json");
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["document"].clone()
}

async fn push_reaches_every_connected_device(backend: Backend) {
    const DEVICES: usize = 100;
    let server = TestServer::start(backend).await;
    setup(&server).await;
    let mut api = configs(&server).await;
    let fleet = set(
        &mut api,
        layer(v1::ConfigLayerKind::Fleet, ""),
        r#"{"limits": {"hr_high": 120, "hr_low": 40}, "sampling_hz": 1}"#,
    )
    .await
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let sim = simulator(&server, state.path(), DEVICES);
    let first = converge(&server, |rows| {
        rows.len() == DEVICES && rows.iter().all(|r| r.online && r.in_sync)
    })
    .await;
    assert!(first.iter().all(|r| r.reported_version == fleet.version));

    let change = set(&mut api, ward("stmarys/icu"), r#"{"limits": {"hr_high": 140}}"#)
        .await
        .unwrap();
    let rows = converge(&server, |rows| {
        rows.iter().all(|r| r.desired_version == change.version) && all_in_sync(rows, DEVICES, &rows[0].desired_digest)
    })
    .await;
    assert!(rows.iter().all(|r| r.reported_version == change.version));
    sim.wait_for(
        &format!(
            "{DEVICES}/{DEVICES} connected; configuration v{} ×{DEVICES}",
            change.version
        ),
        1,
    )
    .await;
    // Every device wrote the merged document to its own state directory.
    let expected = serde_json::json!({"limits": {"hr_high": 140, "hr_low": 40}, "sampling_hz": 1});
    let mut dirs = 0;
    for entry in std::fs::read_dir(state.path()).unwrap() {
        assert_eq!(applied_document(&entry.unwrap().path()), expected);
        dirs += 1;
    }
    assert_eq!(dirs, DEVICES);
    let (_, output) = sim.terminate().await;
    assert!(!output.contains("ERROR"), "{output}");
}
both_backends!(push_reaches_every_connected_device, push_reaches_every_connected_device);

/// A monitor of `model` with a serial of its own, in the St Mary's ward `ward`: its id.
async fn register(server: &TestServer, ward: &str, model: &str) -> String {
    let serial = format!("SN-{}", uuid::Uuid::new_v4().simple());
    fleet::register(
        &mut server.admin().await,
        v1::RegisterDeviceRequest {
            location: fleet::location("stmarys", ward, ""),
            ..fleet::monitor(&serial, model)
        },
    )
    .await
}

fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|b| {
            b.field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}

async fn history(api: &mut ConfigServiceClient<Channel>) -> Vec<v1::ConfigVersion> {
    api.list_config_versions(v1::ListConfigVersionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .versions
}

async fn invalid_changes_change_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    setup(&server).await;
    let device = register(&server, "icu", "MX450").await;
    let mut api = configs(&server).await;
    let schema = r#"{
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "limits": {"type": "object", "properties": {"hr_high": {"type": "integer", "minimum": 60, "maximum": 200}}},
            "sampling_hz": {"type": "integer", "enum": [1, 2, 4]}
        }
    }"#;
    api.set_config_schema(v1::SetConfigSchemaRequest {
        model: "MX450".into(),
        schema_json: schema.into(),
        comment: "vendor limits".into(),
    })
    .await
    .unwrap();
    set(
        &mut api,
        layer(v1::ConfigLayerKind::Fleet, ""),
        r#"{"limits": {"hr_high": 120}}"#,
    )
    .await
    .unwrap();
    let before_history = history(&mut api).await;
    let before_resolved = api
        .resolve_config(v1::ResolveConfigRequest {
            device_id: device.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let audit_before = server.snapshot().await;

    // Not JSON; not an object; violating the schema at the ward, at the device, and for the model's base.
    let not_json = set(&mut api, ward("stmarys/icu"), "{\"limits\": ").await.unwrap_err();
    assert_eq!(not_json.code(), Code::InvalidArgument);
    assert_eq!(violations(&not_json)[0].0, "document_json");
    let not_object = set(&mut api, ward("stmarys/icu"), "[1, 2]").await.unwrap_err();
    assert_eq!(not_object.code(), Code::InvalidArgument);
    let too_high = set(&mut api, ward("stmarys/icu"), r#"{"limits": {"hr_high": 250}}"#)
        .await
        .unwrap_err();
    assert_eq!(too_high.code(), Code::InvalidArgument, "{too_high:?}");
    let found = violations(&too_high);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "/limits/hr_high");
    assert!(found[0].1.contains("250") && found[0].1.contains(&device), "{found:?}");
    let device_override = set(
        &mut api,
        layer(v1::ConfigLayerKind::Device, &device),
        r#"{"sampling_hz": 3}"#,
    )
    .await
    .unwrap_err();
    assert_eq!(violations(&device_override)[0].0, "/sampling_hz");
    let base = set(
        &mut api,
        layer(v1::ConfigLayerKind::Model, "MX450"),
        r#"{"limits": {"hr_high": "high"}}"#,
    )
    .await
    .unwrap_err();
    assert!(
        violations(&base)
            .iter()
            .any(|(p, d)| p == "/limits/hr_high" && d.contains("base")),
        "{:?}",
        violations(&base)
    );
    // A ward that does not exist; a schema the current configuration already breaks; another draft.
    let missing = set(&mut api, ward("stmarys/nowhere"), "{}").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let stricter = api
        .set_config_schema(v1::SetConfigSchemaRequest {
            model: "MX450".into(),
            schema_json: r#"{"properties": {"limits": {"properties": {"hr_high": {"maximum": 100}}}}}"#.into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(stricter.code(), Code::InvalidArgument);
    assert_eq!(violations(&stricter)[0].0, "/limits/hr_high");
    let draft7 = api
        .set_config_schema(v1::SetConfigSchemaRequest {
            model: "MX450".into(),
            schema_json: r#"{"$schema": "http://json-schema.org/draft-07/schema#"}"#.into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(draft7.code(), Code::InvalidArgument);

    // Nothing changed: versions, the device's resolved configuration, the schema, the registry.
    assert_eq!(history(&mut api).await, before_history);
    let after_resolved = api
        .resolve_config(v1::ResolveConfigRequest { device_id: device })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after_resolved, before_resolved);
    let stored_schema = api
        .get_config_schema(v1::GetConfigSchemaRequest { model: "MX450".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stored_schema.schema_json).unwrap(),
        serde_json::from_str::<serde_json::Value>(schema).unwrap()
    );
    assert_eq!(server.snapshot().await, audit_before);
    // A valid change at the same place goes through.
    set(&mut api, ward("stmarys/icu"), r#"{"limits": {"hr_high": 150}}"#)
        .await
        .unwrap();
}
both_backends!(invalid_changes_change_nothing, invalid_changes_change_nothing);

async fn rollback_restores_the_exact_document(backend: Backend) {
    let server = TestServer::start(backend).await;
    setup(&server).await;
    let device = register(&server, "icu", "MX450").await;
    let mut api = configs(&server).await;
    let original =
        r#"{"limits": {"hr_high": 130, "spo2_low": 90}, "display": {"brightness": 0.8}, "tags": ["a", "b"]}"#;
    let first = set(&mut api, ward("stmarys/icu"), original).await.unwrap();
    let second = set(
        &mut api,
        ward("stmarys/icu"),
        r#"{"limits": {"hr_high": 150, "spo2_low": null}}"#,
    )
    .await
    .unwrap();
    let device_layer = set(
        &mut api,
        layer(v1::ConfigLayerKind::Device, &device),
        r#"{"bed_label": "3"}"#,
    )
    .await
    .unwrap();
    let changes = api
        .diff_config_versions(v1::DiffConfigVersionsRequest {
            from_version: first.version,
            to_version: second.version,
        })
        .await
        .unwrap()
        .into_inner()
        .changes;
    let pointers: HashSet<&str> = changes.iter().map(|c| c.pointer.as_str()).collect();
    assert!(
        pointers.contains("/limits/hr_high") && pointers.contains("/display"),
        "{changes:?}"
    );

    let restored = api
        .rollback_config(v1::RollbackConfigRequest {
            to_version: first.version,
            comment: "undo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(restored.version > device_layer.version);
    assert_eq!(restored.rollback_of, first.version);
    assert_eq!(restored.document_json, first.document_json);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&restored.document_json).unwrap(),
        serde_json::from_str::<serde_json::Value>(original).unwrap()
    );
    let current = api
        .get_config_layer(v1::GetConfigLayerRequest {
            layer: ward("stmarys/icu"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(current.document_json, first.document_json);
    assert_eq!(current.version, restored.version);
    let diff = api
        .diff_config_versions(v1::DiffConfigVersionsRequest {
            from_version: first.version,
            to_version: restored.version,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(diff.changes.is_empty(), "{diff:?}");
    // The device resolves the restored ward layer plus its own layer, and knows where each value came from.
    let resolved = api
        .resolve_config(v1::ResolveConfigRequest { device_id: device })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&resolved.document_json).unwrap(),
        serde_json::json!({"limits": {"hr_high": 130, "spo2_low": 90}, "display": {"brightness": 0.8},
                           "tags": ["a", "b"], "bed_label": "3"})
    );
    assert_eq!(resolved.version, restored.version);
    let source = |pointer: &str| resolved.sources.iter().find(|s| s.pointer == pointer).unwrap().clone();
    assert_eq!(
        source("/bed_label").layer,
        layer(v1::ConfigLayerKind::Device, &resolved.device_id)
    );
    assert_eq!(source("/limits/hr_high").version, restored.version);
    // Rolling back to a version that does not exist changes nothing.
    let missing = api
        .rollback_config(v1::RollbackConfigRequest {
            to_version: 9999,
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    // Every change is in the audit trail, with its author.
    let audit =
        v1::audit_service_client::AuditServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap())
            .list_audit_events(v1::ListAuditEventsRequest {
                action: "config.".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events;
    assert_eq!(audit.iter().filter(|e| e.action == "config.set").count(), 3);
    assert_eq!(audit.iter().filter(|e| e.action == "config.rollback").count(), 1);
    assert!(audit.iter().all(|e| e.actor == "medfleet://user/admin"));
}
both_backends!(
    rollback_restores_the_exact_document,
    rollback_restores_the_exact_document
);

/// A device enrolled in-test, with its own certificate.
async fn enrolled(server: &TestServer, ward: &str) -> (String, Channel) {
    let id = register(server, ward, "MX450").await;
    let token = server
        .admin()
        .await
        .issue_enrollment_token(v1::IssueEnrollmentTokenRequest {
            device_id: id.clone(),
            ttl: None,
            replace: false,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let (bundle, _) = server.enroll(&token, &id).await.unwrap();
    (id.clone(), server.channel_for(&bundle).await.unwrap())
}

/// An open session: what the server sends, the sender of the device's side, and the heartbeats it sends until
/// silenced.
struct Session {
    tx: mpsc::Sender<v1::SessionRequest>,
    inbound: tonic::Streaming<v1::SessionResponse>,
    beats: tokio::task::JoinHandle<()>,
}

async fn open(channel: &Channel, device: &str) -> Session {
    let (tx, rx) = mpsc::channel(8);
    tx.send(v1::SessionRequest {
        message: Some(session_request::Message::Hello(v1::Hello {
            device_id: device.into(),
            firmware_version: "1.2.3".into(),
            operational_state: v1::OperationalState::InClinicalUse.into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = DeviceServiceClient::new(channel.clone())
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let welcome = inbound.message().await.unwrap().unwrap();
    assert!(matches!(
        welcome.message,
        Some(session_response::Message::Welcome(ref w)) if w.heartbeat_interval.is_some()
    ));
    let beating = tx.clone();
    let beats = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(200));
        loop {
            every.tick().await;
            let beat = v1::SessionRequest {
                message: Some(session_request::Message::Heartbeat(v1::Heartbeat {
                    operational_state: v1::OperationalState::InClinicalUse.into(),
                })),
            };
            if beating.send(beat).await.is_err() {
                return;
            }
        }
    });
    Session { tx, inbound, beats }
}

impl Session {
    /// Stops the heartbeats (the device falls silent but keeps the stream open).
    fn silence(&self) {
        self.beats.abort();
    }

    async fn next_config(&mut self) -> v1::ApplyConfig {
        match tokio::time::timeout(GUARD, self.inbound.message()).await {
            Ok(Ok(Some(v1::SessionResponse {
                message: Some(session_response::Message::ApplyConfig(apply)),
            }))) => apply,
            other => panic!("expected ApplyConfig, got {other:?}"),
        }
    }

    async fn report(&self, apply: &v1::ApplyConfig, rejection: Option<&str>) {
        self.tx
            .send(v1::SessionRequest {
                message: Some(session_request::Message::ConfigReport(v1::ConfigReport {
                    version: apply.version,
                    digest: apply.digest.clone(),
                    applied: rejection.is_none(),
                    rejection_reason: rejection.unwrap_or_default().into(),
                })),
            })
            .await
            .unwrap();
    }

    async fn ended(mut self) -> tonic::Status {
        loop {
            let next = tokio::time::timeout(GUARD, self.inbound.message())
                .await
                .expect("the session did not end in time");
            match next {
                Ok(Some(_)) => {}
                Err(status) => return status,
                Ok(None) => panic!("the session ended without a status"),
            }
        }
    }
}

/// Waits for a presence event of `device` that satisfies `done`.
async fn presence(
    watch: &mut tonic::Streaming<v1::DeviceEvent>,
    device: &str,
    mut done: impl FnMut(&v1::DevicePresence) -> bool,
) -> v1::DevicePresence {
    let wait = async {
        loop {
            let event = watch.message().await.unwrap().expect("watch ended");
            let d = event.device.unwrap();
            if d.id == device
                && let Some(p) = d.presence
                && done(&p)
            {
                return p;
            }
        }
    };
    tokio::time::timeout(GUARD, wait).await.expect("presence change")
}

async fn watch(server: &TestServer) -> tonic::Streaming<v1::DeviceEvent> {
    server
        .admin()
        .await
        .watch_devices(v1::WatchDevicesRequest {
            initial: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn sessions_presence_takeover_and_timeouts(backend: Backend) {
    let storage = Storage::new(backend).await;
    let mut config = storage.config();
    config.heartbeat_timeout = Duration::from_secs(2);
    let server = TestServer::start_on(config).await;
    setup(&server).await;
    let mut api = configs(&server).await;
    let version = set(&mut api, ward("stmarys/icu"), r#"{"rate": 2}"#).await.unwrap();
    let (device, channel) = enrolled(&server, "icu").await;
    let (other, _) = enrolled(&server, "icu").await;
    let mut events = watch(&server).await;

    // A device may not read configuration through the operator API, its own or another's.
    for id in [&device, &other] {
        let refused = ConfigServiceClient::new(channel.clone())
            .resolve_config(v1::ResolveConfigRequest { device_id: id.clone() })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    }

    // The session delivers the device's own configuration; a rejection is reported as drift with its reason.
    let mut first = open(&channel, &device).await;
    let apply = first.next_config().await;
    assert_eq!(apply.version, version.version);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&apply.document_json).unwrap(),
        serde_json::json!({"rate": 2})
    );
    let online = presence(&mut events, &device, |p| p.online).await;
    assert_eq!(online.firmware_version, "1.2.3");
    assert_eq!(online.operational_state, i32::from(v1::OperationalState::InClinicalUse));
    first.report(&apply, Some("rate 2 Hz unsupported")).await;
    let rejected = presence(&mut events, &device, |p| !p.config_rejection.is_empty()).await;
    assert_eq!(
        rejected.config_rejection,
        format!("version {} rejected: rate 2 Hz unsupported", version.version)
    );
    assert!(
        rejected.reported_config_digest.is_empty(),
        "a rejected document is not what the device runs"
    );
    let row = drift(&mut api)
        .await
        .into_iter()
        .find(|r| r.device_id == device)
        .unwrap();
    assert!(
        !row.in_sync && row.rejection_reason.contains("rate 2 Hz unsupported"),
        "{row:?}"
    );

    // A second session of the same device replaces the first, which ends with ABORTED.
    let mut second = open(&channel, &device).await;
    let status = first.ended().await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("newer session"), "{status:?}");
    let apply = second.next_config().await;
    second.report(&apply, None).await;
    presence(&mut events, &device, |p| {
        p.online && p.reported_config_digest == apply.digest && p.config_rejection.is_empty()
    })
    .await;
    let listed = RegistryServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap())
        .list_devices(v1::ListDevicesRequest {
            online: Some(true),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert_eq!(
        listed.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        [device.as_str()]
    );

    // A change pushes at once to the open session.
    let next = set(&mut api, ward("stmarys/icu"), r#"{"rate": 4}"#).await.unwrap();
    let apply = second.next_config().await;
    assert_eq!(apply.version, next.version);

    // Silence past the heartbeat timeout closes the session and marks the device offline.
    second.silence();
    let status = second.ended().await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let offline = presence(&mut events, &device, |p| !p.online).await;
    assert!(offline.disconnect_time.is_some());
    let listed = RegistryServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap())
        .list_devices(v1::ListDevicesRequest {
            online: Some(true),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert!(listed.is_empty(), "{listed:?}");
}
both_backends!(
    sessions_presence_takeover_and_timeouts,
    sessions_presence_takeover_and_timeouts
);

fn cli(server: &TestServer, args: &[&str]) -> std::process::Output {
    std::process::Command::new(binary("medfleet"))
        .args(["--server", &server.url(), "--credentials"])
        .arg(server.data_dir().admin_bundle())
        .args(args)
        .output()
        .unwrap()
}

fn agent_run(state: &Path) -> Process {
    let mut command = Command::new(binary("medfleet-agent"));
    command.args(["run", "--state-dir", state.to_str().unwrap()]);
    Process::spawn(command)
}

async fn offline_agent_converges_on_reconnect(backend: Backend) {
    let server = TestServer::start(backend).await;
    setup(&server).await;
    let device = register(&server, "ed", "MX450").await;
    let token = medfleet_e2e::fleet::enrollment_token(&mut server.admin().await, &device).await;
    let state = server.enroll_agent(&token).await;
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let v1_file = write("v1.json", r#"{"limits": {"spo2_low": 90}}"#);
    let out = cli(
        &server,
        &["config", "set", "--ward", "stmarys/ed", &v1_file, "-m", "first"],
    );
    assert!(out.status.success(), "{out:?}");

    let mut events = watch(&server).await;
    let agent = agent_run(state.path());
    agent.wait_for("configuration applied", 1).await;
    assert_eq!(
        applied_document(state.path()),
        serde_json::json!({"limits": {"spo2_low": 90}})
    );
    let online = cli(&server, &["devices", "list", "--online", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&online.stdout).unwrap();
    assert_eq!(listed[0]["id"], device.as_str(), "{listed}");
    assert_eq!(listed[0]["presence"]["online"], true);
    // The table names the replica holding the session and the firmware the device reported.
    let table = cli(&server, &["devices", "list", "--online"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("REPLICA") && table.contains("FIRMWARE"), "{table}");
    for field in ["replica", "firmware_version"] {
        let value = listed[0]["presence"][field].as_str().unwrap();
        assert!(!value.is_empty() && table.contains(value), "{field} {value:?}: {table}");
    }

    // Offline: the change waits for the device.
    let (status, _) = agent.terminate().await;
    assert!(status.success());
    presence(&mut events, &device, |p| !p.online).await;
    let v2_file = write("v2.json", r#"{"limits": {"spo2_low": 88}, "sampling_hz": 2}"#);
    let out = cli(
        &server,
        &["config", "set", "--device", &device, &v2_file, "-m", "for this bed"],
    );
    assert!(out.status.success(), "{out:?}");
    let drifting = cli(&server, &["config", "drift", "-o", "json"]);
    let drifting: serde_json::Value = serde_json::from_slice(&drifting.stdout).unwrap();
    assert_eq!(drifting[0]["device_id"], device.as_str(), "{drifting}");
    assert_eq!(drifting[0]["online"], false);

    // Reconnecting converges.
    let agent = agent_run(state.path());
    agent.wait_for("configuration applied", 1).await;
    assert_eq!(
        applied_document(state.path()),
        serde_json::json!({"limits": {"spo2_low": 88}, "sampling_hz": 2})
    );
    let explained = cli(&server, &["config", "get", &device, "--explain", "-o", "json"]);
    let explained: serde_json::Value = serde_json::from_slice(&explained.stdout).unwrap();
    let sources = explained["sources"].as_array().unwrap();
    assert!(
        sources
            .iter()
            .any(|s| s["pointer"] == "/sampling_hz" && s["layer"] == format!("device {device}"))
    );
    let (status, _) = agent.terminate().await;
    assert!(status.success());

    // A restart does not re-apply what the device already runs: the next push it sees is the next change.
    let agent = agent_run(state.path());
    agent.wait_for("session established", 1).await;
    let v3_file = write("v3.json", r#"{"sampling_hz": 4}"#);
    let out = cli(&server, &["config", "set", "--device", &device, &v3_file]);
    assert!(out.status.success(), "{out:?}");
    agent.wait_for("configuration applied", 1).await;
    let (status, output) = agent.terminate().await;
    assert!(status.success());
    assert_eq!(output.matches("configuration applied").count(), 1, "{output}");
    assert!(!output.contains("already applied"), "{output}");
    assert_eq!(applied_document(state.path())["sampling_hz"], 4);
}
both_backends!(
    offline_agent_converges_on_reconnect,
    offline_agent_converges_on_reconnect
);

/// Two replicas on one PostgreSQL: a change made through A reaches devices connected to B at once (LISTEN/NOTIFY),
/// and a session opened on B replaces the same device's session on A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_takeover_across_replicas() {
    if medfleet_e2e::skip_postgres() {
        return;
    }
    let storage = Storage::new(Backend::Postgres).await;
    // A long reconcile interval: only the notification can deliver within the test.
    let replica = |name: &str| {
        let mut config = storage.config();
        config.replica_name = name.into();
        config.config_reconcile_interval = Duration::from_hours(1);
        config
    };
    let a = TestServer::start_on(replica("replica-a")).await;
    a.wait_ready().await;
    let b = TestServer::start_on(replica("replica-b")).await;
    b.wait_ready().await;
    setup(&a).await;
    let state = tempfile::tempdir().unwrap();
    let sim = simulator(&b, state.path(), 10);
    converge(&a, |rows| {
        rows.len() == 10 && rows.iter().all(|r| r.online && r.in_sync)
    })
    .await;
    let mut api = configs(&a).await;
    let change = set(&mut api, ward("stmarys/icu"), r#"{"limits": {"hr_high": 135}}"#)
        .await
        .unwrap();
    converge(&a, |rows| {
        rows.iter().all(|r| r.desired_version == change.version) && all_in_sync(rows, 10, &rows[0].desired_digest)
    })
    .await;
    let listed = RegistryServiceClient::new(a.channel(&a.admin_bundle()).await.unwrap())
        .list_devices(v1::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert!(
        listed
            .iter()
            .all(|d| d.presence.as_ref().unwrap().replica == "replica-b")
    );
    sim.terminate().await;

    let (device, _) = enrolled(&a, "icu").await;
    let bundle = a.issue(&Identity::Device(device.parse().unwrap()));
    let on_a = open(&a.channel(&bundle).await.unwrap(), &device).await;
    let _on_b = open(&b.channel(&bundle).await.unwrap(), &device).await;
    let status = on_a.ended().await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
}
