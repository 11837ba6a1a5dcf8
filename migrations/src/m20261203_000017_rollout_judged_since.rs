//! A rollout resumed from a halt judges its halt threshold on the devices that finished after the resume: the
//! failures an operator looked at before resuming do not halt it again at once. Empty for rollouts never halted.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Rollouts {
    Table,
    HaltJudgedSince,
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Rollouts::Table)
                    .add_column(
                        ColumnDef::new(Rollouts::HaltJudgedSince)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Rollouts::Table)
                    .drop_column(Rollouts::HaltJudgedSince)
                    .to_owned(),
            )
            .await
    }
}
