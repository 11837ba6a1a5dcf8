//! `PublishReadings`: reading batches from devices, group-committed across devices and streams. Each batch is
//! acked only after the transaction that stores it has committed, so an ack always means durable; a batch that
//! was stored before is acked again from its stored result (the device's resend after a reconnect).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use medfleet_proto::{convert, v1};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use uuid::Uuid;

use crate::clinical::{Batch, Clinical, Outcome};
use crate::telemetry::Metrics;

/// Items per batch a device may send; larger batches are refused so one device cannot hold a group commit.
pub const MAX_ITEMS: usize = 1_000;
/// Batches one stream may have waiting for their commit; the stream stops reading beyond that (backpressure).
const IN_FLIGHT_PER_STREAM: usize = 64;
/// Batches one group commit takes at most.
const MAX_GROUP: usize = 512;

struct Job {
    batch: Batch,
    reply: oneshot::Sender<Result<Outcome, Status>>,
}

/// Hands batches to the group-commit writer.
#[derive(Debug, Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("device", &self.batch.device)
            .finish_non_exhaustive()
    }
}

impl Ingest {
    /// Starts the writer; it stops when `stop` is cancelled, after answering what it has taken.
    pub fn spawn(clinical: Clinical, metrics: Metrics, stop: CancellationToken) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_GROUP);
        tokio::spawn(writer(clinical, metrics, rx, stop));
        Self { tx }
    }

    async fn submit(&self, batch: Batch) -> Result<Outcome, Status> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job { batch, reply })
            .await
            .map_err(|_| Status::unavailable("the server is shutting down; resend the batch to another replica"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the server is shutting down; resend the batch"))?
    }
}

async fn writer(clinical: Clinical, metrics: Metrics, mut rx: mpsc::Receiver<Job>, stop: CancellationToken) {
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => None,
            job = rx.recv() => job,
        };
        let Some(first) = first else { break };
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        commit(&clinical, &metrics, jobs).await;
    }
}

