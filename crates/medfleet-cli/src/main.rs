//! `medfleet`: the operator CLI for hospital IT, biomedical engineers and integration teams.
//!
//! Exit codes (stable, for scripts): 0 success, 1 other error, 2 usage error, 3 invalid input, 4 not found,
//! 5 conflict (already exists or not allowed in the current state), 6 not authorised, 7 server unavailable.

mod access;
mod audit;
mod client;
mod clinical;
mod config;
mod identity;
mod output;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use medfleet_core::registry::{DeviceClass, DeviceState};
use medfleet_proto::convert::{device_class_to_wire, device_state_to_wire};
use medfleet_proto::v1::{self, registry_service_client::RegistryServiceClient};
use output::{DeviceView, Format, SiteView, WardView};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

/// Operate a medfleet device fleet.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Example:\n  medfleet --server https://medfleet.hospital.example:7443 --credentials ~/alice.pem devices list\n\n\
                  Exit codes: 0 ok, 1 error, 2 usage, 3 invalid input, 4 not found, 5 conflict, 6 not authorised, \
                  7 server unavailable."
)]
struct Cli {
    /// medfleetd gRPC address.
    #[arg(
        long,
        global = true,
        env = "MEDFLEET_SERVER",
        default_value = "https://localhost:7443"
    )]
    server: String,
    /// Credentials bundle (private key, certificate, CA). Default: medfleet-data/admin.pem.
    #[arg(long, global = true, env = "MEDFLEET_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sites: the hospital campuses at the top of the location tree.
    #[command(subcommand)]
    Sites(SiteCommand),
    /// Wards inside a site, and their beds.
    #[command(subcommand)]
    Wards(WardCommand),
    /// The device registry, enrollment and revocation.
    #[command(subcommand)]
    Devices(DeviceCommand),
    /// Operator credentials (medfleet://user/NAME).
    #[command(subcommand)]
    Users(identity::PrincipalCommand),
    /// Integration credentials (medfleet://service/NAME), e.g. for EMR interfaces.
    #[command(subcommand)]
    Services(identity::PrincipalCommand),
    /// Your own credentials.
    #[command(subcommand)]
    Credentials(CredentialCommand),
    /// Role-based access: who may do what, where.
    #[command(subcommand)]
    Access(access::AccessCommand),
    /// The tamper-evident audit trail.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Desired device configuration: layers, versions, schemas, drift.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Device–patient associations (which patient a device's readings chart to).
    #[command(subcommand)]
    Patients(clinical::PatientCommand),
    /// The chart: observations from devices, and their validation.
    #[command(subcommand)]
    Observations(clinical::ObservationCommand),
    /// EMR destinations (gRPC feed, FHIR R4, HL7 v2 over MLLP) and their deliveries.
    #[command(subcommand)]
    Emr(clinical::EmrCommand),
    /// Watch an EMR feed live.
    #[command(subcommand)]
    Feed(clinical::FeedCommand),
}

