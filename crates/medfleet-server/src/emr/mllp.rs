//! Delivery to an HL7 v2 receiver over MLLP: one ORU^R01 message at a time, each waiting for the receiver's
//! ACK (MSA-2 must name the message sent).

use medfleet_core::clinical::chart::ChartEntry;
use medfleet_core::clinical::hl7;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::emr::destinations::{Settings, split_host_port};
use crate::error::Result;
use crate::persistence::db::now;

use super::connection::{Failure, Io, connect};
use super::{IO_TIMEOUT, MAX_REPLY};

/// Sends one ORU^R01 and waits for its ACK, over a connection kept open across messages.
pub(crate) async fn send_mllp(
    connection: &mut Option<Box<dyn Io>>,
    settings: &Settings,
    entry: &ChartEntry,
    outbox_id: i64,
) -> Result<(), Failure> {
    let control_id = format!("MF{outbox_id}");
    let endpoints = hl7::Endpoints {
        sending_application: "MEDFLEET".into(),
        sending_facility: entry.point_of_care.as_ref().map(|p| p.site.clone()).unwrap_or_default(),
        receiving_application: settings.receiving_application.clone(),
        receiving_facility: settings.receiving_facility.clone(),
    };
    let message = hl7::oru_r01(entry, &endpoints, &control_id, now());
    if connection.is_none() {
        let (host, port) =
            split_host_port(&settings.endpoint).ok_or_else(|| Failure::retry("the MLLP endpoint is not HOST:PORT"))?;
        *connection = Some(connect(&host, port, settings, settings.ca_pem.is_some()).await?);
    }
    let Some(io) = connection.as_mut() else {
        return Err(Failure::retry("no MLLP connection"));
    };
    let exchange = async {
        io.write_all(&hl7::mllp_frame(&message)).await?;
        io.flush().await?;
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((reply, _)) = hl7::mllp_deframe(&buffer) {
                return Ok::<_, std::io::Error>(Some(reply));
            }
            let read = io.read(&mut chunk).await?;
            if read == 0 {
                return Ok(None);
            }
            if buffer.len() + read > MAX_REPLY {
                return Err(std::io::Error::other(format!(
                    "the receiver sent more than {MAX_REPLY} bytes without a complete ACK"
                )));
            }
            buffer.extend_from_slice(&chunk[..read]);
        }
    };
    let reply = tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .map_err(|_| Failure::retry("no ACK from the HL7 receiver in time; the message is sent again"))?
        .map_err(|e| Failure::retry(format!("MLLP connection failed: {e}")))?
        .ok_or_else(|| Failure::retry("the HL7 receiver closed the connection without an ACK"))?;
    let ack = hl7::parse_ack(&reply).map_err(|e| Failure::retry(format!("unreadable ACK: {e}")))?;
    if ack.control_id != control_id {
        return Err(Failure::retry(format!(
            "the ACK acknowledges {} instead of {control_id}",
            ack.control_id
        )));
    }
    // Only the ERR-3 error code goes into the reason; the ACK's text may echo patient data.
    let code = if ack.error_code.is_empty() {
        String::new()
    } else {
        format!(" (error code {})", ack.error_code)
    };
    match ack.code {
        hl7::AckCode::Accept => Ok(()),
        hl7::AckCode::Error => Err(Failure::retry(format!("the receiver answered AE{code}"))),
        hl7::AckCode::Reject => Err(Failure {
            reason: format!("the receiver answered AR{code}"),
            permanent: true,
        }),
    }
}
