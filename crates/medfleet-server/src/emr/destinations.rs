//! EMR destinations as admins define them: validation and the allowed hosts, the stored form (secrets sealed with
//! the keyring, never returned), and the lifecycle — create, update (a rotated secret, a new endpoint), enable and
//! disable, delete — each audited without the secret, plus the start-up re-encryption of secrets stored under an
//! old key or in clear ([`reseal`]). Delivery itself is [`crate::emr`]; relays re-read a destination before every
//! batch, so a change takes effect without a restart.

use std::collections::{BTreeMap, BTreeSet};

use medfleet_core::clinical::destination::DestinationUpdate;
use medfleet_core::secrets::{EnvelopeError, is_envelope, key_id_of};
use medfleet_core::validation::{Violations, check_slug, printable};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, ConnectionTrait as _, DatabaseConnection, DbBackend, EntityTrait as _,
    PaginatorTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
};
use serde::{Deserialize, Serialize};

use crate::audit::Context;
use crate::clinical::{DestinationKind, state};
use crate::emr::Emr;
use crate::error::{Error, Result, Unreadable};
use crate::identity::secrets::Secrets;
use crate::persistence::db::now;
use crate::persistence::entity::{emr_destination, emr_outbox, feed_subscription};
use crate::persistence::events::Event;

/// Connection settings of a destination. In memory the secrets are plaintext; stored (as JSON) they are envelopes
/// ([`seal_settings`]), and they never leave the server.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Settings {
    pub endpoint: String,
    #[serde(default)]
    pub bearer_token: Option<String>,
    #[serde(default)]
    pub ca_pem: Option<String>,
    #[serde(default)]
    pub receiving_application: String,
    #[serde(default)]
    pub receiving_facility: String,
    /// Mutual TLS towards the receiver: medfleet's client certificate chain and key (PEM).
    #[serde(default)]
    pub client_certificate_pem: Option<String>,
    #[serde(default)]
    pub client_key_pem: Option<String>,
    /// MLLP without TLS, explicitly accepted by the admin who created the destination.
    #[serde(default)]
    pub insecure_plaintext: bool,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// A destination as an admin defines it.
#[derive(Debug, Clone)]
pub struct NewDestination {
    pub name: String,
    pub kind: DestinationKind,
    pub sites: BTreeSet<String>,
    pub wards: BTreeSet<String>,
    pub interval_secs: u32,
    pub settings: Settings,
    pub enabled: bool,
}

impl NewDestination {
    /// Checks the fields that do not need stored state; every problem is reported at once.
    pub fn check(&self) -> Result<()> {
        let mut v = Violations::new();
        v.check("name", check_slug(&self.name));
        for site in &self.sites {
            v.check("sites", check_slug(site));
        }
        for ward in &self.wards {
            match ward.split_once('/') {
                Some((site, name)) if check_slug(site).is_ok() && check_slug(name).is_ok() => {}
                _ => v.push("wards", format!("'{ward}' is not a ward; write it as SITE/WARD")),
            }
        }
        if self.interval_secs > 24 * 3600 {
            v.push("interval_seconds", "the charting interval must be at most 24 hours");
        }
        match self.kind {
            DestinationKind::Feed => {
                if !self.settings.endpoint.is_empty() {
                    v.push(
                        "endpoint",
                        "a feed destination has no endpoint: EMR systems subscribe to it",
                    );
                }
            }
            DestinationKind::Fhir => match self.settings.endpoint.parse::<http::Uri>() {
                // Credentials in the URL would be stored and shown in clear: they belong in the bearer token.
                Ok(uri) if uri.authority().is_some_and(|a| a.as_str().contains('@')) => v.push(
                    "endpoint",
                    "the endpoint must not carry credentials (user:password@); give a bearer token instead",
                ),
                Ok(uri) if uri.scheme_str() == Some("https") || is_loopback_http(&uri) => {}
                _ => v.push(
                    "endpoint",
                    "a FHIR endpoint is the server's base URL: https://host[:port]/path (http:// only on loopback)",
                ),
            },
            DestinationKind::Mllp => {
                if split_host_port(&self.settings.endpoint).is_none() {
                    v.push("endpoint", "an MLLP endpoint is HOST:PORT");
                }
                if self.settings.ca_pem.is_none() && !self.settings.insecure_plaintext {
                    v.push(
                        "ca_pem",
                        "MLLP without TLS sends PHI in clear: give the receiver's CA (ca_pem) for MLLP over TLS, or \
                         set insecure_plaintext for a receiver on an isolated network",
                    );
                }
            }
        }
        if let Some(pem) = &self.settings.ca_pem
            && rustls_pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<rustls_pki_types::CertificateDer<'_>>, _>>()
                .map_or(true, |certs| certs.is_empty())
        {
            v.push("ca_pem", "the CA must be one or more PEM certificates");
        }
        match (&self.settings.client_certificate_pem, &self.settings.client_key_pem) {
            (None, None) => {}
            (Some(certs), Some(key)) => {
                if client_identity(certs, key).is_err() {
                    v.push(
                        "client_certificate_pem",
                        "the client certificate chain and key must be PEM, the key PKCS#8, SEC1 or PKCS#1",
                    );
                }
            }
            _ => v.push(
                "client_key_pem",
                "mutual TLS needs both the client certificate chain and its key",
            ),
        }
        if v.is_empty() { Ok(()) } else { Err(v.into()) }
    }

