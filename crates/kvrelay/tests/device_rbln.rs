//! The RBLN device against the `rbln-emu` test double, loaded through rbln-sys's real
//! loading path. Build the double first: `cargo build -p rbln-emu` (scripts/test.sh does);
//! these tests find it next to the test binary's target directory, or at `RBLN_EMU_LIB`.
//!
//! Cases that need another emulator configuration (ABI, failure injection) or another
//! process environment (library search) run an `#[ignore]`d `child_*` test of this binary
//! in a subprocess, and check that it ran and passed.
#![cfg(feature = "rbln")]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use kvrelay::device::rbln::{
    test_double_for, AbiCheck, AllocKind, DeviceMemory, LoadError, Runtime, Staging,
};
use kvrelay::device::{Device, DeviceError, EngineMemory, HostDevice, RblnDevice, Region};
use kvrelay::layout::{KvLayout, LayoutKind};
use kvrelay::plan::{paged_to_chunks, ChunkWindow};

mod support;
use support::{gather, host_cache, pattern, plan, scatter, spec, staging_buffers};

fn emulator_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    test_double_for(&exe).unwrap_or_else(|e| panic!("{e}"))
}

fn runtime() -> Arc<Runtime> {
    static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| Arc::new(Runtime::open(emulator_path(), AbiCheck::Strict).unwrap()))
        .clone()
}

fn device() -> RblnDevice {
    RblnDevice::new(runtime(), 0).unwrap()
}

const POLICIES: [Staging; 2] = [Staging::Auto, Staging::Never];

/// The emulator's queue of async copies is per device and process-wide, as the runtime's
/// is: a test that synchronizes device 0 performs every copy queued on it, another test's
/// too. Tests that queue copies in this process hold this while they run.
fn device_queue() -> MutexGuard<'static, ()> {
    static QUEUE: Mutex<()> = Mutex::new(());
    QUEUE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn run_child(name: &str, env: &[(&str, &str)], remove: &[&str]) -> String {
    support::run_child(name, ("RBLN_EMU_LIB", &emulator_path()), env, remove)
}

/// A KV cache in emulated device memory: one allocation per layout buffer.
struct DeviceCache {
    buffers: Vec<DeviceMemory>,
    memory: EngineMemory,
}

impl DeviceCache {
    fn new(layout: KvLayout, kind: AllocKind) -> Self {
        let buffers: Vec<DeviceMemory> = (0..layout.num_buffers())
            .map(|_| DeviceMemory::new(&runtime(), 0, layout.buffer_bytes(), kind).unwrap())
            .collect();
        let regions = buffers.iter().map(Region::from).collect();
        // SAFETY: each region is a live device allocation of exactly that length, kept
        // alive by `buffers` for as long as `memory` is used.
        let memory = unsafe { EngineMemory::from_raw(layout, regions) }.unwrap();
        DeviceCache { buffers, memory }
    }

    fn fill(&self) {
        for (i, b) in self.buffers.iter().enumerate() {
            let bytes: Vec<u8> = (0..b.len()).map(|j| pattern(i, j)).collect();
            b.write(0, &bytes).unwrap();
        }
    }

    fn read(&self, index: usize) -> Vec<u8> {
        let mut out = vec![0u8; self.buffers[index].len()];
        self.buffers[index].read(0, &mut out).unwrap();
        out
    }
}

#[test]
fn the_test_double_exports_every_bound_symbol_and_says_so() {
    let rt = runtime();
    assert_eq!(rt.missing_symbols(), vec![]);
    assert!(rt.is_test_double());
    assert_eq!(rt.abi().current, Some(6));
    assert!(
        rt.origin().path.ends_with("librbln_emu.so"),
        "{:?}",
        rt.origin()
    );
    assert_eq!(rt.device_count().unwrap(), 1);
    let err = RblnDevice::new(rt, 1).unwrap_err();
    assert!(err.to_string().contains("device 1 does not exist"), "{err}");
}

