use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "device_presence")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub device_id: Uuid,
    pub online: bool,
    pub session_id: Uuid,
    pub replica: String,
    pub connected_at: DateTimeUtc,
    pub last_seen: DateTimeUtc,
    pub disconnected_at: Option<DateTimeUtc>,
    pub operational_state: String,
    pub firmware_version: String,
    pub reported_version: i64,
    pub reported_digest: String,
    pub rejection: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
