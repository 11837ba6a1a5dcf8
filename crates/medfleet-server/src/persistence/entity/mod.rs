//! sea-orm entities: one module per table created by `medfleet-migrations`.

pub mod association;
pub mod audit_log;
pub mod casbin_rule;
pub mod certificate;
pub mod config_layer;
pub mod config_schema;
pub mod config_version;
pub mod device;
pub mod device_placement;
pub mod device_presence;
pub mod device_tag;
pub mod emr_destination;
pub mod emr_outbox;
pub mod enrollment_token;
pub mod feed_subscription;
pub mod observation;
pub mod patient;
pub mod policy_version;
pub mod principal;
pub mod reading;
pub mod reading_batch;
pub mod revocation;
pub mod site;
pub mod ward;
