//! The built binaries end to end: `medfleetd serve` initialising a fresh data dir, the `medfleet` CLI against it
//! (output formats, exit codes, error messages), SIGTERM shutdown, secrets kept out of logs, `medfleetd init`, and
//! refusal to start with a world-readable CA key.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medfleet_e2e::{Backend, Storage, binary, both_backends};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// A child process with stdout and stderr captured line by line; tests wait on what it prints.
pub(crate) struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    changed: Arc<tokio::sync::Notify>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Process {
    pub(crate) fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn process");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let changed = Arc::new(tokio::sync::Notify::new());
        let mut readers = Vec::new();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        for mut source in [Box::new(stdout) as Box<dyn LineSource>, Box::new(stderr)] {
            let (lines, changed) = (lines.clone(), changed.clone());
            readers.push(tokio::spawn(async move {
                while let Some(line) = source.next().await {
                    lines.lock().unwrap().push(line);
                    changed.notify_waiters();
                }
                changed.notify_waiters();
            }));
        }
        Self {
            child,
            lines,
            changed,
            readers,
        }
    }

    pub(crate) fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub(crate) fn count(&self, needle: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `count` lines contain `needle`. The timeout only bounds a broken run.
    pub(crate) async fn wait_for(&self, needle: &str, count: usize) {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.count(needle) >= count {
                    return;
                }
                notified.await;
            }
        };
        assert!(
            tokio::time::timeout(Duration::from_mins(1), wait).await.is_ok(),
            "no {count}x '{needle}' within 60 s; output so far:\n{}",
            self.output()
        );
    }

    /// SIGKILL: the process gets no chance to flush or drain anything.
    pub(crate) async fn kill(mut self) -> String {
        self.child.kill().await.expect("SIGKILL");
        for reader in self.readers.drain(..) {
            let _ = reader.await;
        }
        self.output()
    }

    pub(crate) async fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().expect("pid").to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
        assert!(killed.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the process did not stop within 30 s of SIGTERM")
            .unwrap();
        // The readers end at EOF, once the exited process's pipes are drained.
        for reader in std::mem::take(&mut self.readers) {
            reader.await.unwrap();
        }
        (status, self.output())
    }
}

/// Lines from stdout or stderr.
#[tonic::async_trait]
trait LineSource: Send {
    async fn next(&mut self) -> Option<String>;
}

#[tonic::async_trait]
impl<R: tokio::io::AsyncBufRead + Unpin + Send> LineSource for tokio::io::Lines<R> {
    async fn next(&mut self) -> Option<String> {
        self.next_line().await.ok().flatten()
    }
}

/// A running `medfleetd serve` (JSON logs) and the gRPC port it reported.
pub(crate) struct Daemon {
    pub(crate) process: Process,
    pub(crate) grpc_port: u16,
}

impl Daemon {
    async fn start(data_dir: &Path, database_url: &str) -> Self {
        Self::start_with(data_dir, database_url, &[]).await
    }

    async fn start_with(data_dir: &Path, database_url: &str, extra: &[&str]) -> Self {
        Self::start_on(data_dir, database_url, "127.0.0.1:0", extra).await
    }

