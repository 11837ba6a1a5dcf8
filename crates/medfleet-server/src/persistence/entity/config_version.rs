use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "config_versions")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub version: i64,
    pub layer_kind: String,
    pub layer_key: String,
    pub document: String,
    pub author: String,
    pub comment: String,
    pub created_at: DateTimeUtc,
    pub rollback_of: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
