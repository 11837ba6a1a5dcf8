//! The one tower layer every RPC passes through: request id, caller identity, access decision, span and metrics.
//!
//! The decision follows [`crate::authz::rules::RULES`]: authentication first (who is calling, from the connection's
//! certificate), then, for role-governed methods, the casbin decision on the target's scope, resolved from the
//! request message before the handler runs. Handlers never check who is calling; they read the [`Caller`] (and,
//! for listings, the [`Decision`]'s visibility) this layer put in the request extensions. Every PERMISSION_DENIED
//! answered to a caller that presented a certificate, whether this layer or a handler decided it, reaches the audit
//! trail through [`Refusals`], coalesced per (principal, method) and window (anonymous refusals are logged and
//! counted only, so nobody can fill the trail without credentials).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt as _;
use medfleet_core::identity::Identity;
use sea_orm::DatabaseConnection;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument as _;

use crate::audit::{self, Outcome};
use crate::authz::access::Access;
use crate::authz::policy::{self, Decision, Rule};
use crate::telemetry::Metrics;
use crate::transport::limits;
use crate::transport::tls::PeerInfo;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The largest request message the layer reads to find its target (tonic's own default limit).
const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// The one client-streaming call whose answer waits for all the caller sends.
const UPLOAD_PATH: &str = "/medfleet.v1.FirmwareService/UploadArtifact";

/// The request id of the current request (present on every request, anonymous ones included).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The audit context of a request: the caller (or "anonymous") and the request id.
pub fn audit_context<T>(request: &tonic::Request<T>) -> crate::audit::Context {
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let actor = request
        .extensions()
        .get::<Caller>()
        .map_or_else(|| "anonymous".to_owned(), |c| c.identity.to_string());
    crate::audit::Context::new(actor, request_id)
}

/// The authenticated caller; the RPC layer guarantees it for every method that is not anonymous.
pub(crate) fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("this method needs a client certificate"))
}

/// The authenticated caller of the current request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub request_id: String,
    /// Serial (hex) and expiry of the certificate the caller connected with.
    pub certificate: Option<(String, std::time::SystemTime)>,
}

/// Who is calling, as far as the method's rule needs to know: `Ok(None)` for an anonymous enrollment.
pub fn authenticate(peer: Option<&PeerInfo>, path: &str) -> Result<Option<Identity>, Status> {
    let Some(rule) = policy::rule_for(path) else {
        return Err(Status::unimplemented(format!("{path} is not served by medfleetd")));
    };
    if matches!(rule, Rule::Anonymous) {
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
    let refused = match (rule, &identity) {
        (Rule::Devices, Identity::Device(_))
        | (Rule::AnyIdentity | Rule::Anonymous | Rule::DevicesOrPermission { .. }, _)
        | (Rule::Permission { .. }, Identity::User(_) | Identity::Service(_)) => None,
        (Rule::Devices, _) => Some("devices"),
        (Rule::Permission { .. }, Identity::Device(_)) => Some("operators and integrations"),
    };
    match refused {
        None => Ok(Some(identity)),
        Some(needed) => Err(Status::permission_denied(format!(
            "{path} is for {needed}; {identity} is a {} identity",
            identity.kind()
        ))),
    }
}

/// The message of a unary gRPC request body: one uncompressed length-prefixed frame.
fn message(frame: &[u8]) -> Result<&[u8], Status> {
    let Some((header, rest)) = frame.split_at_checked(5) else {
        return Ok(&[]);
    };
    if header[0] != 0 {
        return Err(Status::unimplemented(
            "compressed requests are not accepted; send them uncompressed",
        ));
    }
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    rest.get(..length)
        .ok_or_else(|| Status::invalid_argument("the request frame is shorter than its length prefix"))
}

#[derive(Clone)]
pub struct RpcLayer {
    metrics: Metrics,
    access: Arc<Access>,
    db: DatabaseConnection,
    refusals: Refusals,
}

impl std::fmt::Debug for RpcLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcLayer").finish_non_exhaustive()
    }
}

impl RpcLayer {
    pub fn new(metrics: Metrics, access: Arc<Access>, db: DatabaseConnection, refusals: Refusals) -> Self {
        Self {
            metrics,
            access,
            db,
            refusals,
        }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    layer: RpcLayer,
}

impl<S> std::fmt::Debug for RpcService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcService").finish_non_exhaustive()
    }
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

/// `grpc-message` is percent-encoded on the wire (gRPC over HTTP/2); the audit trail stores the text.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The metric label of a method: exact methods by name, standard services by prefix, anything else "unknown", so
/// callers cannot grow the metric's cardinality with made-up method names.
fn rule_label(path: &str) -> String {
    let prefix = policy::RULES
        .iter()
        .find(|(key, _)| key.ends_with('/') && path.starts_with(key))
        .map(|(key, _)| format!("{key}*"));
    match (prefix, policy::rule_for(path)) {
        (Some(prefix), _) => prefix,
        (None, Some(_)) => path.to_owned(),
        (None, None) => "unknown".to_owned(),
    }
}

