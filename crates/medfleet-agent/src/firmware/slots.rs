//! The device's two firmware slots and what it remembers about its updates, in one file (`firmware/slots.json`)
//! replaced atomically: after a crash at any point the device runs either its old or its new image, and knows
//! which actions it finished.
//!
//! An install writes the image into the slot that is not running and arms a *trial* of it. The next boot runs
//! the trial slot once (`booted`); only a passed health check makes it the active slot. A boot that finds a
//! trial already booted means the new image never proved healthy (it crashed or hung during its check), so the
//! device falls back to the active slot, as an A/B bootloader's boot counter does.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use medfleet_core::firmware::state::ActionState;
use serde::{Deserialize, Serialize};

/// How many finished actions the device remembers (a replayed command older than that is refused by the release
/// counter instead).
const REMEMBERED: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Slot {
    #[default]
    A,
    B,
}

impl Slot {
    pub(crate) fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
        }
    }
}

/// The signed target a slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Image {
    pub(crate) target: String,
    pub(crate) version: String,
    pub(crate) release_counter: u64,
    pub(crate) sha256: String,
}

/// An installed image that has not proved healthy yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Trial {
    pub(crate) action: String,
    pub(crate) attempt: u32,
    pub(crate) slot: Slot,
    /// The device has started on it once.
    pub(crate) booted: bool,
}

/// How an action ended on this device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Finished {
    pub(crate) action: String,
    pub(crate) attempt: u32,
    pub(crate) state: String,
    pub(crate) reason: String,
    pub(crate) detail: String,
}

impl Finished {
    pub(crate) fn state(&self) -> ActionState {
        ActionState::parse(&self.state).unwrap_or(ActionState::Failed)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Slots {
    pub(crate) active: Slot,
    pub(crate) a: Option<Image>,
    pub(crate) b: Option<Image>,
    pub(crate) trial: Option<Trial>,
    /// Newest last.
    pub(crate) finished: VecDeque<Finished>,
    /// The highest release counter this device ever committed to (a signed downgrade leaves it where it was).
    #[serde(default)]
    pub(crate) highest_release: u64,
}

/// What a boot decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Boot {
    /// Runs the active slot (or the trial slot, first boot on it).
    Normal,
    /// The trial slot had booted before and never passed its health check: back on the active slot.
    FellBack(Finished),
}

impl Slots {
    pub(crate) fn image(&self, slot: Slot) -> Option<&Image> {
        match slot {
            Slot::A => self.a.as_ref(),
            Slot::B => self.b.as_ref(),
        }
    }

    pub(crate) fn set_image(&mut self, slot: Slot, image: Option<Image>) {
        match slot {
            Slot::A => self.a = image,
            Slot::B => self.b = image,
        }
    }

    /// The slot the device runs now.
    pub(crate) fn running_slot(&self) -> Slot {
        match &self.trial {
            Some(trial) if trial.booted => trial.slot,
            _ => self.active,
        }
    }

    /// The image the device runs now (`None`: the factory image, no signed firmware installed yet).
    pub(crate) fn running(&self) -> Option<&Image> {
        self.image(self.running_slot())
    }

    /// Starting the device: the first boot of a trial runs it; a second one falls back.
    pub(crate) fn boot(&mut self) -> Boot {
        match self.trial.take() {
            Some(mut trial) if !trial.booted => {
                trial.booted = true;
                self.trial = Some(trial);
                Boot::Normal
            }
            Some(trial) => {
                let finished = Finished {
                    action: trial.action,
                    attempt: trial.attempt,
                    state: ActionState::RolledBack.as_str().to_owned(),
                    reason: "health_check_failed".to_owned(),
                    detail: "the new image restarted before its health check passed; back on the previous slot"
                        .to_owned(),
                };
                self.finish(finished.clone());
                Boot::FellBack(finished)
            }
            None => Boot::Normal,
        }
    }

    pub(crate) fn finish(&mut self, finished: Finished) {
        self.finished
            .retain(|f| !(f.action == finished.action && f.attempt == finished.attempt));
        self.finished.push_back(finished);
        while self.finished.len() > REMEMBERED {
            self.finished.pop_front();
        }
    }

    /// How this device ended (action, attempt), if it did.
    pub(crate) fn finished(&self, action: &str, attempt: u32) -> Option<&Finished> {
        self.finished
            .iter()
            .find(|f| f.action == action && f.attempt == attempt)
    }
}

/// Where the firmware state lives in the agent's state directory, and the lock that keeps one verification at a
/// time on its TUF datastore.
#[derive(Debug, Clone)]
pub(crate) struct Paths(PathBuf, Arc<tokio::sync::Mutex<()>>);

impl Paths {
    pub(crate) fn new(state_dir: &Path) -> Self {
        Self(state_dir.join("firmware"), Arc::default())
    }

