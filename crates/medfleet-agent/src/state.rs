//! The agent's state directory: its identity bundle (key 0600), where it enrolled, and the configuration it runs
//! (`config.json`, replaced atomically, read by the device's software).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct AgentState {
    pub(crate) server: String,
    pub(crate) device_id: String,
}

/// The configuration the device runs: what it reports in its session hello after a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct AppliedConfig {
    pub(crate) version: u64,
    pub(crate) digest: String,
    pub(crate) document: serde_json::Value,
}

#[derive(Debug, Clone)]
pub(crate) struct StateDir(PathBuf);

impl StateDir {
    pub(crate) fn new(root: PathBuf) -> Self {
        Self(root)
    }

    pub(crate) fn root(&self) -> &Path {
        &self.0
    }

    /// Key, certificate and CA in one file, mode 0600.
    pub(crate) fn identity(&self) -> PathBuf {
        self.0.join("identity.pem")
    }

    fn state_file(&self) -> PathBuf {
        self.0.join("agent.json")
    }

    /// The applied configuration: written to a temporary file, synced, then renamed over the old one, so the
    /// device reads either the previous or the new configuration, never a mix.
    pub(crate) fn config(&self) -> PathBuf {
        self.0.join("config.json")
    }

    /// What the device's clinical software says it is doing: one of `idle`, `in-clinical-use`, `alarming`,
    /// `maintenance`. The agent reports it in its heartbeats and installs only when idle or in maintenance.
    pub(crate) fn operational_state_file(&self) -> PathBuf {
        self.0.join("operational-state")
    }

    /// The state the clinical software wrote. Anything else fails closed: a missing file is reported as unknown
    /// (the clinical software may not have started yet, and the server never installs on an unknown device)
    /// unless `missing_is_idle` says this device has no clinical software at all (a bench or lab unit); an
    /// unreadable file or an unknown word counts as in clinical use.
    pub(crate) fn operational_state(&self, missing_is_idle: bool) -> medfleet_proto::v1::OperationalState {
        use medfleet_proto::v1::OperationalState;
        match std::fs::read_to_string(self.operational_state_file()) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if missing_is_idle {
                    OperationalState::Idle
                } else {
                    OperationalState::Unspecified
                }
            }
            // Unreadable or unknown: fail closed, as if in use.
            Err(_) => OperationalState::InClinicalUse,
            Ok(text) => match text.trim() {
                "idle" => OperationalState::Idle,
                "maintenance" => OperationalState::Maintenance,
                "alarming" => OperationalState::Alarming,
                _ => OperationalState::InClinicalUse,
            },
        }
    }

    pub(crate) fn applied(&self) -> anyhow::Result<Option<AppliedConfig>> {
        let path = self.config();
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).with_context(|| {
                format!(
                    "{} is corrupt; remove it to receive the configuration again",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub(crate) fn save_applied(&self, applied: &AppliedConfig) -> anyhow::Result<()> {
        medfleet_proto::client::write_private(&self.config(), &serde_json::to_string_pretty(applied)?)?;
        // The rename is durable only once the directory entry is.
        std::fs::File::open(&self.0)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("cannot sync {}", self.0.display()))?;
        Ok(())
    }

    pub(crate) fn save(&self, state: &AgentState) -> anyhow::Result<()> {
        medfleet_proto::client::write_private(&self.state_file(), &serde_json::to_string_pretty(state)?)?;
        Ok(())
    }

    pub(crate) fn load(&self) -> anyhow::Result<AgentState> {
        let path = self.state_file();
        let enroll_first = || {
            format!(
                "{} holds no enrolled identity; enroll first: medfleet-agent enroll --state-dir {}",
                self.0.display(),
                self.0.display()
            )
        };
        let text = std::fs::read_to_string(&path).with_context(enroll_first)?;
        let state: AgentState =
            serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
        // The identity is written before the device id; without both the enrollment did not finish.
        if state.device_id.is_empty() || !self.identity().exists() {
            anyhow::bail!(enroll_first());
        }
        Ok(state)
    }
}

/// (not before, not after) of a PEM certificate.
pub(crate) fn validity(cert_pem: &str) -> anyhow::Result<(SystemTime, SystemTime)> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).context("the stored certificate is not PEM")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).context("the stored certificate is unreadable")?;
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Ok((
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    ))
}
