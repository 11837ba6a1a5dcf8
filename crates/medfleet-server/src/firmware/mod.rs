//! Firmware images and the TUF repository that signs them for devices.
//!
//! Owns: medfleetd's online TUF keys (snapshot and timestamp, sealed at rest with the secrets keyring), the trusted
//! root versions an administrator installs, the current snapshot/timestamp/targets metadata ([`repository`]), and
//! the artifacts: streamed uploads verified against the offline-signed targets metadata before anything is kept,
//! stored as content-addressed chunks every replica reads ([`artifacts`]) or, when configured, as one object per image
//! in an object store ([`objects`]); and `FirmwareService` ([`grpc`]).
//!
//! Invariants: an artifact exists only if the targets role signed its exact hash and length to threshold under the
//! trusted root, with a release counter above every stored image of its model unless the signature authorises a
//! downgrade; the stored metadata set always verifies with tough from the first trusted root; medfleetd never
//! holds a root or targets key. Rollouts (which devices get which artifact) live in `rollouts`, which calls here;
//! nothing here calls rollouts except to ask whether an artifact is in use.

pub mod artifacts;
pub mod grpc;
pub mod objects;
pub mod repository;
