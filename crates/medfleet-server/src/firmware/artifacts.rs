//! Firmware images: streamed in, verified, stored as content-addressed chunks, streamed out from any offset.
//!
//! An upload is checked against the signed targets metadata before the first byte is stored (so a wrong set is
//! refused at once), hashed while its chunks are written outside any transaction (a slow client must not hold the
//! database's write lock), and committed in one short transaction with the metadata that publishes it, after the
//! metadata was checked again against what other uploads committed meanwhile. A refused or broken upload removes
//! the chunks it added and nothing else.

use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
use medfleet_core::digest::hex;
use medfleet_core::firmware::tuf::{self, Refusal, SignedTarget};
use medfleet_core::validation::{Violations, check_text};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, ConnectionTrait, DatabaseConnection, EntityTrait as _, QueryFilter as _,
    QueryOrder as _, QuerySelect as _,
};
use uuid::Uuid;

use crate::audit;
use crate::error::{Error, Result};
use crate::firmware::objects::{self, Objects, Upload};
use crate::firmware::repository::{Prepared, Repository};
use crate::persistence::db::{self, now};
use crate::persistence::entity::{firmware_artifact, firmware_artifact_chunk, firmware_chunk, rollout};

/// Bytes per stored chunk (and per message read out).
pub const CHUNK_SIZE: usize = 1024 * 1024;
/// The largest image medfleetd takes.
pub const MAX_IMAGE: u64 = 4 * 1024 * 1024 * 1024;
/// The largest targets metadata an upload may carry.
pub const MAX_TARGETS_JSON: usize = 8 * 1024 * 1024;
pub const MAX_COMMENT: usize = 1000;
/// The longest an upload may take however steadily it sends (4 GiB at 1 MB/s is about 70 minutes). Bounds how
/// long its chunks sit unreferenced, so the sweep can tell them from a dead upload's.
pub const MAX_UPLOAD: std::time::Duration = std::time::Duration::from_hours(6);
/// How old an unreferenced chunk must be before the sweep removes it: well past any upload still under way.
pub const SWEEP_GRACE: std::time::Duration = std::time::Duration::from_hours(24);
/// How often each replica sweeps.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_hours(1);
/// Uploads one replica takes at once: each may hold unverified bytes in storage for hours, so their number is
/// bounded, not just their size.
pub const MAX_UPLOADS: usize = 4;
/// Chunks removed per sweep transaction.
const SWEEP_BATCH: u64 = 64;

/// What an upload starts with.
#[derive(Debug, Clone)]
pub struct Header {
    pub target_name: String,
    pub targets_json: String,
    pub length: u64,
    pub comment: String,
}

/// A stored artifact and the unfinished rollouts that use it.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub row: firmware_artifact::Model,
    pub downgrade_from: Vec<u64>,
    pub active_rollouts: Vec<Uuid>,
}

#[derive(Debug, Clone)]
pub struct Artifacts {
    db: DatabaseConnection,
    repository: Repository,
    /// An upload may take as long as the image needs (no overall deadline: a 4 GiB image over a slow link takes
    /// minutes), but one that stops sending is given up after this long (`upload_idle`) and leaves nothing stored.
    idle: std::time::Duration,
    /// Where new images go when the hospital keeps them in an object store (`artifact_store`); `None`: in the
    /// database. Each artifact records where it is, so images stored before a change stay readable.
    objects: Option<Objects>,
    uploads: std::sync::Arc<tokio::sync::Semaphore>,
    cache: std::sync::Arc<std::sync::Mutex<ChunkCache>>,
}

