//! gRPC handlers of `AccessService`: role grants and explained access checks.

use std::sync::Arc;

use medfleet_core::identity::Identity;
use medfleet_core::validation::Violations;
use medfleet_proto::v1::{self, access_service_server::AccessService};
use sea_orm::DatabaseConnection;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::authz::access::{
    ACTIONS, Access, Grant, OBJECTS, Permission, check_scope, delete_grant, delete_permission, insert_grant,
    insert_permission, known_roles, list_grants, list_permissions,
};
use crate::error::Error;

#[derive(Debug, Clone)]
pub struct AccessApi {
    db: DatabaseConnection,
    access: Arc<Access>,
}

impl AccessApi {
    pub fn new(db: DatabaseConnection, access: Arc<Access>) -> Self {
        Self { db, access }
    }

    async fn grant_from(&self, grant: Option<&v1::RoleGrant>) -> Result<Grant, Error> {
        let grant = grant.ok_or_else(|| Violations::single("grant", "is required"))?;
        let mut v = Violations::new();
        let subject = v.check("grant.principal", principal(&grant.principal));
        v.check("grant.scope", check_scope(&grant.scope));
        let roles = known_roles(&self.db).await?;
        if !roles.contains(&grant.role) {
            v.push(
                "grant.role",
                format!("unknown role '{}'; roles: {}", grant.role, roles.join(", ")),
            );
        }
        v.finish(|| {
            Some(Grant {
                subject: subject?,
                role: grant.role.clone(),
                scope: grant.scope.clone(),
            })
        })
        .map_err(Error::from)
    }

    /// Records a policy change (when there was one) in the audit trail of its transaction, commits it, and applies it
    /// on this replica at once; the others follow within their poll interval.
    async fn commit(
        &self,
        txn: sea_orm::DatabaseTransaction,
        audit: &crate::audit::Context,
        change: Option<(&str, String, String, String)>,
    ) -> Result<(), Error> {
        if let Some((action, target, scope, detail)) = change {
            audit.record(&txn, action, target, scope, detail).await?;
        }
        txn.commit().await?;
        self.apply().await;
        Ok(())
    }

    /// Applies a policy change on this replica at once; the others follow within their poll interval.
    async fn apply(&self) {
        if let Err(error) = self.access.refresh().await {
            tracing::warn!(%error, "reloading the access policy failed; the poller will retry");
        }
    }
}

fn permission_from(permission: Option<&v1::Permission>) -> Result<Permission, Error> {
    let permission = permission.ok_or_else(|| Violations::single("permission", "is required"))?;
    let mut v = Violations::new();
    v.check(
        "permission.role",
        medfleet_core::validation::check_slug(&permission.role.replace('_', "-")),
    );
    if !OBJECTS.contains(&permission.object.as_str()) {
        v.push("permission.object", format!("use one of {}", OBJECTS.join(", ")));
    }
    if !ACTIONS.contains(&permission.action.as_str()) {
        v.push("permission.action", format!("use one of {}", ACTIONS.join(", ")));
    }
    v.finish(|| {
        Some(Permission {
            role: permission.role.clone(),
            object: permission.object.clone(),
            action: permission.action.clone(),
        })
    })
    .map_err(Error::from)
}

/// A principal that can hold roles: a user or a service URI.
fn principal(text: &str) -> Result<String, String> {
    match text.parse::<Identity>() {
        Ok(identity @ (Identity::User(_) | Identity::Service(_))) => Ok(identity.to_string()),
        Ok(Identity::Device(_)) => Err("devices hold no roles; they may act only on themselves".to_owned()),
        Err(e) => Err(format!("use medfleet://user/NAME or medfleet://service/NAME ({e})")),
    }
}

fn to_wire(grant: Grant) -> v1::RoleGrant {
    v1::RoleGrant {
        principal: grant.subject,
        role: grant.role,
        scope: grant.scope,
    }
}

#[tonic::async_trait]
impl AccessService for AccessApi {
    #[instrument(skip_all)]
    async fn grant(&self, request: Request<v1::GrantRequest>) -> Result<Response<v1::GrantResponse>, Status> {
        let grant = self.grant_from(request.get_ref().grant.as_ref()).await?;
        let txn = crate::persistence::db::begin_write(&self.db)
            .await
            .map_err(Error::from)?;
        let changed = insert_grant(&txn, &grant).await.map_err(Error::from)?;
        let change = (
            "access.grant",
            grant.subject.clone(),
            grant.scope.clone(),
            grant.role.clone(),
        );
        self.commit(
            txn,
            &crate::transport::rpc::audit_context(&request),
            changed.then_some(change),
        )
        .await?;
        tracing::info!(subject = %grant.subject, role = %grant.role, scope = %grant.scope, changed, "role granted");
        Ok(Response::new(v1::GrantResponse { changed }))
    }

