//! Deciding one request against its rule in [`RULES`] (the table lives in `rules.rs`): a method that is not in it is
//! refused (deny by default), and a test here fails if any method of the proto has no rule.
//!
//! Scopes come from the request (a site or ward named in it) or from the stored resource it targets (the ward a
//! device stands in), resolved here before any handler runs. A caller who may not read a resource is told it does
//! not exist, so scopes cannot be probed.

use std::collections::BTreeSet;

use medfleet_core::identity::Identity;
use medfleet_proto::v1;
use sea_orm::{DatabaseConnection, EntityTrait as _};
use tonic::Status;
use uuid::Uuid;

use crate::authz::access::Access;
use crate::authz::rules::decode;
pub use crate::authz::rules::{RULES, Rule, Target, rule_for};
use crate::authz::visibility::Visibility;
use crate::persistence::entity::{config_version, device};
use medfleet_core::validation::printable;

/// What the caller of a listing may see, as the RPC layer decided; nothing if it decided nothing (never the case
/// for a listing, whose rule always yields a visibility).
pub fn visibility<T>(request: &tonic::Request<T>) -> Visibility {
    request
        .extensions()
        .get::<Decision>()
        .and_then(|d| d.visibility.clone())
        .unwrap_or(Visibility::Scopes {
            sites: BTreeSet::new(),
            wards: BTreeSet::new(),
        })
}

/// Resolves, with the PERMISSION_DENIED to end a long-lived stream with, once a policy change leaves `subject`
/// without what `still` requires of its `object:action` visibility. A stream (a PHI feed, a device watch) checked
/// at open would otherwise go on for days after its caller's role was revoked.
pub async fn access_withdrawn(
    access: &Access,
    subject: &str,
    object: &str,
    action: &str,
    still: impl Fn(&Visibility) -> bool,
) -> Status {
    let mut changes = access.changes();
    loop {
        if changes.changed().await.is_err() {
            // No more rebuilds on this replica (shutting down): nothing will ever withdraw access.
            return std::future::pending().await;
        }
        if !still(&access.visibility(subject, object, action)) {
            // A refusal like any other: the trail shows when a revoked reader stopped reading. At most once per
            // open stream, and only after an administrator's policy change.
            let event = crate::audit::Event {
                actor: subject.to_owned(),
                action: format!("{object}.{action}"),
                target: "stream".to_owned(),
                scope: "*".to_owned(),
                outcome: crate::audit::Outcome::Denied,
                request_id: String::new(),
                detail: format!("open stream closed: permission {object}:{action} withdrawn"),
            };
            let recorded = match crate::persistence::db::begin_write(access.db()).await {
                Ok(txn) => match crate::audit::append(&txn, &event).await {
                    Ok(()) => txn.commit().await,
                    Err(error) => Err(error),
                },
                Err(error) => Err(error),
            };
            if let Err(error) = recorded {
                tracing::warn!(%error, "could not audit a stream closed by a policy change");
            }
            return Status::permission_denied(format!(
                "{subject}'s permission {object}:{action} was withdrawn while this stream was open; it is closed \
                 (ask an administrator if you still need it)"
            ));
        }
    }
}

fn scope_of(site: &str, ward: &str) -> String {
    if site.is_empty() && ward.is_empty() {
        "*".to_owned()
    } else {
        format!("{site}/{ward}")
    }
}

/// The outcome of an allowed request: for listings, what the caller may see.
#[derive(Debug, Clone, Default)]
pub struct Decision {
    pub visibility: Option<Visibility>,
    /// The scope the decision was made on (for the audit trail).
    pub scope: String,
}

/// A refused request: the status to answer with and the scope it was refused on (for the audit trail).
#[derive(Debug)]
pub struct Refusal {
    pub status: Status,
    pub scope: String,
}

