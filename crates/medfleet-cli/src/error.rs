//! The failures the CLI finds itself, before or around a call, each standing for one exit code of the contract
//! (`main::report` maps them, and the server's statuses, to the codes).
//!
//! The line between the two: a usage error is fixed by typing the command differently (an option is missing,
//! contradicts another, has a value of the wrong shape — also in a row of `devices import`, whose columns are the
//! options of `devices register` — or names a file that cannot be opened); invalid input is fixed by changing what
//! the command was given to work on (a document that is not JSON, a server address that is not an https:// URL),
//! the kind of mistake the server answers with INVALID_ARGUMENT.

/// A mistake in how the command was called, found after clap parsed it: exit 2, as clap's own.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);

/// Input that cannot be used as given, found before the server sees it: exit 3, as the server's INVALID_ARGUMENT.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct InvalidInput(pub(crate) String);

/// How a watched rollout ended when it did not update every device, with its own exit code so that a script can
/// tell a halt (8) from an abort (9) and from a rollout that ended with devices not updated by its deadline (10).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct RolloutEnded {
    pub(crate) code: u8,
    pub(crate) message: String,
}

/// What to do about a refusal of the server, found from its reason: attached as context to the status, which still
/// decides the exit code; `main::report` prints it after the server's words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Hint(pub(crate) String);
