use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "config_layers")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub layer_kind: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub layer_key: String,
    pub version: i64,
    pub document: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
