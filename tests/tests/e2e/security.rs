//! Who may connect and call what: mTLS refusals (no certificate, foreign CA, expired, not yet valid, TLS 1.2),
//! certificates without a medfleet identity, and non-operator identities on operator RPCs; and the server's own
//! certificate, renewed on a running replica.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use medfleet_core::identity::Identity;
use medfleet_e2e::{Backend, Storage, TestServer, both_backends, http_get};
use medfleet_proto::v1::{self, registry_service_client::RegistryServiceClient};
use medfleet_server::identity::pki::{CertificateAuthority, CredentialBundle, not_after_of, serial_of};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

fn tls_with(bundle: Option<&CredentialBundle>, trust_pem: &str) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(trust_pem))
        .domain_name("localhost");
    match bundle {
        Some(b) => tls.identity(tonic::transport::Identity::from_pem(&b.cert_pem, &b.key_pem)),
        None => tls,
    }
}

/// Asserts that the server refuses this TLS client: either the connection fails or the first RPC does with a
/// transport-level status (never a served response).
async fn assert_refused(server: &TestServer, tls: ClientTlsConfig, what: &str) {
    let Ok(channel) = server.endpoint(tls).unwrap().connect().await else {
        return;
    };
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect_err(what);
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        ),
        "{what}: unexpected {status:?}"
    );
}