#[test]
fn gather_then_scatter_round_trips_and_matches_the_host_device() {
    let _queue = device_queue();
    for kind in [LayoutKind::RblnKvFirst, LayoutKind::RblnBlocksFirst] {
        for (block_size, heads) in [(4, 2), (16, 1), (8, 4)] {
            let layout = KvLayout::new(spec(block_size, heads), kind).unwrap();
            let what = format!("{kind} bs {block_size} heads {heads}");
            let plan = plan(&layout);
            for staging in POLICIES {
                let what = format!("{what} {staging:?}");
                let rbln = device().with_staging(staging);
                let (src, dst) = (
                    DeviceCache::new(layout, AllocKind::Eager),
                    DeviceCache::new(layout, AllocKind::Eager),
                );
                src.fill();
                rbln.verify_engine_memory(&src.memory).unwrap();
                let (host_src, host_dst) = (host_cache(layout, true), host_cache(layout, false));

                let before = rbln.calls();
                let chunks = gather(&rbln, &plan, &src.memory);
                let calls = rbln.calls().since(&before);
                let host_chunks = gather(&HostDevice, &plan, &host_src.engine_memory());
                for (a, b) in chunks.iter().zip(&host_chunks) {
                    assert!(
                        a[..] == b[..],
                        "{what}: gathered chunks differ from HostDevice's"
                    );
                }
                // Never: one async copy per coalesced run. Auto: these plans of (token, head)
                // runs are staged, one copy per contiguous device range. One synchronize.
                let runs = plan.runs().len() as u64;
                assert_eq!(calls.plans, 1, "{what}");
                assert_eq!(calls.synchronizes, 1, "{what}");
                assert_eq!(calls.synchronous_copies, 0, "{what}");
                if staging == Staging::Never {
                    assert_eq!((calls.copies, calls.staged_plans), (runs, 0), "{what}");
                } else {
                    assert_eq!(calls.staged_plans, 1, "{what}");
                    // With several heads a block's heads merge: far fewer calls than runs.
                    let fewer = if heads > 1 {
                        calls.copies * 4
                    } else {
                        calls.copies + 1
                    };
                    assert!(fewer <= runs, "{what}: {calls:?} for {runs} runs");
                }
                assert!(calls.total() <= runs + 1, "{what}");

                let inverse = plan.inverse();
                let before = rbln.calls();
                scatter(&rbln, &inverse, &chunks, &dst.memory);
                assert!(rbln.calls().since(&before).total() <= inverse.runs().len() as u64 + 1);
                scatter(
                    &HostDevice,
                    &inverse,
                    &host_chunks,
                    &host_dst.engine_memory(),
                );
                for i in 0..layout.num_buffers() {
                    let got = dst.read(i);
                    // SAFETY: no copy is running.
                    let want = unsafe { host_dst.buffer(i) };
                    assert!(
                        got == want,
                        "{what}: buffer {i} differs from HostDevice's scatter"
                    );
                    // Every byte the plan moved is the source's, exactly.
                    let original = src.read(i);
                    for run in plan.runs().iter().filter(|r| r.src_buffer as usize == i) {
                        let range = run.src_offset..run.src_offset + run.len;
                        assert_eq!(got[range.clone()], original[range], "{what}");
                    }
                }
            }
        }
    }
}

#[test]
fn async_copies_land_only_at_synchronize_and_dropping_a_pending_copy_waits() {
    let _queue = device_queue();
    let rt = runtime();
    let mem = DeviceMemory::new(&rt, 0, 8192, AllocKind::Eager).unwrap();
    mem.write(0, &[7u8; 8192]).unwrap();
    let mut host = vec![0u8; 4096];
    // SAFETY: `host` and the device range are valid and unused until the synchronize.
    let handle =
        unsafe { rt.memcpy_v2h_async(mem.vaddr() + 100, host.as_mut_ptr(), 4096) }.unwrap();
    assert!(!handle.completed_synchronously());
    assert!(
        host.iter().all(|&b| b == 0),
        "the copy landed before synchronize"
    );
    rt.device_synchronize(0).unwrap();
    assert!(host.iter().all(|&b| b == 7));

    // Lazy (unmaterialized) memory: the runtime copies synchronously, handle 0.
    let layout = KvLayout::new(spec(4, 2), LayoutKind::RblnBlocksFirst).unwrap();
    let lazy = DeviceCache::new(layout, AllocKind::Lazy);
    lazy.fill();
    let rbln = device();
    let plan = plan(&layout);
    let before = rbln.calls();
    let chunks = gather(&rbln, &plan, &lazy.memory);
    let calls = rbln.calls().since(&before);
    assert_eq!(calls.synchronous_copies, calls.copies);
    assert!(calls.copies > 0);
    let host_chunks = gather(
        &HostDevice,
        &plan,
        &host_cache(layout, true).engine_memory(),
    );
    assert!(chunks.iter().zip(&host_chunks).all(|(a, b)| a[..] == b[..]));

    // A started copy that is dropped instead of waited for still lands before the drop
    // returns.
    let eager = DeviceCache::new(layout, AllocKind::Eager);
    eager.fill();
    let mut dropped = staging_buffers(&rbln, &plan);
    {
        let mut host: Vec<&mut [u8]> = dropped.iter_mut().map(|c| &mut c[..]).collect();
        let pending = rbln.start_gather(&plan, &eager.memory, &mut host).unwrap();
        drop(pending);
    }
    assert!(dropped
        .iter()
        .zip(&host_chunks)
        .all(|(a, b)| a[..] == b[..]));
}

