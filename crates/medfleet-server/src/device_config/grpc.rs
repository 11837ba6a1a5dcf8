//! `ConfigService`: configuration layers, versions, schemas and drift. Conversion and validation of the request,
//! then [`Configs`]; the RPC layer has already decided access.

use medfleet_core::device_config::{Change, LayerKey};
use medfleet_core::paging::{decode_token, encode_token, page_size};
use medfleet_core::registry::MAX_MODEL;
use medfleet_core::validation::{Violations, check_slug, check_text};
use medfleet_proto::convert;
use medfleet_proto::v1::{self, config_service_server::ConfigService};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::authz::policy::visibility;
use crate::device_config::store::{Configs, Schema, Version, parse_document};
use crate::error::Error;
use crate::transport::rpc::audit_context;

/// Longest comment kept with a version.
const MAX_COMMENT: usize = 1000;

type Reply<T> = Result<Response<T>, Status>;

#[derive(Debug, Clone)]
pub struct ConfigApi {
    configs: Configs,
}

impl ConfigApi {
    pub fn new(configs: Configs) -> Self {
        Self { configs }
    }
}

fn version_to_wire(v: Version) -> v1::ConfigVersion {
    v1::ConfigVersion {
        version: v.version,
        layer: Some(convert::layer_to_wire(&v.layer)),
        document_json: v.document.to_string(),
        author: v.author,
        create_time: Some(convert::timestamp(v.created_at)),
        comment: v.comment,
        rollback_of: v.rollback_of.unwrap_or_default(),
    }
}

fn schema_to_wire(s: Schema) -> v1::ConfigSchema {
    v1::ConfigSchema {
        model: s.model,
        schema_json: s.schema.to_string(),
        author: s.author,
        update_time: Some(convert::timestamp(s.updated_at)),
        comment: s.comment,
    }
}

fn comment(value: &str) -> Result<String, Error> {
    if value.chars().count() > MAX_COMMENT {
        return Err(Violations::single("comment", format!("is longer than {MAX_COMMENT} characters")).into());
    }
    if value.chars().any(char::is_control) {
        return Err(Violations::single("comment", "must not contain control characters").into());
    }
    Ok(value.to_owned())
}

fn model(value: &str) -> Result<String, Error> {
    check_text(value, MAX_MODEL)
        .map(|()| value.to_owned())
        .map_err(|e| Violations::single("model", e).into())
}

fn version_number(field: &str, value: u64) -> Result<u64, Error> {
    if value == 0 {
        return Err(Violations::single(field, "name a version (see medfleet config history)").into());
    }
    Ok(value)
}

fn change_to_wire(change: Change) -> v1::ConfigChange {
    use v1::config_change::Kind;
    let json = |v: &serde_json::Value| v.to_string();
    match change {
        Change::Added { pointer, value } => v1::ConfigChange {
            pointer,
            kind: Kind::Added.into(),
            from_json: String::new(),
            to_json: json(&value),
        },
        Change::Removed { pointer, value } => v1::ConfigChange {
            pointer,
            kind: Kind::Removed.into(),
            from_json: json(&value),
            to_json: String::new(),
        },
        Change::Changed { pointer, from, to } => v1::ConfigChange {
            pointer,
            kind: Kind::Changed.into(),
            from_json: json(&from),
            to_json: json(&to),
        },
    }
}

#[tonic::async_trait]
impl ConfigService for ConfigApi {
    #[instrument(skip_all)]
    async fn set_config(&self, request: Request<v1::SetConfigRequest>) -> Reply<v1::ConfigVersion> {
        let audit = audit_context(&request);
        let r = request.into_inner();
        let layer = convert::layer_from_wire("layer", r.layer.as_ref()).map_err(Error::from)?;
        let document = parse_document("document_json", &r.document_json)?;
        let comment = comment(&r.comment)?;
        let version = self.configs.set(layer, document, comment, None, &audit).await?;
        tracing::info!(version = version.version, layer = %version.layer, "configuration changed");
        Ok(Response::new(version_to_wire(version)))
    }

    #[instrument(skip_all)]
    async fn get_config_layer(&self, request: Request<v1::GetConfigLayerRequest>) -> Reply<v1::ConfigVersion> {
        let layer = convert::layer_from_wire("layer", request.get_ref().layer.as_ref()).map_err(Error::from)?;
        Ok(Response::new(version_to_wire(self.configs.layer(&layer).await?)))
    }

    #[instrument(skip_all)]
    async fn resolve_config(&self, request: Request<v1::ResolveConfigRequest>) -> Reply<v1::ResolvedConfig> {
        let id = convert::device_id("device_id", &request.get_ref().device_id).map_err(Error::from)?;
        let resolution = self.configs.resolve(id).await?;
        Ok(Response::new(v1::ResolvedConfig {
            device_id: id.to_string(),
            version: resolution.desired.version,
            digest: resolution.desired.digest,
            document_json: resolution.desired.resolved.document.to_string(),
            sources: resolution
                .sources
                .into_iter()
                .map(|(pointer, (layer, version))| v1::ConfigSource {
                    pointer,
                    layer: Some(convert::layer_to_wire(&layer)),
                    version,
                })
                .collect(),
        }))
    }

