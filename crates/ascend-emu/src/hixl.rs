//! HIXL client/server C API emulation (TEST DOUBLE; `cs/hixl_cs.h`, CANN 9.1): a server
//! listens on its TCP `server_ip:server_port` with its device memory registered; a client
//! connects, maps the server's registered memory (as [`crate::onesided`] maps a peer's)
//! and puts into it for real, each MiB acknowledged by the server process.
//!
//! Semantics kept: memory is registered before listening (server) or connecting (client);
//! `HixlCSClientBatchPutSync` returns once the bytes landed or fails (`HIXL_TIMEOUT` when
//! they did not within its timeout, `HIXL_FAILED` when the server is gone);
//! `HixlCSClientBatchPutAsync` starts the put and `HixlCSClientQueryCompleteStatus` says
//! `WAITING`, `COMPLETED` or `FAILED`. Every call answers `HIXL_FAILED` below CANN 9.1
//! (9.0's structs differ and are not emulated). The byte knobs of [`crate::hccl`] apply.

use std::collections::HashMap;
use std::ffi::{c_char, CStr};
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use ascend_sys::sys::{
    self, CommMem, HixlClientDesc, HixlClientHandle, HixlCompleteHandle, HixlCompleteStatus,
    HixlConfig, HixlMemHandle, HixlOneSideOpDesc, HixlServerDesc, HixlServerHandle, HixlStatus,
};
use ascend_sys::CannVersion;

use crate::hccl::{knobs, status_export, Completion, NEXT_ID};
use crate::onesided::{describe, map_peer, put, Link, Region};
use crate::{current_device, initialized};

const PARAM_INVALID: HixlStatus = sys::HIXL_PARAM_INVALID;
const TIMEOUT: HixlStatus = sys::HIXL_TIMEOUT;
const FAILED: HixlStatus = sys::HIXL_FAILED;

type Fallible<T> = Result<T, (HixlStatus, String)>;

fn export(body: impl FnOnce() -> Fallible<()>) -> HixlStatus {
    status_export(sys::HIXL_SUCCESS, FAILED, body)
}

/// Refuses every call below CANN 9.1 and on a thread with no device.
fn supported(call: &str) -> Fallible<()> {
    let failed = |f: crate::Failure| (FAILED, f.1);
    let version = crate::emulated_cann().map_err(failed)?;
    if version < CannVersion::release(9, 1, 0) {
        return Err((
            FAILED,
            format!("{call}: the emulator has the CANN 9.1 HIXL C API, not CANN {version}'s"),
        ));
    }
    drop(initialized().map_err(failed)?);
    current_device().map_err(failed)?;
    Ok(())
}

/// A registration's device range, checked to lie in one allocation.
fn region(mem: *const CommMem) -> Fallible<Region> {
    if mem.is_null() {
        return Err((PARAM_INVALID, "null memory".into()));
    }
    // SAFETY: checked non-null; a 24-byte plain struct.
    let mem = unsafe { *mem };
    if mem.type_ != sys::COMM_MEM_TYPE_DEVICE {
        return Err((
            PARAM_INVALID,
            "the emulator registers device memory only".into(),
        ));
    }
    let region = Region {
        addr: mem.addr as u64,
        len: usize::try_from(mem.size).map_err(|_| (PARAM_INVALID, "size too large".into()))?,
    };
    initialized()
        .map_err(|f| (FAILED, f.1))?
        .device_alloc(region.addr, region.len)
        .map_err(|f| (PARAM_INVALID, f.1))?;
    Ok(region)
}

fn address(ip: *const c_char, port: u32) -> Fallible<std::net::SocketAddr> {
    if ip.is_null() {
        return Err((PARAM_INVALID, "null server_ip".into()));
    }
    // SAFETY: checked non-null; NUL-terminated by the prototype.
    let ip = unsafe { CStr::from_ptr(ip) }.to_string_lossy().into_owned();
    let port = u16::try_from(port).map_err(|_| (PARAM_INVALID, format!("port {port}")))?;
    (ip.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| (PARAM_INVALID, format!("server address {ip}:{port}")))
}

