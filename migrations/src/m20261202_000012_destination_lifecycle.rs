//! Destinations can be changed, disabled and deleted while relays run, and their secrets are sealed under a key
//! outside the database: a relay that cannot open a destination's secrets (its key is missing from the keyring)
//! records why in `relay_error`, so `medfleet emr list` shows it instead of the destination silently going quiet.
//! No seeded permission changes: every lifecycle RPC needs `emr_destination:update`, which only `admin` holds
//! since migration 8.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum EmrDestinations {
    Table,
    RelayError,
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(EmrDestinations::Table)
                    .add_column(ColumnDef::new(EmrDestinations::RelayError).text().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(EmrDestinations::Table)
                    .drop_column(EmrDestinations::RelayError)
                    .to_owned(),
            )
            .await
    }
}
