//! medfleetd configuration: a versioned TOML file, overridden by `MEDFLEET_*` environment variables, overridden by
//! command-line flags, validated as a whole before anything starts.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The configuration file format this build reads (`version = 1`).
pub const CONFIG_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The file layer. Every key is optional; unknown keys are errors so a typo cannot silently keep a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsFile {
    pub version: Option<u32>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
    pub database_url: Option<String>,
    pub database_max_connections: Option<u32>,
    pub server_names: Option<Vec<String>>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub otlp_endpoint: Option<String>,
    pub shutdown_grace: Option<String>,
    pub server_cert_lifetime: Option<String>,
    pub device_cert_lifetime: Option<String>,
    pub operator_cert_lifetime: Option<String>,
    pub service_cert_lifetime: Option<String>,
    pub replica_name: Option<String>,
    pub heartbeat_timeout: Option<String>,
    pub config_reconcile_interval: Option<String>,
    pub rollout_tick: Option<String>,
    pub upload_idle: Option<String>,
    pub artifact_store: Option<String>,
    pub reading_future_tolerance: Option<String>,
    pub emr_retry_max: Option<String>,
    pub emr_allowed_hosts: Option<Vec<String>>,
    pub retention_delivered_outbox: Option<String>,
    pub retention_clinical: Option<String>,
    pub retention_interval: Option<String>,
    pub secrets_key_file: Option<PathBuf>,
}

/// The flag and environment layer (clap resolves flag over environment).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// TOML configuration file (see deploy/medfleetd.toml for every option).
    #[arg(long, env = "MEDFLEET_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory holding the CA, the server certificate and (by default) the SQLite database.
    #[arg(long, env = "MEDFLEET_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC (mTLS) listen address.
    #[arg(long, env = "MEDFLEET_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Plain HTTP listen address for /metrics, /healthz and /readyz.
    #[arg(long, env = "MEDFLEET_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// sqlite://PATH?mode=rwc or postgres://USER@HOST/DB. Default: SQLite in the data dir.
    #[arg(long, env = "MEDFLEET_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Maximum database connections of this replica.
    #[arg(long, env = "MEDFLEET_DATABASE_MAX_CONNECTIONS")]
    pub database_max_connections: Option<u32>,
    /// DNS names and IP addresses clients use to reach this server (repeat or comma-separate).
    #[arg(long = "server-name", env = "MEDFLEET_SERVER_NAMES", value_delimiter = ',')]
    pub server_names: Vec<String>,
    /// Log format.
    #[arg(long, env = "MEDFLEET_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. "info" or "info,medfleet_server=debug".
    #[arg(long, env = "MEDFLEET_LOG")]
    pub log_level: Option<String>,
    /// OTLP/gRPC collector endpoint for traces and metrics, e.g. http://otel-collector:4317.
    #[arg(long, env = "MEDFLEET_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// How long open streams may drain on shutdown, e.g. "10s".
    #[arg(long, env = "MEDFLEET_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// This replica's name in device presence (default: the host name and a random suffix).
    #[arg(long, env = "MEDFLEET_REPLICA_NAME")]
    pub replica_name: Option<String>,
    /// A device session silent this long is closed and the device marked offline, e.g. "60s".
    #[arg(long, env = "MEDFLEET_HEARTBEAT_TIMEOUT")]
    pub heartbeat_timeout: Option<String>,
    /// How often sessions are reconciled with the database (pushes a lost notification missed), e.g. "30s".
    #[arg(long, env = "MEDFLEET_CONFIG_RECONCILE_INTERVAL")]
    pub config_reconcile_interval: Option<String>,
    /// How often the rollout scheduler decides (advance, halt, complete) and renews its leader lease, e.g. "1s".
    #[arg(long, env = "MEDFLEET_ROLLOUT_TICK")]
    pub rollout_tick: Option<String>,
    /// How long a firmware upload may send nothing before it is given up (nothing stored), e.g. "1m".
    #[arg(long, env = "MEDFLEET_UPLOAD_IDLE")]
    pub upload_idle: Option<String>,
    /// Where new firmware images are kept: empty for the database (default), file:///dir or s3://bucket/prefix
    /// (S3 credentials and endpoint from AWS_* environment variables). Every replica needs the same value.
    #[arg(long, env = "MEDFLEET_ARTIFACT_STORE")]
    pub artifact_store: Option<String>,
    /// How far in the future a reading's observation time may be (device clock drift), e.g. "30s".
    #[arg(long, env = "MEDFLEET_READING_FUTURE_TOLERANCE")]
    pub reading_future_tolerance: Option<String>,
    /// How long an EMR delivery is retried (with exponential backoff) before it is dead-lettered, e.g. "24h".
    #[arg(long, env = "MEDFLEET_EMR_RETRY_MAX")]
    pub emr_retry_max: Option<String>,
    /// Hosts EMR destinations may point at (repeat or comma-separate; "*.example.org" matches subdomains). Empty:
    /// any host an admin names.
    #[arg(long = "emr-allowed-host", env = "MEDFLEET_EMR_ALLOWED_HOSTS", value_delimiter = ',')]
    pub emr_allowed_hosts: Vec<String>,
    /// Purge delivery history (statuses superseded or re-sent since; the newest row of each entry and destination
    /// stays with the entry) older than this, e.g. "30days". Unset: kept.
    #[arg(long, env = "MEDFLEET_RETENTION_DELIVERED_OUTBOX")]
    pub retention_delivered_outbox: Option<String>,
    /// Purge delivered chart entries (with their delivery records) and readings observed longer ago than this,
    /// e.g. "365days". Unset: kept.
    #[arg(long, env = "MEDFLEET_RETENTION_CLINICAL")]
    pub retention_clinical: Option<String>,
    /// The keyring that seals destination secrets and the CA key (default: secrets.key in the data dir).
    #[arg(long, env = "MEDFLEET_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<PathBuf>,
}

