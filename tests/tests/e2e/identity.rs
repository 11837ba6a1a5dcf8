//! The certificate lifecycle over real mTLS on both backends: enrollment and its refusals, renewal, revocation
//! enforced at the handshake and on live streams (on this and on another replica), the CRL.

use std::time::{Duration, Instant};

use medfleet_e2e::{Backend, Storage, TestServer, both_backends};
use medfleet_proto::client::Bundle;
use medfleet_proto::v1::{
    self, credential_service_client::CredentialServiceClient, device_service_client::DeviceServiceClient,
    registry_service_client::RegistryServiceClient, session_request, session_response,
};
use sea_orm::{ConnectionTrait as _, Statement};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

type Api = RegistryServiceClient<Channel>;

/// The limit a revocation must take effect within, on every replica.
const REVOCATION_DEADLINE: Duration = Duration::from_secs(1);

async fn register(api: &mut Api, serial: &str) -> v1::Device {
    api.register_device(v1::RegisterDeviceRequest {
        serial_number: serial.into(),
        manufacturer: "Philips".into(),
        model: "IntelliVue MX450".into(),
        device_class: v1::DeviceClass::PatientMonitor.into(),
        eui64: String::new(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

async fn token(api: &mut Api, device: &v1::Device) -> String {
    api.issue_enrollment_token(v1::IssueEnrollmentTokenRequest {
        device_id: device.id.clone(),
        ttl: None,
        replace: false,
    })
    .await
    .unwrap()
    .into_inner()
    .token
}

fn hello(device_id: &str) -> v1::SessionRequest {
    v1::SessionRequest {
        message: Some(session_request::Message::Hello(v1::Hello {
            device_id: device_id.to_owned(),
            firmware_version: "1.0.0".into(),
            operational_state: v1::OperationalState::Idle.into(),
            ..Default::default()
        })),
    }
}

/// Opens a session as `device_id`; returns the inbound stream after the Welcome, and the outbound sender (which
/// must stay alive to keep the session open).
async fn open_session(
    channel: Channel,
    device_id: &str,
) -> Result<(tonic::Streaming<v1::SessionResponse>, mpsc::Sender<v1::SessionRequest>), tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(hello(device_id)).await.unwrap();
    let mut inbound = DeviceServiceClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = inbound.message().await?.expect("a welcome");
    assert!(
        matches!(first.message, Some(session_response::Message::Welcome(_))),
        "{first:?}"
    );
    Ok((inbound, tx))
}

/// Asserts that a held session is cut within the revocation deadline of `since`.
async fn assert_cut(inbound: &mut tonic::Streaming<v1::SessionResponse>, since: Instant, what: &str) {
    let remaining = REVOCATION_DEADLINE.saturating_sub(since.elapsed());
    let next = tokio::time::timeout(remaining, inbound.message()).await;
    assert!(
        next.is_ok(),
        "{what}: the session was still open {REVOCATION_DEADLINE:?} after the revocation"
    );
    if let Ok(Ok(Some(message))) = next {
        panic!("{what}: unexpected message {message:?}");
    }
}

/// Asserts that new connections with `bundle` are refused at the handshake, while the admin's credentials still
/// work on the same server (so the refusal is about this certificate, not a server that went away).
async fn assert_refused(server: &TestServer, bundle: &Bundle, what: &str) {
    if let Ok(channel) = server.channel_for(bundle).await {
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .expect_err(what);
        assert!(
            matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
            ),
            "{what}: {status:?}"
        );
    }
    let control = server.channel(&server.admin_bundle()).await.expect("admin channel");
    HealthClient::new(control)
        .check(HealthCheckRequest::default())
        .await
        .unwrap_or_else(|e| panic!("{what}: the server no longer answers valid clients either: {e:?}"));
}

async fn device_state(api: &mut Api, id: &str) -> v1::DeviceState {
    api.get_device(v1::GetDeviceRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .state()
}

/// What enrollment rejections must leave untouched.
async fn identity_snapshot(server: &TestServer) -> serde_json::Value {
    use medfleet_server::persistence::entity::{certificate, enrollment_token};
    use sea_orm::EntityTrait as _;
    let db = server.db().await;
    let value = serde_json::json!({
        "registry": server.snapshot().await,
        "tokens": enrollment_token::Entity::find().into_json().all(&db).await.unwrap(),
        "certificates": certificate::Entity::find().into_json().all(&db).await.unwrap(),
    });
    db.close().await.ok();
    value
}

async fn enrollment_rejections(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut api = server.admin().await;
    let a = register(&mut api, "SN-A").await;
    let b = register(&mut api, "SN-B").await;
    let token_a = token(&mut api, &a).await;
    let token_b = token(&mut api, &b).await;
    let before = identity_snapshot(&server).await;

    let code = |r: Result<_, tonic::Status>| r.map(|_| ()).unwrap_err().code();
    assert_eq!(
        code(server.enroll(&format!("mft_{}", "A".repeat(43)), "").await),
        Code::Unauthenticated
    );
    assert_eq!(code(server.enroll("not-a-token", "").await), Code::Unauthenticated);
    assert_eq!(
        code(server.enroll(&token_a, &b.id).await),
        Code::PermissionDenied,
        "token for another device"
    );

    let (_, csr) = medfleet_proto::client::new_key_and_csr().unwrap();
    let mut bad_signature = csr.clone();
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 0x01;
    let weak = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/rsa1024.csr.der")).unwrap();
    for (csr_der, needle) in [
        (b"not a CSR".to_vec(), "PKCS#10"),
        (Vec::new(), "is required"),
        (bad_signature, "signature"),
        (weak, "RSA keys are not accepted"),
    ] {
        let status = server
            .enroll_raw(v1::EnrollRequest {
                token: token_a.clone(),
                csr_der,
                expected_device_id: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(needle), "{}", status.message());
    }
    assert_eq!(
        identity_snapshot(&server).await,
        before,
        "a refused enrollment changed something"
    );

    // The untouched token still works, once.
    let (_, issued) = server.enroll(&token_a, &a.id).await.unwrap();
    assert_eq!(issued.identity, format!("medfleet://device/{}", a.id));
    assert_eq!(device_state(&mut api, &a.id).await, v1::DeviceState::Enrolled);
    let reused = server.enroll(&token_a, "").await.unwrap_err();
    assert_eq!(reused.code(), Code::Unauthenticated);
    assert!(reused.message().contains("already used"), "{}", reused.message());

    // An expired token (its expiry moved into the past rather than waiting for it).
    let db = server.db().await;
    let sql = "UPDATE enrollment_tokens SET expires_at = created_at WHERE used_at IS NULL";
    db.execute_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap();
    let expired = server.enroll(&token_b, "").await.unwrap_err();
    assert_eq!(expired.code(), Code::Unauthenticated);
    assert!(expired.message().contains("expired"), "{}", expired.message());

    // A decommissioned device gets no token, and the one it had is void.
    let c = register(&mut api, "SN-C").await;
    let token_c = token(&mut api, &c).await;
    api.decommission_device(v1::DecommissionDeviceRequest { id: c.id.clone() })
        .await
        .unwrap();
    assert_eq!(
        server.enroll(&token_c, "").await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let refused = api
        .issue_enrollment_token(v1::IssueEnrollmentTokenRequest {
            device_id: c.id.clone(),
            ttl: None,
            replace: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let ttl = api
        .issue_enrollment_token(v1::IssueEnrollmentTokenRequest {
            device_id: b.id.clone(),
            ttl: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
            replace: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        ttl.code(),
        Code::InvalidArgument,
        "a token must live at least 5 minutes"
    );
}
both_backends!(enrollment_rejections_change_nothing, enrollment_rejections);

async fn concurrent_single_use(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut api = server.admin().await;
    // Of eight simultaneous enrollments with one token, exactly one succeeds. of eight simultaneous enrollments with one token, exactly one succeeds.
    let d = register(&mut api, "SN-D").await;
    let token_d = token(&mut api, &d).await;
    let attempts = (0..8).map(|_| server.enroll(&token_d, ""));
    let outcomes = futures::future::join_all(attempts).await;
    assert_eq!(
        outcomes.iter().filter(|o| o.is_ok()).count(),
        1,
        "a token was used more than once"
    );
    assert!(
        outcomes
            .iter()
            .filter_map(|o| o.as_ref().err())
            .all(|e| e.code() == Code::Unauthenticated),
        "{outcomes:?}"
    );
}
both_backends!(token_is_single_use_under_concurrency, concurrent_single_use);

async fn brute_force(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut api = server.admin().await;
    let device = register(&mut api, "SN-1").await;
    let valid = token(&mut api, &device).await;
    for _ in 0..10 {
        let guess = format!("mft_{}", uuid::Uuid::new_v4().simple());
        assert_eq!(
            server.enroll(&guess, "").await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
    let limited = server.enroll(&valid, "").await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    assert_eq!(
        device_state(&mut api, &device.id).await,
        v1::DeviceState::Registered,
        "a rate-limited attempt must not consume the token"
    );
}
both_backends!(token_guessing_is_rate_limited, brute_force);

async fn renewal_and_revocation(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut api = server.admin().await;
    let device = register(&mut api, "SN-1").await;
    let other = register(&mut api, "SN-2").await;
    let (first, issued) = server
        .enroll(&token(&mut api, &device).await, &device.id)
        .await
        .unwrap();
    let channel = server.channel_for(&first).await.unwrap();

    // A device certificate cannot speak for another device, nor call operator RPCs.
    let status = open_session(channel.clone(), &other.id).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = RegistryServiceClient::new(channel.clone())
        .list_devices(v1::ListDevicesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let (mut session, _keep) = open_session(channel.clone(), &device.id).await.unwrap();
    assert_eq!(device_state(&mut api, &device.id).await, v1::DeviceState::Active);

    // Renewal with a fresh key, over the authenticated channel.
    let (key_pem, csr_der) = medfleet_proto::client::new_key_and_csr().unwrap();
    let renewed = CredentialServiceClient::new(channel.clone())
        .renew(v1::RenewRequest { csr_der })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.identity, issued.identity);
    assert_ne!(renewed.serial, issued.serial);
    let second = Bundle::parse(&format!("{key_pem}{}", renewed.certificate_chain_pem)).unwrap();
    let (mut renewed_session, _keep2) = open_session(server.channel_for(&second).await.unwrap(), &device.id)
        .await
        .unwrap();

    // Revocation: every certificate of the device, at once, live streams included.
    let revoked = api
        .revoke_device(v1::RevokeDeviceRequest {
            id: device.id.clone(),
            reason: v1::RevocationReason::KeyCompromise.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let started = Instant::now();
    assert_cut(&mut session, started, "first certificate").await;
    assert_cut(&mut renewed_session, started, "renewed certificate").await;
    assert_eq!(
        revoked.state(),
        v1::DeviceState::Registered,
        "a revoked device must enroll again"
    );
    assert_refused(&server, &first, "revoked first certificate").await;
    assert_refused(&server, &second, "revoked renewed certificate").await;

    // The CRL lists both.
    let crl_der = http_get_bytes(server.http_addr, "/crl").await;
    let (_, crl) = <x509_parser::revocation_list::CertificateRevocationList<'_> as x509_parser::prelude::FromDer<
        '_,
        _,
    >>::from_der(&crl_der)
    .unwrap();
    let listed: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| medfleet_core::digest::hex(r.raw_serial()))
        .collect();
    assert!(
        listed.contains(&issued.serial) && listed.contains(&renewed.serial),
        "{listed:?}"
    );

    // Re-provisioning: a new token gives a new, working certificate.
    let (third, _) = server.enroll(&token(&mut api, &device).await, "").await.unwrap();
    open_session(server.channel_for(&third).await.unwrap(), &device.id)
        .await
        .unwrap();

    // Operators renew the same way.
    let admin_channel = server.channel(&server.admin_bundle()).await.unwrap();
    let (_, csr_der) = medfleet_proto::client::new_key_and_csr().unwrap();
    let renewed_admin = CredentialServiceClient::new(admin_channel)
        .renew(v1::RenewRequest { csr_der })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed_admin.identity, "medfleet://user/admin");
}
both_backends!(renewal_and_revocation_take_effect_at_once, renewal_and_revocation);

async fn http_get_bytes(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("headers") + 4;
    assert!(response.starts_with(b"HTTP/1.0 200") || response.starts_with(b"HTTP/1.1 200"));
    response[split..].to_vec()
}

async fn replicas(backend: Backend) {
    let storage = Storage::new(backend).await;
    let a = TestServer::start_on(storage.config()).await;
    let b = TestServer::start_on(storage.config()).await;
    let mut api = a.admin().await;
    let device = register(&mut api, "SN-1").await;
    let (bundle, _) = a.enroll(&token(&mut api, &device).await, "").await.unwrap();
    // The device is connected to replica B; the revocation goes through replica A.
    let (mut session, _keep) = open_session(b.channel_for(&bundle).await.unwrap(), &device.id)
        .await
        .unwrap();
    api.revoke_device(v1::RevokeDeviceRequest {
        id: device.id.clone(),
        reason: v1::RevocationReason::KeyCompromise.into(),
    })
    .await
    .unwrap();
    let started = Instant::now();
    assert_cut(&mut session, started, "session on the other replica").await;
    assert_refused(&b, &bundle, "handshake on the other replica").await;
    assert!(!http_get_bytes(b.http_addr, "/crl").await.is_empty());
}
/// Replicas share PostgreSQL (SQLite is the single-node embedded default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_other_replicas_on_postgres() {
    if medfleet_e2e::skip_postgres() {
        return;
    }
    replicas(Backend::Postgres).await;
}

async fn expired_device_certificate(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut api = server.admin().await;
    let device = register(&mut api, "SN-1").await;
    let identity = medfleet_core::identity::Identity::Device(uuid::Uuid::parse_str(&device.id).unwrap());
    let now = std::time::SystemTime::now();
    let expired = server
        .ca()
        .issue_client_for_window(&identity, now - Duration::from_hours(2), now - Duration::from_hours(1))
        .unwrap();
    let bundle = Bundle {
        key_pem: expired.key_pem,
        cert_pem: expired.cert_pem,
        ca_pem: expired.ca_pem,
    };
    // A device that stopped renewing falls off by itself: no session, no renewal.
    assert_refused(&server, &bundle, "expired device certificate").await;
}
both_backends!(expired_device_certificate_is_refused, expired_device_certificate);
