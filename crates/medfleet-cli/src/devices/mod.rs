//! `medfleet devices`: the device registry — register, list, watch, show, move or retag a device — and, in its
//! submodules, what a device is shown as (`view`), its enrollment tokens and revocation (`enrollment`) and bulk
//! registration from CSV (`import`).

mod enrollment;
mod import;
mod view;

use std::collections::HashMap;

use clap::{Args, Subcommand};
use medfleet_core::registry::{DeviceClass, DeviceState};
use medfleet_proto::convert::{device_class_to_wire, device_state_to_wire};
use medfleet_proto::v1::{self, registry_service_client::RegistryServiceClient};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

use crate::args::{self, location, mask};
use crate::error::UsageError;
use crate::output::Format;
use crate::pager::{self, Page};
use view::DeviceView;

type Registry = RegistryServiceClient<Channel>;

#[derive(Debug, Subcommand)]
pub(crate) enum DeviceCommand {
    /// Register a device; prints its server-assigned id.
    #[command(
        after_help = "Example:\n  medfleet devices register --manufacturer Philips --model \"IntelliVue MX450\" \\\n    \
                            --serial SN-0001 --class patient-monitor --location stmarys/icu/3 --tag asset=A-17"
    )]
    Register(RegisterArgs),
    /// List devices, with filters.
    #[command(after_help = "Examples:\n  medfleet devices list --site stmarys --ward icu\n  \
                            medfleet devices list --online\n  \
                            medfleet devices list --state registered --tag asset=A-17 -o json")]
    List(ListArgs),
    /// Stream presence changes live (online, offline, operational state, configuration reports) until Ctrl-C.
    #[command(after_help = "Examples:\n  medfleet devices watch --site stmarys --ward icu\n  \
                            medfleet devices watch --initial -o json")]
    Watch {
        #[arg(long)]
        site: Option<String>,
        #[arg(long, requires = "site")]
        ward: Option<String>,
        /// Start with the current state of every matching device.
        #[arg(long)]
        initial: bool,
    },
    /// Show one device.
    #[command(after_help = "Example:\n  medfleet devices show 6f1c2d3e-0b1a-4c5d-8e9f-0a1b2c3d4e5f")]
    Show { id: String },
    /// Issue a one-time enrollment token for a device (replaces any unused one).
    #[command(
        after_help = "Examples:\n  medfleet devices enroll-token 6f1c2d3e-0b1a-4c5d-8e9f-0a1b2c3d4e5f --ttl 24h\n  \
        medfleet devices enroll-token 6f1c2d3e-0b1a-4c5d-8e9f-0a1b2c3d4e5f --replace   # a replaced unit or a reset\n\n\
        A device that is already enrolled gets a token only with --replace: enrolling with it revokes the \
        certificate the device runs on at once and cuts it off. Its buffered readings are delivered only if its own \
        agent re-enrolls keeping its state directory (medfleet-agent enroll --reenroll)."
    )]
    EnrollToken {
        id: String,
        /// How long the token stays valid (5m to 30days).
        #[arg(long, value_parser = args::parse_duration, default_value = "24h")]
        ttl: std::time::Duration,
        /// The device is enrolled and is to be enrolled again: its current certificate is revoked when the token
        /// is used.
        #[arg(long)]
        replace: bool,
    },
    /// Register many devices from a CSV file, optionally issuing their enrollment tokens.
    #[command(
        after_help = "Example:\n  medfleet devices import devices.csv --tokens-out tokens.csv\n\n\
                            devices.csv:\n  manufacturer,model,serial_number,device_class,eui64,location,tags\n  \
                            Philips,MX450,SN-0001,patient-monitor,,stmarys/icu/1,asset=A-17;owner=biomed"
    )]
    Import(import::ImportArgs),
    /// Revoke every certificate of a device at once; it stays registered and can be re-enrolled with a new token.
    #[command(
        after_help = "Example:\n  medfleet devices revoke 6f1c2d3e-0b1a-4c5d-8e9f-0a1b2c3d4e5f --reason compromised"
    )]
    Revoke {
        id: String,
        /// compromised, superseded, retired, affiliation-changed or unspecified.
        #[arg(long, value_parser = args::parse_reason)]
        reason: medfleet_core::identity::RevocationReason,
    },
    /// Retire a device for good: revokes its certificates; it can never enroll again.
    #[command(after_help = "Example:\n  medfleet devices decommission 6f1c2d3e-0b1a-4c5d-8e9f-0a1b2c3d4e5f")]
    Decommission { id: String },
    /// Move a device or replace its tags.
    #[command(after_help = "Examples:\n  medfleet devices update ID --location stmarys/icu/4\n  \
                            medfleet devices update ID --storage\n  medfleet devices update ID --tag asset=A-17 --tag owner=biomed")]
    Update(UpdateArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RegisterArgs {
    #[arg(long)]
    manufacturer: String,
    #[arg(long)]
    model: String,
    #[arg(long = "serial")]
    serial_number: String,
    /// patient-monitor, infusion-pump, ventilator, pulse-oximeter, anesthesia-workstation or other.
    #[arg(long, value_parser = parse_class)]
    class: DeviceClass,
    /// IEEE EUI-64, e.g. 00-12-A3-FF-FE-4B-5C-6D.
    #[arg(long)]
    eui64: Option<String>,
    /// SITE/WARD or SITE/WARD/BED.
    #[arg(long)]
    location: Option<String>,
    /// key=value (repeatable).
    #[arg(long = "tag", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[arg(long)]
    site: Option<String>,
    #[arg(long, requires = "site")]
    ward: Option<String>,
    #[arg(long)]
    model: Option<String>,
    /// registered, enrolled, active or decommissioned.
    #[arg(long, value_parser = parse_state)]
    state: Option<DeviceState>,
    /// key=value; all given tags must match (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Only devices with an open session.
    #[arg(long, conflicts_with = "offline")]
    online: bool,
    /// Only devices without an open session.
    #[arg(long)]
    offline: bool,
    /// Stop after this many devices (default: all).
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Debug, Args)]
pub(crate) struct UpdateArgs {
    id: String,
    /// New location: SITE/WARD or SITE/WARD/BED.
    #[arg(long, conflicts_with = "storage")]
    location: Option<String>,
    /// Take the device out of any ward (into storage).
    #[arg(long)]
    storage: bool,
    /// Replace all tags with these key=value pairs (repeatable).
    #[arg(long = "tag", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Remove all tags.
    #[arg(long, conflicts_with = "tags")]
    clear_tags: bool,
}

