//! The registry: sites, wards (with their beds), devices and device tags.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Sites {
    Table,
    Name,
    DisplayName,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Wards {
    Table,
    Site,
    Name,
    DisplayName,
    // JSON array of bed labels: small, always read whole with its ward.
    Beds,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Devices {
    Table,
    Id,
    SerialNumber,
    Manufacturer,
    Model,
    DeviceClass,
    Eui64,
    Site,
    Ward,
    Bed,
    State,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum DeviceTags {
    Table,
    DeviceId,
    Key,
    Value,
}

// The trait's signature elides SchemaManager's lifetime; matching it exactly is required.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Sites::Table)
                    .col(ColumnDef::new(Sites::Name).string_len(63).not_null().primary_key())
                    .col(ColumnDef::new(Sites::DisplayName).string_len(800).not_null())
                    .col(ColumnDef::new(Sites::CreatedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Sites::UpdatedAt).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Wards::Table)
                    .col(ColumnDef::new(Wards::Site).string_len(63).not_null())
                    .col(ColumnDef::new(Wards::Name).string_len(63).not_null())
                    .col(ColumnDef::new(Wards::DisplayName).string_len(800).not_null())
                    .col(ColumnDef::new(Wards::Beds).text().not_null())
                    .col(ColumnDef::new(Wards::CreatedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Wards::UpdatedAt).timestamp_with_time_zone().not_null())
                    .primary_key(Index::create().col(Wards::Site).col(Wards::Name))
                    .foreign_key(
                        ForeignKey::create()
                            .name("wards_site_fkey")
                            .from(Wards::Table, Wards::Site)
                            .to(Sites::Table, Sites::Name)
                            .on_delete(ForeignKeyAction::Restrict),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Devices::Table)
                    .col(ColumnDef::new(Devices::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(Devices::SerialNumber).string_len(64).not_null())
                    .col(ColumnDef::new(Devices::Manufacturer).string_len(400).not_null())
                    .col(ColumnDef::new(Devices::Model).string_len(400).not_null())
                    .col(ColumnDef::new(Devices::DeviceClass).string_len(32).not_null())
                    .col(ColumnDef::new(Devices::Eui64).string_len(23).null())
                    .col(ColumnDef::new(Devices::Site).string_len(63).null())
                    .col(ColumnDef::new(Devices::Ward).string_len(63).null())
                    .col(ColumnDef::new(Devices::Bed).string_len(32).null())
                    .col(ColumnDef::new(Devices::State).string_len(32).not_null())
                    .col(ColumnDef::new(Devices::CreatedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Devices::UpdatedAt).timestamp_with_time_zone().not_null())
                    .foreign_key(
                        ForeignKey::create()
                            .name("devices_ward_fkey")
                            .from(Devices::Table, (Devices::Site, Devices::Ward))
                            .to(Wards::Table, (Wards::Site, Wards::Name))
                            .on_delete(ForeignKeyAction::Restrict),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("devices_manufacturer_serial_key")
                    .table(Devices::Table)
                    .col(Devices::Manufacturer)
                    .col(Devices::SerialNumber)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("devices_eui64_key")
                    .table(Devices::Table)
                    .col(Devices::Eui64)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("devices_location_idx")
                    .table(Devices::Table)
                    .col(Devices::Site)
                    .col(Devices::Ward)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("devices_model_idx")
                    .table(Devices::Table)
                    .col(Devices::Model)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(DeviceTags::Table)
                    .col(ColumnDef::new(DeviceTags::DeviceId).uuid().not_null())
                    .col(ColumnDef::new(DeviceTags::Key).string_len(63).not_null())
                    .col(ColumnDef::new(DeviceTags::Value).string_len(512).not_null())
                    .primary_key(Index::create().col(DeviceTags::DeviceId).col(DeviceTags::Key))
                    .foreign_key(
                        ForeignKey::create()
                            .name("device_tags_device_fkey")
                            .from(DeviceTags::Table, DeviceTags::DeviceId)
                            .to(Devices::Table, Devices::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("device_tags_key_value_idx")
                    .table(DeviceTags::Table)
                    .col(DeviceTags::Key)
                    .col(DeviceTags::Value)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            DeviceTags::Table.into_iden(),
            Devices::Table.into_iden(),
            Wards::Table.into_iden(),
            Sites::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        Ok(())
    }
}
