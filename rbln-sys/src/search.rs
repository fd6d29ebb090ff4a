//! Where the runtime library is looked for, in order:
//!
//! 1. `RBLN_RUNTIME_LIB`: an explicit path. When it is set, nothing else is tried, and a
//!    library that fails to open there is an error (no silent fallback).
//! 2. A `librbln.so` already loaded in this process (torch-rbln or rebel mapped it), opened
//!    with `RTLD_NOLOAD`, so the process never holds two runtimes with two allocators.
//! 3. The rebel package directory: `librbln.so` and `tvm/librbln.so` under `REBEL_HOME`,
//!    then `tvm/librbln.so` in the Python package directories of `VIRTUAL_ENV`,
//!    `CONDA_PREFIX`, each `PYTHONPATH` entry, `~/.local/lib/python3.*/site-packages`,
//!    `/usr/local/lib/python3.*/{site,dist}-packages` and `/usr/lib/python3/dist-packages`
//!    (the rebel-compiler wheel installs `librbln.so` in `site-packages/tvm/`).
//! 4. `librbln.so` through the system search (`LD_LIBRARY_PATH`, `ld.so.cache`, `/usr/lib`).
//!
//! Only the `librbln.so` runtime (rebel-compiler <= 0.12, ABI 6) is supported; the newer
//! `librbln_rt.so` has a different, C++ class API.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

/// The library's file name and SONAME.
pub const LIBRARY_NAME: &str = "librbln.so";

/// The `rbln-emu` test double for tests: the file `RBLN_EMU_LIB` names, else where
/// `cargo build -p rbln-emu` puts it for a test binary at `exe`. The error says how to
/// build it.
pub fn test_double_for(exe: &Path) -> Result<PathBuf, String> {
    vendor_dl::test_double_for(exe, "rbln-emu", "librbln_emu.so", "RBLN_EMU_LIB")
}

/// One place the library may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Candidate {
    /// The path in `RBLN_RUNTIME_LIB`, or one given to `Runtime::open`.
    Explicit(PathBuf),
    /// A library with this SONAME already loaded in the process.
    AlreadyLoaded(&'static str),
    /// A file in a rebel package directory.
    RebelPackage(PathBuf),
    /// A name for the dynamic linker's own search.
    System(&'static str),
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Candidate::Explicit(p) => write!(f, "{} (RBLN_RUNTIME_LIB)", p.display()),
            Candidate::AlreadyLoaded(name) => write!(f, "{name} already loaded in this process"),
            Candidate::RebelPackage(p) => write!(f, "{} (rebel package)", p.display()),
            Candidate::System(name) => write!(f, "{name} (system library path)"),
        }
    }
}

/// The candidates in search order, reading the environment through `env` (so tests can
/// pass their own).
pub fn search_order(env: impl Fn(&str) -> Option<OsString>) -> Vec<Candidate> {
    if let Some(path) = env("RBLN_RUNTIME_LIB").filter(|p| !p.is_empty()) {
        return vec![Candidate::Explicit(PathBuf::from(path))];
    }
    let mut order = vec![Candidate::AlreadyLoaded(LIBRARY_NAME)];
    if let Some(home) = env("REBEL_HOME").filter(|p| !p.is_empty()) {
        let home = PathBuf::from(home);
        order.push(Candidate::RebelPackage(home.join(LIBRARY_NAME)));
        order.push(Candidate::RebelPackage(home.join("tvm").join(LIBRARY_NAME)));
    }
    let mut package_dirs = Vec::new();
    for prefix in ["VIRTUAL_ENV", "CONDA_PREFIX"].into_iter().filter_map(&env) {
        package_dirs.extend(python_dirs(
            &Path::new(&prefix).join("lib"),
            "site-packages",
        ));
    }
    if let Some(paths) = env("PYTHONPATH") {
        package_dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(home) = env("HOME") {
        let local = Path::new(&home).join(".local").join("lib");
        package_dirs.extend(python_dirs(&local, "site-packages"));
    }
    let usr_local = Path::new("/usr/local/lib");
    package_dirs.extend(python_dirs(usr_local, "site-packages"));
    package_dirs.extend(python_dirs(usr_local, "dist-packages"));
    package_dirs.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    for dir in package_dirs {
        let candidate = Candidate::RebelPackage(dir.join("tvm").join(LIBRARY_NAME));
        if !order.contains(&candidate) {
            order.push(candidate);
        }
    }
    order.push(Candidate::System(LIBRARY_NAME));
    order
}

/// `lib/python3.*/<leaf>` directories under `lib`, newest Python first.
fn python_dirs(lib: &Path, leaf: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(lib) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join(leaf))
        .collect();
    dirs.sort();
    dirs.reverse();
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    use vendor_dl::fixed_env as env;

    #[test]
    fn an_explicit_path_is_the_only_candidate() {
        let order = search_order(env(&[
            ("RBLN_RUNTIME_LIB", "/opt/x/librbln.so"),
            ("REBEL_HOME", "/opt/rebel"),
        ]));
        assert_eq!(
            order,
            [Candidate::Explicit(PathBuf::from("/opt/x/librbln.so"))]
        );
    }

    #[test]
    fn default_order_is_loaded_then_rebel_packages_then_system() {
        let dir = tempfile::tempdir().unwrap();
        let venv = dir.path();
        std::fs::create_dir_all(venv.join("lib/python3.11/site-packages")).unwrap();
        std::fs::create_dir_all(venv.join("lib/python3.12/site-packages")).unwrap();
        let order = search_order(env(&[
            ("REBEL_HOME", "/opt/rebel"),
            ("VIRTUAL_ENV", venv.to_str().unwrap()),
            ("PYTHONPATH", "/p1::/p2"),
            ("RBLN_RUNTIME_LIB", ""),
        ]));
        let pkg = |p: PathBuf| Candidate::RebelPackage(p);
        assert_eq!(order[0], Candidate::AlreadyLoaded("librbln.so"));
        assert_eq!(order[1], pkg("/opt/rebel/librbln.so".into()));
        assert_eq!(order[2], pkg("/opt/rebel/tvm/librbln.so".into()));
        assert_eq!(
            order[3],
            pkg(venv.join("lib/python3.12/site-packages/tvm/librbln.so"))
        );
        assert_eq!(
            order[4],
            pkg(venv.join("lib/python3.11/site-packages/tvm/librbln.so"))
        );
        assert_eq!(order[5], pkg("/p1/tvm/librbln.so".into()));
        assert_eq!(order[6], pkg("/p2/tvm/librbln.so".into()));
        assert!(order.contains(&pkg("/usr/lib/python3/dist-packages/tvm/librbln.so".into())));
        assert_eq!(order.last(), Some(&Candidate::System("librbln.so")));
    }
}
