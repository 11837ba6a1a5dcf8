//! The medfleet database schema as sea-orm migrations, one per file, identical on SQLite and PostgreSQL.
//!
//! `medfleetd` applies them at start-up (under an advisory lock on PostgreSQL so replicas starting together do not
//! race); `medfleetd migrate` and the `medfleet-migrate` binary apply or inspect them on their own.

pub use sea_orm_migration::prelude::*;

mod m20261125_000001_registry;
mod m20261125_000002_identity;
mod m20261125_000003_access;
mod m20261125_000004_config;
mod m20261125_000005_emr;
mod m20261201_000006_outbox_order;
mod m20261201_000007_feed_subscription_owner;
mod m20261201_000008_destination_admin;
mod m20261201_000009_observation_alarm_limits;
mod m20261202_000010_association_backlog;
mod m20261202_000011_device_placements;
mod m20261202_000012_destination_lifecycle;
mod m20261202_000013_firmware;
mod m20261202_000014_action_attempt;
mod m20261202_000015_site_timezone;
mod m20261203_000016_artifact_storage;
mod m20261203_000017_rollout_judged_since;
mod m20261203_000018_approval_scope;
mod seed;

#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261125_000001_registry::Migration),
            Box::new(m20261125_000002_identity::Migration),
            Box::new(m20261125_000003_access::Migration),
            Box::new(m20261125_000004_config::Migration),
            Box::new(m20261125_000005_emr::Migration),
            Box::new(m20261201_000006_outbox_order::Migration),
            Box::new(m20261201_000007_feed_subscription_owner::Migration),
            Box::new(m20261201_000008_destination_admin::Migration),
            Box::new(m20261201_000009_observation_alarm_limits::Migration),
            Box::new(m20261202_000010_association_backlog::Migration),
            Box::new(m20261202_000011_device_placements::Migration),
            Box::new(m20261202_000012_destination_lifecycle::Migration),
            Box::new(m20261202_000013_firmware::Migration),
            Box::new(m20261202_000014_action_attempt::Migration),
            Box::new(m20261202_000015_site_timezone::Migration),
            Box::new(m20261203_000016_artifact_storage::Migration),
            Box::new(m20261203_000017_rollout_judged_since::Migration),
            Box::new(m20261203_000018_approval_scope::Migration),
        ]
    }
}