    #[instrument(skip_all)]
    async fn list_config_versions(
        &self,
        request: Request<v1::ListConfigVersionsRequest>,
    ) -> Reply<v1::ListConfigVersionsResponse> {
        let r = request.get_ref();
        let layer: Option<LayerKey> = r
            .layer
            .as_ref()
            .map(|l| convert::layer_from_wire("layer", Some(l)))
            .transpose()
            .map_err(Error::from)?;
        let fingerprint = layer.as_ref().map(ToString::to_string).unwrap_or_default();
        let mut v = Violations::new();
        let size = v.check("page_size", page_size(r.page_size));
        let before = v.check("page_token", decode_token(&r.page_token, &fingerprint));
        let (size, before) = v.finish(|| Some((size?, before?))).map_err(Error::from)?;
        let before = before.map(|k| k.parse::<u64>()).transpose().map_err(|_| {
            Error::from(Violations::single(
                "page_token",
                "is not a page token from this listing",
            ))
        })?;
        let page = self.configs.history(layer.as_ref(), size, before).await?;
        Ok(Response::new(v1::ListConfigVersionsResponse {
            versions: page.items.into_iter().map(version_to_wire).collect(),
            next_page_token: page
                .next_after
                .map(|k| encode_token(&k.to_string(), &fingerprint))
                .unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn diff_config_versions(
        &self,
        request: Request<v1::DiffConfigVersionsRequest>,
    ) -> Reply<v1::DiffConfigVersionsResponse> {
        let r = request.get_ref();
        let from = self
            .configs
            .version(version_number("from_version", r.from_version)?)
            .await?;
        let to = self
            .configs
            .version(version_number("to_version", r.to_version)?)
            .await?;
        let changes = medfleet_core::device_config::diff(&from.document, &to.document);
        Ok(Response::new(v1::DiffConfigVersionsResponse {
            changes: changes.into_iter().map(change_to_wire).collect(),
        }))
    }

    #[instrument(skip_all)]
    async fn rollback_config(&self, request: Request<v1::RollbackConfigRequest>) -> Reply<v1::ConfigVersion> {
        let audit = audit_context(&request);
        let r = request.into_inner();
        let to = version_number("to_version", r.to_version)?;
        let comment = comment(&r.comment)?;
        let version = self.configs.rollback(to, comment, &audit).await?;
        tracing::info!(version = version.version, restores = to, layer = %version.layer, "configuration rolled back");
        Ok(Response::new(version_to_wire(version)))
    }

    #[instrument(skip_all)]
    async fn set_config_schema(&self, request: Request<v1::SetConfigSchemaRequest>) -> Reply<v1::ConfigSchema> {
        let audit = audit_context(&request);
        let r = request.into_inner();
        let model = model(&r.model)?;
        let schema = parse_document("schema_json", &r.schema_json)?;
        let comment = comment(&r.comment)?;
        let schema = self.configs.set_schema(model, schema, comment, &audit).await?;
        Ok(Response::new(schema_to_wire(schema)))
    }

    #[instrument(skip_all)]
    async fn get_config_schema(&self, request: Request<v1::GetConfigSchemaRequest>) -> Reply<v1::ConfigSchema> {
        let model = model(&request.get_ref().model)?;
        Ok(Response::new(schema_to_wire(self.configs.schema(&model).await?)))
    }

    #[instrument(skip_all)]
    async fn list_config_drift(
        &self,
        request: Request<v1::ListConfigDriftRequest>,
    ) -> Reply<v1::ListConfigDriftResponse> {
        let visibility = visibility(&request);
        let r = request.get_ref();
        let mut v = Violations::new();
        if !r.site.is_empty() {
            v.check("site", check_slug(&r.site));
        }
        if !r.ward.is_empty() {
            v.check("ward", check_slug(&r.ward));
            if r.site.is_empty() {
                v.push("ward", "a ward filter needs the site too");
            }
        }
        v.finish(|| Some(())).map_err(Error::from)?;
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let rows = self
            .configs
            .drift(
                &visibility,
                non_empty(&r.site).as_deref(),
                non_empty(&r.ward).as_deref(),
            )
            .await?;
        Ok(Response::new(v1::ListConfigDriftResponse {
            devices: rows
                .into_iter()
                .filter(|row| r.include_in_sync || !row.in_sync())
                .map(|row| v1::DeviceConfigStatus {
                    in_sync: row.in_sync(),
                    device_id: row.device.to_string(),
                    model: row.model,
                    location: row.location.map(Into::into),
                    desired_version: row.desired_version,
                    desired_digest: row.desired_digest,
                    reported_version: row.reported.version,
                    reported_digest: row.reported.digest,
                    rejection_reason: row.reported.rejection.unwrap_or_default(),
                    online: row.online,
                })
                .collect(),
        }))
    }
}
