//! `kvrelay bench copy --device ascend`: the same request through [`AscendDevice`], against
//! the runtime's own copy of the same bytes between one device allocation and one host
//! buffer (one `aclrtMemcpy` each way).
//!
//! On the `ascend-emu` test double (`KVRELAY_ASCENDCL_LIB=.../libascend_emu.so`) the
//! figures are host memcpy through an emulator, and every line says `"emulated": true`:
//! they measure kvrelay's per-call overhead, not an NPU.

use std::sync::Arc;

use kvrelay::device::ascend::{AclError, DeviceBuffer};
use kvrelay::device::{AscendDevice, Device, DeviceError, Region};

use super::copy::{print_pair, run_vendor, Setup, VendorMemory};

pub fn run(setup: Setup) -> Result<(), String> {
    let device = Arc::new(AscendDevice::open(0).map_err(|e| e.to_string())?);
    let mut extra = setup.extra(device.name());
    let bytes = setup.gather.total_bytes();
    let allocator = Arc::clone(&device);
    let memory = VendorMemory {
        alloc: Box::new(move |len| allocator.alloc(len)),
        write: |b: &DeviceBuffer, src| b.write(0, src).map_err(runtime_failure),
        read: |b: &DeviceBuffer, dst| b.read(0, dst).map_err(runtime_failure),
        region: |b| Region::from(b),
    };
    let before = device.calls();
    let best = run_vendor(device.as_ref(), setup, memory, |_| Ok(()))?;
    let calls = device.calls().since(&before);
    let per_plan = |n: u64| n as f64 / calls.plans.max(1) as f64;
    let acl = device.acl();
    let version = device.capabilities().versions[0].1.as_ref();
    extra["emulated"] = acl.is_test_double().into();
    extra["runtime_lib"] = acl.origin().path.clone().into();
    extra["cann_version"] = version
        .map_or("unknown".into(), |v| v.version.to_string())
        .into();
    extra["copy_path"] = format!("{:?}", device.copy_path()).into();
    extra["baseline_kind"] =
        "one runtime copy of the same bytes: aclrtMemcpy device to host (gather), host to device (scatter)"
            .into();
    extra["runtime_calls_per_plan"] = per_plan(calls.total()).into();
    extra["batch_copies_per_plan"] = per_plan(calls.batches).into();
    extra["async_copies_per_plan"] = per_plan(calls.copies).into();
    extra["synchronizes_per_plan"] = per_plan(calls.synchronizes).into();
    print_pair(bytes, best, extra);
    Ok(())
}

/// A baseline copy's error; the device name is the only one the bench opens.
fn runtime_failure(e: AclError) -> DeviceError {
    DeviceError::Runtime {
        device: "ascend:0".into(),
        call: e.call(),
        message: e.to_string(),
    }
}
