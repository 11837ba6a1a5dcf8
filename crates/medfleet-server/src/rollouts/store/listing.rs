//! Which of a rollout's devices a reply lists when not all of them fit.

use medfleet_core::firmware::state::ActionState;

use super::action_state;
use crate::persistence::entity::rollout_action;

/// The most devices one rollout reply lists unless asked for fewer or more (at most [`MAX_LISTED`]): replies
/// and watch updates stay well below the gRPC message limit however large the rollout.
pub const DEFAULT_LISTED: usize = 1000;
pub const MAX_LISTED: usize = 10_000;

/// Which devices an operator looks at first when not all fit: failures, then deferrals, then those in flight,
/// then those waiting their turn, then the finished.
fn attention(state: ActionState) -> u8 {
    match state {
        ActionState::Failed | ActionState::RolledBack => 0,
        ActionState::Deferred => 1,
        ActionState::Queued => 3,
        ActionState::Succeeded | ActionState::Canceled => 4,
        _ => 2,
    }
}

/// The indices of `actions` a reply of at most `limit` devices lists.
pub(super) fn shown(actions: &[rollout_action::Model], limit: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..actions.len()).collect();
    if actions.len() > limit {
        all.sort_by_key(|i| attention(action_state(&actions[*i])));
        all.truncate(limit);
    }
    all
}
