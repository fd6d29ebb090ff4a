//! The vLLM worker half on an Ascend NPU, against the `ascend-emu` test double (loaded
//! through `KVRELAY_ASCENDCL_LIB`, where `AscendDevice::open` looks first). Build the
//! double first: `cargo build -p ascend-emu` (scripts/test.sh does). Everything here is
//! emulated: no NPU, no CANN.
#![cfg(feature = "ascend")]

use kvrelay::device::ascend::{test_double_for, DeviceBuffer};
use kvrelay::device::{AscendDevice, Region};

mod support;
use support::{save_load_and_refusals, NpuBuffer, Platform, BLOCK, BLOCKS, HEADS, HEAD_SIZE};

impl NpuBuffer for DeviceBuffer {
    fn addr(&self) -> u64 {
        Region::from(self).addr
    }

    fn write(&self, bytes: &[u8]) {
        DeviceBuffer::write(self, 0, bytes).unwrap();
    }

    fn read(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len()];
        DeviceBuffer::read(self, 0, &mut out).unwrap();
        out
    }
}

/// One test, so that the library path is set before any other thread reads the
/// environment.
#[test]
fn vllm_ascend_kv_caches_save_and_load_bit_for_bit_and_other_npus_are_refused() {
    let exe = std::env::current_exe().unwrap();
    let emulator = test_double_for(&exe).unwrap_or_else(|e| panic!("{e}"));
    std::env::set_var("KVRELAY_ASCENDCL_LIB", emulator);
    let device = AscendDevice::open(0).unwrap();
    // vllm-ascend: per layer a (K, V) tuple, each [num_blocks, block_size, heads, head_size].
    let platform = Platform {
        device: "npu",
        per_layer: 2,
        shape: vec![BLOCKS, BLOCK, HEADS, HEAD_SIZE],
        outer: 1,
        layout: "ascend_separate_kv",
        backend: "ASCEND",
    };
    save_load_and_refusals(&platform, &|len| Box::new(device.alloc(len).unwrap()));
}