struct Server {
    address: std::net::SocketAddr,
    regions: Mutex<Vec<Region>>,
    closed: Arc<AtomicBool>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    links: Arc<Mutex<Vec<Link>>>,
}

struct Client {
    address: std::net::SocketAddr,
    regions: Mutex<Vec<Region>>,
    link: Mutex<Option<Arc<Link>>>,
    puts: Mutex<HashMap<usize, Arc<Completion>>>,
}

fn servers() -> &'static Mutex<HashMap<usize, Arc<Server>>> {
    static SERVERS: OnceLock<Mutex<HashMap<usize, Arc<Server>>>> = OnceLock::new();
    SERVERS.get_or_init(Default::default)
}

fn clients() -> &'static Mutex<HashMap<usize, Arc<Client>>> {
    static CLIENTS: OnceLock<Mutex<HashMap<usize, Arc<Client>>>> = OnceLock::new();
    CLIENTS.get_or_init(Default::default)
}

fn find<T>(table: &Mutex<HashMap<usize, Arc<T>>>, handle: usize) -> Fallible<Arc<T>> {
    table
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&handle)
        .cloned()
        .ok_or_else(|| (PARAM_INVALID, format!("unknown HIXL handle {handle:#x}")))
}

fn insert<T>(table: &Mutex<HashMap<usize, Arc<T>>>, value: T) -> usize {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) as usize;
    table
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, Arc::new(value));
    id
}

/// `HixlStatus HixlCSServerCreate(const HixlServerDesc*, const HixlServerConfig*, HixlServerHandle*)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HIXL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HixlCSServerCreate(
    desc: *const HixlServerDesc,
    _config: *const HixlConfig,
    handle: *mut HixlServerHandle,
) -> HixlStatus {
    export(|| {
        supported("HixlCSServerCreate")?;
        if desc.is_null() || handle.is_null() {
            return Err((PARAM_INVALID, "null descriptor or handle slot".into()));
        }
        // SAFETY: checked non-null; valid for the call.
        let desc = unsafe { &*desc };
        if desc.endpoint_list.is_null() || desc.endpoint_list_num == 0 {
            return Err((PARAM_INVALID, "a server needs at least one endpoint".into()));
        }
        let server = Server {
            address: address(desc.server_ip, desc.server_port)?,
            regions: Mutex::default(),
            closed: Arc::default(),
            acceptor: Mutex::default(),
            links: Arc::default(),
        };
        let id = insert(servers(), server);
        // SAFETY: checked non-null; the handle is an opaque number.
        unsafe { *handle = id as HixlServerHandle };
        Ok(())
    })
}

/// `HixlStatus HixlCSServerRegMem(HixlServerHandle, const char *tag, const CommMem*, MemHandle*)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HIXL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HixlCSServerRegMem(
    handle: HixlServerHandle,
    _tag: *const c_char,
    mem: *const CommMem,
    mem_handle: *mut HixlMemHandle,
) -> HixlStatus {
    export(|| {
        supported("HixlCSServerRegMem")?;
        if knobs().register_fail {
            return Err((
                FAILED,
                "registration refused (ASCEND_EMU_HCCL_REGISTER_FAIL)".into(),
            ));
        }
        let server = find(servers(), handle as usize)?;
        if server
            .acceptor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return Err((PARAM_INVALID, "register memory before listening".into()));
        }
        let region = region(mem)?;
        let mut regions = server.regions.lock().unwrap_or_else(|p| p.into_inner());
        regions.push(region);
        if !mem_handle.is_null() {
            // SAFETY: checked non-null; an opaque number.
            unsafe { *mem_handle = regions.len() as HixlMemHandle };
        }
        Ok(())
    })
}

