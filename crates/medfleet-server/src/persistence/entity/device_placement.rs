use sea_orm::entity::prelude::*;

/// An earlier place of a device, as the half-open period `[starts_at, ends_at)`; the current place is on the
/// device row.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "device_placements")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub device_id: Uuid,
    pub site: Option<String>,
    pub ward: Option<String>,
    pub bed: Option<String>,
    pub starts_at: DateTimeUtc,
    pub ends_at: DateTimeUtc,
    /// Who moved the device away.
    pub ended_by: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