    /// The host the destination's endpoint names (none for a feed).
    pub(crate) fn host(&self) -> Option<String> {
        endpoint_host(self.kind, &self.settings.endpoint)
    }
}

/// The host an endpoint of `kind` connects to (lower case), if it names one.
fn endpoint_host(kind: DestinationKind, endpoint: &str) -> Option<String> {
    match kind {
        DestinationKind::Feed => None,
        DestinationKind::Fhir => endpoint
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.host().map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())),
        DestinationKind::Mllp => split_host_port(endpoint).map(|(h, _)| h.to_ascii_lowercase()),
    }
}

/// The server's rules for where PHI may go, checked again before every round of sending and not only when a
/// destination is written: a destination created before an allow-list was configured (or narrowed), or a plaintext
/// MLLP row from before `insecure_plaintext` existed, is held, not relayed.
pub(crate) fn send_refusal(kind: DestinationKind, settings: &Settings, allowed_hosts: &[String]) -> Option<String> {
    if let Some(host) = endpoint_host(kind, &settings.endpoint)
        && !host_allowed(allowed_hosts, &host)
    {
        return Some(format!(
            "host '{}' is not among the EMR hosts this server allows (emr_allowed_hosts); nothing is sent to it. \
             Point the destination at an allowed host (medfleet emr update) or ask the medfleetd operator to allow it",
            printable(&host)
        ));
    }
    if kind == DestinationKind::Mllp && settings.ca_pem.is_none() && !settings.insecure_plaintext {
        return Some(
            "MLLP without TLS and without insecure_plaintext: nothing is sent in clear. Give the receiver's CA \
             (medfleet emr update NAME --ca FILE) or, for a receiver on an isolated network, set \
             --insecure-plaintext"
                .to_owned(),
        );
    }
    None
}

/// Whether `host` is on the allow-list (an empty list allows any host): exact names, or `*.suffix` for subdomains.
fn host_allowed(allowed: &[String], host: &str) -> bool {
    allowed.is_empty()
        || allowed.iter().any(|pattern| {
            let pattern = pattern.to_ascii_lowercase();
            match pattern.strip_prefix("*.") {
                Some(suffix) => host.ends_with(&format!(".{suffix}")),
                None => host == pattern,
            }
        })
}

fn is_loopback_http(uri: &http::Uri) -> bool {
    uri.scheme_str() == Some("http")
        && uri
            .host()
            .is_some_and(|h| h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()))
}

pub(crate) fn split_host_port(endpoint: &str) -> Option<(String, u16)> {
    let (host, port) = endpoint.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty()).then(|| (host.trim_matches(['[', ']']).to_owned(), port))
}

