//! The permission table: which rule every RPC of the proto falls under, and where its scope is read from. A
//! method that is not in [`RULES`] is refused (deny by default); `policy` decides a rule for one request.

use medfleet_proto::v1;

/// What the scope of a request is taken from.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// Fleet-wide: scope `*`.
    Global,
    /// A site named in the request.
    Site(fn(&[u8]) -> Option<String>),
    /// A ward named in the request.
    Ward(fn(&[u8]) -> Option<(String, String)>),
    /// A stored device named by id in the request; its location is the scope.
    Device(fn(&[u8]) -> Option<String>),
    /// A device being registered: its requested location (storage is `*`).
    NewDevice,
    /// Devices being imported: every row's location, plus `enrollment:create` when tokens are issued.
    Import,
    /// A device update: the device's scope, and the new location's scope when it moves.
    DeviceUpdate,
    /// A listing: the caller sees what its grants cover.
    List,
    /// A configuration layer named in the request: `*` for fleet and model layers, the site, the ward, or the
    /// stored device's scope. No layer (a fleet-wide listing) is `*`.
    ConfigLayer(fn(&[u8]) -> Option<v1::ConfigLayer>),
    /// Stored configuration versions named in the request: each version's layer scope must be allowed.
    ConfigVersions(fn(&[u8]) -> Vec<u64>),
    /// A stored rollout named by id in the request: every place its devices were in must be allowed (a reader
    /// who may not see one of them is told the rollout does not exist).
    Rollout(fn(&[u8]) -> Option<String>),
}

impl Target {
    /// Whether deciding needs the request message. Those that do not are decided before the body is read, so a
    /// client-streaming upload is never buffered by the RPC layer.
    pub fn reads_body(&self) -> bool {
        !matches!(self, Self::Global | Self::List)
    }
}

/// Who may call a method.
#[derive(Debug, Clone, Copy)]
pub enum Rule {
    /// No client certificate needed (enrollment: the one-time token is the credential).
    Anonymous,
    /// Any authenticated principal, for itself (health, reflection, renewing one's own certificate).
    AnyIdentity,
    /// Devices only; the handler matches the request's claims against the certificate.
    Devices,
    /// Devices (the handler limits them to what is assigned to them), or users and services holding
    /// `object:action` fleet-wide.
    DevicesOrPermission { object: &'static str, action: &'static str },
    /// Users and services holding `object:action` on the target's scope through a role grant.
    Permission {
        object: &'static str,
        action: &'static str,
        target: Target,
    },
}

const fn permission(object: &'static str, action: &'static str, target: Target) -> Rule {
    Rule::Permission { object, action, target }
}

pub(crate) fn decode<M: prost::Message + Default>(body: &[u8]) -> Option<M> {
    M::decode(body).ok()
}

