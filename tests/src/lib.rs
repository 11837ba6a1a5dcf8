//! End-to-end test harness: starts real `medfleetd` servers (in-process `run` on 127.0.0.1:0, or the built
//! binaries) with a fresh CA and data directory, on SQLite (a temp file) or PostgreSQL (a fresh database per test,
//! dropped afterwards), and talks to them over real mTLS.
//!
//! PostgreSQL comes from `MEDFLEET_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`). A test
//! that cannot reach it fails; set `MEDFLEET_TEST_SKIP_POSTGRES=1` to skip the PostgreSQL half knowingly (CI never
//! does).

#![allow(clippy::missing_panics_doc, clippy::unwrap_used, clippy::expect_used)]

pub mod fleet;
pub mod receivers;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use medfleet_core::identity::Identity;
use medfleet_proto::v1::registry_service_client::RegistryServiceClient;
use medfleet_server::identity::data_dir::DataDir;
use medfleet_server::identity::pki::{CertificateAuthority, CredentialBundle};
use medfleet_server::settings::{Overrides, Settings, SettingsFile};
use medfleet_server::{Listeners, ServeError};
use sea_orm::{ConnectionTrait as _, Database, DatabaseConnection, EntityTrait as _};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Runs one async test body against each backend: `both_backends!(name, body_fn);` where
/// `async fn body_fn(backend: Backend)`.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$body($crate::Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if $crate::skip_postgres() {
                    return;
                }
                super::$body($crate::Backend::Postgres).await;
            }
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// True only when the developer explicitly opted out of PostgreSQL; CI must never set it.
pub fn skip_postgres() -> bool {
    let skip = std::env::var("MEDFLEET_TEST_SKIP_POSTGRES").is_ok_and(|v| v == "1");
    assert!(
        !(skip && std::env::var("CI").is_ok()),
        "MEDFLEET_TEST_SKIP_POSTGRES is set in CI: PostgreSQL tests must run there"
    );
    if skip {
        eprintln!("skipping the PostgreSQL variant: MEDFLEET_TEST_SKIP_POSTGRES=1");
    }
    skip
}

fn pg_admin_url() -> String {
    std::env::var("MEDFLEET_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A PostgreSQL database that exists for one test and is dropped (even after a panic) when this is dropped.
#[derive(Debug)]
pub struct PgDatabase {
    name: String,
    pub url: String,
}

impl PgDatabase {
    pub async fn create() -> Self {
        let admin_url = pg_admin_url();
        let admin = Database::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!(
                "cannot reach PostgreSQL at {admin_url}: {e}. Start it (the README says how), point \
                 MEDFLEET_TEST_PG_URL at one, or set MEDFLEET_TEST_SKIP_POSTGRES=1 to skip knowingly"
            )
        });
        let name = format!("medfleet_test_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        admin.close().await.ok();
        let base = admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(b, _)| b);
        Self {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop may run inside a runtime (or during a panic): do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                if let Ok(admin) = Database::connect(&pg_admin_url()).await {
                    let _ = admin
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                    let _ = admin.close().await;
                }
            });
            Ok::<(), std::io::Error>(())
        })
        .join();
    }
}

/// One running medfleetd replica.
#[derive(Debug)]
pub struct TestServer {
    pub config: Settings,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ServeError>>>,
    /// The temp dir and database this server owns (dropped with it), if it was started by [`TestServer::start`].
    storage: Option<Storage>,
}

/// Where and on what a test server keeps its state; shared by replicas of one test.
#[derive(Debug)]
pub struct Storage {
    pub dir: tempfile::TempDir,
    pub database_url: String,
    /// Held so the database lives as long as the storage.
    pub pg: Option<PgDatabase>,
}

