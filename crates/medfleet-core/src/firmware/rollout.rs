//! Rollout decisions, as pure functions of counts and clocks: how many devices each wave holds, whether a wave
//! advances, holds or halts the rollout, and whether one device may install now.
//!
//! The scheduler (in the server) only gathers the numbers and applies the answer, so every rule here is unit- and
//! property-tested without a database. Every gate fails closed: what is not known to be safe defers.

use std::fmt;
use std::time::Duration;

use crate::presence::OperationalState;

/// A share of a population in hundredths of a percent (`10000` = 100 %), so `0.5%` is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Share(u16);

impl Share {
    pub const ALL: Self = Self(10_000);
    pub const NONE: Self = Self(0);

    /// Parses `"95%"`, `"0.5%"` or `"100%"` (at most two decimals, 0 to 100).
    pub fn parse(text: &str) -> Result<Self, RolloutError> {
        let bad = || RolloutError::Share(text.chars().take(16).collect());
        let number = text.trim().strip_suffix('%').ok_or_else(bad)?.trim();
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() || fraction.len() > 2 || !whole.chars().chain(fraction.chars()).all(|c| c.is_ascii_digit())
        {
            return Err(bad());
        }
        let whole: u32 = whole.parse().map_err(|_| bad())?;
        let fraction: u32 = format!("{fraction:0<2}").parse().map_err(|_| bad())?;
        let value = whole
            .checked_mul(100)
            .and_then(|w| w.checked_add(fraction))
            .ok_or_else(bad)?;
        u16::try_from(value)
            .ok()
            .filter(|v| *v <= 10_000)
            .map(Self)
            .ok_or_else(bad)
    }

    /// The smallest count of `total` that reaches this share (rounded up: 1 % of 50 devices is 1 device).
    pub fn of(self, total: usize) -> usize {
        let total = total as u128;
        usize::try_from((total * u128::from(self.0)).div_ceil(10_000)).unwrap_or(usize::MAX)
    }

    /// Whether `part` of `whole` is at least this share (an empty whole reaches every share).
    pub fn reached_by(self, part: usize, whole: usize) -> bool {
        (part as u128) * 10_000 >= (whole as u128) * u128::from(self.0)
    }

    /// Whether `part` of `whole` is more than this share.
    pub fn exceeded_by(self, part: usize, whole: usize) -> bool {
        (part as u128) * 10_000 > (whole as u128) * u128::from(self.0)
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 % 100 {
            0 => write!(f, "{}%", self.0 / 100),
            rest => write!(f, "{}.{rest:02}%", self.0 / 100),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    #[error("{0:?} is not a share: write it as a percentage from 0% to 100%, e.g. 95% or 0.5%")]
    Share(String),
    #[error("waves must grow from wave to wave and the last must be 100%, e.g. 1%,10%,50%,100%")]
    Waves,
    #[error("at most {MAX_WAVES} waves")]
    TooManyWaves,
}

/// The most waves one rollout may have.
pub const MAX_WAVES: usize = 20;

/// The cumulative share of the targeted devices each wave reaches; the last is always 100 %.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waves(Vec<Share>);

impl Waves {
    /// Parses `"1%,10%,50%,100%"`: strictly growing, ending at 100 %.
    pub fn parse(text: &str) -> Result<Self, RolloutError> {
        let shares = text.split(',').map(Share::parse).collect::<Result<Vec<_>, _>>()?;
        if shares.len() > MAX_WAVES {
            return Err(RolloutError::TooManyWaves);
        }
        let growing = shares.windows(2).all(|pair| pair[0] < pair[1]);
        if !growing || shares.last() != Some(&Share::ALL) || shares.first() == Some(&Share::NONE) {
            return Err(RolloutError::Waves);
        }
        Ok(Self(shares))
    }

    pub fn shares(&self) -> &[Share] {
        &self.0
    }

    /// How many of `total` devices each wave adds. Every wave but the last adds at least one device while any are
    /// left, so a tiny fleet still goes through its canary first; the counts always sum to `total`.
    pub fn sizes(&self, total: usize) -> Vec<usize> {
        let mut reached = 0;
        let mut sizes = Vec::with_capacity(self.0.len());
        for (i, share) in self.0.iter().enumerate() {
            let last = i + 1 == self.0.len();
            let target = if last {
                total
            } else {
                share.of(total).max(reached + 1).min(total)
            };
            sizes.push(target - reached);
            reached = target;
        }
        sizes
    }
}

/// The rules a rollout was created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// A wave advances once this share of its devices succeeded (and the soak has passed).
    pub success: Share,
    /// The rollout halts once failures are more than this share of the devices that finished (after `min_executed`).
    pub halt_at: Share,
    /// Failures are judged only once this many devices of the rollout finished (succeeded or failed).
    pub min_executed: usize,
    /// How long a wave must have reached its success share before the next begins.
    pub soak: Duration,
}

/// Where a set of a rollout's devices stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub targeted: usize,
    pub succeeded: usize,
    /// Failed or rolled back: what the image did.
    pub failed: usize,
    /// Not updated before the rollout's deadline (in use, offline): finished, but no verdict on the image.
    pub expired: usize,
}

