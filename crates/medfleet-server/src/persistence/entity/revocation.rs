use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "revocations")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub seq: i64,
    pub serial: String,
    pub identity: String,
    pub reason: String,
    pub revoked_at: DateTimeUtc,
    pub not_after: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