#[test]
fn an_out_of_range_copy_is_a_runtime_error_and_writes_nothing_out_of_range() {
    let _queue = device_queue();
    for staging in POLICIES {
        out_of_range_copy(staging);
    }
}

fn out_of_range_copy(staging: Staging) {
    let layout = KvLayout::new(spec(4, 2), LayoutKind::RblnBlocksFirst).unwrap();
    let rt = runtime();
    let rbln = device().with_staging(staging);
    // The engine claims full-size buffers, but buffer 1 really holds only 4 of 10 blocks.
    let real = layout.buffer_bytes() * 4 / 10;
    let sentinel = |len| vec![0xeeu8; len];
    let full = (0..layout.num_buffers())
        .map(|i| {
            let len = if i == 1 { real } else { layout.buffer_bytes() };
            let m = DeviceMemory::new(&rt, 0, len, AllocKind::Eager).unwrap();
            m.write(0, &sentinel(len)).unwrap();
            m
        })
        .collect::<Vec<_>>();
    let neighbour = DeviceMemory::new(&rt, 0, 1 << 16, AllocKind::Eager).unwrap();
    neighbour.write(0, &sentinel(1 << 16)).unwrap();
    let regions = full
        .iter()
        .map(|m| Region {
            addr: m.vaddr(),
            len: layout.buffer_bytes(),
        })
        .collect();
    // SAFETY: deliberately wrong for buffer 1 (the runtime must refuse the excess); every
    // address is a live device allocation.
    let memory = unsafe { EngineMemory::from_raw(layout, regions) }.unwrap();

    // Scatter into blocks 3 and 7: block 7 of buffer 1 lies past its real end.
    let windows = [ChunkWindow {
        start: 0,
        tokens: 8,
        skip_leading: 0,
    }];
    let plan = paged_to_chunks(&layout, &[3, 7], &windows)
        .unwrap()
        .inverse();
    let failing = plan
        .runs()
        .iter()
        .position(|r| r.dst_buffer == 1 && r.dst_offset + r.len > real)
        .expect("a run past the real end");
    assert!(failing > 0, "some runs start before the failing one");
    let chunk: Vec<u8> = (0..plan.src_extents()[0]).map(|j| pattern(9, j)).collect();
    let before = rbln.calls();
    let err = rbln
        .start_scatter(&plan, &[&chunk[..]], &memory)
        .and_then(|p| p.wait())
        .unwrap_err();
    match &err {
        DeviceError::Runtime {
            device,
            call,
            message,
        } => {
            assert_eq!(device, "rbln:0");
            assert_eq!(*call, "rbln::rbln_memcpy_h2v_async");
            assert!(message.contains("RBLNRetCode_INVALID"), "{message}");
        }
        other => panic!("expected a runtime error, got {other:?}"),
    }
    let calls = rbln.calls().since(&before);
    assert_eq!(
        calls.synchronizes, 1,
        "the started copies are drained before returning"
    );
    // What the whole plan would write; anything else must still be the sentinel.
    let mut planned: Vec<Vec<Option<u8>>> = full.iter().map(|m| vec![None; m.len()]).collect();
    for run in plan.runs() {
        for k in 0..run.len {
            if let Some(b) = planned[run.dst_buffer as usize].get_mut(run.dst_offset + k) {
                *b = Some(chunk[run.src_offset + k]);
            }
        }
    }
    for (i, m) in full.iter().enumerate() {
        let mut got = vec![0u8; m.len()];
        m.read(0, &mut got).unwrap();
        let stray = (0..got.len()).find(|&j| got[j] != 0xee && planned[i][j] != Some(got[j]));
        assert_eq!(
            stray, None,
            "{staging:?}: buffer {i} holds a byte the plan never wrote"
        );
        if staging == Staging::Never {
            // Exactly the runs started before the failure landed; no later one started.
            assert_eq!(calls.copies, failing as u64 + 1);
            let mut want = sentinel(m.len());
            for run in plan.runs()[..failing]
                .iter()
                .filter(|r| r.dst_buffer as usize == i)
            {
                want[run.dst_offset..][..run.len]
                    .copy_from_slice(&chunk[run.src_offset..][..run.len]);
            }
            assert!(
                got == want,
                "buffer {i} was written outside the started runs"
            );
        }
    }
    let mut got = vec![0u8; 1 << 16];
    neighbour.read(0, &mut got).unwrap();
    assert_eq!(
        got,
        sentinel(1 << 16),
        "a neighbouring allocation was written"
    );

    // A gather reading past the real end leaves the failing run's host bytes untouched
    // (and, staged, every host byte: nothing is copied out after a failure).
    let window = ChunkWindow {
        start: 0,
        tokens: 4,
        skip_leading: 0,
    };
    let gather_plan = paged_to_chunks(&layout, &[7], &[window]).unwrap();
    let failing = gather_plan
        .runs()
        .iter()
        .position(|r| r.src_buffer == 1)
        .unwrap();
    let mut out = vec![0x11u8; gather_plan.dst_extents()[0]];
    let err = rbln
        .start_gather(&gather_plan, &memory, &mut [&mut out[..]])
        .and_then(|p| p.wait())
        .unwrap_err();
    assert!(
        matches!(
            err,
            DeviceError::Runtime {
                call: "rbln::rbln_memcpy_v2h_async",
                ..
            }
        ),
        "{err:?}"
    );
    let run = gather_plan.runs()[failing];
    assert!(out[run.dst_offset..][..run.len].iter().all(|&b| b == 0x11));
    if staging == Staging::Auto {
        assert!(out.iter().all(|&b| b == 0x11));
    }

    // Host pointers are not device memory: registration checks catch them.
    let host = host_cache(layout, false);
    let err = rbln
        .verify_engine_memory(&host.engine_memory())
        .unwrap_err();
    assert!(err.to_string().contains("RBLNRetCode_INVALID"), "{err}");
}

