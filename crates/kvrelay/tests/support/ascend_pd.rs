//! The tests every Ascend PD channel passes on the `ascend-emu` test double, receiver and
//! sender in separate OS processes (children of the test binary, each loading the double
//! through `KVRELAY_ASCENDCL_LIB` / `KVRELAY_HCCL_LIB` / `KVRELAY_HCOMM_LIB`). A channel's
//! test binary includes this file and expands [`pd_channel_tests!`]. Build the double
//! first: `cargo build -p ascend-emu`. Everything here is emulated: no NPU, no CANN.
#![allow(dead_code)] // the ignored children and the helpers a binary does not use

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvrelay::config::LmcacheConfig;
use kvrelay::device::ascend::{CopyKind, DeviceBuffer};
use kvrelay::device::{AscendDevice, Device, DevicePage, EngineMemory, Region};
use kvrelay::keys::{CacheKey, ChunkHasher, HashAlgorithm, KeyDerivation};
use kvrelay::layout::{AttentionKind, KvCacheSpec, KvLayout, LayoutKind};
use kvrelay::plan::{paged_to_chunks, ChunkWindow};
use kvrelay::store::{Chunk, ChunkMeta};
use kvrelay::transfer::frame;
use kvrelay::transfer::{OutgoingChunk, PdConfig, PdPeer, PdReceiver, PdSender, TransferError};
use kvrelay::KvDtype;

use crate::support;

const CHUNK_TOKENS: usize = 256;
/// Chunks per request: 4 chunks of 2 MiB, more than loopback socket buffers hold, so a
/// peer that dies after 3 MiB dies mid-transfer.
const CHUNKS: usize = 4;
pub const DIE_AFTER: &str = "3145728";

fn spec() -> KvCacheSpec {
    KvCacheSpec {
        num_layers: 4,
        num_kv_heads: 4,
        head_size: 128,
        dtype: KvDtype::Bf16,
        block_size: 16,
        num_blocks: 64,
        attention: AttentionKind::Mha,
    }
}

fn keys() -> KeyDerivation {
    let hasher = ChunkHasher::new(HashAlgorithm::Sha256Cbor, "0", CHUNK_TOKENS).unwrap();
    KeyDerivation::new("m", 1, KvDtype::Bf16, &hasher).unwrap()
}

fn config(channel: &str) -> PdConfig {
    let page = spec().chunk_bytes(CHUNK_TOKENS);
    let yaml = format!(
        "chunk_size: {CHUNK_TOKENS}\nenable_pd: true\npd_role: receiver\ntransfer_channel: {channel}\n\
         pd_buffer_size: {}\npd_buffer_device: npu\npd_peer_host: 127.0.0.1\n\
         pd_peer_init_port: 0\npd_peer_alloc_port: 0\npd_allocation_timeout_sec: 2\n",
        2 * CHUNKS * page
    );
    let cfg = LmcacheConfig::from_yaml_str(&yaml).unwrap();
    let mut cfg = PdConfig::from_lmcache(&cfg, &spec(), keys()).unwrap();
    cfg.io_timeout = Duration::from_secs(5);
    cfg
}

/// The chunks of request `id`: bytes derived from the id and the chunk index, so the
/// receiver can check what landed without being told.
fn chunks(id: &str) -> Vec<(CacheKey, ChunkMeta, Vec<u8>)> {
    let seed = id
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(131).wrapping_add(u64::from(b)));
    (0..CHUNKS)
        .map(|i| {
            let len = spec().chunk_bytes(CHUNK_TOKENS);
            let mut x = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let data = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let key = CacheKey::new("m", 1, 0, seed.wrapping_add(i as u64), KvDtype::Bf16).unwrap();
            let meta = ChunkMeta {
                layout_fingerprint: spec().chunk_fingerprint(),
                num_tokens: CHUNK_TOKENS as u32,
            };
            (key, meta, data)
        })
        .collect()
}

fn emulator() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    ascend_sys::test_double::test_double_for(&exe).unwrap_or_else(|e| panic!("{e}"))
}

