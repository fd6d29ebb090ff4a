//! `kvrelay bench transfer`: one PD request of Llama-3-8B-shaped chunks sent over loopback
//! by a real sender to a real receiver (alloc, data, per-chunk checksums verified by the
//! receiver, proxy notification), against the physical baseline of the transport: for `tcp`,
//! the fastest of several plain single-stream loopback configurations moving the same bytes
//! (socket buffer sizes × write sizes up to 16 MiB, each on its own warm connection; the
//! winner is the one with the best median of [`CALIBRATION_RUNS`] calibration runs, and
//! every configuration's figure is printed); for `shm`, one memcpy of them into a
//! `/dev/shm` mapping (the same kind of memory the PD buffer is, which this kernel backs
//! with 4 KiB pages only; a memcpy between private huge-page buffers is reported too, as
//! `memcpy_private_gbps`).
//!
//! Each timed round runs kvrelay and the baseline back to back, alternating which goes
//! first, after one untimed request warmed kvrelay's connection. The figures are medians
//! over the rounds, so both sides are the same statistic over the same number of samples:
//! on this kind of machine one configuration's runs spread by 2× from one to the next, and
//! a best-of-N rewards whichever side drew more samples. Each round's own ratio is printed
//! too (`round_ratios`), with the bests (`best_gbps`, `baseline_best_gbps`) and the best of
//! every baseline run, calibration included (`baseline_best_any_run_gbps`).
//!
//! The sender's checksums are taken when its staging buffers are filled, as the connector
//! takes them when it gathers each chunk during chunked prefill; that cost is reported on
//! its own (`sender_checksum_gbps`), not hidden in the send.
//!
//! `hccl` (feature `ascend`) runs the HCCL two-sided channel with the PD buffer on the NPU;
//! on the `ascend-emu` test double (`KVRELAY_ASCENDCL_LIB` and `KVRELAY_HCCL_LIB` naming
//! it) the line says `"emulated": true`, and the figure is the emulator's: host copies and
//! a loopback TCP stream, against the same plain TCP stream as baseline. `hixl` runs the
//! HIXL channel the same way (`KVRELAY_HIXL_LIB` too); on the double its put is a memcpy
//! into the server's mapped memory, against the `/dev/shm` memcpy baseline.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::DerefMut;
use std::time::{Duration, Instant};

use kvrelay::config::LmcacheConfig;
use kvrelay::device::HostBuffer;
use kvrelay::keys::{CacheKey, ChunkHasher, HashAlgorithm, KeyDerivation, DEFAULT_SEED};
use kvrelay::store::ChunkMeta;
use kvrelay::transfer::frame::checksum;
use kvrelay::transfer::{
    read_notification, set_socket_buffers, OutgoingChunk, PdConfig, PdPeer, PdReceiver, PdSender,
    SharedStaging,
};
use kvrelay::KvDtype;
use rand::{Rng, SeedableRng};

use super::{gbps, print_result};

#[derive(clap::Args)]
pub struct TransferArgs {
    /// `tcp`, `shm`, or `hccl` / `hixl` (with the ascend feature; `hcomm_onesided` needs its
    /// two ranks in separate processes, which this bench does not run).
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// Bytes of KV in the request, MiB (128 KiB per token for this model shape).
    #[arg(long, default_value_t = 1024)]
    size_mib: usize,
    /// Timed rounds, each timing kvrelay and the baseline back to back; the figures are
    /// the medians.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
}

const CHUNK_TOKENS: usize = 256;

/// Runs of each tcp baseline configuration before the timed rounds; the winner has the
/// best median of them.
const CALIBRATION_RUNS: usize = 3;

