//! Device presence: whether a device holds a session, what it last said about itself (operational state,
//! firmware, the configuration it runs) and when.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

/// What the device says it is doing. A device in clinical use or alarming must not be disturbed (no reboot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OperationalState {
    #[default]
    Unknown,
    Idle,
    InClinicalUse,
    Alarming,
    Maintenance,
}

impl OperationalState {
    pub const ALL: [Self; 5] = [
        Self::Unknown,
        Self::Idle,
        Self::InClinicalUse,
        Self::Alarming,
        Self::Maintenance,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Idle => "idle",
            Self::InClinicalUse => "in_clinical_use",
            Self::Alarming => "alarming",
            Self::Maintenance => "maintenance",
        }
    }
}

impl fmt::Display for OperationalState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OperationalState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown operational state '{s}'"))
    }
}

/// The configuration a device last reported.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReportedConfig {
    pub version: u64,
    pub digest: String,
    /// Why the device refused the configuration it was last sent, if it did.
    pub rejection: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub online: bool,
    pub last_seen: DateTime<Utc>,
    pub connected_at: DateTime<Utc>,
    pub disconnected_at: Option<DateTime<Utc>>,
    pub replica: String,
    pub state: OperationalState,
    pub firmware_version: String,
    pub reported: ReportedConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for state in OperationalState::ALL {
            assert_eq!(state.as_str().parse::<OperationalState>(), Ok(state));
        }
        assert!("asleep".parse::<OperationalState>().is_err());
    }
}
