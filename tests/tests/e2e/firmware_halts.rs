//! What an operator's resume and a rollout's deadline mean, with protocol devices on the real server, both
//! backends: a rollout resumed over the failures that halted it judges only what finishes afterwards (it does not
//! halt again at once), devices that missed the deadline end the rollout without halting it, and a clinician's
//! approval covers only the patient it was given for.

use chrono::Utc;
use medfleet_e2e::{Backend, TestServer, both_backends, count_rows};
use medfleet_proto::v1::{self, rollout_service_client::RolloutServiceClient};
use tokio::sync::mpsc;

use crate::firmware::{device_state, device_with, enrolled, published, rollout_to, state_of, wait_for};

fn command(id: &str, comment: &str) -> v1::RolloutCommandRequest {
    v1::RolloutCommandRequest {
        rollout: id.to_owned(),
        comment: comment.to_owned(),
        ..Default::default()
    }
}

async fn a_resume_judges_what_finishes_after_it(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let (root, artifact) = published(&server, &channel, 100_000, 4).await;
    let mut registry = server.admin().await;
    let mut devices = Vec::new();
    for i in 0..3 {
        devices.push(enrolled(&server, &mut registry, &format!("SN-RESUME-{i}")).await);
    }
    let mut rollouts = RolloutServiceClient::new(channel.clone());
    // A canary of one, then the rest; any failure halts, and a wave needs no success share to go on.
    let created = rollouts
        .create_rollout(v1::CreateRolloutRequest {
            waves: vec!["1%".into(), "100%".into()],
            success_threshold: "0%".into(),
            halt_threshold: "0%".into(),
            draft: true,
            ..rollout_to(&artifact.id, devices.iter().map(|(id, _)| id.clone()).collect())
        })
        .await
        .unwrap()
        .into_inner();
    let draft = wait_for(&mut rollouts, &created.id, "the draft", |_| true).await;
    let canary = draft.devices.iter().find(|d| d.wave == 0).unwrap().device_id.clone();
    let (done_tx, _done) = mpsc::channel(8);
    for (id, bundle) in &devices {
        tokio::spawn(device_with(
            server.channel_for(bundle).await.unwrap(),
            id.clone(),
            root.clone(),
            done_tx.clone(),
            usize::from(*id == canary),
            None,
        ));
    }
    rollouts.start_rollout(command(&created.id, "")).await.unwrap();
    let halted = wait_for(&mut rollouts, &created.id, "the canary's halt", |d| {
        state_of(d) == i32::from(v1::RolloutState::Halted)
    })
    .await;
    assert_eq!(device_state(&halted, &canary).reason, "install_failed");

    // Resumed without retrying the canary: its failure was looked at, the other two install and it completes
    // (wait_for fails at once if it halts again instead).
    rollouts
        .resume_rollout(command(&created.id, "canary's cable was loose"))
        .await
        .unwrap();
    let completed = wait_for(&mut rollouts, &created.id, "completion after the resume", |d| {
        state_of(d) == i32::from(v1::RolloutState::Completed)
    })
    .await;
    for (id, _) in &devices {
        let want = if *id == canary {
            v1::ActionState::Failed
        } else {
            v1::ActionState::Succeeded
        };
        assert_eq!(device_state(&completed, id).state, i32::from(want), "{id}");
    }
    let db = server.db().await;
    assert_eq!(
        count_rows(&db, "SELECT COUNT(*) FROM audit_log WHERE action = 'rollout.halt'").await,
        1
    );
    assert_eq!(
        count_rows(
            &db,
            "SELECT COUNT(*) FROM audit_log WHERE action = 'rollout.resume' AND detail LIKE '%from here on%'"
        )
        .await,
        1
    );
    server.stop().await.unwrap();
}

both_backends!(resume_after_a_halt, a_resume_judges_what_finishes_after_it);