fn parse_class(s: &str) -> Result<DeviceClass, String> {
    s.parse()
}

fn parse_state(s: &str) -> Result<DeviceState, String> {
    s.parse()
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    medfleet_core::registry::parse_tag_term(s)
}

pub(crate) async fn run(channel: Channel, command: &DeviceCommand, out: Format) -> anyhow::Result<()> {
    let mut api = RegistryServiceClient::new(channel);
    match command {
        DeviceCommand::EnrollToken { id, ttl, replace } => enrollment::token(&mut api, id, *ttl, *replace, out).await,
        DeviceCommand::Import(args) => import::run(&mut api, args, out).await,
        DeviceCommand::Revoke { id, reason } => enrollment::revoke(&mut api, id, Some(*reason), out).await,
        DeviceCommand::Decommission { id } => enrollment::revoke(&mut api, id, None, out).await,
        DeviceCommand::Register(args) => register(&mut api, args, out).await,
        DeviceCommand::List(args) => list(&mut api, args, out).await,
        DeviceCommand::Watch { site, ward, initial } => {
            watch(&mut api, site.as_deref(), ward.as_deref(), *initial, out).await
        }
        DeviceCommand::Show { id } => {
            let device = api
                .get_device(v1::GetDeviceRequest { id: id.clone() })
                .await?
                .into_inner();
            view::print_device(out, &device.into())
        }
        DeviceCommand::Update(args) => update(&mut api, args, out).await,
    }
}

