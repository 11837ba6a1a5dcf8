//! `medfleet feed`: a gRPC feed watched live, as an EMR interface would consume it, for integration teams to see
//! what their system receives.

use clap::Subcommand;
use medfleet_proto::v1::{self, feed_service_client::FeedServiceClient};
use tonic::transport::Channel;

use crate::clinical::observations::ObservationView;
use crate::output::Format;

#[derive(Debug, Subcommand)]
pub(crate) enum FeedCommand {
    /// Print a feed's chart events live, acknowledging each (the subscription resumes after the last one);
    /// with -o json, one JSON object per line.
    #[command(
        after_help = "Examples:\n  medfleet feed tail --subscription it-debug --destination epic-feed\n  \
                            medfleet feed tail --subscription it-debug --no-ack -o json"
    )]
    Tail {
        #[arg(long)]
        subscription: String,
        /// Required when the subscription does not exist yet.
        #[arg(long, default_value = "")]
        destination: String,
        /// Do not move the subscription's cursor (look without consuming).
        #[arg(long)]
        no_ack: bool,
        /// Stop after this many events.
        #[arg(long)]
        limit: Option<usize>,
    },
}

pub(crate) async fn run(channel: Channel, command: &FeedCommand, out: Format) -> anyhow::Result<()> {
    let mut api = FeedServiceClient::new(channel);
    let FeedCommand::Tail {
        subscription,
        destination,
        no_ack,
        limit,
    } = command;
    let mut stream = api
        .subscribe(v1::SubscribeRequest {
            subscription: subscription.clone(),
            destination: destination.clone(),
        })
        .await?
        .into_inner();
    let mut seen = 0usize;
    while limit.is_none_or(|limit| seen < limit) {
        let Some(event) = stream.message().await? else { break };
        seen += 1;
        let cursor = event.cursor;
        let observation = ObservationView::from(event.observation.unwrap_or_default());
        if out == Format::Json {
            // One compact object per line (JSON Lines): a stream stays parseable while it runs.
            let line = serde_json::json!({
                "cursor": cursor,
                "event_id": event.event_id,
                "observation": observation,
                "fhir": serde_json::from_str::<serde_json::Value>(&event.fhir_json).unwrap_or_default(),
            });
            println!("{line}");
        } else {
            println!(
                "{cursor:>8}  {}  {:<28} {:<40} {:<12} patient {}  {}",
                observation.observed_at,
                observation.kind,
                observation.values,
                observation.status,
                observation.patient,
                observation.place
            );
        }
        if !no_ack {
            api.acknowledge(v1::AcknowledgeRequest {
                subscription: subscription.clone(),
                cursor,
            })
            .await?;
        }
    }
    Ok(())
}