/// The validated configuration a server runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub database_url: String,
    pub database_max_connections: u32,
    pub server_names: Vec<String>,
    pub log_format: LogFormat,
    pub log_level: String,
    pub otlp_endpoint: Option<String>,
    pub shutdown_grace: Duration,
    pub server_cert_lifetime: Duration,
    pub device_cert_lifetime: Duration,
    pub operator_cert_lifetime: Duration,
    pub service_cert_lifetime: Duration,
    pub replica_name: String,
    pub heartbeat_timeout: Duration,
    pub config_reconcile_interval: Duration,
    pub rollout_tick: Duration,
    pub upload_idle: Duration,
    /// Where new firmware images go; `None`: the database.
    pub artifact_store: Option<String>,
    pub reading_future_tolerance: Duration,
    pub emr_retry_max: Duration,
    /// Hosts EMR destinations may point at; empty: any.
    pub emr_allowed_hosts: Vec<String>,
    /// What is purged when (nothing by default).
    pub retention: RetentionPolicy,
    /// The key-encryption keyring (current key first) that seals destination secrets and the CA key.
    pub secrets_key_file: PathBuf,
}

/// The host name (from the environment or /etc/hostname) and a random suffix: unique even for two replicas on
/// one host, recognisable in `devices list`.
fn default_replica_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "medfleetd".to_owned());
    format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6])
}

pub const DEFAULT_DATA_DIR: &str = "medfleet-data";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9464";

impl Settings {
    /// Reads the file named by the overrides (if any) and resolves every layer.
    pub fn load(overrides: Overrides) -> Result<Self, SettingsError> {
        let file = match &overrides.config {
            Some(path) => read_file(path)?,
            None => SettingsFile::default(),
        };
        Self::resolve(file, overrides)
    }

