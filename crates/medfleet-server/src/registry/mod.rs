//! The location tree and the devices in it: sites, wards, beds, devices with their tags and placements
//! ([`store`]), and `RegistryService` ([`grpc`]).
//!
//! Invariants: every write is one transaction that re-checks what it depends on; a device's placement history is
//! appended on every move. May call: authz, audit, persistence.

pub mod grpc;
pub mod store;
