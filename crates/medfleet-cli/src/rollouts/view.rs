//! What a rollout is shown as: stable JSON views of a rollout, its waves and devices (states as lower-case words,
//! durations in seconds), and the tables and summaries people read.

use medfleet_proto::v1;
use serde::Serialize;

use crate::output::{self, time};

pub(super) fn state_text(state: i32) -> &'static str {
    match v1::RolloutState::try_from(state) {
        Ok(v1::RolloutState::Draft) => "draft",
        Ok(v1::RolloutState::Running) => "running",
        Ok(v1::RolloutState::Paused) => "paused",
        Ok(v1::RolloutState::Halted) => "halted",
        Ok(v1::RolloutState::Completed) => "completed",
        Ok(v1::RolloutState::Aborted) => "aborted",
        _ => "unknown",
    }
}

pub(super) fn action_text(state: i32) -> &'static str {
    use v1::ActionState as A;
    match A::try_from(state) {
        Ok(A::Queued) => "queued",
        Ok(A::Notified) => "notified",
        Ok(A::Downloading) => "downloading",
        Ok(A::Downloaded) => "downloaded",
        Ok(A::Verifying) => "verifying",
        Ok(A::Installing) => "installing",
        Ok(A::Rebooting) => "rebooting",
        Ok(A::VerifyingHealth) => "verifying_health",
        Ok(A::Succeeded) => "succeeded",
        Ok(A::Failed) => "failed",
        Ok(A::Deferred) => "deferred",
        Ok(A::RolledBack) => "rolled_back",
        Ok(A::Canceled) => "canceled",
        _ => "unknown",
    }
}

fn clinical_text(policy: i32) -> &'static str {
    match v1::ClinicalUsePolicy::try_from(policy) {
        Ok(v1::ClinicalUsePolicy::Defer) => "defer",
        Ok(v1::ClinicalUsePolicy::Approve) => "approve",
        _ => "unspecified",
    }
}

fn seconds(d: Option<&prost_types::Duration>) -> i64 {
    d.map_or(0, |d| d.seconds)
}

