//! The tamper-evident audit trail: an append-only table in which each entry's hash covers the previous entry's
//! hash and the entry's canonical bytes, so editing, deleting or reordering any entry breaks the chain from there.
//!
//! Entries are appended inside the transaction of the change they record. Appends are serialised (a PostgreSQL
//! transaction-scoped advisory lock; SQLite's write transactions are serial already) so replicas extend one chain.
//! Entries name principals and resources by opaque ids only: never patient data.

pub mod grpc;
pub mod phi;

use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::{NotSet, Set};
use sea_orm::{ActiveModelTrait as _, ConnectionTrait, DbBackend, EntityTrait as _, QueryOrder as _, QuerySelect as _};

use crate::persistence::db::now;
use crate::persistence::entity::audit_log;

/// Arbitrary but fixed key of the advisory lock that serialises audit appends on PostgreSQL.
const AUDIT_LOCK_KEY: i64 = 0x6d65_6466_6c74_0002;
/// The `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Failed => "failed",
        }
    }
}

/// One event to record.
#[derive(Debug, Clone)]
pub struct Event {
    pub actor: String,
    pub action: String,
    pub target: String,
    pub scope: String,
    pub outcome: Outcome,
    pub request_id: String,
    pub detail: String,
}

/// The canonical bytes an entry's hash covers: every field, length-prefixed so no two entries serialise alike.
fn canonical(prev_hash: &str, at: DateTime<Utc>, event: &Event) -> Vec<u8> {
    let at = at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut out = Vec::new();
    for field in [
        prev_hash,
        at.as_str(),
        event.actor.as_str(),
        event.action.as_str(),
        event.target.as_str(),
        event.scope.as_str(),
        event.outcome.as_str(),
        event.request_id.as_str(),
        event.detail.as_str(),
    ] {
        out.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out
}

fn hash(prev_hash: &str, at: DateTime<Utc>, event: &Event) -> String {
    medfleet_core::digest::sha256_hex(&canonical(prev_hash, at, event))
}

/// Who is acting, for the entries a request writes.
#[derive(Debug, Clone)]
pub struct Context {
    pub actor: String,
    pub request_id: String,
}

impl Context {
    pub fn new(actor: impl Into<String>, request_id: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            request_id: request_id.into(),
        }
    }

    /// medfleetd itself (start-up work such as recording the first admin).
    pub fn system(what: &str) -> Self {
        Self::new(format!("medfleetd ({what})"), "")
    }

    /// Records an allowed change inside the transaction that makes it.
    pub async fn record(
        &self,
        txn: &impl ConnectionTrait,
        action: &str,
        target: impl Into<String>,
        scope: impl Into<String>,
        detail: impl Into<String>,
    ) -> Result<(), sea_orm::DbErr> {
        append(
            txn,
            &Event {
                actor: self.actor.clone(),
                action: action.to_owned(),
                target: target.into(),
                scope: scope.into(),
                outcome: Outcome::Allowed,
                request_id: self.request_id.clone(),
                detail: detail.into(),
            },
        )
        .await
    }
}

/// The scope of a device from its stored location (`*` for a device in storage).
pub fn device_scope(site: Option<&str>, ward: Option<&str>) -> String {
    match (site, ward) {
        (Some(site), Some(ward)) => format!("{site}/{ward}"),
        _ => "*".to_owned(),
    }
}

/// Appends `event` inside the caller's transaction.
pub async fn append(txn: &impl ConnectionTrait, event: &Event) -> Result<(), sea_orm::DbErr> {
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({AUDIT_LOCK_KEY})"))
            .await?;
    }
    let prev = audit_log::Entity::find()
        .order_by_desc(audit_log::Column::Seq)
        .limit(1)
        .one(txn)
        .await?
        .map_or_else(|| GENESIS.to_owned(), |last| last.hash);
    let at = now();
    audit_log::ActiveModel {
        seq: NotSet,
        at: Set(at),
        actor: Set(event.actor.clone()),
        action: Set(event.action.clone()),
        target: Set(event.target.clone()),
        scope: Set(event.scope.clone()),
        outcome: Set(event.outcome.as_str().to_owned()),
        request_id: Set(event.request_id.clone()),
        detail: Set(event.detail.clone()),
        hash: Set(hash(&prev, at, event)),
        prev_hash: Set(prev),
    }
    .insert(txn)
    .await?;
    Ok(())
}

/// Keys a coalescer counts at once, so a flood of distinct keys cannot grow memory without bound; beyond it,
/// events are written one by one (never dropped).
const MAX_COALESCED: usize = 20_000;

/// Audit rows for events that repeat by the hundred: refusals of a looping client, reads of a patient's data by a
/// feed. The first event of an (actor, action, target) is written at once; repeats within the window are counted
/// and written as one row when it closes. The trail still says who did what to which target, and when it began;
/// a busy client costs at most two rows per key and window instead of one per call.
#[derive(Clone)]
pub struct Coalescer {
    db: sea_orm::DatabaseConnection,
    window: std::time::Duration,
    open: std::sync::Arc<std::sync::Mutex<OpenWindows>>,
}

