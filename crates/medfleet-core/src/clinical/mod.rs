//! The clinical side of medfleet, as pure code: the vital-sign code tables and vendor normalisation
//! ([`codes`]), validation of what devices send ([`reading`]), the canonical chart entry and grouping into
//! measurements ([`chart`]), device–patient association periods ([`association`]), alarm limits per vital
//! ([`alarm`]), and the two output formats: FHIR R4 ([`fhir`]) and HL7 v2 IHE PCD-01 over MLLP ([`hl7`]).

pub mod alarm;
pub mod association;
pub mod chart;
pub mod codes;
pub mod destination;
pub mod fhir;
pub mod hl7;
pub mod reading;
