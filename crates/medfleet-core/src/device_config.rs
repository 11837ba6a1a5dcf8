//! Layered device configuration: a device's desired configuration is the deep merge of its layers (fleet default
//! → model → site → ward → device override). Later layers win; `null` deletes a key. Every resolved value remembers
//! the layer it came from, which `config get --explain` shows.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};
use uuid::Uuid;

/// The layers, in the order they apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layer {
    Fleet,
    Model,
    Site,
    Ward,
    Device,
}

impl Layer {
    pub const ALL: [Self; 5] = [Self::Fleet, Self::Model, Self::Site, Self::Ward, Self::Device];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fleet => "fleet",
            Self::Model => "model",
            Self::Site => "site",
            Self::Ward => "ward",
            Self::Device => "device",
        }
    }
}

impl FromStr for Layer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|layer| layer.as_str() == s)
            .ok_or_else(|| format!("unknown configuration layer '{s}' (expected fleet, model, site, ward or device)"))
    }
}

/// One stored layer: which layer and what it applies to (`""` for the fleet, a model name, a site, `site/ward`,
/// or a device id).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerKey {
    pub layer: Layer,
    pub key: String,
}

impl LayerKey {
    pub fn fleet() -> Self {
        Self {
            layer: Layer::Fleet,
            key: String::new(),
        }
    }

    pub fn new(layer: Layer, key: impl Into<String>) -> Self {
        let key = if layer == Layer::Fleet {
            String::new()
        } else {
            key.into()
        };
        Self { layer, key }
    }
}

impl fmt::Display for LayerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.layer == Layer::Fleet {
            f.write_str("fleet")
        } else {
            write!(f, "{} {}", self.layer.as_str(), self.key)
        }
    }
}

/// What a device's configuration depends on besides the layers: its model and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Placement {
    pub device: Uuid,
    pub model: String,
    pub site: Option<String>,
    pub ward: Option<String>,
}

impl Placement {
    /// The layers that apply to this device, in order.
    pub fn layer_keys(&self) -> Vec<LayerKey> {
        let mut keys = vec![LayerKey::fleet(), LayerKey::new(Layer::Model, self.model.clone())];
        if let Some(site) = &self.site {
            keys.push(LayerKey::new(Layer::Site, site.clone()));
            if let Some(ward) = &self.ward {
                keys.push(LayerKey::new(Layer::Ward, format!("{site}/{ward}")));
            }
        }
        keys.push(LayerKey::new(Layer::Device, self.device.to_string()));
        keys
    }

    /// Whether a change to `key` can change this device's configuration.
    pub fn depends_on(&self, key: &LayerKey) -> bool {
        self.layer_keys().contains(key)
    }
}

/// A device's desired configuration: the resolved document, where each leaf came from, the version (the newest
/// version among the layers that contributed) and a digest of the document that devices report back.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub resolved: Resolved,
    pub version: u64,
    pub digest: String,
}

/// The digest devices report: SHA-256 of the document's canonical JSON (object keys sorted, no whitespace).
pub fn digest(document: &Value) -> String {
    // serde_json's Map is a BTreeMap (no preserve_order feature), so serialisation is canonical.
    let bytes = serde_json::to_vec(document).unwrap_or_default();
    crate::digest::sha256_hex(&bytes)
}

/// The current documents of all stored layers, with the version that last set each: enough to resolve any
/// device's desired configuration without further queries.
#[derive(Debug, Clone, Default)]
pub struct LayerSet {
    layers: HashMap<LayerKey, (u64, Value)>,
}

impl LayerSet {
    pub fn insert(&mut self, key: LayerKey, version: u64, document: Value) {
        self.layers.insert(key, (version, document));
    }

    pub fn get(&self, key: &LayerKey) -> Option<&(u64, Value)> {
        self.layers.get(key)
    }

    pub fn desired(&self, placement: &Placement) -> Desired {
        self.resolve_keys(&placement.layer_keys())
    }

