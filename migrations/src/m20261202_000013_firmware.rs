//! Firmware: medfleetd's online TUF keys (sealed), the trusted root versions, the current snapshot/timestamp/
//! targets metadata, artifacts stored as content-addressed chunks (shared by every replica), rollouts and each
//! device's action in one, and named leases (the rollout scheduler's leader lease). `rollout_actions.active_device`
//! holds the device id while the action is unfinished and NULL after: its unique index is what keeps a device in
//! at most one unfinished rollout, whatever replica creates them. Seeds the firmware and rollout permissions.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum FirmwareKeys {
    Table,
    Role,
    KeyId,
    PublicJson,
    SealedPrivate,
    CreatedAt,
}

#[derive(DeriveIden)]
enum FirmwareRoots {
    Table,
    Version,
    Body,
    ExpiresAt,
    InstalledAt,
    InstalledBy,
}

#[derive(DeriveIden)]
enum FirmwareMetadata {
    Table,
    Role,
    Version,
    Body,
    ExpiresAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum FirmwareArtifacts {
    Table,
    Id,
    TargetName,
    HardwareId,
    Version,
    ReleaseCounter,
    DowngradeFrom,
    Sha256,
    Length,
    ChunkSize,
    TargetsVersion,
    UploadedAt,
    UploadedBy,
    Comment,
}

#[derive(DeriveIden)]
enum FirmwareChunks {
    Table,
    Sha256,
    Data,
}

#[derive(DeriveIden)]
enum FirmwareArtifactChunks {
    Table,
    ArtifactId,
    Idx,
    ChunkSha256,
}

#[derive(DeriveIden)]
enum Rollouts {
    Table,
    Id,
    ArtifactId,
    State,
    Waves,
    SuccessThreshold,
    HaltThreshold,
    MinExecuted,
    SoakSeconds,
    Window,
    Timezone,
    ClinicalUse,
    DeadlineSeconds,
    CurrentWave,
    WaveStartedAt,
    WaveSucceededAt,
    Reason,
    Scopes,
    CreatedBy,
    Comment,
    CreatedAt,
    StartedAt,
    UpdatedAt,
    RollbackOf,
}

#[derive(DeriveIden)]
enum RolloutActions {
    Table,
    Id,
    RolloutId,
    DeviceId,
    Wave,
    State,
    Reason,
    Detail,
    BytesDownloaded,
    ApprovedBy,
    ActiveDevice,
    FromVersion,
    FromReleaseCounter,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Leases {
    Table,
    Name,
    Holder,
    ExpiresAt,
}

const SEED: crate::seed::Permissions = &[
    ("biomed", "firmware", "read"),
    ("biomed", "firmware", "upload"),
    ("biomed", "firmware", "delete"),
    ("biomed", "rollout", "read"),
    ("biomed", "rollout", "create"),
    ("biomed", "rollout", "control"),
    ("clinician", "rollout", "read"),
    ("clinician", "rollout", "approve"),
    ("auditor", "firmware", "read"),
    ("auditor", "rollout", "read"),
    ("it_provisioner", "rollout", "read"),
];

fn at(column: impl IntoIden) -> ColumnDef {
    ColumnDef::new(column).timestamp_with_time_zone().not_null().to_owned()
}

fn maybe_at(column: impl IntoIden) -> ColumnDef {
    ColumnDef::new(column).timestamp_with_time_zone().null().to_owned()
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(FirmwareKeys::Table)
                    .col(
                        ColumnDef::new(FirmwareKeys::Role)
                            .string_len(16)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(FirmwareKeys::KeyId).string_len(64).not_null())
                    .col(ColumnDef::new(FirmwareKeys::PublicJson).text().not_null())
                    .col(ColumnDef::new(FirmwareKeys::SealedPrivate).text().not_null())
                    .col(at(FirmwareKeys::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(FirmwareRoots::Table)
                    .col(
                        ColumnDef::new(FirmwareRoots::Version)
                            .big_integer()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(FirmwareRoots::Body).text().not_null())
                    .col(at(FirmwareRoots::ExpiresAt))
                    .col(at(FirmwareRoots::InstalledAt))
                    .col(ColumnDef::new(FirmwareRoots::InstalledBy).string_len(200).not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(FirmwareMetadata::Table)
                    .col(
                        ColumnDef::new(FirmwareMetadata::Role)
                            .string_len(16)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(FirmwareMetadata::Version).big_integer().not_null())
                    .col(ColumnDef::new(FirmwareMetadata::Body).text().not_null())
                    .col(at(FirmwareMetadata::ExpiresAt))
                    .col(at(FirmwareMetadata::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(FirmwareArtifacts::Table)
                    .col(ColumnDef::new(FirmwareArtifacts::Id).uuid().not_null().primary_key())
                    .col(
                        ColumnDef::new(FirmwareArtifacts::TargetName)
                            .string_len(128)
                            .not_null()
                            .unique_key(),
                    )
                    .col(ColumnDef::new(FirmwareArtifacts::HardwareId).string_len(128).not_null())
                    .col(ColumnDef::new(FirmwareArtifacts::Version).string_len(64).not_null())
                    .col(
                        ColumnDef::new(FirmwareArtifacts::ReleaseCounter)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(FirmwareArtifacts::DowngradeFrom).text().not_null())
                    .col(
                        ColumnDef::new(FirmwareArtifacts::Sha256)
                            .string_len(64)
                            .not_null()
                            .unique_key(),
                    )
                    .col(ColumnDef::new(FirmwareArtifacts::Length).big_integer().not_null())
                    .col(ColumnDef::new(FirmwareArtifacts::ChunkSize).integer().not_null())
                    .col(
                        ColumnDef::new(FirmwareArtifacts::TargetsVersion)
                            .big_integer()
                            .not_null(),
                    )
                    .col(at(FirmwareArtifacts::UploadedAt))
                    .col(ColumnDef::new(FirmwareArtifacts::UploadedBy).string_len(200).not_null())
                    .col(ColumnDef::new(FirmwareArtifacts::Comment).text().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("firmware_artifacts_model_idx")
                    .table(FirmwareArtifacts::Table)
                    .col(FirmwareArtifacts::HardwareId)
                    .col(FirmwareArtifacts::ReleaseCounter)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(FirmwareChunks::Table)
                    .col(
                        ColumnDef::new(FirmwareChunks::Sha256)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(FirmwareChunks::Data).blob().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(FirmwareArtifactChunks::Table)
                    .col(ColumnDef::new(FirmwareArtifactChunks::ArtifactId).uuid().not_null())
                    .col(ColumnDef::new(FirmwareArtifactChunks::Idx).integer().not_null())
                    .col(
                        ColumnDef::new(FirmwareArtifactChunks::ChunkSha256)
                            .string_len(64)
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(FirmwareArtifactChunks::ArtifactId)
                            .col(FirmwareArtifactChunks::Idx),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("firmware_artifact_chunks_chunk_idx")
                    .table(FirmwareArtifactChunks::Table)
                    .col(FirmwareArtifactChunks::ChunkSha256)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Rollouts::Table)
                    .col(ColumnDef::new(Rollouts::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(Rollouts::ArtifactId).uuid().not_null())
                    .col(ColumnDef::new(Rollouts::State).string_len(16).not_null())
                    .col(ColumnDef::new(Rollouts::Waves).text().not_null())
                    .col(ColumnDef::new(Rollouts::SuccessThreshold).string_len(16).not_null())
                    .col(ColumnDef::new(Rollouts::HaltThreshold).string_len(16).not_null())
                    .col(ColumnDef::new(Rollouts::MinExecuted).integer().not_null())
                    .col(ColumnDef::new(Rollouts::SoakSeconds).big_integer().not_null())
                    .col(ColumnDef::new(Rollouts::Window).string_len(200).not_null())
                    .col(ColumnDef::new(Rollouts::Timezone).string_len(64).not_null())
                    .col(ColumnDef::new(Rollouts::ClinicalUse).string_len(16).not_null())
                    .col(ColumnDef::new(Rollouts::DeadlineSeconds).big_integer().not_null())
                    .col(ColumnDef::new(Rollouts::CurrentWave).integer().not_null())
                    .col(maybe_at(Rollouts::WaveStartedAt))
                    .col(maybe_at(Rollouts::WaveSucceededAt))
                    .col(ColumnDef::new(Rollouts::Reason).text().not_null())
                    .col(ColumnDef::new(Rollouts::Scopes).text().not_null())
                    .col(ColumnDef::new(Rollouts::CreatedBy).string_len(200).not_null())
                    .col(ColumnDef::new(Rollouts::Comment).text().not_null())
                    .col(at(Rollouts::CreatedAt))
                    .col(maybe_at(Rollouts::StartedAt))
                    .col(at(Rollouts::UpdatedAt))
                    .col(ColumnDef::new(Rollouts::RollbackOf).uuid().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("rollouts_state_idx")
                    .table(Rollouts::Table)
                    .col(Rollouts::State)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RolloutActions::Table)
                    .col(ColumnDef::new(RolloutActions::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(RolloutActions::RolloutId).uuid().not_null())
                    .col(ColumnDef::new(RolloutActions::DeviceId).uuid().not_null())
                    .col(ColumnDef::new(RolloutActions::Wave).integer().not_null())
                    .col(ColumnDef::new(RolloutActions::State).string_len(24).not_null())
                    .col(ColumnDef::new(RolloutActions::Reason).string_len(64).not_null())
                    .col(ColumnDef::new(RolloutActions::Detail).text().not_null())
                    .col(ColumnDef::new(RolloutActions::BytesDownloaded).big_integer().not_null())
                    .col(ColumnDef::new(RolloutActions::ApprovedBy).string_len(200).not_null())
                    .col(ColumnDef::new(RolloutActions::ActiveDevice).uuid().null().unique_key())
                    .col(ColumnDef::new(RolloutActions::FromVersion).string_len(200).not_null())
                    .col(
                        ColumnDef::new(RolloutActions::FromReleaseCounter)
                            .big_integer()
                            .not_null(),
                    )
                    .col(at(RolloutActions::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("rollout_actions_rollout_idx")
                    .table(RolloutActions::Table)
                    .col(RolloutActions::RolloutId)
                    .col(RolloutActions::Wave)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("rollout_actions_device_idx")
                    .table(RolloutActions::Table)
                    .col(RolloutActions::DeviceId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Leases::Table)
                    .col(ColumnDef::new(Leases::Name).string_len(64).not_null().primary_key())
                    .col(ColumnDef::new(Leases::Holder).string_len(200).not_null())
                    .col(at(Leases::ExpiresAt))
                    .to_owned(),
            )
            .await?;
        crate::seed::grant(manager, SEED).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Leases::Table.into_iden(),
            RolloutActions::Table.into_iden(),
            Rollouts::Table.into_iden(),
            FirmwareArtifactChunks::Table.into_iden(),
            FirmwareChunks::Table.into_iden(),
            FirmwareArtifacts::Table.into_iden(),
            FirmwareMetadata::Table.into_iden(),
            FirmwareRoots::Table.into_iden(),
            FirmwareKeys::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        crate::seed::revoke(manager, SEED).await
    }
}
