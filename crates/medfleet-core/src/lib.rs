//! Domain types and pure logic of medfleet: identities, validation rules, the registry model and paging.
//!
//! Nothing here performs I/O or knows the wire format; the proto crate converts into these types and the server
//! stores them. That keeps every rule unit- and property-testable.

pub mod clinical;
pub mod device_config;
pub mod digest;
pub mod firmware;
pub mod identity;
pub mod paging;
pub mod presence;
pub mod registry;
pub mod secrets;
pub mod validation;
