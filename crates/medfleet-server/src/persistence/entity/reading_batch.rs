use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "reading_batches")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub device_id: Uuid,
    #[sea_orm(primary_key, auto_increment = false)]
    pub sequence: i64,
    pub received_at: DateTimeUtc,
    pub accepted: i32,
    /// JSON array of `{index, code, reason}`: the ack is answered again from it on a resend.
    pub rejections: String,
    /// SHA-256 of the batch's items: a resend must carry the same readings as the stored batch.
    pub digest: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