#[test]
fn a_library_that_lacks_symbols_fails_at_the_call_that_needs_one() {
    let rt = Arc::new(Runtime::open("libc.so.6", AbiCheck::Skip).unwrap());
    let err = RblnDevice::new(rt, 0).unwrap_err();
    let DeviceError::Runtime { call, message, .. } = &err else {
        panic!("expected a runtime error, got {err:?}");
    };
    assert_eq!(*call, "rbln_get_device_count");
    assert!(
        message.contains("symbol rbln_get_device_count is missing"),
        "{message}"
    );
}

#[test]
fn library_search_and_abi_check_give_typed_errors() {
    // RBLN_RUNTIME_LIB names a missing file: an error naming it, no fallback.
    let out = run_child(
        "child_load_runtime",
        &[("RBLN_RUNTIME_LIB", "/nonexistent/librbln.so")],
        &[],
    );
    assert!(
        out.contains("LOAD-ERROR Open { path: \"/nonexistent/librbln.so\""),
        "{out}"
    );
    // Nothing configured or installed: every candidate is listed.
    let out = run_child(
        "child_load_runtime",
        &[("REBEL_HOME", "/nonexistent/rebel")],
        &["RBLN_RUNTIME_LIB"],
    );
    assert!(out.contains("LOAD-ERROR NotFound"), "{out}");
    assert!(
        out.contains("/nonexistent/rebel/tvm/librbln.so (rebel package)"),
        "{out}"
    );
    assert!(out.contains("librbln.so (system library path)"), "{out}");

    let emu = emulator_path();
    let emu = emu.to_str().unwrap();
    // The ABI range must include 6.
    for (current, min, expect) in [
        ("7", "7", "LOAD-ERROR AbiMismatch { path: "),
        ("5", "1", "LOAD-ERROR AbiMismatch { path: "),
        ("8", "5", "LOADED Explicit"),
    ] {
        let out = run_child(
            "child_load_runtime",
            &[
                ("RBLN_RUNTIME_LIB", emu),
                ("RBLN_EMU_ABI_VERSION", current),
                ("RBLN_EMU_ABI_MIN", min),
            ],
            &[],
        );
        assert!(out.contains(expect), "abi {min}..={current}: {out}");
        if expect.contains("Mismatch") {
            assert!(
                out.contains(&format!(
                    "built: 6, current: {current}, min_supported: {min}"
                )),
                "{out}"
            );
            assert!(out.contains("RBLN_SKIP_ABI_CHECK=1"), "{out}");
        }
    }
    // ...unless the check is skipped.
    let out = run_child(
        "child_load_runtime",
        &[
            ("RBLN_RUNTIME_LIB", emu),
            ("RBLN_EMU_ABI_VERSION", "7"),
            ("RBLN_SKIP_ABI_CHECK", "1"),
        ],
        &[],
    );
    assert!(out.contains("LOADED Explicit"), "{out}");

    // A runtime another component already loaded is reused (RTLD_NOLOAD), not loaded twice.
    let out = run_child("child_load_after_open", &[], &["RBLN_RUNTIME_LIB"]);
    assert!(
        out.contains("LOADED AlreadyLoaded(\"librbln.so\")"),
        "{out}"
    );
}

