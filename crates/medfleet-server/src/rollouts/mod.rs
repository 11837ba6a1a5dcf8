//! Staged firmware rollouts: which devices get which artifact, wave by wave, and what each device reports.
//!
//! Owns: rollouts and their per-device actions ([`store`]: create from a selector or a list inside the caller's
//! scopes, operator commands, reads), the one scheduler across replicas ([`scheduler`]: a leader lease in the
//! database; advances, halts and completes rollouts by the rules of `medfleet_core::firmware::rollout`), what a
//! connected device is told and how its reports move its action ([`dispatch`], called by the session hub), each
//! device's serial and place for the people reading a rollout ([`places`]), and `RolloutService` ([`grpc`]).
//!
//! Invariants: a device is in at most one unfinished rollout (a unique index on `rollout_actions.active_device`);
//! every state change goes through `medfleet_core::firmware::state` (forward only; a finished action never
//! moves) and is audited; a device is told to install only after the clinical-use gate and the maintenance window
//! were evaluated at that moment (fail closed), never while its rollout is paused, halted or aborted. Calls
//! `firmware` (artifacts), `persistence`, `audit`; called by `devices` (the hub) and wired in `lib.rs`.

pub mod dispatch;
pub mod grpc;
pub mod places;
pub mod scheduler;
pub mod store;
