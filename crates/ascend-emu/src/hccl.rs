//! HCCL two-sided emulation (TEST DOUBLE): root-info communicators of two ranks whose
//! `HcclSend`/`HcclRecv` move bytes for real between two processes (or threads) over a
//! loopback TCP connection, out of and into emulated device memory.
//!
//! Semantics kept from HCCL:
//! - `HcclGetRootInfo` makes this process the root: it listens, and the root info (opaque
//!   4108 bytes) says where. Rank 0 must join from the process that made it.
//! - `HcclCommInitRootInfoConfig` blocks until both ranks joined, at most
//!   `HCCL_CONNECT_TIMEOUT` seconds (default 120), else `HCCL_E_TIMEOUT`.
//! - sends and receives are queued on their stream and start at once, in issue order per
//!   direction; each send pairs with the peer's next receive, which must be of the same
//!   byte count (else both fail). Copies queued on the stream before an HCCL call land
//!   before it starts. `aclrtSynchronizeStream` waits for the stream's sends and receives
//!   and fails if one failed: the peer closed or died, or no byte moved for
//!   `hcclExecTimeOut` seconds (the config's, else `HCCL_EXEC_TIMEOUT`, default 1836).
//! - `HcclCommDestroy` ends pending operations; once it returns, nothing writes into the
//!   receive buffers any more.
//!
//! Failure injection (environment, read once): `ASCEND_EMU_HCCL_DIE_AFTER_BYTES=N` ends
//! this process (`_exit(137)`, as a SIGKILL would) once N payload bytes were sent or
//! received; `ASCEND_EMU_HCCL_STALL_AFTER_BYTES=N` stops moving bytes after N (the peer
//! then times out); `ASCEND_EMU_HCCL_REGISTER_FAIL=1` makes `HcclRegisterGlobalMem` fail.
//! The byte knobs count one-sided puts too (see [`crate::onesided`]).

use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ascend_sys::sys::{self, aclrtStream, HcclComm, HcclCommConfigV8, HcclResult, HcclRootInfo};

use crate::{current_device, initialized, stream_device, Failure};

pub(crate) const E_PARA: HcclResult = 1;
pub(crate) const E_PTR: HcclResult = 2;
pub(crate) const E_INTERNAL: HcclResult = 4;
pub(crate) const E_NOT_SUPPORT: HcclResult = 5;
pub(crate) const E_TIMEOUT: HcclResult = 9;
pub(crate) const E_TCP_CONNECT: HcclResult = 11;

const ROOT_MAGIC: &[u8; 8] = b"EMUHCCL1";

pub(crate) struct Knobs {
    pub(crate) connect_timeout: Duration,
    pub(crate) exec_timeout: Duration,
    die_after: Option<u64>,
    stall_after: Option<u64>,
    /// `HcclRegisterGlobalMem` fails (one-sided registration failure).
    pub(crate) register_fail: bool,
}

pub(crate) fn knobs() -> &'static Knobs {
    static KNOBS: OnceLock<Knobs> = OnceLock::new();
    KNOBS.get_or_init(|| {
        let number = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Knobs {
            connect_timeout: Duration::from_secs(number("HCCL_CONNECT_TIMEOUT").unwrap_or(120)),
            exec_timeout: Duration::from_secs(number("HCCL_EXEC_TIMEOUT").unwrap_or(1836)),
            die_after: number("ASCEND_EMU_HCCL_DIE_AFTER_BYTES"),
            stall_after: number("ASCEND_EMU_HCCL_STALL_AFTER_BYTES"),
            register_fail: number("ASCEND_EMU_HCCL_REGISTER_FAIL").is_some_and(|v| v != 0),
        }
    })
}

/// Payload bytes this process moved, for the failure knobs.
static MOVED: AtomicU64 = AtomicU64::new(0);

/// Counts `n` more moved bytes; applies the knobs. Returns whether to stall.
pub(crate) fn account(n: usize) -> bool {
    let total = MOVED.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
    let knobs = knobs();
    if knobs.die_after.is_some_and(|limit| total >= limit) {
        // SAFETY: ends the process at once, as a killed peer would; nothing runs after.
        unsafe { libc::_exit(137) };
    }
    knobs.stall_after.is_some_and(|limit| total >= limit)
}

