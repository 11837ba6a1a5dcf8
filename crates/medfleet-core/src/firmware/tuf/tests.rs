//! Each refusal a device must make, on metadata built the way the CLI and medfleetd build it.

use std::sync::Arc;

use chrono::{Duration, Utc};

use super::*;
use crate::digest::sha256_hex;

#[derive(Debug)]
struct Bytesource(Vec<u8>);

#[async_trait]
impl ImageSource for Bytesource {
    async fn open(&self) -> Result<ImageStream, std::io::Error> {
        let chunks: Vec<std::io::Result<Bytes>> = self.0.chunks(7).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        Ok(Box::pin(futures::stream::iter(chunks)))
    }
}

struct Keys {
    root: SigningKey,
    targets: Vec<SigningKey>,
    snapshot: SigningKey,
    timestamp: SigningKey,
}

fn key() -> SigningKey {
    let (key, pem) = SigningKey::generate().unwrap();
    // Every key goes through its PEM once, as the CLI stores it.
    let again = SigningKey::from_pem(&pem).unwrap();
    assert_eq!(again.id(), key.id());
    again
}

fn keys() -> Keys {
    Keys {
        root: key(),
        targets: vec![key(), key(), key()],
        snapshot: key(),
        timestamp: key(),
    }
}

fn spec(keys: &Keys, version: u64, threshold: u64) -> RootSpec {
    let one = |k: &SigningKey| RoleSpec {
        keys: vec![k.public()],
        threshold: 1,
    };
    RootSpec {
        version,
        expires: Utc::now() + Duration::days(365),
        root: one(&keys.root),
        targets: RoleSpec {
            keys: keys.targets.iter().map(SigningKey::public).collect(),
            threshold,
        },
        snapshot: one(&keys.snapshot),
        timestamp: one(&keys.timestamp),
    }
}

const IMAGE: &[u8] = b"firmware image bytes for an MX450 monitor";

fn image_target(counter: u64) -> SignedTarget {
    SignedTarget {
        name: format!("mx450-{counter}.img"),
        sha256: sha256_hex(IMAGE),
        length: IMAGE.len() as u64,
        meta: TargetMeta {
            hardware_id: "MX450".into(),
            version: format!("2.{counter}.0"),
            release_counter: counter,
            downgrade_from: vec![],
        },
    }
}

async fn online(keys: &Keys, targets: &[u8], version: u64, expires: DateTime<Utc>) -> (Vec<u8>, Vec<u8>) {
    let snapshot = sign_snapshot(targets, version, expires, &keys.snapshot).await.unwrap();
    let stamp = sign_timestamp(&snapshot, version, expires, &keys.timestamp)
        .await
        .unwrap();
    (snapshot, stamp)
}

async fn set_with(keys: &Keys, targets: Vec<u8>, version: u64) -> MetadataSet {
    let (snapshot, timestamp) = online(keys, &targets, version, Utc::now() + Duration::days(1)).await;
    MetadataSet {
        roots: vec![],
        timestamp,
        snapshot,
        targets,
    }
}

fn in_a_year() -> DateTime<Utc> {
    Utc::now() + Duration::days(365)
}

fn image(bytes: &[u8], name: &str) -> (String, Arc<dyn ImageSource>) {
    (name.to_owned(), Arc::new(Bytesource(bytes.to_vec())))
}

async fn refusal(root: &[u8], set: &MetadataSet) -> Refusal {
    verify(root, set, None, None).await.unwrap_err().code
}

#[tokio::test]
async fn a_threshold_signed_set_verifies_and_its_image_checks() {
    let keys = keys();
    let root = sign_root(&spec(&keys, 1, 2), &[&keys.root]).await.unwrap();
    let target = image_target(3);
    let targets = sign_targets(None, &target, in_a_year(), &[&keys.targets[0]])
        .await
        .unwrap();
    let targets = countersign(&targets, &keys.targets[2]).await.unwrap();
    // Countersigning twice with one key adds nothing.
    let targets = countersign(&targets, &keys.targets[2]).await.unwrap();
    assert_eq!(targets_info(&targets).unwrap().signed_by.len(), 2);
    let set = set_with(&keys, targets, 1).await;
    let verified = verify(&root, &set, None, Some(image(IMAGE, &target.name)))
        .await
        .unwrap();
    assert_eq!(verified.target(&target.name).unwrap(), target);
    assert_eq!(verified.check_image(&target.name).await.unwrap(), target);
    assert_eq!(verified.targets_version(), 1);
}

