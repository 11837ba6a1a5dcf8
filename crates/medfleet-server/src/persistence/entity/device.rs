use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "devices")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub serial_number: String,
    pub manufacturer: String,
    pub model: String,
    pub device_class: String,
    pub eui64: Option<String>,
    pub site: Option<String>,
    pub ward: Option<String>,
    pub bed: Option<String>,
    pub state: String,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    /// Since when it stands where it stands (its earlier places are in `device_placements`); `None` only for
    /// rows older than placement history, which count from `created_at`.
    pub placed_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
