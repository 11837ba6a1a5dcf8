//! The rollout commands against a medfleetd stand-in: what `create` sends, and how `watch` ends.

use std::sync::{Arc, Mutex};

use medfleet_proto::v1::rollout_service_server::{RolloutService, RolloutServiceServer};
use medfleet_proto::v1::{self, create_rollout_request::Target};
use tonic::{Request, Response, Status};

use crate::output::Format;

type Answer<T> = Result<Response<T>, Status>;

#[derive(Debug, Default, Clone)]
struct Mock {
    created: Arc<Mutex<Option<v1::CreateRolloutRequest>>>,
    /// What WatchRollout sends, in order.
    updates: Arc<Mutex<Vec<v1::RolloutDetail>>>,
}

fn no<T>() -> Answer<T> {
    Err(Status::unimplemented("not in this test"))
}

#[tonic::async_trait]
impl RolloutService for Mock {
    type WatchRolloutStream = tokio_stream::Iter<std::vec::IntoIter<Result<v1::RolloutDetail, Status>>>;

    async fn create_rollout(&self, request: Request<v1::CreateRolloutRequest>) -> Answer<v1::Rollout> {
        let request = request.into_inner();
        let rollout = v1::Rollout {
            id: "r1".into(),
            state: if request.draft {
                v1::RolloutState::Draft
            } else {
                v1::RolloutState::Running
            }
            .into(),
            waves: request.waves.clone(),
            ..Default::default()
        };
        *self.created.lock().unwrap() = Some(request);
        Ok(Response::new(rollout))
    }
    async fn list_rollouts(&self, _: Request<v1::ListRolloutsRequest>) -> Answer<v1::ListRolloutsResponse> {
        no()
    }
    async fn get_rollout(&self, _: Request<v1::GetRolloutRequest>) -> Answer<v1::RolloutDetail> {
        no()
    }
    async fn watch_rollout(&self, _: Request<v1::WatchRolloutRequest>) -> Answer<Self::WatchRolloutStream> {
        let updates: Vec<_> = self.updates.lock().unwrap().iter().cloned().map(Ok).collect();
        Ok(Response::new(tokio_stream::iter(updates)))
    }
    async fn start_rollout(&self, _: Request<v1::RolloutCommandRequest>) -> Answer<v1::Rollout> {
        no()
    }
    async fn pause_rollout(&self, _: Request<v1::RolloutCommandRequest>) -> Answer<v1::Rollout> {
        no()
    }
    async fn resume_rollout(&self, _: Request<v1::RolloutCommandRequest>) -> Answer<v1::Rollout> {
        no()
    }
    async fn abort_rollout(&self, _: Request<v1::RolloutCommandRequest>) -> Answer<v1::Rollout> {
        no()
    }
    async fn retry_failed(&self, _: Request<v1::RolloutCommandRequest>) -> Answer<v1::Rollout> {
        no()
    }
    async fn approve_device(&self, _: Request<v1::ApproveDeviceRequest>) -> Answer<v1::RolloutDevice> {
        no()
    }
    async fn rollback_rollout(&self, _: Request<v1::RollbackRolloutRequest>) -> Answer<v1::Rollout> {
        no()
    }
}

async fn client(mock: Mock) -> super::Rollouts {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RolloutServiceServer::new(mock))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    super::Rollouts::new(channel)
}

fn update(state: v1::RolloutState, wave: u32, succeeded: u32) -> v1::RolloutDetail {
    let counts = |targeted: u32, succeeded: u32| {
        Some(v1::RolloutCounts {
            targeted,
            succeeded,
            queued: targeted - succeeded,
            ..Default::default()
        })
    };
    v1::RolloutDetail {
        rollout: Some(v1::Rollout {
            id: "r1".into(),
            state: state.into(),
            current_wave: wave,
            waves: vec!["50%".into(), "100%".into()],
            counts: counts(4, succeeded),
            reason: if state == v1::RolloutState::Halted {
                "2 of 3 failed".into()
            } else {
                String::new()
            },
            ..Default::default()
        }),
        waves: vec![
            v1::RolloutWave {
                index: 0,
                share: "50%".into(),
                counts: counts(2, succeeded.min(2)),
                start_time: Some(prost_types::Timestamp::default()),
            },
            v1::RolloutWave {
                index: 1,
                share: "100%".into(),
                counts: counts(2, succeeded.saturating_sub(2)),
                start_time: None,
            },
        ],
        devices: vec![],
    }
}

#[tokio::test]
async fn create_sends_what_was_checked() {
    let mock = Mock::default();
    let mut api = client(mock.clone()).await;
    let command = <super::RolloutCommand as clap::Subcommand>::augment_subcommands(clap::Command::new("rollouts"))
        .try_get_matches_from([
            "rollouts",
            "create",
            "--artifact",
            "mx450-41.img",
            "--select",
            "model=MX450,ward=stmarys/icu",
            "--waves",
            "10%,100%",
            "--soak",
            "30m",
            "--draft",
        ])
        .unwrap();
    let command = <super::RolloutCommand as clap::FromArgMatches>::from_arg_matches(&command).unwrap();
    let super::RolloutCommand::Create(args) = &command else {
        panic!("not create")
    };
    let request = args.request().unwrap();
    super::create::run(&mut api, args, request, Format::Json).await.unwrap();
    let sent = mock.created.lock().unwrap().clone().unwrap();
    assert_eq!(sent.artifact, "mx450-41.img");
    assert_eq!(sent.waves, ["10%", "100%"]);
    assert_eq!(sent.soak.unwrap().seconds, 1800);
    assert!(sent.draft);
    assert_eq!(sent.clinical_use, i32::from(v1::ClinicalUsePolicy::Defer));
    // Not given: left to medfleetd's defaults.
    assert!(sent.success_threshold.is_empty() && sent.deadline.is_none() && sent.min_executed == 0);
    let Some(Target::Selector(selector)) = sent.target else {
        panic!("no selector")
    };
    assert_eq!(
        (selector.hardware_id.as_str(), selector.ward.as_str()),
        ("MX450", "stmarys/icu")
    );
}

#[tokio::test]
async fn watch_exits_zero_only_when_the_rollout_completed() {
    use v1::RolloutState::{Completed, Halted, Paused, Running};
    for (updates, ok) in [
        (
            vec![update(Running, 0, 0), update(Running, 1, 2), update(Completed, 1, 4)],
            true,
        ),
        (vec![update(Running, 0, 1), update(Halted, 0, 1)], false),
        // The stream ended while the rollout is still unfinished.
        (vec![update(Running, 0, 0), update(Paused, 0, 1)], false),
    ] {
        for out in [Format::Table, Format::Json] {
            let mock = Mock::default();
            mock.updates.lock().unwrap().clone_from(&updates);
            let mut api = client(mock).await;
            let result = super::watch::run(&mut api, "r1", out).await;
            assert_eq!(result.is_ok(), ok, "{out:?} {result:?}");
        }
    }
}
