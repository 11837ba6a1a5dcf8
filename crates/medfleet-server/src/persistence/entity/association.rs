use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "associations")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub device_id: Uuid,
    pub patient_id: Uuid,
    pub starts_at: DateTimeUtc,
    pub ends_at: Option<DateTimeUtc>,
    pub source: String,
    pub created_by: String,
    pub created_at: DateTimeUtc,
    pub ended_by: Option<String>,
    /// Stored readings of its period are still being charted in the background, one bounded transaction at a time.
    pub charting_backlog: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// Associations open at `at`: started before it and not ended by then (periods are half-open).
pub fn open_at(at: DateTimeUtc) -> sea_orm::Condition {
    use sea_orm::sea_query::ExprTrait as _;
    sea_orm::Condition::all()
        .add(Column::StartsAt.lt(at))
        .add(Column::EndsAt.is_null().or(Column::EndsAt.gt(at)))
}
