//! Device configuration and presence: immutable configuration versions, the current document of every layer,
//! per-model JSON Schemas, and each device's session presence. Also seeds the built-in roles' configuration
//! permissions.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum ConfigVersions {
    Table,
    Version,
    LayerKind,
    LayerKey,
    Document,
    Author,
    Comment,
    CreatedAt,
    RollbackOf,
}

#[derive(DeriveIden)]
enum ConfigLayers {
    Table,
    LayerKind,
    LayerKey,
    Version,
    Document,
}

#[derive(DeriveIden)]
enum ConfigSchemas {
    Table,
    Model,
    Schema,
    Author,
    Comment,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum DevicePresence {
    Table,
    DeviceId,
    Online,
    SessionId,
    Replica,
    ConnectedAt,
    LastSeen,
    DisconnectedAt,
    OperationalState,
    FirmwareVersion,
    ReportedVersion,
    ReportedDigest,
    Rejection,
}

const SEED: crate::seed::Permissions = &[
    ("it_provisioner", "config", "read"),
    ("it_provisioner", "config", "update"),
    ("biomed", "config", "read"),
    ("biomed", "config", "update"),
    ("biomed", "config_schema", "update"),
    ("clinician", "config", "read"),
    ("auditor", "config", "read"),
];

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ConfigVersions::Table)
                    .col(
                        ColumnDef::new(ConfigVersions::Version)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(ConfigVersions::LayerKind).string_len(16).not_null())
                    .col(ColumnDef::new(ConfigVersions::LayerKey).string_len(200).not_null())
                    .col(ColumnDef::new(ConfigVersions::Document).text().not_null())
                    .col(ColumnDef::new(ConfigVersions::Author).string_len(200).not_null())
                    .col(ColumnDef::new(ConfigVersions::Comment).text().not_null())
                    .col(
                        ColumnDef::new(ConfigVersions::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(ColumnDef::new(ConfigVersions::RollbackOf).big_integer().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("config_versions_layer_idx")
                    .table(ConfigVersions::Table)
                    .col(ConfigVersions::LayerKind)
                    .col(ConfigVersions::LayerKey)
                    .col(ConfigVersions::Version)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ConfigLayers::Table)
                    .col(ColumnDef::new(ConfigLayers::LayerKind).string_len(16).not_null())
                    .col(ColumnDef::new(ConfigLayers::LayerKey).string_len(200).not_null())
                    .col(ColumnDef::new(ConfigLayers::Version).big_integer().not_null())
                    .col(ColumnDef::new(ConfigLayers::Document).text().not_null())
                    .primary_key(Index::create().col(ConfigLayers::LayerKind).col(ConfigLayers::LayerKey))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ConfigSchemas::Table)
                    .col(
                        ColumnDef::new(ConfigSchemas::Model)
                            .string_len(200)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(ConfigSchemas::Schema).text().not_null())
                    .col(ColumnDef::new(ConfigSchemas::Author).string_len(200).not_null())
                    .col(ColumnDef::new(ConfigSchemas::Comment).text().not_null())
                    .col(
                        ColumnDef::new(ConfigSchemas::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(DevicePresence::Table)
                    .col(ColumnDef::new(DevicePresence::DeviceId).uuid().not_null().primary_key())
                    .col(ColumnDef::new(DevicePresence::Online).boolean().not_null())
                    .col(ColumnDef::new(DevicePresence::SessionId).uuid().not_null())
                    .col(ColumnDef::new(DevicePresence::Replica).string_len(200).not_null())
                    .col(
                        ColumnDef::new(DevicePresence::ConnectedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(DevicePresence::LastSeen)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(DevicePresence::DisconnectedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(DevicePresence::OperationalState)
                            .string_len(32)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(DevicePresence::FirmwareVersion)
                            .string_len(200)
                            .not_null(),
                    )
                    .col(ColumnDef::new(DevicePresence::ReportedVersion).big_integer().not_null())
                    .col(ColumnDef::new(DevicePresence::ReportedDigest).string_len(64).not_null())
                    .col(ColumnDef::new(DevicePresence::Rejection).text().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("device_presence_online_idx")
                    .table(DevicePresence::Table)
                    .col(DevicePresence::Online)
                    .col(DevicePresence::LastSeen)
                    .to_owned(),
            )
            .await?;
        crate::seed::grant(manager, SEED).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            DevicePresence::Table.into_iden(),
            ConfigSchemas::Table.into_iden(),
            ConfigLayers::Table.into_iden(),
            ConfigVersions::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        crate::seed::revoke(manager, SEED).await
    }
}
