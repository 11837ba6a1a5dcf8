use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "rollouts")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub artifact_id: Uuid,
    pub state: String,
    /// JSON array of cumulative shares ("10%").
    pub waves: String,
    pub success_threshold: String,
    pub halt_threshold: String,
    pub min_executed: i32,
    pub soak_seconds: i64,
    pub window: String,
    pub timezone: String,
    pub clinical_use: String,
    pub deadline_seconds: i64,
    pub current_wave: i32,
    pub wave_started_at: Option<DateTimeUtc>,
    pub wave_succeeded_at: Option<DateTimeUtc>,
    pub reason: String,
    /// JSON array of the "site/ward" places its devices were in when it was created (who may see it).
    pub scopes: String,
    pub created_by: String,
    pub comment: String,
    pub created_at: DateTimeUtc,
    pub started_at: Option<DateTimeUtc>,
    pub updated_at: DateTimeUtc,
    pub rollback_of: Option<Uuid>,
    /// Set when resumed from a halt: the halt threshold judges only devices that finished after it.
    pub halt_judged_since: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
