//! Ordered delivery per chart entry: status changes look up an entry's earlier deliveries (to supersede them) and
//! the relay checks that no older row of the same entry is pending, both by (observation, destination).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum EmrOutbox {
    Table,
    ObservationId,
    Destination,
    State,
}

const INDEX: &str = "emr_outbox_observation_idx";

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name(INDEX)
                    .table(EmrOutbox::Table)
                    .col(EmrOutbox::ObservationId)
                    .col(EmrOutbox::Destination)
                    .col(EmrOutbox::State)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(Index::drop().name(INDEX).table(EmrOutbox::Table).to_owned())
            .await
    }
}
