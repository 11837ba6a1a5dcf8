//! Delivery to a FHIR R4 server: one transaction Bundle per round with conditional creates, so a resend never
//! charts twice, and the per-entry outcome read back from the transaction-response.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};

use crate::emr::destinations::Settings;
use crate::error::Result;

use super::connection::{Failure, connect};
use super::{ERROR_EXCERPT, IO_TIMEOUT, MAX_REPLY};

/// POSTs a transaction Bundle to the FHIR base URL.
pub(crate) async fn post_bundle(settings: &Settings, bundle: &serde_json::Value) -> Result<(), Failure> {
    let uri: http::Uri = settings
        .endpoint
        .parse()
        .map_err(|e| Failure::retry(format!("the FHIR endpoint is not a URL: {e}")))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let io = connect(&host, port, settings, https).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| Failure::retry(format!("HTTP handshake with the FHIR server failed: {e}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let body = serde_json::to_vec(bundle).unwrap_or_default();
    let mut request = http::Request::post(uri.path_and_query().map_or("/", http::uri::PathAndQuery::as_str))
        .header(
            http::header::HOST,
            uri.authority().map_or(host.clone(), ToString::to_string),
        )
        .header(http::header::CONTENT_TYPE, "application/fhir+json")
        .header(http::header::ACCEPT, "application/fhir+json");
    if let Some(token) = &settings.bearer_token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Failure::retry(format!("cannot build the FHIR request: {e}")))?;
    let response = tokio::time::timeout(IO_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| Failure::retry("the FHIR server did not answer in time"))?
        .map_err(|e| Failure::retry(format!("the FHIR request failed: {e}")))?;
    let status = response.status();
    // Only the status and an OperationOutcome's codes are used: a receiver cannot make medfleetd buffer more.
    let body = tokio::time::timeout(
        IO_TIMEOUT,
        http_body_util::Limited::new(response.into_body(), MAX_REPLY).collect(),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .map(http_body_util::Collected::to_bytes)
    .unwrap_or_default();
    if status.is_success() {
        return Ok(());
    }
    let excerpt = operation_outcome_codes(&body);
    // 4xx other than timeouts, conflicts under load and rate limits will fail the same way again.
    let permanent = status.is_client_error()
        && !matches!(status.as_u16(), 408 | 409 | 425 | 429)
        && status != http::StatusCode::UNAUTHORIZED;
    Err(Failure {
        reason: format!("FHIR server answered HTTP {}{excerpt}", status.as_u16()),
        permanent,
    })
}

/// The structured part of a FHIR OperationOutcome: each issue's severity, code and expression (element paths).
/// Its free text (`diagnostics`, `details.text`) is left out: servers echo patient identifiers in it.
fn operation_outcome_codes(body: &[u8]) -> String {
    let Ok(outcome) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    let issues: Vec<String> = outcome["issue"]
        .as_array()
        .map(|issues| {
            issues
                .iter()
                .take(5)
                .map(|issue| {
                    let expression = issue["expression"]
                        .as_array()
                        .map(|e| e.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
                        .unwrap_or_default();
                    format!(
                        "{} {} {}",
                        issue["severity"].as_str().unwrap_or_default(),
                        issue["code"].as_str().unwrap_or_default(),
                        expression
                    )
                    .trim()
                    .chars()
                    .take(ERROR_EXCERPT)
                    .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    if issues.is_empty() {
        String::new()
    } else {
        format!(": {}", issues.join("; "))
    }
}