pub fn run(args: TransferArgs) -> Result<(), String> {
    let transport = args.transport.as_str();
    let channels: &[&str] = if cfg!(feature = "ascend") {
        &["tcp", "shm", "hccl", "hixl"]
    } else {
        &["tcp", "shm"]
    };
    if !channels.contains(&transport) {
        return Err(format!(
            "--transport {transport:?}: expected one of {}",
            channels.join(", ")
        ));
    }
    if args.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    let buffer_device = if matches!(transport, "hccl" | "hixl") {
        "npu"
    } else {
        "cpu"
    };
    let spec = super::LLAMA_8B_CHUNKS;
    let token_bytes = spec.chunk_bytes(1);
    let tokens = (args.size_mib << 20) / token_bytes;
    if tokens == 0 {
        return Err(format!(
            "--size-mib must hold at least one token ({token_bytes} bytes)"
        ));
    }
    let page = spec.chunk_bytes(CHUNK_TOKENS);
    let num_chunks = tokens.div_ceil(CHUNK_TOKENS);
    let bytes = tokens * token_bytes;

    let proxy = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let proxy_port = proxy.local_addr().map_err(|e| e.to_string())?.port();
    std::thread::spawn(move || {
        for mut stream in proxy.incoming().flatten() {
            let _ = read_notification(&mut stream, None);
        }
    });
    let yaml = format!(
        "chunk_size: {CHUNK_TOKENS}\nenable_pd: true\npd_role: sender\ntransfer_channel: {transport}\n\
         pd_buffer_size: {}\npd_buffer_device: {buffer_device}\npd_peer_host: 127.0.0.1\npd_peer_init_port: 0\n\
         pd_peer_alloc_port: 0\npd_proxy_host: 127.0.0.1\npd_proxy_port: {proxy_port}\n",
        num_chunks * page
    );
    let lmcache = LmcacheConfig::from_yaml_str(&yaml).map_err(|e| e.to_string())?;
    let hasher = ChunkHasher::new(HashAlgorithm::Xxh3_128, DEFAULT_SEED, CHUNK_TOKENS)
        .map_err(|e| e.to_string())?;
    let keys = KeyDerivation::new("bench", 1, spec.dtype, &hasher).map_err(|e| e.to_string())?;
    let cfg = PdConfig::from_lmcache(&lmcache, &spec, keys).map_err(|e| e.to_string())?;
    let receiver = PdReceiver::bind(&cfg, 0).map_err(|e| e.to_string())?;
    let peer = PdPeer::for_rank(
        "127.0.0.1",
        &[receiver.init_addr().port()],
        &[receiver.alloc_addr().port()],
        0,
    )
    .map_err(|e| e.to_string())?;
    let mut sender = PdSender::connect(&cfg, peer, 0).map_err(|e| e.to_string())?;

    // The sender's staging buffers, as a connector would have gathered them: over shm in
    // shared staging files, which the receiver pulls from.
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut chunks = Vec::with_capacity(num_chunks);
    for i in 0..num_chunks {
        let n = CHUNK_TOKENS.min(tokens - i * CHUNK_TOKENS);
        let len = spec.chunk_bytes(n);
        let mut data: Box<dyn DerefMut<Target = [u8]>> = if transport == "shm" {
            Box::new(SharedStaging::new(len).map_err(|e| e.to_string())?)
        } else {
            Box::new(HostBuffer::zeroed(len).map_err(|e| e.to_string())?)
        };
        rng.fill(&mut data[..]);
        let key =
            CacheKey::new("bench", 1, 0, rng.gen(), KvDtype::Bf16).map_err(|e| e.to_string())?;
        let meta = ChunkMeta {
            layout_fingerprint: spec.chunk_fingerprint(),
            num_tokens: n as u32,
        };
        chunks.push((key, meta, data));
    }
    // The gather-time checksums, timed on their own.
    let hashing = Instant::now();
    let sums: Vec<u64> = chunks.iter().map(|c| checksum(&c.2)).collect();
    let checksum_time = hashing.elapsed();
    let refs: Vec<OutgoingChunk<'_>> = chunks
        .iter()
        .zip(sums)
        .map(|((key, meta, data), sum)| OutgoingChunk {
            key,
            meta: *meta,
            data,
            checksum: sum,
        })
        .collect();
    let sources: Vec<&[u8]> = chunks.iter().map(|c| &c.2[..]).collect();
    let mut baseline = Baseline::new(transport, bytes, &sources)?;
    // shm: the same chunks from private memory too, which the sender copies into the
    // pages itself (the push path), timed in the same rounds.
    let private: Vec<HostBuffer> = if transport == "shm" {
        sources
            .iter()
            .map(|src| {
                let mut copy = HostBuffer::zeroed(src.len())?;
                copy.copy_from_slice(src);
                Ok(copy)
            })
            .collect::<Result<_, kvrelay::device::DeviceError>>()
            .map_err(|e| e.to_string())?
    } else {
        Vec::new()
    };
    let pushed_refs: Vec<OutgoingChunk<'_>> = refs
        .iter()
        .zip(&private)
        .map(|(chunk, data)| OutgoingChunk { data, ..*chunk })
        .collect();
    let mut pushed = Vec::with_capacity(args.rounds);

    let rounds = args.rounds;
    let (mut ours, mut theirs) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    let mut private_best = Duration::MAX;
    let mut alloc_ms = f64::MAX;
    let mut calls_per_request: Option<u64> = None;
    let on_npu = buffer_device == "npu";
    // tcp: every configuration a few times before the timed rounds, which then race the
    // winner; kvrelay's connection gets one untimed request too, so both sides start warm.
    baseline.calibrate()?;
    sender
        .send_request("bench-warm", &refs)
        .map_err(|e| e.to_string())?;
    consume(&receiver, &refs)?;
    for round in 0..rounds {
        // Alternating which side goes first cancels whatever the first of a pair gains or
        // loses (a cooler cache, a frequency step).
        if round % 2 == 1 {
            theirs.push(baseline.run()?);
        }
        let id = format!("bench-{round}");
        let calls_before = on_npu.then(emulator_calls).flatten();
        let started = Instant::now();
        let stats = sender.send_request(&id, &refs).map_err(|e| e.to_string())?;
        ours.push(started.elapsed());
        if let Some((before, after)) = calls_before.zip(on_npu.then(emulator_calls).flatten()) {
            let calls = after - before;
            calls_per_request = Some(calls_per_request.map_or(calls, |c| c.min(calls)));
        }
        alloc_ms = alloc_ms.min(stats.alloc_wait.as_secs_f64() * 1e3);
        consume(&receiver, &refs)?;
        if !pushed_refs.is_empty() {
            let started = Instant::now();
            sender
                .send_request(&format!("bench-push-{round}"), &pushed_refs)
                .map_err(|e| e.to_string())?;
            pushed.push(started.elapsed());
            consume(&receiver, &pushed_refs)?;
        }
        if round % 2 == 0 {
            theirs.push(baseline.run()?);
        }
        if let Some(private) = baseline.run_private_memcpy() {
            private_best = private_best.min(private);
        }
    }
    let round_ratios: Vec<f64> = ours
        .iter()
        .zip(&theirs)
        .map(|(ours, theirs)| super::round3(theirs.as_secs_f64() / ours.as_secs_f64()))
        .collect();
    let baseline_kind = match transport {
        "tcp" => {
            "the fastest of several plain single-stream loopback TCP configurations of the same bytes (best median of 3 calibration runs each), timed in the same rounds as kvrelay; both figures are medians over the rounds"
        }
        "hccl" => "the best of several plain single-stream loopback TCP configurations of the same bytes (what the emulator's HCCL moves them over)",
        "hixl" => "one memcpy of the same bytes into a pre-faulted /dev/shm mapping (the emulator's HIXL put is a memcpy into the server's mapped memory, acknowledged per MiB)",
        _ => "one memcpy of the same bytes into a pre-faulted /dev/shm mapping",
    };
    let (baseline_config, configs) = baseline.configs(bytes);
    let calibration_best = (transport == "tcp").then(|| gbps(bytes, baseline.best_stream()));
    let extra = serde_json::json!({
        "transport": transport,
        "baseline_kind": baseline_kind,
        "baseline_config": baseline_config,
        "baseline_configs": configs,
        "baseline_best_any_run_gbps": calibration_best,
        "bytes": bytes,
        "chunks": num_chunks,
        "includes": "alloc round trip, data, the receiver's xxh3 of every chunk, commit, proxy notify",
        "staging": if transport == "shm" { "shared /dev/shm files: the receiver copies each chunk from them into its page, hashing in the same pass" } else { "private host memory" },
        "sender_checksum_gbps": gbps(bytes, checksum_time),
        "memcpy_private_gbps": (transport == "shm").then(|| gbps(bytes, private_best)),
        // shm: the same chunks sent from private memory (the sender copies, the receiver
        // hashes the page), its median and its ratio to the baseline's median.
        "push_gbps": (!pushed.is_empty()).then(|| super::round3(gbps(bytes, median(&pushed)))),
        "push_ratio": (!pushed.is_empty()).then(|| super::round3(median(&theirs).as_secs_f64() / median(&pushed).as_secs_f64())),
        "rounds": rounds,
        "round_ratios": round_ratios,
        "best_gbps": super::round3(gbps(bytes, fastest(&ours))),
        "baseline_best_gbps": super::round3(gbps(bytes, fastest(&theirs))),
        "alloc_ms": (alloc_ms * 1000.0).round() / 1000.0,
        // NPU channels: whether the runtime is the test double, and (on the double,
        // both sides in this process) every ACL/HCCL/HIXL call either side made during
        // one request, the fewest of the rounds. Null for host channels.
        "emulated": on_npu.then(emulated).transpose()?,
        "calls_per_request": calls_per_request,
    });
    print_result(
        "transfer",
        "gbps",
        gbps(bytes, median(&ours)),
        gbps(bytes, median(&theirs)),
        extra,
    );
    Ok(())
}

