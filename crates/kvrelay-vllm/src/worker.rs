//! The worker half as vLLM's Worker process builds it: once `register_kv_caches` hands the
//! KV cache over, because the tensors say which device moves it (`cpu` → host memory,
//! `npu:N` → Ascend NPU `N`, `rbln:N` → RBLN NPU `N`, each with its feature). The
//! scheduler half moves no KV and needs no device ([`crate::build_half`]).

use std::sync::Arc;

#[cfg(any(feature = "ascend", feature = "rbln"))]
use kvrelay::connector::ConnectorError;
use kvrelay::device::{Device, EngineMemory, HostDevice};
use kvrelay::layout::KvLayout;

use crate::engine::{build_half_on, AdapterError, BuiltHalf, Half, VllmEngine};
use crate::tensors::{recognize_kv_caches, KvDevice, TensorInfo};

/// A worker half with vLLM's KV cache registered, and the layout it moves it with.
pub struct RegisteredWorker {
    pub built: BuiltHalf,
    pub layout: KvLayout,
}

/// Recognizes `tensors` (vLLM's KV cache; `isa` as for
/// [`recognize_kv_caches`]), opens the device they are on, builds the worker half of
/// `engine` on it (as [`crate::build_half`] does) and registers the tensors' memory.
///
/// # Safety
/// Each tensor's `data_ptr` must address memory on the device the tensor names, of at
/// least the size its shape and dtype give, that stays allocated while the returned half
/// lives; nothing else may write a request's blocks while the half loads or saves them
/// (vLLM's contract with a KV connector).
pub unsafe fn build_worker_half(
    engine: &VllmEngine,
    kv_transfer_config_json: &str,
    env: impl IntoIterator<Item = (String, String)>,
    tensors: &[TensorInfo],
    isa: Option<&str>,
) -> Result<RegisteredWorker, AdapterError> {
    let spec = engine.spec()?;
    let recognized = recognize_kv_caches(tensors, isa, &spec)?;
    let layout = recognized.layout;
    let on = match recognized.device {
        KvDevice::Host => "cpu",
        KvDevice::Ascend(_) => "npu",
        KvDevice::Rbln(_) => "rbln",
    };
    if on != engine.device_type {
        return Err(AdapterError::BadEngine(format!(
            "the KV cache tensors are on '{on}', but vLLM's platform is '{}'",
            engine.device_type
        )));
    }
    // SAFETY: each region is one buffer (a layer, or a layer's K or V) of `layout`'s
    // size, checked against the tensors' shape, strides and dtype and not to overlap by
    // `recognize_kv_caches`; the caller guarantees the memory is live and on the device
    // the tensors name, which `open_device` opens.
    let memory = unsafe { EngineMemory::from_raw(layout, recognized.regions) }
        .map_err(|e| AdapterError::Connector(e.into()))?;
    let device = open_device(recognized.device, &memory)?;
    let mut built = build_half_on(engine, kv_transfer_config_json, env, Half::Worker, device)?;
    built.connector.worker.register_kv_caches(memory)?;
    Ok(RegisteredWorker { built, layout })
}

/// The device that moves a KV cache on `device`; an RBLN runtime is also asked whether
/// `memory` is its device memory.
fn open_device(
    device: KvDevice,
    #[cfg_attr(not(feature = "rbln"), allow(unused_variables))] memory: &EngineMemory,
) -> Result<Arc<dyn Device>, AdapterError> {
    let opened: Arc<dyn Device> = match device {
        KvDevice::Host => Arc::new(HostDevice),
        #[cfg(feature = "ascend")]
        KvDevice::Ascend(index) => {
            Arc::new(kvrelay::device::AscendDevice::open(index).map_err(ConnectorError::from)?)
        }
        #[cfg(feature = "rbln")]
        KvDevice::Rbln(index) => {
            let rbln = kvrelay::device::RblnDevice::open(index).map_err(ConnectorError::from)?;
            rbln.verify_engine_memory(memory)
                .map_err(ConnectorError::from)?;
            Arc::new(rbln)
        }
        // `recognize_kv_caches` names NPUs only in builds with their feature.
        #[allow(unreachable_patterns)]
        other => {
            return Err(AdapterError::NotYetSupported(format!(
                "KV caches on {other:?} in a build without its feature"
            )))
        }
    };
    Ok(opened)
}
