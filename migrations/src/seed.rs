//! Built-in role permissions that later migrations add and remove, and the policy version bump that makes every
//! replica reload them.

use sea_orm_migration::prelude::*;

#[derive(DeriveIden)]
enum CasbinRules {
    Table,
    Ptype,
    V0,
    V1,
    V2,
}

#[derive(DeriveIden)]
enum PolicyVersion {
    Table,
    Version,
}

/// `(role, object, action)` permissions of built-in roles.
pub(crate) type Permissions = &'static [(&'static str, &'static str, &'static str)];

async fn bump_policy_version(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    manager
        .exec_stmt(
            Query::update()
                .table(PolicyVersion::Table)
                .value(PolicyVersion::Version, Expr::col(PolicyVersion::Version).add(1))
                .to_owned(),
        )
        .await
}

pub(crate) async fn grant(manager: &SchemaManager<'_>, permissions: Permissions) -> Result<(), DbErr> {
    let mut seed = Query::insert()
        .into_table(CasbinRules::Table)
        .columns([CasbinRules::Ptype, CasbinRules::V0, CasbinRules::V1, CasbinRules::V2])
        .to_owned();
    for (role, object, action) in permissions {
        seed.values_panic(["p".into(), (*role).into(), (*object).into(), (*action).into()]);
    }
    manager.exec_stmt(seed).await?;
    bump_policy_version(manager).await
}

pub(crate) async fn revoke(manager: &SchemaManager<'_>, permissions: Permissions) -> Result<(), DbErr> {
    for (role, object, action) in permissions {
        manager
            .exec_stmt(
                Query::delete()
                    .from_table(CasbinRules::Table)
                    .and_where(Expr::col(CasbinRules::Ptype).eq("p"))
                    .and_where(Expr::col(CasbinRules::V0).eq(*role))
                    .and_where(Expr::col(CasbinRules::V1).eq(*object))
                    .and_where(Expr::col(CasbinRules::V2).eq(*action))
                    .to_owned(),
            )
            .await?;
    }
    bump_policy_version(manager).await
}