fn human(secs: i64) -> String {
    u64::try_from(secs).ok().filter(|s| *s > 0).map_or_else(
        || "none".to_owned(),
        |s| humantime::format_duration(std::time::Duration::from_secs(s)).to_string(),
    )
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(super) struct CountsView {
    pub(super) targeted: u32,
    pub(super) queued: u32,
    pub(super) in_progress: u32,
    pub(super) deferred: u32,
    pub(super) succeeded: u32,
    pub(super) failed: u32,
    pub(super) rolled_back: u32,
    pub(super) canceled: u32,
    /// Not updated by the deadline (not counted in `failed`).
    pub(super) expired: u32,
}

impl CountsView {
    /// Devices that will not move any more.
    pub(super) fn finished(&self) -> u32 {
        self.succeeded + self.failed + self.rolled_back + self.canceled + self.expired
    }

    pub(super) fn summary(&self) -> String {
        format!(
            "{} ok, {} failed, {} in progress, {} deferred, {} queued{}{}{}",
            self.succeeded,
            self.failed,
            self.in_progress,
            self.deferred,
            self.queued,
            if self.rolled_back > 0 {
                format!(", {} rolled back", self.rolled_back)
            } else {
                String::new()
            },
            if self.canceled > 0 {
                format!(", {} canceled", self.canceled)
            } else {
                String::new()
            },
            if self.expired > 0 {
                format!(", {} not updated by the deadline", self.expired)
            } else {
                String::new()
            },
        )
    }
}

impl From<Option<v1::RolloutCounts>> for CountsView {
    fn from(c: Option<v1::RolloutCounts>) -> Self {
        let c = c.unwrap_or_default();
        Self {
            targeted: c.targeted,
            queued: c.queued,
            in_progress: c.in_progress,
            deferred: c.deferred,
            succeeded: c.succeeded,
            failed: c.failed,
            rolled_back: c.rolled_back,
            canceled: c.canceled,
            expired: c.expired,
        }
    }
}

#[derive(Debug, Serialize)]
pub(super) struct RolloutView {
    pub(super) id: String,
    pub(super) artifact_id: String,
    pub(super) target_name: String,
    pub(super) version: String,
    pub(super) state: &'static str,
    /// 0-based, as medfleetd counts.
    pub(super) current_wave: u32,
    pub(super) waves: Vec<String>,
    pub(super) success_threshold: String,
    pub(super) soak_seconds: i64,
    pub(super) halt_threshold: String,
    pub(super) min_executed: u32,
    pub(super) window: String,
    pub(super) timezone: String,
    pub(super) clinical_use: &'static str,
    pub(super) deadline_seconds: i64,
    pub(super) reason: String,
    pub(super) created_by: String,
    pub(super) create_time: String,
    pub(super) update_time: String,
    pub(super) rollback_of: String,
    pub(super) comment: String,
    pub(super) counts: CountsView,
}

impl From<v1::Rollout> for RolloutView {
    fn from(r: v1::Rollout) -> Self {
        Self {
            state: state_text(r.state),
            clinical_use: clinical_text(r.clinical_use),
            soak_seconds: seconds(r.soak.as_ref()),
            deadline_seconds: seconds(r.deadline.as_ref()),
            create_time: time(r.create_time.as_ref()),
            update_time: time(r.update_time.as_ref()),
            counts: r.counts.into(),
            id: r.id,
            artifact_id: r.artifact_id,
            target_name: r.target_name,
            version: r.version,
            current_wave: r.current_wave,
            waves: r.waves,
            success_threshold: r.success_threshold,
            halt_threshold: r.halt_threshold,
            min_executed: r.min_executed,
            window: r.window,
            timezone: r.timezone,
            reason: r.reason,
            created_by: r.created_by,
            rollback_of: r.rollback_of,
            comment: r.comment,
        }
    }
}

#[derive(Debug, Serialize)]
pub(super) struct WaveView {
    pub(super) index: u32,
    pub(super) share: String,
    pub(super) counts: CountsView,
    pub(super) start_time: String,
}

#[derive(Debug, Serialize)]
pub(super) struct DeviceView {
    pub(super) device_id: String,
    pub(super) serial_number: String,
    pub(super) location: String,
    pub(super) attempt: u32,
    pub(super) wave: u32,
    pub(super) state: &'static str,
    pub(super) reason: String,
    pub(super) detail: String,
    pub(super) bytes_downloaded: u64,
    pub(super) update_time: String,
    pub(super) approved_by: String,
    pub(super) approved_until: String,
}

impl From<v1::RolloutDevice> for DeviceView {
    fn from(d: v1::RolloutDevice) -> Self {
        Self {
            state: action_text(d.state),
            update_time: time(d.update_time.as_ref()),
            device_id: d.device_id,
            serial_number: d.serial_number,
            location: d.location,
            attempt: d.attempt,
            wave: d.wave,
            reason: d.reason,
            detail: d.detail,
            bytes_downloaded: d.bytes_downloaded,
            approved_by: d.approved_by,
            approved_until: time(d.approved_until.as_ref()),
        }
    }
}

impl DeviceView {
    /// Failed, rolled back or deferred: the devices someone may have to look at.
    pub(super) fn needs_attention(&self) -> bool {
        matches!(self.state, "failed" | "rolled_back" | "deferred")
    }
}

#[derive(Debug, Serialize)]
pub(super) struct DetailView {
    pub(super) rollout: RolloutView,
    pub(super) waves: Vec<WaveView>,
    pub(super) devices: Vec<DeviceView>,
    /// How many devices the rollout has (`devices` lists fewer when the reply's device limit cut it).
    pub(super) devices_total: u32,
}

impl From<v1::RolloutDetail> for DetailView {
    fn from(d: v1::RolloutDetail) -> Self {
        Self {
            rollout: d.rollout.unwrap_or_default().into(),
            waves: d
                .waves
                .into_iter()
                .map(|w| WaveView {
                    start_time: time(w.start_time.as_ref()),
                    counts: w.counts.into(),
                    index: w.index,
                    share: w.share,
                })
                .collect(),
            devices_total: d.devices_total,
            devices: d.devices.into_iter().map(DeviceView::from).collect(),
        }
    }
}

/// "wave 2 of 4" (people count from 1).
pub(super) fn wave_text(r: &RolloutView) -> String {
    format!("wave {} of {}", r.current_wave.saturating_add(1), r.waves.len())
}

pub(super) fn print_rollout(r: &RolloutView) {
    println!(
        "rollout {} — {} (version {}, artifact {})\n  state:        {}{}\n  progress:     {}: {} of {} devices, {}",
        r.id,
        r.target_name,
        r.version,
        r.artifact_id,
        r.state,
        if r.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.reason)
        },
        wave_text(r),
        r.counts.finished(),
        r.counts.targeted,
        r.counts.summary()
    );
    println!(
        "  waves:        {}\n  rules:        advance at {} succeeded after a {} soak; halt above {} failed (once {} \
         finished)\n  window:       {}\n  clinical use: {}\n  deadline:     {}",
        r.waves.join(", "),
        or_default(&r.success_threshold, "95%"),
        human(r.soak_seconds),
        or_default(&r.halt_threshold, "5%"),
        if r.min_executed == 0 { 3 } else { r.min_executed },
        if r.window.is_empty() {
            "any time".to_owned()
        } else {
            format!("{} ({})", r.window, or_default(&r.timezone, "each device's site time"))
        },
        r.clinical_use,
        human(r.deadline_seconds),
    );
    println!(
        "  created:      {} by {}{}{}",
        r.create_time,
        r.created_by,
        if r.rollback_of.is_empty() {
            String::new()
        } else {
            format!("\n  rolls back:   {}", r.rollback_of)
        },
        if r.comment.is_empty() {
            String::new()
        } else {
            format!("\n  comment:      {}", r.comment)
        },
    );
}

