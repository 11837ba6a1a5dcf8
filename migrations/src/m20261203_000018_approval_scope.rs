//! A clinician's approval to install on a device in clinical use lasts a bounded time and covers only the patient
//! association it was given for: `approved_until` and `approved_association` (NULL when the device was unbound).
//! Approvals given before this migration have no expiry recorded and are treated as expired.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum RolloutActions {
    Table,
    ApprovedUntil,
    ApprovedAssociation,
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite adds one column per ALTER TABLE.
        manager
            .alter_table(
                Table::alter()
                    .table(RolloutActions::Table)
                    .add_column(
                        ColumnDef::new(RolloutActions::ApprovedUntil)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(RolloutActions::Table)
                    .add_column(ColumnDef::new(RolloutActions::ApprovedAssociation).uuid().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [RolloutActions::ApprovedAssociation, RolloutActions::ApprovedUntil] {
            manager
                .alter_table(
                    Table::alter()
                        .table(RolloutActions::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