/// Completion of one queued send or receive.
#[derive(Default)]
pub(crate) struct Completion {
    result: Mutex<Option<Result<(), String>>>,
    done: Condvar,
}

impl Completion {
    pub(crate) fn finish(&self, result: Result<(), String>) {
        let mut slot = self.result.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(result);
        self.done.notify_all();
    }

    /// The outcome, if the operation finished.
    pub(crate) fn peek(&self) -> Option<Result<(), String>> {
        self.result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for the operation, at most `timeout`.
    pub(crate) fn wait(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut slot = self.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(result) = slot.as_ref() {
                return result.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "an HCCL operation did not complete within {timeout:?}"
                ));
            }
            slot = self
                .done
                .wait_timeout(slot, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// One send or receive: a host mapping of device memory and its length.
struct Op {
    host: *mut u8,
    len: usize,
    done: Arc<Completion>,
}

// SAFETY: `host` points into a device allocation's shared mapping, valid by the API
// contract until the stream is synchronized or the communicator destroyed.
unsafe impl Send for Op {}

/// The emulated communicator: a connection to the other rank and one worker per
/// direction.
struct EmuComm {
    rank: u32,
    exec_timeout: Duration,
    socket: TcpStream,
    closed: Arc<AtomicBool>,
    sends: Mutex<Option<Sender<Op>>>,
    recvs: Mutex<Option<Sender<Op>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

fn comms() -> &'static Mutex<HashMap<usize, Arc<EmuComm>>> {
    static COMMS: OnceLock<Mutex<HashMap<usize, Arc<EmuComm>>>> = OnceLock::new();
    COMMS.get_or_init(Default::default)
}

fn roots() -> &'static Mutex<HashMap<u64, TcpListener>> {
    static ROOTS: OnceLock<Mutex<HashMap<u64, TcpListener>>> = OnceLock::new();
    ROOTS.get_or_init(Default::default)
}

pub(crate) static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Runs an HCCL export body: records a failure's text (for `aclGetRecentErrMsg`), turns a
/// panic into `HCCL_E_INTERNAL`.
pub(crate) fn hccl_export(body: impl FnOnce() -> Result<(), (HcclResult, String)>) -> HcclResult {
    status_export(sys::HCCL_SUCCESS, E_INTERNAL, body)
}

/// Runs an export body that returns `code` statuses (HCCL's, HIXL's): `ok` on success,
/// the failure's code with its text recorded, `internal` for a panic.
pub(crate) fn status_export<C>(
    ok: C,
    internal: C,
    body: impl FnOnce() -> Result<(), (C, String)>,
) -> C {
    crate::count_call();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body))
        .unwrap_or_else(|_| Err((internal, "ascend-emu: internal panic".into())));
    match outcome {
        Ok(()) => ok,
        Err((code, message)) => {
            crate::record_error(&message);
            code
        }
    }
}

pub(crate) fn acl_failure(f: Failure) -> (HcclResult, String) {
    (E_PARA, f.1)
}

/// `HcclResult HcclGetRootInfo(HcclRootInfo *rootInfo)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HCCL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HcclGetRootInfo(root_info: *mut HcclRootInfo) -> HcclResult {
    hccl_export(|| {
        drop(initialized().map_err(acl_failure)?);
        current_device().map_err(acl_failure)?;
        if root_info.is_null() {
            return Err((E_PTR, "null root info".into()));
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| (E_TCP_CONNECT, format!("root listen: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| (E_TCP_CONNECT, e.to_string()))?
            .port();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) ^ (u64::from(std::process::id()) << 32);
        roots()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, listener);
        let mut bytes = [0u8; sys::ASCEND_SYS_HCCL_ROOT_INFO_BYTES as usize];
        bytes[..8].copy_from_slice(ROOT_MAGIC);
        bytes[8..10].copy_from_slice(&port.to_le_bytes());
        bytes[10..18].copy_from_slice(&id.to_le_bytes());
        // SAFETY: checked non-null; HcclRootInfo is 4108 plain bytes.
        unsafe { (*root_info).internal = bytes.map(|b| b as c_char) };
        Ok(())
    })
}

