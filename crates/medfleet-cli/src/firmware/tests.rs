//! The offline commands end to end, as a key holder runs them: `keys init` with medfleetd's online keys, `sign`,
//! `countersign`; then medfleetd's part (snapshot and timestamp signed with the online keys) and a device's
//! verification against the pinned root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use medfleet_core::digest::sha256_hex;
use medfleet_core::firmware::tuf::{self, MetadataSet, Refusal, SigningKey};

use super::keys::{InitArgs, OnlineKey, OnlineKeysFile, create};
use super::passphrase::Passphrase;
use super::sign::{CountersignArgs, SignArgs, countersign_release, sign_release};
use super::{ROOT_FILE, TARGETS_FILE};
use crate::error::{InvalidInput, UsageError};

const IMAGE: &[u8] = b"MX450 firmware 2.4.1, not really";

pub(super) struct Online {
    pub(super) snapshot: SigningKey,
    pub(super) timestamp: SigningKey,
    pub(super) file: PathBuf,
}

/// medfleetd's online keys as `online-keys -o json` would write them into `dir`.
pub(super) fn online(dir: &Path) -> Online {
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

pub(super) fn init_args(out: &Path, online: &Path, targets_threshold: u32) -> InitArgs {
    InitArgs {
        out: out.to_owned(),
        online_keys: online.to_owned(),
        root_keys: 2,
        root_threshold: 2,
        targets_keys: 3,
        targets_threshold,
        expires: Duration::from_hours(365 * 24),
        unencrypted: false,
        passphrase: Passphrase::given(PASSPHRASE),
    }
}

/// What the tests' key holders seal their keys with.
pub(super) const PASSPHRASE: &str = "correct horse battery staple";

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
        passphrase: Passphrase::given(PASSPHRASE),
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
        let text = std::fs::read_to_string(&key.file).unwrap();
        assert!(
            medfleet_core::firmware::keyfile::is_sealed(&text),
            "{} is not sealed",
            key.file
        );
        assert!(!text.contains("PRIVATE KEY"), "{} holds a key in clear", key.file);
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

    // A key sealed under another passphrase does not open, and nothing is signed.
    let wrong = countersign_release(&CountersignArgs {
        metadata: dir.clone(),
        keys: vec![dir.join("keys/targets-3.pem")],
        passphrase: Passphrase::given("not the passphrase at all"),
    })
    .await
    .unwrap_err();
    assert!(wrong.to_string().contains("passphrase is wrong"), "{wrong}");
    let countersigned = countersign_release(&CountersignArgs {
        metadata: dir.clone(),
        keys: vec![dir.join("keys/targets-3.pem")],
        passphrase: Passphrase::given(PASSPHRASE),
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

    // The co-signer of version 3 sees what it changes against the published version 2, which `sign` kept.
    sign_release(&sign_args(&dir, &image, "mx450-43.img", 43, &["targets-1.pem"]), false)
        .await
        .unwrap();
    let cosign = CountersignArgs {
        metadata: dir.clone(),
        keys: vec![dir.join("keys/targets-2.pem")],
        passphrase: Passphrase::given(PASSPHRASE),
    };
    let reviewed = countersign_release(&cosign).await.unwrap();
    assert!(
        reviewed.compared_with.ends_with("2.targets.json"),
        "{}",
        reviewed.compared_with
    );
    assert_eq!(reviewed.changes.len(), 1, "{:?}", reviewed.changes);
    assert!(
        reviewed.changes[0].starts_with("+ mx450-43.img: model MX450, version 2.43.0, release 43"),
        "{:?}",
        reviewed.changes
    );
    // A kept base that is not the version this builds on is not compared with: the countersign is refused.
    std::fs::write(
        dir.join("2.targets.json"),
        std::fs::read(dir.join("1.targets.json")).unwrap(),
    )
    .unwrap();
    let error = countersign_release(&cosign).await.unwrap_err();
    assert!(error.to_string().contains("not a published version"), "{error}");
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
