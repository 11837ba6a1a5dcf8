//! Storage shared by every capability: the connection and migrations for SQLite and PostgreSQL ([`db`]), the
//! sea-orm entities ([`entity`]), and change notifications within and across replicas ([`events`]).
//!
//! Invariants: durable state lives only in the database; a change is announced inside the transaction that makes
//! it. Calls nothing else in the crate.

pub mod db;
pub mod entity;
pub mod events;