#[derive(Debug, Subcommand)]
enum CredentialCommand {
    /// Renew your certificate with a fresh key; replaces the credentials file (or writes --out).
    #[command(after_help = "Example:\n  medfleet --credentials ~/alice.pem credentials renew")]
    Renew {
        /// Write the renewed bundle here instead of replacing the current one.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum SiteCommand {
    /// Create a site.
    #[command(after_help = "Example:\n  medfleet sites create stmarys --display-name \"St Mary's Hospital\"")]
    Create {
        /// Short name: lowercase letters, digits and '-'.
        name: String,
        #[arg(long)]
        display_name: String,
    },
    /// List all sites.
    #[command(after_help = "Example:\n  medfleet sites list -o json")]
    List,
    /// Show one site.
    #[command(after_help = "Example:\n  medfleet sites show stmarys")]
    Show { name: String },
    /// Change a site's display name.
    #[command(after_help = "Example:\n  medfleet sites update stmarys --display-name \"St Mary's\"")]
    Update {
        name: String,
        #[arg(long)]
        display_name: String,
    },
}

#[derive(Debug, Subcommand)]
enum WardCommand {
    /// Create a ward in a site.
    #[command(
        after_help = "Example:\n  medfleet wards create stmarys/icu --display-name \"Intensive Care\" --beds 1,2,3,4"
    )]
    Create {
        /// SITE/WARD
        scope: String,
        #[arg(long)]
        display_name: String,
        /// Bed labels, comma-separated.
        #[arg(long, value_delimiter = ',')]
        beds: Vec<String>,
    },
    /// List the wards of a site.
    #[command(after_help = "Example:\n  medfleet wards list stmarys")]
    List { site: String },
    /// Show one ward with its beds.
    #[command(after_help = "Example:\n  medfleet wards show stmarys/icu")]
    Show { scope: String },
    /// Change a ward's display name and/or its beds (the bed list is replaced).
    #[command(after_help = "Example:\n  medfleet wards update stmarys/icu --beds 1,2,3,4,5")]
    Update {
        scope: String,
        #[arg(long)]
        display_name: Option<String>,
        #[arg(long, value_delimiter = ',')]
        beds: Option<Vec<String>>,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
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
        #[arg(long, value_parser = identity::parse_duration, default_value = "24h")]
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
    Import(identity::ImportArgs),
    /// Revoke every certificate of a device at once; it stays registered and can be re-enrolled with a new token.
    #[command(
        after_help = "Example:\n  medfleet devices revoke 6f1c2d3e-0b1a-4c5d-8e9f-0a1b2c3d4e5f --reason compromised"
    )]
    Revoke {
        id: String,
        /// compromised, superseded, retired, affiliation-changed or unspecified.
        #[arg(long, value_parser = parse_reason)]
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
struct RegisterArgs {
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
struct ListArgs {
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
struct UpdateArgs {
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

fn parse_reason(s: &str) -> Result<medfleet_core::identity::RevocationReason, String> {
    s.parse()
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    medfleet_core::registry::parse_tag_term(s)
}

fn split_scope(scope: &str) -> anyhow::Result<(String, String)> {
    match scope.split_once('/') {
        Some((site, ward)) if !site.is_empty() && !ward.is_empty() && !ward.contains('/') => {
            Ok((site.to_owned(), ward.to_owned()))
        }
        _ => Err(UsageError(format!("'{scope}' is not SITE/WARD (e.g. stmarys/icu)")).into()),
    }
}

pub(crate) fn location(text: &str) -> anyhow::Result<v1::Location> {
    let parts: Vec<&str> = text.split('/').collect();
    match parts.as_slice() {
        [site, ward] => Ok(v1::Location {
            site: (*site).to_owned(),
            ward: (*ward).to_owned(),
            bed: String::new(),
        }),
        [site, ward, bed] => Ok(v1::Location {
            site: (*site).to_owned(),
            ward: (*ward).to_owned(),
            bed: (*bed).to_owned(),
        }),
        _ => Err(UsageError(format!("--location '{text}' is not SITE/WARD or SITE/WARD/BED")).into()),
    }
}

/// A mistake in how the command was called, found after clap parsed it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);

fn mask(paths: &[&str]) -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    }
}

async fn channel(cli: &Cli) -> anyhow::Result<Channel> {
    let bundle = client::load(&client::credentials_path(cli.credentials.clone()))?;
    client::connect(&cli.server, &bundle).await
}

async fn registry(cli: &Cli) -> anyhow::Result<RegistryServiceClient<Channel>> {
    Ok(RegistryServiceClient::new(channel(cli).await?))
}

async fn execute(cli: &Cli) -> anyhow::Result<()> {
    let out = cli.output;
    match &cli.command {
        Command::Sites(command) => {
            let mut api = registry(cli).await?;
            match command {
                SiteCommand::Create { name, display_name } => {
                    let site = api
                        .create_site(v1::CreateSiteRequest {
                            site: Some(v1::Site {
                                name: name.clone(),
                                display_name: display_name.clone(),
                                ..Default::default()
                            }),
                        })
                        .await?
                        .into_inner();
                    output::site(out, &site.into())
                }
                SiteCommand::List => {
                    let mut all = Vec::new();
                    let mut token = String::new();
                    loop {
                        let page = api
                            .list_sites(v1::ListSitesRequest {
                                page_size: 500,
                                page_token: token,
                            })
                            .await?
                            .into_inner();
                        all.extend(page.sites.into_iter().map(SiteView::from));
                        token = page.next_page_token;
                        if token.is_empty() {
                            break;
                        }
                    }
                    output::sites(out, &all)
                }
                SiteCommand::Show { name } => {
                    let site = api
                        .get_site(v1::GetSiteRequest { name: name.clone() })
                        .await?
                        .into_inner();
                    output::site(out, &site.into())
                }
                SiteCommand::Update { name, display_name } => {
                    let site = api
                        .update_site(v1::UpdateSiteRequest {
                            site: Some(v1::Site {
                                name: name.clone(),
                                display_name: display_name.clone(),
                                ..Default::default()
                            }),
                            update_mask: Some(mask(&["display_name"])),
                        })
                        .await?
                        .into_inner();
                    output::site(out, &site.into())
                }
            }
        }
        Command::Wards(command) => {
            let mut api = registry(cli).await?;
            match command {
                WardCommand::Create {
                    scope,
                    display_name,
                    beds,
                } => {
                    let (site, name) = split_scope(scope)?;
                    let ward = api
                        .create_ward(v1::CreateWardRequest {
                            ward: Some(v1::Ward {
                                site,
                                name,
                                display_name: display_name.clone(),
                                beds: beds.clone(),
                                ..Default::default()
                            }),
                        })
                        .await?
                        .into_inner();
                    output::ward(out, &ward.into())
                }
                WardCommand::List { site } => {
                    let mut all = Vec::new();
                    let mut token = String::new();
                    loop {
                        let page = api
                            .list_wards(v1::ListWardsRequest {
                                site: site.clone(),
                                page_size: 500,
                                page_token: token,
                            })
                            .await?
                            .into_inner();
                        all.extend(page.wards.into_iter().map(WardView::from));
                        token = page.next_page_token;
                        if token.is_empty() {
                            break;
                        }
                    }
                    output::wards(out, &all)
                }
                WardCommand::Show { scope } => {
                    let (site, name) = split_scope(scope)?;
                    let ward = api.get_ward(v1::GetWardRequest { site, name }).await?.into_inner();
                    output::ward(out, &ward.into())
                }
                WardCommand::Update {
                    scope,
                    display_name,
                    beds,
                } => {
                    let (site, name) = split_scope(scope)?;
                    let mut paths = Vec::new();
                    if display_name.is_some() {
                        paths.push("display_name");
                    }
                    if beds.is_some() {
                        paths.push("beds");
                    }
                    if paths.is_empty() {
                        return Err(UsageError("nothing to change: give --display-name and/or --beds".into()).into());
                    }
                    let ward = api
                        .update_ward(v1::UpdateWardRequest {
                            ward: Some(v1::Ward {
                                site,
                                name,
                                display_name: display_name.clone().unwrap_or_default(),
                                beds: beds.clone().unwrap_or_default(),
                                ..Default::default()
                            }),
                            update_mask: Some(mask(&paths)),
                        })
                        .await?
                        .into_inner();
                    output::ward(out, &ward.into())
                }
            }
        }
        Command::Access(command) => access::run(channel(cli).await?, command, out).await,
        Command::Audit(command) => audit::run(channel(cli).await?, command, out).await,
        Command::Config(command) => config::run(channel(cli).await?, command, out).await,
        Command::Patients(command) => clinical::patients(channel(cli).await?, command, out).await,
        Command::Observations(command) => clinical::observations(channel(cli).await?, command, out).await,
        Command::Emr(command) => clinical::emr(channel(cli).await?, command, out).await,
        Command::Feed(command) => clinical::feed(channel(cli).await?, command, out).await,
        Command::Users(command) => {
            identity::principal(channel(cli).await?, v1::PrincipalKind::User, command, out).await
        }
        Command::Services(command) => {
            identity::principal(channel(cli).await?, v1::PrincipalKind::Service, command, out).await
        }
        Command::Credentials(CredentialCommand::Renew { out: target }) => {
            let current = client::credentials_path(cli.credentials.clone());
            let target = target.clone().unwrap_or_else(|| current.clone());
            identity::renew(channel(cli).await?, &target, out).await
        }
        Command::Devices(command) => {
            let channel = channel(cli).await?;
            let mut api = RegistryServiceClient::new(channel.clone());
            match command {
                DeviceCommand::EnrollToken { id, ttl, replace } => {
                    identity::enroll_token(channel, id, *ttl, *replace, out).await
                }
                DeviceCommand::Import(args) => identity::import(channel, args, out).await,
                DeviceCommand::Revoke { id, reason } => identity::revoke_device(channel, id, Some(*reason), out).await,
                DeviceCommand::Decommission { id } => identity::revoke_device(channel, id, None, out).await,
                DeviceCommand::Register(args) => {
                    let device = api
                        .register_device(v1::RegisterDeviceRequest {
                            serial_number: args.serial_number.clone(),
                            manufacturer: args.manufacturer.clone(),
                            model: args.model.clone(),
                            device_class: device_class_to_wire(args.class).into(),
                            eui64: args.eui64.clone().unwrap_or_default(),
                            location: args.location.as_deref().map(location).transpose()?,
                            tags: args.tags.iter().cloned().collect::<HashMap<_, _>>(),
                        })
                        .await?
                        .into_inner();
                    output::device(out, &device.into())
                }
                DeviceCommand::List(args) => {
                    let limit = args.limit.unwrap_or(usize::MAX);
                    let mut all: Vec<DeviceView> = Vec::new();
                    let mut token = String::new();
                    while all.len() < limit {
                        let page = api
                            .list_devices(v1::ListDevicesRequest {
                                page_size: i32::try_from((limit - all.len()).min(500)).unwrap_or(500),
                                page_token: token,
                                site: args.site.clone().unwrap_or_default(),
                                ward: args.ward.clone().unwrap_or_default(),
                                model: args.model.clone().unwrap_or_default(),
                                state: args.state.map(|s| device_state_to_wire(s).into()).unwrap_or_default(),
                                tags: args.tags.clone(),
                                online: (args.online || args.offline).then_some(args.online),
                            })
                            .await?
                            .into_inner();
                        all.extend(page.devices.into_iter().map(DeviceView::from));
                        token = page.next_page_token;
                        if token.is_empty() {
                            break;
                        }
                    }
                    output::devices(out, &all)
                }
                DeviceCommand::Watch { site, ward, initial } => {
                    let mut stream = api
                        .watch_devices(v1::WatchDevicesRequest {
                            site: site.clone().unwrap_or_default(),
                            ward: ward.clone().unwrap_or_default(),
                            initial: *initial,
                        })
                        .await?
                        .into_inner();
                    while let Some(event) = stream.message().await? {
                        if let Some(device) = event.device {
                            output::device_event(out, &device.into())?;
                        }
                    }
                    Err(anyhow::anyhow!(
                        "the server ended the watch; run the command again to resume"
                    ))
                }
                DeviceCommand::Show { id } => {
                    let device = api
                        .get_device(v1::GetDeviceRequest { id: id.clone() })
                        .await?
                        .into_inner();
                    output::device(out, &device.into())
                }
                DeviceCommand::Update(args) => {
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
                        return Err(UsageError(
                            "nothing to change: give --location, --storage, --tag or --clear-tags".into(),
                        )
                        .into());
                    }
                    let device = api
                        .update_device(v1::UpdateDeviceRequest {
                            device: Some(device),
                            update_mask: Some(mask(&paths)),
                        })
                        .await?
                        .into_inner();
                    output::device(out, &device.into())
                }
            }
        }
    }
}

/// Whether a transport failure was the server rejecting our client certificate (a TLS alert after the handshake).
fn certificate_refused(status: &tonic::Status) -> bool {
    let mut text = status.message().to_lowercase();
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        text.push_str(&error.to_string().to_lowercase());
        source = error.source();
    }
    ["certificate", "revoked", "expired", "unknown ca", "bad certificate"]
        .iter()
        .any(|needle| text.contains(needle))
}

