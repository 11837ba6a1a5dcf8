//! Where the devices of a rollout are, for the people watching it: a device id alone does not tell a biomedical
//! engineer which bed to walk to when an install is deferred or fails.

use std::collections::HashMap;

use sea_orm::{ColumnTrait as _, ConnectionTrait, EntityTrait as _, QueryFilter as _, QuerySelect as _};
use uuid::Uuid;

use crate::error::Result;
use crate::persistence::entity::device;

/// Ids per query: well under every backend's bound-parameter limit.
const BATCH: usize = 500;

/// Id, serial, site, ward, bed.
type Row = (Uuid, String, Option<String>, Option<String>, Option<String>);

/// A device's serial number and its place, `site/ward/bed` as far as it is placed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placed {
    pub serial: String,
    pub location: String,
}

/// The serial and place of each of `ids` that still exists (a deleted device is simply absent).
pub async fn lookup<C: ConnectionTrait>(conn: &C, ids: &[Uuid]) -> Result<HashMap<Uuid, Placed>> {
    let mut out = HashMap::with_capacity(ids.len());
    for batch in ids.chunks(BATCH) {
        let rows: Vec<Row> = device::Entity::find()
            .filter(device::Column::Id.is_in(batch.iter().copied()))
            .select_only()
            .column(device::Column::Id)
            .column(device::Column::SerialNumber)
            .column(device::Column::Site)
            .column(device::Column::Ward)
            .column(device::Column::Bed)
            .into_tuple()
            .all(conn)
            .await?;
        for (id, serial, site, ward, bed) in rows {
            out.insert(
                id,
                Placed {
                    serial,
                    location: location(site.as_deref(), ward.as_deref(), bed.as_deref()),
                },
            );
        }
    }
    Ok(out)
}

/// `site/ward/bed`, stopping at the first level a device is not placed at (empty when unplaced).
fn location(site: Option<&str>, ward: Option<&str>, bed: Option<&str>) -> String {
    [site, ward, bed]
        .into_iter()
        .map_while(|level| level.filter(|l| !l.is_empty()))
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::location;

    #[test]
    fn a_location_stops_where_the_device_is_no_longer_placed() {
        assert_eq!(location(Some("north"), Some("icu"), Some("bed-3")), "north/icu/bed-3");
        assert_eq!(location(Some("north"), Some("icu"), None), "north/icu");
        assert_eq!(location(Some("north"), None, Some("bed-3")), "north");
        assert_eq!(location(None, None, None), "");
    }
}
