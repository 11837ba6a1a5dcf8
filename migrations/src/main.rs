//! `medfleet-migrate`: apply or inspect the medfleet schema without starting the server.

use clap::{Parser, Subcommand};
use medfleet_migrations::{Migrator, MigratorTrait as _};
use sea_orm_migration::sea_orm::Database;

/// Apply or inspect the medfleet database schema.
///
/// Example:
///   medfleet-migrate --database-url postgres://medfleet@db/medfleet up
#[derive(Debug, Parser)]
#[command(version, about, verbatim_doc_comment)]
struct Args {
    /// Database URL: sqlite:///var/lib/medfleet/medfleet.db?mode=rwc or postgres://user@host/db.
    #[arg(long, env = "MEDFLEET_DATABASE_URL")]
    database_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply every pending migration.
    Up,
    /// Print which migrations are applied and which are pending.
    Status,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = Database::connect(&args.database_url).await?;
    match args.command {
        Command::Up => Migrator::up(&db, None).await?,
        Command::Status => Migrator::status(&db).await?,
    }
    Ok(())
}
