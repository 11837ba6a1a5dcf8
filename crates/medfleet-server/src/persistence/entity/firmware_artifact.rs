use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "firmware_artifacts")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub target_name: String,
    pub hardware_id: String,
    pub version: String,
    pub release_counter: i64,
    /// JSON array of release counters.
    pub downgrade_from: String,
    pub sha256: String,
    pub length: i64,
    pub chunk_size: i32,
    pub targets_version: i64,
    pub uploaded_at: DateTimeUtc,
    pub uploaded_by: String,
    pub comment: String,
    /// Where the bytes are: `database` (chunks) or `object_store` (one object).
    pub storage: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
