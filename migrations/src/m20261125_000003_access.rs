//! Access control and audit: casbin policy rules (seeded with the built-in roles), a policy version that replicas
//! watch to reload, and the hash-chained audit log.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum CasbinRules {
    Table,
    Id,
    Ptype,
    V0,
    V1,
    V2,
    V3,
    V4,
    V5,
}

#[derive(DeriveIden)]
enum PolicyVersion {
    Table,
    Id,
    Version,
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    Seq,
    At,
    Actor,
    Action,
    Target,
    Scope,
    Outcome,
    RequestId,
    Detail,
    PrevHash,
    Hash,
}

/// The built-in roles' permissions: (role, object, action). `*` is any object or action. Admins edit these later
/// through the API; the migration only seeds them.
const SEED: &[(&str, &str, &str)] = &[
    ("admin", "*", "*"),
    ("it_provisioner", "site", "read"),
    ("it_provisioner", "site", "create"),
    ("it_provisioner", "site", "update"),
    ("it_provisioner", "ward", "read"),
    ("it_provisioner", "ward", "create"),
    ("it_provisioner", "ward", "update"),
    ("it_provisioner", "device", "read"),
    ("it_provisioner", "device", "create"),
    ("it_provisioner", "device", "update"),
    ("it_provisioner", "device", "revoke"),
    ("it_provisioner", "device", "decommission"),
    ("it_provisioner", "enrollment", "create"),
    ("biomed", "site", "read"),
    ("biomed", "ward", "read"),
    ("biomed", "device", "read"),
    ("clinician", "site", "read"),
    ("clinician", "ward", "read"),
    ("clinician", "device", "read"),
    ("emr_system", "site", "read"),
    ("emr_system", "ward", "read"),
    ("emr_system", "device", "read"),
    ("auditor", "site", "read"),
    ("auditor", "ward", "read"),
    ("auditor", "device", "read"),
    ("auditor", "audit", "read"),
];

// The trait's signature elides SchemaManager's lifetime; matching it exactly is required.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let text = |c: CasbinRules| ColumnDef::new(c).string_len(200).not_null().default("").to_owned();
        manager
            .create_table(
                Table::create()
                    .table(CasbinRules::Table)
                    .col(
                        ColumnDef::new(CasbinRules::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(CasbinRules::Ptype).string_len(12).not_null())
                    .col(text(CasbinRules::V0))
                    .col(text(CasbinRules::V1))
                    .col(text(CasbinRules::V2))
                    .col(text(CasbinRules::V3))
                    .col(text(CasbinRules::V4))
                    .col(text(CasbinRules::V5))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("casbin_rules_unique")
                    .table(CasbinRules::Table)
                    .col(CasbinRules::Ptype)
                    .col(CasbinRules::V0)
                    .col(CasbinRules::V1)
                    .col(CasbinRules::V2)
                    .col(CasbinRules::V3)
                    .col(CasbinRules::V4)
                    .col(CasbinRules::V5)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(PolicyVersion::Table)
                    .col(ColumnDef::new(PolicyVersion::Id).integer().not_null().primary_key())
                    .col(ColumnDef::new(PolicyVersion::Version).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .exec_stmt(
                Query::insert()
                    .into_table(PolicyVersion::Table)
                    .columns([PolicyVersion::Id, PolicyVersion::Version])
                    .values_panic([1.into(), 1.into()])
                    .to_owned(),
            )
            .await?;
        let mut seed = Query::insert()
            .into_table(CasbinRules::Table)
            .columns([CasbinRules::Ptype, CasbinRules::V0, CasbinRules::V1, CasbinRules::V2])
            .to_owned();
        for (role, object, action) in SEED {
            seed.values_panic(["p".into(), (*role).into(), (*object).into(), (*action).into()]);
        }
        manager.exec_stmt(seed).await?;

        manager
            .create_table(
                Table::create()
                    .table(AuditLog::Table)
                    .col(
                        ColumnDef::new(AuditLog::Seq)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(AuditLog::At).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(AuditLog::Actor).string_len(200).not_null())
                    .col(ColumnDef::new(AuditLog::Action).string_len(200).not_null())
                    .col(ColumnDef::new(AuditLog::Target).string_len(400).not_null())
                    .col(ColumnDef::new(AuditLog::Scope).string_len(200).not_null())
                    .col(ColumnDef::new(AuditLog::Outcome).string_len(16).not_null())
                    .col(ColumnDef::new(AuditLog::RequestId).string_len(64).not_null())
                    .col(ColumnDef::new(AuditLog::Detail).text().not_null())
                    .col(ColumnDef::new(AuditLog::PrevHash).string_len(64).not_null())
                    .col(ColumnDef::new(AuditLog::Hash).string_len(64).not_null())
                    .to_owned(),
            )
            .await?;
        for (name, column) in [
            ("audit_log_actor_idx", AuditLog::Actor),
            ("audit_log_at_idx", AuditLog::At),
        ] {
            manager
                .create_index(Index::create().name(name).table(AuditLog::Table).col(column).to_owned())
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            AuditLog::Table.into_iden(),
            PolicyVersion::Table.into_iden(),
            CasbinRules::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        Ok(())
    }
}
