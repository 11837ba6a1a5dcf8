//! `medfleet firmware`: TUF-signed firmware images. This group owns the offline half of TUF — creating the root
//! and targets keys and the root metadata (`keys`), signing and countersigning a release into targets metadata
//! (`sign`), which never connect and never send a key anywhere — and the commands that talk to medfleetd: its
//! online snapshot/timestamp keys (`keys`), the trusted root (`trust`), pulling the current metadata to sign the
//! next release on top of (`metadata`), uploading a signed image (`upload`) and the stored images
//! (`artifacts`). `resign` (offline) and `metadata publish` keep the metadata valid between releases. Private keys are written 0600 and never printed; the local files shared by these commands
//! (`files`) are a metadata directory holding `root.json` and `targets.json` as TUF names them.
//!
//! Rolling an image out to devices is `medfleet rollouts` (crate::rollouts).

mod artifacts;
mod files;
mod keys;
mod metadata;
mod passphrase;
mod review;
mod rotate;
mod sign;
#[cfg(test)]
mod tests;
mod trust;
mod upload;

use std::path::PathBuf;

use clap::Subcommand;
use medfleet_core::firmware::tuf::Refusal;
use medfleet_proto::v1::firmware_service_client::FirmwareServiceClient;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

use crate::client::Server;
use crate::error::Hint;
use crate::output::Format;

type Firmware = FirmwareServiceClient<Channel>;

/// The root metadata in a metadata directory.
const ROOT_FILE: &str = "root.json";
/// The targets metadata in a metadata directory: what `sign` extends and `upload` sends.
const TARGETS_FILE: &str = "targets.json";

