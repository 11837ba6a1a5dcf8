//! `medfleet sites` and `medfleet wards`: the location tree devices are placed in (devices themselves are
//! [`crate::devices`]).

pub(crate) mod sites;
pub(crate) mod wards;
