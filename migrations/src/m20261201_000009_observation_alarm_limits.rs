//! The alarm limits that applied to a chart entry, as charted (from the device's resolved configuration), so
//! OBX-7/OBX-8 show what was applied then, not what is configured at delivery time.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Observations {
    Table,
    AlarmLimits,
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Observations::Table)
                    .add_column(ColumnDef::new(Observations::AlarmLimits).text().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Observations::Table)
                    .drop_column(Observations::AlarmLimits)
                    .to_owned(),
            )
            .await
    }
}
