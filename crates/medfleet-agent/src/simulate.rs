//! `medfleet-agent simulate`: many devices in one process, each with its own key, certificate, state directory
//! and session: for demos, end-to-end tests and load tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use medfleet_proto::client::{Bundle, connect};
use medfleet_proto::v1::{self, registry_service_client::RegistryServiceClient};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::device::{self, RunOptions, Status};
use crate::state::StateDir;

#[derive(Debug)]
pub(crate) struct Simulation {
    pub(crate) server: String,
    pub(crate) ca: PathBuf,
    pub(crate) state_dir: PathBuf,
    pub(crate) devices: usize,
    pub(crate) tokens: Option<PathBuf>,
    pub(crate) admin: Option<PathBuf>,
    pub(crate) model: String,
    pub(crate) ward: Option<String>,
    pub(crate) concurrency: usize,
    /// Share of the devices that start in clinical use.
    pub(crate) in_use_share: f64,
    pub(crate) options: RunOptions,
}

/// Marks every n-th device in clinical use so that about `share` of them are, unless a device's state file says
/// otherwise already (a test or an operator may have changed it).
fn start_in_use(dirs: &[StateDir], share: f64) -> anyhow::Result<()> {
    if share <= 0.0 {
        return Ok(());
    }
    let mut owed = 0.0;
    for dir in dirs {
        owed += share;
        let path = dir.operational_state_file();
        if owed >= 1.0 {
            owed -= 1.0;
            if !path.exists() {
                std::fs::write(&path, "in-clinical-use\n")
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// Most devices one import call registers (the server's limit).
const IMPORT_CHUNK: usize = 1000;

pub(crate) async fn simulate(sim: Simulation, stop: CancellationToken) -> anyhow::Result<()> {
    if sim.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let dirs: Vec<StateDir> = (0..sim.devices)
        .map(|i| StateDir::new(sim.state_dir.join(format!("device-{i:05}"))))
        .collect();
    let missing: Vec<usize> = (0..sim.devices).filter(|i| dirs[*i].load().is_err()).collect();
    if !missing.is_empty() {
        let tokens = tokens_for(&sim, missing.len()).await?;
        enroll_all(&sim, &dirs, &missing, tokens).await?;
    }

    start_in_use(&dirs, sim.in_use_share)?;
    let mut statuses = Vec::with_capacity(sim.devices);
    let mut tasks = tokio::task::JoinSet::new();
    let options = Arc::new(RunOptions {
        server: Some(sim.server.clone()),
        quiet: true,
        ..sim.options.clone()
    });
    for dir in dirs {
        let (tx, rx) = watch::channel(Status::default());
        statuses.push(rx);
        let (options, stop) = (options.clone(), stop.clone());
        tasks.spawn(async move {
            if let Err(error) = device::run(&dir, &options, stop, Some(tx)).await {
                tracing::error!(dir = %dir.root().display(), error = %format!("{error:#}"), "simulated device stopped");
            }
        });
    }
    tracing::info!(devices = sim.devices, "simulation running; Ctrl-C or SIGTERM stops it");
    let mut last = String::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let summary = summarise(&statuses);
        if summary != last {
            tracing::info!("simulated devices: {summary}");
            last = summary;
        }
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// "998/1000 connected; configuration v7 ×990, v6 ×8, none ×2".
fn summarise(statuses: &[watch::Receiver<Status>]) -> String {
    let mut connected = 0;
    let mut versions = std::collections::BTreeMap::<Option<u64>, usize>::new();
    for status in statuses {
        let s = status.borrow();
        connected += usize::from(s.connected);
        *versions.entry(s.applied_version).or_default() += 1;
    }
    let versions: Vec<String> = versions
        .iter()
        .rev()
        .map(|(v, n)| match v {
            Some(v) => format!("v{v} ×{n}"),
            None => format!("none ×{n}"),
        })
        .collect();
    format!(
        "{connected}/{} connected; configuration {}",
        statuses.len(),
        versions.join(", ")
    )
}

/// One-time tokens for `count` devices: from the tokens file (`medfleet devices import --tokens-out`), or by
/// registering that many devices with an admin bundle.
async fn tokens_for(sim: &Simulation, count: usize) -> anyhow::Result<Vec<String>> {
    if let Some(path) = &sim.tokens {
        return read_tokens(path, count);
    }
    let Some(admin) = &sim.admin else {
        bail!(
            "{count} simulated devices are not enrolled yet; pass --tokens tokens.csv (from medfleet devices import \
             --tokens-out) or --admin admin.pem to register them"
        );
    };
    let bundle = Bundle::load(admin)?;
    let channel = connect(&sim.server, &bundle).await?;
    let mut registry = RegistryServiceClient::new(channel);
    let location = match &sim.ward {
        Some(scope) => {
            let Some((site, ward)) = scope.split_once('/') else {
                bail!("--ward must be SITE/WARD, e.g. stmarys/icu");
            };
            Some(v1::Location {
                site: site.to_owned(),
                ward: ward.to_owned(),
                bed: String::new(),
            })
        }
        None => None,
    };
    let batch = uuid::Uuid::new_v4().simple().to_string();
    let mut tokens = Vec::with_capacity(count);
    for start in (0..count).step_by(IMPORT_CHUNK) {
        let devices = (start..count.min(start + IMPORT_CHUNK))
            .map(|i| v1::RegisterDeviceRequest {
                serial_number: format!("SIM-{}-{i:05}", &batch[..8]),
                manufacturer: "medfleet simulator".to_owned(),
                model: sim.model.clone(),
                device_class: v1::DeviceClass::PatientMonitor.into(),
                eui64: String::new(),
                location: location.clone(),
                tags: [("simulated".to_owned(), "true".to_owned())].into(),
            })
            .collect();
        let imported = registry
            .import_devices(v1::ImportDevicesRequest {
                devices,
                issue_tokens: true,
                token_ttl: None,
            })
            .await
            .map_err(|s| anyhow::anyhow!("registering simulated devices failed: {}", s.message()))?
            .into_inner();
        tokens.extend(imported.devices.into_iter().map(|d| d.token));
    }
    Ok(tokens)
}

fn read_tokens(path: &Path, count: usize) -> anyhow::Result<Vec<String>> {
    let mut reader = csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let headers = reader.headers()?.clone();
    let column = headers
        .iter()
        .position(|h| h == "token")
        .ok_or_else(|| anyhow::anyhow!("{} has no 'token' column", path.display()))?;
    let mut tokens = Vec::new();
    for record in reader.records() {
        let record = record.with_context(|| format!("{} is not valid CSV", path.display()))?;
        if let Some(token) = record.get(column).filter(|t| !t.is_empty()) {
            tokens.push(token.to_owned());
        }
    }
    if tokens.len() < count {
        bail!(
            "{} holds {} tokens; {count} devices need enrolling",
            path.display(),
            tokens.len()
        );
    }
    tokens.truncate(count);
    Ok(tokens)
}

async fn enroll_all(sim: &Simulation, dirs: &[StateDir], missing: &[usize], tokens: Vec<String>) -> anyhow::Result<()> {
    let ca_pem = std::fs::read_to_string(&sim.ca)
        .with_context(|| format!("cannot read the CA certificate {}", sim.ca.display()))?;
    let progress = ProgressBar::new(missing.len() as u64).with_style(
        ProgressStyle::with_template("enrolling {pos}/{len} {wide_bar} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(missing.iter().zip(tokens))
        .map(|(i, token)| {
            let (dir, ca_pem, server, progress) = (&dirs[*i], &ca_pem, &sim.server, &progress);
            async move {
                let enrolled = crate::enroll_with(server, ca_pem, &token, dir, None).await;
                progress.inc(1);
                enrolled.map(|_| ())
            }
        })
        .buffer_unordered(sim.concurrency.max(1))
        .collect()
        .await;
    progress.finish_and_clear();
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    if let Some(first) = failed.first() {
        bail!(
            "{} of {} enrollments failed; first: {first}",
            failed.len(),
            missing.len()
        );
    }
    tracing::info!(devices = missing.len(), "simulated devices enrolled");
    Ok(())
}