    /// Starts on `listen` (a restarted replica takes its predecessor's port, so running agents find it again).
    pub(crate) async fn start_on(data_dir: &Path, database_url: &str, listen: &str, extra: &[&str]) -> Self {
        let mut command = Command::new(binary("medfleetd"));
        command
            .args(["serve", "--listen", listen, "--http-listen", "127.0.0.1:0"])
            .args(["--log-format", "json", "--log-level", "info", "--shutdown-grace", "5s"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--database-url", database_url])
            .args(extra)
            .env_remove("MEDFLEET_CONFIG");
        let process = Process::spawn(command);
        process.wait_for("medfleetd serving", 1).await;
        let line = process
            .lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("medfleetd serving"))
            .cloned()
            .unwrap();
        let json: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        let addr = json["fields"]["grpc"].as_str().expect("grpc address").to_owned();
        let grpc_port = addr.rsplit(':').next().unwrap().parse().unwrap();
        Self { process, grpc_port }
    }

    pub(crate) fn output(&self) -> String {
        self.process.output()
    }

    pub(crate) async fn terminate(self) -> (std::process::ExitStatus, String) {
        self.process.terminate().await
    }
}

struct CliRun {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn cli(port: u16, credentials: &Path, args: &[&str]) -> CliRun {
    cli_at(&format!("https://localhost:{port}"), credentials, args).await
}

/// The CLI run with `--server` as given, well-formed or not.
async fn cli_at(server: &str, credentials: &Path, args: &[&str]) -> CliRun {
    let output = Command::new(binary("medfleet"))
        .args(["--server", server])
        .arg("--credentials")
        .arg(credentials)
        .args(args)
        .env_remove("MEDFLEET_SERVER")
        .output()
        .await
        .expect("run medfleet");
    CliRun {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `medfleet devices register` of a Philips MX450 with `serial` and `class`, then `extra`.
fn register<'a>(serial: &'a str, class: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "devices",
        "register",
        "--manufacturer",
        "Philips",
        "--model",
        "MX450",
        "--serial",
        serial,
        "--class",
        class,
    ];
    args.extend_from_slice(extra);
    args
}

fn ok(run: &CliRun) -> serde_json::Value {
    assert_eq!(run.code, 0, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    serde_json::from_str(&run.stdout).unwrap_or(serde_json::Value::Null)
}

async fn daemon_and_cli(backend: Backend) {
    let storage = Storage::new(backend).await;
    let data_dir = storage.dir.path().join("fresh");
    let daemon = Daemon::start(&data_dir, &storage.database_url).await;
    let creds = data_dir.join("admin.pem");
    assert!(
        daemon.output().contains(&creds.display().to_string()),
        "serve must say where the admin credentials are"
    );
    assert_eq!(std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777, 0o600);
    let port = daemon.grpc_port;

    ok(&cli(
        port,
        &creds,
        &["sites", "create", "stmarys", "--display-name", "St Mary's"],
    )
    .await);
    ok(&cli(
        port,
        &creds,
        &[
            "wards",
            "create",
            "stmarys/icu",
            "--display-name",
            "ICU",
            "--beds",
            "1,2",
        ],
    )
    .await);
    let registered = ok(&cli(
        port,
        &creds,
        &register(
            "SN-1",
            "patient-monitor",
            &["--location", "stmarys/icu/1", "--tag", "asset=A-1", "-o", "json"],
        ),
    )
    .await);
    let id = registered["id"].as_str().unwrap().to_owned();
    assert_eq!(registered["state"], "registered");
    assert_eq!(registered["bed"], "1");

    let listed = ok(&cli(
        port,
        &creds,
        &["devices", "list", "--site", "stmarys", "--ward", "icu", "-o", "json"],
    )
    .await);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    let table = cli(port, &creds, &["devices", "list"]).await;
    assert_eq!(table.code, 0);
    assert!(
        table.stdout.contains(&id) && table.stdout.contains("stmarys/icu/1"),
        "{}",
        table.stdout
    );

    let moved = ok(&cli(
        port,
        &creds,
        &["devices", "update", &id, "--location", "stmarys/icu/2", "-o", "json"],
    )
    .await);
    assert_eq!(moved["bed"], "2");
    assert_eq!(
        ok(&cli(port, &creds, &["devices", "show", &id, "-o", "json"]).await)["bed"],
        "2"
    );

    // Exit codes scripts rely on, with messages that say what is wrong.
    let dup = cli(port, &creds, &register("SN-1", "other", &[])).await;
    assert_eq!(dup.code, 5, "{}", dup.stderr);
    assert!(dup.stderr.contains("already registered"), "{}", dup.stderr);
    let bad = cli(port, &creds, &register("bad serial", "other", &[])).await;
    assert_eq!(bad.code, 3, "{}", bad.stderr);
    assert!(bad.stderr.contains("serial_number:"), "{}", bad.stderr);
    let missing = cli(port, &creds, &["sites", "show", "nowhere"]).await;
    assert_eq!(missing.code, 4, "{}", missing.stderr);
    let usage = cli(port, &creds, &["devices", "list", "--ward", "icu"]).await;
    assert_eq!(usage.code, 2, "{}", usage.stderr);
    // Invalid input is 3 whether the server or the CLI finds it: a document that is not JSON, a server address
    // without its https:// scheme.
    let not_json = storage.dir.path().join("not.json");
    std::fs::write(&not_json, r#"{"limits": "#).unwrap();
    let bad_json = cli(port, &creds, &["config", "set", "--fleet", not_json.to_str().unwrap()]).await;
    assert_eq!(bad_json.code, 3, "{}", bad_json.stderr);
    assert!(bad_json.stderr.contains("is not valid JSON"), "{}", bad_json.stderr);
    let no_scheme = cli_at(&format!("localhost:{port}"), &creds, &["sites", "list"]).await;
    assert_eq!(no_scheme.code, 3, "{}", no_scheme.stderr);
    assert!(no_scheme.stderr.contains("https://"), "{}", no_scheme.stderr);
    // A ward or bed that does not exist is not found, though medfleetd refuses the placement as a precondition; a
    // precondition that is a conflict stays one.
    let no_ward = cli(
        port,
        &creds,
        &register("SN-2", "patient-monitor", &["--location", "stmarys/cardiology"]),
    )
    .await;
    assert_eq!(no_ward.code, 4, "{}", no_ward.stderr);
    assert!(no_ward.stderr.contains("does not exist"), "{}", no_ward.stderr);
    let no_bed = cli(port, &creds, &["devices", "update", &id, "--location", "stmarys/icu/9"]).await;
    assert_eq!(no_bed.code, 4, "{}", no_bed.stderr);
    assert!(no_bed.stderr.contains("no bed '9'"), "{}", no_bed.stderr);
    let occupied = cli(port, &creds, &["wards", "update", "stmarys/icu", "--beds", "1"]).await;
    assert_eq!(occupied.code, 5, "{}", occupied.stderr);
    assert!(occupied.stderr.contains("hold devices"), "{}", occupied.stderr);
    let bad_class = cli(
        port,
        &creds,
        &[
            "devices",
            "register",
            "--manufacturer",
            "a",
            "--model",
            "b",
            "--serial",
            "c",
            "--class",
            "toaster",
        ],
    )
    .await;
    assert_eq!(bad_class.code, 2);
    assert!(
        bad_class.stderr.contains("patient-monitor"),
        "lists the valid classes: {}",
        bad_class.stderr
    );
    let no_creds = cli(port, &data_dir.join("nope.pem"), &["sites", "list"]).await;
    assert_eq!(no_creds.code, 1);
    assert!(no_creds.stderr.contains("--credentials"), "{}", no_creds.stderr);
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let unreachable = cli(closed_port, &creds, &["sites", "list"]).await;
    assert_eq!(unreachable.code, 7, "{}", unreachable.stderr);
    assert!(
        unreachable.stderr.contains("cannot reach medfleetd"),
        "{}",
        unreachable.stderr
    );
    let help = cli(port, &creds, &["devices", "register", "--help"]).await;
    assert_eq!(help.code, 0);
    assert!(help.stdout.contains("Example"), "{}", help.stdout);

    let (status, logs) = daemon.terminate().await;
    assert!(
        status.success(),
        "medfleetd exited with {status} after SIGTERM:\n{logs}"
    );
    assert!(logs.contains("shutting down"), "{logs}");
    assert!(logs.contains("medfleetd stopped"), "{logs}");
    assert!(!logs.contains("PRIVATE KEY"), "a private key reached the logs");
    assert!(
        logs.contains("device registered"),
        "handlers log their state changes: {logs}"
    );

    // A CA key that other users can read stops the server before it serves anything.
    let ca_key = data_dir.join("ca/ca.key.enc");
    std::fs::set_permissions(&ca_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = Command::new(binary("medfleetd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--database-url", &storage.database_url])
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
}
both_backends!(daemon_and_cli_end_to_end, daemon_and_cli);

#[tokio::test]
async fn init_creates_credentials_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |admin: &'static str| {
        Command::new(binary("medfleetd"))
            .args(["init", "--server-name", "localhost,medfleet.example", "--admin", admin])
            .arg("--data-dir")
            .arg(&data)
            .output()
    };
    let first = run("alice").await.unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    for private in ["ca/ca.key.enc", "secrets.key", "tls/server.key", "admin.pem"] {
        let mode = std::fs::metadata(data.join(private)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{private}");
    }
    let bundle = medfleet_e2e::bundle_from_file(&data.join("admin.pem"));
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(bundle.cert_pem.as_bytes()).unwrap();
    let _: &rustls::pki_types::CertificateDer<'_> = &der;
    assert_eq!(
        medfleet_server::identity::pki::identity_of(&der).unwrap(),
        medfleet_core::identity::Identity::User("alice".into())
    );

    let second = run("bob").await.unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already initialised"));

    let bad_name = Command::new(binary("medfleetd"))
        .args(["init", "--admin", "Not Valid"])
        .arg("--data-dir")
        .arg(dir.path().join("other"))
        .output()
        .await
        .unwrap();
    assert!(!bad_name.status.success());
    assert!(!dir.path().join("other").exists(), "a refused init left files behind");
}

/// `medfleetd rotate-secrets-key`: a new first key with the old one kept; `--retire-unused` keeps a key something
/// is still sealed with (here the CA key, until a start re-encrypts it) and drops it once nothing is; a sealed CA
/// key without its keyring stops the server with the key id to restore.
#[tokio::test]
async fn secrets_key_rotation_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let medfleetd = |args: &[&str]| {
        let mut command = Command::new(binary("medfleetd"));
        command
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .env_remove("MEDFLEET_CONFIG");
        command.output()
    };
    let init = medfleetd(&["init"]).await.unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    assert!(String::from_utf8_lossy(&init.stderr).contains("secrets keyring (0600)"));
    let keys = || medfleet_server::identity::secrets::load(&data.join("secrets.key")).unwrap();
    let first = keys().current().id().to_owned();

    let rotated = medfleetd(&["rotate-secrets-key"]).await.unwrap();
    let stderr = String::from_utf8_lossy(&rotated.stderr);
    assert!(rotated.status.success(), "{stderr}");
    let second = keys().current().id().to_owned();
    assert_eq!(keys().ids(), [second.as_str(), first.as_str()]);
    assert!(
        stderr.contains(&second) && stderr.contains("--retire-unused"),
        "{stderr}"
    );

    // The CA key is still sealed under the first key: it stays.
    let kept = medfleetd(&["rotate-secrets-key", "--retire-unused"]).await.unwrap();
    let stderr = String::from_utf8_lossy(&kept.stderr);
    assert!(kept.status.success(), "{stderr}");
    assert!(
        stderr.contains("no old key retired") && stderr.contains(&format!("still used: {first}")),
        "{stderr}"
    );
    assert_eq!(keys().ids().len(), 2);

    // A start re-encrypts it (the step `serve` runs first); then the first key can go.
    let keyring = medfleet_server::identity::secrets::Secrets::new(keys());
    medfleet_server::identity::data_dir::DataDir::new(&data)
        .protect_ca_key(&keyring)
        .unwrap();
    let retired = medfleetd(&["rotate-secrets-key", "--retire-unused"]).await.unwrap();
    let stderr = String::from_utf8_lossy(&retired.stderr);
    assert!(
        retired.status.success() && stderr.contains(&format!("retired {first}")),
        "{stderr}"
    );
    assert_eq!(keys().ids(), [second.as_str()]);

    // Without its keyring, a sealed CA key stops the server and says which key to restore.
    std::fs::remove_file(data.join("secrets.key")).unwrap();
    let refused = medfleetd(&["serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("does not exist") && stderr.contains(&second),
        "{stderr}"
    );
    assert!(!data.join("secrets.key").exists(), "a new keyring was made up");
    let recreate = medfleetd(&["rotate-secrets-key"]).await.unwrap();
    assert!(
        !recreate.status.success(),
        "a new keyring was made up for a sealed CA key"
    );
    assert!(String::from_utf8_lossy(&recreate.stderr).contains(&second));

    // An install from before sealing gets its keyring from the command, as the service user, before it starts.
    let fresh = tempfile::tempdir().unwrap();
    let keyring = fresh.path().join("keys/secrets.key");
    let created = Command::new(binary("medfleetd"))
        .args(["rotate-secrets-key", "--data-dir"])
        .arg(fresh.path().join("data"))
        .arg("--secrets-key-file")
        .arg(&keyring)
        .env_remove("MEDFLEET_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    assert_eq!(
        medfleet_server::identity::secrets::load(&keyring).unwrap().ids().len(),
        1
    );
}

/// A minimal OTLP/gRPC collector that records what medfleetd exports.
mod collector {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
    use tonic::{Request, Response, Status};

    /// An exported span: its name and its attributes as `key=value` strings.
    pub(crate) type Span = (String, Vec<String>);

    #[derive(Clone, Default)]
    pub(crate) struct Received {
        pub(crate) spans: Arc<Mutex<Vec<Span>>>,
        pub(crate) metrics: Arc<Mutex<Vec<String>>>,
    }

    #[tonic::async_trait]
    impl TraceService for Received {
        async fn export(
            &self,
            request: Request<ExportTraceServiceRequest>,
        ) -> Result<Response<ExportTraceServiceResponse>, Status> {
            let mut spans = self.spans.lock().unwrap();
            for resource in &request.get_ref().resource_spans {
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        let attributes = span
                            .attributes
                            .iter()
                            .map(|kv| format!("{}={:?}", kv.key, kv.value))
                            .collect();
                        spans.push((span.name.clone(), attributes));
                    }
                }
            }
            Ok(Response::new(ExportTraceServiceResponse::default()))
        }
    }

    #[tonic::async_trait]
    impl MetricsService for Received {
        async fn export(
            &self,
            request: Request<ExportMetricsServiceRequest>,
        ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
            let mut metrics = self.metrics.lock().unwrap();
            for resource in &request.get_ref().resource_metrics {
                for scope in &resource.scope_metrics {
                    metrics.extend(scope.metrics.iter().map(|m| m.name.clone()));
                }
            }
            Ok(Response::new(ExportMetricsServiceResponse::default()))
        }
    }

    /// Serves the collector on a loopback port; returns its endpoint URL.
    pub(crate) async fn start(received: Received) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(received.clone()))
                .add_service(MetricsServiceServer::new(received))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }
}

