use sea_orm::entity::prelude::*;

#[derive(Clone, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "emr_destinations")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    pub kind: String,
    /// JSON: endpoint, CA PEM, receiving application and facility, and the secrets (bearer token, client key)
    /// as envelopes sealed with the secrets keyring (`destinations::seal_settings`).
    pub settings: String,
    /// JSON arrays of site names and "site/ward" names; both empty means everywhere.
    pub sites: String,
    pub wards: String,
    pub interval_secs: i64,
    pub enabled: bool,
    pub created_by: String,
    pub created_at: DateTimeUtc,
    /// The replica whose relay holds the destination's lease, and until when.
    pub relay_owner: Option<String>,
    pub relay_lease_until: Option<DateTimeUtc>,
    /// With a charting interval: windows (of observation time) before this are charted.
    pub charted_until: Option<DateTimeUtc>,
    /// Why the relay cannot deliver to this destination (a secret that does not open), until it can again.
    pub relay_error: Option<String>,
}

// Settings hold a bearer token: never print them.
impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmrDestination")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