/// This binary as a child running the ignored test `name`, on the double at `version`.
pub fn child(name: &str, version: &str, env: &[(&str, &str)]) -> Command {
    let emu = emulator();
    let mut cmd = support::child_command(name);
    cmd.env("KVRELAY_ASCENDCL_LIB", &emu)
        .env("KVRELAY_HCCL_LIB", &emu)
        .env("KVRELAY_HCOMM_LIB", &emu)
        .env("KVRELAY_HIXL_LIB", &emu)
        .env("ASCEND_EMU_CANN_VERSION", version)
        .env("HCCL_CONNECT_TIMEOUT", "10")
        .env_remove("ASCEND_HOME_PATH")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A receiver child and the thread collecting the rest of its stdout.
pub struct Receiver {
    child: Child,
    out: std::thread::JoinHandle<String>,
}

/// Starts a receiver child and reads the ports it listens on.
pub fn start_receiver(ch: Channel, scenario: &str, env: &[(&str, &str)]) -> (Receiver, String) {
    let mut env = env.to_vec();
    env.push(("SCENARIO", scenario));
    env.push(("CHANNEL", ch.name));
    let mut rx = child("child_receiver", "9.1.0", &env).spawn().unwrap();
    let mut out = BufReader::new(rx.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("PORTS ") {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(rx.stderr.as_mut().unwrap(), &mut err);
            panic!("the receiver ended before listening: {err}");
        }
    }
    // Keep draining its output so it never blocks on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        rest
    });
    let ports = line.split("PORTS ").nth(1).unwrap_or_default();
    let rx = Receiver {
        child: rx,
        out: drain,
    };
    (rx, ports.trim().to_string())
}

/// Waits for a receiver child; returns whether it passed, its stdout after the ports line
/// and its stderr.
pub fn finish_receiver(mut rx: Receiver) -> (bool, String) {
    let status = rx.child.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(rx.child.stderr.as_mut().unwrap(), &mut err);
    let out = rx.out.join().unwrap();
    (
        status.success() && out.contains("1 passed"),
        format!("{out}\n{err}"),
    )
}

pub fn run_sender(
    ch: Channel,
    ports: &str,
    requests: &str,
    env: &[(&str, &str)],
) -> (bool, String) {
    run_sender_on(ch, ports, requests, "9.1.0", env)
}

pub fn run_sender_on(
    ch: Channel,
    ports: &str,
    requests: &str,
    version: &str,
    env: &[(&str, &str)],
) -> (bool, String) {
    let mut env = env.to_vec();
    env.push(("PORTS", ports));
    env.push(("REQUESTS", requests));
    env.push(("CHANNEL", ch.name));
    let out = child("child_sender", version, &env).output().unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.contains("1 passed"), text)
}

/// The channel under test: its `transfer_channel` name and its `ChannelKind` as `{:?}`
/// prints it.
#[derive(Clone, Copy)]
pub struct Channel {
    pub name: &'static str,
    pub kind: &'static str,
    /// The oldest CANN it runs on.
    pub needs: &'static str,
    /// What its fence says when the put did not complete within the io timeout (5 s).
    pub timed_out: &'static str,
}

/// The channel a child runs (`CHANNEL`).
fn channel_config() -> PdConfig {
    config(&std::env::var("CHANNEL").unwrap())
}

pub fn kv_moves_bit_exact_between_two_processes(ch: Channel) {
    let (rx, ports) = start_receiver(ch, "r1:ok", &[]);
    let (ok, out) = run_sender(ch, &ports, "r1", &[]);
    assert!(
        ok && out.contains(&format!("SENT r1 chunks=4 channel={}", ch.kind)),
        "{out}"
    );
    let (ok, out) = finish_receiver(rx);
    assert!(
        ok && out.contains("VERIFIED r1 4 chunks bit-exact"),
        "{out}"
    );
}

