//! Desired configuration storage: immutable versions of every layer, the current document of each layer, the
//! per-model JSON Schemas, and drift between desired and reported configuration.
//!
//! Every change runs in one transaction under one lock (a PostgreSQL advisory lock; SQLite's write lock), so the
//! validation of a change sees exactly the layers it will be combined with: two changes that are each valid but
//! invalid together cannot both land.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use medfleet_core::device_config::{ConfigSchema, Desired, Layer, LayerKey, LayerSet, Placement};
use medfleet_core::presence::ReportedConfig;
use medfleet_core::registry::{DeviceState, Location};
use medfleet_core::validation::Violations;
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait as _, Condition, ConnectionTrait, DatabaseConnection,
    EntityTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
};
use serde_json::Value;
use uuid::Uuid;

use crate::audit::Context;
use crate::authz::visibility::Visibility;
use crate::error::{Error, Result};
use crate::persistence::db::begin_write;
use crate::persistence::db::{Page, now};
use crate::persistence::entity::{config_layer, config_schema, config_version, device, device_presence, site, ward};
use crate::persistence::events::{Event, Events};

/// Arbitrary but fixed key of the PostgreSQL advisory lock that serialises configuration changes.
const CONFIG_LOCK_KEY: i64 = 0x6d65_6466_6c74_0004;
/// Largest layer document or schema accepted, in bytes of JSON.
pub const MAX_DOCUMENT: usize = 256 * 1024;
/// At most this many violations are reported for one refused change.
const MAX_VIOLATIONS: usize = 20;

/// One immutable configuration version.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    pub version: u64,
    pub layer: LayerKey,
    pub document: Value,
    pub author: String,
    pub comment: String,
    pub created_at: DateTime<Utc>,
    pub rollback_of: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Schema {
    pub model: String,
    pub schema: Value,
    pub author: String,
    pub comment: String,
    pub updated_at: DateTime<Utc>,
}

/// A device's desired configuration with everything `config get --explain` shows.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub placement: Placement,
    pub desired: Desired,
    /// For every leaf: the layer it came from and that layer's current version.
    pub sources: BTreeMap<String, (LayerKey, u64)>,
}

#[derive(Debug, Clone)]
pub struct DriftRow {
    pub device: Uuid,
    pub model: String,
    pub location: Option<Location>,
    pub desired_version: u64,
    pub desired_digest: String,
    pub reported: ReportedConfig,
    pub online: bool,
}

impl DriftRow {
    /// The device runs the desired document (or, with no layer applying to it, runs none) and has refused
    /// nothing since.
    pub fn in_sync(&self) -> bool {
        let nothing_desired = self.desired_version == 0 && self.reported.digest.is_empty();
        (nothing_desired || self.reported.digest == self.desired_digest) && self.reported.rejection.is_none()
    }
}

#[derive(Debug, Clone)]
pub struct Configs {
    db: DatabaseConnection,
    events: Arc<Events>,
}

/// Parses a JSON document from a request, as the field `field`.
pub fn parse_document(field: &str, text: &str) -> Result<Value> {
    if text.len() > MAX_DOCUMENT {
        return Err(Violations::single(
            field,
            format!("is {} bytes; at most {MAX_DOCUMENT} are accepted", text.len()),
        )
        .into());
    }
    serde_json::from_str(text).map_err(|e| Violations::single(field, format!("is not valid JSON: {e}")).into())
}

fn layer_scope_static(key: &LayerKey) -> Option<String> {
    match key.layer {
        Layer::Fleet | Layer::Model => Some("*".to_owned()),
        Layer::Site | Layer::Ward => Some(key.key.clone()),
        Layer::Device => None,
    }
}

fn stored_layer(kind: &str, key: String) -> Result<LayerKey> {
    let layer = kind
        .parse::<Layer>()
        .map_err(|e| Error::Internal(format!("stored configuration layer: {e}")))?;
    Ok(LayerKey::new(layer, key))
}

fn stored_document(text: &str, what: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| Error::Internal(format!("stored {what} is not JSON: {e}")))
}