    /// Resolves an explicit list of layer keys (e.g. fleet + model for a model's base configuration).
    pub fn resolve_keys(&self, keys: &[LayerKey]) -> Desired {
        let mut version = 0;
        let mut layers = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some((v, document)) = self.layers.get(key) {
                version = version.max(*v);
                layers.push((key.layer, document.clone()));
            }
        }
        let resolved = resolve(&layers);
        let digest = digest(&resolved.document);
        Desired {
            resolved,
            version,
            digest,
        }
    }
}

/// A resolved configuration and, for every leaf (by JSON pointer), the layer that set it.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub document: Value,
    pub sources: BTreeMap<String, Layer>,
}

fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Merges `overlay` into `base`: objects merge key by key, `null` removes the key, anything else replaces.
fn merge(
    base: &mut Map<String, Value>,
    overlay: &Map<String, Value>,
    layer: Layer,
    path: &str,
    sources: &mut BTreeMap<String, Layer>,
) {
    for (key, value) in overlay {
        let pointer = format!("{path}/{}", escape(key));
        match value {
            Value::Null => {
                base.remove(key);
                sources.retain(|p, _| p != &pointer && !p.starts_with(&format!("{pointer}/")));
            }
            Value::Object(child) => {
                let entry = base.entry(key.clone()).or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                    sources.retain(|p, _| p != &pointer);
                }
                if let Value::Object(target) = entry {
                    merge(target, child, layer, &pointer, sources);
                }
                if child.is_empty() {
                    sources.insert(pointer, layer);
                }
            }
            leaf => {
                sources.retain(|p, _| !p.starts_with(&format!("{pointer}/")));
                base.insert(key.clone(), leaf.clone());
                sources.insert(pointer, layer);
            }
        }
    }
}

/// Resolves the layers that exist, in order. A layer that is not a JSON object is ignored by callers' validation
/// before it is stored; here it is treated as empty.
pub fn resolve(layers: &[(Layer, Value)]) -> Resolved {
    let mut ordered: Vec<&(Layer, Value)> = layers.iter().collect();
    ordered.sort_by_key(|(layer, _)| *layer);
    let mut document = Map::new();
    let mut sources = BTreeMap::new();
    for (layer, value) in ordered {
        if let Value::Object(overlay) = value {
            merge(&mut document, overlay, *layer, "", &mut sources);
        }
    }
    Resolved {
        document: Value::Object(document),
        sources,
    }
}

/// A device model's configuration schema (JSON Schema draft 2020-12), compiled once, checked against every layer
/// change before it is stored.
#[derive(Debug)]
pub struct ConfigSchema {
    validator: jsonschema::Validator,
}

/// One way a document breaks its schema: where (a JSON pointer into the document) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaViolation {
    pub pointer: String,
    pub reason: String,
}

const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

impl ConfigSchema {
    /// Compiles a schema. It must be draft 2020-12 (a `$schema` naming another draft is refused rather than
    /// silently validated under different rules) and reference nothing outside itself.
    pub fn compile(schema: &Value) -> Result<Self, String> {
        if let Some(declared) = schema.get("$schema")
            && declared.as_str().map(|s| s.trim_end_matches('#')) != Some(DRAFT_2020_12)
        {
            return Err(format!("$schema must be {DRAFT_2020_12} (found {declared})"));
        }
        if !schema.is_object() {
            return Err("a configuration schema must be a JSON object".to_owned());
        }
        jsonschema::draft202012::options()
            .build(schema)
            .map(|validator| Self { validator })
            .map_err(|e| format!("not a valid JSON Schema: {e}"))
    }

    /// Every violation of the schema by `document`, in document order.
    pub fn check(&self, document: &Value) -> Result<(), Vec<SchemaViolation>> {
        let mut violations: Vec<SchemaViolation> = self
            .validator
            .iter_errors(document)
            .map(|error| SchemaViolation {
                pointer: error.instance_path().to_string(),
                reason: error.to_string(),
            })
            .collect();
        if violations.is_empty() {
            return Ok(());
        }
        violations.sort_by(|a, b| a.pointer.cmp(&b.pointer));
        Err(violations)
    }
}

/// One difference between two documents, by JSON pointer.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Added { pointer: String, value: Value },
    Removed { pointer: String, value: Value },
    Changed { pointer: String, from: Value, to: Value },
}

