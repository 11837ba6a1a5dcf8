//! Database connection and schema migration for SQLite (embedded default) and PostgreSQL (production).

use std::time::Duration;

use medfleet_migrations::{Migrator, MigratorTrait as _};
use sea_orm::{
    ConnectOptions, ConnectionTrait as _, Database, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    SqliteTransactionMode, TransactionOptions, TransactionTrait as _,
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
