//! Role-based access on both backends: deny by default, scopes that cover their wards, out-of-scope resources
//! reported as missing, explained checks, grants taking effect on another replica, refusals in the audit trail.

use std::time::Duration;

use medfleet_core::identity::Identity;
use medfleet_e2e::{Backend, Storage, TestServer, both_backends};
use medfleet_proto::v1::{
    self, access_service_client::AccessServiceClient, registry_service_client::RegistryServiceClient,
};
use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _};
use tonic::Code;
use tonic::transport::Channel;

type Registry = RegistryServiceClient<Channel>;

async fn access_client(server: &TestServer) -> AccessServiceClient<Channel> {
    AccessServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap())
}

fn grant(principal: &str, role: &str, scope: &str) -> v1::GrantRequest {
    v1::GrantRequest {
        grant: Some(v1::RoleGrant {
            principal: principal.into(),
            role: role.into(),
            scope: scope.into(),
        }),
    }
}

async fn as_user(server: &TestServer, name: &str) -> Registry {
    let bundle = server.issue(&Identity::User(name.into()));
    RegistryServiceClient::new(server.channel(&bundle).await.unwrap())
}

async fn device_in(api: &mut Registry, serial: &str, site: &str, ward: &str) -> v1::Device {
    api.register_device(v1::RegisterDeviceRequest {
        serial_number: serial.into(),
        manufacturer: "Philips".into(),
        model: "MX450".into(),
        device_class: v1::DeviceClass::PatientMonitor.into(),
        location: Some(v1::Location {
            site: site.into(),
            ward: ward.into(),
            bed: String::new(),
        }),
        ..Default::default()
    })
    .await
    .map_or_else(
        |e| panic!("register {serial} in {site}/{ward}: {e:?}"),
        tonic::Response::into_inner,
    )
}

