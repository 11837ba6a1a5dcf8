//! Readings: the simulated bedside monitor's vital signs, the durable store-and-forward buffer, and the
//! `PublishReadings` stream that drains it.
//!
//! A batch is written to the buffer (file synced, then renamed into place, then the directory synced) before it
//! is sent, and its file is removed only when the server acks its sequence; so a reading survives an agent
//! restart, a lost connection and a server crash, and a resend after any of those is deduplicated by the server.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use medfleet_proto::client::{Bundle, connect, write_private};
use medfleet_proto::v1::{self, device_service_client::DeviceServiceClient};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::state::StateDir;

/// What the simulated monitor measures.
#[derive(Debug, Clone)]
pub(crate) struct VitalsOptions {
    /// One batch (HR, SpO2, NIBP, temperature, RR) per interval.
    pub(crate) interval: Duration,
    /// Stop measuring after this many batches (tests, demos); sending goes on until all are acked.
    pub(crate) count: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredItem {
    code: String,
    value: f64,
    unit: String,
    observed_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredBatch {
    sequence: u64,
    items: Vec<StoredItem>,
}

/// The on-disk buffer: one file per unacknowledged batch, plus the last sequence number used.
#[derive(Debug, Clone)]
pub(crate) struct Buffer {
    dir: PathBuf,
    /// The one sequence allocator: measuring and renumbering both take "last + 1" and write a file under it, so
    /// without this two of them could pick the same number and one batch would overwrite the other.
    allocate: Arc<Mutex<()>>,
}

impl Buffer {
    pub(crate) fn open(state: &StateDir) -> anyhow::Result<Self> {
        let dir = state.root().join("outbox");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self {
            dir,
            allocate: Arc::new(Mutex::new(())),
        })
    }

    fn counter(&self) -> PathBuf {
        self.dir.join("sequence")
    }

    fn batch_path(&self, sequence: u64) -> PathBuf {
        self.dir.join(format!("batch-{sequence:020}.json"))
    }

    fn sync_dir(&self) -> anyhow::Result<()> {
        std::fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("cannot sync {}", self.dir.display()))
    }