#[tokio::test]
async fn otlp_exports_traces_and_metrics() {
    let received = collector::Received::default();
    let endpoint = collector::start(received.clone()).await;
    let storage = Storage::new(Backend::Sqlite).await;
    let data_dir = storage.dir.path().join("otlp");
    let daemon = Daemon::start_with(&data_dir, &storage.database_url, &["--otlp-endpoint", &endpoint]).await;
    let creds = data_dir.join("admin.pem");
    ok(&cli(
        daemon.grpc_port,
        &creds,
        &["sites", "create", "otlp", "--display-name", "OTLP"],
    )
    .await);
    // SIGTERM flushes the span batch and the final metric collection to the collector.
    let (status, logs) = daemon.terminate().await;
    assert!(status.success(), "{logs}");

    let spans = received.spans.lock().unwrap().clone();
    let rpc = spans
        .iter()
        .find(|(name, attributes)| name == "rpc" && attributes.iter().any(|a| a.contains("RegistryService/CreateSite")))
        .unwrap_or_else(|| panic!("no rpc span for CreateSite was exported: {spans:?}"));
    assert!(rpc.1.iter().any(|a| a.starts_with("request_id=")), "{rpc:?}");
    assert!(
        spans.iter().any(|(name, _)| name == "create_site"),
        "handler span missing: {spans:?}"
    );
    let metrics = received.metrics.lock().unwrap().clone();
    assert!(metrics.iter().any(|m| m == "medfleet_rpc_requests"), "{metrics:?}");
    assert!(metrics.iter().any(|m| m == "medfleet_rpc_duration"), "{metrics:?}");
}