/// The median of `times` (the upper one of an even count); `times` is not empty.
fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// The shortest of `times` (`Duration::MAX` for none).
fn fastest(times: &[Duration]) -> Duration {
    times.iter().copied().min().unwrap_or(Duration::MAX)
}

/// Whether the ACL runtime the Ascend channel ran on is the `ascend-emu` test double.
fn emulated() -> Result<bool, String> {
    #[cfg(feature = "ascend")]
    {
        let acl = kvrelay::device::ascend::ascend_sys::Acl::global().map_err(|e| e.to_string())?;
        Ok(acl.is_test_double())
    }
    #[cfg(not(feature = "ascend"))]
    Err("the Ascend channels need the ascend feature".into())
}

/// Calls the `ascend-emu` test double has answered so far in this process, when the
/// Ascend runtime loaded is the double.
fn emulator_calls() -> Option<u64> {
    #[cfg(feature = "ascend")]
    {
        kvrelay::device::ascend::ascend_sys::Acl::global()
            .ok()?
            .test_double_calls()
    }
    #[cfg(not(feature = "ascend"))]
    None
}

fn timed_memcpy(dst: &mut [u8], src: &[u8]) -> Duration {
    let started = Instant::now();
    dst.copy_from_slice(src);
    let elapsed = started.elapsed();
    std::hint::black_box(dst);
    elapsed
}

