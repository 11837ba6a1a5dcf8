//! Retroactive charting in chunks: an association whose period covers more stored readings than one transaction
//! charts is marked, and medfleetd charts the rest in bounded, resumable transactions (any replica, after any
//! restart) until none is left.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Associations {
    Table,
    ChartingBacklog,
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Associations::Table)
                    .add_column(
                        ColumnDef::new(Associations::ChartingBacklog)
                            .boolean()
                            .not_null()
                            .default(false),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Associations::Table)
                    .drop_column(Associations::ChartingBacklog)
                    .to_owned(),
            )
            .await
    }
}
