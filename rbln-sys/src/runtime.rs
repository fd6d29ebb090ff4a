//! The loaded library: opening it (search order, ABI check), resolving each symbol lazily
//! on its first call, and the checked calls (`result` layer) that turn status codes into
//! [`RblnError`]s.

use std::ffi::OsString;
use std::path::Path;
use std::sync::{Arc, OnceLock};

pub use vendor_dl::Symbol;
use vendor_dl::{mapped_path, symbol_name, FnPtr, Library, Slot};

use crate::error::{Attempt, LoadError, RblnError, RblnStatus};
use crate::search::{search_order, Candidate};
use crate::sys;

/// What to do with the runtime's ABI report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbiCheck {
    /// Require `rbln_abi_current` and `rbln_abi_min_supported() <= BUILT_ABI <= current`.
    Strict,
    /// Accept any runtime (what `RBLN_SKIP_ABI_CHECK=1` selects).
    Skip,
}

impl AbiCheck {
    /// `Skip` when `RBLN_SKIP_ABI_CHECK=1`, else `Strict`.
    pub fn from_env() -> Self {
        if std::env::var_os("RBLN_SKIP_ABI_CHECK").is_some_and(|v| v == "1") {
            AbiCheck::Skip
        } else {
            AbiCheck::Strict
        }
    }
}

/// The ABI number these declarations were written for (rebel-compiler / torch-rbln 0.12).
pub const BUILT_ABI: u32 = sys::RBLN_SYS_BUILT_ABI;

/// The ABI range a runtime reports; `None` where it does not export the query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abi {
    pub current: Option<u32>,
    pub min_supported: Option<u32>,
}

impl Abi {
    /// Whether a runtime reporting this range implements [`BUILT_ABI`]. A runtime without
    /// `rbln_abi_min_supported` implements only its current ABI.
    pub fn supports_built(&self) -> Option<bool> {
        let current = self.current?;
        let min = self.min_supported.unwrap_or(current);
        Some(min <= BUILT_ABI && BUILT_ABI <= current)
    }
}

vendor_dl::lazy_symbols! {
    /// Every symbol rbln-sys binds, in the order of `wrapper.h`.
    SYMBOLS for Runtime, error RblnError;
    abi_current_fn: rbln_abi_current_fn = RBLN_SYM_ABI_CURRENT, "rbln_abi_current";
    abi_min_supported_fn: rbln_abi_min_supported_fn =
        RBLN_SYM_ABI_MIN_SUPPORTED, "rbln_abi_min_supported";
    get_device_count_fn: rbln_get_device_count_fn =
        RBLN_SYM_GET_DEVICE_COUNT, "rbln_get_device_count";
    malloc_eager_fn: rbln_malloc_eager_fn = RBLN_SYM_MALLOC_EAGER, "rbln::rbln_malloc_eager";
    malloc_lazy_fn: rbln_malloc_lazy_fn = RBLN_SYM_MALLOC_LAZY, "rbln::rbln_malloc_lazy";
    free_fn: rbln_free_fn = RBLN_SYM_FREE, "rbln::rbln_free";
    memcpy_h2v_fn: rbln_memcpy_h2v_fn = RBLN_SYM_MEMCPY_H2V, "rbln::rbln_memcpy_h2v";
    memcpy_v2h_fn: rbln_memcpy_v2h_fn = RBLN_SYM_MEMCPY_V2H, "rbln::rbln_memcpy_v2h";
    memcpy_v2v_fn: rbln_memcpy_v2v_fn = RBLN_SYM_MEMCPY_V2V, "rbln::rbln_memcpy_v2v";
    memcpy_h2v_async_fn: rbln_memcpy_h2v_async_fn =
        RBLN_SYM_MEMCPY_H2V_ASYNC, "rbln::rbln_memcpy_h2v_async";
    memcpy_v2h_async_fn: rbln_memcpy_v2h_async_fn =
        RBLN_SYM_MEMCPY_V2H_ASYNC, "rbln::rbln_memcpy_v2h_async";
    memcpy_v2v_async_fn: rbln_memcpy_v2v_async_fn =
        RBLN_SYM_MEMCPY_V2V_ASYNC, "rbln::rbln_memcpy_v2v_async";
    device_synchronize_fn: rbln_device_synchronize_fn =
        RBLN_SYM_DEVICE_SYNCHRONIZE, "rbln::rbln_device_synchronize";
    device_of_fn: rbln_get_torch_device_id_from_vaddr_fn =
        RBLN_SYM_GET_DEVICE_ID_FROM_VADDR, "rbln::rbln_get_torch_device_id_from_vaddr";
}