/// Takes every chunk of a request out of the receiver (untimed), so the next round finds
/// the buffer empty.
fn consume(receiver: &PdReceiver, chunks: &[OutgoingChunk<'_>]) -> Result<(), String> {
    for chunk in chunks {
        receiver
            .get(chunk.key)
            .ok_or("a sent chunk is missing at the receiver")?;
    }
    Ok(())
}

/// One plain single-stream loopback configuration of the tcp baseline.
#[derive(Clone, Copy)]
struct StreamConfig {
    /// `SO_SNDBUF` of the writer; `None` leaves the kernel's autotuning.
    send_buffer: Option<usize>,
    /// `SO_RCVBUF` of the reader; `None` leaves the kernel's autotuning.
    receive_buffer: Option<usize>,
    /// Bytes per `write` call.
    write_size: usize,
}

/// The configurations the tcp baseline races: the kernel's autotuning or a 4 MiB socket
/// buffer (this kernel's usual `net.core.[rw]mem_max`) on each side, and writes of 256 KiB
/// to 16 MiB (kvrelay's largest `Data` frame).
fn stream_configs() -> Vec<StreamConfig> {
    let buffers = [None, Some(4 << 20)];
    let mut configs = Vec::new();
    for send_buffer in buffers {
        for receive_buffer in buffers {
            for write_size in [256 << 10, 1 << 20, 4 << 20, 16 << 20] {
                configs.push(StreamConfig {
                    send_buffer,
                    receive_buffer,
                    write_size,
                });
            }
        }
    }
    configs
}

impl std::fmt::Display for StreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let buffer =
            |b: Option<usize>| b.map_or("auto".to_string(), |b| format!("{} KiB", b >> 10));
        write!(
            f,
            "SO_SNDBUF {}, SO_RCVBUF {}, writes of {} KiB",
            buffer(self.send_buffer),
            buffer(self.receive_buffer),
            self.write_size >> 10
        )
    }
}

