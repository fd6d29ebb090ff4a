//! HCCL one-sided emulation (TEST DOUBLE): `HcclBatchPut` writes for real into the peer
//! process's registered device memory, which this process maps (device allocations are
//! memfds; the peer's are opened through `/proc/<pid>/fd`).
//!
//! Semantics kept from HCCL's one-sided services (CANN 8.5):
//! - `HcclRegisterGlobalMem` registers device memory process-wide (host memory is not
//!   emulated); `HcclCommBindMem` makes a registration part of a communicator, before
//!   `HcclCommPrepare`.
//! - `HcclCommInitClusterInfoMemConfig` takes a 2-rank rank table (JSON, `status`
//!   `completed`, ranks `"0"` and `"1"`) and a comm name that is non-empty and unique in the
//!   process (else `HCCL_E_PARA`, "comm Name exist"); it connects nothing.
//! - `HcclCommPrepare(FULLMESH, timeout)` is the blocking rendezvous: both ranks must be
//!   in it at once (found by comm name, over an abstract Unix socket); they exchange their
//!   bound memory. Timeout `0` is `HCCL_CONNECT_TIMEOUT`, `-1` none, below that
//!   `HCCL_E_PARA`.
//! - `HcclBatchPut` checks every descriptor (local range in memory bound here, remote
//!   range in memory the peer bound, `UINT8`) before moving anything; copies queued on the
//!   stream before it land first; `aclrtSynchronizeStream` waits for it (at most the
//!   config's `hcclExecTimeOut`) and fails if it failed. Each MiB moved is acknowledged by
//!   the peer process (as an RDMA completion would be), so a dead or stalled peer is an
//!   error, not silent success.
//! - All of it answers `HCCL_E_NOT_SUPPORT` below CANN 8.5 (`ASCEND_EMU_CANN_VERSION`).
//!
//! The byte knobs of [`crate::hccl`] apply: the putter counts what it sends, the target
//! what it receives.

use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, c_void, CStr};
use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ascend_sys::sys::{
    self, aclrtStream, CommMem, HcclComm, HcclCommConfigV8, HcclOneSideOpDesc, HcclPrepareConfig,
    HcclResult,
};
use ascend_sys::CannVersion;

use crate::hccl::{
    account, acl_failure, hccl_export, knobs, left, stall, Completion, E_INTERNAL, E_NOT_SUPPORT,
    E_PARA, E_PTR, E_TCP_CONNECT, E_TIMEOUT, NEXT_ID,
};
use crate::{current_device, initialized, stream_device};

type Fallible<T> = Result<T, (HcclResult, String)>;

/// Moves are acknowledged in pieces of this many bytes.
const PIECE: usize = 1 << 20;
const NOTE: u8 = 1;
const ACK: u8 = 2;

/// A registered device range.
#[derive(Clone, Copy)]
pub(crate) struct Region {
    pub(crate) addr: u64,
    pub(crate) len: usize,
}

impl Region {
    fn holds(&self, addr: u64, len: usize) -> bool {
        addr >= self.addr && (addr - self.addr) as usize + len <= self.len
    }
}

/// A peer's registered region, mapped here: the whole allocation that holds it, whose
/// device address `base` maps to `host`.
pub(crate) struct PeerRegion {
    region: Region,
    base: u64,
    host: *mut u8,
    map_len: usize,
}

impl Drop for PeerRegion {
    fn drop(&mut self) {
        // SAFETY: mapped in `map_peer` with this length, unmapped once here.
        unsafe { libc::munmap(self.host.cast(), self.map_len) };
    }
}

/// A connection to the peer that one-sided puts are acknowledged over, and the peer's
/// memory mapped here (one-sided communicators and HIXL clients/servers).
pub(crate) struct Link {
    writer: Arc<Mutex<Box<dyn Write + Send>>>,
    acks: Mutex<Receiver<()>>,
    peer: Vec<PeerRegion>,
    shutdown: Box<dyn Fn() + Send + Sync>,
    closed: Arc<AtomicBool>,
    watcher: Mutex<Option<JoinHandle<()>>>,
}

