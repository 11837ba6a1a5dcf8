//! Command-line values several command groups take, turned into what the API wants: SITE/WARD scopes, locations,
//! durations, RFC 3339 times, revocation reasons, and the field mask of a partial update. A value in the wrong shape
//! is a usage error, as clap's own parsers would make it.

use std::time::Duration;

use medfleet_core::identity::RevocationReason;
use medfleet_proto::convert::timestamp;
use medfleet_proto::v1;

use crate::error::UsageError;

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration like 30m, 24h or 7days: {e}"))
}

pub(crate) fn parse_reason(s: &str) -> Result<RevocationReason, String> {
    s.parse()
}

pub(crate) fn split_scope(scope: &str) -> anyhow::Result<(String, String)> {
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

/// The `--FLAG` value as a timestamp, if given.
pub(crate) fn time_arg(flag: &str, value: Option<&str>) -> anyhow::Result<Option<prost_types::Timestamp>> {
    value
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| timestamp(t.with_timezone(&chrono::Utc)))
                .map_err(|e| UsageError(format!("--{flag} '{s}' is not an RFC 3339 time: {e}")).into())
        })
        .transpose()
}

pub(crate) fn mask(paths: &[&str]) -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_locations_parse() {
        assert_eq!(split_scope("stmarys/icu").unwrap(), ("stmarys".into(), "icu".into()));
        assert!(split_scope("stmarys").is_err());
        assert!(split_scope("a/b/c").is_err());
        assert_eq!(location("a/b/3").unwrap().bed, "3");
        assert!(location("a").is_err());
    }
}
