//! `kvrelay bench copy --device rbln`: the same request through [`RblnDevice`], against the
//! runtime's own copy of the same bytes between one device allocation and one host buffer
//! (one `rbln_memcpy_v2h` for the gather, one `rbln_memcpy_h2v` for the scatter).
//!
//! On the `rbln-emu` test double (`RBLN_RUNTIME_LIB=.../librbln_emu.so`) the figures are
//! host memcpy through an emulator, and every line says `"emulated": true`: they measure
//! kvrelay's per-call overhead, not an NPU.

use kvrelay::device::rbln::{AllocKind, DeviceMemory, RblnError, Staging};
use kvrelay::device::{Device, DeviceError, EngineMemory, HostBuffer, RblnDevice, Region};
use rand::Rng;

use super::copy::{chunk_buffers, plan_step, print_pair, time_rounds, Setup, Step};

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
    let runtime = std::sync::Arc::clone(device.runtime());
    let mut extra = setup.extra(device.name());
    let Setup {
        spec,
        layout,
        windows,
        gather,
        scatter,
        mut rng,
        rounds,
        ..
    } = setup;
    let bytes = gather.total_bytes();
    let runtime_error = |e: RblnError| e.to_string();

    // The engine's KV cache in device memory, filled with random bytes.
    let mut fill = vec![0u8; layout.buffer_bytes()];
    let buffers = (0..layout.num_buffers())
        .map(|_| {
            let buffer = DeviceMemory::new(&runtime, 0, layout.buffer_bytes(), AllocKind::Eager)?;
            rng.fill(&mut fill[..]);
            buffer.write(0, &fill)?;
            Ok(buffer)
        })
        .collect::<Result<Vec<_>, RblnError>>()
        .map_err(runtime_error)?;
    drop(fill);
    let regions = buffers.iter().map(Region::from).collect();
    // SAFETY: each region is a live device allocation of exactly that length, owned by
    // `buffers`, which lives until the end of this function, after the last copy.
    let memory = unsafe { EngineMemory::from_raw(layout, regions) }.map_err(|e| e.to_string())?;
    device
        .verify_engine_memory(&memory)
        .map_err(|e| e.to_string())?;
    let mut chunks = chunk_buffers(&device, &spec, &windows)?;
    let baseline_device =
        DeviceMemory::new(&runtime, 0, bytes, AllocKind::Eager).map_err(runtime_error)?;
    let mut baseline_host = HostBuffer::zeroed(bytes).map_err(|e| e.to_string())?;
    baseline_host.fill(1);

    let before = device.calls();
    let best = time_rounds(rounds, |step| {
        plan_step(&device, step, (&gather, &scatter), &memory, &mut chunks)
            .unwrap_or_else(|| {
                if matches!(step, Step::GatherBaseline) {
                    baseline_device.read(0, &mut baseline_host)
                } else {
                    baseline_device.write(0, &baseline_host)
                }
                .map_err(|e| runtime_failure(&device, e))
            })
            .map_err(|e| format!("{} failed: {e}", step.name()))
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
    drop(buffers);
    Ok(())
}

fn runtime_failure(device: &RblnDevice, e: RblnError) -> DeviceError {
    DeviceError::Runtime {
        device: device.name().to_string(),
        call: e.call(),
        message: e.to_string(),
    }
}