#[tokio::test]
async fn fewer_signatures_than_the_threshold_are_refused() {
    let keys = keys();
    let root = sign_root(&spec(&keys, 1, 2), &[&keys.root]).await.unwrap();
    let targets = sign_targets(None, &image_target(1), in_a_year(), &[&keys.targets[1]])
        .await
        .unwrap();
    assert_eq!(
        refusal(&root, &set_with(&keys, targets, 1).await).await,
        Refusal::Signature
    );
}

#[tokio::test]
async fn an_unknown_key_or_the_online_keys_cannot_sign_targets() {
    let keys = keys();
    let root = sign_root(&spec(&keys, 1, 1), &[&keys.root]).await.unwrap();
    let stranger = key();
    for signer in [&stranger, &keys.snapshot, &keys.timestamp] {
        let targets = sign_targets(None, &image_target(1), in_a_year(), &[signer])
            .await
            .unwrap();
        assert_eq!(
            refusal(&root, &set_with(&keys, targets, 1).await).await,
            Refusal::Signature
        );
    }
    // Unsigned.
    let targets = sign_targets(None, &image_target(1), in_a_year(), &[]).await.unwrap();
    assert_eq!(
        refusal(&root, &set_with(&keys, targets, 1).await).await,
        Refusal::Signature
    );
}

#[tokio::test]
async fn an_expired_timestamp_is_refused() {
    let keys = keys();
    let root = sign_root(&spec(&keys, 1, 1), &[&keys.root]).await.unwrap();
    let targets = sign_targets(None, &image_target(1), in_a_year(), &[&keys.targets[0]])
        .await
        .unwrap();
    let (snapshot, timestamp) = online(&keys, &targets, 1, Utc::now() - Duration::minutes(1)).await;
    let set = MetadataSet {
        roots: vec![],
        timestamp,
        snapshot,
        targets,
    };
    assert_eq!(refusal(&root, &set).await, Refusal::Expired);
}

#[tokio::test]
async fn a_snapshot_of_other_targets_is_refused() {
    let keys = keys();
    let root = sign_root(&spec(&keys, 1, 1), &[&keys.root]).await.unwrap();
    let first = sign_targets(None, &image_target(1), in_a_year(), &[&keys.targets[0]])
        .await
        .unwrap();
    let second = sign_targets(Some(&first), &image_target(2), in_a_year(), &[&keys.targets[0]])
        .await
        .unwrap();
    let mut set = set_with(&keys, second, 2).await;
    set.targets = first;
    let error = verify(&root, &set, None, None).await.unwrap_err();
    assert_eq!(error.code, Refusal::Inconsistent, "{error}");
}