async fn devices_that_miss_the_deadline_end_the_rollout(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let (root, artifact) = published(&server, &channel, 100_000, 6).await;
    let mut registry = server.admin().await;
    let (free, free_bundle) = enrolled(&server, &mut registry, "SN-DEADLINE-FREE").await;
    let (bound, bound_bundle) = enrolled(&server, &mut registry, "SN-DEADLINE-BOUND").await;
    // Never connects: it cannot be updated before the deadline either. In a bed, so the rollout says where it is.
    medfleet_e2e::fleet::create_site(&mut registry, "north", "North").await;
    medfleet_e2e::fleet::create_ward(&mut registry, "north", "icu", "ICU", &["bed-3"]).await;
    let offline = medfleet_e2e::fleet::register(
        &mut registry,
        v1::RegisterDeviceRequest {
            location: medfleet_e2e::fleet::location("north", "icu", "bed-3"),
            ..medfleet_e2e::fleet::monitor("SN-DEADLINE-OFF", crate::firmware::MODEL)
        },
    )
    .await;
    let mut patients = v1::patient_service_client::PatientServiceClient::new(channel.clone());
    patients.associate(bind(&bound, "MRN-FW-DL")).await.unwrap();
    let (done_tx, _done) = mpsc::channel(8);
    for (id, bundle) in [(&free, &free_bundle), (&bound, &bound_bundle)] {
        tokio::spawn(device_with(
            server.channel_for(bundle).await.unwrap(),
            id.clone(),
            root.clone(),
            done_tx.clone(),
            0,
            None,
        ));
    }
    let mut rollouts = RolloutServiceClient::new(channel.clone());
    // Two of three missing the deadline would be far above any halt threshold if they counted as failures.
    let created = rollouts
        .create_rollout(v1::CreateRolloutRequest {
            halt_threshold: "10%".into(),
            deadline: Some(prost_types::Duration { seconds: 3, nanos: 0 }),
            ..rollout_to(&artifact.id, vec![free.clone(), bound.clone(), offline.clone()])
        })
        .await
        .unwrap()
        .into_inner();
    let ended = wait_for(&mut rollouts, &created.id, "the end at the deadline", |d| {
        state_of(d) == i32::from(v1::RolloutState::Completed)
    })
    .await;
    let reason = &ended.rollout.as_ref().unwrap().reason;
    assert!(
        reason.starts_with("deadline passed: 1 of 3 devices updated, 2 not updated in time"),
        "{reason}"
    );
    assert_eq!(device_state(&ended, &free).state, i32::from(v1::ActionState::Succeeded));
    for id in [&bound, &offline] {
        let device = device_state(&ended, id);
        assert_eq!(
            (device.state, device.reason.as_str()),
            (i32::from(v1::ActionState::Failed), "deadline_passed"),
            "{id}"
        );
    }
    let offline_device = device_state(&ended, &offline);
    assert_eq!(
        (offline_device.serial_number.as_str(), offline_device.location.as_str()),
        ("SN-DEADLINE-OFF", "north/icu/bed-3")
    );
    assert_eq!(
        (
            device_state(&ended, &free).serial_number.as_str(),
            device_state(&ended, &free).location.as_str()
        ),
        ("SN-DEADLINE-FREE", "")
    );
    let db = server.db().await;
    assert_eq!(
        count_rows(&db, "SELECT COUNT(*) FROM audit_log WHERE action = 'rollout.halt'").await,
        0
    );
    assert_eq!(
        count_rows(&db, "SELECT COUNT(*) FROM audit_log WHERE action = 'rollout.expire'").await,
        1
    );
    server.stop().await.unwrap();
}

both_backends!(deadline_ends_a_rollout, devices_that_miss_the_deadline_end_the_rollout);

fn bind(device: &str, mrn: &str) -> v1::AssociateRequest {
    v1::AssociateRequest {
        device_id: device.to_owned(),
        patient: Some(v1::PatientIdentifier {
            identifier: mrn.into(),
            authority: "HOSP".into(),
            display_name: "Doe^Jane".into(),
        }),
        from: Some(medfleet_proto::convert::timestamp(
            Utc::now() - chrono::Duration::minutes(1),
        )),
        until: None,
    }
}

fn approval(rollout: &str, device: &str, comment: &str, minutes: i64) -> v1::ApproveDeviceRequest {
    v1::ApproveDeviceRequest {
        rollout: rollout.to_owned(),
        device_id: device.to_owned(),
        comment: comment.to_owned(),
        valid_for: Some(prost_types::Duration {
            seconds: minutes * 60,
            nanos: 0,
        }),
    }
}