/// Prints the error for a person and picks the exit code scripts rely on.
fn report(error: &anyhow::Error) -> u8 {
    if let Some(usage) = error.downcast_ref::<UsageError>() {
        eprintln!("error: {usage}");
        return 2;
    }
    let Some(status) = error.downcast_ref::<tonic::Status>() else {
        eprintln!("error: {error:#}");
        return if error.to_string().starts_with("cannot reach medfleetd") {
            7
        } else {
            1
        };
    };
    match status.get_details_bad_request() {
        Some(bad_request) if !bad_request.field_violations.is_empty() => {
            eprintln!("error: the server rejected the request; nothing was changed:");
            for violation in &bad_request.field_violations {
                eprintln!("  {}: {}", violation.field, violation.description);
            }
        }
        _ => eprintln!("error: {}", status.message()),
    }
    let (code, hint) = match status.code() {
        Code::InvalidArgument | Code::OutOfRange => (3, None),
        Code::NotFound => (4, None),
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => (5, None),
        Code::Unauthenticated => (6, Some("your credentials were not accepted; check --credentials")),
        Code::PermissionDenied => (6, Some("ask an administrator for the permission named above")),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled if certificate_refused(status) => {
            (
                6,
                Some(
                    "medfleetd refused your certificate (revoked, expired or not issued by its CA); renew it \
                 (medfleet credentials renew) or ask an administrator for new credentials",
                ),
            )
        }
        Code::Unavailable | Code::DeadlineExceeded => (
            7,
            Some("medfleetd is not reachable or not ready; check --server and that it is running"),
        ),
        _ => (1, None),
    };
    if let Some(hint) = hint {
        eprintln!("hint: {hint}");
    }
    code
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match execute(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => ExitCode::from(report(&error)),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_leaf_command_has_an_example() {
        fn walk(cmd: &clap::Command, path: &str) {
            let name = format!("{path} {}", cmd.get_name());
            if cmd.get_subcommands().next().is_none() {
                let help = cmd.get_after_help().map(ToString::to_string).unwrap_or_default();
                assert!(help.contains("Example"), "`{name}` has no example in its --help");
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &name);
            }
        }
        walk(&Cli::command(), "");
    }

    #[test]
    fn scopes_and_locations_parse() {
        assert_eq!(split_scope("stmarys/icu").unwrap(), ("stmarys".into(), "icu".into()));
        assert!(split_scope("stmarys").is_err());
        assert!(split_scope("a/b/c").is_err());
        assert_eq!(location("a/b/3").unwrap().bed, "3");
        assert!(location("a").is_err());
    }
}