// SAFETY: `PeerRegion::host` is a private shared mapping, written only by puts under the
// API contract (ranges checked, ordered by their callers).
unsafe impl Send for Link {}
// SAFETY: as above.
unsafe impl Sync for Link {}

impl Link {
    /// Starts the link over a connected pair of streams after the memory exchange; the
    /// watcher thread serves the peer's notes and forwards its acknowledgements.
    pub(crate) fn start(
        reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
        shutdown: impl Fn() + Send + Sync + 'static,
        peer: Vec<PeerRegion>,
    ) -> std::io::Result<Link> {
        let (ack_tx, ack_rx) = mpsc::channel();
        let closed = Arc::new(AtomicBool::new(false));
        let writer: Arc<Mutex<Box<dyn Write + Send>>> = Arc::new(Mutex::new(Box::new(writer)));
        let (w, c) = (Arc::clone(&writer), Arc::clone(&closed));
        let watcher = std::thread::Builder::new()
            .name("ascend-emu-put-watch".into())
            .spawn(move || watch(reader, &w, &ack_tx, &c))?;
        Ok(Link {
            writer,
            acks: Mutex::new(ack_rx),
            peer,
            shutdown: Box::new(shutdown),
            closed,
            watcher: Mutex::new(Some(watcher)),
        })
    }

    /// Closes the link (the peer's puts and acknowledgements fail from then on) and joins
    /// the watcher.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        (self.shutdown)();
        let watcher = self
            .watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(watcher) = watcher {
            let _ = watcher.join();
        }
    }

    /// The copies `(local, remote, len)` as host addresses: every local range inside one
    /// of `local` (memory registered or bound here), every remote range in the peer's.
    pub(crate) fn resolve(
        &self,
        local: &[Region],
        copies: impl Iterator<Item = (u64, u64, u64)>,
    ) -> Result<Vec<crate::Copy>, String> {
        let state = initialized().map_err(|f| f.1)?;
        copies
            .enumerate()
            .map(|(i, (from, to, len))| {
                let len = usize::try_from(len).map_err(|_| format!("descriptor {i}: length too large"))?;
                if !local.iter().any(|r| r.holds(from, len)) {
                    return Err(format!("descriptor {i}: {len} bytes at {from:#x} are not in memory registered here"));
                }
                let (src, _) = state.device_range(from, len).map_err(|f| f.1)?;
                let peer = self
                    .peer
                    .iter()
                    .find(|p| p.region.holds(to, len))
                    .ok_or_else(|| format!("descriptor {i}: {len} bytes at remote {to:#x} are not in memory the peer registered"))?;
                let dst = peer.host.wrapping_add((to - peer.base) as usize);
                Ok(crate::Copy { dst, src, len })
            })
            .collect()
    }
}

struct OneComm {
    rank: u32,
    name: String,
    exec_timeout: Duration,
    bound: Mutex<Vec<Region>>,
    link: Mutex<Option<Arc<Link>>>,
}

fn registered() -> &'static Mutex<HashMap<usize, Region>> {
    static REGISTERED: OnceLock<Mutex<HashMap<usize, Region>>> = OnceLock::new();
    REGISTERED.get_or_init(Default::default)
}

fn comms() -> &'static Mutex<HashMap<usize, Arc<OneComm>>> {
    static COMMS: OnceLock<Mutex<HashMap<usize, Arc<OneComm>>>> = OnceLock::new();
    COMMS.get_or_init(Default::default)
}

fn names() -> &'static Mutex<HashSet<String>> {
    static NAMES: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    NAMES.get_or_init(Default::default)
}

/// Refuses every one-sided call below CANN 8.5, which introduced them.
fn supported(call: &str) -> Fallible<()> {
    let version = crate::emulated_cann().map_err(acl_failure)?;
    if version < CannVersion::release(8, 5, 0) {
        return Err((
            E_NOT_SUPPORT,
            format!("{call} is not in CANN {version} (emulated; one-sided calls came with 8.5)"),
        ));
    }
    drop(initialized().map_err(acl_failure)?);
    current_device().map_err(acl_failure)?;
    Ok(())
}