/// A clinician's approval lets a bound device install, but only for the patient it was given for: a device whose
/// association changed after the approval waits again until someone approves for the new patient.
async fn an_approval_covers_only_the_patient_it_was_given_for(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let (root, artifact) = published(&server, &channel, 100_000, 8).await;
    let mut registry = server.admin().await;
    let (first, first_bundle) = enrolled(&server, &mut registry, "SN-APPROVE-1").await;
    let (second, second_bundle) = enrolled(&server, &mut registry, "SN-APPROVE-2").await;
    let mut patients = v1::patient_service_client::PatientServiceClient::new(channel.clone());
    patients.associate(bind(&first, "MRN-AP-1")).await.unwrap();
    patients.associate(bind(&second, "MRN-AP-2")).await.unwrap();
    let mut rollouts = RolloutServiceClient::new(channel.clone());
    let created = rollouts
        .create_rollout(v1::CreateRolloutRequest {
            clinical_use: v1::ClinicalUsePolicy::Approve.into(),
            ..rollout_to(&artifact.id, vec![first.clone(), second.clone()])
        })
        .await
        .unwrap()
        .into_inner();
    let (done_tx, _done) = mpsc::channel(8);
    tokio::spawn(device_with(
        server.channel_for(&first_bundle).await.unwrap(),
        first.clone(),
        root.clone(),
        done_tx.clone(),
        0,
        None,
    ));
    wait_for(&mut rollouts, &created.id, "the bound device's deferral", |d| {
        device_state(d, &first).reason == "in_clinical_use"
    })
    .await;

    // An approval says why and lasts at most a day; refused ones change nothing.
    for (comment, minutes, field) in [("", 30, "comment"), ("stable", 25 * 60, "valid_for")] {
        let refused = rollouts
            .approve_device(approval(&created.id, &first, comment, minutes))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(field), "{}", refused.message());
    }
    let approved = rollouts
        .approve_device(approval(
            &created.id,
            &first,
            "patient stable, spare monitor at bedside",
            30,
        ))
        .await
        .unwrap()
        .into_inner();
    let until = approved.approved_until.expect("an approval's end");
    let minutes = (until.seconds - Utc::now().timestamp()) / 60;
    assert!((28..=30).contains(&minutes), "{minutes} minutes");
    wait_for(&mut rollouts, &created.id, "the approved install", |d| {
        device_state(d, &first).state == i32::from(v1::ActionState::Succeeded)
    })
    .await;

    // Approved for one patient while offline; by the time it connects another patient is on it.
    rollouts
        .approve_device(approval(&created.id, &second, "patient stable", 30))
        .await
        .unwrap();
    patients
        .dissociate(v1::DissociateRequest {
            device_id: second.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    patients
        .associate(v1::AssociateRequest {
            from: None,
            ..bind(&second, "MRN-AP-3")
        })
        .await
        .unwrap();
    tokio::spawn(device_with(
        server.channel_for(&second_bundle).await.unwrap(),
        second.clone(),
        root.clone(),
        done_tx.clone(),
        0,
        None,
    ));
    let waiting = wait_for(&mut rollouts, &created.id, "the re-bound device's deferral", |d| {
        device_state(d, &second).reason == "in_clinical_use"
    })
    .await;
    assert_eq!(
        device_state(&waiting, &second).state,
        i32::from(v1::ActionState::Deferred)
    );
    rollouts
        .approve_device(approval(&created.id, &second, "new patient stable too", 30))
        .await
        .unwrap();
    wait_for(
        &mut rollouts,
        &created.id,
        "the install approved for the new patient",
        |d| device_state(d, &second).state == i32::from(v1::ActionState::Succeeded),
    )
    .await;
    let db = server.db().await;
    assert_eq!(
        count_rows(
            &db,
            "SELECT COUNT(*) FROM audit_log WHERE action = 'rollout.approve_device' AND detail LIKE '%for the patient bound now%'"
        )
        .await,
        3
    );
    server.stop().await.unwrap();
}

both_backends!(
    approval_is_per_patient,
    an_approval_covers_only_the_patient_it_was_given_for
);