/// `HcclResult HcclCommInitRootInfoConfig(nRanks, rootInfo, rank, config, comm)`: two
/// ranks only.
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HCCL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HcclCommInitRootInfoConfig(
    ranks: u32,
    root_info: *const HcclRootInfo,
    rank: u32,
    config: *const HcclCommConfigV8,
    comm: *mut HcclComm,
) -> HcclResult {
    hccl_export(|| {
        drop(initialized().map_err(acl_failure)?);
        current_device().map_err(acl_failure)?;
        if root_info.is_null() || comm.is_null() {
            return Err((E_PTR, "null root info or comm slot".into()));
        }
        if ranks != 2 || rank > 1 {
            return Err((
                E_NOT_SUPPORT,
                format!(
                    "the emulator builds 2-rank communicators; asked for rank {rank} of {ranks}"
                ),
            ));
        }
        // SAFETY: checked non-null; 4108 plain bytes.
        let bytes = unsafe { (*root_info).internal }.map(|b| b as u8);
        if &bytes[..8] != ROOT_MAGIC {
            return Err((E_PARA, "root info was not made by HcclGetRootInfo".into()));
        }
        let port = u16::from_le_bytes([bytes[8], bytes[9]]);
        let id = u64::from_le_bytes(bytes[10..18].try_into().unwrap_or_default());
        let exec_timeout = match config.is_null() {
            // SAFETY: checked non-null; the caller's config is valid for the call.
            false => match unsafe { (*config).hcclExecTimeOut } {
                t if t > 0 => Duration::from_secs(t as u64),
                _ => knobs().exec_timeout,
            },
            true => knobs().exec_timeout,
        };
        let deadline = Instant::now() + knobs().connect_timeout;
        let socket = if rank == 0 {
            accept_peer(id, deadline)?
        } else {
            connect_root(port, id, deadline)?
        };
        let handle = start(rank, socket, exec_timeout)?;
        // SAFETY: checked non-null; the handle is an opaque number.
        unsafe { *comm = handle as HcclComm };
        Ok(())
    })
}

fn timed_out(what: &str) -> (HcclResult, String) {
    (
        E_TIMEOUT,
        format!(
            "{what} within HCCL_CONNECT_TIMEOUT ({:?})",
            knobs().connect_timeout
        ),
    )
}

/// What is left until `deadline`, at least a millisecond (a zero socket timeout means
/// none).
pub(crate) fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn accept_peer(id: u64, deadline: Instant) -> Result<TcpStream, (HcclResult, String)> {
    let listener = roots()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id)
        .ok_or_else(|| {
            (
                E_PARA,
                "rank 0 must join with a root info HcclGetRootInfo made in this process, once"
                    .into(),
            )
        })?;
    let io = |e: std::io::Error| (E_TCP_CONNECT, e.to_string());
    listener.set_nonblocking(true).map_err(io)?;
    loop {
        match listener.accept() {
            Ok((mut socket, _)) => {
                socket.set_nonblocking(false).map_err(io)?;
                socket.set_read_timeout(Some(left(deadline))).map_err(io)?;
                let mut hello = [0u8; 8];
                if socket.read_exact(&mut hello).is_ok() && hello == id.to_le_bytes() {
                    socket.write_all(b"ok").map_err(io)?;
                    return Ok(socket);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(timed_out("rank 1 did not join"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io(e)),
        }
    }
}

fn connect_root(port: u16, id: u64, deadline: Instant) -> Result<TcpStream, (HcclResult, String)> {
    let io = |e: std::io::Error| {
        (
            E_TCP_CONNECT,
            format!("joining the root at port {port}: {e}"),
        )
    };
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(mut socket) => {
                socket.set_read_timeout(Some(left(deadline))).map_err(io)?;
                socket.write_all(&id.to_le_bytes()).map_err(io)?;
                let mut ok = [0u8; 2];
                socket.read_exact(&mut ok).map_err(io)?;
                return Ok(socket);
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => return Err(timed_out("the root did not answer")),
        }
    }
}

/// Registers a communicator and starts its workers; returns its handle.
fn start(
    rank: u32,
    socket: TcpStream,
    exec_timeout: Duration,
) -> Result<usize, (HcclResult, String)> {
    let io = |e: std::io::Error| (E_TCP_CONNECT, e.to_string());
    socket.set_nodelay(true).map_err(io)?;
    socket.set_read_timeout(Some(exec_timeout)).map_err(io)?;
    socket.set_write_timeout(Some(exec_timeout)).map_err(io)?;
    let closed = Arc::new(AtomicBool::new(false));
    let (send_tx, send_rx) = mpsc::channel();
    let (recv_tx, recv_rx) = mpsc::channel();
    let writer = socket.try_clone().map_err(io)?;
    let reader = socket.try_clone().map_err(io)?;
    let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(format!("ascend-emu-hccl-{name}"))
            .spawn(body)
            .map_err(io)
    };
    let c = Arc::clone(&closed);
    let sender = spawn("send", Box::new(move || send_worker(writer, send_rx, &c)))?;
    let c = Arc::clone(&closed);
    let receiver = spawn("recv", Box::new(move || recv_worker(reader, recv_rx, &c)))?;
    let handle = NEXT_ID.fetch_add(1, Ordering::Relaxed) as usize;
    let comm = EmuComm {
        rank,
        exec_timeout,
        socket,
        closed,
        sends: Mutex::new(Some(send_tx)),
        recvs: Mutex::new(Some(recv_tx)),
        workers: Mutex::new(vec![sender, receiver]),
    };
    comms()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(handle, Arc::new(comm));
    Ok(handle)
}

