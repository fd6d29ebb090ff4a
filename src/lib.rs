//! Support code shared by kvrelay's examples and criterion benches.

pub mod engine_args;
pub mod smoke;
pub mod verify;
