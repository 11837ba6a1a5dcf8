//! sea-orm entities: one module per table created by `medfleet-migrations`.

pub mod device;
pub mod device_tag;
pub mod site;
pub mod ward;
