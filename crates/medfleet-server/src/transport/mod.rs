//! The network edge of a replica: TLS termination with our own client-certificate verifier ([`tls`]), the one RPC
//! layer every call passes through ([`rpc`]: request id, caller, access decision, span, metrics), the plain-HTTP
//! operations listener ([`http`]), and live renewal of the server certificate ([`server_cert`]).
//!
//! Invariants: every RPC is decided by [`crate::authz::policy`] before a handler runs; a revoked certificate's
//! connections close at once; everything that comes from the network is bounded ([`limits`], [`tls`]).
//! May call: identity (CA, revocation), authz, audit, telemetry, settings. Only `lib.rs` calls it.

pub mod http;
pub mod rpc;
pub mod server_cert;
pub mod tls;

/// Network resource limits beside the connection limits in [`tls`] (values and reasons in ARCHITECTURE.md).
pub mod limits {
    use std::time::Duration;

    /// HTTP/2 streams one connection may have open: a device needs two (session, readings), the CLI a handful;
    /// an integration multiplexing feeds and listings stays far below.
    pub const STREAMS_PER_CONNECTION: u32 = 64;
    /// Ping an idle connection this often, and drop it if the ping is not answered in time: a monitor whose
    /// network went away stops holding a session (and its presence) within a minute.
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
    /// Connections are recycled after this long so long-lived device sessions spread over replicas again after
    /// a scale-out (the agent reconnects at once); the grace lets in-flight calls finish.
    pub const MAX_CONNECTION_AGE: Duration = Duration::from_hours(6);
    pub const MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_mins(5);
    /// A unary call (and the opening of a stream) is answered within this or fails with DEADLINE_EXCEEDED; a
    /// client-streaming upload is bounded by its idle time instead (the `upload_idle` setting).
    pub const UNARY_TIMEOUT: Duration = Duration::from_mins(1);
    /// Largest Enroll request (token + CSR).
    pub const ENROLL_MESSAGE: usize = 64 * 1024;
    /// Largest message on device streams (a reading batch, a session message).
    pub const DEVICE_MESSAGE: usize = 4 * 1024 * 1024;
    /// A firmware upload's header (signed targets metadata up to 8 MiB) or one of its 1 MiB chunks.
    pub const FIRMWARE_MESSAGE: usize = 9 * 1024 * 1024;
}
