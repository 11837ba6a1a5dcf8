//! The plain-HTTP operations listener: `/metrics` (Prometheus), `/healthz` (process alive), `/readyz` (able to
//! serve: database reachable and not shutting down) and `/crl` (the CA's DER certificate revocation list for
//! gateways and load balancers). It carries no PHI and needs no client certificate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use sea_orm::DatabaseConnection;

use crate::identity::pki::CertificateAuthority;
use crate::identity::revocation::Revocations;
use crate::telemetry::Metrics;

#[derive(Clone, Debug)]
pub struct OpsState {
    pub metrics: Metrics,
    pub db: DatabaseConnection,
    pub ca: Arc<CertificateAuthority>,
    pub revocations: Arc<Revocations>,
    /// Cleared when shutdown begins so load balancers stop sending new work.
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/crl", get(crl))
        .with_state(state)
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}

async fn crl(State(state): State<OpsState>) -> axum::response::Response {
    match state.revocations.crl(&state.ca) {
        Ok(der) => ([(header::CONTENT_TYPE, "application/pkix-crl")], der.as_ref().clone()).into_response(),
        Err(error) => {
            tracing::error!(%error, "signing the CRL failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "CRL unavailable\n").into_response()
        }
    }
}

async fn ready(State(state): State<OpsState>) -> impl IntoResponse {
    if !state.ready.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting or shutting down\n",
        );
    }
    match state.db.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(error) => {
            tracing::warn!(%error, "readiness: database unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, "not ready: database unreachable\n")
        }
    }
}