/// Where an upload's bytes go.
enum Sink<'a> {
    Chunks(&'a mut Written),
    Object(&'a mut Upload),
}

/// Chunks read recently, by hash: a wave of devices downloads the same image at once, so each chunk comes from the
/// database once rather than once per device. Content-addressed, so an entry can never be stale.
#[derive(Debug, Default)]
struct ChunkCache {
    chunks: std::collections::HashMap<String, Bytes>,
    order: std::collections::VecDeque<String>,
    bytes: usize,
    /// Chunks being fetched from the database: devices of one wave download in step, and one fetch of a chunk
    /// serves them all instead of one each.
    fetching: std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>,
}

/// Chunks a reader fetches ahead of the one it is sending: the database or object-store read of the next chunk
/// overlaps the network write of this one. On loopback with the chunk cache warm it measured no different from one
/// at a time (the cost is copies and AES-GCM); it is for a remote object store, where each read waits a round trip.
const READ_AHEAD: usize = 2;

/// What the chunk cache holds at most.
const CACHE_BYTES: usize = 128 * 1024 * 1024;

impl ChunkCache {
    fn get(&self, sha: &str) -> Option<Bytes> {
        self.chunks.get(sha).cloned()
    }

    fn put(&mut self, sha: String, data: Bytes) {
        if self.chunks.contains_key(&sha) {
            return;
        }
        self.bytes += data.len();
        self.order.push_back(sha.clone());
        self.chunks.insert(sha, data);
        while self.bytes > CACHE_BYTES
            && let Some(oldest) = self.order.pop_front()
        {
            if let Some(gone) = self.chunks.remove(&oldest) {
                self.bytes -= gone.len();
            }
        }
    }
}

fn validate(header: &Header) -> Result<()> {
    let mut v = Violations::new();
    if !tuf::valid_target_name(&header.target_name) {
        v.push(
            "header.target_name",
            "use the target name the image was signed under: letters, digits, '.', '-' and '_', at most 128",
        );
    }
    if header.targets_json.is_empty() {
        v.push(
            "header.targets_json",
            "is required: the targets.json `medfleet firmware sign` wrote",
        );
    } else if header.targets_json.len() > MAX_TARGETS_JSON {
        v.push("header.targets_json", "is larger than 8 MiB");
    }
    if header.length == 0 || header.length > MAX_IMAGE {
        v.push("header.length", "must be between 1 byte and 4 GiB");
    }
    if !header.comment.is_empty() {
        v.check("header.comment", check_text(&header.comment, MAX_COMMENT));
    }
    v.finish(|| Some(())).map_err(Error::from)
}

fn refusal(code: Refusal, message: String) -> Error {
    Error::Refused {
        reason: code.as_str(),
        message,
    }
}

fn counter(value: u64) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::Internal("release counter out of range".to_owned()))
}