/// Blocks (while stalled by the knob) until the communicator is destroyed.
pub(crate) fn stall(closed: &AtomicBool) {
    while !closed.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs one direction's operations in order with `step`; after a failure every later
/// operation fails with its reason (the byte stream is out of step).
fn worker(ops: Receiver<Op>, mut step: impl FnMut(&Op) -> Result<(), String>) {
    let mut broken: Option<String> = None;
    for op in ops {
        let result = match &broken {
            Some(why) => Err(why.clone()),
            None => step(&op),
        };
        if let Err(why) = &result {
            broken = Some(why.clone());
        }
        op.done.finish(result);
    }
}

const STALLED: &str = "stalled by ASCEND_EMU_HCCL_STALL_AFTER_BYTES";

fn send_worker(mut socket: TcpStream, ops: Receiver<Op>, closed: &AtomicBool) {
    worker(ops, |op| {
        // SAFETY: see `Op`: the mapping is valid for `len` bytes until completion.
        let bytes = unsafe { std::slice::from_raw_parts(op.host, op.len) };
        let gone = |e: std::io::Error| {
            format!(
                "HcclSend of {} bytes: the peer is gone or stalled ({e})",
                op.len
            )
        };
        socket
            .write_all(&(op.len as u64).to_le_bytes())
            .map_err(gone)?;
        for piece in bytes.chunks(1 << 20) {
            if account(piece.len()) {
                stall(closed);
                return Err(STALLED.into());
            }
            socket.write_all(piece).map_err(gone)?;
        }
        Ok(())
    })
}

fn recv_worker(mut socket: TcpStream, ops: Receiver<Op>, closed: &AtomicBool) {
    worker(ops, |op| {
        let gone = |e: std::io::Error| {
            format!(
                "HcclRecv of {} bytes: the peer is gone or timed out ({e})",
                op.len
            )
        };
        let mut len = [0u8; 8];
        socket.read_exact(&mut len).map_err(gone)?;
        let len = u64::from_le_bytes(len) as usize;
        if len != op.len {
            return Err(format!(
                "HcclRecv of {} bytes paired with an HcclSend of {len} bytes",
                op.len
            ));
        }
        // SAFETY: see `Op`: the mapping is valid and ours for `len` bytes until completion
        // or destroy (which joins this worker first).
        let dst = unsafe { std::slice::from_raw_parts_mut(op.host, op.len) };
        for piece in dst.chunks_mut(1 << 20) {
            socket.read_exact(piece).map_err(gone)?;
            if account(piece.len()) {
                stall(closed);
                return Err(STALLED.into());
            }
        }
        Ok(())
    })
}

fn comm_of(comm: HcclComm) -> Result<Arc<EmuComm>, (HcclResult, String)> {
    comms()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(comm as usize))
        .cloned()
        .ok_or_else(|| (E_PARA, format!("unknown communicator {comm:?}")))
}

