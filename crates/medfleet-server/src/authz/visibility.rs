//! The one place-visibility rule: what a caller whose grants cover some sites and wards may see. A resource in a
//! ward is visible to a grant on that ward or its site; a resource with no place (in storage, fleet-wide) only to
//! a fleet-wide grant. Listings, watches, feeds and drift all ask here, so the rule cannot drift between them.

use std::collections::BTreeSet;

/// What a caller may see in listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    All,
    Scopes {
        sites: BTreeSet<String>,
        wards: BTreeSet<(String, String)>,
    },
}

impl Visibility {
    pub fn sees_site(&self, site: &str) -> bool {
        match self {
            Self::All => true,
            Self::Scopes { sites, .. } => sites.contains(site),
        }
    }

    pub fn sees_ward(&self, site: &str, ward: &str) -> bool {
        match self {
            Self::All => true,
            Self::Scopes { sites, wards } => {
                sites.contains(site) || wards.contains(&(site.to_owned(), ward.to_owned()))
            }
        }
    }
}

impl Visibility {
    /// Whether everything `other` shows is visible here too.
    pub fn covers(&self, other: &Visibility) -> bool {
        match (self, other) {
            (Self::All, _) => true,
            (Self::Scopes { .. }, Self::All) => false,
            (Self::Scopes { .. }, Self::Scopes { sites, wards }) => {
                sites.iter().all(|s| self.sees_site(s)) && wards.iter().all(|(s, w)| self.sees_ward(s, w))
            }
        }
    }

    /// Whether a resource at this place (none: in storage, fleet-wide) is visible.
    pub fn sees_place(&self, site: Option<&str>, ward: Option<&str>) -> bool {
        match (site, ward) {
            (Some(site), Some(ward)) => self.sees_ward(site, ward),
            _ => *self == Self::All,
        }
    }
}