/// One configuration's connection, kept open (and so warm) across its runs.
struct Stream {
    config: StreamConfig,
    writer: TcpStream,
    /// The reading end; away while a run is in flight.
    reader: Option<TcpStream>,
    /// Every run's time, calibration included.
    runs: Vec<Duration>,
    /// The median of the calibration runs.
    calibrated: Duration,
}

impl Stream {
    fn open(config: StreamConfig) -> Result<Self, String> {
        let err = |e: std::io::Error| e.to_string();
        let listener = TcpListener::bind("127.0.0.1:0").map_err(err)?;
        // Accepted sockets inherit the listener's receive buffer, before the handshake
        // fixes the window scale.
        set_socket_buffers(&listener, None, config.receive_buffer).map_err(err)?;
        let writer = TcpStream::connect(listener.local_addr().map_err(err)?).map_err(err)?;
        let (reader, _) = listener.accept().map_err(err)?;
        for stream in [&writer, &reader] {
            stream.set_nodelay(true).map_err(err)?;
        }
        set_socket_buffers(&writer, config.send_buffer, None).map_err(err)?;
        Ok(Stream {
            config,
            writer,
            reader: Some(reader),
            runs: Vec::new(),
            calibrated: Duration::MAX,
        })
    }

    /// Streams `sources` once, writing `write_size` bytes a call, while a thread reads them
    /// into `sink`'s buffer; returns the time until the last byte was read.
    fn run(
        &mut self,
        sources: &[&[u8]],
        sink: &mut Option<HostBuffer>,
    ) -> Result<Duration, String> {
        let mut stream = self.reader.take().ok_or("baseline socket lost")?;
        let mut dst = sink.take().ok_or("baseline buffer lost")?;
        let started = Instant::now();
        let handle = std::thread::spawn(move || {
            stream.read_exact(&mut dst).map_err(|e| e.to_string())?;
            Ok::<_, String>((stream, dst))
        });
        for s in sources {
            for piece in s.chunks(self.config.write_size) {
                self.writer.write_all(piece).map_err(|e| e.to_string())?;
            }
        }
        let (stream, dst) = handle.join().map_err(|_| "baseline reader panicked")??;
        let elapsed = started.elapsed();
        self.reader = Some(stream);
        *sink = Some(dst);
        self.runs.push(elapsed);
        Ok(elapsed)
    }
}

