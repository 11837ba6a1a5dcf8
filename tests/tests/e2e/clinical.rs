//! Readings into patient records end to end: association at observation time, per-item rejection, replay
//! dedup, retroactive charting, validation, and delivery to the gRPC feed, a FHIR server and an HL7 v2 receiver,
//! with the output checked by independent parsers (Python `fhir.resources` and `hl7`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use medfleet_core::identity::Identity;
use medfleet_e2e::receivers::{FhirReceiver, MllpReceiver, validate};
use medfleet_e2e::{Backend, TestServer, both_backends, fleet};
use medfleet_proto::v1::{
    self, device_service_client::DeviceServiceClient, emr_service_client::EmrServiceClient,
    feed_service_client::FeedServiceClient, observation_service_client::ObservationServiceClient,
    patient_service_client::PatientServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

/// Bounds a broken run; never a synchronisation point.
pub(crate) const GUARD: Duration = Duration::from_mins(1);

pub(crate) fn ts(at: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(medfleet_proto::convert::timestamp(at))
}

pub(crate) fn item(code: &str, value: f64, unit: &str, at: DateTime<Utc>) -> v1::ReadingItem {
    v1::ReadingItem {
        code: code.into(),
        value,
        unit: unit.into(),
        observed_at: ts(at),
        quality: Vec::new(),
    }
}

/// A full set of vitals at one instant: five chart entries (HR, SpO2, the NIBP panel, temperature, RR).
pub(crate) fn vitals(at: DateTime<Utc>) -> Vec<v1::ReadingItem> {
    vec![
        item("147842", 72.0, "/min", at),
        item("150456", 97.0, "%", at),
        item("150021", 120.0, "mm[Hg]", at),
        item("150022", 80.0, "mm[Hg]", at),
        item("150023", 93.0, "mm[Hg]", at),
        item("150364", 36.9, "Cel", at),
        item("151562", 16.0, "/min", at),
    ]
}

pub(crate) fn patient(identifier: &str) -> Option<v1::PatientIdentifier> {
    Some(v1::PatientIdentifier {
        identifier: identifier.into(),
        authority: "HOSP".into(),
        display_name: "Doe^Jane".into(),
    })
}

/// A device's reading stream, driven by the test as the device (its own certificate).
pub(crate) struct Publisher {
    pub(crate) tx: mpsc::Sender<v1::ReadingBatch>,
    pub(crate) acks: tonic::Streaming<v1::ReadingAck>,
}

impl Publisher {
    pub(crate) async fn open(channel: Channel) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let acks = DeviceServiceClient::new(channel)
            .publish_readings(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, acks }
    }

    pub(crate) async fn send(&mut self, sequence: u64, items: Vec<v1::ReadingItem>) -> v1::ReadingAck {
        self.tx.send(v1::ReadingBatch { sequence, items }).await.unwrap();
        tokio::time::timeout(GUARD, self.acks.message())
            .await
            .expect("no ack")
            .unwrap()
            .expect("stream ended")
    }
}

