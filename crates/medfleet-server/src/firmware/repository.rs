//! The server's side of TUF: its online keys, the trusted roots and the current metadata set.
//!
//! The online keys are created by the first replica that needs them (a racing replica's insert loses and it reads
//! the winner's), sealed with the secrets keyring. Snapshot and timestamp are re-signed when targets change and
//! well before they expire, under a row lock so replicas never publish two different files with one version.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use medfleet_core::firmware::tuf::{self, MetadataSet, SignedTarget, SigningKey, TufError};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait as _,
    IntoActiveModel as _, QueryOrder as _, Statement,
};
use tokio::sync::OnceCell;

use crate::audit;
use crate::error::{Error, Result};
use crate::identity::secrets::Secrets;
use crate::persistence::db::{self, now};
use crate::persistence::entity::{firmware_artifact, firmware_key, firmware_metadata, firmware_root};

/// Devices refuse a timestamp older than this (TUF's freeze protection); it is re-signed at half its life.
pub const TIMESTAMP_LIFETIME: Duration = Duration::days(1);
/// The snapshot lives longer; re-signed at half its life or whenever targets change.
pub const SNAPSHOT_LIFETIME: Duration = Duration::days(7);

const SNAPSHOT: &str = "snapshot";
const TIMESTAMP: &str = "timestamp";
const TARGETS: &str = "targets";

fn aad(role: &str) -> String {
    format!("firmware-online-key:{role}")
}

/// A refusal of TUF metadata: FAILED_PRECONDITION with the stable reason.
#[allow(clippy::needless_pass_by_value)] // used as `.map_err(refused)`
pub fn refused(error: TufError) -> Error {
    Error::Refused {
        reason: error.code.as_str(),
        message: error.to_string(),
    }
}

#[derive(Debug)]
struct OnlineKeys {
    snapshot: SigningKey,
    timestamp: SigningKey,
}

/// The public halves, for root metadata.
#[derive(Debug, Clone)]
pub struct OnlinePublic {
    pub snapshot_json: String,
    pub snapshot_id: String,
    pub timestamp_json: String,
    pub timestamp_id: String,
}

/// The metadata a device (or an operator) fetches.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub roots: Vec<String>,
    pub timestamp: String,
    pub snapshot: String,
    pub targets: String,
}

/// New metadata for an upload, to be written in the transaction that stores the artifact.
#[derive(Debug)]
pub struct Prepared {
    pub target: SignedTarget,
    pub targets_version: u64,
    rows: Vec<firmware_metadata::ActiveModel>,
}

#[derive(Debug, Clone)]
pub struct Repository {
    db: DatabaseConnection,
    secrets: Arc<Secrets>,
    keys: Arc<OnceCell<Arc<OnlineKeys>>>,
    metrics: crate::telemetry::Metrics,
}

fn internal(what: &str, error: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{what}: {error}"))
}

impl Repository {
    pub fn new(db: DatabaseConnection, secrets: Arc<Secrets>, metrics: crate::telemetry::Metrics) -> Self {
        Self {
            db,
            secrets,
            keys: Arc::new(OnceCell::new()),
            metrics,
        }
    }

    async fn keys(&self) -> Result<Arc<OnlineKeys>> {
        self.keys
            .get_or_try_init(|| async {
                let snapshot = self.key(SNAPSHOT).await?;
                let timestamp = self.key(TIMESTAMP).await?;
                Ok::<_, Error>(Arc::new(OnlineKeys { snapshot, timestamp }))
            })
            .await
            .cloned()
    }

