//! Registry persistence: sites, wards and devices on sea-orm, identical on SQLite and PostgreSQL.
//!
//! Every write is one transaction that re-checks the state it depends on, so concurrent requests (on this or
//! another replica) cannot leave the registry inconsistent; unique indexes catch the remaining races.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use medfleet_core::registry::{
    Device, DeviceFilter, DeviceState, DeviceUpdate, Eui64, Location, NewDevice, NewSite, NewWard, Site, SiteUpdate,
    Tags, Ward, WardUpdate,
};
use sea_orm::sea_query::{Expr, Query};
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait as _, ConnectionTrait, DatabaseConnection, EntityTrait as _,
    IntoActiveModel as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
};
use uuid::Uuid;

use crate::audit::Context;
use crate::authz::visibility::Visibility;
use crate::error::{Error, Result};
use crate::persistence::db::begin_write;
use crate::persistence::db::{Page, now, page};
use crate::persistence::entity::{association, device, device_placement, device_presence, device_tag, site, ward};

#[derive(Debug, Clone)]
pub struct Registry {
    db: DatabaseConnection,
}

impl Registry {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    pub async fn create_site(&self, new: NewSite, audit: &Context) -> Result<Site> {
        let txn = begin_write(&self.db).await?;
        if site::Entity::find_by_id(new.name.clone()).one(&txn).await?.is_some() {
            return Err(Error::AlreadyExists(format!("site '{}' already exists", new.name)));
        }
        let at = now();
        let model = site::ActiveModel {
            name: Set(new.name),
            display_name: Set(new.display_name),
            timezone: Set(new.timezone),
            created_at: Set(at),
            updated_at: Set(at),
        }
        .insert(&txn)
        .await?;
        audit
            .record(
                &txn,
                "site.create",
                format!("site/{}", model.name),
                model.name.clone(),
                "",
            )
            .await?;
        txn.commit().await?;
        Ok(site_from(model))
    }

    pub async fn get_site(&self, name: &str) -> Result<Site> {
        find_site(&self.db, name).await.map(site_from)
    }

    pub async fn list_sites(
        &self,
        size: u64,
        after: Option<String>,
        visibility: &Visibility,
    ) -> Result<Page<Site, String>> {
        let mut query = site::Entity::find();
        if let Visibility::Scopes { sites, .. } = visibility {
            query = query.filter(site::Column::Name.is_in(sites.iter().cloned()));
        }
        if let Some(after) = after {
            query = query.filter(site::Column::Name.gt(after));
        }
        let rows = query
            .order_by_asc(site::Column::Name)
            .limit(size + 1)
            .all(&self.db)
            .await?;
        Ok(page(rows.into_iter().map(site_from).collect(), size, |s: &Site| {
            s.name.clone()
        }))
    }

    pub async fn update_site(&self, update: SiteUpdate, audit: &Context) -> Result<Site> {
        let txn = begin_write(&self.db).await?;
        let mut model = find_site(&txn, &update.name).await?.into_active_model();
        let mut changed = Vec::new();
        if let Some(display_name) = update.display_name {
            model.display_name = Set(display_name);
            changed.push("display_name".to_owned());
        }
        if let Some(timezone) = update.timezone {
            // Windows of rollouts that name no zone move with it: the old zone is kept in the audit trail.
            let old = model.timezone.clone().take().unwrap_or_default();
            changed.push(format!("timezone {old} -> {timezone}"));
            model.timezone = Set(timezone);
        }
        model.updated_at = Set(now());
        let model = model.update(&txn).await?;
        audit
            .record(
                &txn,
                "site.update",
                format!("site/{}", model.name),
                model.name.clone(),
                changed.join(", "),
            )
            .await?;
        txn.commit().await?;
        Ok(site_from(model))
    }

