//! Stand-ins for the hospital's systems, as independent of medfleet as a test can make them: a FHIR server that
//! implements conditional create and update on `Observation.identifier`, and an HL7 v2 MLLP receiver that ACKs.
//! Both count what they receive by identifier, so a test can prove "exactly once per chart entry".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// What a FHIR receiver holds.
#[derive(Debug, Default)]
pub struct FhirLog {
    /// Creations per Observation identifier: more than one is a duplicate chart entry.
    pub created: HashMap<String, usize>,
    /// Requests per identifier (creations and matches): more than one means the entry was sent again.
    pub requests: HashMap<String, usize>,
    /// Current status per identifier.
    pub status: HashMap<String, String>,
    /// Bundles received (also written to `dir` for the Python validator).
    pub bundles: usize,
    /// Requests still to answer with 503 (to exercise retries).
    pub fail_next: usize,
    /// The Authorization header of every request, in arrival order ("" when there was none).
    pub authorizations: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct FhirReceiver {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<FhirLog>>,
    pub dir: PathBuf,
    pub changed: Arc<tokio::sync::Notify>,
    /// The bearer token every request must carry (401 otherwise); none: any request is taken.
    bearer: Arc<Mutex<Option<String>>>,
}

#[derive(Clone)]
struct FhirState {
    log: Arc<Mutex<FhirLog>>,
    dir: PathBuf,
    changed: Arc<tokio::sync::Notify>,
}

fn identifier_of(query: &str) -> Option<String> {
    // "identifier=system|value" (from ifNoneExist or the conditional URL).
    let query = query.split_once('?').map_or(query, |(_, q)| q);
    let value = query.strip_prefix("identifier=")?;
    Some(value.split_once('|').map_or(value, |(_, v)| v).to_owned())
}

async fn transaction(State(state): State<FhirState>, body: axum::body::Bytes) -> (StatusCode, String) {
    let Ok(bundle) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON".into());
    };
    let mut log = state.log.lock().unwrap();
    if log.fail_next > 0 {
        log.fail_next -= 1;
        drop(log);
        // Waiters learn of the refusal too (a test waits for "the receiver was down for that one").
        state.changed.notify_waiters();
        return (StatusCode::SERVICE_UNAVAILABLE, "try later".into());
    }
    log.bundles += 1;
    let file = state.dir.join(format!("bundle-{:05}.json", log.bundles));
    std::fs::write(&file, &body).unwrap();
    let mut responses = Vec::new();
    for entry in bundle["entry"].as_array().cloned().unwrap_or_default() {
        let request = &entry["request"];
        let method = request["method"].as_str().unwrap_or_default();
        let key = match method {
            "POST" => request["ifNoneExist"].as_str().and_then(identifier_of),
            "PUT" => request["url"].as_str().and_then(identifier_of),
            _ => None,
        };
        let Some(key) = key else {
            return (StatusCode::BAD_REQUEST, "unconditional request".into());
        };
        let status = entry["resource"]["status"].as_str().unwrap_or_default().to_owned();
        *log.requests.entry(key.clone()).or_default() += 1;
        let exists = log.created.contains_key(&key);
        match (method, exists) {
            // Conditional create that matches: nothing is created (the idempotent case).
            ("POST", true) => responses.push(serde_json::json!({"response": {"status": "200 OK"}})),
            (_, false) => {
                *log.created.entry(key.clone()).or_default() += 1;
                log.status.insert(key, status);
                responses.push(serde_json::json!({"response": {"status": "201 Created"}}));
            }
            (_, true) => {
                log.status.insert(key, status);
                responses.push(serde_json::json!({"response": {"status": "200 OK"}}));
            }
        }
    }
    drop(log);
    state.changed.notify_waiters();
    let reply = serde_json::json!({"resourceType": "Bundle", "type": "transaction-response", "entry": responses});
    (StatusCode::OK, reply.to_string())
}