fn comm_of(comm: HcclComm) -> Fallible<Arc<OneComm>> {
    comms()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(comm as usize))
        .cloned()
        .ok_or_else(|| (E_PARA, format!("unknown one-sided communicator {comm:?}")))
}

/// `HcclResult HcclRegisterGlobalMem(const CommMem *mem, void **memHandle)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HCCL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HcclRegisterGlobalMem(
    mem: *const CommMem,
    handle: *mut *mut c_void,
) -> HcclResult {
    hccl_export(|| {
        supported("HcclRegisterGlobalMem")?;
        if mem.is_null() || handle.is_null() {
            return Err((E_PTR, "null memory or handle slot".into()));
        }
        if knobs().register_fail {
            return Err((
                E_INTERNAL,
                "registration refused (ASCEND_EMU_HCCL_REGISTER_FAIL)".into(),
            ));
        }
        // SAFETY: checked non-null; a 24-byte plain struct.
        let mem = unsafe { *mem };
        if mem.type_ != sys::COMM_MEM_TYPE_DEVICE {
            return Err((
                E_NOT_SUPPORT,
                "the emulator registers device memory only".into(),
            ));
        }
        let region = Region {
            addr: mem.addr as u64,
            len: usize::try_from(mem.size).map_err(|_| (E_PARA, "size too large".into()))?,
        };
        initialized()
            .map_err(acl_failure)?
            .device_alloc(region.addr, region.len)
            .map_err(acl_failure)?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) as usize;
        registered()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, region);
        // SAFETY: checked non-null; the handle is an opaque number.
        unsafe { *handle = id as *mut c_void };
        Ok(())
    })
}

/// Checks a rank table names exactly ranks 0 and 1 and is complete.
fn check_rank_table(text: &str) -> Fallible<()> {
    let bad = |why: String| (E_PARA, format!("rank table: {why}"));
    let table: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    if table["status"] != "completed" {
        return Err(bad("status is not \"completed\"".into()));
    }
    let mut ranks: Vec<&str> = table["server_list"]
        .as_array()
        .ok_or_else(|| bad("no server_list".into()))?
        .iter()
        .flat_map(|server| server["device"].as_array().into_iter().flatten())
        .map(|device| device["rank_id"].as_str().unwrap_or("?"))
        .collect();
    ranks.sort_unstable();
    if ranks != ["0", "1"] {
        return Err(bad(format!(
            "the emulator builds 2-rank communicators (ranks \"0\" and \"1\"); this one has {ranks:?}"
        )));
    }
    Ok(())
}

/// `HcclResult HcclCommInitClusterInfoMemConfig(rankTable, rank, config, comm)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HCCL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HcclCommInitClusterInfoMemConfig(
    rank_table: *const c_char,
    rank: u32,
    config: *mut HcclCommConfigV8,
    comm: *mut HcclComm,
) -> HcclResult {
    hccl_export(|| {
        supported("HcclCommInitClusterInfoMemConfig")?;
        if rank_table.is_null() || config.is_null() || comm.is_null() {
            return Err((E_PTR, "null rank table, config or comm slot".into()));
        }
        // SAFETY: checked non-null; NUL-terminated text by the prototype.
        let text = unsafe { CStr::from_ptr(rank_table) }.to_string_lossy();
        check_rank_table(&text)?;
        if rank > 1 {
            return Err((E_PARA, format!("rank {rank} is not in the rank table")));
        }
        // SAFETY: checked non-null; the caller's config is valid for the call.
        let config = unsafe { &*config };
        let name_bytes: Vec<u8> = config
            .hcclCommName
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let name = String::from_utf8_lossy(&name_bytes).into_owned();
        if name.is_empty() {
            return Err((E_PARA, "hcclCommName is empty".into()));
        }
        if !names()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone())
        {
            return Err((E_PARA, format!("comm Name exist: {name}")));
        }
        let exec_timeout = match config.hcclExecTimeOut {
            t if t > 0 => Duration::from_secs(t as u64),
            _ => knobs().exec_timeout,
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) as usize;
        let one = OneComm {
            rank,
            name,
            exec_timeout,
            bound: Mutex::default(),
            link: Mutex::default(),
        };
        comms()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::new(one));
        // SAFETY: checked non-null; the handle is an opaque number.
        unsafe { *comm = id as HcclComm };
        Ok(())
    })
}

