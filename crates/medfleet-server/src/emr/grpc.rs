//! `EmrService` (destinations, deliveries, retries) and `FeedService` (the resumable gRPC feed of chart events):
//! request conversion and the checks that depend on stored rows, then [`Emr`]. The RPC layer has already decided
//! the permission; a feed re-checks before every page that its caller still covers the destination it reads.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use medfleet_core::clinical::fhir;
use medfleet_core::paging::{decode_token, encode_token, page_size};
use medfleet_core::validation::{Violations, check_slug};
use medfleet_proto::convert::{self, entry_to_wire};
use medfleet_proto::v1::{self, emr_service_server::EmrService, feed_service_server::FeedService};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::audit::phi::read_events;
use crate::audit::{Coalescer, Event, Outcome};
use crate::authz::access::Access;
use crate::authz::policy::{access_withdrawn, visibility};
use crate::authz::visibility::Visibility;
use crate::clinical::DestinationKind;
use crate::emr::destinations::{NewDestination, Settings, secret_key_ids, stored_settings};
use crate::emr::{Emr, event_id};
use crate::error::{Error, Result};
use crate::persistence::entity::{emr_destination, emr_outbox};
use crate::transport::rpc::{audit_context, caller};

type Reply<T> = std::result::Result<Response<T>, Status>;

/// `EmrService`: destinations and their deliveries.
#[derive(Debug, Clone)]
pub struct EmrApi {
    emr: Arc<Emr>,
}

impl EmrApi {
    pub fn new(emr: Arc<Emr>) -> Self {
        Self { emr }
    }
}

/// `FeedService`: subscriptions of EMR systems to a feed destination, served as a resumable stream.
#[derive(Debug, Clone)]
pub struct FeedApi {
    emr: Arc<Emr>,
    access: Arc<Access>,
    reads: Coalescer,
}

impl FeedApi {
    pub fn new(emr: Arc<Emr>, access: Arc<Access>, reads: Coalescer) -> Self {
        Self { emr, access, reads }
    }
}

/// How often a feed stream looks for events when no notification woke it (the periodic reconcile).
const FEED_POLL: Duration = Duration::from_secs(1);

/// Events read per feed query.
const FEED_PAGE: u64 = 500;

/// Whether `visibility` covers every place a destination's filter lets through (no filter: the whole fleet).
fn covers_destination(visibility: &Visibility, destination: &emr_destination::Model) -> bool {
    let sites: BTreeSet<String> = serde_json::from_str(&destination.sites).unwrap_or_default();
    let wards: BTreeSet<String> = serde_json::from_str(&destination.wards).unwrap_or_default();
    if sites.is_empty() && wards.is_empty() {
        return visibility.covers(&Visibility::All);
    }
    let Some(wards) = wards
        .iter()
        .map(|w| w.split_once('/').map(|(s, w)| (s.to_owned(), w.to_owned())))
        .collect::<Option<BTreeSet<_>>>()
    else {
        return false;
    };
    visibility.covers(&Visibility::Scopes { sites, wards })
}

/// A destination as the API shows it: never a secret, only whether one is set and which keys seal them.
fn destination_to_wire(model: &emr_destination::Model) -> Result<v1::EmrDestination> {
    let settings = stored_settings(model)?;
    let secret_key_ids: BTreeSet<String> = secret_key_ids(&settings)
        .into_iter()
        .map(|kid| kid.unwrap_or_else(|| "plaintext".to_owned()))
        .collect();
    let list = |text: &str| -> Vec<String> { serde_json::from_str(text).unwrap_or_default() };
    let kind = match DestinationKind::parse(&model.kind) {
        Some(DestinationKind::Feed) => v1::EmrDestinationKind::Feed,
        Some(DestinationKind::Fhir) => v1::EmrDestinationKind::Fhir,
        Some(DestinationKind::Mllp) => v1::EmrDestinationKind::Mllp,
        None => v1::EmrDestinationKind::Unspecified,
    };
    Ok(v1::EmrDestination {
        name: model.name.clone(),
        kind: kind.into(),
        sites: list(&model.sites),
        wards: list(&model.wards),
        interval_seconds: u32::try_from(model.interval_secs).unwrap_or(0),
        endpoint: settings.endpoint,
        bearer_token: String::new(),
        ca_pem: settings.ca_pem.unwrap_or_default(),
        receiving_application: settings.receiving_application,
        receiving_facility: settings.receiving_facility,
        enabled: Some(model.enabled),
        created_at: Some(convert::timestamp(model.created_at)),
        created_by: model.created_by.clone(),
        client_certificate_pem: settings.client_certificate_pem.unwrap_or_default(),
        client_key_pem: String::new(),
        insecure_plaintext: settings.insecure_plaintext,
        bearer_token_set: settings.bearer_token.is_some(),
        client_key_set: settings.client_key_pem.is_some(),
        secret_key_ids: secret_key_ids.into_iter().collect(),
        relay_error: model.relay_error.clone().unwrap_or_default(),
    })
}

