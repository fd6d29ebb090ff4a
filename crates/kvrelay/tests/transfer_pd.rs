//! PD transfer over loopback: a real receiver, real and hand-rolled senders, a fake proxy.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use kvrelay::config::{LmcacheConfig, PdBackendMode};
use kvrelay::device::HostBuffer;
use kvrelay::keys::{CacheKey, ChunkHasher, HashAlgorithm, KeyDerivation};
use kvrelay::layout::{AttentionKind, BlockPacking, CpuAttnIsa, KvCacheSpec};
use kvrelay::store::{ChunkMeta, RequestIdScope, Tier, TierStack};
use kvrelay::transfer::frame::{
    self, data_prefix, read_frame, ChunkDecl, DataHeader, Incoming, Message, MAC_LEN, NONCE_LEN,
};
use kvrelay::transfer::{
    read_notification, ChannelKind, ChunkPlan, ErrorCode, KvReady, OutgoingChunk, PdConfig, PdPeer,
    PdReceiver, PdSender, PdSink, PdTarget, PdTransfer, ReceivedKv, SharedStaging, TransferError,
};
use kvrelay::KvDtype;
use rand::{Rng, SeedableRng};

const CHUNK_TOKENS: usize = 16;

fn spec() -> KvCacheSpec {
    KvCacheSpec {
        num_layers: 2,
        num_kv_heads: 2,
        head_size: 8,
        dtype: KvDtype::Bf16,
        block_size: 16,
        num_blocks: 64,
        attention: AttentionKind::Mha,
    }
}

fn page() -> usize {
    spec().chunk_bytes(CHUNK_TOKENS)
}

/// A config for either role; `extra` is appended YAML.
fn config(channel: &str, pages: usize, extra: &str, proxy: Option<u16>) -> PdConfig {
    let proxy = proxy
        .map(|p| format!("pd_proxy_host: 127.0.0.1\npd_proxy_port: {p}\n"))
        .unwrap_or_default();
    let yaml = format!(
        "chunk_size: {CHUNK_TOKENS}\nenable_pd: true\npd_role: receiver\ntransfer_channel: {channel}\n\
         pd_buffer_size: {}\npd_buffer_device: cpu\npd_peer_host: 127.0.0.1\n\
         pd_peer_init_port: 0\npd_peer_alloc_port: 0\npd_allocation_timeout_sec: 0.3\n{proxy}{extra}",
        pages * page()
    );
    let cfg = LmcacheConfig::from_yaml_str(&yaml).unwrap();
    PdConfig::from_lmcache(&cfg, &spec(), keys()).unwrap()
}

/// How both sides of these tests derive keys (the chunks' keys are `m@1@0@…@bfloat16`).
fn keys() -> KeyDerivation {
    let hasher = ChunkHasher::new(HashAlgorithm::Sha256Cbor, "0", CHUNK_TOKENS).unwrap();
    KeyDerivation::new("m", 1, KvDtype::Bf16, &hasher).unwrap()
}

fn peer(rx: &PdReceiver) -> PdPeer {
    PdPeer::for_rank(
        "127.0.0.1",
        &[rx.init_addr().port()],
        &[rx.alloc_addr().port()],
        0,
    )
    .unwrap()
}

struct Request {
    id: String,
    chunks: Vec<(CacheKey, ChunkMeta, Vec<u8>)>,
}

/// `n` chunks of random bytes; the last one partial when `partial_tail`.
fn request(id: &str, n: usize, partial_tail: bool) -> Request {
    let seed = id.bytes().fold(n as u64, |h, b| {
        h.wrapping_mul(31).wrapping_add(u64::from(b))
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let chunks = (0..n)
        .map(|i| {
            let tokens = if partial_tail && i == n - 1 {
                5
            } else {
                CHUNK_TOKENS
            };
            let mut data = vec![0u8; spec().chunk_bytes(tokens)];
            rng.fill(&mut data[..]);
            let key = CacheKey::new("m", 1, 0, rng.gen(), KvDtype::Bf16).unwrap();
            let meta = ChunkMeta {
                layout_fingerprint: spec().chunk_fingerprint(),
                num_tokens: tokens as u32,
            };
            (key, meta, data)
        })
        .collect();
    Request {
        id: id.to_string(),
        chunks,
    }
}

impl Request {
    /// Whether no chunk of this request can be loaded from `rx`.
    fn none_loaded(&self, rx: &PdReceiver) -> bool {
        self.chunks.iter().all(|(k, _, _)| rx.get(k).is_none())
    }

    /// The chunks as a connector hands them to the sender, checksums taken at gather time.
    fn refs(&self) -> Vec<OutgoingChunk<'_>> {
        self.chunks
            .iter()
            .map(|(key, meta, data)| OutgoingChunk {
                key,
                meta: *meta,
                data,
                checksum: frame::checksum(data),
            })
            .collect()
    }

    /// Reserves the request's pages before any chunk is sent, as a chunked prefill does at
    /// its first step.
    fn reserve(&self, tx: &mut PdSender) -> Result<PdTransfer, TransferError> {
        let plans: Vec<ChunkPlan<'_>> = self
            .chunks
            .iter()
            .map(|(key, meta, _)| ChunkPlan { key, meta: *meta })
            .collect();
        tx.reserve(&self.id, &plans)
    }

    fn decls(&self) -> Vec<ChunkDecl> {
        self.chunks
            .iter()
            .map(|(k, m, d)| ChunkDecl {
                key: k.clone(),
                meta: *m,
                len: d.len() as u64,
            })
            .collect()
    }

    fn send(&self, tx: &mut PdSender) -> Result<kvrelay::transfer::SendStats, TransferError> {
        tx.send_request(&self.id, &self.refs())
    }

    /// Tokens of the prompt these chunks cut.
    fn tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.1.num_tokens as usize).sum()
    }

    /// Hands every chunk to `sink` in its staging buffers, as a prefiller's save steps do;
    /// returns how many buffers had to be allocated (the others were reused).
    fn stage(&self, sink: &mut PdSink) -> usize {
        let mut window_end = 0;
        let mut allocated = 0;
        for (key, meta, data) in &self.chunks {
            let mut staged = sink
                .staging_buffer(data.len(), |len| {
                    allocated += 1;
                    HostBuffer::zeroed(len)
                })
                .unwrap();
            // A shared staging file the sink made itself: new when never seen before.
            let file = mapped_file(staged.as_ptr());
            if file.starts_with("/dev/shm/kvrelay-stage-")
                && SEEN_STAGING.lock().unwrap().insert(file)
            {
                allocated += 1;
            }
            staged.copy_from_slice(data);
            window_end += meta.num_tokens as usize;
            sink.add(&self.id, key.clone(), *meta, staged, window_end);
        }
        allocated
    }

    /// Consumes every chunk from the receiver and checks it bit for bit.
    fn consume_and_check(&self, rx: &PdReceiver) {
        for (key, meta, data) in &self.chunks {
            let chunk = rx.get(key).expect("chunk present");
            assert_eq!(chunk.meta, *meta);
            assert!(chunk.data[..] == data[..], "chunk bytes differ");
        }
    }
}

/// A proxy stand-in: accepts notification connections and forwards what they say.
fn fake_proxy(secret: Option<&'static [u8]>) -> (u16, mpsc::Receiver<Result<KvReady, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (send, recv) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let note = read_notification(&mut stream, secret).map_err(|e| e.to_string());
            if send.send(note).is_err() {
                return;
            }
        }
    });
    (port, recv)
}

/// Polls `cond` until it holds; fails after a generous bound instead of hanging.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn refused_code<T>(result: Result<T, TransferError>) -> ErrorCode {
    match result {
        Err(TransferError::Refused { code, .. }) => code,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got success"),
    }
}

fn end_to_end(channel: &str) {
    let (proxy_port, notes) = fake_proxy(None);
    let rx = PdReceiver::bind(&config(channel, 16, "", None), 0).unwrap();
    let cfg = config(channel, 16, "", Some(proxy_port));
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let requests = [request("r1", 5, true), request("r-two", 3, false)];
    for r in &requests {
        let stats = r.send(&mut tx).unwrap();
        assert_eq!(stats.chunks, r.chunks.len());
        assert!(stats.notified);
        assert_eq!(stats.channel.as_str(), channel);
        let note = notes
            .recv_timeout(Duration::from_secs(20))
            .unwrap()
            .unwrap();
        assert_eq!(
            note,
            KvReady {
                request_id: r.id.clone(),
                rank: 0,
                failure: None,
            }
        );
        let ready = rx.wait_ready(&r.id, Duration::from_secs(20)).unwrap();
        assert_eq!(ready.chunks, r.chunks.len());
    }
    assert_eq!(rx.occupancy().used_pages, 8);
    for r in &requests {
        r.consume_and_check(&rx);
    }
    // Consumed chunks were dropped, so every page is free again and nothing is left.
    let occ = rx.occupancy();
    assert_eq!((occ.used_pages, occ.requests), (0, 0));
    assert!(rx.get(&requests[0].chunks[0].0).is_none());
}

#[test]
fn tcp_delivers_chunks_bit_exact_and_notifies_the_proxy() {
    end_to_end("tcp");
}

#[test]
fn shm_delivers_chunks_bit_exact_and_notifies_the_proxy() {
    end_to_end("shm");
}

/// A chunk longer than one put (a tcp `Data` frame holds at most 16 MiB) arrives whole.
/// A receiver whose one page holds a chunk of more than one put (16 MiB), and a sender.
fn big_chunk_link(channel: &str) -> (PdConfig, PdReceiver, PdSender) {
    let mut cfg = config(channel, 1, "", None);
    cfg.spec.num_layers = 4;
    cfg.spec.num_kv_heads = 8;
    cfg.spec.head_size = 128;
    cfg.chunk_size = 1100;
    cfg.buffer_size = cfg.page_size() as u64;
    assert!(cfg.page_size() > 16 << 20);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    (cfg, rx, tx)
}