#[tokio::test]
async fn older_metadata_than_the_datastore_saw_is_refused() {
    let keys = keys();
    let root = sign_root(&spec(&keys, 1, 1), &[&keys.root]).await.unwrap();
    let store = tempfile_dir();
    let first = sign_targets(None, &image_target(1), in_a_year(), &[&keys.targets[0]])
        .await
        .unwrap();
    let second = sign_targets(Some(&first), &image_target(2), in_a_year(), &[&keys.targets[0]])
        .await
        .unwrap();
    let new = set_with(&keys, second, 2).await;
    verify(&root, &new, Some(&store), None).await.unwrap();
    let old = set_with(&keys, first, 1).await;
    let error = verify(&root, &old, Some(&store), None).await.unwrap_err();
    assert_eq!(error.code, Refusal::Rollback, "{error}");
    let _ = std::fs::remove_dir_all(&store);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("medfleet-tuf-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn an_image_longer_than_signed_or_altered_is_refused() {
    let keys = keys();
    let root = sign_root(&spec(&keys, 1, 1), &[&keys.root]).await.unwrap();
    let target = image_target(1);
    let targets = sign_targets(None, &target, in_a_year(), &[&keys.targets[0]])
        .await
        .unwrap();
    let set = set_with(&keys, targets, 1).await;

    let mut longer = IMAGE.to_vec();
    longer.extend_from_slice(b"and then some more");
    let verified = verify(&root, &set, None, Some(image(&longer, &target.name)))
        .await
        .unwrap();
    let error = verified.check_image(&target.name).await.unwrap_err();
    assert_eq!(error.code, Refusal::TooLarge, "{error}");

    let mut altered = IMAGE.to_vec();
    altered[0] ^= 1;
    let verified = verify(&root, &set, None, Some(image(&altered, &target.name)))
        .await
        .unwrap();
    let error = verified.check_image(&target.name).await.unwrap_err();
    assert_eq!(error.code, Refusal::HashMismatch, "{error}");

    let verified = verify(&root, &set, None, Some(image(&IMAGE[..10], &target.name)))
        .await
        .unwrap();
    let error = verified.check_image(&target.name).await.unwrap_err();
    assert_eq!(error.code, Refusal::HashMismatch, "{error}");

    assert_eq!(verified.target("other.img").unwrap_err().code, Refusal::UnknownTarget);
}

#[tokio::test]
async fn a_root_rotation_signed_by_both_roots_is_followed() {
    let old = keys();
    let new = keys();
    let root1 = sign_root(&spec(&old, 1, 1), &[&old.root]).await.unwrap();
    let mut rotated = spec(&new, 2, 1);
    // The online keys stay; root and targets keys change.
    rotated.snapshot.keys = vec![old.snapshot.public()];
    rotated.timestamp.keys = vec![old.timestamp.public()];
    let root2 = sign_root(&rotated, &[&old.root, &new.root]).await.unwrap();
    let targets = sign_targets(None, &image_target(1), in_a_year(), &[&new.targets[0]])
        .await
        .unwrap();
    let mut set = set_with(&old, targets.clone(), 1).await;
    // Without the new root the old targets keys are expected.
    assert_eq!(refusal(&root1, &set).await, Refusal::Signature);
    set.roots = vec![root2.clone()];
    let verified = verify(&root1, &set, None, None).await.unwrap();
    assert_eq!(verified.root_version(), 2);
    assert_eq!(verify_root_update(&root1, &root2).unwrap().version, 2);
    assert_eq!(verify_root_update(&root2, &root1).unwrap_err().code, Refusal::Rollback);

    // A version 2 root signed only by the new key is not followed.
    let forged = sign_root(&rotated, &[&new.root]).await.unwrap();
    assert_eq!(
        verify_root_update(&root1, &forged).unwrap_err().code,
        Refusal::Signature
    );
    set.roots = vec![forged];
    assert!(verify(&root1, &set, None, None).await.is_err());
}

/// A rotation built from the root it follows keeps every role it does not change, key for key.
#[tokio::test]
async fn root_spec_reads_back_what_was_signed() {
    let keys = keys();
    let root1 = sign_root(&spec(&keys, 1, 2), &[&keys.root]).await.unwrap();
    let mut next = root_spec(&root1).unwrap();
    assert_eq!(next.version, 1);
    assert_eq!(next.targets.threshold, 2);
    assert_eq!(next.targets.keys.len(), 3);
    assert!(next.targets.keys.contains(&keys.targets[2].public()));
    assert_eq!(next.snapshot.keys, vec![keys.snapshot.public()]);
    next.version = 2;
    next.expires = Utc::now() + Duration::days(730);
    let root2 = sign_root(&next, &[&keys.root]).await.unwrap();
    let info = verify_root_update(&root1, &root2).unwrap();
    assert_eq!(
        info.role_keys("targets"),
        root_info(&root1).unwrap().role_keys("targets")
    );
    assert_eq!(follow_root_chain(&root1, std::slice::from_ref(&root2)).unwrap(), root2);
    // A root below its own threshold is not a spec to build on.
    let mut unsigned: serde_json::Value = serde_json::from_slice(&root1).unwrap();
    unsigned["signatures"] = serde_json::json!([]);
    let unsigned = serde_json::to_vec(&unsigned).unwrap();
    assert_eq!(root_spec(&unsigned).unwrap_err().code, Refusal::Signature);
}

/// What a device or the CLI saves as its new root is the one the chain reached, never one beside it: a forged
/// root of the same version is refused outright, and one beyond a gap is never reached.
#[tokio::test]
async fn only_the_root_the_chain_reaches_is_trusted() {
    let old = keys();
    let new = keys();
    let attacker = keys();
    let root1 = sign_root(&spec(&old, 1, 1), &[&old.root]).await.unwrap();
    let mut rotated = spec(&new, 2, 1);
    rotated.snapshot.keys = vec![old.snapshot.public()];
    rotated.timestamp.keys = vec![old.timestamp.public()];
    let root2 = sign_root(&rotated, &[&old.root, &new.root]).await.unwrap();
    assert_eq!(follow_root_chain(&root1, &[]).unwrap(), root1);
    assert_eq!(
        follow_root_chain(&root1, &[root2.clone(), root2.clone()]).unwrap(),
        root2
    );

    let mut theirs = spec(&attacker, 2, 1);
    theirs.snapshot.keys = vec![old.snapshot.public()];
    theirs.timestamp.keys = vec![old.timestamp.public()];
    let forged2 = sign_root(&theirs, &[&attacker.root]).await.unwrap();
    for roots in [
        vec![forged2.clone(), root2.clone()],
        vec![root2.clone(), forged2.clone()],
    ] {
        assert_eq!(follow_root_chain(&root1, &roots).unwrap_err().code, Refusal::Malformed);
        let targets = sign_targets(None, &image_target(1), in_a_year(), &[&new.targets[0]])
            .await
            .unwrap();
        let mut set = set_with(&old, targets, 1).await;
        set.roots = roots;
        assert_eq!(refusal(&root1, &set).await, Refusal::Malformed);
    }

    theirs.version = 99;
    let beyond = sign_root(&theirs, &[&attacker.root]).await.unwrap();
    assert_eq!(
        follow_root_chain(&root1, &[root2.clone(), beyond.clone()]).unwrap(),
        root2
    );
    assert_eq!(follow_root_chain(&root1, &[beyond]).unwrap(), root1);
    assert_eq!(
        follow_root_chain(&root1, &[forged2]).unwrap_err().code,
        Refusal::Signature
    );
}

/// Offline signers build only on targets metadata their keys signed to threshold.
#[tokio::test]
async fn signers_build_only_on_targets_signed_to_threshold() {
    let keys = keys();
    let root = sign_root(&spec(&keys, 1, 2), &[&keys.root]).await.unwrap();
    let one = sign_targets(None, &image_target(1), in_a_year(), &[&keys.targets[0]])
        .await
        .unwrap();
    assert_eq!(check_signed_targets(&root, &one).unwrap_err().code, Refusal::Signature);
    let two = countersign(&one, &keys.targets[1]).await.unwrap();
    check_signed_targets(&root, &two).unwrap();
    let stranger = key();
    let made_up = sign_targets(None, &image_target(1), in_a_year(), &[&stranger, &keys.snapshot])
        .await
        .unwrap();
    assert_eq!(
        check_signed_targets(&root, &made_up).unwrap_err().code,
        Refusal::Signature
    );
}

#[tokio::test]
async fn a_root_below_its_own_threshold_is_not_written() {
    let keys = keys();
    let error = sign_root(&spec(&keys, 1, 1), &[&keys.targets[0]]).await.unwrap_err();
    assert_eq!(error.code, Refusal::Signature);
    let mut bad = spec(&keys, 1, 4);
    bad.version = 1;
    assert_eq!(
        sign_root(&bad, &[&keys.root]).await.unwrap_err().code,
        Refusal::Malformed
    );
}

#[tokio::test]
async fn target_names_and_custom_fields_are_checked_before_signing() {
    let keys = keys();
    let mut target = image_target(1);
    target.name = "../etc/passwd".into();
    assert_eq!(
        sign_targets(None, &target, in_a_year(), &[&keys.targets[0]])
            .await
            .unwrap_err()
            .code,
        Refusal::Malformed
    );
    let mut target = image_target(1);
    target.meta.release_counter = 0;
    assert!(
        sign_targets(None, &target, in_a_year(), &[&keys.targets[0]])
            .await
            .is_err()
    );
}

#[test]
fn garbage_keys_are_refused_with_a_reason() {
    assert_eq!(SigningKey::from_pem("hello").unwrap_err().code, Refusal::Key);
    let pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    assert_eq!(SigningKey::from_pem(pem).unwrap_err().code, Refusal::Key);
}

#[tokio::test]
async fn resigned_targets_keep_their_targets_under_a_new_version_and_expiry() {
    let keys = keys();
    let root = sign_root(&spec(&keys, 1, 2), &[&keys.root]).await.unwrap();
    let target = image_target(3);
    let soon = Utc::now() + Duration::days(2);
    let first = sign_targets(None, &target, soon, &[&keys.targets[0], &keys.targets[1]])
        .await
        .unwrap();
    let later = Utc::now() + Duration::days(200);
    let again = resign_targets(&first, later, &[&keys.targets[1]]).await.unwrap();
    let info = targets_info(&again).unwrap();
    assert_eq!(info.version, 2);
    assert_eq!(info.expires.timestamp(), later.timestamp());
    assert_eq!(info.targets, vec![target.clone()]);
    // The earlier signatures do not carry over: below the threshold until a second key holder signs.
    assert_eq!(info.signed_by, vec![keys.targets[1].id().to_owned()]);
    assert_eq!(
        refusal(&root, &set_with(&keys, again.clone(), 2).await).await,
        Refusal::Signature
    );
    let again = countersign(&again, &keys.targets[2]).await.unwrap();
    let verified = verify(&root, &set_with(&keys, again, 2).await, None, None)
        .await
        .unwrap();
    assert_eq!(verified.targets_version(), 2);
    assert_eq!(verified.target(&target.name).unwrap(), target);

    let without = resign_targets_without(&first, std::slice::from_ref(&target.name), later, &[&keys.targets[0]])
        .await
        .unwrap();
    assert!(targets_info(&without).unwrap().targets.is_empty());
    let unknown = resign_targets_without(&first, &["other.img".to_owned()], later, &[&keys.targets[0]]).await;
    assert_eq!(unknown.unwrap_err().code, Refusal::UnknownTarget);
    let past = resign_targets(&first, Utc::now() - Duration::seconds(1), &[&keys.targets[0]]).await;
    assert_eq!(past.unwrap_err().code, Refusal::Malformed);

    // A listed image authorised as a downgrade from a higher release (a fleet rollback to the same bytes); only a
    // higher release can be downgraded from, and only a listed target.
    let release = target.meta.release_counter;
    let signers = [&keys.targets[0]];
    let allowed = resign_targets_changed(&first, &[], &[(target.name.clone(), release + 1)], later, &signers)
        .await
        .unwrap();
    let changed = &targets_info(&allowed).unwrap().targets[0];
    assert_eq!(changed.meta.downgrade_from, vec![release + 1]);
    assert_eq!(
        (changed.sha256.as_str(), changed.length),
        (target.sha256.as_str(), target.length)
    );
    let not_higher = resign_targets_changed(&first, &[], &[(target.name.clone(), release)], later, &signers).await;
    assert_eq!(not_higher.unwrap_err().code, Refusal::Malformed);
    let unlisted = resign_targets_changed(&first, &[], &[("other.img".into(), release + 1)], later, &signers).await;
    assert_eq!(unlisted.unwrap_err().code, Refusal::UnknownTarget);
}
