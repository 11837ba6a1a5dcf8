//! Firmware images in an object store (the `artifact_store` setting): a local directory (`file:///srv/firmware`)
//! or an S3-compatible bucket (`s3://bucket/prefix`, credentials and endpoint from the standard `AWS_*`
//! environment variables, never from the settings file).
//!
//! One object per artifact, `firmware/<artifact id>.img`, written as a multipart upload while the image is hashed
//! and completed only once it matches what the targets role signed, so a wrong image never becomes an object.
//! The database still says which artifacts exist and where each is (`firmware_artifacts.storage`); an object
//! whose artifact row never committed (its replica died between completing the upload and the commit) is swept
//! once it is older than any upload can take.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt as _;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, WriteMultipart};
use sea_orm::{DatabaseConnection, EntityTrait as _};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::persistence::db::now;
use crate::persistence::entity::firmware_artifact;

/// Parts written concurrently per upload (each at most [`PART`]): bounds what an upload holds in memory.
const IN_FLIGHT: usize = 2;
/// S3's smallest part but the last.
const PART: usize = 8 * 1024 * 1024;

/// Where `firmware_artifacts.storage` says an artifact's bytes are.
pub const IN_DATABASE: &str = "database";
pub const IN_OBJECT_STORE: &str = "object_store";

#[derive(Debug, Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    /// For messages: the store without credentials.
    description: String,
}

fn unavailable(description: &str, what: &str, error: &object_store::Error) -> Error {
    Error::Unavailable(format!(
        "the firmware object store {description} could not {what}: {error}; check that it is reachable and \
         medfleetd's credentials for it"
    ))
}

fn object(artifact: Uuid) -> Path {
    Path::from(format!("firmware/{artifact}.img"))
}

impl Objects {
    /// Opens `file:///absolute/dir` (created if missing) or `s3://bucket[/prefix]`.
    pub fn open(url: &str) -> std::result::Result<Self, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("artifact_store '{url}' is not a URL: {e}"))?;
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| format!("artifact_store '{url}' must name an absolute directory"))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("artifact_store directory {} cannot be created: {e}", dir.display()))?;
                Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(&dir)
                        .map_err(|e| format!("artifact_store directory {}: {e}", dir.display()))?
                        .with_automatic_cleanup(true),
                )
            }
            "s3" => {
                let bucket = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| format!("artifact_store '{url}': {e}"))?;
                let prefix = parsed.path().trim_matches('/');
                if prefix.is_empty() {
                    Arc::new(bucket)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(bucket, prefix))
                }
            }
            other => {
                return Err(format!(
                    "artifact_store '{url}': scheme {other} is not supported; use file:///dir or s3://bucket/prefix"
                ));
            }
        };
        let description = format!(
            "{}://{}{}",
            parsed.scheme(),
            parsed.host_str().unwrap_or(""),
            parsed.path()
        );
        Ok(Self { store, description })
    }

    /// A writer for `artifact`'s image; nothing is visible until [`Upload::finish`].
    pub async fn begin(&self, artifact: Uuid) -> Result<Upload> {
        let upload = self
            .store
            .put_multipart(&object(artifact))
            .await
            .map_err(|e| unavailable(&self.description, "start an upload", &e))?;
        Ok(Upload {
            writer: Some(WriteMultipart::new_with_chunk_size(upload, PART)),
            description: self.description.clone(),
        })
    }

    /// Bytes `start..end` of `artifact`'s image.
    pub async fn read(&self, artifact: Uuid, start: u64, end: u64) -> Result<Bytes> {
        self.store
            .get_range(&object(artifact), start..end)
            .await
            .map_err(|e| unavailable(&self.description, &format!("read image {artifact}"), &e))
    }

    pub async fn delete(&self, artifact: Uuid) -> Result<()> {
        match self.store.delete(&object(artifact)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(unavailable(&self.description, &format!("delete image {artifact}"), &e)),
        }
    }

    /// Deletes objects older than `older_than` whose artifact does not exist; returns how many.
    pub async fn sweep(&self, db: &DatabaseConnection, older_than: std::time::Duration) -> Result<u64> {
        let cutoff =
            now() - chrono::Duration::from_std(older_than).map_err(|e| Error::Internal(format!("sweep grace: {e}")))?;
        let mut listing = self.store.list(Some(&Path::from("firmware")));
        let mut removed = 0;
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| unavailable(&self.description, "list images", &e))?;
            let Some(id) = meta
                .location
                .filename()
                .and_then(|name| name.strip_suffix(".img"))
                .and_then(|id| Uuid::parse_str(id).ok())
            else {
                continue;
            };
            if meta.last_modified >= cutoff || firmware_artifact::Entity::find_by_id(id).one(db).await?.is_some() {
                continue;
            }
            self.delete(id).await?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// An image being written. Dropped unfinished, it leaves no object: the local store removes its staging file;
/// S3 keeps the invisible parts until the bucket's lifecycle rule for incomplete multipart uploads clears them.
pub struct Upload {
    writer: Option<WriteMultipart>,
    description: String,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("store", &self.description)
            .field("open", &self.writer.is_some())
            .finish()
    }
}

impl Upload {
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        let Some(writer) = self.writer.as_mut() else {
            return Err(Error::Internal("write after the upload ended".to_owned()));
        };
        writer
            .wait_for_capacity(IN_FLIGHT)
            .await
            .map_err(|e| unavailable(&self.description, "store part of an image", &e))?;
        writer.write(data);
        Ok(())
    }

    /// Makes the object visible.
    pub async fn finish(mut self) -> Result<()> {
        let Some(writer) = self.writer.take() else {
            return Err(Error::Internal("the upload ended already".to_owned()));
        };
        writer
            .finish()
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&self.description, "complete an image", &e))
    }

    /// Gives the upload up, removing its parts.
    pub async fn abort(mut self) {
        if let Some(writer) = self.writer.take()
            && let Err(error) = writer.abort().await
        {
            tracing::warn!(%error, "could not abort an object store upload; its parts expire with the bucket's rules");
        }
    }
}