fn version_from(m: config_version::Model) -> Result<Version> {
    Ok(Version {
        version: u64::try_from(m.version).unwrap_or_default(),
        layer: stored_layer(&m.layer_kind, m.layer_key)?,
        document: stored_document(&m.document, "configuration version")?,
        author: m.author,
        comment: m.comment,
        created_at: m.created_at,
        rollback_of: m.rollback_of.and_then(|v| u64::try_from(v).ok()),
    })
}

pub(crate) fn placement_of(m: &device::Model) -> Placement {
    Placement {
        device: m.id,
        model: m.model.clone(),
        site: m.site.clone(),
        ward: m.ward.clone(),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Every current layer document.
pub async fn load_layers(db: &impl ConnectionTrait) -> Result<LayerSet> {
    let mut set = LayerSet::default();
    for row in config_layer::Entity::find().all(db).await? {
        let key = stored_layer(&row.layer_kind, row.layer_key)?;
        let document = stored_document(&row.document, "configuration layer")?;
        set.insert(key, u64::try_from(row.version).unwrap_or_default(), document);
    }
    Ok(set)
}

/// The placements (model and location) of the given devices, decommissioned ones left out.
pub async fn load_placements(db: &impl ConnectionTrait, ids: &[Uuid]) -> Result<HashMap<Uuid, Placement>> {
    let mut placements = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let rows = device::Entity::find()
            .filter(device::Column::Id.is_in(chunk.iter().copied()))
            .filter(device::Column::State.ne(DeviceState::Decommissioned.as_str()))
            .all(db)
            .await?;
        placements.extend(rows.iter().map(|m| (m.id, placement_of(m))));
    }
    Ok(placements)
}

impl Configs {
    pub fn new(db: DatabaseConnection, events: Arc<Events>) -> Self {
        Self { db, events }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Stores `document` as the new version of `key`, after validating every affected model's configurations.
    pub async fn set(
        &self,
        key: LayerKey,
        document: Value,
        comment: String,
        rollback_of: Option<u64>,
        audit: &Context,
    ) -> Result<Version> {
        if !document.is_object() {
            return Err(Violations::single(
                "document_json",
                "must be a JSON object (keys merge into the layers below; null deletes a key)",
            )
            .into());
        }
        // Alarm limits are clinical safety, whatever a model's schema says: a layer whose limits medfleet would
        // ignore (and chart against the defaults) is refused, by JSON pointer.
        let problems = medfleet_core::clinical::alarm::layer_problems(&document);
        if !problems.is_empty() {
            let mut violations = Violations::new();
            for problem in problems.iter().take(MAX_VIOLATIONS) {
                violations.push(format!("/{}", problem.path().replace('.', "/")), problem.to_string());
            }
            return Err(violations.into());
        }
        let txn = begin_write(&self.db).await?;
        if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
            txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({CONFIG_LOCK_KEY})"))
                .await?;
        }
        let scope = self.check_target(&txn, &key).await?;
        let mut layers = load_layers(&txn).await?;
        layers.insert(key.clone(), u64::MAX, document.clone());
        validate(&txn, &layers, &key).await?;

        let text = serde_json::to_string(&document).map_err(|e| Error::Internal(e.to_string()))?;
        let at = now();
        let row = config_version::ActiveModel {
            layer_kind: Set(key.layer.as_str().to_owned()),
            layer_key: Set(key.key.clone()),
            document: Set(text.clone()),
            author: Set(audit.actor.as_str().to_owned()),
            comment: Set(comment),
            created_at: Set(at),
            rollback_of: Set(rollback_of.map(to_i64)),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        let current = config_layer::Entity::find_by_id((key.layer.as_str().to_owned(), key.key.clone()))
            .one(&txn)
            .await?;
        let layer_row = config_layer::ActiveModel {
            layer_kind: Set(key.layer.as_str().to_owned()),
            layer_key: Set(key.key.clone()),
            version: Set(row.version),
            document: Set(text),
        };
        if current.is_some() {
            layer_row.update(&txn).await?;
        } else {
            layer_row.insert(&txn).await?;
        }
        let (action, detail) = match rollback_of {
            Some(to) => (
                "config.rollback",
                format!("version {} restores version {to}", row.version),
            ),
            None => ("config.set", format!("version {}", row.version)),
        };
        let detail = if row.comment.is_empty() {
            detail
        } else {
            format!("{detail}: {}", row.comment)
        };
        audit
            .record(&txn, action, format!("config/{key}"), scope, detail)
            .await?;
        self.events.announce(&txn, &Event::Config).await?;
        txn.commit().await?;
        self.events.emit(Event::Config);
        version_from(row)
    }

    /// The scope a layer change is audited under; refuses layers whose target does not exist.
    async fn check_target(&self, txn: &impl ConnectionTrait, key: &LayerKey) -> Result<String> {
        if let Some(scope) = layer_scope_static(key) {
            let exists = match key.layer {
                Layer::Site => site::Entity::find_by_id(key.key.clone()).one(txn).await?.is_some(),
                Layer::Ward => match key.key.split_once('/') {
                    Some((s, w)) => ward::Entity::find_by_id((s.to_owned(), w.to_owned()))
                        .one(txn)
                        .await?
                        .is_some(),
                    None => false,
                },
                _ => true,
            };
            if !exists {
                return Err(Error::NotFound(format!(
                    "{} {} does not exist; create it before configuring it",
                    key.layer.as_str(),
                    key.key
                )));
            }
            return Ok(scope);
        }
        let id =
            Uuid::parse_str(&key.key).map_err(|_| Error::NotFound(format!("device {} does not exist", key.key)))?;
        let row = device::Entity::find_by_id(id)
            .one(txn)
            .await?
            .ok_or_else(|| Error::NotFound(format!("device {id} does not exist")))?;
        if row.state == DeviceState::Decommissioned.as_str() {
            return Err(Error::FailedPrecondition(format!(
                "device {id} is decommissioned and can no longer be configured"
            )));
        }
        Ok(crate::audit::device_scope(row.site.as_deref(), row.ward.as_deref()))
    }

    pub async fn version(&self, version: u64) -> Result<Version> {
        let row = config_version::Entity::find_by_id(to_i64(version))
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::NotFound(format!("configuration version {version} does not exist")))?;
        version_from(row)
    }

    /// The current version of a layer.
    pub async fn layer(&self, key: &LayerKey) -> Result<Version> {
        let current = config_layer::Entity::find_by_id((key.layer.as_str().to_owned(), key.key.clone()))
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::NotFound(format!("the {key} layer has never been set")))?;
        self.version(u64::try_from(current.version).unwrap_or_default()).await
    }

    /// Restores the document of `to` as a new version of its layer.
    pub async fn rollback(&self, to: u64, comment: String, audit: &Context) -> Result<Version> {
        let target = self.version(to).await?;
        self.set(target.layer, target.document, comment, Some(to), audit).await
    }

    /// Versions, newest first, before `before`.
    pub async fn history(&self, key: Option<&LayerKey>, size: u64, before: Option<u64>) -> Result<Page<Version, u64>> {
        let mut query = config_version::Entity::find();
        if let Some(key) = key {
            query = query
                .filter(config_version::Column::LayerKind.eq(key.layer.as_str()))
                .filter(config_version::Column::LayerKey.eq(key.key.as_str()));
        }
        if let Some(before) = before {
            query = query.filter(config_version::Column::Version.lt(to_i64(before)));
        }
        let rows = query
            .order_by_desc(config_version::Column::Version)
            .limit(size + 1)
            .all(&self.db)
            .await?;
        let versions = rows.into_iter().map(version_from).collect::<Result<Vec<_>>>()?;
        Ok(crate::persistence::db::page(versions, size, |v: &Version| v.version))
    }

    pub async fn resolve(&self, id: Uuid) -> Result<Resolution> {
        let row = device::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::NotFound(format!("device {id} does not exist")))?;
        let placement = placement_of(&row);
        let layers = load_layers(&self.db).await?;
        let desired = layers.desired(&placement);
        let mut sources = BTreeMap::new();
        let keys = placement.layer_keys();
        for (pointer, layer) in &desired.resolved.sources {
            if let Some(key) = keys.iter().find(|k| k.layer == *layer)
                && let Some((version, _)) = layers.get(key)
            {
                sources.insert(pointer.clone(), (key.clone(), *version));
            }
        }
        Ok(Resolution {
            placement,
            desired,
            sources,
        })
    }

    pub async fn set_schema(&self, model: String, schema: Value, comment: String, audit: &Context) -> Result<Schema> {
        let compiled = ConfigSchema::compile(&schema).map_err(|e| Violations::single("schema_json", e))?;
        let txn = begin_write(&self.db).await?;
        if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
            txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({CONFIG_LOCK_KEY})"))
                .await?;
        }
        let layers = load_layers(&txn).await?;
        let mut schemas = HashMap::new();
        schemas.insert(model.clone(), compiled);
        check_contexts(&txn, &layers, &schemas, &Scope::Model(model.clone())).await?;
        let text = serde_json::to_string(&schema).map_err(|e| Error::Internal(e.to_string()))?;
        let at = now();
        let exists = config_schema::Entity::find_by_id(model.clone())
            .one(&txn)
            .await?
            .is_some();
        let row = config_schema::ActiveModel {
            model: Set(model.clone()),
            schema: Set(text),
            author: Set(audit.actor.as_str().to_owned()),
            comment: Set(comment.clone()),
            updated_at: Set(at),
        };
        if exists {
            row.update(&txn).await?;
        } else {
            row.insert(&txn).await?;
        }
        audit
            .record(
                &txn,
                "config.schema.set",
                format!("config-schema/{model}"),
                "*",
                comment.clone(),
            )
            .await?;
        txn.commit().await?;
        Ok(Schema {
            model,
            schema,
            author: audit.actor.as_str().to_owned(),
            comment,
            updated_at: at,
        })
    }

    pub async fn schema(&self, model: &str) -> Result<Schema> {
        let row = config_schema::Entity::find_by_id(model.to_owned())
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::NotFound(format!("model {model} has no configuration schema")))?;
        Ok(Schema {
            schema: stored_document(&row.schema, "configuration schema")?,
            model: row.model,
            author: row.author,
            comment: row.comment,
            updated_at: row.updated_at,
        })
    }

    /// Desired against reported configuration for every device the caller may see (decommissioned ones left out).
    pub async fn drift(
        &self,
        visibility: &Visibility,
        site: Option<&str>,
        ward: Option<&str>,
    ) -> Result<Vec<DriftRow>> {
        let mut query = device::Entity::find().filter(device::Column::State.ne(DeviceState::Decommissioned.as_str()));
        if let Some(site) = site {
            query = query.filter(device::Column::Site.eq(site));
        }
        if let Some(ward) = ward {
            query = query.filter(device::Column::Ward.eq(ward));
        }
        let devices: Vec<device::Model> = query
            .order_by_asc(device::Column::Id)
            .all(&self.db)
            .await?
            .into_iter()
            .filter(|d| visibility.sees_place(d.site.as_deref(), d.ward.as_deref()))
            .collect();
        let ids: Vec<Uuid> = devices.iter().map(|d| d.id).collect();
        let mut presence = HashMap::new();
        for chunk in ids.chunks(500) {
            for row in device_presence::Entity::find()
                .filter(device_presence::Column::DeviceId.is_in(chunk.iter().copied()))
                .all(&self.db)
                .await?
            {
                presence.insert(row.device_id, row);
            }
        }
        let layers = load_layers(&self.db).await?;
        Ok(devices
            .into_iter()
            .map(|d| {
                let desired = layers.desired(&placement_of(&d));
                let p = presence.remove(&d.id);
                DriftRow {
                    device: d.id,
                    location: match (d.site, d.ward) {
                        (Some(site), Some(ward)) => Some(Location { site, ward, bed: d.bed }),
                        _ => None,
                    },
                    model: d.model,
                    desired_version: desired.version,
                    desired_digest: desired.digest,
                    online: p.as_ref().is_some_and(|p| p.online),
                    reported: p.map(crate::devices::presence::reported_of).unwrap_or_default(),
                }
            })
            .collect())
    }
}

