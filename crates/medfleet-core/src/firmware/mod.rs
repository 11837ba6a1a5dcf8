//! Firmware updates as pure rules: how a rollout is cut into waves and when it advances, halts or completes
//! ([`rollout`]), when one device may install (the clinical-use gate, failing closed), and maintenance windows in
//! a site's local time ([`window`]). The server's scheduler gathers the counts and applies these answers; signed
//! artifacts (TUF) and the device side come with the rest of the firmware capability.

pub mod rollout;
pub mod window;