impl Tally {
    /// Devices that finished, whatever the outcome.
    pub fn executed(&self) -> usize {
        self.succeeded + self.failed + self.expired
    }

    /// Devices whose outcome says something about the image (what the halt threshold judges).
    pub fn judged(&self) -> usize {
        self.succeeded + self.failed
    }
}

/// What the scheduler knows about a running rollout when it decides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The current wave.
    pub current: Tally,
    /// Every wave started so far.
    pub so_far: Tally,
    /// What the halt threshold judges: the devices of the waves so far that finished since an operator last
    /// resumed the rollout from a halt (all of them before any halt). Failures an operator has looked at and
    /// resumed over do not halt it again at once.
    pub judged: Tally,
    /// How long the current wave has been at its success share (`None`: not yet).
    pub successful_for: Option<Duration>,
    /// The rollout's deadline has passed: devices not updated by then are expired, and it ends.
    pub deadline_passed: bool,
}

/// What the scheduler does with a running rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Keep going: the wave is still in progress, or has reached its success share and soaks this much longer.
    Wait { soaking: Option<Duration> },
    /// Start the next wave.
    Advance,
    /// Every wave succeeded.
    Complete,
    /// The deadline passed and nothing of the started waves is still in flight: the rollout ends, what was not
    /// updated stays as it is (later waves are canceled).
    Expired,
    /// Stop: too many failures. Only an operator resumes a halted rollout.
    Halt { reason: String },
}

/// The decision for a running rollout in wave `wave` of `waves`. Halting is judged first and on the whole
/// rollout (since the last resume), so a bad image is stopped however the waves are cut; devices that merely ran
/// out of time are no verdict on the image and never halt it.
pub fn step(thresholds: &Thresholds, wave: usize, waves: usize, progress: Progress) -> Step {
    let Progress {
        current,
        so_far,
        judged,
        successful_for,
        deadline_passed,
    } = progress;
    if judged.judged() >= thresholds.min_executed.max(1)
        && thresholds.halt_at.exceeded_by(judged.failed, judged.judged())
    {
        return Step::Halt {
            reason: format!(
                "{} of {} devices that finished failed, more than the halt threshold {}",
                judged.failed,
                judged.judged(),
                thresholds.halt_at
            ),
        };
    }
    if deadline_passed && so_far.executed() >= so_far.targeted {
        return Step::Expired;
    }
    if !thresholds.success.reached_by(current.succeeded, current.targeted) {
        // A wave that finished below its success share can never advance: on a small ward (a canary of one, too
        // few finished devices for `min_executed`) the halt threshold may never judge it, and waiting would leave
        // the rollout "running" for ever. Failures an operator resumed over do not halt it again (it waits for a
        // retry); the last wave keeps its devices' outcomes as they are.
        if wave + 1 < waves && current.targeted > 0 && current.executed() >= current.targeted && judged.failed > 0 {
            return Step::Halt {
                reason: format!(
                    "wave {} finished with {} of its {} devices updated, below the success threshold {}: it cannot \
                     advance (retry the failed devices, then resume, or abort)",
                    wave + 1,
                    current.succeeded,
                    current.targeted,
                    thresholds.success
                ),
            };
        }
        return Step::Wait { soaking: None };
    }
    match successful_for {
        Some(held) if held >= thresholds.soak => {
            if wave + 1 >= waves {
                // The last wave is done only when every device finished, not at its success share.
                if current.executed() >= current.targeted {
                    Step::Complete
                } else {
                    Step::Wait { soaking: None }
                }
            } else {
                Step::Advance
            }
        }
        Some(held) => Step::Wait {
            soaking: Some(thresholds.soak.saturating_sub(held)),
        },
        None => Step::Wait {
            soaking: Some(thresholds.soak),
        },
    }
}

