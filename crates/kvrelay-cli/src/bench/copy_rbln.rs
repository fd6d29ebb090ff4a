//! `kvrelay bench copy --device rbln`: the same request through [`RblnDevice`], against the
//! runtime's own copy of the same bytes between one device allocation and one host buffer
//! (one `rbln_memcpy_v2h` for the gather, one `rbln_memcpy_h2v` for the scatter).
//!
//! On the `rbln-emu` test double (`RBLN_RUNTIME_LIB=.../librbln_emu.so`) the figures are
//! host memcpy through an emulator, and every line says `"emulated": true`: they measure
//! kvrelay's per-call overhead, not an NPU.

use std::sync::Arc;

use kvrelay::device::rbln::{AllocKind, DeviceMemory, RblnError, Staging};
use kvrelay::device::{Device, DeviceError, RblnDevice, Region};

use super::copy::{print_pair, run_vendor, Setup, VendorMemory};

pub fn run(setup: Setup, staging: &str) -> Result<(), String> {
    let staging = match staging {
        "auto" => Staging::Auto,
        "never" => Staging::Never,
        other => {
            return Err(format!(
                "unknown --rbln-staging {other:?}; known: auto, never"
            ))
        }
    };
    let device = RblnDevice::open(0)
        .map_err(|e| e.to_string())?
        .with_staging(staging);
    let runtime = Arc::clone(device.runtime());
    let mut extra = setup.extra(device.name());
    let bytes = setup.gather.total_bytes();
    let allocator = Arc::clone(&runtime);
    let memory = VendorMemory {
        alloc: Box::new(move |len| {
            DeviceMemory::new(&allocator, 0, len, AllocKind::Eager).map_err(runtime_failure)
        }),
        write: |b: &DeviceMemory, src| b.write(0, src).map_err(runtime_failure),
        read: |b: &DeviceMemory, dst| b.read(0, dst).map_err(runtime_failure),
        region: |b| Region::from(b),
    };
    let before = device.calls();
    let best = run_vendor(&device, setup, memory, |engine| {
        device.verify_engine_memory(engine)
    })?;
    let calls = device.calls().since(&before);
    let per_plan = |n: u64| n as f64 / calls.plans.max(1) as f64;
    extra["emulated"] = runtime.is_test_double().into();
    extra["runtime_lib"] = runtime.origin().path.clone().into();
    extra["runtime_abi"] = runtime.abi().current.into();
    extra["baseline_kind"] =
        "one runtime copy of the same bytes: rbln_memcpy_v2h (gather), rbln_memcpy_h2v (scatter)"
            .into();
    extra["runtime_calls_per_plan"] = per_plan(calls.total()).into();
    extra["async_copies_per_plan"] = per_plan(calls.copies).into();
    extra["synchronizes_per_plan"] = per_plan(calls.synchronizes).into();
    extra["synchronous_copies"] = calls.synchronous_copies.into();
    extra["staging"] = format!("{staging:?}").to_lowercase().into();
    extra["staged_plans"] = calls.staged_plans.into();
    print_pair(bytes, best, extra);
    Ok(())
}

/// A baseline copy's error; the device name is the only one the bench opens.
fn runtime_failure(e: RblnError) -> DeviceError {
    DeviceError::Runtime {
        device: "rbln:0".into(),
        call: e.call(),
        message: e.to_string(),
    }
}