fn failed_handshakes(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("medfleet_tls_handshakes_total") && l.contains("outcome=\"failed\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn mtls_refusals(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ca_pem = server.ca().cert_pem().to_owned();
    let admin = server.admin_bundle();

    // Control: the admin's credentials work on this very server.
    let mut health = HealthClient::new(server.channel(&admin).await.unwrap());
    let reply = health.check(HealthCheckRequest::default()).await.unwrap().into_inner();
    assert_eq!(reply.status(), ServingStatus::Serving);

    // Without a certificate the TLS handshake completes (devices must reach Enroll), but nothing else answers.
    let anonymous = server
        .endpoint(tls_with(None, &ca_pem))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = HealthClient::new(anonymous.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = RegistryServiceClient::new(anonymous.clone())
        .list_sites(v1::ListSitesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // Refusals of callers without a certificate are logged and counted, never written to the audit trail: nobody
    // can fill it without credentials.
    {
        use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _};
        let db = server.db().await;
        let anonymous_rows = medfleet_server::persistence::entity::audit_log::Entity::find()
            .filter(medfleet_server::persistence::entity::audit_log::Column::Actor.eq("anonymous"))
            .all(&db)
            .await
            .unwrap();
        assert!(anonymous_rows.is_empty(), "{anonymous_rows:?}");
    }
    let status = medfleet_proto::v1::credential_service_client::CredentialServiceClient::new(anonymous)
        .renew(v1::RenewRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let (foreign_ca, _) = CertificateAuthority::generate("somebody else").unwrap();
    let foreign = foreign_ca
        .issue_client(&Identity::User("admin".into()), Duration::from_hours(1))
        .unwrap();
    assert_refused(
        &server,
        tls_with(Some(&foreign), &ca_pem),
        "a certificate from another CA",
    )
    .await;

    let now = SystemTime::now();
    let hour = Duration::from_hours(1);
    let ca = server.ca();
    let expired = ca
        .issue_client_for_window(&Identity::User("admin".into()), now - 2 * hour, now - hour)
        .unwrap();
    assert_refused(&server, tls_with(Some(&expired), &ca_pem), "an expired certificate").await;
    let early = ca
        .issue_client_for_window(&Identity::User("admin".into()), now + hour, now + 2 * hour)
        .unwrap();
    assert_refused(&server, tls_with(Some(&early), &ca_pem), "a not-yet-valid certificate").await;

    // TLS 1.2 is refused even with valid credentials.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_slice(admin.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(admin.key_pem.as_bytes()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(server.grpc_addr).await.unwrap();
    let tls12 = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    assert!(tls12.is_err(), "a TLS 1.2 handshake succeeded");

    // With TLS 1.3 the client may see its refusal before the server has finished recording it, so the counter is
    // awaited (bounded) rather than read once.
    let mut metrics = String::new();
    let counted = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            metrics = http_get(server.http_addr, "/metrics").await.1;
            if failed_handshakes(&metrics) >= 4 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        counted.is_ok(),
        "the server did not count the refused handshakes:\n{metrics}"
    );
}
both_backends!(mtls_refuses_bad_clients, mtls_refusals);

async fn identities(backend: Backend) {
    let server = TestServer::start(backend).await;

    // A certificate from our CA that names no medfleet identity: authenticated TLS, but no principal.
    let ca_key = server.ca_key_pem();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(server.ca().cert_pem(), rcgen::KeyPair::from_pem(&ca_key).unwrap()).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["anonymous.example".to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let anonymous = CredentialBundle {
        key_pem: key.serialize_pem(),
        cert_pem: cert.pem(),
        ca_pem: server.ca().cert_pem().to_owned(),
    };
    let mut api = RegistryServiceClient::new(server.channel(&anonymous).await.unwrap());
    let status = api.list_sites(v1::ListSitesRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = HealthClient::new(server.channel(&anonymous).await.unwrap())
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // Devices and services are authenticated but may not call operator RPCs.
    let before = server.snapshot().await;
    for identity in [Identity::Device(uuid::Uuid::new_v4()), Identity::Service("epic".into())] {
        let bundle = server.issue(&identity);
        let channel = server.channel(&bundle).await.unwrap();
        let mut api = RegistryServiceClient::new(channel.clone());
        let status = api
            .create_site(v1::CreateSiteRequest {
                site: Some(v1::Site {
                    name: "stmarys".into(),
                    display_name: "St Mary's".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{identity}: {status:?}");
        assert!(status.message().contains(identity.kind()), "{}", status.message());
        let status = api.list_devices(v1::ListDevicesRequest::default()).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        // ...while the health service answers any authenticated identity.
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving);
    }
    assert_eq!(server.snapshot().await, before);

    // Another operator (not the bootstrap admin) is denied by default, until granted a role.
    let operator = server.issue(&Identity::User("biomed-alice".into()));
    let mut api = RegistryServiceClient::new(server.channel(&operator).await.unwrap());
    let status = api.list_sites(v1::ListSitesRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("site:read"),
        "names the missing permission: {}",
        status.message()
    );
    let mut access = medfleet_proto::v1::access_service_client::AccessServiceClient::new(
        server.channel(&server.admin_bundle()).await.unwrap(),
    );
    access
        .grant(v1::GrantRequest {
            grant: Some(v1::RoleGrant {
                principal: "medfleet://user/biomed-alice".into(),
                role: "biomed".into(),
                scope: "*".into(),
            }),
        })
        .await
        .unwrap();
    api.list_sites(v1::ListSitesRequest::default()).await.unwrap();
}
both_backends!(identity_rules, identities);

/// A connection whose client certificate expires is closed at notAfter (the handshake checked validity once),
/// the way a revoked one is cut: a long-lived stream does not outlive its credential.
async fn connections_close_when_the_certificate_expires(backend: Backend) {
    let server = TestServer::start(backend).await;
    let not_after = SystemTime::now() + Duration::from_secs(3);
    let bundle = server
        .ca()
        .issue_client_for_window(
            &Identity::User("shortlived".into()),
            SystemTime::now() - Duration::from_mins(1),
            not_after,
        )
        .unwrap();
    let channel = server.channel(&bundle).await.unwrap();
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    // The watch never ends by itself while the server serves: only the cut ends it.
    let ended = tokio::time::timeout(Duration::from_mins(1), watch.message())
        .await
        .expect("the stream of an expired certificate was not closed");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    assert!(
        SystemTime::now() + Duration::from_secs(1) >= not_after,
        "closed at expiry (notAfter has second precision), not before"
    );
}

both_backends!(
    connections_close_when_the_certificate_expires,
    connections_close_when_the_certificate_expires
);

/// Connections without a client certificate are capped per client address: past the cap they are closed at
/// once, while a device's readings keep being acknowledged; the limits and the refusals show in /metrics.
async fn anonymous_connections_past_the_cap_are_shed(backend: Backend) {
    let server = TestServer::start(backend).await;
    server.wait_ready().await;
    let admin = server.admin_bundle();
    let anonymous_tls = || tls_with(None, &admin.ca_pem);
    // Hold the admitted ones open (as stalled enrollments would) while opening more.
    let mut held = Vec::new();
    let (mut served, mut shed) = (0, 0);
    for _ in 0..medfleet_server::transport::tls::MAX_ANONYMOUS_PER_ADDRESS + 4 {
        let Ok(channel) = server.endpoint(anonymous_tls()).unwrap().connect().await else {
            shed += 1;
            continue;
        };
        match HealthClient::new(channel.clone())
            .check(HealthCheckRequest::default())
            .await
        {
            // Served (and refused by the access rules: health needs an identity) means admitted.
            Err(status) if status.code() == Code::Unauthenticated => {
                served += 1;
                held.push(channel);
            }
            Ok(_) => panic!("an anonymous health check was answered"),
            Err(_) => shed += 1,
        }
    }
    assert_eq!(
        served,
        medfleet_server::transport::tls::MAX_ANONYMOUS_PER_ADDRESS,
        "{served} admitted, {shed} shed"
    );
    assert_eq!(shed, 4);
    // A device with a certificate is not affected: its readings are acknowledged.
    let device = crate::clinical::setup(&server).await;
    let channel = server
        .channel(&server.issue(&Identity::Device(device.parse().unwrap())))
        .await
        .unwrap();
    let mut publisher = crate::clinical::Publisher::open(channel).await;
    for sequence in 1..=5 {
        let at = chrono::Utc::now() - chrono::Duration::seconds(1);
        let ack = publisher
            .send(sequence, vec![crate::clinical::item("147842", 70.0, "/min", at)])
            .await;
        assert_eq!(ack.accepted, 1);
    }
    let (_, metrics) = http_get(server.http_addr, "/metrics").await;
    assert!(
        // At least the four shed (a client's own reconnect attempts count again).
        metrics
            .lines()
            .any(|l| l.starts_with("medfleet_connections_refused_total")
                && l.contains("anonymous_per_address")
                && l.rsplit(' ')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n >= 4)),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("medfleet_connection_limit") && l.contains("kind=\"anonymous_per_address\"")),
        "{metrics}"
    );
    drop(held);
}

both_backends!(
    anonymous_connections_past_the_cap_are_shed,
    anonymous_connections_past_the_cap_are_shed
);

/// The server certificate one handshake presented.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Presented {
    serial: String,
    not_after: SystemTime,
}

impl Presented {
    fn of(cert: &[u8]) -> Self {
        Self {
            serial: serial_of(cert).unwrap(),
            not_after: not_after_of(cert).unwrap(),
        }
    }
}

/// A TLS 1.3 client as the CLI is one: trusts only the medfleet CA, expects the name `localhost`, presents
/// `bundle`, speaks h2.
fn tls_client(bundle: &CredentialBundle) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(bundle.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_slice(bundle.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(bundle.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A verified handshake with `addr` (a certificate that does not chain to the CA, is expired or does not name
/// `localhost` fails it), and the server certificate it presented.
async fn handshake(
    addr: std::net::SocketAddr,
    client: &tokio_rustls::TlsConnector,
) -> std::io::Result<(tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Presented)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = client.connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
    let leaf = tls.get_ref().1.peer_certificates().and_then(<[_]>::first).unwrap();
    let presented = Presented::of(leaf);
    Ok((tls, presented))
}

fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// A replica whose server certificate lives seconds replaces it while running, two thirds into its life: new
/// handshakes get a new, valid certificate with a later notAfter, a connection opened before keeps working on its
/// old session, the data directory holds the new pair (what a restart serves), and /metrics exports its expiry.
async fn server_certificate_is_renewed_while_serving(backend: Backend) {
    let storage = Storage::new(backend).await;
    let mut config = storage.config();
    // Below what configuration files accept (1 h): the test sets the field directly, as it sets other values.
    let lifetime = Duration::from_secs(9);
    config.server_cert_lifetime = lifetime;
    let server = TestServer::start_on(config).await;
    let admin = server.admin_bundle();
    let client = tls_client(&admin);

    // A channel over one connection whose handshakes are recorded: it must not need a new one.
    let handshakes = Arc::new(Mutex::new(Vec::<Presented>::new()));
    let connector = {
        let (addr, client, handshakes) = (server.grpc_addr, client.clone(), handshakes.clone());
        tower::service_fn(move |_: http::Uri| {
            let (client, handshakes) = (client.clone(), handshakes.clone());
            async move {
                let (tls, presented) = handshake(addr, &client).await?;
                handshakes.lock().unwrap().push(presented);
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })
    };
    // TLS is done by the connector, so tonic sees plain http.
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let reply = health.check(HealthCheckRequest::default()).await.unwrap().into_inner();
    assert_eq!(reply.status(), ServingStatus::Serving);
    let before = handshakes.lock().unwrap()[0].clone();

    // New connections until one presents another certificate.
    let deadline = Instant::now() + Duration::from_mins(1);
    let renewed = loop {
        let (_, presented) = handshake(server.grpc_addr, &client)
            .await
            .expect("a handshake failed: the certificate presented did not verify");
        if presented.serial != before.serial {
            break presented;
        }
        assert!(
            Instant::now() < deadline,
            "the server certificate {} (lifetime {lifetime:?}) was not replaced within a minute",
            before.serial
        );
        // Pacing between attempts; the loop ends on what the handshake shows.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        renewed.not_after > before.not_after,
        "the new certificate expires later: {renewed:?} after {before:?}"
    );

    // The connection opened before the swap still serves calls, without a new handshake.
    let reply = health.check(HealthCheckRequest::default()).await.unwrap().into_inner();
    assert_eq!(reply.status(), ServingStatus::Serving);
    assert_eq!(*handshakes.lock().unwrap(), vec![before.clone()]);

    // The data directory holds the new pair. (The replica renews again every six seconds: a later certificate is
    // as good, the old one is not.)
    let dir = server.data_dir();
    let cert_pem = std::fs::read_to_string(dir.server_cert()).unwrap();
    let key_pem = std::fs::read_to_string(dir.server_key()).unwrap();
    let stored_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let stored = Presented::of(&stored_der);
    assert!(
        stored == renewed || (stored.serial != before.serial && stored.not_after > renewed.not_after),
        "stored {stored:?}, presented {renewed:?}, replaced {before:?}"
    );
    let (_, parsed) = x509_parser::parse_x509_certificate(&stored_der).unwrap();
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    assert_eq!(
        &*parsed.public_key().subject_public_key.data,
        key.public_key_raw(),
        "the stored key belongs to the stored certificate"
    );

    // Operators can alert on the expiry of the certificate in use.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = http_get(server.http_addr, "/metrics").await;
        let expiry = metric(&metrics, "medfleet_server_certificate_expiry_seconds");
        let renewals = metrics
            .lines()
            .find(|l| l.starts_with("medfleet_server_certificate_renewals_total") && l.contains("outcome=\"issued\""));
        if expiry.is_some_and(|e| e >= unix_seconds(renewed.not_after)) && renewals.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "no renewed expiry in /metrics:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await.unwrap();
}

both_backends!(
    server_certificate_is_renewed_while_serving,
    server_certificate_is_renewed_while_serving
);