/// What a rollout does with devices in clinical use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClinicalUse {
    /// Wait until the device is free.
    Defer,
    /// Wait until it is free, or until a clinician with scope over its ward approves this device.
    Approve,
}

/// How long a clinician's approval lasts unless they say otherwise, and at most.
pub const APPROVAL_DEFAULT: Duration = Duration::from_hours(1);
pub const APPROVAL_MAX: Duration = Duration::from_hours(24);

/// A clinician's approval to install on a device in clinical use, as it was given: until when, and for which
/// patient association (none when the device was not bound then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Approval {
    pub until: chrono::DateTime<chrono::Utc>,
    pub association: Option<uuid::Uuid>,
}

impl Approval {
    /// Whether the approval still stands at `at` for a device whose open associations are `current`. A clinician
    /// judged one patient's situation at one moment: a different patient, a second one, or a binding that came
    /// after the approval voids it, and so does its expiry (fail closed: a stale approval must never let a device
    /// reboot at 02:00 on a patient nobody looked at).
    pub fn holds(&self, at: chrono::DateTime<chrono::Utc>, current: &[uuid::Uuid]) -> bool {
        at < self.until
            && match (self.association, current) {
                (None, []) => true,
                (Some(approved), [now]) => approved == *now,
                _ => false,
            }
    }
}

/// What is known about one device when it would install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceNow {
    /// An association charts its readings to a patient now.
    pub bound: bool,
    pub state: OperationalState,
    /// A clinician approved installing on this device (for `ClinicalUse::Approve`).
    pub approved: bool,
    /// Inside the rollout's maintenance window (true when it has none).
    pub in_window: bool,
}

/// Why a device does not install now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferral {
    /// Bound to a patient, or reporting in-use or alarming.
    InClinicalUse,
    /// Not bound, but its clinical software has not said what the device is doing (no state reported yet, or
    /// none at all): treated as in use, named apart so an operator can find a device whose software is silent.
    StateUnknown,
    OutsideWindow,
}

impl Deferral {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InClinicalUse => "in_clinical_use",
            Self::StateUnknown => "operational_state_unknown",
            Self::OutsideWindow => "outside_window",
        }
    }
}

