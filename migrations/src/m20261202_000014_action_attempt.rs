//! A retried rollout action keeps its id (its history stays one row) but starts a new attempt. Devices remember the
//! (action, attempt) pairs they finished, so a replayed command changes nothing on the device while a retry
//! ordered by an operator is carried out; a report names its attempt, so a late report of an earlier attempt
//! cannot finish the retried one.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum RolloutActions {
    Table,
    Attempt,
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(RolloutActions::Table)
                    .add_column(ColumnDef::new(RolloutActions::Attempt).integer().not_null().default(1))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(RolloutActions::Table)
                    .drop_column(RolloutActions::Attempt)
                    .to_owned(),
            )
            .await
    }
}