fn or_default<'a>(value: &'a str, default: &'a str) -> &'a str {
    if value.is_empty() { default } else { value }
}

pub(super) fn print_detail(d: &DetailView, only_attention: bool) {
    print_rollout(&d.rollout);
    let mut waves = output::table(&[
        "WAVE",
        "SHARE",
        "DEVICES",
        "OK",
        "FAILED",
        "IN PROGRESS",
        "DEFERRED",
        "STARTED",
    ]);
    for w in &d.waves {
        waves.add_row(vec![
            (w.index + 1).to_string(),
            w.share.clone(),
            w.counts.targeted.to_string(),
            w.counts.succeeded.to_string(),
            w.counts.failed.to_string(),
            w.counts.in_progress.to_string(),
            w.counts.deferred.to_string(),
            if w.start_time.is_empty() {
                "not yet".to_owned()
            } else {
                w.start_time.clone()
            },
        ]);
    }
    println!("{waves}");
    let devices: Vec<&DeviceView> = d
        .devices
        .iter()
        .filter(|dev| !only_attention || dev.needs_attention())
        .collect();
    if devices.is_empty() {
        if only_attention {
            println!("no device failed, was rolled back or is deferred");
        }
        return;
    }
    let mut table = output::table(&[
        "DEVICE",
        "SERIAL",
        "LOCATION",
        "WAVE",
        "ATTEMPT",
        "STATE",
        "REASON",
        "DOWNLOADED",
        "UPDATED",
        "APPROVED BY",
    ]);
    for dev in devices {
        let reason = match (dev.reason.is_empty(), dev.detail.is_empty()) {
            (false, false) => format!("{}: {}", dev.reason, dev.detail),
            (false, true) => dev.reason.clone(),
            _ => dev.detail.clone(),
        };
        table.add_row(vec![
            dev.device_id.clone(),
            dev.serial_number.clone(),
            dev.location.clone(),
            (dev.wave + 1).to_string(),
            dev.attempt.to_string(),
            dev.state.to_owned(),
            reason,
            indicatif::HumanBytes(dev.bytes_downloaded).to_string(),
            dev.update_time.clone(),
            dev.approved_by.clone(),
        ]);
    }
    println!("{table}");
    let listed = u32::try_from(d.devices.len()).unwrap_or(u32::MAX);
    if listed < d.devices_total {
        println!(
            "{listed} of {} devices listed, those that need attention first (--limit lists more, up to 10000)",
            d.devices_total
        );
    }
}