    pub async fn create_ward(&self, new: NewWard, audit: &Context) -> Result<Ward> {
        let txn = begin_write(&self.db).await?;
        find_site(&txn, &new.site).await?;
        if ward::Entity::find_by_id((new.site.clone(), new.name.clone()))
            .one(&txn)
            .await?
            .is_some()
        {
            return Err(Error::AlreadyExists(format!(
                "ward '{}/{}' already exists",
                new.site, new.name
            )));
        }
        let at = now();
        let model = ward::ActiveModel {
            site: Set(new.site),
            name: Set(new.name),
            display_name: Set(new.display_name),
            beds: Set(beds_json(&new.beds)?),
            created_at: Set(at),
            updated_at: Set(at),
        }
        .insert(&txn)
        .await?;
        audit
            .record(
                &txn,
                "ward.create",
                format!("ward/{}/{}", model.site, model.name),
                format!("{}/{}", model.site, model.name),
                "",
            )
            .await?;
        txn.commit().await?;
        ward_from(model)
    }

    pub async fn get_ward(&self, site: &str, name: &str) -> Result<Ward> {
        find_ward(&self.db, site, name).await.and_then(ward_from)
    }

    pub async fn list_wards(
        &self,
        site: &str,
        size: u64,
        after: Option<String>,
        visibility: &Visibility,
    ) -> Result<Page<Ward, String>> {
        let visible: Option<Vec<String>> = match visibility {
            Visibility::Scopes { sites, wards } if !sites.contains(site) => Some(
                wards
                    .iter()
                    .filter(|(s, _)| s == site)
                    .map(|(_, w)| w.clone())
                    .collect(),
            ),
            _ => None,
        };
        if visible.as_ref().is_some_and(Vec::is_empty) {
            // Nothing of this site is visible: answer as if it did not exist.
            return Err(Error::NotFound(format!("site '{site}' does not exist")));
        }
        find_site(&self.db, site).await?;
        let mut query = ward::Entity::find().filter(ward::Column::Site.eq(site));
        if let Some(names) = visible {
            query = query.filter(ward::Column::Name.is_in(names));
        }
        if let Some(after) = after {
            query = query.filter(ward::Column::Name.gt(after));
        }
        let rows = query
            .order_by_asc(ward::Column::Name)
            .limit(size + 1)
            .all(&self.db)
            .await?;
        let wards = rows.into_iter().map(ward_from).collect::<Result<Vec<_>>>()?;
        Ok(page(wards, size, |w: &Ward| w.name.clone()))
    }

