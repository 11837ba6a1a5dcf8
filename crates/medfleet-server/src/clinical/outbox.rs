//! The EMR outbox: which destinations a chart event goes to ([`routes`]), and the rows queued for them in the
//! transaction that charts it ([`enqueue`]), in commit order, superseding undelivered rows of the same entry.

use std::collections::BTreeSet;

use medfleet_core::clinical::chart::ChartStatus;
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveValue::Set, ColumnTrait as _, ConnectionTrait, DbBackend, EntityTrait as _, QueryFilter as _};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::persistence::db::insert_all;
use crate::persistence::db::now;
use crate::persistence::entity::{emr_destination, emr_outbox};
use crate::persistence::events::{Event, Events};

use super::state;

/// Arbitrary but fixed key of the advisory lock that orders outbox inserts by commit on PostgreSQL.
pub(super) const OUTBOX_LOCK_KEY: i64 = 0x6d65_6466_6c74_0005;

/// The kinds of EMR destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationKind {
    Feed,
    Fhir,
    Mllp,
}

impl DestinationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationKind::Feed => "feed",
            DestinationKind::Fhir => "fhir",
            DestinationKind::Mllp => "mllp",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "feed" => DestinationKind::Feed,
            "fhir" => DestinationKind::Fhir,
            "mllp" => DestinationKind::Mllp,
            _ => return None,
        })
    }
}

/// The routing part of a destination, enough to decide which chart events it receives.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub kind: DestinationKind,
    pub sites: BTreeSet<String>,
    pub wards: BTreeSet<String>,
    /// 0: every chart entry. Otherwise only threshold breaches are queued at once; the interval job queues the
    /// median of each window.
    pub interval_secs: i64,
}

impl Route {
    pub(crate) fn from_model(model: &emr_destination::Model) -> Result<Self> {
        let kind = DestinationKind::parse(&model.kind)
            .ok_or_else(|| Error::Internal(format!("destination '{}' has unknown kind", model.name)))?;
        let parse = |text: &str| -> Result<BTreeSet<String>> {
            serde_json::from_str(text)
                .map_err(|e| Error::Internal(format!("destination '{}' filter is corrupt: {e}", model.name)))
        };
        Ok(Self {
            name: model.name.clone(),
            kind,
            sites: parse(&model.sites)?,
            wards: parse(&model.wards)?,
            interval_secs: model.interval_secs,
        })
    }

    /// Whether chart entries from this place go to the destination (no filter: everywhere).
    pub fn covers(&self, site: Option<&str>, ward: Option<&str>) -> bool {
        if self.sites.is_empty() && self.wards.is_empty() {
            return true;
        }
        let site_match = site.is_some_and(|s| self.sites.contains(s));
        let ward_match = matches!((site, ward), (Some(s), Some(w)) if self.wards.contains(&format!("{s}/{w}")));
        site_match || ward_match
    }
}

/// Loads the routes of every enabled destination.
pub(super) async fn routes(conn: &impl ConnectionTrait) -> Result<Vec<Route>> {
    emr_destination::Entity::find()
        .filter(emr_destination::Column::Enabled.eq(true))
        .all(conn)
        .await?
        .iter()
        .map(Route::from_model)
        .collect()
}

/// A chart event waiting to be queued: observation, the status it carries, and the place it was charted.
pub(crate) struct Pending {
    pub(crate) observation: Uuid,
    pub(crate) status: ChartStatus,
    pub(crate) site: Option<String>,
    pub(crate) ward: Option<String>,
    /// A value outside the alarm limits: charted at once even where a charting interval applies.
    pub(crate) breach: bool,
    /// A new status of an entry queued before: older undelivered rows of the same (destination, entry) are
    /// superseded, so a retried `final` can never overwrite a later `entered-in-error` at the receiver.
    pub(crate) status_change: bool,
}

/// Queues chart events for every route that covers them, holding the outbox lock until the caller commits.
/// `only` names the routes to use regardless of their filters and intervals (status changes go where the entry
/// went before).
pub(crate) async fn enqueue(
    txn: &impl ConnectionTrait,
    events: &Events,
    routes: &[Route],
    pending: &[Pending],
    only: Option<&BTreeSet<String>>,
) -> Result<u64> {
    let at = now();
    let mut rows = Vec::new();
    for event in pending {
        for route in routes {
            let wanted = match only {
                Some(only) => only.contains(&route.name),
                None => {
                    route.covers(event.site.as_deref(), event.ward.as_deref())
                        && (route.interval_secs == 0 || event.breach)
                }
            };
            if !wanted {
                continue;
            }
            rows.push(emr_outbox::ActiveModel {
                destination: Set(route.name.clone()),
                observation_id: Set(event.observation),
                status: Set(event.status.as_str().to_owned()),
                state: Set(if route.kind == DestinationKind::Feed {
                    state::FEED
                } else {
                    state::PENDING
                }
                .to_owned()),
                attempts: Set(0),
                next_attempt_at: Set(at),
                last_error: Set(None),
                created_at: Set(at),
                delivered_at: Set(None),
                ..Default::default()
            });
        }
    }
    if rows.is_empty() {
        return Ok(0);
    }
    supersede(txn, pending, &rows).await?;
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({OUTBOX_LOCK_KEY})"))
            .await?;
    }
    let count = rows.len() as u64;
    insert_all::<emr_outbox::Entity>(txn, rows).await?;
    events.announce(txn, &Event::Outbox).await?;
    Ok(count)
}

/// Deliveries of one entry to one destination reach it in the order they were queued: before a status change is
/// queued, the entry's undelivered rows for the same destinations stop being sent (the newest row carries the
/// entry's whole current state: a FHIR conditional update, an ORU with the current OBX-11). The relay also never
/// sends a row while an older one of the same entry is pending (see `emr::Emr::round`), which covers a row that
/// is in flight while this runs.
pub(super) async fn supersede(
    txn: &impl ConnectionTrait,
    pending: &[Pending],
    rows: &[emr_outbox::ActiveModel],
) -> Result<()> {
    for event in pending.iter().filter(|e| e.status_change) {
        let destinations: BTreeSet<String> = rows
            .iter()
            .filter(|r| r.observation_id.as_ref() == &event.observation)
            .filter(|r| r.state.as_ref() != state::FEED)
            .map(|r| r.destination.as_ref().clone())
            .collect();
        if destinations.is_empty() {
            continue;
        }
        emr_outbox::Entity::update_many()
            .col_expr(emr_outbox::Column::State, Expr::value(state::SUPERSEDED))
            .col_expr(
                emr_outbox::Column::LastError,
                Expr::value(Some(format!(
                    "superseded: the entry became {} before this was delivered",
                    event.status.as_str()
                ))),
            )
            .filter(emr_outbox::Column::ObservationId.eq(event.observation))
            .filter(emr_outbox::Column::Destination.is_in(destinations))
            .filter(emr_outbox::Column::State.is_in([state::PENDING, state::DEAD]))
            .exec(txn)
            .await?;
    }
    Ok(())
}
