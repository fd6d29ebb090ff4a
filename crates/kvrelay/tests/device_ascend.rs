//! The Ascend device against the `ascend-emu` test double, loaded through ascend-sys's
//! real loading path. Build the double first: `cargo build -p ascend-emu`
//! (scripts/test.sh does); these tests find it next to the test binary's target
//! directory, or at `ASCEND_EMU_LIB`.
//!
//! Cases that need another emulator configuration (CANN version, devices, failure
//! injection) or another process environment (library search) run an `#[ignore]`d
//! `child_*` test of this binary in a subprocess, and check that it ran and passed.
#![cfg(feature = "ascend")]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use kvrelay::device::ascend::{
    fake_home, test_double_for, Acl, CopyKind, CopyPath, DeviceBuffer, PinnedHost, Stream,
};
use kvrelay::device::{AscendDevice, Device, DeviceError, EngineMemory, HostDevice, Region};
use kvrelay::layout::{KvLayout, LayoutKind};
use kvrelay::plan::{paged_to_chunks, ChunkWindow};

mod support;
use support::{gather, host_cache, pattern, plan, scatter, spec, staging_buffers};

fn emulator_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    test_double_for(&exe).unwrap_or_else(|e| panic!("{e}"))
}

fn acl() -> Arc<Acl> {
    static ACL: OnceLock<Arc<Acl>> = OnceLock::new();
    ACL.get_or_init(|| Arc::new(Acl::open(emulator_path()).unwrap()))
        .clone()
}

fn device() -> AscendDevice {
    AscendDevice::new(acl(), 0).unwrap()
}

fn run_child(name: &str, env: &[(&str, &str)], remove: &[&str]) -> String {
    support::run_child(name, ("ASCEND_EMU_LIB", &emulator_path()), env, remove)
}

/// A child that opens the double by path (`KVRELAY_ASCENDCL_LIB`), with `env`.
fn run_child_on_double(name: &str, env: &[(&str, &str)]) -> String {
    let emu = emulator_path();
    let mut env = env.to_vec();
    env.push(("KVRELAY_ASCENDCL_LIB", emu.to_str().unwrap()));
    run_child(name, &env, &["ASCEND_HOME_PATH", "ASCEND_EMU_CANN_VERSION"])
}

/// A KV cache in emulated device memory: one allocation per layout buffer (vllm-ascend's
/// separate K and V tensors per layer).
struct DeviceCache {
    buffers: Vec<DeviceBuffer>,
    memory: EngineMemory,
}