fn delivery_to_wire(row: &emr_outbox::Model) -> v1::Delivery {
    v1::Delivery {
        id: u64::try_from(row.id).unwrap_or(0),
        destination: row.destination.clone(),
        observation_id: row.observation_id.to_string(),
        status: row.status.clone(),
        state: row.state.clone(),
        attempts: u32::try_from(row.attempts).unwrap_or(0),
        last_error: row.last_error.clone().unwrap_or_default(),
        created_at: Some(convert::timestamp(row.created_at)),
        delivered_at: row.delivered_at.map(convert::timestamp),
        next_attempt_at: Some(convert::timestamp(row.next_attempt_at)),
    }
}

type FeedStream = Pin<Box<dyn Stream<Item = std::result::Result<v1::FeedEvent, Status>> + Send>>;

/// Sends feed events after `cursor` until the subscriber goes away: each page as soon as it is read, then waits
/// for a change notification or the poll interval.
async fn follow_feed(
    emr: Arc<Emr>,
    destination: String,
    mut cursor: i64,
    tx: &mpsc::Sender<std::result::Result<v1::FeedEvent, Status>>,
    reader: &Reader,
    still_covered: impl Fn(&emr_destination::Model) -> bool,
) -> std::result::Result<(), Status> {
    let mut events = emr.events().subscribe();
    loop {
        // Before every page: a deleted destination ends its feeds (rather than leaving them idle forever), and
        // one whose filter now reaches past the subscriber's grants stops disclosing.
        match emr.destination(&destination).await {
            Err(Error::NotFound(message)) => {
                return Err(Status::not_found(format!(
                    "{message}: it was deleted; this feed has ended"
                )));
            }
            Err(error) => return Err(error.into()),
            Ok(current) if !still_covered(&current) => {
                return Err(Status::permission_denied(format!(
                    "feed '{destination}' changed while this stream was open and now carries chart entries from \
                     places your grants do not cover (or it was recreated); subscribe again to have it checked"
                )));
            }
            Ok(_) => {}
        }
        let rows = emr.feed_page(&destination, cursor, FEED_PAGE).await?;
        if !rows.is_empty() {
            let entries = emr.entries(&rows).await?;
            // Audited before it is sent: a disclosure the trail does not know of must not happen.
            let disclosed = emr.observations_of(&rows).await?;
            let audited = reader
                .reads
                .record(read_events(
                    &reader.actor,
                    &reader.request_id,
                    "feed",
                    &disclosed.iter().collect::<Vec<_>>(),
                ))
                .await;
            if !audited {
                return Err(Status::unavailable(
                    "the audit trail cannot record this disclosure now; the feed resumes from your cursor when you \
                     reconnect",
                ));
            }
            for row in &rows {
                let Some(entry) = entries.get(&row.id) else { continue };
                let event = v1::FeedEvent {
                    cursor: u64::try_from(row.id).unwrap_or(0),
                    event_id: event_id(row),
                    observation: Some(entry_to_wire(entry)),
                    fhir_json: fhir::observation(entry).to_string(),
                };
                if tx.send(Ok(event)).await.is_err() {
                    return Ok(());
                }
                cursor = row.id;
            }
            continue;
        }
        tokio::select! {
            () = tx.closed() => return Ok(()),
            () = tokio::time::sleep(FEED_POLL) => {}
            event = events.recv() => {
                // Any event (or a lag) just means: look again; a closed channel means the server is stopping.
                if let Err(broadcast::error::RecvError::Closed) = event {
                    return Ok(());
                }
            }
        }
    }
}

/// Who reads a feed, for its audit rows.
struct Reader {
    reads: Coalescer,
    actor: String,
    request_id: String,
}