/// Which devices a change can affect.
enum Scope {
    Layer(LayerKey),
    Model(String),
}

/// Validates the configurations a change to `key` affects, with `layers` already holding the new document.
async fn validate(txn: &impl ConnectionTrait, layers: &LayerSet, key: &LayerKey) -> Result<()> {
    let mut schemas = HashMap::new();
    for row in config_schema::Entity::find().all(txn).await? {
        let schema = stored_document(&row.schema, "configuration schema")?;
        let compiled = ConfigSchema::compile(&schema)
            .map_err(|e| Error::Internal(format!("stored schema of model {} no longer compiles: {e}", row.model)))?;
        schemas.insert(row.model, compiled);
    }
    if schemas.is_empty() {
        return Ok(());
    }
    check_contexts(txn, layers, &schemas, &Scope::Layer(key.clone())).await
}

/// Checks every configuration in `scope` whose model has a schema in `schemas`: each affected model's base
/// (fleet + model, what a new device in storage gets) and each affected device's full resolution.
async fn check_contexts(
    txn: &impl ConnectionTrait,
    layers: &LayerSet,
    schemas: &HashMap<String, ConfigSchema>,
    scope: &Scope,
) -> Result<()> {
    let models: BTreeSet<&String> = match scope {
        Scope::Layer(key) if key.layer == Layer::Fleet => schemas.keys().collect(),
        Scope::Layer(key) if key.layer == Layer::Model => schemas.keys().filter(|m| **m == key.key).collect(),
        Scope::Model(model) => schemas.keys().filter(|m| *m == model).collect(),
        Scope::Layer(_) => BTreeSet::new(),
    };
    let mut violations = Violations::new();
    let mut report = |context: String, found: Vec<medfleet_core::device_config::SchemaViolation>| {
        for v in found {
            if violations.len() < MAX_VIOLATIONS {
                let pointer = if v.pointer.is_empty() {
                    "/".to_owned()
                } else {
                    v.pointer
                };
                violations.push(&pointer, format!("{} ({context})", v.reason));
            }
        }
    };
    for model in models {
        let desired = layers.resolve_keys(&[LayerKey::fleet(), LayerKey::new(Layer::Model, model.clone())]);
        if let Err(found) = schemas[model].check(&desired.resolved.document) {
            report(format!("model {model}'s base configuration"), found);
        }
    }
    let mut query = device::Entity::find()
        .filter(device::Column::State.ne(DeviceState::Decommissioned.as_str()))
        .filter(device::Column::Model.is_in(schemas.keys().cloned()));
    query = match scope {
        Scope::Model(model) => query.filter(device::Column::Model.eq(model.as_str())),
        Scope::Layer(key) => match key.layer {
            Layer::Fleet => query,
            Layer::Model => query.filter(device::Column::Model.eq(key.key.as_str())),
            Layer::Site => query.filter(device::Column::Site.eq(key.key.as_str())),
            Layer::Ward => {
                let (site, ward) = key.key.split_once('/').unwrap_or((key.key.as_str(), ""));
                query.filter(
                    Condition::all()
                        .add(device::Column::Site.eq(site))
                        .add(device::Column::Ward.eq(ward)),
                )
            }
            Layer::Device => query.filter(device::Column::Id.eq(Uuid::parse_str(&key.key).unwrap_or_default())),
        },
    };
    // Devices sharing model and location resolve identically unless one has its own layer: check each
    // combination once.
    let mut seen = BTreeSet::new();
    for row in query.all(txn).await? {
        let placement = placement_of(&row);
        let own = layers.get(&LayerKey::new(Layer::Device, row.id.to_string())).is_some();
        let combination = (
            row.model.clone(),
            row.site.clone(),
            row.ward.clone(),
            own.then_some(row.id),
        );
        if !seen.insert(combination) {
            continue;
        }
        let desired = layers.desired(&placement);
        if let Err(found) = schemas[&row.model].check(&desired.resolved.document) {
            report(format!("device {} of model {}", row.id, row.model), found);
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations.into())
    }
}
