//! Firmware updates carried out by the real `medfleet-agent` binary against the real server, both backends: an
//! install that succeeds and survives a restart, a health check that fails and rolls the device back by itself,
//! a device of another model refusing, a device in clinical use waiting until it is free, a replayed command
//! answered without a second install, an operator retry carried out as a new attempt, a download killed midway
//! that resumes, a closed maintenance window holding installs, a fleet rollback through a signed downgrade, a
//! medfleetd SIGKILLed mid-rollout; and a compromised control plane (rows rewritten in its database, metadata
//! signed with its own online keys) that cannot make a device install an altered image, an image longer than
//! signed, an older release, metadata older than it saw, unsigned or wrongly signed targets, an expired timestamp
//! or a snapshot naming other targets.

use std::path::{Path, PathBuf};

use medfleet_core::firmware::tuf;
use medfleet_e2e::{Backend, TestServer, binary, both_backends, count_rows};
use medfleet_proto::v1::{
    self, registry_service_client::RegistryServiceClient, rollout_service_client::RolloutServiceClient,
};
use sea_orm::ConnectionTrait as _;
use tokio::process::Command;
use tonic::transport::Channel;

use crate::binaries::Process;
use crate::firmware::{Keys, MODEL, device_state, image, in_a_year, rollout_to, target, trust_on, upload, wait_for};

/// A real agent's state directory, enrolled.
pub(crate) struct Device {
    pub(crate) id: String,
    pub(crate) state: tempfile::TempDir,
}

pub(crate) async fn enroll(server: &TestServer, registry: &mut RegistryServiceClient<Channel>, serial: &str) -> Device {
    enroll_as(server, registry, medfleet_e2e::fleet::monitor(serial, MODEL)).await
}

pub(crate) async fn enroll_as(
    server: &TestServer,
    registry: &mut RegistryServiceClient<Channel>,
    device: v1::RegisterDeviceRequest,
) -> Device {
    let id = medfleet_e2e::fleet::register(registry, device).await;
    let token = medfleet_e2e::fleet::enrollment_token(registry, &id).await;
    let state = server.enroll_agent(&token).await;
    // What the device's clinical software would write; without it the agent reports an unknown state.
    std::fs::write(state.path().join("operational-state"), "idle\n").unwrap();
    Device { id, state }
}

/// `medfleet-agent run` for `device`, trusting `root`, with `extra` flags (faults, another model).
pub(crate) fn run(device: &Device, root: &Path, extra: &[&str]) -> Process {
    let mut command = Command::new(binary("medfleet-agent"));
    command
        .args(["run", "--heartbeat", "1s", "--firmware-version", "2.0.0"])
        .arg("--state-dir")
        .arg(device.state.path())
        .arg("--tuf-root")
        .arg(root)
        .args(extra)
        .env("MEDFLEET_AGENT_LOG", "info");
    if !extra.contains(&"--hardware-id") {
        command.args(["--hardware-id", MODEL]);
    }
    Process::spawn(command)
}

