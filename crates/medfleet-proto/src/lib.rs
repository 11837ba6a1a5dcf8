//! The medfleet wire format: code generated from `proto/`, the explicit conversions between wire messages and the
//! domain types of `medfleet-core`, and the client side of the wire (mTLS channels, credential bundles, CSRs)
//! shared by the CLI and the device agent.

pub mod client;
pub mod convert;

/// Generated messages, clients and servers of the `medfleet.v1` package.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
pub mod v1 {
    tonic::include_proto!("medfleet.v1");
}

/// `google.rpc.ErrorInfo` reasons medfleetd attaches to statuses whose code alone is ambiguous (domain
/// `medfleet.example`), so clients can act on them without reading the message.
pub mod reasons {
    /// FAILED_PRECONDITION because a location names a ward or bed that does not exist (create it, then retry).
    pub const PLACE_NOT_FOUND: &str = "PLACE_NOT_FOUND";
    pub const DOMAIN: &str = "medfleet.example";
}

/// The encoded `FileDescriptorSet` of every medfleet proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/medfleet_descriptor.bin"));
