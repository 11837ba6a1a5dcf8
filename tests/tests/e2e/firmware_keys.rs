//! The key holders' lifecycle between releases with the real CLI and server: a root rotated before it expires
//! (refused below the old threshold, installed, followed), expiry exported as metrics, targets metadata that
//! expired pulled anyway and re-signed, an image deleted from medfleetd left out of the next re-signing, and a
//! pull into a directory without a root that trusts only the root named by its SHA-256.

use std::path::Path;

use medfleet_e2e::{Backend, TestServer, both_backends, http_get};

use crate::firmware::{Cli, MODEL, image, medfleet, ok};

fn json(run: &Cli, what: &str) -> serde_json::Value {
    ok(run, what);
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{what}: {e}: {}", run.stdout))
}

/// The expiry gauge of `role`, if /metrics has it.
async fn expiry_metric(server: &TestServer, role: &str) -> Option<f64> {
    let (_, metrics) = http_get(server.http_addr, "/metrics").await;
    let prefix = format!("medfleet_firmware_metadata_expiry_seconds{{role=\"{role}\"");
    metrics
        .lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn sign(server: &TestServer, dir: &Path, name: &str, counter: &str, expires: &str) {
    std::fs::write(dir.join(name), image(200_000, counter.as_bytes()[0])).unwrap();
    let version = format!("2.{counter}.0");
    let args = [
        "firmware",
        "sign",
        name,
        "--name",
        name,
        "--model",
        MODEL,
        "--version",
        &version,
        "--counter",
        counter,
        "--metadata",
        "fw",
        "--key",
        "fw/keys/targets-1.pem",
        "--expires",
        expires,
    ];
    ok(&medfleet(server, dir, &args).await, "sign");
    let upload = [
        "firmware",
        "upload",
        name,
        "--metadata",
        "fw",
        "--name",
        name,
        "-o",
        "json",
    ];
    ok(&medfleet(server, dir, &upload).await, "upload");
}

async fn roles(server: &TestServer, dir: &Path) -> serde_json::Value {
    json(
        &medfleet(
            server,
            dir,
            &["firmware", "metadata", "show", "--metadata", "fw", "-o", "json"],
        )
        .await,
        "metadata show",
    )
}

fn role<'a>(shown: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    shown["roles"]
        .as_array()
        .and_then(|roles| roles.iter().find(|r| r["role"] == name))
        .unwrap_or_else(|| panic!("no {name} in {shown}"))
}

