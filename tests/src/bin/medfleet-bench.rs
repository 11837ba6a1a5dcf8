//! `medfleet-bench`: performance scenarios against a real in-process medfleetd, each with a baseline measured in
//! the same run (see ../shared/bench.md). Prints a table; never asserts timings.
//!
//! Scenarios:
//! - `enroll`: N devices enroll sequentially, each as a device would (a new server-authenticated TLS connection,
//!   then `Enroll` with its token and CSR). Baseline: the CA work alone — verifying the same CSRs and signing
//!   their certificates with rcgen in a loop.
//! - `enforce`: the access decision with N users holding role grants on N sites/wards (2N+ policy rules): cache
//!   misses (every request new) against cache hits (the same requests again). Baseline: a `HashSet` lookup of the
//!   same (subject, scope) pairs — the floor any authorisation check has to pay.
//! - `config-fanout`: N simulated devices (the real `medfleet-agent simulate`, one process, each device with its
//!   own mTLS session) hold sessions; a ward configuration change is made and timed until every device has
//!   applied it and its report reached an operator's `WatchDevices` stream. Repeated `--runs` times; the median
//!   is the figure. Baseline: a tokio broadcast of the same document to N tasks that each answer on an mpsc
//!   channel, timed until every answer arrived.
//! - `emr-latency`: N simulated monitors (the real agent, each with its own mTLS stream and durable buffer),
//!   each associated with a patient, measure HR, SpO2, NIBP, temperature and RR every `--interval` for
//!   `--seconds`; a gRPC feed subscriber times each chart entry from the device's observation time to its arrival
//!   (p50/p99/max), and the durable ingest rate is the readings stored per second of streaming. Baseline: the same
//!   number of reading rows written by multi-row INSERTs in batches of the same size straight into an equivalent
//!   table (no validation, charting or outbox) — the database floor.
//! - `firmware`: K clients download one signed image at once over `ReadArtifact`. Baseline: the same bytes to K
//!   connections over bare TLS 1.3 (rustls, no HTTP/2, no gRPC, no database).
//! - `rollout`: N simulated devices (the real agent) take an image in a three-wave rollout: time to complete and
//!   the CPU seconds medfleetd (in this process) and the devices spent per device update.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_precision_loss)]

