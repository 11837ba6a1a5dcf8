//! The access matrix: every principal kind and role × every RPC of the proto × a target inside and outside the
//! principal's scope, against the real server with real certificates, on both backends. The RPC list comes from
//! the compiled descriptors, and every RPC must have an expected decision here, so a new RPC cannot slip through
//! without one.
//!
//! The expectations below are written from the roles table of the security reference, independently of the
//! server's own policy table, so the two check each other.

use medfleet_core::identity::Identity;
use medfleet_e2e::{Backend, TestServer, both_backends};
use medfleet_proto::v1;
use prost::Message as _;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// Sends pre-encoded request messages and returns raw response bytes: any method, one client.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// The decision on one call. A server stream (a watch) is judged by its response headers: it never ends on its own.
async fn call(channel: &Channel, path: &str, body: Vec<u8>, server_streaming: bool) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let path = http::uri::PathAndQuery::try_from(path).expect("path");
    let outcome = if server_streaming {
        grpc.server_streaming(tonic::Request::new(body), path, RawCodec)
            .await
            .map(|_| ())
    } else {
        grpc.unary(tonic::Request::new(body), path, RawCodec).await.map(|_| ())
    };
    match outcome {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// How a method is governed, per the security reference.
#[derive(Debug, Clone, Copy)]
enum Governed {
    /// Reached by anyone (the handler then judges the token).
    Anonymous,
    /// Any principal, for itself.
    AnyIdentity,
    /// Devices only.
    Devices,
    /// A role permission on the whole fleet.
    Global(&'static str, &'static str),
    /// A role permission on the scope of the request's target.
    Scoped(&'static str, &'static str),
    /// A listing: allowed with the permission (object, action) in any scope; shows only what the scopes cover.
    Listing(&'static str, &'static str),
    /// Devices (for what is assigned to them), or a role permission on the whole fleet.
    DevicesOr(&'static str, &'static str),
}

fn governed(service: &str, method: &str) -> Option<Governed> {
    use Governed::{Anonymous, AnyIdentity, Devices, DevicesOr, Global, Listing, Scoped};
    Some(match (service, method) {
        ("EnrollmentService", "Enroll") => Anonymous,
        ("CredentialService", "Renew") => AnyIdentity,
        ("CredentialService", "IssueCredentials") => Global("credential", "create"),
        ("CredentialService", "RevokeCredentials") => Global("credential", "revoke"),
        ("DeviceService", "Session" | "PublishReadings") => Devices,
        ("AccessService", "Grant" | "Revoke" | "AddPermission" | "RemovePermission") => Global("access", "update"),
        ("AccessService", "ListGrants" | "Check" | "ListPermissions") => Global("access", "read"),
        ("AuditService", _) => Global("audit", "read"),
        ("RegistryService", "CreateSite") => Scoped("site", "create"),
        ("RegistryService", "GetSite") => Scoped("site", "read"),
        ("RegistryService", "UpdateSite") => Scoped("site", "update"),
        ("RegistryService", "ListSites") => Listing("site", "read"),
        ("RegistryService", "CreateWard") => Scoped("ward", "create"),
        ("RegistryService", "GetWard") => Scoped("ward", "read"),
        ("RegistryService", "UpdateWard") => Scoped("ward", "update"),
        ("RegistryService", "ListWards") => Listing("ward", "read"),
        ("RegistryService", "RegisterDevice" | "ImportDevices") => Scoped("device", "create"),
        ("RegistryService", "GetDevice") => Scoped("device", "read"),
        ("RegistryService", "ListDevices" | "WatchDevices") => Listing("device", "read"),
        ("ConfigService", "SetConfig" | "RollbackConfig") => Scoped("config", "update"),
        ("ConfigService", "GetConfigLayer" | "ResolveConfig" | "ListConfigVersions" | "DiffConfigVersions") => {
            Scoped("config", "read")
        }
        ("ConfigService", "SetConfigSchema") => Global("config_schema", "update"),
        ("ConfigService", "GetConfigSchema" | "ListConfigDrift") => Listing("config", "read"),
        ("RegistryService", "UpdateDevice") => Scoped("device", "update"),
        ("RegistryService", "RevokeDevice") => Scoped("device", "revoke"),
        ("RegistryService", "DecommissionDevice") => Scoped("device", "decommission"),
        ("RegistryService", "IssueEnrollmentToken") => Scoped("enrollment", "create"),
        ("PatientService", "Associate" | "Dissociate" | "RecordAdtEvent") => Scoped("association", "update"),
        ("PatientService", "ListAssociations") => Listing("patient", "read"),
        ("ObservationService", "ListObservations") => Listing("observation", "read"),
        ("ObservationService", "SetObservationStatus") => Listing("observation", "validate"),
        ("EmrService", "CreateDestination" | "UpdateDestination" | "DeleteDestination") => {
            Global("emr_destination", "update")
        }
        ("EmrService", "RetryDeliveries") => Global("emr_destination", "retry"),
        ("EmrService", "ListDestinations" | "ListDeliveries") => Global("emr_destination", "read"),
        ("FeedService", _) => Listing("feed", "subscribe"),
        ("FirmwareService", "GetOnlineKeys" | "GetTrustRoot" | "ListArtifacts" | "GetArtifact") => {
            Global("firmware", "read")
        }
        ("FirmwareService", "SetTrustRoot") => Global("firmware_trust", "update"),
        ("FirmwareService", "UploadArtifact" | "PublishTargets") => Global("firmware", "upload"),
        ("FirmwareService", "DeleteArtifact") => Global("firmware", "delete"),
        ("FirmwareService", "GetMetadata" | "ReadArtifact") => DevicesOr("firmware", "read"),
        ("RolloutService", "CreateRollout") => Listing("rollout", "create"),
        ("RolloutService", "ListRollouts") => Listing("rollout", "read"),
        // The matrix names no stored rollout: a rollout that does not exist is judged fleet-wide.
        ("RolloutService", "GetRollout" | "WatchRollout") => Global("rollout", "read"),
        ("RolloutService", "StartRollout" | "PauseRollout" | "ResumeRollout" | "AbortRollout" | "RetryFailed") => {
            Global("rollout", "control")
        }
        ("RolloutService", "RollbackRollout") => Global("rollout", "create"),
        ("RolloutService", "ApproveDevice") => Scoped("rollout", "approve"),
        ("RolloutService", "AbandonDevice") => Scoped("rollout", "control"),
        _ => return None,
    })
}

/// The roles table (security reference): what each built-in role may do.
fn role_allows(role: &str, object: &str, action: &str) -> bool {
    let read_fleet = matches!(object, "site" | "ward" | "device") && action == "read";
    match role {
        "admin" => true,
        "it_provisioner" => {
            matches!(
                (object, action),
                ("site" | "ward", "read" | "create" | "update")
                    | ("device", "read" | "create" | "update" | "revoke" | "decommission")
                    | ("enrollment", "create")
                    | ("config", "read" | "update")
                    | ("emr_destination", "read" | "retry")
                    | ("rollout", "read")
            )
        }
        "biomed" => {
            read_fleet
                || matches!(
                    (object, action),
                    ("config", "read" | "update")
                        | ("config_schema", "update")
                        | ("firmware", "read" | "upload" | "delete")
                        | ("rollout", "read" | "create" | "control")
                )
        }
        "clinician" => {
            read_fleet
                || matches!(
                    (object, action),
                    ("config" | "patient", "read")
                        | ("association", "update")
                        | ("observation", "read" | "validate")
                        | ("rollout", "read" | "approve")
                )
        }
        "emr_system" => {
            read_fleet
                || matches!(
                    (object, action),
                    ("patient" | "observation", "read") | ("association", "update") | ("feed", "subscribe")
                )
        }
        "auditor" => {
            read_fleet
                || matches!(
                    (object, action),
                    ("audit" | "config" | "observation" | "firmware" | "rollout", "read")
                )
        }
        _ => false,
    }
}

/// Who calls.
#[derive(Debug, Clone)]
enum Principal {
    /// A user or service holding `role` on `scope` ("stmarys" or "*").
    Role {
        role: &'static str,
        scope: &'static str,
        service: bool,
    },
    /// A user with no grant at all.
    Nobody,
    Device,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Inside `stmarys` (every grant covers it).
    In,
    /// Inside `stjohns` (only fleet-wide grants cover it).
    Out,
}

fn expected(principal: &Principal, governed: Governed, target: Target) -> bool {
    match (governed, principal) {
        (Governed::Anonymous | Governed::AnyIdentity, _)
        | (Governed::Devices | Governed::DevicesOr(..), Principal::Device) => true,
        (Governed::Devices, _) | (_, Principal::Device | Principal::Nobody) => false,
        (
            Governed::Global(object, action) | Governed::DevicesOr(object, action),
            Principal::Role { role, scope, .. },
        ) => role_allows(role, object, action) && *scope == "*",
        (Governed::Scoped(object, action), Principal::Role { role, scope, .. }) => {
            role_allows(role, object, action) && (target == Target::In || *scope == "*")
        }
        (Governed::Listing(object, action), Principal::Role { role, .. }) => role_allows(role, object, action),
    }
}

struct Fixture {
    device_in: String,
    device_out: String,
    /// A configuration version of each target's ward layer.
    version_in: u64,
    version_out: u64,
}

fn ward_layer(site: &str) -> Option<v1::ConfigLayer> {
    Some(v1::ConfigLayer {
        kind: v1::ConfigLayerKind::Ward.into(),
        key: format!("{site}/icu"),
    })
}

fn location(site: &str) -> Option<v1::Location> {
    Some(v1::Location {
        site: site.into(),
        ward: "icu".into(),
        bed: String::new(),
    })
}

fn new_device(site: &str) -> v1::RegisterDeviceRequest {
    v1::RegisterDeviceRequest {
        serial_number: format!("M-{}", uuid::Uuid::new_v4().simple()),
        manufacturer: "Philips".into(),
        model: "MX450".into(),
        device_class: v1::DeviceClass::PatientMonitor.into(),
        location: location(site),
        ..Default::default()
    }
}

/// A request for `method` aimed at the target's scope. Requests for methods that change state are built so that,
/// once authorised, they fail validation or change nothing that later calls depend on.
fn request(service: &str, method: &str, target: Target, fixture: &Fixture) -> Vec<u8> {
    let site = if target == Target::In { "stmarys" } else { "stjohns" };
    let device = if target == Target::In {
        &fixture.device_in
    } else {
        &fixture.device_out
    };
    let mask = |p: &str| {
        Some(prost_types::FieldMask {
            paths: vec![p.to_owned()],
        })
    };
    match (service, method) {
        ("RegistryService", "CreateSite") => v1::CreateSiteRequest {
            site: Some(v1::Site {
                name: site.into(),
                display_name: site.into(),
                ..Default::default()
            }),
        }
        .encode_to_vec(),
        ("RegistryService", "GetSite") => v1::GetSiteRequest { name: site.into() }.encode_to_vec(),
        ("RegistryService", "UpdateSite") => v1::UpdateSiteRequest {
            site: Some(v1::Site {
                name: site.into(),
                display_name: String::new(),
                ..Default::default()
            }),
            update_mask: mask("display_name"),
        }
        .encode_to_vec(),
        ("RegistryService", "ListSites") => v1::ListSitesRequest::default().encode_to_vec(),
        ("RegistryService", "CreateWard") => v1::CreateWardRequest {
            ward: Some(v1::Ward {
                site: site.into(),
                name: "icu".into(),
                display_name: "ICU".into(),
                ..Default::default()
            }),
        }
        .encode_to_vec(),
        ("RegistryService", "GetWard") => v1::GetWardRequest {
            site: site.into(),
            name: "icu".into(),
        }
        .encode_to_vec(),
        ("RegistryService", "UpdateWard") => v1::UpdateWardRequest {
            ward: Some(v1::Ward {
                site: site.into(),
                name: "icu".into(),
                display_name: String::new(),
                ..Default::default()
            }),
            update_mask: mask("display_name"),
        }
        .encode_to_vec(),
        ("RegistryService", "ListWards") => v1::ListWardsRequest {
            site: site.into(),
            ..Default::default()
        }
        .encode_to_vec(),
        ("RegistryService", "RegisterDevice") => new_device(site).encode_to_vec(),
        ("RegistryService", "ImportDevices") => v1::ImportDevicesRequest {
            devices: vec![new_device(site)],
            issue_tokens: false,
            token_ttl: None,
        }
        .encode_to_vec(),
        ("RegistryService", "GetDevice") => v1::GetDeviceRequest { id: device.clone() }.encode_to_vec(),
        ("RolloutService", "ApproveDevice") => v1::ApproveDeviceRequest {
            rollout: String::new(),
            device_id: device.clone(),
            ..Default::default()
        }
        .encode_to_vec(),
        ("RolloutService", "AbandonDevice") => v1::AbandonDeviceRequest {
            rollout: String::new(),
            device_id: device.clone(),
            ..Default::default()
        }
        .encode_to_vec(),
        ("ConfigService", "SetConfig") => v1::SetConfigRequest {
            layer: ward_layer(site),
            document_json: "{}".into(),
            comment: "matrix".into(),
        }
        .encode_to_vec(),
        ("ConfigService", "GetConfigLayer") => v1::GetConfigLayerRequest {
            layer: ward_layer(site),
        }
        .encode_to_vec(),
        ("ConfigService", "ResolveConfig") => v1::ResolveConfigRequest {
            device_id: device.clone(),
        }
        .encode_to_vec(),
        ("ConfigService", "ListConfigVersions") => v1::ListConfigVersionsRequest {
            layer: ward_layer(site),
            ..Default::default()
        }
        .encode_to_vec(),
        ("ConfigService", "DiffConfigVersions") => {
            let version = if target == Target::In {
                fixture.version_in
            } else {
                fixture.version_out
            };
            v1::DiffConfigVersionsRequest {
                from_version: version,
                to_version: version,
            }
            .encode_to_vec()
        }
        ("ConfigService", "RollbackConfig") => v1::RollbackConfigRequest {
            to_version: if target == Target::In {
                fixture.version_in
            } else {
                fixture.version_out
            },
            comment: "matrix".into(),
        }
        .encode_to_vec(),
        ("ConfigService", "SetConfigSchema") => v1::SetConfigSchemaRequest {
            model: "matrix-model".into(),
            schema_json: r#"{"type": "object"}"#.into(),
            comment: String::new(),
        }
        .encode_to_vec(),
        ("ConfigService", "GetConfigSchema") => v1::GetConfigSchemaRequest { model: "MX450".into() }.encode_to_vec(),
        ("RegistryService", "WatchDevices") => v1::WatchDevicesRequest {
            site: site.into(),
            ..Default::default()
        }
        .encode_to_vec(),
        ("RegistryService", "ListDevices") => v1::ListDevicesRequest {
            site: site.into(),
            ..Default::default()
        }
        .encode_to_vec(),
        ("RegistryService", "UpdateDevice") => v1::UpdateDeviceRequest {
            device: Some(v1::Device {
                id: device.clone(),
                ..Default::default()
            }),
            update_mask: mask("tags"),
        }
        .encode_to_vec(),
        ("RegistryService", "RevokeDevice") => v1::RevokeDeviceRequest {
            id: device.clone(),
            reason: 99,
        }
        .encode_to_vec(),
        ("RegistryService", "DecommissionDevice") => {
            v1::DecommissionDeviceRequest { id: device.clone() }.encode_to_vec()
        }
        ("RegistryService", "IssueEnrollmentToken") => v1::IssueEnrollmentTokenRequest {
            device_id: device.clone(),
            ttl: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
            replace: false,
        }
        .encode_to_vec(),
        ("AccessService", "Grant" | "Revoke") => v1::GrantRequest {
            grant: Some(v1::RoleGrant {
                principal: "medfleet://user/someone".into(),
                role: "no-such-role".into(),
                scope: "*".into(),
            }),
        }
        .encode_to_vec(),
        ("AccessService", "AddPermission" | "RemovePermission") => v1::PermissionRequest {
            permission: Some(v1::Permission {
                role: "biomed".into(),
                object: "no-such-object".into(),
                action: "read".into(),
            }),
        }
        .encode_to_vec(),
        ("AccessService", "Check") => v1::CheckRequest {
            principal: "medfleet://user/someone".into(),
            object: "device".into(),
            action: "read".into(),
            scope: "*".into(),
        }
        .encode_to_vec(),
        ("CredentialService", "IssueCredentials") => v1::IssueCredentialsRequest {
            kind: v1::PrincipalKind::User.into(),
            name: "someone".into(),
            csr_der: Vec::new(),
            lifetime: None,
        }
        .encode_to_vec(),
        ("CredentialService", "RevokeCredentials") => v1::RevokeCredentialsRequest::default().encode_to_vec(),
        // Authorised, these fail validation (no patient) or find nothing to end.
        ("PatientService", "Associate") => v1::AssociateRequest {
            device_id: device.clone(),
            ..Default::default()
        }
        .encode_to_vec(),
        ("PatientService", "Dissociate") => v1::DissociateRequest {
            device_id: device.clone(),
            at: None,
            cancel_planned: false,
        }
        .encode_to_vec(),
        // A valid admit into a bed no device stands at: authorised, it binds nothing. The bed's ward is checked
        // against the caller's scopes by the handler, so this is the case that tells scopes apart.
        ("PatientService", "RecordAdtEvent") => v1::AdtEvent {
            r#type: v1::AdtEventType::Admit.into(),
            patient: Some(v1::PatientIdentifier {
                identifier: "MRN-MATRIX".into(),
                authority: "HOSP".into(),
                display_name: String::new(),
            }),
            site: site.into(),
            ward: "icu".into(),
            bed: "9".into(),
            occurred_at: None,
        }
        .encode_to_vec(),
        ("PatientService", "ListAssociations") => v1::ListAssociationsRequest {
            device_id: device.clone(),
            patient: None,
        }
        .encode_to_vec(),
        // Everything else is judged with an empty message: the decision comes before the handler looks at it.
        _ => Vec::new(),
    }
}

/// A refusal by the access decision: PERMISSION_DENIED, UNAUTHENTICATED, or NOT_FOUND for a scoped target the
/// caller may not see (every target in this matrix exists, so NOT_FOUND can only mean "hidden").
fn refused(code: Code, governed: Governed) -> bool {
    match code {
        Code::PermissionDenied | Code::Unauthenticated => true,
        Code::NotFound => matches!(governed, Governed::Scoped(..)),
        _ => false,
    }
}

async fn matrix(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut admin = server.admin().await;
    for site in ["stmarys", "stjohns"] {
        admin
            .create_site(v1::CreateSiteRequest {
                site: Some(v1::Site {
                    name: site.into(),
                    display_name: site.into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
        admin
            .create_ward(v1::CreateWardRequest {
                ward: Some(v1::Ward {
                    site: site.into(),
                    name: "icu".into(),
                    display_name: "ICU".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    let fixture = Fixture {
        device_in: admin
            .register_device(new_device("stmarys"))
            .await
            .unwrap()
            .into_inner()
            .id,
        device_out: admin
            .register_device(new_device("stjohns"))
            .await
            .unwrap()
            .into_inner()
            .id,
        version_in: 0,
        version_out: 0,
    };
    let mut configs =
        v1::config_service_client::ConfigServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap());
    let mut versions = Vec::new();
    for site in ["stmarys", "stjohns"] {
        let version = configs
            .set_config(v1::SetConfigRequest {
                layer: ward_layer(site),
                document_json: r#"{"rate": 1}"#.into(),
                comment: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        versions.push(version.version);
    }
    configs
        .set_config_schema(v1::SetConfigSchemaRequest {
            model: "MX450".into(),
            schema_json: r#"{"type": "object"}"#.into(),
            comment: String::new(),
        })
        .await
        .unwrap();
    let fixture = Fixture {
        version_in: versions[0],
        version_out: versions[1],
        ..fixture
    };

    let mut principals = vec![Principal::Nobody, Principal::Device];
    for role in [
        "admin",
        "it_provisioner",
        "biomed",
        "clinician",
        "emr_system",
        "auditor",
    ] {
        for scope in ["stmarys", "*"] {
            principals.push(Principal::Role {
                role,
                scope,
                service: false,
            });
        }
    }
    principals.push(Principal::Role {
        role: "emr_system",
        scope: "stmarys",
        service: true,
    });
    let mut access =
        v1::access_service_client::AccessServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap());
    let mut channels = Vec::new();
    for (i, principal) in principals.iter().enumerate() {
        let identity = match principal {
            Principal::Nobody => Identity::User("nobody".into()),
            Principal::Device => Identity::Device(fixture.device_in.parse().unwrap()),
            Principal::Role { service: true, .. } => Identity::Service(format!("svc{i}")),
            Principal::Role { service: false, .. } => Identity::User(format!("user{i}")),
        };
        if let Principal::Role { role, scope, .. } = principal {
            access
                .grant(v1::GrantRequest {
                    grant: Some(v1::RoleGrant {
                        principal: identity.to_string(),
                        role: (*role).into(),
                        scope: (*scope).into(),
                    }),
                })
                .await
                .unwrap();
        }
        channels.push(server.channel(&server.issue(&identity)).await.unwrap());
    }

    let fds = prost_types::FileDescriptorSet::decode(medfleet_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut failures = Vec::new();
    let mut decisions = 0;
    for file in &fds.file {
        for service in &file.service {
            for method in &service.method {
                let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                let Some(rule) = governed(service.name(), method.name()) else {
                    failures.push(format!("{path}: the matrix has no expected decision for this RPC"));
                    continue;
                };
                for (principal, channel) in principals.iter().zip(&channels) {
                    for target in [Target::In, Target::Out] {
                        let body = request(service.name(), method.name(), target, &fixture);
                        let streaming = method.server_streaming() && !method.client_streaming();
                        let code = call(channel, &path, body, streaming).await;
                        let allow = expected(principal, rule, target);
                        decisions += 1;
                        if refused(code, rule) == allow {
                            failures.push(format!(
                                "{path} by {principal:?} on {target:?}: expected {}, got {code:?}",
                                if allow { "allowed" } else { "refused" }
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {decisions} decisions wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        decisions > 500,
        "only {decisions} decisions: the descriptor set looks incomplete"
    );
}
both_backends!(every_role_every_rpc_in_and_out_of_scope, matrix);
