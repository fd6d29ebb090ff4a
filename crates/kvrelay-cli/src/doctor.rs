//! `kvrelay doctor`: what this machine's vendor stacks look like to kvrelay. For the host,
//! RBLN and Ascend it prints what it found (libraries and their paths, versions, ABI,
//! devices, which copy paths and PD channels are usable and why not), as text or `--json`.
//! With `--device X` it exits 1 when X cannot work here.

use std::process::ExitCode;

use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// The device the exit status is about: host, rbln or ascend. Without it every stack
    /// is reported and the exit status is 0.
    #[arg(long)]
    device: Option<String>,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

const DEVICES: [&str; 3] = ["host", "rbln", "ascend"];

pub fn run(args: DoctorArgs) -> Result<ExitCode, String> {
    if let Some(device) = &args.device {
        if !DEVICES.contains(&device.as_str()) {
            return Err(format!(
                "unknown --device {device:?}; known: host, rbln, ascend"
            ));
        }
    }
    let report = json!({
        "host": host(),
        "rbln": rbln::report(),
        "ascend": ascend::report(),
    });
    if args.json {
        println!("{report}");
    } else {
        print!("{}", text(&report));
    }
    let usable = |device: &str| report[device]["usable"].as_bool() == Some(true);
    Ok(match args.device.as_deref() {
        Some(device) if !usable(device) => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    })
}

fn host() -> Value {
    json!({
        "usable": true,
        "copy_paths": { "memcpy": { "usable": true } },
        "pd_channels": {
            "tcp": { "usable": true },
            "shm": { "usable": true },
        },
    })
}

/// A stack's section when this kvrelay was built without its feature.
#[cfg(not(all(feature = "rbln", feature = "ascend")))]
fn not_built(feature: &str) -> Value {
    json!({
        "usable": false,
        "built": false,
        "why_not": format!("this kvrelay was built without the `{feature}` feature (cargo build -p kvrelay-cli --features {feature})"),
    })
}

/// `{"usable": true, ...}` or `{"usable": false, "why_not": ...}` for a feature's status.
#[cfg(feature = "ascend")]
fn status<T: std::fmt::Display, E: std::fmt::Display>(result: &Result<T, E>, key: &str) -> Value {
    match result {
        Ok(value) => json!({ "usable": true, key: value.to_string() }),
        Err(why) => json!({ "usable": false, "why_not": why.to_string() }),
    }
}

/// The report as text: one line per fact, indented by section.
fn text(report: &Value) -> String {
    let mut out = String::new();
    for device in DEVICES {
        let section = &report[device];
        let verdict = if section["usable"].as_bool() == Some(true) {
            "usable"
        } else {
            "NOT usable"
        };
        let double = if section["test_double"].as_bool() == Some(true) {
            " (on a TEST DOUBLE, an emulator: not real hardware)"
        } else {
            ""
        };
        out.push_str(&format!("{device}: {verdict}{double}\n"));
        lines(&mut out, section, 1);
    }
    out
}

fn lines(out: &mut String, value: &Value, depth: usize) {
    let Some(map) = value.as_object() else {
        return;
    };
    for (key, item) in map {
        if key == "usable" && depth == 1 {
            continue;
        }
        let pad = "  ".repeat(depth);
        match item {
            Value::Object(_) => {
                let verdict = match item["usable"].as_bool() {
                    Some(true) => " (usable)",
                    Some(false) => " (not usable)",
                    None => "",
                };
                out.push_str(&format!("{pad}{key}:{verdict}\n"));
                lines(out, item, depth + 1);
            }
            Value::String(s) => out.push_str(&format!("{pad}{key}: {s}\n")),
            Value::Array(items) => {
                let items: Vec<String> = items.iter().map(|i| i.to_string()).collect();
                out.push_str(&format!("{pad}{key}: [{}]\n", items.join(", ")));
            }
            Value::Null => {}
            other if key != "usable" => out.push_str(&format!("{pad}{key}: {other}\n")),
            _ => {}
        }
    }
}

#[cfg(feature = "rbln")]
mod rbln {
    use kvrelay::device::rbln::Runtime;
    use serde_json::{json, Value};