impl Storage {
    pub async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (database_url, pg) = match backend {
            Backend::Sqlite => (
                format!("sqlite://{}?mode=rwc", dir.path().join("medfleet.db").display()),
                None,
            ),
            Backend::Postgres => {
                let pg = PgDatabase::create().await;
                (pg.url.clone(), Some(pg))
            }
        };
        Self { dir, database_url, pg }
    }

    /// A configuration on this storage with ephemeral loopback ports.
    pub fn config(&self) -> Settings {
        let overrides = Overrides {
            data_dir: Some(self.dir.path().join("data")),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            database_url: Some(self.database_url.clone()),
            database_max_connections: Some(4),
            shutdown_grace: Some("5s".into()),
            ..Overrides::default()
        };
        Settings::resolve(SettingsFile::default(), overrides).expect("test config")
    }
}

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        let storage = Storage::new(backend).await;
        let config = storage.config();
        let mut server = Self::start_on(config).await;
        server.storage = Some(storage);
        server
    }

    /// Starts a replica with the given configuration (initialising its data dir if needed).
    pub async fn start_on(config: Settings) -> Self {
        medfleet_server::ensure_initialised(&config, "admin").expect("init data dir");
        let grpc = TcpListener::bind(config.listen).await.expect("bind grpc");
        let http = TcpListener::bind(config.http_listen).await.expect("bind http");
        let grpc_addr = grpc.local_addr().unwrap();
        let http_addr = http.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(medfleet_server::run(
            config.clone(),
            Listeners { grpc, http },
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            config,
            grpc_addr,
            http_addr,
            shutdown: Some(tx),
            handle: Some(handle),
            storage: None,
        }
    }

    /// Waits until the server answers a health check over mTLS, i.e. it has migrated the database and serves.
    /// (gRPC clients need not call this: their connection waits in the listen backlog until then.)
    pub async fn wait_ready(&self) {
        let channel = self.channel(&self.admin_bundle()).await.expect("admin channel");
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("health check");
    }

    pub fn storage(&self) -> Option<&Storage> {
        self.storage.as_ref()
    }

    pub fn data_dir(&self) -> DataDir {
        DataDir::new(&self.config.data_dir)
    }

    /// The secrets keyring this server seals with (its `secrets_key_file`).
    pub fn keyring(&self) -> medfleet_core::secrets::Keyring {
        medfleet_server::identity::secrets::load(&self.config.secrets_key_file).expect("load the secrets keyring")
    }

    pub fn ca(&self) -> CertificateAuthority {
        self.data_dir().load_ca(&self.keyring()).expect("load CA")
    }

    /// The CA's private key (PEM), opened from its sealed file (for tests that sign with it directly).
    pub fn ca_key_pem(&self) -> String {
        let sealed = std::fs::read_to_string(self.data_dir().ca_key_sealed()).expect("read the sealed CA key");
        let pem = medfleet_core::secrets::open(&self.keyring(), "ca.key", sealed.trim()).expect("open the CA key");
        String::from_utf8(pem).expect("PEM")
    }

    /// Credentials for `identity` from this server's CA, valid for an hour.
    pub fn issue(&self, identity: &Identity) -> CredentialBundle {
        self.ca()
            .issue_client(identity, Duration::from_hours(1))
            .expect("issue client certificate")
    }

    pub fn admin_bundle(&self) -> CredentialBundle {
        bundle_from_file(&self.data_dir().admin_bundle())
    }

    /// The address as clients outside the test use it (the certificate names `localhost`).
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.grpc_addr.port())
    }

    /// An mTLS channel presenting `bundle`, connected to this server.
    pub async fn channel(&self, bundle: &CredentialBundle) -> Result<Channel, tonic::transport::Error> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&bundle.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&bundle.cert_pem, &bundle.key_pem))
            .domain_name("localhost");
        self.endpoint(tls)?.connect().await
    }

    /// An endpoint to this server with arbitrary TLS settings (for refusal tests).
    pub fn endpoint(&self, tls: ClientTlsConfig) -> Result<Endpoint, tonic::transport::Error> {
        Ok(Endpoint::from_shared(format!("https://{}", self.grpc_addr))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30)))
    }

    /// Enrolls a device with the real `medfleet-agent enroll` (its own key and CSR, the one-time `token`) into a
    /// new state directory, ready for `medfleet-agent run`.
    pub async fn enroll_agent(&self, token: &str) -> tempfile::TempDir {
        let state = tempfile::tempdir().expect("state dir");
        let enrolled = tokio::process::Command::new(binary("medfleet-agent"))
            .args(["enroll", "--server", &self.url(), "--ca"])
            .arg(self.data_dir().ca_cert())
            .args(["--token", token, "--state-dir"])
            .arg(state.path())
            .output()
            .await
            .expect("run medfleet-agent enroll");
        assert!(enrolled.status.success(), "medfleet-agent enroll: {enrolled:?}");
        state
    }

    /// Enrolls a device with `token` over an anonymous (server-authenticated) channel, as a device would.
    pub async fn enroll(
        &self,
        token: &str,
        expected_device_id: &str,
    ) -> Result<(medfleet_proto::client::Bundle, medfleet_proto::v1::CertificateResponse), tonic::Status> {
        let (key_pem, csr_der) = medfleet_proto::client::new_key_and_csr().expect("key and CSR");
        let response = self
            .enroll_raw(medfleet_proto::v1::EnrollRequest {
                token: token.to_owned(),
                csr_der,
                expected_device_id: expected_device_id.to_owned(),
            })
            .await?;
        let bundle = medfleet_proto::client::Bundle::parse(&format!("{key_pem}{}", response.certificate_chain_pem))
            .expect("issued bundle");
        Ok((bundle, response))
    }

    /// Sends an `Enroll` request as is, without a client certificate.
    pub async fn enroll_raw(
        &self,
        request: medfleet_proto::v1::EnrollRequest,
    ) -> Result<medfleet_proto::v1::CertificateResponse, tonic::Status> {
        let ca = self.ca().cert_pem().to_owned();
        let channel = medfleet_proto::client::connect_anonymous(&self.url(), &ca)
            .await
            .expect("anonymous channel");
        medfleet_proto::v1::enrollment_service_client::EnrollmentServiceClient::new(channel)
            .enroll(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// A channel presenting a device's (or anyone's) bundle.
    pub async fn channel_for(&self, bundle: &medfleet_proto::client::Bundle) -> Result<Channel, String> {
        medfleet_proto::client::connect(&self.url(), bundle)
            .await
            .map_err(|e| e.to_string())
    }

    pub async fn admin(&self) -> RegistryServiceClient<Channel> {
        RegistryServiceClient::new(self.channel(&self.admin_bundle()).await.expect("admin channel"))
    }

    pub async fn db(&self) -> DatabaseConnection {
        Database::connect(&self.config.database_url)
            .await
            .expect("test db connection")
    }

    /// Every registry row, for "nothing changed" assertions.
    pub async fn snapshot(&self) -> serde_json::Value {
        use medfleet_server::persistence::entity::{device, device_tag, site, ward};
        let db = self.db().await;
        let value = serde_json::json!({
            "sites": site::Entity::find().into_json().all(&db).await.unwrap(),
            "wards": ward::Entity::find().into_json().all(&db).await.unwrap(),
            "devices": device::Entity::find().into_json().all(&db).await.unwrap(),
            "tags": device_tag::Entity::find().into_json().all(&db).await.unwrap(),
        });
        db.close().await.ok();
        value
    }

    /// Asks the server to shut down and waits for it to finish draining.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(handle) => handle.await.expect("server task panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn bundle_from_file(path: &Path) -> CredentialBundle {
    let text = std::fs::read_to_string(path).expect("read bundle");
    let pem = |label: &str, nth: usize| -> String {
        let begin = format!("-----BEGIN {label}-----");
        let end = format!("-----END {label}-----");
        let start = text.match_indices(&begin).nth(nth).expect("pem block").0;
        let stop = text[start..].find(&end).expect("pem end") + start + end.len();
        format!("{}\n", &text[start..stop])
    };
    CredentialBundle {
        key_pem: pem("PRIVATE KEY", 0),
        cert_pem: pem("CERTIFICATE", 0),
        ca_pem: pem("CERTIFICATE", 1),
    }
}

/// Path of a binary built from this workspace (`cargo build --workspace --bins` builds them; the README's test
/// command does that first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // A test runs from target/debug/deps/<test>, the bench from target/release/<bench>: the binaries sit in
    // target/<profile>/.
    let here = exe.parent().expect("target dir");
    let path = [here.join(name), here.parent().expect("target dir").join(name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| here.join(name));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests (the README's test command does)",
        path.display()
    );
    path
}

/// A plain HTTP/1.0 GET against the operations listener: (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect ops listener");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("HTTP status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The single number a `SELECT COUNT(*) …` (or any one-integer query) answers, straight from the database.
pub async fn count_rows(db: &DatabaseConnection, sql: &str) -> i64 {
    use sea_orm::ConnectionTrait as _;
    db.query_one_raw(sea_orm::Statement::from_string(db.get_database_backend(), sql))
        .await
        .expect("count query")
        .expect("a count row")
        .try_get_by_index::<i64>(0)
        .expect("an integer count")
}