    pub async fn update_ward(&self, site: &str, name: &str, update: WardUpdate, audit: &Context) -> Result<Ward> {
        let txn = begin_write(&self.db).await?;
        let mut model = find_ward(&txn, site, name).await?.into_active_model();
        if let Some(display_name) = update.display_name {
            model.display_name = Set(display_name);
        }
        if let Some(beds) = update.beds {
            // A bed that a device stands in cannot disappear from under it.
            let occupied: Vec<String> = device::Entity::find()
                .filter(device::Column::Site.eq(site))
                .filter(device::Column::Ward.eq(name))
                .filter(device::Column::Bed.is_not_null())
                .all(&txn)
                .await?
                .into_iter()
                .filter_map(|d| d.bed)
                .filter(|bed| !beds.contains(bed))
                .collect();
            if !occupied.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "beds {} of ward {site}/{name} hold devices; move those devices first",
                    occupied.join(", ")
                )));
            }
            model.beds = Set(beds_json(&beds)?);
        }
        model.updated_at = Set(now());
        let model = model.update(&txn).await?;
        audit
            .record(
                &txn,
                "ward.update",
                format!("ward/{}/{}", model.site, model.name),
                format!("{}/{}", model.site, model.name),
                "",
            )
            .await?;
        txn.commit().await?;
        ward_from(model)
    }

    pub async fn register_device(&self, new: NewDevice, audit: &Context) -> Result<Device> {
        let txn = begin_write(&self.db).await?;
        let device = insert_device(&txn, new).await?;
        audit
            .record(
                &txn,
                "device.register",
                format!("device/{}", device.id),
                device.location.as_ref().map_or_else(|| "*".to_owned(), Location::scope),
                "",
            )
            .await?;
        txn.commit().await?;
        Ok(device)
    }

    /// A device opened a session: enrolled becomes active. Refused for a decommissioned device.
    pub async fn mark_active(&self, id: Uuid, audit: &Context) -> Result<Device> {
        let txn = begin_write(&self.db).await?;
        // Locked, so a concurrent revocation's state change is not overwritten.
        let current = lock_device(&txn, id).await?;
        if current.state == DeviceState::Decommissioned.as_str() {
            return Err(Error::FailedPrecondition(format!("device {id} is decommissioned")));
        }
        if current.state == DeviceState::Enrolled.as_str() {
            audit
                .record(
                    &txn,
                    "device.activate",
                    format!("device/{id}"),
                    crate::audit::device_scope(current.site.as_deref(), current.ward.as_deref()),
                    "first session",
                )
                .await?;
            let mut model = current.into_active_model();
            model.state = Set(DeviceState::Active.as_str().to_owned());
            model.updated_at = Set(now());
            model.update(&txn).await?;
        }
        txn.commit().await?;
        self.get_device(id).await
    }

    pub async fn get_device(&self, id: Uuid) -> Result<Device> {
        let model = find_device(&self.db, id).await?;
        let tags = load_tags(&self.db, &[id]).await?.remove(&id).unwrap_or_default();
        device_from(model, tags)
    }

    /// The given devices that exist, in id order.
    pub async fn devices_by_id(&self, ids: &[Uuid]) -> Result<Vec<Device>> {
        let mut rows = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            rows.extend(
                device::Entity::find()
                    .filter(device::Column::Id.is_in(chunk.iter().copied()))
                    .order_by_asc(device::Column::Id)
                    .all(&self.db)
                    .await?,
            );
        }
        let found: Vec<Uuid> = rows.iter().map(|m| m.id).collect();
        let mut tags = load_tags(&self.db, &found).await?;
        rows.into_iter()
            .map(|m| {
                let t = tags.remove(&m.id).unwrap_or_default();
                device_from(m, t)
            })
            .collect()
    }

    pub async fn list_devices(
        &self,
        filter: &DeviceFilter,
        size: u64,
        after: Option<Uuid>,
        visibility: &Visibility,
    ) -> Result<Page<Device, Uuid>> {
        let mut query = device::Entity::find();
        if let Visibility::Scopes { sites, wards } = visibility {
            let mut visible = sea_orm::Condition::any().add(device::Column::Site.is_in(sites.iter().cloned()));
            for (site, ward) in wards {
                visible = visible.add(
                    sea_orm::Condition::all()
                        .add(device::Column::Site.eq(site.as_str()))
                        .add(device::Column::Ward.eq(ward.as_str())),
                );
            }
            query = query.filter(visible);
        }
        if let Some(site) = &filter.site {
            query = query.filter(device::Column::Site.eq(site));
        }
        if let Some(ward) = &filter.ward {
            query = query.filter(device::Column::Ward.eq(ward));
        }
        if let Some(model) = &filter.model {
            query = query.filter(device::Column::Model.eq(model));
        }
        if let Some(state) = filter.state {
            query = query.filter(device::Column::State.eq(state.as_str()));
        }
        for (key, value) in &filter.tags {
            query = query.filter(
                device::Column::Id.in_subquery(
                    Query::select()
                        .column(device_tag::Column::DeviceId)
                        .from(device_tag::Entity)
                        .and_where(device_tag::Column::Key.eq(key))
                        .and_where(device_tag::Column::Value.eq(value))
                        .to_owned(),
                ),
            );
        }
        if let Some(online) = filter.online {
            let with_session = Query::select()
                .column(device_presence::Column::DeviceId)
                .from(device_presence::Entity)
                .and_where(device_presence::Column::Online.eq(true))
                .to_owned();
            query = query.filter(if online {
                device::Column::Id.in_subquery(with_session)
            } else {
                device::Column::Id.not_in_subquery(with_session)
            });
        }
        if let Some(after) = after {
            query = query.filter(device::Column::Id.gt(after));
        }
        let rows = query
            .order_by_asc(device::Column::Id)
            .limit(size + 1)
            .all(&self.db)
            .await?;
        let ids: Vec<Uuid> = rows.iter().map(|m| m.id).collect();
        let mut tags = load_tags(&self.db, &ids).await?;
        let devices = rows
            .into_iter()
            .map(|m| {
                let t = tags.remove(&m.id).unwrap_or_default();
                device_from(m, t)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(page(devices, size, |d: &Device| d.id))
    }

    pub async fn update_device(&self, id: Uuid, update: DeviceUpdate, audit: &Context) -> Result<Device> {
        let txn = begin_write(&self.db).await?;
        let current = lock_device(&txn, id).await?;
        let from = crate::audit::device_scope(current.site.as_deref(), current.ward.as_deref());
        if current.state == DeviceState::Decommissioned.as_str() {
            return Err(Error::FailedPrecondition(format!(
                "device {id} is decommissioned and can no longer be changed"
            )));
        }
        let changed: Vec<&str> = [("location", update.location.is_some()), ("tags", update.tags.is_some())]
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(field, _)| *field)
            .collect();
        let moved_from = (current.site.clone(), current.ward.clone(), current.bed.clone());
        let placed_since = current.placed_at.unwrap_or(current.created_at);
        let mut model = current.into_active_model();
        if let Some(location) = &update.location {
            if let Some(location) = location {
                check_location(&txn, location).await?;
            }
            let (site, ward, bed) = location_columns(location.as_ref());
            model.site = Set(site);
            model.ward = Set(ward);
            model.bed = Set(bed);
        }
        if let Some(tags) = &update.tags {
            device_tag::Entity::delete_many()
                .filter(device_tag::Column::DeviceId.eq(id))
                .exec(&txn)
                .await?;
            insert_tags(&txn, id, &tags.clone().into_inner()).await?;
        }
        let at = now();
        model.updated_at = Set(at);
        let moved = update.location.as_ref().is_some_and(|location| {
            let (site, ward, bed) = location_columns(location.as_ref());
            moved_from != (site, ward, bed)
        });
        if moved {
            // The place it leaves becomes history, so readings it observed there chart there whenever they arrive.
            let (site, ward, bed) = moved_from;
            device_placement::ActiveModel {
                id: Set(Uuid::new_v4()),
                device_id: Set(id),
                site: Set(site),
                ward: Set(ward),
                bed: Set(bed),
                starts_at: Set(placed_since),
                ends_at: Set(at),
                ended_by: Set(audit.actor.clone()),
            }
            .insert(&txn)
            .await?;
            model.placed_at = Set(Some(at));
        }
        let model = model.update(&txn).await?;
        let ended = if moved {
            end_bed_bound(&txn, id, at, audit, &from).await?
        } else {
            0
        };
        let tags = load_tags(&txn, &[id]).await?.remove(&id).unwrap_or_default();
        let to = crate::audit::device_scope(model.site.as_deref(), model.ward.as_deref());
        // Both ends of a move, so an auditor watching either ward sees it (scopes only: beds and tags stay out).
        let mut detail = if from == to {
            changed.join(",")
        } else {
            format!("{}; moved {from} -> {to}", changed.join(","))
        };
        if ended > 0 {
            detail = format!("{detail}; ended {ended} bed-bound (ADT) association(s)");
            tracing::info!(device = %id, ended, "a moved device no longer charts to the patient of its old bed");
        }
        audit
            .record(&txn, "device.update", format!("device/{id}"), to, detail)
            .await?;
        txn.commit().await?;
        device_from(model, tags)
    }
}