/// The secret fields of [`Settings`], by their wire and storage names.
const BEARER_TOKEN: &str = "bearer_token";
const CLIENT_KEY: &str = "client_key_pem";

/// The place a destination's secret is sealed for: an envelope copied into another row or field does not open.
fn aad(destination: &str, field: &str) -> String {
    format!("emr_destination/{destination}/{field}")
}

impl Settings {
    /// The stored JSON of settings whose secrets are already sealed.
    fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::Internal(format!("cannot store destination settings: {e}")))
    }

    fn secrets_mut(&mut self) -> [(&'static str, &mut Option<String>); 2] {
        [
            (BEARER_TOKEN, &mut self.bearer_token),
            (CLIENT_KEY, &mut self.client_key_pem),
        ]
    }
}

/// The stored settings as they are: secrets still sealed (or, written by an older medfleetd, in clear).
pub fn stored_settings(model: &emr_destination::Model) -> Result<Settings> {
    serde_json::from_str(&model.settings)
        .map_err(|e| Error::Internal(format!("destination '{}' settings are corrupt: {e}", model.name)))
}

/// The stored form of `settings`: every secret sealed under the current key for its place.
pub fn seal_settings(name: &str, settings: &Settings, secrets: &Secrets) -> Result<String> {
    let mut stored = settings.clone();
    for (field, value) in stored.secrets_mut() {
        if let Some(plain) = value.take() {
            *value = Some(seal(secrets, name, field, &plain)?);
        }
    }
    stored.to_json()
}

fn seal(secrets: &Secrets, name: &str, field: &str, plain: &str) -> Result<String> {
    secrets
        .seal(&aad(name, field), plain.as_bytes())
        .map_err(|e| Error::Internal(e.to_string()))
}

/// The settings with their secrets opened, for a relay about to send. A plaintext secret written by an older
/// medfleetd is taken as it is (start-up re-encryption seals it).
pub fn open_settings(model: &emr_destination::Model, secrets: &Secrets) -> Result<Settings> {
    let mut settings = stored_settings(model)?;
    for (field, value) in settings.secrets_mut() {
        if let Some(stored) = value.as_mut()
            && is_envelope(stored)
        {
            *stored = secrets.open_text(&aad(&model.name, field), stored).map_err(|source| {
                Error::Unreadable(Unreadable {
                    destination: model.name.clone(),
                    field,
                    source,
                })
            })?;
        }
    }
    Ok(settings)
}

/// The key ids a destination's secrets are sealed with; `None` for a secret still in clear.
pub fn secret_key_ids(settings: &Settings) -> Vec<Option<String>> {
    [&settings.bearer_token, &settings.client_key_pem]
        .into_iter()
        .flatten()
        .map(|stored| key_id_of(stored).map(str::to_owned))
        .collect()
}

/// What deleting a destination removed.
#[derive(Debug, Clone, Default)]
pub struct Deleted {
    /// Feed subscriptions that followed it, as `owner/name` (only with `force`).
    pub subscriptions: Vec<String>,
    /// Deliveries that were still waiting: never sent.
    pub discarded: u64,
}

/// Arbitrary but fixed key of the PostgreSQL advisory lock that serialises start-up re-encryption across replicas.
const RESEAL_LOCK_KEY: i64 = 0x6d65_6466_6c74_0012;
/// Destinations re-encrypted per transaction: bounded, so start-up never holds row locks for long.
const RESEAL_CHUNK: u64 = 50;

/// What start-up re-encryption did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resealed {
    /// Secrets found in clear (written by an older medfleetd) and sealed.
    pub from_plaintext: u64,
    /// Secrets sealed under an old key, re-encrypted under the current one, per old key id.
    pub from_old_keys: BTreeMap<String, u64>,
    /// Secrets that do not open, as (destination, field, why): those destinations fail until fixed.
    pub unreadable: Vec<(String, &'static str, EnvelopeError)>,
}