/// Decides a permission rule for an authenticated user or service. `body` is the request message (unary RPCs).
pub async fn decide(
    access: &Access,
    db: &DatabaseConnection,
    identity: &Identity,
    object: &'static str,
    action: &'static str,
    target: Target,
    body: &[u8],
) -> Result<Decision, Refusal> {
    let judge = Judge {
        access,
        identity,
        subject: identity.to_string(),
        object,
        action,
    };
    let subject = judge.subject.as_str();
    match target {
        Target::Global => judge.single("*".to_owned(), false),
        Target::Site(extract) => judge.single(extract(body).unwrap_or_default(), true),
        Target::Ward(extract) => {
            let (site, ward) = extract(body).unwrap_or_default();
            judge.single(scope_of(&site, &ward), true)
        }
        Target::NewDevice => {
            let location = decode::<v1::RegisterDeviceRequest>(body).and_then(|r| r.location);
            judge.single(location_scope(location.as_ref()), true)
        }
        Target::Device(extract) => {
            let scope = stored_device_scope(access, db, subject, extract(body).as_deref()).await?;
            judge.all(BTreeSet::from([scope]), None)
        }
        Target::DeviceUpdate => {
            let request = decode::<v1::UpdateDeviceRequest>(body).unwrap_or_default();
            let device = request.device.unwrap_or_default();
            let scope = stored_device_scope(access, db, subject, Some(&device.id)).await?;
            judge.require(&scope, object, action)?;
            // A move needs the permission where the device goes as well as where it stands.
            if request
                .update_mask
                .is_some_and(|m| m.paths.iter().any(|p| p == "location"))
            {
                judge.require(&location_scope(device.location.as_ref()), object, action)?;
            }
            Ok(Decision {
                visibility: None,
                scope,
            })
        }
        Target::Import => {
            let request = decode::<v1::ImportDevicesRequest>(body).unwrap_or_default();
            let scopes = request
                .devices
                .iter()
                .map(|d| location_scope(d.location.as_ref()))
                .collect();
            judge.all(scopes, request.issue_tokens.then_some(("enrollment", "create")))
        }
        Target::ConfigLayer(extract) => {
            let scope = match extract(body) {
                None => "*".to_owned(),
                Some(layer) => layer_scope(access, db, subject, &layer).await?,
            };
            judge.all(BTreeSet::from([scope]), None)
        }
        Target::ConfigVersions(extract) => {
            let scopes = version_scopes(access, db, subject, extract(body)).await?;
            judge.all(scopes, None)
        }
        Target::List => judge.list(),
        Target::Rollout(extract) => {
            let (scopes, exists) = rollout_scopes(db, extract(body).as_deref()).await?;
            // The rollout's places were checked; what a command does next (a rollback's new rollout) is bounded by
            // the caller's own scopes, carried as the visibility, since devices may have moved since.
            let decided = judge.all(scopes, None).map(|decision| Decision {
                visibility: Some(judge.access.visibility(&judge.subject, judge.object, judge.action)),
                ..decision
            });
            match decided {
                Err(refusal) if action == "read" && exists => Err(Refusal {
                    status: Status::not_found("rollout does not exist (medfleet rollouts list)"),
                    scope: refusal.scope,
                }),
                other => other,
            }
        }
    }
}

/// The places a stored rollout's devices were in. A rollout that does not exist (or an unparsable id) is left to
/// the handler under scope `*`, so only fleet-wide roles learn that it is missing.
async fn rollout_scopes(db: &DatabaseConnection, id: Option<&str>) -> Result<(BTreeSet<String>, bool), Refusal> {
    let fleet = || BTreeSet::from(["*".to_owned()]);
    let Some(id) = id.and_then(|id| Uuid::parse_str(id).ok()) else {
        return Ok((fleet(), false));
    };
    let row = crate::persistence::entity::rollout::Entity::find_by_id(id)
        .one(db)
        .await
        .map_err(|e| Refusal {
            status: Status::from(crate::error::Error::from(e)),
            scope: String::new(),
        })?;
    Ok(row.map_or_else(
        || (fleet(), false),
        |r| {
            (
                serde_json::from_str::<BTreeSet<String>>(&r.scopes).unwrap_or_else(|_| fleet()),
                true,
            )
        },
    ))
}

/// One caller's request for one permission, judged against scopes.
struct Judge<'a> {
    access: &'a Access,
    identity: &'a Identity,
    subject: String,
    object: &'static str,
    action: &'static str,
}