/// `HcclResult HcclCommBindMem(HcclComm comm, void *memHandle)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HCCL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HcclCommBindMem(comm: HcclComm, handle: *mut c_void) -> HcclResult {
    hccl_export(|| {
        supported("HcclCommBindMem")?;
        let comm = comm_of(comm)?;
        let region = *registered()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(handle as usize))
            .ok_or_else(|| (E_PARA, format!("{handle:?} is not a registered memory")))?;
        if comm
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return Err((E_PARA, "HcclCommBindMem after HcclCommPrepare".into()));
        }
        comm.bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(region);
        Ok(())
    })
}

/// What one rank tells the other at prepare: its pid, then per bound region its range,
/// the allocation that holds it (device address, length) and that allocation's memfd.
pub(crate) fn describe(bound: &[Region]) -> Fallible<Vec<u8>> {
    let state = initialized().map_err(acl_failure)?;
    let mut out = Vec::new();
    out.extend_from_slice(&std::process::id().to_le_bytes());
    out.extend_from_slice(&(bound.len() as u32).to_le_bytes());
    for region in bound {
        let (base, alloc) = state
            .device_alloc(region.addr, region.len)
            .map_err(acl_failure)?;
        for v in [region.addr, region.len as u64, base, alloc.len as u64] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&alloc.fd.to_le_bytes());
    }
    Ok(out)
}

/// Reads the peer's description and maps its regions.
pub(crate) fn map_peer(socket: &mut impl Read) -> Fallible<Vec<PeerRegion>> {
    let io = |e: std::io::Error| (E_TCP_CONNECT, format!("prepare exchange: {e}"));
    let mut u32s = [0u8; 8];
    socket.read_exact(&mut u32s).map_err(io)?;
    let pid = u32::from_le_bytes([u32s[0], u32s[1], u32s[2], u32s[3]]);
    let count = u32::from_le_bytes([u32s[4], u32s[5], u32s[6], u32s[7]]);
    let mut peer = Vec::new();
    for _ in 0..count {
        let mut entry = [0u8; 36];
        socket.read_exact(&mut entry).map_err(io)?;
        let word =
            |i: usize| u64::from_le_bytes(entry[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        let fd = i32::from_le_bytes(entry[32..36].try_into().unwrap_or_default());
        let (addr, len, base, alloc_len) = (word(0), word(1) as usize, word(2), word(3) as usize);
        let path = format!("/proc/{pid}/fd/{fd}\0");
        // SAFETY: a NUL-terminated path; the result is checked.
        let file = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDWR | libc::O_CLOEXEC) };
        if file < 0 {
            return Err((
                E_INTERNAL,
                format!(
                    "mapping the peer's memory ({}): {}",
                    path.trim_end_matches('\0'),
                    std::io::Error::last_os_error()
                ),
            ));
        }
        let mapped = crate::map(alloc_len, libc::MAP_SHARED, file);
        // SAFETY: ours; the mapping (if any) keeps the memory file alive.
        unsafe { libc::close(file) };
        let mapped = mapped.map_err(acl_failure)?;
        peer.push(PeerRegion {
            region: Region { addr, len },
            base,
            host: mapped.cast(),
            map_len: alloc_len,
        });
    }
    Ok(peer)
}

/// Rank 0's side of the rendezvous: listens under the comm name until rank 1 connects.
fn accept(address: &SocketAddr, deadline: Instant, wait: Duration) -> Fallible<UnixStream> {
    let io = |e: std::io::Error| (E_TCP_CONNECT, format!("prepare listen: {e}"));
    let listener = UnixListener::bind_addr(address).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    loop {
        match listener.accept() {
            Ok((socket, _)) => {
                socket.set_nonblocking(false).map_err(io)?;
                return Ok(socket);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(prepare_timed_out("rank 1 did not prepare", wait));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io(e)),
        }
    }
}

