//! `medfleet audit`: read and verify the tamper-evident audit trail.

use clap::Subcommand;
use medfleet_proto::v1::{self, audit_service_client::AuditServiceClient};
use serde::Serialize;
use tonic::transport::Channel;

use crate::args::time_arg;
use crate::output::{self, Format, time};
use crate::pager::{self, Page};

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Entries, newest first.
    #[command(
        after_help = "Examples:\n  medfleet audit list --actor medfleet://user/alice --since 2026-11-01T00:00:00Z\n  \
                            medfleet audit list --action device. --scope stmarys -o json"
    )]
    List {
        /// Only this principal (a medfleet:// identity, or "anonymous").
        #[arg(long)]
        actor: Option<String>,
        /// Only actions starting with this (e.g. "device." or "access.grant").
        #[arg(long)]
        action: Option<String>,
        /// Only this scope and the scopes below it.
        #[arg(long)]
        scope: Option<String>,
        /// Only entries at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Walk the whole hash chain; exit 1 and name the first broken entry if it was tampered with.
    #[command(after_help = "Example:\n  medfleet audit verify")]
    Verify,
}

#[derive(Debug, Serialize)]
struct EventView {
    seq: i64,
    time: String,
    actor: String,
    action: String,
    target: String,
    scope: String,
    outcome: String,
    request_id: String,
    detail: String,
}

pub(crate) async fn run(channel: Channel, command: &AuditCommand, out: Format) -> anyhow::Result<()> {
    let mut api = AuditServiceClient::new(channel);
    match command {
        AuditCommand::List {
            actor,
            action,
            scope,
            since,
            limit,
        } => {
            let since = time_arg("since", since.as_deref())?;
            let events = pager::collect(Some(*limit), async |page_size, page_token| {
                let page = api
                    .list_audit_events(v1::ListAuditEventsRequest {
                        actor: actor.clone().unwrap_or_default(),
                        action: action.clone().unwrap_or_default(),
                        scope: scope.clone().unwrap_or_default(),
                        since,
                        page_size,
                        page_token,
                    })
                    .await?
                    .into_inner();
                Ok(Page::new(page.events, page.next_page_token))
            })
            .await?;
            let events: Vec<EventView> = events
                .into_iter()
                .map(|e| EventView {
                    seq: e.seq,
                    time: time(e.time.as_ref()),
                    actor: e.actor,
                    action: e.action,
                    target: e.target,
                    scope: e.scope,
                    outcome: e.outcome,
                    request_id: e.request_id,
                    detail: e.detail,
                })
                .collect();
            if out == Format::Json {
                return output::json(&events);
            }
            let mut table = output::table(&["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "SCOPE", "OUTCOME", "DETAIL"]);
            for e in &events {
                table.add_row(vec![
                    e.seq.to_string(),
                    e.time.clone(),
                    e.actor.clone(),
                    e.action.clone(),
                    e.target.clone(),
                    e.scope.clone(),
                    e.outcome.clone(),
                    e.detail.clone(),
                ]);
            }
            println!("{table}");
            Ok(())
        }
        AuditCommand::Verify => {
            let report = api
                .verify_audit_trail(v1::VerifyAuditTrailRequest {})
                .await?
                .into_inner();
            if out == Format::Json {
                output::json(&serde_json::json!({
                    "entries": report.entries,
                    "intact": report.intact,
                    "first_broken_seq": report.first_broken_seq,
                    "reason": report.reason,
                    "head_seq": report.head_seq,
                    "head_hash": report.head_hash,
                }))?;
            } else if report.intact {
                println!(
                    "the audit trail is intact: {} entries verified; head is entry {} with hash {}\n\
                     keep the head outside medfleet: a later verify that does not reach it shows truncation",
                    report.entries, report.head_seq, report.head_hash
                );
            }
            if report.intact {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "the audit trail is broken at entry {}: {}; treat every entry from there on as suspect",
                    report.first_broken_seq,
                    report.reason
                ))
            }
        }
    }
}
