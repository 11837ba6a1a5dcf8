//! `DeviceService`: a device's `Session` (hello, heartbeats, configuration pushes and reports, through the
//! replica's [`Hub`]) and `PublishReadings` (batches into [`crate::devices::ingest`]). Both are for device
//! certificates only, and a session speaks for the certificate's own device.

use std::sync::Arc;

use medfleet_core::identity::Identity;
use medfleet_core::validation::printable;
use medfleet_proto::v1::{self, device_service_server::DeviceService, session_request};
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::devices::session::{HELLO_TIMEOUT, Hub, SessionStream};
use crate::registry::store::Registry;
use crate::transport::rpc::caller;

#[derive(Debug, Clone)]
pub struct DeviceApi {
    registry: Registry,
    hub: Arc<Hub>,
    ingest: crate::devices::ingest::Ingest,
}

impl DeviceApi {
    pub fn new(registry: Registry, hub: Arc<Hub>, ingest: crate::devices::ingest::Ingest) -> Self {
        Self { registry, hub, ingest }
    }
}

#[tonic::async_trait]
impl DeviceService for DeviceApi {
    type SessionStream = SessionStream;
    type PublishReadingsStream = crate::devices::ingest::AckStream;

    #[instrument(skip_all)]
    async fn publish_readings(
        &self,
        request: Request<Streaming<v1::ReadingBatch>>,
    ) -> Result<Response<Self::PublishReadingsStream>, Status> {
        let caller = caller(&request)?;
        let Identity::Device(id) = caller.identity else {
            return Err(Status::permission_denied(
                "readings come from devices, each with its own certificate",
            ));
        };
        Ok(Response::new(crate::devices::ingest::serve(
            self.ingest.clone(),
            id,
            request.into_inner(),
        )))
    }

    #[instrument(skip_all)]
    async fn session(
        &self,
        request: Request<Streaming<v1::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let caller = caller(&request)?;
        let audit = crate::transport::rpc::audit_context(&request);
        let Identity::Device(id) = caller.identity else {
            return Err(Status::permission_denied("sessions are for devices"));
        };
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "send Hello first, within 30 s of opening the session",
                ));
            }
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(Status::cancelled("the session ended before Hello")),
            Ok(Ok(Some(message))) => message,
        };
        let Some(session_request::Message::Hello(hello)) = first.message else {
            return Err(Status::invalid_argument("the first message of a session must be Hello"));
        };
        if hello.device_id != id.to_string() {
            tracing::warn!(device = %id, claimed = %printable(&hello.device_id), "session refused: claimed another device");
            // The RPC layer writes this refusal to the audit trail; the words say what it was.
            return Err(Status::permission_denied(format!(
                "impersonation refused: this certificate belongs to device {id}; it cannot open a session for \
                 another device"
            )));
        }
        self.registry.mark_active(id, &audit).await?;
        let not_after = caller.certificate.as_ref().map(|(_, not_after)| *not_after);
        let outbound = self.hub.clone().open(id, &hello, not_after, inbound).await?;
        Ok(Response::new(outbound))
    }
}