impl Artifacts {
    pub fn new(
        db: DatabaseConnection,
        repository: Repository,
        idle: std::time::Duration,
        objects: Option<Objects>,
    ) -> Self {
        Self {
            db,
            repository,
            idle,
            objects,
            uploads: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_UPLOADS)),
            cache: std::sync::Arc::default(),
        }
    }

    /// The object store images go to, if any.
    pub fn objects(&self) -> Option<&Objects> {
        self.objects.as_ref()
    }

    pub fn repository(&self) -> &Repository {
        &self.repository
    }

    /// How long an upload may send nothing.
    pub fn idle(&self) -> std::time::Duration {
        self.idle
    }

    /// The rules an image must meet beyond its signature: new name and content, and a release counter above every
    /// stored image of its model unless the targets role signed it as a downgrade.
    async fn admissible(conn: &impl ConnectionTrait, target: &SignedTarget) -> Result<()> {
        if firmware_artifact::Entity::find()
            .filter(firmware_artifact::Column::TargetName.eq(&target.name))
            .one(conn)
            .await?
            .is_some()
        {
            return Err(Error::AlreadyExists(format!(
                "an image named {} is stored already (medfleet firmware show {})",
                target.name, target.name
            )));
        }
        if let Some(same) = firmware_artifact::Entity::find()
            .filter(firmware_artifact::Column::Sha256.eq(&target.sha256))
            .one(conn)
            .await?
        {
            return Err(Error::AlreadyExists(format!(
                "this image is stored already as {}",
                same.target_name
            )));
        }
        let highest = firmware_artifact::Entity::find()
            .filter(firmware_artifact::Column::HardwareId.eq(&target.meta.hardware_id))
            .order_by_desc(firmware_artifact::Column::ReleaseCounter)
            .one(conn)
            .await?;
        if let Some(highest) = highest
            && counter(target.meta.release_counter)? <= highest.release_counter
            && target.meta.downgrade_from.is_empty()
        {
            return Err(refusal(
                Refusal::NotNewer,
                format!(
                    "release counter {} of {} is not above release {} ({}) already stored for model {}; sign it \
                     with a higher --counter, or as a downgrade (--downgrade-from) if going back is necessary",
                    target.meta.release_counter,
                    target.name,
                    highest.release_counter,
                    highest.version,
                    target.meta.hardware_id
                ),
            ));
        }
        Ok(())
    }

    async fn check(&self, conn: &impl ConnectionTrait, header: &Header) -> Result<Prepared> {
        let prepared = self
            .repository
            .prepare(conn, &header.targets_json, &header.target_name)
            .await?;
        if prepared.target.length != header.length {
            return Err(refusal(
                Refusal::TooLarge,
                format!(
                    "the upload says {} bytes, the signed target {} is {} bytes: upload the image that was signed",
                    header.length, prepared.target.name, prepared.target.length
                ),
            ));
        }
        Self::admissible(conn, &prepared.target).await?;
        Ok(prepared)
    }

    /// Stores an image streamed after its header. Nothing is kept unless every check passes.
    pub async fn upload<S>(&self, ctx: &audit::Context, header: Header, chunks: S) -> Result<Artifact>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        validate(&header)?;
        let _slot = self.uploads.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "{MAX_UPLOADS} firmware uploads are in progress on this replica; upload again when one has finished"
            ))
        })?;
        let signed = self.check(&self.db, &header).await?.target;
        let id = Uuid::new_v4();
        if let Some(objects) = &self.objects {
            let mut upload = objects.begin(id).await?;
            if let Err(error) = self.receive(&signed, chunks, Sink::Object(&mut upload)).await {
                upload.abort().await;
                return Err(error);
            }
            upload.finish().await?;
            let stored = self
                .commit(ctx, &header, id, objects::IN_OBJECT_STORE, Vec::new())
                .await;
            if stored.is_err()
                && let Err(error) = objects.delete(id).await
            {
                tracing::warn!(%error, artifact = %id, "could not remove the image of a refused upload; the sweep will");
            }
            return stored;
        }
        let mut written = Written {
            db: self.db.clone(),
            chunks: Vec::new(),
            in_flight: None,
        };
        let outcome = self.receive(&signed, chunks, Sink::Chunks(&mut written)).await;
        let stored = match outcome {
            Ok(index) => self.commit(ctx, &header, id, objects::IN_DATABASE, index).await,
            Err(error) => Err(error),
        };
        let added = std::mem::take(&mut written.chunks);
        if stored.is_err() {
            // Awaited here, so a refusal answers only once nothing of it is left.
            remove_unreferenced(&self.db, &added).await;
        }
        stored
    }

    /// Writes the image, returning the hashes of the chunks in order when it goes to the database (where `Written`
    /// collects the chunks this upload added).
    async fn receive<S>(&self, signed: &SignedTarget, mut chunks: S, mut sink: Sink<'_>) -> Result<Vec<String>>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        let mut whole = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buffer = BytesMut::with_capacity(CHUNK_SIZE);
        let mut index = Vec::new();
        let mut total: u64 = 0;
        let deadline = tokio::time::Instant::now() + MAX_UPLOAD;
        loop {
            let wait = self
                .idle
                .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            let next = tokio::time::timeout(wait, chunks.next())
                .await
                .map_err(|_| {
                    if tokio::time::Instant::now() >= deadline {
                        Error::DeadlineExceeded(format!(
                            "the upload took longer than {} ({total} bytes received): nothing was stored; upload \
                             over a faster link",
                            humantime::format_duration(MAX_UPLOAD)
                        ))
                    } else {
                        Error::DeadlineExceeded(format!(
                            "no image data arrived for {} after {total} bytes: nothing was stored; upload again",
                            humantime::format_duration(self.idle)
                        ))
                    }
                })?
                .transpose()?;
            if let Some(data) = &next {
                total = total.saturating_add(data.len() as u64);
                if total > signed.length {
                    return Err(refusal(
                        Refusal::TooLarge,
                        format!(
                            "more bytes than the {} the targets role signed for {}: nothing was stored",
                            signed.length, signed.name
                        ),
                    ));
                }
                whole.update(data);
                buffer.extend_from_slice(data);
            }
            while buffer.len() >= CHUNK_SIZE || (next.is_none() && !buffer.is_empty()) {
                let take = buffer.len().min(CHUNK_SIZE);
                let chunk = buffer.split_to(take).freeze();
                match &mut sink {
                    Sink::Chunks(written) => index.push(self.store_chunk(chunk, written).await?),
                    Sink::Object(upload) => upload.write(&chunk).await?,
                }
            }
            if next.is_none() {
                break;
            }
        }
        let sha256 = hex(whole.finish().as_ref());
        if total != signed.length || sha256 != signed.sha256 {
            return Err(refusal(
                Refusal::HashMismatch,
                format!(
                    "the image received ({total} bytes, SHA-256 {sha256}) is not the one the targets role signed for \
                     {} ({} bytes, {}): nothing was stored",
                    signed.name, signed.length, signed.sha256
                ),
            ));
        }
        Ok(index)
    }

    /// Stores one chunk. The insert runs in a task of its own and `written` holds it while it runs: if the upload
    /// is dropped mid-insert, the cleanup waits for the insert and removes its chunk too.
    async fn store_chunk(&self, data: Bytes, written: &mut Written) -> Result<String> {
        let sha256 = hex(ring::digest::digest(&ring::digest::SHA256, &data).as_ref());
        let db = self.db.clone();
        let sha = sha256.clone();
        let insert = tokio::spawn(async move {
            Ok::<_, Error>(
                firmware_chunk::Entity::insert(firmware_chunk::ActiveModel {
                    sha256: Set(sha),
                    data: Set(data.to_vec()),
                    stored_at: Set(Some(now())),
                })
                .on_conflict(
                    OnConflict::column(firmware_chunk::Column::Sha256)
                        .do_nothing()
                        .to_owned(),
                )
                .exec_without_returning(&db)
                .await?,
            )
        });
        let handle = written.in_flight.insert((sha256.clone(), insert));
        let inserted = (&mut handle.1)
            .await
            .map_err(|e| Error::Internal(format!("storing a chunk: {e}")));
        written.in_flight = None;
        if inserted?? > 0 {
            written.chunks.push(sha256.clone());
        }
        Ok(sha256)
    }

    async fn commit(
        &self,
        ctx: &audit::Context,
        header: &Header,
        id: Uuid,
        storage: &str,
        index: Vec<String>,
    ) -> Result<Artifact> {
        let txn = db::begin_write(&self.db).await?;
        // Before reading what is published: two replicas committing uploads at once must not both build on it.
        crate::firmware::repository::lock_metadata(&txn).await?;
        let prepared = self.check(&txn, header).await?;
        // A chunk this upload found already stored may have belonged to a concurrent upload that failed and
        // removed it since: never commit an image with a hole. The rows found stay share-locked until the commit
        // (PostgreSQL), so a removal that locks a chunk before deleting it waits and then sees the references.
        let distinct: BTreeSet<&String> = index.iter().collect();
        let mut present = 0;
        for chunk in distinct.iter().copied().collect::<Vec<_>>().chunks(500) {
            present += firmware_chunk::Entity::find()
                .filter(firmware_chunk::Column::Sha256.is_in(chunk.iter().map(|s| (*s).clone())))
                .select_only()
                .column(firmware_chunk::Column::Sha256)
                .lock_shared()
                .into_tuple::<String>()
                .all(&txn)
                .await?
                .len();
        }
        if present != distinct.len() {
            return Err(Error::Unavailable(
                "part of the image was removed by a concurrent failed upload; nothing was stored, upload again"
                    .to_owned(),
            ));
        }
        let targets_version = prepared.targets_version;
        let target = prepared.store(&txn).await?;
        let downgrade = serde_json::to_string(&target.meta.downgrade_from)
            .map_err(|e| Error::Internal(format!("downgrade list: {e}")))?;
        firmware_artifact::Entity::insert(firmware_artifact::ActiveModel {
            id: Set(id),
            target_name: Set(target.name.clone()),
            hardware_id: Set(target.meta.hardware_id.clone()),
            version: Set(target.meta.version.clone()),
            release_counter: Set(counter(target.meta.release_counter)?),
            downgrade_from: Set(downgrade),
            sha256: Set(target.sha256.clone()),
            length: Set(i64::try_from(target.length).map_err(|_| Error::Internal("length out of range".to_owned()))?),
            chunk_size: Set(i32::try_from(CHUNK_SIZE).unwrap_or(i32::MAX)),
            storage: Set(storage.to_owned()),
            targets_version: Set(counter(targets_version)?),
            uploaded_at: Set(now()),
            uploaded_by: Set(ctx.actor.clone()),
            comment: Set(header.comment.clone()),
        })
        .exec_without_returning(&txn)
        .await?;
        let rows = index
            .iter()
            .enumerate()
            .map(|(idx, sha)| firmware_artifact_chunk::ActiveModel {
                artifact_id: Set(id),
                idx: Set(i32::try_from(idx).unwrap_or(i32::MAX)),
                chunk_sha256: Set(sha.clone()),
            })
            .collect();
        db::insert_all::<firmware_artifact_chunk::Entity>(&txn, rows).await?;
        ctx.record(
            &txn,
            "firmware.artifact.upload",
            format!("artifact {id}"),
            "*",
            format!(
                "{} model {} version {} release {} sha256 {} ({} bytes){}",
                target.name,
                target.meta.hardware_id,
                target.meta.version,
                target.meta.release_counter,
                target.sha256,
                target.length,
                if target.meta.downgrade_from.is_empty() {
                    String::new()
                } else {
                    format!(", signed downgrade from releases {:?}", target.meta.downgrade_from)
                }
            ),
        )
        .await?;
        txn.commit().await?;
        tracing::info!(artifact = %id, target = %target.name, model = %target.meta.hardware_id, "firmware image stored");
        self.get(&id.to_string()).await
    }

    async fn find(&self, conn: &impl ConnectionTrait, reference: &str) -> Result<firmware_artifact::Model> {
        let row = match Uuid::parse_str(reference) {
            Ok(id) => firmware_artifact::Entity::find_by_id(id).one(conn).await?,
            Err(_) => {
                firmware_artifact::Entity::find()
                    .filter(firmware_artifact::Column::TargetName.eq(reference))
                    .one(conn)
                    .await?
            }
        };
        row.ok_or_else(|| {
            Error::NotFound(format!(
                "firmware artifact {} does not exist (medfleet firmware list)",
                medfleet_core::validation::printable(reference)
            ))
        })
    }

    async fn active_rollouts(conn: &impl ConnectionTrait, artifact: Uuid) -> Result<Vec<Uuid>> {
        Ok(rollout::Entity::find()
            .filter(rollout::Column::ArtifactId.eq(artifact))
            .filter(rollout::Column::State.is_not_in(["completed", "aborted"]))
            .select_only()
            .column(rollout::Column::Id)
            .into_tuple::<Uuid>()
            .all(conn)
            .await?)
    }

    async fn describe(&self, row: firmware_artifact::Model) -> Result<Artifact> {
        let active_rollouts = Self::active_rollouts(&self.db, row.id).await?;
        let downgrade_from = serde_json::from_str(&row.downgrade_from).unwrap_or_default();
        Ok(Artifact {
            row,
            downgrade_from,
            active_rollouts,
        })
    }

    pub async fn get(&self, reference: &str) -> Result<Artifact> {
        let row = self.find(&self.db, reference).await?;
        self.describe(row).await
    }

    /// Artifacts by target name, after `after`, optionally of one model.
    pub async fn list(&self, hardware_id: Option<&str>, after: Option<&str>, limit: u64) -> Result<Vec<Artifact>> {
        let mut query = firmware_artifact::Entity::find().order_by_asc(firmware_artifact::Column::TargetName);
        if let Some(model) = hardware_id {
            query = query.filter(firmware_artifact::Column::HardwareId.eq(model));
        }
        if let Some(after) = after {
            query = query.filter(firmware_artifact::Column::TargetName.gt(after));
        }
        let rows = query.limit(limit).all(&self.db).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(self.describe(row).await?);
        }
        Ok(out)
    }

    /// Deletes an artifact no unfinished rollout uses, with its chunks that nothing else shares. Its target stays
    /// in the signed metadata (only the offline key could remove it); without the bytes no device can fetch it.
    pub async fn delete(&self, ctx: &audit::Context, reference: &str) -> Result<()> {
        let txn = db::begin_write(&self.db).await?;
        let row = self.find(&txn, reference).await?;
        let active = Self::active_rollouts(&txn, row.id).await?;
        if !active.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "artifact {} is used by unfinished rollout(s) {}: abort or finish them first",
                row.target_name,
                active.iter().map(Uuid::to_string).collect::<Vec<_>>().join(", ")
            )));
        }
        let chunks: BTreeSet<String> = firmware_artifact_chunk::Entity::find()
            .filter(firmware_artifact_chunk::Column::ArtifactId.eq(row.id))
            .select_only()
            .column(firmware_artifact_chunk::Column::ChunkSha256)
            .into_tuple::<String>()
            .all(&txn)
            .await?
            .into_iter()
            .collect();
        firmware_artifact_chunk::Entity::delete_many()
            .filter(firmware_artifact_chunk::Column::ArtifactId.eq(row.id))
            .exec(&txn)
            .await?;
        firmware_artifact::Entity::delete_by_id(row.id).exec(&txn).await?;
        for sha in &chunks {
            remove_if_unreferenced(&txn, sha).await?;
        }
        ctx.record(
            &txn,
            "firmware.artifact.delete",
            format!("artifact {}", row.id),
            "*",
            format!("{} version {}", row.target_name, row.version),
        )
        .await?;
        txn.commit().await?;
        if row.storage == objects::IN_OBJECT_STORE {
            // After the commit: the object outlives its row at worst, and the sweep removes it then.
            if let Some(objects) = &self.objects {
                if let Err(error) = objects.delete(row.id).await {
                    tracing::warn!(%error, artifact = %row.id, "deleted artifact's image stays in the object store until the sweep");
                }
            } else {
                tracing::warn!(
                    artifact = %row.id,
                    "deleted artifact's image is in an object store this replica is not configured with; remove it there"
                );
            }
        }
        Ok(())
    }

    /// The artifact a read names, for the RPC layer's assignment check.
    pub async fn resolve(&self, reference: &str) -> Result<firmware_artifact::Model> {
        self.find(&self.db, reference).await
    }

    /// The image from `offset`, chunk by chunk: the next chunk is fetched while the previous one is sent (a slow
    /// reader holds at most `READ_AHEAD` chunks in memory), from the chunk cache when another reader fetched it
    /// recently.
    pub async fn read(
        &self,
        artifact: &firmware_artifact::Model,
        offset: u64,
    ) -> Result<futures::stream::BoxStream<'static, Result<(u64, Bytes)>>> {
        let length = u64::try_from(artifact.length).unwrap_or(0);
        if offset > length {
            return Err(Violations::single(
                "offset",
                format!("is beyond the image's {length} bytes; continue from at most its length"),
            )
            .into());
        }
        let chunk_size = u64::try_from(artifact.chunk_size).unwrap_or(1).max(1);
        let first = offset / chunk_size;
        if artifact.storage == objects::IN_OBJECT_STORE {
            let Some(objects) = self.objects.clone() else {
                return Err(Error::Unavailable(format!(
                    "artifact {} is in an object store and this replica has no artifact_store configured; set it \
                     as on the replica that stored it",
                    artifact.target_name
                )));
            };
            let cache = self.cache.clone();
            let id = artifact.id;
            let count = length.div_ceil(chunk_size);
            return Ok(futures::stream::iter(first..count)
                .map(move |n| {
                    let objects = objects.clone();
                    let cache = cache.clone();
                    async move {
                        let start = n * chunk_size;
                        let end = (start + chunk_size).min(length);
                        let data = cached(&cache, format!("{id}/{n}"), objects.read(id, start, end)).await?;
                        let skip = usize::try_from(offset.saturating_sub(start))
                            .unwrap_or(0)
                            .min(data.len());
                        Ok((start + skip as u64, data.slice(skip..)))
                    }
                })
                .buffered(READ_AHEAD)
                .boxed());
        }
        let links: Vec<String> = firmware_artifact_chunk::Entity::find()
            .filter(firmware_artifact_chunk::Column::ArtifactId.eq(artifact.id))
            .filter(firmware_artifact_chunk::Column::Idx.gte(i32::try_from(first).unwrap_or(i32::MAX)))
            .order_by_asc(firmware_artifact_chunk::Column::Idx)
            .select_only()
            .column(firmware_artifact_chunk::Column::ChunkSha256)
            .into_tuple::<String>()
            .all(&self.db)
            .await?;
        let db = self.db.clone();
        let cache = self.cache.clone();
        let id = artifact.id;
        Ok(futures::stream::iter(links.into_iter().enumerate())
            .map(move |(n, sha)| {
                let db = db.clone();
                let cache = cache.clone();
                async move {
                    let start = (first + n as u64) * chunk_size;
                    let fetch = async {
                        let chunk = firmware_chunk::Entity::find_by_id(sha.clone()).one(&db).await?;
                        chunk
                            .map(|c| Bytes::from(c.data))
                            .ok_or_else(|| Error::Internal(format!("artifact {id}: chunk {sha} is missing")))
                    };
                    let data = cached(&cache, sha.clone(), fetch).await?;
                    let skip = usize::try_from(offset.saturating_sub(start))
                        .unwrap_or(0)
                        .min(data.len());
                    Ok((start + skip as u64, data.slice(skip..)))
                }
            })
            .buffered(READ_AHEAD)
            .boxed())
    }
}

