//! Where each firmware image is (`firmware_artifacts.storage`: `database` for chunks, `object_store` for one object
//! in the configured object store; images stored before are in the database), and a firmware chunk remembers when
//! it was stored: the sweep that removes chunks no artifact references (left by
//! an upload whose replica died before it could clean up) must not take the chunks of an upload still under way,
//! which are unreferenced until it commits. Chunks stored before this migration have no time and count as old.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum FirmwareArtifacts {
    Table,
    Storage,
}

#[derive(DeriveIden)]
enum FirmwareChunks {
    Table,
    StoredAt,
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(FirmwareChunks::Table)
                    .add_column(
                        ColumnDef::new(FirmwareChunks::StoredAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(FirmwareArtifacts::Table)
                    .add_column(
                        ColumnDef::new(FirmwareArtifacts::Storage)
                            .string()
                            .not_null()
                            .default("database"),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(FirmwareChunks::Table)
                    .drop_column(FirmwareChunks::StoredAt)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(FirmwareArtifacts::Table)
                    .drop_column(FirmwareArtifacts::Storage)
                    .to_owned(),
            )
            .await
    }
}
