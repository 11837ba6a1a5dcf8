use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "firmware_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub role: String,
    pub key_id: String,
    pub public_json: String,
    pub sealed_private: String,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
