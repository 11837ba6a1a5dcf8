use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "config_schemas")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub model: String,
    pub schema: String,
    pub author: String,
    pub comment: String,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
