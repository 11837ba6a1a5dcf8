use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "rollout_actions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub rollout_id: Uuid,
    pub device_id: Uuid,
    pub wave: i32,
    pub state: String,
    pub reason: String,
    pub detail: String,
    pub bytes_downloaded: i64,
    pub approved_by: String,
    /// The device id while the action is unfinished, NULL after (unique: one unfinished rollout per device).
    pub active_device: Option<Uuid>,
    pub from_version: String,
    pub from_release_counter: i64,
    pub updated_at: DateTimeUtc,
    /// 1 at first, one more per operator retry: devices tell a retry from a replay by it.
    pub attempt: i32,
    /// A clinician's approval ends then (NULL: none, or given before approvals expired: void).
    pub approved_until: Option<DateTimeUtc>,
    /// The patient association the approval was given for (NULL: the device was not bound).
    pub approved_association: Option<Uuid>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
