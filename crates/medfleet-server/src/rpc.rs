//! The one tower layer every RPC passes through: request id, caller identity, access decision, span and metrics.
//!
//! Handlers never check who is calling; they read the [`Caller`] this layer put in the request extensions.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderValue, Request, Response};
use medfleet_core::identity::Identity;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument as _;

use crate::telemetry::Metrics;
use crate::tls::PeerInfo;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The authenticated caller of the current request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub request_id: String,
    /// Serial (hex) and expiry of the certificate the caller connected with.
    pub certificate: Option<(String, std::time::SystemTime)>,
}

/// Who may call a family of RPCs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone who completed the TLS handshake, with or without a client certificate (enrollment only: the
    /// one-time token is the credential).
    Anonymous,
    /// Any authenticated principal (health, reflection, renewing one's own certificate).
    AnyIdentity,
    /// Devices only, each for itself (the handler matches the request's claims against the certificate).
    Devices,
    /// Operators only (`medfleet://user/...`).
    Users,
}

/// Access rules by method-path prefix; the first match wins, so a specific method comes before its service.
/// A method no rule matches is refused: deny by default.
pub const SERVICE_ACCESS: &[(&str, Access)] = &[
    ("/grpc.health.v1.Health/", Access::AnyIdentity),
    ("/grpc.reflection.v1.ServerReflection/", Access::AnyIdentity),
    ("/grpc.reflection.v1alpha.ServerReflection/", Access::AnyIdentity),
    ("/medfleet.v1.EnrollmentService/Enroll", Access::Anonymous),
    ("/medfleet.v1.CredentialService/Renew", Access::AnyIdentity),
    ("/medfleet.v1.CredentialService/", Access::Users),
    ("/medfleet.v1.DeviceService/", Access::Devices),
    ("/medfleet.v1.RegistryService/", Access::Users),
];

fn rule_label(path: &str) -> String {
    let prefix = crate::policy::RULES
        .iter()
        .find(|(key, _)| key.ends_with('/') && path.starts_with(key))
        .map(|(key, _)| format!("{key}*"));
    match (prefix, crate::policy::rule_for(path)) {
        (Some(prefix), _) => prefix,
        (None, Some(_)) => path.to_owned(),
        (None, None) => "unknown".to_owned(),
    }
}

fn rule_for(path: &str) -> Option<(&'static str, Access)> {
    SERVICE_ACCESS
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix))
        .copied()
}

/// The access decision for `path` called over a connection with `peer`: the caller's identity (`None` for an
/// anonymous enrollment) or the status to refuse with.
pub fn authorize(peer: Option<&PeerInfo>, path: &str) -> Result<Option<Identity>, Status> {
    let rule = rule_for(path).map(|(_, access)| access);
    if rule == Some(Access::Anonymous) {
        return Ok(peer.and_then(|p| p.identity.clone().ok()));
    }
    let identity = match peer.map(|p| &p.identity) {
        Some(Ok(identity)) => identity.clone(),
        Some(Err(reason)) => {
            return Err(Status::unauthenticated(format!(
                "{path} needs a client certificate with a medfleet identity ({reason}); use credentials issued by \
                 medfleet"
            )));
        }
        None => return Err(Status::unauthenticated("no client certificate")),
    };
    let allowed = match (rule, &identity) {
        (None, _) => return Err(Status::unimplemented(format!("{path} is not served by medfleetd"))),
        (Some(Access::AnyIdentity | Access::Anonymous), _)
        | (Some(Access::Users), Identity::User(_))
        | (Some(Access::Devices), Identity::Device(_)) => true,
        (Some(Access::Users | Access::Devices), _) => false,
    };
    if allowed {
        return Ok(Some(identity));
    }
    let needed = if rule == Some(Access::Devices) {
        "devices"
    } else {
        "operators (user identities)"
    };
    Err(Status::permission_denied(format!(
        "{path} is for {needed}; {identity} is a {} identity",
        identity.kind()
    )))
}

#[derive(Debug, Clone)]
pub struct RpcLayer {
    metrics: Metrics,
}

impl RpcLayer {
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: Metrics,
}