/// Ends the device's open ADT associations: the EMR bound the patient to the bed, not to this device, so a device
/// that leaves the bed stops charting to them. (A clinician's association binds the device itself, e.g. a
/// transport monitor travelling with its patient, and survives a move.) Returns how many ended.
async fn end_bed_bound(
    txn: &impl ConnectionTrait,
    device: Uuid,
    at: DateTime<Utc>,
    audit: &Context,
    scope: &str,
) -> Result<u64> {
    // Planned ones (starting after the move) are cancelled: they bound the old bed, and nothing is charted to them.
    let planned = association::Entity::find()
        .filter(association::Column::DeviceId.eq(device))
        .filter(association::Column::Source.eq("adt"))
        .filter(association::Column::StartsAt.gte(at))
        .all(txn)
        .await?;
    let open = association::Entity::find()
        .filter(association::Column::DeviceId.eq(device))
        .filter(association::Column::Source.eq("adt"))
        .filter(association::open_at(at))
        .all(txn)
        .await?;
    // Each one in the trail like any other end or cancellation, by the patient's internal id.
    for (rows, action, how) in [
        (
            &planned,
            "association.cancel",
            "cancelled: the device moved away from the bed it was planned for",
        ),
        (
            &open,
            "association.end",
            "ended: the device moved away from the patient's bed",
        ),
    ] {
        for a in rows {
            audit
                .record(
                    txn,
                    action,
                    format!("device/{device}"),
                    scope,
                    format!("association {} of patient {} {how}", a.id, a.patient_id),
                )
                .await?;
        }
    }
    association::Entity::delete_many()
        .filter(association::Column::Id.is_in(planned.iter().map(|a| a.id)))
        .exec(txn)
        .await?;
    association::Entity::update_many()
        .col_expr(association::Column::EndsAt, Expr::value(Some(at)))
        .col_expr(association::Column::EndedBy, Expr::value(Some(audit.actor.clone())))
        .filter(association::Column::Id.is_in(open.iter().map(|a| a.id)))
        .exec(txn)
        .await?;
    Ok((planned.len() + open.len()) as u64)
}