impl Resealed {
    pub fn changed(&self) -> u64 {
        self.from_plaintext + self.from_old_keys.values().sum::<u64>()
    }
}

/// Re-encrypts every destination secret that is in clear or sealed under an old key with the current key, in
/// transactions of [`RESEAL_CHUNK`] destinations (rows locked, replicas serialised by an advisory lock on
/// PostgreSQL; SQLite's write transactions are serial), and writes one audit entry with the counts (never a
/// secret) if anything changed or failed. `ca_key` is what happened to the CA key file, for the same entry.
pub async fn reseal(db: &DatabaseConnection, secrets: &Secrets, ca_key: Option<&str>) -> Result<Resealed> {
    let mut report = Resealed::default();
    let current = secrets.current_kid().to_owned();
    let mut after = String::new();
    loop {
        let txn = crate::persistence::db::begin_write(db).await?;
        if db.get_database_backend() == DbBackend::Postgres {
            txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({RESEAL_LOCK_KEY})"))
                .await?;
        }
        let rows = emr_destination::Entity::find()
            .filter(emr_destination::Column::Name.gt(after.as_str()))
            .order_by_asc(emr_destination::Column::Name)
            .limit(RESEAL_CHUNK)
            .lock_exclusive()
            .all(&txn)
            .await?;
        let Some(last) = rows.last() else {
            txn.commit().await?;
            break;
        };
        after.clone_from(&last.name);
        for row in &rows {
            // One corrupt row must not keep every other destination (and the server) from starting.
            let mut settings = match stored_settings(row) {
                Ok(settings) => settings,
                Err(error) => {
                    tracing::error!(destination = %row.name, %error, "EMR destination settings are unreadable; left as they are");
                    continue;
                }
            };
            let mut changed = false;
            for (field, value) in settings.secrets_mut() {
                let Some(stored) = value.as_mut() else { continue };
                let place = aad(&row.name, field);
                let from = if is_envelope(stored) {
                    match key_id_of(stored) {
                        Some(kid) if kid == current => continue,
                        kid => kid.map(str::to_owned),
                    }
                } else {
                    None
                };
                let plain = match from {
                    None => stored.clone(),
                    Some(_) => match secrets.open_text(&place, stored) {
                        Ok(plain) => plain,
                        Err(error) => {
                            report.unreadable.push((row.name.clone(), field, error));
                            continue;
                        }
                    },
                };
                *stored = seal(secrets, &row.name, field, &plain)?;
                changed = true;
                match from {
                    None => report.from_plaintext += 1,
                    Some(kid) => *report.from_old_keys.entry(kid).or_default() += 1,
                }
            }
            if changed {
                let stored = settings.to_json()?;
                emr_destination::Entity::update_many()
                    .col_expr(emr_destination::Column::Settings, Expr::value(stored))
                    .filter(emr_destination::Column::Name.eq(row.name.as_str()))
                    .exec(&txn)
                    .await?;
            }
        }
        txn.commit().await?;
        if (rows.len() as u64) < RESEAL_CHUNK {
            break;
        }
    }
    for (destination, field, error) in &report.unreadable {
        tracing::error!(destination = %destination, field, %error, "EMR destination secret cannot be decrypted; the destination gets nothing until it is fixed");
    }
    if report.changed() > 0 || !report.unreadable.is_empty() || ca_key.is_some() {
        let old: Vec<String> = report
            .from_old_keys
            .iter()
            .map(|(kid, n)| format!("{n} from key {kid}"))
            .collect();
        let unreadable: BTreeSet<&str> = report.unreadable.iter().map(|(d, _, _)| d.as_str()).collect();
        let detail = format!(
            "current key {current}; destination secrets re-encrypted: {} from plaintext{}; unreadable: {}{}",
            report.from_plaintext,
            if old.is_empty() {
                String::new()
            } else {
                format!(", {}", old.join(", "))
            },
            if unreadable.is_empty() {
                "none".to_owned()
            } else {
                unreadable.into_iter().collect::<Vec<_>>().join(", ")
            },
            ca_key.map(|c| format!("; CA key {c}")).unwrap_or_default(),
        );
        tracing::info!(detail = %detail, "secrets at rest re-encrypted under the current key");
        let txn = crate::persistence::db::begin_write(db).await?;
        Context::system("secrets")
            .record(&txn, "secrets.reseal", "secrets", "*", detail)
            .await?;
        txn.commit().await?;
    }
    Ok(report)
}