/// The cache only ever holds complete chunks: a panicking holder leaves nothing half-written.
fn lock(cache: &std::sync::Mutex<ChunkCache>) -> std::sync::MutexGuard<'_, ChunkCache> {
    cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A chunk from the cache, or fetched once (from the database or the object store) however many readers want it
/// at the same time. Keys are content hashes or `artifact/index`: both name bytes that never change.
async fn cached(
    cache: &std::sync::Mutex<ChunkCache>,
    key: String,
    fetch: impl std::future::Future<Output = Result<Bytes>>,
) -> Result<Bytes> {
    let fetching = {
        let mut guard = lock(cache);
        if let Some(data) = guard.get(&key) {
            return Ok(data);
        }
        guard.fetching.entry(key.clone()).or_default().clone()
    };
    let _turn = fetching.lock().await;
    if let Some(data) = lock(cache).get(&key) {
        return Ok(data);
    }
    let fetched = fetch.await;
    let mut guard = lock(cache);
    // Only this fetch's own entry: a reader that came after an eviction may have started a newer one.
    if guard
        .fetching
        .get(&key)
        .is_some_and(|current| std::sync::Arc::ptr_eq(current, &fetching))
    {
        guard.fetching.remove(&key);
    }
    let data = fetched?;
    guard.put(key, data.clone());
    Ok(data)
}

