//! Clinical safety of the chart under the mistakes and partial views real hospitals produce: ADT events scoped to
//! the caller's wards, beds that are occupied, devices that move, names from the wrong source, start times typed
//! wrong, and receivers that come back after an outage while an entry's status changed twice.

use std::collections::HashMap;

use chrono::Utc;
use medfleet_core::identity::Identity;
use medfleet_e2e::receivers::{FhirReceiver, MllpReceiver};
use medfleet_e2e::{Backend, TestServer, both_backends};
use medfleet_proto::v1::{
    self, access_service_client::AccessServiceClient, audit_service_client::AuditServiceClient,
    observation_service_client::ObservationServiceClient, patient_service_client::PatientServiceClient,
    registry_service_client::RegistryServiceClient,
};
use sea_orm::ConnectionTrait as _;
use tonic::Code;
use tonic::transport::Channel;

use crate::clinical::{Publisher, cli, destinations, item, observations, patient, setup, ts};

fn location(site: &str, ward: &str, bed: &str) -> Option<v1::Location> {
    Some(v1::Location {
        site: site.into(),
        ward: ward.into(),
        bed: bed.into(),
    })
}

/// OBX-11 of a message's measurement (its last OBX: the ones before are the MDS/VMD/CHAN containers, status X).
fn result_status(message: &str) -> String {
    message
        .split('\r')
        .rfind(|s| s.starts_with("OBX|"))
        .and_then(|s| s.split('|').nth(11))
        .unwrap_or_default()
        .to_owned()
}