use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use medfleet_core::identity::Identity;
use medfleet_e2e::{Backend, TestServer, fleet};
use medfleet_proto::v1;
use medfleet_server::identity::pki::{SubjectDetails, check_csr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Enroll,
    Enforce,
    ConfigFanout,
    /// Readings from simulated monitors into the chart and out through a gRPC feed (`--interval`, `--seconds`).
    EmrLatency,
    /// `--devices` clients download one `--image-mib` signed image at once over gRPC; baseline: the same bytes
    /// over bare rustls TLS streams in the same run.
    Firmware,
    /// `--devices` simulated devices take a `--image-mib` image in a rollout of three waves; time to complete and
    /// CPU seconds per device update (no baseline: an absolute cost at a stated load).
    Rollout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backends {
    Sqlite,
    Postgres,
    Both,
}

/// Run medfleet performance scenarios with in-run baselines.
#[derive(Debug, Parser)]
#[command(after_help = "Example:\n  cargo run --release -p medfleet-e2e --bin medfleet-bench -- enroll --devices 1000")]
struct Args {
    scenario: Scenario,
    /// How many devices (enroll) or users with grants (enforce).
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    #[arg(long, value_enum, default_value = "both")]
    backend: Backends,
    /// Repetitions of a timed change (config-fanout).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// How often each simulated monitor measures (emr-latency), e.g. 1s or 20ms.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    interval: Duration,
    /// How long the monitors measure (emr-latency).
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Size of the firmware image (firmware).
    #[arg(long, default_value_t = 64)]
    image_mib: usize,
}

#[derive(Debug, Default)]
struct Stats {
    samples: Vec<Duration>,
}

impl Stats {
    fn push(&mut self, d: Duration) {
        self.samples.push(d);
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        // Nearest rank: the smallest sample with at least p% of the samples at or below it.
        let wanted = (sorted.len() as f64 * p / 100.0).ceil();
        let index = sorted
            .iter()
            .enumerate()
            .position(|(i, _)| (i + 1) as f64 >= wanted)
            .unwrap_or(0);
        sorted[index]
    }

    fn total(&self) -> Duration {
        self.samples.iter().sum()
    }

    fn per_second(&self) -> f64 {
        self.samples.len() as f64 / self.total().as_secs_f64()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn enforce(backend: Backend, users: usize) -> (Stats, Stats, Stats) {
    use medfleet_server::authz::access::{Access, Grant, insert_grant};
    let server = TestServer::start(backend).await;
    server.wait_ready().await;
    let db = server.db().await;
    let roles = ["biomed", "clinician", "it_provisioner", "auditor", "emr_system"];
    let grants: Vec<Grant> = (0..users)
        .flat_map(|i| {
            [
                Grant {
                    subject: format!("medfleet://user/u{i}"),
                    role: roles[i % roles.len()].to_owned(),
                    scope: format!("site{}", i % 50),
                },
                Grant {
                    subject: format!("medfleet://user/u{i}"),
                    role: roles[(i + 1) % roles.len()].to_owned(),
                    scope: format!("site{}/ward{}", (i + 7) % 50, i % 20),
                },
            ]
        })
        .collect();
    let txn = medfleet_server::persistence::db::begin_write(&db).await.expect("txn");
    for grant in &grants {
        insert_grant(&txn, grant).await.expect("grant");
    }
    txn.commit().await.expect("commit");
    let access = Access::load(db.clone()).await.expect("load policy");
    let requests: Vec<(String, String)> = (0..users)
        .map(|i| {
            (
                format!("medfleet://user/u{i}"),
                format!("site{}/ward{}", i % 50, i % 20),
            )
        })
        .collect();
    let mut misses = Stats::default();
    for (subject, scope) in &requests {
        let started = Instant::now();
        std::hint::black_box(access.allowing_scope(subject, scope, "device", "read"));
        misses.push(started.elapsed());
    }
    let mut hits = Stats::default();
    for (subject, scope) in &requests {
        let started = Instant::now();
        std::hint::black_box(access.allowing_scope(subject, scope, "device", "read"));
        hits.push(started.elapsed());
    }
    let set: std::collections::HashSet<(String, String)> =
        grants.iter().map(|g| (g.subject.clone(), g.scope.clone())).collect();
    let mut baseline = Stats::default();
    for (subject, scope) in &requests {
        let started = Instant::now();
        std::hint::black_box(set.contains(&(subject.clone(), scope.clone())));
        baseline.push(started.elapsed());
    }
    server.stop().await.expect("stop");
    (misses, hits, baseline)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

async fn enroll(backend: Backend, devices: usize) -> (Stats, Stats) {
    let server = TestServer::start(backend).await;
    let mut api = server.admin().await;
    let mut tokens = Vec::with_capacity(devices);
    for chunk in (0..devices).collect::<Vec<_>>().chunks(1000) {
        let requests = chunk
            .iter()
            .map(|i| fleet::monitor(&format!("BENCH-{i:06}"), "IntelliVue MX450"))
            .collect();
        let imported = api
            .import_devices(v1::ImportDevicesRequest {
                devices: requests,
                issue_tokens: true,
                token_ttl: None,
            })
            .await
            .expect("import")
            .into_inner();
        tokens.extend(imported.devices.into_iter().map(|d| d.token));
    }
    // Keys and CSRs are the device's own work, made before the clock starts.
    let csrs: Vec<Vec<u8>> = (0..devices)
        .map(|_| medfleet_proto::client::new_key_and_csr().expect("csr").1)
        .collect();

    let ca = server.ca();
    let url = server.url();
    let mut ours = Stats::default();
    for (token, csr) in tokens.iter().zip(&csrs) {
        let started = Instant::now();
        let channel = medfleet_proto::client::connect_anonymous(&url, ca.cert_pem())
            .await
            .expect("connect");
        v1::enrollment_service_client::EnrollmentServiceClient::new(channel)
            .enroll(v1::EnrollRequest {
                token: token.clone(),
                csr_der: csr.clone(),
                expected_device_id: String::new(),
            })
            .await
            .expect("enroll");
        ours.push(started.elapsed());
    }

    let mut baseline = Stats::default();
    for csr in &csrs {
        let started = Instant::now();
        let key = check_csr(csr).expect("csr");
        let identity = Identity::Device(uuid::Uuid::new_v4());
        ca.issue_for_key(&identity, &key, Duration::from_hours(24), &SubjectDetails::default())
            .expect("sign");
        baseline.push(started.elapsed());
    }
    server.stop().await.expect("stop");
    (ours, baseline)
}

/// Every device's reported digest, kept current from a `WatchDevices` stream.
struct Reports {
    stream: tonic::Streaming<v1::DeviceEvent>,
    digests: std::collections::HashMap<String, String>,
}

impl Reports {
    async fn until_all(&mut self, devices: usize, digest: &str) {
        let done =
            |d: &std::collections::HashMap<String, String>| d.len() == devices && d.values().all(|v| v == digest);
        while !done(&self.digests) {
            let event = tokio::time::timeout(Duration::from_mins(5), self.stream.message())
                .await
                .expect("no report within 5 minutes")
                .expect("watch")
                .expect("the watch ended");
            if let Some(device) = event.device
                && let Some(presence) = device.presence
                && presence.online
            {
                self.digests.insert(device.id, presence.reported_config_digest);
            }
        }
    }
}

async fn config_fanout(backend: Backend, devices: usize, runs: usize) -> (Stats, Stats) {
    let server = TestServer::start(backend).await;
    let mut admin = server.admin().await;
    fleet::create_site(&mut admin, "bench", "Bench").await;
    fleet::create_ward(&mut admin, "bench", "icu", "ICU", &[]).await;
    let channel = server.channel(&server.admin_bundle()).await.expect("admin");
    let mut configs = v1::config_service_client::ConfigServiceClient::new(channel.clone());
    let layer = Some(v1::ConfigLayer {
        kind: v1::ConfigLayerKind::Ward.into(),
        key: "bench/icu".into(),
    });
    let document = |run: usize| {
        format!(
            r#"{{"limits": {{"hr_high": {}, "spo2_low": 90}}, "sampling_hz": 1}}"#,
            120 + run
        )
    };
    configs
        .set_config(v1::SetConfigRequest {
            layer: layer.clone(),
            document_json: document(0),
            comment: "initial".into(),
        })
        .await
        .expect("set");
    let mut reports = Reports {
        stream: v1::registry_service_client::RegistryServiceClient::new(channel.clone())
            .watch_devices(v1::WatchDevicesRequest {
                initial: true,
                ..Default::default()
            })
            .await
            .expect("watch")
            .into_inner(),
        digests: std::collections::HashMap::new(),
    };
    let state = tempfile::tempdir().expect("state dir");
    let data = server.data_dir();
    let mut simulator = tokio::process::Command::new(medfleet_e2e::binary("medfleet-agent"))
        .args(["simulate", "--server", &server.url(), "--ca"])
        .arg(data.ca_cert())
        .arg("--state-dir")
        .arg(state.path())
        .args(["--devices", &devices.to_string(), "--admin"])
        .arg(data.admin_bundle())
        .args(["--model", "MX450", "--ward", "bench/icu", "--concurrency", "16"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("medfleet-agent simulate (build it: cargo build --release -p medfleet-agent)");
    let digest_of = |text: &str| medfleet_core::device_config::digest(&serde_json::from_str(text).expect("json"));
    reports.until_all(devices, &digest_of(&document(0))).await;

    let mut ours = Stats::default();
    for run in 1..=runs {
        let started = Instant::now();
        configs
            .set_config(v1::SetConfigRequest {
                layer: layer.clone(),
                document_json: document(run),
                comment: format!("run {run}"),
            })
            .await
            .expect("set");
        reports.until_all(devices, &digest_of(&document(run))).await;
        ours.push(started.elapsed());
    }
    let _ = simulator.kill().await;

    let mut baseline = Stats::default();
    for run in 1..=runs {
        let (tx, _) = tokio::sync::broadcast::channel::<std::sync::Arc<String>>(16);
        let (ack, mut acks) = tokio::sync::mpsc::channel::<usize>(devices);
        let mut tasks = Vec::with_capacity(devices);
        for i in 0..devices {
            let (mut rx, ack) = (tx.subscribe(), ack.clone());
            tasks.push(tokio::spawn(async move {
                if let Ok(doc) = rx.recv().await {
                    let _ = ack.send(i + doc.len()).await;
                }
            }));
        }
        drop(ack);
        let started = Instant::now();
        tx.send(std::sync::Arc::new(document(run))).expect("broadcast");
        let mut answered = 0;
        while answered < devices {
            acks.recv().await.expect("ack");
            answered += 1;
        }
        baseline.push(started.elapsed());
        for task in tasks {
            task.await.expect("task");
        }
    }
    server.stop().await.expect("stop");
    (ours, baseline)
}

struct Readings {
    latency: Stats,
    readings: u64,
    readings_per_second: f64,
    baseline_per_second: f64,
}

async fn emr_latency(backend: Backend, devices: usize, interval: Duration, seconds: u64) -> Readings {
    let server = TestServer::start(backend).await;
    let mut admin = server.admin().await;
    fleet::create_site(&mut admin, "bench", "Bench").await;
    fleet::create_ward(&mut admin, "bench", "icu", "ICU", &[]).await;
    let imported = admin
        .import_devices(v1::ImportDevicesRequest {
            devices: (0..devices)
                .map(|i| v1::RegisterDeviceRequest {
                    location: fleet::location("bench", "icu", ""),
                    ..fleet::monitor(&format!("BENCH-{i}"), "MX450")
                })
                .collect(),
            issue_tokens: true,
            token_ttl: None,
        })
        .await
        .expect("import")
        .into_inner()
        .devices;
    let channel = server.channel(&server.admin_bundle()).await.expect("admin");
    let mut patients = v1::patient_service_client::PatientServiceClient::new(channel.clone());
    for (i, device) in imported.iter().enumerate() {
        patients
            .associate(v1::AssociateRequest {
                device_id: device.device.as_ref().expect("device").id.clone(),
                patient: Some(v1::PatientIdentifier {
                    identifier: format!("BENCH-{i}"),
                    authority: "BENCH".into(),
                    display_name: String::new(),
                }),
                from: Some(medfleet_proto::convert::timestamp(
                    chrono::Utc::now() - chrono::Duration::hours(1),
                )),
                until: None,
            })
            .await
            .expect("associate");
    }
    v1::emr_service_client::EmrServiceClient::new(channel.clone())
        .create_destination(v1::EmrDestination {
            name: "bench-feed".into(),
            kind: v1::EmrDestinationKind::Feed.into(),
            enabled: Some(true),
            ..Default::default()
        })
        .await
        .expect("destination");
    let mut feed = v1::feed_service_client::FeedServiceClient::new(channel.clone())
        .subscribe(v1::SubscribeRequest {
            subscription: "bench".into(),
            destination: "bench-feed".into(),
        })
        .await
        .expect("subscribe")
        .into_inner();

    let state = tempfile::tempdir().expect("state dir");
    let tokens = state.path().join("tokens.csv");
    let mut csv = String::from("token\n");
    for device in &imported {
        csv.push_str(&device.token);
        csv.push('\n');
    }
    std::fs::write(&tokens, csv).expect("tokens");
    let per_batch = interval.as_millis().max(1);
    let batches = u64::try_from(u128::from(seconds) * 1000)
        .unwrap_or(u64::MAX)
        .div_ceil(u64::try_from(per_batch).unwrap_or(1));
    let data = server.data_dir();
    let mut simulator = tokio::process::Command::new(medfleet_e2e::binary("medfleet-agent"))
        .args(["simulate", "--server", &server.url(), "--ca"])
        .arg(data.ca_cert())
        .arg("--state-dir")
        .arg(state.path().join("devices"))
        .args(["--devices", &devices.to_string(), "--tokens"])
        .arg(&tokens)
        .args([
            "--concurrency",
            "16",
            "--vitals-interval",
            &humantime::format_duration(interval).to_string(),
        ])
        .args(["--vitals-count", &batches.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("medfleet-agent simulate (build it: cargo build --release -p medfleet-agent)");
    let expected = devices as u64 * batches * 5;
    let mut latency = Stats::default();
    let mut first = None;
    let mut last = Instant::now();
    while (latency.samples.len() as u64) < expected {
        let Ok(Ok(Some(event))) = tokio::time::timeout(Duration::from_mins(1), feed.message()).await else {
            eprintln!(
                "the feed went quiet after {} of {expected} events",
                latency.samples.len()
            );
            break;
        };
        let arrived = chrono::Utc::now();
        let observed = event
            .observation
            .and_then(|o| o.observed_at)
            .and_then(|t| medfleet_proto::convert::datetime(&t))
            .unwrap_or(arrived);
        latency.push((arrived - observed).to_std().unwrap_or_default());
        first.get_or_insert_with(Instant::now);
        last = Instant::now();
    }
    let _ = simulator.kill().await;
    let db = server.db().await;
    let readings: i64 = {
        use sea_orm::ConnectionTrait as _;
        db.query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) FROM readings",
        ))
        .await
        .expect("count")
        .expect("row")
        .try_get_by_index(0)
        .expect("count")
    };
    let readings = u64::try_from(readings).unwrap_or(0);
    let streaming = last.duration_since(first.unwrap_or(last)).max(Duration::from_millis(1));
    let baseline_per_second = raw_inserts(&db, readings, 7 * 16).await;
    server.stop().await.expect("stop");
    Readings {
        latency,
        readings,
        readings_per_second: readings as f64 / streaming.as_secs_f64(),
        baseline_per_second,
    }
}

/// The database floor: `rows` reading rows in multi-row INSERTs of `batch` rows into an equivalent table.
async fn raw_inserts(db: &sea_orm::DatabaseConnection, rows: u64, batch: u64) -> f64 {
    use sea_orm::ConnectionTrait as _;
    db.execute_unprepared(
        "CREATE TABLE bench_readings (id BIGINT, device_id TEXT, sequence BIGINT, item_index INTEGER, code TEXT, \
         value DOUBLE PRECISION, observed_at TEXT, received_at TEXT, questionable BOOLEAN)",
    )
    .await
    .expect("baseline table");
    let started = Instant::now();
    let mut written = 0;
    while written < rows {
        let n = batch.min(rows - written);
        let values: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    "({}, '0b7c0d6a-0000-4000-8000-000000000000', {}, {}, 'MDC_ECG_HEART_RATE', 72.5, \
                     '2026-11-25T10:00:00Z', '2026-11-25T10:00:00Z', false)",
                    written + i,
                    (written + i) / 7,
                    (written + i) % 7
                )
            })
            .collect();
        db.execute_unprepared(&format!("INSERT INTO bench_readings VALUES {}", values.join(", ")))
            .await
            .expect("baseline insert");
        written += n;
    }
    rows as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let backends = match args.backend {
        Backends::Sqlite => vec![Backend::Sqlite],
        Backends::Postgres => vec![Backend::Postgres],
        Backends::Both => vec![Backend::Sqlite, Backend::Postgres],
    };
    println!(
        "| scenario | backend | load | ours p50 | ours p99 | ours/s | baseline p50 | baseline p99 | baseline/s | p50 ratio |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for backend in backends {
        match args.scenario {
            Scenario::Enforce => {
                let (misses, hits, baseline) = enforce(backend, args.devices).await;
                let rules = args.devices * 2;
                for (name, stats) in [("enforce (cache miss)", &misses), ("enforce (cache hit)", &hits)] {
                    let ratio = stats.percentile(50.0).as_secs_f64() / baseline.percentile(50.0).as_secs_f64();
                    println!(
                        "| {name} | {backend:?} | {} users, {rules} grants + seeded roles | {} | {} | {:.0} | {} | {} | {:.0} | {ratio:.0}x |",
                        args.devices,
                        us(stats.percentile(50.0)),
                        us(stats.percentile(99.0)),
                        stats.per_second(),
                        us(baseline.percentile(50.0)),
                        us(baseline.percentile(99.0)),
                        baseline.per_second(),
                    );
                }
            }
            Scenario::EmrLatency => {
                let result = emr_latency(backend, args.devices, args.interval, args.seconds).await;
                println!(
                    "| emr-latency | {backend:?} | {} monitors × 7 readings (5 chart entries) every {} for {} s; {} readings | {} | {} (max {}) | {:.0} readings/s | - | - | {:.0} rows/s (raw INSERT) | {:.2}x of raw |",
                    args.devices,
                    humantime::format_duration(args.interval),
                    args.seconds,
                    result.readings,
                    ms(result.latency.percentile(50.0)),
                    ms(result.latency.percentile(99.0)),
                    ms(result.latency.percentile(100.0)),
                    result.readings_per_second,
                    result.baseline_per_second,
                    result.readings_per_second / result.baseline_per_second,
                );
            }
            Scenario::Firmware => {
                let (ours, baseline) = firmware(backend, args.devices, args.image_mib).await;
                println!(
                    "| firmware download | {backend:?} | {} clients × {} MiB at once | - | - | {:.0} MiB/s | - | - | {:.0} MiB/s (bare rustls) | {:.2}x of bare TLS |",
                    args.devices,
                    args.image_mib,
                    ours,
                    baseline,
                    ours / baseline,
                );
            }
            Scenario::Rollout => {
                let run = rollout(backend, args.devices, args.image_mib).await;
                println!(
                    "| rollout | {backend:?} | {} simulated devices, {} MiB image, waves 10%/50%/100%, no soak | {:.1} s to complete | - | {:.0} devices/s | - | - | - | server {:.1} ms CPU per device update (devices {:.1} ms) |",
                    args.devices,
                    args.image_mib,
                    run.elapsed.as_secs_f64(),
                    args.devices as f64 / run.elapsed.as_secs_f64(),
                    run.server_cpu * 1000.0 / args.devices as f64,
                    run.devices_cpu * 1000.0 / args.devices as f64,
                );
            }
            Scenario::ConfigFanout => {
                let (ours, baseline) = config_fanout(backend, args.devices, args.runs).await;
                let ratio = ours.percentile(50.0).as_secs_f64() / baseline.percentile(50.0).as_secs_f64();
                println!(
                    "| config-fanout | {backend:?} | {} devices with sessions, {} changes; median = p50 | {} | {} (max) | {:.0} devices/s | {} | {} (max) | - | {ratio:.0}x |",
                    args.devices,
                    args.runs,
                    ms(ours.percentile(50.0)),
                    ms(ours.percentile(100.0)),
                    args.devices as f64 / ours.percentile(50.0).as_secs_f64(),
                    ms(baseline.percentile(50.0)),
                    ms(baseline.percentile(100.0)),
                );
            }
            Scenario::Enroll => {
                let (ours, baseline) = enroll(backend, args.devices).await;
                let ratio = ours.percentile(50.0).as_secs_f64() / baseline.percentile(50.0).as_secs_f64();
                println!(
                    "| enroll | {backend:?} | {} sequential enrollments (new TLS connection each) | {} | {} | {:.0} | {} | {} | {:.0} | {ratio:.1}x |",
                    args.devices,
                    ms(ours.percentile(50.0)),
                    ms(ours.percentile(99.0)),
                    ours.per_second(),
                    ms(baseline.percentile(50.0)),
                    ms(baseline.percentile(99.0)),
                    baseline.per_second(),
                );
            }
        }
    }
}

/// A signed image of `mib` MiB for model `model`, uploaded to `server` under a fresh root; the artifact and the
/// root JSON devices pin.
async fn published_image(server: &TestServer, model: &str, mib: usize) -> (v1::Artifact, Vec<u8>, Vec<u8>) {
    use medfleet_core::firmware::target::TargetMeta;
    use medfleet_core::firmware::tuf::{self, RoleSpec, RootSpec, SignedTarget, SigningKey};
    use v1::firmware_service_client::FirmwareServiceClient;

    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let mut fw = FirmwareServiceClient::new(channel.clone());
    let online = fw
        .get_online_keys(v1::GetOnlineKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    let root_key = SigningKey::generate().unwrap().0;
    let targets_key = SigningKey::generate().unwrap().0;
    let one = |key: tuf::PublicKey| RoleSpec {
        keys: vec![key],
        threshold: 1,
    };
    let root = tuf::sign_root(
        &RootSpec {
            version: 1,
            expires: chrono::Utc::now() + chrono::Duration::days(30),
            root: one(root_key.public()),
            targets: one(targets_key.public()),
            snapshot: one(serde_json::from_str(&online.snapshot_key_json).unwrap()),
            timestamp: one(serde_json::from_str(&online.timestamp_key_json).unwrap()),
        },
        &[&root_key],
    )
    .await
    .unwrap();
    fw.set_trust_root(v1::SetTrustRootRequest {
        root_json: String::from_utf8(root.clone()).unwrap(),
    })
    .await
    .unwrap();
    let bytes: Vec<u8> = (0..(mib * 1024 * 1024) as u64)
        .map(|i| u8::try_from((i.wrapping_mul(2_654_435_761) >> 13) & 0xff).unwrap_or(0))
        .collect();
    let target = SignedTarget {
        name: "bench.img".into(),
        sha256: medfleet_core::digest::sha256_hex(&bytes),
        length: bytes.len() as u64,
        meta: TargetMeta {
            hardware_id: model.into(),
            version: "1.0.0".into(),
            release_counter: 1,
            downgrade_from: vec![],
        },
    };
    let targets = tuf::sign_targets(
        None,
        &target,
        chrono::Utc::now() + chrono::Duration::days(30),
        &[&targets_key],
    )
    .await
    .unwrap();
    let mut messages = vec![v1::UploadArtifactRequest {
        message: Some(v1::upload_artifact_request::Message::Header(v1::UploadArtifactHeader {
            target_name: target.name.clone(),
            targets_json: String::from_utf8(targets).unwrap(),
            length: bytes.len() as u64,
            comment: String::new(),
        })),
    }];
    for chunk in bytes.chunks(1024 * 1024) {
        messages.push(v1::UploadArtifactRequest {
            message: Some(v1::upload_artifact_request::Message::Chunk(chunk.to_vec())),
        });
    }
    let artifact = fw
        .upload_artifact(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    (artifact, bytes, root)
}

/// Aggregate MiB/s of `clients` concurrent downloads of one stored image, and of the same bytes over bare TLS.
async fn firmware(backend: Backend, clients: usize, mib: usize) -> (f64, f64) {
    use v1::firmware_service_client::FirmwareServiceClient;

    let server = TestServer::start(backend).await;
    let (artifact, bytes, _) = published_image(&server, "BENCH", mib).await;
    // Connected as the agent connects (its HTTP/2 settings), not with the test harness's endpoint.
    let admin = server.admin_bundle();
    let bundle = medfleet_proto::client::Bundle {
        key_pem: admin.key_pem,
        cert_pem: admin.cert_pem,
        ca_pem: admin.ca_pem,
    };
    let mut channels = Vec::new();
    for _ in 0..clients {
        channels.push(server.channel_for(&bundle).await.unwrap());
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for channel in channels {
        let id = artifact.id.clone();
        tasks.push(tokio::spawn(async move {
            let mut read = FirmwareServiceClient::new(channel)
                .read_artifact(v1::ReadArtifactRequest {
                    artifact: id,
                    offset: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let mut total = 0;
            while let Some(chunk) = read.message().await.unwrap() {
                total += chunk.data.len();
            }
            total
        }));
    }
    let mut received = 0;
    for task in tasks {
        received += task.await.unwrap();
    }
    let ours = received as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64();
    assert_eq!(received, clients * bytes.len(), "every client got the whole image");
    server.stop().await.unwrap();
    (ours, bare_tls(clients, std::sync::Arc::new(bytes)).await)
}

/// CPU seconds (user + system) process `pid` has used so far, from /proc (`self` for this process).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // USER_HZ, what /proc counts in: 100 on every Linux this runs on (`getconf CLK_TCK`).
    ticks / 100.0
}

struct RolloutRun {
    elapsed: Duration,
    server_cpu: f64,
    devices_cpu: f64,
}

/// `devices` simulated monitors (the real agent, one process) hold sessions; a rollout of a `mib` MiB signed
/// image in three waves (10%, 50%, 100%; no soak) is timed from creation to completion, with the CPU the server
/// (this process: the in-process medfleetd and one rollout watcher) and the devices used meanwhile.
async fn rollout(backend: Backend, devices: usize, mib: usize) -> RolloutRun {
    use tokio::io::AsyncBufReadExt as _;
    use v1::rollout_service_client::RolloutServiceClient;

    let server = TestServer::start(backend).await;
    let (artifact, _, root) = published_image(&server, "BENCH", mib).await;
    let mut admin = server.admin().await;
    fleet::create_site(&mut admin, "bench", "Bench").await;
    fleet::create_ward(&mut admin, "bench", "icu", "ICU", &[]).await;
    let state = tempfile::tempdir().expect("state dir");
    let root_file = state.path().join("root.json");
    std::fs::write(&root_file, root).unwrap();
    let data = server.data_dir();
    let mut simulator = tokio::process::Command::new(medfleet_e2e::binary("medfleet-agent"))
        .args(["simulate", "--server", &server.url(), "--ca"])
        .arg(data.ca_cert())
        .arg("--state-dir")
        .arg(state.path().join("devices"))
        .args(["--devices", &devices.to_string(), "--admin"])
        .arg(data.admin_bundle())
        .args([
            "--model",
            "BENCH",
            "--ward",
            "bench/icu",
            "--heartbeat",
            "5s",
            "--tuf-root",
        ])
        .arg(&root_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("medfleet-agent simulate (build it: cargo build --release -p medfleet-agent)");
    let pid = simulator.id().expect("simulator pid").to_string();
    let mut lines = tokio::io::BufReader::new(simulator.stderr.take().unwrap()).lines();
    let connected = format!("{devices}/{devices} connected");
    loop {
        let line = lines.next_line().await.unwrap();
        let line = line.expect("the simulator stopped before every device connected");
        if line.contains(&connected) {
            break;
        }
    }
    // Keep reading, so the simulator never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let mut rollouts = RolloutServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap());
    let (server_before, devices_before) = (cpu_seconds("self"), cpu_seconds(&pid));
    let started = Instant::now();
    let created = rollouts
        .create_rollout(v1::CreateRolloutRequest {
            artifact: artifact.id.clone(),
            target: Some(v1::create_rollout_request::Target::Selector(v1::DeviceSelector {
                hardware_id: "BENCH".into(),
                ..Default::default()
            })),
            waves: vec!["10%".into(), "50%".into(), "100%".into()],
            success_threshold: "100%".into(),
            soak: Some(prost_types::Duration { seconds: 0, nanos: 0 }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut watch = rollouts
        .watch_rollout(v1::WatchRolloutRequest {
            rollout: created.id.clone(),
            device_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(detail) = watch.message().await.unwrap() {
        let rollout = detail.rollout.unwrap_or_default();
        if rollout.state == i32::from(v1::RolloutState::Completed) {
            assert_eq!(
                rollout.counts.map(|c| c.succeeded as usize),
                Some(devices),
                "every device updated"
            );
            break;
        }
        assert!(
            rollout.state == i32::from(v1::RolloutState::Running),
            "the rollout stopped: {rollout:?}"
        );
    }
    let run = RolloutRun {
        elapsed: started.elapsed(),
        server_cpu: cpu_seconds("self") - server_before,
        devices_cpu: cpu_seconds(&pid) - devices_before,
    };
    let _ = simulator.kill().await;
    server.stop().await.unwrap();
    run
}

/// The same bytes to `clients` connections over TLS 1.3 with nothing else on top.
async fn bare_tls(clients: usize, bytes: std::sync::Arc<Vec<u8>>) -> f64 {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client_config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let serving = bytes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let bytes = serving.clone();
            tokio::spawn(async move {
                let mut tls = acceptor.accept(tcp).await.unwrap();
                for chunk in bytes.chunks(1024 * 1024) {
                    tls.write_all(chunk).await.unwrap();
                }
                tls.shutdown().await.unwrap();
            });
        }
    });
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let connector = tokio_rustls::TlsConnector::from(client_config.clone());
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            let mut buffer = vec![0; 256 * 1024];
            let mut total = 0;
            loop {
                match tls.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
            total
        }));
    }
    let mut received = 0;
    for task in tasks {
        received += task.await.unwrap();
    }
    assert_eq!(received, clients * bytes.len(), "every TLS client got the whole image");
    received as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64()
}