/// TLS material for a receiver that requires mutual TLS: its own CA, server certificate (localhost) and a
/// client certificate for medfleet, all fresh for the test.
#[derive(Debug, Clone)]
pub struct HospitalPki {
    pub ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl HospitalPki {
    pub fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Hospital Integration CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = rcgen::CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert_pem, server_key_pem) =
            leaf(vec!["localhost".into()], rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert_pem, client_key_pem) = leaf(
            vec!["medfleet.hospital.example".into()],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        Self {
            ca_pem: ca_cert.pem(),
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
        }
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let chain = vec![rustls::pki_types::CertificateDer::from_pem_slice(self.server_cert_pem.as_bytes()).unwrap()];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes()).unwrap();
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

impl Default for HospitalPki {
    fn default() -> Self {
        Self::new()
    }
}

impl FhirReceiver {
    pub async fn start(dir: &Path) -> Self {
        Self::serve(dir, None).await
    }

    /// A receiver on https that requires a client certificate from `pki`'s CA and a bearer token.
    pub async fn start_tls(dir: &Path, pki: &HospitalPki, bearer: &str) -> Self {
        Self::serve(dir, Some((pki.acceptor(), bearer.to_owned()))).await
    }

    async fn serve(dir: &Path, tls: Option<(tokio_rustls::TlsAcceptor, String)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(FhirLog::default()));
        let changed = Arc::new(tokio::sync::Notify::new());
        let state = FhirState {
            log: log.clone(),
            dir: dir.to_owned(),
            changed: changed.clone(),
        };
        let bearer = Arc::new(Mutex::new(tls.as_ref().map(|(_, token)| token.clone())));
        let (required, seen, notify) = (bearer.clone(), log.clone(), changed.clone());
        let app = axum::Router::new()
            .route("/fhir", axum::routing::post(transaction))
            .with_state(state)
            .layer(axum::middleware::from_fn(
                move |request: axum::extract::Request, next: axum::middleware::Next| {
                    let presented = request
                        .headers()
                        .get(axum::http::header::AUTHORIZATION)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_default();
                    seen.lock().unwrap().authorizations.push(presented.clone());
                    let authorised = required
                        .lock()
                        .unwrap()
                        .as_ref()
                        .is_none_or(|token| presented == format!("Bearer {token}"));
                    let notify = notify.clone();
                    async move {
                        if authorised {
                            next.run(request).await
                        } else {
                            notify.notify_waiters();
                            axum::response::IntoResponse::into_response(StatusCode::UNAUTHORIZED)
                        }
                    }
                },
            ));
        match tls {
            None => {
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app).await;
                });
            }
            Some((acceptor, _)) => {
                tokio::spawn(async move {
                    while let Ok((socket, _)) = listener.accept().await {
                        let (acceptor, app) = (acceptor.clone(), app.clone());
                        tokio::spawn(async move {
                            // A client without an acceptable certificate fails here.
                            let Ok(stream) = acceptor.accept(socket).await else {
                                return;
                            };
                            let service = hyper_util::service::TowerToHyperService::new(app);
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
            }
        }
        Self {
            addr,
            log,
            dir: dir.to_owned(),
            changed,
            bearer,
        }
    }

    /// From now on, requests must carry this bearer token (none: any request is taken).
    pub fn require_bearer(&self, token: Option<&str>) {
        *self.bearer.lock().unwrap() = token.map(str::to_owned);
    }

    /// The https base URL (as a TLS receiver's certificate names it).
    pub fn tls_base_url(&self) -> String {
        format!("https://localhost:{}/fhir", self.addr.port())
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/fhir", self.addr)
    }

    /// Waits until `done` holds for the log; re-checked on every request. The timeout only bounds a broken run.
    pub async fn wait(&self, what: &str, done: impl Fn(&FhirLog) -> bool) {
        wait_on(&self.changed, what, || done(&self.log.lock().unwrap())).await;
    }
}

/// What an MLLP receiver holds.
#[derive(Debug, Default)]
pub struct MllpLog {
    /// Messages per MSH-10: a resend of one message arrives with the same control id.
    pub by_control_id: HashMap<String, usize>,
    /// The raw messages, in arrival order.
    pub messages: Vec<String>,
    /// Messages still to answer with AE (to exercise retries).
    pub reject_next: usize,
    /// Messages still to answer with AR (a permanent refusal: dead-lettered).
    pub refuse_next: usize,
}

#[derive(Debug, Clone)]
pub struct MllpReceiver {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<MllpLog>>,
    pub changed: Arc<tokio::sync::Notify>,
}

fn field(message: &str, segment: &str, index: usize) -> String {
    message
        .split('\r')
        .find(|s| s.starts_with(segment))
        .and_then(|s| s.split('|').nth(if segment == "MSH" { index - 1 } else { index }))
        .unwrap_or_default()
        .to_owned()
}

impl MllpReceiver {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(MllpLog::default()));
        let changed = Arc::new(tokio::sync::Notify::new());
        let (accept_log, accept_changed) = (log.clone(), changed.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (log, changed) = (accept_log.clone(), accept_changed.clone());
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 8192];
                    loop {
                        // One complete block: 0x0B … 0x1C 0x0D.
                        let end = buffer.windows(2).position(|w| w == [0x1c, 0x0d]);
                        if let (Some(start), Some(end)) = (buffer.iter().position(|b| *b == 0x0b), end) {
                            let message = String::from_utf8_lossy(&buffer[start + 1..end]).into_owned();
                            buffer.drain(..end + 2);
                            let control = field(&message, "MSH", 10);
                            let code = {
                                let mut log = log.lock().unwrap();
                                log.messages.push(message.clone());
                                if log.refuse_next > 0 {
                                    log.refuse_next -= 1;
                                    "AR"
                                } else if log.reject_next > 0 {
                                    log.reject_next -= 1;
                                    "AE"
                                } else {
                                    *log.by_control_id.entry(control.clone()).or_default() += 1;
                                    "AA"
                                }
                            };
                            let ack = format!(
                                "MSH|^~\\&|EMR|HOSP|MEDFLEET|HOSP|20270101000000||ACK^R01^ACK|A{control}|P|2.6\rMSA|{code}|{control}\r"
                            );
                            let mut framed = vec![0x0b];
                            framed.extend_from_slice(ack.as_bytes());
                            framed.extend_from_slice(&[0x1c, 0x0d]);
                            if socket.write_all(&framed).await.is_err() {
                                return;
                            }
                            changed.notify_waiters();
                            continue;
                        }
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        Self { addr, log, changed }
    }

    pub async fn wait(&self, what: &str, done: impl Fn(&MllpLog) -> bool) {
        wait_on(&self.changed, what, || done(&self.log.lock().unwrap())).await;
    }
}

async fn wait_on(changed: &tokio::sync::Notify, what: &str, done: impl Fn() -> bool) {
    let wait = async {
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done() {
                return;
            }
            notified.await;
        }
    };
    assert!(
        tokio::time::timeout(std::time::Duration::from_mins(2), wait)
            .await
            .is_ok(),
        "{what}: not reached within 120 s"
    );
}

