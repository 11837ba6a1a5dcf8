//! The offline commands end to end, as a key holder runs them: `keys init` with medfleetd's online keys, `sign`,
//! `countersign`; then medfleetd's part (snapshot and timestamp signed with the online keys) and a device's
//! verification against the pinned root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use medfleet_core::digest::sha256_hex;
use medfleet_core::firmware::tuf::{self, MetadataSet, Refusal, SigningKey};

use super::keys::{InitArgs, OnlineKey, OnlineKeysFile, create};
use super::sign::{CountersignArgs, SignArgs, countersign_release, sign_release};
use super::{ROOT_FILE, TARGETS_FILE};
use crate::error::{InvalidInput, UsageError};

const IMAGE: &[u8] = b"MX450 firmware 2.4.1, not really";

struct Online {
    snapshot: SigningKey,
    timestamp: SigningKey,
    file: PathBuf,
}

fn online(dir: &Path) -> Online {
    let (snapshot, _) = SigningKey::generate().unwrap();
    let (timestamp, _) = SigningKey::generate().unwrap();
    let keys = OnlineKeysFile {
        snapshot: OnlineKey {
            key_id: snapshot.id().to_owned(),
            key: snapshot.public(),
        },
        timestamp: OnlineKey {
            key_id: timestamp.id().to_owned(),
            key: timestamp.public(),
        },
    };
    let file = dir.join("online-keys.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&keys).unwrap()).unwrap();
    Online {
        snapshot,
        timestamp,
        file,
    }
}

fn init_args(out: &Path, online: &Path, targets_threshold: u32) -> InitArgs {
    InitArgs {
        out: out.to_owned(),
        online_keys: online.to_owned(),
        root_keys: 2,
        root_threshold: 2,
        targets_keys: 3,
        targets_threshold,
        expires: Duration::from_hours(365 * 24),
    }
}

fn sign_args(dir: &Path, image: &Path, name: &str, counter: u64, keys: &[&str]) -> SignArgs {
    SignArgs {
        image: image.to_owned(),
        name: name.to_owned(),
        model: "MX450".into(),
        version: format!("2.{counter}.0"),
        counter,
        downgrade_from: vec![],
        metadata: dir.to_owned(),
        keys: keys.iter().map(|k| dir.join("keys").join(k)).collect(),
        expires: Duration::from_hours(90 * 24),
    }
}

/// What medfleetd adds (snapshot and timestamp with its online keys), verified as a device verifies.
async fn device_verifies(dir: &Path, online: &Online) -> Result<tuf::Verified, tuf::TufError> {
    let root = std::fs::read(dir.join(ROOT_FILE)).unwrap();
    let targets = std::fs::read(dir.join(TARGETS_FILE)).unwrap();
    let expires = Utc::now() + chrono::Duration::days(1);
    let snapshot = tuf::sign_snapshot(&targets, 1, expires, &online.snapshot)
        .await
        .unwrap();
    let timestamp = tuf::sign_timestamp(&snapshot, 1, expires, &online.timestamp)
        .await
        .unwrap();
    let set = MetadataSet {
        roots: vec![],
        timestamp,
        snapshot,
        targets,
    };
    tuf::verify(&root, &set, None, None).await
}

#[tokio::test]
async fn keys_init_sign_and_countersign_make_metadata_a_device_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let online = online(tmp.path());
    let dir = tmp.path().join("fw");
    let made = create(&init_args(&dir, &online.file, 2)).await.unwrap();
    assert_eq!(made.root.keys.len(), 2);
    assert_eq!(made.targets.keys.len(), 3);
    assert_eq!(made.snapshot_key_id, online.snapshot.id());
    for key in made.root.keys.iter().chain(&made.targets.keys) {
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key.file).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{}", key.file);
    }
    let info = tuf::root_info(&std::fs::read(dir.join(ROOT_FILE)).unwrap()).unwrap();
    assert_eq!(info.role_keys("snapshot"), [online.snapshot.id().to_owned()]);

    let image = tmp.path().join("mx450-2.41.0.img");
    std::fs::write(&image, IMAGE).unwrap();
    let status = sign_release(&sign_args(&dir, &image, "mx450-41.img", 41, &["targets-1.pem"]), false)
        .await
        .unwrap();
    assert_eq!(
        (status.version, status.counted, status.threshold),
        (1, Some(1), Some(2))
    );
    assert_eq!(status.complete, Some(false));
    // One signature of the two required: a device refuses it.
    assert_eq!(
        device_verifies(&dir, &online).await.unwrap_err().code,
        Refusal::Signature
    );

    let countersigned = countersign_release(&CountersignArgs {
        metadata: dir.clone(),
        keys: vec![dir.join("keys/targets-3.pem")],
    })
    .await
    .unwrap();
    assert_eq!(countersigned.counted, Some(2));
    assert_eq!(countersigned.complete, Some(true));
    let verified = device_verifies(&dir, &online).await.unwrap();
    let target = verified.target("mx450-41.img").unwrap();
    assert_eq!(target.sha256, sha256_hex(IMAGE));
    assert_eq!(target.length, IMAGE.len() as u64);
    assert_eq!(target.meta.release_counter, 41);

    // The next release extends what is there: version 2, both targets, verified once signed to threshold.
    let status = sign_release(
        &sign_args(&dir, &image, "mx450-42.img", 42, &["targets-2.pem", "targets-3.pem"]),
        false,
    )
    .await
    .unwrap();
    assert_eq!(status.version, 2);
    assert_eq!(status.targets, ["mx450-41.img", "mx450-42.img"]);
    let verified = device_verifies(&dir, &online).await.unwrap();
    assert_eq!(verified.targets_version(), 2);
    assert_eq!(verified.targets().unwrap().len(), 2);
}

