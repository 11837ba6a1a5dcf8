//! `medfleet patients` (patients, device associations, ADT) and `medfleet observations` (the chart and its
//! validation).

pub(crate) mod observations;
pub(crate) mod patients;
