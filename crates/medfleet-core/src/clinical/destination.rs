//! A change to an EMR destination, as an admin asks for it: each `Some` replaces that part of the definition,
//! `None` keeps what is stored. The server applies it under the same validation and host rules as a creation.

use std::collections::BTreeSet;

/// A partial update of a destination. Secrets (the bearer token, the client key) are plaintext here, on their
/// way to being sealed; `Debug` never prints them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DestinationUpdate {
    pub endpoint: Option<String>,
    pub sites: Option<BTreeSet<String>>,
    pub wards: Option<BTreeSet<String>>,
    pub interval_secs: Option<u32>,
    /// `Some(None)` removes the token.
    pub bearer_token: Option<Option<String>>,
    /// `Some(None)` removes the CA (MLLP then needs `insecure_plaintext`).
    pub ca_pem: Option<Option<String>>,
    pub receiving_application: Option<String>,
    pub receiving_facility: Option<String>,
    /// The client certificate chain and its key, which change together; `Some(None)` removes mutual TLS.
    pub client_identity: Option<Option<ClientIdentity>>,
    pub insecure_plaintext: Option<bool>,
    pub enabled: Option<bool>,
}

/// medfleet's client certificate chain and private key (PEM) for a receiver that requires mutual TLS.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub certificate_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for DestinationUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationUpdate")
            .field("fields", &self.fields())
            .finish_non_exhaustive()
    }
}

impl DestinationUpdate {
    /// The names (as on the wire) of the parts this update changes, in a fixed order.
    pub fn fields(&self) -> Vec<&'static str> {
        [
            ("endpoint", self.endpoint.is_some()),
            ("sites", self.sites.is_some()),
            ("wards", self.wards.is_some()),
            ("interval_seconds", self.interval_secs.is_some()),
            ("bearer_token", self.bearer_token.is_some()),
            ("ca_pem", self.ca_pem.is_some()),
            ("receiving_application", self.receiving_application.is_some()),
            ("receiving_facility", self.receiving_facility.is_some()),
            ("client_certificate_pem", self.client_identity.is_some()),
            ("insecure_plaintext", self.insecure_plaintext.is_some()),
            ("enabled", self.enabled.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }

    /// Whether the update changes nothing but whether the destination is enabled.
    pub fn only_enabled(&self) -> bool {
        self.enabled.is_some() && self.fields() == ["enabled"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_names_fields_never_secrets() {
        let update = DestinationUpdate {
            bearer_token: Some(Some("s3cret".into())),
            client_identity: Some(Some(ClientIdentity {
                certificate_pem: "CERT".into(),
                key_pem: "PRIVATE".into(),
            })),
            ..DestinationUpdate::default()
        };
        let printed = format!("{update:?}");
        assert!(!printed.contains("s3cret") && !printed.contains("PRIVATE"), "{printed}");
        assert!(printed.contains("bearer_token") && printed.contains("client_certificate_pem"));
        assert!(!update.only_enabled());
        let toggle = DestinationUpdate {
            enabled: Some(false),
            ..DestinationUpdate::default()
        };
        assert!(toggle.only_enabled());
    }
}