/// The leaf-level differences from `from` to `to`, in pointer order.
pub fn diff(from: &Value, to: &Value) -> Vec<Change> {
    let mut changes = Vec::new();
    walk(from, to, "", &mut changes);
    changes
}

fn walk(from: &Value, to: &Value, pointer: &str, changes: &mut Vec<Change>) {
    match (from, to) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let child = format!("{pointer}/{}", escape(key));
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => walk(x, y, &child, changes),
                    (Some(x), None) => changes.push(Change::Removed {
                        pointer: child,
                        value: x.clone(),
                    }),
                    (None, Some(y)) => changes.push(Change::Added {
                        pointer: child,
                        value: y.clone(),
                    }),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a == b => {}
        (a, b) => changes.push(Change::Changed {
            pointer: pointer.to_owned(),
            from: a.clone(),
            to: b.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    #[test]
    fn a_device_resolves_its_own_layers_and_takes_the_newest_version() {
        let device = Uuid::new_v4();
        let placement = Placement {
            device,
            model: "mx800".into(),
            site: Some("stmarys".into()),
            ward: Some("icu".into()),
        };
        let mut set = LayerSet::default();
        set.insert(LayerKey::fleet(), 1, json!({"rate": 1, "alarm": {"hr_high": 120}}));
        set.insert(
            LayerKey::new(Layer::Ward, "stmarys/icu"),
            7,
            json!({"alarm": {"hr_high": 140}}),
        );
        set.insert(LayerKey::new(Layer::Ward, "stmarys/ed"), 9, json!({"rate": 5}));
        set.insert(LayerKey::new(Layer::Model, "other"), 11, json!({"rate": 6}));
        let desired = set.desired(&placement);
        assert_eq!(desired.resolved.document, json!({"rate": 1, "alarm": {"hr_high": 140}}));
        assert_eq!(desired.version, 7);
        assert_eq!(desired.digest, digest(&json!({"alarm": {"hr_high": 140}, "rate": 1})));
        assert!(placement.depends_on(&LayerKey::new(Layer::Device, device.to_string())));
        assert!(!placement.depends_on(&LayerKey::new(Layer::Ward, "stmarys/ed")));
        let in_storage = Placement {
            site: None,
            ward: None,
            ..placement
        };
        assert_eq!(set.desired(&in_storage).version, 1);
    }

    #[test]
    fn layer_names_round_trip() {
        for layer in Layer::ALL {
            assert_eq!(layer.as_str().parse::<Layer>(), Ok(layer));
        }
        assert!("building".parse::<Layer>().is_err());
        assert_eq!(LayerKey::new(Layer::Fleet, "ignored").to_string(), "fleet");
    }

    #[test]
    fn later_layers_win_and_null_deletes() {
        let resolved = resolve(&[
            (Layer::Device, json!({ "alarms": { "hr_high": 150 }, "wifi": null })),
            (
                Layer::Fleet,
                json!({ "alarms": { "hr_high": 120, "hr_low": 40 }, "wifi": { "ssid": "med" }, "units": "metric" }),
            ),
            (Layer::Ward, json!({ "alarms": { "spo2_low": 92 } })),
        ]);
        assert_eq!(
            resolved.document,
            json!({ "alarms": { "hr_high": 150, "hr_low": 40, "spo2_low": 92 }, "units": "metric" })
        );
        assert_eq!(resolved.sources["/alarms/hr_high"], Layer::Device);
        assert_eq!(resolved.sources["/alarms/hr_low"], Layer::Fleet);
        assert_eq!(resolved.sources["/alarms/spo2_low"], Layer::Ward);
        assert!(
            !resolved.sources.keys().any(|p| p.starts_with("/wifi")),
            "{:?}",
            resolved.sources
        );
    }

    #[test]
    fn scalars_replace_objects_and_back() {
        let resolved = resolve(&[
            (Layer::Fleet, json!({ "a": { "b": 1 } })),
            (Layer::Model, json!({ "a": 5 })),
            (Layer::Site, json!({ "a": { "c": 2 } })),
        ]);
        assert_eq!(resolved.document, json!({ "a": { "c": 2 } }));
        assert_eq!(resolved.sources.keys().collect::<Vec<_>>(), ["/a/c"]);
    }

    #[test]
    fn pointers_escape_slashes_and_tildes() {
        let resolved = resolve(&[(Layer::Fleet, json!({ "a/b": { "~c": 1 } }))]);
        assert!(resolved.sources.contains_key("/a~1b/~0c"));
    }

    fn monitor_schema() -> ConfigSchema {
        ConfigSchema::compile(&json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "alarms": {
                    "type": "object",
                    "properties": {
                        "hr_high": { "type": "integer", "minimum": 60, "maximum": 250 },
                        "hr_low": { "type": "integer", "minimum": 20, "maximum": 120 }
                    },
                    "additionalProperties": false
                },
                "sampling_hz": { "enum": [1, 2, 4] }
            },
            "additionalProperties": false
        }))
        .unwrap()
    }

    #[test]
    fn schema_checks_the_resolved_document_with_pointers() {
        let schema = monitor_schema();
        assert_eq!(
            schema.check(&json!({ "alarms": { "hr_high": 150 }, "sampling_hz": 2 })),
            Ok(())
        );
        let violations = schema
            .check(&json!({ "alarms": { "hr_high": 400, "hr_lo": 40 }, "sampling_hz": 3 }))
            .unwrap_err();
        let pointers: Vec<&str> = violations.iter().map(|v| v.pointer.as_str()).collect();
        assert!(pointers.contains(&"/alarms/hr_high"), "{violations:?}");
        assert!(pointers.contains(&"/sampling_hz"), "{violations:?}");
        assert!(
            pointers.contains(&"/alarms"),
            "an unknown key is reported where it stands: {violations:?}"
        );
    }

    #[test]
    fn schemas_must_be_2020_12_and_valid() {
        assert!(ConfigSchema::compile(&json!({ "$schema": "http://json-schema.org/draft-07/schema#" })).is_err());
        assert!(ConfigSchema::compile(&json!({ "type": "no-such-type" })).is_err());
        assert!(ConfigSchema::compile(&json!(true)).is_err());
        assert!(ConfigSchema::compile(&json!({ "type": "object" })).is_ok());
    }

    #[test]
    fn diff_reports_leaves() {
        let changes = diff(
            &json!({ "a": 1, "b": { "c": 2 }, "d": 3 }),
            &json!({ "a": 1, "b": { "c": 4 }, "e": 5 }),
        );
        assert_eq!(
            changes,
            vec![
                Change::Changed {
                    pointer: "/b/c".into(),
                    from: json!(2),
                    to: json!(4)
                },
                Change::Removed {
                    pointer: "/d".into(),
                    value: json!(3)
                },
                Change::Added {
                    pointer: "/e".into(),
                    value: json!(5)
                },
            ]
        );
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-1000i64..1000).prop_map(|n| json!(n)),
            "[a-z]{0,4}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop::collection::btree_map("[a-c]", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect()))
        })
    }

    fn object() -> impl Strategy<Value = Value> {
        prop::collection::btree_map("[a-c]", json_value(), 0..4).prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    fn has_null(value: &Value) -> bool {
        match value {
            Value::Null => true,
            Value::Object(m) => m.values().any(has_null),
            _ => false,
        }
    }

    proptest! {
        #[test]
        fn resolution_never_contains_null_and_every_source_points_at_a_value(layers in prop::collection::vec(object(), 0..5)) {
            let layers: Vec<(Layer, Value)> = Layer::ALL.into_iter().zip(layers).collect();
            let resolved = resolve(&layers);
            prop_assert!(!has_null(&resolved.document));
            for pointer in resolved.sources.keys() {
                prop_assert!(resolved.document.pointer(pointer).is_some(), "{} missing in {}", pointer, resolved.document);
            }
        }

        #[test]
        fn a_single_layer_without_nulls_resolves_to_itself(layer in object()) {
            prop_assume!(!has_null(&layer));
            // Empty objects survive as empty objects.
            prop_assert_eq!(resolve(&[(Layer::Fleet, layer.clone())]).document, layer);
        }

        #[test]
        fn diff_is_empty_exactly_for_equal_documents(a in object(), b in object()) {
            prop_assert_eq!(diff(&a, &b).is_empty(), a == b);
        }
    }
}