/// Removes chunks an upload added that no artifact references (a failed or refused upload), a few per transaction.
async fn remove_unreferenced(db: &DatabaseConnection, written: &[String]) {
    for batch in written.chunks(usize::try_from(SWEEP_BATCH).unwrap_or(64)) {
        let removed = async {
            let txn = db::begin_write(db).await?;
            for sha in batch {
                remove_if_unreferenced(&txn, sha).await?;
            }
            txn.commit().await?;
            Ok::<_, Error>(())
        }
        .await;
        if let Err(error) = removed {
            tracing::warn!(%error, "could not remove chunks of a failed upload; the sweep removes them later");
        }
    }
}

/// The chunks an upload in progress has added. An upload whose client goes away is dropped mid-await by the
/// HTTP/2 server (a reset stream ends its handler), never reaching the cleanup after `receive`; dropping this
/// removes what is still listed, in a task of its own.
struct Written {
    db: DatabaseConnection,
    chunks: Vec<String>,
    /// The chunk being inserted, if any.
    in_flight: Option<(String, tokio::task::JoinHandle<Result<u64>>)>,
}

impl Drop for Written {
    fn drop(&mut self) {
        if self.chunks.is_empty() && self.in_flight.is_none() {
            return;
        }
        let mut chunks = std::mem::take(&mut self.chunks);
        let in_flight = self.in_flight.take();
        let db = self.db.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Some((sha, insert)) = in_flight
                    && matches!(insert.await, Ok(Ok(n)) if n > 0)
                {
                    chunks.push(sha);
                }
                tracing::info!(
                    chunks = chunks.len(),
                    "an upload was abandoned; removing what it stored"
                );
                remove_unreferenced(&db, &chunks).await;
            });
        }
    }
}