/// How long refusals of one (principal, method) are counted into one audit row after the first is written.
pub const REFUSAL_WINDOW: std::time::Duration = std::time::Duration::from_mins(1);
/// The one path by which refusals of certificate holders reach the audit trail, whether the RPC layer or a
/// handler decided them, coalesced per (principal, method) and [`REFUSAL_WINDOW`]: a device looping forbidden
/// calls costs at most two audit rows a minute and never holds SQLite's write lock against ingest call after call.
#[derive(Debug, Clone)]
pub struct Refusals(audit::Coalescer);

impl Refusals {
    pub fn new(db: DatabaseConnection, window: std::time::Duration) -> Self {
        Self(audit::Coalescer::new(db, window))
    }

    /// Records a refusal of `actor` (an identity URI, or "certificate <serial>" for a certificate without a
    /// usable identity). `serial` is the certificate's, kept as a detail so a refusal can be tied to the exact
    /// credential.
    pub async fn record(
        &self,
        actor: &str,
        serial: Option<&str>,
        path: &str,
        scope: &str,
        request_id: &str,
        status: &Status,
    ) {
        let status_text = format!("{:?}: {}", status.code(), status.message());
        let detail = match serial {
            Some(serial) => format!("{status_text} (certificate {serial})"),
            None => status_text,
        };
        let event = audit::Event {
            actor: actor.chars().take(200).collect(),
            action: path.to_owned(),
            target: path.to_owned(),
            scope: scope.chars().take(200).collect(),
            outcome: Outcome::Denied,
            request_id: request_id.to_owned(),
            // Bounded and printable: a caller controls part of the message.
            detail: detail
                .chars()
                .take(500)
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        };
        self.0.record(vec![event]).await;
    }

    pub fn spawn_flusher(&self, stop: tokio_util::sync::CancellationToken) {
        self.0.spawn_flusher(stop);
    }
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

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let started = Instant::now();
        let path = request.uri().path().to_owned();
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
        let metrics = self.layer.metrics.clone();
        let finish = move |mut response: Response<Body>, span: &tracing::Span| {
            let code = grpc_code(&response);
            span.record("grpc.code", code);
            metrics.record_rpc(&method_label, code, started.elapsed().as_secs_f64());
            if let Some(value) = header_value.clone() {
                response.headers_mut().insert(REQUEST_ID_HEADER, value);
            }
            response
        };
        let peer = request.extensions().get::<PeerInfo>();
        let certificate = peer.and_then(|p| p.certificate.clone());
        let refused_actor = peer_actor(peer);
        let authenticated = authenticate(peer, &path);
        let layer = self.layer.clone();
        // Every call — reading its body, the access decision and the handler — is answered within the unary
        // deadline, except an upload, which is answered after its last chunk and bounded by its idle time instead
        // (its body is never read here: the decision on it needs none).
        let deadline = (path != UPLOAD_PATH).then_some(limits::UNARY_TIMEOUT);
        let late = finish.clone();
        // The clone that was polled ready is the one that must serve the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);

        let work = async move {
            let span = tracing::Span::current();
            let identified = certificate.is_some();
            let serial = certificate.as_ref().map(|(serial, _)| serial.clone());
            let refuse = |status: Status, actor: String, scope: String| {
                let (refusals, path, request_id, span, serial) = (
                    layer.refusals.clone(),
                    path.clone(),
                    request_id.clone(),
                    span.clone(),
                    serial.clone(),
                );
                let finish = finish.clone();
                async move {
                    tracing::info!(code = ?status.code(), reason = status.message(), "request refused");
                    if status.code() != tonic::Code::Unimplemented && identified {
                        refusals
                            .record(&actor, serial.as_deref(), &path, &scope, &request_id, &status)
                            .await;
                    }
                    finish(status.into_http(), &span)
                }
            };
            let identity = match authenticated {
                Ok(identity) => identity,
                Err(status) => {
                    return Ok(refuse(status, refused_actor, String::new()).await);
                }
            };
            let mut request = request;
            let permission = match (&identity, policy::rule_for(&path)) {
                (Some(identity), Some(Rule::Permission { object, action, target })) => {
                    Some((identity, object, action, target))
                }
                (
                    Some(identity @ (Identity::User(_) | Identity::Service(_))),
                    Some(Rule::DevicesOrPermission { object, action }),
                ) => Some((identity, object, action, policy::Target::Global)),
                _ => None,
            };
            if let Some((identity, object, action, target)) = permission
                && !target.reads_body()
            {
                match policy::decide(&layer.access, &layer.db, identity, object, action, target, &[]).await {
                    Ok(decision) => {
                        request.extensions_mut().insert::<Decision>(decision);
                    }
                    Err(refusal) => {
                        return Ok(refuse(refusal.status, identity.to_string(), refusal.scope).await);
                    }
                }
            } else if let Some((identity, object, action, target)) = permission {
                let (parts, body) = request.into_parts();
                let Ok(collected) = http_body_util::Limited::new(body, MAX_MESSAGE).collect().await else {
                    let status = Status::resource_exhausted("the request is larger than 4 MiB");
                    return Ok(refuse(status, identity.to_string(), String::new()).await);
                };
                let bytes: Bytes = collected.to_bytes();
                let decided = match message(&bytes) {
                    Ok(message) => {
                        policy::decide(&layer.access, &layer.db, identity, object, action, target, message).await
                    }
                    Err(status) => Err(policy::Refusal {
                        status,
                        scope: String::new(),
                    }),
                };
                match decided {
                    Ok(decision) => {
                        request = Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)));
                        request.extensions_mut().insert::<Decision>(decision);
                    }
                    Err(refusal) => {
                        return Ok(refuse(refusal.status, identity.to_string(), refusal.scope).await);
                    }
                }
            }
            request.extensions_mut().insert(RequestId(request_id.clone()));
            match identity {
                Some(identity) => {
                    span.record("caller", tracing::field::display(&identity));
                    request.extensions_mut().insert(Caller {
                        identity,
                        request_id: request_id.clone(),
                        certificate,
                    });
                }
                None => {
                    span.record("caller", "anonymous");
                }
            }
            let response = inner.call(request).await?;
            // A handler's refusal (decided on stored rows: a feed outside the caller's scopes, a session for
            // another device) takes the same path to the audit trail as the layer's own.
            if grpc_code(&response) == tonic::Code::PermissionDenied as i32 && identified {
                let message = response
                    .headers()
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .map(percent_decode)
                    .unwrap_or_default();
                let status = Status::permission_denied(message);
                layer
                    .refusals
                    .record(&refused_actor, serial.as_deref(), &path, "", &request_id, &status)
                    .await;
            }
            Ok(finish(response, &span))
        }
        .instrument(span.clone());
        Box::pin(async move {
            let Some(deadline) = deadline else {
                return work.await;
            };
            if let Ok(answer) = tokio::time::timeout(deadline, work).await {
                answer
            } else {
                let status = Status::deadline_exceeded(format!(
                    "not answered within {} s; retry, and tell the operators if it persists",
                    deadline.as_secs()
                ));
                Ok(late(status.into_http(), &span))
            }
        })
    }
}

