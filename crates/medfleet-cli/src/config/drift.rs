//! `medfleet config drift`: the devices whose reported configuration differs from the desired one, and why.

use medfleet_proto::v1;
use serde::Serialize;

use super::Configs;
use crate::error::UsageError;
use crate::output::{self, Format};

#[derive(Debug, Serialize)]
struct DriftView {
    device_id: String,
    model: String,
    location: String,
    online: bool,
    in_sync: bool,
    desired_version: u64,
    reported_version: u64,
    desired_digest: String,
    reported_digest: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    rejection: String,
}

pub(super) async fn run(
    api: &mut Configs,
    site: Option<&str>,
    ward: Option<&str>,
    all: bool,
    out: Format,
) -> anyhow::Result<()> {
    let (site, ward) = match (site, ward) {
        (_, Some(scope)) => {
            let (s, w) = scope
                .split_once('/')
                .ok_or_else(|| UsageError("--ward must be SITE/WARD".into()))?;
            (s.to_owned(), w.to_owned())
        }
        (Some(site), None) => (site.to_owned(), String::new()),
        (None, None) => (String::new(), String::new()),
    };
    let drift = api
        .list_config_drift(v1::ListConfigDriftRequest {
            site,
            ward,
            include_in_sync: all,
        })
        .await?
        .into_inner();
    let views: Vec<DriftView> = drift
        .devices
        .into_iter()
        .map(|d| DriftView {
            location: d
                .location
                .map_or_else(|| "storage".to_owned(), |l| format!("{}/{}", l.site, l.ward)),
            device_id: d.device_id,
            model: d.model,
            online: d.online,
            in_sync: d.in_sync,
            desired_version: d.desired_version,
            reported_version: d.reported_version,
            desired_digest: d.desired_digest,
            reported_digest: d.reported_digest,
            rejection: d.rejection_reason,
        })
        .collect();
    if out == Format::Json {
        return output::json(&views);
    }
    let mut t = output::table(&["DEVICE", "MODEL", "LOCATION", "ONLINE", "DESIRED", "REPORTED", "STATUS"]);
    for d in &views {
        let status = if d.in_sync {
            "in sync".to_owned()
        } else if !d.rejection.is_empty() {
            format!("rejected: {}", d.rejection)
        } else if d.online {
            "applying".to_owned()
        } else {
            "offline (gets it on reconnect)".to_owned()
        };
        t.add_row(vec![
            d.device_id.clone(),
            d.model.clone(),
            d.location.clone(),
            if d.online { "yes" } else { "no" }.to_owned(),
            d.desired_version.to_string(),
            if d.reported_digest.is_empty() {
                "-".to_owned()
            } else {
                d.reported_version.to_string()
            },
            status,
        ]);
    }
    println!("{t}");
    eprintln!("{} device(s) drifting", views.iter().filter(|d| !d.in_sync).count());
    Ok(())
}
