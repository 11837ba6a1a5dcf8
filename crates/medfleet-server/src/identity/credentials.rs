//! The certificate lifecycle: one-time enrollment tokens, enrollment, renewal, operator/service credentials and
//! revocation. Every issued certificate is recorded; every revocation is appended to the revocation log that all
//! replicas follow (see [`crate::identity::revocation`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use medfleet_core::identity::{Identity, RevocationReason};
use medfleet_core::registry::{Device, DeviceState, Location, NewDevice};
use ring::rand::SecureRandom as _;
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, ConnectionTrait, DatabaseConnection, EntityTrait as _,
    IntoActiveModel as _, PaginatorTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
};
use uuid::Uuid;

use crate::audit::{Context, device_scope};
use crate::error::{Error, Result};
use crate::identity::pki::{CertificateAuthority, IssuedCertificate, RequestedKey, SubjectDetails};
use crate::identity::revocation::{Revocations, log_revocations};
use crate::persistence::db::begin_write;
use crate::persistence::db::now;
use crate::persistence::entity::{association, certificate, device, enrollment_token, principal};
use crate::registry::store::{Registry, lock_device};

/// Every enrollment token starts with this, so secret scanners and people recognise one.
pub const TOKEN_PREFIX: &str = "mft_";
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_hours(24);
pub const MIN_TOKEN_TTL: Duration = Duration::from_mins(5);
pub const MAX_TOKEN_TTL: Duration = Duration::from_hours(30 * 24);

/// Certificate lifetimes by principal kind.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub device: Duration,
    pub operator: Duration,
    pub service: Duration,
}

impl Lifetimes {
    fn of(&self, identity: &Identity) -> Duration {
        match identity {
            Identity::Device(_) => self.device,
            Identity::User(_) => self.operator,
            Identity::Service(_) => self.service,
        }
    }
}