impl Judge<'_> {
    fn require(&self, scope: &str, object: &str, action: &str) -> Result<(), Refusal> {
        if self
            .access
            .allowing_scope(&self.subject, scope, object, action)
            .is_some()
        {
            return Ok(());
        }
        Err(Refusal {
            status: Status::permission_denied(format!(
                "{} lacks permission {object}:{action} on scope {}; ask an administrator for a role that \
                 grants it (medfleet access grant)",
                self.identity,
                printable(scope)
            )),
            scope: scope.to_owned(),
        })
    }

    /// A read of a site or ward outside the caller's scopes is answered as if it did not exist (nothing to
    /// probe); fleet-wide reads (access, audit) are plainly refused.
    fn single(&self, scope: String, hide: bool) -> Result<Decision, Refusal> {
        match self.require(&scope, self.object, self.action) {
            Err(refusal) if hide && self.action == "read" => Err(Refusal {
                status: Status::not_found(format!("{} {} does not exist", self.object, printable(&scope))),
                scope: refusal.scope,
            }),
            Err(refusal) => Err(refusal),
            Ok(()) => Ok(Decision {
                visibility: None,
                scope,
            }),
        }
    }

    /// Every scope a request touches must allow the permission (and `also`, when given). A request that names
    /// no scope (or did not decode) is judged fleet-wide, never waved through.
    fn all(&self, mut scopes: BTreeSet<String>, also: Option<(&str, &str)>) -> Result<Decision, Refusal> {
        if scopes.is_empty() {
            scopes.insert("*".to_owned());
        }
        for scope in &scopes {
            self.require(scope, self.object, self.action)?;
            if let Some((object, action)) = also {
                self.require(scope, object, action)?;
            }
        }
        Ok(Decision {
            visibility: None,
            scope: scopes.into_iter().collect::<Vec<_>>().join(","),
        })
    }

    /// A listing is filtered to what the caller sees; one who sees nothing at all is refused.
    fn list(&self) -> Result<Decision, Refusal> {
        let visibility = self.access.visibility(&self.subject, self.object, self.action);
        if visibility
            == (Visibility::Scopes {
                sites: BTreeSet::new(),
                wards: BTreeSet::new(),
            })
        {
            return Err(Refusal {
                status: Status::permission_denied(format!(
                    "{} lacks permission {}:{} on any scope; ask an administrator for a role that grants it \
                     (medfleet access grant)",
                    self.identity, self.object, self.action
                )),
                scope: "*".to_owned(),
            });
        }
        Ok(Decision {
            visibility: Some(visibility),
            scope: "*".to_owned(),
        })
    }
}

fn location_scope(location: Option<&v1::Location>) -> String {
    location.map_or_else(|| "*".to_owned(), |l| scope_of(&l.site, &l.ward))
}

/// The scopes of the layers the given configuration versions belong to. A version that does not exist is left
/// to the handler (NOT_FOUND) under scope `*`.
async fn version_scopes(
    access: &Access,
    db: &DatabaseConnection,
    subject: &str,
    versions: Vec<u64>,
) -> Result<BTreeSet<String>, Refusal> {
    let mut scopes = BTreeSet::new();
    for version in versions {
        let Ok(number) = i64::try_from(version) else {
            continue;
        };
        let row = config_version::Entity::find_by_id(number)
            .one(db)
            .await
            .map_err(|e| Refusal {
                status: Status::from(crate::error::Error::from(e)),
                scope: String::new(),
            })?;
        let layer = row.map_or_else(v1::ConfigLayer::default, |r| v1::ConfigLayer {
            kind: wire_kind(&r.layer_kind),
            key: r.layer_key,
        });
        scopes.insert(layer_scope(access, db, subject, &layer).await?);
    }
    Ok(scopes)
}

fn wire_kind(stored: &str) -> i32 {
    match stored {
        "fleet" => v1::ConfigLayerKind::Fleet,
        "model" => v1::ConfigLayerKind::Model,
        "site" => v1::ConfigLayerKind::Site,
        "ward" => v1::ConfigLayerKind::Ward,
        "device" => v1::ConfigLayerKind::Device,
        _ => v1::ConfigLayerKind::Unspecified,
    }
    .into()
}