#[derive(Debug, Subcommand)]
pub(crate) enum FirmwareCommand {
    /// The offline TUF keys and root metadata.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The public keys medfleetd signs snapshot and timestamp metadata with; -o json is the file
    /// `keys init --online-keys` reads.
    #[command(
        after_help = "Example:\n  medfleet firmware online-keys -o json > online-keys.json   # for the key holder's machine"
    )]
    OnlineKeys,
    /// The root metadata medfleetd trusts (and verifies every upload against).
    #[command(subcommand)]
    Trust(TrustCommand),
    /// OFFLINE: sign a release. Hashes IMAGE and writes DIR/targets.json: the targets medfleetd has (pulled with
    /// `metadata pull`) plus this one, as the next version, signed with the given targets keys.
    #[command(after_help = "Examples:\n  \
        medfleet firmware sign mx450-2.4.1.img --name mx450-2.4.1.img --model \"IntelliVue MX450\" \\\n    \
        --version 2.4.1 --counter 41 --metadata ./fw --key /media/safe/targets-1.pem\n  \
        medfleet firmware sign mx450-2.3.9.img --name mx450-2.3.9-fix.img --model \"IntelliVue MX450\" \\\n    \
        --version 2.3.9 --counter 40 --downgrade-from 41 --metadata ./fw --key targets-1.pem  # a signed downgrade")]
    Sign(sign::SignArgs),
    /// OFFLINE: add your targets key's signature to DIR/targets.json (k-of-n signing by separate key holders).
    #[command(after_help = "Example:\n  medfleet firmware countersign --metadata ./fw --key /media/bob/targets-2.pem")]
    Countersign(sign::CountersignArgs),
    /// OFFLINE: sign DIR/targets.json again as its next version with a new expiry and the same images, for when
    /// no release is due before it expires (devices refuse every image once it has). Then countersign to the
    /// threshold and `metadata publish`.
    #[command(after_help = "Examples:\n  \
        medfleet firmware metadata pull --out ./fw      # add --allow-expired when it has expired already\n  \
        medfleet firmware resign --metadata ./fw --key /media/safe/targets-1.pem --expires 180d\n  \
        medfleet firmware resign --metadata ./fw --key targets-1.pem --remove mx450-2.3.0.img  # a deleted image\n  \
        medfleet firmware resign --metadata ./fw --key targets-1.pem --allow-downgrade mx450-2.4.0.img=41  # for a rollback\n  \
        medfleet firmware countersign --metadata ./fw --key /media/bob/targets-2.pem\n  \
        medfleet firmware metadata publish --metadata ./fw --comment \"quarterly re-sign\"")]
    Resign(sign::ResignArgs),
    /// The TUF metadata medfleetd serves.
    #[command(subcommand)]
    Metadata(MetadataCommand),
    /// Upload a signed image with its targets metadata; medfleetd keeps it only if the signatures, hash and length
    /// verify against the trusted root.
    #[command(after_help = "Example:\n  \
        medfleet firmware upload mx450-2.4.1.img --metadata ./fw --name mx450-2.4.1.img \\\n    \
        --comment \"fixes SpO2 alarm delay\"")]
    Upload(upload::UploadArgs),
    /// The stored images, newest first.
    #[command(
        after_help = "Examples:\n  medfleet firmware list\n  medfleet firmware list --model \"IntelliVue MX450\" -o json"
    )]
    List {
        /// Only images for this device model.
        #[arg(long)]
        model: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// One stored image (by artifact id or target name).
    #[command(after_help = "Example:\n  medfleet firmware show mx450-2.4.1.img")]
    Show { artifact: String },
    /// Delete a stored image (refused while an unfinished rollout uses it). Asks first unless --yes.
    #[command(after_help = "Examples:\n  medfleet firmware delete mx450-2.4.0.img\n  \
                            medfleet firmware delete 3f2a9c1e-5d6b-4e7f-8a9b-0c1d2e3f4a5b --yes -o json")]
    Delete {
        artifact: String,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// OFFLINE: create the root and targets keys and the first root metadata, signed by the root keys. Run it on
    /// the key holder's machine; it never connects.
    #[command(
        after_help = "Examples:\n  medfleet firmware keys init --out ./fw --online-keys online-keys.json\n  \
        medfleet firmware keys init --out /media/safe/fw --online-keys online-keys.json \\\n    \
        --root-keys 3 --root-threshold 2 --targets-keys 3 --targets-threshold 2 --expires 730d\n\n\
        Writes DIR/root.json and DIR/keys/root-N.pem, DIR/keys/targets-N.pem (mode 0600); refuses to overwrite \
        anything."
    )]
    Init(keys::InitArgs),
    /// OFFLINE: sign the next root version with the current root keys, before the root expires (devices refuse
    /// every update once it has) or to replace root keys or medfleetd's online keys. Then `trust install` it.
    #[command(after_help = "Examples:\n  \
        medfleet firmware keys rotate-root --metadata ./fw --key /media/safe/root-1.pem --expires 365d\n  \
        medfleet firmware keys rotate-root --metadata ./fw --key root-1.pem --key root-2.pem \\\n    \
        --new-root-keys 3 --root-threshold 2\n  \
        medfleet firmware trust install ./fw/root.json\n\n\
        Writes the new DIR/root.json and keeps the old one as DIR/N.root.json; new root keys go to \
        DIR/keys/root-vN-*.pem (mode 0600).")]
    RotateRoot(rotate::RotateRootArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum TrustCommand {
    /// Install the first trusted root, or a new root version (signed by the root keys of the old and the new).
    #[command(after_help = "Example:\n  medfleet firmware trust install ./fw/root.json")]
    Install {
        /// Root metadata as `keys init` writes it.
        root_json: PathBuf,
    },
    /// The trusted root: version, expiry, the keys of each role.
    #[command(after_help = "Examples:\n  medfleet firmware trust show\n  \
                            medfleet firmware trust show --out pinned-root.json   # the root to pin on devices")]
    Show {
        /// Also write the root metadata, byte for byte, to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum MetadataCommand {
    /// Write medfleetd's current root.json, timestamp.json, snapshot.json and targets.json into DIR, verified
    /// against DIR/root.json when there is one, so the next `sign` extends what medfleetd has.
    #[command(after_help = "Examples:\n  medfleet firmware metadata pull --out ./fw\n  \
                            medfleet firmware metadata pull --out ./new-dir --root-sha256 9f2c…   # as `keys init` printed")]
    Pull {
        #[arg(long)]
        out: PathBuf,
        /// Replace local metadata that is newer than medfleetd's (signing work not uploaded yet is lost).
        #[arg(long)]
        force: bool,
        /// Pull metadata that has expired (signatures are still checked), to re-sign it with `resign`.
        #[arg(long)]
        allow_expired: bool,
        /// Into a DIR without root.json: the SHA-256 of the root you trust (`keys init` printed it). medfleetd's
        /// root is never trusted as sent: a forged one could make you sign an image you did not mean to.
        #[arg(long, value_name = "HEX")]
        root_sha256: Option<String>,
    },
    /// The metadata medfleetd serves devices: each role's version and expiry, the targets it lists and whether
    /// it verifies against DIR/root.json (or medfleetd's first root).
    #[command(after_help = "Examples:\n  medfleet firmware metadata show\n  \
                            medfleet firmware metadata show --metadata ./fw -o json")]
    Show {
        /// Verify against DIR/root.json (the root you trust) instead of medfleetd's first root.
        #[arg(long)]
        metadata: Option<PathBuf>,
    },
    /// Publish DIR/targets.json that adds no image (from `resign`, countersigned to the threshold); medfleetd
    /// refuses it, changing nothing, unless it verifies and lists exactly the stored images.
    #[command(
        after_help = "Example:\n  medfleet firmware metadata publish --metadata ./fw --comment \"quarterly re-sign\""
    )]
    Publish {
        #[arg(long)]
        metadata: PathBuf,
        /// Why (kept in the audit trail).
        #[arg(long, default_value = "")]
        comment: String,
    },
}