    async fn key(&self, role: &str) -> Result<SigningKey> {
        if firmware_key::Entity::find_by_id(role.to_owned())
            .one(&self.db)
            .await?
            .is_none()
        {
            let (key, pem) = SigningKey::generate().map_err(|e| internal("generating an online key", e))?;
            let sealed = self
                .secrets
                .seal(&aad(role), pem.as_bytes())
                .map_err(|e| internal("sealing an online key", e))?;
            let public = serde_json::to_string(&key.public()).map_err(|e| internal("online key", e))?;
            firmware_key::Entity::insert(firmware_key::ActiveModel {
                role: Set(role.to_owned()),
                key_id: Set(key.id().to_owned()),
                public_json: Set(public),
                sealed_private: Set(sealed),
                created_at: Set(now()),
            })
            .on_conflict(OnConflict::column(firmware_key::Column::Role).do_nothing().to_owned())
            .exec_without_returning(&self.db)
            .await?;
        }
        let row = firmware_key::Entity::find_by_id(role.to_owned())
            .one(&self.db)
            .await?
            .ok_or_else(|| internal("online key", "vanished after it was stored"))?;
        let pem = self.secrets.open_text(&aad(role), &row.sealed_private).map_err(|e| {
            Error::Unavailable(format!(
                "the online {role} key does not open with this replica's secrets keyring ({e}); start every replica \
                 with the same secrets_key_file"
            ))
        })?;
        SigningKey::from_pem(&pem).map_err(|e| internal("online key", e))
    }

    pub async fn online_public(&self) -> Result<OnlinePublic> {
        let keys = self.keys().await?;
        let json = |key: &SigningKey| serde_json::to_string(&key.public()).map_err(|e| internal("online key", e));
        Ok(OnlinePublic {
            snapshot_json: json(&keys.snapshot)?,
            snapshot_id: keys.snapshot.id().to_owned(),
            timestamp_json: json(&keys.timestamp)?,
            timestamp_id: keys.timestamp.id().to_owned(),
        })
    }

    pub async fn current_root(&self) -> Result<Option<firmware_root::Model>> {
        Ok(firmware_root::Entity::find()
            .order_by_desc(firmware_root::Column::Version)
            .one(&self.db)
            .await?)
    }

    /// Installs the first root or the next version. Its online roles must be exactly our keys: a root naming
    /// other snapshot or timestamp keys would make every device refuse what we sign.
    pub async fn set_root(&self, ctx: &audit::Context, root_json: &str) -> Result<firmware_root::Model> {
        let current = self.current_root().await?;
        let info = match &current {
            None => tuf::root_info(root_json.as_bytes()),
            Some(trusted) => tuf::verify_root_update(trusted.body.as_bytes(), root_json.as_bytes()),
        }
        .map_err(refused)?;
        let online = self.online_public().await?;
        for (role, id) in [(SNAPSHOT, &online.snapshot_id), (TIMESTAMP, &online.timestamp_id)] {
            if info.role_keys(role) != [id.clone()] {
                return Err(Error::Refused {
                    reason: tuf::Refusal::Signature.as_str(),
                    message: format!(
                        "the root's {role} role must be exactly medfleetd's online {role} key {id}; run `medfleet \
                         firmware online-keys -o json` and pass it to `medfleet firmware keys init --online-keys`"
                    ),
                });
            }
        }
        let version = i64::try_from(info.version).map_err(|_| internal("root", "version out of range"))?;
        let txn = db::begin_write(&self.db).await?;
        let row = firmware_root::ActiveModel {
            version: Set(version),
            body: Set(root_json.to_owned()),
            expires_at: Set(info.expires),
            installed_at: Set(now()),
            installed_by: Set(ctx.actor.clone()),
        };
        firmware_root::Entity::insert(row)
            .exec_without_returning(&txn)
            .await
            .map_err(|e| match e.sql_err() {
                Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => {
                    Error::AlreadyExists(format!("root version {version} is installed already"))
                }
                _ => Error::from(e),
            })?;
        ctx.record(
            &txn,
            "firmware.trust_root.set",
            format!("root v{version}"),
            "*",
            format!("targets keys {:?}", info.role_keys(TARGETS)),
        )
        .await?;
        txn.commit().await?;
        self.note_expiry().await;
        firmware_root::Entity::find_by_id(version)
            .one(&self.db)
            .await?
            .ok_or_else(|| internal("root", "vanished after it was stored"))
    }

    async fn roots(&self, conn: &impl ConnectionTrait) -> Result<Vec<firmware_root::Model>> {
        Ok(firmware_root::Entity::find()
            .order_by_asc(firmware_root::Column::Version)
            .all(conn)
            .await?)
    }