/// A caller-supplied request id is kept (for correlation with client logs) only if it is short and printable.
fn request_id(request: &Request<Body>) -> String {
    request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

fn grpc_code<B>(response: &Response<B>) -> i32 {
    // Errors from handlers are trailers-only responses, so the status is in the headers; a response without it
    // in the headers carries OK in its trailers.
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl<S> Service<Request<Body>> for RpcService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let started = Instant::now();
        let path = request.uri().path().to_owned();
        // Unknown paths are folded into one label so callers cannot grow the metric's cardinality.
        // Only exact methods are labelled by name; a prefix rule (a standard service) labels by its prefix, so
        // callers cannot grow the metric's cardinality with made-up method names.
        let method_label = rule_label(&path);
        let request_id = request_id(&request);
        let span = tracing::info_span!(
            "rpc",
            rpc.method = %path,
            request_id = %request_id,
            caller = tracing::field::Empty,
            grpc.code = tracing::field::Empty,
        );
        let header_value = HeaderValue::from_str(&request_id).ok();
        let metrics = self.metrics.clone();
        let finish = move |mut response: Response<Body>, span: &tracing::Span| {
            let code = grpc_code(&response);
            span.record("grpc.code", code);
            metrics.record_rpc(&method_label, code, started.elapsed().as_secs_f64());
            if let Some(value) = header_value {
                response.headers_mut().insert(REQUEST_ID_HEADER, value);
            }
            response
        };

        let peer = request.extensions().get::<PeerInfo>();
        let certificate = peer.and_then(|p| p.certificate.clone());
        match authorize(peer, &path) {
            Err(status) => {
                let _entered = span.enter();
                tracing::info!(code = ?status.code(), reason = status.message(), "request refused");
                let response = finish(status.into_http(), &span);
                Box::pin(std::future::ready(Ok(response)))
            }
            Ok(identity) => {
                if let Some(identity) = identity {
                    span.record("caller", tracing::field::display(&identity));
                    request.extensions_mut().insert(Caller {
                        identity,
                        request_id,
                        certificate,
                    });
                } else {
                    span.record("caller", "anonymous");
                }
                // The clone that was polled ready is the one that must serve the call.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move {
                    let response = inner.call(request).instrument(span.clone()).await?;
                    Ok(finish(response, &span))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(identity: Result<Identity, String>) -> PeerInfo {
        PeerInfo {
            remote_addr: ([127, 0, 0, 1], 1).into(),
            identity,
            certificate: None,
        }
    }

    #[test]
    fn registry_is_for_users_only() {
        let user = peer(Ok(Identity::User("alice".into())));
        let device = peer(Ok(Identity::Device(uuid::Uuid::new_v4())));
        let service = peer(Ok(Identity::Service("epic".into())));
        let path = "/medfleet.v1.RegistryService/ListDevices";
        assert!(authorize(Some(&user), path).is_ok());
        assert_eq!(
            authorize(Some(&device), path).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            authorize(Some(&service), path).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(authorize(Some(&device), "/grpc.health.v1.Health/Check").is_ok());
    }

    #[test]
    fn enrollment_is_the_only_anonymous_method() {
        let anonymous = peer(Err("no client certificate".into()));
        assert_eq!(
            authorize(Some(&anonymous), "/medfleet.v1.EnrollmentService/Enroll").unwrap(),
            None
        );
        for path in [
            "/medfleet.v1.CredentialService/Renew",
            "/medfleet.v1.DeviceService/Session",
            "/medfleet.v1.RegistryService/ListSites",
            "/grpc.health.v1.Health/Check",
        ] {
            let status = authorize(Some(&anonymous), path).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{path}");
        }
    }

    #[test]
    fn renewal_for_all_issuing_for_users_sessions_for_devices() {
        let device = peer(Ok(Identity::Device(uuid::Uuid::new_v4())));
        let service = peer(Ok(Identity::Service("epic".into())));
        let user = peer(Ok(Identity::User("alice".into())));
        for p in [&device, &service, &user] {
            assert!(authorize(Some(p), "/medfleet.v1.CredentialService/Renew").is_ok());
        }
        assert!(authorize(Some(&service), "/medfleet.v1.CredentialService/IssueCredentials").is_err());
        assert!(authorize(Some(&user), "/medfleet.v1.CredentialService/IssueCredentials").is_ok());
        assert!(authorize(Some(&device), "/medfleet.v1.DeviceService/Session").is_ok());
        let status = authorize(Some(&user), "/medfleet.v1.DeviceService/Session").unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn no_identity_is_unauthenticated_and_unknown_paths_are_refused() {
        let anonymous = peer(Err("no SAN".into()));
        let status = authorize(Some(&anonymous), "/grpc.health.v1.Health/Check").unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(authorize(None, "/x").unwrap_err().code(), tonic::Code::Unauthenticated);
        let user = peer(Ok(Identity::User("alice".into())));
        assert_eq!(
            authorize(Some(&user), "/evil.Service/Do").unwrap_err().code(),
            tonic::Code::Unimplemented
        );
    }
}
