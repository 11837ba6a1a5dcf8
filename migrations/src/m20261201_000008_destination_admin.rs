//! Where chart entries go is an admin decision: creating or changing an EMR destination (which can send every chart
//! entry of its scope to a new host) is taken from `it_provisioner`, who keeps reading destinations and retrying
//! dead-lettered deliveries (`emr_destination:retry`).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const TAKEN: crate::seed::Permissions = &[("it_provisioner", "emr_destination", "update")];
const GIVEN: crate::seed::Permissions = &[("it_provisioner", "emr_destination", "retry")];

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::seed::revoke(manager, TAKEN).await?;
        crate::seed::grant(manager, GIVEN).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::seed::revoke(manager, GIVEN).await?;
        crate::seed::grant(manager, TAKEN).await
    }
}
