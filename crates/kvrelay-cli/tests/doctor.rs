//! `kvrelay doctor` on both test doubles (rbln-emu, ascend-emu) and on a machine with
//! neither (nothing installed where the searches look). Build the doubles first:
//! `cargo build -p rbln-emu -p ascend-emu` (scripts/test.sh does).

use std::process::{Command, Output};

use serde_json::Value;

fn doctor(args: &[&str], env: &[(&str, &str)]) -> (Output, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_kvrelay"))
        .arg("doctor")
        .arg("--json")
        .args(args)
        // A machine with neither stack: nothing configured, nothing where CANN would be.
        .env_remove("RBLN_RUNTIME_LIB")
        .env_remove("KVRELAY_ASCENDCL_LIB")
        .env_remove("ASCEND_EMU_CANN_VERSION")
        .env("ASCEND_HOME_PATH", "/nonexistent/cann")
        .env("REBEL_HOME", "/nonexistent/rebel")
        .envs(env.iter().copied())
        .output()
        .expect("run kvrelay doctor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, report)
}

#[test]
fn without_any_vendor_stack_only_the_host_works() {
    let (out, report) = doctor(&["--device", "host"], &[]);
    assert!(out.status.success());
    assert_eq!(report["host"]["usable"], true);
    for device in ["rbln", "ascend"] {
        let (out, report) = doctor(&["--device", device], &[]);
        assert_eq!(out.status.code(), Some(1), "{device}: {report}");
        assert_eq!(report[device]["usable"], false, "{report}");
        assert!(report[device]["why_not"].is_string(), "{report}");
    }
    // Without --device the report is all there is: exit 0.
    let (out, _) = doctor(&[], &[]);
    assert!(out.status.success());
}

#[cfg(feature = "ascend")]
mod ascend {
    use super::doctor;
    use kvrelay::device::ascend::test_double_for;

    fn emulator() -> String {
        let exe = std::env::current_exe().unwrap();
        let path = test_double_for(&exe).unwrap_or_else(|e| panic!("{e}"));
        path.to_str().unwrap().to_string()
    }

    #[test]
    fn doctor_reports_the_ascend_test_double_and_its_copy_path_per_version() {
        let emu = emulator();
        let (out, report) = doctor(
            &["--device", "ascend"],
            &[
                ("KVRELAY_ASCENDCL_LIB", &emu),
                ("ASCEND_EMU_CANN_VERSION", "8.5.0"),
            ],
        );
        assert!(out.status.success(), "{report}");
        let a = &report["ascend"];
        assert_eq!(a["usable"], true, "{a}");
        assert_eq!(a["test_double"], true);
        assert_eq!(a["library"], emu.as_str());
        assert_eq!(a["devices"], 1);
        assert_eq!(a["versions"]["runtime"]["version"], "8.5.0");
        assert_eq!(a["versions"]["runtime"]["from"], "aclsysGetVersionStr");
        assert_eq!(a["copy_paths"]["batch_copies"]["usable"], true);
        assert!(a["copy_path"]
            .as_str()
            .unwrap()
            .contains("aclrtMemcpyBatchAsync"));
        assert_eq!(
            a["pd_channels"]["hixl"]["why_not"],
            "transfer channel hixl needs CANN 9.1.0 or newer, but this installation is CANN 8.5.0 (from aclsysGetVersionStr)"
        );
        let hccl = a["pd_channels"]["hccl"]["why_not"].as_str().unwrap();
        assert!(
            hccl.contains("libhccl.so not found") && hccl.contains("KVRELAY_HCCL_LIB"),
            "{hccl}"
        );

        // A pre-8.5 install: per-range copies, and the batch path says why not.
        let (out, report) = doctor(
            &["--device", "ascend"],
            &[
                ("KVRELAY_ASCENDCL_LIB", &emu),
                ("ASCEND_EMU_CANN_VERSION", "8.3.0"),
            ],
        );
        assert!(out.status.success());
        let a = &report["ascend"];
        assert!(a["copy_path"]
            .as_str()
            .unwrap()
            .contains("aclrtMemcpyAsync per device range"));
        assert_eq!(
            a["copy_paths"]["batch_copies"]["why_not"],
            "batch copies needs CANN 8.5.0 or newer, but this installation is CANN 8.3.0 (from aclsysGetVersionStr)"
        );
        // Too old for kvrelay at all, or no device visible: exit 1 with the reason.
        let (out, report) = doctor(
            &["--device", "ascend"],
            &[
                ("KVRELAY_ASCENDCL_LIB", &emu),
                ("ASCEND_EMU_CANN_VERSION", "7.0.0"),
            ],
        );
        assert_eq!(out.status.code(), Some(1));
        assert!(report["ascend"]["why_not"]
            .as_str()
            .unwrap()
            .contains("CANN 7.0.0"));
        let (out, report) = doctor(
            &["--device", "ascend"],
            &[
                ("KVRELAY_ASCENDCL_LIB", &emu),
                ("ASCEND_EMU_CANN_VERSION", "9.1.0"),
                ("ASCEND_RT_VISIBLE_DEVICES", "7"),
            ],
        );
        assert_eq!(out.status.code(), Some(1));
        assert!(
            report["ascend"]["why_not"]
                .as_str()
                .unwrap()
                .contains("no device"),
            "{report}"
        );
    }

    #[test]
    fn doctor_names_where_it_looked_for_cann() {
        let (out, report) = doctor(&["--device", "ascend"], &[]);
        assert_eq!(out.status.code(), Some(1));
        let why = report["ascend"]["why_not"].as_str().unwrap();
        for place in [
            "/nonexistent/cann/lib64/libascendcl.so (ASCEND_HOME_PATH): no such file",
            "/usr/local/Ascend/cann/lib64/libascendcl.so (CANN 8.5+ default)",
            "set KVRELAY_ASCENDCL_LIB",
        ] {
            assert!(why.contains(place), "{place}: {why}");
        }
        // The text form says the same, and what is usable.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvrelay"))
            .args(["doctor", "--device", "ascend"])
            .env("KVRELAY_ASCENDCL_LIB", "/nonexistent/libascendcl.so")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("host: usable\n"), "{text}");
        assert!(text.contains("ascend: NOT usable\n"), "{text}");
        assert!(
            text.contains("cannot open libascendcl.so at /nonexistent/libascendcl.so"),
            "{text}"
        );
    }
}