/// Inserts one device (and its tags) inside the caller's transaction after checking its location and uniqueness.
pub(crate) async fn insert_device(txn: &impl ConnectionTrait, new: NewDevice) -> Result<Device> {
    if let Some(location) = &new.location {
        check_location(txn, location).await?;
    }
    if let Some(existing) = device::Entity::find()
        .filter(device::Column::Manufacturer.eq(&new.manufacturer))
        .filter(device::Column::SerialNumber.eq(&new.serial_number))
        .one(txn)
        .await?
    {
        // The existing device's id stays out: it may stand outside the caller's scopes.
        let _ = existing;
        return Err(Error::AlreadyExists(format!(
            "a {} device with serial number {} is already registered",
            new.manufacturer, new.serial_number
        )));
    }
    if let Some(eui64) = &new.eui64
        && let Some(existing) = device::Entity::find()
            .filter(device::Column::Eui64.eq(eui64.as_str()))
            .one(txn)
            .await?
    {
        let _ = existing;
        return Err(Error::AlreadyExists(format!(
            "EUI-64 {eui64} is already registered to another device"
        )));
    }
    let at = now();
    let id = Uuid::new_v4();
    let (site, ward, bed) = location_columns(new.location.as_ref());
    let model = device::ActiveModel {
        id: Set(id),
        serial_number: Set(new.serial_number),
        manufacturer: Set(new.manufacturer),
        model: Set(new.model),
        device_class: Set(new.class.as_str().to_owned()),
        eui64: Set(new.eui64.map(|e| e.as_str().to_owned())),
        site: Set(site),
        ward: Set(ward),
        bed: Set(bed),
        state: Set(DeviceState::Registered.as_str().to_owned()),
        created_at: Set(at),
        updated_at: Set(at),
        placed_at: Set(Some(at)),
    }
    .insert(txn)
    .await?;
    let tags = new.tags.into_inner();
    insert_tags(txn, id, &tags).await?;
    device_from(model, tags)
}

async fn find_site(conn: &impl ConnectionTrait, name: &str) -> Result<site::Model> {
    site::Entity::find_by_id(name.to_owned())
        .one(conn)
        .await?
        .ok_or_else(|| Error::NotFound(format!("site '{name}' does not exist")))
}

async fn find_ward(conn: &impl ConnectionTrait, site: &str, name: &str) -> Result<ward::Model> {
    ward::Entity::find_by_id((site.to_owned(), name.to_owned()))
        .one(conn)
        .await?
        .ok_or_else(|| Error::NotFound(format!("ward '{site}/{name}' does not exist")))
}

/// A device row locked for the rest of the transaction (`SELECT … FOR UPDATE` on PostgreSQL; SQLite's write
/// transactions are exclusive anyway). Taking the device row first is the lock order every writer follows.
pub(crate) async fn lock_device(conn: &impl ConnectionTrait, id: Uuid) -> Result<device::Model> {
    device::Entity::find_by_id(id)
        .lock_exclusive()
        .one(conn)
        .await?
        .ok_or_else(|| Error::NotFound(format!("device {id} does not exist")))
}