/// Counting windows by (actor, action, target).
type OpenWindows = std::collections::HashMap<(String, String, String), Repeats>;

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Repeats {
    opened: std::time::Instant,
    count: u64,
    last: Event,
    /// The window's first event is in the trail. Until it is, a repeat is no repeat: it is written itself, so
    /// nothing is ever served on the strength of a row that failed to commit.
    durable: bool,
}

impl Coalescer {
    pub fn new(db: sea_orm::DatabaseConnection, window: std::time::Duration) -> Self {
        Self {
            db,
            window,
            open: std::sync::Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenWindows> {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records events: the first of each key in one transaction now, repeats counted. Returns whether the trail
    /// holds them (or their count); a caller about to disclose data stops when it does not.
    pub async fn record(&self, events: Vec<Event>) -> bool {
        let (first, opened) = {
            let mut open = self.lock();
            let mut first = Vec::new();
            let mut opened = Vec::new();
            for event in events {
                let key = (event.actor.clone(), event.action.clone(), event.target.clone());
                if let Some(repeats) = open.get_mut(&key) {
                    if repeats.durable {
                        repeats.count += 1;
                        repeats.last = event;
                    } else {
                        first.push(event);
                    }
                    continue;
                }
                if open.len() >= MAX_COALESCED {
                    // Fail closed: past the bound events are written one by one, never dropped.
                    first.push(event);
                    continue;
                }
                open.insert(
                    key.clone(),
                    Repeats {
                        opened: std::time::Instant::now(),
                        count: 0,
                        last: event.clone(),
                        durable: false,
                    },
                );
                opened.push(key);
                first.push(event);
            }
            (first, opened)
        };
        let written = self.write(&first).await;
        let mut open = self.lock();
        for key in opened {
            if written {
                if let Some(repeats) = open.get_mut(&key) {
                    repeats.durable = true;
                }
            } else {
                // The next read of the same kind writes its own row again (and is refused if that fails too).
                open.remove(&key);
            }
        }
        written
    }

    async fn write(&self, events: &[Event]) -> bool {
        if events.is_empty() {
            return true;
        }
        let written = async {
            let txn = crate::persistence::db::begin_write(&self.db).await?;
            for event in events {
                append(&txn, event).await?;
            }
            txn.commit().await
        };
        match written.await {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%error, events = events.len(), "could not write to the audit trail");
                false
            }
        }
    }

    /// Writes the count of every window that has closed (all of them when `all`) and forgets those windows.
    async fn flush(&self, all: bool) {
        let closed: Vec<((String, String, String), Repeats)> = {
            let mut open = self.lock();
            let keys: Vec<(String, String, String)> = open
                .iter()
                .filter(|(_, r)| r.durable && (all || r.opened.elapsed() >= self.window))
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| open.remove(&k).map(|r| (k, r)))
                .filter(|(_, r)| r.count > 0)
                .collect()
        };
        let summaries: Vec<Event> = closed
            .iter()
            .map(|(_, r)| Event {
                detail: format!(
                    "{} more within {} s of the first; last: {}",
                    r.count,
                    self.window.as_secs(),
                    r.last.detail
                )
                .chars()
                .take(500)
                .collect(),
                ..r.last.clone()
            })
            .collect();
        if !self.write(&summaries).await {
            // Not lost: the counts go back and the next flush tries again.
            let mut open = self.lock();
            for (key, repeats) in closed {
                open.entry(key)
                    .and_modify(|current| current.count += repeats.count)
                    .or_insert(repeats);
            }
        }
    }

    /// Closes windows as they expire until `stop`, then writes what is still counted.
    pub fn spawn_flusher(&self, stop: tokio_util::sync::CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval((this.window / 4).max(std::time::Duration::from_millis(50)));
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => this.flush(false).await,
                }
            }
            this.flush(true).await;
        });
    }
}

fn event_of(row: &audit_log::Model) -> Option<Event> {
    let outcome = match row.outcome.as_str() {
        "allowed" => Outcome::Allowed,
        "denied" => Outcome::Denied,
        "failed" => Outcome::Failed,
        _ => return None,
    };
    Some(Event {
        actor: row.actor.clone(),
        action: row.action.clone(),
        target: row.target.clone(),
        scope: row.scope.clone(),
        outcome,
        request_id: row.request_id.clone(),
        detail: row.detail.clone(),
    })
}

/// The result of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub entries: u64,
    /// The newest entry verified and its hash, to be kept outside the database.
    pub head: Option<(i64, String)>,
    /// The first entry whose link does not hold, and why.
    pub first_broken: Option<(i64, String)>,
}