/// The one full chunk of `cfg`, its bytes `data`, as a sender hands it over.
fn big_chunk<'a>(cfg: &PdConfig, key: &'a CacheKey, data: &'a [u8]) -> OutgoingChunk<'a> {
    OutgoingChunk {
        key,
        meta: ChunkMeta {
            layout_fingerprint: cfg.spec.chunk_fingerprint(),
            num_tokens: cfg.chunk_size as u32,
        },
        data,
        checksum: frame::checksum(data),
    }
}

fn one_chunk_in_several_puts(channel: &str) {
    let (cfg, rx, mut tx) = big_chunk_link(channel);
    let mut data = vec![0u8; cfg.page_size()];
    rand::rngs::StdRng::seed_from_u64(5).fill(&mut data[..]);
    let key = CacheKey::new("m", 1, 0, 77, KvDtype::Bf16).unwrap();
    tx.send_request("big", &[big_chunk(&cfg, &key, &data)])
        .unwrap();
    let landed = rx.get(&key).unwrap();
    assert!(landed.data[..] == data[..], "chunk bytes differ");
}

/// A large chunk pulled from shared staging: the receiver copies half of each put's
/// segments on its verify thread and half on its connection thread. It lands whole, and
/// a byte that changed in either half after the checksum was taken fails the send.
#[test]
fn shm_pulls_a_chunk_larger_than_one_put_on_two_threads() {
    let (cfg, rx, mut tx) = big_chunk_link("shm");
    let mut staging = SharedStaging::new(cfg.page_size()).unwrap();
    rand::rngs::StdRng::seed_from_u64(6).fill(&mut staging[..]);
    let key = CacheKey::new("m", 1, 0, 78, KvDtype::Bf16).unwrap();
    let sum = frame::checksum(&staging);
    // The first segment goes to the verify thread, the last stays on the connection's.
    for changed in [0, cfg.page_size() - 1] {
        staging[changed] ^= 1;
        let chunk = OutgoingChunk {
            checksum: sum,
            ..big_chunk(&cfg, &key, &staging)
        };
        let err = tx.send_request("changed", &[chunk]).err().unwrap();
        assert!(
            matches!(err, TransferError::ChunksRejected { rejected: 1, .. }),
            "byte {changed}: {err}"
        );
        staging[changed] ^= 1;
        assert!(rx.get(&key).is_none());
    }
    tx.send_request("big", &[big_chunk(&cfg, &key, &staging)])
        .unwrap();
    let landed = rx.get(&key).unwrap();
    assert!(landed.data[..] == staging[..], "chunk bytes differ");
}

#[test]
fn tcp_moves_a_chunk_larger_than_one_put() {
    one_chunk_in_several_puts("tcp");
}

#[test]
fn shm_moves_a_chunk_larger_than_one_put() {
    one_chunk_in_several_puts("shm");
}

