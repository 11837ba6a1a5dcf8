//! Rollout actions that end other than by the install going through, with the real agent on both backends: an
//! agent SIGKILLed while it writes the new slot (`verifying`) comes back, is told again and installs once, in the
//! same attempt; one that never comes back holds the rollout open until an operator gives it up with
//! `medfleet rollouts abandon`, after which the rollout completes and the device may join another rollout; a
//! device moved out of the wards a rollout was created for is canceled there and never updated by it.

use medfleet_e2e::{Backend, TestServer, both_backends, count_rows};
use medfleet_proto::v1::{self, rollout_service_client::RolloutServiceClient};

use crate::firmware::{device_state, medfleet, ok, rollout_to, wait_for};
use crate::firmware_agent::{Publisher, enroll, enroll_as, is, roll_out, run, running_counter};

async fn an_interrupted_install_is_told_again_and_a_lost_device_is_abandoned(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let mut publisher = Publisher::new(&channel).await;
    let (artifact, _) = publisher.publish(&channel, 1, 2 * 1024 * 1024, 31).await;
    let mut registry = server.admin().await;
    let back = enroll(&server, &mut registry, "SN-CUT-1").await;
    let lost = enroll(&server, &mut registry, "SN-CUT-2").await;
    // Slow flash: each device stays in `verifying`, writing its other slot, for about 8 s.
    let slow = ["--fault-write-rate", "262144"];
    let first = run(&back, &publisher.root, &slow);
    let second = run(&lost, &publisher.root, &slow);
    let mut rollouts = RolloutServiceClient::new(channel.clone());
    let id = roll_out(&mut rollouts, &artifact, &[&back, &lost]).await;
    wait_for(&mut rollouts, &id, "both devices writing the new slot", |d| {
        [&back, &lost]
            .iter()
            .all(|device| is(v1::ActionState::Verifying)(device_state(d, &device.id)))
    })
    .await;
    first.kill().await;
    second.kill().await;

    let restarted = run(&back, &publisher.root, &[]);
    let detail = wait_for(&mut rollouts, &id, "the restarted device's install", |d| {
        is(v1::ActionState::Succeeded)(device_state(d, &back.id))
    })
    .await;
    assert_eq!(device_state(&detail, &back.id).attempt, 1, "told again, not retried");
    assert_eq!(running_counter(&back), 1);
    let leftovers: Vec<_> = std::fs::read_dir(back.state.path().join("firmware"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".slot.tmp-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the cut write's temporary file is removed: {leftovers:?}"
    );
    let rollout = detail.rollout.as_ref().unwrap();
    assert_eq!(
        rollout.state,
        i32::from(v1::RolloutState::Running),
        "the device that never came back holds it open"
    );
    assert!(is(v1::ActionState::Verifying)(device_state(&detail, &lost.id)));
    // A reply lists a bounded number of devices, those that need attention first; the counts cover all.
    let one = rollouts
        .get_rollout(v1::GetRolloutRequest {
            rollout: id.clone(),
            device_limit: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.devices_total, 2);
    assert_eq!(one.devices.len(), 1);
    assert_eq!(one.devices[0].device_id, lost.id, "the unfinished device first");
    assert_eq!(one.rollout.unwrap().counts.unwrap().targeted, 2);
    let too_many = rollouts
        .get_rollout(v1::GetRolloutRequest {
            rollout: id.clone(),
            device_limit: 10_001,
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), tonic::Code::InvalidArgument, "{too_many:?}");

    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let unexplained = medfleet(
        &server,
        dir,
        &["rollouts", "abandon", &id, "--device", &lost.id, "-m", " ", "--yes"],
    )
    .await;
    assert_eq!(unexplained.code, 3, "a reason is required: {unexplained:?}");
    let given_up = medfleet(
        &server,
        dir,
        &[
            "rollouts",
            "abandon",
            &id,
            "--device",
            &lost.id,
            "-m",
            "monitor sent for repair",
            "--yes",
            "-o",
            "json",
        ],
    )
    .await;
    ok(&given_up, "rollouts abandon");
    let view: serde_json::Value = serde_json::from_str(&given_up.stdout).unwrap();
    assert_eq!(view["state"], "canceled", "{view}");
    assert_eq!(view["reason"], "abandoned", "{view}");
    wait_for(&mut rollouts, &id, "the rollout to complete", |d| {
        d.rollout
            .as_ref()
            .is_some_and(|r| r.state == i32::from(v1::RolloutState::Completed))
    })
    .await;
    let again = medfleet(
        &server,
        dir,
        &["rollouts", "abandon", &id, "--device", &lost.id, "-m", "twice", "--yes"],
    )
    .await;
    assert_eq!(again.code, 5, "nothing left to abandon: {again:?}");

    let db = server.db().await;
    assert_eq!(
        count_rows(
            &db,
            "SELECT COUNT(*) FROM audit_log WHERE action = 'rollout.abandon_device'"
        )
        .await,
        1
    );
    assert_eq!(
        count_rows(
            &db,
            "SELECT COUNT(*) FROM audit_log WHERE action = 'rollout.device.succeeded'"
        )
        .await,
        1,
        "installed once"
    );
    // Given up, the device is free for the next rollout.
    let (next, _) = publisher.publish(&channel, 2, 4096, 32).await;
    rollouts
        .create_rollout(rollout_to(&next.id, vec![lost.id.clone()]))
        .await
        .unwrap();
    restarted.kill().await;
    server.stop().await.unwrap();
}

both_backends!(
    an_interrupted_install_is_told_again_and_a_lost_device_is_abandoned,
    an_interrupted_install_is_told_again_and_a_lost_device_is_abandoned
);

async fn a_device_moved_out_of_the_rollouts_wards_is_not_updated_by_it(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let mut publisher = Publisher::new(&channel).await;
    let (artifact, _) = publisher.publish(&channel, 1, 64 * 1024, 41).await;
    let mut registry = server.admin().await;
    medfleet_e2e::fleet::create_site(&mut registry, "patan", "Patan").await;
    medfleet_e2e::fleet::create_ward(&mut registry, "patan", "icu", "ICU", &["1"]).await;
    medfleet_e2e::fleet::create_ward(&mut registry, "patan", "ccu", "CCU", &["1"]).await;
    let mut request = medfleet_e2e::fleet::monitor("SN-MOVED", crate::firmware::MODEL);
    request.location = medfleet_e2e::fleet::location("patan", "icu", "1");
    let device = enroll_as(&server, &mut registry, request).await;
    let state_file = device.state.path().join("operational-state");
    std::fs::write(&state_file, "in-use\n").unwrap();
    let agent = run(&device, &publisher.root, &[]);
    let mut rollouts = RolloutServiceClient::new(channel.clone());
    let id = roll_out(&mut rollouts, &artifact, &[&device]).await;
    wait_for(&mut rollouts, &id, "the install deferred while in use", |d| {
        let d = device_state(d, &device.id);
        is(v1::ActionState::Deferred)(d) && d.reason == "in_clinical_use"
    })
    .await;

    // Taken to the CCU, a ward this rollout was not created for, and free there: the rollout changes nothing on
    // it any more.
    registry
        .update_device(v1::UpdateDeviceRequest {
            device: Some(v1::Device {
                id: device.id.clone(),
                location: medfleet_e2e::fleet::location("patan", "ccu", "1"),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["location".into()],
            }),
        })
        .await
        .unwrap();
    std::fs::write(&state_file, "idle\n").unwrap();
    let detail = wait_for(&mut rollouts, &id, "the rollout to end without the moved device", |d| {
        d.rollout
            .as_ref()
            .is_some_and(|r| r.state == i32::from(v1::RolloutState::Completed))
    })
    .await;
    let moved = device_state(&detail, &device.id);
    assert!(is(v1::ActionState::Canceled)(moved), "{moved:?}");
    assert_eq!(moved.reason, "moved_out_of_scope");
    assert!(moved.detail.contains("patan/ccu"), "{}", moved.detail);
    agent.kill().await;
    assert_eq!(running_counter(&device), 0, "never installed");
    assert_eq!(
        count_rows(
            &server.db().await,
            "SELECT COUNT(*) FROM audit_log WHERE action = 'rollout.device.canceled' AND scope = 'patan/ccu'"
        )
        .await,
        1
    );
    server.stop().await.unwrap();
}

both_backends!(
    a_device_moved_out_of_the_rollouts_wards_is_not_updated_by_it,
    a_device_moved_out_of_the_rollouts_wards_is_not_updated_by_it
);