    async fn role(conn: &impl ConnectionTrait, role: &str) -> Result<Option<firmware_metadata::Model>> {
        Ok(firmware_metadata::Entity::find_by_id(role.to_owned()).one(conn).await?)
    }

    /// What devices fetch: root versions above `known_root`, and the current timestamp, snapshot and targets.
    /// `NOT_FOUND` before the first image was uploaded.
    pub async fn published(&self, known_root: u64) -> Result<Published> {
        let roots = self.roots(&self.db).await?;
        let (Some(timestamp), Some(snapshot), Some(targets)) = (
            Self::role(&self.db, TIMESTAMP).await?,
            Self::role(&self.db, SNAPSHOT).await?,
            Self::role(&self.db, TARGETS).await?,
        ) else {
            return Err(Error::NotFound(
                "no firmware metadata is published yet (upload a signed image first)".to_owned(),
            ));
        };
        Ok(Published {
            roots: roots
                .into_iter()
                .filter(|r| u64::try_from(r.version).is_ok_and(|v| v > known_root))
                .map(|r| r.body)
                .collect(),
            timestamp: timestamp.body,
            snapshot: snapshot.body,
            targets: targets.body,
        })
    }

    /// Checks an upload's targets metadata and signs the snapshot and timestamp that would publish it, verifying
    /// the whole set with tough from the first trusted root. Nothing is stored; [`Prepared::store`] does that in
    /// the caller's transaction.
    pub async fn prepare(
        &self,
        conn: &impl ConnectionTrait,
        targets_json: &str,
        target_name: &str,
    ) -> Result<Prepared> {
        let (verified, info, rows) = self.prepare_set(conn, targets_json, Some(target_name)).await?;
        let target = verified.target(target_name).map_err(refused)?;
        Ok(Prepared {
            target,
            targets_version: info.version,
            rows,
        })
    }

    /// Publishes targets metadata that lists exactly the stored images (re-signed offline under a new version and
    /// expiry), with freshly signed snapshot and timestamp, audited; refused with nothing changed otherwise.
    pub async fn publish_targets(
        &self,
        ctx: &audit::Context,
        targets_json: &str,
        comment: &str,
    ) -> Result<tuf::TargetsInfo> {
        let txn = db::begin_write(&self.db).await?;
        lock_metadata(&txn).await?;
        let current = Self::role(&txn, TARGETS).await?;
        if current.as_ref().is_some_and(|c| c.body == targets_json) {
            return Err(Error::AlreadyExists(
                "this targets metadata is the one published already: re-sign it first with `medfleet firmware resign`"
                    .to_owned(),
            ));
        }
        // prepare_set insists the set lists exactly the stored images, each as it was signed.
        let (_, info, rows) = self.prepare_set(&txn, targets_json, None).await?;
        write_rows(&txn, rows).await?;
        for artifact in firmware_artifact::Entity::find().all(&txn).await? {
            let Some(t) = info.targets.iter().find(|t| t.name == artifact.target_name) else {
                continue;
            };
            let signed = serde_json::to_string(&t.meta.downgrade_from).map_err(|e| Error::Internal(e.to_string()))?;
            if signed == artifact.downgrade_from {
                continue;
            }
            let detail = format!(
                "{} (version {}, release {}) may now replace releases {signed}",
                artifact.target_name, artifact.version, artifact.release_counter
            );
            let name = artifact.target_name.clone();
            let mut active = artifact.into_active_model();
            active.downgrade_from = Set(signed);
            active.update(&txn).await?;
            ctx.record(
                &txn,
                "firmware.authorize_downgrade",
                format!("artifact {name}"),
                "*",
                detail,
            )
            .await?;
        }
        let detail = if comment.is_empty() {
            format!(
                "targets version {}, expires {}",
                info.version,
                info.expires.to_rfc3339()
            )
        } else {
            format!(
                "targets version {}, expires {}: {comment}",
                info.version,
                info.expires.to_rfc3339()
            )
        };
        ctx.record(&txn, "firmware.publish_targets", "targets", "*", detail)
            .await?;
        txn.commit().await?;
        self.note_expiry().await;
        Ok(info)
    }

