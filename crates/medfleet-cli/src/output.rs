//! How results are shown, for every command group: the output format, human tables by default, stable JSON with
//! `-o json` for scripts, and times as RFC 3339. Each group shapes its own views and rows with these.

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use medfleet_proto::convert::datetime;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Tables and sentences for people.
    Table,
    /// JSON for scripts (one document on stdout).
    Json,
}

pub(crate) fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(datetime).map(|t| t.to_rfc3339()).unwrap_or_default()
}

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(header.to_vec());
    t
}

pub(crate) fn json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