async fn rotate_expire_resign_and_remove(backend: Backend) {
    let server = TestServer::start(backend).await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let online = medfleet(&server, dir, &["firmware", "online-keys", "-o", "json"]).await;
    ok(&online, "online-keys");
    std::fs::write(dir.join("online-keys.json"), &online.stdout).unwrap();
    let init = [
        "firmware",
        "keys",
        "init",
        "--out",
        "fw",
        "--online-keys",
        "online-keys.json",
        "--root-keys",
        "2",
        "--root-threshold",
        "2",
        "--expires",
        "30d",
    ];
    // Without a passphrase (no terminal, none in the environment) no key is written: keys are never in clear
    // unless asked for with --unencrypted.
    let refused = tokio::process::Command::new(medfleet_e2e::binary("medfleet"))
        .args(init)
        .current_dir(dir)
        .env_remove("MEDFLEET_KEY_PASSPHRASE")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("MEDFLEET_KEY_PASSPHRASE"),
        "{refused:?}"
    );
    assert!(!dir.join("fw").exists(), "nothing was written");
    ok(&medfleet(&server, dir, &init).await, "keys init");
    let key = std::fs::read_to_string(dir.join("fw/keys/targets-1.pem")).unwrap();
    assert!(key.starts_with("-----BEGIN MEDFLEET ENCRYPTED TUF KEY-----"), "{key}");
    ok(
        &medfleet(&server, dir, &["firmware", "trust", "install", "fw/root.json"]).await,
        "trust install",
    );
    let first_expiry = expiry_metric(&server, "root").await.expect("root expiry exported");

    // One of two root keys cannot sign the next root; nothing is written.
    let v1 = std::fs::read(dir.join("fw/root.json")).unwrap();
    let rotate = |keys: &[&'static str]| {
        let mut args = vec![
            "firmware",
            "keys",
            "rotate-root",
            "--metadata",
            "fw",
            "--expires",
            "730d",
            "-o",
            "json",
        ];
        for key in keys {
            args.extend(["--key", key]);
        }
        args
    };
    let refused = medfleet(&server, dir, &rotate(&["fw/keys/root-1.pem"])).await;
    assert_eq!(refused.code, 3, "{refused:?}");
    assert!(
        refused.stderr.contains("needs 2 of its 2 root keys"),
        "{}",
        refused.stderr
    );
    assert_eq!(std::fs::read(dir.join("fw/root.json")).unwrap(), v1);
    let rotated = json(
        &medfleet(&server, dir, &rotate(&["fw/keys/root-1.pem", "fw/keys/root-2.pem"])).await,
        "rotate-root",
    );
    assert_eq!(rotated["version"], 2, "{rotated}");
    assert_eq!(std::fs::read(dir.join("fw/1.root.json")).unwrap(), v1);
    ok(
        &medfleet(&server, dir, &["firmware", "trust", "install", "fw/root.json"]).await,
        "install root v2",
    );
    let trusted = json(
        &medfleet(&server, dir, &["firmware", "trust", "show", "-o", "json"]).await,
        "trust show",
    );
    assert_eq!(trusted["version"], 2, "{trusted}");
    let rotated_expiry = expiry_metric(&server, "root").await.unwrap();
    assert!(
        rotated_expiry > first_expiry + 600.0 * 86_400.0,
        "{first_expiry} -> {rotated_expiry}"
    );

    // Two releases whose targets metadata lives seconds; the first image is deleted afterwards.
    sign(&server, dir, "mx450-2.1.0.img", "1", "5m").await;
    // A key holder's second machine has no root.json: medfleetd's root is not trusted as sent. Only the SHA-256
    // `keys init` printed (of version 1) lets the pull verify, and it saves the root the chain leads to.
    let bare = medfleet(&server, dir, &["firmware", "metadata", "pull", "--out", "elsewhere"]).await;
    assert_eq!(bare.code, 2, "{bare:?}");
    assert!(bare.stderr.contains("--root-sha256"), "{}", bare.stderr);
    let server_ref = &server;
    let pull_pinned = |sha: String| async move {
        let args = [
            "firmware",
            "metadata",
            "pull",
            "--out",
            "elsewhere",
            "--root-sha256",
            &sha,
        ];
        medfleet(server_ref, dir, &args).await
    };
    let wrong = pull_pinned("0".repeat(64)).await;
    assert_eq!(wrong.code, 3, "{wrong:?}");
    assert!(!dir.join("elsewhere/root.json").exists());
    ok(
        &pull_pinned(medfleet_core::digest::sha256_hex(&v1)).await,
        "pull with --root-sha256",
    );
    assert_eq!(
        std::fs::read(dir.join("elsewhere/root.json")).unwrap(),
        std::fs::read(dir.join("fw/root.json")).unwrap()
    );

    sign(&server, dir, "mx450-2.2.0.img", "2", "8s").await;
    let deleted = medfleet(&server, dir, &["firmware", "delete", "mx450-2.1.0.img", "--yes"]).await;
    ok(&deleted, "delete");
    assert!(
        deleted.stderr.contains("--remove mx450-2.1.0.img"),
        "{}",
        deleted.stderr
    );
    let shown = roles(&server, dir).await;
    assert_eq!(role(&shown, "root")["version"], 2, "{shown}");
    assert_eq!(shown["problem"], "", "{shown}");

    // The targets metadata expires (polled, as an operator would watch it): devices would refuse it, and a plain
    // pull says how to get it anyway.
    let mut expired = shown;
    for _ in 0..100 {
        if role(&expired, "targets")["expired"] == true {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        expired = roles(&server, dir).await;
    }
    assert_eq!(role(&expired, "targets")["expired"], true, "{expired}");
    assert!(expired["problem"].as_str().unwrap().contains("expired"), "{expired}");
    let pull = medfleet(&server, dir, &["firmware", "metadata", "pull", "--out", "fw"]).await;
    assert_eq!(pull.code, 3, "{pull:?}");
    assert!(pull.stderr.contains("--allow-expired"), "{}", pull.stderr);
    let pulled = medfleet(
        &server,
        dir,
        &["firmware", "metadata", "pull", "--out", "fw", "--allow-expired"],
    )
    .await;
    ok(&pulled, "pull --allow-expired");
    assert!(pulled.stderr.contains("expired"), "{}", pulled.stderr);

    // Re-signed with the deleted image still listed: refused, with the way out; without it: published.
    let resign = |remove: bool| {
        let mut args = vec![
            "firmware",
            "resign",
            "--metadata",
            "fw",
            "--key",
            "fw/keys/targets-1.pem",
        ];
        if remove {
            args.extend(["--remove", "mx450-2.1.0.img"]);
        }
        args
    };
    let publish = ["firmware", "metadata", "publish", "--metadata", "fw", "-o", "json"];
    ok(&medfleet(&server, dir, &resign(false)).await, "resign");
    let refused = medfleet(&server, dir, &publish).await;
    assert_eq!(refused.code, 5, "{refused:?}");
    assert!(
        refused.stderr.contains("--remove mx450-2.1.0.img"),
        "{}",
        refused.stderr
    );
    ok(&medfleet(&server, dir, &resign(true)).await, "resign --remove");
    let published = json(&medfleet(&server, dir, &publish).await, "publish");
    assert_eq!(
        published["targets"],
        serde_json::json!(["mx450-2.2.0.img"]),
        "{published}"
    );
    let fresh = roles(&server, dir).await;
    assert_eq!(role(&fresh, "targets")["expired"], false, "{fresh}");
    assert_eq!(fresh["problem"], "", "{fresh}");
    assert!(expiry_metric(&server, "targets").await.is_some());
    server.stop().await.unwrap();
}

both_backends!(key_holders_lifecycle, rotate_expire_resign_and_remove);
