use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "casbin_rules")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub ptype: String,
    pub v0: String,
    pub v1: String,
    pub v2: String,
    pub v3: String,
    pub v4: String,
    pub v5: String,
}

impl Model {
    /// The rule's values without trailing empty columns.
    pub fn values(&self) -> Vec<String> {
        let mut values: Vec<String> = [&self.v0, &self.v1, &self.v2, &self.v3, &self.v4, &self.v5]
            .iter()
            .map(|v| (*v).clone())
            .collect();
        while values.last().is_some_and(String::is_empty) {
            values.pop();
        }
        values
    }
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
