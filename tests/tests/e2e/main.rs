//! One test binary for every end-to-end suite (one link instead of one per file).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    // Helpers return the Option a proto field wants.
    clippy::unnecessary_wraps,
    // Chart values are exact decimals the test itself sent.
    clippy::float_cmp
)]

mod access;
mod audit;
mod binaries;
mod clinical;
mod config;
mod destinations;
mod firmware;
mod firmware_agent;
mod firmware_halts;
mod firmware_interrupted;
mod firmware_keys;
mod identity;
mod matrix;
mod operations;
mod registry;
mod safety;
mod security;