/// Whether a device may install now. Fails closed: a device whose state is unknown counts as in use, an alarming
/// device is never interrupted (not even with approval), and outside the window nothing installs.
pub fn may_install(device: DeviceNow, policy: ClinicalUse) -> Result<(), Deferral> {
    let in_use = device.bound || !matches!(device.state, OperationalState::Idle | OperationalState::Maintenance);
    if in_use {
        let approved = policy == ClinicalUse::Approve
            && device.approved
            && !matches!(device.state, OperationalState::Alarming | OperationalState::Unknown);
        if !approved {
            return Err(if !device.bound && device.state == OperationalState::Unknown {
                Deferral::StateUnknown
            } else {
                Deferral::InClinicalUse
            });
        }
    }
    if !device.in_window {
        return Err(Deferral::OutsideWindow);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn thresholds() -> Thresholds {
        Thresholds {
            success: Share::parse("95%").unwrap(),
            halt_at: Share::parse("5%").unwrap(),
            min_executed: 3,
            soak: Duration::from_mins(30),
        }
    }

    #[test]
    fn shares_parse_and_print() {
        assert_eq!(Share::parse("0.5%").unwrap().to_string(), "0.50%");
        assert_eq!(Share::parse("100%").unwrap(), Share::ALL);
        assert_eq!(Share::parse("7.5%").unwrap().to_string(), "7.50%");
        for bad in ["", "%", "101%", "5", "-1%", "1.234%", "1e2%", "abc%", "99999999999%"] {
            assert!(Share::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn waves_must_grow_to_all() {
        assert!(Waves::parse("1%,10%,50%,100%").is_ok());
        assert_eq!(Waves::parse("10%,5%,100%"), Err(RolloutError::Waves));
        assert_eq!(Waves::parse("10%,50%"), Err(RolloutError::Waves));
        assert_eq!(Waves::parse("0%,100%"), Err(RolloutError::Waves));
        assert_eq!(Waves::parse("50%,50%,100%"), Err(RolloutError::Waves));
    }

    #[test]
    fn a_small_fleet_still_starts_with_a_canary() {
        let waves = Waves::parse("1%,10%,50%,100%").unwrap();
        assert_eq!(waves.sizes(200), vec![2, 18, 80, 100]);
        assert_eq!(waves.sizes(3), vec![1, 1, 1, 0]);
        assert_eq!(waves.sizes(0), vec![0, 0, 0, 0]);
    }

    fn tally(targeted: usize, succeeded: usize, failed: usize) -> Tally {
        Tally {
            targeted,
            succeeded,
            failed,
            expired: 0,
        }
    }

    fn at(wave: Tally, successful_for: Option<Duration>) -> Progress {
        Progress {
            current: wave,
            so_far: wave,
            judged: wave,
            successful_for,
            deadline_passed: false,
        }
    }

    #[test]
    fn failures_halt_before_anything_else() {
        let t = thresholds();
        let bad = tally(20, 17, 3);
        assert!(matches!(
            step(&t, 1, 4, at(bad, Some(Duration::from_hours(1)))),
            Step::Halt { .. }
        ));
        // Too few finished to judge: two failures of two is not yet a verdict.
        let early = tally(20, 0, 2);
        assert_eq!(step(&t, 0, 4, at(early, None)), Step::Wait { soaking: None });
    }

    #[test]
    fn a_wave_that_finished_below_its_share_halts_even_when_too_few_are_judged() {
        let t = thresholds();
        // Four beds, 1%,10%,50%,100%: a canary of one that failed; min_executed 3 never judges it.
        let canary = tally(1, 0, 1);
        let Step::Halt { reason } = step(&t, 0, 4, at(canary, None)) else {
            panic!("a canary that failed must halt the rollout");
        };
        assert!(reason.contains("wave 1 finished with 0 of its 1"), "{reason}");
        // Still in flight: it waits; and the last wave is never halted by this rule.
        assert_eq!(step(&t, 0, 4, at(tally(2, 0, 1), None)), Step::Wait { soaking: None });
        assert_eq!(step(&t, 3, 4, at(canary, None)), Step::Wait { soaking: None });
        // Resumed over that failure (nothing judged since): it waits for a retry instead of halting again.
        let resumed = Progress {
            judged: tally(0, 0, 0),
            ..at(canary, None)
        };
        assert_eq!(step(&t, 0, 4, resumed), Step::Wait { soaking: None });
    }

    #[test]
    fn a_resumed_rollout_judges_what_finished_since() {
        let t = thresholds();
        let bad = tally(20, 17, 3);
        // Resumed over those three failures: the four devices since then all succeeded.
        let resumed = Progress {
            judged: tally(4, 4, 0),
            ..at(bad, None)
        };
        assert_eq!(step(&t, 1, 4, resumed), Step::Wait { soaking: None });
        // A failure after the resume is judged among what finished after it (1 of 4 is more than 5 %).
        let again = Progress {
            judged: tally(4, 3, 1),
            ..resumed
        };
        assert!(matches!(step(&t, 1, 4, again), Step::Halt { .. }));
    }

    #[test]
    fn devices_that_ran_out_of_time_end_the_rollout_without_halting_it() {
        let t = thresholds();
        let wave = Tally {
            expired: 6,
            ..tally(20, 14, 0)
        };
        assert_eq!(step(&t, 1, 4, at(wave, None)), Step::Wait { soaking: None });
        let late = Progress {
            deadline_passed: true,
            ..at(wave, None)
        };
        assert_eq!(step(&t, 1, 4, late), Step::Expired);
        // Something still installing: it finishes first.
        let installing = Progress {
            so_far: Tally {
                expired: 5,
                ..tally(20, 14, 0)
            },
            ..late
        };
        assert_eq!(step(&t, 1, 4, installing), Step::Wait { soaking: None });
    }

    #[test]
    fn a_wave_advances_after_success_and_soak() {
        let t = thresholds();
        let wave = tally(20, 19, 0);
        assert_eq!(
            step(&t, 0, 4, at(wave, Some(Duration::from_mins(10)))),
            Step::Wait {
                soaking: Some(Duration::from_mins(20))
            }
        );
        assert_eq!(step(&t, 0, 4, at(wave, Some(Duration::from_mins(30)))), Step::Advance);
        let done = tally(20, 20, 0);
        assert_eq!(
            step(&t, 3, 4, at(wave, Some(Duration::from_hours(1)))),
            Step::Wait { soaking: None }
        );
        assert_eq!(step(&t, 3, 4, at(done, Some(Duration::from_hours(1)))), Step::Complete);
    }

    #[test]
    fn clinical_use_fails_closed() {
        let at = chrono::Utc::now();
        let patient = uuid::Uuid::new_v4();
        let given = Approval {
            until: at + chrono::Duration::minutes(30),
            association: Some(patient),
        };
        assert!(given.holds(at, &[patient]));
        assert!(!given.holds(at + chrono::Duration::minutes(30), &[patient]), "expired");
        assert!(!given.holds(at, &[uuid::Uuid::new_v4()]), "another patient");
        assert!(!given.holds(at, &[patient, uuid::Uuid::new_v4()]), "a second patient");
        assert!(
            !given.holds(at, &[]),
            "dissociated: free anyway, but the approval is not what lets it install"
        );
        let unbound = Approval {
            association: None,
            ..given
        };
        assert!(unbound.holds(at, &[]));
        assert!(!unbound.holds(at, &[patient]), "bound after the approval");

        let free = DeviceNow {
            bound: false,
            state: OperationalState::Idle,
            approved: false,
            in_window: true,
        };
        assert_eq!(may_install(free, ClinicalUse::Defer), Ok(()));
        let bound = DeviceNow { bound: true, ..free };
        assert_eq!(may_install(bound, ClinicalUse::Defer), Err(Deferral::InClinicalUse));
        assert_eq!(may_install(bound, ClinicalUse::Approve), Err(Deferral::InClinicalUse));
        let approved = DeviceNow {
            approved: true,
            ..bound
        };
        assert_eq!(may_install(approved, ClinicalUse::Defer), Err(Deferral::InClinicalUse));
        assert_eq!(may_install(approved, ClinicalUse::Approve), Ok(()));
        for state in [OperationalState::Unknown, OperationalState::Alarming] {
            let device = DeviceNow { state, ..approved };
            assert_eq!(
                may_install(device, ClinicalUse::Approve),
                Err(Deferral::InClinicalUse),
                "{state:?}"
            );
        }
        let silent = DeviceNow {
            state: OperationalState::Unknown,
            approved: true,
            ..free
        };
        assert_eq!(may_install(silent, ClinicalUse::Approve), Err(Deferral::StateUnknown));
        let closed = DeviceNow {
            in_window: false,
            ..free
        };
        assert_eq!(may_install(closed, ClinicalUse::Defer), Err(Deferral::OutsideWindow));
    }

    proptest! {
        #[test]
        fn wave_sizes_sum_to_the_fleet(total in 0usize..100_000, cut in proptest::collection::btree_set(1u16..10_000, 0..6)) {
            let mut text: Vec<String> = cut.iter().map(|c| Share(*c).to_string()).collect();
            text.push("100%".into());
            let waves = Waves::parse(&text.join(",")).unwrap();
            let sizes = waves.sizes(total);
            prop_assert_eq!(sizes.iter().sum::<usize>(), total);
            prop_assert_eq!(sizes.len(), waves.shares().len());
        }

        #[test]
        fn shares_round_trip(value in 0u16..=10_000) {
            prop_assert_eq!(Share::parse(&Share(value).to_string()).unwrap(), Share(value));
        }

        #[test]
        fn nothing_bound_or_unknown_installs_without_approval(
            bound: bool, approved: bool, in_window: bool, state in 0usize..5
        ) {
            let device = DeviceNow { bound, state: OperationalState::ALL[state], approved, in_window };
            let in_use = bound || !matches!(device.state, OperationalState::Idle | OperationalState::Maintenance);
            if in_use {
                prop_assert!(may_install(device, ClinicalUse::Defer).is_err());
            }
            if !in_window {
                prop_assert!(may_install(device, ClinicalUse::Approve).is_err());
            }
        }
    }
}