/// The name of the marker symbol the `rbln-emu` test double exports, so figures measured
/// on it can say they are emulated. No real runtime exports it.
pub const TEST_DOUBLE_MARKER: &[u8] = b"rbln_emu_test_double\0";

/// Where a loaded library came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The candidate of the search order that opened.
    pub candidate: Candidate,
    /// The file actually mapped, as the dynamic linker reports it.
    pub path: String,
}

/// An opened RBLN runtime library. Symbols resolve on first use; a missing one is an
/// [`RblnError::MissingSymbol`] from the call that needs it.
pub struct Runtime {
    lib: Library,
    origin: Origin,
    abi: Abi,
    test_double: bool,
    symbols: Symbols,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("origin", &self.origin)
            .field("abi", &self.abi)
            .field("test_double", &self.test_double)
            .finish()
    }
}

/// A started async copy. The runtime returns handle 0 when it copied synchronously
/// instead (memory not yet materialized on the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyHandle(pub u64);

impl CopyHandle {
    /// True when the runtime finished the copy before returning.
    pub fn completed_synchronously(self) -> bool {
        self.0 == 0
    }
}

/// How device memory is allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocKind {
    /// `rbln_malloc_eager`: device memory now; async copies are truly async.
    Eager,
    /// `rbln_malloc_lazy`: device memory on first device use; until then async copies
    /// complete synchronously (handle 0).
    Lazy,
}

impl Runtime {
    /// Finds and opens the runtime through the documented search order (see
    /// [`crate::search`]), checking its ABI as `RBLN_SKIP_ABI_CHECK` says.
    pub fn load() -> Result<Runtime, LoadError> {
        Self::load_from(
            search_order(|name| std::env::var_os(name)),
            AbiCheck::from_env(),
        )
    }

    /// The process-wide runtime, loaded once by [`Runtime::load`] on first use. A failure
    /// is cached too: the environment that decides the search is read once.
    pub fn global() -> Result<Arc<Runtime>, LoadError> {
        static GLOBAL: OnceLock<Result<Arc<Runtime>, LoadError>> = OnceLock::new();
        GLOBAL.get_or_init(|| Self::load().map(Arc::new)).clone()
    }

    /// Opens the library at `path` (a file path, or a bare name for the system search).
    pub fn open(path: impl AsRef<Path>, abi: AbiCheck) -> Result<Runtime, LoadError> {
        let candidate = Candidate::Explicit(path.as_ref().to_path_buf());
        Self::load_from(vec![candidate], abi)
    }

