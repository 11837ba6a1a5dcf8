//! Who may do what, and where: the permission every RPC needs ([`rules`], decided per request by [`policy`]), the one place-visibility rule ([`visibility`]), roles and grants in casbin with a
//! location scope as the domain ([`access`]), and `AccessService` ([`grpc`]).
//!
//! Invariants: deny by default (a method without a rule is refused); a grant on a scope covers everything below it
//! and nothing beside it. May call: audit, persistence.

pub mod access;
pub mod grpc;
pub mod policy;
pub mod rules;
pub mod visibility;
