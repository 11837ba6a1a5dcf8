//! `medfleet emr deliveries` and `retry`: what was sent to each destination, what failed for good (dead-lettered)
//! and why, and sending the failed ones again once the cause is fixed.

use medfleet_proto::v1;
use serde::Serialize;

use super::Emr;
use crate::output::{self, Format};
use crate::pager::{self, Page};

#[derive(Debug, Serialize)]
struct DeliveryView {
    id: u64,
    destination: String,
    observation_id: String,
    status: String,
    state: String,
    attempts: u32,
    last_error: String,
    created_at: String,
    next_attempt_at: String,
}

pub(super) async fn list(
    api: &mut Emr,
    destination: Option<&str>,
    failed: bool,
    limit: usize,
    out: Format,
) -> anyhow::Result<()> {
    let rows = pager::collect(Some(limit), async |page_size, page_token| {
        let page = api
            .list_deliveries(v1::ListDeliveriesRequest {
                destination: destination.unwrap_or_default().to_owned(),
                failed_only: failed,
                page_size,
                page_token,
            })
            .await?
            .into_inner();
        Ok(Page::new(page.deliveries, page.next_page_token))
    })
    .await?;
    let rows: Vec<DeliveryView> = rows
        .into_iter()
        .map(|d| DeliveryView {
            id: d.id,
            destination: d.destination,
            observation_id: d.observation_id,
            status: d.status,
            state: d.state,
            attempts: d.attempts,
            last_error: d.last_error,
            created_at: output::time(d.created_at.as_ref()),
            next_attempt_at: output::time(d.next_attempt_at.as_ref()),
        })
        .collect();
    if out == Format::Json {
        return output::json(&rows);
    }
    let mut table = output::table(&[
        "ID",
        "DESTINATION",
        "OBSERVATION",
        "STATUS",
        "STATE",
        "ATTEMPTS",
        "ERROR",
    ]);
    for d in &rows {
        table.add_row(vec![
            d.id.to_string(),
            d.destination.clone(),
            d.observation_id.clone(),
            d.status.clone(),
            d.state.clone(),
            d.attempts.to_string(),
            d.last_error.clone(),
        ]);
    }
    println!("{table}");
    if failed && !rows.is_empty() {
        println!("fix the cause, then send them again: medfleet emr retry DESTINATION");
    }
    Ok(())
}

pub(super) async fn retry(api: &mut Emr, destination: &str, ids: &[u64], out: Format) -> anyhow::Result<()> {
    let retried = api
        .retry_deliveries(v1::RetryDeliveriesRequest {
            destination: destination.to_owned(),
            ids: ids.to_vec(),
        })
        .await?
        .into_inner()
        .retried;
    if out == Format::Json {
        return output::json(&serde_json::json!({ "retried": retried }));
    }
    println!("{retried} deliveries queued again for {destination}");
    Ok(())
}
