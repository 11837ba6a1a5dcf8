//! The audit trail on both backends: every change and every refusal recorded, readable by auditors only,
//! filterable, and tampering (a modified or removed row) detected by verification.

use medfleet_core::identity::Identity;
use medfleet_e2e::{Backend, TestServer, binary, both_backends};
use medfleet_proto::v1::{
    self, access_service_client::AccessServiceClient, audit_service_client::AuditServiceClient,
    registry_service_client::RegistryServiceClient,
};
use sea_orm::{ConnectionTrait as _, Statement};
use tonic::Code;

fn site(name: &str) -> v1::CreateSiteRequest {
    v1::CreateSiteRequest {
        site: Some(v1::Site {
            name: name.into(),
            display_name: name.into(),
            ..Default::default()
        }),
    }
}

async fn events(
    api: &mut AuditServiceClient<tonic::transport::Channel>,
    filter: v1::ListAuditEventsRequest,
) -> Vec<v1::AuditEvent> {
    api.list_audit_events(filter).await.unwrap().into_inner().events
}

async fn trail(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut admin = server.admin().await;
    let mut request = tonic::Request::new(site("stmarys"));
    request
        .metadata_mut()
        .insert("x-request-id", "req-site-1".parse().unwrap());
    admin.create_site(request).await.unwrap();
    // A refused change writes no "allowed" entry: the entry shares the change's transaction.
    assert_eq!(
        admin.create_site(site("stmarys")).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    let mut access = AccessServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap());
    for (who, role) in [("audrey", "auditor"), ("bea", "biomed")] {
        access
            .grant(v1::GrantRequest {
                grant: Some(v1::RoleGrant {
                    principal: format!("medfleet://user/{who}"),
                    role: role.into(),
                    scope: "*".into(),
                }),
            })
            .await
            .unwrap();
    }

    // Only auditors (and admins) read the trail; the refusal itself is recorded.
    let bea = server
        .channel(&server.issue(&Identity::User("bea".into())))
        .await
        .unwrap();
    let status = AuditServiceClient::new(bea.clone())
        .list_audit_events(v1::ListAuditEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = RegistryServiceClient::new(bea)
        .create_site(site("stjohns"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let audrey = server
        .channel(&server.issue(&Identity::User("audrey".into())))
        .await
        .unwrap();
    let mut audit = AuditServiceClient::new(audrey);
    let all = events(&mut audit, v1::ListAuditEventsRequest::default()).await;
    let creations: Vec<_> = all.iter().filter(|e| e.action == "site.create").collect();
    assert_eq!(creations.len(), 1, "{all:?}");
    assert_eq!(creations[0].actor, "medfleet://user/admin");
    assert_eq!(creations[0].request_id, "req-site-1");
    assert_eq!(creations[0].scope, "stmarys");
    assert!(
        all.iter()
            .any(|e| e.action == "access.grant" && e.target == "medfleet://user/audrey")
    );
    assert!(all.iter().any(|e| e.action == "credential.bootstrap"));
    let denials = events(
        &mut audit,
        v1::ListAuditEventsRequest {
            actor: "medfleet://user/bea".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(denials.len(), 2, "{denials:?}");
    assert!(denials.iter().all(|e| e.outcome == "denied"));
    let scoped = events(
        &mut audit,
        v1::ListAuditEventsRequest {
            scope: "stmarys".into(),
            action: "site.".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(scoped.len(), 1);
    // Newest first, and pages do not overlap.
    let first = audit
        .list_audit_events(v1::ListAuditEventsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.events[0].seq > first.events[1].seq);
    let second = events(
        &mut audit,
        v1::ListAuditEventsRequest {
            page_size: 2,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        },
    )
    .await;
    assert!(second[0].seq < first.events[1].seq);

    let report = audit
        .verify_audit_trail(v1::VerifyAuditTrailRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(report.intact, "{report:?}");
    assert_eq!(usize::try_from(report.entries).unwrap(), all.len());
    assert_eq!(
        report.head_seq, all[0].seq,
        "verification reports the newest entry as the head"
    );
    assert_eq!(report.head_hash, all[0].hash);

    // Tampering: change one entry's content directly in the database.
    let db = server.db().await;
    let backend = db.get_database_backend();
    let seq = creations[0].seq;
    db.execute_raw(Statement::from_string(
        backend,
        format!("UPDATE audit_log SET actor = 'medfleet://user/mallory' WHERE seq = {seq}"),
    ))
    .await
    .unwrap();
    let report = audit
        .verify_audit_trail(v1::VerifyAuditTrailRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!report.intact);
    assert_eq!(report.first_broken_seq, seq);
    assert!(report.reason.contains("modified"), "{}", report.reason);

    // The CLI reports it too, with a failing exit code.
    let creds = server.data_dir().admin_bundle();
    let verify = tokio::process::Command::new(binary("medfleet"))
        .args(["--server", &server.url(), "audit", "verify"])
        .arg("--credentials")
        .arg(&creds)
        .output()
        .await
        .unwrap();
    assert_eq!(verify.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&verify.stderr).contains(&format!("entry {seq}")));

    // Restored, then an entry removed: the gap is found.
    db.execute_raw(Statement::from_string(
        backend,
        format!("UPDATE audit_log SET actor = 'medfleet://user/admin' WHERE seq = {seq}"),
    ))
    .await
    .unwrap();
    assert!(
        audit
            .verify_audit_trail(v1::VerifyAuditTrailRequest {})
            .await
            .unwrap()
            .into_inner()
            .intact
    );
    db.execute_raw(Statement::from_string(
        backend,
        format!("DELETE FROM audit_log WHERE seq = {seq}"),
    ))
    .await
    .unwrap();
    let report = audit
        .verify_audit_trail(v1::VerifyAuditTrailRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!report.intact);
    assert!(report.reason.contains("removed"), "{}", report.reason);
}
both_backends!(audit_trail_records_and_detects_tampering, trail);
