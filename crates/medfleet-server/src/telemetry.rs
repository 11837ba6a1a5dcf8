//! Logs, traces and metrics. Metrics are OpenTelemetry instruments exposed both as Prometheus text on `/metrics`
//! and, when an endpoint is configured, pushed over OTLP; one set of instruments feeds both.
//!
//! Labels are bounded, closed sets (RPC method, status code, outcome): never a patient, a device id or free text.

use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus::{Encoder as _, TextEncoder};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::settings::LogFormat;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Otlp(String),
    #[error("Prometheus exporter: {0}")]
    Prometheus(String),
    #[error("log filter: {0}")]
    Filter(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

fn resource() -> Resource {
    Resource::builder().with_service_name("medfleetd").build()
}

/// Keeps the trace exporter alive; flushes pending spans when dropped.
#[derive(Debug)]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("medfleetd: flushing traces failed: {error}");
        }
    }
}

/// Installs the process-wide subscriber: human or JSON logs, and OTLP traces when `otlp_endpoint` is set. Must
/// run inside the tokio runtime (the OTLP exporter is a tonic client).
pub fn init_tracing(
    format: LogFormat,
    filter: &str,
    otlp_endpoint: Option<&str>,
) -> Result<TracingGuard, TelemetryError> {
    let filter = EnvFilter::try_new(filter).map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_target(true).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    let provider = match otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource())
                    .build(),
            )
        }
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("medfleetd")));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TracingGuard { provider })
}

