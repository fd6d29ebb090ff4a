//! Helpers the device tests share (rbln and ascend, on their test doubles): a small KV
//! spec, byte patterns, a filled host cache, a plan over scattered blocks, gathering and
//! scattering with any device, and running one ignored test of the binary in a child.
#![allow(dead_code)] // each test binary uses the part it needs

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use kvrelay::device::{Device, EngineMemory, HostBuffer, HostKvCache};
use kvrelay::layout::{AttentionKind, KvCacheSpec, KvLayout};
use kvrelay::plan::{paged_to_chunks, ChunkWindow, CopyPlan};
use kvrelay::KvDtype;

/// Runs the ignored test `name` of this binary in a child process with `env` (plus
/// `emu_var` set to the test double's path), asserts that exactly it ran and passed, and
/// returns its stdout.
pub fn run_child(
    name: &str,
    (emu_var, emu): (&str, &Path),
    env: &[(&str, &str)],
    remove: &[&str],
) -> String {
    let mut cmd = child_command(name);
    cmd.env(emu_var, emu);
    for var in remove {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child {name} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

/// This test binary, set to run only its ignored test `name`, printing what it prints.
pub fn child_command(name: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        name,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd
}

pub fn spec(block_size: usize, num_kv_heads: usize) -> KvCacheSpec {
    KvCacheSpec {
        num_layers: 3,
        num_kv_heads,
        head_size: 16,
        dtype: KvDtype::Bf16,
        block_size,
        num_blocks: 10,
        attention: AttentionKind::Mha,
    }
}

/// Byte `j` of buffer `i` of a test cache.
pub fn pattern(i: usize, j: usize) -> u8 {
    (j * 131 + j / 509 + i * 17 + 1) as u8
}

pub fn host_cache(layout: KvLayout, filled: bool) -> Arc<HostKvCache> {
    let cache = HostKvCache::new(layout).unwrap();
    if filled {
        for i in 0..layout.num_buffers() {
            // SAFETY: no copy is running.
            let buf = unsafe { cache.buffer_mut(i) };
            buf.iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = pattern(i, j));
        }
    }
    cache
}

/// Two chunks of a 3-block request over scattered blocks; the first skips 2 tokens.
pub fn plan(layout: &KvLayout) -> CopyPlan {
    let bs = layout.spec().block_size;
    let windows = [
        ChunkWindow {
            start: 0,
            tokens: bs + 1,
            skip_leading: 2,
        },
        ChunkWindow {
            start: bs + 1,
            tokens: 2 * bs - 1,
            skip_leading: 0,
        },
    ];
    paged_to_chunks(layout, &[7, 2, 5], &windows).unwrap()
}

pub fn staging_buffers(device: &dyn Device, plan: &CopyPlan) -> Vec<HostBuffer> {
    plan.dst_extents()
        .iter()
        .map(|&len| device.alloc_staging(len).unwrap())
        .collect()
}

pub fn gather(device: &dyn Device, plan: &CopyPlan, memory: &EngineMemory) -> Vec<HostBuffer> {
    let mut chunks = staging_buffers(device, plan);
    let mut host: Vec<&mut [u8]> = chunks.iter_mut().map(|c| &mut c[..]).collect();
    device
        .start_gather(plan, memory, &mut host)
        .unwrap()
        .wait()
        .unwrap();
    drop(host);
    chunks
}

pub fn scatter(device: &dyn Device, plan: &CopyPlan, chunks: &[HostBuffer], memory: &EngineMemory) {
    let host: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
    device
        .start_scatter(plan, &host, memory)
        .unwrap()
        .wait()
        .unwrap();
}
