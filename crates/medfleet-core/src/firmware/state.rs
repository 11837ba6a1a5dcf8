//! The states of a rollout and of each device's action in it, and the only transitions between them. The
//! scheduler, the operator commands and the device's reports all change state through [`RolloutState::to`] and
//! [`ActionState::to`], so an out-of-order report (a `downloaded` after `failed`, a replayed `succeeded`) or an
//! operator command in the wrong state is refused instead of rewriting history.

use std::fmt;

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RolloutState {
    Draft,
    Running,
    /// Stopped by an operator; resumes where it stood.
    Paused,
    /// Stopped by its failure threshold; only an operator resumes it.
    Halted,
    Completed,
    Aborted,
}

/// Where one device's update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActionState {
    Queued,
    Notified,
    Downloading,
    Downloaded,
    Verifying,
    Installing,
    Rebooting,
    VerifyingHealth,
    Succeeded,
    Failed,
    /// Waiting: in clinical use or outside the window. Goes back to where the device was told to continue from.
    Deferred,
    /// The device's health check failed and it went back to its old slot by itself.
    RolledBack,
    Canceled,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot go from {from} to {to}")]
pub struct Transition {
    pub from: &'static str,
    pub to: &'static str,
}

impl Transition {
    /// `Ok` when the move is allowed, otherwise the refusal naming both states.
    fn check(allowed: bool, from: &'static str, to: &'static str) -> Result<(), Self> {
        if allowed { Ok(()) } else { Err(Self { from, to }) }
    }
}

impl RolloutState {
    pub const ALL: [Self; 6] = [
        Self::Draft,
        Self::Running,
        Self::Paused,
        Self::Halted,
        Self::Completed,
        Self::Aborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Halted => "halted",
            Self::Completed => "completed",
            Self::Aborted => "aborted",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Nothing changes a finished rollout.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Aborted)
    }

    /// The state after going to `next`, if that move is allowed.
    pub fn to(self, next: Self) -> Result<Self, Transition> {
        use RolloutState::{Aborted, Completed, Draft, Halted, Paused, Running};
        let next_states: &[Self] = match self {
            Draft | Paused | Halted => &[Running, Aborted],
            Running => &[Paused, Halted, Completed, Aborted],
            Completed | Aborted => &[],
        };
        Transition::check(next_states.contains(&next), self.as_str(), next.as_str()).map(|()| next)
    }
}

impl ActionState {
    pub const ALL: [Self; 13] = [
        Self::Queued,
        Self::Notified,
        Self::Downloading,
        Self::Downloaded,
        Self::Verifying,
        Self::Installing,
        Self::Rebooting,
        Self::VerifyingHealth,
        Self::Succeeded,
        Self::Failed,
        Self::Deferred,
        Self::RolledBack,
        Self::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Notified => "notified",
            Self::Downloading => "downloading",
            Self::Downloaded => "downloaded",
            Self::Verifying => "verifying",
            Self::Installing => "installing",
            Self::Rebooting => "rebooting",
            Self::VerifyingHealth => "verifying-health",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Deferred => "deferred",
            Self::RolledBack => "rolled-back",
            Self::Canceled => "canceled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// A finished action: it counts in the tallies and nothing moves it again (a retry is a new action).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::RolledBack | Self::Canceled)
    }

    /// Counts as executed for the rollout's thresholds, and whether as a success.
    pub fn outcome(self) -> Option<bool> {
        match self {
            Self::Succeeded => Some(true),
            Self::Failed | Self::RolledBack => Some(false),
            _ => None,
        }
    }

    /// Whether the device may be running new code or rebooting: from here on it must not be told to stop
    /// (cancelling would leave it between slots); the rollout waits for its report.
    pub fn is_installing(self) -> bool {
        matches!(self, Self::Installing | Self::Rebooting | Self::VerifyingHealth)
    }

    /// The state after going to `next`, if that move is allowed. Progress only moves forward; a deferral may
    /// interrupt anything before installing (a device bound mid-download finishes downloading, then waits) and
    /// is left towards notified again; any unfinished action may fail or, before installing, be canceled.
    pub fn to(self, next: Self) -> Result<Self, Transition> {
        use ActionState::{
            Canceled, Deferred, Downloaded, Downloading, Failed, Installing, Notified, Queued, Rebooting, RolledBack,
            Succeeded, Verifying, VerifyingHealth,
        };
        let forward: &[Self] = match self {
            Queued | Deferred => &[Notified],
            Notified => &[Downloading, Downloaded],
            Downloading => &[Downloaded],
            Downloaded => &[Verifying],
            Verifying => &[Installing],
            Installing => &[Rebooting],
            Rebooting => &[VerifyingHealth],
            VerifyingHealth => &[Succeeded, RolledBack],
            Succeeded | Failed | RolledBack | Canceled => &[],
        };
        let interrupt = match next {
            Canceled => !self.is_installing(),
            Deferred => !self.is_installing() && self != Deferred,
            _ => false,
        };
        let allowed = !self.is_final() && (next == Failed || forward.contains(&next) || interrupt);
        Transition::check(allowed, self.as_str(), next.as_str()).map(|()| next)
    }