#[cfg(feature = "rbln")]
mod rbln {
    use super::doctor;
    use kvrelay::device::rbln::test_double_for;

    #[test]
    fn doctor_reports_the_rbln_test_double() {
        let exe = std::env::current_exe().unwrap();
        let emu = test_double_for(&exe).unwrap_or_else(|e| panic!("{e}"));
        let emu = emu.to_str().unwrap();
        let (out, report) = doctor(&["--device", "rbln"], &[("RBLN_RUNTIME_LIB", emu)]);
        assert!(out.status.success(), "{report}");
        let r = &report["rbln"];
        assert_eq!(
            (&r["usable"], &r["test_double"]),
            (&true.into(), &true.into())
        );
        assert_eq!(r["abi"]["current"], 6);
        assert_eq!(r["devices"], 1);
        assert_eq!(r["missing_symbols"], serde_json::json!([]));
        // An ABI the bindings do not speak: exit 1, and why.
        let (out, report) = doctor(
            &["--device", "rbln"],
            &[
                ("RBLN_RUNTIME_LIB", emu),
                ("RBLN_EMU_ABI_VERSION", "7"),
                ("RBLN_EMU_ABI_MIN", "7"),
            ],
        );
        assert_eq!(out.status.code(), Some(1));
        assert!(
            report["rbln"]["why_not"]
                .as_str()
                .unwrap()
                .contains("ABI 7..=7"),
            "{report}"
        );
    }
}