    #[instrument(skip_all)]
    async fn revoke(&self, request: Request<v1::GrantRequest>) -> Result<Response<v1::GrantResponse>, Status> {
        let grant = self.grant_from(request.get_ref().grant.as_ref()).await?;
        let txn = crate::persistence::db::begin_write(&self.db)
            .await
            .map_err(Error::from)?;
        if !delete_grant(&txn, &grant).await.map_err(Error::from)? {
            return Err(Error::NotFound(format!(
                "{} does not hold {} on {}",
                grant.subject, grant.role, grant.scope
            ))
            .into());
        }
        let change = (
            "access.revoke",
            grant.subject.clone(),
            grant.scope.clone(),
            grant.role.clone(),
        );
        self.commit(txn, &crate::transport::rpc::audit_context(&request), Some(change))
            .await?;
        tracing::info!(subject = %grant.subject, role = %grant.role, scope = %grant.scope, "role revoked");
        Ok(Response::new(v1::GrantResponse { changed: true }))
    }

    #[instrument(skip_all)]
    async fn list_grants(
        &self,
        request: Request<v1::ListGrantsRequest>,
    ) -> Result<Response<v1::ListGrantsResponse>, Status> {
        let filter = &request.get_ref().principal;
        let subject = if filter.is_empty() {
            None
        } else {
            Some(principal(filter).map_err(|e| Error::from(Violations::single("principal", e)))?)
        };
        let grants = list_grants(&self.db, subject.as_deref()).await.map_err(Error::from)?;
        Ok(Response::new(v1::ListGrantsResponse {
            grants: grants.into_iter().map(to_wire).collect(),
        }))
    }

    #[instrument(skip_all)]
    async fn list_permissions(
        &self,
        request: Request<v1::ListPermissionsRequest>,
    ) -> Result<Response<v1::ListPermissionsResponse>, Status> {
        let role = &request.get_ref().role;
        let permissions = list_permissions(&self.db, (!role.is_empty()).then_some(role.as_str()))
            .await
            .map_err(Error::from)?;
        Ok(Response::new(v1::ListPermissionsResponse {
            permissions: permissions
                .into_iter()
                .map(|p| v1::Permission {
                    role: p.role,
                    object: p.object,
                    action: p.action,
                })
                .collect(),
        }))
    }

    #[instrument(skip_all)]
    async fn add_permission(
        &self,
        request: Request<v1::PermissionRequest>,
    ) -> Result<Response<v1::GrantResponse>, Status> {
        let permission = permission_from(request.get_ref().permission.as_ref())?;
        let txn = crate::persistence::db::begin_write(&self.db)
            .await
            .map_err(Error::from)?;
        let changed = insert_permission(&txn, &permission).await.map_err(Error::from)?;
        let change = (
            "access.permission.add",
            format!("role/{}", permission.role),
            "*".to_owned(),
            format!("{}:{}", permission.object, permission.action),
        );
        self.commit(
            txn,
            &crate::transport::rpc::audit_context(&request),
            changed.then_some(change),
        )
        .await?;
        Ok(Response::new(v1::GrantResponse { changed }))
    }

    #[instrument(skip_all)]
    async fn remove_permission(
        &self,
        request: Request<v1::PermissionRequest>,
    ) -> Result<Response<v1::GrantResponse>, Status> {
        let permission = permission_from(request.get_ref().permission.as_ref())?;
        let txn = crate::persistence::db::begin_write(&self.db)
            .await
            .map_err(Error::from)?;
        if !delete_permission(&txn, &permission).await.map_err(Error::from)? {
            return Err(Error::NotFound(format!(
                "role {} has no permission {}:{}",
                permission.role, permission.object, permission.action
            ))
            .into());
        }
        let change = (
            "access.permission.remove",
            format!("role/{}", permission.role),
            "*".to_owned(),
            format!("{}:{}", permission.object, permission.action),
        );
        self.commit(txn, &crate::transport::rpc::audit_context(&request), Some(change))
            .await?;
        Ok(Response::new(v1::GrantResponse { changed: true }))
    }

    #[instrument(skip_all)]
    async fn check(&self, request: Request<v1::CheckRequest>) -> Result<Response<v1::CheckResponse>, Status> {
        let r = request.get_ref();
        let mut v = Violations::new();
        let subject = v.check("principal", principal(&r.principal));
        v.check("scope", check_scope(&r.scope));
        if r.object.is_empty() {
            v.push("object", "is required, e.g. device");
        }
        if r.action.is_empty() {
            v.push("action", "is required, e.g. update");
        }
        let subject = v.finish(|| subject).map_err(Error::from)?;
        let (allowed, explanation) = self.access.explain(&subject, &r.scope, &r.object, &r.action);
        Ok(Response::new(v1::CheckResponse { allowed, explanation }))
    }
}