#[tokio::test]
async fn keys_init_overwrites_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let online = online(tmp.path());
    let dir = tmp.path().join("fw");
    create(&init_args(&dir, &online.file, 1)).await.unwrap();
    let before = std::fs::read(dir.join("keys/root-1.pem")).unwrap();
    let error = create(&init_args(&dir, &online.file, 1)).await.unwrap_err();
    assert!(error.downcast_ref::<UsageError>().is_some(), "{error}");
    assert_eq!(std::fs::read(dir.join("keys/root-1.pem")).unwrap(), before);
}

#[tokio::test]
async fn signing_refuses_what_devices_or_medfleetd_would() {
    let tmp = tempfile::tempdir().unwrap();
    let online = online(tmp.path());
    let dir = tmp.path().join("fw");
    create(&init_args(&dir, &online.file, 1)).await.unwrap();
    let image = tmp.path().join("image.img");
    std::fs::write(&image, IMAGE).unwrap();
    let invalid = |error: anyhow::Error, needle: &str| {
        assert!(error.downcast_ref::<InvalidInput>().is_some(), "{error}");
        assert!(error.to_string().contains(needle), "{needle}: {error}");
    };

    // A root key cannot sign targets.
    let args = sign_args(&dir, &image, "a.img", 5, &["root-1.pem"]);
    invalid(sign_release(&args, false).await.unwrap_err(), "not a targets key");
    // Bad names and fields name their flag.
    let args = sign_args(&dir, &image, "../a.img", 5, &["targets-1.pem"]);
    invalid(sign_release(&args, false).await.unwrap_err(), "--name");
    let args = sign_args(&dir, &image, "a.img", 0, &["targets-1.pem"]);
    invalid(sign_release(&args, false).await.unwrap_err(), "--counter");
    let mut args = sign_args(&dir, &image, "a.img", 5, &["targets-1.pem"]);
    args.downgrade_from = vec![3];
    invalid(sign_release(&args, false).await.unwrap_err(), "--downgrade-from");

    sign_release(&sign_args(&dir, &image, "a.img", 5, &["targets-1.pem"]), false)
        .await
        .unwrap();
    // A name is used once; a release counter only rises unless it is a signed downgrade.
    let args = sign_args(&dir, &image, "a.img", 6, &["targets-1.pem"]);
    invalid(sign_release(&args, false).await.unwrap_err(), "used once");
    let args = sign_args(&dir, &image, "b.img", 5, &["targets-1.pem"]);
    invalid(sign_release(&args, false).await.unwrap_err(), "--counter 6");
    let mut args = sign_args(&dir, &image, "b.img", 4, &["targets-1.pem"]);
    args.downgrade_from = vec![5];
    sign_release(&args, false).await.unwrap();

    // A key file that is not a key.
    std::fs::write(dir.join("keys/junk.pem"), "hello").unwrap();
    let args = sign_args(&dir, &image, "c.img", 9, &["junk.pem"]);
    invalid(sign_release(&args, false).await.unwrap_err(), "--key");
}

/// A medfleetd stand-in: records an upload, serves a metadata set.
mod server {
    use std::sync::{Arc, Mutex};

    use medfleet_proto::v1::firmware_service_server::{FirmwareService, FirmwareServiceServer};
    use medfleet_proto::v1::{self, upload_artifact_request::Message};
    use tonic::{Request, Response, Status, Streaming};

    #[derive(Debug, Default)]
    pub(super) struct Seen {
        pub(super) header: Option<v1::UploadArtifactHeader>,
        pub(super) chunks: Vec<usize>,
        pub(super) sha256: String,
    }

