//! What this CANN installation can do, found without calling anything optional: which
//! libraries open, which symbols they export, and the versions the runtime reports.
//! Higher layers choose their copy path and PD channel from this, and refuse impossible
//! configurations with its [`Unsupported`] errors (which name the version found and the
//! version needed).

use crate::acl::{Acl, VERSION_PACKAGES};
use crate::error::Unsupported;
use crate::hccl::{
    HCCL_TWO_SIDED_MIN, HCOMM_SPLIT, HIXL_C_API_LAYOUT, HIXL_SYMBOLS, HIXL_SYNC_SYMBOLS,
    ONE_SIDED_SYMBOLS, TWO_SIDED_SYMBOLS,
};
use crate::library::Loaded;
use crate::search::Lib;
use crate::sys;
use crate::version::{CannVersion, FoundVersion};

/// `aclrtMemcpyBatchAsync` is used from CANN 8.5, as vllm-ascend does (earlier packages
/// that export it call it experimental).
pub const BATCH_COPY: CannVersion = CannVersion::release(8, 5, 0);

/// The oldest CANN whose ACL calls kvrelay's device uses as declared here.
pub const MIN_RUNTIME: CannVersion = CannVersion::release(8, 0, 0);

/// One feature: usable (with the library that provides it) or why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feature {
    /// What it is, as error messages name it.
    pub name: &'static str,
    /// The oldest CANN it works with, if it has a minimum.
    pub needs: Option<CannVersion>,
    /// The path of the library that provides it, or why it is unusable.
    pub status: Result<String, Unsupported>,
}

impl Feature {
    /// Whether this installation provides it.
    pub fn usable(&self) -> bool {
        self.status.is_ok()
    }

    /// The providing library's path, or the reason it cannot be used.
    pub fn require(&self) -> Result<&str, Unsupported> {
        self.status.as_deref().map_err(Clone::clone)
    }
}

/// A package version, or why it could not be read.
pub type VersionResult = Result<FoundVersion, String>;

/// What a device needs to know to copy: the versions, whether the runtime is new enough,
/// and whether batch copies can be used. Probes only the ACL library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyCapabilities {
    /// `runtime`, `hccl` and `driver` versions, in [`VERSION_PACKAGES`] order.
    pub versions: Vec<(&'static str, VersionResult)>,
    /// The ACL runtime itself, at this version.
    pub runtime: Feature,
    /// One `aclrtMemcpyBatchAsync` per plan instead of one `aclrtMemcpyAsync` per run.
    pub batch_copy: Feature,
}

impl CopyCapabilities {
    /// Reads the versions and probes the ACL library `acl` (nothing is called but the
    /// version queries).
    pub fn probe(acl: &Acl) -> CopyCapabilities {
        let versions: Vec<(&'static str, VersionResult)> = VERSION_PACKAGES
            .iter()
            .map(|&pkg| (pkg, acl.version(pkg)))
            .collect();
        let runtime_version = &versions[0].1;
        let acl_path = acl.origin().path.clone();
        let runtime = Feature {
            name: "the ACL runtime",
            needs: Some(MIN_RUNTIME),
            status: gate("the ACL runtime", MIN_RUNTIME, runtime_version)
                .map(|()| acl_path.clone()),
        };
        let batch_symbol = vendor_dl::symbol_name(sys::ACL_SYM_MEMCPY_BATCH_ASYNC);
        let batch_copy = Feature {
            name: "batch copies",
            needs: Some(BATCH_COPY),
            status: gate("batch copies", BATCH_COPY, runtime_version).and_then(|()| {
                if acl.has(batch_symbol) {
                    Ok(acl_path.clone())
                } else {
                    Err(Unsupported::MissingSymbols {
                        feature: "batch copies",
                        library: acl_path.clone(),
                        symbols: vec![batch_symbol],
                    })
                }
            }),
        };
        CopyCapabilities {
            versions,
            runtime,
            batch_copy,
        }
    }
}

/// Everything the probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// `runtime`, `hccl` and `driver` versions, in [`VERSION_PACKAGES`] order.
    pub versions: Vec<(&'static str, VersionResult)>,
    /// The ACL runtime itself, at this version.
    pub runtime: Feature,
    /// One `aclrtMemcpyBatchAsync` per plan instead of one `aclrtMemcpyAsync` per run.
    pub batch_copy: Feature,
    /// The two-sided `hccl` channel (HcclSend/HcclRecv on a root-info communicator).
    pub hccl: Feature,
    /// The `hcomm_onesided` channel (HcclBatchPut on registered memory).
    pub hcomm_onesided: Feature,
    /// The `hixl` channel (HIXL's C client/server API, 9.1 layout).
    pub hixl: Feature,
    /// HIXL's synchronous batch calls.
    pub hixl_sync: Feature,
}

impl Capabilities {
    /// Probes the installation `acl` belongs to; other libraries are found through their
    /// search order (see [`crate::search`]).
    pub fn probe(acl: &Acl) -> Capabilities {
        let CopyCapabilities {
            versions,
            runtime,
            batch_copy,
        } = CopyCapabilities::probe(acl);
        let runtime_version = versions[0].1.clone();
        let gate = |name, needs| gate(name, needs, &runtime_version);
        let hccl = Feature {
            name: "transfer channel hccl",
            needs: Some(HCCL_TWO_SIDED_MIN),
            status: gate("transfer channel hccl", HCCL_TWO_SIDED_MIN).and_then(|()| {
                with_symbols("transfer channel hccl", &[Lib::Hccl], &TWO_SIDED_SYMBOLS)
            }),
        };
        // The one-sided calls moved with CANN 8.5; with no version known, either will do.
        let one_sided_libs: &[Lib] = match &runtime_version {
            Ok(found) if found.version >= HCOMM_SPLIT => &[Lib::Hcomm],
            Ok(_) => &[Lib::Hccl],
            Err(_) => &[Lib::Hcomm, Lib::Hccl],
        };
        let hcomm_onesided = Feature {
            name: "transfer channel hcomm_onesided",
            needs: Some(HCCL_TWO_SIDED_MIN),
            status: gate("transfer channel hcomm_onesided", HCCL_TWO_SIDED_MIN).and_then(|()| {
                with_symbols(
                    "transfer channel hcomm_onesided",
                    one_sided_libs,
                    &ONE_SIDED_SYMBOLS,
                )
            }),
        };
        let hixl_feature = |name: &'static str, symbols: &[&'static str]| Feature {
            name,
            needs: Some(HIXL_C_API_LAYOUT),
            status: gate(name, HIXL_C_API_LAYOUT)
                .and_then(|()| with_symbols(name, &[Lib::Hixl], symbols)),
        };
        Capabilities {
            hixl: hixl_feature("transfer channel hixl", &HIXL_SYMBOLS),
            hixl_sync: hixl_feature("HIXL synchronous batch calls", &HIXL_SYNC_SYMBOLS),
            versions,
            runtime,
            batch_copy,
            hccl,
            hcomm_onesided,
        }
    }