/// Every key id something stored is sealed with (destination secrets; `true` in the second place if any secret is
/// still in clear), for retiring old keys.
pub async fn key_ids_in_use(db: &DatabaseConnection) -> Result<(BTreeSet<String>, bool)> {
    let mut ids = BTreeSet::new();
    let mut plaintext = false;
    for row in emr_destination::Entity::find().all(db).await? {
        for kid in secret_key_ids(&stored_settings(&row)?) {
            match kid {
                Some(kid) => {
                    ids.insert(kid);
                }
                None => plaintext = true,
            }
        }
    }
    Ok((ids, plaintext))
}

/// A value for the audit trail: quoted, printable, bounded.
fn shown(value: &str) -> String {
    let value: String = printable(value).chars().take(200).collect();
    format!("'{value}'")
}

impl Emr {
    fn check_host(&self, destination: &NewDestination) -> Result<()> {
        if let Some(host) = destination.host()
            && !host_allowed(&self.allowed_hosts, &host)
        {
            return Err(Violations::single(
                "endpoint",
                format!(
                    "host '{}' is not among the EMR hosts this server allows (emr_allowed_hosts in medfleetd's \
                     configuration); ask the medfleetd operator to add it",
                    printable(&host)
                ),
            )
            .into());
        }
        Ok(())
    }

    pub async fn create_destination(&self, new: NewDestination, audit: &Context) -> Result<emr_destination::Model> {
        new.check()?;
        self.check_host(&new)?;
        let txn = crate::persistence::db::begin_write(&self.db).await?;
        if emr_destination::Entity::find_by_id(new.name.clone())
            .one(&txn)
            .await?
            .is_some()
        {
            return Err(Error::AlreadyExists(format!(
                "EMR destination '{}' already exists",
                new.name
            )));
        }
        let json = |set: &BTreeSet<String>| serde_json::to_string(set).unwrap_or_else(|_| "[]".into());
        let model = emr_destination::ActiveModel {
            name: Set(new.name.clone()),
            kind: Set(new.kind.as_str().to_owned()),
            settings: Set(seal_settings(&new.name, &new.settings, &self.secrets)?),
            sites: Set(json(&new.sites)),
            wards: Set(json(&new.wards)),
            interval_secs: Set(i64::from(new.interval_secs)),
            enabled: Set(new.enabled),
            created_by: Set(audit.actor.clone()),
            created_at: Set(now()),
            relay_owner: Set(None),
            relay_lease_until: Set(None),
            charted_until: Set(None),
            relay_error: Set(None),
        };
        let stored = emr_destination::Entity::insert(model).exec_with_returning(&txn).await?;
        audit
            .record(
                &txn,
                "emr_destination.create",
                format!("emr_destination/{}", new.name),
                "*",
                format!(
                    "{} {}{}",
                    new.kind.as_str(),
                    printable(&new.settings.endpoint),
                    if new.settings.insecure_plaintext && new.settings.ca_pem.is_none() {
                        "; INSECURE PLAINTEXT (no TLS) accepted by the creator"
                    } else {
                        ""
                    }
                ),
            )
            .await?;
        txn.commit().await?;
        Ok(stored)
    }

    pub async fn destinations(&self) -> Result<Vec<emr_destination::Model>> {
        Ok(emr_destination::Entity::find()
            .order_by_asc(emr_destination::Column::Name)
            .all(&self.db)
            .await?)
    }