/// Limits failed enrollment attempts per source address (token guessing), as a token bucket: a burst of
/// [`FailureLimiter::BURST`] failures, refilled at one per [`FailureLimiter::REFILL`]. Successful enrollments
/// are never limited, so bulk enrollment from one gateway is not slowed.
#[derive(Debug, Default)]
pub struct FailureLimiter {
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl FailureLimiter {
    pub const BURST: f64 = 10.0;
    pub const REFILL: Duration = Duration::from_secs(6);

    fn level(entry: (f64, Instant), now: Instant) -> f64 {
        let refilled = now.duration_since(entry.1).as_secs_f64() / Self::REFILL.as_secs_f64();
        (entry.0 + refilled).min(Self::BURST)
    }

    /// IPv6 clients hold whole /64s: limit per /64, or rotating addresses would evade the limit.
    fn key(address: IpAddr) -> IpAddr {
        crate::transport::tls::client_key(address)
    }

    /// Whether `address` may make another attempt.
    pub fn allows(&self, address: IpAddr) -> bool {
        let address = Self::key(address);
        let buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        buckets
            .get(&address)
            .is_none_or(|entry| Self::level(*entry, Instant::now()) >= 1.0)
    }

    pub fn record_failure(&self, address: IpAddr) {
        let address = Self::key(address);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let level = buckets
            .get(&address)
            .map_or(Self::BURST, |entry| Self::level(*entry, now));
        buckets.insert(address, ((level - 1.0).max(0.0), now));
        // Forget addresses whose bucket has refilled, so the map cannot grow without bound.
        if buckets.len() > 10_000 {
            buckets.retain(|_, entry| Self::level(*entry, now) < Self::BURST);
        }
    }
}

/// A freshly issued enrollment token: the secret (shown once) and its expiry.
#[derive(Clone)]
pub struct NewToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for NewToken {
    // The token is a secret: never printed, even by a stray `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

fn hash_token(token: &str) -> String {
    medfleet_core::digest::sha256_hex(token.as_bytes())
}

fn generate_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Internal("the system random number generator failed".into()))?;
    Ok(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// Issues a token for `device_id` inside the caller's transaction, voiding the device's unused tokens.
pub(crate) async fn insert_token(
    txn: &impl ConnectionTrait,
    device_id: Uuid,
    ttl: Duration,
    created_by: &Identity,
) -> Result<NewToken> {
    enrollment_token::Entity::delete_many()
        .filter(enrollment_token::Column::DeviceId.eq(device_id))
        .filter(enrollment_token::Column::UsedAt.is_null())
        .exec(txn)
        .await?;
    let token = generate_token()?;
    let at = now();
    let expires_at = at + chrono::Duration::from_std(ttl).map_err(|e| Error::Internal(e.to_string()))?;
    enrollment_token::ActiveModel {
        id: Set(Uuid::new_v4()),
        device_id: Set(device_id),
        token_hash: Set(hash_token(&token)),
        created_by: Set(created_by.to_string()),
        created_at: Set(at),
        expires_at: Set(expires_at),
        used_at: Set(None),
    }
    .insert(txn)
    .await?;
    Ok(NewToken { token, expires_at })
}

/// The newest unexpired, unrevoked certificate of `identity`.
async fn live_certificate(txn: &impl ConnectionTrait, identity: &Identity) -> Result<Option<certificate::Model>> {
    Ok(certificate::Entity::find()
        .filter(certificate::Column::Identity.eq(identity.to_string()))
        .filter(certificate::Column::RevokedAt.is_null())
        .filter(certificate::Column::NotAfter.gt(now()))
        .order_by_desc(certificate::Column::NotAfter)
        .one(txn)
        .await?)
}

/// What using a new token would do to an enrolled device, in words an operator can weigh before `--replace`.
async fn enrolled_consequence(
    txn: &impl ConnectionTrait,
    device_id: Uuid,
    current: &certificate::Model,
) -> Result<String> {
    let online = crate::devices::presence::current_sessions(txn, &[device_id])
        .await?
        .contains_key(&device_id);
    let charting = association::Entity::find()
        .filter(association::Column::DeviceId.eq(device_id))
        .filter(association::open_at(now()))
        .count(txn)
        .await?
        > 0;
    let mut state = vec![format!(
        "holds certificate {} valid until {}",
        current.serial,
        current.not_after.to_rfc3339()
    )];
    if online {
        state.push("is online now".to_owned());
    }
    if charting {
        state.push("is charting to a patient".to_owned());
    }
    Ok(format!(
        "device {device_id} is enrolled: it {}. Enrolling with a new token revokes that certificate at once and cuts \
         the device off{}; readings it has buffered reach the chart only if its own agent re-enrolls keeping its \
         state directory (medfleet-agent enroll --reenroll). If that is what you mean (a replaced unit, a reset), \
         issue the token with --replace",
        state.join(", "),
        if online { " mid-session" } else { "" },
    ))
}

async fn record_certificate(txn: &impl ConnectionTrait, identity: &Identity, issued: &IssuedCertificate) -> Result<()> {
    certificate::ActiveModel {
        serial: Set(issued.serial.clone()),
        identity: Set(identity.to_string()),
        not_before: Set(DateTime::<Utc>::from(issued.not_before)),
        not_after: Set(DateTime::<Utc>::from(issued.not_after)),
        issued_at: Set(DateTime::<Utc>::from(issued.issued_at)),
        revoked_at: Set(None),
        revocation_reason: Set(None),
    }
    .insert(txn)
    .await?;
    Ok(())
}

/// Revokes every unexpired, unrevoked certificate of `identity` inside the caller's transaction.
async fn revoke_all(txn: &impl ConnectionTrait, identity: &Identity, reason: RevocationReason) -> Result<u32> {
    let at = now();
    let certs = certificate::Entity::find()
        .filter(certificate::Column::Identity.eq(identity.to_string()))
        .filter(certificate::Column::RevokedAt.is_null())
        .filter(certificate::Column::NotAfter.gt(at))
        .all(txn)
        .await?;
    let mut revoked = Vec::with_capacity(certs.len());
    for cert in certs {
        revoked.push((cert.serial.clone(), cert.not_after));
        let mut model = cert.into_active_model();
        model.revoked_at = Set(Some(at));
        model.revocation_reason = Set(Some(reason.as_str().to_owned()));
        model.update(txn).await?;
    }
    log_revocations(txn, &identity.to_string(), reason.as_str(), &revoked).await?;
    Ok(u32::try_from(revoked.len()).unwrap_or(u32::MAX))
}

#[derive(Debug, Clone)]
pub struct Credentials {
    db: DatabaseConnection,
    registry: Registry,
    ca: Arc<CertificateAuthority>,
    lifetimes: Lifetimes,
    revocations: Arc<Revocations>,
    limiter: Arc<FailureLimiter>,
}

impl Credentials {
    pub fn new(
        db: DatabaseConnection,
        ca: Arc<CertificateAuthority>,
        lifetimes: Lifetimes,
        revocations: Arc<Revocations>,
    ) -> Self {
        Self {
            registry: Registry::new(db.clone()),
            db,
            ca,
            lifetimes,
            revocations,
            limiter: Arc::new(FailureLimiter::default()),
        }
    }

    /// Registers every device, and issues each a token when `tokens` is given, in one transaction: all or none.
    pub async fn import_devices(
        &self,
        devices: Vec<NewDevice>,
        tokens: Option<(std::time::Duration, &medfleet_core::identity::Identity)>,
        audit: &Context,
    ) -> Result<Vec<(Device, Option<NewToken>)>> {
        let txn = begin_write(&self.db).await?;
        let mut out = Vec::with_capacity(devices.len());
        for (i, new) in devices.into_iter().enumerate() {
            let device = crate::registry::store::insert_device(&txn, new)
                .await
                .map_err(|e| match e {
                    Error::AlreadyExists(m) => Error::AlreadyExists(format!("devices[{i}]: {m}; nothing was imported")),
                    Error::FailedPrecondition(m) => {
                        Error::FailedPrecondition(format!("devices[{i}]: {m}; nothing was imported"))
                    }
                    Error::MissingPlace(m) => Error::MissingPlace(format!("devices[{i}]: {m}; nothing was imported")),
                    other => other,
                })?;
            let token = match tokens {
                Some((ttl, by)) => Some(insert_token(&txn, device.id, ttl, by).await?),
                None => None,
            };
            out.push((device, token));
        }
        for (device, token) in &out {
            audit
                .record(
                    &txn,
                    "device.register",
                    format!("device/{}", device.id),
                    device.location.as_ref().map_or_else(|| "*".to_owned(), Location::scope),
                    if token.is_some() {
                        "import, enrollment token issued"
                    } else {
                        "import"
                    },
                )
                .await?;
        }
        txn.commit().await?;
        Ok(out)
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// A one-time token for `device_id`. An enrolled device (one with a valid certificate) gets one only with
    /// `replace`, because enrolling with it revokes the certificate the live device runs on.
    pub async fn issue_enrollment_token(
        &self,
        device_id: Uuid,
        ttl: Duration,
        replace: bool,
        by: &Identity,
        audit: &Context,
    ) -> Result<NewToken> {
        let txn = begin_write(&self.db).await?;
        // Device row first, as enrollment and revocation take it (one lock order everywhere: device row, then
        // tokens and certificates, then the revocation log, then the audit trail).
        let device = lock_device(&txn, device_id).await?;
        if device.state == DeviceState::Decommissioned.as_str() {
            return Err(Error::FailedPrecondition(format!(
                "device {device_id} is decommissioned; it cannot be enrolled again"
            )));
        }
        let live = live_certificate(&txn, &Identity::Device(device_id)).await?;
        if let Some(current) = &live
            && !replace
        {
            return Err(Error::FailedPrecondition(
                enrolled_consequence(&txn, device_id, current).await?,
            ));
        }
        let token = insert_token(&txn, device_id, ttl, by).await?;
        let replaces = live
            .as_ref()
            .map(|c| format!("; replaces certificate {} when used", c.serial))
            .unwrap_or_default();
        audit
            .record(
                &txn,
                "enrollment.token.issue",
                format!("device/{device_id}"),
                device_scope(device.site.as_deref(), device.ward.as_deref()),
                format!("expires {}{replaces}", token.expires_at.to_rfc3339()),
            )
            .await?;
        txn.commit().await?;
        Ok(token)
    }

    /// Exchanges a one-time token and a verified CSR key for the device's certificate. Token failures count
    /// against the source address.
    pub async fn enroll(
        &self,
        source: IpAddr,
        token: &str,
        key: &RequestedKey,
        expected_device: Option<Uuid>,
        audit: &Context,
    ) -> Result<(Identity, IssuedCertificate)> {
        if !self.limiter.allows(source) {
            return Err(Error::ResourceExhausted(
                "too many failed enrollment attempts from this address; wait a minute and check the token".into(),
            ));
        }
        let result = self.enroll_inner(token, key, expected_device, audit).await;
        if let Err(Error::Unauthenticated(_) | Error::PermissionDenied(_)) = &result {
            self.limiter.record_failure(source);
        }
        result
    }

    async fn enroll_inner(
        &self,
        token: &str,
        key: &RequestedKey,
        expected_device: Option<Uuid>,
        audit: &Context,
    ) -> Result<(Identity, IssuedCertificate)> {
        let invalid = || {
            Error::Unauthenticated(
                "the enrollment token is not valid; ask hospital IT for a new one (medfleet devices enroll-token)"
                    .into(),
            )
        };
        if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
            return Err(invalid());
        }
        let txn = begin_write(&self.db).await?;
        let row = enrollment_token::Entity::find()
            .filter(enrollment_token::Column::TokenHash.eq(hash_token(token)))
            .one(&txn)
            .await?
            .ok_or_else(invalid)?;
        let at = now();
        if let Some(used_at) = row.used_at {
            return Err(Error::Unauthenticated(format!(
                "the enrollment token was already used at {}; ask hospital IT for a new one",
                used_at.to_rfc3339()
            )));
        }
        if row.expires_at <= at {
            return Err(Error::Unauthenticated(format!(
                "the enrollment token expired at {}; ask hospital IT for a new one",
                row.expires_at.to_rfc3339()
            )));
        }
        if let Some(expected) = expected_device
            && expected != row.device_id
        {
            return Err(Error::PermissionDenied(format!(
                "this enrollment token was issued for another device, not {expected}"
            )));
        }
        // The device row is locked before the token, in the same order as revocation takes them.
        let device = device::Entity::find_by_id(row.device_id)
            .lock_exclusive()
            .one(&txn)
            .await?
            .ok_or_else(invalid)?;
        if device.state == DeviceState::Decommissioned.as_str() {
            return Err(Error::FailedPrecondition(format!(
                "device {} is decommissioned and cannot be enrolled",
                device.id
            )));
        }
        // Single use even under concurrency: only one transaction can flip used_at from NULL.
        let claimed = enrollment_token::Entity::update_many()
            .col_expr(enrollment_token::Column::UsedAt, sea_orm::sea_query::Expr::value(at))
            .filter(enrollment_token::Column::Id.eq(row.id))
            .filter(enrollment_token::Column::UsedAt.is_null())
            .exec(&txn)
            .await?;
        if claimed.rows_affected != 1 {
            return Err(Error::Unauthenticated(
                "the enrollment token was just used by another request".into(),
            ));
        }
        let identity = Identity::Device(device.id);
        // A re-enrolled device (a replaced unit, a reset) leaves its earlier certificates behind: retire them.
        let superseded = revoke_all(&txn, &identity, RevocationReason::Superseded).await?;
        let details = SubjectDetails {
            serial_number: Some(device.serial_number.clone()),
            eui64: device.eui64.clone(),
        };
        let issued = self
            .ca
            .issue_for_key(&identity, key, self.lifetimes.device, &details)
            .map_err(|e| Error::Internal(e.to_string()))?;
        record_certificate(&txn, &identity, &issued).await?;
        audit
            .record(
                &txn,
                "device.enroll",
                format!("device/{}", device.id),
                device_scope(device.site.as_deref(), device.ward.as_deref()),
                format!("certificate {}", issued.serial),
            )
            .await?;
        let mut model = device.into_active_model();
        model.state = Set(DeviceState::Enrolled.as_str().to_owned());
        model.updated_at = Set(at);
        model.update(&txn).await?;
        txn.commit().await?;
        if superseded > 0 {
            self.apply_revocations().await;
        }
        Ok((identity, issued))
    }

    /// Signs a certificate for `identity`, records it and audits it as `action`, inside the caller's transaction.
    #[allow(clippy::too_many_arguments)]
    async fn certify(
        &self,
        txn: &impl ConnectionTrait,
        identity: &Identity,
        key: &RequestedKey,
        lifetime: Duration,
        details: &SubjectDetails,
        audit: &Context,
        action: &str,
    ) -> Result<IssuedCertificate> {
        let issued = self
            .ca
            .issue_for_key(identity, key, lifetime, details)
            .map_err(|e| Error::Internal(e.to_string()))?;
        record_certificate(txn, identity, &issued).await?;
        audit
            .record(
                txn,
                action,
                identity.to_string(),
                "*",
                format!("certificate {}", issued.serial),
            )
            .await?;
        Ok(issued)
    }

    /// Applies committed revocations on this replica at once. A failure here only delays them until the next
    /// poll; the revocation itself is committed, so the caller is not told it failed.
    async fn apply_revocations(&self) {
        if let Err(error) = self.revocations.refresh(&self.db).await {
            tracing::warn!(%error, "applying revocations now failed; the poller will apply them");
        }
    }

    /// A new certificate for the caller's own identity.
    pub async fn renew(
        &self,
        identity: &Identity,
        current_serial: Option<&str>,
        key: &RequestedKey,
        audit: &Context,
    ) -> Result<IssuedCertificate> {
        if current_serial.is_some_and(|serial| self.revocations.is_revoked(serial)) {
            return Err(Error::PermissionDenied(
                "the certificate used for this call was revoked".into(),
            ));
        }
        let txn = begin_write(&self.db).await?;
        // Lock the principal's row: a concurrent revocation updates it too, so one waits for the other and the
        // re-check below sees a revocation that committed first (SQLite's BEGIN IMMEDIATE serialises anyway).
        let details = match identity {
            Identity::Device(id) => {
                let device = device::Entity::find_by_id(*id)
                    .lock_exclusive()
                    .one(&txn)
                    .await?
                    .ok_or_else(|| Error::PermissionDenied(format!("device {id} is not registered")))?;
                if device.state == DeviceState::Decommissioned.as_str() {
                    return Err(Error::PermissionDenied(format!(
                        "device {id} is decommissioned; its certificates are not renewed"
                    )));
                }
                SubjectDetails {
                    serial_number: Some(device.serial_number),
                    eui64: device.eui64,
                }
            }
            Identity::User(_) | Identity::Service(_) => {
                let row = principal::Entity::find_by_id(identity.to_string())
                    .lock_exclusive()
                    .one(&txn)
                    .await?;
                if row.is_some_and(|p| p.disabled_at.is_some()) {
                    return Err(Error::PermissionDenied(format!(
                        "{identity} was revoked; an administrator can issue new credentials"
                    )));
                }
                SubjectDetails::default()
            }
        };
        if let Some(serial) = current_serial
            && certificate::Entity::find_by_id(serial.to_owned())
                .one(&txn)
                .await?
                .is_some_and(|cert| cert.revoked_at.is_some())
        {
            return Err(Error::PermissionDenied(
                "the certificate used for this call was revoked".into(),
            ));
        }
        let issued = self
            .certify(
                &txn,
                identity,
                key,
                self.lifetimes.of(identity),
                &details,
                audit,
                "certificate.renew",
            )
            .await?;
        txn.commit().await?;
        Ok(issued)
    }

    /// Credentials for an operator or integration; re-enables a revoked principal of that name.
    pub async fn issue_credentials(
        &self,
        identity: &Identity,
        key: &RequestedKey,
        lifetime: Option<Duration>,
        by: &Identity,
        audit: &Context,
    ) -> Result<IssuedCertificate> {
        let txn = begin_write(&self.db).await?;
        let at = now();
        match principal::Entity::find_by_id(identity.to_string()).one(&txn).await? {
            Some(existing) => {
                let mut model = existing.into_active_model();
                model.disabled_at = Set(None);
                model.update(&txn).await?;
            }
            None => {
                principal::ActiveModel {
                    identity: Set(identity.to_string()),
                    created_by: Set(by.to_string()),
                    created_at: Set(at),
                    disabled_at: Set(None),
                }
                .insert(&txn)
                .await?;
            }
        }
        let lifetime = lifetime.unwrap_or_else(|| self.lifetimes.of(identity));
        let issued = self
            .certify(
                &txn,
                identity,
                key,
                lifetime,
                &SubjectDetails::default(),
                audit,
                "credential.issue",
            )
            .await?;
        txn.commit().await?;
        Ok(issued)
    }

    /// Disables an operator or integration and revokes all its certificates, effective at once.
    pub async fn revoke_principal(
        &self,
        identity: &Identity,
        reason: RevocationReason,
        by: &Identity,
        audit: &Context,
    ) -> Result<u32> {
        if identity == by {
            return Err(Error::FailedPrecondition(
                "you cannot revoke your own credentials; ask another administrator".into(),
            ));
        }
        let txn = begin_write(&self.db).await?;
        // Locked first, as `renew` does: a renewal either finishes before this revocation (and its certificate is
        // revoked below) or waits for it (and is refused).
        let known_principal = principal::Entity::find_by_id(identity.to_string())
            .lock_exclusive()
            .one(&txn)
            .await?;
        let has_certificates = certificate::Entity::find()
            .filter(certificate::Column::Identity.eq(identity.to_string()))
            .one(&txn)
            .await?
            .is_some();
        let at = now();
        match known_principal {
            Some(existing) => {
                let mut model = existing.into_active_model();
                model.disabled_at = Set(Some(at));
                model.update(&txn).await?;
            }
            None if has_certificates => {
                principal::ActiveModel {
                    identity: Set(identity.to_string()),
                    created_by: Set(by.to_string()),
                    created_at: Set(at),
                    disabled_at: Set(Some(at)),
                }
                .insert(&txn)
                .await?;
            }
            None => return Err(Error::NotFound(format!("{identity} has no credentials"))),
        }
        let revoked = revoke_all(&txn, identity, reason).await?;
        // A revoked principal keeps no roles: a name reused later for someone else starts with none.
        let mut dropped = Vec::new();
        for grant in crate::authz::access::list_grants(&txn, Some(&identity.to_string())).await? {
            crate::authz::access::delete_grant(&txn, &grant).await?;
            dropped.push(format!("{} on {}", grant.role, grant.scope));
        }
        let detail = format!(
            "{revoked} certificate(s); reason {}; roles removed: {}",
            reason.as_str(),
            if dropped.is_empty() {
                "none".to_owned()
            } else {
                dropped.join(", ")
            }
        );
        audit
            .record(&txn, "credential.revoke", identity.to_string(), "*", detail)
            .await?;
        txn.commit().await?;
        self.apply_revocations().await;
        Ok(revoked)
    }

    /// Revokes every certificate of a device; `decommission` also retires it for good. Outstanding enrollment
    /// tokens are voided either way.
    pub async fn revoke_device(
        &self,
        id: Uuid,
        reason: RevocationReason,
        decommission: bool,
        audit: &Context,
    ) -> Result<Device> {
        let txn = begin_write(&self.db).await?;
        // Locked first, as `renew` does (see `revoke_principal`).
        let current = lock_device(&txn, id).await?;
        let scope = device_scope(current.site.as_deref(), current.ward.as_deref());
        let already_decommissioned = current.state == DeviceState::Decommissioned.as_str();
        if already_decommissioned && !decommission {
            return Err(Error::FailedPrecondition(format!(
                "device {id} is decommissioned; its certificates were revoked then"
            )));
        }
        if !already_decommissioned {
            let identity = Identity::Device(id);
            let revoked = revoke_all(&txn, &identity, reason).await?;
            enrollment_token::Entity::delete_many()
                .filter(enrollment_token::Column::DeviceId.eq(id))
                .filter(enrollment_token::Column::UsedAt.is_null())
                .exec(&txn)
                .await?;
            let next = if decommission {
                DeviceState::Decommissioned
            } else {
                DeviceState::Registered
            };
            let mut model = current.into_active_model();
            model.state = Set(next.as_str().to_owned());
            model.updated_at = Set(now());
            model.update(&txn).await?;
            // Last: the audit lock is the final lock any write transaction takes.
            let action = if decommission {
                "device.decommission"
            } else {
                "device.revoke"
            };
            let detail = format!("{revoked} certificate(s); reason {}", reason.as_str());
            audit
                .record(&txn, action, format!("device/{id}"), scope, detail)
                .await?;
        }
        txn.commit().await?;
        self.apply_revocations().await;
        self.registry.get_device(id).await
    }

    /// Records the first admin's certificate (issued by `init`, possibly before the database existed) so that it
    /// can be revoked like any other.
    pub async fn record_bootstrap(&self, identity: &Identity, issued: &IssuedCertificate) -> Result<()> {
        let txn = begin_write(&self.db).await?;
        if certificate::Entity::find_by_id(issued.serial.clone())
            .one(&txn)
            .await?
            .is_none()
        {
            record_certificate(&txn, identity, issued).await?;
        }
        if principal::Entity::find_by_id(identity.to_string())
            .one(&txn)
            .await?
            .is_none()
        {
            principal::ActiveModel {
                identity: Set(identity.to_string()),
                created_by: Set("medfleetd init".to_owned()),
                created_at: Set(DateTime::<Utc>::from(issued.issued_at)),
                disabled_at: Set(None),
            }
            .insert(&txn)
            .await?;
            // The first admin holds the admin role fleet-wide, once: a later revocation of that grant sticks.
            crate::authz::access::insert_grant(
                &txn,
                &crate::authz::access::Grant {
                    subject: identity.to_string(),
                    role: "admin".to_owned(),
                    scope: "*".to_owned(),
                },
            )
            .await?;
            Context::system("init")
                .record(
                    &txn,
                    "credential.bootstrap",
                    identity.to_string(),
                    "*",
                    format!("certificate {}", issued.serial),
                )
                .await?;
        }
        txn.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_hashed() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 43);
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), hash_token(&b));
    }

    #[test]
    fn limiter_allows_a_burst_of_failures_then_refuses() {
        let limiter = FailureLimiter::default();
        let address: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        for _ in 0..10 {
            assert!(limiter.allows(address));
            limiter.record_failure(address);
        }
        assert!(!limiter.allows(address));
        assert!(limiter.allows(other), "limits are per address");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        for _ in 0..10 {
            limiter.record_failure(v6);
        }
        assert!(
            !limiter.allows("2001:db8::ffff".parse().unwrap()),
            "an IPv6 /64 is one client"
        );
    }
}
