use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "firmware_artifact_chunks")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub artifact_id: Uuid,
    #[sea_orm(primary_key, auto_increment = false)]
    pub idx: i32,
    pub chunk_sha256: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