/// Every method medfleetd serves. Prefix entries (ending in `/`) cover a whole standard service.
pub const RULES: &[(&str, Rule)] = &[
    ("/grpc.health.v1.Health/", Rule::AnyIdentity),
    ("/grpc.reflection.v1.ServerReflection/", Rule::AnyIdentity),
    ("/grpc.reflection.v1alpha.ServerReflection/", Rule::AnyIdentity),
    ("/medfleet.v1.EnrollmentService/Enroll", Rule::Anonymous),
    ("/medfleet.v1.CredentialService/Renew", Rule::AnyIdentity),
    (
        "/medfleet.v1.CredentialService/IssueCredentials",
        permission("credential", "create", Target::Global),
    ),
    (
        "/medfleet.v1.CredentialService/RevokeCredentials",
        permission("credential", "revoke", Target::Global),
    ),
    ("/medfleet.v1.DeviceService/Session", Rule::Devices),
    ("/medfleet.v1.DeviceService/PublishReadings", Rule::Devices),
    (
        "/medfleet.v1.AccessService/Grant",
        permission("access", "update", Target::Global),
    ),
    (
        "/medfleet.v1.AccessService/Revoke",
        permission("access", "update", Target::Global),
    ),
    (
        "/medfleet.v1.AccessService/ListGrants",
        permission("access", "read", Target::Global),
    ),
    (
        "/medfleet.v1.AccessService/Check",
        permission("access", "read", Target::Global),
    ),
    (
        "/medfleet.v1.AccessService/ListPermissions",
        permission("access", "read", Target::Global),
    ),
    (
        "/medfleet.v1.AccessService/AddPermission",
        permission("access", "update", Target::Global),
    ),
    (
        "/medfleet.v1.AccessService/RemovePermission",
        permission("access", "update", Target::Global),
    ),
    (
        "/medfleet.v1.AuditService/ListAuditEvents",
        permission("audit", "read", Target::Global),
    ),
    (
        "/medfleet.v1.AuditService/VerifyAuditTrail",
        permission("audit", "read", Target::Global),
    ),
    (
        "/medfleet.v1.RegistryService/CreateSite",
        permission(
            "site",
            "create",
            Target::Site(|b| decode::<v1::CreateSiteRequest>(b)?.site.map(|s| s.name)),
        ),
    ),
    (
        "/medfleet.v1.RegistryService/GetSite",
        permission(
            "site",
            "read",
            Target::Site(|b| decode::<v1::GetSiteRequest>(b).map(|r| r.name)),
        ),
    ),
    (
        "/medfleet.v1.RegistryService/ListSites",
        permission("site", "read", Target::List),
    ),
    (
        "/medfleet.v1.RegistryService/UpdateSite",
        permission(
            "site",
            "update",
            Target::Site(|b| decode::<v1::UpdateSiteRequest>(b)?.site.map(|s| s.name)),
        ),
    ),
    (
        "/medfleet.v1.RegistryService/CreateWard",
        permission(
            "ward",
            "create",
            Target::Site(|b| decode::<v1::CreateWardRequest>(b)?.ward.map(|w| w.site)),
        ),
    ),
    (
        "/medfleet.v1.RegistryService/GetWard",
        permission(
            "ward",
            "read",
            Target::Ward(|b| decode::<v1::GetWardRequest>(b).map(|r| (r.site, r.name))),
        ),
    ),
    (
        "/medfleet.v1.RegistryService/ListWards",
        permission("ward", "read", Target::List),
    ),
    (
        "/medfleet.v1.RegistryService/UpdateWard",
        permission(
            "ward",
            "update",
            Target::Ward(|b| decode::<v1::UpdateWardRequest>(b)?.ward.map(|w| (w.site, w.name))),
        ),
    ),
    (
        "/medfleet.v1.RegistryService/RegisterDevice",
        permission("device", "create", Target::NewDevice),
    ),
    (
        "/medfleet.v1.RegistryService/GetDevice",
        permission(
            "device",
            "read",
            Target::Device(|b| decode::<v1::GetDeviceRequest>(b).map(|r| r.id)),
        ),
    ),
    (
        "/medfleet.v1.RegistryService/ListDevices",
        permission("device", "read", Target::List),
    ),
    (
        "/medfleet.v1.RegistryService/WatchDevices",
        permission("device", "read", Target::List),
    ),
    (
        "/medfleet.v1.ConfigService/SetConfig",
        permission(
            "config",
            "update",
            Target::ConfigLayer(|b| decode::<v1::SetConfigRequest>(b)?.layer),
        ),
    ),
    (
        "/medfleet.v1.ConfigService/GetConfigLayer",
        permission(
            "config",
            "read",
            Target::ConfigLayer(|b| decode::<v1::GetConfigLayerRequest>(b)?.layer),
        ),
    ),
    (
        "/medfleet.v1.ConfigService/ResolveConfig",
        permission(
            "config",
            "read",
            Target::Device(|b| decode::<v1::ResolveConfigRequest>(b).map(|r| r.device_id)),
        ),
    ),
    (
        "/medfleet.v1.ConfigService/ListConfigVersions",
        permission(
            "config",
            "read",
            Target::ConfigLayer(|b| decode::<v1::ListConfigVersionsRequest>(b)?.layer),
        ),
    ),
    (
        "/medfleet.v1.ConfigService/DiffConfigVersions",
        permission(
            "config",
            "read",
            Target::ConfigVersions(|b| {
                decode::<v1::DiffConfigVersionsRequest>(b).map_or_else(Vec::new, |r| vec![r.from_version, r.to_version])
            }),
        ),
    ),
    (
        "/medfleet.v1.ConfigService/RollbackConfig",
        permission(
            "config",
            "update",
            Target::ConfigVersions(|b| {
                decode::<v1::RollbackConfigRequest>(b).map_or_else(Vec::new, |r| vec![r.to_version])
            }),
        ),
    ),
    (
        "/medfleet.v1.ConfigService/SetConfigSchema",
        permission("config_schema", "update", Target::Global),
    ),
    (
        "/medfleet.v1.ConfigService/GetConfigSchema",
        permission("config", "read", Target::List),
    ),
    (
        "/medfleet.v1.ConfigService/ListConfigDrift",
        permission("config", "read", Target::List),
    ),
    (
        "/medfleet.v1.PatientService/Associate",
        permission(
            "association",
            "update",
            Target::Device(|b| decode::<v1::AssociateRequest>(b).map(|r| r.device_id)),
        ),
    ),
    (
        "/medfleet.v1.PatientService/Dissociate",
        permission(
            "association",
            "update",
            Target::Device(|b| decode::<v1::DissociateRequest>(b).map(|r| r.device_id)),
        ),
    ),
    (
        "/medfleet.v1.PatientService/ListAssociations",
        permission("patient", "read", Target::List),
    ),
    (
        "/medfleet.v1.PatientService/RecordAdtEvent",
        // The effects are scoped, not just the check: the handler changes only devices inside the caller's
        // association:update scopes, and refuses a bed outside them.
        permission("association", "update", Target::List),
    ),
    (
        "/medfleet.v1.ObservationService/ListObservations",
        permission("observation", "read", Target::List),
    ),
    (
        "/medfleet.v1.ObservationService/SetObservationStatus",
        permission("observation", "validate", Target::List),
    ),
    (
        "/medfleet.v1.EmrService/CreateDestination",
        permission("emr_destination", "update", Target::Global),
    ),
    (
        // Repointing, re-keying, disabling or deleting where chart entries go is as much an admin decision as
        // creating a destination.
        "/medfleet.v1.EmrService/UpdateDestination",
        permission("emr_destination", "update", Target::Global),
    ),
    (
        "/medfleet.v1.EmrService/DeleteDestination",
        permission("emr_destination", "update", Target::Global),
    ),
    (
        "/medfleet.v1.EmrService/ListDestinations",
        permission("emr_destination", "read", Target::Global),
    ),
    (
        "/medfleet.v1.EmrService/ListDeliveries",
        permission("emr_destination", "read", Target::Global),
    ),
    (
        "/medfleet.v1.EmrService/RetryDeliveries",
        permission("emr_destination", "retry", Target::Global),
    ),
    (
        "/medfleet.v1.FeedService/Subscribe",
        permission("feed", "subscribe", Target::List),
    ),
    (
        "/medfleet.v1.FeedService/Acknowledge",
        permission("feed", "subscribe", Target::List),
    ),
    (
        "/medfleet.v1.RegistryService/UpdateDevice",
        permission("device", "update", Target::DeviceUpdate),
    ),
    (
        "/medfleet.v1.RegistryService/IssueEnrollmentToken",
        permission(
            "enrollment",
            "create",
            Target::Device(|b| decode::<v1::IssueEnrollmentTokenRequest>(b).map(|r| r.device_id)),
        ),
    ),
    (
        "/medfleet.v1.RegistryService/ImportDevices",
        permission("device", "create", Target::Import),
    ),
    (
        "/medfleet.v1.RegistryService/RevokeDevice",
        permission(
            "device",
            "revoke",
            Target::Device(|b| decode::<v1::RevokeDeviceRequest>(b).map(|r| r.id)),
        ),
    ),
    (
        "/medfleet.v1.RegistryService/DecommissionDevice",
        permission(
            "device",
            "decommission",
            Target::Device(|b| decode::<v1::DecommissionDeviceRequest>(b).map(|r| r.id)),
        ),
    ),
    (
        "/medfleet.v1.FirmwareService/GetOnlineKeys",
        permission("firmware", "read", Target::Global),
    ),
    (
        "/medfleet.v1.FirmwareService/SetTrustRoot",
        permission("firmware_trust", "update", Target::Global),
    ),
    (
        "/medfleet.v1.FirmwareService/GetTrustRoot",
        permission("firmware", "read", Target::Global),
    ),
    (
        "/medfleet.v1.FirmwareService/UploadArtifact",
        permission("firmware", "upload", Target::Global),
    ),
    (
        "/medfleet.v1.FirmwareService/ListArtifacts",
        permission("firmware", "read", Target::Global),
    ),
    (
        "/medfleet.v1.FirmwareService/GetArtifact",
        permission("firmware", "read", Target::Global),
    ),
    (
        "/medfleet.v1.FirmwareService/PublishTargets",
        permission("firmware", "upload", Target::Global),
    ),
    (
        "/medfleet.v1.FirmwareService/DeleteArtifact",
        permission("firmware", "delete", Target::Global),
    ),
    (
        "/medfleet.v1.FirmwareService/GetMetadata",
        Rule::DevicesOrPermission {
            object: "firmware",
            action: "read",
        },
    ),
    (
        "/medfleet.v1.FirmwareService/ReadArtifact",
        Rule::DevicesOrPermission {
            object: "firmware",
            action: "read",
        },
    ),
    (
        "/medfleet.v1.RolloutService/CreateRollout",
        permission("rollout", "create", Target::List),
    ),
    (
        "/medfleet.v1.RolloutService/ListRollouts",
        permission("rollout", "read", Target::List),
    ),
    (
        "/medfleet.v1.RolloutService/GetRollout",
        permission(
            "rollout",
            "read",
            Target::Rollout(|b| decode::<v1::GetRolloutRequest>(b).map(|r| r.rollout)),
        ),
    ),
    (
        "/medfleet.v1.RolloutService/WatchRollout",
        permission(
            "rollout",
            "read",
            Target::Rollout(|b| decode::<v1::WatchRolloutRequest>(b).map(|r| r.rollout)),
        ),
    ),
    (
        "/medfleet.v1.RolloutService/StartRollout",
        permission("rollout", "control", Target::Rollout(command_rollout)),
    ),
    (
        "/medfleet.v1.RolloutService/PauseRollout",
        permission("rollout", "control", Target::Rollout(command_rollout)),
    ),
    (
        "/medfleet.v1.RolloutService/ResumeRollout",
        permission("rollout", "control", Target::Rollout(command_rollout)),
    ),
    (
        "/medfleet.v1.RolloutService/AbortRollout",
        permission("rollout", "control", Target::Rollout(command_rollout)),
    ),
    (
        "/medfleet.v1.RolloutService/RetryFailed",
        permission("rollout", "control", Target::Rollout(command_rollout)),
    ),
    (
        "/medfleet.v1.RolloutService/ApproveDevice",
        permission(
            "rollout",
            "approve",
            Target::Device(|b| decode::<v1::ApproveDeviceRequest>(b).map(|r| r.device_id)),
        ),
    ),
    (
        "/medfleet.v1.RolloutService/AbandonDevice",
        permission(
            "rollout",
            "control",
            Target::Device(|b| decode::<v1::AbandonDeviceRequest>(b).map(|r| r.device_id)),
        ),
    ),
    (
        "/medfleet.v1.RolloutService/RollbackRollout",
        permission(
            "rollout",
            "create",
            Target::Rollout(|b| decode::<v1::RollbackRolloutRequest>(b).map(|r| r.rollout)),
        ),
    ),
];

fn command_rollout(body: &[u8]) -> Option<String> {
    decode::<v1::RolloutCommandRequest>(body).map(|r| r.rollout)
}

/// The rule for a method path: an exact entry, or a prefix entry of a standard service.
pub fn rule_for(path: &str) -> Option<Rule> {
    RULES
        .iter()
        .find(|(key, _)| {
            if key.ends_with('/') {
                path.starts_with(key)
            } else {
                path == *key
            }
        })
        .map(|(_, rule)| *rule)
}
