use sea_orm::entity::prelude::*;

// PHI: `identifier` and `display_name` leave this table only for EMR destinations and authorised API callers.
#[derive(Clone, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "patients")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub authority: String,
    pub identifier: String,
    pub display_name: Option<String>,
    pub created_at: DateTimeUtc,
}

// Redacted so a stray `{:?}` cannot put an identifier into a log line.
impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Patient").field("id", &self.id).finish_non_exhaustive()
    }
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
