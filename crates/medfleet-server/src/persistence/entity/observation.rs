use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "observations")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub patient_id: Uuid,
    pub device_id: Uuid,
    pub association_id: Uuid,
    /// MDC REFID of the measurement.
    pub kind: String,
    /// JSON array of `[mdc_refid, value]` pairs.
    pub components: String,
    pub observed_at: DateTimeUtc,
    pub questionable: bool,
    pub status: String,
    pub validated_by: Option<String>,
    pub validated_at: Option<DateTimeUtc>,
    pub site: Option<String>,
    pub ward: Option<String>,
    pub bed: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    /// JSON `{vital: {low, high}}` of the limits that applied when it was charted (none: the adult defaults).
    pub alarm_limits: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
