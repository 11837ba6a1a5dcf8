//! `medfleet rollouts watch`: a rollout followed live through WatchRollout, a progress bar per wave (on stderr, when
//! it is a terminal) and a line on stdout whenever the rollout's state or wave changes; with `-o json` one compact
//! JSON object per update. The exit status says how it ended: 0 completed, 8 halted, 9 aborted, 10 the deadline left
//! devices out.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use medfleet_proto::v1;

use super::Rollouts;
use super::view::{DetailView, wave_text};
use crate::error::RolloutEnded;
use crate::output::Format;

/// The rollout's states that end a watch.
fn finished(state: &str) -> bool {
    matches!(state, "completed" | "halted" | "aborted")
}

struct WaveBars {
    multi: MultiProgress,
    header: ProgressBar,
    waves: Vec<ProgressBar>,
    /// The last state and wave a line was printed for.
    last: Option<(&'static str, u32)>,
}

impl WaveBars {
    fn new() -> Self {
        let multi = MultiProgress::new();
        let header = multi.add(ProgressBar::new_spinner());
        header.set_style(
            ProgressStyle::with_template("{spinner} {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        header.enable_steady_tick(std::time::Duration::from_millis(250));
        Self {
            multi,
            header,
            waves: Vec::new(),
            last: None,
        }
    }

    fn update(&mut self, detail: &DetailView) {
        let r = &detail.rollout;
        self.header.set_message(format!(
            "rollout {} — {} {} — {}, {}{}",
            r.id,
            r.target_name,
            r.version,
            r.state,
            wave_text(r),
            if r.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", r.reason)
            }
        ));
        if self.waves.len() != detail.waves.len() {
            for bar in self.waves.drain(..) {
                self.multi.remove(&bar);
            }
            let style = ProgressStyle::with_template("  {prefix:16} {bar:30} {pos:>5}/{len:<5} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            for wave in &detail.waves {
                let bar = self.multi.add(ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_prefix(format!("wave {} ({})", wave.index + 1, wave.share));
                self.waves.push(bar);
            }
        }
        for (bar, wave) in self.waves.iter().zip(&detail.waves) {
            bar.set_length(u64::from(wave.counts.targeted));
            bar.set_position(u64::from(wave.counts.finished()));
            bar.set_message(if wave.start_time.is_empty() {
                "not started".to_owned()
            } else {
                wave.counts.summary()
            });
        }
        let now = (r.state, r.current_wave);
        if self.last != Some(now) {
            self.last = Some(now);
            let line = format!(
                "{}  {} {}, {}: {} of {} devices finished{}",
                chrono::Utc::now().format("%H:%M:%S"),
                r.id,
                r.state,
                wave_text(r),
                r.counts.finished(),
                r.counts.targeted,
                if r.reason.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", r.reason)
                }
            );
            self.multi.suspend(|| println!("{line}"));
        }
    }

    fn finish(&self) {
        self.header.finish_and_clear();
        for bar in &self.waves {
            bar.abandon();
        }
    }
}

/// The exit of a watch, from the last update seen.
fn outcome(id: &str, last: Option<&DetailView>) -> anyhow::Result<()> {
    let Some(last) = last else {
        return Err(anyhow::anyhow!(
            "medfleetd ended the watch of rollout {id} before sending anything; run it again"
        ));
    };
    let r = &last.rollout;
    let reason = if r.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", r.reason)
    };
    let ended = |code, message| Err(RolloutEnded { code, message }.into());
    match r.state {
        "completed" if r.counts.expired > 0 => ended(
            10,
            format!(
                "rollout {id} ended at its deadline with {} of {} devices not updated{reason}; see `medfleet \
                 rollouts show {id} --failed`",
                r.counts.expired, r.counts.targeted
            ),
        ),
        "completed" => Ok(()),
        "halted" => ended(
            8,
            format!(
                "rollout {id} halted{reason}; see `medfleet rollouts show {id} --failed`, fix the cause, then \
                 `medfleet rollouts retry-failed {id}` to give the failed devices another attempt and `medfleet \
                 rollouts resume {id}`, or `medfleet rollouts abort {id}`"
            ),
        ),
        "aborted" => ended(9, format!("rollout {id} was aborted{reason}")),
        state => Err(anyhow::anyhow!(
            "medfleetd ended the watch while rollout {id} is {state}; run `medfleet rollouts watch {id}` again"
        )),
    }
}

pub(super) async fn run(api: &mut Rollouts, rollout: &str, out: Format) -> anyhow::Result<()> {
    let mut stream = api
        .watch_rollout(v1::WatchRolloutRequest {
            rollout: rollout.to_owned(),
            device_limit: 0,
        })
        .await?
        .into_inner();
    let mut bars = (out == Format::Table).then(WaveBars::new);
    let mut last: Option<DetailView> = None;
    let result = loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        };
        let detail = DetailView::from(message);
        match &mut bars {
            Some(bars) => bars.update(&detail),
            // One compact object per line (JSON Lines): the stream stays parseable while it runs.
            None => println!("{}", serde_json::to_string(&detail)?),
        }
        let done = finished(detail.rollout.state);
        last = Some(detail);
        if done {
            break Ok(());
        }
    };
    if let Some(bars) = &bars {
        bars.finish();
    }
    result?;
    outcome(rollout, last.as_ref())?;
    if out == Format::Table
        && let Some(last) = &last
    {
        let c = &last.rollout.counts;
        println!(
            "rollout {rollout} completed: {} of {} devices updated, {} failed",
            c.succeeded, c.targeted, c.failed
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail(state: v1::RolloutState) -> DetailView {
        DetailView::from(v1::RolloutDetail {
            rollout: Some(v1::Rollout {
                id: "r1".into(),
                state: state.into(),
                reason: "3 of 20 devices that finished failed".into(),
                ..Default::default()
            }),
            waves: vec![],
            devices: vec![],
            devices_total: 0,
        })
    }

    #[test]
    fn only_a_completed_rollout_exits_zero() {
        assert!(outcome("r1", Some(&detail(v1::RolloutState::Completed))).is_ok());
        let code = |e: anyhow::Error| e.downcast_ref::<RolloutEnded>().map(|e| e.code);
        let halted = outcome("r1", Some(&detail(v1::RolloutState::Halted))).unwrap_err();
        assert!(halted.to_string().contains("retry-failed"), "{halted}");
        assert_eq!(code(halted), Some(8));
        let aborted = outcome("r1", Some(&detail(v1::RolloutState::Aborted))).unwrap_err();
        assert_eq!(code(aborted), Some(9));
        let mut expired = detail(v1::RolloutState::Completed);
        expired.rollout.counts.expired = 2;
        assert_eq!(code(outcome("r1", Some(&expired)).unwrap_err()), Some(10));
        assert!(outcome("r1", Some(&detail(v1::RolloutState::Running))).is_err());
        assert!(outcome("r1", None).is_err());
        assert!(finished("halted") && !finished("paused") && !finished("draft"));
    }
}
