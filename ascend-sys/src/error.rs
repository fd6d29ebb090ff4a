//! Errors: a newtype over `aclError`, the error of an ACL call, the error of finding and
//! opening a library, and the error of asking for something this CANN cannot do.

use std::fmt;

pub use vendor_dl::Attempt;

use crate::sys;
use crate::version::CannVersion;

/// A status code an ACL call returned (`aclError`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AclStatus(pub sys::aclError);

impl AclStatus {
    /// `ACL_SUCCESS`.
    pub const SUCCESS: AclStatus = AclStatus(sys::ACL_SUCCESS);

    /// The code's name for the codes ascend-sys declares, `None` for others.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            sys::ACL_SUCCESS => "ACL_SUCCESS",
            sys::ACL_ERROR_INVALID_PARAM => "ACL_ERROR_INVALID_PARAM",
            sys::ACL_ERROR_BAD_ALLOC => "ACL_ERROR_BAD_ALLOC",
            sys::ACL_ERROR_API_NOT_SUPPORT => "ACL_ERROR_API_NOT_SUPPORT",
            sys::ACL_ERROR_INVALID_DEVICE => "ACL_ERROR_INVALID_DEVICE",
            sys::ACL_ERROR_FEATURE_UNSUPPORTED => "ACL_ERROR_FEATURE_UNSUPPORTED",
            sys::ACL_ERROR_INTERNAL_ERROR => "ACL_ERROR_INTERNAL_ERROR",
            sys::ACL_ERROR_FAILURE => "ACL_ERROR_FAILURE",
            sys::ACL_ERROR_RT_PARAM_INVALID => "ACL_ERROR_RT_PARAM_INVALID",
            sys::ACL_ERROR_RT_INVALID_DEVICEID => "ACL_ERROR_RT_INVALID_DEVICEID",
            sys::ACL_ERROR_RT_MEMORY_ALLOCATION => "ACL_ERROR_RT_MEMORY_ALLOCATION",
            sys::ACL_ERROR_RT_NO_DEVICE => "ACL_ERROR_RT_NO_DEVICE",
            sys::ACL_ERROR_RT_INTERNAL_ERROR => "ACL_ERROR_RT_INTERNAL_ERROR",
            sys::ACL_ERROR_RT_COPY_DATA => "ACL_ERROR_RT_COPY_DATA",
            _ => return None,
        })
    }
}

impl fmt::Display for AclStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        vendor_dl::write_status(f, self.name(), self.0, "aclError")
    }
}

/// An ACL call that failed or could not be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AclError {
    /// The runtime returned a status other than success; `message` is what
    /// `aclGetRecentErrMsg` said right after (empty when it said nothing).
    #[error("{call} returned {status}{}", detail(.message))]
    Status {
        /// The ACL function the call was for.
        call: &'static str,
        /// The status it returned.
        status: AclStatus,
        /// The runtime's or loader's own text.
        message: String,
    },
    /// The library does not export the symbol this call needs (an older or newer CANN).
    #[error("{call} is not available: symbol {symbol} is missing from {library}: {message}")]
    MissingSymbol {
        /// The ACL function the call was for.
        call: &'static str,
        /// The symbol the call needs.
        symbol: &'static str,
        /// The library (its soname, or the path it was loaded from).
        library: String,
        /// The runtime's or loader's own text.
        message: String,
    },
    /// The runtime handed back a value that cannot be right.
    #[error("{call} returned an invalid {what}: {value}")]
    InvalidValue {
        /// The ACL function the call was for.
        call: &'static str,
        /// What the value was meant to be.
        what: &'static str,
        /// The value, as text.
        value: String,
    },
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

impl AclError {
    /// The ACL function the failed call was for.
    pub fn call(&self) -> &'static str {
        match self {
            AclError::Status { call, .. }
            | AclError::MissingSymbol { call, .. }
            | AclError::InvalidValue { call, .. } => call,
        }
    }
}

/// A CANN library could not be found or opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// No candidate of the search order could be opened.
    #[error("{library} not found; install CANN and source its set_env.sh, or set {var} to the library's path. Tried:{}", vendor_dl::list_attempts(.tried))]
    NotFound {
        /// The library (its soname, or the path it was loaded from).
        library: &'static str,
        /// The variable that names the library's path explicitly.
        var: &'static str,
        /// Every place searched, with why it was not used.
        tried: Vec<Attempt>,
    },
    /// An explicitly named library could not be opened.
    #[error("cannot open {library} at {path}: {message}")]
    Open {
        /// The library (its soname, or the path it was loaded from).
        library: &'static str,
        /// The path that was named.
        path: String,
        /// The runtime's or loader's own text.
        message: String,
    },
}

/// Why something this crate could do is not possible with the CANN installed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unsupported {
    /// The installed CANN is older than the feature needs.
    #[error("{feature} needs CANN {needed} or newer, but this installation is CANN {found} (from {source_of_found})")]
    TooOld {
        /// What was asked for.
        feature: &'static str,
        /// The oldest CANN that has it.
        needed: CannVersion,
        /// The CANN installed.
        found: CannVersion,
        /// Where that version was read.
        source_of_found: String,
    },
    /// No version could be read, so a feature with a minimum version is refused.
    #[error("{feature} needs CANN {needed} or newer, but the installed CANN version could not be read ({why})")]
    VersionUnknown {
        /// What was asked for.
        feature: &'static str,
        /// The oldest CANN that has it.
        needed: CannVersion,
        /// Why no version could be read.
        why: String,
    },
    /// The library the feature lives in is not there.
    #[error("{feature} needs {library}: {reason}")]
    NoLibrary {
        /// What was asked for.
        feature: &'static str,
        /// The library (its soname, or the path it was loaded from).
        library: &'static str,
        /// Why the library is not usable.
        reason: String,
    },
    /// The library is there but lacks symbols the feature calls.
    #[error("{feature} needs {} from {library}, which does not export them", .symbols.join(", "))]
    MissingSymbols {
        /// What was asked for.
        feature: &'static str,
        /// The library (its soname, or the path it was loaded from).
        library: String,
        /// The symbols it lacks.
        symbols: Vec<&'static str>,
    },
}