async fn find_device(conn: &impl ConnectionTrait, id: Uuid) -> Result<device::Model> {
    device::Entity::find_by_id(id)
        .one(conn)
        .await?
        .ok_or_else(|| Error::NotFound(format!("device {id} does not exist")))
}

/// A location refers to an existing ward and, if it names a bed, one of that ward's beds.
pub(crate) async fn check_location(conn: &impl ConnectionTrait, location: &Location) -> Result<()> {
    let ward = ward::Entity::find_by_id((location.site.clone(), location.ward.clone()))
        .one(conn)
        .await?
        .ok_or_else(|| {
            Error::MissingPlace(format!(
                "ward {} does not exist; create it first (medfleet wards create)",
                location.scope()
            ))
        })?;
    if let Some(bed) = &location.bed {
        let beds = parse_beds(&ward.beds)?;
        if !beds.contains(bed) {
            let known = if beds.is_empty() {
                "none".to_owned()
            } else {
                beds.join(", ")
            };
            return Err(Error::MissingPlace(format!(
                "ward {} has no bed '{bed}' (its beds: {known}); add the bed to the ward first",
                location.scope()
            )));
        }
    }
    Ok(())
}

async fn insert_tags(conn: &impl ConnectionTrait, id: Uuid, tags: &BTreeMap<String, String>) -> Result<()> {
    if tags.is_empty() {
        return Ok(());
    }
    device_tag::Entity::insert_many(tags.iter().map(|(key, value)| device_tag::ActiveModel {
        device_id: Set(id),
        key: Set(key.clone()),
        value: Set(value.clone()),
    }))
    .exec(conn)
    .await?;
    Ok(())
}

async fn load_tags(conn: &impl ConnectionTrait, ids: &[Uuid]) -> Result<BTreeMap<Uuid, BTreeMap<String, String>>> {
    let mut out: BTreeMap<Uuid, BTreeMap<String, String>> = BTreeMap::new();
    if ids.is_empty() {
        return Ok(out);
    }
    let rows = device_tag::Entity::find()
        .filter(device_tag::Column::DeviceId.is_in(ids.iter().copied()))
        .all(conn)
        .await?;
    for row in rows {
        out.entry(row.device_id).or_default().insert(row.key, row.value);
    }
    Ok(out)
}

fn location_columns(location: Option<&Location>) -> (Option<String>, Option<String>, Option<String>) {
    match location {
        Some(l) => (Some(l.site.clone()), Some(l.ward.clone()), l.bed.clone()),
        None => (None, None, None),
    }
}

fn beds_json(beds: &[String]) -> Result<String> {
    serde_json::to_string(beds).map_err(|e| Error::Internal(format!("cannot encode beds: {e}")))
}

fn parse_beds(json: &str) -> Result<Vec<String>> {
    serde_json::from_str(json).map_err(|e| Error::Internal(format!("stored bed list is corrupt: {e}")))
}

fn site_from(m: site::Model) -> Site {
    Site {
        name: m.name,
        display_name: m.display_name,
        timezone: m.timezone,
        created_at: m.created_at,
        updated_at: m.updated_at,
    }
}

fn ward_from(m: ward::Model) -> Result<Ward> {
    Ok(Ward {
        beds: parse_beds(&m.beds)?,
        site: m.site,
        name: m.name,
        display_name: m.display_name,
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

fn device_from(m: device::Model, tags: BTreeMap<String, String>) -> Result<Device> {
    let corrupt = |what: &str, e: String| Error::Internal(format!("device {} has a corrupt {what}: {e}", m.id));
    let location = match (m.site.clone(), m.ward.clone()) {
        (Some(site), Some(ward)) => Some(Location {
            site,
            ward,
            bed: m.bed.clone(),
        }),
        _ => None,
    };
    Ok(Device {
        id: m.id,
        class: m.device_class.parse().map_err(|e| corrupt("class", e))?,
        state: m.state.parse().map_err(|e| corrupt("state", e))?,
        eui64: m
            .eui64
            .as_deref()
            .map(Eui64::parse)
            .transpose()
            .map_err(|e| corrupt("EUI-64", e))?,
        serial_number: m.serial_number,
        manufacturer: m.manufacturer,
        model: m.model,
        location,
        tags: Tags::from_stored(tags),
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}