/// `setup`'s ICU monitor (stmarys/icu/1) plus an ED ward with beds 1 and 2 and a monitor at ed/1.
async fn icu_and_ed(server: &TestServer) -> (String, String) {
    let icu = setup(server).await;
    let mut admin = server.admin().await;
    admin
        .create_ward(v1::CreateWardRequest {
            ward: Some(v1::Ward {
                site: "stmarys".into(),
                name: "ed".into(),
                display_name: "Emergency".into(),
                beds: vec!["1".into(), "2".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let ed = admin
        .register_device(v1::RegisterDeviceRequest {
            serial_number: "MON-ED-1".into(),
            manufacturer: "Philips".into(),
            model: "MX450".into(),
            device_class: v1::DeviceClass::PatientMonitor.into(),
            eui64: "00-09-FB-FF-FE-12-34-57".into(),
            location: location("stmarys", "ed", "1"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    (icu, ed)
}

/// A feed destination with no filter ("all-feed"): fleet-wide chart entries.
async fn fleet_feed(admin: &Channel) {
    medfleet_proto::v1::emr_service_client::EmrServiceClient::new(admin.clone())
        .create_destination(v1::EmrDestination {
            name: "all-feed".into(),
            kind: v1::EmrDestinationKind::Feed.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// The reading stream of a registered device, over its own certificate.
async fn publisher_for(server: &TestServer, device: &str) -> Publisher {
    Publisher::open(as_principal(server, &Identity::Device(device.parse().unwrap())).await).await
}

async fn as_principal(server: &TestServer, identity: &Identity) -> Channel {
    server.channel(&server.issue(identity)).await.unwrap()
}

async fn grant(server: &TestServer, principal: &str, role: &str, scope: &str) {
    AccessServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap())
        .grant(v1::GrantRequest {
            grant: Some(v1::RoleGrant {
                principal: principal.into(),
                role: role.into(),
                scope: scope.into(),
            }),
        })
        .await
        .unwrap();
}

fn adt(kind: v1::AdtEventType, mrn: &str, name: &str, bed: Option<(&str, &str)>) -> v1::AdtEvent {
    let mut who = patient(mrn);
    if let Some(who) = who.as_mut() {
        name.clone_into(&mut who.display_name);
    }
    let (ward, bed) = bed.unwrap_or_default();
    v1::AdtEvent {
        r#type: kind.into(),
        patient: who,
        site: if ward.is_empty() {
            String::new()
        } else {
            "stmarys".into()
        },
        ward: ward.into(),
        bed: bed.into(),
        occurred_at: ts(Utc::now() - chrono::Duration::minutes(1)),
    }
}

/// Moves a device to a bed of St Mary's, as biomed would.
async fn move_device(admin: &Channel, device: &str, (ward, bed): (&str, &str)) {
    RegistryServiceClient::new(admin.clone())
        .update_device(v1::UpdateDeviceRequest {
            device: Some(v1::Device {
                id: device.to_owned(),
                location: location("stmarys", ward, bed),
                tags: HashMap::new(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["location".into()],
            }),
        })
        .await
        .unwrap();
}

/// The audit entries of one action, newest first.
async fn audit_events(channel: &Channel, action: &str) -> Vec<v1::AuditEvent> {
    AuditServiceClient::new(channel.clone())
        .list_audit_events(v1::ListAuditEventsRequest {
            action: action.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
}

async fn statuses(patients: &mut PatientServiceClient<Channel>, device: &str) -> Vec<(String, String)> {
    patients
        .list_associations(v1::ListAssociationsRequest {
            device_id: device.into(),
            patient: None,
        })
        .await
        .unwrap()
        .into_inner()
        .associations
        .into_iter()
        .map(|a| (a.patient.unwrap_or_default().identifier, a.status))
        .collect()
}

/// An ED clinician's ADT events change nothing outside the ED: a DISCHARGE leaves the patient's ICU monitor
/// charting (and says how many it left alone), an admit into an ICU bed is refused. A bed whose monitor is bound
/// to another patient is refused, not silently re-charted; a monitor that leaves its bed stops charting to the
/// bed's patient. Names: the EMR's ADT feed renames, a clinician's associate call does not.
async fn adt_events_act_only_inside_the_callers_scopes(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (icu, ed) = icu_and_ed(&server).await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    let mut patients = PatientServiceClient::new(admin.clone());
    patients
        .associate(v1::AssociateRequest {
            device_id: icu.clone(),
            patient: patient("MRN-X"),
            from: ts(Utc::now() - chrono::Duration::hours(1)),
            until: None,
        })
        .await
        .unwrap();

    grant(&server, "medfleet://user/edna", "clinician", "stmarys/ed").await;
    let mut edna = PatientServiceClient::new(as_principal(&server, &Identity::User("edna".into())).await);
    let discharged = edna
        .record_adt_event(adt(v1::AdtEventType::Discharge, "MRN-X", "", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(discharged.ended.len(), 0, "{discharged:?}");
    assert_eq!(discharged.left_out_of_scope, 1);
    assert_eq!(
        statuses(&mut patients, &icu).await,
        vec![("MRN-X".to_owned(), "active".to_owned())]
    );
    let refused = edna
        .record_adt_event(adt(v1::AdtEventType::Admit, "MRN-X", "", Some(("icu", "1"))))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("stmarys/icu"), "{}", refused.message());

    // The ICU monitor still charts to the patient.
    let mut publisher = publisher_for(&server, &icu).await;
    let ack = publisher
        .send(
            1,
            vec![item("147842", 70.0, "/min", Utc::now() - chrono::Duration::seconds(5))],
        )
        .await;
    assert_eq!(ack.accepted, 1);
    let mut chart = ObservationServiceClient::new(admin.clone());
    assert_eq!(observations(&mut chart, "MRN-X").await.len(), 1);

    // Inside her ward she acts: admit into ED bed 1 binds its monitor. The display name she sends is kept for a
    // new patient.
    let admitted = edna
        .record_adt_event(adt(v1::AdtEventType::Admit, "MRN-Y", "Roe^Ann", Some(("ed", "1"))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(admitted.started.len(), 1);
    assert_eq!(admitted.started[0].device_id, ed);
    // Another patient into the occupied bed: refused, the first patient's association stands.
    let occupied = patients
        .record_adt_event(adt(v1::AdtEventType::Admit, "MRN-Z", "", Some(("ed", "1"))))
        .await
        .unwrap_err();
    assert_eq!(occupied.code(), Code::FailedPrecondition, "{occupied:?}");
    assert!(occupied.message().contains("another patient"), "{}", occupied.message());
    assert_eq!(
        statuses(&mut patients, &ed).await,
        vec![("MRN-Y".to_owned(), "active".to_owned())]
    );

    // A clinician's associate call does not rename an existing patient; the EMR's ADT feed does.
    patients
        .associate(v1::AssociateRequest {
            device_id: icu.clone(),
            patient: Some(v1::PatientIdentifier {
                identifier: "MRN-Y".into(),
                authority: "HOSP".into(),
                display_name: "Wrong^Name".into(),
            }),
            // Before the ICU association: a closed period in the past.
            from: ts(Utc::now() - chrono::Duration::hours(3)),
            until: ts(Utc::now() - chrono::Duration::hours(2)),
        })
        .await
        .unwrap();
    let name_of = |rows: Vec<v1::Association>| {
        rows.into_iter()
            .find(|a| a.patient.as_ref().is_some_and(|p| p.identifier == "MRN-Y"))
            .and_then(|a| a.patient)
            .map(|p| p.display_name)
    };
    let listed = || v1::ListAssociationsRequest {
        device_id: String::new(),
        patient: patient("MRN-Y"),
    };
    let rows = patients
        .list_associations(listed())
        .await
        .unwrap()
        .into_inner()
        .associations;
    assert_eq!(name_of(rows).as_deref(), Some("Roe^Ann"));
    grant(&server, "medfleet://service/epic", "emr_system", "*").await;
    let mut epic = PatientServiceClient::new(as_principal(&server, &Identity::Service("epic".into())).await);
    epic.record_adt_event(adt(v1::AdtEventType::Admit, "MRN-Y", "Roe^Anne", Some(("ed", "1"))))
        .await
        .unwrap();
    let rows = patients
        .list_associations(listed())
        .await
        .unwrap()
        .into_inner()
        .associations;
    assert_eq!(name_of(rows).as_deref(), Some("Roe^Anne"));
    // A person's ADT event (a clinician testing the feed) does not rename; only the EMR's integration does.
    edna.record_adt_event(adt(v1::AdtEventType::Admit, "MRN-Y", "Evil^Name", Some(("ed", "1"))))
        .await
        .unwrap();
    let rows = patients
        .list_associations(listed())
        .await
        .unwrap()
        .into_inner()
        .associations;
    assert_eq!(name_of(rows).as_deref(), Some("Roe^Anne"));
    let renames = audit_events(&admin, "patient.update").await;
    assert_eq!(renames.len(), 1, "{renames:?}");
    assert_eq!(renames[0].actor, "medfleet://service/epic");
    assert!(
        !renames[0].detail.contains("Roe"),
        "no name in the audit trail: {}",
        renames[0].detail
    );

    // The ED monitor moves to bed 2: the ADT association of bed 1 ends with the move.
    move_device(&admin, &ed, ("ed", "2")).await;
    assert_eq!(
        statuses(&mut patients, &ed).await,
        vec![("MRN-Y".to_owned(), "ended".to_owned())]
    );
    let ends = audit_events(&admin, "association.end").await;
    assert!(
        ends.iter()
            .any(|e| e.detail.contains("moved away") && !e.detail.contains("MRN-Y")),
        "the move's end of the association is audited: {ends:?}"
    );
    let mut publisher = publisher_for(&server, &ed).await;
    let ack = publisher.send(1, vec![item("147842", 88.0, "/min", Utc::now())]).await;
    assert_eq!(ack.accepted, 1);
    assert!(
        observations(&mut chart, "MRN-Y").await.is_empty(),
        "a moved monitor does not chart to the patient of its old bed"
    );
}

both_backends!(
    adt_events_act_only_inside_the_callers_scopes,
    adt_events_act_only_inside_the_callers_scopes
);

/// A start time typed into the future can be cancelled (and the error says how), after which an open-ended
/// association is possible.
async fn a_planned_association_can_be_cancelled(backend: Backend) {
    let server = TestServer::start(backend).await;
    let device = setup(&server).await;
    let (ok, out, err) = cli(
        &server,
        &[
            "patients",
            "associate",
            &device,
            "MRN-T",
            "--authority",
            "HOSP",
            "--from",
            "2031-01-01T00:00:00Z",
        ],
    );
    assert!(ok, "{out}{err}");
    let (ok, _, err) = cli(&server, &["patients", "dissociate", &device]);
    assert!(!ok);
    assert!(err.contains("--cancel-planned"), "the error says how: {err}");
    let (ok, _, err) = cli(
        &server,
        &["patients", "associate", &device, "MRN-T", "--authority", "HOSP"],
    );
    assert!(!ok);
    assert!(err.contains("--cancel-planned"), "the error says how: {err}");
    let (ok, out, err) = cli(
        &server,
        &["patients", "dissociate", &device, "--cancel-planned", "-o", "json"],
    );
    assert!(ok, "{out}{err}");
    let cancelled: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cancelled["status"], "cancelled", "{out}");
    let (ok, out, err) = cli(
        &server,
        &["patients", "associate", &device, "MRN-T", "--authority", "HOSP"],
    );
    assert!(ok, "{out}{err}");
    // With a past --at there is still nothing planned: the open association is not cancelled.
    let (ok, _, err) = cli(
        &server,
        &[
            "patients",
            "dissociate",
            &device,
            "--cancel-planned",
            "--at",
            "2020-01-01T00:00:00Z",
        ],
    );
    assert!(!ok, "an open association was cancelled as planned");
    assert!(!err.is_empty());
    let (ok, out, _) = cli(
        &server,
        &["audit", "list", "--action", "association.cancel", "-o", "json"],
    );
    assert!(ok);
    assert!(out.contains("association.cancel"), "{out}");
}

both_backends!(
    a_planned_association_can_be_cancelled,
    a_planned_association_can_be_cancelled
);

/// Receivers down while an entry is validated and then retracted: when they are back, each ends with the entry
/// entered-in-error, and the older status is never sent after the newer one (superseded instead).
async fn status_changes_of_one_entry_arrive_in_order(backend: Backend) {
    let server = TestServer::start(backend).await;
    let device = setup(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let fhir = FhirReceiver::start(dir.path()).await;
    let mllp = MllpReceiver::start().await;
    destinations(&server, &fhir, &mllp).await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    PatientServiceClient::new(admin.clone())
        .associate(v1::AssociateRequest {
            device_id: device.clone(),
            patient: patient("MRN-O"),
            from: ts(Utc::now() - chrono::Duration::hours(1)),
            until: None,
        })
        .await
        .unwrap();
    let mut publisher = publisher_for(&server, &device).await;
    let ack = publisher
        .send(
            1,
            vec![item("147842", 75.0, "/min", Utc::now() - chrono::Duration::seconds(3))],
        )
        .await;
    assert_eq!(ack.accepted, 1);
    fhir.wait("the entry created", |log| log.created.len() == 1).await;
    mllp.wait("the entry sent", |log| log.by_control_id.len() == 1).await;
    let mut chart = ObservationServiceClient::new(admin.clone());
    let id = observations(&mut chart, "MRN-O").await[0].id.clone();

    // Both receivers refuse the next attempt (FHIR 503, HL7 AE): the validation backs off.
    fhir.log.lock().unwrap().fail_next = 1;
    mllp.log.lock().unwrap().reject_next = 1;
    let set = |status: &str| v1::SetObservationStatusRequest {
        observation_ids: vec![id.clone()],
        status: status.into(),
    };
    chart.set_observation_status(set("final")).await.unwrap();
    fhir.wait("the validation refused", |log| log.fail_next == 0).await;
    mllp.wait("the validation refused", |log| log.reject_next == 0).await;
    chart.set_observation_status(set("entered-in-error")).await.unwrap();

    fhir.wait("the retraction", |log| {
        log.status.values().next().map(String::as_str) == Some("entered-in-error")
    })
    .await;
    mllp.wait("the retraction", |log| {
        log.messages.last().is_some_and(|m| result_status(m) == "W")
    })
    .await;
    // Nothing older is left to send after it: the validation was superseded, not retried.
    let mut emr = medfleet_proto::v1::emr_service_client::EmrServiceClient::new(admin);
    for destination in ["fhir", "hl7"] {
        let deliveries = emr
            .list_deliveries(v1::ListDeliveriesRequest {
                destination: destination.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .deliveries;
        let of = |status: &str| {
            deliveries
                .iter()
                .filter(|d| d.observation_id == id && d.status == status)
                .map(|d| d.state.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(of("final"), vec!["superseded"], "{destination}: {deliveries:?}");
        assert_eq!(of("preliminary"), vec!["delivered"], "{destination}: {deliveries:?}");
    }
    assert_eq!(
        fhir.log.lock().unwrap().status.values().next().map(String::as_str),
        Some("entered-in-error")
    );
    let last = mllp.log.lock().unwrap().messages.last().cloned().unwrap_or_default();
    assert_eq!(result_status(&last), "W");
}

both_backends!(
    status_changes_of_one_entry_arrive_in_order,
    status_changes_of_one_entry_arrive_in_order
);

/// A batch refused whole is answered in its ack and the stream goes on; a message the server cannot take at all
/// ends the stream with a status that says so, after the acks of the batches committed before it.
async fn bad_batches_are_answered_not_swallowed(backend: Backend) {
    let server = TestServer::start(backend).await;
    let device = setup(&server).await;
    let channel = as_principal(&server, &Identity::Device(device.parse().unwrap())).await;
    let mut publisher = Publisher::open(channel).await;
    let at = Utc::now() - chrono::Duration::seconds(2);
    let refused = publisher.send(0, vec![item("147842", 70.0, "/min", at)]).await;
    assert_eq!(
        refused.batch_rejection.as_ref().map(|r| r.code.as_str()),
        Some("sequence_out_of_range")
    );
    let too_many: Vec<v1::ReadingItem> = (0..1_001).map(|_| item("147842", 70.0, "/min", at)).collect();
    let refused = publisher.send(1, too_many).await;
    assert_eq!(
        refused.batch_rejection.as_ref().map(|r| r.code.as_str()),
        Some("too_many_items")
    );
    // The stream is still open: the next batch is stored.
    let ack = publisher.send(1, vec![item("147842", 71.0, "/min", at)]).await;
    assert_eq!((ack.sequence, ack.accepted, ack.batch_rejection), (1, 1, None));

    // A valid batch, then one over the message size limit without waiting: the first is acked, then the stream
    // ends with RESOURCE_EXHAUSTED (never a silent OK).
    publisher
        .tx
        .send(v1::ReadingBatch {
            sequence: 2,
            items: vec![item("147842", 72.0, "/min", at)],
        })
        .await
        .unwrap();
    let mut huge = item("147842", 73.0, "/min", at);
    huge.unit = "x".repeat(5 << 20);
    publisher
        .tx
        .send(v1::ReadingBatch {
            sequence: 3,
            items: vec![huge],
        })
        .await
        .unwrap();
    let first = tokio::time::timeout(crate::clinical::GUARD, publisher.acks.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((first.sequence, first.accepted), (2, 1));
    let ended = tokio::time::timeout(crate::clinical::GUARD, publisher.acks.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");
    assert!(ended.message().contains("items per batch"), "{}", ended.message());
}

both_backends!(
    bad_batches_are_answered_not_swallowed,
    bad_batches_are_answered_not_swallowed
);

/// Refusals reach the audit trail through one path, named by identity and coalesced: a device looping forbidden
/// calls writes one row per window (its serial a detail) while another device's readings keep being acked; a
/// handler's refusal (a feed outside the caller's scopes, a session for another device) is audited too; a refused
/// Subscribe creates nothing, and subscription names are per principal.
async fn refusals_are_audited_once_per_window_by_identity(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (icu, ed) = icu_and_ed(&server).await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    let looping = as_principal(&server, &Identity::Device(ed.parse().unwrap())).await;
    let mut publisher = publisher_for(&server, &icu).await;
    let forbidden = async {
        let mut registry = RegistryServiceClient::new(looping.clone());
        for _ in 0..200 {
            let refused = registry
                .list_devices(v1::ListDevicesRequest::default())
                .await
                .unwrap_err();
            assert_eq!(refused.code(), Code::PermissionDenied);
        }
    };
    let publishing = async {
        for sequence in 1..=20 {
            let ack = publisher
                .send(
                    sequence,
                    vec![item("147842", 70.0, "/min", Utc::now() - chrono::Duration::seconds(1))],
                )
                .await;
            assert_eq!(ack.accepted, 1);
        }
    };
    tokio::join!(forbidden, publishing);
    let mut audit = AuditServiceClient::new(admin.clone());
    let actor = format!("medfleet://device/{ed}");
    let rows = |action: &str| v1::ListAuditEventsRequest {
        actor: actor.clone(),
        action: action.into(),
        page_size: 500,
        ..Default::default()
    };
    let listed = audit
        .list_audit_events(rows("/medfleet.v1.RegistryService/ListDevices"))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(listed.len(), 1, "one row for the window, not one per call: {listed:?}");
    assert_eq!(listed[0].outcome, "denied");
    assert!(listed[0].detail.contains("certificate "), "{}", listed[0].detail);

    // A session that claims another device: refused by the handler, audited as impersonation.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(v1::SessionRequest {
        message: Some(v1::session_request::Message::Hello(v1::Hello {
            device_id: icu.clone(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let refused = medfleet_proto::v1::device_service_client::DeviceServiceClient::new(looping)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let listed = audit
        .list_audit_events(rows("/medfleet.v1.DeviceService/Session"))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].detail.contains("impersonation"), "{}", listed[0].detail);

    // A ward-scoped integration may not follow a fleet-wide feed: refused, audited, and nothing created.
    fleet_feed(&admin).await;
    grant(&server, "medfleet://service/ward-bridge", "emr_system", "stmarys/ed").await;
    let ward_bridge = as_principal(&server, &Identity::Service("ward-bridge".into())).await;
    let mut feed = medfleet_proto::v1::feed_service_client::FeedServiceClient::new(ward_bridge);
    let subscribe = |name: &str| v1::SubscribeRequest {
        subscription: name.into(),
        destination: "all-feed".into(),
    };
    let refused = feed.subscribe(subscribe("shared")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let unknown = feed
        .acknowledge(v1::AcknowledgeRequest {
            subscription: "shared".into(),
            cursor: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(
        unknown.code(),
        Code::NotFound,
        "a refused Subscribe leaves nothing behind: {unknown:?}"
    );
    let listed = audit
        .list_audit_events(v1::ListAuditEventsRequest {
            actor: "medfleet://service/ward-bridge".into(),
            action: "/medfleet.v1.FeedService/Subscribe".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(listed.len(), 1, "{listed:?}");

    // Names are per principal: two fleet-wide integrations both use "shared", each with its own cursor.
    for service in ["epic", "cerner"] {
        grant(&server, &format!("medfleet://service/{service}"), "emr_system", "*").await;
        let channel = as_principal(&server, &Identity::Service(service.into())).await;
        let mut feed = medfleet_proto::v1::feed_service_client::FeedServiceClient::new(channel);
        feed.subscribe(subscribe("shared")).await.unwrap();
    }
}

both_backends!(
    refusals_are_audited_once_per_window_by_identity,
    refusals_are_audited_once_per_window_by_identity
);

/// Revoking a role ends the streams it opened: a PHI feed and a device watch end with PERMISSION_DENIED instead of
/// running on for days.
async fn revoking_a_role_ends_its_open_streams(backend: Backend) {
    let server = TestServer::start(backend).await;
    setup(&server).await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    fleet_feed(&admin).await;
    grant(&server, "medfleet://service/epic", "emr_system", "*").await;
    let epic = as_principal(&server, &Identity::Service("epic".into())).await;
    let mut feed = medfleet_proto::v1::feed_service_client::FeedServiceClient::new(epic.clone())
        .subscribe(v1::SubscribeRequest {
            subscription: "main".into(),
            destination: "all-feed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut watch = RegistryServiceClient::new(epic)
        .watch_devices(v1::WatchDevicesRequest {
            initial: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The initial listing arrives: the watch is live.
    assert!(watch.message().await.unwrap().is_some());
    AccessServiceClient::new(admin.clone())
        .revoke(v1::GrantRequest {
            grant: Some(v1::RoleGrant {
                principal: "medfleet://service/epic".into(),
                role: "emr_system".into(),
                scope: "*".into(),
            }),
        })
        .await
        .unwrap();
    let ended = tokio::time::timeout(crate::clinical::GUARD, feed.message())
        .await
        .expect("the feed outlived the revocation")
        .unwrap_err();
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    let ended = tokio::time::timeout(crate::clinical::GUARD, async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => {}
                other => return other,
            }
        }
    })
    .await
    .expect("the watch outlived the revocation")
    .unwrap_err();
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    // Both closings are in the trail as refusals of the integration.
    let closed = AuditServiceClient::new(admin)
        .list_audit_events(v1::ListAuditEventsRequest {
            actor: "medfleet://service/epic".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let closed: Vec<_> = closed
        .iter()
        .filter(|e| e.outcome == "denied" && e.detail.contains("open stream closed"))
        .map(|e| e.action.as_str())
        .collect();
    assert!(
        closed.contains(&"feed.subscribe") && closed.contains(&"device.read"),
        "{closed:?}"
    );
}

both_backends!(
    revoking_a_role_ends_its_open_streams,
    revoking_a_role_ends_its_open_streams
);

/// Where chart entries may go is an admin's decision, within the hosts the server allows; MLLP in clear needs an
/// explicit flag that the audit trail records.
async fn destinations_are_admin_only_and_pinned_to_allowed_hosts(backend: Backend) {
    let storage = medfleet_e2e::Storage::new(backend).await;
    let mut config = storage.config();
    config.emr_allowed_hosts = vec!["127.0.0.1".into(), "*.hospital.example".into()];
    let server = TestServer::start_on(config).await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    let mut emr = medfleet_proto::v1::emr_service_client::EmrServiceClient::new(admin.clone());
    let mllp = |insecure: bool| v1::EmrDestination {
        name: "hl7".into(),
        kind: v1::EmrDestinationKind::Mllp.into(),
        endpoint: "127.0.0.1:2575".into(),
        insecure_plaintext: insecure,
        ..Default::default()
    };
    let refused = emr.create_destination(mllp(false)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("insecure_plaintext"),
        "{}",
        refused.message()
    );
    let created = emr.create_destination(mllp(true)).await.unwrap().into_inner();
    assert_eq!(created.enabled, Some(true), "enabled unless said otherwise");
    assert!(created.insecure_plaintext);
    let outside = emr
        .create_destination(v1::EmrDestination {
            name: "elsewhere".into(),
            kind: v1::EmrDestinationKind::Fhir.into(),
            endpoint: "https://collector.attacker.example/fhir".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(outside.code(), Code::InvalidArgument);
    assert!(outside.message().contains("emr_allowed_hosts"), "{}", outside.message());
    emr.create_destination(v1::EmrDestination {
        name: "epic".into(),
        kind: v1::EmrDestinationKind::Fhir.into(),
        endpoint: "https://fhir.hospital.example/R4".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let trail = audit_events(&admin, "emr_destination.create").await;
    assert!(
        trail.iter().any(|e| e.detail.contains("INSECURE PLAINTEXT")),
        "{trail:?}"
    );

    // An IT provisioner reads destinations and retries deliveries, but creates none.
    grant(&server, "medfleet://user/ivan", "it_provisioner", "*").await;
    let mut ivan = medfleet_proto::v1::emr_service_client::EmrServiceClient::new(
        as_principal(&server, &Identity::User("ivan".into())).await,
    );
    let refused = ivan
        .create_destination(v1::EmrDestination {
            name: "mine".into(),
            kind: v1::EmrDestinationKind::Feed.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    ivan.retry_deliveries(v1::RetryDeliveriesRequest {
        destination: "hl7".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        ivan.list_destinations(v1::ListDestinationsRequest {})
            .await
            .unwrap()
            .into_inner()
            .destinations
            .len(),
        2
    );
}

both_backends!(
    destinations_are_admin_only_and_pinned_to_allowed_hosts,
    destinations_are_admin_only_and_pinned_to_allowed_hosts
);

/// An import naming no device is judged fleet-wide by the RPC layer, never handed to the handler unchecked.
async fn an_empty_import_is_judged_fleet_wide(backend: Backend) {
    let server = TestServer::start(backend).await;
    setup(&server).await;
    grant(&server, "medfleet://user/ivan", "it_provisioner", "stmarys").await;
    let mut ivan = RegistryServiceClient::new(as_principal(&server, &Identity::User("ivan".into())).await);
    let refused = ivan
        .import_devices(v1::ImportDevicesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("scope *"), "{}", refused.message());
}

both_backends!(
    an_empty_import_is_judged_fleet_wide,
    an_empty_import_is_judged_fleet_wide
);

/// Reads of a patient's data are audited like writes (who read which patient, by internal id, never the MRN),
/// coalesced so repeated listings and a busy feed do not write a row per call or per event.
async fn reads_of_patient_data_are_audited(backend: Backend) {
    let server = TestServer::start(backend).await;
    let device = setup(&server).await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    fleet_feed(&admin).await;
    PatientServiceClient::new(admin.clone())
        .associate(v1::AssociateRequest {
            device_id: device.clone(),
            patient: patient("MRN-R"),
            from: ts(Utc::now() - chrono::Duration::hours(1)),
            until: None,
        })
        .await
        .unwrap();
    let mut publisher = publisher_for(&server, &device).await;
    for sequence in 1..=3 {
        let at = Utc::now() - chrono::Duration::seconds(10 - i64::try_from(sequence).unwrap());
        assert_eq!(
            publisher
                .send(sequence, vec![item("147842", 70.0, "/min", at)])
                .await
                .accepted,
            1
        );
    }
    grant(&server, "medfleet://user/carla", "clinician", "stmarys/icu").await;
    let carla = as_principal(&server, &Identity::User("carla".into())).await;
    let mut chart = ObservationServiceClient::new(carla);
    for _ in 0..5 {
        assert_eq!(observations(&mut chart, "MRN-R").await.len(), 3);
    }
    grant(&server, "medfleet://service/epic", "emr_system", "*").await;
    let epic = as_principal(&server, &Identity::Service("epic".into())).await;
    let mut feed = medfleet_proto::v1::feed_service_client::FeedServiceClient::new(epic)
        .subscribe(v1::SubscribeRequest {
            subscription: "main".into(),
            destination: "all-feed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        feed.message().await.unwrap().unwrap();
    }
    let mut audit = AuditServiceClient::new(admin);
    let rows = |actor: &str, action: &str| v1::ListAuditEventsRequest {
        actor: actor.into(),
        action: action.into(),
        ..Default::default()
    };
    let read = audit
        .list_audit_events(rows("medfleet://user/carla", "phi.read.observations"))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(read.len(), 1, "five listings within the window, one row: {read:?}");
    assert!(read[0].target.starts_with("patient/"), "{read:?}");
    assert_eq!(read[0].scope, "stmarys/icu");
    let fed = audit
        .list_audit_events(rows("medfleet://service/epic", "phi.read.feed"))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(fed.len(), 1, "{fed:?}");
    assert_eq!(fed[0].target, read[0].target, "the same patient, by internal id");
    let created = audit
        .list_audit_events(rows("medfleet://service/epic", "feed_subscription.create"))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(created.len(), 1);
    let everything = format!("{read:?}{fed:?}{created:?}");
    assert!(!everything.contains("MRN-R"), "no MRN in the audit trail");
}

both_backends!(reads_of_patient_data_are_audited, reads_of_patient_data_are_audited);

/// Alarm limits come from the device's resolved configuration: on a neonatal ward a heart rate of 90 is a breach
/// (charted at once through an interval destination, flagged L with OBX-7 showing the limits applied); the adult
/// defaults apply where nothing is configured.
async fn alarm_limits_come_from_the_device_configuration(backend: Backend) {
    let server = TestServer::start(backend).await;
    let device = setup(&server).await;
    let mllp = MllpReceiver::start().await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    medfleet_proto::v1::emr_service_client::EmrServiceClient::new(admin.clone())
        .create_destination(v1::EmrDestination {
            name: "hl7".into(),
            kind: v1::EmrDestinationKind::Mllp.into(),
            endpoint: mllp.addr.to_string(),
            interval_seconds: 3600,
            insecure_plaintext: true,
            ..Default::default()
        })
        .await
        .unwrap();
    PatientServiceClient::new(admin.clone())
        .associate(v1::AssociateRequest {
            device_id: device.clone(),
            patient: patient("MRN-N"),
            from: ts(Utc::now() - chrono::Duration::hours(1)),
            until: None,
        })
        .await
        .unwrap();
    let mut publisher = publisher_for(&server, &device).await;
    let at = |s: i64| Utc::now() - chrono::Duration::seconds(s);
    // Adult defaults: 90/min is normal, 150/min a breach.
    assert_eq!(
        publisher
            .send(1, vec![item("147842", 90.0, "/min", at(30))])
            .await
            .accepted,
        1
    );
    assert_eq!(
        publisher
            .send(2, vec![item("147842", 150.0, "/min", at(29))])
            .await
            .accepted,
        1
    );
    mllp.wait("the adult breach", |log| log.by_control_id.len() == 1).await;
    let last = mllp.log.lock().unwrap().messages.last().cloned().unwrap_or_default();
    let obx = last
        .split('\r')
        .rfind(|s| s.starts_with("OBX|"))
        .unwrap_or_default()
        .to_owned();
    assert_eq!(obx.split('|').nth(5), Some("150"), "{obx}");
    assert_eq!(obx.split('|').nth(7), Some("40-140"), "{obx}");

    // Limits medfleet would ignore are refused when written, not replaced by the defaults in silence.
    let mut configs = medfleet_proto::v1::config_service_client::ConfigServiceClient::new(admin);
    let ward = |document: &str| v1::SetConfigRequest {
        layer: Some(v1::ConfigLayer {
            kind: v1::ConfigLayerKind::Ward.into(),
            key: "stmarys/icu".into(),
        }),
        document_json: document.into(),
        comment: "neonatal limits".into(),
    };
    for (document, pointer) in [
        (
            r#"{"alarm": {"heart_rate": {"low": 180, "high": 100}}}"#,
            "/alarm/heart_rate",
        ),
        (r#"{"alarm": {"heartrate": {"low": 100}}}"#, "/alarm/heartrate"),
        (r#"{"alarm": {"spo2": {"low": 0.9, "high": 1.0}}}"#, "/alarm/spo2"),
    ] {
        let refused = configs.set_config(ward(document)).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{document}: {refused:?}");
        assert!(refused.message().contains(pointer), "{document}: {}", refused.message());
    }
    // The neonatal ward's configuration: 100-180/min.
    configs
        .set_config(ward(r#"{"alarm": {"heart_rate": {"low": 100, "high": 180}}}"#))
        .await
        .unwrap();
    assert_eq!(
        publisher
            .send(3, vec![item("147842", 150.0, "/min", at(20))])
            .await
            .accepted,
        1
    );
    assert_eq!(
        publisher
            .send(4, vec![item("147842", 90.0, "/min", at(19))])
            .await
            .accepted,
        1
    );
    mllp.wait("the neonatal breach", |log| log.by_control_id.len() == 2)
        .await;
    let log = mllp.log.lock().unwrap();
    assert_eq!(log.by_control_id.len(), 2, "150/min is no breach on this ward");
    let last = log.messages.last().cloned().unwrap_or_default();
    let obx = last
        .split('\r')
        .rfind(|s| s.starts_with("OBX|"))
        .unwrap_or_default()
        .to_owned();
    assert_eq!(obx.split('|').nth(5), Some("90"), "{obx}");
    assert_eq!(obx.split('|').nth(7), Some("100-180"), "{obx}");
    assert!(
        obx.split('|')
            .nth(8)
            .is_some_and(|f| f.split('~').any(|flag| flag == "L")),
        "{obx}"
    );
}

both_backends!(
    alarm_limits_come_from_the_device_configuration,
    alarm_limits_come_from_the_device_configuration
);

fn agent(args: &[&str], state: &std::path::Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(medfleet_e2e::binary("medfleet-agent"));
    command.args(args).arg("--state-dir").arg(state);
    command
}

fn token_of(stdout: &str) -> String {
    let view: serde_json::Value = serde_json::from_str(stdout).unwrap();
    view["token"].as_str().unwrap().to_owned()
}

/// A token for an enrolled, online, charting monitor needs `--replace` and says what it would cut; the monitor's
/// own agent re-enrolled with it keeps its state directory and delivers what it buffered under the new certificate.
async fn reenrolling_a_live_device_needs_replace_and_keeps_its_buffer(backend: Backend) {
    let server = TestServer::start(backend).await;
    let device = setup(&server).await;
    let ca = server.data_dir().ca_cert();
    let state = tempfile::tempdir().unwrap();
    let (ok, first, err) = cli(&server, &["devices", "enroll-token", &device, "-o", "json"]);
    assert!(ok, "a device never enrolled needs no --replace: {err}");
    let enrolled = agent(
        &["enroll", "--server", &server.url(), "--token", &token_of(&first)],
        state.path(),
    )
    .arg("--ca")
    .arg(&ca)
    .output()
    .await
    .unwrap();
    assert!(enrolled.status.success(), "{enrolled:?}");
    PatientServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap())
        .associate(v1::AssociateRequest {
            device_id: device.clone(),
            patient: patient("MRN-RE"),
            from: ts(Utc::now() - chrono::Duration::hours(1)),
            until: None,
        })
        .await
        .unwrap();
    let online = crate::binaries::Process::spawn(agent(&["run", "--heartbeat", "1s"], state.path()));
    online.wait_for("session established", 1).await;

    let refused = std::process::Command::new(medfleet_e2e::binary("medfleet"))
        .args(["--server", &server.url(), "--credentials"])
        .arg(server.data_dir().admin_bundle())
        .args(["devices", "enroll-token", &device])
        .output()
        .unwrap();
    let message = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(5), "{message}");
    for says in [
        "is enrolled",
        "is online now",
        "is charting to a patient",
        "--replace",
        "--reenroll",
    ] {
        assert!(message.contains(says), "the refusal does not say '{says}': {message}");
    }
    assert!(!message.contains("MRN-RE"), "{message}");
    let (status, _) = online.terminate().await;
    assert!(status.success());

    // Cut off from medfleetd, the monitor keeps measuring into its buffer.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let offline = crate::binaries::Process::spawn(agent(
        &[
            "run",
            "--server",
            &format!("https://{closed}"),
            "--vitals-interval",
            "20ms",
            "--vitals-count",
            "5",
        ],
        state.path(),
    ));
    offline.wait_for("measurements finished", 1).await;
    let (status, _) = offline.terminate().await;
    assert!(status.success());
    let buffered = |dir: &std::path::Path| {
        std::fs::read_dir(dir.join("outbox"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("batch-"))
            .count()
    };
    assert_eq!(buffered(state.path()), 5);

    let (ok, replaced, err) = cli(
        &server,
        &["devices", "enroll-token", &device, "--replace", "-o", "json"],
    );
    assert!(ok, "{err}");
    let token = token_of(&replaced);
    let plain = agent(&["enroll", "--server", &server.url(), "--token", &token], state.path())
        .arg("--ca")
        .arg(&ca)
        .output()
        .await
        .unwrap();
    assert!(!plain.status.success());
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("--reenroll"),
        "{plain:?}"
    );
    let again = agent(
        &["enroll", "--reenroll", "--server", &server.url(), "--token", &token],
        state.path(),
    )
    .arg("--ca")
    .arg(&ca)
    .output()
    .await
    .unwrap();
    assert!(again.status.success(), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("5 buffered batches"),
        "{again:?}"
    );

    // Under its new certificate the monitor delivers the five buffered batches, charted to its patient.
    let back = crate::binaries::Process::spawn(agent(&["run", "--heartbeat", "1s"], state.path()));
    back.wait_for("readings acknowledged", 5).await;
    let (status, logs) = back.terminate().await;
    assert!(status.success(), "{logs}");
    assert_eq!(buffered(state.path()), 0, "{logs}");
    let mut read = ObservationServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap());
    let charted = observations(&mut read, "MRN-RE").await;
    assert_eq!(
        charted.len(),
        5 * 5,
        "every buffered measurement reaches the chart once"
    );

    let db = server.db().await;
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!(
                "SELECT revocation_reason FROM certificates WHERE identity = 'medfleet://device/{device}' \
                 ORDER BY issued_at"
            ),
        ))
        .await
        .unwrap();
    let reasons: Vec<Option<String>> = rows
        .iter()
        .map(|r| r.try_get_by_index::<Option<String>>(0).unwrap())
        .collect();
    assert_eq!(
        reasons,
        [Some("superseded".to_owned()), None],
        "the old certificate is retired"
    );
    let issued = audit_events(
        &server.channel(&server.admin_bundle()).await.unwrap(),
        "enrollment.token.issue",
    )
    .await;
    assert!(
        issued.iter().any(|e| e.detail.contains("replaces certificate")),
        "{issued:?}"
    );
}

both_backends!(
    reenrolling_a_live_device_needs_replace_and_keeps_its_buffer,
    reenrolling_a_live_device_needs_replace_and_keeps_its_buffer
);

/// Backdating an association over a long stretch of stored readings charts them in bounded transactions: the
/// first chunk at once, the rest in the background, every reading in its period exactly once and nothing outside.
async fn retroactive_charting_runs_in_chunks_exactly_once(backend: Backend) {
    let server = TestServer::start(backend).await;
    let device = setup(&server).await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    fleet_feed(&admin).await;
    let mut feed = v1::feed_service_client::FeedServiceClient::new(admin.clone())
        .subscribe(v1::SubscribeRequest {
            subscription: "chunks".into(),
            destination: "all-feed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let start = Utc::now() - chrono::Duration::hours(3);
    let mut publisher = publisher_for(&server, &device).await;
    // Ten readings before the period, then 3,000 inside it, one a second.
    let before: Vec<_> = (1..=10)
        .map(|s| item("147842", 70.0, "/min", start - chrono::Duration::seconds(s)))
        .collect();
    assert_eq!(publisher.send(1, before).await.accepted, 10);
    for batch in 0..3i64 {
        let items: Vec<_> = (0..1000i64)
            .map(|i| {
                item(
                    "147842",
                    72.0,
                    "/min",
                    start + chrono::Duration::seconds(batch * 1000 + i),
                )
            })
            .collect();
        let sequence = u64::try_from(batch).unwrap() + 2;
        assert_eq!(publisher.send(sequence, items).await.accepted, 1000);
    }
    let made = PatientServiceClient::new(admin.clone())
        .associate(v1::AssociateRequest {
            device_id: device.clone(),
            patient: patient("MRN-CHUNK"),
            from: ts(start),
            until: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        made.charted_retroactively, 2000,
        "one chunk in the association's own transaction"
    );
    assert_eq!(made.charting_backlog, 1000);

    let mut entries = std::collections::HashSet::new();
    while entries.len() < 3000 {
        let event = tokio::time::timeout(crate::clinical::GUARD, feed.message())
            .await
            .expect("the backlog stopped")
            .unwrap()
            .unwrap();
        assert!(
            entries.insert(event.event_id.clone()),
            "charted twice: {}",
            event.event_id
        );
    }
    let db = server.db().await;
    let count = |sql: &'static str| medfleet_e2e::count_rows(&db, sql);
    let complete = audit_events(&admin, "association.chart.complete").await;
    assert_eq!(complete.len(), 1, "{complete:?}");
    assert!(
        complete[0].detail.contains("3000 readings charted in all"),
        "{complete:?}"
    );
    assert!(!complete[0].detail.contains("MRN-CHUNK"));
    assert_eq!(count("SELECT COUNT(*) FROM observations").await, 3000);
    assert_eq!(
        count("SELECT COUNT(DISTINCT observation_id) FROM readings WHERE observation_id IS NOT NULL").await,
        3000
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM readings WHERE observation_id IS NULL").await,
        10,
        "readings before the period stay uncharted"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM associations WHERE charting_backlog").await,
        0
    );
}

both_backends!(
    retroactive_charting_runs_in_chunks_exactly_once,
    retroactive_charting_runs_in_chunks_exactly_once
);

/// With a retention policy, what reached every destination goes after its period — deliveries first, then the
/// chart entries no delivery row refers to, with their readings, then old uncharted readings — while an entry still
/// waiting for a receiver stays with its readings. Each purge is audited without a patient in it.
async fn retention_purges_only_what_was_delivered(backend: Backend) {
    let storage = medfleet_e2e::Storage::new(backend).await;
    let mut config = storage.config();
    // Shorter than a deployment may configure (the settings insist on hours and days); the rule is the same.
    config.retention = medfleet_server::settings::RetentionPolicy {
        delivered_outbox: Some(std::time::Duration::from_secs(1)),
        clinical: Some(std::time::Duration::from_secs(2)),
        interval: std::time::Duration::from_millis(200),
    };
    let server = TestServer::start_on(config).await;
    let (icu, ed) = icu_and_ed(&server).await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    let files = tempfile::tempdir().unwrap();
    let fhir = FhirReceiver::start(files.path()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut emr = v1::emr_service_client::EmrServiceClient::new(admin.clone());
    for destination in [
        v1::EmrDestination {
            name: "fhir".into(),
            kind: v1::EmrDestinationKind::Fhir.into(),
            endpoint: fhir.base_url(),
            ..Default::default()
        },
        // ED's HL7 receiver is down: its entries wait.
        v1::EmrDestination {
            name: "ed-hl7".into(),
            kind: v1::EmrDestinationKind::Mllp.into(),
            endpoint: closed.to_string(),
            insecure_plaintext: true,
            wards: vec!["stmarys/ed".into()],
            ..Default::default()
        },
    ] {
        emr.create_destination(destination).await.unwrap();
    }
    let mut icu_publisher = publisher_for(&server, &icu).await;
    // Stored while nobody was associated, long ago: uncharted, and past retention.
    let old = Utc::now() - chrono::Duration::hours(2);
    assert_eq!(
        icu_publisher
            .send(1, vec![item("147842", 70.0, "/min", old)])
            .await
            .accepted,
        1
    );
    let mut patients = PatientServiceClient::new(admin.clone());
    for (device, mrn) in [(&icu, "MRN-KEEP-A"), (&ed, "MRN-KEEP-B")] {
        patients
            .associate(v1::AssociateRequest {
                device_id: device.clone(),
                patient: patient(mrn),
                from: ts(Utc::now() - chrono::Duration::hours(1)),
                until: None,
            })
            .await
            .unwrap();
    }
    let at = Utc::now() - chrono::Duration::minutes(1);
    assert_eq!(icu_publisher.send(2, crate::clinical::vitals(at)).await.accepted, 7);
    let mut ed_publisher = publisher_for(&server, &ed).await;
    assert_eq!(ed_publisher.send(1, crate::clinical::vitals(at)).await.accepted, 7);
    fhir.wait("both monitors' entries at the FHIR server", |log| {
        log.created.len() == 10
    })
    .await;
    // One ED entry is validated: its preliminary delivery becomes history, the final is its newest row.
    let mut read = ObservationServiceClient::new(admin.clone());
    let validated = observations(&mut read, "MRN-KEEP-B").await[0].id.clone();
    let set = |status: &str| v1::SetObservationStatusRequest {
        observation_ids: vec![validated.clone()],
        status: status.into(),
    };
    read.set_observation_status(set("final")).await.unwrap();
    let key = format!("urn:uuid:{validated}");
    fhir.wait("the validation", |log| {
        log.status.get(&key).is_some_and(|s| s == "final")
    })
    .await;

    let db = server.db().await;
    let count = |sql: &'static str| medfleet_e2e::count_rows(&db, sql);
    let purged = async {
        loop {
            if count("SELECT COUNT(*) FROM observations").await == 5
                && count("SELECT COUNT(*) FROM readings").await == 7
                && count("SELECT COUNT(*) FROM emr_outbox WHERE state = 'delivered'").await == 5
                // The validated entry's history rows go once they are a second old, possibly a pass later.
                && count("SELECT COUNT(*) FROM emr_outbox").await == 10
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    assert!(
        tokio::time::timeout(crate::clinical::GUARD, purged).await.is_ok(),
        "the retention policy did not purge the delivered entries"
    );
    assert_eq!(
        observations(&mut read, "MRN-KEEP-B").await.len(),
        5,
        "the entries still waiting for ED's HL7 receiver stay"
    );
    assert!(observations(&mut read, "MRN-KEEP-A").await.is_empty());
    assert_eq!(
        count("SELECT COUNT(*) FROM emr_outbox WHERE state = 'pending'").await,
        5,
        "undelivered rows are never purged"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM emr_outbox").await,
        10,
        "each kept entry keeps its newest row per destination, and nothing else"
    );
    // Where a kept entry went is still known: its retraction reaches the FHIR server.
    read.set_observation_status(set("entered-in-error")).await.unwrap();
    fhir.wait("the retraction after the purge", |log| {
        log.status.get(&key).is_some_and(|s| s == "entered-in-error")
    })
    .await;
    let purges = audit_events(&admin, "retention.purge").await;
    for target in ["emr_outbox", "observations", "readings"] {
        assert!(
            purges.iter().any(|e| e.target == target),
            "no purge of {target} audited: {purges:?}"
        );
    }
    assert!(purges.iter().all(|e| !e.detail.contains("MRN-KEEP")), "{purges:?}");
    let (_, metrics) = medfleet_e2e::http_get(server.http_addr, "/metrics").await;
    assert!(metrics.contains("medfleet_retention_purged"), "{metrics}");
}

both_backends!(
    retention_purges_only_what_was_delivered,
    retention_purges_only_what_was_delivered
);

/// A monitor that measured in ICU and uploads after a move to ED charts those readings to ICU — PV1-3, routing and
/// visibility — and what it measures after the move to ED.
async fn readings_chart_where_the_device_stood_when_it_measured(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (icu, _) = icu_and_ed(&server).await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    let mllp = MllpReceiver::start().await;
    let mut emr = v1::emr_service_client::EmrServiceClient::new(admin.clone());
    for destination in [
        v1::EmrDestination {
            name: "icu-hl7".into(),
            kind: v1::EmrDestinationKind::Mllp.into(),
            endpoint: mllp.addr.to_string(),
            insecure_plaintext: true,
            wards: vec!["stmarys/icu".into()],
            ..Default::default()
        },
        v1::EmrDestination {
            name: "ed-feed".into(),
            kind: v1::EmrDestinationKind::Feed.into(),
            wards: vec!["stmarys/ed".into()],
            ..Default::default()
        },
    ] {
        emr.create_destination(destination).await.unwrap();
    }
    PatientServiceClient::new(admin.clone())
        .associate(v1::AssociateRequest {
            device_id: icu.clone(),
            patient: patient("MRN-MOVE"),
            from: ts(Utc::now() - chrono::Duration::hours(1)),
            until: None,
        })
        .await
        .unwrap();
    // Measured in ICU bed 1 (buffered: the upload comes after the move).
    let in_icu = Utc::now();
    move_device(&admin, &icu, ("ed", "2")).await;
    let in_ed = Utc::now();
    let mut publisher = publisher_for(&server, &icu).await;
    let ack = publisher
        .send(
            1,
            vec![
                item("147842", 80.0, "/min", in_icu),
                item("147842", 90.0, "/min", in_ed),
            ],
        )
        .await;
    assert_eq!(ack.accepted, 2);

    mllp.wait("the ICU entry at ICU's receiver", |log| !log.messages.is_empty())
        .await;
    let mut feed = v1::feed_service_client::FeedServiceClient::new(admin.clone())
        .subscribe(v1::SubscribeRequest {
            subscription: "ed".into(),
            destination: "ed-feed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let ed_event = tokio::time::timeout(crate::clinical::GUARD, feed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ed_entry = ed_event.observation.unwrap_or_default();
    assert_eq!(
        ed_entry.components[0].value, 90.0,
        "only the reading measured in ED goes to ED's feed"
    );
    assert_eq!((ed_entry.ward.as_str(), ed_entry.bed.as_str()), ("ed", "2"));
    let messages = mllp.log.lock().unwrap().messages.clone();
    assert_eq!(
        messages.len(),
        1,
        "only the reading measured in ICU goes to ICU's receiver"
    );
    let pv1 = messages[0]
        .split('\r')
        .find(|s| s.starts_with("PV1|"))
        .unwrap_or_default()
        .to_owned();
    assert_eq!(pv1.split('|').nth(3), Some("icu^^1^stmarys"), "{pv1}");
    assert!(messages[0].contains("|80|"), "{}", messages[0]);

    // An ICU nurse sees the ICU-era entry, not the ED one.
    grant(&server, "medfleet://user/ivy", "clinician", "stmarys/icu").await;
    let mut ivy = ObservationServiceClient::new(as_principal(&server, &Identity::User("ivy".into())).await);
    let seen = observations(&mut ivy, "MRN-MOVE").await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].components[0].value, 80.0);
}

both_backends!(
    readings_chart_where_the_device_stood_when_it_measured,
    readings_chart_where_the_device_stood_when_it_measured
);

/// The allow-list binds what is already configured too: a destination created before its host was disallowed is
/// held at the next start (nothing sent, the reason shown to admins), and relays again once it is allowed.
async fn a_destination_outside_the_allow_list_is_held(backend: Backend) {
    let storage = medfleet_e2e::Storage::new(backend).await;
    let server = TestServer::start_on(storage.config()).await;
    let device = setup(&server).await;
    let mllp = MllpReceiver::start().await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    v1::emr_service_client::EmrServiceClient::new(admin.clone())
        .create_destination(v1::EmrDestination {
            name: "hl7".into(),
            kind: v1::EmrDestinationKind::Mllp.into(),
            endpoint: mllp.addr.to_string(),
            insecure_plaintext: true,
            ..Default::default()
        })
        .await
        .unwrap();
    PatientServiceClient::new(admin)
        .associate(v1::AssociateRequest {
            device_id: device.clone(),
            patient: patient("MRN-HELD"),
            from: ts(Utc::now() - chrono::Duration::hours(1)),
            until: None,
        })
        .await
        .unwrap();
    server.stop().await.unwrap();

    let mut narrowed = storage.config();
    narrowed.emr_allowed_hosts = vec!["*.hospital.example".into()];
    let held = TestServer::start_on(narrowed).await;
    let mut emr = v1::emr_service_client::EmrServiceClient::new(held.channel(&held.admin_bundle()).await.unwrap());
    let mut publisher = publisher_for(&held, &device).await;
    assert_eq!(
        publisher
            .send(1, vec![item("147842", 70.0, "/min", Utc::now())])
            .await
            .accepted,
        1
    );
    let marked = async {
        loop {
            let listed = emr
                .list_destinations(v1::ListDestinationsRequest {})
                .await
                .unwrap()
                .into_inner()
                .destinations;
            if let Some(reason) = listed.iter().map(|d| d.relay_error.clone()).find(|r| !r.is_empty()) {
                return reason;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let reason = tokio::time::timeout(crate::clinical::GUARD, marked)
        .await
        .expect("the disallowed destination was not marked");
    assert!(reason.contains("emr_allowed_hosts"), "{reason}");
    assert!(
        mllp.log.lock().unwrap().messages.is_empty(),
        "PHI went to a disallowed host"
    );
    drop((publisher, emr));
    held.stop().await.unwrap();

    let mut allowed = storage.config();
    allowed.emr_allowed_hosts = vec!["127.0.0.1".into()];
    let _relaying = TestServer::start_on(allowed).await;
    mllp.wait("the held entry after the host is allowed", |log| {
        log.messages.len() == 1
    })
    .await;
}

both_backends!(
    a_destination_outside_the_allow_list_is_held,
    a_destination_outside_the_allow_list_is_held
);

/// A backdated association never reaches across a move: what the monitor measured in its previous bed is some
/// other patient's (or nobody's) and stays uncharted.
async fn a_backdated_association_does_not_chart_across_a_move(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (icu, _) = icu_and_ed(&server).await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    let mut publisher = publisher_for(&server, &icu).await;
    assert_eq!(
        publisher
            .send(1, vec![item("147842", 80.0, "/min", Utc::now())])
            .await
            .accepted,
        1
    );
    move_device(&admin, &icu, ("ed", "2")).await;
    assert_eq!(
        publisher
            .send(2, vec![item("147842", 90.0, "/min", Utc::now())])
            .await
            .accepted,
        1
    );
    let made = PatientServiceClient::new(admin.clone())
        .associate(v1::AssociateRequest {
            device_id: icu.clone(),
            patient: patient("MRN-LATE"),
            from: ts(Utc::now() - chrono::Duration::hours(1)),
            until: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(made.charted_retroactively, 1, "only the reading measured in ED bed 2");
    let db = server.db().await;
    assert_eq!(
        medfleet_e2e::count_rows(&db, "SELECT COUNT(*) FROM readings WHERE observation_id IS NULL").await,
        1
    );
    let mut read = ObservationServiceClient::new(admin);
    let charted = observations(&mut read, "MRN-LATE").await;
    assert_eq!(charted.len(), 1);
    assert_eq!(charted[0].components[0].value, 90.0);
}

both_backends!(
    a_backdated_association_does_not_chart_across_a_move,
    a_backdated_association_does_not_chart_across_a_move
);

/// An ADT event renames a patient only where it places them on a device inside the sender's scopes: an event for
/// an empty bed renames nobody (a ward-scoped integration cannot rewrite a name every EMR receives).
async fn an_adt_event_that_places_nobody_renames_nobody(backend: Backend) {
    let server = TestServer::start(backend).await;
    let icu = setup(&server).await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    let mut patients = PatientServiceClient::new(admin.clone());
    patients
        .associate(v1::AssociateRequest {
            device_id: icu.clone(),
            patient: Some(v1::PatientIdentifier {
                identifier: "MRN-N".into(),
                authority: "HOSP".into(),
                display_name: "Doe^Jane".into(),
            }),
            from: ts(Utc::now() - chrono::Duration::hours(1)),
            until: None,
        })
        .await
        .unwrap();
    grant(&server, "medfleet://service/icu-bridge", "emr_system", "stmarys/icu").await;
    let mut bridge = PatientServiceClient::new(as_principal(&server, &Identity::Service("icu-bridge".into())).await);
    // A bed medfleet does not know is refused with the ward's beds, not accepted binding nothing.
    let unknown = bridge
        .record_adt_event(adt(v1::AdtEventType::Admit, "MRN-N", "Doe^Jane", Some(("icu", "99"))))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::FailedPrecondition, "{unknown:?}");
    assert!(unknown.message().contains("no bed '99'"), "{}", unknown.message());
    // Bed 2 holds no device.
    bridge
        .record_adt_event(adt(v1::AdtEventType::Admit, "MRN-N", "Forged^Name", Some(("icu", "2"))))
        .await
        .unwrap();
    let listed = patients
        .list_associations(v1::ListAssociationsRequest {
            device_id: icu.clone(),
            patient: None,
        })
        .await
        .unwrap()
        .into_inner()
        .associations;
    assert!(
        listed
            .iter()
            .all(|a| a.patient.as_ref().is_some_and(|p| p.display_name == "Doe^Jane")),
        "{listed:?}"
    );
}

both_backends!(
    an_adt_event_that_places_nobody_renames_nobody,
    an_adt_event_that_places_nobody_renames_nobody
);

/// An open feed follows its destination as it is now: widened past the subscriber's grants by an admin, it stops
/// disclosing and ends with PERMISSION_DENIED instead of streaming every ward until the connection is recycled.
async fn a_feed_widened_past_the_subscribers_grants_ends(backend: Backend) {
    let server = TestServer::start(backend).await;
    setup(&server).await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    let mut emr = v1::emr_service_client::EmrServiceClient::new(admin.clone());
    emr.create_destination(v1::EmrDestination {
        name: "icu".into(),
        kind: v1::EmrDestinationKind::Feed.into(),
        wards: vec!["stmarys/icu".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    grant(&server, "medfleet://service/icu-emr", "emr_system", "stmarys/icu").await;
    let mut feed = v1::feed_service_client::FeedServiceClient::new(
        as_principal(&server, &Identity::Service("icu-emr".into())).await,
    )
    .subscribe(v1::SubscribeRequest {
        subscription: "icu".into(),
        destination: "icu".into(),
    })
    .await
    .unwrap()
    .into_inner();
    emr.update_destination(v1::UpdateDestinationRequest {
        destination: Some(v1::EmrDestination {
            name: "icu".into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["wards".into()],
        }),
    })
    .await
    .unwrap();
    let ended = tokio::time::timeout(crate::clinical::GUARD, feed.message())
        .await
        .expect("the widened feed kept streaming")
        .unwrap_err();
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
}

both_backends!(
    a_feed_widened_past_the_subscribers_grants_ends,
    a_feed_widened_past_the_subscribers_grants_ends
);
