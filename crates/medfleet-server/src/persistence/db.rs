//! Database connection and schema migration for SQLite (embedded default) and PostgreSQL (production).

use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};

use medfleet_migrations::{Migrator, MigratorTrait as _};
use sea_orm::{
    ConnectOptions, ConnectionTrait as _, Database, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    EntityTrait, SqliteTransactionMode, TransactionOptions, TransactionTrait as _,
};

/// Arbitrary but fixed key of the PostgreSQL advisory lock that serialises migrations across replicas.
const MIGRATION_LOCK_KEY: i64 = 0x6d65_6466_6c74_0001;

pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(max_connections)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(10))
        .sqlx_logging(false);
    let db = Database::connect(options).await?;
    if db.get_database_backend() == DbBackend::Sqlite {
        // WAL is a property of the database file: readers no longer block the writer. synchronous stays FULL so
        // an acknowledged commit survives power loss.
        db.execute_unprepared("PRAGMA journal_mode=WAL").await?;
    }
    Ok(db)
}

/// Applies pending migrations. On PostgreSQL a session advisory lock, held on a dedicated single connection,
/// keeps replicas that start together from migrating at the same time.
pub async fn migrate(url: &str) -> Result<(), DbErr> {
    let db = connect(url, 1).await?;
    let postgres = db.get_database_backend() == DbBackend::Postgres;
    if postgres {
        db.execute_unprepared(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
            .await?;
    }
    let result = Migrator::up(&db, None).await;
    if postgres {
        // Released with the session anyway; unlocking explicitly lets the next replica proceed at once.
        db.execute_unprepared(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
            .await?;
    }
    db.close().await?;
    result
}

/// Begins a transaction that will write. On SQLite it takes the write lock up front (BEGIN IMMEDIATE): a
/// deferred transaction that reads first and writes later fails with SQLITE_BUSY under concurrency instead of
/// waiting for the lock.
pub async fn begin_write(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    db.begin_with_options(TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..TransactionOptions::default()
    })
    .await
}

/// Runs `tick` every `interval` until `stop` is cancelled. A failed tick is logged and retried at the next one: a
/// database blip must not stop replicas from converging once it recovers.
pub fn spawn_poller<F, Fut, E>(
    what: &'static str,
    interval: Duration,
    stop: tokio_util::sync::CancellationToken,
    tick: F,
) where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            if let Err(error) = tick().await {
                tracing::warn!(%error, what, "periodic refresh failed; retrying");
            }
        }
    });
}

/// The current time at the precision both backends store (microseconds), so a value returned from a write
/// equals the value a later read returns.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// One page of a keyset-paged listing: the items and the key to continue after, if there is more.
#[derive(Debug)]
pub struct Page<T, K> {
    pub items: Vec<T>,
    pub next_after: Option<K>,
}

pub fn page<T, K>(mut items: Vec<T>, size: u64, key: impl Fn(&T) -> K) -> Page<T, K> {
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    if items.len() > size {
        items.truncate(size);
        let next_after = items.last().map(key);
        Page { items, next_after }
    } else {
        Page {
            items,
            next_after: None,
        }
    }
}

/// Bind parameters one multi-row INSERT may use: SQLite's limit (32,766 since 3.32; PostgreSQL allows 65,535).
const MAX_BIND_PARAMETERS: usize = 32_766;

/// Rows of `T` per multi-row INSERT, from the columns each row binds, so no table's statement passes the limit
/// whatever columns it grows.
fn rows_per_insert<T: sea_orm::EntityTrait>() -> usize {
    use sea_orm::Iterable as _;
    (MAX_BIND_PARAMETERS / T::Column::iter().count().max(1)).max(1)
}

/// Inserts every row in as few multi-row statements as the bind-parameter limit allows.
pub async fn insert_all<E: EntityTrait>(
    conn: &impl sea_orm::ConnectionTrait,
    rows: Vec<E::ActiveModel>,
) -> Result<(), DbErr> {
    let per_statement = rows_per_insert::<E>();
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<_> = rows.by_ref().take(per_statement).collect();
        E::insert_many(chunk).exec_without_returning(conn).await?;
    }
    Ok(())
}