#[tonic::async_trait]
impl EmrService for EmrApi {
    #[instrument(skip_all)]
    async fn create_destination(&self, request: Request<v1::EmrDestination>) -> Reply<v1::EmrDestination> {
        let audit = audit_context(&request);
        let r = request.into_inner();
        let kind = match v1::EmrDestinationKind::try_from(r.kind) {
            Ok(v1::EmrDestinationKind::Feed) => DestinationKind::Feed,
            Ok(v1::EmrDestinationKind::Fhir) => DestinationKind::Fhir,
            Ok(v1::EmrDestinationKind::Mllp) => DestinationKind::Mllp,
            _ => return Err(Error::from(Violations::single("kind", "must be FEED, FHIR or MLLP")).into()),
        };
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        let new = NewDestination {
            name: r.name,
            kind,
            sites: r.sites.into_iter().collect(),
            wards: r.wards.into_iter().collect(),
            interval_secs: r.interval_seconds,
            settings: Settings {
                endpoint: r.endpoint,
                bearer_token: non_empty(r.bearer_token),
                ca_pem: non_empty(r.ca_pem),
                receiving_application: r.receiving_application,
                receiving_facility: r.receiving_facility,
                client_certificate_pem: non_empty(r.client_certificate_pem),
                client_key_pem: non_empty(r.client_key_pem),
                insecure_plaintext: r.insecure_plaintext,
            },
            enabled: r.enabled.unwrap_or(true),
        };
        let stored = self.emr.create_destination(new, &audit).await?;
        tracing::info!(destination = %stored.name, kind = %stored.kind, "EMR destination created");
        Ok(Response::new(destination_to_wire(&stored)?))
    }

    #[instrument(skip_all)]
    async fn list_destinations(
        &self,
        _request: Request<v1::ListDestinationsRequest>,
    ) -> Reply<v1::ListDestinationsResponse> {
        let destinations = self.emr.destinations().await?;
        Ok(Response::new(v1::ListDestinationsResponse {
            destinations: destinations
                .iter()
                .map(destination_to_wire)
                .collect::<Result<Vec<_>>>()?,
        }))
    }

    #[instrument(skip_all)]
    async fn update_destination(&self, request: Request<v1::UpdateDestinationRequest>) -> Reply<v1::EmrDestination> {
        let audit = audit_context(&request);
        let (name, update) = convert::destination_update(request.get_ref()).map_err(Error::from)?;
        let stored = self.emr.update_destination(&name, &update, &audit).await?;
        tracing::info!(destination = %stored.name, fields = ?update.fields(), "EMR destination updated");
        Ok(Response::new(destination_to_wire(&stored)?))
    }

    #[instrument(skip_all)]
    async fn delete_destination(
        &self,
        request: Request<v1::DeleteDestinationRequest>,
    ) -> Reply<v1::DeleteDestinationResponse> {
        let audit = audit_context(&request);
        let r = request.into_inner();
        let name = convert::slug("name", &r.name).map_err(Error::from)?;
        let deleted = self.emr.delete_destination(&name, r.force, &audit).await?;
        tracing::info!(destination = %name, discarded = deleted.discarded, subscriptions = deleted.subscriptions.len(), "EMR destination deleted");
        Ok(Response::new(v1::DeleteDestinationResponse {
            deleted_subscriptions: deleted.subscriptions,
            discarded_deliveries: deleted.discarded,
        }))
    }