/// How a refused caller is named in the audit trail: its identity URI when its certificate carries one (so
/// `audit list --actor medfleet://device/<id>` finds it), else its certificate serial.
fn peer_actor(peer: Option<&PeerInfo>) -> String {
    match peer {
        Some(PeerInfo {
            identity: Ok(identity), ..
        }) => identity.to_string(),
        Some(PeerInfo {
            certificate: Some((serial, _)),
            ..
        }) => format!("certificate {serial}"),
        _ => "anonymous".to_owned(),
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
    fn principal_kinds_per_rule() {
        let user = peer(Ok(Identity::User("alice".into())));
        let device = peer(Ok(Identity::Device(uuid::Uuid::new_v4())));
        let service = peer(Ok(Identity::Service("epic".into())));
        let path = "/medfleet.v1.RegistryService/ListDevices";
        assert!(authenticate(Some(&user), path).is_ok());
        assert!(
            authenticate(Some(&service), path).is_ok(),
            "services are governed by their role grants"
        );
        let status = authenticate(Some(&device), path).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(authenticate(Some(&device), "/grpc.health.v1.Health/Check").is_ok());
        assert!(authenticate(Some(&device), "/medfleet.v1.DeviceService/Session").is_ok());
        let status = authenticate(Some(&user), "/medfleet.v1.DeviceService/Session").unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        for p in [&device, &service, &user] {
            assert!(authenticate(Some(p), "/medfleet.v1.CredentialService/Renew").is_ok());
        }
    }

    #[test]
    fn enrollment_is_the_only_anonymous_method() {
        let anonymous = peer(Err("no client certificate".into()));
        assert_eq!(
            authenticate(Some(&anonymous), "/medfleet.v1.EnrollmentService/Enroll").unwrap(),
            None
        );
        for path in [
            "/medfleet.v1.CredentialService/Renew",
            "/medfleet.v1.DeviceService/Session",
            "/medfleet.v1.RegistryService/ListSites",
            "/grpc.health.v1.Health/Check",
        ] {
            let status = authenticate(Some(&anonymous), path).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{path}");
        }
        assert_eq!(authenticate(None, "/x").unwrap_err().code(), tonic::Code::Unimplemented);
        let user = peer(Ok(Identity::User("alice".into())));
        let status = authenticate(Some(&user), "/evil.Service/Do").unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }

    #[test]
    fn frames() {
        assert_eq!(message(&[0, 0, 0, 0, 2, 7, 8]).unwrap(), &[7, 8]);
        assert_eq!(message(&[]).unwrap(), &[] as &[u8]);
        assert_eq!(
            message(&[1, 0, 0, 0, 0]).unwrap_err().code(),
            tonic::Code::Unimplemented
        );
        assert_eq!(
            message(&[0, 0, 0, 0, 9, 1]).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            rule_label("/grpc.health.v1.Health/Anything"),
            "/grpc.health.v1.Health/*"
        );
        assert_eq!(
            rule_label("/medfleet.v1.RegistryService/GetSite"),
            "/medfleet.v1.RegistryService/GetSite"
        );
        assert_eq!(rule_label("/medfleet.v1.RegistryService/Made-Up"), "unknown");
    }
}
