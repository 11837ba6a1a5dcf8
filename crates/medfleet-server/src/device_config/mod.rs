//! Device configuration: immutable versions of every layer, per-model JSON Schemas, the desired document of each
//! device and its drift from what the device reports ([`store`]), and `ConfigService` ([`grpc`]). The layer merge
//! itself is pure logic in `medfleet_core::device_config`.
//!
//! Invariants: a version is never edited, only superseded; nothing invalid against the model's schema becomes
//! desired. May call: devices::presence, authz, audit, persistence.

pub mod grpc;
pub mod store;
