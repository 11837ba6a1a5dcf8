//! `medfleet rollouts`: staged rollouts of a stored firmware image to devices. This group owns creating one
//! (`create`: the devices it targets and its rules, checked here with the same parsers medfleetd uses), what a
//! rollout is shown as (`view`), following one live (`watch`), and the operator's moves on one — start, pause,
//! resume, abort, retry the failed devices, approve a device in clinical use, roll back (`control`).
//!
//! The images themselves, and their signing, are `medfleet firmware` (crate::firmware).

mod control;
mod create;
mod view;
mod watch;

use clap::Subcommand;
use medfleet_proto::v1::rollout_service_client::RolloutServiceClient;
use tonic::transport::Channel;

use crate::client::Server;
use crate::output::Format;

type Rollouts = RolloutServiceClient<Channel>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StateArg {
    Draft,
    Running,
    Paused,
    Halted,
    Completed,
    Aborted,
}

/// Why (audited), for the commands that change a rollout.
#[derive(Debug, clap::Args)]
pub(crate) struct CommandArgs {
    /// The rollout id.
    rollout: String,
    /// Why (kept in the audit trail).
    #[arg(short = 'm', long, default_value = "")]
    comment: String,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RolloutCommand {
    /// Roll an image out to the devices a selector or a file names, in waves. Every rule is checked before
    /// anything is sent; the rollout starts at once unless --draft (at a terminal, after showing how many devices
    /// each wave reaches and asking; --yes skips that). --dry-run only shows it.
    #[command(after_help = "Examples:\n  \
        medfleet rollouts create --artifact mx450-2.4.1.img --select 'model=IntelliVue MX450,site=stmarys' \\\n    \
        --waves 1%,10%,50%,100% --success 95% --soak 30m --halt-at 5% --min-executed 3 \\\n    \
        --window 'Mon-Fri 02:00-05:00' --clinical-use defer --deadline 14d --dry-run\n  \
        medfleet rollouts create --artifact mx450-2.4.1.img --devices icu-pilot.txt --waves 100% \\\n    \
        --clinical-use approve --draft -m \"ICU pilot\"\n\n\
        --select terms (all must match): model=MODEL, site=SITE, ward=SITE/WARD, tag=KEY=VALUE (repeatable).\n\
        --devices FILE: one device id per line; '#' starts a comment; '-' reads stdin.")]
    Create(create::CreateArgs),
    /// Rollouts, newest first.
    #[command(after_help = "Examples:\n  medfleet rollouts list\n  medfleet rollouts list --state running -o json")]
    List {
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// A rollout, its waves and its devices' states (up to --limit devices, those that need attention first;
    /// the counts cover every device).
    #[command(
        after_help = "Examples:\n  medfleet rollouts show 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d\n  medfleet rollouts show 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d --failed"
    )]
    Show {
        rollout: String,
        /// Only devices that failed, were rolled back or are deferred.
        #[arg(long)]
        failed: bool,
        /// List at most this many devices (default 1000, at most 10000): those that need attention first; the
        /// counts cover every device.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: Option<u32>,
    },
    /// Follow a rollout live, a progress bar per wave, until it finishes. Exits 0 when it completed, 8 when it
    /// halted, 9 when it was aborted, 10 when its deadline left devices out; with -o json, one JSON object per
    /// update line.
    #[command(
        after_help = "Examples:\n  medfleet rollouts watch 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d\n  \
                            medfleet rollouts watch 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d -o json | jq -c '.rollout.counts'"
    )]
    Watch { rollout: String },
    /// Start a draft rollout.
    #[command(
        after_help = "Example:\n  medfleet rollouts start 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d -m \"CAB approved, change 4711\""
    )]
    Start(CommandArgs),
    /// Pause: nothing new is sent; devices already installing finish.
    #[command(
        after_help = "Example:\n  medfleet rollouts pause 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d -m \"ICU asked to wait\""
    )]
    Pause(CommandArgs),
    /// Resume a paused or halted rollout.
    #[command(
        after_help = "Example:\n  medfleet rollouts resume 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d -m \"failures were a network outage\""
    )]
    Resume(CommandArgs),
    /// End a rollout: devices that have not started installing are canceled. Asks first unless --yes.
    #[command(
        after_help = "Examples:\n  medfleet rollouts abort 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d -m \"boot loop on 2 devices\"\n  \
                            medfleet rollouts abort 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d --yes -o json"
    )]
    Abort {
        #[command(flatten)]
        args: CommandArgs,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
    /// Queue the failed devices of the current and earlier waves again (devices that only missed the deadline
    /// are not retried). A halted rollout then needs `resume`.
    #[command(
        after_help = "Examples:\n  medfleet rollouts retry-failed 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d\n  \
        medfleet rollouts retry-failed 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d --include-rolled-back \\\n    \
        -m \"health check fixed in the 2.4.2 probe\""
    )]
    RetryFailed {
        #[command(flatten)]
        args: CommandArgs,
        /// Also retry devices that rolled back by themselves after a failed health check.
        #[arg(long)]
        include_rolled_back: bool,
    },
    /// As a clinician with scope over its ward: let a device in clinical use install (rollouts with
    /// --clinical-use approve), for a limited time and only for the patient it is bound to now: a new or ended
    /// association voids the approval. An alarming device is never interrupted.
    #[command(
        after_help = "Example:\n  medfleet rollouts approve 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d --device 6f1c2d3e-0b1a-4c5d-8e9f-0a1b2c3d4e5f \
                            --valid 30m -m \"patient stable, spare monitor at bedside\""
    )]
    Approve {
        rollout: String,
        #[arg(long)]
        device: String,
        /// How long the approval stands (1m to 24h); outside the maintenance window it still waits.
        #[arg(long, value_parser = crate::args::parse_duration, default_value = "1h")]
        valid: std::time::Duration,
        /// Why installing now is safe for this patient (kept in the audit trail).
        #[arg(short = 'm', long)]
        comment: String,
    },
    /// Give one device up for this rollout: it will not finish (taken out of service, replaced, its state lost,
    /// or stuck installing and never coming back). Its action ends as canceled, whatever state it is in; it no
    /// longer holds its wave and may join another rollout. Check on the device which image it runs.
    #[command(
        after_help = "Example:\n  medfleet rollouts abandon 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d --device 6f1c2d3e-0b1a-4c5d-8e9f-0a1b2c3d4e5f \
                            -m \"monitor sent for repair (ticket BME-2231)\" --yes"
    )]
    Abandon {
        rollout: String,
        #[arg(long)]
        device: String,
        /// Why the device will not finish (kept in the audit trail).
        #[arg(short = 'm', long)]
        comment: String,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
    /// Put the model's previous signed image back on the devices this rollout updated, as a new rollout with the
    /// same rules (devices take it only as a signed downgrade: authorise the stored previous image with
    /// `firmware resign --allow-downgrade OLD.img=RELEASE` and `metadata publish` first). Pause or abort it first.
    #[command(
        after_help = "Examples:\n  medfleet rollouts rollback 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d -m \"SpO2 readings drift after update\"\n  \
                      medfleet rollouts rollback 4c2b9e7a-1f3d-4a6b-9c8e-5d7f0a1b2c3d --draft   # look first, then rollouts start"
    )]
    Rollback {
        #[command(flatten)]
        args: CommandArgs,
        /// Create the rollback as a draft: look at it with `rollouts show`, then `rollouts start` it.
        #[arg(long)]
        draft: bool,
    },
}

