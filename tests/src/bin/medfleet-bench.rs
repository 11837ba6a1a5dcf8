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

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_precision_loss)]

use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use medfleet_core::identity::Identity;
use medfleet_e2e::{Backend, TestServer};
use medfleet_proto::v1;
use medfleet_server::pki::{SubjectDetails, check_csr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Enroll,
    Enforce,
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
    use medfleet_server::access::{Access, Grant, insert_grant};
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
    let txn = medfleet_server::db::begin_write(&db).await.expect("txn");
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
            .map(|i| v1::RegisterDeviceRequest {
                serial_number: format!("BENCH-{i:06}"),
                manufacturer: "Philips".into(),
                model: "IntelliVue MX450".into(),
                device_class: v1::DeviceClass::PatientMonitor.into(),
                ..Default::default()
            })
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
