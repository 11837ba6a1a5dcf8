//! Principals and their certificate identities (`medfleet://<kind>/<name>` URI SANs).

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::validation::check_slug;

/// URI scheme of every medfleet identity SAN.
pub const SCHEME: &str = "medfleet://";

/// Who is calling: taken from the client certificate, never from the request body.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An operator (hospital IT, biomed, clinician, auditor).
    User(String),
    /// An integration (EMR system, gateway).
    Service(String),
    /// A bedside device, by its registry id.
    Device(Uuid),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity must start with {SCHEME}")]
    Scheme,
    #[error("identity kind must be user, service or device")]
    Kind,
    #[error("identity name is invalid: {0}")]
    Name(String),
}

impl Identity {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::User(_) => "user",
            Self::Service(_) => "service",
            Self::Device(_) => "device",
        }
    }

    /// Validates a principal name for user and service identities.
    pub fn check_name(name: &str) -> Result<(), String> {
        check_slug(name)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(name) => write!(f, "{SCHEME}user/{name}"),
            Self::Service(name) => write!(f, "{SCHEME}service/{name}"),
            Self::Device(id) => write!(f, "{SCHEME}device/{id}"),
        }
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let rest = uri.strip_prefix(SCHEME).ok_or(IdentityError::Scheme)?;
        let (kind, name) = rest.split_once('/').ok_or(IdentityError::Kind)?;
        match kind {
            "user" => {
                check_slug(name).map_err(IdentityError::Name)?;
                Ok(Self::User(name.to_owned()))
            }
            "service" => {
                check_slug(name).map_err(IdentityError::Name)?;
                Ok(Self::Service(name.to_owned()))
            }
            "device" => {
                // Only the canonical hyphenated lower-case form, so one device has exactly one identity string.
                let id = Uuid::parse_str(name).map_err(|e| IdentityError::Name(e.to_string()))?;
                if id.hyphenated().to_string() != name {
                    return Err(IdentityError::Name(
                        "device id must be a lower-case hyphenated UUID".into(),
                    ));
                }
                Ok(Self::Device(id))
            }
            _ => Err(IdentityError::Kind),
        }
    }
}

/// Why certificates were revoked (RFC 5280 reason codes that apply to medfleet), as recorded in the revocation
/// log and the CRL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
}

impl RevocationReason {
    pub const ALL: [Self; 5] = [
        Self::Unspecified,
        Self::KeyCompromise,
        Self::AffiliationChanged,
        Self::Superseded,
        Self::CessationOfOperation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::KeyCompromise => "key-compromise",
            Self::AffiliationChanged => "affiliation-changed",
            Self::Superseded => "superseded",
            Self::CessationOfOperation => "cessation-of-operation",
        }
    }
}

impl FromStr for RevocationReason {
    type Err = String;

    /// Accepts the stored spelling and the words operators type (`compromised`, `retired`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "compromised" | "key-compromise" => Ok(Self::KeyCompromise),
            "retired" | "cessation-of-operation" => Ok(Self::CessationOfOperation),
            "superseded" => Ok(Self::Superseded),
            "affiliation-changed" => Ok(Self::AffiliationChanged),
            "unspecified" => Ok(Self::Unspecified),
            other => Err(format!(
                "unknown reason '{}'; use compromised, superseded, retired, affiliation-changed or unspecified",
                crate::validation::printable(other)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parses_each_kind() {
        assert_eq!("medfleet://user/alice".parse(), Ok(Identity::User("alice".into())));
        assert_eq!("medfleet://service/epic".parse(), Ok(Identity::Service("epic".into())));
        let id = Uuid::new_v4();
        assert_eq!(format!("medfleet://device/{id}").parse(), Ok(Identity::Device(id)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "https://user/alice",
            "medfleet://admin/alice",
            "medfleet://user/",
            "medfleet://user/Alice",
            "medfleet://user/alice/extra",
            "medfleet://device/not-a-uuid",
            "medfleet://device/6F9619FF-8B86-D011-B42D-00C04FC964FF",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }

    #[test]
    fn reasons_round_trip() {
        for reason in RevocationReason::ALL {
            assert_eq!(reason.as_str().parse(), Ok(reason));
        }
        assert_eq!("compromised".parse(), Ok(RevocationReason::KeyCompromise));
        assert!("bored".parse::<RevocationReason>().is_err());
    }

    proptest! {
        #[test]
        fn display_round_trips(name in "[a-z][a-z0-9-]{0,61}[a-z0-9]", bytes in any::<[u8; 16]>()) {
            for identity in [Identity::User(name.clone()), Identity::Service(name.clone()), Identity::Device(Uuid::from_bytes(bytes))] {
                prop_assert_eq!(identity.to_string().parse::<Identity>(), Ok(identity));
            }
        }
    }
}
