//! `FirmwareService`: online keys, trust root, artifacts and the metadata devices verify. The RPC layer decided
//! operator access; devices (allowed only the two read RPCs) are checked here against their own assignments.

use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use medfleet_core::identity::Identity;
use medfleet_core::paging::{decode_token, encode_token, page_size};
use medfleet_core::validation::{Violations, check_text};
use medfleet_proto::convert;
use medfleet_proto::v1::{self, firmware_service_server::FirmwareService, upload_artifact_request};
use sea_orm::{ColumnTrait as _, DatabaseConnection, EntityTrait as _, QueryFilter as _};
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;
use uuid::Uuid;

use crate::error::Error;
use crate::firmware::artifacts::{Artifact, Artifacts, Header};
use crate::persistence::entity::{firmware_root, rollout, rollout_action};
use crate::transport::rpc::{audit_context, caller};

type Reply<T> = Result<Response<T>, Status>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<v1::ArtifactChunk, Status>> + Send>>;

#[derive(Debug, Clone)]
pub struct FirmwareApi {
    db: DatabaseConnection,
    artifacts: Artifacts,
}

impl FirmwareApi {
    pub fn new(db: DatabaseConnection, artifacts: Artifacts) -> Self {
        Self { db, artifacts }
    }

    /// Whether `device` has an unfinished action of a rollout of `artifact`: the only image it may read.
    async fn assigned(&self, device: Uuid, artifact: Uuid) -> Result<bool, Error> {
        let rollouts: Vec<Uuid> = rollout_action::Entity::find()
            .filter(rollout_action::Column::ActiveDevice.eq(device))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|a| a.rollout_id)
            .collect();
        if rollouts.is_empty() {
            return Ok(false);
        }
        Ok(rollout::Entity::find()
            .filter(rollout::Column::Id.is_in(rollouts))
            .filter(rollout::Column::ArtifactId.eq(artifact))
            .one(&self.db)
            .await?
            .is_some())
    }
}

pub fn artifact_to_wire(a: Artifact) -> v1::Artifact {
    v1::Artifact {
        id: a.row.id.to_string(),
        target_name: a.row.target_name,
        hardware_id: a.row.hardware_id,
        version: a.row.version,
        release_counter: u64::try_from(a.row.release_counter).unwrap_or(0),
        downgrade_from: a.downgrade_from,
        sha256: a.row.sha256,
        length: u64::try_from(a.row.length).unwrap_or(0),
        upload_time: Some(convert::timestamp(a.row.uploaded_at)),
        uploaded_by: a.row.uploaded_by,
        comment: a.row.comment,
        targets_version: u64::try_from(a.row.targets_version).unwrap_or(0),
        active_rollouts: a.active_rollouts.iter().map(Uuid::to_string).collect(),
    }
}

fn root_to_wire(row: firmware_root::Model) -> v1::TrustRoot {
    let info = medfleet_core::firmware::tuf::root_info(row.body.as_bytes()).ok();
    let (keys, threshold) = info
        .as_ref()
        .and_then(|i| i.roles.iter().find(|(role, _, _)| role == "targets").cloned())
        .map_or((Vec::new(), 0), |(_, keys, threshold)| (keys, threshold));
    v1::TrustRoot {
        version: u64::try_from(row.version).unwrap_or(0),
        expire_time: Some(convert::timestamp(row.expires_at)),
        root_json: row.body,
        targets_key_ids: keys,
        targets_threshold: threshold,
        install_time: Some(convert::timestamp(row.installed_at)),
        installed_by: row.installed_by,
    }
}

fn artifact_ref(field: &str, value: &str) -> Result<String, Error> {
    if value.is_empty() {
        return Err(Violations::single(field, "name an artifact by id or target name (medfleet firmware list)").into());
    }
    if value.len() > 128 || value.chars().any(char::is_control) {
        return Err(Violations::single(field, "is not an artifact id or target name").into());
    }
    Ok(value.to_owned())
}

