//! Firmware updates as pure rules: how a rollout is cut into waves and when it advances, halts or completes, and
//! when one device may install (the clinical-use gate, failing closed) ([`rollout`]); maintenance windows in a
//! site's local time ([`window`]); whether a signed target may replace what a device runs ([`target`]: same model,
//! a higher release counter, or a downgrade the targets role signed); the states of a rollout and of each device's
//! action, and the only moves between them ([`state`]). The server's scheduler and the agent gather
//! the facts and apply these answers. [`tuf`] signs and verifies the TUF metadata that carries those targets (offline
//! root/targets keys, online snapshot/timestamp keys), one verification for medfleetd and the agent; [`keyfile`]
//! seals an offline key under its holder's passphrase.

pub mod keyfile;
pub mod rollout;
pub mod state;
pub mod target;
pub mod tuf;
pub mod window;