#[test]
fn injected_runtime_failures_surface_as_errors() {
    for staging in ["never", "auto"] {
        run_child(
            "child_fail_after",
            &[
                ("RBLN_EMU_FAIL_AFTER", "5"),
                ("KVRELAY_TEST_STAGING", staging),
            ],
            &[],
        );
    }
}

/// Prints what `Runtime::load()` (the process-wide search) makes of this environment.
#[test]
#[ignore = "run by library_search_and_abi_check_give_typed_errors in a child process"]
fn child_load_runtime() {
    match Runtime::load() {
        Ok(rt) => println!("LOADED {:?} {:?}", rt.origin().candidate, rt.abi()),
        Err(e) => {
            assert!(matches!(
                e,
                LoadError::Open { .. } | LoadError::NotFound { .. } | LoadError::AbiMismatch { .. }
            ));
            println!("LOAD-ERROR {e:?}\n{e}");
        }
    }
}

/// Opens the test double by path (as torch-rbln would), then searches without
/// RBLN_RUNTIME_LIB.
#[test]
#[ignore = "run by library_search_and_abi_check_give_typed_errors in a child process"]
fn child_load_after_open() {
    let _held = Runtime::open(emulator_path(), AbiCheck::Strict).unwrap();
    let rt = Runtime::load().unwrap();
    println!("LOADED {:?} {:?}", rt.origin().candidate, rt.abi());
}

/// With RBLN_EMU_FAIL_AFTER=5, the sixth copy call fails; KVRELAY_TEST_STAGING picks the
/// staging policy.
#[test]
#[ignore = "run by injected_runtime_failures_surface_as_errors in a child process"]
fn child_fail_after() {
    let layout = KvLayout::new(spec(4, 2), LayoutKind::RblnKvFirst).unwrap();
    // Allocation and filling: 3 synchronous copies (one per buffer).
    let cache = DeviceCache::new(layout, AllocKind::Eager);
    cache.fill();
    let staging = match std::env::var("KVRELAY_TEST_STAGING").as_deref() {
        Ok("never") => Staging::Never,
        Ok("auto") => Staging::Auto,
        other => panic!("KVRELAY_TEST_STAGING must be never or auto, not {other:?}"),
    };
    let rbln = device().with_staging(staging);
    let plan = plan(&layout);
    assert!(plan.runs().len() > 3);
    let mut chunks = staging_buffers(&rbln, &plan);
    chunks.iter_mut().for_each(|c| c.fill(0x5a));
    let mut host: Vec<&mut [u8]> = chunks.iter_mut().map(|c| &mut c[..]).collect();
    let err = rbln
        .start_gather(&plan, &cache.memory, &mut host)
        .and_then(|p| p.wait())
        .unwrap_err();
    drop(host);
    let DeviceError::Runtime { message, .. } = &err else {
        panic!("expected a runtime error, got {err:?}");
    };
    assert!(message.contains("RBLNRetCode_FAILURE"), "{message}");
    let calls = rbln.calls();
    assert_eq!((calls.copies, calls.synchronizes), (3, 1));
    assert_eq!(calls.staged_plans, u64::from(staging == Staging::Auto));
    // Never: the two copies admitted landed; the failed one and those after it wrote
    // nothing. Auto: nothing reaches the caller's buffers after a failure.
    let landed = if staging == Staging::Never { 2 } else { 0 };
    let host_chunks = gather(
        &HostDevice,
        &plan,
        &host_cache(layout, true).engine_memory(),
    );
    for (i, run) in plan.runs().iter().enumerate() {
        let got = &chunks[run.dst_buffer as usize][run.dst_offset..][..run.len];
        if i < landed {
            assert_eq!(
                got,
                &host_chunks[run.dst_buffer as usize][run.dst_offset..][..run.len]
            );
        } else {
            assert!(got.iter().all(|&b| b == 0x5a), "run {i} was written");
        }
    }
    // Every later copy call fails too.
    let err = cache.buffers[0].write(0, &[1]).unwrap_err();
    assert!(err.to_string().contains("RBLNRetCode_FAILURE"), "{err}");
}
