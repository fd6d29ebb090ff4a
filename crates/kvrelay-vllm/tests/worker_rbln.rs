//! The vLLM worker half on an RBLN NPU, against the `rbln-emu` test double (loaded
//! through `RBLN_RUNTIME_LIB`, where `RblnDevice::open` looks first). Build the double
//! first: `cargo build -p rbln-emu` (scripts/test.sh does). Everything here is emulated:
//! no NPU, no RBLN SDK.
#![cfg(feature = "rbln")]

use kvrelay::device::rbln::{test_double_for, AllocKind, DeviceMemory};
use kvrelay::device::{RblnDevice, Region};

mod support;
use support::{save_load_and_refusals, NpuBuffer, Platform, BLOCK, BLOCKS, HEADS, HEAD_SIZE};

impl NpuBuffer for DeviceMemory {
    fn addr(&self) -> u64 {
        Region::from(self).addr
    }

    fn write(&self, bytes: &[u8]) {
        DeviceMemory::write(self, 0, bytes).unwrap();
    }

    fn read(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len()];
        DeviceMemory::read(self, 0, &mut out).unwrap();
        out
    }
}

/// One test, so that the library path is set before any other thread reads the
/// environment.
#[test]
fn vllm_rbln_kv_caches_save_and_load_bit_for_bit_and_other_npus_are_refused() {
    let exe = std::env::current_exe().unwrap();
    let emulator = test_double_for(&exe).unwrap_or_else(|e| panic!("{e}"));
    std::env::set_var("RBLN_RUNTIME_LIB", emulator);
    let device = RblnDevice::open(0).unwrap();
    let runtime = device.runtime();
    // vllm-rbln: per layer one [2, num_blocks, heads, 1, block_size, head_size] tensor.
    let platform = Platform {
        device: "rbln",
        per_layer: 1,
        shape: vec![2, BLOCKS, HEADS, 1, BLOCK, HEAD_SIZE],
        outer: 2,
        layout: "rbln_kv_first",
        backend: "RBLN_ATTN",
    };
    save_load_and_refusals(&platform, &|len| {
        Box::new(DeviceMemory::new(runtime, 0, len, AllocKind::Eager).unwrap())
    });
}
