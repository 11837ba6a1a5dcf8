//! Devices on the wire: the session hub each replica keeps for the devices connected to it ([`session`]), their
//! presence in the database ([`presence`]), and the group-committed ingest of reading batches ([`ingest`]).
//!
//! Invariants: a batch is acked only after the transaction that stores it commits; a replaced session never
//! overwrites its successor's presence. May call: clinical, device_config, registry, authz, persistence.

pub mod grpc;
pub mod ingest;
mod pace;
pub mod presence;
pub mod session;
