//! FirmwareInstall on the device: refused while in clinical use; while `verifying`, the staged image is checked
//! once more and written into the slot the device does not run (all abandonable: the running image is
//! untouched); then the commitment, a trial armed in `slots.json` (`installing`), and the "reboot".

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use medfleet_core::firmware::state::ActionState;
use medfleet_proto::v1;
use tokio::task::JoinHandle;

use super::slots::{self, Image, Trial};
use super::{Failure, Link, Prepared, Shared, backoff, chance, download, finish, lock, report_of, send};

/// FirmwareInstall: refuse while in use; check the staged image once more and write the other slot (both while
/// `verifying`: the running image is untouched, so a cancel, a lost session or a crash only abandons the work);
/// refuse again if taken into use meanwhile; then commit: arm the trial (`installing`) and reboot.
pub(super) async fn install(
    shared: Arc<Shared>,
    link: Link,
    install: v1::FirmwareInstall,
    previous: Option<JoinHandle<()>>,
) {
    if let Some(previous) = previous {
        let _ = previous.await;
    }
    let (action, attempt) = (install.action_id.as_str(), install.attempt);
    // Counted from receipt (after any previous job finished would stretch it).
    let expires = install
        .valid_for
        .and_then(|d| Duration::try_from(d).ok())
        .map(|d| std::time::Instant::now() + d);
    if deferred_in_use(&shared, &link, action, attempt).await {
        return;
    }
    let prepared = lock(&shared.prepared)
        .clone()
        .filter(|p| p.action == action && p.attempt == attempt);
    let Some(prepared) = prepared else {
        finish(
            &shared,
            &link,
            action,
            attempt,
            ActionState::Failed,
            "not_downloaded",
            "told to install an update this device has not downloaded and verified",
        )
        .await;
        return;
    };
    send(&shared, &link, action, attempt, ActionState::Verifying, 0).await;
    let mut tries = 0;
    loop {
        match download::check_image(
            link.channel.clone(),
            &shared.paths,
            &prepared.target.name,
            &prepared.staged,
        )
        .await
        {
            Ok(()) => break,
            Err(Failure::Transient(why)) => backoff(&mut tries, &why, &shared).await,
            Err(Failure::Final { reason, detail }) => {
                finish(&shared, &link, action, attempt, ActionState::Failed, &reason, &detail).await;
                return;
            }
        }
    }
    if let Err(detail) = write_other_slot(&shared, action, attempt, &prepared).await {
        install_failed(&shared, &link, (action, attempt), &detail).await;
        return;
    }
    // Verifying and writing can take minutes on a large image: a clinician may have started using the device
    // meanwhile, and the server's judgement (no patient bound, inside the window) may be too old to act on.
    if deferred_in_use(&shared, &link, action, attempt).await {
        return;
    }
    if past(expires, std::time::Instant::now()) {
        tracing::info!(device = %shared.device_id, %action, "install not started in time; asking the server again");
        let _ = link
            .tx
            .send(report_of(
                &shared,
                action,
                attempt,
                ActionState::Deferred,
                0,
                "install_expired",
                "verifying and writing took longer than the server's go-ahead lasts; it installs when told again",
            ))
            .await;
        return;
    }
    // The commitment: from the saved trial on, a restart at any point boots the new slot once and checks it.
    if let Err(detail) = arm(&shared, action, attempt, &prepared) {
        install_failed(&shared, &link, (action, attempt), &detail).await;
        return;
    }
    send(&shared, &link, action, attempt, ActionState::Installing, 0).await;
    *lock(&shared.prepared) = None;
    shared.paths.discard_downloads();
    event!(shared.quiet, device = %shared.device_id, %action, version = %prepared.target.meta.version, "firmware installed; rebooting onto it");
    send(&shared, &link, action, attempt, ActionState::Rebooting, 0).await;
    let _ = link.reboot.send(()).await;
}

async fn install_failed(shared: &Shared, link: &Link, (action, attempt): (&str, u32), detail: &str) {
    finish(
        shared,
        link,
        action,
        attempt,
        ActionState::Failed,
        "install_failed",
        detail,
    )
    .await;
}

/// Whether a go-ahead that ends at `expires` (none: never) has run out at `now`.
pub(super) fn past(expires: Option<std::time::Instant>, now: std::time::Instant) -> bool {
    expires.is_some_and(|e| now >= e)
}

fn link_in_use(link: &Link) -> bool {
    !matches!(
        *link.state.borrow(),
        v1::OperationalState::Idle | v1::OperationalState::Maintenance
    )
}

/// Reports the install deferred when the device is in clinical use (and says whether it was).
async fn deferred_in_use(shared: &Shared, link: &Link, action: &str, attempt: u32) -> bool {
    if !link_in_use(link) {
        return false;
    }
    let state = *link.state.borrow();
    tracing::info!(device = %shared.device_id, %action, state = ?state, "install refused: the device is in clinical use");
    let (reason, detail) = if state == v1::OperationalState::Unspecified {
        (
            "operational_state_unknown",
            "the device's clinical software has not written its operational-state file; it installs once that says idle or maintenance",
        )
    } else {
        (
            "in_clinical_use",
            "the device is in clinical use; it installs once it is free",
        )
    };
    let _ = link
        .tx
        .send(report_of(
            shared,
            action,
            attempt,
            ActionState::Deferred,
            0,
            reason,
            detail,
        ))
        .await;
    true
}

