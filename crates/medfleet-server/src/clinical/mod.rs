//! The chart: patients, device–patient associations, ingest of reading batches, canonical observations and the
//! EMR outbox. Every path that creates chart entries (ingest, a retroactive association, a status change) goes
//! through `chart::chart` and `outbox::enqueue`, so the invariants live in one place:
//!
//! - a reading is charted to the patient whose association covers its observation time, and only once (its
//!   `observation_id` is set in the transaction that creates the observation, under the device's row lock);
//! - every chart event gets one outbox row per destination that covers it, in the same transaction;
//! - outbox ids are assigned in commit order (inserts hold the outbox lock until commit), so a feed cursor never
//!   skips an event that commits late.
//!
//! Patient identifiers never reach a log line or an error message from here.

use std::sync::Arc;

use medfleet_core::clinical::association::check_patient_identifier;
use medfleet_core::validation::Violations;
use sea_orm::DatabaseConnection;

use crate::error::Result;
use crate::persistence::events::Events;

mod associations;
mod backlog;
mod chart;
pub mod grpc;
mod outbox;
mod patients;

pub use associations::AssociationView;
pub(crate) use chart::decode_limits;
pub use chart::{Batch, Outcome, Rejected, decode_measurement, encode_components};
pub use outbox::{DestinationKind, Route};
pub(crate) use outbox::{Pending, enqueue};

use chart::AlarmCache;
pub use patients::{AdtKind, AdtOutcome, AdtRequest};

/// A patient as a request names them (validated).
#[derive(Clone, PartialEq, Eq)]
pub struct PatientKey {
    pub identifier: String,
    pub authority: String,
    pub display_name: Option<String>,
}

impl std::fmt::Debug for PatientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PatientKey(<redacted>)")
    }
}

impl PatientKey {
    pub fn parse(field: &str, identifier: &str, authority: &str, display_name: &str) -> Result<Self> {
        check_patient_identifier(identifier, authority).map_err(|reason| Violations::single(field, reason))?;
        if display_name.chars().count() > 200 || display_name.chars().any(char::is_control) {
            return Err(Violations::single(
                format!("{field}.display_name"),
                "the display name must be at most 200 characters without control characters",
            )
            .into());
        }
        Ok(Self {
            identifier: identifier.trim().to_owned(),
            authority: authority.to_owned(),
            display_name: (!display_name.is_empty()).then(|| display_name.to_owned()),
        })
    }
}

/// Where an association came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Clinician,
    /// An ADT event. `from_emr`: sent by an integration (service identity), whose patient names are
    /// authoritative; an ADT event a person sends (testing a feed from the CLI) only fills in missing names.
    Adt {
        from_emr: bool,
    },
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Clinician => "clinician",
            Source::Adt { .. } => "adt",
        }
    }
}

/// Delivery states of an outbox row.
pub mod state {
    /// Waiting for (another) delivery attempt by the destination's relay.
    pub const PENDING: &str = "pending";
    pub const DELIVERED: &str = "delivered";
    /// Gave up: visible to admins, retried only on request.
    pub const DEAD: &str = "dead";
    /// Served by the feed to subscribers (each subscription keeps its own cursor).
    pub const FEED: &str = "feed";
    /// Never sent: a newer status of the same entry was queued for the destination first.
    pub const SUPERSEDED: &str = "superseded";
}

#[derive(Debug, Clone)]
pub struct Clinical {
    db: DatabaseConnection,
    events: Arc<Events>,
    future_tolerance: chrono::Duration,
    alarms: AlarmCache,
    backlog_wake: Arc<tokio::sync::Notify>,
}

impl Clinical {
    pub fn new(db: DatabaseConnection, events: Arc<Events>, future_tolerance: std::time::Duration) -> Self {
        Self {
            db,
            events,
            future_tolerance: chrono::Duration::from_std(future_tolerance).unwrap_or(chrono::Duration::seconds(30)),
            alarms: AlarmCache::default(),
            backlog_wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }
}