/// medfleetd's refusal of metadata or an image, with what to do about it when its reason (ErrorInfo, a TUF refusal
/// code) says; the status still decides the exit code.
fn refusal(status: tonic::Status) -> anyhow::Error {
    let reason = status.get_details_error_info().map(|info| info.reason.to_lowercase());
    let hint = match reason.as_deref() {
        Some(r) if r == Refusal::Signature.as_str() => Some(
            "targets.json is not signed to the threshold of medfleetd's trusted root (or by keys it does not trust): \
             countersign it (`medfleet firmware countersign`), and compare `medfleet firmware trust show` with \
             your root.json",
        ),
        Some(r) if r == Refusal::Expired.as_str() => Some(
            "the metadata has expired (`medfleet firmware metadata show` says which role): re-sign the targets with \
             `medfleet firmware metadata pull --allow-expired`, `medfleet firmware resign`, countersign and \
             `medfleet firmware metadata publish`; an expired root needs `medfleet firmware keys rotate-root` and \
             `medfleet firmware trust install`",
        ),
        Some(r) if r == Refusal::Rollback.as_str() => Some(
            "targets.json is older than what medfleetd has: `medfleet firmware metadata pull`, then sign again on top",
        ),
        Some(r) if r == Refusal::HashMismatch.as_str() || r == Refusal::TooLarge.as_str() => {
            Some("the image sent is not the one signed: upload the exact file you signed")
        }
        Some(r) if r == Refusal::NotNewer.as_str() => Some(
            "the release counter must be above every stored release of the model (or sign a downgrade with \
             --downgrade-from)",
        ),
        Some(r) if r == Refusal::UnknownTarget.as_str() => {
            Some("targets.json does not list --name (upload), or lists an image medfleetd does not store (publish)")
        }
        _ => None,
    };
    match hint {
        Some(hint) => anyhow::Error::from(status).context(Hint(hint.to_owned())),
        None => status.into(),
    }
}

pub(crate) async fn run(server: &Server, command: &FirmwareCommand, out: Format) -> anyhow::Result<()> {
    // Offline: nothing here connects.
    match command {
        FirmwareCommand::Keys(KeysCommand::Init(args)) => return keys::init(args, out).await,
        FirmwareCommand::Keys(KeysCommand::RotateRoot(args)) => return rotate::rotate_root(args, out).await,
        FirmwareCommand::Sign(args) => return sign::sign(args, out).await,
        FirmwareCommand::Countersign(args) => return sign::countersign(args, out).await,
        FirmwareCommand::Resign(args) => return sign::resign(args, out).await,
        _ => {}
    }
    if let FirmwareCommand::Upload(args) = command {
        return upload::upload(server.transfer_channel().await?, args, out).await;
    }
    // Metadata replies may exceed tonic's default 4 MiB (targets up to 8 MiB, every root version).
    let mut api = FirmwareServiceClient::new(server.channel().await?).max_decoding_message_size(24 * 1024 * 1024);
    match command {
        FirmwareCommand::OnlineKeys => keys::online_keys(&mut api, out).await,
        FirmwareCommand::Trust(TrustCommand::Install { root_json }) => trust::install(&mut api, root_json, out).await,
        FirmwareCommand::Trust(TrustCommand::Show { out: file }) => trust::show(&mut api, file.as_deref(), out).await,
        FirmwareCommand::Metadata(MetadataCommand::Pull {
            out: dir,
            force,
            allow_expired,
            root_sha256,
        }) => metadata::pull(&mut api, dir, (*force, *allow_expired), root_sha256.as_deref(), out).await,
        FirmwareCommand::Metadata(MetadataCommand::Show { metadata: dir }) => {
            metadata::show(&mut api, dir.as_deref(), out).await
        }
        FirmwareCommand::Metadata(MetadataCommand::Publish { metadata: dir, comment }) => {
            metadata::publish(&mut api, dir, comment, out).await
        }
        FirmwareCommand::List { model, limit } => artifacts::list(&mut api, model.as_deref(), *limit, out).await,
        FirmwareCommand::Show { artifact } => artifacts::show(&mut api, artifact, out).await,
        FirmwareCommand::Delete { artifact, yes } => artifacts::delete(&mut api, artifact, *yes, out).await,
        // Run above.
        FirmwareCommand::Keys(_)
        | FirmwareCommand::Sign(_)
        | FirmwareCommand::Countersign(_)
        | FirmwareCommand::Resign(_)
        | FirmwareCommand::Upload(_) => Ok(()),
    }
}