    #[derive(Debug, Default, Clone)]
    pub(super) struct Mock {
        pub(super) seen: Arc<Mutex<Seen>>,
        pub(super) metadata: Arc<Mutex<v1::FirmwareMetadata>>,
    }

    fn no<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    #[tonic::async_trait]
    impl FirmwareService for Mock {
        type ReadArtifactStream = tokio_stream::Empty<Result<v1::ArtifactChunk, Status>>;

        async fn get_online_keys(
            &self,
            _: Request<v1::GetOnlineKeysRequest>,
        ) -> Result<Response<v1::OnlineKeys>, Status> {
            no()
        }
        async fn set_trust_root(&self, _: Request<v1::SetTrustRootRequest>) -> Result<Response<v1::TrustRoot>, Status> {
            no()
        }
        async fn get_trust_root(&self, _: Request<v1::GetTrustRootRequest>) -> Result<Response<v1::TrustRoot>, Status> {
            no()
        }
        async fn upload_artifact(
            &self,
            request: Request<Streaming<v1::UploadArtifactRequest>>,
        ) -> Result<Response<v1::Artifact>, Status> {
            let mut stream = request.into_inner();
            let mut context = ring::digest::Context::new(&ring::digest::SHA256);
            let mut header = None;
            let mut chunks = Vec::new();
            while let Some(message) = stream.message().await? {
                match message.message {
                    Some(Message::Header(h)) if header.is_none() && chunks.is_empty() => header = Some(h),
                    Some(Message::Chunk(c)) if header.is_some() => {
                        context.update(&c);
                        chunks.push(c.len());
                    }
                    _ => return Err(Status::invalid_argument("header first, once, then chunks")),
                }
            }
            let header = header.ok_or_else(|| Status::invalid_argument("no header"))?;
            let sha256 = medfleet_core::digest::hex(context.finish().as_ref());
            let artifact = v1::Artifact {
                id: "a1".into(),
                target_name: header.target_name.clone(),
                hardware_id: "MX450".into(),
                sha256: sha256.clone(),
                length: chunks.iter().sum::<usize>() as u64,
                ..Default::default()
            };
            *self.seen.lock().unwrap() = Seen {
                header: Some(header),
                chunks,
                sha256,
            };
            Ok(Response::new(artifact))
        }
        async fn list_artifacts(
            &self,
            _: Request<v1::ListArtifactsRequest>,
        ) -> Result<Response<v1::ListArtifactsResponse>, Status> {
            no()
        }
        async fn get_artifact(&self, _: Request<v1::GetArtifactRequest>) -> Result<Response<v1::Artifact>, Status> {
            no()
        }
        async fn delete_artifact(
            &self,
            _: Request<v1::DeleteArtifactRequest>,
        ) -> Result<Response<v1::DeleteArtifactResponse>, Status> {
            no()
        }
        async fn get_metadata(
            &self,
            _: Request<v1::GetMetadataRequest>,
        ) -> Result<Response<v1::FirmwareMetadata>, Status> {
            Ok(Response::new(self.metadata.lock().unwrap().clone()))
        }
        async fn read_artifact(
            &self,
            _: Request<v1::ReadArtifactRequest>,
        ) -> Result<Response<Self::ReadArtifactStream>, Status> {
            no()
        }
    }

    /// A plain-text client of `mock` on a local port.
    pub(super) async fn client(mock: Mock) -> super::super::Firmware {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(FirmwareServiceServer::new(mock))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        super::super::Firmware::new(channel)
    }
}

/// A release signed to threshold in `dir` (1-of-1 targets), with its image.
async fn signed_release(tmp: &Path, online: &Online, size: usize) -> (PathBuf, PathBuf) {
    let dir = tmp.join("fw");
    create(&init_args(&dir, &online.file, 1)).await.unwrap();
    let image = tmp.join("big.img");
    let bytes: Vec<u8> = (0..size).map(|i| u8::try_from(i % 253).unwrap()).collect();
    std::fs::write(&image, &bytes).unwrap();
    sign_release(&sign_args(&dir, &image, "big.img", 7, &["targets-1.pem"]), false)
        .await
        .unwrap();
    (dir, image)
}