pub(crate) async fn run(server: &Server, command: &RolloutCommand, out: Format) -> anyhow::Result<()> {
    // A new rollout is checked before connecting: a typo is reported even without credentials or a server.
    if let RolloutCommand::Create(args) = command {
        let request = args.request()?;
        let mut api = RolloutServiceClient::new(server.channel().await?);
        return create::run(&mut api, args, request, out).await;
    }
    let mut api = RolloutServiceClient::new(server.channel().await?);
    match command {
        // Run above.
        RolloutCommand::Create(_) => Ok(()),
        RolloutCommand::List { state, limit } => control::list(&mut api, *state, *limit, out).await,
        RolloutCommand::Show { rollout, failed, limit } => {
            control::show(&mut api, rollout, (*failed, limit.unwrap_or(0)), out).await
        }
        RolloutCommand::Watch { rollout } => watch::run(&mut api, rollout, out).await,
        RolloutCommand::Start(args) => control::command(&mut api, control::Move::Start, args, out).await,
        RolloutCommand::Pause(args) => control::command(&mut api, control::Move::Pause, args, out).await,
        RolloutCommand::Resume(args) => control::command(&mut api, control::Move::Resume, args, out).await,
        RolloutCommand::Abort { args, yes } => {
            crate::confirm::confirm(
                &format!(
                    "Abort rollout {}? Devices that have not started installing are canceled; it cannot be resumed",
                    args.rollout
                ),
                *yes,
            )?;
            control::command(&mut api, control::Move::Abort, args, out).await
        }
        RolloutCommand::RetryFailed {
            args,
            include_rolled_back,
        } => {
            let m = control::Move::RetryFailed {
                include_rolled_back: *include_rolled_back,
            };
            control::command(&mut api, m, args, out).await
        }
        RolloutCommand::Approve {
            rollout,
            device,
            valid,
            comment,
        } => control::approve(&mut api, (rollout, device), *valid, comment, out).await,
        RolloutCommand::Abandon {
            rollout,
            device,
            comment,
            yes,
        } => {
            crate::confirm::confirm(
                &format!(
                    "Give device {device} up in rollout {rollout}? Its action ends as canceled even if it is \
                     installing; it is not updated by this rollout"
                ),
                *yes,
            )?;
            control::abandon(&mut api, (rollout, device), comment, out).await
        }
        RolloutCommand::Rollback { args, draft } => {
            control::command(&mut api, control::Move::Rollback { draft: *draft }, args, out).await
        }
    }
}