    /// Tries `candidates` in order; an explicit candidate that fails ends the search.
    pub fn load_from(candidates: Vec<Candidate>, abi: AbiCheck) -> Result<Runtime, LoadError> {
        let mut tried = Vec::new();
        for candidate in candidates {
            match open_candidate(&candidate) {
                Ok(Some(lib)) => return Self::accept(lib, candidate, abi),
                Ok(None) => tried.push(Attempt {
                    candidate: candidate.to_string(),
                    reason: "not loaded".into(),
                }),
                Err(message) => {
                    if let Candidate::Explicit(path) = &candidate {
                        return Err(LoadError::Open {
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
        Err(LoadError::NotFound { tried })
    }

    fn accept(lib: Library, candidate: Candidate, check: AbiCheck) -> Result<Runtime, LoadError> {
        let (lib, path) = mapped_path(lib);
        let path = path.unwrap_or_else(|| candidate.to_string());
        // SAFETY: a marker is only probed for presence, never read or called.
        let test_double = unsafe { lib.get::<*const u8>(TEST_DOUBLE_MARKER) }.is_ok();
        let mut runtime = Runtime {
            lib,
            origin: Origin { candidate, path },
            abi: Abi {
                current: None,
                min_supported: None,
            },
            test_double,
            symbols: Symbols::default(),
        };
        runtime.abi = Abi {
            current: runtime.abi_current().ok(),
            min_supported: runtime.abi_min_supported().ok(),
        };
        if check == AbiCheck::Strict {
            let path = runtime.origin.path.clone();
            match (runtime.abi.supports_built(), runtime.abi.current) {
                (None, _) | (_, None) => return Err(LoadError::AbiUnknown { path }),
                (Some(false), Some(current)) => {
                    return Err(LoadError::AbiMismatch {
                        path,
                        built: BUILT_ABI,
                        current,
                        min_supported: runtime.abi.min_supported.unwrap_or(current),
                    })
                }
                (Some(true), Some(_)) => {}
            }
        }
        Ok(runtime)
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The ABI range the runtime reported when it was opened.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// True for the `rbln-emu` test double: figures measured on it are emulated.
    pub fn is_test_double(&self) -> bool {
        self.test_double
    }

    /// The bound symbols this library does not export (empty for a complete runtime).
    pub fn missing_symbols(&self) -> Vec<Symbol> {
        SYMBOLS
            .iter()
            .copied()
            .filter(|s| !vendor_dl::has_symbol(&self.lib, s.name))
            .collect()
    }

    fn resolve<T: FnPtr>(
        &self,
        slot: &Slot<T>,
        name: &'static [u8],
        call: &'static str,
    ) -> Result<T::Raw, RblnError> {
        // SAFETY: T is the function-pointer type wrapper.h declares for the symbol
        // `name`, written from its mangled name (parameter types) and documented usage
        // (return type). The pointer is only called while `self.lib` is alive, since both
        // live in this Runtime.
        unsafe { vendor_dl::resolve::<T>(&self.lib, slot, name) }.map_err(|message| {
            RblnError::MissingSymbol {
                call,
                symbol: symbol_name(name),
                library: self.origin.path.clone(),
                message,
            }
        })
    }

    // ---- checked calls (the `result` layer) ------------------------------------------

    fn abi_current(&self) -> Result<u32, RblnError> {
        let f = self.abi_current_fn()?;
        // SAFETY: takes no arguments and returns a number.
        Ok(unsafe { f() })
    }

    fn abi_min_supported(&self) -> Result<u32, RblnError> {
        let f = self.abi_min_supported_fn()?;
        // SAFETY: takes no arguments and returns a number.
        Ok(unsafe { f() })
    }

    /// The number of physical RBLN devices.
    pub fn device_count(&self) -> Result<u32, RblnError> {
        let call = "rbln_get_device_count";
        let f = self.get_device_count_fn()?;
        let mut count = 0i32;
        // SAFETY: `count` is a valid, writable int for the duration of the call.
        RblnStatus(unsafe { f(&mut count) }).result(call)?;
        u32::try_from(count).map_err(|_| RblnError::InvalidValue {
            call,
            what: "device count",
            value: count.into(),
        })
    }

    /// Allocates `size` bytes of device memory on `device` and returns its virtual address.
    /// The caller frees it with [`Runtime::free`]; [`crate::DeviceMemory`] does that itself.
    pub fn malloc(&self, device: u32, size: u64, kind: AllocKind) -> Result<u64, RblnError> {
        let (f, call) = match kind {
            AllocKind::Eager => (self.malloc_eager_fn()?, "rbln::rbln_malloc_eager"),
            AllocKind::Lazy => (self.malloc_lazy_fn()?, "rbln::rbln_malloc_lazy"),
        };
        let mut vaddr = 0u64;
        // SAFETY: `vaddr` is a valid, writable u64 (the C++ reference) during the call.
        RblnStatus(unsafe { f(device, size, &mut vaddr) }).result(call)?;
        Ok(vaddr)
    }

    /// Frees device memory.
    ///
    /// # Safety
    /// `vaddr` came from [`Runtime::malloc`] on this runtime, is freed once, and no copy
    /// that uses it is pending.
    pub unsafe fn free(&self, vaddr: u64) -> Result<(), RblnError> {
        let f = self.free_fn()?;
        // SAFETY: the caller guarantees `vaddr` is a live allocation no copy uses.
        RblnStatus(unsafe { f(vaddr) }).result("rbln::rbln_free")
    }

    /// Synchronous host-to-device copy of `len` bytes.
    ///
    /// # Safety
    /// `src` is readable for `len` bytes; `dst..dst + len` is device memory of this runtime
    /// that nothing else uses during the copy.
    pub unsafe fn memcpy_h2v(&self, src: *const u8, dst: u64, len: usize) -> Result<(), RblnError> {
        let f = self.memcpy_h2v_fn()?;
        // SAFETY: forwarded from the caller; usize -> u64 is lossless on 64-bit targets.
        RblnStatus(unsafe { f(src as u64, dst, len as u64) }).result("rbln::rbln_memcpy_h2v")
    }

    /// Synchronous device-to-host copy of `len` bytes.
    ///
    /// # Safety
    /// `dst` is writable for `len` bytes and not otherwise accessed during the copy;
    /// `src..src + len` is device memory of this runtime.
    pub unsafe fn memcpy_v2h(&self, src: u64, dst: *mut u8, len: usize) -> Result<(), RblnError> {
        let f = self.memcpy_v2h_fn()?;
        // SAFETY: forwarded from the caller.
        RblnStatus(unsafe { f(src, dst as u64, len as u64) }).result("rbln::rbln_memcpy_v2h")
    }

    /// Synchronous device-to-device copy on one device.
    ///
    /// # Safety
    /// Both ranges are device memory of this runtime on the same device, not overlapping,
    /// and the destination is not otherwise used during the copy.
    pub unsafe fn memcpy_v2v(&self, src: u64, dst: u64, len: usize) -> Result<(), RblnError> {
        let f = self.memcpy_v2v_fn()?;
        // SAFETY: forwarded from the caller.
        RblnStatus(unsafe { f(src, dst, len as u64) }).result("rbln::rbln_memcpy_v2v")
    }

    /// Starts a host-to-device copy; it has landed after [`Runtime::device_synchronize`].
    ///
    /// # Safety
    /// As [`Runtime::memcpy_h2v`], and both ranges stay valid and untouched until the
    /// device is synchronized.
    pub unsafe fn memcpy_h2v_async(
        &self,
        src: *const u8,
        dst: u64,
        len: usize,
    ) -> Result<CopyHandle, RblnError> {
        let f = self.memcpy_h2v_async_fn()?;
        let mut handle = 0u64;
        // SAFETY: forwarded from the caller; `handle` is writable during the call.
        let status = unsafe { f(src as u64, dst, len as u64, &mut handle) };
        RblnStatus(status).result("rbln::rbln_memcpy_h2v_async")?;
        Ok(CopyHandle(handle))
    }

    /// Starts a device-to-host copy; the host bytes are valid only after
    /// [`Runtime::device_synchronize`].
    ///
    /// # Safety
    /// As [`Runtime::memcpy_v2h`], and both ranges stay valid and untouched until the
    /// device is synchronized.
    pub unsafe fn memcpy_v2h_async(
        &self,
        src: u64,
        dst: *mut u8,
        len: usize,
    ) -> Result<CopyHandle, RblnError> {
        let f = self.memcpy_v2h_async_fn()?;
        let mut handle = 0u64;
        // SAFETY: forwarded from the caller; `handle` is writable during the call.
        let status = unsafe { f(src, dst as u64, len as u64, &mut handle) };
        RblnStatus(status).result("rbln::rbln_memcpy_v2h_async")?;
        Ok(CopyHandle(handle))
    }

    /// Starts a device-to-device copy on one device.
    ///
    /// # Safety
    /// As [`Runtime::memcpy_v2v`], until the device is synchronized.
    pub unsafe fn memcpy_v2v_async(
        &self,
        src: u64,
        dst: u64,
        len: usize,
    ) -> Result<CopyHandle, RblnError> {
        let f = self.memcpy_v2v_async_fn()?;
        let mut handle = 0u64;
        // SAFETY: forwarded from the caller; `handle` is writable during the call.
        let status = unsafe { f(src, dst, len as u64, &mut handle) };
        RblnStatus(status).result("rbln::rbln_memcpy_v2v_async")?;
        Ok(CopyHandle(handle))
    }

    /// Waits until every pending async copy on `device` has landed.
    pub fn device_synchronize(&self, device: u32) -> Result<(), RblnError> {
        let f = self.device_synchronize_fn()?;
        // SAFETY: takes a device number; an unknown one is an error status.
        RblnStatus(unsafe { f(device) }).result("rbln::rbln_device_synchronize")
    }

    /// The device that owns the allocation containing `vaddr`.
    pub fn device_of(&self, vaddr: u64) -> Result<u32, RblnError> {
        let f = self.device_of_fn()?;
        let mut device = 0u32;
        // SAFETY: `device` is a valid, writable u32 (the C++ reference) during the call;
        // an unknown vaddr is an error status.
        RblnStatus(unsafe { f(vaddr, &mut device) })
            .result("rbln::rbln_get_torch_device_id_from_vaddr")?;
        Ok(device)
    }
}

/// Opens one candidate: `Ok(None)` when an already-loaded library is not loaded.
fn open_candidate(candidate: &Candidate) -> Result<Option<Library>, String> {
    let path: OsString = match candidate {
        Candidate::Explicit(path) => path.clone().into(),
        Candidate::AlreadyLoaded(name) => return Ok(vendor_dl::open_loaded(name)),
        Candidate::RebelPackage(path) if !path.is_file() => return Err("no such file".into()),
        Candidate::RebelPackage(path) => path.clone().into(),
        Candidate::System(name) => OsString::from(name),
    };
    // SAFETY: a library named by the user (RBLN_RUNTIME_LIB), installed in a rebel
    // package or named librbln.so on the system path is trusted to be the RBLN runtime;
    // loading it is the point.
    unsafe { vendor_dl::open(&path) }.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_typed_error_naming_it() {
        let err = Runtime::open("/nonexistent/librbln.so", AbiCheck::Strict).unwrap_err();
        match &err {
            LoadError::Open { path, message } => {
                assert_eq!(path, "/nonexistent/librbln.so");
                assert!(message.contains("No such file"), "{message}");
            }
            other => panic!("expected Open, got {other:?}"),
        }
        // Without an explicit path every candidate is listed with its reason.
        let candidates = vec![
            Candidate::AlreadyLoaded("librbln-not-loaded.so"),
            Candidate::RebelPackage("/nonexistent/tvm/librbln.so".into()),
            Candidate::System("librbln-not-installed.so"),
        ];
        let err = Runtime::load_from(candidates, AbiCheck::Strict).unwrap_err();
        let LoadError::NotFound { tried } = &err else {
            panic!("expected NotFound, got {err:?}");
        };
        assert_eq!(tried.len(), 3);
        assert_eq!(tried[1].reason, "no such file");
        let text = err.to_string();
        assert!(text.contains("RBLN_RUNTIME_LIB"), "{text}");
        assert!(
            text.contains("/nonexistent/tvm/librbln.so (rebel package)"),
            "{text}"
        );
    }

    /// libc stands in for a runtime that lacks symbols: it opens, and each call reports
    /// the symbol it needs.
    #[test]
    fn a_missing_symbol_is_an_error_at_the_call_not_at_load() {
        let err = Runtime::open("libc.so.6", AbiCheck::Strict).unwrap_err();
        assert!(matches!(err, LoadError::AbiUnknown { .. }), "{err:?}");
        assert!(err.to_string().contains("RBLN_SKIP_ABI_CHECK"));

        let rt = Runtime::open("libc.so.6", AbiCheck::Skip).unwrap();
        assert!(rt.origin().path.contains("libc"), "{:?}", rt.origin());
        assert_eq!(
            rt.abi(),
            Abi {
                current: None,
                min_supported: None
            }
        );
        assert!(!rt.is_test_double());
        assert_eq!(rt.missing_symbols(), SYMBOLS);
        let err = rt.device_synchronize(0).unwrap_err();
        match &err {
            RblnError::MissingSymbol { call, symbol, .. } => {
                assert_eq!(*call, "rbln::rbln_device_synchronize");
                assert_eq!(*symbol, "_ZN4rbln23rbln_device_synchronizeEj");
            }
            other => panic!("expected MissingSymbol, got {other:?}"),
        }
        // The failed lookup is remembered, and reported again the same way.
        assert_eq!(rt.device_synchronize(0).unwrap_err(), err);
        assert!(matches!(
            rt.device_count(),
            Err(RblnError::MissingSymbol {
                symbol: "rbln_get_device_count",
                ..
            })
        ));
    }

    #[test]
    fn abi_ranges_must_include_the_built_abi() {
        let abi = |current, min_supported| Abi {
            current,
            min_supported,
        };
        assert_eq!(abi(Some(6), Some(6)).supports_built(), Some(true));
        assert_eq!(abi(Some(8), Some(5)).supports_built(), Some(true));
        assert_eq!(abi(Some(6), None).supports_built(), Some(true));
        assert_eq!(abi(Some(5), Some(1)).supports_built(), Some(false));
        assert_eq!(abi(Some(7), Some(7)).supports_built(), Some(false));
        assert_eq!(abi(Some(7), None).supports_built(), Some(false));
        assert_eq!(abi(None, Some(6)).supports_built(), None);
    }

    #[test]
    fn mangled_names_encode_their_declarations() {
        assert_eq!(SYMBOLS.len(), 14);
        for s in SYMBOLS {
            assert!(!s.name.ends_with('\0'));
            // C++ functions in namespace rbln carry their mangled name; C ones do not.
            let short = s.declaration.trim_start_matches("rbln::");
            if s.declaration.starts_with("rbln::") {
                assert!(
                    s.name
                        .starts_with(&format!("_ZN4rbln{}{short}E", short.len())),
                    "{s:?}"
                );
            } else {
                assert_eq!(s.name, s.declaration);
            }
        }
    }

    #[test]
    fn status_codes_name_themselves() {
        assert_eq!(RblnStatus::SUCCESS.result("x"), Ok(()));
        let err = RblnStatus::INVALID.result("rbln::rbln_free").unwrap_err();
        assert_eq!(
            err.to_string(),
            "rbln::rbln_free returned RBLNRetCode_INVALID (2)"
        );
        assert_eq!(RblnStatus(-3).to_string(), "unknown RBLNRetCode -3");
    }
}
