//! gRPC handlers of `AuditService`: reading and verifying the audit trail.

use medfleet_core::paging::{decode_token, encode_token, page_size};
use medfleet_core::validation::Violations;
use medfleet_proto::convert;
use medfleet_proto::v1::{self, audit_service_server::AuditService};
use sea_orm::DatabaseConnection;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::audit::{self, Filter};
use crate::error::Error;

#[derive(Debug, Clone)]
pub struct AuditApi {
    db: DatabaseConnection,
}

impl AuditApi {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    #[instrument(skip_all)]
    async fn list_audit_events(
        &self,
        request: Request<v1::ListAuditEventsRequest>,
    ) -> Result<Response<v1::ListAuditEventsResponse>, Status> {
        let r = request.get_ref();
        let filter = Filter {
            actor: non_empty(&r.actor),
            action_prefix: non_empty(&r.action),
            scope: non_empty(&r.scope),
            since: r.since.as_ref().and_then(convert::datetime),
        };
        let fingerprint = filter.fingerprint();
        let mut v = Violations::new();
        let size = v.check("page_size", page_size(r.page_size));
        let before = v.check("page_token", decode_token(&r.page_token, &fingerprint));
        let (size, before) = v.finish(|| size.zip(before)).map_err(Error::from)?;
        let before = before.map(|k| k.parse::<i64>()).transpose().map_err(|_| {
            Error::from(Violations::single(
                "page_token",
                "is not a page token from this listing",
            ))
        })?;
        let (rows, next) = audit::list(&self.db, &filter, size, before)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(v1::ListAuditEventsResponse {
            events: rows
                .into_iter()
                .map(|row| v1::AuditEvent {
                    seq: row.seq,
                    time: Some(convert::timestamp(row.at)),
                    actor: row.actor,
                    action: row.action,
                    target: row.target,
                    scope: row.scope,
                    outcome: row.outcome,
                    request_id: row.request_id,
                    detail: row.detail,
                    hash: row.hash,
                })
                .collect(),
            next_page_token: next
                .map(|seq| encode_token(&seq.to_string(), &fingerprint))
                .unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn verify_audit_trail(
        &self,
        _request: Request<v1::VerifyAuditTrailRequest>,
    ) -> Result<Response<v1::VerifyAuditTrailResponse>, Status> {
        let verification = audit::verify(&self.db).await.map_err(Error::from)?;
        if let Some((seq, reason)) = &verification.first_broken {
            tracing::error!(seq, reason = %reason, "the audit trail is broken");
        }
        let (head_seq, head_hash) = verification.head.unwrap_or_default();
        let (first_broken_seq, reason) = verification.first_broken.unwrap_or_default();
        Ok(Response::new(v1::VerifyAuditTrailResponse {
            entries: verification.entries,
            intact: reason.is_empty(),
            first_broken_seq,
            reason,
            head_seq,
            head_hash,
        }))
    }
}
