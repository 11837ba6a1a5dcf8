//! A site keeps its IANA time zone: a rollout's maintenance window that names no time zone is read in the time
//! zone of each device's site, so "02:00-05:00" means the small hours where the device stands. Existing sites are
//! UTC until an administrator sets theirs.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Sites {
    Table,
    Timezone,
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Sites::Table)
                    .add_column(ColumnDef::new(Sites::Timezone).string().not_null().default("UTC"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Sites::Table)
                    .drop_column(Sites::Timezone)
                    .to_owned(),
            )
            .await
    }
}