/// The checksum travels from the gather; bytes that changed since (or a wrong checksum)
/// fail the send whole, nothing of the request is loaded, and the link stays usable.
fn stale_checksum(channel: &str) {
    let cfg = config(channel, 4, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let r = request("stale", 3, true);
    let mut chunks = r.refs();
    chunks[2].checksum ^= 1 << 40;
    let err = tx.send_request(&r.id, &chunks).err().unwrap();
    assert!(
        matches!(err, TransferError::ChunksRejected { rejected: 1, .. }),
        "{err}"
    );
    assert!(r.none_loaded(&rx));
    assert_eq!(rx.occupancy().used_pages, 0);
    let again = request("fresh", 3, true);
    again.send(&mut tx).unwrap();
    again.consume_and_check(&rx);
}

#[test]
fn tcp_a_stale_checksum_fails_the_send_and_loads_nothing() {
    stale_checksum("tcp");
}

#[test]
fn shm_a_stale_checksum_fails_the_send_and_loads_nothing() {
    stale_checksum("shm");
}

/// Reserve, then a chunk at a time (out of order, with pauses as prefill steps take):
/// the decoder holds the pages from the reserve, sees nothing until the commit, then
/// every chunk bit for bit.
fn reserve_put_commit(channel: &str) {
    let (proxy_port, notes) = fake_proxy(None);
    let rx = PdReceiver::bind(&config(channel, 8, "", None), 0).unwrap();
    let mut tx =
        PdSender::connect(&config(channel, 8, "", Some(proxy_port)), peer(&rx), 0).unwrap();
    let r = request("chunked", 4, true);
    let mut transfer = r.reserve(&mut tx).unwrap();
    assert_eq!(
        (transfer.request_id(), transfer.num_chunks()),
        ("chunked", 4)
    );
    assert_eq!(rx.occupancy().used_pages, 4);
    let refs = r.refs();
    for i in [1, 0, 3] {
        transfer.put(i, &refs[i]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(matches!(
            rx.wait_ready(&r.id, Duration::from_millis(1)),
            Err(TransferError::WaitTimeout { .. })
        ));
        assert!(rx.get(&r.chunks[i].0).is_none());
    }
    assert!(
        notes.try_recv().is_err(),
        "the proxy heard of the request before its commit"
    );
    transfer.put(2, &refs[2]).unwrap();
    let stats = transfer.commit(&mut tx).unwrap();
    assert_eq!(
        (stats.chunks, stats.bytes),
        (4, r.chunks.iter().map(|c| c.2.len() as u64).sum())
    );
    assert!(stats.notified);
    let note = notes
        .recv_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap();
    assert_eq!((note.request_id.as_str(), note.failure), ("chunked", None));
    assert_eq!(
        rx.wait_ready(&r.id, Duration::from_secs(20))
            .unwrap()
            .chunks,
        4
    );
    r.consume_and_check(&rx);
    // The connection went back to the sender and carries the next request.
    let next = request("next", 2, false);
    next.send(&mut tx).unwrap();
    next.consume_and_check(&rx);
}

#[test]
fn tcp_reserve_put_commit_delivers_bit_exact_only_after_commit() {
    reserve_put_commit("tcp");
}

#[test]
fn shm_reserve_put_commit_delivers_bit_exact_only_after_commit() {
    reserve_put_commit("shm");
}

/// A request that ends mid-prefill (aborted: the transfer is dropped) frees its reserved
/// pages at the decoder, and the chunks it sent early are never loaded.
fn aborted_mid_prefill(channel: &str) {
    let cfg = config(channel, 6, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let r = request("aborted", 5, false);
    let refs = r.refs();
    let mut transfer = r.reserve(&mut tx).unwrap();
    transfer.put(0, &refs[0]).unwrap();
    transfer.put(1, &refs[1]).unwrap();
    assert_eq!(rx.occupancy().used_pages, 5);
    drop(transfer);
    eventually("the aborted request's pages are free", || {
        let occ = rx.occupancy();
        (occ.used_pages, occ.requests) == (0, 0)
    });
    assert!(r.none_loaded(&rx));
    assert!(rx.wait_ready(&r.id, Duration::from_secs(1)).is_err());
    // The sender's idle connection was untouched; the next request goes through.
    let next = request("after-abort", 5, false);
    next.send(&mut tx).unwrap();
    next.consume_and_check(&rx);
}

#[test]
fn tcp_a_request_aborted_mid_prefill_frees_its_reserved_pages() {
    aborted_mid_prefill("tcp");
}

#[test]
fn shm_a_request_aborted_mid_prefill_frees_its_reserved_pages() {
    aborted_mid_prefill("shm");
}

/// A chunk sent early, then a later chunk fails verification: the commit fails and not
/// even the early, intact chunk is loaded.
#[test]
fn a_chunk_sent_early_is_never_loaded_when_the_request_fails_later() {
    for channel in ["tcp", "shm"] {
        let cfg = config(channel, 4, "", None);
        let rx = PdReceiver::bind(&cfg, 0).unwrap();
        let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
        let r = request("fails-late", 3, true);
        let mut refs = r.refs();
        let mut transfer = r.reserve(&mut tx).unwrap();
        transfer.put(0, &refs[0]).unwrap();
        refs[2].checksum ^= 1;
        transfer.put(1, &refs[1]).unwrap();
        transfer.put(2, &refs[2]).unwrap();
        let err = transfer.commit(&mut tx).err().unwrap();
        assert!(
            matches!(err, TransferError::ChunksRejected { rejected: 1, .. }),
            "{err}"
        );
        assert!(
            r.chunks.iter().all(|(k, _, _)| rx.get(k).is_none()),
            "{channel}"
        );
        assert_eq!(rx.occupancy().used_pages, 0, "{channel}");
    }
}

/// Puts that do not match the reserve are typed errors that move nothing and leave the
/// transfer usable; a commit with a chunk missing fails and frees the pages.
#[test]
fn mismatched_puts_and_an_early_commit_are_refused() {
    let cfg = config("tcp", 4, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let r = request("strict", 3, true);
    let other = request("other", 3, false);
    let refs = r.refs();
    let mut transfer = r.reserve(&mut tx).unwrap();
    let bad_index = |res: Result<(), TransferError>| match res {
        Err(TransferError::BadChunk { index, .. }) => index,
        other => panic!("expected BadChunk, got {other:?}"),
    };
    assert_eq!(bad_index(transfer.put(3, &refs[0])), 3);
    assert_eq!(bad_index(transfer.put(0, &other.refs()[0])), 0);
    // Chunk 2 is partial; a full chunk's bytes under its key and meta do not fit.
    let long = OutgoingChunk {
        data: &other.chunks[0].2,
        ..refs[2]
    };
    assert_eq!(bad_index(transfer.put(2, &long)), 2);
    transfer.put(0, &refs[0]).unwrap();
    assert_eq!(bad_index(transfer.put(0, &refs[0])), 0);
    transfer.put(2, &refs[2]).unwrap();
    assert_eq!(bad_index(transfer.commit(&mut tx).map(|_| ())), 1);
    eventually("an unfinished commit frees the pages", || {
        rx.occupancy().used_pages == 0
    });
    assert!(r.none_loaded(&rx));
}

/// `pd_backend_mode: async`: `flush` only queues; the sender thread delivers the KV and
/// notifies the proxy, and tells the proxy when a request cannot be delivered.
#[test]
fn an_async_sink_delivers_in_the_background_and_reports_failures_to_the_proxy() {
    let (proxy_port, notes) = fake_proxy(Some(b"s3cret"));
    let secret = "pd_shared_secret: s3cret\n";
    let rx = PdReceiver::bind(&config("tcp", 4, secret, None), 0).unwrap();
    let mut cfg = config("tcp", 4, secret, Some(proxy_port));
    assert_eq!(cfg.backend_mode, PdBackendMode::Async, "LMCache's default");
    cfg.handshake_timeout = Duration::from_secs(2);
    let mut sink = PdSink::new(cfg, 0).unwrap();
    let target = |alloc: u16, init: u16| PdTarget {
        host: "127.0.0.1".into(),
        init_ports: vec![init],
        alloc_ports: vec![alloc],
    };

    let good = request("good", 3, true);
    good.stage(&mut sink);
    let here = target(rx.alloc_addr().port(), rx.init_addr().port());
    assert!(sink
        .flush(&good.id, Some(here), good.tokens())
        .unwrap()
        .is_none());
    let note = notes
        .recv_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap();
    assert_eq!((note.request_id.as_str(), note.failure), ("good", None));
    good.consume_and_check(&rx);

    // Nobody listens at the second target: the proxy hears why, authenticated.
    // A port nobody listens on: bound, read, released.
    let nowhere = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let lost = request("lost", 2, false);
    lost.stage(&mut sink);
    assert!(sink
        .flush(&lost.id, Some(target(nowhere, nowhere)), lost.tokens())
        .unwrap()
        .is_none());
    let note = notes
        .recv_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap();
    assert_eq!(note.request_id, "lost");
    let failure = note.failure.expect("a failure notification");
    assert!(failure.contains("prefiller rank 0"), "{failure}");
    assert!(failure.contains(&nowhere.to_string()), "{failure}");
    // Dropping the sink waits for the queue: a last request still arrives.
    let last = request("last", 1, false);
    last.stage(&mut sink);
    let here = target(rx.alloc_addr().port(), rx.init_addr().port());
    sink.flush(&last.id, Some(here), last.tokens()).unwrap();
    drop(sink);
    last.consume_and_check(&rx);
}

#[test]
fn a_consumed_chunk_holds_its_page_until_dropped() {
    let cfg = config("tcp", 4, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let r = request("held", 2, false);
    r.send(&mut tx).unwrap();
    let chunk = rx.get(&r.chunks[0].0).unwrap();
    assert!(!rx.contains(&r.chunks[0].0));
    assert!(rx.contains(&r.chunks[1].0));
    assert_eq!(rx.occupancy().used_pages, 2);
    drop(rx.get(&r.chunks[1].0));
    assert_eq!(rx.occupancy().used_pages, 1);
    assert!(chunk.data[..] == r.chunks[0].2[..]);
    drop(chunk);
    assert_eq!(rx.occupancy().used_pages, 0);
}

#[test]
fn a_request_larger_than_the_buffer_is_refused_at_once() {
    let mut tiny = config("tcp", 1, "", None);
    tiny.buffer_size = page() as u64 - 1;
    let err = PdReceiver::bind(&tiny, 0).err().unwrap();
    assert!(matches!(err, TransferError::BufferTooSmall { .. }), "{err}");

    // A long allocation timeout: a wait instead of the immediate refusal would hang here.
    let mut cfg = config("tcp", 2, "", None);
    cfg.allocation_timeout = Duration::from_secs(600);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let err = request("big", 3, false).send(&mut tx);
    assert_eq!(refused_code(err), ErrorCode::RequestTooLarge);
    // The connection survives a refusal.
    request("fits", 2, false).send(&mut tx).unwrap();
}

#[test]
fn allocation_wait_is_bounded_and_ends_in_a_typed_timeout() {
    let cfg = config("tcp", 2, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let full = request("full", 2, false);
    full.send(&mut tx).unwrap();
    let next = request("next", 1, false);
    assert_eq!(
        refused_code(next.send(&mut tx)),
        ErrorCode::AllocationTimeout
    );
    assert_eq!(rx.occupancy().waiting, 0);
    // Consuming frees the pages; the same request then goes through.
    full.consume_and_check(&rx);
    next.send(&mut tx).unwrap();
    next.consume_and_check(&rx);
}

/// A decoder that restarts on the same ports: the sender's link to the old process is
/// dead, and the next request goes through on a fresh link instead of failing on it.
fn a_restarted_receiver_gets_the_next_request(channel: &str) {
    let mut cfg = config(channel, 8, "", None);
    let first = PdReceiver::bind(&cfg, 0).unwrap();
    let mut tx = PdSender::connect(&cfg, peer(&first), 0).unwrap();
    request("before", 2, false).send(&mut tx).unwrap();
    cfg.init_ports = vec![first.init_addr().port()];
    cfg.alloc_ports = vec![first.alloc_addr().port()];
    drop(first);
    let second = PdReceiver::bind(&cfg, 0).unwrap();
    let after = request("after", 2, true);
    after.send(&mut tx).unwrap();
    second.wait_ready("after", Duration::from_secs(20)).unwrap();
    after.consume_and_check(&second);
}

#[test]
fn tcp_a_restarted_receiver_gets_the_next_request() {
    a_restarted_receiver_gets_the_next_request("tcp");
}

#[test]
fn shm_a_restarted_receiver_gets_the_next_request() {
    a_restarted_receiver_gets_the_next_request("shm");
}

/// Two requests whose prompts share chunks, each sent its own copies: a request takes its
/// own copy first, so when it ends (and its leftovers are freed) the other still finds its
/// copy instead of missing and recomputing.
#[test]
fn a_request_loads_its_own_copy_of_a_shared_chunk() {
    let cfg = config("tcp", 8, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let first = request("shared-b", 2, false);
    let second = Request {
        id: "shared-a".into(),
        chunks: first.chunks.clone(),
    };
    // B's copies are ready first, so a plain take would hand them to A.
    first.send(&mut tx).unwrap();
    second.send(&mut tx).unwrap();
    let key = &first.chunks[0].0;
    let a_loads = rx.get_for_request(key, "shared-a").expect("A's chunk");
    drop(a_loads);
    assert!(rx.release("shared-a"), "A still held its second chunk");
    let b_loads = rx
        .get_for_request(key, "shared-b")
        .expect("B's own copy is still there");
    assert_eq!(&b_loads.data[..], &first.chunks[0].2[..]);
}

#[test]
fn duplicate_request_ids_are_refused() {
    let cfg = config("tcp", 8, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let r = request("same", 1, false);
    r.send(&mut tx).unwrap();
    assert_eq!(refused_code(r.send(&mut tx)), ErrorCode::DuplicateRequest);
}

#[test]
fn cancel_and_ttl_free_unconsumed_pages() {
    let cfg = config("shm", 8, "pd_buffer_ttl_sec: 0.2\n", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let cancelled = request("cancel-me", 2, false);
    cancelled.send(&mut tx).unwrap();
    assert!(rx.cancel("cancel-me"));
    assert!(!rx.cancel("cancel-me"));
    assert!(rx.get(&cancelled.chunks[0].0).is_none());
    assert!(matches!(
        rx.wait_ready("cancel-me", Duration::from_secs(1)),
        Err(TransferError::RequestEnded { .. })
    ));
    let abandoned = request("abandoned", 3, false);
    abandoned.send(&mut tx).unwrap();
    // Nobody consumes it: the TTL reclaims its pages.
    eventually("TTL reclaims unconsumed pages", || {
        rx.occupancy().used_pages == 0
    });
    assert!(rx.get(&abandoned.chunks[0].0).is_none());
    assert!(matches!(
        rx.wait_ready("abandoned", Duration::from_secs(1)),
        Err(TransferError::RequestEnded { .. })
    ));
    assert!(matches!(
        rx.wait_ready("never-sent", Duration::from_millis(50)),
        Err(TransferError::WaitTimeout { .. })
    ));
    // Only the TTL reclaim is counted as an expiry, with the pages it freed.
    let occ = rx.occupancy();
    assert_eq!((occ.expired_requests, occ.expired_pages), (1, 3));
}

/// A `sync` sink towards a decoder that announced `skip_last_n_tokens: 1`.
fn skipping_receiver_and_sink(proxy: u16, channel: &str) -> (PdReceiver, PdSink, PdTarget) {
    let mut rx_cfg = config(channel, 8, "", None);
    rx_cfg.skip_last_n_tokens = 1;
    let rx = PdReceiver::bind(&rx_cfg, 0).unwrap();
    let mut tx_cfg = config(channel, 8, "", Some(proxy));
    tx_cfg.backend_mode = PdBackendMode::Sync;
    let sink = PdSink::new(tx_cfg, 0).unwrap();
    let target = PdTarget {
        host: "127.0.0.1".into(),
        init_ports: vec![rx.init_addr().port()],
        alloc_ports: vec![rx.alloc_addr().port()],
    };
    (rx, sink, target)
}

/// Every chunk's key, meta and window end, as chunked prefill knows them at its first step.
fn plan(r: &Request) -> Vec<(CacheKey, ChunkMeta, usize)> {
    let mut end = 0;
    r.chunks
        .iter()
        .map(|(key, meta, _)| {
            end += meta.num_tokens as usize;
            (key.clone(), *meta, end)
        })
        .collect()
}

/// A sink reserves a chunked prefill's pages (only those the decoder looks up) at its
/// first step and sends each chunk as it is added; the flush only commits. A request that
/// ends mid-prefill gives the pages back and loads nothing.
#[test]
fn a_reserved_sink_sends_chunks_as_added_and_commits_at_the_flush() {
    let (proxy, notes) = fake_proxy(None);
    let (rx, mut sink, target) = skipping_receiver_and_sink(proxy, "tcp");
    let r = request("overlap", 4, false);
    sink.reserve(&r.id, plan(&r), Some(target.clone()), r.tokens())
        .unwrap();
    // The decoder skips the last token, so the last chunk is never looked up.
    assert_eq!((rx.occupancy().used_pages, rx.occupancy().requests), (3, 1));
    assert_eq!(r.stage(&mut sink), 4);
    assert!(matches!(
        rx.wait_ready(&r.id, Duration::from_millis(1)),
        Err(TransferError::WaitTimeout { .. })
    ));
    assert!(notes.try_recv().is_err());
    let stats = sink
        .flush(&r.id, Some(target.clone()), r.tokens())
        .unwrap()
        .unwrap();
    assert_eq!((stats.chunks, stats.skipped_chunks), (3, 1));
    let note = notes
        .recv_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap();
    assert_eq!((note.request_id.as_str(), note.failure), ("overlap", None));
    for (key, meta, data) in &r.chunks[..3] {
        let chunk = rx.get(key).expect("chunk present");
        assert_eq!(chunk.meta, *meta);
        assert!(chunk.data[..] == data[..], "chunk bytes differ");
    }
    assert!(rx.get(&r.chunks[3].0).is_none());

    let gone = request("gone", 4, false);
    sink.reserve(&gone.id, plan(&gone), Some(target), gone.tokens())
        .unwrap();
    let (key, meta, data) = &gone.chunks[0];
    let mut staged = HostBuffer::zeroed(data.len()).unwrap();
    staged.copy_from_slice(data);
    sink.add(&gone.id, key.clone(), *meta, staged, CHUNK_TOKENS);
    sink.forget(&gone.id);
    eventually("a forgotten reservation frees its pages", || {
        rx.occupancy().used_pages == 0
    });
    assert!(gone.none_loaded(&rx));
}

/// A sink gathers later requests into the staging buffers of chunks it sent or forgot, and
/// what arrives is still exactly each request's own bytes. Over shm those buffers are
/// shared staging files, which the receiver pulls from.
#[test]
fn a_sink_reuses_the_staging_of_sent_chunks() {
    for channel in ["tcp", "shm"] {
        sink_reuses_staging(channel);
    }
}

fn sink_reuses_staging(channel: &str) {
    let (proxy, notes) = fake_proxy(None);
    let (rx, mut sink, target) = skipping_receiver_and_sink(proxy, channel);
    let probe = sink.staging_buffer(4096, HostBuffer::zeroed).unwrap();
    let file = mapped_file(probe.as_ptr());
    let shared = file.starts_with("/dev/shm/kvrelay-stage-");
    assert_eq!(shared, channel == "shm", "{channel} staging in {file:?}");
    drop(probe);
    let first = request("first", 3, false);
    assert_eq!(first.stage(&mut sink), 3);
    sink.flush(&first.id, Some(target.clone()), first.tokens() + 1)
        .unwrap()
        .unwrap();
    first.consume_and_check(&rx);
    // Three full chunks reuse the first request's buffers; the 5-token tail is new.
    let second = request("second", 4, true);
    assert_eq!(second.stage(&mut sink), 1);
    sink.flush(&second.id, Some(target.clone()), second.tokens() + 1)
        .unwrap()
        .unwrap();
    second.consume_and_check(&rx);
    // A forgotten request's buffers come back too.
    let dropped = request("dropped", 2, false);
    assert_eq!(dropped.stage(&mut sink), 0);
    sink.forget(&dropped.id);
    let third = request("third", 3, false);
    assert_eq!(third.stage(&mut sink), 0);
    sink.flush(&third.id, Some(target), third.tokens() + 1)
        .unwrap()
        .unwrap();
    third.consume_and_check(&rx);
    for id in ["first", "second", "third"] {
        let note = notes
            .recv_timeout(Duration::from_secs(20))
            .unwrap()
            .unwrap();
        assert_eq!((note.request_id.as_str(), note.failure), (id, None));
    }
}

#[test]
fn a_sink_sends_only_the_chunks_the_decoders_lookup_asks_for() {
    let (proxy, notes) = fake_proxy(None);
    let (rx, mut sink, target) = skipping_receiver_and_sink(proxy, "tcp");
    let heard = |id: &str| {
        let note = notes
            .recv_timeout(Duration::from_secs(20))
            .unwrap()
            .unwrap();
        assert_eq!((note.request_id.as_str(), note.failure), (id, None));
    };

    // 16 + 16 + 5 tokens, handed to the decoder as they are: its lookup covers 36 tokens,
    // so the 5-token tail (keyed over 5 tokens, looked up over 4) is never asked for.
    let tail = request("tail", 3, true);
    tail.stage(&mut sink);
    let stats = sink
        .flush(&tail.id, Some(target.clone()), tail.tokens())
        .unwrap()
        .unwrap();
    assert_eq!((stats.chunks, stats.skipped_chunks), (2, 1));
    heard("tail");
    assert!(rx.contains(&tail.chunks[1].0));
    assert!(!rx.contains(&tail.chunks[2].0));
    assert_eq!(rx.occupancy().used_pages, 2);

    // Two full chunks: the second ends past the lookup (31 tokens), so it stays behind.
    let full = request("full", 2, false);
    full.stage(&mut sink);
    let stats = sink
        .flush(&full.id, Some(target.clone()), full.tokens())
        .unwrap()
        .unwrap();
    assert_eq!((stats.chunks, stats.skipped_chunks), (1, 1));
    heard("full");

    // With the first token appended (ret_first_tok) the lookup reaches the prompt's end.
    let appended = request("appended", 3, true);
    appended.stage(&mut sink);
    let stats = sink
        .flush(&appended.id, Some(target.clone()), appended.tokens() + 1)
        .unwrap()
        .unwrap();
    assert_eq!((stats.chunks, stats.skipped_chunks), (3, 0));
    heard("appended");

    // A prompt shorter than one chunk sends nothing: no page, no request at the receiver,
    // yet the proxy hears it is done.
    let used = rx.occupancy();
    let short = request("short", 1, true);
    short.stage(&mut sink);
    let stats = sink
        .flush(&short.id, Some(target), short.tokens())
        .unwrap()
        .unwrap();
    assert_eq!((stats.chunks, stats.bytes, stats.skipped_chunks), (0, 0, 1));
    assert!(stats.notified);
    heard("short");
    let after = rx.occupancy();
    assert_eq!(
        (after.used_pages, after.requests),
        (used.used_pages, used.requests)
    );
    assert!(matches!(
        rx.wait_ready("short", Duration::from_millis(50)),
        Err(TransferError::WaitTimeout { .. })
    ));
    assert_eq!(sink.skipped_chunks(), 3);
}

#[test]
fn a_request_cancelled_before_its_transfer_arrives_is_refused_at_reserve() {
    let mut cfg = config("tcp", 2, "", None);
    cfg.allocation_timeout = Duration::from_secs(60);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    assert!(!rx.cancel("early"), "not in the buffer");
    let early = request("early", 1, false);
    assert_eq!(refused_code(early.send(&mut tx)), ErrorCode::Cancelled);
    assert_eq!(rx.occupancy().used_pages, 0);
    // The link survives the refusal.
    let full = request("full", 2, false);
    full.send(&mut tx).unwrap();

    // Cancelled while waiting for pages: refused at once, not after the 60 s timeout.
    let waiting = std::thread::spawn({
        let cfg = cfg.clone();
        let peer = peer(&rx);
        move || {
            let mut tx = PdSender::connect(&cfg, peer, 0).unwrap();
            request("waiter", 1, false).send(&mut tx)
        }
    });
    eventually("the second request waits for pages", || {
        rx.occupancy().waiting == 1
    });
    let started = Instant::now();
    assert!(!rx.cancel("waiter"));
    assert_eq!(refused_code(waiting.join().unwrap()), ErrorCode::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(rx.occupancy().used_pages, 2, "only `full` holds pages");
}

#[test]
fn a_request_that_ends_frees_the_kv_it_did_not_consume() {
    let cfg = config("shm", 8, "", None);
    let rx = Arc::new(PdReceiver::bind(&cfg, 0).unwrap());
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let r = request("partly-loaded", 3, true);
    r.send(&mut tx).unwrap();
    let tiers = TierStack::new(vec![
        Arc::new(ReceivedKv::new(Arc::clone(&rx))) as Arc<dyn Tier>
    ]);
    let loaded = tiers
        .get(&r.chunks[0].0, spec().chunk_fingerprint())
        .unwrap();
    assert_eq!(rx.occupancy().used_pages, 3);
    tiers.release_request(&r.id, RequestIdScope::Shared);
    assert!(!rx.contains(&r.chunks[1].0));
    // The chunk being loaded keeps its page until the load drops it.
    assert_eq!(rx.occupancy().used_pages, 1);
    drop(loaded);
    let occ = rx.occupancy();
    assert_eq!(
        (occ.used_pages, occ.requests, occ.expired_requests),
        (0, 0, 0)
    );
    // The same id sent again (a late duplicate) is refused.
    assert_eq!(refused_code(r.send(&mut tx)), ErrorCode::Cancelled);

    // An engine's own id may be another engine's: releasing it frees what it holds but
    // does not refuse KV that comes under it later.
    let local = request("local-id", 2, false);
    tiers.release_request(&local.id, RequestIdScope::Local);
    local.send(&mut tx).unwrap();
    assert_eq!(rx.occupancy().used_pages, 2);
    tiers.release_request(&local.id, RequestIdScope::Local);
    assert_eq!(rx.occupancy().used_pages, 0);
}

#[test]
fn handshake_refuses_a_sender_that_derives_other_keys_naming_both_values() {
    let cfg = config("tcp", 4, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let derive = |model: &str, world: u32, dtype: KvDtype, algorithm, seed: &str, chunk| {
        let hasher = ChunkHasher::new(algorithm, seed, chunk).unwrap();
        KeyDerivation::new(model, world, dtype, &hasher).unwrap()
    };
    let sha = HashAlgorithm::Sha256Cbor;
    for (keys, expected) in [
        (
            derive("m", 1, KvDtype::Bf16, sha, "0", 8),
            "chunk_size: sender 8, receiver 16".to_string(),
        ),
        (
            derive("m", 1, KvDtype::Bf16, HashAlgorithm::Xxh3_128, "0", 16),
            "hash algorithm: sender xxh3_128, receiver sha256_cbor".to_string(),
        ),
        (
            derive("other-model", 1, KvDtype::Bf16, sha, "0", 16),
            "model: sender other-model, receiver m".to_string(),
        ),
        (
            derive("m", 2, KvDtype::Bf16, sha, "0", 16),
            "world_size: sender 2, receiver 1".to_string(),
        ),
        (
            derive("m", 1, KvDtype::F16, sha, "0", 16),
            "kv dtype: sender half, receiver bfloat16".to_string(),
        ),
        (
            derive("m", 1, KvDtype::Bf16, sha, "42", 16),
            format!(
                "sender {:#018x}, receiver {:#018x}",
                derive("m", 1, KvDtype::Bf16, sha, "42", 16).none_hash,
                keys().none_hash
            ),
        ),
    ] {
        let mut other = cfg.clone();
        // The sender's whole config follows its keys, as build_connector makes it.
        other.chunk_size = keys.chunk_size as usize;
        other.spec.dtype = keys.dtype;
        other.keys = keys;
        match PdSender::connect(&other, peer(&rx), 0) {
            Err(TransferError::Refused { code, message }) => {
                assert_eq!(code, ErrorCode::KeyMismatch, "{message}");
                assert!(message.contains(&expected), "{message}");
            }
            Err(other) => panic!("expected a KeyMismatch refusal, got {other}"),
            Ok(_) => panic!("a sender deriving other keys was accepted: {expected}"),
        }
    }
    // A sender deriving the same keys is welcome.
    PdSender::connect(&cfg, peer(&rx), 0).unwrap();
}

#[test]
fn mismatched_chunks_are_rejected_before_any_byte_moves() {
    let cfg = config("tcp", 8, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let mut r = request("bad", 2, false);
    r.chunks[1].1.layout_fingerprint ^= 1;
    assert!(matches!(
        r.send(&mut tx),
        Err(TransferError::BadChunk { index: 1, .. })
    ));
    let mut r = request("short", 2, false);
    r.chunks[0].2.pop();
    assert!(matches!(
        r.send(&mut tx),
        Err(TransferError::BadChunk { index: 0, .. })
    ));
    assert_eq!(rx.occupancy().used_pages, 0);
}

// ---- hand-rolled peers ----

fn send(stream: &mut TcpStream, m: &Message) {
    stream.write_all(&m.encode()).unwrap();
}

fn recv(stream: &mut TcpStream) -> Message {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    match read_frame(stream, frame::MAX_CONTROL_BODY).unwrap() {
        Incoming::Message(m) => m,
        Incoming::Data(..) => panic!("unexpected data frame"),
    }
}

fn hello(channel: ChannelKind) -> Message {
    Message::Hello {
        rank: 0,
        channel,
        page_size: page() as u64,
        fingerprint: spec().chunk_fingerprint(),
        keys: keys(),
        nonce: [7; NONCE_LEN],
    }
}

/// Opens the init port, says Hello, and returns the connection and whether the receiver
/// asked for the shared secret.
fn raw_hello(rx: &PdReceiver, channel: ChannelKind) -> (TcpStream, bool) {
    let mut init = TcpStream::connect(rx.init_addr()).unwrap();
    send(&mut init, &hello(channel));
    match recv(&mut init) {
        Message::Challenge { auth_required, .. } => (init, auth_required),
        other => panic!("expected a challenge, got {other:?}"),
    }
}

/// Handshakes without a secret and returns an attached alloc connection.
fn raw_attach(rx: &PdReceiver, channel: ChannelKind) -> TcpStream {
    let (mut init, auth_required) = raw_hello(rx, channel);
    assert!(!auth_required);
    send(
        &mut init,
        &Message::Auth {
            proof: [0; MAC_LEN],
        },
    );
    let Message::Welcome { token, .. } = recv(&mut init) else {
        panic!("no welcome")
    };
    let mut alloc = TcpStream::connect(rx.alloc_addr()).unwrap();
    send(&mut alloc, &Message::Attach { token });
    alloc
}

/// Attaches over `channel` (see [`raw_attach`]), asks for `r`'s pages, and returns the
/// alloc connection and the grant id.
fn raw_grant(rx: &PdReceiver, channel: ChannelKind, r: &Request) -> (TcpStream, u32) {
    let mut alloc = raw_attach(rx, channel);
    send(
        &mut alloc,
        &Message::AllocRequest {
            request_id: r.id.clone(),
            chunks: r.decls(),
        },
    );
    match recv(&mut alloc) {
        Message::AllocGrant { grant, .. } => (alloc, grant),
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// Writes one `Data` frame: `bytes` at `offset` of chunk `chunk`.
fn send_piece(alloc: &mut TcpStream, grant: u32, chunk: u32, offset: usize, bytes: &[u8]) {
    let d = DataHeader {
        grant,
        chunk,
        offset: offset as u64,
    };
    alloc
        .write_all(&data_prefix(&d, bytes.len() as u32))
        .unwrap();
    alloc.write_all(bytes).unwrap();
}

/// Sends the `Seal` of chunk `chunk` with `checksum`.
fn seal(alloc: &mut TcpStream, grant: u32, chunk: u32, checksum: u64) {
    let seal = Message::Seal {
        grant,
        chunk,
        checksum,
    };
    send(alloc, &seal);
}

/// Reads the reply to a `Commit`: the chunks verified and rejected.
fn committed(alloc: &mut TcpStream) -> (u32, u32) {
    match recv(alloc) {
        Message::Committed {
            verified, rejected, ..
        } => (verified, rejected),
        other => panic!("expected Committed, got {other:?}"),
    }
}

/// Reads until the peer closes; returns the `Error` frame it sent first, if any.
fn closed_with(stream: &mut TcpStream) -> Option<ErrorCode> {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let code = match read_frame(stream, frame::MAX_CONTROL_BODY) {
        Ok(Incoming::Message(Message::Error { code, .. })) => Some(code),
        _ => None,
    };
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    code
}

#[test]
fn sender_dropped_mid_transfer_frees_its_pages_and_the_receiver_keeps_serving() {
    for channel in [ChannelKind::Tcp, ChannelKind::Shm] {
        let cfg = config(channel.as_str(), 8, "", None);
        let rx = PdReceiver::bind(&cfg, 0).unwrap();
        let r = request("dies", 3, false);
        let (mut alloc, grant) = raw_grant(&rx, channel, &r);
        assert_eq!(rx.occupancy().used_pages, 3);
        if channel == ChannelKind::Tcp {
            // Half of the first chunk, then the sender vanishes.
            send_piece(&mut alloc, grant, 0, 0, &r.chunks[0].2[..page() / 2]);
        }
        drop(alloc);
        eventually("pages of the dead sender are freed", || {
            rx.occupancy().used_pages == 0
        });
        assert!(matches!(
            rx.wait_ready("dies", Duration::from_secs(1)),
            Err(TransferError::RequestEnded { .. })
        ));
        // A real sender is served afterwards, even with the same request id.
        let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
        r.send(&mut tx).unwrap();
        r.consume_and_check(&rx);
    }
}

#[test]
fn garbage_and_truncated_frames_close_only_their_connection() {
    let cfg = config("tcp", 8, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let hello = hello(ChannelKind::Tcp).encode();
    let mut huge = frame::header(frame::MsgType::Hello, u32::MAX).to_vec();
    huge.extend_from_slice(&[0; 64]);
    let inputs: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0xff; 4096],
        hello[..hello.len() - 3].to_vec(),
        hello[..5].to_vec(),
        huge,
        Message::Commit { grant: 0 }.encode(),
    ];
    for addr in [rx.init_addr(), rx.alloc_addr()] {
        // A peer that connects and says nothing must not block the others.
        let _silent = TcpStream::connect(addr).unwrap();
        for bytes in &inputs {
            let mut s = TcpStream::connect(addr).unwrap();
            // The receiver may close before it read everything: writes are best effort.
            let _ = s.write_all(bytes);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = closed_with(&mut s);
        }
    }
    // A frame with a wrong magic gets a Protocol error frame back before the close.
    let mut s = TcpStream::connect(rx.init_addr()).unwrap();
    s.write_all(b"XXXX\x01\x01\x00\x00\x00\x00\x00\x00")
        .unwrap();
    assert_eq!(closed_with(&mut s), Some(ErrorCode::Protocol));
    // An attach with a made-up session token is refused.
    let mut s = TcpStream::connect(rx.alloc_addr()).unwrap();
    send(&mut s, &Message::Attach { token: [9; 16] });
    assert_eq!(closed_with(&mut s), Some(ErrorCode::BadSession));

    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let r = request("after-garbage", 2, true);
    r.send(&mut tx).unwrap();
    r.consume_and_check(&rx);
}

#[test]
fn out_of_bounds_data_is_rejected_and_nothing_lands_outside_the_grant() {
    let cfg = config("tcp", 8, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    // A committed request whose pages a hostile frame would hit if it were not checked.
    let victim = request("victim", 4, false);
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    victim.send(&mut tx).unwrap();

    let r = request("hostile", 1, true);
    let len = r.chunks[0].2.len() as u64;
    let hostile: Vec<(DataHeader, u32)> = vec![
        // Past the chunk's declared length (but inside the page).
        (
            DataHeader {
                grant: 0,
                chunk: 0,
                offset: 0,
            },
            len as u32 + 1,
        ),
        // A chunk the grant does not have.
        (
            DataHeader {
                grant: 0,
                chunk: 1,
                offset: 0,
            },
            16,
        ),
        // An offset far outside the page.
        (
            DataHeader {
                grant: 0,
                chunk: 0,
                offset: 3 * page() as u64,
            },
            16,
        ),
        (
            DataHeader {
                grant: 0,
                chunk: 0,
                offset: u64::MAX - 4,
            },
            16,
        ),
        // Someone else's grant.
        (
            DataHeader {
                grant: 77,
                chunk: 0,
                offset: 0,
            },
            16,
        ),
    ];
    for (mut d, n) in hostile {
        let (mut alloc, grant) = raw_grant(&rx, ChannelKind::Tcp, &r);
        if d.grant == 0 {
            d.grant = grant;
        }
        let _ = alloc.write_all(&data_prefix(&d, n));
        let _ = alloc.write_all(&vec![0xAB; n as usize]);
        assert_eq!(
            closed_with(&mut alloc),
            Some(ErrorCode::Protocol),
            "{d:?} accepted"
        );
        eventually("hostile grant freed", || rx.occupancy().used_pages == 4);
    }
    // Sealing a chunk whose bytes never came, and committing early, are refused too.
    let (mut alloc, grant) = raw_grant(&rx, ChannelKind::Tcp, &r);
    send(&mut alloc, &Message::Commit { grant });
    assert_eq!(closed_with(&mut alloc), Some(ErrorCode::Protocol));
    let (mut alloc, grant) = raw_grant(&rx, ChannelKind::Tcp, &r);
    seal(&mut alloc, grant, 0, 0);
    assert_eq!(closed_with(&mut alloc), Some(ErrorCode::Protocol));

    eventually("hostile grants freed", || rx.occupancy().used_pages == 4);
    victim.consume_and_check(&rx);
}

#[test]
fn a_checksum_mismatch_is_a_miss_never_loaded() {
    let cfg = config("tcp", 8, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let r = request("corrupt", 2, false);
    let (mut alloc, grant) = raw_grant(&rx, ChannelKind::Tcp, &r);
    for (i, (_, _, data)) in r.chunks.iter().enumerate() {
        send_piece(&mut alloc, grant, i as u32, 0, data);
        let mut checksum = frame::checksum(data);
        if i == 1 {
            checksum ^= 1;
        }
        seal(&mut alloc, grant, i as u32, checksum);
    }
    send(&mut alloc, &Message::Commit { grant });
    assert_eq!(committed(&mut alloc), (1, 1));
    // The whole request is dropped: no chunk of it is ever loaded.
    assert!(r.none_loaded(&rx));
    assert_eq!(rx.occupancy().used_pages, 0);
    assert!(matches!(
        rx.wait_ready("corrupt", Duration::from_secs(1)),
        Err(TransferError::RequestEnded { .. })
    ));
}

/// Sends every chunk of `r` layer by layer, as a prefiller does that sends each layer as
/// soon as it is computed: per layer, the V slice of one chunk, then the K slice of
/// another, across all chunks; then seals them, last chunk first, with
/// `checksum(chunk, data)`, and commits.
fn send_by_layer(
    alloc: &mut TcpStream,
    grant: u32,
    r: &Request,
    checksum: impl Fn(usize, &[u8]) -> u64,
) {
    let n = r.chunks.len();
    for layer in 0..spec().num_layers {
        for i in (0..n).rev() {
            let (v_chunk, k_chunk) = (i, n - 1 - i);
            let [_, v_slice] = r.layer_slices(v_chunk, layer);
            let v = &r.chunks[v_chunk].2;
            send_piece(alloc, grant, v_chunk as u32, v_slice.start, &v[v_slice]);
            let [k_slice, _] = r.layer_slices(k_chunk, layer);
            let k = &r.chunks[k_chunk].2;
            send_piece(alloc, grant, k_chunk as u32, k_slice.start, &k[k_slice]);
        }
    }
    for (i, (_, _, data)) in r.chunks.iter().enumerate().rev() {
        let checksum = checksum(i, data);
        seal(alloc, grant, i as u32, checksum);
    }
    send(alloc, &Message::Commit { grant });
}

#[test]
fn tcp_chunks_arriving_layer_by_layer_interleaved_land_bit_exact() {
    // Two chunks hash in line; 2100 (over 4 MiB) on the verify thread.
    for n in [2, 2100] {
        let cfg = config("tcp", n, "", None);
        let rx = PdReceiver::bind(&cfg, 0).unwrap();
        let r = request(&format!("by-layer-{n}"), n, true);
        let (mut alloc, grant) = raw_grant(&rx, ChannelKind::Tcp, &r);
        send_by_layer(&mut alloc, grant, &r, |_, data| frame::checksum(data));
        assert_eq!(committed(&mut alloc), (n as u32, 0), "{n} chunks");
        r.consume_and_check(&rx);
    }
}

#[test]
fn tcp_a_wrong_checksum_of_a_chunk_sent_by_layer_is_a_miss() {
    let cfg = config("tcp", 4, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let r = request("by-layer-corrupt", 2, false);
    let (mut alloc, grant) = raw_grant(&rx, ChannelKind::Tcp, &r);
    send_by_layer(&mut alloc, grant, &r, |i, data| {
        frame::checksum(data) ^ u64::from(i == 0)
    });
    assert_eq!(committed(&mut alloc), (1, 1));
    assert!(r.none_loaded(&rx));
    assert_eq!(rx.occupancy().used_pages, 0);
}

/// Sends a `Landed` frame: `len` bytes at `offset` of chunk `chunk` are in the page.
fn announce(alloc: &mut TcpStream, grant: u32, chunk: u32, offset: usize, len: usize) {
    let landed = Message::Landed {
        grant,
        chunk,
        offset: offset as u64,
        len: len as u32,
    };
    send(alloc, &landed);
}

/// An shm receiver counts a chunk's bytes only once the sender announced them, once each:
/// a seal before the announcements, an announcement past the chunk or over bytes already
/// announced, and a tcp `Data` frame all end the grant; a tcp receiver refuses `Landed`.
#[test]
fn shm_bytes_count_once_announced_and_tcp_refuses_announcements() {
    let r = request("announced", 2, false);
    let len = r.chunks[0].2.len();
    let cfg = config("shm", 4, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    type Hostile = fn(&mut TcpStream, u32, usize);
    let hostile: [(&str, Hostile); 4] = [
        ("a seal before any announcement", |a, g, _| seal(a, g, 0, 0)),
        ("an announcement past the chunk", |a, g, len| {
            announce(a, g, 0, 1, len)
        }),
        ("bytes announced twice", |a, g, len| {
            announce(a, g, 0, 0, len / 2 + 1);
            announce(a, g, 0, len / 2, len / 2);
        }),
        ("a tcp Data frame", |a, g, _| {
            send_piece(a, g, 0, 0, &[0; 64])
        }),
    ];
    for (what, send_hostile) in hostile {
        let (mut alloc, grant) = raw_grant(&rx, ChannelKind::Shm, &r);
        send_hostile(&mut alloc, grant, len);
        assert_eq!(
            closed_with(&mut alloc),
            Some(ErrorCode::Protocol),
            "{what} accepted"
        );
        eventually("the grant is freed", || rx.occupancy().used_pages == 0);
    }
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    r.send(&mut tx).unwrap();
    r.consume_and_check(&rx);

    let cfg = config("tcp", 4, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let (mut alloc, grant) = raw_grant(&rx, ChannelKind::Tcp, &r);
    announce(&mut alloc, grant, 0, 0, len);
    assert_eq!(closed_with(&mut alloc), Some(ErrorCode::Protocol));
    eventually("the grant is freed", || rx.occupancy().used_pages == 0);
}

fn pull(
    alloc: &mut TcpStream,
    grant: u32,
    chunk: u32,
    offset: usize,
    len: usize,
    source: (&str, usize),
) {
    let pull = Message::Pull {
        grant,
        chunk,
        offset: offset as u64,
        len: len as u32,
        source: source.0.into(),
        source_offset: source.1 as u64,
    };
    send(alloc, &pull);
}

/// Chunks staged in a `SharedStaging` file are pulled by an shm receiver, which copies and
/// hashes them in one pass: the bytes arrive whole, and a chunk whose staging does not match
/// its checksum is rejected. A pull naming anything but a staging file, or bytes past its
/// end, ends the grant; a tcp receiver refuses pulls.
#[test]
fn shm_receivers_pull_from_shared_staging_and_refuse_other_sources() {
    // A partial tail: its last segment is shorter than a stripe multiple.
    let r = request("pulled", 3, true);
    let total: usize = r.chunks.iter().map(|c| c.2.len()).sum();
    // One byte in: no chunk starts aligned in the file.
    let mut staging = SharedStaging::new(total + 1).unwrap();
    let mut at = 1;
    let mut placed = Vec::new();
    for (_, _, data) in &r.chunks {
        staging[at..at + data.len()].copy_from_slice(data);
        placed.push(at..at + data.len());
        at += data.len();
    }
    let cfg = config("shm", 4, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let refs: Vec<OutgoingChunk<'_>> = r
        .refs()
        .into_iter()
        .zip(&placed)
        .map(|(c, range)| OutgoingChunk {
            data: &staging[range.clone()],
            ..c
        })
        .collect();
    tx.send_request(&r.id, &refs).unwrap();
    r.consume_and_check(&rx);

    // By hand, so the test knows the bytes were pulled rather than copied by the sender:
    // chunk 0 in two pulls cut inside a checksum segment, then, in a second grant, chunk 1
    // pulled from chunk 0's bytes, which do not match chunk 1's checksum.
    let path = staging_path(&staging);
    let len = r.chunks[0].2.len();
    let cut = len / 2 + 3;
    for wrong_source in [false, true] {
        let (mut alloc, grant) = raw_grant(&rx, ChannelKind::Shm, &r);
        pull(&mut alloc, grant, 0, 0, cut, (&path, placed[0].start));
        let rest = (&path[..], placed[0].start + cut);
        pull(&mut alloc, grant, 0, cut, len - cut, rest);
        let chunk1 = placed[usize::from(!wrong_source)].start;
        pull(&mut alloc, grant, 1, 0, len, (&path, chunk1));
        let tail = r.chunks[2].2.len();
        pull(&mut alloc, grant, 2, 0, tail, (&path, placed[2].start));
        for (i, (_, _, data)) in r.chunks.iter().enumerate() {
            seal(&mut alloc, grant, i as u32, frame::checksum(data));
        }
        send(&mut alloc, &Message::Commit { grant });
        if wrong_source {
            assert_eq!(committed(&mut alloc), (2, 1));
            assert!(
                rx.get(&r.chunks[0].0).is_none(),
                "a rejected request loaded"
            );
        } else {
            assert_eq!(committed(&mut alloc), (3, 0));
            r.consume_and_check(&rx);
        }
        eventually("the pages are freed", || rx.occupancy().used_pages == 0);
    }

    let pd_file = format!("/dev/shm/kvrelay-pd-{}-0-00", std::process::id());
    let hostile: [(&str, (&str, usize)); 4] = [
        ("a path outside /dev/shm", ("/etc/passwd", 0)),
        ("a PD buffer instead of staging", (&pd_file, 0)),
        (
            "a staging file that does not exist",
            ("/dev/shm/kvrelay-stage-1-00", 0),
        ),
        (
            "bytes past the staging file's end",
            (&path, total + 1 - len / 2),
        ),
    ];
    for (what, source) in hostile {
        let (mut alloc, grant) = raw_grant(&rx, ChannelKind::Shm, &r);
        pull(&mut alloc, grant, 0, 0, len, source);
        assert_eq!(
            closed_with(&mut alloc),
            Some(ErrorCode::Protocol),
            "{what} accepted"
        );
        eventually("the grant is freed", || rx.occupancy().used_pages == 0);
    }

    let cfg = config("tcp", 4, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let (mut alloc, grant) = raw_grant(&rx, ChannelKind::Tcp, &r);
    pull(&mut alloc, grant, 0, 0, len, (&path, placed[0].start));
    assert_eq!(closed_with(&mut alloc), Some(ErrorCode::Protocol));
    eventually("the grant is freed", || rx.occupancy().used_pages == 0);
}

/// The file behind `staging`, found by its mapping in /proc/self/maps.
fn staging_path(staging: &SharedStaging) -> String {
    let path = mapped_file(staging.as_ptr());
    assert!(!path.is_empty(), "the staging file is mapped");
    path
}

/// Shared staging files `Request::stage` was handed so far.
static SEEN_STAGING: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());

/// The file mapped at `at` (empty for anonymous memory), from /proc/self/maps.
fn mapped_file(at: *const u8) -> String {
    let at = at as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .find_map(|line| {
            let (range, rest) = line.split_once(' ')?;
            let (start, end) = range.split_once('-')?;
            let (start, end) = (
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            );
            let path = rest.split_whitespace().nth(4).unwrap_or("");
            (start <= at && at < end).then(|| path.to_string())
        })
        .expect("the address is mapped")
}

#[test]
fn tcp_overlapping_pieces_and_a_seal_before_the_gaps_fill_end_the_grant() {
    let cfg = config("tcp", 4, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let r = request("by-layer-hostile", 2, false);
    let data = &r.chunks[0].2;
    let [k, v] = r.layer_slices(0, 0);
    let half = k.len() / 2;
    let overlapping = [
        // Into bytes that arrived in order.
        (k.start + half, k.len()),
        // Into a slice that arrived early.
        (v.start - half, k.len()),
        (v.start + half, 1),
    ];
    for (offset, len) in overlapping {
        let (mut alloc, grant) = raw_grant(&rx, ChannelKind::Tcp, &r);
        send_piece(&mut alloc, grant, 1, v.start, &data[v.clone()]);
        send_piece(&mut alloc, grant, 0, v.start, &data[v.clone()]);
        send_piece(&mut alloc, grant, 0, k.start, &data[k.clone()]);
        // The receiver may close before it read the payload: writes are best effort.
        let d = DataHeader {
            grant,
            chunk: 0,
            offset: offset as u64,
        };
        let _ = alloc.write_all(&data_prefix(&d, len as u32));
        let _ = alloc.write_all(&data[offset..offset + len]);
        assert_eq!(
            closed_with(&mut alloc),
            Some(ErrorCode::Protocol),
            "{len} bytes at {offset} accepted"
        );
        eventually("the grant is freed", || rx.occupancy().used_pages == 0);
    }
    // Every byte but one layer's K slice: the chunk cannot be sealed yet.
    let (mut alloc, grant) = raw_grant(&rx, ChannelKind::Tcp, &r);
    for layer in 1..spec().num_layers {
        for slice in r.layer_slices(0, layer) {
            send_piece(&mut alloc, grant, 0, slice.start, &data[slice]);
        }
    }
    send_piece(&mut alloc, grant, 0, v.start, &data[v.clone()]);
    seal(&mut alloc, grant, 0, frame::checksum(data));
    assert_eq!(closed_with(&mut alloc), Some(ErrorCode::Protocol));
    eventually("the grant is freed", || rx.occupancy().used_pages == 0);
    // The receiver still serves a well-behaved sender.
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    r.send(&mut tx).unwrap();
    r.consume_and_check(&rx);
}

#[test]
fn wrong_shared_secret_is_rejected() {
    let secret = "pd_shared_secret: alpha\n";
    let rx = PdReceiver::bind(&config("tcp", 4, secret, None), 0).unwrap();
    for other in ["pd_shared_secret: beta\n", ""] {
        let cfg = config("tcp", 4, other, None);
        let err = PdSender::connect(&cfg, peer(&rx), 0).err().unwrap();
        assert!(matches!(err, TransferError::AuthFailed(_)), "{err}");
    }
    // A sender that ignores the challenge and sends a bad proof is refused by the receiver.
    let (mut init, auth_required) = raw_hello(&rx, ChannelKind::Tcp);
    assert!(auth_required);
    send(
        &mut init,
        &Message::Auth {
            proof: [0x5a; MAC_LEN],
        },
    );
    assert_eq!(closed_with(&mut init), Some(ErrorCode::AuthFailed));
    // A sender that does not hold the secret also sees a receiver that does not hold it.
    let open_rx = PdReceiver::bind(&config("tcp", 4, "", None), 0).unwrap();
    let err = PdSender::connect(&config("tcp", 4, secret, None), peer(&open_rx), 0)
        .err()
        .unwrap();
    assert!(matches!(err, TransferError::AuthFailed(_)), "{err}");

    // The right secret works, and the proxy can check the notification's MAC.
    let (proxy_port, notes) = fake_proxy(Some(b"alpha"));
    let cfg = config("tcp", 4, secret, Some(proxy_port));
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    let r = request("authed", 2, false);
    r.send(&mut tx).unwrap();
    assert_eq!(
        notes
            .recv_timeout(Duration::from_secs(20))
            .unwrap()
            .unwrap()
            .request_id,
        "authed"
    );
    r.consume_and_check(&rx);
    let (proxy_port, notes) = fake_proxy(Some(b"alpha"));
    let unsigned = config("tcp", 4, "", Some(proxy_port));
    let mut tx = PdSender::connect(&unsigned, peer(&open_rx), 0).unwrap();
    request("unsigned", 1, false).send(&mut tx).unwrap();
    assert!(notes
        .recv_timeout(Duration::from_secs(20))
        .unwrap()
        .is_err());
}

#[test]
fn handshake_refuses_mismatched_geometry_rank_and_channel() {
    let cfg = config("tcp", 4, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let mut other = cfg.clone();
    other.spec.num_layers = 3;
    assert_eq!(
        refused_code(PdSender::connect(&other, peer(&rx), 0)),
        ErrorCode::LayoutMismatch
    );
    // Same geometry, but the sender's blocks are packed for vLLM CPU's attention ISA: its
    // chunks are not the receiver's token-addressable ones.
    let mut packed = cfg.clone();
    packed.block_packing = Some(BlockPacking::CpuAttn(CpuAttnIsa::Vec));
    assert_ne!(packed.chunk_fingerprint(), cfg.chunk_fingerprint());
    assert_eq!(
        refused_code(PdSender::connect(&packed, peer(&rx), 0)),
        ErrorCode::LayoutMismatch
    );
    let shm = config("shm", 4, "", None);
    assert_eq!(
        refused_code(PdSender::connect(&shm, peer(&rx), 0)),
        ErrorCode::ChannelMismatch
    );
    assert_eq!(
        refused_code(PdSender::connect(&cfg, peer(&rx), 1)),
        ErrorCode::WrongRank
    );
    let err = PdPeer::for_rank("h", &[1], &[2], 1).unwrap_err();
    assert!(err.to_string().contains("rank 1"), "{err}");
}

#[test]
fn unsupported_channels_are_named() {
    let yaml = "enable_pd: true\npd_role: receiver\ntransfer_channel: nixl\npd_buffer_size: 4096\n\
                pd_buffer_device: cpu\npd_peer_host: h\npd_peer_init_port: 1\npd_peer_alloc_port: 2\n";
    let cfg = LmcacheConfig::from_yaml_str(yaml).unwrap();
    let err = PdConfig::from_lmcache(&cfg, &spec(), keys()).unwrap_err();
    assert!(matches!(err, TransferError::UnsupportedChannel(_)), "{err}");
    // The secret never shows in debug output.
    let cfg = config("tcp", 1, "pd_shared_secret: hunter2\n", None);
    assert!(!format!("{cfg:?}").contains("hunter2"));
}

#[test]
fn a_pd_buffer_device_the_channel_cannot_use_is_refused_by_name() {
    let parse = |channel: &str, device: &str| {
        let yaml = format!(
            "chunk_size: {CHUNK_TOKENS}\nenable_pd: true\npd_role: receiver\ntransfer_channel: {channel}\n\
             pd_buffer_size: 1000000\npd_buffer_device: {device}\npd_peer_host: h\npd_peer_init_port: 1\npd_peer_alloc_port: 2\n"
        );
        let cfg = LmcacheConfig::from_yaml_str(&yaml).unwrap();
        PdConfig::from_lmcache(&cfg, &spec(), keys())
    };
    assert!(parse("tcp", "cpu").is_ok());
    let err = parse("tcp", "npu").unwrap_err();
    assert!(
        matches!(err, TransferError::Config(_))
            && err.to_string().contains(
                "pd_buffer_device \"npu\" with transfer_channel tcp: this channel keeps the PD buffer in host memory"
            ),
        "{err}"
    );
    let err = parse("shm", "cuda").unwrap_err();
    assert!(
        err.to_string()
            .contains("pd_buffer_device \"cuda\" with transfer_channel shm: kvrelay's PD buffers live in cpu or npu memory"),
        "{err}"
    );
    #[cfg(feature = "ascend")]
    {
        assert!(parse("hccl", "npu").is_ok());
        let err = parse("hixl", "cpu").unwrap_err();
        assert!(
            err.to_string().contains(
                "pd_buffer_device \"cpu\" with transfer_channel hixl: the Ascend channels land KV in registered NPU pages"
            ),
            "{err}"
        );
    }
}

#[test]
fn requests_sharing_keys_are_each_served() {
    let cfg = config("tcp", 8, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let mut tx = PdSender::connect(&cfg, peer(&rx), 0).unwrap();
    // Two prompts with the same prefix: equal keys, equal bytes, separate pages.
    let a = request("a", 2, false);
    let b = Request {
        id: "b".into(),
        chunks: a.chunks.clone(),
    };
    a.send(&mut tx).unwrap();
    b.send(&mut tx).unwrap();
    assert_eq!(rx.occupancy().used_pages, 4);
    for r in [&a, &b] {
        // Either request's copy may serve a key; both stay waitable.
        assert_eq!(
            rx.wait_ready(&r.id, Duration::from_secs(20))
                .unwrap()
                .chunks,
            2
        );
        r.consume_and_check(&rx);
    }
    assert_eq!(rx.wait_ready("a", Duration::ZERO).unwrap().chunks, 2);
    assert_eq!(rx.occupancy().used_pages, 0);
}

#[test]
fn several_senders_share_one_receiver() {
    let cfg = config("tcp", 32, "", None);
    let rx = PdReceiver::bind(&cfg, 0).unwrap();
    let addr: SocketAddr = rx.init_addr();
    assert!(addr.ip().is_loopback());
    let requests: Vec<Request> = (0..4)
        .map(|i| request(&format!("par-{i}"), 4, i % 2 == 0))
        .collect();
    std::thread::scope(|s| {
        for r in &requests {
            let (cfg, peer) = (&cfg, peer(&rx));
            s.spawn(move || {
                let mut tx = PdSender::connect(cfg, peer, 0).unwrap();
                r.send(&mut tx).unwrap();
            });
        }
    });
    for r in &requests {
        rx.wait_ready(&r.id, Duration::from_secs(20)).unwrap();
        r.consume_and_check(&rx);
    }
    assert_eq!(rx.occupancy().used_pages, 0);
}

impl Request {
    /// Layers `layers` of chunk `i` as a layer-by-layer save gathers them: each plane's
    /// slice of those layers, back to back.
    fn layer_piece(&self, i: usize, layers: std::ops::Range<usize>) -> Vec<u8> {
        let (_, meta, data) = &self.chunks[i];
        spec()
            .chunk_layer_ranges(meta.num_tokens as usize, layers)
            .flat_map(|range| data[range].iter().copied())
            .collect()
    }

    /// Where layer `layer`'s K and V slices of chunk `i` lie in the chunk.
    fn layer_slices(&self, i: usize, layer: usize) -> [std::ops::Range<usize>; 2] {
        let tokens = self.chunks[i].1.num_tokens as usize;
        let mut slices = spec().chunk_layer_ranges(tokens, layer..layer + 1);
        let (k, v) = (slices.next().unwrap(), slices.next().unwrap());
        [k, v]
    }
}

/// A reserved request whose chunks go over in pieces (each layer's slice of each plane,
/// chunks interleaved, out of order) and are sealed with the whole chunk's checksum lands
/// bit for bit; pieces that do not fit, a seal before every byte, and a piece after the
/// seal are typed errors that leave the transfer usable.
fn pieces_in_any_order(channel: &str) {
    let rx = PdReceiver::bind(&config(channel, 8, "", None), 0).unwrap();
    let mut tx = PdSender::connect(&config(channel, 8, "", None), peer(&rx), 0).unwrap();
    let r = request("pieces", 3, true);
    let mut transfer = r.reserve(&mut tx).unwrap();
    assert!(transfer.takes_pieces());
    let bad_index = |res: Result<(), TransferError>| match res {
        Err(TransferError::BadChunk { index, .. }) => index,
        other => panic!("expected BadChunk, got {other:?}"),
    };
    let len = |i: usize| r.chunks[i].2.len();
    assert_eq!(bad_index(transfer.put_piece(1, len(1) - 4, &[0; 8])), 1);
    assert_eq!(bad_index(transfer.put_piece(3, 0, &[0; 8])), 3);
    assert_eq!(bad_index(transfer.seal(0, 0)), 0);
    // The last layer first, the chunks interleaved: every plane's ranges go separately.
    for layer in (0..spec().num_layers).rev() {
        for i in [2, 0, 1] {
            let tokens = r.chunks[i].1.num_tokens as usize;
            for range in spec().chunk_layer_ranges(tokens, layer..layer + 1) {
                transfer
                    .put_piece(i, range.start, &r.chunks[i].2[range])
                    .unwrap();
            }
        }
    }
    for (i, (_, _, data)) in r.chunks.iter().enumerate() {
        transfer.seal(i, frame::checksum(data)).unwrap();
    }
    assert_eq!(bad_index(transfer.put_piece(0, 0, &[0; 8])), 0);
    transfer.commit(&mut tx).unwrap();
    r.consume_and_check(&rx);
}

#[test]
fn tcp_pieces_of_chunks_land_in_any_order() {
    pieces_in_any_order("tcp");
}

#[test]
fn shm_pieces_of_chunks_land_in_any_order() {
    pieces_in_any_order("shm");
}

/// A sink saving a reserved request layer by layer sends each layer as it is added and
/// seals each chunk with the checksum of its pieces; the flush only commits, and the
/// decoder loads exactly the request's bytes.
#[test]
fn a_sink_sends_a_reserved_request_layer_by_layer() {
    let (proxy, notes) = fake_proxy(None);
    let (rx, mut sink, target) = skipping_receiver_and_sink(proxy, "tcp");
    let r = request("layers", 4, false);
    assert!(!sink.takes_layers(&r.id), "not reserved yet");
    sink.reserve(&r.id, plan(&r), Some(target.clone()), r.tokens())
        .unwrap();
    assert!(sink.takes_layers(&r.id));
    add_layer_by_layer(&r, &mut sink);
    let stats = sink
        .flush(&r.id, Some(target), r.tokens())
        .unwrap()
        .unwrap();
    assert_eq!((stats.chunks, stats.skipped_chunks), (3, 1));
    assert_eq!((sink.layered_chunks(), sink.reserved_sends()), (3, 1));
    let note = notes.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(note.unwrap().failure, None);
    let looked_up = Request {
        id: r.id.clone(),
        chunks: r.chunks[..3].to_vec(),
    };
    looked_up.consume_and_check(&rx);
}

/// Hands `r`'s chunks to `sink` a layer at a time, then seals them.
fn add_layer_by_layer(r: &Request, sink: &mut PdSink) {
    for layer in 0..spec().num_layers {
        let pieces = (0..r.chunks.len())
            .map(|i| {
                let piece = r.layer_piece(i, layer..layer + 1);
                let mut staged = HostBuffer::zeroed(piece.len()).unwrap();
                staged.copy_from_slice(&piece);
                let tokens = r.chunks[i].1.num_tokens as usize;
                (r.chunks[i].0.clone(), tokens, staged)
            })
            .collect();
        sink.add_layers(&r.id, layer..layer + 1, pieces);
    }
    let mut window_end = 0;
    for (key, meta, _) in &r.chunks {
        window_end += meta.num_tokens as usize;
        sink.seal_layers(&r.id, key.clone(), *meta, window_end);
    }
}

/// When the decoder could not reserve the pages at the first step, the chunks saved layer
/// by layer are put together and sent whole at the flush, bit for bit.
#[test]
fn layers_of_a_request_whose_reserve_failed_go_whole_at_the_flush() {
    let (proxy, notes) = fake_proxy(None);
    let (rx, mut sink, target) = skipping_receiver_and_sink(proxy, "tcp");
    // Another request holds all 8 pages, so the reserve waits out its timeout.
    let filler = request("filler", 8, false);
    let mut other = PdSender::connect(&config("tcp", 8, "", None), peer(&rx), 0).unwrap();
    filler.send(&mut other).unwrap();
    let r = request("late", 4, true);
    sink.reserve(&r.id, plan(&r), Some(target.clone()), r.tokens())
        .unwrap();
    add_layer_by_layer(&r, &mut sink);
    filler.consume_and_check(&rx);
    let stats = sink
        .flush(&r.id, Some(target), r.tokens())
        .unwrap()
        .unwrap();
    assert_eq!((stats.chunks, stats.skipped_chunks), (3, 1));
    assert_eq!((sink.layered_chunks(), sink.reserved_sends()), (0, 0));
    assert_eq!(
        notes
            .recv_timeout(Duration::from_secs(20))
            .unwrap()
            .unwrap()
            .failure,
        None
    );
    let looked_up = Request {
        id: r.id.clone(),
        chunks: r.chunks[..3].to_vec(),
    };
    looked_up.consume_and_check(&rx);
}
