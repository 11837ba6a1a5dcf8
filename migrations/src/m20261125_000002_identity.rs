//! Identity lifecycle: enrollment tokens, every issued certificate, the revocation log, operator and service
//! principals.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum EnrollmentTokens {
    Table,
    Id,
    DeviceId,
    // SHA-256 of the token, hex; the token itself is never stored.
    TokenHash,
    CreatedBy,
    CreatedAt,
    ExpiresAt,
    UsedAt,
}

#[derive(DeriveIden)]
enum Certificates {
    Table,
    // Lower-case hex of the DER serial number.
    Serial,
    Identity,
    NotBefore,
    NotAfter,
    IssuedAt,
    RevokedAt,
    RevocationReason,
}

#[derive(DeriveIden)]
enum Revocations {
    Table,
    // Monotonic: replicas poll for entries after the last one they applied.
    Seq,
    Serial,
    Identity,
    Reason,
    RevokedAt,
    NotAfter,
}

#[derive(DeriveIden)]
enum Principals {
    Table,
    // medfleet://user/<name> or medfleet://service/<name>
    Identity,
    CreatedBy,
    CreatedAt,
    DisabledAt,
}

#[derive(DeriveIden)]
enum Devices {
    Table,
    Id,
}

// The trait's signature elides SchemaManager's lifetime; matching it exactly is required.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(EnrollmentTokens::Table)
                    .col(ColumnDef::new(EnrollmentTokens::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(EnrollmentTokens::DeviceId).uuid().not_null())
                    .col(
                        ColumnDef::new(EnrollmentTokens::TokenHash)
                            .string_len(64)
                            .not_null()
                            .unique_key(),
                    )
                    .col(ColumnDef::new(EnrollmentTokens::CreatedBy).string_len(200).not_null())
                    .col(
                        ColumnDef::new(EnrollmentTokens::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(EnrollmentTokens::ExpiresAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(EnrollmentTokens::UsedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("enrollment_tokens_device_fkey")
                            .from(EnrollmentTokens::Table, EnrollmentTokens::DeviceId)
                            .to(Devices::Table, Devices::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("enrollment_tokens_device_idx")
                    .table(EnrollmentTokens::Table)
                    .col(EnrollmentTokens::DeviceId)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Certificates::Table)
                    .col(
                        ColumnDef::new(Certificates::Serial)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Certificates::Identity).string_len(200).not_null())
                    .col(
                        ColumnDef::new(Certificates::NotBefore)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Certificates::NotAfter)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Certificates::IssuedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Certificates::RevokedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(ColumnDef::new(Certificates::RevocationReason).string_len(40).null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("certificates_identity_idx")
                    .table(Certificates::Table)
                    .col(Certificates::Identity)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Revocations::Table)
                    .col(
                        ColumnDef::new(Revocations::Seq)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Revocations::Serial).string_len(64).not_null())
                    .col(ColumnDef::new(Revocations::Identity).string_len(200).not_null())
                    .col(ColumnDef::new(Revocations::Reason).string_len(40).not_null())
                    .col(
                        ColumnDef::new(Revocations::RevokedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Revocations::NotAfter)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Principals::Table)
                    .col(
                        ColumnDef::new(Principals::Identity)
                            .string_len(200)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Principals::CreatedBy).string_len(200).not_null())
                    .col(
                        ColumnDef::new(Principals::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Principals::DisabledAt).timestamp_with_time_zone().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Principals::Table.into_iden(),
            Revocations::Table.into_iden(),
            Certificates::Table.into_iden(),
            EnrollmentTokens::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        Ok(())
    }
}