    pub async fn destination(&self, name: &str) -> Result<emr_destination::Model> {
        emr_destination::Entity::find_by_id(name.to_owned())
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::NotFound(format!("EMR destination '{name}' does not exist")))
    }

    /// Applies an update under the rules of a creation: the resulting definition is validated as a whole, its
    /// host must be allowed while it is enabled, and an MLLP destination in clear whose endpoint (or CA) changes
    /// needs `insecure_plaintext` again in the same update. Secrets not named keep their envelopes (no key is
    /// needed to change anything else: a destination whose key was lost is fixed by setting a new secret).
    pub async fn update_destination(
        &self,
        name: &str,
        update: &DestinationUpdate,
        audit: &Context,
    ) -> Result<emr_destination::Model> {
        let txn = crate::persistence::db::begin_write(&self.db).await?;
        let current = emr_destination::Entity::find_by_id(name.to_owned())
            .lock_exclusive()
            .one(&txn)
            .await?
            .ok_or_else(|| Error::NotFound(format!("EMR destination '{name}' does not exist")))?;
        let kind = DestinationKind::parse(&current.kind)
            .ok_or_else(|| Error::Internal(format!("destination '{name}' has unknown kind")))?;
        let stored = stored_settings(&current)?;
        let parse = |text: &str| -> Result<BTreeSet<String>> {
            serde_json::from_str(text)
                .map_err(|e| Error::Internal(format!("destination '{name}' filter is corrupt: {e}")))
        };
        let mut settings = stored.clone();
        if let Some(endpoint) = &update.endpoint {
            endpoint.clone_into(&mut settings.endpoint);
        }
        if let Some(ca_pem) = &update.ca_pem {
            settings.ca_pem.clone_from(ca_pem);
        }
        if let Some(application) = &update.receiving_application {
            application.clone_into(&mut settings.receiving_application);
        }
        if let Some(facility) = &update.receiving_facility {
            facility.clone_into(&mut settings.receiving_facility);
        }
        if let Some(insecure) = update.insecure_plaintext {
            settings.insecure_plaintext = insecure;
        }
        // The definition to validate: stored secrets are not opened (they were checked when set), so an unchanged
        // client identity is left out of the check; a new one is checked in clear.
        let mut checked = settings.clone();
        if let Some(Some(identity)) = &update.client_identity {
            checked.client_certificate_pem = Some(identity.certificate_pem.clone());
            checked.client_key_pem = Some(identity.key_pem.clone());
        } else {
            checked.client_certificate_pem = None;
            checked.client_key_pem = None;
        }
        let definition = NewDestination {
            name: name.to_owned(),
            kind,
            sites: update.sites.clone().map_or_else(|| parse(&current.sites), Ok)?,
            wards: update.wards.clone().map_or_else(|| parse(&current.wards), Ok)?,
            interval_secs: update
                .interval_secs
                .unwrap_or_else(|| u32::try_from(current.interval_secs).unwrap_or(0)),
            settings: checked,
            enabled: update.enabled.unwrap_or(current.enabled),
        };
        let mut v = match definition.check() {
            Err(Error::Invalid(found)) => found,
            Err(other) => return Err(other),
            Ok(()) => Violations::new(),
        };
        let in_clear = kind == DestinationKind::Mllp && settings.ca_pem.is_none();
        let reaimed = update.endpoint.as_ref().is_some_and(|e| *e != stored.endpoint) || update.ca_pem == Some(None);
        if in_clear && reaimed && update.insecure_plaintext != Some(true) {
            v.push(
                "insecure_plaintext",
                "this MLLP destination sends in clear: a new endpoint (or removing its CA) must accept that again \
                 with insecure_plaintext in the same update, or give the receiver's CA (ca_pem) for TLS",
            );
        }
        if !v.is_empty() {
            return Err(v.into());
        }
        // Pinned hosts apply to what may send: an enabled destination. Disabling is always possible.
        if definition.enabled {
            self.check_host(&definition)?;
        }
        settings.bearer_token = match &update.bearer_token {
            None => keep_sealed(&self.secrets, name, BEARER_TOKEN, stored.bearer_token.clone())?,
            Some(token) => token
                .as_deref()
                .map(|t| seal(&self.secrets, name, BEARER_TOKEN, t))
                .transpose()?,
        };
        match &update.client_identity {
            None => {
                settings.client_key_pem = keep_sealed(&self.secrets, name, CLIENT_KEY, stored.client_key_pem.clone())?;
            }
            Some(identity) => {
                settings.client_certificate_pem = identity.as_ref().map(|i| i.certificate_pem.clone());
                settings.client_key_pem = identity
                    .as_ref()
                    .map(|i| seal(&self.secrets, name, CLIENT_KEY, &i.key_pem))
                    .transpose()?;
            }
        }
        let detail = describe(update, &stored, &settings, kind);
        let json = |set: &BTreeSet<String>| serde_json::to_string(set).unwrap_or_else(|_| "[]".into());
        let reenabled = definition.enabled && !current.enabled;
        let mut model: emr_destination::ActiveModel = current.into();
        model.settings = Set(settings.to_json()?);
        model.sites = Set(json(&definition.sites));
        model.wards = Set(json(&definition.wards));
        model.interval_secs = Set(i64::from(definition.interval_secs));
        model.enabled = Set(definition.enabled);
        // New secrets may be what the relay was missing: let it try again at once.
        model.relay_error = Set(None);
        if reenabled && definition.interval_secs > 0 {
            // Chart entries made while it was disabled were not queued for it; interval charting resumes with the
            // window in progress, as every-reading delivery resumes with the next entry.
            let interval = i64::from(definition.interval_secs);
            let start = now().timestamp().div_euclid(interval) * interval;
            model.charted_until = Set(chrono::DateTime::from_timestamp(start, 0));
        }
        let stored_row = emr_destination::Entity::update(model).exec(&txn).await?;
        let action = match update.enabled {
            Some(false) if update.only_enabled() => "emr_destination.disable",
            Some(true) if update.only_enabled() => "emr_destination.enable",
            _ => "emr_destination.update",
        };
        audit
            .record(&txn, action, format!("emr_destination/{name}"), "*", detail)
            .await?;
        self.events.announce(&txn, &Event::Outbox).await?;
        txn.commit().await?;
        self.events.emit(Event::Outbox);
        Ok(stored_row)
    }

    /// Deletes a destination. Refused while feed subscriptions follow it unless `force` (which deletes them too).
    /// Its queued deliveries are discarded with it, never sent, and its delivery records go too, so a new
    /// destination of the same name starts empty (a retry can never send an old one's dead letters elsewhere).
    pub async fn delete_destination(&self, name: &str, force: bool, audit: &Context) -> Result<Deleted> {
        let txn = crate::persistence::db::begin_write(&self.db).await?;
        let current = emr_destination::Entity::find_by_id(name.to_owned())
            .lock_exclusive()
            .one(&txn)
            .await?
            .ok_or_else(|| Error::NotFound(format!("EMR destination '{name}' does not exist")))?;
        let subscriptions: Vec<String> = feed_subscription::Entity::find()
            .filter(feed_subscription::Column::Destination.eq(name))
            .order_by_asc(feed_subscription::Column::Owner)
            .order_by_asc(feed_subscription::Column::Name)
            .all(&txn)
            .await?
            .into_iter()
            .map(|s| format!("{}/{}", s.owner, s.name))
            .collect();
        if !subscriptions.is_empty() && !force {
            let listed: Vec<&str> = subscriptions.iter().take(10).map(String::as_str).collect();
            let more = subscriptions.len().saturating_sub(listed.len());
            return Err(Error::FailedPrecondition(format!(
                "feed subscriptions follow EMR destination '{name}': {}{}; have their owners stop, or delete with \
                 force (medfleet emr delete {name} --force), which deletes the subscriptions too",
                listed.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            )));
        }
        feed_subscription::Entity::delete_many()
            .filter(feed_subscription::Column::Destination.eq(name))
            .exec(&txn)
            .await?;
        let discarded = emr_outbox::Entity::find()
            .filter(emr_outbox::Column::Destination.eq(name))
            .filter(emr_outbox::Column::State.eq(state::PENDING))
            .count(&txn)
            .await?;
        let removed = emr_outbox::Entity::delete_many()
            .filter(emr_outbox::Column::Destination.eq(name))
            .exec(&txn)
            .await?
            .rows_affected;
        emr_destination::Entity::delete_by_id(name.to_owned())
            .exec(&txn)
            .await?;
        let settings = stored_settings(&current)?;
        audit
            .record(
                &txn,
                "emr_destination.delete",
                format!("emr_destination/{name}"),
                "*",
                format!(
                    "{} {}; {discarded} pending deliveries discarded (never sent), {removed} delivery records \
                     removed; subscriptions removed: {}",
                    current.kind,
                    printable(&settings.endpoint),
                    if subscriptions.is_empty() {
                        "none".to_owned()
                    } else {
                        subscriptions.join(", ")
                    }
                ),
            )
            .await?;
        self.events.announce(&txn, &Event::Outbox).await?;
        txn.commit().await?;
        self.events.emit(Event::Outbox);
        Ok(Deleted {
            subscriptions,
            discarded,
        })
    }
}