async fn fleet(server: &TestServer) -> (v1::Device, v1::Device, v1::Device) {
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
    }
    for (site, ward) in [("stmarys", "icu"), ("stmarys", "ed"), ("stjohns", "icu")] {
        admin
            .create_ward(v1::CreateWardRequest {
                ward: Some(v1::Ward {
                    site: site.into(),
                    name: ward.into(),
                    display_name: ward.into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    (
        device_in(&mut admin, "ICU-1", "stmarys", "icu").await,
        device_in(&mut admin, "ED-1", "stmarys", "ed").await,
        device_in(&mut admin, "JOHNS-1", "stjohns", "icu").await,
    )
}

async fn scopes(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (icu, ed, johns) = fleet(&server).await;
    let mut access = access_client(&server).await;
    access
        .grant(grant("medfleet://user/bea", "biomed", "stmarys/icu"))
        .await
        .unwrap();
    access
        .grant(grant("medfleet://user/ivan", "it_provisioner", "stmarys"))
        .await
        .unwrap();

    // A ward-scoped biomed sees that ward only; elsewhere devices "do not exist".
    let mut bea = as_user(&server, "bea").await;
    let listed = bea
        .list_devices(v1::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices;
    let ids: Vec<&str> = listed.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, [icu.id.as_str()]);
    bea.get_device(v1::GetDeviceRequest { id: icu.id.clone() })
        .await
        .unwrap();
    for other in [&ed, &johns] {
        let status = bea
            .get_device(v1::GetDeviceRequest { id: other.id.clone() })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::NotFound,
            "out of scope reads look like missing devices"
        );
    }
    // Reading is not changing: biomed may not revoke.
    let status = bea
        .revoke_device(v1::RevokeDeviceRequest {
            id: icu.id.clone(),
            reason: v1::RevocationReason::KeyCompromise.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("device:revoke") && status.message().contains("stmarys/icu"),
        "{}",
        status.message()
    );

    // A site grant covers the site's wards, and nothing else.
    let mut ivan = as_user(&server, "ivan").await;
    device_in(&mut ivan, "ICU-2", "stmarys", "icu").await;
    device_in(&mut ivan, "ED-2", "stmarys", "ed").await;
    let status = ivan
        .register_device(v1::RegisterDeviceRequest {
            serial_number: "JOHNS-2".into(),
            manufacturer: "Philips".into(),
            model: "MX450".into(),
            device_class: v1::DeviceClass::PatientMonitor.into(),
            location: Some(v1::Location {
                site: "stjohns".into(),
                ward: "icu".into(),
                bed: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Moving a device out of one's scope needs the permission at the destination too.
    let status = ivan
        .update_device(v1::UpdateDeviceRequest {
            device: Some(v1::Device {
                id: icu.id.clone(),
                location: Some(v1::Location {
                    site: "stjohns".into(),
                    ward: "icu".into(),
                    bed: String::new(),
                }),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["location".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let token = ivan
        .issue_enrollment_token(v1::IssueEnrollmentTokenRequest {
            device_id: ed.id.clone(),
            ttl: None,
            replace: false,
        })
        .await;
    assert!(token.is_ok(), "it_provisioner issues tokens in its site: {token:?}");
    let sites = ivan
        .list_sites(v1::ListSitesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sites;
    assert_eq!(sites.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["stmarys"]);

    // Administration is for admins: the provisioner can neither grant nor mint credentials.
    let ivan_bundle = server.issue(&Identity::User("ivan".into()));
    let ivan_channel = server.channel(&ivan_bundle).await.unwrap();
    let status = AccessServiceClient::new(ivan_channel.clone())
        .grant(grant("medfleet://user/ivan", "admin", "*"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let (_, csr_der) = medfleet_proto::client::new_key_and_csr().unwrap();
    let status = medfleet_proto::v1::credential_service_client::CredentialServiceClient::new(ivan_channel)
        .issue_credentials(v1::IssueCredentialsRequest {
            kind: v1::PrincipalKind::User.into(),
            name: "admin".into(),
            csr_der,
            lifetime: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "only admins mint credentials");

    // Every refusal is in the audit trail.
    let db = server.db().await;
    let denials = medfleet_server::persistence::entity::audit_log::Entity::find()
        .filter(medfleet_server::persistence::entity::audit_log::Column::Outcome.eq("denied"))
        .all(&db)
        .await
        .unwrap();
    assert!(
        denials
            .iter()
            .any(|d| d.actor == "medfleet://user/ivan" && d.action.ends_with("/Grant")),
        "{denials:?}"
    );
    let revoke_denial = denials
        .iter()
        .find(|d| d.actor == "medfleet://user/bea" && d.action.ends_with("/RevokeDevice"))
        .expect("bea's refused revocation is audited");
    assert_eq!(
        revoke_denial.scope, "stmarys/icu",
        "a refusal is recorded under the target's scope"
    );
}
both_backends!(scopes_cover_wards_and_hide_the_rest, scopes);

async fn administration(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut access = access_client(&server).await;
    let code = |r: Result<tonic::Response<v1::GrantResponse>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(access.grant(grant("medfleet://user/x", "wizard", "*")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(access.grant(grant("medfleet://user/x", "biomed", "Bad Scope")).await),
        Code::InvalidArgument
    );
    let device = format!("medfleet://device/{}", uuid::Uuid::new_v4());
    assert_eq!(
        code(access.grant(grant(&device, "biomed", "*")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(access.revoke(grant("medfleet://user/x", "biomed", "*")).await),
        Code::NotFound
    );

    assert!(
        access
            .grant(grant("medfleet://service/epic", "emr_system", "stmarys"))
            .await
            .unwrap()
            .into_inner()
            .changed
    );
    assert!(
        !access
            .grant(grant("medfleet://service/epic", "emr_system", "stmarys"))
            .await
            .unwrap()
            .into_inner()
            .changed
    );
    let check = |action: &str, scope: &str| v1::CheckRequest {
        principal: "medfleet://service/epic".into(),
        object: "device".into(),
        action: action.into(),
        scope: scope.into(),
    };
    let allowed = access.check(check("read", "stmarys/icu")).await.unwrap().into_inner();
    assert!(allowed.allowed);
    assert!(
        allowed.explanation.contains("emr_system") && allowed.explanation.contains("stmarys"),
        "{}",
        allowed.explanation
    );
    let denied = access.check(check("update", "stmarys/icu")).await.unwrap().into_inner();
    assert!(!denied.allowed);
    assert!(denied.explanation.contains("deny by default"), "{}", denied.explanation);
    let listed = access
        .list_grants(v1::ListGrantsRequest {
            principal: "medfleet://service/epic".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(listed.len(), 1);
    access
        .revoke(grant("medfleet://service/epic", "emr_system", "stmarys"))
        .await
        .unwrap();
    assert!(
        !access
            .check(check("read", "stmarys/icu"))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
}
both_backends!(grants_are_validated_and_explained, administration);

async fn editable_roles(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (icu, _, _) = fleet(&server).await;
    let mut access = access_client(&server).await;
    access
        .grant(grant("medfleet://user/bea", "biomed", "stmarys"))
        .await
        .unwrap();
    let mut bea = as_user(&server, "bea").await;
    let tag_update = v1::UpdateDeviceRequest {
        device: Some(v1::Device {
            id: icu.id.clone(),
            tags: [("owner".to_owned(), "biomed".to_owned())].into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["tags".into()],
        }),
    };
    assert_eq!(
        bea.update_device(tag_update.clone()).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let permission = |action: &str| v1::PermissionRequest {
        permission: Some(v1::Permission {
            role: "biomed".into(),
            object: "device".into(),
            action: action.into(),
        }),
    };
    assert!(
        access
            .add_permission(permission("update"))
            .await
            .unwrap()
            .into_inner()
            .changed
    );
    bea.update_device(tag_update.clone()).await.unwrap();
    let listed = access
        .list_permissions(v1::ListPermissionsRequest { role: "biomed".into() })
        .await
        .unwrap()
        .into_inner()
        .permissions;
    assert!(
        listed.iter().any(|p| p.object == "device" && p.action == "update"),
        "{listed:?}"
    );
    access.remove_permission(permission("update")).await.unwrap();
    assert_eq!(
        bea.update_device(tag_update).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        access.remove_permission(permission("update")).await.unwrap_err().code(),
        Code::NotFound
    );
    let bad = access
        .add_permission(v1::PermissionRequest {
            permission: Some(v1::Permission {
                role: "biomed".into(),
                object: "patients".into(),
                action: "read".into(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}
both_backends!(role_permissions_are_editable_by_admins, editable_roles);

/// A grant made through one replica is enforced by another within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_reach_other_replicas_on_postgres() {
    if medfleet_e2e::skip_postgres() {
        return;
    }
    let storage = Storage::new(Backend::Postgres).await;
    let a = TestServer::start_on(storage.config()).await;
    let b = TestServer::start_on(storage.config()).await;
    let mut on_b = as_user(&b, "carol").await;
    assert_eq!(
        on_b.list_sites(v1::ListSitesRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    access_client(&a)
        .await
        .grant(grant("medfleet://user/carol", "auditor", "*"))
        .await
        .unwrap();
    let granted_at = std::time::Instant::now();
    // Observed, not slept on: B is asked until it allows, and must do so within the deadline.
    loop {
        if on_b.list_sites(v1::ListSitesRequest::default()).await.is_ok() {
            break;
        }
        assert!(
            granted_at.elapsed() < Duration::from_secs(1),
            "replica B still denied 1 s after the grant on replica A"
        );
        tokio::task::yield_now().await;
    }
}
