//! Feed subscription names belong to their owner: the key becomes (owner, name), so one integration cannot claim
//! (or learn of) a name another one uses. The table is rebuilt, since SQLite cannot change a primary key in place.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

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

#[derive(DeriveIden)]
enum Rebuilt {
    #[sea_orm(iden = "feed_subscriptions_rebuilt")]
    Table,
}

const COLUMNS: &str = r#"name, destination, "cursor", owner, created_at, updated_at"#;

async fn rebuild(manager: &SchemaManager<'_>, owner_in_key: bool) -> Result<(), DbErr> {
    let mut table = Table::create();
    table
        .table(Rebuilt::Table)
        .col(ColumnDef::new(FeedSubscriptions::Name).string_len(64).not_null())
        .col(ColumnDef::new(FeedSubscriptions::Destination).string_len(64).not_null())
        .col(ColumnDef::new(FeedSubscriptions::Cursor).big_integer().not_null())
        .col(ColumnDef::new(FeedSubscriptions::Owner).string_len(200).not_null())
        .col(
            ColumnDef::new(FeedSubscriptions::CreatedAt)
                .timestamp_with_time_zone()
                .not_null(),
        )
        .col(
            ColumnDef::new(FeedSubscriptions::UpdatedAt)
                .timestamp_with_time_zone()
                .not_null(),
        );
    let mut key = Index::create();
    if owner_in_key {
        key.col(FeedSubscriptions::Owner);
    }
    key.col(FeedSubscriptions::Name);
    table.primary_key(&mut key);
    manager.create_table(table).await?;
    let db = manager.get_connection();
    db.execute_unprepared(&format!(
        "INSERT INTO feed_subscriptions_rebuilt ({COLUMNS}) SELECT {COLUMNS} FROM feed_subscriptions"
    ))
    .await?;
    manager
        .drop_table(Table::drop().table(FeedSubscriptions::Table).to_owned())
        .await?;
    manager
        .rename_table(
            Table::rename()
                .table(Rebuilt::Table, FeedSubscriptions::Table)
                .to_owned(),
        )
        .await
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        rebuild(manager, true).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        rebuild(manager, false).await
    }
}