pub fn a_sender_killed_mid_transfer_frees_the_pages_and_the_next_request_succeeds(ch: Channel) {
    let (rx, ports) = start_receiver(ch, "dead:fail,r2:ok", &[]);
    let started = Instant::now();
    let (ok, out) = run_sender(
        ch,
        &ports,
        "dead",
        &[("ASCEND_EMU_HCCL_DIE_AFTER_BYTES", DIE_AFTER)],
    );
    assert!(
        !ok && !out.contains("SENT dead"),
        "the sender should have died: {out}"
    );
    let (ok, out) = run_sender(ch, &ports, "r2", &[]);
    assert!(ok && out.contains("SENT r2"), "{out}");
    let (ok, out) = finish_receiver(rx);
    assert!(ok, "{out}");
    assert!(out.contains("FAILED dead pages_used=0"), "{out}");
    assert!(out.contains("VERIFIED r2 4 chunks bit-exact"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

pub fn a_receiver_killed_mid_transfer_is_a_bounded_typed_error_and_the_next_receiver_works(
    ch: Channel,
) {
    let (dying, dying_ports) = start_receiver(
        ch,
        "doomed:fail",
        &[("ASCEND_EMU_HCCL_DIE_AFTER_BYTES", DIE_AFTER)],
    );
    let (healthy, healthy_ports) = start_receiver(ch, "r3:ok", &[]);
    let started = Instant::now();
    let (ok, out) = run_sender(
        ch,
        &format!("{dying_ports};{healthy_ports}"),
        "doomed;r3",
        &[],
    );
    assert!(ok, "{out}");
    assert!(out.contains("SEND-ERROR doomed"), "{out}");
    assert!(out.contains("SENT r3 chunks=4"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let (dead_ok, _) = finish_receiver(dying);
    assert!(!dead_ok, "the receiver should have died");
    let (ok, out) = finish_receiver(healthy);
    assert!(ok && out.contains("VERIFIED r3"), "{out}");
}

pub fn a_chunk_whose_checksum_does_not_match_is_dropped_and_the_next_request_lands(ch: Channel) {
    let (rx, ports) = start_receiver(ch, "bad:fail,r4:ok", &[]);
    let (ok, out) = run_sender(ch, &ports, "bad!corrupt;r4", &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("SEND-ERROR bad ChunksRejected rejected=1"),
        "{out}"
    );
    assert!(out.contains("SENT r4"), "{out}");
    let (ok, out) = finish_receiver(rx);
    assert!(ok && out.contains("FAILED bad pages_used=0"), "{out}");
    assert!(out.contains("VERIFIED r4"), "{out}");
}

pub fn an_allocation_wait_on_a_full_buffer_is_bounded_and_the_same_request_then_lands(ch: Channel) {
    // The buffer holds two requests: the third waits for pages, gives up after
    // pd_allocation_timeout_sec with a typed error, and lands once the first is consumed.
    let (rx, ports) = start_receiver(ch, "a1:held,a2:ok,a3:ok", &[]);
    let (ok, out) = run_sender(ch, &ports, "a1;a2;a3;a3", &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("SENT a1") && out.contains("SENT a2") && out.contains("SENT a3"),
        "{out}"
    );
    assert!(
        out.contains("SEND-ERROR a3") && out.contains("(AllocationTimeout)"),
        "{out}"
    );
    let (ok, out) = finish_receiver(rx);
    assert!(
        ok && out.contains("HELD a1 through an allocation wait"),
        "{out}"
    );
    assert!(out.contains("VERIFIED a3 4 chunks bit-exact"), "{out}");
}

pub fn a_stalled_sender_times_out_on_both_sides_and_the_next_request_succeeds(ch: Channel) {
    let (rx, ports) = start_receiver(ch, "stalled:fail,r5:ok", &[]);
    let started = Instant::now();
    let (ok, out) = run_sender(
        ch,
        &ports,
        "stalled",
        &[("ASCEND_EMU_HCCL_STALL_AFTER_BYTES", DIE_AFTER)],
    );
    // The sender's fence gives up after the communicator's execution timeout (the PD io
    // timeout, 5 s here), with the emulator's reason.
    assert!(ok, "{out}");
    assert!(
        out.contains("SEND-ERROR stalled") && out.contains(ch.timed_out),
        "{out}"
    );
    let (ok, out) = run_sender(ch, &ports, "r5", &[]);
    assert!(ok && out.contains("SENT r5"), "{out}");
    let (ok, out) = finish_receiver(rx);
    assert!(ok && out.contains("FAILED stalled pages_used=0"), "{out}");
    assert!(out.contains("VERIFIED r5"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "{:?}",
        started.elapsed()
    );
}

pub fn a_sender_on_a_cann_too_old_is_refused_naming_both_versions(ch: Channel) {
    let (rx, ports) = start_receiver(ch, "r6:ok", &[]);
    let (ok, out) = run_sender_on(ch, &ports, "old;r6", "8.3.0", &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("SEND-ERROR old after")
            && out.contains(&format!(
                "transfer channel {} needs CANN {} or newer, but this installation is CANN 8.3.0",
                ch.name, ch.needs
            )),
        "{out}"
    );
    // The receiver still serves a sender that can.
    let (ok, out) = run_sender(ch, &ports, "r6", &[]);
    assert!(ok && out.contains("SENT r6"), "{out}");
    let (ok, out) = finish_receiver(rx);
    assert!(ok && out.contains("VERIFIED r6"), "{out}");
}

pub fn a_cann_too_old_for_the_channel_is_refused_at_start_naming_both_versions(ch: Channel) {
    let out = child("child_bind_only", "8.3.0", &[("CHANNEL", ch.name)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "BIND-ERROR transfer_channel {0} cannot run here: transfer channel {0} needs CANN {1} or newer, but this installation is CANN 8.3.0",
            ch.name, ch.needs
        )),
        "{text}"
    );
}

/// The `LOADED` line a receiver child printed for `id`: how the load moved the bytes and
/// the copy calls it made by direction.
fn loaded_line<'a>(out: &'a str, id: &str) -> &'a str {
    let tag = format!("LOADED {id} ");
    out.lines()
        .find(|l| l.starts_with(&tag))
        .unwrap_or_else(|| panic!("no {tag}line: {out}"))
}

pub fn the_decoder_loads_the_pd_pages_device_to_device_bit_exact(ch: Channel) {
    let (rx, ports) = start_receiver(ch, "d1:load", &[]);
    let (ok, out) = run_sender(ch, &ports, "d1", &[]);
    assert!(ok && out.contains("SENT d1"), "{out}");
    let (ok, out) = finish_receiver(rx);
    assert!(ok, "{out}");
    let line = loaded_line(&out, "d1");
    // One device-to-device copy per merged run, no host-to-device copy at all.
    assert!(line.contains("via=device h2d_calls=0 "), "{line}");
    assert!(!line.contains("d2d_calls=0 "), "{line}");
    assert!(line.ends_with("bit-exact"), "{line}");
}

pub fn a_failed_device_to_device_load_is_a_typed_error_and_the_host_copy_still_loads(ch: Channel) {
    let (rx, ports) = start_receiver(ch, "d2:load", &[("ASCEND_EMU_FAIL_D2D_AFTER", "0")]);
    let (ok, out) = run_sender(ch, &ports, "d2", &[]);
    assert!(ok && out.contains("SENT d2"), "{out}");
    let (ok, out) = finish_receiver(rx);
    assert!(ok, "{out}");
    assert!(
        out.contains("D2D-ERROR d2 ascend:0 runtime error in aclrtMemcpyAsync")
            && out.contains("ASCEND_EMU_FAIL_D2D_AFTER=0"),
        "{out}"
    );
    let line = loaded_line(&out, "d2");
    assert!(
        line.contains("via=host ") && line.contains(" d2d_calls=0 "),
        "{line}"
    );
    assert!(line.ends_with("bit-exact"), "{line}");
}

pub fn kv_on_another_npu_than_the_pd_buffer_loads_from_the_host_copy(ch: Channel) {
    let (rx, ports) = start_receiver(
        ch,
        "d3:load",
        &[("KV_DEVICE", "1"), ("ASCEND_EMU_DEVICES", "2")],
    );
    let (ok, out) = run_sender(ch, &ports, "d3", &[]);
    assert!(ok && out.contains("SENT d3"), "{out}");
    let (ok, out) = finish_receiver(rx);
    assert!(ok, "{out}");
    let line = loaded_line(&out, "d3");
    assert!(
        line.contains("via=host ") && line.contains(" d2d_calls=0 "),
        "{line}"
    );
    assert!(!line.contains("h2d_calls=0 "), "{line}");
    assert!(line.ends_with("bit-exact"), "{line}");
}

// ---- children (run by the ignored tests [`pd_channel_tests!`] defines) -------------

/// Loads request `id`'s chunks from the PD buffer into a paged KV cache on NPU `KV_DEVICE`
/// (default 0, the PD buffer's), as a decoder's worker does: device to device when the
/// device takes the pages, else (or after a failed device copy, printed as `D2D-ERROR`)
/// from the host copies. Gathers the cache back and prints `LOADED` with the copy calls
/// the load made by direction and whether every chunk came back bit for bit.
fn load_into_kv(rx: &PdReceiver, id: &str) {
    let kv_device = std::env::var("KV_DEVICE").map_or(0, |d| d.parse().unwrap());
    let device = AscendDevice::open(kv_device).unwrap();
    let layout = KvLayout::new(spec(), LayoutKind::AscendSeparateKv).unwrap();
    let buffers: Vec<DeviceBuffer> = (0..layout.num_buffers())
        .map(|_| device.alloc(layout.buffer_bytes()).unwrap())
        .collect();
    let regions = buffers.iter().map(Region::from).collect();
    // SAFETY: each region is a live device allocation of that length, kept by `buffers`
    // while `memory` is used.
    let memory = unsafe { EngineMemory::from_raw(layout, regions) }.unwrap();
    // Blocks in reverse, so no two chunks' blocks sit next to each other in order.
    let blocks: Vec<u32> = (0..spec().num_blocks as u32).rev().collect();
    let windows: Vec<ChunkWindow> = (0..CHUNKS)
        .map(|i| ChunkWindow {
            start: i * CHUNK_TOKENS,
            tokens: CHUNK_TOKENS,
            skip_leading: 0,
        })
        .collect();
    let gather = paged_to_chunks(&layout, &blocks, &windows).unwrap();
    let scatter = gather.inverse();
    let expected = chunks(id);
    let taken: Vec<Chunk> = expected
        .iter()
        .map(|(key, _, _)| rx.get_for_request(key, id).unwrap())
        .collect();
    let pages: Vec<DevicePage> = taken
        .iter()
        .map(|c| {
            c.device
                .clone()
                .expect("a chunk of an NPU PD buffer names its page")
        })
        .collect();
    assert!(pages.iter().all(|p| p.ordinal() == 0), "{pages:?}");
    let calls = |kind| device.acl().test_double_copy_calls(kind).unwrap();
    let before = (
        calls(CopyKind::DeviceToDevice),
        calls(CopyKind::HostToDevice),
    );
    let from_device = match device.start_scatter_from_device(&scatter, &pages, &memory) {
        Ok(Some(copy)) => copy.wait().map(|()| true),
        Ok(None) => Ok(false),
        Err(e) => Err(e),
    }
    .unwrap_or_else(|e| {
        println!("D2D-ERROR {id} {e}");
        false
    });
    if !from_device {
        let host: Vec<&[u8]> = taken.iter().map(|c| &c.data[..]).collect();
        device
            .start_scatter(&scatter, &host, &memory)
            .unwrap()
            .wait()
            .unwrap();
    }
    let d2d = calls(CopyKind::DeviceToDevice) - before.0;
    let h2d = calls(CopyKind::HostToDevice) - before.1;
    drop((taken, pages));
    let mut back: Vec<Vec<u8>> = expected.iter().map(|(_, _, d)| vec![0; d.len()]).collect();
    let mut out: Vec<&mut [u8]> = back.iter_mut().map(|b| &mut b[..]).collect();
    device
        .start_gather(&gather, &memory, &mut out)
        .unwrap()
        .wait()
        .unwrap();
    let exact = back
        .iter()
        .zip(&expected)
        .all(|(got, (_, _, want))| got == want);
    println!(
        "LOADED {id} via={} h2d_calls={h2d} d2d_calls={d2d} {}",
        if from_device { "device" } else { "host" },
        if exact { "bit-exact" } else { "DIFFERENT" }
    );
    // Every page came back to the buffer once the chunks were dropped.
    assert_eq!(rx.occupancy().used_pages, 0);
}

/// Binds, prints the ports, then for each `id:ok|fail|held` of `SCENARIO` waits for that
/// request and checks it landed bit for bit, or that it failed and freed its pages;
/// `held` keeps the request's pages until a sender has waited for pages and given up.
pub fn child_receiver() {
    let rx = PdReceiver::bind(&channel_config(), 0).unwrap();
    println!("PORTS {} {}", rx.init_addr().port(), rx.alloc_addr().port());
    for step in std::env::var("SCENARIO").unwrap().split(',') {
        let (id, expect) = step.split_once(':').unwrap();
        let ready = rx.wait_ready(id, Duration::from_secs(20));
        if expect == "fail" {
            assert!(ready.is_err(), "{id} should have failed");
            // The aborted request's pages come back at once.
            let used = rx.occupancy().used_pages;
            println!("FAILED {id} pages_used={used}");
            continue;
        }
        let ready = ready.unwrap_or_else(|e| panic!("{id}: {e}"));
        if expect == "load" {
            load_into_kv(&rx, id);
            continue;
        }
        if expect == "held" {
            let waited = |waiting: bool| {
                let deadline = Instant::now() + Duration::from_secs(20);
                while (rx.occupancy().waiting > 0) != waiting {
                    assert!(Instant::now() < deadline, "{id}: no allocation wait");
                    std::thread::sleep(Duration::from_millis(10));
                }
            };
            waited(true);
            waited(false);
            println!("HELD {id} through an allocation wait");
        }
        assert_eq!(ready.chunks, CHUNKS);
        for (key, _, data) in chunks(id) {
            let chunk = rx.get_for_request(&key, id).unwrap();
            assert!(chunk.data[..] == data[..], "{id}: a chunk differs");
        }
        println!("VERIFIED {id} {CHUNKS} chunks bit-exact");
    }
}

/// Sends each request of `REQUESTS` (`;`-separated; `id!corrupt` sends a wrong checksum
/// for chunk 2) to the receiver at the same position of `PORTS`, or to the only one.
pub fn child_sender() {
    let ports: Vec<(u16, u16)> = std::env::var("PORTS")
        .unwrap()
        .split(';')
        .map(|p| {
            let (init, alloc) = p.split_once(' ').unwrap();
            (init.parse().unwrap(), alloc.parse().unwrap())
        })
        .collect();
    for (i, request) in std::env::var("REQUESTS").unwrap().split(';').enumerate() {
        let (id, corrupt) = match request.split_once('!') {
            Some((id, _)) => (id, true),
            None => (request, false),
        };
        let (init, alloc) = ports[i.min(ports.len() - 1)];
        let peer = PdPeer::for_rank("127.0.0.1", &[init], &[alloc], 0).unwrap();
        let started = Instant::now();
        let result = PdSender::connect(&channel_config(), peer, 0).and_then(|mut tx| {
            let owned = chunks(id);
            let outgoing: Vec<OutgoingChunk<'_>> = owned
                .iter()
                .enumerate()
                .map(|(j, (key, meta, data))| OutgoingChunk {
                    key,
                    meta: *meta,
                    data,
                    checksum: frame::checksum(data) ^ u64::from(corrupt && j == 2),
                })
                .collect();
            tx.send_request(id, &outgoing)
        });
        match result {
            Ok(stats) => println!(
                "SENT {id} chunks={} channel={:?}",
                stats.chunks, stats.channel
            ),
            Err(TransferError::ChunksRejected { rejected, .. }) => {
                println!("SEND-ERROR {id} ChunksRejected rejected={rejected}")
            }
            Err(e) => println!("SEND-ERROR {id} after {:?}: {e}", started.elapsed()),
        }
    }
}

pub fn child_bind_only() {
    match PdReceiver::bind(&channel_config(), 0) {
        Ok(_) => println!("BOUND"),
        Err(e) => println!("BIND-ERROR {e}"),
    }
}

/// Defines the shared tests for one channel, and the ignored children they run.
macro_rules! pd_channel_tests {
    ($name:literal, $kind:literal, needs $needs:literal, timed_out $timed_out:literal) => {
        const CHANNEL: ascend_pd::Channel = ascend_pd::Channel {
            name: $name,
            kind: $kind,
            needs: $needs,
            timed_out: $timed_out,
        };
        ascend_pd::pd_channel_tests!(@tests
            kv_moves_bit_exact_between_two_processes,
            a_sender_killed_mid_transfer_frees_the_pages_and_the_next_request_succeeds,
            a_receiver_killed_mid_transfer_is_a_bounded_typed_error_and_the_next_receiver_works,
            a_chunk_whose_checksum_does_not_match_is_dropped_and_the_next_request_lands,
            an_allocation_wait_on_a_full_buffer_is_bounded_and_the_same_request_then_lands,
            a_stalled_sender_times_out_on_both_sides_and_the_next_request_succeeds,
            a_sender_on_a_cann_too_old_is_refused_naming_both_versions,
            a_cann_too_old_for_the_channel_is_refused_at_start_naming_both_versions,
            the_decoder_loads_the_pd_pages_device_to_device_bit_exact,
            a_failed_device_to_device_load_is_a_typed_error_and_the_host_copy_still_loads,
            kv_on_another_npu_than_the_pd_buffer_loads_from_the_host_copy,
        );
        ascend_pd::pd_channel_tests!(@children child_receiver, child_sender, child_bind_only);
    };
    (@tests $($test:ident,)*) => {
        $(
            #[test]
            fn $test() {
                ascend_pd::$test(CHANNEL);
            }
        )*
    };
    (@children $($child:ident),*) => {
        $(
            #[test]
            #[ignore = "child of the PD channel tests"]
            fn $child() {
                ascend_pd::$child();
            }
        )*
    };
}
pub(crate) use pd_channel_tests;