    pub fn resolve(file: SettingsFile, o: Overrides) -> Result<Self, SettingsError> {
        if o.config.is_some() && file.version != Some(CONFIG_VERSION) {
            return Err(SettingsError::Invalid(format!(
                "the config file must start with `version = {CONFIG_VERSION}` (found {})",
                file.version.map_or_else(|| "no version".to_owned(), |v| v.to_string())
            )));
        }
        let data_dir = o
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let database_url = o
            .database_url
            .or(file.database_url)
            .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", data_dir.join("medfleet.db").display()));
        let server_names = if o.server_names.is_empty() {
            file.server_names
                .unwrap_or_else(|| vec!["localhost".into(), "127.0.0.1".into(), "::1".into()])
        } else {
            o.server_names
        };
        let secrets_key_file = o
            .secrets_key_file
            .or(file.secrets_key_file)
            .unwrap_or_else(|| data_dir.join("secrets.key"));
        let config = Self {
            secrets_key_file,
            listen: o.listen.or(file.listen).unwrap_or(parse_default(DEFAULT_LISTEN)),
            http_listen: o
                .http_listen
                .or(file.http_listen)
                .unwrap_or(parse_default(DEFAULT_HTTP_LISTEN)),
            database_max_connections: o
                .database_max_connections
                .or(file.database_max_connections)
                .unwrap_or(10),
            log_format: o.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
            log_level: o.log_level.or(file.log_level).unwrap_or_else(|| "info".to_owned()),
            otlp_endpoint: o.otlp_endpoint.or(file.otlp_endpoint).filter(|e| !e.is_empty()),
            shutdown_grace: duration("shutdown_grace", o.shutdown_grace.or(file.shutdown_grace), "10s")?,
            server_cert_lifetime: duration("server_cert_lifetime", file.server_cert_lifetime, "90days")?,
            device_cert_lifetime: duration("device_cert_lifetime", file.device_cert_lifetime, "24h")?,
            operator_cert_lifetime: duration("operator_cert_lifetime", file.operator_cert_lifetime, "30days")?,
            service_cert_lifetime: duration("service_cert_lifetime", file.service_cert_lifetime, "90days")?,
            replica_name: o
                .replica_name
                .or(file.replica_name)
                .unwrap_or_else(default_replica_name),
            heartbeat_timeout: duration(
                "heartbeat_timeout",
                o.heartbeat_timeout.or(file.heartbeat_timeout),
                "60s",
            )?,
            config_reconcile_interval: duration(
                "config_reconcile_interval",
                o.config_reconcile_interval.or(file.config_reconcile_interval),
                "30s",
            )?,
            rollout_tick: duration("rollout_tick", o.rollout_tick.or(file.rollout_tick), "1s")?,
            upload_idle: duration("upload_idle", o.upload_idle.or(file.upload_idle), "1m")?,
            artifact_store: o.artifact_store.or(file.artifact_store).filter(|s| !s.is_empty()),
            reading_future_tolerance: duration(
                "reading_future_tolerance",
                o.reading_future_tolerance.or(file.reading_future_tolerance),
                "30s",
            )?,
            emr_retry_max: duration("emr_retry_max", o.emr_retry_max.or(file.emr_retry_max), "24h")?,
            emr_allowed_hosts: if o.emr_allowed_hosts.is_empty() {
                file.emr_allowed_hosts.unwrap_or_default()
            } else {
                o.emr_allowed_hosts
            },
            retention: RetentionPolicy {
                delivered_outbox: optional_duration(
                    "retention_delivered_outbox",
                    o.retention_delivered_outbox.or(file.retention_delivered_outbox),
                )?,
                clinical: optional_duration("retention_clinical", o.retention_clinical.or(file.retention_clinical))?,
                interval: duration("retention_interval", file.retention_interval, "1h")?,
            },
            data_dir,
            database_url,
            server_names,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |m: String| Err(SettingsError::Invalid(m));
        let url = &self.database_url;
        if !(url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return invalid(
                "database_url must start with sqlite: or postgres:// (e.g. postgres://medfleet@db/medfleet)".into(),
            );
        }
        if !(1..=1000).contains(&self.database_max_connections) {
            return invalid("database_max_connections must be between 1 and 1000".into());
        }
        if self.server_names.is_empty() {
            return invalid("server_names must name at least one DNS name or IP address".into());
        }
        for name in &self.server_names {
            if name.parse::<IpAddr>().is_err() && !is_dns_name(name) {
                return invalid(format!("server name '{name}' is neither an IP address nor a DNS name"));
            }
        }
        if self.shutdown_grace > Duration::from_mins(10) {
            return invalid("shutdown_grace must be at most 10 minutes".into());
        }
        if self.replica_name.is_empty()
            || self.replica_name.len() > 100
            || self.replica_name.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return invalid("replica_name must be 1 to 100 characters without spaces".into());
        }
        if !(Duration::from_secs(1)..=Duration::from_hours(1)).contains(&self.heartbeat_timeout) {
            return invalid("heartbeat_timeout must be between 1 second and 1 hour".into());
        }
        if !(Duration::from_millis(100)..=Duration::from_hours(1)).contains(&self.config_reconcile_interval) {
            return invalid("config_reconcile_interval must be between 100 ms and 1 hour".into());
        }
        // Zero would spin the scheduler (and tokio refuses a zero interval); above a minute a halt waits too long.
        if !(Duration::from_millis(100)..=Duration::from_mins(1)).contains(&self.rollout_tick) {
            return invalid("rollout_tick must be between 100 ms and 1 minute".into());
        }
        if !(Duration::from_secs(1)..=Duration::from_hours(6)).contains(&self.upload_idle) {
            return invalid("upload_idle must be between 1 second and 6 hours (an upload's own cap)".into());
        }
        if self.reading_future_tolerance > Duration::from_hours(1) {
            return invalid("reading_future_tolerance must be at most 1 hour".into());
        }
        if !(Duration::from_secs(1)..=Duration::from_hours(24 * 30)).contains(&self.emr_retry_max) {
            return invalid("emr_retry_max must be between 1 second and 30 days".into());
        }
        let day = Duration::from_hours(24);
        let retention = &self.retention;
        if retention
            .delivered_outbox
            .is_some_and(|keep| keep < Duration::from_hours(1))
        {
            return invalid("retention_delivered_outbox must be at least 1 hour (or unset: kept)".into());
        }
        if retention.clinical.is_some_and(|keep| keep < day) {
            return invalid("retention_clinical must be at least 1 day (or unset: kept)".into());
        }
        if !(Duration::from_mins(1)..=day).contains(&retention.interval) {
            return invalid("retention_interval must be between 1 minute and 24 hours".into());
        }
        if self.server_cert_lifetime < Duration::from_hours(1) || self.server_cert_lifetime > 397 * day {
            return invalid("server_cert_lifetime must be between 1 hour and 397 days".into());
        }
        for (key, lifetime) in [
            ("device_cert_lifetime", self.device_cert_lifetime),
            ("operator_cert_lifetime", self.operator_cert_lifetime),
            ("service_cert_lifetime", self.service_cert_lifetime),
        ] {
            if lifetime < Duration::from_mins(5) || lifetime > 397 * day {
                return invalid(format!("{key} must be between 5 minutes and 397 days"));
            }
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return invalid(format!("otlp_endpoint '{endpoint}' must be an http:// or https:// URL"));
        }
        if let Some(store) = &self.artifact_store
            && !(store.starts_with("file:///") || store.starts_with("s3://"))
        {
            return invalid(format!(
                "artifact_store '{store}' must be file:///absolute/dir or s3://bucket/prefix (or empty for the \
                 database)"
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return invalid(format!("log_level '{}' is not a valid filter: {e}", self.log_level));
        }
        if self.listen.port() != 0 && self.listen == self.http_listen {
            return invalid("listen and http_listen must differ".into());
        }
        Ok(())
    }

    pub fn is_postgres(&self) -> bool {
        self.database_url.starts_with("postgres")
    }
}

fn read_file(path: &Path) -> Result<SettingsFile, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| SettingsError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn parse_default(addr: &str) -> SocketAddr {
    addr.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
}

fn duration(key: &str, value: Option<String>, default: &str) -> Result<Duration, SettingsError> {
    let text = value.unwrap_or_else(|| default.to_owned());
    humantime::parse_duration(&text).map_err(|e| {
        SettingsError::Invalid(format!(
            "{key} = '{text}' is not a duration like \"30s\" or \"24h\": {e}"
        ))
    })
}

/// An optional duration: unset or empty means "not configured".
fn optional_duration(key: &str, value: Option<String>) -> Result<Option<Duration>, SettingsError> {
    match value.filter(|v| !v.trim().is_empty()) {
        Some(text) => duration(key, Some(text), "").map(Some),
        None => Ok(None),
    }
}

fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> SettingsFile {
        toml::from_str(text).unwrap()
    }

    fn with_file() -> Overrides {
        Overrides {
            config: Some("medfleetd.toml".into()),
            ..Overrides::default()
        }
    }

    #[test]
    fn defaults_are_valid_and_local() {
        let c = Settings::resolve(SettingsFile::default(), Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert!(c.database_url.starts_with("sqlite://medfleet-data/medfleet.db"));
        assert!(!c.is_postgres());
    }

    #[test]
    fn retention_is_off_by_default_and_checked_as_a_whole() {
        let c = Settings::resolve(SettingsFile::default(), Overrides::default()).unwrap();
        assert!(!c.retention.enabled());
        let resolve = |text: &str| Settings::resolve(file(&format!("version = 1\n{text}")), with_file());
        let both = resolve("retention_delivered_outbox = \"30days\"\nretention_clinical = \"365days\"\n").unwrap();
        assert_eq!(both.retention.clinical, Some(Duration::from_hours(365 * 24)));
        assert_eq!(both.retention.interval, Duration::from_hours(1));
        assert!(
            resolve("retention_clinical = \"365days\"").is_ok(),
            "each purge stands alone"
        );
        for (text, says) in [
            ("retention_clinical = \"12h\"", "at least 1 day"),
            ("retention_delivered_outbox = \"5m\"", "at least 1 hour"),
            ("retention_delivered_outbox = \"soon\"", "not a duration"),
        ] {
            let error = resolve(text).unwrap_err().to_string();
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn flags_override_file() {
        let f = file("version = 1\nlisten = \"0.0.0.0:7000\"\nlog_level = \"debug\"\n");
        let mut o = with_file();
        o.listen = Some("127.0.0.1:7001".parse().unwrap());
        let c = Settings::resolve(f, o).unwrap();
        assert_eq!(c.listen.port(), 7001);
        assert_eq!(c.log_level, "debug");
    }

    #[test]
    fn file_needs_version() {
        let err = Settings::resolve(file("listen = \"0.0.0.0:7000\""), with_file()).unwrap_err();
        assert!(err.to_string().contains("version = 1"), "{err}");
    }

    #[test]
    fn shipped_example_is_valid_and_complete() {
        let text = include_str!("../../../deploy/medfleetd.toml");
        let config = Settings::resolve(file(text), with_file()).unwrap();
        assert!(config.is_postgres());
        assert_eq!(config.shutdown_grace, Duration::from_secs(20));
        // Every key the file format knows appears in the example, so operators see every option.
        let table: toml::Table = toml::from_str(text).unwrap();
        for key in [
            "version",
            "data_dir",
            "listen",
            "http_listen",
            "database_url",
            "database_max_connections",
            "server_names",
            "log_format",
            "log_level",
            "otlp_endpoint",
            "shutdown_grace",
            "server_cert_lifetime",
            "device_cert_lifetime",
            "operator_cert_lifetime",
            "service_cert_lifetime",
            "replica_name",
            "heartbeat_timeout",
            "config_reconcile_interval",
            "reading_future_tolerance",
            "emr_retry_max",
            "emr_allowed_hosts",
            "secrets_key_file",
            "rollout_tick",
            "upload_idle",
            "artifact_store",
        ] {
            assert!(table.contains_key(key), "deploy/medfleetd.toml does not show {key}");
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<SettingsFile>("version = 1\nlisten_addr = \"x\"").is_err());
    }

    #[test]
    fn rejects_bad_values() {
        for (text, needle) in [
            ("database_url = \"mysql://x\"", "database_url"),
            ("server_names = [\"bad name\"]", "server name"),
            ("shutdown_grace = \"soon\"", "shutdown_grace"),
            ("shutdown_grace = \"1h\"", "shutdown_grace"),
            ("otlp_endpoint = \"collector:4317\"", "otlp_endpoint"),
            ("artifact_store = \"/srv/firmware\"", "artifact_store"),
            ("log_level = \"[[[\"", "log_level"),
            ("operator_cert_lifetime = \"1s\"", "operator_cert_lifetime"),
            ("device_cert_lifetime = \"4min\"", "device_cert_lifetime"),
            ("rollout_tick = \"0s\"", "rollout_tick"),
            ("rollout_tick = \"5m\"", "rollout_tick"),
            ("upload_idle = \"0s\"", "upload_idle"),
            ("upload_idle = \"7h\"", "upload_idle"),
        ] {
            let err = Settings::resolve(file(&format!("version = 1\n{text}")), with_file()).unwrap_err();
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
    }
}

/// How long retention keeps what it may purge (none: kept until an operator removes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionPolicy {
    pub delivered_outbox: Option<Duration>,
    pub clinical: Option<Duration>,
    pub interval: Duration,
}

impl RetentionPolicy {
    pub fn enabled(&self) -> bool {
        self.delivered_outbox.is_some() || self.clinical.is_some()
    }
}
