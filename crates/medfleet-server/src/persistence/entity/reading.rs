use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "readings")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub device_id: Uuid,
    pub sequence: i64,
    pub item_index: i32,
    /// Canonical MDC REFID of the vital.
    pub code: String,
    pub value: f64,
    pub observed_at: DateTimeUtc,
    pub received_at: DateTimeUtc,
    pub questionable: bool,
    /// The chart entry it belongs to; `None` while no association covers its observation time.
    pub observation_id: Option<Uuid>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