async fn register(api: &mut Registry, args: &RegisterArgs, out: Format) -> anyhow::Result<()> {
    let place = args.location.as_deref().map(location).transpose()?;
    let device = match api
        .register_device(v1::RegisterDeviceRequest {
            serial_number: args.serial_number.clone(),
            manufacturer: args.manufacturer.clone(),
            model: args.model.clone(),
            device_class: device_class_to_wire(args.class).into(),
            eui64: args.eui64.clone().unwrap_or_default(),
            location: place,
            tags: args.tags.iter().cloned().collect::<HashMap<_, _>>(),
        })
        .await
    {
        Ok(device) => device.into_inner(),
        Err(status) => return Err(missing_place(status).into()),
    };
    view::print_device(out, &device.into())
}

async fn list(api: &mut Registry, args: &ListArgs, out: Format) -> anyhow::Result<()> {
    let all = pager::collect(args.limit, async |page_size, page_token| {
        let page = api
            .list_devices(v1::ListDevicesRequest {
                page_size,
                page_token,
                site: args.site.clone().unwrap_or_default(),
                ward: args.ward.clone().unwrap_or_default(),
                model: args.model.clone().unwrap_or_default(),
                state: args.state.map(|s| device_state_to_wire(s).into()).unwrap_or_default(),
                tags: args.tags.clone(),
                online: (args.online || args.offline).then_some(args.online),
            })
            .await?
            .into_inner();
        Ok(Page::new(page.devices, page.next_page_token))
    })
    .await?;
    view::print_devices(out, &all.into_iter().map(DeviceView::from).collect::<Vec<_>>())
}

async fn watch(
    api: &mut Registry,
    site: Option<&str>,
    ward: Option<&str>,
    initial: bool,
    out: Format,
) -> anyhow::Result<()> {
    let mut stream = api
        .watch_devices(v1::WatchDevicesRequest {
            site: site.unwrap_or_default().to_owned(),
            ward: ward.unwrap_or_default().to_owned(),
            initial,
        })
        .await?
        .into_inner();
    while let Some(event) = stream.message().await? {
        if let Some(device) = event.device {
            view::print_event(out, &device.into())?;
        }
    }
    Err(anyhow::anyhow!(
        "the server ended the watch; run the command again to resume"
    ))
}

async fn update(api: &mut Registry, args: &UpdateArgs, out: Format) -> anyhow::Result<()> {
    let mut paths = Vec::new();
    let mut device = v1::Device {
        id: args.id.clone(),
        ..Default::default()
    };
    if let Some(text) = &args.location {
        device.location = Some(location(text)?);
        paths.push("location");
    } else if args.storage {
        paths.push("location");
    }
    if !args.tags.is_empty() || args.clear_tags {
        device.tags = args.tags.iter().cloned().collect();
        paths.push("tags");
    }
    if paths.is_empty() {
        return Err(UsageError("nothing to change: give --location, --storage, --tag or --clear-tags".into()).into());
    }
    let device = match api
        .update_device(v1::UpdateDeviceRequest {
            device: Some(device),
            update_mask: Some(mask(&paths)),
        })
        .await
    {
        Ok(device) => device.into_inner(),
        Err(status) => return Err(missing_place(status).into()),
    };
    view::print_device(out, &device.into())
}

/// medfleetd refuses a device placed in a ward or bed that does not exist with FAILED_PRECONDITION (create it,
/// then repeat the call) and the reason PLACE_NOT_FOUND; to the operator the place they named is simply not found:
/// exit 4, not the conflict (5) the code stands for otherwise. Every other refusal comes back unchanged.
pub(crate) fn missing_place(status: tonic::Status) -> tonic::Status {
    let place = status.code() == Code::FailedPrecondition
        && status
            .get_details_error_info()
            .is_some_and(|info| info.reason == medfleet_proto::reasons::PLACE_NOT_FOUND);
    if place {
        tonic::Status::not_found(status.message())
    } else {
        status
    }
}
