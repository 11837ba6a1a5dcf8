use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "emr_outbox")]
pub struct Model {
    /// Also the feed cursor: assigned in commit order (inserts take the outbox lock).
    #[sea_orm(primary_key)]
    pub id: i64,
    pub destination: String,
    pub observation_id: Uuid,
    /// The observation status this event carries (preliminary, final, entered-in-error).
    pub status: String,
    /// pending, delivered, dead (or skipped: superseded within a charting interval).
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: DateTimeUtc,
    pub last_error: Option<String>,
    pub created_at: DateTimeUtc,
    pub delivered_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
