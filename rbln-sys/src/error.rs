//! Errors: a newtype over `RBLNRetCode`, the error of a runtime call, and the error of
//! finding and opening the library.

use std::fmt;

pub use vendor_dl::Attempt;

use crate::sys;

/// A status code the runtime returned (`RBLNRetCode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RblnStatus(pub sys::RBLNRetCode);

impl RblnStatus {
    pub const SUCCESS: RblnStatus = RblnStatus(sys::RBLNRetCode_SUCCESS);
    pub const FAILURE: RblnStatus = RblnStatus(sys::RBLNRetCode_FAILURE);
    pub const INVALID: RblnStatus = RblnStatus(sys::RBLNRetCode_INVALID);

    /// The enumerator's name, or `None` for a code the declarations do not know.
    pub fn name(self) -> Option<&'static str> {
        match self.0 {
            sys::RBLNRetCode_SUCCESS => Some("RBLNRetCode_SUCCESS"),
            sys::RBLNRetCode_FAILURE => Some("RBLNRetCode_FAILURE"),
            sys::RBLNRetCode_INVALID => Some("RBLNRetCode_INVALID"),
            _ => None,
        }
    }

    /// `Ok(())` for success, the call's error otherwise.
    pub fn result(self, call: &'static str) -> Result<(), RblnError> {
        if self == RblnStatus::SUCCESS {
            Ok(())
        } else {
            Err(RblnError::Status { call, status: self })
        }
    }
}

impl fmt::Display for RblnStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        vendor_dl::write_status(f, self.name(), self.0, "unknown RBLNRetCode")
    }
}

/// A runtime call that failed or could not be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RblnError {
    /// The runtime returned a status other than success.
    #[error("{call} returned {status}")]
    Status {
        call: &'static str,
        status: RblnStatus,
    },
    /// The library does not export the symbol this call needs (an older or newer runtime).
    #[error("{call} is not available: symbol {symbol} is missing from {library}: {message}")]
    MissingSymbol {
        call: &'static str,
        symbol: &'static str,
        library: String,
        message: String,
    },
    /// A copy would leave a device allocation; refused before the runtime is called.
    #[error("{call}: {len} bytes at offset {offset} exceed the {size}-byte device allocation")]
    OutOfBounds {
        call: &'static str,
        offset: usize,
        len: usize,
        size: usize,
    },
    /// The runtime handed back a value that cannot be right (e.g. a negative count).
    #[error("{call} returned an invalid {what}: {value}")]
    InvalidValue {
        call: &'static str,
        what: &'static str,
        value: i64,
    },
}

impl RblnError {
    /// The runtime function the failed call was for.
    pub fn call(&self) -> &'static str {
        match self {
            RblnError::Status { call, .. }
            | RblnError::MissingSymbol { call, .. }
            | RblnError::OutOfBounds { call, .. }
            | RblnError::InvalidValue { call, .. } => call,
        }
    }
}

/// The runtime library could not be found, opened or accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// No candidate of the search order could be opened.
    #[error("no RBLN runtime library (librbln.so) found; set RBLN_RUNTIME_LIB to its path. Tried:{}", vendor_dl::list_attempts(.tried))]
    NotFound { tried: Vec<Attempt> },
    /// An explicitly named library (RBLN_RUNTIME_LIB or a path given to `Runtime::open`)
    /// could not be opened.
    #[error("cannot open the RBLN runtime library {path}: {message}")]
    Open { path: String, message: String },
    /// The runtime implements a range of ABIs that excludes the one these bindings were
    /// written for.
    #[error("RBLN runtime {path} implements ABI {min_supported}..={current}, but rbln-sys was written for ABI {built}; use a matching rebel-compiler (ABI 6 is 0.12) or set RBLN_SKIP_ABI_CHECK=1 to try anyway")]
    AbiMismatch {
        path: String,
        built: u32,
        current: u32,
        min_supported: u32,
    },
    /// The runtime does not export `rbln_abi_current`, so its ABI cannot be checked.
    #[error("RBLN runtime {path} does not report its ABI (no symbol rbln_abi_current); set RBLN_SKIP_ABI_CHECK=1 to use it unchecked")]
    AbiUnknown { path: String },
}