/// `HixlStatus HixlCSServerListen(HixlServerHandle, uint32_t backlog)`: accepts clients on
/// a thread; each gets the registered memory's description and a link.
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HIXL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HixlCSServerListen(handle: HixlServerHandle, _backlog: u32) -> HixlStatus {
    export(|| {
        supported("HixlCSServerListen")?;
        let server = find(servers(), handle as usize)?;
        let regions = server
            .regions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let description = describe(&regions).map_err(|(_, why)| (FAILED, why))?;
        let io = |e: std::io::Error| (FAILED, format!("listening on {}: {e}", server.address));
        let listener = TcpListener::bind(server.address).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let (closed, links) = (Arc::clone(&server.closed), Arc::clone(&server.links));
        let acceptor = std::thread::Builder::new()
            .name("ascend-emu-hixl-accept".into())
            .spawn(move || accept(&listener, &description, &closed, &links))
            .map_err(io)?;
        *server.acceptor.lock().unwrap_or_else(|p| p.into_inner()) = Some(acceptor);
        Ok(())
    })
}

fn accept(
    listener: &TcpListener,
    description: &[u8],
    closed: &AtomicBool,
    links: &Mutex<Vec<Link>>,
) {
    while !closed.load(Ordering::SeqCst) {
        let Ok((mut socket, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let started = socket.set_nonblocking(false).is_ok()
            && socket.set_nodelay(true).is_ok()
            && socket.write_all(description).is_ok();
        let (Ok(reader), Ok(writer)) = (socket.try_clone(), socket.try_clone()) else {
            continue;
        };
        if !started {
            continue;
        }
        if let Ok(link) = Link::start(
            reader,
            writer,
            move || drop(socket.shutdown(Shutdown::Both)),
            Vec::new(),
        ) {
            links.lock().unwrap_or_else(|p| p.into_inner()).push(link);
        }
    }
}

/// `HixlStatus HixlCSServerDestroy(HixlServerHandle)`: stops accepting and closes every
/// client's link.
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HIXL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HixlCSServerDestroy(handle: HixlServerHandle) -> HixlStatus {
    export(|| {
        let server = servers()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(handle as usize))
            .ok_or_else(|| (PARAM_INVALID, format!("unknown HIXL server {handle:?}")))?;
        server.closed.store(true, Ordering::SeqCst);
        let acceptor = server
            .acceptor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(acceptor) = acceptor {
            let _ = acceptor.join();
        }
        for link in std::mem::take(&mut *server.links.lock().unwrap_or_else(|p| p.into_inner())) {
            link.close();
        }
        Ok(())
    })
}

/// `HixlStatus HixlCSClientCreate(const HixlClientDesc*, const HixlClientConfig*, HixlClientHandle*)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HIXL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HixlCSClientCreate(
    desc: *const HixlClientDesc,
    _config: *const HixlConfig,
    handle: *mut HixlClientHandle,
) -> HixlStatus {
    export(|| {
        supported("HixlCSClientCreate")?;
        if desc.is_null() || handle.is_null() {
            return Err((PARAM_INVALID, "null descriptor or handle slot".into()));
        }
        // SAFETY: checked non-null; valid for the call.
        let desc = unsafe { &*desc };
        if desc.local_endpoint.is_null() || desc.remote_endpoint.is_null() {
            return Err((
                PARAM_INVALID,
                "a client needs its local and remote endpoints".into(),
            ));
        }
        let client = Client {
            address: address(desc.server_ip, desc.server_port)?,
            regions: Mutex::default(),
            link: Mutex::default(),
            puts: Mutex::default(),
        };
        let id = insert(clients(), client);
        // SAFETY: checked non-null; the handle is an opaque number.
        unsafe { *handle = id as HixlClientHandle };
        Ok(())
    })
}