async fn identity_with_binaries(backend: Backend) {
    let storage = Storage::new(backend).await;
    let data_dir = storage.dir.path().join("server");
    let daemon = Daemon::start(&data_dir, &storage.database_url).await;
    let port = daemon.grpc_port;
    let url = format!("https://localhost:{port}");
    let admin = data_dir.join("admin.pem");
    let work = storage.dir.path();

    ok(&cli(
        port,
        &admin,
        &["sites", "create", "stmarys", "--display-name", "St Mary's"],
    )
    .await);
    ok(&cli(
        port,
        &admin,
        &[
            "wards",
            "create",
            "stmarys/icu",
            "--display-name",
            "ICU",
            "--beds",
            "1,2,3",
        ],
    )
    .await);

    // Bulk registration with tokens.
    let csv_path = work.join("devices.csv");
    std::fs::write(
        &csv_path,
        "manufacturer,model,serial_number,device_class,eui64,location,tags\n\
         Philips,MX450,SN-1,patient-monitor,00-12-A3-FF-FE-00-00-01,stmarys/icu/1,asset=A-1\n\
         Philips,MX450,SN-2,patient-monitor,,stmarys/icu/2,\n\
         BD,Alaris 8015,SN-3,infusion-pump,,stmarys/icu,owner=biomed;asset=A-3\n",
    )
    .unwrap();
    let tokens_path = work.join("tokens.csv");
    let imported = ok(&cli(
        port,
        &admin,
        &[
            "devices",
            "import",
            csv_path.to_str().unwrap(),
            "--tokens-out",
            tokens_path.to_str().unwrap(),
            "-o",
            "json",
        ],
    )
    .await);
    assert_eq!(imported["imported"], 3);
    assert_eq!(
        std::fs::metadata(&tokens_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let tokens: Vec<Vec<String>> = std::fs::read_to_string(&tokens_path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_owned).collect())
        .collect();
    assert_eq!(tokens.len(), 3);
    let (device_1, token_1) = (tokens[0][0].clone(), tokens[0][3].clone());

    // A bad row is caught before anything is sent.
    let bad_csv = work.join("bad.csv");
    std::fs::write(
        &bad_csv,
        "manufacturer,model,serial_number,device_class,eui64,location,tags\nPhilips,MX450,SN-9,toaster,,,\n",
    )
    .unwrap();
    let bad = cli(port, &admin, &["devices", "import", bad_csv.to_str().unwrap()]).await;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("line 2"), "{}", bad.stderr);
    // A row placing a device in a ward that does not exist: the batch is refused, and the ward is not found.
    let no_ward_csv = work.join("no-ward.csv");
    std::fs::write(
        &no_ward_csv,
        "manufacturer,model,serial_number,device_class,eui64,location,tags\n\
         Philips,MX450,SN-8,patient-monitor,,stmarys/cardiology,\n",
    )
    .unwrap();
    let no_ward = cli(port, &admin, &["devices", "import", no_ward_csv.to_str().unwrap()]).await;
    assert_eq!(no_ward.code, 4, "{}", no_ward.stderr);
    assert!(no_ward.stderr.contains("does not exist"), "{}", no_ward.stderr);

    // Operators and integrations.
    let alice = work.join("alice.pem");
    ok(&cli(
        port,
        &admin,
        &["users", "create", "alice", "--out", alice.to_str().unwrap()],
    )
    .await);
    assert_eq!(std::fs::metadata(&alice).unwrap().permissions().mode() & 0o777, 0o600);
    // Deny by default: alice can do nothing until granted a role.
    let denied = cli(port, &alice, &["devices", "list"]).await;
    assert_eq!(denied.code, 6, "{}", denied.stderr);
    assert!(denied.stderr.contains("device:read"), "{}", denied.stderr);
    ok(&cli(
        port,
        &admin,
        &["access", "grant", "alice", "biomed", "--scope", "stmarys"],
    )
    .await);
    let check = ok(&cli(
        port,
        &admin,
        &[
            "access",
            "check",
            "alice",
            "read",
            "device",
            "--scope",
            "stmarys/icu",
            "-o",
            "json",
        ],
    )
    .await);
    assert_eq!(check["allowed"], true, "{check}");
    let check = ok(&cli(
        port,
        &admin,
        &[
            "access",
            "check",
            "alice",
            "update",
            "device",
            "--scope",
            "stmarys/icu",
            "-o",
            "json",
        ],
    )
    .await);
    assert_eq!(check["allowed"], false, "{check}");
    let grants = ok(&cli(port, &admin, &["access", "list", "alice", "-o", "json"]).await);
    assert_eq!(grants[0]["role"], "biomed");
    let listed = ok(&cli(port, &alice, &["devices", "list", "-o", "json"]).await);
    assert_eq!(listed.as_array().unwrap().len(), 3);
    let before = ok(&cli(port, &alice, &["credentials", "renew", "-o", "json"]).await);
    let after = ok(&cli(port, &alice, &["credentials", "renew", "-o", "json"]).await);
    assert_ne!(before["serial"], after["serial"], "renewal issues a new certificate");
    ok(&cli(port, &alice, &["sites", "list", "-o", "json"]).await);
    let epic = work.join("epic.pem");
    ok(&cli(
        port,
        &admin,
        &["services", "create", "epic", "--out", epic.to_str().unwrap()],
    )
    .await);
    let denied = cli(port, &epic, &["devices", "list"]).await;
    assert_eq!(denied.code, 6, "{}", denied.stderr);

    // The agent enrolls with its token (its key never leaves its state dir) and holds a session.
    let ca = data_dir.join("ca/ca.crt");
    let state = work.join("agent-1");
    let enroll = |token: String, state: std::path::PathBuf, expected: String| {
        let (url, ca) = (url.clone(), ca.clone());
        async move {
            Command::new(binary("medfleet-agent"))
                .args(["enroll", "--server", &url, "--token", &token, "--device-id", &expected])
                .arg("--ca")
                .arg(&ca)
                .arg("--state-dir")
                .arg(&state)
                .output()
                .await
                .unwrap()
        }
    };
    let wrong = enroll(tokens[1][3].clone(), work.join("agent-wrong"), tokens[2][0].clone()).await;
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("another device"));
    let enrolled = enroll(token_1.clone(), state.clone(), device_1.clone()).await;
    assert!(
        enrolled.status.success(),
        "{}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    assert_eq!(
        std::fs::metadata(state.join("identity.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        ok(&cli(port, &admin, &["devices", "show", &device_1, "-o", "json"]).await)["state"],
        "enrolled"
    );

    let mut run = Command::new(binary("medfleet-agent"));
    run.args(["run", "--heartbeat", "1s", "--renew-after", "1s"])
        .arg("--state-dir")
        .arg(&state);
    let agent = Process::spawn(run);
    agent.wait_for("session established", 1).await;
    assert_eq!(
        ok(&cli(port, &admin, &["devices", "show", &device_1, "-o", "json"]).await)["state"],
        "active"
    );
    // Renewal in the background, then a new session with the new certificate.
    agent.wait_for("certificate renewed", 1).await;
    agent.wait_for("session established", 2).await;

    // Revoking the device ends its session; the agent keeps retrying and is refused.
    ok(&cli(
        port,
        &admin,
        &["devices", "revoke", &device_1, "--reason", "compromised", "-o", "json"],
    )
    .await);
    // The session is cut, and reconnecting with the revoked certificate fails too.
    agent.wait_for("session failed", 2).await;
    let (status, agent_logs) = agent.terminate().await;
    assert!(status.success(), "{agent_logs}");

    // Operators are revoked the same way; nobody revokes themselves.
    ok(&cli(
        port,
        &admin,
        &[
            "users",
            "revoke",
            "alice",
            "--reason",
            "affiliation-changed",
            "-o",
            "json",
        ],
    )
    .await);
    assert_ne!(
        cli(port, &alice, &["sites", "list"]).await.code,
        0,
        "a revoked operator still connects"
    );
    let roles = ok(&cli(port, &admin, &["access", "list", "alice", "-o", "json"]).await);
    assert_eq!(
        roles.as_array().map(Vec::len),
        Some(0),
        "a revoked operator keeps no roles: {roles}"
    );
    let myself = cli(port, &admin, &["users", "revoke", "admin"]).await;
    assert_eq!(myself.code, 5, "{}", myself.stderr);

    let (status, logs) = daemon.terminate().await;
    assert!(status.success(), "{logs}");
    let enroll_output = format!(
        "{}{}{}{}",
        String::from_utf8_lossy(&enrolled.stdout),
        String::from_utf8_lossy(&enrolled.stderr),
        String::from_utf8_lossy(&wrong.stdout),
        String::from_utf8_lossy(&wrong.stderr)
    );
    for (name, text) in [
        ("medfleetd", &logs),
        ("medfleet-agent run", &agent_logs),
        ("medfleet-agent enroll", &enroll_output),
    ] {
        assert!(!text.contains("PRIVATE KEY"), "a private key reached the {name} logs");
        for row in &tokens {
            assert!(!text.contains(&row[3]), "an enrollment token reached the {name} logs");
        }
    }
    assert!(
        logs.contains("device enrolled") && logs.contains("certificate renewed"),
        "{logs}"
    );
}
both_backends!(identity_lifecycle_through_the_binaries, identity_with_binaries);
