//! Firmware on the real server over real mTLS, both backends: the trust root, uploads refused with nothing stored
//! (unsigned, under threshold, online key only, altered, longer than signed, not newer, duplicate), published
//! metadata that verifies with tough from the pinned root, resumable reads limited to a device's own assignment,
//! uploads abandoned or gone idle leave nothing, re-signed metadata published without a new image, and a rollout
//! through its waves to completion with devices that speak the session protocol and verify
//! everything themselves before they report.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use medfleet_core::digest::sha256_hex;
use medfleet_core::firmware::target::TargetMeta;
use medfleet_core::firmware::tuf::{self, RoleSpec, RootSpec, SignedTarget, SigningKey};
use medfleet_e2e::{Backend, TestServer, both_backends, count_rows};
use medfleet_proto::v1::{
    self, device_service_client::DeviceServiceClient, firmware_service_client::FirmwareServiceClient,
    registry_service_client::RegistryServiceClient, rollout_service_client::RolloutServiceClient, session_request,
    session_response, upload_artifact_request,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

pub(crate) const MODEL: &str = "IntelliVue MX450";

pub(crate) struct Keys {
    pub(crate) root: SigningKey,
    pub(crate) targets: Vec<SigningKey>,
}

/// Offline keys (root, three targets keys, two must sign) and a root naming the server's online keys.
pub(crate) async fn trust(server: &TestServer, channel: &Channel) -> (Keys, Vec<u8>) {
    let _ = server;
    trust_on(channel).await
}

/// As [`trust`], for a server reached only through `channel` (a medfleetd process).
pub(crate) async fn trust_on(channel: &Channel) -> (Keys, Vec<u8>) {
    let mut fw = FirmwareServiceClient::new(channel.clone());
    let online = fw
        .get_online_keys(v1::GetOnlineKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    let snapshot: tuf::PublicKey = serde_json::from_str(&online.snapshot_key_json).unwrap();
    let timestamp: tuf::PublicKey = serde_json::from_str(&online.timestamp_key_json).unwrap();
    let keys = Keys {
        root: SigningKey::generate().unwrap().0,
        targets: (0..3).map(|_| SigningKey::generate().unwrap().0).collect(),
    };
    let spec = |snapshot: tuf::PublicKey, timestamp: tuf::PublicKey| RootSpec {
        version: 1,
        expires: Utc::now() + chrono::Duration::days(365),
        root: RoleSpec {
            keys: vec![keys.root.public()],
            threshold: 1,
        },
        targets: RoleSpec {
            keys: keys.targets.iter().map(SigningKey::public).collect(),
            threshold: 2,
        },
        snapshot: RoleSpec {
            keys: vec![snapshot],
            threshold: 1,
        },
        timestamp: RoleSpec {
            keys: vec![timestamp],
            threshold: 1,
        },
    };
    // A root that names other online keys would make every device refuse what medfleetd signs.
    let stranger = SigningKey::generate().unwrap().0.public();
    let wrong = tuf::sign_root(&spec(stranger.clone(), stranger), &[&keys.root])
        .await
        .unwrap();
    let refused = fw
        .set_trust_root(v1::SetTrustRootRequest {
            root_json: String::from_utf8(wrong).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let root = tuf::sign_root(&spec(snapshot, timestamp), &[&keys.root]).await.unwrap();
    let installed = fw
        .set_trust_root(v1::SetTrustRootRequest {
            root_json: String::from_utf8(root.clone()).unwrap(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((installed.version, installed.targets_threshold), (1, 2));
    (keys, root)
}

/// Bytes that do not repeat per chunk (identical chunks would be stored once: storage is content-addressed).
pub(crate) fn image(size: usize, seed: u8) -> Vec<u8> {
    (0..size as u64)
        .map(|i| u8::try_from((i.wrapping_mul(2_654_435_761) >> 13) & 0xff).unwrap_or(0) ^ seed)
        .collect()
}

pub(crate) fn target(name: &str, bytes: &[u8], counter: u64) -> SignedTarget {
    SignedTarget {
        name: name.to_owned(),
        sha256: sha256_hex(bytes),
        length: bytes.len() as u64,
        meta: TargetMeta {
            hardware_id: MODEL.into(),
            version: format!("2.{counter}.0"),
            release_counter: counter,
            downgrade_from: vec![],
        },
    }
}

pub(crate) async fn upload(
    channel: &Channel,
    name: &str,
    targets_json: &[u8],
    bytes: &[u8],
) -> Result<v1::Artifact, tonic::Status> {
    let mut messages = vec![v1::UploadArtifactRequest {
        message: Some(upload_artifact_request::Message::Header(v1::UploadArtifactHeader {
            target_name: name.to_owned(),
            targets_json: String::from_utf8(targets_json.to_vec()).unwrap(),
            length: bytes.len() as u64,
            comment: "e2e".into(),
        })),
    }];
    for chunk in bytes.chunks(300 * 1024) {
        messages.push(v1::UploadArtifactRequest {
            message: Some(upload_artifact_request::Message::Chunk(chunk.to_vec())),
        });
    }
    FirmwareServiceClient::new(channel.clone())
        .upload_artifact(tokio_stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

fn reason(status: &tonic::Status) -> String {
    status.get_details_error_info().map(|i| i.reason).unwrap_or_default()
}

async fn stored(server: &TestServer) -> (i64, i64) {
    let db = server.db().await;
    (
        count_rows(&db, "SELECT COUNT(*) FROM firmware_artifacts").await,
        count_rows(&db, "SELECT COUNT(*) FROM firmware_chunks").await,
    )
}

pub(crate) fn in_a_year() -> chrono::DateTime<Utc> {
    Utc::now() + chrono::Duration::days(365)
}

async fn uploads_are_verified_before_anything_is_kept(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let (keys, root) = trust(&server, &channel).await;
    let bytes = image(2 * 1024 * 1024 + 17, 1);
    let good = target("mx450-2.1.0.img", &bytes, 1);

    // Below the threshold (one of two), unsigned, by an unknown key: untrusted_signature, nothing stored.
    let one = tuf::sign_targets(None, &good, in_a_year(), &[&keys.targets[0]])
        .await
        .unwrap();
    let none = tuf::sign_targets(None, &good, in_a_year(), &[]).await.unwrap();
    let stranger = SigningKey::generate().unwrap().0;
    let unknown = tuf::sign_targets(None, &good, in_a_year(), &[&stranger, &keys.targets[0]])
        .await
        .unwrap();
    for metadata in [&one, &none, &unknown] {
        let refused = upload(&channel, &good.name, metadata, &bytes).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert_eq!(reason(&refused), "untrusted_signature", "{refused:?}");
    }
    assert_eq!(stored(&server).await, (0, 0));

    let signed = tuf::countersign(&one, &keys.targets[2]).await.unwrap();
    // Altered bytes, and more bytes than signed: refused, and the chunks written on the way are gone again.
    let mut altered = bytes.clone();
    altered[1_500_000] ^= 0xff;
    let refused = upload(&channel, &good.name, &signed, &altered).await.unwrap_err();
    assert_eq!(reason(&refused), "hash_mismatch", "{refused:?}");
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"endless data");
    let refused = upload(&channel, &good.name, &signed, &longer).await.unwrap_err();
    assert_eq!(reason(&refused), "too_large", "{refused:?}");
    assert_eq!(stored(&server).await, (0, 0));

    let artifact = upload(&channel, &good.name, &signed, &bytes).await.unwrap();
    assert_eq!(
        (artifact.sha256.as_str(), artifact.length, artifact.release_counter),
        (good.sha256.as_str(), bytes.len() as u64, 1)
    );
    assert_eq!(stored(&server).await, (1, 3));
    let refused = upload(&channel, &good.name, &signed, &bytes).await.unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");

    // The same release counter again (a different image): not newer.
    let other = image(4096, 2);
    let same_counter = target("mx450-2.1.1.img", &other, 1);
    let next = tuf::sign_targets(
        Some(&signed),
        &same_counter,
        in_a_year(),
        &[&keys.targets[0], &keys.targets[1]],
    )
    .await
    .unwrap();
    let refused = upload(&channel, &same_counter.name, &next, &other).await.unwrap_err();
    assert_eq!(reason(&refused), "not_newer", "{refused:?}");
    // Targets metadata that drops the stored image is refused: devices could no longer verify it.
    let dropped = tuf::sign_targets(
        None,
        &target("mx450-2.2.0.img", &other, 2),
        in_a_year(),
        &[&keys.targets[0], &keys.targets[1]],
    )
    .await
    .unwrap();
    let refused = upload(&channel, "mx450-2.2.0.img", &dropped, &other).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(stored(&server).await, (1, 3));

    // What devices fetch verifies with tough from the pinned root, and the image reads back from any offset.
    let mut fw = FirmwareServiceClient::new(channel.clone());
    let published = fw
        .get_metadata(v1::GetMetadataRequest { known_root_version: 1 })
        .await
        .unwrap()
        .into_inner();
    let set = tuf::MetadataSet {
        roots: published.roots_json.iter().map(|r| r.clone().into_bytes()).collect(),
        timestamp: published.timestamp_json.into_bytes(),
        snapshot: published.snapshot_json.into_bytes(),
        targets: published.targets_json.into_bytes(),
    };
    let verified = tuf::verify(&root, &set, None, None).await.unwrap();
    assert_eq!(verified.target(&good.name).unwrap(), good);
    let offset = 1_048_576 + 1000;
    assert_eq!(
        read_from(&channel, &artifact.id, offset).await,
        bytes[usize::try_from(offset).unwrap()..]
    );

    // A device with no rollout of it cannot read it: the image does not exist for it.
    let mut registry = server.admin().await;
    let (device, bundle) = enrolled(&server, &mut registry, "SN-FW-0").await;
    let device_channel = server.channel_for(&bundle).await.unwrap();
    let refused = FirmwareServiceClient::new(device_channel)
        .read_artifact(v1::ReadArtifactRequest {
            artifact: artifact.id.clone(),
            offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{device}: {refused:?}");

    let audit = count_rows(
        &server.db().await,
        "SELECT COUNT(*) FROM audit_log WHERE action IN ('firmware.trust_root.set', 'firmware.artifact.upload')",
    )
    .await;
    assert_eq!(audit, 2);
    server.stop().await.unwrap();
}

both_backends!(uploads_are_verified, uploads_are_verified_before_anything_is_kept);

/// Polls the count `sql` returns until `want` holds (a condition, not a duration: the guard only bounds a hang).
async fn rows_become(server: &TestServer, sql: &'static str, want: impl Fn(i64) -> bool, what: &str) {
    let db = server.db().await;
    let reached = tokio::time::timeout(Duration::from_secs(30), async {
        while !want(count_rows(&db, sql).await) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "{what}: {} rows", count_rows(&db, sql).await);
}

/// A client that goes away in the middle of an upload (its stream reset, the handler dropped) leaves no chunk
/// behind.
async fn an_abandoned_upload_leaves_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let (keys, _) = trust(&server, &channel).await;
    let bytes = image(3 * 1024 * 1024, 8);
    let good = target("mx450-2.1.0.img", &bytes, 1);
    let signed = tuf::sign_targets(None, &good, in_a_year(), &[&keys.targets[0], &keys.targets[1]])
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(32);
    tx.send(v1::UploadArtifactRequest {
        message: Some(upload_artifact_request::Message::Header(v1::UploadArtifactHeader {
            target_name: good.name.clone(),
            targets_json: String::from_utf8(signed).unwrap(),
            length: bytes.len() as u64,
            comment: "abandoned".into(),
        })),
    })
    .await
    .unwrap();
    for chunk in bytes[..2 * 1024 * 1024 + 10].chunks(256 * 1024) {
        tx.send(v1::UploadArtifactRequest {
            message: Some(upload_artifact_request::Message::Chunk(chunk.to_vec())),
        })
        .await
        .unwrap();
    }
    let mut fw = FirmwareServiceClient::new(channel.clone());
    let call = tokio::spawn(async move { fw.upload_artifact(ReceiverStream::new(rx)).await });
    rows_become(
        &server,
        "SELECT COUNT(*) FROM firmware_chunks",
        |n| n >= 2,
        "the first chunks stored",
    )
    .await;
    // The client goes away with the stream still open: the call is dropped, its HTTP/2 stream reset.
    call.abort();
    let _ = call.await;
    drop(tx);
    rows_become(
        &server,
        "SELECT COUNT(*) FROM firmware_chunks",
        |n| n == 0,
        "chunks left behind",
    )
    .await;
    assert_eq!(stored(&server).await, (0, 0));
    server.stop().await.unwrap();
}

both_backends!(abandoned_upload, an_abandoned_upload_leaves_nothing);

/// What an upload left when its replica died (chunks no artifact references) is swept once it is older than any
/// upload can take; an artifact's chunks and a recent upload's stay.
async fn leftovers_of_a_dead_upload_are_swept(backend: Backend) {
    let storage = medfleet_e2e::Storage::new(backend).await;
    let server = TestServer::start_on(storage.config()).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    published(&server, &channel, 3 * 1024 * 1024, 11).await;
    server.stop().await.unwrap();
    let db = sea_orm::Database::connect(&storage.database_url).await.unwrap();
    for (sha, stored_at) in [
        ("a", "'2020-01-01 00:00:00+00:00'"),
        ("b", "NULL"),
        ("c", "'2999-01-01 00:00:00+00:00'"),
    ] {
        sea_orm::ConnectionTrait::execute_unprepared(
            &db,
            &format!(
                "INSERT INTO firmware_chunks (sha256, data, stored_at) VALUES ('{}', '', {stored_at})",
                sha.repeat(64)
            ),
        )
        .await
        .unwrap();
    }
    drop(db);
    let server = TestServer::start_on(storage.config()).await;
    rows_become(
        &server,
        "SELECT COUNT(*) FROM firmware_chunks WHERE sha256 LIKE 'aaaa%' OR sha256 LIKE 'bbbb%'",
        |n| n == 0,
        "old leftovers swept",
    )
    .await;
    let db = server.db().await;
    assert_eq!(
        count_rows(&db, "SELECT COUNT(*) FROM firmware_chunks WHERE sha256 LIKE 'cccc%'").await,
        1,
        "a recent upload's chunk stays"
    );
    let referenced = count_rows(&db, "SELECT COUNT(DISTINCT chunk_sha256) FROM firmware_artifact_chunks").await;
    assert!(referenced >= 1);
    assert_eq!(
        stored(&server).await,
        (1, referenced + 1),
        "the artifact's chunks and the recent one stay"
    );
    server.stop().await.unwrap();
}

both_backends!(dead_upload_swept, leftovers_of_a_dead_upload_are_swept);

/// The whole image reads back from `offset`, each message at the offset it says.
async fn read_from(channel: &Channel, artifact: &str, offset: u64) -> Vec<u8> {
    let mut read = FirmwareServiceClient::new(channel.clone())
        .read_artifact(v1::ReadArtifactRequest {
            artifact: artifact.to_owned(),
            offset,
        })
        .await
        .unwrap()
        .into_inner();
    let mut tail = Vec::new();
    while let Some(chunk) = read.message().await.unwrap() {
        assert_eq!(chunk.offset, offset + tail.len() as u64);
        tail.extend_from_slice(&chunk.data);
    }
    tail
}

/// The files of an object store directory's `firmware/` folder.
fn objects_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("firmware"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// With `artifact_store = file:///dir`, an image is one object (no chunk rows), written only once it verified,
/// read from any offset, removed with its artifact; an object no artifact owns is swept once old.
async fn images_in_an_object_store(backend: Backend) {
    let storage = medfleet_e2e::Storage::new(backend).await;
    let store = storage.dir.path().join("objects");
    let mut config = storage.config();
    config.artifact_store = Some(format!("file://{}", store.display()));
    let server = TestServer::start_on(config.clone()).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let (keys, _) = trust(&server, &channel).await;
    let bytes = image(3 * 1024 * 1024 + 123, 12);
    let good = target("mx450-2.1.0.img", &bytes, 1);
    let signed = tuf::sign_targets(None, &good, in_a_year(), &[&keys.targets[0], &keys.targets[1]])
        .await
        .unwrap();

    // The wrong bytes of the signed length: refused, and no object, not even a staging file.
    let mut corrupt = bytes.clone();
    corrupt[2_000_000] ^= 0xff;
    let refused = upload(&channel, &good.name, &signed, &corrupt).await.unwrap_err();
    assert_eq!(reason(&refused), "hash_mismatch", "{refused:?}");
    assert_eq!(objects_in(&store), Vec::<String>::new());
    assert_eq!(stored(&server).await, (0, 0));

    let artifact = upload(&channel, &good.name, &signed, &bytes).await.unwrap();
    let name = format!("{}.img", artifact.id);
    assert_eq!(objects_in(&store), vec![name.clone()]);
    assert_eq!(std::fs::read(store.join("firmware").join(&name)).unwrap(), bytes);
    assert_eq!(
        stored(&server).await,
        (1, 0),
        "no chunk rows for an image in the object store"
    );
    assert_eq!(read_from(&channel, &artifact.id, 0).await, bytes);
    let offset: usize = 2 * 1024 * 1024 + 77;
    assert_eq!(read_from(&channel, &artifact.id, offset as u64).await, bytes[offset..]);

    // An image whose replica died before its artifact committed: swept at start once older than any upload.
    let orphan = store.join("firmware").join(format!("{}.img", uuid::Uuid::new_v4()));
    std::fs::write(&orphan, b"left behind").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&orphan)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_hours(72))
        .unwrap();
    let recent = store.join("firmware").join(format!("{}.img", uuid::Uuid::new_v4()));
    std::fs::write(&recent, b"being committed").unwrap();
    server.stop().await.unwrap();
    let server = TestServer::start_on(config).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let swept = tokio::time::timeout(Duration::from_secs(30), async {
        while orphan.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(swept.is_ok(), "an old object no artifact owns was not swept");
    assert!(recent.exists(), "a recent object was swept");
    assert!(
        store.join("firmware").join(&name).exists(),
        "an artifact's image was swept"
    );
    std::fs::remove_file(&recent).unwrap();

    FirmwareServiceClient::new(channel.clone())
        .delete_artifact(v1::DeleteArtifactRequest {
            artifact: artifact.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        objects_in(&store),
        Vec::<String>::new(),
        "the image goes with its artifact"
    );
    assert_eq!(stored(&server).await, (0, 0));
    server.stop().await.unwrap();
}

both_backends!(object_store, images_in_an_object_store);

/// An upload that stops sending, before its header or in the middle of the image, is given up after
/// `upload_idle` with DEADLINE_EXCEEDED and nothing stored.
async fn an_idle_upload_is_given_up(backend: Backend) {
    let storage = medfleet_e2e::Storage::new(backend).await;
    let mut config = storage.config();
    config.upload_idle = Duration::from_secs(1);
    let server = TestServer::start_on(config).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let (keys, _) = trust(&server, &channel).await;
    let bytes = image(2 * 1024 * 1024, 9);
    let good = target("mx450-2.1.0.img", &bytes, 1);
    let signed = tuf::sign_targets(None, &good, in_a_year(), &[&keys.targets[0], &keys.targets[1]])
        .await
        .unwrap();
    let mut fw = FirmwareServiceClient::new(channel.clone());

    let (silent_tx, silent) = mpsc::channel::<v1::UploadArtifactRequest>(1);
    let refused = fw.upload_artifact(ReceiverStream::new(silent)).await.unwrap_err();
    assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");
    assert!(refused.message().contains("no upload header"), "{refused:?}");
    drop(silent_tx);

    let (tx, rx) = mpsc::channel(4);
    tx.send(v1::UploadArtifactRequest {
        message: Some(upload_artifact_request::Message::Header(v1::UploadArtifactHeader {
            target_name: good.name.clone(),
            targets_json: String::from_utf8(signed).unwrap(),
            length: bytes.len() as u64,
            comment: "stalls".into(),
        })),
    })
    .await
    .unwrap();
    tx.send(v1::UploadArtifactRequest {
        message: Some(upload_artifact_request::Message::Chunk(bytes[..1_100_000].to_vec())),
    })
    .await
    .unwrap();
    // The stream stays open (tx is alive) and sends nothing more.
    let refused = fw.upload_artifact(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");
    assert!(refused.message().contains("after 1100000 bytes"), "{refused:?}");
    assert_eq!(stored(&server).await, (0, 0));
    drop(tx);
    server.stop().await.unwrap();
}

both_backends!(idle_upload, an_idle_upload_is_given_up);

pub(crate) async fn enrolled(
    server: &TestServer,
    registry: &mut RegistryServiceClient<Channel>,
    serial: &str,
) -> (String, medfleet_proto::client::Bundle) {
    let id = medfleet_e2e::fleet::register(registry, medfleet_e2e::fleet::monitor(serial, MODEL)).await;
    let token = medfleet_e2e::fleet::enrollment_token(registry, &id).await;
    let (bundle, _) = server.enroll(&token, &id).await.unwrap();
    (id, bundle)
}

/// A device that follows the firmware protocol and trusts only what it verifies: metadata against its pinned
/// root, the image through tough's reader, the model and release counter rule. Runs until its session ends.
async fn device(server_channel: Channel, id: String, root: Vec<u8>, done: mpsc::Sender<(String, String)>) {
    device_with(server_channel, id, root, done, 0, None).await;
}

/// As [`device`], failing its first `failures` installs (reason install_failed) before it succeeds; with `claims`,
/// reporting success while it says it runs that release instead of the one it was sent.
pub(crate) async fn device_with(
    server_channel: Channel,
    id: String,
    root: Vec<u8>,
    done: mpsc::Sender<(String, String)>,
    mut failures: usize,
    claims: Option<u64>,
) {
    let (tx, rx) = mpsc::channel(16);
    tx.send(v1::SessionRequest {
        message: Some(session_request::Message::Hello(v1::Hello {
            device_id: id.clone(),
            firmware_version: "2.0.0".into(),
            operational_state: v1::OperationalState::Idle.into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = DeviceServiceClient::new(server_channel.clone())
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let report = |action: &str, attempt: u32, state: v1::ActionState, reason: &str| v1::SessionRequest {
        message: Some(session_request::Message::FirmwareReport(v1::FirmwareReport {
            action_id: action.to_owned(),
            attempt,
            state: state.into(),
            reason: reason.to_owned(),
            running_version: "2.0.0".into(),
            ..Default::default()
        })),
    };
    let mut fw = FirmwareServiceClient::new(server_channel);
    // The release each told update carries: what the device runs once it installed it.
    let mut releases = std::collections::HashMap::new();
    while let Ok(Some(message)) = inbound.message().await {
        match message.message {
            Some(session_response::Message::FirmwareUpdate(update)) => {
                releases.insert(update.action_id.clone(), update.release_counter);
                let published = fw
                    .get_metadata(v1::GetMetadataRequest { known_root_version: 1 })
                    .await
                    .unwrap()
                    .into_inner();
                let mut bytes = Vec::new();
                let mut read = fw
                    .read_artifact(v1::ReadArtifactRequest {
                        artifact: update.artifact_id.clone(),
                        offset: 0,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                while let Some(chunk) = read.message().await.unwrap() {
                    bytes.extend_from_slice(&chunk.data);
                }
                let set = tuf::MetadataSet {
                    roots: published.roots_json.iter().map(|r| r.clone().into_bytes()).collect(),
                    timestamp: published.timestamp_json.into_bytes(),
                    snapshot: published.snapshot_json.into_bytes(),
                    targets: published.targets_json.into_bytes(),
                };
                let source: Arc<dyn tuf::ImageSource> = Arc::new(Held(bytes));
                let verdict = match tuf::verify(&root, &set, None, Some((update.target_name.clone(), source))).await {
                    Ok(verified) => verified.check_image(&update.target_name).await.map(|_| ()),
                    Err(e) => Err(e),
                };
                let state = match verdict {
                    Ok(()) if failures > 0 => {
                        failures -= 1;
                        report(
                            &update.action_id,
                            update.attempt,
                            v1::ActionState::Failed,
                            "install_failed",
                        )
                    }
                    Ok(()) => report(&update.action_id, update.attempt, v1::ActionState::Downloaded, ""),
                    Err(e) => report(
                        &update.action_id,
                        update.attempt,
                        v1::ActionState::Failed,
                        e.code.as_str(),
                    ),
                };
                tx.send(state).await.unwrap();
            }
            Some(session_response::Message::FirmwareInstall(install)) => {
                for state in [
                    v1::ActionState::Installing,
                    v1::ActionState::Rebooting,
                    v1::ActionState::VerifyingHealth,
                    v1::ActionState::Succeeded,
                ] {
                    let mut message = report(&install.action_id, install.attempt, state, "");
                    if let Some(session_request::Message::FirmwareReport(r)) = &mut message.message
                        && state == v1::ActionState::Succeeded
                    {
                        r.running_release_counter =
                            claims.unwrap_or_else(|| releases.get(&install.action_id).copied().unwrap_or(0));
                    }
                    tx.send(message).await.unwrap();
                }
                let _ = done.send((id.clone(), install.action_id)).await;
            }
            _ => {}
        }
    }
}

#[derive(Debug)]
struct Held(Vec<u8>);

#[tonic::async_trait]
impl tuf::ImageSource for Held {
    async fn open(&self) -> Result<tuf::ImageStream, std::io::Error> {
        Ok(Box::pin(tokio_stream::iter([Ok(bytes::Bytes::from(self.0.clone()))])))
    }
}

/// A trusted root and one image signed to threshold and uploaded: the pinned root and the artifact.
pub(crate) async fn published(
    server: &TestServer,
    channel: &Channel,
    size: usize,
    seed: u8,
) -> (Vec<u8>, v1::Artifact) {
    let (keys, root) = trust(server, channel).await;
    let bytes = image(size, seed);
    let good = target("mx450-2.1.0.img", &bytes, 1);
    let signed = tuf::sign_targets(None, &good, in_a_year(), &[&keys.targets[0], &keys.targets[1]])
        .await
        .unwrap();
    (root, upload(channel, &good.name, &signed, &bytes).await.unwrap())
}

async fn a_rollout_goes_through_its_waves(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let (root, artifact) = published(&server, &channel, 300_000, 7).await;

    let mut registry = server.admin().await;
    let (done_tx, mut done) = mpsc::channel(16);
    let mut devices = Vec::new();
    for i in 0..4 {
        let (id, bundle) = enrolled(&server, &mut registry, &format!("SN-RO-{i}")).await;
        let device_channel = server.channel_for(&bundle).await.unwrap();
        tokio::spawn(device(device_channel, id.clone(), root.clone(), done_tx.clone()));
        devices.push(id);
    }
    let mut rollouts = RolloutServiceClient::new(channel.clone());
    let created = rollouts
        .create_rollout(v1::CreateRolloutRequest {
            waves: vec!["25%".into(), "100%".into()],
            halt_threshold: String::new(),
            ..rollout_to(&artifact.target_name, devices.clone())
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.counts.as_ref().map(|c| c.targeted), Some(4));
    // A device is in at most one unfinished rollout.
    let refused = rollouts
        .create_rollout(v1::CreateRolloutRequest {
            artifact: artifact.id.clone(),
            target: Some(v1::create_rollout_request::Target::Devices(v1::DeviceList {
                device_ids: vec![devices[0].clone()],
            })),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    let mut watch = rollouts
        .watch_rollout(v1::WatchRolloutRequest {
            rollout: created.id.clone(),
            device_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut waves_seen = Vec::new();
    let finished = tokio::time::timeout(Duration::from_mins(1), async {
        while let Some(detail) = watch.message().await.unwrap() {
            let rollout = detail.rollout.unwrap();
            waves_seen.push(rollout.current_wave);
            if rollout.state == i32::from(v1::RolloutState::Completed) {
                return detail.devices;
            }
        }
        panic!("the watch ended before the rollout completed");
    })
    .await
    .expect("the rollout completes");
    assert!(
        finished
            .iter()
            .all(|d| d.state == i32::from(v1::ActionState::Succeeded)),
        "{finished:?}"
    );
    assert!(waves_seen.contains(&0) && waves_seen.contains(&1), "{waves_seen:?}");
    let mut installed = Vec::new();
    while let Ok(one) = done.try_recv() {
        installed.push(one);
    }
    let distinct: std::collections::BTreeSet<&String> = installed.iter().map(|(device, _)| device).collect();
    assert_eq!(
        (installed.len(), distinct.len()),
        (4, 4),
        "every device told to install exactly once: {installed:?}"
    );
    let db = server.db().await;
    assert_eq!(
        count_rows(
            &db,
            "SELECT COUNT(*) FROM rollout_actions WHERE active_device IS NOT NULL"
        )
        .await,
        0
    );
    assert_eq!(
        count_rows(
            &db,
            "SELECT COUNT(*) FROM audit_log WHERE action = 'rollout.device.succeeded'"
        )
        .await,
        4
    );
    server.stop().await.unwrap();
}

both_backends!(rollout_waves_complete, a_rollout_goes_through_its_waves);

/// A device that reports success while it says it runs another release does not count towards its wave: its action
/// fails with `not_running_release`.
async fn a_success_without_the_release_is_a_failure(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let (root, artifact) = published(&server, &channel, 100_000, 9).await;
    let mut registry = server.admin().await;
    let (id, bundle) = enrolled(&server, &mut registry, "SN-LIAR").await;
    let (done_tx, _done) = mpsc::channel(4);
    let device_channel = server.channel_for(&bundle).await.unwrap();
    tokio::spawn(device_with(device_channel, id.clone(), root, done_tx, 0, Some(0)));
    let mut rollouts = RolloutServiceClient::new(channel.clone());
    let created = rollouts
        .create_rollout(rollout_to(&artifact.id, vec![id.clone()]))
        .await
        .unwrap()
        .into_inner();
    let detail = wait_for(&mut rollouts, &created.id, "the claimed success to be judged", |d| {
        device_state(d, &id).state == i32::from(v1::ActionState::Failed)
    })
    .await;
    let device = device_state(&detail, &id);
    assert_eq!(device.reason, "not_running_release", "{device:?}");
    assert!(device.detail.contains("release 0"), "{device:?}");
    assert_eq!(detail.rollout.and_then(|r| r.counts).map(|c| c.succeeded), Some(0));
    server.stop().await.unwrap();
}

both_backends!(
    a_success_without_the_release_is_a_failure,
    a_success_without_the_release_is_a_failure
);

/// One wave to the listed devices that neither advances early nor halts, so that every outcome is what a test
/// looks at; a test overrides what it is about (`..rollout_to(…)`).
pub(crate) fn rollout_to(artifact: &str, device_ids: Vec<String>) -> v1::CreateRolloutRequest {
    v1::CreateRolloutRequest {
        artifact: artifact.to_owned(),
        target: Some(v1::create_rollout_request::Target::Devices(v1::DeviceList {
            device_ids,
        })),
        waves: vec!["100%".into()],
        success_threshold: "100%".into(),
        soak: Some(prost_types::Duration { seconds: 0, nanos: 0 }),
        halt_threshold: "100%".into(),
        min_executed: 1,
        ..Default::default()
    }
}

pub(crate) async fn wait_for(
    rollouts: &mut RolloutServiceClient<Channel>,
    id: &str,
    what: &str,
    done: impl Fn(&v1::RolloutDetail) -> bool,
) -> v1::RolloutDetail {
    let mut watch = rollouts
        .watch_rollout(v1::WatchRolloutRequest {
            rollout: id.to_owned(),
            device_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let last = std::sync::Mutex::new(None);
    tokio::time::timeout(Duration::from_mins(1), async {
        while let Some(detail) = watch.message().await.unwrap() {
            if done(&detail) {
                return detail;
            }
            // A halt or an end the caller does not wait for will not change by itself: say so with the devices
            // that went wrong instead of waiting out the timeout.
            let settled = [
                v1::RolloutState::Halted,
                v1::RolloutState::Completed,
                v1::RolloutState::Aborted,
            ]
            .map(i32::from)
            .contains(&state_of(&detail));
            if settled {
                let wrong: Vec<_> = detail
                    .devices
                    .iter()
                    .filter(|d| !d.reason.is_empty())
                    .map(|d| (&d.device_id, d.state, &d.reason, &d.detail))
                    .collect();
                panic!(
                    "the rollout settled before {what}: {:#?}\ndevices with a reason: {wrong:#?}",
                    detail.rollout
                );
            }
            *last.lock().unwrap() = Some(detail);
        }
        panic!("the watch ended before {what}");
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}; last seen: {:#?}", last.lock().unwrap()))
}

pub(crate) fn state_of(detail: &v1::RolloutDetail) -> i32 {
    detail.rollout.as_ref().map_or(0, |r| r.state)
}

pub(crate) fn device_state<'a>(detail: &'a v1::RolloutDetail, id: &str) -> &'a v1::RolloutDevice {
    detail.devices.iter().find(|d| d.device_id == id).unwrap()
}

async fn failures_halt_and_bound_devices_wait(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let (root, artifact) = published(&server, &channel, 200_000, 9).await;
    let mut registry = server.admin().await;
    let mut ids = Vec::new();
    let mut bundles = Vec::new();
    for i in 0..4 {
        let (id, bundle) = enrolled(&server, &mut registry, &format!("SN-HALT-{i}")).await;
        ids.push(id);
        bundles.push(bundle);
    }
    // The last device charts to a patient: it must not install while bound.
    let mut patients = v1::patient_service_client::PatientServiceClient::new(channel.clone());
    patients
        .associate(v1::AssociateRequest {
            device_id: ids[3].clone(),
            patient: Some(v1::PatientIdentifier {
                identifier: "MRN-FW-1".into(),
                authority: "HOSP".into(),
                display_name: "Doe^Jane".into(),
            }),
            from: Some(medfleet_proto::convert::timestamp(
                Utc::now() - chrono::Duration::minutes(1),
            )),
            until: None,
        })
        .await
        .unwrap();
    let (done_tx, mut done) = mpsc::channel(32);
    for (i, (id, bundle)) in ids.iter().zip(&bundles).enumerate() {
        let device_channel = server.channel_for(bundle).await.unwrap();
        let failures = usize::from(i < 2);
        tokio::spawn(device_with(
            device_channel,
            id.clone(),
            root.clone(),
            done_tx.clone(),
            failures,
            None,
        ));
    }
    let mut rollouts = RolloutServiceClient::new(channel.clone());
    let created = rollouts
        .create_rollout(v1::CreateRolloutRequest {
            halt_threshold: "25%".into(),
            min_executed: 2,
            ..rollout_to(&artifact.id, ids.clone())
        })
        .await
        .unwrap()
        .into_inner();

    let halted = wait_for(&mut rollouts, &created.id, "the halt", |d| {
        state_of(d) == i32::from(v1::RolloutState::Halted)
    })
    .await;
    assert!(!halted.rollout.as_ref().unwrap().reason.is_empty(), "{halted:?}");
    assert_eq!(device_state(&halted, &ids[0]).reason, "install_failed");
    assert_ne!(
        device_state(&halted, &ids[3]).state,
        i32::from(v1::ActionState::Succeeded)
    );
    // Halted stays halted: nothing more is installed until an operator acts.
    let command = |comment: &str| v1::RolloutCommandRequest {
        rollout: created.id.clone(),
        comment: comment.into(),
        ..Default::default()
    };
    rollouts.retry_failed(command("fixed the cable")).await.unwrap();
    rollouts.resume_rollout(command("retrying")).await.unwrap();

    let waiting = wait_for(&mut rollouts, &created.id, "the bound device's deferral", |d| {
        let bound = device_state(d, &ids[3]);
        bound.state == i32::from(v1::ActionState::Deferred)
            && ids[..3]
                .iter()
                .all(|id| device_state(d, id).state == i32::from(v1::ActionState::Succeeded))
    })
    .await;
    assert_eq!(device_state(&waiting, &ids[3]).reason, "in_clinical_use");
    assert_eq!(state_of(&waiting), i32::from(v1::RolloutState::Running));

    patients
        .dissociate(v1::DissociateRequest {
            device_id: ids[3].clone(),
            at: Some(medfleet_proto::convert::timestamp(Utc::now())),
            cancel_planned: false,
        })
        .await
        .unwrap();
    let completed = wait_for(&mut rollouts, &created.id, "completion", |d| {
        state_of(d) == i32::from(v1::RolloutState::Completed)
    })
    .await;
    assert!(
        completed
            .devices
            .iter()
            .all(|d| d.state == i32::from(v1::ActionState::Succeeded))
    );
    let mut installed = Vec::new();
    while let Ok(one) = done.try_recv() {
        installed.push(one.0);
    }
    installed.sort();
    assert_eq!(installed.len(), 4, "each device told to install once: {installed:?}");
    installed.dedup();
    assert_eq!(installed.len(), 4, "each device told to install once: {installed:?}");
    server.stop().await.unwrap();
}

both_backends!(
    failures_halt_and_bound_devices_wait_then_install,
    failures_halt_and_bound_devices_wait
);

/// Who holds the scheduler lease now, waiting (bounded) until someone does.
async fn leader(db: &sea_orm::DatabaseConnection) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        poll.tick().await;
        if let Some((holder, _)) = medfleet_server::rollouts::scheduler::leader(db).await.unwrap() {
            return holder;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no replica took the scheduler lease"
        );
    }
}

/// Two replicas on one PostgreSQL: one scheduler leads; when it goes away the other takes over and the rollout
/// completes with every device told to install exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_scheduler_across_replicas_and_it_hands_over() {
    if medfleet_e2e::skip_postgres() {
        return;
    }
    let storage = medfleet_e2e::Storage::new(Backend::Postgres).await;
    let named = |name: &str| {
        let mut config = storage.config();
        config.replica_name = name.to_owned();
        config
    };
    let a = TestServer::start_on(named("replica-a")).await;
    let b = TestServer::start_on(named("replica-b")).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let db = a.db().await;
    let first = leader(&db).await;
    let (leading, other) = if first.starts_with("replica-a ") {
        (a, b)
    } else {
        (b, a)
    };
    let channel = other.channel(&other.admin_bundle()).await.unwrap();
    let (root, artifact) = published(&other, &channel, 100_000, 3).await;
    let mut registry = other.admin().await;
    let (done_tx, mut done) = mpsc::channel(32);
    let mut ids = Vec::new();
    for i in 0..4 {
        let (id, bundle) = enrolled(&other, &mut registry, &format!("SN-REP-{i}")).await;
        let device_channel = other.channel_for(&bundle).await.unwrap();
        tokio::spawn(device(device_channel, id.clone(), root.clone(), done_tx.clone()));
        ids.push(id);
    }
    let mut rollouts = RolloutServiceClient::new(channel.clone());
    let created = rollouts
        .create_rollout(v1::CreateRolloutRequest {
            waves: vec!["50%".into(), "100%".into()],
            draft: true,
            ..rollout_to(&artifact.id, ids)
        })
        .await
        .unwrap()
        .into_inner();
    // The leader goes away before the rollout starts: only the other replica can move it through its waves.
    leading.stop().await.unwrap();
    rollouts
        .start_rollout(v1::RolloutCommandRequest {
            rollout: created.id.clone(),
            comment: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    let completed = wait_for(&mut rollouts, &created.id, "completion on the remaining replica", |d| {
        state_of(d) == i32::from(v1::RolloutState::Completed)
    })
    .await;
    assert!(
        completed
            .devices
            .iter()
            .all(|d| d.state == i32::from(v1::ActionState::Succeeded))
    );
    assert!(leader(&db).await.starts_with(if first.starts_with("replica-a ") {
        "replica-b "
    } else {
        "replica-a "
    }));
    let mut installed = Vec::new();
    while let Ok(one) = done.try_recv() {
        installed.push(one.0);
    }
    installed.sort();
    let all = installed.len();
    installed.dedup();
    assert_eq!(
        (all, installed.len()),
        (4, 4),
        "each device told to install once: {installed:?}"
    );
    other.stop().await.unwrap();
}

/// The second key holder's countersignature in the CLI walkthrough.
const COUNTERSIGN_WITH_KEY_2: [&str; 6] = [
    "firmware",
    "countersign",
    "--metadata",
    "fw",
    "--key",
    "fw/keys/targets-2.pem",
];

#[derive(Debug)]
pub(crate) struct Cli {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

pub(crate) const KEY_PASSPHRASE: &str = "correct horse battery staple";

pub(crate) async fn medfleet(server: &TestServer, dir: &std::path::Path, args: &[&str]) -> Cli {
    let output = tokio::process::Command::new(medfleet_e2e::binary("medfleet"))
        .args(["--server", &server.url()])
        .arg("--credentials")
        .arg(server.config.data_dir.join("admin.pem"))
        .args(args)
        .current_dir(dir)
        .env_remove("MEDFLEET_SERVER")
        // The offline keys these tests create are sealed under it, as a key holder's script would pass it.
        .env("MEDFLEET_KEY_PASSPHRASE", KEY_PASSPHRASE)
        .output()
        .await
        .expect("run medfleet");
    Cli {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

pub(crate) fn ok(run: &Cli, what: &str) {
    assert_eq!(run.code, 0, "{what}: {}\n{}", run.stdout, run.stderr);
}

/// The biomed walkthrough of the README with the real CLI: online keys, offline keys and root, trust, two-person
/// signing, upload (refused below threshold with exit code 5 and nothing stored), a rollout to a protocol device.
async fn the_cli_walkthrough(backend: Backend) {
    let server = TestServer::start(backend).await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let online = medfleet(&server, dir, &["firmware", "online-keys", "-o", "json"]).await;
    ok(&online, "online-keys");
    std::fs::write(dir.join("online-keys.json"), &online.stdout).unwrap();
    ok(
        &medfleet(
            &server,
            dir,
            &[
                "firmware",
                "keys",
                "init",
                "--out",
                "fw",
                "--online-keys",
                "online-keys.json",
                "--targets-keys",
                "2",
                "--targets-threshold",
                "2",
            ],
        )
        .await,
        "keys init",
    );
    ok(
        &medfleet(&server, dir, &["firmware", "trust", "install", "fw/root.json"]).await,
        "trust install",
    );
    let bytes = image(1_500_000, 5);
    std::fs::write(dir.join("mx450-2.1.0.img"), &bytes).unwrap();
    ok(
        &medfleet(
            &server,
            dir,
            &[
                "firmware",
                "sign",
                "mx450-2.1.0.img",
                "--name",
                "mx450-2.1.0.img",
                "--model",
                MODEL,
                "--version",
                "2.1.0",
                "--counter",
                "1",
                "--metadata",
                "fw",
                "--key",
                "fw/keys/targets-1.pem",
            ],
        )
        .await,
        "sign",
    );
    let upload_args = [
        "firmware",
        "upload",
        "mx450-2.1.0.img",
        "--metadata",
        "fw",
        "--name",
        "mx450-2.1.0.img",
        "-o",
        "json",
    ];
    let refused = medfleet(&server, dir, &upload_args).await;
    assert_eq!(
        refused.code, 5,
        "one of two signatures: {}\n{}",
        refused.stdout, refused.stderr
    );
    assert!(
        refused.stderr.contains("untrusted_signature") || refused.stderr.contains("signature"),
        "{}",
        refused.stderr
    );
    assert_eq!(stored(&server).await, (0, 0));
    ok(&medfleet(&server, dir, &COUNTERSIGN_WITH_KEY_2).await, "countersign");
    let uploaded = medfleet(&server, dir, &upload_args).await;
    ok(&uploaded, "upload");
    let artifact: serde_json::Value = serde_json::from_str(&uploaded.stdout).unwrap();
    assert_eq!(artifact["sha256"], sha256_hex(&bytes), "{artifact}");

    let root = std::fs::read(dir.join("fw/root.json")).unwrap();
    let mut registry = server.admin().await;
    let (id, bundle) = enrolled(&server, &mut registry, "SN-CLI-0").await;
    let (done_tx, _done) = mpsc::channel(4);
    tokio::spawn(device(
        server.channel_for(&bundle).await.unwrap(),
        id.clone(),
        root,
        done_tx,
    ));
    std::fs::write(dir.join("devices.txt"), format!("# the pilot\n{id}\n")).unwrap();
    let create = [
        "rollouts",
        "create",
        "--artifact",
        "mx450-2.1.0.img",
        "--devices",
        "devices.txt",
        "--waves",
        "100%",
        "--success",
        "100%",
        "--soak",
        "0s",
        "-o",
        "json",
    ];
    // A dry run says what it would reach and creates nothing.
    let preview = medfleet(&server, dir, &[&create[..], &["--dry-run"]].concat()).await;
    ok(&preview, "rollouts create --dry-run");
    let preview: serde_json::Value = serde_json::from_str(&preview.stdout).unwrap();
    assert_eq!(preview["dry_run"], true, "{preview}");
    assert_eq!(preview["wave_sizes"], serde_json::json!([1]), "{preview}");
    let db = server.db().await;
    assert_eq!(count_rows(&db, "SELECT COUNT(*) FROM rollouts").await, 0);
    assert_eq!(
        count_rows(&db, "SELECT COUNT(*) FROM audit_log WHERE action = 'rollout.create'").await,
        0
    );
    let created = medfleet(&server, dir, &create).await;
    ok(&created, "rollouts create");
    let rollout: serde_json::Value = serde_json::from_str(&created.stdout).unwrap();
    let rollout_id = rollout["id"].as_str().unwrap().to_owned();
    let watched = medfleet(&server, dir, &["rollouts", "watch", &rollout_id, "-o", "json"]).await;
    ok(&watched, "rollouts watch");
    let shown = medfleet(&server, dir, &["rollouts", "show", &rollout_id, "-o", "json"]).await;
    ok(&shown, "rollouts show");
    assert!(shown.stdout.contains(&id), "{}", shown.stdout);

    // Months later, no release due: the key holders re-sign what is published and medfleetd publishes it.
    ok(
        &medfleet(&server, dir, &["firmware", "metadata", "pull", "--out", "fw"]).await,
        "metadata pull",
    );
    let resign = |key: &'static str| {
        [
            "firmware",
            "resign",
            "--metadata",
            "fw",
            "--key",
            key,
            "--expires",
            "200d",
        ]
    };
    let resigned = medfleet(&server, dir, &resign("fw/keys/targets-1.pem")).await;
    ok(&resigned, "resign");
    assert!(
        resigned.stdout.contains("1 more targets key holder"),
        "{}",
        resigned.stdout
    );
    let publish = [
        "firmware",
        "metadata",
        "publish",
        "--metadata",
        "fw",
        "--comment",
        "re-sign",
        "-o",
        "json",
    ];
    let refused = medfleet(&server, dir, &publish).await;
    assert_eq!(refused.code, 5, "{refused:?}");
    assert!(refused.stderr.contains("countersign"), "{}", refused.stderr);
    ok(
        &medfleet(&server, dir, &COUNTERSIGN_WITH_KEY_2).await,
        "countersign the re-signed metadata",
    );
    let published = medfleet(&server, dir, &publish).await;
    ok(&published, "metadata publish");
    let published: serde_json::Value = serde_json::from_str(&published.stdout).unwrap();
    assert_eq!(published["targets_version"], 2, "{published}");
    assert_eq!(published["targets"][0], "mx450-2.1.0.img", "{published}");
    server.stop().await.unwrap();
}

both_backends!(cli_walkthrough, the_cli_walkthrough);

/// Targets metadata re-signed offline with a new expiry and no new image is published once it verifies to the
/// threshold and lists exactly the stored images; anything else is refused and changes nothing. Devices verify
/// what is published after it, and the next release signs on top of it.
async fn stored_images_are_resigned_without_a_new_upload(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let (keys, root) = trust(&server, &channel).await;
    let bytes = image(300_000, 5);
    let first = target("mx450-2.1.0.img", &bytes, 1);
    let soon = Utc::now() + chrono::Duration::days(3);
    let signed = tuf::sign_targets(None, &first, soon, &[&keys.targets[0], &keys.targets[1]])
        .await
        .unwrap();
    upload(&channel, &first.name, &signed, &bytes).await.unwrap();
    let mut fw = FirmwareServiceClient::new(channel.clone());
    let targets_now = async |fw: &mut FirmwareServiceClient<Channel>| {
        fw.get_metadata(v1::GetMetadataRequest { known_root_version: 1 })
            .await
            .unwrap()
            .into_inner()
    };
    let publish = async |fw: &mut FirmwareServiceClient<Channel>, json: &[u8]| {
        fw.publish_targets(v1::PublishTargetsRequest {
            targets_json: String::from_utf8(json.to_vec()).unwrap(),
            comment: "quarterly re-sign".into(),
        })
        .await
    };
    let before = targets_now(&mut fw).await;

    let later = Utc::now() + chrono::Duration::days(180);
    let one = tuf::resign_targets(&signed, later, &[&keys.targets[1]]).await.unwrap();
    let two = tuf::countersign(&one, &keys.targets[2]).await.unwrap();
    let adds = tuf::sign_targets(
        Some(&two),
        &target("mx450-2.2.0.img", &image(1000, 6), 2),
        later,
        &[&keys.targets[0], &keys.targets[1]],
    )
    .await
    .unwrap();
    let drops = tuf::sign_targets(None, &target("mx450-2.2.0.img", &image(1000, 6), 2), later, &[])
        .await
        .unwrap();
    // Version 2, like the others: what is refused is what it lists.
    let drops = tuf::resign_targets(&drops, later, &[&keys.targets[0], &keys.targets[1]])
        .await
        .unwrap();
    for (json, code, why) in [
        (&one, Code::FailedPrecondition, "untrusted_signature"),
        (&adds, Code::FailedPrecondition, "unknown_target"),
        (&drops, Code::FailedPrecondition, "inconsistent_metadata"),
        (&signed, Code::AlreadyExists, ""),
    ] {
        let refused = publish(&mut fw, json).await.unwrap_err();
        assert_eq!((refused.code(), reason(&refused).as_str()), (code, why), "{refused:?}");
    }
    let unchanged = targets_now(&mut fw).await;
    assert_eq!(
        (unchanged.targets_json, unchanged.snapshot_json),
        (before.targets_json.clone(), before.snapshot_json.clone()),
        "a refused publish changed the metadata"
    );

    let reply = publish(&mut fw, &two).await.unwrap().into_inner();
    assert_eq!((reply.targets_version, reply.targets), (2, vec![first.name.clone()]));
    assert_eq!(reply.expire_time.map(|t| t.seconds), Some(later.timestamp()));
    let after = targets_now(&mut fw).await;
    let set = tuf::MetadataSet {
        roots: after.roots_json.iter().map(|r| r.clone().into_bytes()).collect(),
        timestamp: after.timestamp_json.into_bytes(),
        snapshot: after.snapshot_json.into_bytes(),
        targets: after.targets_json.into_bytes(),
    };
    let verified = tuf::verify(&root, &set, None, None).await.unwrap();
    assert_eq!(verified.targets_version(), 2);
    assert_eq!(
        tuf::targets_info(&set.targets).unwrap().expires.timestamp(),
        later.timestamp()
    );
    assert_eq!(verified.target(&first.name).unwrap(), first);
    // Another version 2 is now a rollback.
    let stale = tuf::resign_targets(&signed, later, &[&keys.targets[0], &keys.targets[2]])
        .await
        .unwrap();
    let refused = publish(&mut fw, &stale).await.unwrap_err();
    assert_eq!(reason(&refused), "metadata_rollback", "{refused:?}");

    // The next release is signed on top of the re-signed version.
    let next_bytes = image(2000, 7);
    let next = target("mx450-2.2.0.img", &next_bytes, 2);
    let on_top = tuf::sign_targets(Some(&two), &next, later, &[&keys.targets[0], &keys.targets[1]])
        .await
        .unwrap();
    let artifact = upload(&channel, &next.name, &on_top, &next_bytes).await.unwrap();
    assert_eq!(artifact.targets_version, 3);
    let audited = count_rows(
        &server.db().await,
        "SELECT COUNT(*) FROM audit_log WHERE action = 'firmware.publish_targets'",
    )
    .await;
    assert_eq!(audited, 1);
    server.stop().await.unwrap();
}

both_backends!(
    resigned_targets_are_published,
    stored_images_are_resigned_without_a_new_upload
);