/// The scope of a configuration layer. Fleet and model layers (and anything malformed, left to the handler's
/// validation) are fleet-wide; a ward key is `site/ward` already.
async fn layer_scope(
    access: &Access,
    db: &DatabaseConnection,
    subject: &str,
    layer: &v1::ConfigLayer,
) -> Result<String, Refusal> {
    match v1::ConfigLayerKind::try_from(layer.kind) {
        Ok(v1::ConfigLayerKind::Site) if !layer.key.is_empty() && !layer.key.contains('/') => Ok(layer.key.clone()),
        Ok(v1::ConfigLayerKind::Ward) if layer.key.split('/').count() == 2 => Ok(layer.key.clone()),
        Ok(v1::ConfigLayerKind::Device) => stored_device_scope(access, db, subject, Some(&layer.key)).await,
        _ => Ok("*".to_owned()),
    }
}

/// The scope of a stored device. A device the caller may not read is reported as missing, exactly like one that
/// does not exist, so device ids cannot be probed across scopes. An unparsable id is left to the handler's
/// validation (scope `*`, so only fleet-wide roles get that far).
async fn stored_device_scope(
    access: &Access,
    db: &DatabaseConnection,
    subject: &str,
    id: Option<&str>,
) -> Result<String, Refusal> {
    let Some(id) = id.and_then(|id| Uuid::parse_str(id).ok()) else {
        return Ok("*".to_owned());
    };
    let missing = |scope: String| Refusal {
        status: Status::not_found(format!("device {id} does not exist")),
        scope,
    };
    let row = device::Entity::find_by_id(id)
        .one(db)
        .await
        .map_err(|e| Refusal {
            status: Status::from(crate::error::Error::from(e)),
            scope: String::new(),
        })?
        .ok_or_else(|| missing(String::new()))?;
    let scope = crate::audit::device_scope(row.site.as_deref(), row.ward.as_deref());
    if access.allowing_scope(subject, &scope, "device", "read").is_none() {
        return Err(missing(scope));
    }
    Ok(scope)
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    /// Deny by default means a new RPC without a rule is unreachable; this makes it a failing test instead of a
    /// surprise.
    #[test]
    fn every_method_in_the_proto_has_a_rule() {
        let fds = prost_types::FileDescriptorSet::decode(medfleet_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = 0;
        for file in &fds.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    assert!(rule_for(&path).is_some(), "{path} has no access rule in rules::RULES");
                    methods += 1;
                }
            }
        }
        assert!(methods >= 20, "the descriptor set looks empty ({methods} methods)");
    }

    /// Admins can edit every permission a rule asks for: nothing is reachable only through the seeds.
    #[test]
    fn every_object_and_action_of_a_rule_is_editable() {
        for (path, rule) in RULES {
            if let Rule::Permission { object, action, .. } = rule {
                assert!(
                    crate::authz::access::OBJECTS.contains(object),
                    "{path}: object {object} is not editable"
                );
                assert!(
                    crate::authz::access::ACTIONS.contains(action),
                    "{path}: action {action} is not editable"
                );
            }
        }
    }

    #[test]
    fn exact_paths_and_service_prefixes() {
        assert!(matches!(
            rule_for("/medfleet.v1.EnrollmentService/Enroll"),
            Some(Rule::Anonymous)
        ));
        assert!(matches!(
            rule_for("/grpc.health.v1.Health/Watch"),
            Some(Rule::AnyIdentity)
        ));
        assert!(rule_for("/medfleet.v1.RegistryService/DropEverything").is_none());
        assert!(rule_for("/medfleet.v1.RegistryService/GetDeviceX").is_none());
    }

    #[test]
    fn targets_are_read_from_the_request() {
        let body = v1::GetWardRequest {
            site: "stmarys".into(),
            name: "icu".into(),
        }
        .encode_to_vec();
        let Some(Rule::Permission {
            target: Target::Ward(extract),
            ..
        }) = rule_for("/medfleet.v1.RegistryService/GetWard")
        else {
            panic!("GetWard is ward-scoped");
        };
        assert_eq!(extract(&body), Some(("stmarys".into(), "icu".into())));
    }

    #[test]
    fn visibility() {
        let v = Visibility::Scopes {
            sites: ["stmarys".to_owned()].into(),
            wards: [("stjohns".to_owned(), "icu".to_owned())].into(),
        };
        assert!(v.sees_site("stmarys") && !v.sees_site("stjohns"));
        assert!(v.sees_ward("stmarys", "ed") && v.sees_ward("stjohns", "icu") && !v.sees_ward("stjohns", "ed"));
    }
}
