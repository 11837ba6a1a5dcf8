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

/// A running `medfleetd serve` with its output captured line by line.
struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    grpc_port: u16,
}

impl Daemon {
    async fn start(data_dir: &Path, database_url: &str) -> Self {
        Self::start_with(data_dir, database_url, &[]).await
    }

    async fn start_with(data_dir: &Path, database_url: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(binary("medfleetd"))
            .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args(["--log-format", "json", "--log-level", "info", "--shutdown-grace", "5s"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--database-url", database_url])
            .args(extra)
            .env_remove("MEDFLEET_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn medfleetd");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = tokio::sync::oneshot::channel();
        let mut port_tx = Some(port_tx);
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut readers = Vec::new();
        {
            let lines = lines.clone();
            readers.push(tokio::spawn(async move {
                let mut stdout = stdout;
                while let Ok(Some(line)) = stdout.next_line().await {
                    if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line)
                        && json["fields"]["message"] == "medfleetd serving"
                        && let Some(tx) = port_tx.take()
                    {
                        let addr = json["fields"]["grpc"].as_str().unwrap_or_default().to_owned();
                        let _ = tx.send(addr);
                    }
                    lines.lock().unwrap().push(line);
                }
            }));
        }
        {
            let lines = lines.clone();
            readers.push(tokio::spawn(async move {
                let mut stderr = stderr;
                while let Ok(Some(line)) = stderr.next_line().await {
                    lines.lock().unwrap().push(line);
                }
            }));
        }
        // The timeout only bounds a broken start; the server's own log line is the synchronisation.
        let addr = tokio::time::timeout(Duration::from_mins(1), port_rx)
            .await
            .expect("medfleetd did not report that it is serving within 60 s")
            .expect("medfleetd exited before serving");
        let grpc_port = addr.rsplit(':').next().unwrap().parse().unwrap();
        Self {
            child,
            lines,
            readers,
            grpc_port,
        }
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    async fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().expect("pid").to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
        assert!(killed.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("medfleetd did not stop within 30 s of SIGTERM")
            .unwrap();
        // The readers end at EOF, once the exited process's pipes are drained.
        for reader in std::mem::take(&mut self.readers) {
            reader.await.unwrap();
        }
        (status, self.output())
    }
}

struct CliRun {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn cli(port: u16, credentials: &Path, args: &[&str]) -> CliRun {
    let output = Command::new(binary("medfleet"))
        .arg("--server")
        .arg(format!("https://localhost:{port}"))
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
        &[
            "devices",
            "register",
            "--manufacturer",
            "Philips",
            "--model",
            "MX450",
            "--serial",
            "SN-1",
            "--class",
            "patient-monitor",
            "--location",
            "stmarys/icu/1",
            "--tag",
            "asset=A-1",
            "-o",
            "json",
        ],
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
    let dup = cli(
        port,
        &creds,
        &[
            "devices",
            "register",
            "--manufacturer",
            "Philips",
            "--model",
            "MX450",
            "--serial",
            "SN-1",
            "--class",
            "other",
        ],
    )
    .await;
    assert_eq!(dup.code, 5, "{}", dup.stderr);
    assert!(dup.stderr.contains("already registered"), "{}", dup.stderr);
    let bad = cli(
        port,
        &creds,
        &[
            "devices",
            "register",
            "--manufacturer",
            "Philips",
            "--model",
            "MX450",
            "--serial",
            "bad serial",
            "--class",
            "other",
        ],
    )
    .await;
    assert_eq!(bad.code, 3, "{}", bad.stderr);
    assert!(bad.stderr.contains("serial_number:"), "{}", bad.stderr);
    let missing = cli(port, &creds, &["sites", "show", "nowhere"]).await;
    assert_eq!(missing.code, 4, "{}", missing.stderr);
    let usage = cli(port, &creds, &["devices", "list", "--ward", "icu"]).await;
    assert_eq!(usage.code, 2, "{}", usage.stderr);
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
    let ca_key = data_dir.join("ca/ca.key");
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
    for private in ["ca/ca.key", "tls/server.key", "admin.pem"] {
        let mode = std::fs::metadata(data.join(private)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{private}");
    }
    let bundle = medfleet_e2e::bundle_from_file(&data.join("admin.pem"));
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(bundle.cert_pem.as_bytes()).unwrap();
    let _: &rustls::pki_types::CertificateDer<'_> = &der;
    assert_eq!(
        medfleet_server::pki::identity_of(&der).unwrap(),
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
