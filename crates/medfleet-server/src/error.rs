//! The server's error type and its one mapping to gRPC status codes.

use std::collections::HashMap;

use medfleet_core::validation::Violations;
use medfleet_proto::reasons;
use sea_orm::{DbErr, SqlErr};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is malformed; every offending field is listed.
    #[error(transparent)]
    Invalid(#[from] Violations),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well-formed but the current state does not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A location names a ward or bed that does not exist: a precondition (create it first), told apart from the
    /// others by its reason so a client can say "not found".
    #[error("{0}")]
    MissingPlace(String),
    /// Signed firmware metadata or an image refused by its verification: a precondition, with the stable reason
    /// (`untrusted_signature`, `hash_mismatch`, ...) in ErrorInfo so clients and devices can tell them apart.
    #[error("{message}")]
    Refused { reason: &'static str, message: String },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// A dependency the request needs (the audit trail) is failing; retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// The caller stopped sending (a stream went idle for longer than the server waits).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A destination's stored secret does not open with this replica's keyring.
    #[error(transparent)]
    Unreadable(#[from] Unreadable),
    #[error("database error: {0}")]
    Database(#[from] DbErr),
    /// Stored data that violates an invariant (a bug or manual tampering), never caused by the caller.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A destination whose secret does not open with this replica's keyring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the {field} of EMR destination '{destination}' cannot be decrypted, so nothing is sent to it: {source} \
     (medfleet emr update {destination} sets a new one)"
)]
pub struct Unreadable {
    pub destination: String,
    pub field: &'static str,
    #[source]
    pub source: medfleet_core::secrets::EnvelopeError,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Invalid(violations) => {
                let details = ErrorDetails::with_bad_request(
                    violations
                        .iter()
                        .map(|v| tonic_types::FieldViolation::new(v.field.clone(), v.description.clone()))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, violations.to_string(), details)
            }
            Error::NotFound(m) => Status::not_found(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::MissingPlace(m) => Status::with_error_details(
                Code::FailedPrecondition,
                m,
                ErrorDetails::with_error_info(reasons::PLACE_NOT_FOUND, reasons::DOMAIN, HashMap::new()),
            ),
            Error::Unreadable(e) => Status::failed_precondition(e.to_string()),
            Error::Refused { reason, message } => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                ErrorDetails::with_error_info(reason, reasons::DOMAIN, HashMap::new()),
            ),
            Error::Unauthenticated(m) => Status::unauthenticated(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::Unavailable(m) => Status::unavailable(m),
            Error::DeadlineExceeded(m) => Status::deadline_exceeded(m),
            Error::Database(e) => database_status(&e),
            Error::Internal(m) => internal(&m),
        }
    }
}

fn database_status(error: &DbErr) -> Status {
    // A unique-constraint race (two requests passing the same pre-check) is still the caller's conflict.
    if let Some(SqlErr::UniqueConstraintViolation(_)) = error.sql_err() {
        return Status::already_exists("a resource with the same unique key was created concurrently; retry to see it");
    }
    match error {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => {
            tracing::warn!(error = %error, "database unavailable");
            Status::unavailable("the database is unavailable; retry shortly")
        }
        _ => internal(&error.to_string()),
    }
}

/// Logs the details under a reference the operator can quote, and tells the caller only the reference.
fn internal(detail: &str) -> Status {
    let reference = uuid::Uuid::new_v4().simple().to_string();
    tracing::error!(reference = %reference, error = %detail, "internal error");
    Status::internal(format!(
        "internal error (reference {reference}); the server log has the details under this reference"
    ))
}
