//! Secrets at rest and the lifecycle of EMR destinations: bearer tokens sealed in the database (and still sent),
//! the CA key sealed on disk, a key rotation across a restart (re-encryption under the new key, the old key
//! retired), a secret whose key is missing failing loudly (never sent without it), and update, disable, enable and
//! delete of a destination, each audited and admin-only.

use std::time::Duration;

use chrono::Utc;
use medfleet_core::identity::Identity;
use medfleet_e2e::receivers::FhirReceiver;
use medfleet_e2e::{Backend, Storage, TestServer, both_backends};
use medfleet_proto::v1::{
    self, audit_service_client::AuditServiceClient, emr_service_client::EmrServiceClient,
    feed_service_client::FeedServiceClient, patient_service_client::PatientServiceClient,
};
use sea_orm::{ConnectionTrait as _, Statement};
use tonic::Code;
use tonic::transport::Channel;

use crate::clinical::{GUARD, Publisher, cli, patient, setup, ts, vitals};

/// The stored settings of a destination, read with raw SQL.
async fn stored_settings(server: &TestServer, name: &str) -> String {
    let db = server.db().await;
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            match db.get_database_backend() {
                sea_orm::DbBackend::Postgres => "SELECT settings FROM emr_destinations WHERE name = $1",
                _ => "SELECT settings FROM emr_destinations WHERE name = ?",
            },
            [name.into()],
        ))
        .await
        .unwrap()
        .expect("destination row");
    let settings: String = row.try_get("", "settings").unwrap();
    db.close().await.ok();
    settings
}

/// Overwrites a destination's stored settings with raw SQL (the server may be stopped).
async fn set_stored_settings(database_url: &str, name: &str, settings: &str) {
    let db = sea_orm::Database::connect(database_url).await.unwrap();
    let sql = match db.get_database_backend() {
        sea_orm::DbBackend::Postgres => "UPDATE emr_destinations SET settings = $1 WHERE name = $2",
        _ => "UPDATE emr_destinations SET settings = ? WHERE name = ?",
    };
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        sql,
        [settings.into(), name.into()],
    ))
    .await
    .unwrap();
    db.close().await.ok();
}

fn fhir_destination(name: &str, fhir: &FhirReceiver, token: &str) -> v1::EmrDestination {
    v1::EmrDestination {
        name: name.into(),
        kind: v1::EmrDestinationKind::Fhir.into(),
        endpoint: fhir.base_url(),
        bearer_token: token.into(),
        enabled: Some(true),
        ..Default::default()
    }
}

/// A monitor associated with a patient since an hour ago, streaming over its own certificate.
async fn charting_monitor(server: &TestServer, device: &str) -> Publisher {
    PatientServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap())
        .associate(v1::AssociateRequest {
            device_id: device.to_owned(),
            patient: patient("MRN-S"),
            from: ts(Utc::now() - chrono::Duration::hours(1)),
            until: None,
        })
        .await
        .unwrap();
    publisher(server, device).await
}

async fn publisher(server: &TestServer, device: &str) -> Publisher {
    let channel = server
        .channel(&server.issue(&Identity::Device(device.parse().unwrap())))
        .await
        .unwrap();
    Publisher::open(channel).await
}

/// Sends one full set of vitals (five chart entries).
async fn chart(publisher: &mut Publisher, sequence: u64) {
    let at = Utc::now() - chrono::Duration::seconds(60 - i64::try_from(sequence).unwrap());
    assert_eq!(publisher.send(sequence, vitals(at)).await.accepted, 7);
}

async fn destination(emr: &mut EmrServiceClient<Channel>, name: &str) -> v1::EmrDestination {
    emr.list_destinations(v1::ListDestinationsRequest {})
        .await
        .unwrap()
        .into_inner()
        .destinations
        .into_iter()
        .find(|d| d.name == name)
        .expect("destination listed")
}

