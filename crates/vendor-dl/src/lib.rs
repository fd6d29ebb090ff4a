//! The pieces of run-time library loading that rbln-sys and ascend-sys share: opening a
//! candidate (a path, a system name, or a copy already loaded in the process), the path
//! of the file the dynamic linker mapped, one lazily resolved slot per symbol, and the
//! record of each place a search tried.

use std::ffi::{CStr, OsStr};
use std::sync::OnceLock;

pub use libloading::os::unix::Library;

#[cfg(feature = "bindgen")]
pub use bindgen;

/// A test double cdylib for tests: the file the environment variable `var` names, else
/// `file` where `cargo build -p <package>` puts it for a test binary at `exe`
/// (`<target>/<profile>/deps/<test>` → `<target>/<profile>/<file>`). The error says how
/// to build it.
pub fn test_double_for(
    exe: &std::path::Path,
    package: &str,
    file: &str,
    var: &str,
) -> Result<std::path::PathBuf, String> {
    let path = match std::env::var_os(var) {
        Some(path) => std::path::PathBuf::from(path),
        None => exe
            .parent()
            .and_then(std::path::Path::parent)
            .ok_or_else(|| format!("{} is not in <target>/<profile>/deps", exe.display()))?
            .join(file),
    };
    if path.is_file() {
        return Ok(path);
    }
    Err(format!(
        "the {package} test double is not built at {}; run `cargo build -p {package}` with the \
         same target directory and profile first (scripts/test.sh does), or set {var}",
        path.display()
    ))
}

/// Writes a vendor status code as its name and number (`ACL_ERROR_X (100000)`), or, for a
/// code the declarations do not name, as `<unknown> <code>`.
pub fn write_status(
    f: &mut std::fmt::Formatter<'_>,
    name: Option<&str>,
    code: i32,
    unknown: &str,
) -> std::fmt::Result {
    match name {
        Some(name) => write!(f, "{name} ({code})"),
        None => write!(f, "{unknown} {code}"),
    }
}

/// A fixed environment for the search-order functions, which read variables through a
/// closure so tests can pass their own.
pub fn fixed_env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<std::ffi::OsString> {
    let vars: Vec<(String, std::ffi::OsString)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// One library that was tried while searching, and why it was not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub candidate: String,
    pub reason: String,
}

/// The attempts as an indented list, one per line, for error messages.
pub fn list_attempts(tried: &[Attempt]) -> String {
    tried
        .iter()
        .map(|a| format!("\n  {}: {}", a.candidate, a.reason))
        .collect()
}

/// One declared symbol: its name in the library and the declaration it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub name: &'static str,
    pub declaration: &'static str,
}

/// A function-pointer type as bindgen declares it (`Option<unsafe extern "C" fn(..)>`).
pub trait FnPtr: Copy {
    type Raw: Copy;
    fn into_raw(self) -> Option<Self::Raw>;
}

impl<F: Copy> FnPtr for Option<F> {
    type Raw = F;
    fn into_raw(self) -> Option<F> {
        self
    }
}