    /// Sequences of the batches still waiting for an ack, oldest first.
    pub(crate) fn pending(&self) -> anyhow::Result<Vec<u64>> {
        let mut sequences: Vec<u64> = std::fs::read_dir(&self.dir)
            .with_context(|| format!("cannot read {}", self.dir.display()))?
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name();
                let name = name.to_str()?;
                name.strip_prefix("batch-")?.strip_suffix(".json")?.parse().ok()
            })
            .collect();
        sequences.sort_unstable();
        Ok(sequences)
    }

    /// The last sequence used: the counter, or a batch written after it if the agent died in between.
    fn last_sequence(&self) -> anyhow::Result<u64> {
        let counter = match std::fs::read_to_string(self.counter()) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .with_context(|| format!("{} is corrupt", self.counter().display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", self.counter().display())),
        };
        Ok(counter.max(self.pending()?.last().copied().unwrap_or(0)))
    }

    /// Stores a new batch durably and returns its sequence number.
    fn append(&self, items: Vec<StoredItem>) -> anyhow::Result<u64> {
        let _allocating = self.allocate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.append_allocated(items)
    }

    /// `append` for a caller that holds the allocator.
    fn append_allocated(&self, items: Vec<StoredItem>) -> anyhow::Result<u64> {
        let sequence = self.last_sequence()? + 1;
        let batch = StoredBatch { sequence, items };
        write_private(&self.batch_path(sequence), &serde_json::to_string(&batch)?)?;
        write_private(&self.counter(), &sequence.to_string())?;
        self.sync_dir()?;
        Ok(sequence)
    }

    fn load(&self, sequence: u64) -> anyhow::Result<Option<v1::ReadingBatch>> {
        let path = self.batch_path(sequence);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            // Acked meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let batch: StoredBatch =
            serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
        Ok(Some(v1::ReadingBatch {
            sequence: batch.sequence,
            items: batch
                .items
                .into_iter()
                .map(|item| v1::ReadingItem {
                    code: item.code,
                    value: item.value,
                    unit: item.unit,
                    observed_at: Some(prost_types::Timestamp {
                        seconds: item.observed_at_ms.div_euclid(1000),
                        nanos: i32::try_from(item.observed_at_ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
                    }),
                    quality: Vec::new(),
                })
                .collect(),
        }))
    }

    /// Moves an unacknowledged batch to a sequence of at least `at_least` (the server had seen its sequence with
    /// other readings: this device's buffer was reset). The new copy is durable before the old one goes.
    fn renumber(&self, sequence: u64, at_least: u64) -> anyhow::Result<Option<u64>> {
        let path = self.batch_path(sequence);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let batch: StoredBatch =
            serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
        let _allocating = self.allocate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.last_sequence()? + 1 < at_least {
            write_private(&self.counter(), &(at_least - 1).to_string())?;
        }
        let renumbered = self.append_allocated(batch.items)?;
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        Ok(Some(renumbered))
    }

    /// Keeps a batch the server refused whole (it can never be accepted as it is) out of the send queue, beside
    /// the buffer for inspection, instead of resending it forever or deleting readings.
    fn set_aside(&self, sequence: u64) -> anyhow::Result<PathBuf> {
        let aside = self.dir.join(format!("refused-{sequence:020}.json"));
        match std::fs::rename(self.batch_path(sequence), &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot set refused batch {sequence} aside")),
        }
        self.sync_dir()?;
        Ok(aside)
    }

    /// Drops an acknowledged batch. Losing the removal in a crash only means a harmless resend.
    fn acknowledged(&self, sequence: u64) -> anyhow::Result<()> {
        match std::fs::remove_file(self.batch_path(sequence)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove acked batch {sequence}")),
        }
    }
}

/// A plausible adult's vitals, varying a little from batch to batch (deterministic per sequence, so a test can
/// tell values apart without randomness).
fn vitals(sequence: u64, at: SystemTime) -> Vec<StoredItem> {
    let wobble = |period: u32, span: f64| {
        let phase = f64::from(u32::try_from(sequence % u64::from(period)).unwrap_or(0)) / f64::from(period);
        (phase * std::f64::consts::TAU).sin() * span
    };
    let observed_at_ms = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let item = |code: &str, value: f64, unit: &str| StoredItem {
        code: code.to_owned(),
        value: (value * 10.0).round() / 10.0,
        unit: unit.to_owned(),
        observed_at_ms,
    };
    vec![
        item("147842", 72.0 + wobble(30, 6.0), "/min"),
        item("150456", 97.0 + wobble(20, 1.5), "%"),
        item("150021", 120.0 + wobble(40, 8.0), "mm[Hg]"),
        item("150022", 80.0 + wobble(40, 5.0), "mm[Hg]"),
        item("150023", 93.0 + wobble(40, 6.0), "mm[Hg]"),
        item("150364", 36.9 + wobble(60, 0.3), "Cel"),
        item("151562", 16.0 + wobble(25, 2.0), "/min"),
    ]
}

/// Measures on `options.interval` and feeds new sequences to the sender.
pub(crate) async fn measure(
    buffer: Buffer,
    options: VitalsOptions,
    new: mpsc::UnboundedSender<u64>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(options.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut made = 0u64;
    while options.count.is_none_or(|count| made < count) {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let next = buffer.last_sequence()? + 1;
        let sequence = {
            let buffer = buffer.clone();
            tokio::task::spawn_blocking(move || buffer.append(vitals(next, SystemTime::now()))).await??
        };
        made += 1;
        let _ = new.send(sequence);
    }
    tracing::info!(batches = made, "measurements finished");
    Ok(())
}

/// Sends buffered batches until `stop`, reconnecting with backoff; every (re)connection resends what is unacked.
pub(crate) async fn publish(
    dir: &StateDir,
    server: &str,
    buffer: &Buffer,
    mut new: mpsc::UnboundedReceiver<u64>,
    quiet: bool,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_secs(1);
    loop {
        match publish_once(dir, server, buffer, &mut new, quiet, stop).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), retry_in = ?backoff, "reading stream failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn publish_once(
    dir: &StateDir,
    server: &str,
    buffer: &Buffer,
    new: &mut mpsc::UnboundedReceiver<u64>,
    quiet: bool,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let bundle = Bundle::load(&dir.identity())?;
    let channel = tokio::select! {
        channel = connect(server, &bundle) => channel?,
        () = stop.cancelled() => return Ok(()),
    };
    let (tx, rx) = mpsc::channel(64);
    let mut acks = DeviceServiceClient::new(channel)
        .publish_readings(ReceiverStream::new(rx))
        .await
        .context("opening the reading stream")?
        .into_inner();
    let mut sent_up_to = 0u64;
    let pending = buffer.pending()?;
    if !pending.is_empty() {
        tracing::info!(batches = pending.len(), "resending unacknowledged readings");
    }
    // The sender runs beside the ack reader: a full send window must never stop acks from being read.
    let sender = {
        let buffer = buffer.clone();
        async move {
            for sequence in pending {
                if let Some(batch) = buffer.load(sequence)? {
                    tx.send(batch).await.context("the reading stream closed")?;
                }
                sent_up_to = sequence;
            }
            while let Some(sequence) = new.recv().await {
                if sequence <= sent_up_to {
                    continue;
                }
                if let Some(batch) = buffer.load(sequence)? {
                    tx.send(batch).await.context("the reading stream closed")?;
                }
                sent_up_to = sequence;
            }
            // Measuring finished and everything is handed over: keep the stream open for the remaining acks.
            std::future::pending::<()>().await;
            Ok::<(), anyhow::Error>(())
        }
    };
    tokio::pin!(sender);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            result = &mut sender => return result,
            ack = acks.message() => match ack {
                Ok(Some(ack)) if ack.next_sequence > 0 => {
                    // Nothing of this batch was stored: keep it under a fresh sequence and resend everything.
                    let renumbered = buffer.renumber(ack.sequence, ack.next_sequence)?;
                    anyhow::bail!(
                        "the server had stored sequence {} with other readings (this device's buffer was reset); \
                         the batch is kept as sequence {} and sent again",
                        ack.sequence,
                        renumbered.map_or_else(|| "-".to_owned(), |s| s.to_string())
                    );
                }
                Ok(Some(ack)) if ack.batch_rejection.is_some() => {
                    let rejection = ack.batch_rejection.unwrap_or_default();
                    let aside = buffer.set_aside(ack.sequence)?;
                    tracing::error!(
                        sequence = ack.sequence,
                        code = %rejection.code,
                        reason = %rejection.reason,
                        kept = %aside.display(),
                        "the server refused a whole batch; it is kept aside and not sent again"
                    );
                }
                Ok(Some(ack)) => {
                    buffer.acknowledged(ack.sequence)?;
                    if !ack.rejected.is_empty() {
                        tracing::warn!(
                            sequence = ack.sequence,
                            rejected = ack.rejected.len(),
                            first = %ack.rejected[0].reason,
                            "the server refused some readings"
                        );
                    }
                    if quiet {
                        tracing::debug!(sequence = ack.sequence, accepted = ack.accepted, duplicate = ack.duplicate, "readings acknowledged");
                    } else {
                        tracing::info!(sequence = ack.sequence, accepted = ack.accepted, duplicate = ack.duplicate, "readings acknowledged");
                    }
                }
                Ok(None) => anyhow::bail!("the server closed the reading stream"),
                Err(status) => anyhow::bail!("the reading stream ended: {} ({:?})", status.message(), status.code()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_keeps_batches_until_acked_and_renumbers() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer::open(&StateDir::new(dir.path().to_owned())).unwrap();
        let at = SystemTime::UNIX_EPOCH + Duration::from_hours(500_000);
        let first = buffer.append(vitals(1, at)).unwrap();
        let second = buffer.append(vitals(2, at)).unwrap();
        assert_eq!((first, second), (1, 2));
        buffer.acknowledged(first).unwrap();
        assert_eq!(buffer.pending().unwrap(), vec![2]);
        // The server knew sequences up to 40: the batch moves to 41, contents unchanged.
        let before = buffer.load(2).unwrap().unwrap().items;
        assert_eq!(buffer.renumber(2, 41).unwrap(), Some(41));
        assert_eq!(buffer.pending().unwrap(), vec![41]);
        assert_eq!(buffer.load(41).unwrap().unwrap().items, before);
        // Sequences are never reused, even once everything is acked.
        buffer.acknowledged(41).unwrap();
        assert_eq!(buffer.append(vitals(3, at)).unwrap(), 42);
    }

    /// Measuring and renumbering at once never give two batches one sequence (which would overwrite one).
    #[test]
    fn concurrent_measure_and_renumber_never_share_a_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer::open(&StateDir::new(dir.path().to_owned())).unwrap();
        let at = SystemTime::UNIX_EPOCH + Duration::from_hours(500_000);
        let seeded: Vec<u64> = (0..100).map(|i| buffer.append(vitals(i, at)).unwrap()).collect();
        let measuring = {
            let buffer = buffer.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    buffer.append(vitals(i, at)).unwrap();
                }
                100
            })
        };
        let renumbering = {
            let buffer = buffer.clone();
            std::thread::spawn(move || {
                seeded
                    .iter()
                    .filter(|s| buffer.renumber(**s, 0).unwrap().is_some())
                    .count()
            })
        };
        let (measured, renumbered) = (measuring.join().unwrap(), renumbering.join().unwrap());
        assert_eq!((measured, renumbered), (100, 100));
        assert_eq!(
            buffer.pending().unwrap().len(),
            200,
            "every batch kept under its own sequence"
        );
    }

    #[test]
    fn a_refused_batch_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer::open(&StateDir::new(dir.path().to_owned())).unwrap();
        let at = SystemTime::UNIX_EPOCH + Duration::from_hours(500_000);
        let sequence = buffer.append(vitals(1, at)).unwrap();
        let aside = buffer.set_aside(sequence).unwrap();
        assert!(buffer.pending().unwrap().is_empty());
        assert!(aside.exists());
    }
}
