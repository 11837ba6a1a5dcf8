//! Reads of patient data, audited like writes (HIPAA): one event per patient and kind of read, counted into a
//! window by the [`Coalescer`](crate::audit::Coalescer) so a feed or a listing does not write a row per entry.

use std::collections::HashMap;
use std::time::Duration;

use uuid::Uuid;

use crate::audit::{Event, Outcome, device_scope};
use crate::error::Error;
use crate::persistence::entity::observation;

/// How long reads of one patient's data by one principal (per kind of read) are counted into one audit row.
pub const PHI_READ_WINDOW: Duration = Duration::from_mins(5);

/// An audit event for `actor` reading patient `patient`'s data (named by internal id, never the MRN).
pub fn phi_read(actor: &str, request_id: &str, kind: &str, patient: Uuid, scope: String, detail: String) -> Event {
    Event {
        actor: actor.to_owned(),
        action: format!("phi.read.{kind}"),
        target: format!("patient/{patient}"),
        scope,
        outcome: Outcome::Allowed,
        request_id: request_id.to_owned(),
        detail,
    }
}

/// A read of patient data the audit trail cannot record is not served (HIPAA: reads are audited like writes).
pub fn unaudited() -> Error {
    Error::Unavailable("the audit trail cannot record this read of patient data now; try again shortly".into())
}

/// One PHI-read event per patient among `shown`, scoped where the entries were charted.
pub fn read_events(actor: &str, request_id: &str, kind: &str, shown: &[&observation::Model]) -> Vec<Event> {
    let mut per_patient: HashMap<Uuid, (String, usize)> = HashMap::new();
    for o in shown {
        let entry = per_patient
            .entry(o.patient_id)
            .or_insert_with(|| (device_scope(o.site.as_deref(), o.ward.as_deref()), 0));
        entry.1 += 1;
    }
    per_patient
        .into_iter()
        .map(|(patient, (scope, entries))| {
            phi_read(
                actor,
                request_id,
                kind,
                patient,
                scope,
                format!("{entries} chart entries"),
            )
        })
        .collect()
}