/// A stored secret left as it is: an envelope stays; one in clear (an older medfleetd's) is sealed now.
fn keep_sealed(secrets: &Secrets, name: &str, field: &str, stored: Option<String>) -> Result<Option<String>> {
    match stored {
        Some(plain) if !is_envelope(&plain) => seal(secrets, name, field, &plain).map(Some),
        other => Ok(other),
    }
}

/// The audit detail of an update: what changed, with old and new values for what is not secret, and only "set"
/// or "removed" for secrets.
fn describe(update: &DestinationUpdate, before: &Settings, after: &Settings, kind: DestinationKind) -> String {
    let mut parts = Vec::new();
    if let Some(endpoint) = &update.endpoint {
        parts.push(format!("endpoint {} -> {}", shown(&before.endpoint), shown(endpoint)));
    }
    for (field, value) in [("sites", &update.sites), ("wards", &update.wards)] {
        if let Some(value) = value {
            parts.push(format!(
                "{field} {}",
                shown(&value.iter().cloned().collect::<Vec<_>>().join(","))
            ));
        }
    }
    if let Some(interval) = update.interval_secs {
        parts.push(format!("interval_seconds {interval}"));
    }
    let secret = |set: bool| if set { "set (new value)" } else { "removed" };
    if let Some(token) = &update.bearer_token {
        parts.push(format!("bearer_token {}", secret(token.is_some())));
    }
    if let Some(ca) = &update.ca_pem {
        parts.push(format!("ca_pem {}", if ca.is_some() { "replaced" } else { "removed" }));
    }
    if let Some(application) = &update.receiving_application {
        parts.push(format!("receiving_application {}", shown(application)));
    }
    if let Some(facility) = &update.receiving_facility {
        parts.push(format!("receiving_facility {}", shown(facility)));
    }
    if let Some(identity) = &update.client_identity {
        parts.push(format!("client certificate and key {}", secret(identity.is_some())));
    }
    if let Some(insecure) = update.insecure_plaintext {
        parts.push(format!("insecure_plaintext {insecure}"));
    }
    if let Some(enabled) = update.enabled {
        parts.push(format!("enabled {enabled}"));
    }
    let mut detail = parts.join("; ");
    if update.insecure_plaintext == Some(true) && kind == DestinationKind::Mllp && after.ca_pem.is_none() {
        detail.push_str("; INSECURE PLAINTEXT (no TLS) accepted by the updater");
    }
    detail
}

pub(crate) type ClientIdentity = (
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
);

pub(crate) fn client_identity(certs: &str, key: &str) -> std::result::Result<ClientIdentity, String> {
    use rustls_pki_types::pem::PemObject as _;
    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(certs.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if chain.is_empty() {
        return Err("no certificate".into());
    }
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| e.to_string())?;
    Ok((chain, key))
}