impl DeviceCache {
    fn new(device: &AscendDevice, layout: KvLayout) -> Self {
        let buffers: Vec<DeviceBuffer> = (0..layout.num_buffers())
            .map(|_| device.alloc(layout.buffer_bytes()).unwrap())
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

/// Gathers and scatters the test plan in the Ascend layout for several block sizes and
/// checks every byte against `HostDevice`, and the calls each plan made.
fn round_trips_equal_the_host_device(ascend: &AscendDevice) {
    let path = ascend.copy_path();
    for (block_size, heads) in [(128, 2), (16, 1), (4, 4)] {
        let layout = KvLayout::new(spec(block_size, heads), LayoutKind::AscendSeparateKv).unwrap();
        let what = format!("{path:?} bs {block_size} heads {heads}");
        let plan = plan(&layout);
        let (src, dst) = (
            DeviceCache::new(ascend, layout),
            DeviceCache::new(ascend, layout),
        );
        src.fill();
        // vllm-ascend aligns K and V to 2 MiB for KV transfer; so does the double.
        assert!(src.buffers.iter().all(|b| b.addr() % (2 << 20) == 0));
        let (host_src, host_dst) = (host_cache(layout, true), host_cache(layout, false));

        let before = ascend.calls();
        let chunks = gather(ascend, &plan, &src.memory);
        let calls = ascend.calls().since(&before);
        let host_chunks = gather(&HostDevice, &plan, &host_src.engine_memory());
        for (a, b) in chunks.iter().zip(&host_chunks) {
            assert!(
                a[..] == b[..],
                "{what}: gathered chunks differ from HostDevice's"
            );
        }
        let runs = plan.runs().len() as u64;
        assert_eq!((calls.plans, calls.synchronizes), (1, 1), "{what}");
        match path {
            CopyPath::Batch => assert_eq!((calls.batches, calls.copies), (1, 0), "{what}"),
            CopyPath::PerRange => {
                assert_eq!(calls.batches, 0, "{what}");
                assert!(calls.copies <= runs, "{what}: {calls:?} for {runs} runs");
            }
        }
        assert!(
            calls.total() <= runs + 1,
            "{what}: {calls:?} for {runs} runs"
        );
        println!("CALLS {what}: {} runs -> {calls:?}", runs);

        let inverse = plan.inverse();
        let before = ascend.calls();
        scatter(ascend, &inverse, &chunks, &dst.memory);
        let calls = ascend.calls().since(&before);
        assert!(calls.total() <= inverse.runs().len() as u64 + 1, "{what}");
        if path == CopyPath::Batch {
            assert_eq!(calls.total(), 2, "{what}: one batch + one synchronize");
        }
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
        }
    }
}

#[test]
fn the_test_double_exports_every_bound_symbol_and_says_so() {
    let acl = acl();
    assert_eq!(acl.missing_symbols(), Vec::<&str>::new());
    assert!(acl.is_test_double());
    assert!(
        acl.origin().path.ends_with("libascend_emu.so"),
        "{:?}",
        acl.origin()
    );
    assert_eq!(acl.device_count().unwrap(), 1);
    assert!(acl.soc_name().unwrap().contains("test double"));
    let err = AscendDevice::new(acl, 1).unwrap_err();
    assert!(err.to_string().contains("device 1 does not exist"), "{err}");
}

#[test]
fn gather_then_scatter_round_trips_and_matches_the_host_device() {
    round_trips_equal_the_host_device(&device());
}

#[test]
fn each_cann_version_chooses_its_copy_path() {
    for (version, path) in [
        ("8.3.0", "PerRange"),
        ("8.5.0", "Batch"),
        ("9.0.0", "Batch"),
        ("9.1.0", "Batch"),
    ] {
        let out = run_child_on_double(
            "child_round_trip",
            &[("ASCEND_EMU_CANN_VERSION", version), ("EXPECT_PATH", path)],
        );
        assert!(out.contains(&format!("PATH {path}")), "{version}: {out}");
    }
    // The same through a fake install tree: the library found under ASCEND_HOME_PATH and
    // the version read from its version files by the runtime.
    for (version, path) in [("8.3.0", "PerRange"), ("9.1.0", "Batch")] {
        let home = tempfile::tempdir().unwrap();
        fake_home(home.path(), version, &emulator_path()).unwrap();
        let out = run_child(
            "child_round_trip",
            &[
                ("ASCEND_HOME_PATH", home.path().to_str().unwrap()),
                ("EXPECT_PATH", path),
            ],
            &["KVRELAY_ASCENDCL_LIB", "ASCEND_EMU_CANN_VERSION"],
        );
        assert!(out.contains(&format!("PATH {path}")), "{version}: {out}");
        assert!(out.contains("(ASCEND_HOME_PATH)"), "{out}");
    }
}

#[test]
fn an_unsupported_cann_version_is_refused_naming_both_versions() {
    let out = run_child_on_double("child_open", &[("ASCEND_EMU_CANN_VERSION", "7.0.0")]);
    assert!(
        out.contains("OPEN-ERROR ascend:0 runtime error in aclsysGetVersionStr: the ACL runtime needs CANN 8.0.0 or newer, but this installation is CANN 7.0.0 (from aclsysGetVersionStr)"),
        "{out}"
    );
}

#[test]
fn a_missing_library_or_symbol_is_a_typed_error_naming_it() {
    // KVRELAY_ASCENDCL_LIB names a missing file: an error naming it, no fallback.
    let out = run_child(
        "child_open",
        &[("KVRELAY_ASCENDCL_LIB", "/nonexistent/libascendcl.so")],
        &[],
    );
    assert!(
        out.contains("OPEN-ERROR ascend:0 runtime error in dlopen libascendcl.so: cannot open libascendcl.so at /nonexistent/libascendcl.so"),
        "{out}"
    );
    // Nothing configured or installed: every place searched is listed.
    let out = run_child(
        "child_open",
        &[("ASCEND_HOME_PATH", "/nonexistent/cann")],
        &["KVRELAY_ASCENDCL_LIB"],
    );
    for place in [
        "libascendcl.so already loaded in this process: not loaded",
        "/nonexistent/cann/lib64/libascendcl.so (ASCEND_HOME_PATH): no such file",
        "/usr/local/Ascend/cann/lib64/libascendcl.so (CANN 8.5+ default)",
        "/usr/local/Ascend/ascend-toolkit/latest/lib64/libascendcl.so (CANN < 8.5 default)",
        "libascendcl.so (system library path)",
        "set KVRELAY_ASCENDCL_LIB",
    ] {
        assert!(out.contains(place), "{place}: {out}");
    }
    // A library without the ACL symbols: the call that needs one says which.
    let libc = Arc::new(Acl::open("libc.so.6").unwrap());
    let err = AscendDevice::new(libc, 0).unwrap_err();
    let DeviceError::Runtime { call, message, .. } = &err else {
        panic!("expected a runtime error, got {err:?}");
    };
    assert_eq!(*call, "aclInit");
    assert!(
        message.contains("symbol aclInit is missing from"),
        "{message}"
    );
}

#[test]
fn a_runtime_already_loaded_in_the_process_is_reused() {
    let out = run_child(
        "child_load_after_open",
        &[("ASCEND_HOME_PATH", "/nonexistent/cann")],
        &["KVRELAY_ASCENDCL_LIB"],
    );
    assert!(
        out.contains("LOADED libascendcl.so already loaded in this process"),
        "{out}"
    );
}

/// Opens the test double by path (as torch_npu would have loaded CANN), then searches
/// without KVRELAY_ASCENDCL_LIB.
#[test]
#[ignore = "run by a_runtime_already_loaded_in_the_process_is_reused in a child process"]
fn child_load_after_open() {
    let _held = Acl::open(emulator_path()).unwrap();
    let acl = Acl::load().unwrap();
    assert!(acl.is_test_double());
    println!("LOADED {}", acl.origin().candidate);
}

#[test]
fn async_copies_land_only_at_synchronize_and_need_pinned_host_memory() {
    let ascend = device();
    let acl = ascend.acl().clone();
    let mem = ascend.alloc(8192).unwrap();
    mem.write(0, &[7u8; 8192]).unwrap();
    let stream = Stream::new(&acl).unwrap();
    let mut pinned = PinnedHost::new(&acl, 4096).unwrap();
    let dev = (mem.addr() + 100) as *mut std::ffi::c_void;
    // SAFETY: both ranges are valid and unused until the synchronize below.
    unsafe {
        acl.memcpy_async(
            pinned.as_mut_ptr().cast(),
            dev,
            4096,
            CopyKind::DeviceToHost,
            stream.raw(),
        )
    }
    .unwrap();
    assert!(
        pinned.iter().all(|&b| b == 0),
        "the copy landed before synchronize"
    );
    stream.synchronize().unwrap();
    assert!(pinned.iter().all(|&b| b == 7));

    // Ordinary host memory is refused for async copies, with the runtime's own text.
    let mut plain = vec![0u8; 4096];
    // SAFETY: as above; the call is refused before anything is queued.
    let err = unsafe {
        acl.memcpy_async(
            plain.as_mut_ptr().cast(),
            dev,
            4096,
            CopyKind::DeviceToHost,
            stream.raw(),
        )
    }
    .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("aclrtMemcpyAsync returned ACL_ERROR_INVALID_PARAM (100000): ascend-emu test double: the destination of an async copy"), "{text}");
    assert!(
        text.contains("is not pinned host memory from aclrtMallocHost"),
        "{text}"
    );

