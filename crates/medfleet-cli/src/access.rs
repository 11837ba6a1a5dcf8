//! `medfleet access`: grant, revoke, list and explain role-based access.

use clap::Subcommand;
use medfleet_proto::v1::{self, access_service_client::AccessServiceClient};
use serde::Serialize;
use tonic::transport::Channel;

use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub(crate) enum AccessCommand {
    /// Grant a role to a user (NAME) or service (service:NAME) within a scope (*, SITE or SITE/WARD).
    #[command(
        after_help = "Examples:\n  medfleet access grant alice biomed --scope stmarys/icu\n  \
                            medfleet access grant service:epic-bridge emr_system --scope stmarys\n\n\
                            Roles: admin, it_provisioner, biomed, clinician, emr_system, auditor."
    )]
    Grant {
        principal: String,
        role: String,
        #[arg(long, default_value = "*")]
        scope: String,
    },
    /// Remove a grant.
    #[command(after_help = "Example:\n  medfleet access revoke alice biomed --scope stmarys/icu")]
    Revoke {
        principal: String,
        role: String,
        #[arg(long, default_value = "*")]
        scope: String,
    },
    /// List grants, of everyone or of one principal.
    #[command(after_help = "Example:\n  medfleet access list alice -o json")]
    List { principal: Option<String> },
    /// Show what each role may do (or one role).
    #[command(after_help = "Example:\n  medfleet access permissions biomed")]
    Permissions { role: Option<String> },
    /// Let a role perform an action on an object (admins edit the seeded roles or define new ones).
    #[command(after_help = "Example:\n  medfleet access allow biomed update device")]
    Allow {
        role: String,
        action: String,
        object: String,
    },
    /// Take a permission away from a role.
    #[command(after_help = "Example:\n  medfleet access disallow biomed update device")]
    Disallow {
        role: String,
        action: String,
        object: String,
    },
    /// Explain whether a principal may perform an action on an object in a scope.
    #[command(after_help = "Example:\n  medfleet access check alice update device --scope stmarys/icu")]
    Check {
        principal: String,
        action: String,
        object: String,
        #[arg(long, default_value = "*")]
        scope: String,
    },
}

/// `alice` → a user, `service:epic` → a service, a full `medfleet://…` URI as is.
fn principal(text: &str) -> String {
    if text.starts_with("medfleet://") {
        text.to_owned()
    } else if let Some(name) = text.strip_prefix("service:") {
        format!("medfleet://service/{name}")
    } else {
        format!("medfleet://user/{}", text.strip_prefix("user:").unwrap_or(text))
    }
}

#[derive(Debug, Serialize)]
struct GrantView {
    principal: String,
    role: String,
    scope: String,
}

pub(crate) async fn run(channel: Channel, command: &AccessCommand, out: Format) -> anyhow::Result<()> {
    let mut api = AccessServiceClient::new(channel);
    let grant = |principal_text: &str, role: &str, scope: &str| v1::GrantRequest {
        grant: Some(v1::RoleGrant {
            principal: principal(principal_text),
            role: role.to_owned(),
            scope: scope.to_owned(),
        }),
    };
    match command {
        AccessCommand::Grant {
            principal: p,
            role,
            scope,
        } => {
            let changed = api.grant(grant(p, role, scope)).await?.into_inner().changed;
            if out == Format::Json {
                return output::json(&serde_json::json!({ "changed": changed }));
            }
            if changed {
                println!("{} now holds {role} on {scope}", principal(p));
            } else {
                println!("{} already held {role} on {scope}; nothing changed", principal(p));
            }
            Ok(())
        }
        AccessCommand::Revoke {
            principal: p,
            role,
            scope,
        } => {
            api.revoke(grant(p, role, scope)).await?;
            if out == Format::Json {
                return output::json(&serde_json::json!({ "changed": true }));
            }
            println!("{} no longer holds {role} on {scope}", principal(p));
            Ok(())
        }
        AccessCommand::List { principal: p } => {
            let grants = api
                .list_grants(v1::ListGrantsRequest {
                    principal: p.as_deref().map(principal).unwrap_or_default(),
                })
                .await?
                .into_inner()
                .grants;
            let views: Vec<GrantView> = grants
                .into_iter()
                .map(|g| GrantView {
                    principal: g.principal,
                    role: g.role,
                    scope: g.scope,
                })
                .collect();
            if out == Format::Json {
                return output::json(&views);
            }
            let mut table = output::table(&["PRINCIPAL", "ROLE", "SCOPE"]);
            for g in &views {
                table.add_row(vec![g.principal.as_str(), g.role.as_str(), g.scope.as_str()]);
            }
            println!("{table}");
            Ok(())
        }
        AccessCommand::Permissions { role } => {
            let permissions = api
                .list_permissions(v1::ListPermissionsRequest {
                    role: role.clone().unwrap_or_default(),
                })
                .await?
                .into_inner()
                .permissions;
            let rows: Vec<serde_json::Value> = permissions
                .iter()
                .map(|p| serde_json::json!({ "role": p.role, "action": p.action, "object": p.object }))
                .collect();
            if out == Format::Json {
                return output::json(&rows);
            }
            let mut table = output::table(&["ROLE", "ACTION", "OBJECT"]);
            for p in &permissions {
                table.add_row(vec![p.role.as_str(), p.action.as_str(), p.object.as_str()]);
            }
            println!("{table}");
            Ok(())
        }
        AccessCommand::Allow { role, action, object } | AccessCommand::Disallow { role, action, object } => {
            let request = v1::PermissionRequest {
                permission: Some(v1::Permission {
                    role: role.clone(),
                    object: object.clone(),
                    action: action.clone(),
                }),
            };
            let allow = matches!(command, AccessCommand::Allow { .. });
            let changed = if allow {
                api.add_permission(request).await?.into_inner().changed
            } else {
                api.remove_permission(request).await?.into_inner().changed
            };
            if out == Format::Json {
                return output::json(&serde_json::json!({ "changed": changed }));
            }
            let verb = if allow { "may now" } else { "may no longer" };
            println!("role {role} {verb} {action} {object}");
            Ok(())
        }
        AccessCommand::Check {
            principal: p,
            action,
            object,
            scope,
        } => {
            let answer = api
                .check(v1::CheckRequest {
                    principal: principal(p),
                    object: object.clone(),
                    action: action.clone(),
                    scope: scope.clone(),
                })
                .await?
                .into_inner();
            if out == Format::Json {
                return output::json(
                    &serde_json::json!({ "allowed": answer.allowed, "explanation": answer.explanation }),
                );
            }
            println!("{}", answer.explanation);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals() {
        assert_eq!(principal("alice"), "medfleet://user/alice");
        assert_eq!(principal("user:alice"), "medfleet://user/alice");
        assert_eq!(principal("service:epic"), "medfleet://service/epic");
        assert_eq!(principal("medfleet://service/epic"), "medfleet://service/epic");
    }
}