pub(crate) async fn observations(api: &mut ObservationServiceClient<Channel>, mrn: &str) -> Vec<v1::Observation> {
    api.list_observations(v1::ListObservationsRequest {
        patient: patient(mrn),
        page_size: 500,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .observations
}

/// St Mary's ICU (beds 1 and 2) with one monitor, MON-1, in bed 1: its id.
pub(crate) async fn setup(server: &TestServer) -> String {
    let mut admin = server.admin().await;
    fleet::create_site(&mut admin, "stmarys", "St Mary's").await;
    fleet::create_ward(&mut admin, "stmarys", "icu", "ICU", &["1", "2"]).await;
    fleet::register(
        &mut admin,
        v1::RegisterDeviceRequest {
            eui64: "00-09-FB-FF-FE-12-34-56".into(),
            location: fleet::location("stmarys", "icu", "1"),
            ..fleet::monitor("MON-1", "MX450")
        },
    )
    .await
}

pub(crate) async fn destinations(server: &TestServer, fhir: &FhirReceiver, mllp: &MllpReceiver) {
    let mut emr = EmrServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap());
    for destination in [
        v1::EmrDestination {
            name: "emr-feed".into(),
            kind: v1::EmrDestinationKind::Feed.into(),
            enabled: Some(true),
            ..Default::default()
        },
        v1::EmrDestination {
            name: "fhir".into(),
            kind: v1::EmrDestinationKind::Fhir.into(),
            endpoint: fhir.base_url(),
            bearer_token: "secret-token".into(),
            enabled: Some(true),
            ..Default::default()
        },
        v1::EmrDestination {
            name: "hl7".into(),
            kind: v1::EmrDestinationKind::Mllp.into(),
            endpoint: mllp.addr.to_string(),
            insecure_plaintext: true,
            receiving_application: "EMR".into(),
            receiving_facility: "HOSP".into(),
            sites: vec!["stmarys".into()],
            enabled: Some(true),
            ..Default::default()
        },
    ] {
        emr.create_destination(destination).await.unwrap();
    }
    // Refused with the field named: an FHIR endpoint over plain HTTP to a remote host.
    let refused = emr
        .create_destination(v1::EmrDestination {
            name: "bad".into(),
            kind: v1::EmrDestinationKind::Fhir.into(),
            endpoint: "http://emr.example.org/fhir".into(),
            enabled: Some(true),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("endpoint"), "{}", refused.message());
}

async fn readings_chart_to_the_right_patient(backend: Backend) {
    let server = TestServer::start(backend).await;
    let device = setup(&server).await;
    let files = tempfile::tempdir().unwrap();
    let fhir = FhirReceiver::start(files.path()).await;
    let mllp = MllpReceiver::start().await;
    destinations(&server, &fhir, &mllp).await;
    // Receivers fail first: the relays must retry.
    fhir.log.lock().unwrap().fail_next = 1;
    mllp.log.lock().unwrap().reject_next = 1;

    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    let mut patients = PatientServiceClient::new(admin.clone());
    let mut chart = ObservationServiceClient::new(admin.clone());
    let device_channel = server
        .channel(&server.issue(&Identity::Device(device.parse().unwrap())))
        .await
        .unwrap();
    let mut publisher = Publisher::open(device_channel.clone()).await;

    let start = Utc::now() - chrono::Duration::minutes(30);
    let before = start + chrono::Duration::minutes(1);
    let during = start + chrono::Duration::minutes(10);
    let after = start + chrono::Duration::minutes(25);

    // Nobody associated yet: stored, not charted.
    let ack = publisher.send(1, vec![item("147842", 70.0, "/min", before)]).await;
    assert_eq!((ack.sequence, ack.accepted, ack.duplicate), (1, 1, false));

    let association = patients
        .associate(v1::AssociateRequest {
            device_id: device.clone(),
            patient: patient("MRN-A"),
            from: ts(start + chrono::Duration::minutes(5)),
            until: ts(start + chrono::Duration::minutes(20)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(association.charted_retroactively, 0);
    // Overlapping association of the same device: refused, nothing changed.
    let overlap = patients
        .associate(v1::AssociateRequest {
            device_id: device.clone(),
            patient: patient("MRN-B"),
            from: ts(start + chrono::Duration::minutes(15)),
            until: None,
        })
        .await
        .unwrap_err();
    assert_eq!(overlap.code(), Code::FailedPrecondition, "{overlap:?}");
    assert!(!overlap.message().contains("MRN"), "{}", overlap.message());

    let ack = publisher.send(2, vitals(during)).await;
    assert_eq!((ack.accepted, ack.rejected.len()), (7, 0), "{ack:?}");
    let ack = publisher.send(3, vitals(after)).await;
    assert_eq!(ack.accepted, 7);

    // Bad items: each refused with its reason; the good one in the same batch is kept.
    let future = Utc::now() + chrono::Duration::minutes(10);
    let ack = publisher
        .send(
            4,
            vec![
                item("999999", 1.0, "/min", during),
                item("147842", 72.0, "%", during),
                item("150456", 8_388_607.0, "%", during),
                item("150456", 140.0, "%", during),
                item("147842", 72.0, "/min", future),
                item("151562", 18.0, "/min", during + chrono::Duration::seconds(1)),
            ],
        )
        .await;
    let reasons: Vec<(u32, &str)> = ack.rejected.iter().map(|r| (r.index, r.code.as_str())).collect();
    assert_eq!(
        reasons,
        vec![
            (0, "unknown_code"),
            (1, "wrong_unit"),
            (2, "special_value"),
            (3, "implausible"),
            (4, "future_time")
        ]
    );
    assert_eq!(ack.accepted, 1);

    // A resend of a stored batch is acked again from what was stored and changes nothing.
    let replay = publisher.send(2, vitals(during)).await;
    assert!(replay.duplicate);
    assert_eq!(replay.accepted, 7);
    // The same sequence with other readings (a device whose buffer was reset): nothing stored, every item
    // refused, and the first free sequence named so the device can renumber.
    let reused = publisher.send(2, vec![item("147842", 99.0, "/min", during)]).await;
    assert_eq!((reused.accepted, reused.duplicate, reused.next_sequence), (0, false, 5));
    assert_eq!(reused.rejected[0].code, "sequence_reused");

    // The chart: exactly the measurements inside the association (5 from batch 2, 1 valid from batch 4).
    let charted = observations(&mut chart, "MRN-A").await;
    let mut kinds: Vec<&str> = charted.iter().map(|o| o.kind.as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        vec![
            "MDC_ECG_HEART_RATE",
            "MDC_PRESS_BLD_NONINV",
            "MDC_PULS_OXIM_SAT_O2",
            "MDC_RESP_RATE",
            "MDC_RESP_RATE",
            "MDC_TEMP_BODY"
        ]
    );
    let bp = charted.iter().find(|o| o.kind == "MDC_PRESS_BLD_NONINV").unwrap();
    let parts: Vec<(&str, f64)> = bp.components.iter().map(|c| (c.loinc.as_str(), c.value)).collect();
    assert_eq!(parts, vec![("8480-6", 120.0), ("8462-4", 80.0), ("8478-0", 93.0)]);
    assert!(charted.iter().all(|o| o.status == "preliminary" && o.bed == "1"));

    // A retroactive association charts the stored reading from before, once.
    let retro = patients
        .associate(v1::AssociateRequest {
            device_id: device.clone(),
            patient: patient("MRN-B"),
            from: ts(start),
            until: ts(start + chrono::Duration::minutes(5)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retro.charted_retroactively, 1);
    let b = observations(&mut chart, "MRN-B").await;
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].components[0].value, 70.0);
    assert_eq!(observations(&mut chart, "MRN-A").await.len(), 6);

    // Validation: final, with the validator recorded; every destination gets the new status.
    let validated = chart
        .set_observation_status(v1::SetObservationStatusRequest {
            observation_ids: vec![bp.id.clone()],
            status: "final".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(validated.observations[0].status, "final");
    assert_eq!(validated.observations[0].validated_by, "medfleet://user/admin");

    // The FHIR server: every chart entry created exactly once, the BP panel now final.
    let expected: Vec<String> = observations(&mut chart, "MRN-A")
        .await
        .into_iter()
        .chain(observations(&mut chart, "MRN-B").await)
        .map(|o| format!("urn:uuid:{}", o.id))
        .collect();
    let bp_key = format!("urn:uuid:{}", bp.id);
    fhir.wait("every chart entry at the FHIR server", |log| {
        expected.iter().all(|id| log.created.contains_key(id)) && log.status.get(&bp_key).is_some_and(|s| s == "final")
    })
    .await;
    {
        let log = fhir.log.lock().unwrap();
        assert_eq!(log.created.len(), expected.len());
        assert!(log.created.values().all(|n| *n == 1), "{:?}", log.created);
    }
    let mut bundles: Vec<_> = std::fs::read_dir(files.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    bundles.sort();
    let validated_entries = validate("fhir", &bundles);
    assert!(validated_entries.len() >= expected.len());
    let panel = validated_entries
        .iter()
        .find(|e| e["loinc"] == "85354-9")
        .expect("the BP panel");
    assert_eq!(panel["components"], serde_json::json!(["8480-6", "8462-4", "8478-0"]));
    assert!(
        validated_entries
            .iter()
            .all(|e| e["patient"] == "MRN-A" || e["patient"] == "MRN-B")
    );
    assert!(validated_entries.iter().filter(|e| e["method"] == "POST").all(|e| {
        e["if_none_exist"]
            .as_str()
            .is_some_and(|q| q.starts_with("identifier="))
    }));

    // The HL7 receiver: every chart entry in its current state, parsed independently. The BP panel's preliminary
    // message is sent only if it went out before the validation; otherwise the final one supersedes it.
    mllp.wait("every chart entry at the HL7 receiver", |log| {
        let finals = log.messages.iter().any(|m| {
            m.split('\r')
                .rfind(|s| s.starts_with("OBX|"))
                .is_some_and(|obx| obx.split('|').nth(11) == Some("F"))
        });
        log.by_control_id.values().sum::<usize>() >= expected.len() && finals
    })
    .await;
    let messages: Vec<String> = mllp.log.lock().unwrap().messages.clone();
    let hl7_files: Vec<_> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let path = files.path().join(format!("message-{i:04}.hl7"));
            std::fs::write(&path, m).unwrap();
            path
        })
        .collect();
    let parsed = validate("hl7", &hl7_files);
    let heart = parsed
        .iter()
        .find(|m| m["metrics"][0]["refid"] == "MDC_ECG_HEART_RATE" && m["patient"] == "MRN-A")
        .expect("a heart-rate message");
    assert_eq!(heart["profile"], "IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO");
    assert_eq!(heart["authority"], "HOSP");
    assert_eq!(heart["location"], "icu^^1^stmarys");
    assert_eq!(heart["service"], "182777000^monitoring of patient^SCT");
    assert_eq!(heart["containers"], 3);
    let metric = &heart["metrics"][0];
    assert_eq!(metric["type"], "NM");
    assert_eq!(metric["code"], "147842");
    assert_eq!(metric["sub_id"], "1.1.1.1");
    assert_eq!(metric["value"], "72");
    assert_eq!(metric["unit"], "264864");
    assert_eq!(metric["status"], "R");
    assert_eq!(metric["equipment"], "0009FBFFFE123456");
    assert!(
        parsed
            .iter()
            .any(|m| m["metrics"].as_array().unwrap().iter().all(|x| x["status"] == "F"))
    );
    // The AE'd first message was sent again with the same control id and accepted.
    {
        let log = mllp.log.lock().unwrap();
        assert!(log.messages.len() > log.by_control_id.len());
    }

    // The feed, as an EMR system sees it: commit order, then resume after the acknowledged cursor.
    let emr_identity = Identity::Service("epic".into());
    let mut access =
        v1::access_service_client::AccessServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap());
    access
        .grant(v1::GrantRequest {
            grant: Some(v1::RoleGrant {
                principal: emr_identity.to_string(),
                role: "emr_system".into(),
                scope: "*".into(),
            }),
        })
        .await
        .unwrap();
    let mut feed = FeedServiceClient::new(server.channel(&server.issue(&emr_identity)).await.unwrap());
    let mut stream = feed
        .subscribe(v1::SubscribeRequest {
            subscription: "epic-main".into(),
            destination: "emr-feed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while events.len() < expected.len() + 1 {
        let event = tokio::time::timeout(GUARD, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        events.push(event);
    }
    let cursors: Vec<u64> = events.iter().map(|e| e.cursor).collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "{cursors:?}");
    let fhir_json: serde_json::Value = serde_json::from_str(&events[0].fhir_json).unwrap();
    assert_eq!(fhir_json["resourceType"], "Observation");
    feed.acknowledge(v1::AcknowledgeRequest {
        subscription: "epic-main".into(),
        cursor: events[2].cursor,
    })
    .await
    .unwrap();
    drop(stream);
    let mut resumed = feed
        .subscribe(v1::SubscribeRequest {
            subscription: "epic-main".into(),
            destination: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(GUARD, resumed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.cursor, events[3].cursor);
    assert_eq!(first.event_id, events[3].event_id);
    // Another identity cannot use the subscription.
    let stranger = Identity::Service("other-emr".into());
    access
        .grant(v1::GrantRequest {
            grant: Some(v1::RoleGrant {
                principal: stranger.to_string(),
                role: "emr_system".into(),
                scope: "*".into(),
            }),
        })
        .await
        .unwrap();
    let mut other = FeedServiceClient::new(server.channel(&server.issue(&stranger)).await.unwrap());
    let refused = other
        .subscribe(v1::SubscribeRequest {
            subscription: "epic-main".into(),
            destination: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
}

both_backends!(readings_chart_to_the_right_patient, readings_chart_to_the_right_patient);

/// The admin's client channel to a `medfleetd` process.
async fn channel_to(port: u16, data_dir: &std::path::Path) -> Channel {
    let bundle = medfleet_proto::client::Bundle::load(&data_dir.join("admin.pem")).unwrap();
    medfleet_proto::client::connect(&format!("https://localhost:{port}"), &bundle)
        .await
        .unwrap()
}

/// SIGKILL medfleetd while simulated monitors stream; restart it: every acked reading is stored exactly once,
/// every chart entry reaches the FHIR server and the HL7 receiver, and no duplicate is charted.
async fn acked_readings_survive_a_server_kill(backend: Backend) {
    use crate::binaries::{Daemon, Process};

    const DEVICES: usize = 4;
    const BATCHES: u64 = 60;
    let storage = medfleet_e2e::Storage::new(backend).await;
    let data_dir = storage.dir.path().join("data");
    let first = Daemon::start_on(&data_dir, &storage.database_url, "127.0.0.1:0", &[]).await;
    let port = first.grpc_port;
    let admin = channel_to(port, &data_dir).await;
    let mut registry = v1::registry_service_client::RegistryServiceClient::new(admin.clone());
    fleet::create_site(&mut registry, "stmarys", "St Mary's").await;
    fleet::create_ward(&mut registry, "stmarys", "icu", "ICU", &[]).await;
    let imported = registry
        .import_devices(v1::ImportDevicesRequest {
            devices: (0..DEVICES)
                .map(|i| v1::RegisterDeviceRequest {
                    location: fleet::location("stmarys", "icu", ""),
                    ..fleet::monitor(&format!("MON-{i}"), "MX450")
                })
                .collect(),
            issue_tokens: true,
            token_ttl: None,
        })
        .await
        .unwrap()
        .into_inner()
        .devices;
    let files = tempfile::tempdir().unwrap();
    let tokens = files.path().join("tokens.csv");
    let mut csv = String::from("token\n");
    for device in &imported {
        csv.push_str(&device.token);
        csv.push('\n');
    }
    std::fs::write(&tokens, csv).unwrap();
    let mut patients = PatientServiceClient::new(admin.clone());
    for (i, device) in imported.iter().enumerate() {
        patients
            .associate(v1::AssociateRequest {
                device_id: device.device.as_ref().unwrap().id.clone(),
                patient: patient(&format!("MRN-KILL-{i}")),
                from: ts(Utc::now() - chrono::Duration::hours(1)),
                until: None,
            })
            .await
            .unwrap();
    }
    let fhir = FhirReceiver::start(files.path()).await;
    let mllp = MllpReceiver::start().await;
    let mut emr = EmrServiceClient::new(admin.clone());
    for destination in [
        v1::EmrDestination {
            name: "fhir".into(),
            kind: v1::EmrDestinationKind::Fhir.into(),
            endpoint: fhir.base_url(),
            enabled: Some(true),
            ..Default::default()
        },
        v1::EmrDestination {
            name: "hl7".into(),
            kind: v1::EmrDestinationKind::Mllp.into(),
            endpoint: mllp.addr.to_string(),
            insecure_plaintext: true,
            enabled: Some(true),
            ..Default::default()
        },
        v1::EmrDestination {
            name: "emr-feed".into(),
            kind: v1::EmrDestinationKind::Feed.into(),
            enabled: Some(true),
            ..Default::default()
        },
    ] {
        emr.create_destination(destination).await.unwrap();
    }
    let mut feed = FeedServiceClient::new(admin.clone());
    let mut before_kill = feed
        .subscribe(v1::SubscribeRequest {
            subscription: "survivor".into(),
            destination: "emr-feed".into(),
        })
        .await
        .unwrap()
        .into_inner();

    let state = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(medfleet_e2e::binary("medfleet-agent"));
    command
        .args(["simulate", "--server", &format!("https://localhost:{port}"), "--ca"])
        .arg(data_dir.join("ca/ca.crt"))
        .arg("--state-dir")
        .arg(state.path())
        .args(["--devices", &DEVICES.to_string(), "--tokens"])
        .arg(&tokens)
        .args(["--vitals-interval", "100ms", "--vitals-count", &BATCHES.to_string()]);
    let agents = Process::spawn(command);

    // Mid-stream: some entries are at the FHIR server, most readings are still to come.
    let started = tokio::time::timeout(
        GUARD,
        fhir.wait("the first chart entries at the FHIR server", |log| {
            log.created.len() >= 40
        }),
    )
    .await;
    assert!(
        started.is_ok(),
        "no chart entries at the FHIR server within {GUARD:?}\nagents:\n{}\nserver:\n{}",
        agents.output(),
        first.process.output()
    );
    // The feed subscriber has seen some events and acknowledged the fifth.
    let mut seen = Vec::new();
    while seen.len() < 10 {
        seen.push(
            tokio::time::timeout(GUARD, before_kill.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        );
    }
    feed.acknowledge(v1::AcknowledgeRequest {
        subscription: "survivor".into(),
        cursor: seen[4].cursor,
    })
    .await
    .unwrap();
    let mut logs = first.process.kill().await;
    let second = Daemon::start_on(&data_dir, &storage.database_url, &format!("127.0.0.1:{port}"), &[]).await;
    // After the restart the subscription resumes right after the acknowledged event.
    let mut resumed = FeedServiceClient::new(channel_to(port, &data_dir).await)
        .subscribe(v1::SubscribeRequest {
            subscription: "survivor".into(),
            destination: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let next = tokio::time::timeout(GUARD, resumed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((next.cursor, &next.event_id), (seen[5].cursor, &seen[5].event_id));
    drop((before_kill, resumed));

    let measurements = DEVICES * usize::try_from(BATCHES).unwrap() * 5;
    agents.wait_for("measurements finished", DEVICES).await;
    fhir.wait("every chart entry at the FHIR server", |log| {
        log.created.len() >= measurements
    })
    .await;
    mllp.wait("every chart entry at the HL7 receiver", |log| {
        let entries: std::collections::HashSet<&str> = log
            .messages
            .iter()
            .filter_map(|m| m.split('\r').find(|s| s.starts_with("OBR|")))
            .filter_map(|obr| obr.split('|').nth(3))
            .collect();
        entries.len() >= measurements
    })
    .await;
    {
        let log = fhir.log.lock().unwrap();
        assert_eq!(log.created.len(), measurements);
        let duplicates: Vec<_> = log.created.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            duplicates.is_empty(),
            "charted twice at the FHIR server: {duplicates:?}"
        );
    }

    // Storage: every reading once; every chart entry once.
    let db = sea_orm::Database::connect(&storage.database_url).await.unwrap();
    let count = |sql: &'static str| medfleet_e2e::count_rows(&db, sql);
    let readings = DEVICES * usize::try_from(BATCHES).unwrap() * 7;
    let stored = count("SELECT COUNT(*) FROM readings").await;
    let distinct = count(
        "SELECT COUNT(*) FROM (SELECT DISTINCT device_id, sequence, item_index FROM readings) AS unique_readings",
    )
    .await;
    assert_eq!(usize::try_from(stored).unwrap(), readings);
    assert_eq!(stored, distinct);
    assert_eq!(
        usize::try_from(count("SELECT COUNT(*) FROM observations").await).unwrap(),
        measurements
    );

    let (status, agent_logs) = agents.terminate().await;
    assert!(status.success(), "{agent_logs}");
    for device in std::fs::read_dir(state.path()).unwrap() {
        let outbox = device.unwrap().path().join("outbox");
        let left: Vec<_> = std::fs::read_dir(&outbox)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("batch-"))
            .collect();
        assert!(left.is_empty(), "unacknowledged batches left in {}", outbox.display());
    }
    let (status, second_logs) = second.terminate().await;
    assert!(status.success());
    logs.push_str(&second_logs);
    logs.push_str(&agent_logs);
    // No patient identifier in any log line of the server or the agents.
    assert!(!logs.contains("MRN-KILL"), "a patient identifier reached the logs");
    assert!(
        logs.contains("readings") || logs.contains("session"),
        "the logs were captured"
    );
}

both_backends!(
    acked_readings_survive_a_server_kill,
    acked_readings_survive_a_server_kill
);

/// A destination with a charting interval receives the median of each window, and threshold breaches at once.
async fn charting_interval_sends_medians_and_breaches(backend: Backend) {
    let server = TestServer::start(backend).await;
    let device = setup(&server).await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    EmrServiceClient::new(admin.clone())
        .create_destination(v1::EmrDestination {
            name: "ward-chart".into(),
            kind: v1::EmrDestinationKind::Feed.into(),
            interval_seconds: 60,
            enabled: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    let minute = (Utc::now() - chrono::Duration::minutes(30)).timestamp().div_euclid(60) * 60;
    let window = DateTime::from_timestamp(minute, 0).unwrap();
    PatientServiceClient::new(admin.clone())
        .associate(v1::AssociateRequest {
            device_id: device.clone(),
            patient: patient("MRN-I"),
            from: ts(window - chrono::Duration::minutes(1)),
            until: None,
        })
        .await
        .unwrap();
    let device_channel = server
        .channel(&server.issue(&Identity::Device(device.parse().unwrap())))
        .await
        .unwrap();
    let mut publisher = Publisher::open(device_channel).await;
    let at = |s: i64| window + chrono::Duration::seconds(s);
    let ack = publisher
        .send(
            1,
            vec![
                item("147842", 60.0, "/min", at(0)),
                item("147842", 70.0, "/min", at(10)),
                item("147842", 80.0, "/min", at(20)),
                item("147842", 150.0, "/min", at(30)),
                item("150456", 96.0, "%", at(0)),
                item("150456", 95.0, "%", at(30)),
            ],
        )
        .await;
    assert_eq!(ack.accepted, 6);
    let mut feed = FeedServiceClient::new(admin)
        .subscribe(v1::SubscribeRequest {
            subscription: "ward-chart-sub".into(),
            destination: "ward-chart".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut values = Vec::new();
    while values.len() < 3 {
        let event = tokio::time::timeout(GUARD, feed.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let observation = event.observation.unwrap();
        values.push((observation.kind, observation.components[0].value));
    }
    values.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    // The breach (150) at once; the lower medians of the window: HR 70 of {60, 70, 80, 150}, SpO2 95 of {95, 96}.
    assert_eq!(
        values,
        vec![
            ("MDC_ECG_HEART_RATE".to_owned(), 70.0),
            ("MDC_ECG_HEART_RATE".to_owned(), 150.0),
            ("MDC_PULS_OXIM_SAT_O2".to_owned(), 95.0)
        ]
    );
    let deliveries = EmrServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap())
        .list_deliveries(v1::ListDeliveriesRequest {
            destination: "ward-chart".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(deliveries.len(), 3, "{deliveries:?}");
}

both_backends!(
    charting_interval_sends_medians_and_breaches,
    charting_interval_sends_medians_and_breaches
);

pub(crate) fn cli(server: &TestServer, args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(medfleet_e2e::binary("medfleet"))
        .args(["--server", &server.url(), "--credentials"])
        .arg(server.data_dir().admin_bundle())
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A receiver that refuses a message for good: the delivery is dead-lettered with the reason, listed for admins,
/// and sent again on request. The CLI drives it, and shows the feed live.
async fn dead_letters_are_visible_and_retried(backend: Backend) {
    let server = TestServer::start(backend).await;
    let device = setup(&server).await;
    let mllp = MllpReceiver::start().await;
    mllp.log.lock().unwrap().refuse_next = 1;
    let endpoint = mllp.addr.to_string();
    for args in [
        vec![
            "emr",
            "create",
            "hl7",
            "--kind",
            "mllp",
            "--endpoint",
            &endpoint,
            "--insecure-plaintext",
            "--site",
            "stmarys",
        ],
        vec!["emr", "create", "emr-feed", "--kind", "feed"],
    ] {
        let (ok, out, err) = cli(&server, &args);
        assert!(ok, "{out}{err}");
    }
    let (ok, listed, _) = cli(&server, &["emr", "list", "-o", "json"]);
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let (ok, out, err) = cli(
        &server,
        &[
            "patients",
            "associate",
            &device,
            "MRN-D",
            "--authority",
            "HOSP",
            "--from",
            "2026-01-01T00:00:00Z",
        ],
    );
    assert!(ok, "{out}{err}");
    let device_channel = server
        .channel(&server.issue(&Identity::Device(device.parse().unwrap())))
        .await
        .unwrap();
    let mut publisher = Publisher::open(device_channel).await;
    let ack = publisher
        .send(
            1,
            vec![item("147842", 71.0, "/min", Utc::now() - chrono::Duration::seconds(5))],
        )
        .await;
    assert_eq!(ack.accepted, 1);

    // The AR'd message is dead-lettered with the receiver's answer. The relay settles each message before it
    // sends the next, so once a second one is accepted the first one's fate is committed.
    mllp.wait("the refused message", |log| !log.messages.is_empty()).await;
    let ack = publisher
        .send(
            2,
            vec![item("147842", 72.0, "/min", Utc::now() - chrono::Duration::seconds(4))],
        )
        .await;
    assert_eq!(ack.accepted, 1);
    mllp.wait("the second message accepted", |log| log.by_control_id.len() == 1)
        .await;
    let mut emr = EmrServiceClient::new(server.channel(&server.admin_bundle()).await.unwrap());
    let dead = emr
        .list_deliveries(v1::ListDeliveriesRequest {
            destination: "hl7".into(),
            failed_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].state, "dead");
    assert!(dead[0].last_error.contains("AR"), "{}", dead[0].last_error);
    let (ok, shown, _) = cli(&server, &["emr", "deliveries", "--failed", "-o", "json"]);
    assert!(ok);
    assert!(shown.contains("\"state\": \"dead\""), "{shown}");

    let (ok, out, err) = cli(&server, &["emr", "retry", "hl7"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("1 deliveries queued again"), "{out}");
    mllp.wait("the retried message accepted", |log| log.by_control_id.len() == 2)
        .await;

    // The feed, live from the CLI: the chart entries, with their FHIR form.
    let (ok, tail, err) = cli(
        &server,
        &[
            "feed",
            "tail",
            "--subscription",
            "it-debug",
            "--destination",
            "emr-feed",
            "--limit",
            "2",
            "-o",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let event: serde_json::Value = serde_json::from_str(tail.lines().next().unwrap()).unwrap();
    assert_eq!(event["observation"]["patient"], "MRN-D");
    assert_eq!(event["fhir"]["resourceType"], "Observation");
    let (ok, chart, _) = cli(
        &server,
        &[
            "observations",
            "list",
            "--patient",
            "MRN-D",
            "--authority",
            "HOSP",
            "-o",
            "json",
        ],
    );
    assert!(ok);
    let chart: serde_json::Value = serde_json::from_str(&chart).unwrap();
    assert_eq!(chart.as_array().unwrap().len(), 2);
    let id = chart[0]["id"].as_str().unwrap().to_owned();
    let (ok, out, err) = cli(&server, &["observations", "validate", &id, "--entered-in-error"]);
    assert!(ok, "{out}{err}");
    let (ok, again, _) = cli(&server, &["observations", "validate", &id]);
    assert!(!ok, "a retracted entry cannot be validated: {again}");
}

both_backends!(
    dead_letters_are_visible_and_retried,
    dead_letters_are_visible_and_retried
);

/// ADT events from the EMR bind the bed's devices to the patient in the bed, and end them on transfer and
/// discharge; readings chart accordingly.
async fn adt_events_bind_bed_devices(backend: Backend) {
    let server = TestServer::start(backend).await;
    let device = setup(&server).await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    let mut patients = PatientServiceClient::new(admin.clone());
    // Microseconds: the precision the server keeps, so periods compare equal after the round trip.
    let start = chrono::SubsecRound::trunc_subsecs(Utc::now() - chrono::Duration::hours(2), 6);
    let at = |minutes: i64| start + chrono::Duration::minutes(minutes);
    let event = |kind: v1::AdtEventType, mrn: &str, bed: &str, minutes: i64| v1::AdtEvent {
        r#type: kind.into(),
        patient: patient(mrn),
        site: "stmarys".into(),
        ward: "icu".into(),
        bed: bed.into(),
        occurred_at: ts(at(minutes)),
    };
    let admitted = patients
        .record_adt_event(event(v1::AdtEventType::Admit, "MRN-P1", "1", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(admitted.started.len(), 1);
    assert_eq!(admitted.started[0].device_id, device);
    assert_eq!(admitted.started[0].source, "adt");
    let moved = patients
        .record_adt_event(event(v1::AdtEventType::Transfer, "MRN-P1", "2", 30))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((moved.started.len(), moved.ended.len()), (0, 1));
    patients
        .record_adt_event(event(v1::AdtEventType::Admit, "MRN-P2", "1", 40))
        .await
        .unwrap();
    let discharged = patients
        .record_adt_event(event(v1::AdtEventType::Discharge, "MRN-P2", "", 90))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(discharged.ended.len(), 1);
    let history = patients
        .list_associations(v1::ListAssociationsRequest {
            device_id: device.clone(),
            patient: None,
        })
        .await
        .unwrap()
        .into_inner()
        .associations;
    let periods: Vec<(String, Option<prost_types::Timestamp>)> = history
        .iter()
        .map(|a| (a.patient.as_ref().unwrap().identifier.clone(), a.ends_at))
        .collect();
    assert_eq!(
        periods,
        vec![("MRN-P1".to_owned(), ts(at(30))), ("MRN-P2".to_owned(), ts(at(90)))]
    );
    assert!(history.iter().all(|a| a.status == "ended" && a.source == "adt"));
    // An admit without a bed is refused with the field named.
    let refused = patients
        .record_adt_event(event(v1::AdtEventType::Admit, "MRN-P3", "", 100))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);

    let device_channel = server
        .channel(&server.issue(&Identity::Device(device.parse().unwrap())))
        .await
        .unwrap();
    let mut publisher = Publisher::open(device_channel).await;
    let ack = publisher
        .send(
            1,
            vec![
                item("147842", 61.0, "/min", at(10)),
                item("147842", 62.0, "/min", at(35)),
                item("147842", 63.0, "/min", at(50)),
                item("147842", 64.0, "/min", at(95)),
            ],
        )
        .await;
    assert_eq!(ack.accepted, 4);
    let mut chart = ObservationServiceClient::new(admin);
    let values = |rows: Vec<v1::Observation>| rows.iter().map(|o| o.components[0].value).collect::<Vec<_>>();
    assert_eq!(values(observations(&mut chart, "MRN-P1").await), vec![61.0]);
    assert_eq!(values(observations(&mut chart, "MRN-P2").await), vec![63.0]);
}

both_backends!(adt_events_bind_bed_devices, adt_events_bind_bed_devices);

/// Two replicas on one PostgreSQL: one relays the destination (the lease), so each chart entry is sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_per_destination_across_replicas() {
    if medfleet_e2e::skip_postgres() {
        return;
    }
    let storage = medfleet_e2e::Storage::new(Backend::Postgres).await;
    let replica = |name: &str| {
        let mut config = storage.config();
        config.replica_name = name.into();
        config
    };
    let a = TestServer::start_on(replica("replica-a")).await;
    a.wait_ready().await;
    let b = TestServer::start_on(replica("replica-b")).await;
    b.wait_ready().await;
    let device = setup(&a).await;
    let files = tempfile::tempdir().unwrap();
    let fhir = FhirReceiver::start(files.path()).await;
    EmrServiceClient::new(a.channel(&a.admin_bundle()).await.unwrap())
        .create_destination(v1::EmrDestination {
            name: "fhir".into(),
            kind: v1::EmrDestinationKind::Fhir.into(),
            endpoint: fhir.base_url(),
            enabled: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    PatientServiceClient::new(b.channel(&b.admin_bundle()).await.unwrap())
        .associate(v1::AssociateRequest {
            device_id: device.clone(),
            patient: patient("MRN-R"),
            from: ts(Utc::now() - chrono::Duration::hours(1)),
            until: None,
        })
        .await
        .unwrap();
    // Readings arrive on both replicas; both relay loops run.
    let identity = Identity::Device(device.parse().unwrap());
    let mut on_a = Publisher::open(a.channel(&a.issue(&identity)).await.unwrap()).await;
    let mut on_b = Publisher::open(b.channel(&b.issue(&identity)).await.unwrap()).await;
    let base = Utc::now() - chrono::Duration::minutes(30);
    for sequence in 1..=20u64 {
        let publisher = if sequence % 2 == 0 { &mut on_a } else { &mut on_b };
        let at = base + chrono::Duration::seconds(i64::try_from(sequence).unwrap());
        let ack = publisher.send(sequence, vitals(at)).await;
        assert_eq!(ack.accepted, 7);
    }
    fhir.wait("every chart entry at the FHIR server", |log| log.created.len() == 100)
        .await;
    let log = fhir.log.lock().unwrap();
    let resent: Vec<_> = log.requests.iter().filter(|(_, n)| **n > 1).collect();
    assert!(resent.is_empty(), "entries sent by more than one relay: {resent:?}");
}

/// A FHIR server on https that requires medfleet's client certificate (mutual TLS) and a bearer token.
async fn fhir_over_mutual_tls_with_bearer(backend: Backend) {
    let server = TestServer::start(backend).await;
    let device = setup(&server).await;
    let files = tempfile::tempdir().unwrap();
    let pki = medfleet_e2e::receivers::HospitalPki::new();
    let fhir = FhirReceiver::start_tls(files.path(), &pki, "s3cret").await;
    let admin = server.channel(&server.admin_bundle()).await.unwrap();
    let created = EmrServiceClient::new(admin.clone())
        .create_destination(v1::EmrDestination {
            name: "fhir-mtls".into(),
            kind: v1::EmrDestinationKind::Fhir.into(),
            endpoint: fhir.tls_base_url(),
            bearer_token: "s3cret".into(),
            ca_pem: pki.ca_pem.clone(),
            client_certificate_pem: pki.client_cert_pem.clone(),
            client_key_pem: pki.client_key_pem.clone(),
            enabled: Some(true),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Secrets go in, never out.
    assert!(created.bearer_token.is_empty() && created.client_key_pem.is_empty());
    PatientServiceClient::new(admin)
        .associate(v1::AssociateRequest {
            device_id: device.clone(),
            patient: patient("MRN-T"),
            from: ts(Utc::now() - chrono::Duration::hours(1)),
            until: None,
        })
        .await
        .unwrap();
    let device_channel = server
        .channel(&server.issue(&Identity::Device(device.parse().unwrap())))
        .await
        .unwrap();
    let mut publisher = Publisher::open(device_channel).await;
    let ack = publisher
        .send(1, vitals(Utc::now() - chrono::Duration::seconds(2)))
        .await;
    assert_eq!(ack.accepted, 7);
    fhir.wait("the chart entries over mutual TLS", |log| log.created.len() == 5)
        .await;
}

both_backends!(fhir_over_mutual_tls_with_bearer, fhir_over_mutual_tls_with_bearer);