fn slots(device: &Device) -> serde_json::Value {
    let text = std::fs::read_to_string(device.state.path().join("firmware/slots.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The release counter of the image the device runs (0: the factory image).
pub(crate) fn running_counter(device: &Device) -> u64 {
    let slots = slots(device);
    let active = slots["active"].as_str().unwrap();
    slots[active]["release_counter"].as_u64().unwrap_or(0)
}

/// Published targets: each upload signs the previous targets metadata plus one image (two of three keys).
pub(crate) struct Publisher {
    keys: Keys,
    pub(crate) root: PathBuf,
    targets: Option<Vec<u8>>,
    _dir: tempfile::TempDir,
}

impl Publisher {
    pub(crate) async fn new(channel: &Channel) -> Self {
        let (keys, root) = trust_on(channel).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.json");
        std::fs::write(&path, &root).unwrap();
        Self {
            keys,
            root: path,
            targets: None,
            _dir: dir,
        }
    }

    pub(crate) async fn publish(
        &mut self,
        channel: &Channel,
        counter: u64,
        size: usize,
        seed: u8,
    ) -> (v1::Artifact, Vec<u8>) {
        let bytes = image(size, seed);
        let signed_target = target(&format!("mx450-2.{counter}.0.img"), &bytes, counter);
        let signed = tuf::sign_targets(
            self.targets.as_deref(),
            &signed_target,
            in_a_year(),
            &[&self.keys.targets[0], &self.keys.targets[2]],
        )
        .await
        .unwrap();
        let artifact = upload(channel, &signed_target.name, &signed, &bytes).await.unwrap();
        self.targets = Some(signed);
        (artifact, bytes)
    }
}

pub(crate) async fn roll_out(
    rollouts: &mut RolloutServiceClient<Channel>,
    artifact: &v1::Artifact,
    devices: &[&Device],
) -> String {
    rollouts
        .create_rollout(rollout_to(&artifact.id, devices.iter().map(|d| d.id.clone()).collect()))
        .await
        .unwrap()
        .into_inner()
        .id
}

pub(crate) fn is(state: v1::ActionState) -> impl Fn(&v1::RolloutDevice) -> bool {
    move |d| d.state == i32::from(state)
}

async fn real_agents_install_roll_back_wait_and_refuse_replays(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let mut publisher = Publisher::new(&channel).await;
    let (artifact, bytes) = publisher.publish(&channel, 1, 300_000, 7).await;
    let mut registry = server.admin().await;
    let good = enroll(&server, &mut registry, "SN-AG-GOOD").await;
    let sick = enroll(&server, &mut registry, "SN-AG-SICK").await;
    let other = enroll(&server, &mut registry, "SN-AG-OTHER").await;
    let busy = enroll(&server, &mut registry, "SN-AG-BUSY").await;
    std::fs::write(busy.state.path().join("operational-state"), "in-clinical-use\n").unwrap();
    // Its clinical software has not started: the state is unknown and the device is deferred, not installed.
    let silent = enroll(&server, &mut registry, "SN-AG-SILENT").await;
    std::fs::remove_file(silent.state.path().join("operational-state")).unwrap();

    let good_agent = run(&good, &publisher.root, &[]);
    let _sick_agent = run(&sick, &publisher.root, &["--fault-health-failure", "1"]);
    let _other_agent = run(&other, &publisher.root, &["--hardware-id", "Other Model X1"]);
    let _busy_agent = run(&busy, &publisher.root, &[]);
    let _silent_agent = run(&silent, &publisher.root, &[]);
    for agent in [&good_agent] {
        agent.wait_for("session established", 1).await;
    }

    let mut rollouts = RolloutServiceClient::new(channel.clone());
    let id = roll_out(&mut rollouts, &artifact, &[&good, &sick, &other, &busy, &silent]).await;
    let detail = wait_for(&mut rollouts, &id, "every device's outcome", |d| {
        is(v1::ActionState::Succeeded)(device_state(d, &good.id))
            && is(v1::ActionState::RolledBack)(device_state(d, &sick.id))
            && is(v1::ActionState::Failed)(device_state(d, &other.id))
            && is(v1::ActionState::Deferred)(device_state(d, &busy.id))
            && is(v1::ActionState::Deferred)(device_state(d, &silent.id))
    })
    .await;
    assert_eq!(device_state(&detail, &silent.id).reason, "operational_state_unknown");
    assert_eq!(running_counter(&silent), 0);
    assert_eq!(device_state(&detail, &sick.id).reason, "health_check_failed");
    assert_eq!(device_state(&detail, &other.id).reason, "wrong_model");
    assert_eq!(device_state(&detail, &busy.id).reason, "in_clinical_use");

    // The good device runs the new image from its other slot; the sick one is back on the factory image.
    assert_eq!(running_counter(&good), 1);
    let good_slots = slots(&good);
    let active = good_slots["active"].as_str().unwrap();
    assert_eq!(active, "b", "{good_slots}");
    assert_eq!(
        std::fs::read(good.state.path().join("firmware/slot-b.img")).unwrap(),
        bytes
    );
    assert_eq!(running_counter(&sick), 0);
    assert!(slots(&sick)["trial"].is_null());
    let db = server.db().await;
    let audited = |action: &str, running: &str| {
        format!(
            "SELECT COUNT(*) FROM audit_log WHERE action = 'rollout.device.{action}' AND detail LIKE '%running {running}%'"
        )
    };
    assert_eq!(count_rows(&db, &audited("succeeded", "2.1.0 (release 1)")).await, 1);
    assert_eq!(count_rows(&db, &audited("rolled-back", "2.0.0 (release 0)")).await, 1);

    // Free now: the device reports it and installs.
    std::fs::write(busy.state.path().join("operational-state"), "idle\n").unwrap();
    wait_for(&mut rollouts, &id, "the freed device's install", |d| {
        is(v1::ActionState::Succeeded)(device_state(d, &busy.id))
    })
    .await;
    assert_eq!(running_counter(&busy), 1);

    // An operator retry is a new attempt: the device of another model carries it out (and refuses again).
    rollouts
        .retry_failed(v1::RolloutCommandRequest {
            rollout: id.clone(),
            comment: "checking the model again".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let retried = wait_for(&mut rollouts, &id, "the retried attempt", |d| {
        let d = device_state(d, &other.id);
        d.attempt == 2 && is(v1::ActionState::Failed)(d)
    })
    .await;
    assert_eq!(device_state(&retried, &other.id).reason, "wrong_model");
    // A plain retry leaves a device that rolled back by itself alone; asked to, it is retried too (and rolls back
    // again: its health check still fails).
    assert_eq!(device_state(&retried, &sick.id).attempt, 1);
    rollouts
        .retry_failed(v1::RolloutCommandRequest {
            rollout: id.clone(),
            comment: "health probe replaced".into(),
            include_rolled_back: true,
        })
        .await
        .unwrap();
    let again = wait_for(&mut rollouts, &id, "the rolled-back device's second attempt", |d| {
        let d = device_state(d, &sick.id);
        d.attempt == 2 && is(v1::ActionState::RolledBack)(d)
    })
    .await;
    assert_eq!(device_state(&again, &sick.id).reason, "health_check_failed");
    assert_eq!(running_counter(&sick), 0);

    // A replayed command (the action made current again behind the server's back, the agent restarted) is
    // answered with how it ended: no second download, no second install.
    let slot_written = std::fs::metadata(good.state.path().join("firmware/slot-b.img"))
        .unwrap()
        .modified()
        .unwrap();
    let before = good_agent.kill().await;
    assert_eq!(
        before.matches("firmware installed; rebooting onto it").count(),
        1,
        "{before}"
    );
    db.execute_unprepared(&format!(
        "UPDATE rollout_actions SET state = 'notified', active_device = device_id WHERE device_id = \
         (SELECT id FROM devices WHERE serial_number = '{}')",
        "SN-AG-GOOD"
    ))
    .await
    .unwrap();
    let good_agent = run(&good, &publisher.root, &[]);
    good_agent.wait_for("reporting how it ended", 1).await;
    wait_for(&mut rollouts, &id, "the replayed action's outcome", |d| {
        is(v1::ActionState::Succeeded)(device_state(d, &good.id))
    })
    .await;
    let after = good_agent.kill().await;
    assert!(!after.contains("firmware downloaded"), "{after}");
    assert_eq!(
        std::fs::metadata(good.state.path().join("firmware/slot-b.img"))
            .unwrap()
            .modified()
            .unwrap(),
        slot_written
    );
    assert_eq!(running_counter(&good), 1);
    server.stop().await.unwrap();
}

both_backends!(
    real_agents_install_roll_back_wait_and_refuse_replays,
    real_agents_install_roll_back_wait_and_refuse_replays
);

/// SQL that overwrites the first stored chunk of the artifact `target` with `expression` of its own data.
fn tamper_chunk(target: &str, expression: &str) -> String {
    format!(
        "UPDATE firmware_chunks SET data = {expression} WHERE sha256 = (SELECT c.chunk_sha256 FROM \
         firmware_artifact_chunks c JOIN firmware_artifacts a ON a.id = c.artifact_id WHERE a.target_name = \
         '{target}' AND c.idx = 0)"
    )
}

async fn metadata_rows(db: &sea_orm::DatabaseConnection) -> Vec<(String, String)> {
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT role, body FROM firmware_metadata ORDER BY role",
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            (
                r.try_get::<String>("", "role").unwrap(),
                r.try_get::<String>("", "body").unwrap(),
            )
        })
        .collect()
}

async fn restore_metadata(db: &sea_orm::DatabaseConnection, rows: &[(String, String)]) {
    for (role, body) in rows {
        db.execute_unprepared(&format!(
            "UPDATE firmware_metadata SET body = '{}' WHERE role = '{role}'",
            body.replace('\'', "''")
        ))
        .await
        .unwrap();
    }
}

async fn a_compromised_server_cannot_make_agents_install(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let mut publisher = Publisher::new(&channel).await;
    let db = server.db().await;
    let (first, _) = publisher.publish(&channel, 1, 200_000, 11).await;
    let first_metadata = metadata_rows(&db).await;
    let (second, _) = publisher.publish(&channel, 2, 200_000, 12).await;
    let (altered, _) = publisher.publish(&channel, 3, 200_000, 13).await;
    let (endless, _) = publisher.publish(&channel, 4, 200_000, 14).await;
    // Same length, other bytes; and twice the signed length.
    let (zeroed, doubled) = match backend {
        Backend::Sqlite => ("zeroblob(length(data))", "CAST(data || data AS BLOB)"),
        Backend::Postgres => ("decode(repeat('00', length(data)), 'hex')", "data || data"),
    };
    db.execute_unprepared(&tamper_chunk(&altered.target_name, zeroed))
        .await
        .unwrap();
    db.execute_unprepared(&tamper_chunk(&endless.target_name, doubled))
        .await
        .unwrap();

    let mut registry = server.admin().await;
    let victims = [
        enroll(&server, &mut registry, "SN-ATK-1").await,
        enroll(&server, &mut registry, "SN-ATK-2").await,
        enroll(&server, &mut registry, "SN-ATK-3").await,
    ];
    let _agents: Vec<Process> = victims.iter().map(|d| run(d, &publisher.root, &[])).collect();
    let mut rollouts = RolloutServiceClient::new(channel.clone());
    let outcome = async |rollouts: &mut RolloutServiceClient<Channel>, artifact: &v1::Artifact, device: &Device| {
        let id = roll_out(rollouts, artifact, &[device]).await;
        let detail = wait_for(rollouts, &id, "the device's verdict", |d| {
            let d = device_state(d, &device.id);
            is(v1::ActionState::Failed)(d) || is(v1::ActionState::Succeeded)(d)
        })
        .await;
        let d = device_state(&detail, &device.id);
        (
            medfleet_proto::convert::action_state_from_wire(d.state)
                .map(medfleet_core::firmware::state::ActionState::as_str),
            d.reason.clone(),
        )
    };
    assert_eq!(
        outcome(&mut rollouts, &altered, &victims[0]).await,
        (Some("failed"), "hash_mismatch".to_owned())
    );
    assert_eq!(
        outcome(&mut rollouts, &endless, &victims[1]).await,
        (Some("failed"), "too_large".to_owned())
    );
    // Neither kept a byte of what it refused.
    for victim in &victims[..2] {
        assert_eq!(running_counter(victim), 0);
        let download = victim.state.path().join("firmware/download");
        let left = std::fs::read_dir(&download).map_or(0, Iterator::count);
        assert_eq!(left, 0, "partial downloads left in {}", download.display());
    }

    // The third installs release 2; release 1 afterwards is older, and so is metadata older than it saw.
    assert_eq!(
        outcome(&mut rollouts, &second, &victims[2]).await,
        (Some("succeeded"), String::new())
    );
    assert_eq!(running_counter(&victims[2]), 2);
    assert_eq!(
        outcome(&mut rollouts, &first, &victims[2]).await,
        (Some("failed"), "not_newer".to_owned())
    );
    let current_metadata = metadata_rows(&db).await;
    restore_metadata(&db, &first_metadata).await;
    assert_eq!(
        outcome(&mut rollouts, &first, &victims[2]).await,
        (Some("failed"), "metadata_rollback".to_owned())
    );
    // Targets metadata rewritten (a target's version changed) no longer carries valid signatures.
    restore_metadata(&db, &current_metadata).await;
    let forged: Vec<(String, String)> = current_metadata
        .iter()
        .filter(|(role, _)| role == "targets")
        .map(|(role, body)| (role.clone(), body.replace("\"2.2.0\"", "\"9.2.0\"")))
        .collect();
    assert_ne!(
        forged,
        current_metadata
            .iter()
            .filter(|(r, _)| r == "targets")
            .cloned()
            .collect::<Vec<_>>()
    );
    restore_metadata(&db, &forged).await;
    let (state, reason) = outcome(&mut rollouts, &second, &victims[0]).await;
    assert_eq!(state, Some("failed"));
    assert!(
        ["untrusted_signature", "inconsistent_metadata"].contains(&reason.as_str()),
        "{reason}"
    );
    assert_eq!(running_counter(&victims[0]), 0);
    server.stop().await.unwrap();
}

both_backends!(
    a_compromised_server_cannot_make_agents_install,
    a_compromised_server_cannot_make_agents_install
);

/// An agent killed in the middle of a slow download continues from the bytes it kept, and one whose streams
/// keep breaking off still gets there.
async fn an_interrupted_download_resumes(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let mut publisher = Publisher::new(&channel).await;
    let size = 3 * 1024 * 1024 + 5;
    let (artifact, _) = publisher.publish(&channel, 1, size, 21).await;
    let mut registry = server.admin().await;
    let device = enroll(&server, &mut registry, "SN-RESUME").await;
    let slow = run(&device, &publisher.root, &["--fault-download-rate", "1048576"]);
    let mut rollouts = RolloutServiceClient::new(channel.clone());
    let id = roll_out(&mut rollouts, &artifact, &[&device]).await;
    wait_for(&mut rollouts, &id, "a part of the download", |d| {
        let d = device_state(d, &device.id);
        is(v1::ActionState::Downloading)(d) && d.bytes_downloaded >= 1024 * 1024
    })
    .await;
    slow.kill().await;
    let resumed = run(&device, &publisher.root, &["--fault-download-cut", "1048576"]);
    wait_for(&mut rollouts, &id, "the install", |d| {
        is(v1::ActionState::Succeeded)(device_state(d, &device.id))
    })
    .await;
    let output = resumed.kill().await;
    let offsets: Vec<u64> = output
        .lines()
        .filter(|l| l.contains("resuming the download"))
        .filter_map(|l| l.split("offset=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        offsets.first().is_some_and(|o| *o >= 1024 * 1024),
        "the restarted agent resumes from what it kept: {offsets:?}\n{output}"
    );
    assert!(offsets.len() >= 2, "cut streams resume too: {offsets:?}\n{output}");
    assert_eq!(running_counter(&device), 1);
    server.stop().await.unwrap();
}

both_backends!(an_interrupted_download_resumes, an_interrupted_download_resumes);

/// SIGKILL of medfleetd in the middle of a rollout to a simulated ward, restart on the same port: the restarted
/// replica takes the scheduler lease once the dead one's expires, the devices reconnect and resume their
/// downloads, and every device installs exactly once.
async fn a_rollout_survives_a_server_kill(backend: Backend) {
    use crate::binaries::Daemon;

    const DEVICES: usize = 12;
    let storage = medfleet_e2e::Storage::new(backend).await;
    let data_dir = storage.dir.path().join("data");
    let first = Daemon::start_on(&data_dir, &storage.database_url, "127.0.0.1:0", &[]).await;
    let port = first.grpc_port;
    let url = format!("https://localhost:{port}");
    let admin_bundle = medfleet_proto::client::Bundle::load(&data_dir.join("admin.pem")).unwrap();
    let channel = medfleet_proto::client::connect(&url, &admin_bundle).await.unwrap();
    let mut publisher = Publisher::new(&channel).await;
    let (artifact, bytes) = publisher.publish(&channel, 1, 2 * 1024 * 1024 + 3, 31).await;

    let state = tempfile::tempdir().unwrap();
    let mut command = Command::new(binary("medfleet-agent"));
    command
        .args(["simulate", "--server", &url, "--ca"])
        .arg(data_dir.join("ca/ca.crt"))
        .arg("--state-dir")
        .arg(state.path())
        .args(["--devices", &DEVICES.to_string(), "--model", MODEL, "--admin"])
        .arg(data_dir.join("admin.pem"))
        .arg("--tuf-root")
        .arg(&publisher.root)
        .args(["--heartbeat", "1s", "--firmware-version", "2.0.0"])
        // Slow links, so the kill lands while devices are downloading.
        .args(["--fault-download-rate", "1048576"]);
    let agents = Process::spawn(command);
    agents.wait_for(&format!("{DEVICES}/{DEVICES} connected"), 1).await;

    let mut rollouts = RolloutServiceClient::new(channel.clone());
    let created = rollouts
        .create_rollout(v1::CreateRolloutRequest {
            artifact: artifact.id.clone(),
            target: Some(v1::create_rollout_request::Target::Selector(v1::DeviceSelector {
                hardware_id: MODEL.into(),
                ..Default::default()
            })),
            waves: vec!["25%".into(), "100%".into()],
            success_threshold: "100%".into(),
            soak: Some(prost_types::Duration { seconds: 0, nanos: 0 }),
            min_executed: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        created.counts.as_ref().map(|c| c.targeted),
        Some(u32::try_from(DEVICES).unwrap())
    );
    wait_for(&mut rollouts, &created.id, "downloads in the second wave", |d| {
        d.rollout.as_ref().is_some_and(|r| r.current_wave == 1)
            && d.devices
                .iter()
                .any(|d| is(v1::ActionState::Downloading)(d) && d.bytes_downloaded > 0)
    })
    .await;
    first.process.kill().await;
    let _second = Daemon::start_on(&data_dir, &storage.database_url, &format!("127.0.0.1:{port}"), &[]).await;
    let channel = medfleet_proto::client::connect(&url, &admin_bundle).await.unwrap();
    let mut rollouts = RolloutServiceClient::new(channel);
    let done = wait_for(&mut rollouts, &created.id, "completion after the restart", |d| {
        d.rollout
            .as_ref()
            .is_some_and(|r| r.state == i32::from(v1::RolloutState::Completed))
    })
    .await;
    assert!(done.devices.iter().all(is(v1::ActionState::Succeeded)), "{done:?}");
    // Each device wrote its new slot once and remembers one finished action.
    for i in 0..DEVICES {
        let dir = state.path().join(format!("device-{i:05}/firmware"));
        let slots: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("slots.json")).unwrap()).unwrap();
        assert_eq!(slots["active"], "b", "{slots}");
        assert_eq!(slots["finished"].as_array().map(Vec::len), Some(1), "{slots}");
        assert_eq!(std::fs::read(dir.join("slot-b.img")).unwrap(), bytes);
    }
    drop(agents);
}

both_backends!(a_rollout_survives_a_server_kill, a_rollout_survives_a_server_kill);

/// The server's online snapshot and timestamp keys, as a compromised medfleetd holds them.
async fn online_keys(server: &TestServer, db: &sea_orm::DatabaseConnection) -> (tuf::SigningKey, tuf::SigningKey) {
    let secrets = medfleet_server::identity::secrets::Secrets::new(server.keyring());
    let key = async |role: &str| {
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                format!("SELECT sealed_private FROM firmware_keys WHERE role = '{role}'"),
            ))
            .await
            .unwrap()
            .unwrap();
        let sealed: String = row.try_get("", "sealed_private").unwrap();
        let pem = secrets
            .open_text(&format!("firmware-online-key:{role}"), &sealed)
            .unwrap();
        tuf::SigningKey::from_pem(&pem).unwrap()
    };
    (key("snapshot").await, key("timestamp").await)
}

/// Publishes `targets` as a compromised medfleetd can: under a snapshot and a timestamp it signs itself (version
/// `version`, above anything published before), the timestamp expiring at `expires`.
async fn republish(
    server: &TestServer,
    db: &sea_orm::DatabaseConnection,
    targets: &[u8],
    version: u64,
    expires: chrono::DateTime<chrono::Utc>,
) {
    let (snapshot_key, timestamp_key) = online_keys(server, db).await;
    let snapshot = tuf::sign_snapshot(targets, version, in_a_year(), &snapshot_key)
        .await
        .unwrap();
    let timestamp = tuf::sign_timestamp(&snapshot, version, expires, &timestamp_key)
        .await
        .unwrap();
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
    restore_metadata(
        db,
        &[
            ("targets".to_owned(), text(targets)),
            ("snapshot".to_owned(), text(&snapshot)),
            ("timestamp".to_owned(), text(&timestamp)),
        ],
    )
    .await;
    // The version columns too, so what medfleetd signs next continues above what the devices saw.
    let targets_version = tuf::metadata_version(targets).unwrap();
    db.execute_unprepared(&format!(
        "UPDATE firmware_metadata SET version = CASE role WHEN 'targets' THEN {targets_version} ELSE {version} END"
    ))
    .await
    .unwrap();
}

/// The threat model's attacks on metadata, each on a device that has seen nothing before, each by a control plane
/// that holds its own online keys: unsigned targets, targets signed by an unknown key or by medfleetd's online keys
/// only, an expired timestamp (indefinite freeze) and a snapshot that names other targets (mix-and-match). Each
/// device refuses with the reason, keeps its factory image and its rollout counts a failure; honest metadata
/// published afterwards installs.
async fn metadata_attacks_are_refused_by_the_agent(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let mut publisher = Publisher::new(&channel).await;
    let db = server.db().await;
    let (first, _) = publisher.publish(&channel, 1, 100_000, 21).await;
    let first_metadata = metadata_rows(&db).await;
    let (second, second_bytes) = publisher.publish(&channel, 2, 100_000, 22).await;
    let honest_targets = publisher.targets.clone().unwrap();
    let second_metadata = metadata_rows(&db).await;

    let mut registry = server.admin().await;
    let mut victims = Vec::new();
    for n in 0..5 {
        victims.push(enroll(&server, &mut registry, &format!("SN-TUF-{n}")).await);
    }
    let _agents: Vec<Process> = victims.iter().map(|d| run(d, &publisher.root, &[])).collect();
    let mut rollouts = RolloutServiceClient::new(channel.clone());
    let refused = async |rollouts: &mut RolloutServiceClient<Channel>, victim: &Device, artifact: &v1::Artifact| {
        let id = roll_out(rollouts, artifact, &[victim]).await;
        let detail = wait_for(rollouts, &id, "the device's refusal", |d| {
            let d = device_state(d, &victim.id);
            is(v1::ActionState::Failed)(d) || is(v1::ActionState::Succeeded)(d)
        })
        .await;
        let counts = detail.rollout.as_ref().and_then(|r| r.counts).unwrap();
        assert_eq!((counts.failed, counts.succeeded), (1, 0), "{detail:#?}");
        assert_eq!(running_counter(victim), 0, "the device left its factory image");
        device_state(&detail, &victim.id).reason.clone()
    };
    let with = |rows: &[(String, String)], role: &str| {
        rows.iter()
            .find(|(r, _)| r == role)
            .map(|(_, body)| body.clone().into_bytes())
            .unwrap()
    };

    // Mix-and-match: release 1's targets under the snapshot and timestamp that name release 2's.
    restore_metadata(
        &db,
        &[
            (
                "targets".to_owned(),
                String::from_utf8(with(&first_metadata, "targets")).unwrap(),
            ),
            (
                "snapshot".to_owned(),
                String::from_utf8(with(&second_metadata, "snapshot")).unwrap(),
            ),
            (
                "timestamp".to_owned(),
                String::from_utf8(with(&second_metadata, "timestamp")).unwrap(),
            ),
        ],
    )
    .await;
    assert_eq!(
        refused(&mut rollouts, &victims[0], &first).await,
        "inconsistent_metadata"
    );

    // Unsigned targets, re-published under fresh online signatures.
    let mut unsigned: serde_json::Value = serde_json::from_slice(&honest_targets).unwrap();
    unsigned["signatures"] = serde_json::json!([]);
    republish(
        &server,
        &db,
        &serde_json::to_vec(&unsigned).unwrap(),
        1_000,
        in_a_year(),
    )
    .await;
    assert_eq!(
        refused(&mut rollouts, &victims[1], &second).await,
        "untrusted_signature"
    );

    // Targets signed by a key nobody trusts, listing release 2 as it was signed.
    let (stranger, _) = tuf::SigningKey::generate().unwrap();
    let release_2 = target(&second.target_name, &second_bytes, 2);
    let by_stranger = tuf::sign_targets(Some(&honest_targets), &release_2, in_a_year(), &[&stranger])
        .await
        .unwrap();
    republish(&server, &db, &by_stranger, 1_001, in_a_year()).await;
    assert_eq!(
        refused(&mut rollouts, &victims[2], &second).await,
        "untrusted_signature"
    );

    // Targets signed by medfleetd's own online keys: the keys it holds cannot stand in for the offline role.
    let (snapshot_key, timestamp_key) = online_keys(&server, &db).await;
    let by_server = tuf::sign_targets(
        Some(&honest_targets),
        &release_2,
        in_a_year(),
        &[&snapshot_key, &timestamp_key],
    )
    .await
    .unwrap();
    republish(&server, &db, &by_server, 1_002, in_a_year()).await;
    assert_eq!(
        refused(&mut rollouts, &victims[3], &second).await,
        "untrusted_signature"
    );

    // Indefinite freeze: honest targets, but a timestamp that expired a minute ago.
    republish(
        &server,
        &db,
        &honest_targets,
        1_003,
        chrono::Utc::now() - chrono::Duration::minutes(1),
    )
    .await;
    assert_eq!(refused(&mut rollouts, &victims[4], &second).await, "expired_metadata");

    // The vendor publishes release 3 in targets above every version the devices saw (the forged ones were one
    // above the honest set), and it installs on each device that refused.
    publisher.targets = Some(by_stranger);
    let (third, _) = publisher.publish(&channel, 3, 100_000, 23).await;
    let id = roll_out(&mut rollouts, &third, &victims.iter().collect::<Vec<_>>()).await;
    let detail = wait_for(&mut rollouts, &id, "every device to install", |d| {
        d.devices.iter().all(is(v1::ActionState::Succeeded))
    })
    .await;
    assert_eq!(detail.devices.len(), victims.len());
    for victim in &victims {
        assert_eq!(running_counter(victim), 3);
    }
    server.stop().await.unwrap();
}

both_backends!(
    metadata_attacks_are_refused_by_the_agent,
    metadata_attacks_are_refused_by_the_agent
);

/// Every day from the start of this UTC hour for two hours: open if read in UTC, closed in Kathmandu (UTC+05:45).
fn utc_hours_now() -> String {
    use chrono::Timelike as _;
    let opens = chrono::Utc::now().hour();
    format!("Mon-Sun {opens:02}:00-{:02}:00", (opens + 2) % 24)
}

/// Outside the maintenance window (read in the time zone of the devices' site, the rollout naming none) devices
/// download but nothing installs; in a rollout with no window they install what they staged; rolling that rollout
/// back is refused until a signed downgrade is stored, and then takes every device it updated back to the older
/// release.
async fn windows_hold_installs_and_a_fleet_rollback_downgrades(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let mut publisher = Publisher::new(&channel).await;
    let (first, first_bytes) = publisher.publish(&channel, 1, 100_000, 31).await;
    let (second, _) = publisher.publish(&channel, 2, 100_000, 32).await;
    let mut registry = server.admin().await;
    let zone = chrono_tz::Asia::Kathmandu;
    medfleet_e2e::fleet::create_site(&mut registry, "patan", "Patan Hospital").await;
    let site = registry
        .update_site(v1::UpdateSiteRequest {
            site: Some(v1::Site {
                name: "patan".into(),
                timezone: zone.name().into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["timezone".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(site.timezone, "Asia/Kathmandu");
    let bad = registry
        .update_site(v1::UpdateSiteRequest {
            site: Some(v1::Site {
                name: "patan".into(),
                timezone: "Asia/Patan".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["timezone".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    assert!(
        bad.message().contains("not an IANA region time zone"),
        "{}",
        bad.message()
    );
    medfleet_e2e::fleet::create_ward(&mut registry, "patan", "icu", "ICU", &["1", "2", "3"]).await;
    let mut devices = Vec::new();
    for n in 0..3 {
        let mut device = medfleet_e2e::fleet::monitor(&format!("SN-WIN-{n}"), MODEL);
        device.location = medfleet_e2e::fleet::location("patan", "icu", &(n + 1).to_string());
        devices.push(enroll_as(&server, &mut registry, device).await);
    }
    let _agents: Vec<Process> = devices.iter().map(|d| run(d, &publisher.root, &[])).collect();
    let all: Vec<&Device> = devices.iter().collect();
    let mut rollouts = RolloutServiceClient::new(channel.clone());

    let window = utc_hours_now();
    let windowed = rollouts
        .create_rollout(v1::CreateRolloutRequest {
            window: window.clone(),
            ..rollout_to(&second.id, all.iter().map(|d| d.id.clone()).collect())
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let detail = wait_for(&mut rollouts, &windowed, "every device to wait for the window", |d| {
        d.devices
            .iter()
            .all(|d| is(v1::ActionState::Deferred)(d) && d.reason == "outside_window" && d.bytes_downloaded > 0)
    })
    .await;
    let rollout = detail.rollout.as_ref().unwrap();
    assert_eq!(
        (rollout.window.as_str(), rollout.timezone.as_str()),
        (window.as_str(), "")
    );
    for device in &devices {
        assert_eq!(running_counter(device), 0, "installed outside the window");
        let staged = device.state.path().join("firmware/staged");
        assert_eq!(
            std::fs::read_dir(&staged).map_or(0, Iterator::count),
            1,
            "nothing staged"
        );
    }
    rollouts
        .abort_rollout(v1::RolloutCommandRequest {
            rollout: windowed.clone(),
            comment: "window moved".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let open = roll_out(&mut rollouts, &second, &all).await;
    let done = wait_for(&mut rollouts, &open, "the rollout to complete", |d| {
        d.rollout
            .as_ref()
            .is_some_and(|r| r.state == i32::from(v1::RolloutState::Completed))
    })
    .await;
    assert!(done.devices.iter().all(is(v1::ActionState::Succeeded)), "{done:#?}");
    for device in &devices {
        assert_eq!(running_counter(device), 2);
    }

    // Going back to release 1 needs the targets role's word: a downgrade signed from release 2.
    let refused = rollouts
        .rollback_rollout(v1::RollbackRolloutRequest {
            rollout: open.clone(),
            comment: String::new(),
            draft: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("--allow-downgrade OLD.img=2"),
        "{}",
        refused.message()
    );
    // The image to go back to is stored already: the key holders authorise it as a downgrade from release 2 (the
    // same bytes, re-signed rather than uploaded again), and medfleetd publishes that, audited.
    let authorised = tuf::resign_targets_changed(
        publisher.targets.as_deref().unwrap(),
        &[],
        &[(first.target_name.clone(), 2)],
        in_a_year(),
        &[&publisher.keys.targets[1], &publisher.keys.targets[2]],
    )
    .await
    .unwrap();
    v1::firmware_service_client::FirmwareServiceClient::new(channel.clone())
        .publish_targets(v1::PublishTargetsRequest {
            targets_json: String::from_utf8(authorised.clone()).unwrap(),
            comment: "field safety notice: back to 2.1.0".into(),
        })
        .await
        .unwrap();
    publisher.targets = Some(authorised);
    assert_eq!(
        count_rows(
            &server.db().await,
            "SELECT COUNT(*) FROM audit_log WHERE action = 'firmware.authorize_downgrade' AND detail LIKE '%may now \
             replace releases [2]%'"
        )
        .await,
        1
    );

    // A biomed engineer of Patan ICU may roll back what was rolled out there, but not onto a device that has moved
    // to another ward since: the rollback is bounded by the caller's own scopes, and nothing is created.
    medfleet_e2e::fleet::create_ward(&mut registry, "patan", "ccu", "CCU", &["1"]).await;
    let moved = |ward: &str, bed: &str| v1::UpdateDeviceRequest {
        device: Some(v1::Device {
            id: devices[0].id.clone(),
            location: medfleet_e2e::fleet::location("patan", ward, bed),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["location".into()],
        }),
    };
    registry.update_device(moved("ccu", "1")).await.unwrap();
    v1::access_service_client::AccessServiceClient::new(channel.clone())
        .grant(v1::GrantRequest {
            grant: Some(v1::RoleGrant {
                principal: "medfleet://user/icu-biomed".into(),
                role: "biomed".into(),
                scope: "patan/icu".into(),
            }),
        })
        .await
        .unwrap();
    let icu_biomed = server
        .channel(&server.issue(&medfleet_core::identity::Identity::User("icu-biomed".into())))
        .await
        .unwrap();
    let rollouts_before = count_rows(&server.db().await, "SELECT COUNT(*) FROM rollouts").await;
    let outside = RolloutServiceClient::new(icu_biomed.clone())
        .rollback_rollout(v1::RollbackRolloutRequest {
            rollout: open.clone(),
            comment: String::new(),
            draft: false,
        })
        .await
        .unwrap_err();
    assert_eq!(outside.code(), tonic::Code::PermissionDenied, "{outside:?}");
    assert!(outside.message().contains(&devices[0].id), "{}", outside.message());
    assert_eq!(
        count_rows(&server.db().await, "SELECT COUNT(*) FROM rollouts").await,
        rollouts_before,
        "a refused rollback creates nothing"
    );
    registry.update_device(moved("icu", "1")).await.unwrap();

    // As a draft first: nothing is sent until it is started.
    let mut icu_rollouts = RolloutServiceClient::new(icu_biomed);
    let back = icu_rollouts
        .rollback_rollout(v1::RollbackRolloutRequest {
            rollout: open.clone(),
            comment: "field safety notice".into(),
            draft: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.rollback_of, open);
    assert_eq!(back.target_name, first.target_name);
    assert_eq!(back.state, i32::from(v1::RolloutState::Draft));
    icu_rollouts
        .start_rollout(v1::RolloutCommandRequest {
            rollout: back.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for(&mut rollouts, &back.id, "every device to go back", |d| {
        d.devices.iter().all(is(v1::ActionState::Succeeded))
    })
    .await;
    for device in &devices {
        let slots = slots(device);
        let active = slots["active"].as_str().unwrap();
        assert_eq!(slots[active]["version"], first.version, "{slots}");
        assert_eq!(running_counter(device), 1);
        let slot = device.state.path().join(format!("firmware/slot-{active}.img"));
        assert_eq!(std::fs::read(slot).unwrap(), first_bytes, "the very bytes of release 1");
        assert_eq!(slots["highest_release"], 2, "{slots}");
    }
    // The release the fleet went back from is still signed, but a device that left it takes only a release above
    // it: pushed again (a compromised or mistaken control plane), it is refused and release 1 runs on.
    let again = roll_out(&mut rollouts, &second, &[&devices[0]]).await;
    let refused = wait_for(&mut rollouts, &again, "the withdrawn release refused", |d| {
        is(v1::ActionState::Failed)(device_state(d, &devices[0].id))
    })
    .await;
    let refused = device_state(&refused, &devices[0].id);
    assert_eq!(refused.reason, "not_newer", "{refused:?}");
    assert!(refused.detail.contains("went back"), "{}", refused.detail);
    assert_eq!(running_counter(&devices[0]), 1);
    server.stop().await.unwrap();
}

both_backends!(
    windows_hold_installs_and_a_fleet_rollback_downgrades,
    windows_hold_installs_and_a_fleet_rollback_downgrades
);

/// `medfleet-agent simulate` of `devices` monitors in `state` (registered on the first start, reused after).
fn ward(server: &TestServer, state: &Path, devices: usize, root: &Path, extra: &[&str]) -> Process {
    let data = server.data_dir();
    let mut command = Command::new(binary("medfleet-agent"));
    command
        .args(["simulate", "--server", &server.url(), "--ca"])
        .arg(data.ca_cert())
        .arg("--state-dir")
        .arg(state)
        .args(["--devices", &devices.to_string(), "--model", MODEL, "--admin"])
        .arg(data.admin_bundle())
        .arg("--tuf-root")
        .arg(root)
        .args(["--heartbeat", "1s", "--firmware-version", "2.0.0"])
        .args(extra);
    Process::spawn(command)
}

fn three_waves(artifact: &v1::Artifact, halt_at: &str) -> v1::CreateRolloutRequest {
    v1::CreateRolloutRequest {
        artifact: artifact.id.clone(),
        target: Some(v1::create_rollout_request::Target::Selector(v1::DeviceSelector {
            hardware_id: MODEL.into(),
            ..Default::default()
        })),
        waves: vec!["10%".into(), "50%".into(), "100%".into()],
        success_threshold: "100%".into(),
        soak: Some(prost_types::Duration { seconds: 0, nanos: 0 }),
        halt_threshold: halt_at.into(),
        min_executed: 5,
        ..Default::default()
    }
}

fn timestamp_of(d: &v1::RolloutDevice) -> (i64, i32) {
    d.update_time.map(|t| (t.seconds, t.nanos)).unwrap_or_default()
}

/// A ward of 200 simulated monitors: one rollout through three waves to completion, each wave starting only
/// after the one before succeeded; then a release whose installs all fail halts at its threshold in the first
/// wave, the rest untouched, and after the fault is gone "retry failed" and "resume" take it to completion.
async fn a_ward_of_200_goes_through_three_waves(backend: Backend) {
    const DEVICES: usize = 200;
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let mut publisher = Publisher::new(&channel).await;
    let (first, _) = publisher.publish(&channel, 1, 64 * 1024, 41).await;
    let (second, _) = publisher.publish(&channel, 2, 64 * 1024, 42).await;
    let state = tempfile::tempdir().unwrap();
    let connected = format!("{DEVICES}/{DEVICES} connected");
    let healthy = ward(&server, state.path(), DEVICES, &publisher.root, &[]);
    healthy.wait_for(&connected, 1).await;
    let mut rollouts = RolloutServiceClient::new(channel.clone());

    let created = rollouts
        .create_rollout(three_waves(&first, "5%"))
        .await
        .unwrap()
        .into_inner();
    let done = wait_for(&mut rollouts, &created.id, "the first rollout to complete", |d| {
        d.rollout
            .as_ref()
            .is_some_and(|r| r.state == i32::from(v1::RolloutState::Completed))
    })
    .await;
    let sizes: Vec<u32> = done.waves.iter().map(|w| w.counts.map_or(0, |c| c.succeeded)).collect();
    assert_eq!(sizes, [20, 80, 100]);
    for wave in 1..3u32 {
        let earlier = done.devices.iter().filter(|d| d.wave < wave).map(timestamp_of).max();
        let this = done.devices.iter().filter(|d| d.wave == wave).map(timestamp_of).min();
        assert!(earlier < this, "wave {wave} moved before the waves before it succeeded");
    }
    for i in 0..DEVICES {
        let dir = state.path().join(format!("device-{i:05}/firmware"));
        let slots: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("slots.json")).unwrap()).unwrap();
        assert_eq!(slots["b"]["release_counter"], 1, "{slots}");
        assert_eq!(slots["finished"].as_array().map(Vec::len), Some(1), "{slots}");
    }

    // Every install of release 2 fails: the first wave halts the rollout, the later waves are never told.
    healthy.kill().await;
    let faulty = ward(
        &server,
        state.path(),
        DEVICES,
        &publisher.root,
        &["--fault-install-failure", "1"],
    );
    faulty.wait_for(&connected, 1).await;
    let created = rollouts
        .create_rollout(three_waves(&second, "10%"))
        .await
        .unwrap()
        .into_inner();
    let halted = wait_for(&mut rollouts, &created.id, "the rollout to halt", |d| {
        d.rollout
            .as_ref()
            .is_some_and(|r| r.state == i32::from(v1::RolloutState::Halted))
    })
    .await;
    let rollout = halted.rollout.as_ref().unwrap();
    assert_eq!(rollout.current_wave, 0);
    assert!(rollout.reason.contains("10%"), "{}", rollout.reason);
    assert!(rollout.counts.unwrap().failed >= 5, "{rollout:?}");
    assert!(
        halted
            .devices
            .iter()
            .filter(|d| d.wave > 0)
            .all(is(v1::ActionState::Queued)),
        "{halted:#?}"
    );
    let failed = halted.devices.iter().find(|d| is(v1::ActionState::Failed)(d)).unwrap();
    assert_eq!(failed.reason, "install_failed", "{failed:?}");

    // The fault is fixed; the failed devices are retried as new attempts and the rollout resumed.
    faulty.kill().await;
    let fixed = ward(&server, state.path(), DEVICES, &publisher.root, &[]);
    fixed.wait_for(&connected, 1).await;
    for command in ["retry", "resume"] {
        let request = v1::RolloutCommandRequest {
            rollout: created.id.clone(),
            comment: "installer fixed".into(),
            ..Default::default()
        };
        if command == "retry" {
            rollouts.retry_failed(request).await.unwrap();
        } else {
            rollouts.resume_rollout(request).await.unwrap();
        }
    }
    let done = wait_for(&mut rollouts, &created.id, "the resumed rollout to complete", |d| {
        d.rollout
            .as_ref()
            .is_some_and(|r| r.state == i32::from(v1::RolloutState::Completed))
    })
    .await;
    assert!(done.devices.iter().all(is(v1::ActionState::Succeeded)));
    assert!(done.devices.iter().any(|d| d.attempt == 2), "no device was retried");
    for i in 0..DEVICES {
        let dir = state.path().join(format!("device-{i:05}/firmware"));
        let slots: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("slots.json")).unwrap()).unwrap();
        let active = slots["active"].as_str().unwrap();
        assert_eq!(slots[active]["release_counter"], 2, "{slots}");
    }
    drop(fixed);
    server.stop().await.unwrap();
}

both_backends!(
    a_ward_of_200_goes_through_three_waves,
    a_ward_of_200_goes_through_three_waves
);