#[tonic::async_trait]
impl FirmwareService for FirmwareApi {
    #[instrument(skip_all)]
    async fn get_online_keys(&self, _request: Request<v1::GetOnlineKeysRequest>) -> Reply<v1::OnlineKeys> {
        let keys = self.artifacts.repository().online_public().await?;
        Ok(Response::new(v1::OnlineKeys {
            snapshot_key_json: keys.snapshot_json,
            timestamp_key_json: keys.timestamp_json,
            snapshot_key_id: keys.snapshot_id,
            timestamp_key_id: keys.timestamp_id,
        }))
    }

    #[instrument(skip_all)]
    async fn set_trust_root(&self, request: Request<v1::SetTrustRootRequest>) -> Reply<v1::TrustRoot> {
        let ctx = audit_context(&request);
        let body = request.into_inner().root_json;
        if body.is_empty() || body.len() > 512 * 1024 {
            return Err(Error::from(Violations::single(
                "root_json",
                "is required and at most 512 KiB: the root.json `medfleet firmware keys init` wrote",
            ))
            .into());
        }
        let row = self.artifacts.repository().set_root(&ctx, &body).await?;
        Ok(Response::new(root_to_wire(row)))
    }

    #[instrument(skip_all)]
    async fn get_trust_root(&self, _request: Request<v1::GetTrustRootRequest>) -> Reply<v1::TrustRoot> {
        let row = self.artifacts.repository().current_root().await?.ok_or_else(|| {
            Error::NotFound("no trusted root is installed (medfleet firmware trust install root.json)".to_owned())
        })?;
        Ok(Response::new(root_to_wire(row)))
    }

    #[instrument(skip_all)]
    async fn upload_artifact(&self, request: Request<Streaming<v1::UploadArtifactRequest>>) -> Reply<v1::Artifact> {
        let ctx = audit_context(&request);
        let mut stream = request.into_inner();
        // The upload is exempt from the unary deadline, so its first message is bounded here like every chunk.
        let first = tokio::time::timeout(self.artifacts.idle(), stream.message())
            .await
            .map_err(|_| {
                Error::DeadlineExceeded(format!(
                    "no upload header arrived within {}; nothing was stored",
                    humantime::format_duration(self.artifacts.idle())
                ))
            })??;
        let Some(v1::UploadArtifactRequest {
            message: Some(upload_artifact_request::Message::Header(header)),
        }) = first
        else {
            return Err(Error::from(Violations::single(
                "header",
                "the first message of an upload must be its header",
            ))
            .into());
        };
        let header = Header {
            target_name: header.target_name,
            targets_json: header.targets_json,
            length: header.length,
            comment: header.comment,
        };
        let chunks = stream.map(|message| match message {
            Ok(v1::UploadArtifactRequest {
                message: Some(upload_artifact_request::Message::Chunk(data)),
            }) => Ok(bytes::Bytes::from(data)),
            Ok(_) => Err(Error::from(Violations::single(
                "chunk",
                "after the header an upload carries only chunks",
            ))),
            Err(status) => Err(Error::Unavailable(format!(
                "the upload stream broke ({}); nothing was stored, upload again",
                status.message()
            ))),
        });
        let artifact = self.artifacts.upload(&ctx, header, Box::pin(chunks)).await?;
        Ok(Response::new(artifact_to_wire(artifact)))
    }

    #[instrument(skip_all)]
    async fn list_artifacts(&self, request: Request<v1::ListArtifactsRequest>) -> Reply<v1::ListArtifactsResponse> {
        let request = request.into_inner();
        let size = page_size(request.page_size).map_err(|e| Error::from(Violations::single("page_size", e)))?;
        let fingerprint = format!("artifacts\n{}", request.hardware_id);
        let after = decode_token(&request.page_token, &fingerprint)
            .map_err(|e| Error::from(Violations::single("page_token", e)))?;
        let model = (!request.hardware_id.is_empty()).then_some(request.hardware_id.as_str());
        let mut items = self.artifacts.list(model, after.as_deref(), size + 1).await?;
        let next_page_token = if items.len() > usize::try_from(size).unwrap_or(usize::MAX) {
            items.truncate(usize::try_from(size).unwrap_or(usize::MAX));
            items
                .last()
                .map(|a| encode_token(&a.row.target_name, &fingerprint))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(v1::ListArtifactsResponse {
            artifacts: items.into_iter().map(artifact_to_wire).collect(),
            next_page_token,
        }))
    }

