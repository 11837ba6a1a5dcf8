//! Change notifications within a replica and across replicas.
//!
//! A change is announced inside the transaction that makes it: on PostgreSQL with `pg_notify`, which PostgreSQL
//! delivers to every listening replica only if the transaction commits; and, after the commit, to this replica's
//! own subscribers. Notifications are wake-ups, never the data: subscribers re-read the database, and every
//! consumer also reconciles periodically, because a notification can be lost (a listener reconnecting, a
//! lagging subscriber). SQLite is single-replica, so the local channel is all it needs.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The PostgreSQL notification channel all replicas listen on.
const CHANNEL: &str = "medfleet_events";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A configuration layer changed or a device moved: desired configurations may differ now.
    Config,
    /// A device opened a session; any older session of it, on any replica, must close.
    SessionOpened { device: Uuid, session: Uuid },
    /// A device's presence changed (online, offline, state, configuration report).
    Presence { device: Uuid },
    /// New EMR outbox rows were committed: relays and feed subscribers look for work.
    Outbox,
    /// A rollout changed (created, a wave advanced, paused, resumed, aborted, retried): every session looks for
    /// commands to send, the scheduler and watchers re-read.
    Firmware,
    /// One device's firmware action moved (its own report): only that device's session looks for its next command;
    /// the scheduler and watchers re-read as for `Firmware`. Keeps a wave of N reporting devices from costing N
    /// evaluations of every session.
    FirmwareDevice { device: Uuid },
    /// Only the bytes a device has downloaded moved: watchers re-read; nothing is decided or sent on it.
    FirmwareProgress,
    /// Notifications may have been missed: re-read everything.
    Resync,
}

impl Event {
    fn encode(&self) -> String {
        match self {
            Self::Config => "config".to_owned(),
            Self::SessionOpened { device, session } => format!("session {device} {session}"),
            Self::Presence { device } => format!("presence {device}"),
            Self::Outbox => "outbox".to_owned(),
            Self::Firmware => "firmware".to_owned(),
            Self::FirmwareDevice { device } => format!("firmware-device {device}"),
            Self::FirmwareProgress => "firmware-progress".to_owned(),
            Self::Resync => "resync".to_owned(),
        }
    }

    fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let event = match (parts.next()?, parts.next(), parts.next()) {
            ("config", None, None) => Self::Config,
            ("resync", None, None) => Self::Resync,
            ("outbox", None, None) => Self::Outbox,
            ("firmware", None, None) => Self::Firmware,
            ("firmware-progress", None, None) => Self::FirmwareProgress,
            ("firmware-device", Some(device), None) => Self::FirmwareDevice {
                device: device.parse().ok()?,
            },
            ("presence", Some(device), None) => Self::Presence {
                device: device.parse().ok()?,
            },
            ("session", Some(device), Some(session)) => Self::SessionOpened {
                device: device.parse().ok()?,
                session: session.parse().ok()?,
            },
            _ => return None,
        };
        parts.next().is_none().then_some(event)
    }
}

#[derive(Debug)]
pub struct Events {
    /// Tells this replica's own notifications apart from other replicas' (they were already delivered locally).
    instance: Uuid,
    local: broadcast::Sender<Event>,
    postgres: bool,
    /// Bumped before every `Config` or `Resync` is delivered here: caches of what configuration implies compare
    /// it synchronously instead of racing a subscriber task.
    config_generation: std::sync::atomic::AtomicU64,
}

impl Events {
    pub fn new(backend: DbBackend) -> Arc<Self> {
        let (local, _) = broadcast::channel(4096);
        Arc::new(Self {
            instance: Uuid::new_v4(),
            local,
            postgres: backend == DbBackend::Postgres,
            config_generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Changes whenever configuration may have changed (a layer, a device's place), on this replica or another.
    pub fn config_generation(&self) -> u64 {
        self.config_generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A subscriber that lags by more than the channel holds sees `RecvError::Lagged` and must resync.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.local.subscribe()
    }

    /// Announces `event` to the other replicas if, and when, `txn` commits. Call [`Events::emit`] after the commit
    /// for this replica.
    pub async fn announce(&self, txn: &impl ConnectionTrait, event: &Event) -> Result<(), DbErr> {
        if !self.postgres {
            return Ok(());
        }
        let payload = format!("{} {}", self.instance.simple(), event.encode());
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_notify($1, $2)",
            [CHANNEL.into(), payload.into()],
        ))
        .await
        .map(|_| ())
    }

    /// Announces `event` outside any transaction (after a change that committed elsewhere), to the other replicas
    /// and this one. Best effort: a lost announcement is repaired by the periodic reconcile.
    pub async fn publish(&self, db: &DatabaseConnection, event: Event) {
        if let Err(error) = self.announce(db, &event).await {
            tracing::warn!(%error, "change notification not sent; other replicas catch up at their next reconcile");
        }
        self.emit(event);
    }

    /// Delivers `event` to this replica's subscribers.
    pub fn emit(&self, event: Event) {
        if matches!(event, Event::Config | Event::Resync) {
            self.config_generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        // No subscribers is fine: nobody needs waking.
        let _ = self.local.send(event);
    }

    /// On PostgreSQL, listens for other replicas' notifications until `stop`. After every (re)connection it emits
    /// [`Event::Resync`], since notifications sent while it was not listening are gone.
    pub fn spawn_listener(self: &Arc<Self>, db: &DatabaseConnection, stop: CancellationToken) {
        if !self.postgres {
            return;
        }
        let pool = db.get_postgres_connection_pool().clone();
        let events = self.clone();
        let own = self.instance.simple().to_string();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let outcome = tokio::select! {
                    () = stop.cancelled() => return,
                    outcome = events.listen(&pool, &own) => outcome,
                };
                if let Err(error) = outcome {
                    tracing::warn!(%error, retry_in = ?backoff, "change notifications interrupted; reconnecting");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    async fn listen(&self, pool: &sea_orm::sqlx::PgPool, own: &str) -> Result<(), sea_orm::sqlx::Error> {
        let mut listener = sea_orm::sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen(CHANNEL).await?;
        self.emit(Event::Resync);
        loop {
            // `None` means the connection dropped (sqlx reconnects on the next call): anything sent meanwhile is lost.
            let Some(notification) = listener.try_recv().await? else {
                self.emit(Event::Resync);
                continue;
            };
            let Some((sender, text)) = notification.payload().split_once(' ') else {
                continue;
            };
            if sender == own {
                continue;
            }
            if let Some(event) = Event::decode(text) {
                self.emit(event);
            } else {
                tracing::warn!(payload = %text, "ignoring an unknown change notification");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_their_payload() {
        let device = Uuid::new_v4();
        for event in [
            Event::Config,
            Event::Resync,
            Event::Firmware,
            Event::FirmwareDevice { device },
            Event::FirmwareProgress,
            Event::Presence { device },
            Event::SessionOpened {
                device,
                session: Uuid::new_v4(),
            },
        ] {
            assert_eq!(Event::decode(&event.encode()), Some(event));
        }
        assert_eq!(Event::decode("config extra"), None);
        assert_eq!(Event::decode("presence not-a-uuid"), None);
        assert_eq!(Event::decode("firmware-device"), None);
    }
}