/// The slot an install writes: the one that is neither running nor active, never the known-good image.
fn slot_to_write(shared: &Shared, action: &str) -> Result<slots::Slot, String> {
    let slots = lock(&shared.slots);
    let slot = slots.running_slot().other();
    if slots.trial.as_ref().is_some_and(|t| t.action != action) || slot == slots.active {
        return Err("another image is on trial; the known-good slot is not overwritten".to_owned());
    }
    Ok(slot)
}

fn image_of(prepared: &Prepared) -> Image {
    Image {
        target: prepared.target.name.clone(),
        version: prepared.target.meta.version.clone(),
        release_counter: prepared.target.meta.release_counter,
        sha256: prepared.target.sha256.clone(),
    }
}

/// Writes the staged image into the slot the device does not run (the old slot is untouched either way). The
/// slot's record is cleared first and set only once the image is whole on disk, so an interrupted write never
/// passes for an image; a slot that already holds this image (an earlier go-ahead lapsed after writing) is not
/// written again.
async fn write_other_slot(shared: &Shared, action: &str, attempt: u32, prepared: &Prepared) -> Result<(), String> {
    if chance(&shared.device_id, action, attempt, "install") < shared.options.faults.install_failure {
        return Err("writing the new slot failed (fault injection)".to_owned());
    }
    let slot = slot_to_write(shared, action)?;
    let image = image_of(prepared);
    {
        let mut slots = lock(&shared.slots);
        if slots.image(slot) == Some(&image) {
            return Ok(());
        }
        slots.set_image(slot, None);
        shared.paths.save(&slots).map_err(|e| format!("{e:#}"))?;
    }
    let path = shared.paths.slot(slot);
    let staged = prepared.staged.clone();
    let rate = shared.options.faults.write_rate;
    // Dropped with the job (a cancel, the session's end): the copy stops and nothing is renamed into the slot.
    let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _abandon = Abandon(abandoned.clone());
    let written = tokio::task::spawn_blocking(move || write_slot(&staged, &path, rate, &abandoned)).await;
    written
        .map_err(anyhow::Error::from)
        .and_then(|r| r)
        .map_err(|e| format!("{e:#}"))?;
    let mut slots = lock(&shared.slots);
    slots.set_image(slot, Some(image));
    shared.paths.save(&slots).map_err(|e| format!("{e:#}"))
}

/// Sets its flag when dropped.
struct Abandon(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Abandon {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Arms a trial boot of the slot `write_other_slot` wrote.
fn arm(shared: &Shared, action: &str, attempt: u32, prepared: &Prepared) -> Result<(), String> {
    let slot = slot_to_write(shared, action)?;
    let mut slots = lock(&shared.slots);
    if slots.image(slot) != Some(&image_of(prepared)) {
        return Err("the new slot does not hold the verified image".to_owned());
    }
    slots.trial = Some(Trial {
        action: action.to_owned(),
        attempt,
        slot,
        booted: false,
    });
    shared.paths.save(&slots).map_err(|e| format!("{e:#}"))
}

/// Copies the staged image into a slot (temporary file, fsync, rename, directory fsync), at most `rate` bytes a
/// second when given; stops without touching the slot once `abandoned` is set.
fn write_slot(
    staged: &std::path::Path,
    slot: &std::path::Path,
    rate: Option<u64>,
    abandoned: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let dir = slot.parent().unwrap_or_else(|| std::path::Path::new("."));
    let tmp = dir.join(format!(".slot.tmp-{}", uuid::Uuid::new_v4().simple()));
    let copied = (|| {
        let mut from = std::fs::File::open(staged).with_context(|| format!("cannot read {}", staged.display()))?;
        let mut to = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        let chunk = usize::try_from(rate.filter(|r| *r > 0).map_or(1 << 20, |r| r.div_ceil(10)))
            .unwrap_or(1 << 20)
            .min(1 << 20);
        let mut buffer = vec![0_u8; chunk];
        loop {
            if abandoned.load(std::sync::atomic::Ordering::Relaxed) {
                anyhow::bail!("the install was abandoned while the new slot was written");
            }
            let n = from.read(&mut buffer).context("cannot read the staged image")?;
            if n == 0 {
                break;
            }
            to.write_all(&buffer[..n])
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            if rate.is_some_and(|r| r > 0) {
                // Simulated slow flash (fault injection): a tenth of the rate per tenth of a second.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        to.sync_all()
            .with_context(|| format!("cannot sync {}", tmp.display()))?;
        if abandoned.load(std::sync::atomic::Ordering::Relaxed) {
            anyhow::bail!("the install was abandoned while the new slot was written");
        }
        std::fs::rename(&tmp, slot).with_context(|| format!("cannot write {}", slot.display()))
    })();
    if copied.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    copied?;
    slots::sync_dir(dir)
}