/// The transport's physical limit for the same bytes.
enum Baseline<'a> {
    Tcp {
        streams: Vec<Stream>,
        sources: &'a [&'a [u8]],
        /// The buffer every configuration reads into.
        sink: Option<HostBuffer>,
    },
    Memcpy {
        src: HostBuffer,
        shared: memmap2::MmapMut,
        private: HostBuffer,
    },
}

impl<'a> Baseline<'a> {
    fn new(transport: &str, bytes: usize, sources: &'a [&'a [u8]]) -> Result<Self, String> {
        let err = |e: std::io::Error| e.to_string();
        let mut dst = HostBuffer::zeroed(bytes).map_err(|e| e.to_string())?;
        dst.fill(1);
        if matches!(transport, "shm" | "hixl") {
            let mut src = HostBuffer::zeroed(bytes).map_err(|e| e.to_string())?;
            let mut at = 0;
            for s in sources {
                src[at..at + s.len()].copy_from_slice(s);
                at += s.len();
            }
            let file = tempfile::tempfile_in("/dev/shm").map_err(err)?;
            file.set_len(bytes as u64).map_err(err)?;
            // SAFETY: the file is this process's own unlinked temporary; nothing else maps
            // or resizes it.
            let mut shared =
                unsafe { memmap2::MmapOptions::new().populate().map_mut(&file) }.map_err(err)?;
            shared.fill(1);
            return Ok(Baseline::Memcpy {
                src,
                shared,
                private: dst,
            });
        }
        let streams = stream_configs()
            .into_iter()
            .map(Stream::open)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Baseline::Tcp {
            streams,
            sources,
            sink: Some(dst),
        })
    }

    /// tcp: runs every configuration [`CALIBRATION_RUNS`] times, round-robin, so a slow
    /// stretch of the machine does not fall on one configuration's runs only.
    fn calibrate(&mut self) -> Result<(), String> {
        if let Baseline::Tcp {
            streams,
            sources,
            sink,
        } = self
        {
            for _ in 0..CALIBRATION_RUNS {
                for stream in streams.iter_mut() {
                    stream.run(sources, sink)?;
                }
            }
            for stream in streams.iter_mut() {
                stream.calibrated = median(&stream.runs);
            }
        }
        Ok(())
    }

    /// tcp: the fastest run of any configuration (`Duration::MAX` for `shm`).
    fn best_stream(&self) -> Duration {
        match self {
            Baseline::Tcp { streams, .. } => streams.iter().map(|s| fastest(&s.runs)).min(),
            Baseline::Memcpy { .. } => None,
        }
        .unwrap_or(Duration::MAX)
    }

    /// tcp: the winning configuration, and every configuration with its calibration
    /// median.
    fn configs(&self, bytes: usize) -> (Option<String>, Option<serde_json::Value>) {
        let Baseline::Tcp { streams, .. } = self else {
            return (None, None);
        };
        let winner = streams.iter().min_by_key(|s| s.calibrated);
        let all = streams
            .iter()
            .map(|s| serde_json::json!({"config": s.config.to_string(), "gbps": super::round3(gbps(bytes, s.calibrated))}))
            .collect();
        (winner.map(|s| s.config.to_string()), Some(all))
    }

    /// `shm` only: the memcpy between private host buffers, for comparison.
    fn run_private_memcpy(&mut self) -> Option<Duration> {
        match self {
            Baseline::Memcpy { src, private, .. } => Some(timed_memcpy(private, src)),
            Baseline::Tcp { .. } => None,
        }
    }

    /// One run of the baseline: the memcpy, or the calibration's winning tcp configuration.
    fn run(&mut self) -> Result<Duration, String> {
        match self {
            Baseline::Memcpy { src, shared, .. } => Ok(timed_memcpy(shared, src)),
            Baseline::Tcp {
                streams,
                sources,
                sink,
            } => streams
                .iter_mut()
                .min_by_key(|s| s.calibrated)
                .ok_or("no baseline configuration")?
                .run(sources, sink),
        }
    }
}
