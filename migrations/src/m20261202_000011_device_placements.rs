//! Placement history: where a device stood, and since when. A reading is charted with the place the device had
//! when it was observed (PV1-3, the FHIR location, routing, visibility), not where it stands when the batch
//! arrives: a monitor that buffered in ICU and uploads after a move to ED charts ICU readings to ICU.
//!
//! The device row keeps its current place and `placed_at` (when that began; existing rows: their creation, the
//! best that is known); `device_placements` keeps every earlier place as a closed period.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Devices {
    Table,
    PlacedAt,
    CreatedAt,
}

#[derive(DeriveIden)]
enum DevicePlacements {
    Table,
    Id,
    DeviceId,
    Site,
    Ward,
    Bed,
    StartsAt,
    EndsAt,
    EndedBy,
}

const INDEX: &str = "device_placements_device_idx";

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Devices::Table)
                    .add_column(ColumnDef::new(Devices::PlacedAt).timestamp_with_time_zone().null())
                    .to_owned(),
            )
            .await?;
        manager
            .exec_stmt(
                Query::update()
                    .table(Devices::Table)
                    .value(Devices::PlacedAt, Expr::col(Devices::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(DevicePlacements::Table)
                    .col(ColumnDef::new(DevicePlacements::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(DevicePlacements::DeviceId).uuid().not_null())
                    .col(ColumnDef::new(DevicePlacements::Site).string().null())
                    .col(ColumnDef::new(DevicePlacements::Ward).string().null())
                    .col(ColumnDef::new(DevicePlacements::Bed).string().null())
                    .col(
                        ColumnDef::new(DevicePlacements::StartsAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(DevicePlacements::EndsAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(ColumnDef::new(DevicePlacements::EndedBy).string().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(INDEX)
                    .table(DevicePlacements::Table)
                    .col(DevicePlacements::DeviceId)
                    .col(DevicePlacements::EndsAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(DevicePlacements::Table).to_owned())
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Devices::Table)
                    .drop_column(Devices::PlacedAt)
                    .to_owned(),
            )
            .await
    }
}