/// The Python interpreter of the validators' virtualenv (`MEDFLEET_TEST_PYTHON`, or `target/test-venv`, created
/// on first use from tests/python/requirements.txt).
pub fn python() -> PathBuf {
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VENV.get_or_init(|| {
        if let Ok(path) = std::env::var("MEDFLEET_TEST_PYTHON") {
            return PathBuf::from(path);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let venv = root.join("target/test-venv");
        let python = venv.join("bin/python");
        if !python.exists() {
            let created = std::process::Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .expect("python3 is needed for the validators");
            assert!(created.success(), "python3 -m venv failed");
            let installed = std::process::Command::new(&python)
                .args(["-m", "pip", "install", "-q", "-r"])
                .arg(root.join("tests/python/requirements.txt"))
                .status()
                .expect("pip");
            assert!(installed.success(), "installing the Python validators failed");
        }
        python
    })
    .clone()
}

/// Runs the independent validator over files; returns one JSON value per validated item.
pub fn validate(kind: &str, files: &[PathBuf]) -> Vec<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/validate.py");
    let output = std::process::Command::new(python())
        .arg(script)
        .arg(kind)
        .args(files)
        .output()
        .expect("run the validator");
    assert!(
        output.status.success(),
        "the {kind} validator refused medfleet's output:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("validator output is JSON"))
        .collect()
}