    /// Checks targets metadata against the trusted roots and what is published, signs the snapshot and
    /// timestamp that would publish it and verifies the whole set with tough; returns the rows to write.
    /// `uploading`: the one target of the set that may have no stored image yet (its image is arriving).
    async fn prepare_set(
        &self,
        conn: &impl ConnectionTrait,
        targets_json: &str,
        uploading: Option<&str>,
    ) -> Result<(tuf::Verified, tuf::TargetsInfo, Vec<firmware_metadata::ActiveModel>)> {
        let roots = self.roots(conn).await?;
        let Some(first) = roots.first() else {
            return Err(Error::FailedPrecondition(
                "no trusted root is installed: run `medfleet firmware keys init`, then `medfleet firmware trust \
                 install root.json`"
                    .to_owned(),
            ));
        };
        let info = tuf::targets_info(targets_json.as_bytes()).map_err(refused)?;
        let current = Self::role(conn, TARGETS).await?;
        let current_version = current.as_ref().map_or(0, |c| u64::try_from(c.version).unwrap_or(0));
        let unchanged = current.as_ref().is_some_and(|c| c.body == targets_json);
        if !unchanged && info.version <= current_version {
            return Err(Error::Refused {
                reason: tuf::Refusal::Rollback.as_str(),
                message: format!(
                    "the targets metadata is version {}, not above the published version {current_version}: run \
                     `medfleet firmware metadata pull` and sign the new image into that targets.json",
                    info.version
                ),
            });
        }
        let stored = firmware_artifact::Entity::find().all(conn).await?;
        // An upload may carry along a target the published metadata lists already without a stored image (one
        // deleted, not yet re-signed away), exactly as published; a publish may not.
        let carried: Vec<SignedTarget> = match (uploading, &current) {
            (Some(_), Some(current)) => tuf::targets_info(current.body.as_bytes())
                .map(|published| published.targets)
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        matches_store(&info, &stored, uploading, &carried)?;
        let keys = self.keys().await?;
        let at = now();
        let snapshot_version = Self::role(conn, SNAPSHOT)
            .await?
            .map_or(0, |s| u64::try_from(s.version).unwrap_or(0))
            + 1;
        let timestamp_version = Self::role(conn, TIMESTAMP)
            .await?
            .map_or(0, |s| u64::try_from(s.version).unwrap_or(0))
            + 1;
        let snapshot = tuf::sign_snapshot(
            targets_json.as_bytes(),
            snapshot_version,
            at + SNAPSHOT_LIFETIME,
            &keys.snapshot,
        )
        .await
        .map_err(|e| internal("signing the snapshot", e))?;
        let timestamp = tuf::sign_timestamp(&snapshot, timestamp_version, at + TIMESTAMP_LIFETIME, &keys.timestamp)
            .await
            .map_err(|e| internal("signing the timestamp", e))?;
        let set = MetadataSet {
            roots: roots.iter().skip(1).map(|r| r.body.clone().into_bytes()).collect(),
            timestamp: timestamp.clone(),
            snapshot: snapshot.clone(),
            targets: targets_json.as_bytes().to_vec(),
        };
        let verified = tuf::verify(first.body.as_bytes(), &set, None, None)
            .await
            .map_err(refused)?;
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).map_err(|e| internal("metadata", e));
        let rows = vec![
            metadata_row(TARGETS, info.version, targets_json.to_owned(), info.expires, at)?,
            metadata_row(SNAPSHOT, snapshot_version, text(snapshot)?, at + SNAPSHOT_LIFETIME, at)?,
            metadata_row(
                TIMESTAMP,
                timestamp_version,
                text(timestamp)?,
                at + TIMESTAMP_LIFETIME,
                at,
            )?,
        ];
        Ok((verified, info, rows))
    }