/// The server's metric instruments. One per running server (not global), so several servers in one test process
/// do not mix their numbers.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    rpc_requests: Counter<u64>,
    rpc_duration: Histogram<f64>,
    tls_handshakes: Counter<u64>,
    connections_refused: Counter<u64>,
    connection_limits: opentelemetry::metrics::Gauge<u64>,
    server_certificate_expiry: opentelemetry::metrics::Gauge<u64>,
    server_certificate_renewals: Counter<u64>,
    device_sessions: opentelemetry::metrics::Gauge<u64>,
    config_pushes: Counter<u64>,
    config_reports: Counter<u64>,
    readings: Counter<u64>,
    ingest_commit: Histogram<f64>,
    deliveries: Counter<u64>,
    purged: Counter<u64>,
    firmware_reports: Counter<u64>,
    firmware_bytes: Counter<u64>,
    firmware_metadata_expiry: opentelemetry::metrics::Gauge<u64>,
    rollout_decisions: Counter<u64>,
    rollout_devices: opentelemetry::metrics::Gauge<u64>,
    scheduler_leader: opentelemetry::metrics::Gauge<u64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(otlp_endpoint: Option<&str>) -> Result<Self, TelemetryError> {
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .map_err(|e| TelemetryError::Prometheus(e.to_string()))?;
        let mut builder = SdkMeterProvider::builder()
            .with_reader(prometheus)
            .with_resource(resource());
        if let Some(endpoint) = otlp_endpoint {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
            builder = builder.with_reader(PeriodicReader::builder(exporter).build());
        }
        let provider = builder.build();
        let meter = provider.meter("medfleetd");
        let inner = Inner {
            rpc_requests: meter
                .u64_counter("medfleet_rpc_requests")
                .with_description("gRPC requests by method and status code")
                .build(),
            rpc_duration: meter
                .f64_histogram("medfleet_rpc_duration")
                .with_description("gRPC request latency until response headers")
                .with_unit("s")
                .with_boundaries(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .build(),
            tls_handshakes: meter
                .u64_counter("medfleet_tls_handshakes")
                .with_description("TLS handshakes by outcome (ok, failed, timeout)")
                .build(),
            connections_refused: meter
                .u64_counter("medfleet_connections_refused")
                .with_description("connections closed by a limit (total, anonymous_total, anonymous_per_address)")
                .build(),
            connection_limits: meter
                .u64_gauge("medfleet_connection_limit")
                .with_description("configured connection limits by kind")
                .build(),
            server_certificate_expiry: meter
                .u64_gauge("medfleet_server_certificate_expiry")
                .with_description(
                    "notAfter of the server certificate new handshakes get, in seconds since the Unix epoch",
                )
                .with_unit("s")
                .build(),
            server_certificate_renewals: meter
                .u64_counter("medfleet_server_certificate_renewals")
                .with_description("live server certificate renewals by outcome (issued, adopted, failed)")
                .build(),
            device_sessions: meter
                .u64_gauge("medfleet_device_sessions")
                .with_description("device sessions open on this replica")
                .build(),
            config_pushes: meter
                .u64_counter("medfleet_config_pushes")
                .with_description("configuration pushes to device sessions by outcome (sent, deferred)")
                .build(),
            config_reports: meter
                .u64_counter("medfleet_config_reports")
                .with_description("configuration reports from devices by outcome (applied, rejected)")
                .build(),
            readings: meter
                .u64_counter("medfleet_readings")
                .with_description("reading items by outcome (accepted, duplicate, or the rejection reason)")
                .build(),
            ingest_commit: meter
                .f64_histogram("medfleet_ingest_commit")
                .with_description("duration of one group commit of reading batches")
                .with_unit("s")
                .with_boundaries(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0])
                .build(),
            deliveries: meter
                .u64_counter("medfleet_emr_deliveries")
                .with_description("EMR delivery attempts by destination kind and outcome (delivered, retry, dead)")
                .build(),
            purged: meter
                .u64_counter("medfleet_retention_purged")
                .with_description("rows removed by the retention policy by kind (delivery, observation, reading)")
                .build(),
            firmware_reports: meter
                .u64_counter("medfleet_firmware_reports")
                .with_description("firmware action reports from devices by state they reported")
                .build(),
            firmware_metadata_expiry: meter
                .u64_gauge("medfleet_firmware_metadata_expiry")
                .with_description(
                    "expiry of the TUF metadata devices are served, by role (root, targets, snapshot, timestamp), \
                     in seconds since the Unix epoch; devices refuse every update once root or targets expired",
                )
                .with_unit("s")
                .build(),
            firmware_bytes: meter
                .u64_counter("medfleet_firmware_bytes_served")
                .with_description("firmware image bytes sent to devices and operators")
                .with_unit("By")
                .build(),
            rollout_decisions: meter
                .u64_counter("medfleet_rollout_decisions")
                .with_description("scheduler decisions by kind (advance, complete, halt, deadline)")
                .build(),
            rollout_devices: meter
                .u64_gauge("medfleet_rollout_devices")
                .with_description("devices of each unfinished rollout by action state (set by the scheduler leader)")
                .build(),
            scheduler_leader: meter
                .u64_gauge("medfleet_rollout_scheduler_leader")
                .with_description("1 while this replica holds the rollout scheduler lease")
                .build(),
            registry,
            provider,
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    pub fn record_rpc(&self, method: &str, code: i32, seconds: f64) {
        let method = KeyValue::new("method", method.to_owned());
        self.inner.rpc_requests.add(
            1,
            &[
                method.clone(),
                KeyValue::new("code", format!("{:?}", tonic::Code::from_i32(code))),
            ],
        );
        self.inner.rpc_duration.record(seconds, &[method]);
    }

    pub fn record_handshake(&self, outcome: &'static str) {
        self.inner.tls_handshakes.add(1, &[KeyValue::new("outcome", outcome)]);
    }

    pub fn record_connection_refused(&self, limit: &'static str) {
        self.inner.connections_refused.add(1, &[KeyValue::new("limit", limit)]);
    }

    pub fn set_connection_limits(&self, total: usize, anonymous: usize, anonymous_per_address: usize) {
        for (kind, value) in [
            ("total", total),
            ("anonymous_total", anonymous),
            ("anonymous_per_address", anonymous_per_address),
        ] {
            self.inner
                .connection_limits
                .record(u64::try_from(value).unwrap_or(u64::MAX), &[KeyValue::new("kind", kind)]);
        }
    }

    pub fn set_firmware_metadata_expiry(&self, role: &'static str, expires: chrono::DateTime<chrono::Utc>) {
        let seconds = u64::try_from(expires.timestamp()).unwrap_or(0);
        self.inner
            .firmware_metadata_expiry
            .record(seconds, &[KeyValue::new("role", role)]);
    }

    pub fn set_server_certificate_expiry(&self, not_after: std::time::SystemTime) {
        let seconds = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        self.inner.server_certificate_expiry.record(seconds, &[]);
    }

    pub fn record_server_certificate_renewal(&self, outcome: &'static str) {
        self.inner
            .server_certificate_renewals
            .add(1, &[KeyValue::new("outcome", outcome)]);
    }

    pub fn set_device_sessions(&self, open: usize) {
        self.inner
            .device_sessions
            .record(u64::try_from(open).unwrap_or(u64::MAX), &[]);
    }

    pub fn record_config_pushes(&self, sent: usize) {
        self.inner.config_pushes.add(
            u64::try_from(sent).unwrap_or(u64::MAX),
            &[KeyValue::new("outcome", "sent")],
        );
    }

    pub fn record_config_push(&self, outcome: &'static str) {
        self.inner.config_pushes.add(1, &[KeyValue::new("outcome", outcome)]);
    }

    pub fn record_firmware_report(&self, state: &'static str) {
        self.inner.firmware_reports.add(1, &[KeyValue::new("state", state)]);
    }

    pub fn record_firmware_bytes(&self, bytes: u64) {
        self.inner.firmware_bytes.add(bytes, &[]);
    }

    pub fn record_rollout_decision(&self, decision: &str) {
        self.inner
            .rollout_decisions
            .add(1, &[KeyValue::new("decision", decision.to_owned())]);
    }

    /// Labels: the rollout id and the action state; never a device or patient.
    pub fn set_rollout_devices(&self, rollout: &str, state: &'static str, count: usize) {
        self.inner.rollout_devices.record(
            u64::try_from(count).unwrap_or(u64::MAX),
            &[
                KeyValue::new("rollout", rollout.to_owned()),
                KeyValue::new("state", state),
            ],
        );
    }

    pub fn set_scheduler_leader(&self, leading: bool) {
        self.inner.scheduler_leader.record(u64::from(leading), &[]);
    }

    pub fn record_config_report(&self, outcome: &'static str) {
        self.inner.config_reports.add(1, &[KeyValue::new("outcome", outcome)]);
    }

    pub fn record_readings(&self, outcome: &str, count: u64) {
        if count > 0 {
            self.inner
                .readings
                .add(count, &[KeyValue::new("outcome", outcome.to_owned())]);
        }
    }

    pub fn record_ingest_commit(&self, seconds: f64, batches: usize) {
        let size = match batches {
            0..=1 => "1",
            2..=16 => "2-16",
            _ => "17+",
        };
        self.inner
            .ingest_commit
            .record(seconds, &[KeyValue::new("batches", size)]);
    }

    pub fn record_delivery(&self, kind: &'static str, outcome: &'static str, count: u64) {
        self.inner
            .deliveries
            .add(count, &[KeyValue::new("kind", kind), KeyValue::new("outcome", outcome)]);
    }

    pub fn record_purged(&self, kind: &'static str, count: u64) {
        if count > 0 {
            self.inner.purged.add(count, &[KeyValue::new("kind", kind)]);
        }
    }

    /// Prometheus text exposition of every instrument.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.inner.registry.gather(), &mut out) {
            tracing::warn!(%error, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Flushes OTLP metrics on shutdown.
    pub fn shutdown(&self) {
        if let Err(error) = self.inner.provider.shutdown() {
            tracing::debug!(%error, "metrics provider shutdown");
        }
    }
}
