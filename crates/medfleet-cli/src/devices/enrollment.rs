//! `medfleet devices enroll-token`, `revoke` and `decommission`: a device's way into the fleet (a one-time token for
//! its installer) and out of it (every certificate revoked at once).

use std::time::Duration;

use medfleet_core::identity::RevocationReason;
use medfleet_proto::convert::{duration_to_wire, revocation_reason_to_wire};
use medfleet_proto::v1;
use serde::Serialize;

use super::Registry;
use super::view::print_device;
use crate::output::{self, Format, time};

#[derive(Debug, Serialize)]
struct TokenView {
    device_id: String,
    token: String,
    expire_time: String,
}

pub(super) async fn token(
    api: &mut Registry,
    device: &str,
    ttl: Duration,
    replace: bool,
    out: Format,
) -> anyhow::Result<()> {
    let token = api
        .issue_enrollment_token(v1::IssueEnrollmentTokenRequest {
            device_id: device.to_owned(),
            ttl: Some(duration_to_wire(ttl)),
            replace,
        })
        .await?
        .into_inner();
    let view = TokenView {
        device_id: token.device_id,
        token: token.token,
        expire_time: time(token.expire_time.as_ref()),
    };
    if out == Format::Json {
        return output::json(&view);
    }
    println!("{}", view.token);
    eprintln!(
        "one-time enrollment token for device {}, valid until {}; give it only to the device's installer:\n  \
         medfleet-agent enroll --server URL --ca ca.crt --token TOKEN --state-dir DIR",
        view.device_id, view.expire_time
    );
    if replace {
        eprintln!(
            "when it is used, the device's current certificate is revoked and the device is cut off; to keep its \
             buffered readings, re-enroll its own agent keeping its state directory:\n  \
             medfleet-agent enroll --reenroll --server URL --ca ca.crt --token TOKEN --state-dir DIR"
        );
    }
    Ok(())
}

/// Revokes a device's certificates with `reason`, or without one decommissions it for good.
pub(super) async fn revoke(
    api: &mut Registry,
    device: &str,
    reason: Option<RevocationReason>,
    out: Format,
) -> anyhow::Result<()> {
    let device = match reason {
        Some(reason) => api
            .revoke_device(v1::RevokeDeviceRequest {
                id: device.to_owned(),
                reason: revocation_reason_to_wire(reason).into(),
            })
            .await?
            .into_inner(),
        None => api
            .decommission_device(v1::DecommissionDeviceRequest { id: device.to_owned() })
            .await?
            .into_inner(),
    };
    print_device(out, &device.into())
}
