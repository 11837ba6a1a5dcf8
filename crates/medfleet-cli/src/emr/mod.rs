//! `medfleet emr`: EMR destinations — where chart entries go (a gRPC feed, a FHIR R4 server, an HL7 v2 receiver
//! over MLLP) — defined and changed in `destinations`, and what was delivered to them, or failed, in `deliveries`;
//! `medfleet feed` (`feed`): reading a feed destination as an EMR system does.

mod deliveries;
mod destinations;
pub(crate) mod feed;

use clap::Subcommand;
use medfleet_proto::v1::emr_service_client::EmrServiceClient;
use tonic::transport::Channel;

use crate::output::Format;

type Emr = EmrServiceClient<Channel>;

// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub(crate) enum EmrCommand {
    /// Define where chart entries go.
    #[command(after_help = "Examples:\n  medfleet emr create epic-feed --kind feed\n  \
                            medfleet emr create epic-fhir --kind fhir --endpoint https://fhir.hospital.example/R4 \\\n    \
                            --bearer-token-file token.txt --ca fhir-ca.pem --site stmarys\n  \
                            medfleet emr create lab-hl7 --kind mllp --endpoint hl7.hospital.example:2575 --ward stmarys/icu")]
    Create(destinations::CreateArgs),
    /// The destinations (secrets are never shown: only whether one is set and the key that seals it).
    #[command(after_help = "Example:\n  medfleet emr list -o json")]
    List,
    /// Change a destination: only the options given change, the rest keeps its value. Rotates a secret, repoints,
    /// narrows or widens its filter. Relays apply it from their next batch; the audit trail records what changed.
    #[command(
        after_help = "Examples:\n  medfleet emr update epic-fhir --bearer-token-file new-token.txt      # rotate the token\n  \
                            medfleet emr update epic-fhir --client-cert new.pem --client-key new.key\n  \
                            medfleet emr update icu-hl7 --endpoint hl7b.hospital.example:2575 --ward stmarys/icu -o json\n  \
                            medfleet emr update lab-hl7 --endpoint 10.0.5.9:2575 --insecure-plaintext  # MLLP in clear: say so again"
    )]
    Update(destinations::UpdateArgs),
    /// Stop delivering to a destination (pending deliveries wait; chart entries made meanwhile are not queued).
    #[command(after_help = "Example:\n  medfleet emr disable epic-fhir")]
    Disable { name: String },
    /// Resume delivering to a destination: what was pending when it was disabled is sent.
    #[command(after_help = "Example:\n  medfleet emr enable epic-fhir -o json")]
    Enable { name: String },
    /// Delete a destination and its delivery records; its pending deliveries are discarded, never sent. Refused
    /// while feed subscriptions follow it, unless --force (which deletes them too).
    #[command(
        after_help = "Examples:\n  medfleet emr delete old-fhir\n  medfleet emr delete epic-feed --force -o json"
    )]
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Deliveries, newest first; --failed shows the dead-lettered ones.
    #[command(after_help = "Examples:\n  medfleet emr deliveries --failed\n  \
                            medfleet emr deliveries --destination epic-fhir --limit 20 -o json")]
    Deliveries {
        #[arg(long)]
        destination: Option<String>,
        #[arg(long)]
        failed: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Send dead-lettered deliveries again (all of the destination's, or the given ids).
    #[command(
        after_help = "Examples:\n  medfleet emr retry epic-fhir\n  medfleet emr retry epic-fhir --id 1042 --id 1043"
    )]
    Retry {
        destination: String,
        #[arg(long = "id")]
        ids: Vec<u64>,
    },
}

pub(crate) async fn run(channel: Channel, command: &EmrCommand, out: Format) -> anyhow::Result<()> {
    let mut api = EmrServiceClient::new(channel);
    match command {
        EmrCommand::Create(args) => destinations::create(&mut api, args, out).await,
        EmrCommand::List => destinations::list(&mut api, out).await,
        EmrCommand::Update(args) => destinations::update(&mut api, args, out).await,
        EmrCommand::Disable { name } => destinations::set_enabled(&mut api, name, false, out).await,
        EmrCommand::Enable { name } => destinations::set_enabled(&mut api, name, true, out).await,
        EmrCommand::Delete { name, force } => destinations::delete(&mut api, name, *force, out).await,
        EmrCommand::Deliveries {
            destination,
            failed,
            limit,
        } => deliveries::list(&mut api, destination.as_deref(), *failed, *limit, out).await,
        EmrCommand::Retry { destination, ids } => deliveries::retry(&mut api, destination, ids, out).await,
    }
}