    // A device address outside every allocation is refused the same way.
    let err = mem.read(8000, &mut [0u8; 1000]).unwrap_err();
    assert!(
        err.to_string().contains("range for the device buffer"),
        "{err}"
    );
}

#[test]
fn copies_from_a_new_thread_bind_it_to_the_device_first() {
    let ascend = device();
    let layout = KvLayout::new(spec(16, 2), LayoutKind::AscendSeparateKv).unwrap();
    let cache = DeviceCache::new(&ascend, layout);
    cache.fill();
    let plan = plan(&layout);
    let want = gather(
        &HostDevice,
        &plan,
        &host_cache(layout, true).engine_memory(),
    );
    let before = ascend.calls();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let got = gather(&ascend, &plan, &cache.memory);
                assert!(got.iter().zip(&want).all(|(a, b)| a[..] == b[..]));
            });
        }
    });
    assert_eq!(
        ascend.calls().since(&before).set_devices,
        2,
        "one aclrtSetDevice per thread"
    );
}

#[test]
fn an_out_of_range_plan_is_refused_and_writes_nothing_outside_the_plan() {
    let ascend = device();
    let layout = KvLayout::new(spec(4, 2), LayoutKind::AscendSeparateKv).unwrap();
    // The engine claims full-size buffers, but buffer 1 really holds only 4 of 10 blocks.
    let real = layout.buffer_bytes() * 4 / 10;
    let full: Vec<DeviceBuffer> = (0..layout.num_buffers())
        .map(|i| {
            let len = if i == 1 { real } else { layout.buffer_bytes() };
            let m = ascend.alloc(len).unwrap();
            m.write(0, &vec![0xee; len]).unwrap();
            m
        })
        .collect();
    let regions = full
        .iter()
        .map(|m| Region {
            addr: m.addr(),
            len: layout.buffer_bytes(),
        })
        .collect();
    // SAFETY: deliberately wrong for buffer 1 (the runtime must refuse the excess); every
    // address is a live device allocation.
    let memory = unsafe { EngineMemory::from_raw(layout, regions) }.unwrap();
    let windows = [ChunkWindow {
        start: 0,
        tokens: 8,
        skip_leading: 0,
    }];
    let plan = paged_to_chunks(&layout, &[3, 7], &windows)
        .unwrap()
        .inverse();
    let chunk: Vec<u8> = (0..plan.src_extents()[0]).map(|j| pattern(9, j)).collect();
    let err = ascend
        .start_scatter(&plan, &[&chunk[..]], &memory)
        .and_then(|p| p.wait())
        .unwrap_err();
    let DeviceError::Runtime {
        device,
        call,
        message,
    } = &err
    else {
        panic!("expected a runtime error, got {err:?}");
    };
    assert_eq!(device, "ascend:0");
    assert!(call.starts_with("aclrtMemcpy"), "{call}");
    assert!(
        message.contains("not inside one device allocation"),
        "{message}"
    );
    // Whatever landed lies inside the plan's runs.
    for (i, m) in full.iter().enumerate() {
        let mut got = vec![0u8; m.len()];
        m.read(0, &mut got).unwrap();
        let in_plan = |j: usize| {
            plan.runs().iter().any(|r| {
                r.dst_buffer as usize == i && (r.dst_offset..r.dst_offset + r.len).contains(&j)
            })
        };
        let stray = (0..got.len()).find(|&j| got[j] != 0xee && !in_plan(j));
        assert_eq!(stray, None, "buffer {i} holds a byte the plan never wrote");
    }
    // A gather reading past the real end leaves the caller's buffer untouched.
    let window = ChunkWindow {
        start: 0,
        tokens: 4,
        skip_leading: 0,
    };
    let gather_plan = paged_to_chunks(&layout, &[7], &[window]).unwrap();
    let mut out = vec![0x11u8; gather_plan.dst_extents()[0]];
    assert!(ascend
        .start_gather(&gather_plan, &memory, &mut [&mut out[..]])
        .and_then(|p| p.wait())
        .is_err());
    assert!(out.iter().all(|&b| b == 0x11));
}

