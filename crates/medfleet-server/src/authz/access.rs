//! Role-based access with casbin: RBAC with domains, where a domain is a location scope (`*`, `<site>`,
//! `<site>/<ward>`) and a grant on a scope covers everything below it.
//!
//! Policies live in the `casbin_rules` table, read through [`SeaOrmAdapter`] (no published adapter supports
//! sea-orm 2, and this one shares the pool and the migrations). Each replica holds a cached enforcer and rebuilds
//! it when the `policy_version` row changes: at once after its own changes, within [`POLL_INTERVAL`] after another
//! replica's.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use casbin::{Adapter, CachedApi as _, CachedEnforcer, CoreApi as _, DefaultModel, Filter, Model};
use sea_orm::ActiveValue::{NotSet, Set};
use sea_orm::{
    ColumnTrait as _, ConnectionTrait, DatabaseConnection, EntityTrait as _, QueryFilter as _, QueryOrder as _,
};
use tokio_util::sync::CancellationToken;

use crate::persistence::entity::{casbin_rule, policy_version};

/// Decisions kept per enforcer (each is a hash and a bool).
const DECISION_CACHE_CAPACITY: usize = 100_000;

/// How often a replica checks whether another replica changed the policy.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Subjects are identity URIs; roles are plain names; p rules carry no domain (a role means the same everywhere),
/// g rules bind a subject to a role within a scope.
const MODEL: &str = r#"
[request_definition]
r = sub, dom, obj, act

[policy_definition]
p = sub, obj, act