    pub fn report() -> Value {
        let runtime = match Runtime::load() {
            Ok(runtime) => runtime,
            Err(e) => {
                return json!({ "usable": false, "built": true, "library": "librbln.so", "why_not": e.to_string() })
            }
        };
        let missing: Vec<&str> = runtime.missing_symbols().iter().map(|s| s.name).collect();
        let devices = runtime.device_count();
        let why_not = match &devices {
            Ok(0) => Some("the runtime reports no RBLN device".to_string()),
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        };
        let abi = runtime.abi();
        json!({
            "usable": why_not.is_none(),
            "built": true,
            "why_not": why_not,
            "library": runtime.origin().path,
            "found_by": runtime.origin().candidate.to_string(),
            "test_double": runtime.is_test_double(),
            "abi": { "current": abi.current, "min_supported": abi.min_supported, "built_for": kvrelay::device::rbln::BUILT_ABI },
            "missing_symbols": missing,
            "devices": devices.ok(),
            "copy_paths": { "async_copies_and_device_synchronize": { "usable": why_not.is_none() } },
            "pd_channels": { "tcp": { "usable": true }, "shm": { "usable": true } },
        })
    }
}

#[cfg(not(feature = "rbln"))]
mod rbln {
    pub fn report() -> serde_json::Value {
        super::not_built("rbln")
    }
}

#[cfg(feature = "ascend")]
mod ascend {
    use kvrelay::device::ascend::ascend_sys::{Acl, Capabilities, Feature, Lib, Loaded};
    use serde_json::{json, Map, Value};

    use super::status;

    fn feature(f: &Feature) -> Value {
        let mut value = status(&f.status, "library");
        if let Some(needs) = f.needs {
            value["needs_cann"] = needs.to_string().into();
        }
        value
    }

    pub fn report() -> Value {
        let libraries: Map<String, Value> = Lib::ALL
            .iter()
            .map(|&lib| {
                let found = Loaded::load(lib).map(|l| l.origin.path);
                (lib.soname().to_string(), status(&found, "path"))
            })
            .collect();
        let visible = std::env::var("ASCEND_RT_VISIBLE_DEVICES").ok();
        let acl = match Acl::load() {
            Ok(acl) => acl,
            Err(e) => {
                return json!({
                    "usable": false,
                    "built": true,
                    "why_not": e.to_string(),
                    "libraries": libraries,
                    "ascend_rt_visible_devices": visible,
                })
            }
        };
        let caps = Capabilities::probe(&acl);
        let versions: Map<String, Value> = caps
            .versions
            .iter()
            .map(|(pkg, found)| {
                let value = match found {
                    Ok(v) => {
                        json!({ "version": v.version.to_string(), "from": v.source.to_string() })
                    }
                    Err(why) => json!({ "error": why }),
                };
                (pkg.to_string(), value)
            })
            .collect();
        let devices = acl.device_count();
        let why_not = match (&caps.runtime.status, &devices) {
            (Err(unsupported), _) => Some(unsupported.to_string()),
            (_, Err(e)) => Some(e.to_string()),
            (_, Ok(0)) => Some("the runtime sees no device (ASCEND_RT_VISIBLE_DEVICES?)".into()),
            _ => None,
        };
        let copy_path = if caps.batch_copy.usable() {
            "one aclrtMemcpyBatchAsync + one aclrtSynchronizeStream per plan"
        } else {
            "one aclrtMemcpyAsync per device range + one aclrtSynchronizeStream per plan"
        };
        json!({
            "usable": why_not.is_none(),
            "built": true,
            "why_not": why_not,
            "library": acl.origin().path,
            "found_by": acl.origin().candidate.to_string(),
            "test_double": acl.is_test_double(),
            "missing_acl_symbols": acl.missing_symbols(),
            "versions": versions,
            "soc": acl.soc_name().ok(),
            "devices": devices.ok(),
            "ascend_rt_visible_devices": visible,
            "libraries": libraries,
            "copy_path": copy_path,
            "copy_paths": {
                "runtime": feature(&caps.runtime),
                "batch_copies": feature(&caps.batch_copy),
                "per_range_async_copies": feature(&caps.runtime),
            },
            "pd_channels": {
                "tcp": { "usable": true },
                "shm": { "usable": true },
                "hccl": feature(&caps.hccl),
                "hcomm_onesided": feature(&caps.hcomm_onesided),
                "hixl": feature(&caps.hixl),
                "hixl_sync_calls": feature(&caps.hixl_sync),
            },
            "note": "hccl, hcomm_onesided and hixl are built on the ascend-emu test double only; nothing has run on Ascend hardware",
        })
    }
}

#[cfg(not(feature = "ascend"))]
mod ascend {
    pub fn report() -> serde_json::Value {
        super::not_built("ascend")
    }
}
