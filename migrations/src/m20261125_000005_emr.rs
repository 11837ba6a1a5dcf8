//! Readings into patient records: patients (PHI, kept to the minimum), time-bounded device–patient
//! associations, ingested reading batches (dedup by device and sequence) and readings, canonical chart
//! observations, EMR destinations, the delivery outbox (one row per observation event and destination), and
//! durable feed subscriptions. Also seeds the built-in roles' clinical permissions.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Patients {
    Table,
    Id,
    Authority,
    Identifier,
    DisplayName,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Associations {
    Table,
    Id,
    DeviceId,
    PatientId,
    StartsAt,
    EndsAt,
    Source,
    CreatedBy,
    CreatedAt,
    EndedBy,
}

#[derive(DeriveIden)]
enum ReadingBatches {
    Table,
    DeviceId,
    Sequence,
    ReceivedAt,
    Accepted,
    Rejections,
    Digest,
}

#[derive(DeriveIden)]
enum Readings {
    Table,
    Id,
    DeviceId,
    Sequence,
    ItemIndex,
    Code,
    Value,
    ObservedAt,
    ReceivedAt,
    Questionable,
    ObservationId,
}

#[derive(DeriveIden)]
enum Observations {
    Table,
    Id,
    PatientId,
    DeviceId,
    AssociationId,
    Kind,
    Components,
    ObservedAt,
    Questionable,
    Status,
    ValidatedBy,
    ValidatedAt,
    Site,
    Ward,
    Bed,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum EmrDestinations {
    Table,
    Name,
    Kind,
    Settings,
    Sites,
    Wards,
    IntervalSecs,
    Enabled,
    CreatedBy,
    CreatedAt,
    RelayOwner,
    RelayLeaseUntil,
    ChartedUntil,
}

#[derive(DeriveIden)]
enum EmrOutbox {
    Table,
    Id,
    Destination,
    ObservationId,
    Status,
    State,
    Attempts,
    NextAttemptAt,
    LastError,
    CreatedAt,
    DeliveredAt,
}

#[derive(DeriveIden)]
enum FeedSubscriptions {
    Table,
    Name,
    Destination,
    Cursor,
    Owner,
    CreatedAt,
    UpdatedAt,
}

const SEED: crate::seed::Permissions = &[
    ("clinician", "patient", "read"),
    ("clinician", "association", "update"),
    ("clinician", "observation", "read"),
    ("clinician", "observation", "validate"),
    ("emr_system", "patient", "read"),
    ("emr_system", "association", "update"),
    ("emr_system", "observation", "read"),
    ("emr_system", "feed", "subscribe"),
    ("auditor", "observation", "read"),
    ("it_provisioner", "emr_destination", "read"),
    ("it_provisioner", "emr_destination", "update"),
];

fn timestamp(column: impl IntoIden) -> ColumnDef {
    ColumnDef::new(column).timestamp_with_time_zone().not_null().to_owned()
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    #[allow(clippy::too_many_lines)]
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Patients::Table)
                    .col(ColumnDef::new(Patients::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(Patients::Authority).string_len(64).not_null())
                    .col(ColumnDef::new(Patients::Identifier).string_len(256).not_null())
                    .col(ColumnDef::new(Patients::DisplayName).string_len(200).null())
                    .col(timestamp(Patients::CreatedAt))
                    .index(
                        Index::create()
                            .name("patients_identifier_key")
                            .unique()
                            .col(Patients::Authority)
                            .col(Patients::Identifier),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Associations::Table)
                    .col(ColumnDef::new(Associations::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(Associations::DeviceId).uuid().not_null())
                    .col(ColumnDef::new(Associations::PatientId).uuid().not_null())
                    .col(timestamp(Associations::StartsAt))
                    .col(ColumnDef::new(Associations::EndsAt).timestamp_with_time_zone().null())
                    .col(ColumnDef::new(Associations::Source).string_len(16).not_null())
                    .col(ColumnDef::new(Associations::CreatedBy).string_len(200).not_null())
                    .col(timestamp(Associations::CreatedAt))
                    .col(ColumnDef::new(Associations::EndedBy).string_len(200).null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("associations_device_idx")
                    .table(Associations::Table)
                    .col(Associations::DeviceId)
                    .col(Associations::StartsAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ReadingBatches::Table)
                    .col(ColumnDef::new(ReadingBatches::DeviceId).uuid().not_null())
                    .col(ColumnDef::new(ReadingBatches::Sequence).big_integer().not_null())
                    .col(timestamp(ReadingBatches::ReceivedAt))
                    .col(ColumnDef::new(ReadingBatches::Accepted).integer().not_null())
                    .col(ColumnDef::new(ReadingBatches::Rejections).text().not_null())
                    .col(ColumnDef::new(ReadingBatches::Digest).string_len(64).not_null())
                    .primary_key(
                        Index::create()
                            .col(ReadingBatches::DeviceId)
                            .col(ReadingBatches::Sequence),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Readings::Table)
                    .col(
                        ColumnDef::new(Readings::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Readings::DeviceId).uuid().not_null())
                    .col(ColumnDef::new(Readings::Sequence).big_integer().not_null())
                    .col(ColumnDef::new(Readings::ItemIndex).integer().not_null())
                    .col(ColumnDef::new(Readings::Code).string_len(64).not_null())
                    .col(ColumnDef::new(Readings::Value).double().not_null())
                    .col(timestamp(Readings::ObservedAt))
                    .col(timestamp(Readings::ReceivedAt))
                    .col(ColumnDef::new(Readings::Questionable).boolean().not_null())
                    .col(ColumnDef::new(Readings::ObservationId).uuid().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("readings_device_time_idx")
                    .table(Readings::Table)
                    .col(Readings::DeviceId)
                    .col(Readings::ObservedAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Observations::Table)
                    .col(ColumnDef::new(Observations::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(Observations::PatientId).uuid().not_null())
                    .col(ColumnDef::new(Observations::DeviceId).uuid().not_null())
                    .col(ColumnDef::new(Observations::AssociationId).uuid().not_null())
                    .col(ColumnDef::new(Observations::Kind).string_len(64).not_null())
                    .col(ColumnDef::new(Observations::Components).text().not_null())
                    .col(timestamp(Observations::ObservedAt))
                    .col(ColumnDef::new(Observations::Questionable).boolean().not_null())
                    .col(ColumnDef::new(Observations::Status).string_len(32).not_null())
                    .col(ColumnDef::new(Observations::ValidatedBy).string_len(200).null())
                    .col(
                        ColumnDef::new(Observations::ValidatedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(ColumnDef::new(Observations::Site).string_len(64).null())
                    .col(ColumnDef::new(Observations::Ward).string_len(64).null())
                    .col(ColumnDef::new(Observations::Bed).string_len(64).null())
                    .col(timestamp(Observations::CreatedAt))
                    .col(timestamp(Observations::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("observations_patient_time_idx")
                    .table(Observations::Table)
                    .col(Observations::PatientId)
                    .col(Observations::ObservedAt)
                    .to_owned(),
            )
            .await?;
        // Interval charting reads windows of observation time across patients.
        manager
            .create_index(
                Index::create()
                    .name("observations_time_idx")
                    .table(Observations::Table)
                    .col(Observations::ObservedAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(EmrDestinations::Table)
                    .col(
                        ColumnDef::new(EmrDestinations::Name)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(EmrDestinations::Kind).string_len(16).not_null())
                    .col(ColumnDef::new(EmrDestinations::Settings).text().not_null())
                    .col(ColumnDef::new(EmrDestinations::Sites).text().not_null())
                    .col(ColumnDef::new(EmrDestinations::Wards).text().not_null())
                    .col(ColumnDef::new(EmrDestinations::IntervalSecs).big_integer().not_null())
                    .col(ColumnDef::new(EmrDestinations::Enabled).boolean().not_null())
                    .col(ColumnDef::new(EmrDestinations::CreatedBy).string_len(200).not_null())
                    .col(timestamp(EmrDestinations::CreatedAt))
                    .col(ColumnDef::new(EmrDestinations::RelayOwner).string_len(200).null())
                    .col(
                        ColumnDef::new(EmrDestinations::RelayLeaseUntil)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(EmrDestinations::ChartedUntil)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(EmrOutbox::Table)
                    .col(
                        ColumnDef::new(EmrOutbox::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(EmrOutbox::Destination).string_len(64).not_null())
                    .col(ColumnDef::new(EmrOutbox::ObservationId).uuid().not_null())
                    .col(ColumnDef::new(EmrOutbox::Status).string_len(32).not_null())
                    .col(ColumnDef::new(EmrOutbox::State).string_len(16).not_null())
                    .col(ColumnDef::new(EmrOutbox::Attempts).integer().not_null())
                    .col(timestamp(EmrOutbox::NextAttemptAt))
                    .col(ColumnDef::new(EmrOutbox::LastError).text().null())
                    .col(timestamp(EmrOutbox::CreatedAt))
                    .col(ColumnDef::new(EmrOutbox::DeliveredAt).timestamp_with_time_zone().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("emr_outbox_pending_idx")
                    .table(EmrOutbox::Table)
                    .col(EmrOutbox::Destination)
                    .col(EmrOutbox::State)
                    .col(EmrOutbox::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(FeedSubscriptions::Table)
                    .col(
                        ColumnDef::new(FeedSubscriptions::Name)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(FeedSubscriptions::Destination).string_len(64).not_null())
                    .col(ColumnDef::new(FeedSubscriptions::Cursor).big_integer().not_null())
                    .col(ColumnDef::new(FeedSubscriptions::Owner).string_len(200).not_null())
                    .col(timestamp(FeedSubscriptions::CreatedAt))
                    .col(timestamp(FeedSubscriptions::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        crate::seed::grant(manager, SEED).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            FeedSubscriptions::Table.into_iden(),
            EmrOutbox::Table.into_iden(),
            EmrDestinations::Table.into_iden(),
            Observations::Table.into_iden(),
            Readings::Table.into_iden(),
            ReadingBatches::Table.into_iden(),
            Associations::Table.into_iden(),
            Patients::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        crate::seed::revoke(manager, SEED).await
    }
}