/// Deletes a chunk if nothing references it. Called in a write transaction: the chunk row is locked first
/// (PostgreSQL), so an upload committing a reference to it either finished (and is seen here) or finds it gone.
async fn remove_if_unreferenced(conn: &impl ConnectionTrait, sha: &str) -> Result<bool> {
    let exists = firmware_chunk::Entity::find_by_id(sha.to_owned())
        .select_only()
        .column(firmware_chunk::Column::Sha256)
        .lock_exclusive()
        .into_tuple::<String>()
        .one(conn)
        .await?
        .is_some();
    if !exists {
        return Ok(false);
    }
    let referenced = firmware_artifact_chunk::Entity::find()
        .filter(firmware_artifact_chunk::Column::ChunkSha256.eq(sha))
        .one(conn)
        .await?
        .is_some();
    if !referenced {
        firmware_chunk::Entity::delete_by_id(sha.to_owned()).exec(conn).await?;
    }
    Ok(!referenced)
}

/// Removes chunks no artifact references that were stored more than `older_than` ago: what an upload left when its
/// replica died before it could clean up. Returns how many went.
pub async fn sweep(db: &DatabaseConnection, older_than: std::time::Duration) -> Result<u64> {
    let cutoff =
        now() - chrono::Duration::from_std(older_than).map_err(|e| Error::Internal(format!("sweep grace: {e}")))?;
    let mut removed = 0;
    let mut after = String::new();
    loop {
        let candidates: Vec<String> = firmware_chunk::Entity::find()
            .filter(firmware_chunk::Column::Sha256.gt(after.clone()))
            .filter(
                sea_orm::Condition::any()
                    .add(firmware_chunk::Column::StoredAt.is_null())
                    .add(firmware_chunk::Column::StoredAt.lt(cutoff)),
            )
            .filter(
                firmware_chunk::Column::Sha256.not_in_subquery(
                    sea_orm::sea_query::Query::select()
                        .column(firmware_artifact_chunk::Column::ChunkSha256)
                        .from(firmware_artifact_chunk::Entity)
                        .to_owned(),
                ),
            )
            .order_by_asc(firmware_chunk::Column::Sha256)
            .select_only()
            .column(firmware_chunk::Column::Sha256)
            .limit(SWEEP_BATCH)
            .into_tuple()
            .all(db)
            .await?;
        let Some(last) = candidates.last() else {
            return Ok(removed);
        };
        after.clone_from(last);
        let txn = db::begin_write(db).await?;
        for sha in &candidates {
            if remove_if_unreferenced(&txn, sha).await? {
                removed += 1;
            }
        }
        txn.commit().await?;
    }
}

/// Sweeps at start and every hour until `stop`. Every replica may sweep: removals lock what they delete.
pub fn spawn_sweeper(db: DatabaseConnection, objects: Option<Objects>, stop: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        loop {
            match sweep(&db, SWEEP_GRACE).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(chunks = removed, "removed firmware chunks no artifact references"),
                Err(error) => tracing::warn!(%error, "firmware chunk sweep failed; retrying in an hour"),
            }
            if let Some(objects) = &objects {
                match objects.sweep(&db, SWEEP_GRACE).await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(images = removed, "removed firmware images no artifact owns"),
                    Err(error) => tracing::warn!(%error, "firmware object store sweep failed; retrying in an hour"),
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(SWEEP_INTERVAL) => {}
            }
        }
    });
}