    /// An operator gives the device up for this rollout (taken out of service, replaced, its state lost): any
    /// unfinished action ends as canceled, installing ones included. Unlike a cancel, nothing has to reach the
    /// device first, so a device that will never report again no longer holds its wave or its place in rollouts.
    pub fn abandon(self) -> Result<Self, Transition> {
        Transition::check(!self.is_final(), self.as_str(), Self::Canceled.as_str()).map(|()| Self::Canceled)
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for ActionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn names_round_trip() {
        for s in RolloutState::ALL {
            assert_eq!(RolloutState::parse(s.as_str()), Some(s));
        }
        for s in ActionState::ALL {
            assert_eq!(ActionState::parse(s.as_str()), Some(s));
        }
        assert_eq!(ActionState::parse("done"), None);
    }

    #[test]
    fn a_halted_rollout_resumes_only_to_running() {
        assert_eq!(
            RolloutState::Halted.to(RolloutState::Running),
            Ok(RolloutState::Running)
        );
        assert!(RolloutState::Halted.to(RolloutState::Completed).is_err());
        assert!(RolloutState::Completed.to(RolloutState::Running).is_err());
        assert!(RolloutState::Draft.to(RolloutState::Paused).is_err());
    }

    #[test]
    fn the_happy_path_of_a_device() {
        let path = [
            ActionState::Notified,
            ActionState::Downloading,
            ActionState::Downloaded,
            ActionState::Verifying,
            ActionState::Installing,
            ActionState::Rebooting,
            ActionState::VerifyingHealth,
            ActionState::Succeeded,
        ];
        let mut state = ActionState::Queued;
        for next in path {
            state = state.to(next).unwrap();
        }
        assert_eq!(state.outcome(), Some(true));
    }

    #[test]
    fn a_device_in_clinical_use_waits_but_one_installing_is_never_interrupted() {
        let waiting = ActionState::Downloaded.to(ActionState::Deferred).unwrap();
        assert_eq!(waiting.to(ActionState::Notified), Ok(ActionState::Notified));
        assert!(ActionState::Installing.to(ActionState::Deferred).is_err());
        assert!(ActionState::Rebooting.to(ActionState::Canceled).is_err());
        assert_eq!(
            ActionState::VerifyingHealth
                .to(ActionState::RolledBack)
                .unwrap()
                .outcome(),
            Some(false)
        );
    }

    #[test]
    fn reports_out_of_order_are_refused() {
        assert!(ActionState::Failed.to(ActionState::Downloaded).is_err());
        assert!(ActionState::Succeeded.to(ActionState::Succeeded).is_err());
        assert!(ActionState::Downloaded.to(ActionState::Downloading).is_err());
        assert!(ActionState::Queued.to(ActionState::Installing).is_err());
    }

    #[test]
    fn an_operator_abandons_any_unfinished_action_but_no_finished_one() {
        assert_eq!(ActionState::Installing.abandon(), Ok(ActionState::Canceled));
        assert_eq!(ActionState::VerifyingHealth.abandon(), Ok(ActionState::Canceled));
        assert_eq!(ActionState::Queued.abandon(), Ok(ActionState::Canceled));
        assert!(ActionState::Succeeded.abandon().is_err());
        assert!(ActionState::Canceled.abandon().is_err());
    }

    proptest! {
        #[test]
        fn finished_actions_never_move(from in 0usize..13, to in 0usize..13) {
            let (from, to) = (ActionState::ALL[from], ActionState::ALL[to]);
            if from.is_final() {
                prop_assert!(from.to(to).is_err());
            }
            if to == ActionState::Succeeded {
                prop_assert_eq!(from.to(to).is_ok(), from == ActionState::VerifyingHealth);
            }
        }

        #[test]
        fn finished_rollouts_never_move(from in 0usize..6, to in 0usize..6) {
            let (from, to) = (RolloutState::ALL[from], RolloutState::ALL[to]);
            if from.is_final() {
                prop_assert!(from.to(to).is_err());
            }
        }
    }
}