#[test]
fn injected_copy_and_synchronize_failures_surface_and_write_nothing() {
    for version in ["8.3.0", "8.5.0"] {
        for knob in ["ASCEND_EMU_FAIL_AFTER", "ASCEND_EMU_FAIL_SYNC_AFTER"] {
            run_child_on_double(
                "child_fail",
                &[
                    ("ASCEND_EMU_CANN_VERSION", version),
                    (knob, "0"),
                    ("FAIL_KNOB", knob),
                ],
            );
        }
    }
}

#[test]
fn visible_devices_are_the_runtimes_numbering() {
    let out = run_child_on_double(
        "child_open",
        &[
            ("ASCEND_EMU_DEVICES", "4"),
            ("ASCEND_RT_VISIBLE_DEVICES", "2,3"),
            ("OPEN_DEVICE", "2"),
        ],
    );
    assert!(
        out.contains("OPEN-ERROR ascend:2 runtime error in aclrtGetDeviceCount: device 2 does not exist: the runtime sees 2 (after ASCEND_RT_VISIBLE_DEVICES)"),
        "{out}"
    );
    let out = run_child_on_double(
        "child_open",
        &[
            ("ASCEND_EMU_DEVICES", "4"),
            ("ASCEND_RT_VISIBLE_DEVICES", "3"),
            ("OPEN_DEVICE", "0"),
        ],
    );
    assert!(out.contains("OPENED ascend:0"), "{out}");
}

