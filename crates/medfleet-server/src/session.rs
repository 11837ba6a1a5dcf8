//! `DeviceService.Session`: the device's long-lived stream. This release authenticates it (a device may open a
//! session only for itself), marks the device active and keeps the stream open until the device leaves or its
//! certificate is revoked; configuration and firmware commands will flow on it.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use medfleet_core::identity::Identity;
use medfleet_proto::convert;
use medfleet_proto::v1::{self, device_service_server::DeviceService, session_request, session_response};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::identity_api::caller;
use crate::store::Registry;

/// A device must say hello this soon after opening its session.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct DeviceApi {
    registry: Registry,
}

impl DeviceApi {
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<v1::SessionResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DeviceService for DeviceApi {
    type SessionStream = SessionStream;

    #[instrument(skip_all)]
    async fn session(
        &self,
        request: Request<Streaming<v1::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let caller = caller(&request)?;
        let audit = crate::rpc::audit_context(&request);
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
            tracing::warn!(device = %id, claimed = %medfleet_core::validation::printable(&hello.device_id), "session refused: claimed another device");
            return Err(Status::permission_denied(format!(
                "this certificate belongs to device {id}; it cannot open a session for another device"
            )));
        }
        self.registry.mark_active(id, &audit).await?;
        tracing::info!(device = %id, firmware = %hello.firmware_version, "session opened");

        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let welcome = v1::SessionResponse {
            message: Some(session_response::Message::Welcome(v1::Welcome {
                server_time: Some(convert::timestamp(crate::store::now())),
                certificate_not_after: caller
                    .certificate
                    .as_ref()
                    .map(|(_, not_after)| convert::timestamp((*not_after).into())),
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("the device left"))?;
        tokio::spawn(async move {
            // Heartbeats keep the stream (and, later, presence) alive; the sender lives as long as the device
            // keeps its side open.
            while let Ok(Some(_message)) = inbound.message().await {}
            tracing::info!(device = %id, "session closed");
            drop(tx);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