    /// Re-signs the timestamp (and the snapshot) when less than half their life is left, so devices never see
    /// expired metadata while medfleetd runs. One replica does it at a time: the row is locked on PostgreSQL and
    /// the write lock is taken on SQLite.
    pub async fn refresh(&self) -> Result<bool> {
        let txn = db::begin_write(&self.db).await?;
        lock_metadata(&txn).await?;
        let (Some(timestamp), Some(snapshot), Some(targets)) = (
            Self::role(&txn, TIMESTAMP).await?,
            Self::role(&txn, SNAPSHOT).await?,
            Self::role(&txn, TARGETS).await?,
        ) else {
            return Ok(false);
        };
        let at = now();
        let stale = |row: &firmware_metadata::Model, lifetime: Duration| row.expires_at - at < lifetime / 2;
        if !stale(&timestamp, TIMESTAMP_LIFETIME) && !stale(&snapshot, SNAPSHOT_LIFETIME) {
            return Ok(false);
        }
        let keys = self.keys().await?;
        let mut rows = Vec::new();
        let mut snapshot_body = snapshot.body.clone().into_bytes();
        if stale(&snapshot, SNAPSHOT_LIFETIME) {
            let version = u64::try_from(snapshot.version).unwrap_or(0) + 1;
            snapshot_body =
                tuf::sign_snapshot(targets.body.as_bytes(), version, at + SNAPSHOT_LIFETIME, &keys.snapshot)
                    .await
                    .map_err(|e| internal("signing the snapshot", e))?;
            rows.push(metadata_row(
                SNAPSHOT,
                version,
                String::from_utf8(snapshot_body.clone()).map_err(|e| internal("metadata", e))?,
                at + SNAPSHOT_LIFETIME,
                at,
            )?);
        }
        let version = u64::try_from(timestamp.version).unwrap_or(0) + 1;
        let body = tuf::sign_timestamp(&snapshot_body, version, at + TIMESTAMP_LIFETIME, &keys.timestamp)
            .await
            .map_err(|e| internal("signing the timestamp", e))?;
        rows.push(metadata_row(
            TIMESTAMP,
            version,
            String::from_utf8(body).map_err(|e| internal("metadata", e))?,
            at + TIMESTAMP_LIFETIME,
            at,
        )?);
        write_rows(&txn, rows).await?;
        txn.commit().await?;
        tracing::info!(timestamp_version = version, "firmware timestamp re-signed");
        Ok(true)
    }

    /// Publishes when the served root and each role's metadata expire, for the alert that tells the key
    /// holders to re-sign (targets) or rotate the root before devices refuse every update.
    async fn publish_expiry(&self) -> Result<()> {
        let metrics = &self.metrics;
        if let Some(root) = self.current_root().await? {
            metrics.set_firmware_metadata_expiry("root", root.expires_at);
        }
        for row in firmware_metadata::Entity::find().all(&self.db).await? {
            let role = match row.role.as_str() {
                TARGETS => TARGETS,
                SNAPSHOT => SNAPSHOT,
                TIMESTAMP => TIMESTAMP,
                _ => continue,
            };
            metrics.set_firmware_metadata_expiry(role, row.expires_at);
        }
        Ok(())
    }

    /// Starts the periodic re-signing (and the expiry gauges) until `stop`.
    pub fn spawn_refresher(&self, stop: tokio_util::sync::CancellationToken) {
        let repository = self.clone();
        db::spawn_poller(
            "firmware metadata refresh",
            std::time::Duration::from_mins(1),
            stop,
            move || {
                let repository = repository.clone();
                async move {
                    repository.refresh().await?;
                    repository.publish_expiry().await
                }
            },
        );
    }

    /// The expiry gauges at once after a change (the refresher keeps them current otherwise).
    async fn note_expiry(&self) {
        if let Err(error) = self.publish_expiry().await {
            tracing::warn!(%error, "cannot read the firmware metadata expiry");
        }
    }
}

fn metadata_row(
    role: &str,
    version: u64,
    body: String,
    expires_at: DateTime<Utc>,
    at: DateTime<Utc>,
) -> Result<firmware_metadata::ActiveModel> {
    Ok(firmware_metadata::ActiveModel {
        role: Set(role.to_owned()),
        version: Set(i64::try_from(version).map_err(|_| internal("metadata", "version out of range"))?),
        body: Set(body),
        expires_at: Set(expires_at),
        updated_at: Set(at),
    })
}