    /// The CANN (runtime package) version, if it could be read.
    pub fn cann_version(&self) -> Option<CannVersion> {
        self.versions[0].1.as_ref().ok().map(|found| found.version)
    }

    /// The features in report order.
    pub fn features(&self) -> [&Feature; 6] {
        [
            &self.runtime,
            &self.batch_copy,
            &self.hccl,
            &self.hcomm_onesided,
            &self.hixl,
            &self.hixl_sync,
        ]
    }
}

/// `Ok` when the runtime version is at least `needs`.
pub fn gate(
    feature: &'static str,
    needs: CannVersion,
    runtime: &VersionResult,
) -> Result<(), Unsupported> {
    match runtime {
        Ok(found) if found.version >= needs => Ok(()),
        Ok(found) => Err(Unsupported::TooOld {
            feature,
            needed: needs,
            found: found.version,
            source_of_found: found.source.to_string(),
        }),
        Err(why) => Err(Unsupported::VersionUnknown {
            feature,
            needed: needs,
            why: why.clone(),
        }),
    }
}

/// The first of `libs` that opens and exports all of `symbols`; otherwise the last reason.
fn with_symbols(
    feature: &'static str,
    libs: &[Lib],
    symbols: &[&'static str],
) -> Result<String, Unsupported> {
    let mut last = None;
    for &lib in libs {
        match Loaded::load(lib) {
            Ok(loaded) => {
                let missing = loaded.missing(symbols);
                if missing.is_empty() {
                    return Ok(loaded.origin.path);
                }
                last = Some(Unsupported::MissingSymbols {
                    feature,
                    library: loaded.origin.path,
                    symbols: missing,
                });
            }
            Err(e) => {
                last = Some(Unsupported::NoLibrary {
                    feature,
                    library: lib.soname(),
                    reason: e.to_string(),
                })
            }
        }
    }
    Err(last.expect("at least one library to try"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::VersionSource;

    #[test]
    fn gates_name_the_version_found_and_the_version_needed() {
        let found = |text: &str| {
            Ok(FoundVersion {
                version: CannVersion::parse(text).unwrap(),
                text: text.into(),
                source: VersionSource::VersionStr,
            })
        };
        assert_eq!(gate("batch copies", BATCH_COPY, &found("8.5.0")), Ok(()));
        assert_eq!(gate("batch copies", BATCH_COPY, &found("9.1.0")), Ok(()));
        let err = gate("transfer channel hixl", HIXL_C_API_LAYOUT, &found("9.0.0")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "transfer channel hixl needs CANN 9.1.0 or newer, but this installation is CANN 9.0.0 (from aclsysGetVersionStr)"
        );
        let err = gate("batch copies", BATCH_COPY, &found("8.5.0-beta.1")).unwrap_err();
        assert!(err.to_string().contains("CANN 8.5.0-beta.1"), "{err}");
        let err = gate("batch copies", BATCH_COPY, &Err("no version.info".into())).unwrap_err();
        assert!(
            err.to_string()
                .contains("could not be read (no version.info)"),
            "{err}"
        );
    }
}
