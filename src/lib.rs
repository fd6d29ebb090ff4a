//! Support code shared by kvrelay's examples and criterion benches.
