//! What a signed firmware target says about itself, and the one rule for whether a device may take it: the image
//! must be for the device's model and newer than what it runs (a higher release counter), unless the targets role
//! signed a downgrade to exactly this release. medfleetd applies the rule on upload and when it assigns, the agent
//! before it installs, so a compromised control plane cannot roll a device back on its own.
//!
//! The fields travel in the TUF target's `custom` object (signed with the target's hash and length); this module
//! only reads and judges them, verification of the signatures is TUF's.

use serde::{Deserialize, Serialize};

use crate::validation::{Violations, check_text};

/// The custom fields of a firmware target in the signed targets metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetMeta {
    /// The device model (hardware id) the image is built for, as devices report it.
    pub hardware_id: String,
    /// The vendor's version string, shown to people; ordering uses `release_counter`.
    pub version: String,
    /// Monotonic per model: a device refuses any image whose counter is not above the one it runs.
    pub release_counter: u64,
    /// Release counters this image may replace although they are higher (an authorised, signed downgrade, for
    /// safety fixes only: FDA expects downgrades only when necessary).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub downgrade_from: Vec<u64>,
}

/// What a device runs, as far as the rule needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub hardware_id: String,
    pub release_counter: u64,
    /// The highest release the device ever committed to. After a signed downgrade it runs less than that, and
    /// the release it went back from (still validly signed until the targets role drops it) must not return by
    /// merely being "newer" than what runs: only a release above every one it ran, or another signed downgrade
    /// from what it runs, is taken.
    pub highest: u64,
}

/// Why a target is refused for a device. The words go to operators and into the rollout's failure reasons.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetRefusal {
    #[error("the image is for model {target}, the device is a {device}")]
    WrongModel { target: String, device: String },
    #[error(
        "release {target} is not newer than release {installed} that the device runs, and no signed downgrade \
         from {installed} allows it"
    )]
    NotNewer { target: u64, installed: u64 },
    #[error(
        "release {target} is not above release {highest} that the device ran before it went back by a signed \
         downgrade; a fix needs a release above {highest}"
    )]
    Withdrawn { target: u64, highest: u64 },
}

/// Hardware ids and versions are short printable text; anything else in signed metadata is a mistake of the
/// signer, reported before anything is stored.
pub fn validate(meta: &TargetMeta) -> Result<(), Violations> {
    let mut v = Violations::new();
    v.check("custom.hardware_id", check_text(&meta.hardware_id, 128));
    v.check("custom.version", check_text(&meta.version, 64));
    if meta.release_counter == 0 {
        v.push(
            "custom.release_counter",
            "must be 1 or more (0 is what a device with no firmware record runs)",
        );
    }
    if meta.downgrade_from.len() > 64 {
        v.push("custom.downgrade_from", "at most 64 release counters");
    }
    if meta.downgrade_from.iter().any(|from| *from <= meta.release_counter) {
        v.push(
            "custom.downgrade_from",
            "lists releases this image replaces by going back: each must be higher than its own release_counter",
        );
    }
    v.finish(|| Some(()))
}

/// Whether `target` may replace what the device runs.
pub fn accepts(installed: &Installed, target: &TargetMeta) -> Result<(), TargetRefusal> {
    if installed.hardware_id != target.hardware_id {
        return Err(TargetRefusal::WrongModel {
            target: target.hardware_id.clone(),
            device: installed.hardware_id.clone(),
        });
    }
    let highest = installed.highest.max(installed.release_counter);
    if target.release_counter > highest || target.downgrade_from.contains(&installed.release_counter) {
        Ok(())
    } else if target.release_counter > installed.release_counter {
        Err(TargetRefusal::Withdrawn {
            target: target.release_counter,
            highest,
        })
    } else {
        Err(TargetRefusal::NotNewer {
            target: target.release_counter,
            installed: installed.release_counter,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn meta(counter: u64, downgrade_from: Vec<u64>) -> TargetMeta {
        TargetMeta {
            hardware_id: "MX450".into(),
            version: format!("2.{counter}.0"),
            release_counter: counter,
            downgrade_from,
        }
    }

    fn running(counter: u64) -> Installed {
        Installed {
            hardware_id: "MX450".into(),
            release_counter: counter,
            highest: counter,
        }
    }

    #[test]
    fn only_newer_releases_of_the_same_model() {
        assert_eq!(accepts(&running(3), &meta(4, vec![])), Ok(()));
        assert!(matches!(
            accepts(&running(4), &meta(4, vec![])),
            Err(TargetRefusal::NotNewer { .. })
        ));
        assert!(matches!(
            accepts(&running(5), &meta(4, vec![])),
            Err(TargetRefusal::NotNewer { .. })
        ));
        let other = Installed {
            hardware_id: "V500".into(),
            release_counter: 1,
            highest: 1,
        };
        assert!(matches!(
            accepts(&other, &meta(4, vec![])),
            Err(TargetRefusal::WrongModel { .. })
        ));
    }

    #[test]
    fn a_signed_downgrade_names_exactly_what_it_replaces() {
        let rollback = meta(4, vec![5]);
        assert_eq!(accepts(&running(5), &rollback), Ok(()));
        assert!(accepts(&running(6), &rollback).is_err(), "6 is not named");
    }

    #[test]
    fn the_release_a_device_went_back_from_does_not_return() {
        let back_on_4 = Installed {
            highest: 5,
            ..running(4)
        };
        assert_eq!(
            accepts(&back_on_4, &meta(5, vec![])),
            Err(TargetRefusal::Withdrawn { target: 5, highest: 5 })
        );
        assert_eq!(accepts(&back_on_4, &meta(6, vec![])), Ok(()));
        assert_eq!(
            accepts(&back_on_4, &meta(3, vec![4])),
            Ok(()),
            "a signed downgrade from what runs"
        );
    }

    #[test]
    fn metadata_mistakes_are_named() {
        assert!(validate(&meta(4, vec![5])).is_ok());
        let errors = validate(&TargetMeta {
            hardware_id: String::new(),
            version: "x".repeat(65),
            release_counter: 0,
            downgrade_from: vec![0],
        })
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"custom.hardware_id"), "{fields:?}");
        assert!(fields.contains(&"custom.version"), "{fields:?}");
        assert!(fields.contains(&"custom.release_counter"), "{fields:?}");
        assert!(fields.contains(&"custom.downgrade_from"), "{fields:?}");
    }

    #[test]
    fn custom_fields_round_trip_as_json() {
        let m = meta(7, vec![8, 9]);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["release_counter"], 7);
        assert_eq!(serde_json::from_value::<TargetMeta>(json).unwrap(), m);
        let plain = serde_json::json!({"hardware_id": "MX450", "version": "1", "release_counter": 1});
        assert!(
            serde_json::from_value::<TargetMeta>(plain)
                .unwrap()
                .downgrade_from
                .is_empty()
        );
    }

    proptest! {
        #[test]
        fn without_a_downgrade_the_counter_only_rises(installed in 0u64..1000, target in 0u64..1000) {
            let verdict = accepts(&running(installed), &meta(target, vec![]));
            prop_assert_eq!(verdict.is_ok(), target > installed);
        }

        #[test]
        fn without_a_downgrade_nothing_at_or_below_the_highest_ever(
            running_now in 0u64..100, above in 0u64..100, target in 0u64..300,
        ) {
            let installed = Installed { highest: running_now + above, ..running(running_now) };
            let verdict = accepts(&installed, &meta(target, vec![]));
            prop_assert_eq!(verdict.is_ok(), target > running_now + above);
        }
    }
}
