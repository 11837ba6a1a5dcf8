use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "certificates")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub serial: String,
    pub identity: String,
    pub not_before: DateTimeUtc,
    pub not_after: DateTimeUtc,
    pub issued_at: DateTimeUtc,
    pub revoked_at: Option<DateTimeUtc>,
    pub revocation_reason: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