[role_definition]
g = _, _, _

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = g(r.sub, p.sub, r.dom) && (p.obj == "*" || r.obj == p.obj) && (p.act == "*" || r.act == p.act)
"#;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("access policy: {0}")]
    Casbin(#[from] casbin::Error),
    #[error("access policy storage: {0}")]
    Database(#[from] sea_orm::DbErr),
}

fn adapter_error(error: sea_orm::DbErr) -> casbin::Error {
    casbin::error::AdapterError(Box::new(error)).into()
}

/// The scopes whose grants cover `scope`, most specific first: `stmarys/icu` → `stmarys/icu`, `stmarys`, `*`.
pub fn covering_scopes(scope: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(3);
    if scope != "*" {
        out.push(scope.to_owned());
        if let Some((site, _)) = scope.split_once('/') {
            out.push(site.to_owned());
        }
    }
    out.push("*".to_owned());
    out
}

/// A casbin adapter over the `casbin_rules` table.
#[derive(Debug)]
pub struct SeaOrmAdapter {
    db: DatabaseConnection,
}

impl SeaOrmAdapter {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

fn row(ptype: &str, rule: &[String]) -> casbin_rule::ActiveModel {
    let value = |i: usize| Set(rule.get(i).cloned().unwrap_or_default());
    casbin_rule::ActiveModel {
        id: NotSet,
        ptype: Set(ptype.to_owned()),
        v0: value(0),
        v1: value(1),
        v2: value(2),
        v3: value(3),
        v4: value(4),
        v5: value(5),
    }
}

fn column(index: usize) -> Option<casbin_rule::Column> {
    use casbin_rule::Column::{V0, V1, V2, V3, V4, V5};
    [V0, V1, V2, V3, V4, V5].get(index).copied()
}

async fn delete_matching(
    db: &impl ConnectionTrait,
    ptype: &str,
    start: usize,
    values: &[String],
    exact: bool,
) -> Result<u64, sea_orm::DbErr> {
    let mut query = casbin_rule::Entity::delete_many().filter(casbin_rule::Column::Ptype.eq(ptype));
    for (i, value) in values.iter().enumerate() {
        if value.is_empty() && !exact {
            continue;
        }
        if let Some(col) = column(start + i) {
            query = query.filter(col.eq(value.clone()));
        }
    }
    Ok(query.exec(db).await?.rows_affected)
}

#[async_trait::async_trait]
impl Adapter for SeaOrmAdapter {
    async fn load_policy(&mut self, m: &mut dyn Model) -> casbin::Result<()> {
        let rows = casbin_rule::Entity::find()
            .order_by_asc(casbin_rule::Column::Id)
            .all(&self.db)
            .await
            .map_err(adapter_error)?;
        for rule in rows {
            let sec = if rule.ptype.starts_with('g') { "g" } else { "p" };
            if let Some(assertions) = m.get_mut_model().get_mut(sec)
                && let Some(assertion) = assertions.get_mut(&rule.ptype)
            {
                assertion.get_mut_policy().insert(rule.values());
            }
        }
        Ok(())
    }

    async fn load_filtered_policy<'a>(&mut self, m: &mut dyn Model, _f: Filter<'a>) -> casbin::Result<()> {
        self.load_policy(m).await
    }

    async fn save_policy(&mut self, m: &mut dyn Model) -> casbin::Result<()> {
        self.clear_policy().await?;
        for sec in ["p", "g"] {
            let Some(assertions) = m.get_model().get(sec) else {
                continue;
            };
            for (ptype, assertion) in assertions {
                let rows: Vec<_> = assertion.get_policy().iter().map(|rule| row(ptype, rule)).collect();
                if !rows.is_empty() {
                    casbin_rule::Entity::insert_many(rows)
                        .exec(&self.db)
                        .await
                        .map_err(adapter_error)?;
                }
            }
        }
        Ok(())
    }

    async fn clear_policy(&mut self) -> casbin::Result<()> {
        casbin_rule::Entity::delete_many()
            .exec(&self.db)
            .await
            .map_err(adapter_error)?;
        Ok(())
    }

    fn is_filtered(&self) -> bool {
        false
    }

    async fn add_policy(&mut self, _sec: &str, ptype: &str, rule: Vec<String>) -> casbin::Result<bool> {
        casbin_rule::Entity::insert(row(ptype, &rule))
            .exec(&self.db)
            .await
            .map_err(adapter_error)?;
        Ok(true)
    }

    async fn add_policies(&mut self, _sec: &str, ptype: &str, rules: Vec<Vec<String>>) -> casbin::Result<bool> {
        if !rules.is_empty() {
            casbin_rule::Entity::insert_many(rules.iter().map(|r| row(ptype, r)))
                .exec(&self.db)
                .await
                .map_err(adapter_error)?;
        }
        Ok(true)
    }

    async fn remove_policy(&mut self, _sec: &str, ptype: &str, rule: Vec<String>) -> casbin::Result<bool> {
        Ok(delete_matching(&self.db, ptype, 0, &rule, true)
            .await
            .map_err(adapter_error)?
            > 0)
    }

    async fn remove_policies(&mut self, _sec: &str, ptype: &str, rules: Vec<Vec<String>>) -> casbin::Result<bool> {
        let mut removed = false;
        for rule in rules {
            removed |= delete_matching(&self.db, ptype, 0, &rule, true)
                .await
                .map_err(adapter_error)?
                > 0;
        }
        Ok(removed)
    }

    async fn remove_filtered_policy(
        &mut self,
        _sec: &str,
        ptype: &str,
        field_index: usize,
        field_values: Vec<String>,
    ) -> casbin::Result<bool> {
        Ok(delete_matching(&self.db, ptype, field_index, &field_values, false)
            .await
            .map_err(adapter_error)?
            > 0)
    }
}

/// The replica's enforcer and the policy version it was built from.
pub struct Access {
    db: DatabaseConnection,
    enforcer: ArcSwap<CachedEnforcer>,
    version: AtomicI64,
    /// One rebuild at a time: a slow rebuild of an older version must not overwrite a newer one.
    reloading: tokio::sync::Mutex<()>,
    /// The version each rebuild installed: long-lived streams re-check their caller's access on every change.
    changed: tokio::sync::watch::Sender<i64>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

async fn build(db: &DatabaseConnection) -> Result<CachedEnforcer, AccessError> {
    let model = DefaultModel::from_str(MODEL).await?;
    let mut enforcer = CachedEnforcer::new(model, SeaOrmAdapter::new(db.clone())).await?;
    // Policy changes are written by medfleet's own transactions (with their audit entries), never by casbin.
    enforcer.enable_auto_save(false);
    // casbin's default of 200 cached decisions thrashes with a hospital's worth of operators; this bounds memory at
    // a few MiB. The cache dies with the enforcer on every policy change, so it never serves a stale decision.
    enforcer.set_cache(Box::new(casbin::DefaultCache::new(DECISION_CACHE_CAPACITY)));
    Ok(enforcer)
}

async fn current_version(db: &DatabaseConnection) -> Result<i64, sea_orm::DbErr> {
    Ok(policy_version::Entity::find_by_id(1)
        .one(db)
        .await?
        .map_or(0, |row| row.version))
}

impl Access {
    /// The database the policy lives in (streams closed by a policy change audit there).
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    pub async fn load(db: DatabaseConnection) -> Result<Arc<Self>, AccessError> {
        let version = current_version(&db).await?;
        let enforcer = build(&db).await?;
        Ok(Arc::new(Self {
            db,
            enforcer: ArcSwap::from_pointee(enforcer),
            version: AtomicI64::new(version),
            reloading: tokio::sync::Mutex::new(()),
            changed: tokio::sync::watch::Sender::new(version),
        }))
    }

    /// Rebuilds the enforcer if the stored policy version moved forward. Returns whether it did.
    pub async fn refresh(&self) -> Result<bool, AccessError> {
        let _one_at_a_time = self.reloading.lock().await;
        let version = current_version(&self.db).await?;
        if version <= self.version.load(Ordering::Acquire) {
            return Ok(false);
        }
        // Rules read after the version: they are at least as new as it, so the pair never goes backwards.
        let enforcer = build(&self.db).await?;
        self.enforcer.store(Arc::new(enforcer));
        self.version.store(version, Ordering::Release);
        self.changed.send_replace(version);
        Ok(true)
    }

    /// Notified after every policy rebuild on this replica.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<i64> {
        self.changed.subscribe()
    }

    pub fn spawn_poller(self: &Arc<Self>, stop: CancellationToken) {
        let this = Arc::clone(self);
        crate::persistence::db::spawn_poller("access policy", POLL_INTERVAL, stop, move || {
            let this = Arc::clone(&this);
            async move { this.refresh().await.map(|_| ()) }
        });
    }

    /// Which scopes `subject` may `action` `object` in, from its grants.
    pub fn visibility(&self, subject: &str, object: &str, action: &str) -> crate::authz::visibility::Visibility {
        use casbin::MgmtApi as _;
        let enforcer = self.enforcer.load();
        let mut sites = std::collections::BTreeSet::new();
        let mut wards = std::collections::BTreeSet::new();
        for grant in enforcer.get_filtered_grouping_policy(0, vec![subject.to_owned()]) {
            let Some(scope) = grant.get(2) else { continue };
            if !enforcer
                .enforce((subject, scope.as_str(), object, action))
                .unwrap_or(false)
            {
                continue;
            }
            match scope.split_once('/') {
                _ if scope == "*" => return crate::authz::visibility::Visibility::All,
                Some((site, ward)) => {
                    wards.insert((site.to_owned(), ward.to_owned()));
                }
                None => {
                    sites.insert(scope.clone());
                }
            }
        }
        crate::authz::visibility::Visibility::Scopes { sites, wards }
    }

    /// Explains a decision: the grant that allows it, or every grant the subject holds when none does.
    pub fn explain(&self, subject: &str, scope: &str, object: &str, action: &str) -> (bool, String) {
        use casbin::MgmtApi as _;
        let enforcer = self.enforcer.load();
        let grants = enforcer.get_filtered_grouping_policy(0, vec![subject.to_owned()]);
        if let Some(allowing) = self.allowing_scope(subject, scope, object, action) {
            let role_grants = |role: &str| {
                enforcer.get_filtered_policy(0, vec![role.to_owned()]).iter().any(|p| {
                    matches!(p.get(1).map(String::as_str), Some("*") | None) || p.get(1).is_some_and(|o| o == object)
                }) && enforcer.get_filtered_policy(0, vec![role.to_owned()]).iter().any(|p| {
                    (p.get(1).is_some_and(|o| o == "*" || o == object))
                        && (p.get(2).is_some_and(|a| a == "*" || a == action))
                })
            };
            let roles: Vec<String> = grants
                .iter()
                .filter(|g| g.get(2) == Some(&allowing))
                .filter_map(|g| g.get(1).cloned())
                .filter(|role| role_grants(role))
                .collect();
            return (
                true,
                format!(
                    "allowed: {subject} holds {} on scope {allowing}, which covers {scope}",
                    roles.join(", ")
                ),
            );
        }
        let held: Vec<String> = grants
            .iter()
            .map(|g| {
                format!(
                    "{} on {}",
                    g.get(1).cloned().unwrap_or_default(),
                    g.get(2).cloned().unwrap_or_default()
                )
            })
            .collect();
        let held = if held.is_empty() {
            "no roles".to_owned()
        } else {
            held.join(", ")
        };
        (
            false,
            format!(
                "denied: no role of {subject} grants {object}:{action} on {scope} or a scope covering it ({subject} \
                 holds {held}); deny by default"
            ),
        )
    }

    /// The covering scope whose grant allows `subject` to `action` `object` in `scope`, if any.
    pub fn allowing_scope(&self, subject: &str, scope: &str, object: &str, action: &str) -> Option<String> {
        let enforcer = self.enforcer.load();
        covering_scopes(scope).into_iter().find(|dom| {
            enforcer
                .enforce((subject, dom.as_str(), object, action))
                .unwrap_or_else(|error| {
                    tracing::error!(%error, "policy evaluation failed; denying");
                    false
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_cover_their_wards() {
        assert_eq!(covering_scopes("stmarys/icu"), ["stmarys/icu", "stmarys", "*"]);
        assert_eq!(covering_scopes("stmarys"), ["stmarys", "*"]);
        assert_eq!(covering_scopes("*"), ["*"]);
    }

    #[tokio::test]
    async fn model_grants_by_scope() {
        use casbin::MgmtApi as _;
        let model = DefaultModel::from_str(MODEL).await.unwrap();
        let mut e = CachedEnforcer::new(model, casbin::MemoryAdapter::default())
            .await
            .unwrap();
        e.add_policy(vec!["biomed".into(), "device".into(), "read".into()])
            .await
            .unwrap();
        e.add_grouping_policy(vec!["medfleet://user/bob".into(), "biomed".into(), "stmarys".into()])
            .await
            .unwrap();
        assert!(e.enforce(("medfleet://user/bob", "stmarys", "device", "read")).unwrap());
        assert!(!e.enforce(("medfleet://user/bob", "stjohns", "device", "read")).unwrap());
        assert!(
            !e.enforce(("medfleet://user/bob", "stmarys", "device", "update"))
                .unwrap()
        );
    }
}

/// A role grant: `subject` holds `role` within `scope`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub subject: String,
    pub role: String,
    pub scope: String,
}

/// Validates a scope: `*`, `<site>` or `<site>/<ward>`.
pub fn check_scope(scope: &str) -> Result<(), String> {
    if scope == "*" {
        return Ok(());
    }
    let mut parts = scope.split('/');
    let ok = match (parts.next(), parts.next(), parts.next()) {
        (Some(site), None, None) => medfleet_core::validation::check_slug(site).is_ok(),
        (Some(site), Some(ward), None) => {
            medfleet_core::validation::check_slug(site).is_ok() && medfleet_core::validation::check_slug(ward).is_ok()
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{}' is not a scope; use *, SITE or SITE/WARD",
            medfleet_core::validation::printable(scope)
        ))
    }
}

/// Bumps the policy version inside the caller's transaction so every replica reloads.
pub async fn bump_version(txn: &impl ConnectionTrait) -> Result<(), sea_orm::DbErr> {
    policy_version::Entity::update_many()
        .col_expr(
            policy_version::Column::Version,
            sea_orm::sea_query::ExprTrait::add(sea_orm::sea_query::Expr::col(policy_version::Column::Version), 1),
        )
        .filter(policy_version::Column::Id.eq(1))
        .exec(txn)
        .await?;
    Ok(())
}

/// Adds a grant inside the caller's transaction; `false` if it already existed.
pub async fn insert_grant(txn: &impl ConnectionTrait, grant: &Grant) -> Result<bool, sea_orm::DbErr> {
    let exists = casbin_rule::Entity::find()
        .filter(casbin_rule::Column::Ptype.eq("g"))
        .filter(casbin_rule::Column::V0.eq(&grant.subject))
        .filter(casbin_rule::Column::V1.eq(&grant.role))
        .filter(casbin_rule::Column::V2.eq(&grant.scope))
        .one(txn)
        .await?
        .is_some();
    if exists {
        return Ok(false);
    }
    casbin_rule::Entity::insert(row(
        "g",
        &[grant.subject.clone(), grant.role.clone(), grant.scope.clone()],
    ))
    .exec(txn)
    .await?;
    bump_version(txn).await?;
    Ok(true)
}

/// Removes a grant inside the caller's transaction; `false` if there was none.
pub async fn delete_grant(txn: &impl ConnectionTrait, grant: &Grant) -> Result<bool, sea_orm::DbErr> {
    let removed = delete_matching(
        txn,
        "g",
        0,
        &[grant.subject.clone(), grant.role.clone(), grant.scope.clone()],
        true,
    )
    .await?;
    if removed > 0 {
        bump_version(txn).await?;
    }
    Ok(removed > 0)
}

/// Grants, optionally of one subject, in a stable order.
pub async fn list_grants(db: &impl ConnectionTrait, subject: Option<&str>) -> Result<Vec<Grant>, sea_orm::DbErr> {
    let mut query = casbin_rule::Entity::find().filter(casbin_rule::Column::Ptype.eq("g"));
    if let Some(subject) = subject {
        query = query.filter(casbin_rule::Column::V0.eq(subject));
    }
    Ok(query
        .order_by_asc(casbin_rule::Column::V0)
        .order_by_asc(casbin_rule::Column::V2)
        .order_by_asc(casbin_rule::Column::V1)
        .all(db)
        .await?
        .into_iter()
        .map(|r| Grant {
            subject: r.v0,
            role: r.v1,
            scope: r.v2,
        })
        .collect())
}

/// A role's permission: `role` may `action` `object`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    pub role: String,
    pub object: String,
    pub action: String,
}

/// Objects and actions a permission may name (`*` for all).
pub const OBJECTS: &[&str] = &[
    "*",
    "site",
    "ward",
    "device",
    "enrollment",
    "credential",
    "access",
    "audit",
    "config",
    "config_schema",
    "patient",
    "association",
    "observation",
    "emr_destination",
    "feed",
    "firmware",
    "firmware_trust",
    "rollout",
];
pub const ACTIONS: &[&str] = &[
    "*",
    "read",
    "create",
    "update",
    "revoke",
    "decommission",
    "validate",
    "subscribe",
    "retry",
    "upload",
    "delete",
    "control",
    "approve",
];

fn p_values(p: &Permission) -> [String; 3] {
    [p.role.clone(), p.object.clone(), p.action.clone()]
}

/// Adds a permission inside the caller's transaction; `false` if it existed.
pub async fn insert_permission(txn: &impl ConnectionTrait, permission: &Permission) -> Result<bool, sea_orm::DbErr> {
    let exists = casbin_rule::Entity::find()
        .filter(casbin_rule::Column::Ptype.eq("p"))
        .filter(casbin_rule::Column::V0.eq(&permission.role))
        .filter(casbin_rule::Column::V1.eq(&permission.object))
        .filter(casbin_rule::Column::V2.eq(&permission.action))
        .one(txn)
        .await?
        .is_some();
    if exists {
        return Ok(false);
    }
    casbin_rule::Entity::insert(row("p", &p_values(permission)))
        .exec(txn)
        .await?;
    bump_version(txn).await?;
    Ok(true)
}

/// Removes a permission inside the caller's transaction; `false` if there was none.
pub async fn delete_permission(txn: &impl ConnectionTrait, permission: &Permission) -> Result<bool, sea_orm::DbErr> {
    let removed = delete_matching(txn, "p", 0, &p_values(permission), true).await?;
    if removed > 0 {
        bump_version(txn).await?;
    }
    Ok(removed > 0)
}

pub async fn list_permissions(
    db: &impl ConnectionTrait,
    role: Option<&str>,
) -> Result<Vec<Permission>, sea_orm::DbErr> {
    let mut query = casbin_rule::Entity::find().filter(casbin_rule::Column::Ptype.eq("p"));
    if let Some(role) = role {
        query = query.filter(casbin_rule::Column::V0.eq(role));
    }
    Ok(query
        .order_by_asc(casbin_rule::Column::V0)
        .order_by_asc(casbin_rule::Column::V1)
        .order_by_asc(casbin_rule::Column::V2)
        .all(db)
        .await?
        .into_iter()
        .map(|r| Permission {
            role: r.v0,
            object: r.v1,
            action: r.v2,
        })
        .collect())
}

/// Roles that exist in the policy (have at least one permission).
pub async fn known_roles(db: &impl ConnectionTrait) -> Result<Vec<String>, sea_orm::DbErr> {
    let mut roles: Vec<String> = casbin_rule::Entity::find()
        .filter(casbin_rule::Column::Ptype.eq("p"))
        .all(db)
        .await?
        .into_iter()
        .map(|r| r.v0)
        .collect();
    roles.sort();
    roles.dedup();
    Ok(roles)
}
