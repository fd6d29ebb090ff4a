//! `kvrelay bench copy --device ascend`: the same request through [`AscendDevice`], against
//! the runtime's own copy of the same bytes between one device allocation and one host
//! buffer (one `aclrtMemcpy` each way).
//!
//! On the `ascend-emu` test double (`KVRELAY_ASCENDCL_LIB=.../libascend_emu.so`) the
//! figures are host memcpy through an emulator, and every line says `"emulated": true`:
//! they measure kvrelay's per-call overhead, not an NPU.

use kvrelay::device::ascend::DeviceBuffer;
use kvrelay::device::{AscendDevice, Device, DeviceError, EngineMemory, HostBuffer, Region};
use rand::Rng;

use super::copy::{chunk_buffers, plan_step, print_pair, time_rounds, Setup, Step};

pub fn run(setup: Setup) -> Result<(), String> {
    let device = AscendDevice::open(0).map_err(|e| e.to_string())?;
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
    let failed = |e: DeviceError| e.to_string();

    // The engine's KV cache in device memory (vllm-ascend: one buffer per layer and K/V),
    // filled with random bytes.
    let mut fill = vec![0u8; layout.buffer_bytes()];
    let buffers = (0..layout.num_buffers())
        .map(|_| {
            let buffer = device.alloc(layout.buffer_bytes())?;
            rng.fill(&mut fill[..]);
            buffer
                .write(0, &fill)
                .map_err(|e| runtime_failure(&device, e))?;
            Ok(buffer)
        })
        .collect::<Result<Vec<DeviceBuffer>, DeviceError>>()
        .map_err(failed)?;
    drop(fill);
    let regions = buffers.iter().map(Region::from).collect();
    // SAFETY: each region is a live device allocation of exactly that length, owned by
    // `buffers`, which lives until the end of this function, after the last copy.
    let memory = unsafe { EngineMemory::from_raw(layout, regions) }.map_err(|e| e.to_string())?;
    let mut chunks = chunk_buffers(&device, &spec, &windows)?;
    let baseline_device = device.alloc(bytes).map_err(failed)?;
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
    drop(buffers);
    Ok(())
}

fn runtime_failure(device: &AscendDevice, e: kvrelay::device::ascend::AclError) -> DeviceError {
    DeviceError::Runtime {
        device: device.name().to_string(),
        call: e.call(),
        message: e.to_string(),
    }
}