    #[instrument(skip_all)]
    async fn list_deliveries(&self, request: Request<v1::ListDeliveriesRequest>) -> Reply<v1::ListDeliveriesResponse> {
        let r = request.into_inner();
        if !r.destination.is_empty() {
            self.emr.destination(&r.destination).await?;
        }
        let size = page_size(r.page_size).map_err(|e| Error::from(Violations::single("page_size", e)))?;
        let fingerprint = format!("deliveries:{}:{}", r.destination, r.failed_only);
        let before = decode_token(&r.page_token, &fingerprint)
            .map_err(|e| Error::from(Violations::single("page_token", e)))?
            .map(|key| key.parse::<i64>())
            .transpose()
            .map_err(|_| Error::from(Violations::single("page_token", "is not a token this listing issued")))?;
        let destination = (!r.destination.is_empty()).then_some(r.destination.as_str());
        let mut rows = self
            .emr
            .deliveries(destination, r.failed_only, before, size + 1)
            .await?;
        let next = if rows.len() as u64 > size {
            rows.truncate(usize::try_from(size).unwrap_or(usize::MAX));
            rows.last().map(|last| encode_token(&last.id.to_string(), &fingerprint))
        } else {
            None
        };
        Ok(Response::new(v1::ListDeliveriesResponse {
            deliveries: rows.iter().map(delivery_to_wire).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn retry_deliveries(
        &self,
        request: Request<v1::RetryDeliveriesRequest>,
    ) -> Reply<v1::RetryDeliveriesResponse> {
        let audit = audit_context(&request);
        let r = request.into_inner();
        if r.destination.is_empty() {
            return Err(Error::from(Violations::single("destination", "is required")).into());
        }
        let ids: Vec<i64> = r.ids.iter().filter_map(|id| i64::try_from(*id).ok()).collect();
        let retried = self.emr.retry(&r.destination, &ids, &audit).await?;
        tracing::info!(destination = %r.destination, retried, "dead-lettered deliveries queued again");
        Ok(Response::new(v1::RetryDeliveriesResponse { retried }))
    }
}

#[tonic::async_trait]
impl FeedService for FeedApi {
    type SubscribeStream = FeedStream;

    #[instrument(skip_all)]
    async fn subscribe(&self, request: Request<v1::SubscribeRequest>) -> Reply<Self::SubscribeStream> {
        let audit = audit_context(&request);
        let owner = caller(&request)?.identity.to_string();
        let visibility = visibility(&request);
        let r = request.into_inner();
        check_slug(&r.subscription).map_err(|e| Error::from(Violations::single("subscription", e)))?;
        // Access first, then any effect: a refused caller creates nothing and learns nothing of the cursors.
        let existing = self.emr.find_subscription(&r.subscription, &owner).await?;
        let destination = self
            .emr
            .subscription_target(existing.as_ref(), &r.subscription, &r.destination)
            .await?;
        // A subscriber sees chart entries only from places its grants cover: the destination's filter must lie
        // inside them (no filter means the whole fleet).
        let covered = covers_destination(&visibility, &destination);
        if !covered {
            return Err(Status::permission_denied(format!(
                "feed '{}' carries chart entries from places your grants do not cover; ask for feed:subscribe on \
                 them",
                destination.name
            )));
        }
        let subscription = if let Some(existing) = existing {
            existing
        } else {
            let created = self
                .emr
                .create_subscription(&r.subscription, &destination.name, &owner)
                .await?;
            self.reads
                .record(vec![Event {
                    actor: owner.clone(),
                    action: "feed_subscription.create".into(),
                    target: format!("feed_subscription/{}", created.name),
                    scope: "*".into(),
                    outcome: Outcome::Allowed,
                    request_id: audit.request_id.clone(),
                    detail: format!("follows {}", created.destination),
                }])
                .await;
            created
        };
        tracing::info!(subscription = %subscription.name, cursor = subscription.cursor, "feed subscription resumed");
        let (tx, rx) = mpsc::channel(usize::try_from(FEED_PAGE).unwrap_or(500));
        let (emr, access) = (self.emr.clone(), self.access.clone());
        let reader = Reader {
            reads: self.reads.clone(),
            actor: owner.clone(),
            request_id: audit.request_id.clone(),
        };
        tokio::spawn(async move {
            let outcome = tokio::select! {
                followed = follow_feed(emr, subscription.destination, subscription.cursor, &tx, &reader, |now| {
                    // The feed as it is now (an admin may have widened its filter or recreated it under the same
                    // name), against what the subscriber holds now.
                    now.created_at == destination.created_at
                        && covers_destination(&access.visibility(&owner, "feed", "subscribe"), now)
                }) => followed,
                withdrawn = access_withdrawn(&access, &owner, "feed", "subscribe", |now| {
                    covers_destination(now, &destination)
                }) => Err(withdrawn),
            };
            if let Err(status) = outcome {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[instrument(skip_all)]
    async fn acknowledge(&self, request: Request<v1::AcknowledgeRequest>) -> Reply<v1::AcknowledgeResponse> {
        let owner = caller(&request)?.identity.to_string();
        let request_id = audit_context(&request).request_id;
        let r = request.into_inner();
        let cursor = i64::try_from(r.cursor)
            .map_err(|_| Error::from(Violations::single("cursor", "is not a cursor this feed issued")))?;
        let stored = self.emr.acknowledge(&r.subscription, &owner, cursor).await?;
        self.reads
            .record(vec![Event {
                actor: owner.clone(),
                action: "feed.acknowledge".into(),
                target: format!("feed_subscription/{}", r.subscription),
                scope: "*".into(),
                outcome: Outcome::Allowed,
                request_id,
                detail: format!("cursor {stored}"),
            }])
            .await;
        Ok(Response::new(v1::AcknowledgeResponse {
            cursor: u64::try_from(stored).unwrap_or(0),
        }))
    }
}