async fn commit(clinical: &Clinical, metrics: &Metrics, jobs: Vec<Job>) {
    let (batches, replies): (Vec<Batch>, Vec<_>) = jobs.into_iter().map(|job| (job.batch, job.reply)).unzip();
    let started = Instant::now();
    match clinical.ingest(&batches).await {
        Ok(outcomes) => {
            metrics.record_ingest_commit(started.elapsed().as_secs_f64(), batches.len());
            for (outcome, reply) in outcomes.into_iter().zip(replies) {
                record(metrics, &outcome);
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(error) if batches.len() > 1 => {
            // One batch may be what failed the group (its device was just deleted, say): commit each on its own
            // so the others are not held hostage.
            tracing::warn!(%error, batches = batches.len(), "group commit failed; committing batches one by one");
            for (batch, reply) in batches.into_iter().zip(replies) {
                let result = clinical.ingest(std::slice::from_ref(&batch)).await;
                let answer = match result {
                    Ok(mut outcomes) => outcomes.pop().ok_or_else(|| Status::internal("no outcome for a batch")),
                    Err(error) => Err(Status::from(error)),
                };
                if let Ok(outcome) = &answer {
                    record(metrics, outcome);
                }
                let _ = reply.send(answer);
            }
        }
        Err(error) => {
            let status = Status::from(error);
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}

fn record(metrics: &Metrics, outcome: &Outcome) {
    if outcome.duplicate {
        metrics.record_readings("duplicate", u64::from(outcome.accepted));
        return;
    }
    metrics.record_readings("accepted", u64::from(outcome.accepted));
    for rejected in &outcome.rejected {
        metrics.record_readings(&rejected.code, 1);
    }
}

pub type AckStream = Pin<Box<dyn Stream<Item = Result<v1::ReadingAck, Status>> + Send>>;

/// Serves one device's `PublishReadings` stream.
pub fn serve(ingest: Ingest, device: Uuid, mut inbound: Streaming<v1::ReadingBatch>) -> AckStream {
    let (tx, rx) = mpsc::channel::<Result<v1::ReadingAck, Status>>(IN_FLIGHT_PER_STREAM);
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(IN_FLIGHT_PER_STREAM));
        let ended = loop {
            let message = match inbound.message().await {
                Ok(Some(message)) => message,
                Ok(None) => break None,
                Err(status) => break unreadable(device, &status),
            };
            let batch = match to_batch(device, &message) {
                Ok(batch) => batch,
                Err(rejection) => {
                    // The device learns what was wrong with this batch and may go on with the next.
                    let refused = v1::ReadingAck {
                        sequence: message.sequence,
                        batch_rejection: Some(rejection),
                        ..Default::default()
                    };
                    if tx.send(Ok(refused)).await.is_err() {
                        break None;
                    }
                    continue;
                }
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break None;
            };
            let (ingest, tx) = (ingest.clone(), tx.clone());
            tokio::spawn(async move {
                let sequence = batch.sequence;
                let answer = ingest.submit(batch).await.map(|outcome| ack(sequence, outcome));
                let _ = tx.send(answer).await;
                drop(permit);
            });
        };
        if let Some(status) = ended {
            // Acks of the batches still committing go out first, so the device drops what is durable and resends
            // only the rest; then the stream ends with the reason instead of a silent OK.
            let in_flight = u32::try_from(IN_FLIGHT_PER_STREAM).unwrap_or(u32::MAX);
            let _ = permits.acquire_many(in_flight).await;
            let _ = tx.send(Err(status)).await;
        }
        // The stream closes once every batch still in flight has been answered (each task holds a sender).
    });
    Box::pin(ReceiverStream::new(rx))
}

/// The status to end the stream with when a message could not be read: none when the device went away (nothing
/// to tell it), otherwise what was wrong and what to do.
fn unreadable(device: Uuid, status: &Status) -> Option<Status> {
    match status.code() {
        tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
            tracing::debug!(%device, %status, "reading stream ended by the device");
            None
        }
        // tonic's decoder reports a message over the limit as OUT_OF_RANGE.
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => {
            tracing::warn!(%device, "a reading batch over the message size limit ended its stream");
            Some(Status::resource_exhausted(format!(
                "a reading batch was larger than the server takes ({}); send at most {MAX_ITEMS} items per batch \
                 and resend the unacknowledged batches",
                status.message()
            )))
        }
        _ => {
            tracing::warn!(%device, code = ?status.code(), "an unreadable reading batch ended its stream");
            Some(Status::invalid_argument(format!(
                "a message on the reading stream could not be read as a ReadingBatch ({}); check the client's \
                 medfleet.v1 protocol version",
                status.message()
            )))
        }
    }
}

fn to_batch(device: Uuid, message: &v1::ReadingBatch) -> Result<Batch, v1::BatchRejection> {
    if message.sequence == 0 || i64::try_from(message.sequence).is_err() {
        return Err(v1::BatchRejection {
            code: "sequence_out_of_range".into(),
            reason: format!(
                "batch sequence {} is out of range: sequences start at 1 and stay below 2^63",
                message.sequence
            ),
        });
    }
    if message.items.len() > MAX_ITEMS {
        return Err(v1::BatchRejection {
            code: "too_many_items".into(),
            reason: format!(
                "batch {} has {} items; send at most {MAX_ITEMS} per batch",
                message.sequence,
                message.items.len()
            ),
        });
    }
    let items = message.items.iter().map(convert::reading_input).collect();
    Ok(Batch {
        device,
        sequence: message.sequence,
        items,
    })
}

fn ack(sequence: u64, outcome: Outcome) -> v1::ReadingAck {
    v1::ReadingAck {
        sequence,
        accepted: outcome.accepted,
        rejected: outcome
            .rejected
            .into_iter()
            .map(|r| v1::ItemRejection {
                index: r.index,
                code: r.code,
                reason: r.reason,
            })
            .collect(),
        duplicate: outcome.duplicate,
        next_sequence: outcome.next_sequence.unwrap_or(0),
        batch_rejection: None,
    }
}