async fn audit_events(server: &TestServer, action: &str) -> Vec<v1::AuditEvent> {
    AuditServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap())
        .list_audit_events(v1::ListAuditEventsRequest {
            action: action.into(),
            page_size: 500,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
}

fn kid_of(settings: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(settings).unwrap();
    medfleet_core::secrets::key_id_of(value["bearer_token"].as_str().unwrap())
        .unwrap()
        .to_owned()
}

/// (a), (b), (d): the token is stored only sealed and still authenticates every delivery; the CA key is sealed
/// on disk; after a key rotation and a restart every secret is under the new key (a plaintext row of an older
/// version too), deliveries go on, and the old key can be retired; a secret sealed under a key the keyring lacks
/// makes its destination fail loudly (marked, nothing sent) until an admin sets a new one.
async fn secrets_are_sealed_and_keys_rotate(backend: Backend) {
    let storage = Storage::new(backend).await;
    let config = storage.config();
    let server = TestServer::start_on(config.clone()).await;
    let device = setup(&server).await;
    let files = tempfile::tempdir().unwrap();
    let fhir = FhirReceiver::start(files.path()).await;
    fhir.require_bearer(Some("tok-1"));
    let mut emr = EmrServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap());
    let created = emr
        .create_destination(fhir_destination("fhir", &fhir, "tok-1"))
        .await
        .unwrap()
        .into_inner();
    let first_kid = server.keyring().current().id().to_owned();
    assert!(created.bearer_token.is_empty() && created.bearer_token_set && !created.client_key_set);
    assert_eq!(created.secret_key_ids, [first_kid.as_str()]);

    // (a) The row holds an envelope, not the token; the receiver still gets `Authorization: Bearer tok-1`.
    let settings = stored_settings(&server, "fhir").await;
    assert!(
        !settings.contains("tok-1"),
        "plaintext token in the database: {settings}"
    );
    assert_eq!(kid_of(&settings), first_kid);
    let mut monitor = charting_monitor(&server, &device).await;
    chart(&mut monitor, 1).await;
    fhir.wait("the first entries, authenticated", |log| log.created.len() == 5)
        .await;
    assert!(
        fhir.log
            .lock()
            .unwrap()
            .authorizations
            .iter()
            .all(|a| a == "Bearer tok-1")
    );

    // (d) The CA key is sealed on disk, never a PEM.
    let dir = server.data_dir();
    assert!(!dir.ca_key().exists(), "a plaintext ca.key exists");
    let sealed = std::fs::read_to_string(dir.ca_key_sealed()).unwrap();
    assert!(
        sealed.starts_with("enc:v1:") && !sealed.contains("PRIVATE KEY"),
        "{sealed}"
    );
    drop(monitor);
    server.stop().await.unwrap();

    // An older version's row: the token in clear. And a rotation: a new first key, the old one kept.
    set_stored_settings(
        &config.database_url,
        "fhir",
        &format!(r#"{{"endpoint": "{}", "bearer_token": "tok-1"}}"#, fhir.base_url()),
    )
    .await;
    let rotated = medfleet_server::identity::secrets::rotate(&config.secrets_key_file).unwrap();
    let second_kid = rotated.current().id().to_owned();
    assert_eq!(rotated.ids(), [second_kid.as_str(), first_kid.as_str()]);

    // (b) Restarted: everything is re-encrypted under the new key, once, audited with counts and no secret.
    let server = TestServer::start_on(config.clone()).await;
    server.wait_ready().await;
    let settings = stored_settings(&server, "fhir").await;
    assert!(!settings.contains("tok-1"), "{settings}");
    assert_eq!(kid_of(&settings), second_kid);
    assert_eq!(
        server.data_dir().ca_key_kid().unwrap().as_deref(),
        Some(second_kid.as_str())
    );
    let resealed = audit_events(&server, "secrets.reseal").await;
    assert_eq!(resealed.len(), 1, "{resealed:?}");
    assert!(
        resealed[0].detail.contains("1 from plaintext") && resealed[0].detail.contains("CA key re-encrypted"),
        "{}",
        resealed[0].detail
    );
    assert!(!resealed[0].detail.contains("tok-1"));
    let mut monitor = publisher(&server, &device).await;
    chart(&mut monitor, 2).await;
    fhir.wait("entries after the rotation", |log| log.created.len() == 10)
        .await;
    // (d) It still issues certificates from its (re-encrypted) CA key after the restart.
    server
        .channel(&server.issue(&Identity::User("after-restart".into())))
        .await
        .unwrap();
    drop(monitor);
    server.stop().await.unwrap();

    // The old key retired (nothing uses it); the server starts and delivers without it.
    let retirement = medfleet_server::retire_unused_keys(&config).await.unwrap();
    assert_eq!(retirement.retired, [first_kid.as_str()]);
    assert!(retirement.still_used.is_empty() && !retirement.plaintext);
    let server = TestServer::start_on(config.clone()).await;
    assert_eq!(server.keyring().ids(), [second_kid.as_str()]);
    let mut monitor = publisher(&server, &device).await;
    chart(&mut monitor, 3).await;
    fhir.wait("entries with the old key retired", |log| log.created.len() == 15)
        .await;
    assert!(
        fhir.log
            .lock()
            .unwrap()
            .authorizations
            .iter()
            .all(|a| a == "Bearer tok-1")
    );

    // A secret sealed under a key the keyring does not hold: the destination is marked with the missing key and
    // what to do, and nothing is sent to it (never without its token).
    let mut emr = EmrServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap());
    let stored = stored_settings(&server, "fhir").await;
    set_stored_settings(
        &config.database_url,
        "fhir",
        &stored.replace(&format!("enc:v1:{second_kid}:"), "enc:v1:k-lost:"),
    )
    .await;
    let requests = fhir.log.lock().unwrap().authorizations.len();
    chart(&mut monitor, 4).await;
    let marked = tokio::time::timeout(GUARD, async {
        loop {
            let d = destination(&mut emr, "fhir").await;
            if !d.relay_error.is_empty() {
                return d.relay_error;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the destination is marked");
    assert!(
        marked.contains("'k-lost'") && marked.contains("medfleet emr update fhir"),
        "{marked}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fhir.log.lock().unwrap().authorizations.len(),
        requests,
        "something was sent"
    );
    // A new token fixes it: the waiting entries go out, with it.
    fhir.require_bearer(Some("tok-2"));
    let token_file = files.path().join("token.txt");
    std::fs::write(&token_file, "tok-2\n").unwrap();
    let (ok, out, err) = cli(
        &server,
        &[
            "emr",
            "update",
            "fhir",
            "--bearer-token-file",
            token_file.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    assert!(ok, "{out}{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["bearer_token"], "set");
    assert_eq!(shown["relay_error"], "");
    assert!(!out.contains("tok-2"));
    fhir.wait("the entries held while the key was missing", |log| {
        log.created.len() == 20
    })
    .await;
    assert_eq!(
        fhir.log.lock().unwrap().authorizations.last().map(String::as_str),
        Some("Bearer tok-2")
    );
}
both_backends!(secrets_are_sealed_and_keys_rotate, secrets_are_sealed_and_keys_rotate);

/// (c): update rotates the token the receiver sees; disable holds what is pending (and queues nothing new) until
/// enable sends it; MLLP in clear needs its flag again for a new endpoint; a feed with a subscription is deleted
/// only with force; every change is audited without the secret, and only admins may make them.
async fn destination_lifecycle(backend: Backend) {
    let server = TestServer::start(backend).await;
    let device = setup(&server).await;
    let files = tempfile::tempdir().unwrap();
    let fhir = FhirReceiver::start(files.path()).await;
    fhir.require_bearer(Some("tok-1"));
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    let mut emr = EmrServiceClient::new(admin.clone());
    emr.create_destination(fhir_destination("fhir", &fhir, "tok-1"))
        .await
        .unwrap();
    let mut monitor = charting_monitor(&server, &device).await;
    chart(&mut monitor, 1).await;
    fhir.wait("entries with the first token", |log| log.created.len() == 5)
        .await;

    // Rotate the token: the receiver sees the new one from the next delivery on.
    fhir.require_bearer(Some("tok-2"));
    let updated = emr
        .update_destination(v1::UpdateDestinationRequest {
            destination: Some(v1::EmrDestination {
                name: "fhir".into(),
                bearer_token: "tok-2".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["bearer_token".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.bearer_token.is_empty() && updated.bearer_token_set);
    assert_eq!(
        updated.endpoint,
        fhir.base_url(),
        "fields outside the mask keep their value"
    );
    chart(&mut monitor, 2).await;
    fhir.wait("entries with the rotated token", |log| log.created.len() == 10)
        .await;
    assert_eq!(
        fhir.log.lock().unwrap().authorizations.last().map(String::as_str),
        Some("Bearer tok-2")
    );

    // The receiver fails, entries wait; disabled, nothing is sent even once it is back; entries charted while
    // disabled are not queued; enabled, what was pending goes out.
    fhir.log.lock().unwrap().fail_next = usize::MAX;
    chart(&mut monitor, 3).await;
    fhir.wait("a refused attempt", |log| log.fail_next < usize::MAX).await;
    let (ok, out, err) = cli(&server, &["emr", "disable", "fhir", "-o", "json"]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["enabled"],
        false
    );
    chart(&mut monitor, 4).await;
    let attempts = fhir.log.lock().unwrap().authorizations.len();
    fhir.log.lock().unwrap().fail_next = 0;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        fhir.log.lock().unwrap().authorizations.len(),
        attempts,
        "sent while disabled"
    );
    let (ok, out, err) = cli(&server, &["emr", "enable", "fhir"]);
    assert!(ok, "{out}{err}");
    fhir.wait("the entries pending when it was disabled", |log| {
        log.created.len() == 15
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fhir.log.lock().unwrap().created.len(),
        15,
        "entries charted while disabled were queued"
    );

    // MLLP in clear: a new endpoint needs insecure_plaintext again, stated in the same update.
    emr.create_destination(v1::EmrDestination {
        name: "lab-hl7".into(),
        kind: v1::EmrDestinationKind::Mllp.into(),
        endpoint: "127.0.0.1:2575".into(),
        insecure_plaintext: true,
        enabled: Some(false),
        ..Default::default()
    })
    .await
    .unwrap();
    let repoint = |paths: &[&str]| v1::UpdateDestinationRequest {
        destination: Some(v1::EmrDestination {
            name: "lab-hl7".into(),
            endpoint: "127.0.0.2:2575".into(),
            insecure_plaintext: true,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
    };
    let refused = emr.update_destination(repoint(&["endpoint"])).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("insecure_plaintext"),
        "{}",
        refused.message()
    );
    emr.update_destination(repoint(&["endpoint", "insecure_plaintext"]))
        .await
        .unwrap();

    // Only admins: an IT provisioner (who reads destinations and retries deliveries) may not change or delete one.
    let it = Identity::User("it-person".into());
    v1::access_service_client::AccessServiceClient::new(admin.clone())
        .grant(v1::GrantRequest {
            grant: Some(v1::RoleGrant {
                principal: it.to_string(),
                role: "it_provisioner".into(),
                scope: "*".into(),
            }),
        })
        .await
        .unwrap();
    let mut as_it = EmrServiceClient::new(server.channel(&server.issue(&it)).await.unwrap());
    let denied = as_it.update_destination(repoint(&["enabled"])).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = as_it
        .delete_destination(v1::DeleteDestinationRequest {
            name: "fhir".into(),
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // A feed with a subscription: deleting it is refused, naming the subscription, unless forced.
    emr.create_destination(v1::EmrDestination {
        name: "ward-feed".into(),
        kind: v1::EmrDestinationKind::Feed.into(),
        enabled: Some(true),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut feed = FeedServiceClient::new(admin.clone())
        .subscribe(v1::SubscribeRequest {
            subscription: "bridge".into(),
            destination: "ward-feed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let refused = emr
        .delete_destination(v1::DeleteDestinationRequest {
            name: "ward-feed".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("medfleet://user/admin/bridge") && refused.message().contains("--force"),
        "{}",
        refused.message()
    );
    let (ok, out, err) = cli(&server, &["emr", "delete", "ward-feed", "--force", "-o", "json"]);
    assert!(ok, "{out}{err}");
    let deleted: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(deleted["deleted_subscriptions"][0], "medfleet://user/admin/bridge");
    // The open feed ends instead of idling forever.
    let ended = tokio::time::timeout(GUARD, async {
        loop {
            match feed.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return Code::Ok,
                Err(status) => return status.code(),
            }
        }
    })
    .await
    .expect("the feed ends");
    assert_eq!(ended, Code::NotFound);

    // Deleting a destination with pending deliveries discards them, never sends them.
    fhir.log.lock().unwrap().fail_next = usize::MAX;
    chart(&mut monitor, 5).await;
    fhir.wait("a refused attempt", |log| log.fail_next < usize::MAX).await;
    let deleted = emr
        .delete_destination(v1::DeleteDestinationRequest {
            name: "fhir".into(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.discarded_deliveries, 5);
    fhir.log.lock().unwrap().fail_next = 0;
    let attempts = fhir.log.lock().unwrap().authorizations.len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fhir.log.lock().unwrap().authorizations.len(), attempts);
    let gone = emr
        .list_deliveries(v1::ListDeliveriesRequest {
            destination: "fhir".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    // Every change is in the audit trail, named, never with a secret.
    let events = audit_events(&server, "emr_destination.").await;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    for action in [
        "emr_destination.update",
        "emr_destination.disable",
        "emr_destination.enable",
        "emr_destination.delete",
    ] {
        assert!(actions.contains(&action), "{action} not audited: {actions:?}");
    }
    assert!(events.iter().all(|e| !e.detail.contains("tok-")), "{events:?}");
    let rotation = events
        .iter()
        .find(|e| e.action == "emr_destination.update" && e.target == "emr_destination/fhir")
        .unwrap();
    assert_eq!(rotation.detail, "bearer_token set (new value)");
    let repointed = events
        .iter()
        .find(|e| e.action == "emr_destination.update" && e.target == "emr_destination/lab-hl7")
        .unwrap();
    assert!(
        repointed.detail.contains("'127.0.0.1:2575' -> '127.0.0.2:2575'")
            && repointed.detail.contains("INSECURE PLAINTEXT"),
        "{}",
        repointed.detail
    );
    let feed_delete = events
        .iter()
        .find(|e| e.action == "emr_destination.delete" && e.target == "emr_destination/ward-feed")
        .unwrap();
    assert!(
        feed_delete.detail.contains("medfleet://user/admin/bridge"),
        "{}",
        feed_delete.detail
    );
}
both_backends!(destination_lifecycle, destination_lifecycle);