    /// Held by a verification from its start to its end, even when the job that asked for it is canceled: tough
    /// reads and rewrites the datastore, and a job started after a broken session must not read it half-written.
    pub(crate) fn datastore_lock(&self) -> Arc<tokio::sync::Mutex<()>> {
        self.1.clone()
    }

    pub(crate) fn root(&self) -> &Path {
        &self.0
    }

    /// The TUF root this device trusts (the pinned one, replaced by each verified rotation).
    pub(crate) fn trusted_root(&self) -> PathBuf {
        self.0.join("root.json")
    }

    /// tough's datastore: the metadata versions this device saw last, so a restart cannot be rolled back.
    pub(crate) fn datastore(&self) -> PathBuf {
        self.0.join("tuf")
    }

    pub(crate) fn partial(&self, sha256: &str) -> PathBuf {
        self.0.join("download").join(format!("{sha256}.part"))
    }

    pub(crate) fn staged(&self, sha256: &str) -> PathBuf {
        self.0.join("staged").join(format!("{sha256}.img"))
    }

    pub(crate) fn slot(&self, slot: Slot) -> PathBuf {
        self.0.join(format!("slot-{}.img", slot.name()))
    }

    fn slots_file(&self) -> PathBuf {
        self.0.join("slots.json")
    }

    /// Removes downloads in progress and staged images (a canceled action, a finished install).
    pub(crate) fn discard_downloads(&self) {
        for dir in ["download", "staged"] {
            let _ = std::fs::remove_dir_all(self.0.join(dir));
        }
    }

    pub(crate) fn load(&self) -> anyhow::Result<Slots> {
        // A slot write that a crash cut short leaves its temporary file (never the slot: it is renamed in whole).
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".slot.tmp-") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let path = self.slots_file();
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is corrupt: the device cannot tell which firmware slot to run; restore it from a backup \
                     or re-provision the device",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Slots::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Atomically (temporary file, fsync, rename, directory fsync).
    pub(crate) fn save(&self, slots: &Slots) -> anyhow::Result<()> {
        medfleet_proto::client::write_private(&self.slots_file(), &serde_json::to_string_pretty(slots)?)?;
        sync_dir(&self.0)
    }
}

pub(crate) fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(counter: u64) -> Image {
        Image {
            target: format!("fw-{counter}.img"),
            version: format!("{counter}.0.0"),
            release_counter: counter,
            sha256: "00".repeat(32),
        }
    }

    #[test]
    fn a_trial_runs_once_and_a_second_boot_falls_back() {
        let mut slots = Slots {
            a: Some(image(1)),
            ..Slots::default()
        };
        slots.set_image(Slot::B, Some(image(2)));
        slots.trial = Some(Trial {
            action: "act".into(),
            attempt: 1,
            slot: Slot::B,
            booted: false,
        });
        assert_eq!(slots.running().map(|i| i.release_counter), Some(1));
        assert_eq!(slots.boot(), Boot::Normal);
        assert_eq!(slots.running().map(|i| i.release_counter), Some(2));
        let Boot::FellBack(finished) = slots.boot() else {
            panic!("a second boot of an unproven trial must fall back");
        };
        assert_eq!(finished.state(), ActionState::RolledBack);
        assert_eq!(slots.running().map(|i| i.release_counter), Some(1));
        assert!(slots.trial.is_none());
        assert_eq!(slots.finished("act", 1), Some(&finished));
        assert_eq!(slots.finished("act", 2), None);
    }

    #[test]
    fn finished_actions_are_bounded_and_a_retry_replaces_its_entry() {
        let mut slots = Slots::default();
        for i in 0..(REMEMBERED + 10) {
            slots.finish(Finished {
                action: format!("a{i}"),
                attempt: 1,
                state: "failed".into(),
                reason: String::new(),
                detail: String::new(),
            });
        }
        assert_eq!(slots.finished.len(), REMEMBERED);
        assert!(slots.finished("a0", 1).is_none());
        let last = format!("a{}", REMEMBERED + 9);
        slots.finish(Finished {
            action: last.clone(),
            attempt: 1,
            state: "succeeded".into(),
            reason: String::new(),
            detail: String::new(),
        });
        assert_eq!(slots.finished.len(), REMEMBERED);
        assert_eq!(
            slots.finished(&last, 1).map(Finished::state),
            Some(ActionState::Succeeded)
        );
    }

    #[test]
    fn slots_survive_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        assert_eq!(paths.load().unwrap(), Slots::default());
        let mut slots = Slots::default();
        slots.set_image(Slot::A, Some(image(3)));
        paths.save(&slots).unwrap();
        assert_eq!(paths.load().unwrap(), slots);
        std::fs::write(dir.path().join("firmware/slots.json"), "{").unwrap();
        assert!(format!("{:#}", paths.load().unwrap_err()).contains("corrupt"));
    }
}
