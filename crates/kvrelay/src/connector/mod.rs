//! connector (in progress)