async fn write_rows(conn: &impl ConnectionTrait, rows: Vec<firmware_metadata::ActiveModel>) -> Result<()> {
    for row in rows {
        firmware_metadata::Entity::insert(row)
            .on_conflict(
                OnConflict::column(firmware_metadata::Column::Role)
                    .update_columns([
                        firmware_metadata::Column::Version,
                        firmware_metadata::Column::Body,
                        firmware_metadata::Column::ExpiresAt,
                        firmware_metadata::Column::UpdatedAt,
                    ])
                    .to_owned(),
            )
            .exec_without_returning(conn)
            .await?;
    }
    Ok(())
}

impl Prepared {
    /// Publishes the metadata in the caller's transaction (the one that stores the artifact).
    pub async fn store(self, conn: &impl ConnectionTrait) -> Result<SignedTarget> {
        write_rows(conn, self.rows).await?;
        Ok(self.target)
    }
}

/// One new metadata version at a time across replicas (PostgreSQL: a transaction-scoped advisory lock, which
/// holds even before the first metadata row exists; SQLite's write transactions are exclusive anyway). Uploads,
/// publishes and the refresher all take it before reading what is published.
pub(crate) async fn lock_metadata(txn: &sea_orm::DatabaseTransaction) -> Result<()> {
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT pg_advisory_xact_lock({METADATA_LOCK_KEY})"),
        ))
        .await?;
    }
    Ok(())
}

/// Arbitrary but fixed key of the advisory lock on the published metadata.
const METADATA_LOCK_KEY: i64 = 0x6d65_6466_6c74_0012;

/// The set lists exactly the stored images, each with the hash, length, model, version, release counter and
/// downgrades it was stored under (what medfleetd decides by must be what devices enforce, and a co-signer's
/// signature must not quietly turn an old image into a downgrade), plus at most the one image being uploaded.
fn matches_store(
    info: &tuf::TargetsInfo,
    stored: &[firmware_artifact::Model],
    uploading: Option<&str>,
    carried: &[SignedTarget],
) -> Result<()> {
    for artifact in stored {
        let Some(t) = info.targets.iter().find(|t| t.name == artifact.target_name) else {
            return Err(Error::Refused {
                reason: tuf::Refusal::Inconsistent.as_str(),
                message: format!(
                    "the targets metadata no longer lists stored image {} ({}): run `medfleet firmware metadata \
                     pull` and sign on top of that targets.json",
                    artifact.target_name, artifact.version
                ),
            });
        };
        let stored_downgrades: Vec<u64> = serde_json::from_str(&artifact.downgrade_from).unwrap_or_default();
        // A publish (re-signed offline, reviewed by each co-signer) may authorise more downgrades of a stored
        // image, for a fleet rollback to the very bytes devices ran; it never withdraws one, and an upload never
        // changes a stored image at all.
        let downgrades_kept = t.meta.downgrade_from == stored_downgrades
            || (uploading.is_none() && stored_downgrades.iter().all(|d| t.meta.downgrade_from.contains(d)));
        let same = t.sha256 == artifact.sha256
            && i64::try_from(t.length).ok() == Some(artifact.length)
            && t.meta.hardware_id == artifact.hardware_id
            && t.meta.version == artifact.version
            && i64::try_from(t.meta.release_counter).ok() == Some(artifact.release_counter)
            && downgrades_kept;
        if !same {
            return Err(Error::Refused {
                reason: tuf::Refusal::Inconsistent.as_str(),
                message: format!(
                    "the targets metadata changes what the stored image {} is (hash, length, model, version, release \
                     counter or downgrades): sign on top of the published targets.json without changing it \
                     (`medfleet firmware metadata pull`, then `sign` or `resign`)",
                    artifact.target_name
                ),
            });
        }
    }
    if let Some(extra) = info.targets.iter().find(|t| {
        Some(t.name.as_str()) != uploading && !stored.iter().any(|a| a.target_name == t.name) && !carried.contains(t)
    }) {
        return Err(Error::Refused {
            reason: tuf::Refusal::UnknownTarget.as_str(),
            message: format!(
                "the targets metadata lists {name} ({}), which is not a stored image: if it was deleted, re-sign \
                 without it (`medfleet firmware resign --remove {name}`); a new image is uploaded with `medfleet \
                 firmware upload`, one per signing",
                extra.meta.version,
                name = extra.name,
            ),
        });
    }
    Ok(())
}