/// `HixlStatus HixlCSClientRegMem(HixlClientHandle, const char *tag, const CommMem*, MemHandle*)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HIXL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HixlCSClientRegMem(
    handle: HixlClientHandle,
    _tag: *const c_char,
    mem: *const CommMem,
    mem_handle: *mut HixlMemHandle,
) -> HixlStatus {
    export(|| {
        supported("HixlCSClientRegMem")?;
        let client = find(clients(), handle as usize)?;
        if client
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return Err((PARAM_INVALID, "register memory before connecting".into()));
        }
        let region = region(mem)?;
        let mut regions = client.regions.lock().unwrap_or_else(|p| p.into_inner());
        regions.push(region);
        if !mem_handle.is_null() {
            // SAFETY: checked non-null; an opaque number.
            unsafe { *mem_handle = regions.len() as HixlMemHandle };
        }
        Ok(())
    })
}

/// `HixlStatus HixlCSClientConnect(HixlClientHandle, uint32_t timeout_ms)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HIXL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HixlCSClientConnect(
    handle: HixlClientHandle,
    timeout_ms: u32,
) -> HixlStatus {
    export(|| {
        supported("HixlCSClientConnect")?;
        let client = find(clients(), handle as usize)?;
        let timeout = Duration::from_millis(u64::from(timeout_ms.max(1)));
        let io = |e: std::io::Error| {
            let code = match e.kind() {
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => TIMEOUT,
                _ => FAILED,
            };
            (
                code,
                format!("connecting to the HIXL server at {}: {e}", client.address),
            )
        };
        let mut socket = TcpStream::connect_timeout(&client.address, timeout).map_err(io)?;
        socket.set_nodelay(true).map_err(io)?;
        socket.set_read_timeout(Some(timeout)).map_err(io)?;
        let peer = map_peer(&mut socket).map_err(|(_, why)| (FAILED, why))?;
        socket.set_read_timeout(None).map_err(io)?;
        let (reader, writer) = (
            socket.try_clone().map_err(io)?,
            socket.try_clone().map_err(io)?,
        );
        let link = Link::start(
            reader,
            writer,
            move || drop(socket.shutdown(Shutdown::Both)),
            peer,
        )
        .map_err(io)?;
        *client.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(link));
        Ok(())
    })
}

/// The client's link and its descriptors as host copies.
fn prepare_put(
    handle: HixlClientHandle,
    count: u32,
    descs: *const HixlOneSideOpDesc,
) -> Fallible<(Arc<Client>, Arc<Link>, Vec<crate::Copy>)> {
    let client = find(clients(), handle as usize)?;
    let link = client
        .link
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| (PARAM_INVALID, "put before HixlCSClientConnect".to_string()))?;
    if descs.is_null() && count > 0 {
        return Err((PARAM_INVALID, "null descriptors".into()));
    }
    let descs = match count {
        0 => &[][..],
        // SAFETY: checked non-null; the caller passes `count` descriptors.
        n => unsafe { std::slice::from_raw_parts(descs, n as usize) },
    };
    let regions = client
        .regions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let copies = link
        .resolve(
            &regions,
            descs
                .iter()
                .map(|d| (d.local_buf as u64, d.remote_buf as u64, d.len)),
        )
        .map_err(|why| (PARAM_INVALID, why))?;
    Ok((client, link, copies))
}

/// `HixlStatus HixlCSClientBatchPutSync(HixlClientHandle, uint32_t n, const HixlOneSideOpDesc*, uint32_t timeout_ms)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HIXL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HixlCSClientBatchPutSync(
    handle: HixlClientHandle,
    count: u32,
    descs: *const HixlOneSideOpDesc,
    timeout_ms: u32,
) -> HixlStatus {
    export(|| {
        supported("HixlCSClientBatchPutSync")?;
        let (_, link, copies) = prepare_put(handle, count, descs)?;
        let timeout = Duration::from_millis(u64::from(timeout_ms));
        match put(&link, &copies, timeout) {
            Some(Ok(())) => Ok(()),
            Some(Err(why)) => Err((FAILED, why)),
            None => {
                // Stalled by the knob: nothing more moves; the call gives up at its timeout.
                std::thread::sleep(timeout);
                Err((
                    TIMEOUT,
                    format!("the batch put did not complete within {timeout:?}"),
                ))
            }
        }
    })
}