/// Queues one send (`outgoing`) or receive on `stream`.
fn queue(
    buf: *mut c_void,
    count: u64,
    data_type: i32,
    peer: u32,
    comm: HcclComm,
    stream: aclrtStream,
    outgoing: bool,
) -> Result<(), (HcclResult, String)> {
    if data_type != sys::HCCL_DATA_TYPE_UINT8 {
        return Err((
            E_NOT_SUPPORT,
            format!("the emulator moves HCCL_DATA_TYPE_UINT8 only, not {data_type}"),
        ));
    }
    let comm = comm_of(comm)?;
    if peer != 1 - comm.rank {
        return Err((
            E_PARA,
            format!("rank {} of 2 has no peer rank {peer}", comm.rank),
        ));
    }
    let len = usize::try_from(count).map_err(|_| (E_PARA, "count too large".into()))?;
    let mut state = initialized().map_err(acl_failure)?;
    stream_device(&state, stream).map_err(acl_failure)?;
    let (host, _) = state.device_range(buf as u64, len).map_err(acl_failure)?;
    let done = Arc::new(Completion::default());
    let entry = state
        .streams
        .get_mut(&(stream as usize))
        .ok_or_else(|| (E_PARA, "unknown stream".into()))?;
    // Stream order: copies issued before this call land before it starts.
    std::mem::take(&mut entry.pending)
        .into_iter()
        .for_each(crate::perform);
    entry.hccl.push((Arc::clone(&done), comm.exec_timeout));
    drop(state);
    let queue = if outgoing { &comm.sends } else { &comm.recvs };
    let queued = queue
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|tx| {
            tx.send(Op {
                host,
                len,
                done: Arc::clone(&done),
            })
            .is_ok()
        });
    if queued != Some(true) {
        done.finish(Err("the communicator was destroyed".into()));
    }
    Ok(())
}

/// `HcclResult HcclSend(sendBuf, count, dataType, destRank, comm, stream)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HCCL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HcclSend(
    buf: *mut c_void,
    count: u64,
    data_type: i32,
    dest: u32,
    comm: HcclComm,
    stream: aclrtStream,
) -> HcclResult {
    hccl_export(|| queue(buf, count, data_type, dest, comm, stream, true))
}

/// `HcclResult HcclRecv(recvBuf, count, dataType, srcRank, comm, stream)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HCCL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HcclRecv(
    buf: *mut c_void,
    count: u64,
    data_type: i32,
    src: u32,
    comm: HcclComm,
    stream: aclrtStream,
) -> HcclResult {
    hccl_export(|| queue(buf, count, data_type, src, comm, stream, false))
}

/// `HcclResult HcclCommDestroy(HcclComm comm)`: ends pending operations and joins the
/// workers, so no receive writes after it returns (one-sided communicators: see
/// [`crate::onesided::destroy`]).
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HCCL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HcclCommDestroy(comm: HcclComm) -> HcclResult {
    hccl_export(|| {
        let Some(comm) = comms()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(comm as usize))
        else {
            return crate::onesided::destroy(comm as usize);
        };
        comm.closed.store(true, Ordering::SeqCst);
        let _ = comm.socket.shutdown(Shutdown::Both);
        comm.sends.lock().unwrap_or_else(|p| p.into_inner()).take();
        comm.recvs.lock().unwrap_or_else(|p| p.into_inner()).take();
        let workers = std::mem::take(&mut *comm.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for worker in workers {
            let _ = worker.join();
        }
        Ok(())
    })
}

/// `const char *HcclGetErrorString(HcclResult code)`
#[no_mangle]
pub extern "C" fn HcclGetErrorString(code: HcclResult) -> *const c_char {
    let text: &'static [u8] = match code {
        0 => b"no error\0",
        E_PARA => b"parameter error\0",
        E_PTR => b"empty pointer\0",
        E_INTERNAL => b"internal error\0",
        E_NOT_SUPPORT => b"not supported\0",
        E_TIMEOUT => b"timeout\0",
        E_TCP_CONNECT => b"tcp connect failed\0",
        _ => b"unknown HcclResult (ascend-emu test double)\0",
    };
    text.as_ptr().cast()
}