/// Declares a symbol table: a `Symbols` struct with one lazily resolved [`Slot`] per
/// function, the public list of [`Symbol`]s, and one accessor per function on `$owner`,
/// which must have a field `symbols: Symbols` and a method
/// `resolve::<T>(&self, &Slot<T>, name, call) -> Result<T::Raw, $error>`. Types and names
/// are looked up in the caller's `sys` module (bindgen's output).
#[macro_export]
macro_rules! lazy_symbols {
    (
        $(#[$doc:meta])* $list:ident for $owner:ty, error $error:ty;
        $($field:ident: $ty:ident = $name:ident, $call:literal;)*
    ) => {
        #[derive(Default)]
        struct Symbols {
            $($field: $crate::Slot<sys::$ty>,)*
        }

        $(#[$doc])*
        pub const $list: &[$crate::Symbol] = &[$($crate::Symbol {
            name: $crate::symbol_name(sys::$name),
            declaration: $call,
        }),*];

        impl $owner {
            $(fn $field(&self) -> Result<<sys::$ty as $crate::FnPtr>::Raw, $error> {
                self.resolve::<sys::$ty>(&self.symbols.$field, sys::$name, $call)
            })*
        }
    };
}

/// A lazily resolved symbol: the function pointer, or why it could not be resolved.
pub type Slot<T> = OnceLock<Result<<T as FnPtr>::Raw, String>>;

/// A symbol name constant (bindgen's `&[u8]` with a trailing NUL) as text.
pub const fn symbol_name(nul_terminated: &'static [u8]) -> &'static str {
    let (name, _nul) = nul_terminated.split_at(nul_terminated.len() - 1);
    match std::str::from_utf8(name) {
        Ok(name) => name,
        Err(_) => panic!("symbol names are ASCII"),
    }
}

/// Resolves `name` in `lib` once and remembers the result (a failure too).
///
/// # Safety
/// `T` is the function-pointer type the library's symbol `name` really has, and the
/// returned pointer is only called while `lib` is loaded.
pub unsafe fn resolve<T: FnPtr>(
    lib: &Library,
    slot: &Slot<T>,
    name: &'static [u8],
) -> Result<T::Raw, String> {
    slot.get_or_init(|| {
        // SAFETY: the caller guarantees `T` is the symbol's type; the pointer is copied
        // out and only called while `lib` lives.
        match unsafe { lib.get::<T>(name) } {
            Ok(symbol) => (*symbol)
                .into_raw()
                .ok_or_else(|| "the symbol's address is null".to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .clone()
}

/// Whether `lib` exports `name` (without a trailing NUL). Only probes; never calls.
pub fn has_symbol(lib: &Library, name: &str) -> bool {
    let name = [name.as_bytes(), b"\0"].concat();
    // SAFETY: probed for presence only; the address is never used.
    unsafe { lib.get::<*const u8>(&name) }.is_ok()
}

const FLAGS: i32 = libc::RTLD_NOW | libc::RTLD_LOCAL;

/// The copy of `soname` already loaded in this process, if any.
pub fn open_loaded(soname: &str) -> Option<Library> {
    // SAFETY: RTLD_NOLOAD maps nothing new: it returns a library that is already loaded
    // and initialized in this process, or fails.
    unsafe { Library::open(Some(soname), FLAGS | libc::RTLD_NOLOAD) }.ok()
}

/// Opens a file path, or a bare name through the dynamic linker's own search.
///
/// # Safety
/// Opening runs the library's initializers: `path` must name the vendor library the
/// caller means to load (one the user named, or one installed where that vendor puts it).
pub unsafe fn open(path: &OsStr) -> Result<Library, String> {
    // SAFETY: forwarded from the caller.
    unsafe { Library::open(Some(path), FLAGS) }.map_err(|e| e.to_string())
}

/// The path of the file the dynamic linker mapped for `lib`.
pub fn mapped_path(lib: Library) -> (Library, Option<String>) {
    let raw = lib.into_raw();
    let mut map: *mut libc::c_void = std::ptr::null_mut();
    // SAFETY: `raw` is a live dlopen handle; RTLD_DI_LINKMAP writes one
    // `struct link_map *` into `map`.
    let rc = unsafe {
        libc::dlinfo(
            raw,
            libc::RTLD_DI_LINKMAP,
            (&mut map as *mut *mut libc::c_void).cast(),
        )
    };
    let path = (rc == 0 && !map.is_null())
        .then(|| {
            // glibc <link.h>: struct link_map { ElfW(Addr) l_addr; char *l_name; ... }.
            // SAFETY: `map` points at the library's link_map, which lives as long as the
            // handle; its second field is the NUL-terminated path of the mapped file.
            let name = unsafe { *(map as *const *const libc::c_char).add(1) };
            // SAFETY: a non-null l_name is a NUL-terminated string owned by the linker.
            (!name.is_null()).then(|| unsafe { CStr::from_ptr(name) })
        })
        .flatten()
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| !name.is_empty());
    // SAFETY: `raw` came from `into_raw` above and is turned back into its only owner.
    (unsafe { Library::from_raw(raw) }, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libc_opens_maps_to_a_file_and_resolves_lazily() {
        // SAFETY: libc is already loaded in every Rust process on Linux.
        let lib = unsafe { open(OsStr::new("libc.so.6")) }.unwrap();
        let (lib, path) = mapped_path(lib);
        assert!(path.unwrap().contains("libc"));
        assert!(has_symbol(&lib, "strlen"));
        assert!(!has_symbol(&lib, "no_such_symbol_anywhere"));
        type Strlen = Option<unsafe extern "C" fn(*const libc::c_char) -> usize>;
        let slot: Slot<Strlen> = OnceLock::new();
        // SAFETY: strlen has exactly this C signature.
        let f = unsafe { resolve::<Strlen>(&lib, &slot, b"strlen\0") }.unwrap();
        // SAFETY: a NUL-terminated literal.
        assert_eq!(unsafe { f(c"four".as_ptr()) }, 4);
        let missing: Slot<Strlen> = OnceLock::new();
        // SAFETY: never called: the symbol does not exist.
        let err = unsafe { resolve::<Strlen>(&lib, &missing, b"no_such_fn\0") }.unwrap_err();
        assert!(err.contains("no_such_fn"), "{err}");
        assert!(open_loaded("libc.so.6").is_some());
        assert!(open_loaded("libnot-loaded-anywhere.so").is_none());
        assert_eq!(symbol_name(b"abc\0"), "abc");
    }
}

/// For a -sys crate's build script (its feature `bindgen`): runs bindgen on `header` as
/// `configure` sets it up, writes `$OUT_DIR/bindings.rs`, and copies it to the file named
/// by the environment variable `copy_to_env` when that is set (the bindings check script
/// compares that copy with the committed file). Integer macros become `u32` constants when
/// their name starts with one of `unsigned_prefixes` (sizes, markers), `i32` otherwise (the
/// C `int` of status codes and enum values).
#[cfg(feature = "bindgen")]
pub fn generate_bindings(
    header: &str,
    copy_to_env: &str,
    unsigned_prefixes: &'static [&'static str],
    configure: impl FnOnce(bindgen::Builder) -> bindgen::Builder,
) {
    use bindgen::callbacks::{IntKind, ParseCallbacks};

    #[derive(Debug)]
    struct MacroTypes(&'static [&'static str]);

    impl ParseCallbacks for MacroTypes {
        fn int_macro(&self, name: &str, _value: i64) -> Option<IntKind> {
            if self.0.iter().any(|prefix| name.starts_with(prefix)) {
                Some(IntKind::U32)
            } else {
                Some(IntKind::I32)
            }
        }
    }

    println!("cargo:rerun-if-changed={header}");
    println!("cargo:rerun-if-env-changed={copy_to_env}");
    let builder = bindgen::Builder::default()
        .header(header)
        .parse_callbacks(Box::new(MacroTypes(unsigned_prefixes)))
        .formatter(bindgen::Formatter::Prettyplease);
    let bindings = configure(builder)
        .generate()
        .unwrap_or_else(|e| panic!("bindgen failed on {header}: {e}"));
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let generated = out.join("bindings.rs");
    bindings
        .write_to_file(&generated)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", generated.display()));
    if let Some(copy) = std::env::var_os(copy_to_env) {
        std::fs::copy(&generated, &copy)
            .unwrap_or_else(|e| panic!("cannot copy bindings to {copy:?}: {e}"));
    }
}
