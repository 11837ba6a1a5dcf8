//! Who a caller is: medfleet's certificate authority and CSR policy ([`pki`]), the data directory holding its key material
//! ([`data_dir`]), the keyring that seals secrets
//! at rest ([`secrets`]), enrollment tokens, certificates and revocation ([`credentials`]), the revocation log
//! every replica follows ([`revocation`]), and `EnrollmentService`/`CredentialService` ([`grpc`]).
//!
//! Invariants: a device's private key never leaves it (enrollment takes a CSR); a revocation reaches every
//! replica's verifier at once; the CA key is sealed at rest. May call: registry, devices::presence, authz, audit,
//! persistence.

pub mod credentials;
pub mod data_dir;
pub mod files;
pub mod grpc;
pub mod pki;
pub mod revocation;
pub mod secrets;