    #[instrument(skip_all)]
    async fn get_artifact(&self, request: Request<v1::GetArtifactRequest>) -> Reply<v1::Artifact> {
        let reference = artifact_ref("artifact", &request.into_inner().artifact)?;
        Ok(Response::new(artifact_to_wire(self.artifacts.get(&reference).await?)))
    }

    #[instrument(skip_all)]
    async fn delete_artifact(&self, request: Request<v1::DeleteArtifactRequest>) -> Reply<v1::DeleteArtifactResponse> {
        let ctx = audit_context(&request);
        let reference = artifact_ref("artifact", &request.into_inner().artifact)?;
        self.artifacts.delete(&ctx, &reference).await?;
        Ok(Response::new(v1::DeleteArtifactResponse {}))
    }

    #[instrument(skip_all)]
    async fn get_metadata(&self, request: Request<v1::GetMetadataRequest>) -> Reply<v1::FirmwareMetadata> {
        let known = request.into_inner().known_root_version;
        let published = self.artifacts.repository().published(known).await?;
        Ok(Response::new(v1::FirmwareMetadata {
            roots_json: published.roots,
            timestamp_json: published.timestamp,
            snapshot_json: published.snapshot,
            targets_json: published.targets,
        }))
    }

    #[instrument(skip_all)]
    async fn publish_targets(&self, request: Request<v1::PublishTargetsRequest>) -> Reply<v1::PublishTargetsResponse> {
        let ctx = audit_context(&request);
        let request = request.into_inner();
        let mut v = Violations::new();
        if request.targets_json.is_empty() {
            v.push(
                "targets_json",
                "is required: the targets.json `medfleet firmware resign` wrote",
            );
        } else if request.targets_json.len() > crate::firmware::artifacts::MAX_TARGETS_JSON {
            v.push("targets_json", "is larger than 8 MiB");
        }
        if !request.comment.is_empty() {
            v.check(
                "comment",
                check_text(&request.comment, crate::firmware::artifacts::MAX_COMMENT),
            );
        }
        v.finish(|| Some(())).map_err(Error::from)?;
        let info = self
            .artifacts
            .repository()
            .publish_targets(&ctx, &request.targets_json, &request.comment)
            .await?;
        Ok(Response::new(v1::PublishTargetsResponse {
            targets_version: info.version,
            expire_time: Some(convert::timestamp(info.expires)),
            targets: info.targets.into_iter().map(|t| t.name).collect(),
        }))
    }

    type ReadArtifactStream = ChunkStream;

    #[instrument(skip_all)]
    async fn read_artifact(&self, request: Request<v1::ReadArtifactRequest>) -> Reply<Self::ReadArtifactStream> {
        let identity = caller(&request)?.identity;
        let request = request.into_inner();
        let reference = artifact_ref("artifact", &request.artifact)?;
        let missing = || Error::NotFound(format!("firmware artifact {reference} does not exist"));
        let artifact = self.artifacts.resolve(&reference).await.map_err(|_| missing())?;
        if let Identity::Device(device) = identity
            && !self.assigned(device, artifact.id).await?
        {
            // Not this device's update: indistinguishable from an image that does not exist.
            return Err(missing().into());
        }
        let stream = self.artifacts.read(&artifact, request.offset).await?;
        let stream = stream.map(|chunk| {
            chunk
                .map(|(offset, data)| v1::ArtifactChunk { offset, data })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
