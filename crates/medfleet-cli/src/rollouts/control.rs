//! `medfleet rollouts list` and `show`, and the operator's moves on one rollout: `start`, `pause`, `resume`,
//! `abort`, `retry-failed`, `rollback` (each audited with its comment) and `approve` for one device in clinical use.

use medfleet_proto::v1;

use super::view::{DetailView, DeviceView, RolloutView, print_detail, print_rollout, wave_text};
use super::{CommandArgs, Rollouts, StateArg};
use crate::output::{self, Format};
use crate::pager::{self, Page};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Move {
    Start,
    Pause,
    Resume,
    Abort,
    RetryFailed { include_rolled_back: bool },
    Rollback { draft: bool },
}

fn state_to_wire(state: StateArg) -> v1::RolloutState {
    match state {
        StateArg::Draft => v1::RolloutState::Draft,
        StateArg::Running => v1::RolloutState::Running,
        StateArg::Paused => v1::RolloutState::Paused,
        StateArg::Halted => v1::RolloutState::Halted,
        StateArg::Completed => v1::RolloutState::Completed,
        StateArg::Aborted => v1::RolloutState::Aborted,
    }
}

pub(super) async fn list(
    api: &mut Rollouts,
    state: Option<StateArg>,
    limit: Option<usize>,
    out: Format,
) -> anyhow::Result<()> {
    let state = state.map_or(v1::RolloutState::Unspecified, state_to_wire);
    let all = pager::collect(limit, async |page_size, page_token| {
        let page = api
            .list_rollouts(v1::ListRolloutsRequest {
                state: state.into(),
                page_size,
                page_token,
            })
            .await?
            .into_inner();
        Ok(Page::new(page.rollouts, page.next_page_token))
    })
    .await?;
    let rows: Vec<RolloutView> = all.into_iter().map(RolloutView::from).collect();
    if out == Format::Json {
        return output::json(&rows);
    }
    let mut table = output::table(&["ID", "TARGET", "VERSION", "STATE", "WAVE", "DONE", "FAILED", "CREATED"]);
    for r in &rows {
        table.add_row(vec![
            r.id.clone(),
            r.target_name.clone(),
            r.version.clone(),
            if r.reason.is_empty() {
                r.state.to_owned()
            } else {
                format!("{} ({})", r.state, r.reason)
            },
            wave_text(r),
            format!("{}/{}", r.counts.finished(), r.counts.targeted),
            r.counts.failed.to_string(),
            r.create_time.clone(),
        ]);
    }
    println!("{table}");
    Ok(())
}

pub(super) async fn show(
    api: &mut Rollouts,
    rollout: &str,
    (only_attention, limit): (bool, u32),
    out: Format,
) -> anyhow::Result<()> {
    let detail = DetailView::from(
        api.get_rollout(v1::GetRolloutRequest {
            rollout: rollout.to_owned(),
            device_limit: limit,
        })
        .await?
        .into_inner(),
    );
    if out == Format::Json {
        if only_attention {
            let devices: Vec<&DeviceView> = detail.devices.iter().filter(|d| d.needs_attention()).collect();
            return output::json(&serde_json::json!({
                "rollout": detail.rollout,
                "waves": detail.waves,
                "devices": devices,
                "devices_total": detail.devices_total,
            }));
        }
        return output::json(&detail);
    }
    print_detail(&detail, only_attention);
    Ok(())
}

/// What each move did, in words, and what may come next.
fn done_text(m: Move, r: &RolloutView) -> String {
    let id = &r.id;
    match m {
        Move::Start => format!("rollout {id} started; follow it with `medfleet rollouts watch {id}`"),
        Move::Pause => format!(
            "rollout {id} paused: nothing new is sent, devices already installing finish; `medfleet rollouts resume \
             {id}` goes on"
        ),
        Move::Resume => format!(
            "rollout {id} is running again ({}); after a halt, only devices that finish from now on count towards \
             the halt threshold",
            wave_text(r)
        ),
        Move::Abort => format!("rollout {id} aborted: devices that had not started installing are canceled"),
        Move::RetryFailed { include_rolled_back } => format!(
            "the failed{} devices of rollout {id} are queued again{}",
            if include_rolled_back { " and rolled-back" } else { "" },
            if r.state == "halted" {
                format!("; it is halted: `medfleet rollouts resume {id}` sends them")
            } else {
                String::new()
            }
        ),
        Move::Rollback { .. } => format!(
            "rollback rollout {id} created ({} version {}), state {}; follow it with `medfleet rollouts watch {id}`",
            r.target_name, r.version, r.state
        ),
    }
}

pub(super) async fn command(api: &mut Rollouts, m: Move, args: &CommandArgs, out: Format) -> anyhow::Result<()> {
    let request = v1::RolloutCommandRequest {
        rollout: args.rollout.clone(),
        comment: args.comment.clone(),
        include_rolled_back: matches!(
            m,
            Move::RetryFailed {
                include_rolled_back: true
            }
        ),
    };
    let rollout = match m {
        Move::Start => api.start_rollout(request).await?,
        Move::Pause => api.pause_rollout(request).await?,
        Move::Resume => api.resume_rollout(request).await?,
        Move::Abort => api.abort_rollout(request).await?,
        Move::RetryFailed { .. } => api.retry_failed(request).await?,
        Move::Rollback { draft } => {
            api.rollback_rollout(v1::RollbackRolloutRequest {
                rollout: request.rollout,
                comment: request.comment,
                draft,
            })
            .await?
        }
    }
    .into_inner();
    let view = RolloutView::from(rollout);
    if out == Format::Json {
        return output::json(&view);
    }
    println!("{}", done_text(m, &view));
    if matches!(m, Move::Rollback { .. }) {
        print_rollout(&view);
    }
    Ok(())
}

pub(super) async fn approve(
    api: &mut Rollouts,
    (rollout, device): (&str, &str),
    valid: std::time::Duration,
    comment: &str,
    out: Format,
) -> anyhow::Result<()> {
    let device = DeviceView::from(
        api.approve_device(v1::ApproveDeviceRequest {
            rollout: rollout.to_owned(),
            device_id: device.to_owned(),
            comment: comment.to_owned(),
            valid_for: prost_types::Duration::try_from(valid).ok(),
        })
        .await?
        .into_inner(),
    );
    if out == Format::Json {
        return output::json(&device);
    }
    println!(
        "device {} approved to install in rollout {rollout} until {} (now {}); it still waits while it is alarming \
         or outside the window, and waits again if its patient association changes",
        device.device_id, device.approved_until, device.state
    );
    Ok(())
}

pub(super) async fn abandon(
    api: &mut Rollouts,
    (rollout, device): (&str, &str),
    comment: &str,
    out: Format,
) -> anyhow::Result<()> {
    let device = DeviceView::from(
        api.abandon_device(v1::AbandonDeviceRequest {
            rollout: rollout.to_owned(),
            device_id: device.to_owned(),
            comment: comment.to_owned(),
        })
        .await?
        .into_inner(),
    );
    if out == Format::Json {
        return output::json(&device);
    }
    println!(
        "device {} given up in rollout {rollout} ({}); it no longer counts towards its wave. If it was installing, \
         check on the device which image it runs (medfleet devices show {})",
        device.device_id, device.detail, device.device_id
    );
    Ok(())
}
