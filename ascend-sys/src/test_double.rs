//! Finding the `ascend-emu` TEST DOUBLE and giving it a fake CANN install tree, for
//! tests and emulated runs. Nothing here is used with a real CANN.

use std::path::{Path, PathBuf};

use crate::search::Lib;

/// The `ascend-emu` test double for tests: the file `ASCEND_EMU_LIB` names, else where
/// `cargo build -p ascend-emu` puts it for a test binary at `exe`. The error says how to
/// build it.
pub fn test_double_for(exe: &Path) -> Result<PathBuf, String> {
    vendor_dl::test_double_for(exe, "ascend-emu", "libascend_emu.so", "ASCEND_EMU_LIB")
}

/// Lays out a fake CANN install under `root` as CANN 8.5+ does: `lib64/libascendcl.so`
/// (a symbolic link to the test double `emulator`), `share/info/{runtime,hccl}/version.info`
/// and `<arch>-linux/ascend_toolkit_install.info`, all saying `version`. Point
/// `ASCEND_HOME_PATH` at `root` to use it. Only the ACL library is laid out: HCCL and HIXL
/// are absent, as on an install without them.
pub fn fake_home(root: &Path, version: &str, emulator: &Path) -> std::io::Result<()> {
    let lib64 = root.join("lib64");
    std::fs::create_dir_all(&lib64)?;
    let link = lib64.join(Lib::AscendCl.soname());
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(&link)?;
    }
    std::os::unix::fs::symlink(emulator, &link)?;
    for pkg in ["runtime", "hccl"] {
        let info = root.join("share/info").join(pkg);
        std::fs::create_dir_all(&info)?;
        std::fs::write(
            info.join("version.info"),
            format!("package_name={pkg}\nVersion={version}\n"),
        )?;
    }
    let arch = root.join(format!("{}-linux", std::env::consts::ARCH));
    std::fs::create_dir_all(&arch)?;
    std::fs::write(
        arch.join("ascend_toolkit_install.info"),
        format!("package_name=Ascend-cann-toolkit\nversion={version}\n"),
    )
}