/// Opens device OPEN_DEVICE (default 0) the process-wide way and prints the outcome.
#[test]
#[ignore = "run in a child process by the tests above"]
fn child_open() {
    let id = std::env::var("OPEN_DEVICE").map_or(0, |v| v.parse().unwrap());
    match AscendDevice::open(id) {
        Ok(device) => println!("OPENED {}", device.name()),
        Err(e) => println!("OPEN-ERROR {e}"),
    }
}

/// Round trips on the process-wide device; EXPECT_PATH is the copy path it must take.
#[test]
#[ignore = "run in a child process by each_cann_version_chooses_its_copy_path"]
fn child_round_trip() {
    let ascend = AscendDevice::open(0).unwrap();
    let path = format!("{:?}", ascend.copy_path());
    assert_eq!(path, std::env::var("EXPECT_PATH").unwrap());
    println!("LOADED {}", ascend.acl().origin().candidate);
    round_trips_equal_the_host_device(&ascend);
    println!("PATH {path}");
}

/// With FAIL_KNOB=0 the first copy call (or synchronize) fails: the error carries the
/// runtime's text and the caller's buffers keep their bytes.
#[test]
#[ignore = "run in a child process by injected_copy_and_synchronize_failures_surface_and_write_nothing"]
fn child_fail() {
    let ascend = AscendDevice::open(0).unwrap();
    let knob = std::env::var("FAIL_KNOB").unwrap();
    let layout = KvLayout::new(spec(16, 2), LayoutKind::AscendSeparateKv).unwrap();
    let cache = DeviceCache::new(&ascend, layout);
    // Filling uses synchronous copies: only possible when those are not failing.
    if knob == "ASCEND_EMU_FAIL_SYNC_AFTER" {
        cache.fill();
    }
    let plan = plan(&layout);
    let mut chunks = staging_buffers(&ascend, &plan);
    chunks.iter_mut().for_each(|c| c.fill(0x5a));
    let mut host: Vec<&mut [u8]> = chunks.iter_mut().map(|c| &mut c[..]).collect();
    let err = ascend
        .start_gather(&plan, &cache.memory, &mut host)
        .and_then(|p| p.wait())
        .unwrap_err();
    drop(host);
    let text = err.to_string();
    assert!(
        text.contains("ACL_ERROR_RT_COPY_DATA (507052): ascend-emu test double: injected failure"),
        "{text}"
    );
    assert!(text.contains(&knob), "{text}");
    assert!(
        chunks.iter().all(|c| c.iter().all(|&b| b == 0x5a)),
        "a failed gather wrote"
    );
    // A failed scatter leaves device memory as it was (synchronize failures drop the
    // queued copies; a refused issue queues nothing).
    if knob == "ASCEND_EMU_FAIL_SYNC_AFTER" {
        let before: Vec<Vec<u8>> = (0..layout.num_buffers()).map(|i| cache.read(i)).collect();
        let inverse = plan.inverse();
        let src: Vec<Vec<u8>> = inverse
            .src_extents()
            .iter()
            .map(|&n| vec![1u8; n])
            .collect();
        let host: Vec<&[u8]> = src.iter().map(|c| &c[..]).collect();
        assert!(ascend
            .start_scatter(&inverse, &host, &cache.memory)
            .and_then(|p| p.wait())
            .is_err());
        for (i, want) in before.iter().enumerate() {
            assert!(
                &cache.read(i) == want,
                "buffer {i} changed after a failed scatter"
            );
        }
    }
}