/// Rank 1's side of the rendezvous.
fn connect(address: &SocketAddr, deadline: Instant, wait: Duration) -> Fallible<UnixStream> {
    loop {
        match UnixStream::connect_addr(address) {
            Ok(socket) => return Ok(socket),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => return Err(prepare_timed_out("rank 0 did not prepare", wait)),
        }
    }
}

fn prepare_timed_out(what: &str, wait: Duration) -> (HcclResult, String) {
    (
        E_TIMEOUT,
        format!("HcclCommPrepare: {what} within its timeout ({wait:?})"),
    )
}

/// `HcclResult HcclCommPrepare(HcclComm comm, const HcclPrepareConfig *config, int timeout)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HCCL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HcclCommPrepare(
    comm: HcclComm,
    config: *const HcclPrepareConfig,
    timeout: i32,
) -> HcclResult {
    hccl_export(|| {
        supported("HcclCommPrepare")?;
        if config.is_null() {
            return Err((E_PTR, "null prepare config".into()));
        }
        // SAFETY: checked non-null; a 32-byte plain struct.
        if unsafe { (*config).topoType } != sys::HCCL_TOPO_FULLMESH {
            return Err((E_NOT_SUPPORT, "the emulator prepares FULLMESH only".into()));
        }
        let wait = match timeout {
            0 => knobs().connect_timeout,
            -1 => Duration::from_secs(365 * 24 * 3600),
            t if t > 0 => Duration::from_secs(t as u64),
            t => return Err((E_PARA, format!("prepare timeout {t}"))),
        };
        let comm = comm_of(comm)?;
        if comm
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return Err((E_PARA, "the communicator is prepared already".into()));
        }
        let bound = comm.bound.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let description = describe(&bound)?;
        let address = SocketAddr::from_abstract_name(format!("ascend-emu-hcomm/{}", comm.name))
            .map_err(|e| (E_PARA, format!("comm name as a rendezvous address: {e}")))?;
        let deadline = Instant::now() + wait;
        let mut socket = match comm.rank {
            0 => accept(&address, deadline, wait)?,
            _ => connect(&address, deadline, wait)?,
        };
        let io = |e: std::io::Error| (E_TCP_CONNECT, format!("prepare exchange: {e}"));
        socket.set_read_timeout(Some(left(deadline))).map_err(io)?;
        socket.write_all(&description).map_err(io)?;
        let peer = map_peer(&mut socket)?;
        socket.set_read_timeout(None).map_err(io)?;
        let reader = socket.try_clone().map_err(io)?;
        let writer = socket.try_clone().map_err(io)?;
        let link = Link::start(
            reader,
            writer,
            move || drop(socket.shutdown(std::net::Shutdown::Both)),
            peer,
        )
        .map_err(io)?;
        *comm.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(link));
        Ok(())
    })
}

