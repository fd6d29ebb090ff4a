//! Opening one CANN library through its search order.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use vendor_dl::{symbol_name, FnPtr, Library, Slot};

use crate::error::{AclError, Attempt, LoadError};
use crate::search::{search_order, Candidate, Lib};

/// Where a loaded library came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The candidate of the search order that opened.
    pub candidate: Candidate,
    /// The file actually mapped, as the dynamic linker reports it.
    pub path: String,
}

impl Origin {
    /// The install root the library's directory belongs to: `<root>/lib64/<lib>` or
    /// `<root>/<arch>-linux/lib64/<lib>` (the directory CANN's lib64 links to).
    pub fn install_roots(&self) -> Vec<PathBuf> {
        let lib_dir = Path::new(&self.path).parent();
        let root = lib_dir.and_then(Path::parent);
        root.into_iter()
            .chain(root.and_then(Path::parent))
            .map(Path::to_path_buf)
            .collect()
    }
}

/// An opened CANN library.
pub struct Loaded {
    pub(crate) lib: Library,
    /// Which CANN library this is.
    pub which: Lib,
    /// Where it was found.
    pub origin: Origin,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("which", &self.which)
            .field("origin", &self.origin)
            .finish()
    }
}

impl Loaded {
    /// Finds and opens `which` through its search order (see [`crate::search`]).
    pub fn load(which: Lib) -> Result<Loaded, LoadError> {
        Self::load_from(which, search_order(which, |name| std::env::var_os(name)))
    }

    /// Opens `which` from the file at `path` (or a bare name for the system search).
    pub fn open(which: Lib, path: impl AsRef<Path>) -> Result<Loaded, LoadError> {
        let candidate = Candidate::Explicit {
            path: path.as_ref().to_path_buf(),
            var: None,
        };
        Self::load_from(which, vec![candidate])
    }

    /// Tries `candidates` in order; an explicit candidate that fails ends the search.
    pub fn load_from(which: Lib, candidates: Vec<Candidate>) -> Result<Loaded, LoadError> {
        let mut tried = Vec::new();
        for candidate in candidates {
            let opened = match &candidate {
                Candidate::AlreadyLoaded(name) => {
                    vendor_dl::open_loaded(name).ok_or_else(|| "not loaded".to_string())
                }
                Candidate::Install { path, .. } if !path.is_file() => Err("no such file".into()),
                Candidate::Explicit { path, .. } | Candidate::Install { path, .. } => {
                    open(path.clone().into())
                }
                Candidate::System(name) => open(OsString::from(name)),
            };
            match opened {
                Ok(lib) => {
                    let (lib, path) = vendor_dl::mapped_path(lib);
                    let path = path.unwrap_or_else(|| candidate.to_string());
                    return Ok(Loaded {
                        lib,
                        which,
                        origin: Origin { candidate, path },
                    });
                }
                Err(message) => {
                    if let Candidate::Explicit { path, .. } = &candidate {
                        return Err(LoadError::Open {
                            library: which.soname(),
                            path: path.display().to_string(),
                            message,
                        });
                    }
                    tried.push(Attempt {
                        candidate: candidate.to_string(),
                        reason: message,
                    });
                }
            }
        }
        Err(LoadError::NotFound {
            library: which.soname(),
            var: which.override_var(),
            tried,
        })
    }

    /// Whether the library exports `symbol`. Only probes; never calls.
    pub fn has(&self, symbol: &str) -> bool {
        vendor_dl::has_symbol(&self.lib, symbol)
    }

    /// Resolves `name` (the C symbol `call` needs) once, remembering the result in `slot`.
    pub(crate) fn resolve<T: FnPtr>(
        &self,
        slot: &Slot<T>,
        name: &'static [u8],
        call: &'static str,
    ) -> Result<T::Raw, AclError> {
        // SAFETY: T is the function-pointer type wrapper.h declares for the C symbol
        // `name`, from its documented prototype. The pointer is only called while the
        // library is loaded: callers keep this Loaded alive as long as they call it.
        unsafe { vendor_dl::resolve::<T>(&self.lib, slot, name) }.map_err(|message| {
            AclError::MissingSymbol {
                call,
                symbol: symbol_name(name),
                library: self.origin.path.clone(),
                message,
            }
        })
    }

    /// Those of `symbols` the library does not export.
    pub fn missing(&self, symbols: &[&'static str]) -> Vec<&'static str> {
        symbols.iter().copied().filter(|s| !self.has(s)).collect()
    }
}

fn open(path: OsString) -> Result<Library, String> {
    // SAFETY: a library named by the user (an override variable or an explicit path),
    // installed in a CANN tree or found under its CANN name on the system path is
    // trusted to be that CANN library; loading it is the point.
    unsafe { vendor_dl::open(&path) }
}
