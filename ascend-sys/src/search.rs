//! Which CANN libraries kvrelay opens and where it looks for each, in order:
//!
//! 1. An explicit path in the library's override variable ([`Lib::override_var`], e.g.
//!    `KVRELAY_ASCENDCL_LIB`). When it is set nothing else is tried, and a library that
//!    fails to open there is an error (no silent fallback).
//! 2. A copy already loaded in this process (torch_npu mapped it), opened with
//!    `RTLD_NOLOAD`, so the process never holds two runtimes.
//! 3. `$ASCEND_HOME_PATH/lib64` (what CANN's `set_env.sh` exports).
//! 4. `/usr/local/Ascend/cann/lib64` (CANN 8.5 and newer), then
//!    `/usr/local/Ascend/ascend-toolkit/latest/lib64` (older installs).
//! 5. The bare name through the system search (`LD_LIBRARY_PATH`, `ld.so.cache`).
//!
//! CANN libraries need each other and the driver's: load them with CANN's environment
//! (`source <install>/set_env.sh`), which puts those directories on `LD_LIBRARY_PATH`.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

/// A CANN library kvrelay opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lib {
    /// The ACL runtime: devices, memory, streams, copies, versions.
    AscendCl,
    /// HCCL communicators and the one-sided calls (CANN 8.5 split them out of libhccl).
    Hcomm,
    /// HCCL operations (send/receive); before CANN 8.5 everything HCCL has.
    Hccl,
    /// HIXL, whose C client/server API the `hixl` channel uses.
    Hixl,
}

impl Lib {
    /// Every library, in the order reports list them.
    pub const ALL: [Lib; 4] = [Lib::AscendCl, Lib::Hcomm, Lib::Hccl, Lib::Hixl];

    /// The file name and SONAME.
    pub fn soname(self) -> &'static str {
        match self {
            Lib::AscendCl => "libascendcl.so",
            Lib::Hcomm => "libhcomm.so",
            Lib::Hccl => "libhccl.so",
            Lib::Hixl => "libcann_hixl.so",
        }
    }

    /// The environment variable that names the library's path explicitly.
    pub fn override_var(self) -> &'static str {
        match self {
            Lib::AscendCl => "KVRELAY_ASCENDCL_LIB",
            Lib::Hcomm => "KVRELAY_HCOMM_LIB",
            Lib::Hccl => "KVRELAY_HCCL_LIB",
            Lib::Hixl => "KVRELAY_HIXL_LIB",
        }
    }
}

impl fmt::Display for Lib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.soname())
    }
}

/// The CANN install roots tried after `$ASCEND_HOME_PATH`: 8.5 and newer, then older.
pub const DEFAULT_ROOTS: [&str; 2] = [
    "/usr/local/Ascend/cann",
    "/usr/local/Ascend/ascend-toolkit/latest",
];

/// One place a library may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Candidate {
    /// A path from the override variable (named), or one given to an `open` call.
    Explicit {
        /// The file.
        path: PathBuf,
        /// The variable it came from, if any.
        var: Option<&'static str>,
    },
    /// A library with this SONAME already loaded in the process.
    AlreadyLoaded(&'static str),
    /// A file in a CANN install tree (`from` says which root).
    Install {
        /// The file.
        path: PathBuf,
        /// The root it is under (`ASCEND_HOME_PATH` or a default root).
        from: &'static str,
    },
    /// A name for the dynamic linker's own search.
    System(&'static str),
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Candidate::Explicit {
                path,
                var: Some(var),
            } => write!(f, "{} ({var})", path.display()),
            Candidate::Explicit { path, var: None } => write!(f, "{}", path.display()),
            Candidate::AlreadyLoaded(name) => write!(f, "{name} already loaded in this process"),
            Candidate::Install { path, from } => write!(f, "{} ({from})", path.display()),
            Candidate::System(name) => write!(f, "{name} (system library path)"),
        }
    }
}

/// The candidates for `lib` in search order, reading the environment through `env` (so
/// tests can pass their own).
pub fn search_order(lib: Lib, env: impl Fn(&str) -> Option<OsString>) -> Vec<Candidate> {
    let var = lib.override_var();
    if let Some(path) = env(var).filter(|p| !p.is_empty()) {
        return vec![Candidate::Explicit {
            path: PathBuf::from(path),
            var: Some(var),
        }];
    }
    let mut order = vec![Candidate::AlreadyLoaded(lib.soname())];
    if let Some(home) = env("ASCEND_HOME_PATH").filter(|p| !p.is_empty()) {
        order.push(Candidate::Install {
            path: PathBuf::from(home).join("lib64").join(lib.soname()),
            from: "ASCEND_HOME_PATH",
        });
    }
    for (root, from) in DEFAULT_ROOTS
        .into_iter()
        .zip(["CANN 8.5+ default", "CANN < 8.5 default"])
    {
        order.push(Candidate::Install {
            path: PathBuf::from(root).join("lib64").join(lib.soname()),
            from,
        });
    }
    order.push(Candidate::System(lib.soname()));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    use vendor_dl::fixed_env as env;

    #[test]
    fn an_override_is_the_only_candidate_and_only_for_its_library() {
        let vars = env(&[
            ("KVRELAY_HCOMM_LIB", "/opt/x/libhcomm.so"),
            ("ASCEND_HOME_PATH", "/opt/cann"),
        ]);
        assert_eq!(
            search_order(Lib::Hcomm, &vars),
            [Candidate::Explicit {
                path: "/opt/x/libhcomm.so".into(),
                var: Some("KVRELAY_HCOMM_LIB")
            }]
        );
        assert_eq!(search_order(Lib::Hccl, &vars).len(), 5);
    }

    #[test]
    fn default_order_is_loaded_home_new_root_old_root_system() {
        let order = search_order(
            Lib::AscendCl,
            env(&[
                ("ASCEND_HOME_PATH", "/opt/cann"),
                ("KVRELAY_ASCENDCL_LIB", ""),
            ]),
        );
        let texts: Vec<String> = order.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            texts,
            [
                "libascendcl.so already loaded in this process",
                "/opt/cann/lib64/libascendcl.so (ASCEND_HOME_PATH)",
                "/usr/local/Ascend/cann/lib64/libascendcl.so (CANN 8.5+ default)",
                "/usr/local/Ascend/ascend-toolkit/latest/lib64/libascendcl.so (CANN < 8.5 default)",
                "libascendcl.so (system library path)",
            ]
        );
        // Without ASCEND_HOME_PATH the default roots follow the loaded copy.
        let order = search_order(Lib::Hixl, env(&[]));
        assert_eq!(order.len(), 4);
        assert_eq!(order[3], Candidate::System("libcann_hixl.so"));
    }
}