/// Serves the peer's notes (bytes it put into our memory: counted for the knobs, then
/// acknowledged) and forwards its acknowledgements of ours, until the link closes. Ending
/// drops `acks`, so a put waiting for one fails at once.
fn watch(
    mut reader: impl Read,
    writer: &Mutex<Box<dyn Write + Send>>,
    acks: &Sender<()>,
    closed: &AtomicBool,
) {
    let mut message = [0u8; 9];
    loop {
        if reader.read_exact(&mut message[..1]).is_err() {
            return;
        }
        match message[0] {
            NOTE => {
                if reader.read_exact(&mut message[1..]).is_err() {
                    return;
                }
                let n = u64::from_le_bytes(message[1..].try_into().unwrap_or_default());
                if account(n as usize) {
                    stall(closed);
                    return;
                }
                let mut socket = writer.lock().unwrap_or_else(|p| p.into_inner());
                if socket.write_all(&[ACK]).is_err() {
                    return;
                }
            }
            ACK => {
                if acks.send(()).is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// `HcclResult HcclBatchPut(comm, remoteRank, desc, descNum, stream)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HCCL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HcclBatchPut(
    comm: HcclComm,
    remote_rank: u32,
    desc: *mut HcclOneSideOpDesc,
    count: u32,
    stream: aclrtStream,
) -> HcclResult {
    hccl_export(|| {
        supported("HcclBatchPut")?;
        let comm = comm_of(comm)?;
        if remote_rank != 1 - comm.rank {
            return Err((
                E_PARA,
                format!("rank {} of 2 has no peer rank {remote_rank}", comm.rank),
            ));
        }
        let link = comm
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| (E_PARA, "HcclBatchPut before HcclCommPrepare".to_string()))?;
        if desc.is_null() && count > 0 {
            return Err((E_PTR, "null descriptors".into()));
        }
        let descs = match count {
            0 => &[][..],
            // SAFETY: checked non-null; the caller passes `count` descriptors.
            n => unsafe { std::slice::from_raw_parts(desc, n as usize) },
        };
        let bound = comm.bound.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(i) = descs
            .iter()
            .position(|d| d.dataType != sys::HCCL_DATA_TYPE_UINT8)
        {
            return Err((
                E_NOT_SUPPORT,
                format!("descriptor {i}: the emulator moves HCCL_DATA_TYPE_UINT8 only"),
            ));
        }
        let copies = link
            .resolve(
                &bound,
                descs
                    .iter()
                    .map(|d| (d.localAddr as u64, d.remoteAddr as u64, d.count)),
            )
            .map_err(|why| (E_PARA, why))?;
        let mut state = initialized().map_err(acl_failure)?;
        stream_device(&state, stream).map_err(acl_failure)?;
        let done = Arc::new(Completion::default());
        let entry = state
            .streams
            .get_mut(&(stream as usize))
            .ok_or_else(|| (E_PARA, "unknown stream".to_string()))?;
        // Stream order: copies issued before this call land before it starts.
        std::mem::take(&mut entry.pending)
            .into_iter()
            .for_each(crate::perform);
        entry.hccl.push((Arc::clone(&done), comm.exec_timeout));
        drop(state);
        if let Some(result) = put(&link, &copies, comm.exec_timeout) {
            done.finish(result);
        }
        Ok(())
    })
}

/// Moves the copies a piece at a time, each acknowledged by the peer; `None` when the
/// stall knob stops it (the put then never completes).
pub(crate) fn put(
    link: &Link,
    copies: &[crate::Copy],
    timeout: Duration,
) -> Option<Result<(), String>> {
    for copy in copies {
        let mut moved = 0;
        while moved < copy.len {
            let n = PIECE.min(copy.len - moved);
            if account(n) {
                return None;
            }
            crate::perform(crate::Copy {
                dst: copy.dst.wrapping_add(moved),
                src: copy.src.wrapping_add(moved),
                len: n,
            });
            let gone = |why: String| {
                Some(Err(format!(
                    "a put of {} bytes: the peer is gone or stalled ({why})",
                    copy.len
                )))
            };
            let mut note = [NOTE; 9];
            note[1..].copy_from_slice(&(n as u64).to_le_bytes());
            let written = link
                .writer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_all(&note);
            if let Err(e) = written {
                return gone(e.to_string());
            }
            let acked = link
                .acks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .recv_timeout(timeout);
            if let Err(e) = acked {
                return gone(e.to_string());
            }
            moved += n;
        }
    }
    Some(Ok(()))
}

/// One-sided communicators' part of `HcclCommDestroy`: closes the link (the peer's puts
/// and acknowledgements fail from then on), joins the watcher, frees the comm name.
pub(crate) fn destroy(handle: usize) -> Fallible<()> {
    let comm = comms()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&handle)
        .ok_or_else(|| (E_PARA, format!("unknown communicator {handle:#x}")))?;
    names()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&comm.name);
    let link = comm.link.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(link) = link {
        link.close();
    }
    Ok(())
}