#[tokio::test]
async fn an_upload_streams_the_header_then_whole_chunks_of_the_signed_image() {
    let tmp = tempfile::tempdir().unwrap();
    let online = online(tmp.path());
    let size = 2 * 1024 * 1024 + 5;
    let (dir, image) = signed_release(tmp.path(), &online, size).await;
    let mock = server::Mock::default();
    let mut api = server::client(mock.clone()).await;
    let args = super::upload::UploadArgs {
        image: image.clone(),
        metadata: dir.clone(),
        name: "big.img".into(),
        comment: "test".into(),
    };
    super::upload::upload(&mut api, &args, crate::output::Format::Json)
        .await
        .unwrap();
    {
        let seen = mock.seen.lock().unwrap();
        let header = seen.header.as_ref().unwrap();
        assert_eq!(header.target_name, "big.img");
        assert_eq!(header.length, size as u64);
        assert_eq!(header.comment, "test");
        assert_eq!(
            header.targets_json.as_bytes(),
            std::fs::read(dir.join(TARGETS_FILE)).unwrap()
        );
        assert_eq!(seen.chunks, [1024 * 1024, 1024 * 1024, 5]);
        assert_eq!(seen.sha256, sha256_hex(&std::fs::read(&image).unwrap()));
    }

    // Another file than the signed one is refused before anything is sent.
    std::fs::write(&image, b"something else").unwrap();
    let error = super::upload::upload(&mut api, &args, crate::output::Format::Json)
        .await
        .unwrap_err();
    assert!(error.downcast_ref::<InvalidInput>().is_some(), "{error}");
    let mut unknown = args;
    unknown.name = "other.img".into();
    let error = super::upload::upload(&mut api, &unknown, crate::output::Format::Json)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("--name other.img"), "{error}");
}

#[tokio::test]
async fn pulled_metadata_is_verified_against_the_local_root_before_it_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let online = online(tmp.path());
    let (dir, _) = signed_release(tmp.path(), &online, 100).await;
    let root = std::fs::read_to_string(dir.join(ROOT_FILE)).unwrap();
    let targets = std::fs::read(dir.join(TARGETS_FILE)).unwrap();
    let expires = Utc::now() + chrono::Duration::days(1);
    let serve = async |targets: &[u8]| {
        let snapshot = tuf::sign_snapshot(targets, 1, expires, &online.snapshot).await.unwrap();
        let timestamp = tuf::sign_timestamp(&snapshot, 1, expires, &online.timestamp)
            .await
            .unwrap();
        medfleet_proto::v1::FirmwareMetadata {
            roots_json: vec![root.clone()],
            timestamp_json: String::from_utf8(timestamp).unwrap(),
            snapshot_json: String::from_utf8(snapshot).unwrap(),
            targets_json: String::from_utf8(targets.to_vec()).unwrap(),
        }
    };
    let mock = server::Mock::default();
    *mock.metadata.lock().unwrap() = serve(&targets).await;
    let mut api = server::client(mock.clone()).await;

    // What the key holder's directory has: pulled into a fresh directory holding only the trusted root.
    let pulled = tmp.path().join("pulled");
    std::fs::create_dir(&pulled).unwrap();
    std::fs::write(pulled.join(ROOT_FILE), &root).unwrap();
    super::metadata::pull(&mut api, &pulled, false, crate::output::Format::Json)
        .await
        .unwrap();
    assert_eq!(std::fs::read(pulled.join(TARGETS_FILE)).unwrap(), targets);
    assert!(pulled.join("snapshot.json").exists() && pulled.join("timestamp.json").exists());

    // A targets.json the targets keys did not sign (here: an extra target, signed by a stranger) is refused and
    // nothing is written, so no key holder signs it again on top.
    let (stranger, _) = SigningKey::generate().unwrap();
    let mut injected = tuf::targets_info(&targets).unwrap().targets[0].clone();
    injected.name = "evil.img".into();
    let forged = tuf::sign_targets(Some(&targets), &injected, expires, &[&stranger])
        .await
        .unwrap();
    *mock.metadata.lock().unwrap() = serve(&forged).await;
    let error = super::metadata::pull(&mut api, &pulled, true, crate::output::Format::Json)
        .await
        .unwrap_err();
    assert!(error.downcast_ref::<InvalidInput>().is_some(), "{error}");
    assert_eq!(std::fs::read(pulled.join(TARGETS_FILE)).unwrap(), targets);
}

#[test]
fn refusals_keep_their_status_and_gain_a_hint() {
    use tonic_types::{ErrorDetails, StatusExt as _};
    let status = tonic::Status::with_error_details(
        tonic::Code::FailedPrecondition,
        "targets metadata is signed by 1 of 2 keys",
        ErrorDetails::with_error_info(
            Refusal::Signature.as_str(),
            medfleet_proto::reasons::DOMAIN,
            std::collections::HashMap::<String, String>::new(),
        ),
    );
    let error = super::refusal(status);
    assert!(
        error
            .downcast_ref::<crate::error::Hint>()
            .unwrap()
            .0
            .contains("countersign")
    );
    assert_eq!(
        error.downcast_ref::<tonic::Status>().unwrap().code(),
        tonic::Code::FailedPrecondition
    );
    let plain = super::refusal(tonic::Status::not_found("no such artifact"));
    assert!(plain.downcast_ref::<crate::error::Hint>().is_none());
}