/// Walks the whole chain in order, in pages, and reports the first broken link.
pub async fn verify(db: &impl ConnectionTrait) -> Result<Verification, sea_orm::DbErr> {
    use sea_orm::{ColumnTrait as _, QueryFilter as _};
    let mut expected_prev = GENESIS.to_owned();
    let mut after = i64::MIN;
    let mut entries = 0;
    let mut head = None;
    loop {
        let page = audit_log::Entity::find()
            .filter(audit_log::Column::Seq.gt(after))
            .order_by_asc(audit_log::Column::Seq)
            .limit(1000)
            .all(db)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for row in &page {
            entries += 1;
            let broken = if row.prev_hash != expected_prev {
                Some("its prev_hash is not the previous entry's hash (an entry was removed, inserted or reordered)")
            } else if event_of(row).is_none_or(|event| hash(&row.prev_hash, row.at, &event) != row.hash) {
                Some("its content does not match its hash (the entry was modified)")
            } else {
                None
            };
            if let Some(reason) = broken {
                return Ok(Verification {
                    entries,
                    head: None,
                    first_broken: Some((row.seq, reason.to_owned())),
                });
            }
            expected_prev.clone_from(&row.hash);
            head = Some((row.seq, row.hash.clone()));
        }
    }
    Ok(Verification {
        entries,
        head,
        first_broken: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(detail: &str) -> Event {
        Event {
            actor: "medfleet://user/alice".into(),
            action: "device.update".into(),
            target: "device/6f1c".into(),
            scope: "stmarys/icu".into(),
            outcome: Outcome::Allowed,
            request_id: "r1".into(),
            detail: detail.into(),
        }
    }

    /// A read whose audit row failed to commit is refused, and so is its retry: a repeat counts only against a
    /// window whose first row is in the trail.
    #[tokio::test]
    async fn a_failed_first_row_is_never_counted_as_recorded() {
        // No schema: every write fails.
        let db = sea_orm::Database::connect("sqlite::memory:").await.unwrap();
        let coalescer = Coalescer::new(db, std::time::Duration::from_mins(5));
        assert!(!coalescer.record(vec![event("read")]).await);
        assert!(
            !coalescer.record(vec![event("read again")]).await,
            "the retry was served unrecorded"
        );
    }

    #[test]
    fn hash_covers_every_field_and_the_link() {
        let at = now();
        let base = hash(GENESIS, at, &event("x"));
        assert_eq!(base, hash(GENESIS, at, &event("x")));
        assert_ne!(base, hash(GENESIS, at, &event("y")));
        assert_ne!(base, hash(&"1".repeat(64), at, &event("x")));
        let mut other = event("x");
        other.outcome = Outcome::Denied;
        assert_ne!(base, hash(GENESIS, at, &other));
        // Length prefixes: moving a character between fields changes the hash.
        let mut shifted = event("x");
        shifted.actor.push('s');
        shifted.action.remove(0);
        assert_ne!(base, hash(GENESIS, at, &shifted));
    }
}

/// Filters of an audit listing.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub actor: Option<String>,
    pub action_prefix: Option<String>,
    /// This scope and the scopes below it.
    pub scope: Option<String>,
    pub since: Option<DateTime<Utc>>,
}

impl Filter {
    pub fn fingerprint(&self) -> String {
        format!(
            "audit:{:?}:{:?}:{:?}:{:?}",
            self.actor, self.action_prefix, self.scope, self.since
        )
    }
}

/// Entries newest first, `size` of them, before the entry `before` (exclusive).
pub async fn list(
    db: &impl ConnectionTrait,
    filter: &Filter,
    size: u64,
    before: Option<i64>,
) -> Result<(Vec<audit_log::Model>, Option<i64>), sea_orm::DbErr> {
    use sea_orm::{ColumnTrait as _, Condition, QueryFilter as _};
    let mut query = audit_log::Entity::find();
    if let Some(before) = before {
        query = query.filter(audit_log::Column::Seq.lt(before));
    }
    if let Some(actor) = &filter.actor {
        query = query.filter(audit_log::Column::Actor.eq(actor.as_str()));
    }
    if let Some(prefix) = &filter.action_prefix {
        query = query.filter(audit_log::Column::Action.starts_with(prefix.as_str()));
    }
    if let Some(scope) = &filter.scope {
        query = query.filter(
            Condition::any()
                .add(audit_log::Column::Scope.eq(scope.as_str()))
                .add(audit_log::Column::Scope.starts_with(format!("{scope}/"))),
        );
    }
    if let Some(since) = filter.since {
        query = query.filter(audit_log::Column::At.gte(since));
    }
    let mut rows = query
        .order_by_desc(audit_log::Column::Seq)
        .limit(size + 1)
        .all(db)
        .await?;
    let more = rows.len() > usize::try_from(size).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(size).unwrap_or(usize::MAX));
    let next = if more { rows.last().map(|r| r.seq) } else { None };
    Ok((rows, next))
}