/// `HixlStatus HixlCSClientBatchPutAsync(HixlClientHandle, uint32_t n, const HixlOneSideOpDesc*, CompleteHandle*)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HIXL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HixlCSClientBatchPutAsync(
    handle: HixlClientHandle,
    count: u32,
    descs: *const HixlOneSideOpDesc,
    complete: *mut HixlCompleteHandle,
) -> HixlStatus {
    export(|| {
        supported("HixlCSClientBatchPutAsync")?;
        if complete.is_null() {
            return Err((PARAM_INVALID, "null complete handle slot".into()));
        }
        let (client, link, copies) = prepare_put(handle, count, descs)?;
        let done = Arc::new(Completion::default());
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) as usize;
        client
            .puts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::clone(&done));
        let copies = SendCopies(copies);
        std::thread::Builder::new()
            .name("ascend-emu-hixl-put".into())
            .spawn(move || {
                let copies = copies;
                // A stalled put never completes; the caller's deadline ends the wait.
                if let Some(result) = put(&link, &copies.0, knobs().exec_timeout) {
                    done.finish(result);
                }
            })
            .map_err(|e| (FAILED, e.to_string()))?;
        // SAFETY: checked non-null; an opaque number.
        unsafe { *complete = id as HixlCompleteHandle };
        Ok(())
    })
}

/// Copies moved to the put's thread.
struct SendCopies(Vec<crate::Copy>);

// SAFETY: the addresses stay valid until the put completes, by the API contract.
unsafe impl Send for SendCopies {}

/// `HixlStatus HixlCSClientQueryCompleteStatus(HixlClientHandle, CompleteHandle, HixlCompleteStatus*)`:
/// a put is forgotten once it reported `COMPLETED` or `FAILED`.
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HIXL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HixlCSClientQueryCompleteStatus(
    handle: HixlClientHandle,
    complete: HixlCompleteHandle,
    status: *mut HixlCompleteStatus,
) -> HixlStatus {
    export(|| {
        supported("HixlCSClientQueryCompleteStatus")?;
        if status.is_null() {
            return Err((PARAM_INVALID, "null status slot".into()));
        }
        let client = find(clients(), handle as usize)?;
        let mut puts = client.puts.lock().unwrap_or_else(|p| p.into_inner());
        let done = puts.get(&(complete as usize)).ok_or_else(|| {
            (
                PARAM_INVALID,
                format!("unknown complete handle {complete:?}"),
            )
        })?;
        let value = match done.peek() {
            None => sys::HIXL_COMPLETE_STATUS_WAITING,
            Some(result) => {
                puts.remove(&(complete as usize));
                match result {
                    Ok(()) => sys::HIXL_COMPLETE_STATUS_COMPLETED,
                    Err(why) => {
                        crate::record_error(&why);
                        sys::HIXL_COMPLETE_STATUS_FAILED
                    }
                }
            }
        };
        // SAFETY: checked non-null.
        unsafe { *status = value as HixlCompleteStatus };
        Ok(())
    })
}

/// `HixlStatus HixlCSClientDestroy(HixlClientHandle)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the HIXL prototype says.
#[no_mangle]
pub unsafe extern "C" fn HixlCSClientDestroy(handle: HixlClientHandle) -> HixlStatus {
    export(|| {
        let client = clients()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(handle as usize))
            .ok_or_else(|| (PARAM_INVALID, format!("unknown HIXL client {handle:?}")))?;
        let link = client.link.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(link) = link {
            link.close();
        }
        Ok(())
    })
}
