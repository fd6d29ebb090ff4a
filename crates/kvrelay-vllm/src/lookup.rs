//! The lookup channel between vLLM's two processes. vLLM asks the connector's scheduler
//! half (EngineCore process) how many tokens it can load, but the process-local tiers live
//! in the worker half (Worker process): a PD decoder's PD buffer, where the prefiller's KV
//! arrives, and a CPU tier that is the only tier, where the worker saves; the worker loads
//! from both. The worker half serves its tiers' `contains`, `why_absent` and
//! `release_request` on a Unix socket; the scheduler half's [`LookupClient`] is a
//! [`Tier`] that asks it. The design (private directory, token, frame and time limits) is
//! in `crates/kvrelay/src/connector/CONTRACT.md`, "Two processes".

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use kvrelay::keys::CacheKey;
use kvrelay::store::{Chunk, ChunkMeta, RequestIdScope, StoreError, Tier, TierStack, TierStats};
use serde::{Deserialize, Serialize};

/// Overrides the directory the channel's socket and token file live in.
pub const DIR_ENV: &str = "KVRELAY_LOOKUP_DIR";
/// Random bytes a client must present before its first request.
pub const TOKEN_LEN: usize = 32;
/// The largest request or response body, in bytes.
pub const MAX_FRAME: u32 = 1 << 20;
/// The most keys one request may ask about (a million tokens in chunks of 256).
pub const MAX_KEYS: usize = 4096;
/// The longest request id a release may name.
pub const MAX_REQUEST_ID: usize = 256;
/// The most connections the worker serves at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 4;
/// How long either side waits for the other to send or accept one message.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the worker keeps a connection with no request open.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The worker's one-byte answer to a good token.
const ACCEPTED: u8 = 0x4b;

/// Why the channel cannot be set up or a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    #[error("lookup channel {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("lookup channel directory {path} is not private to this user: {reason}")]
    UnsafeDirectory { path: PathBuf, reason: String },
    #[error("lookup channel name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (from lmcache_rpc_port or vLLM's engine_id)")]
    BadName(String),
    #[error("lookup channel {0}: another live engine serves this socket (two vLLM servers with the same lmcache_rpc_port or engine_id on one host?)")]
    InUse(PathBuf),
    #[error("lookup channel: a frame of {len} bytes is larger than the limit of {MAX_FRAME}")]
    FrameTooLarge { len: u64 },
    #[error("lookup channel {0}: the worker refused the token")]
    Refused(PathBuf),
    #[error("lookup channel: malformed message: {0}")]
    Malformed(String),
    #[error("lookup channel: the worker could not answer: {0}")]
    Remote(String),
}

fn io_error<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> LookupError + 'a {
    move |source| LookupError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Where one worker rank's lookup channel lives: `<dir>/<name>-rank<rank>.sock`, its token
/// in `<name>-rank<rank>.token` beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookupEndpoint {
    dir: PathBuf,
    socket: PathBuf,
    token: PathBuf,
}

impl LookupEndpoint {
    /// `dir` defaults to `$TMPDIR/kvrelay-<uid>`; `name` is what tells engines on one host
    /// apart (LMCache's `lmcache_rpc_port`, else vLLM's `engine_id`).
    pub fn new(dir: Option<PathBuf>, name: &str, rank: u32) -> Result<Self, LookupError> {
        let valid = (1..=64).contains(&name.len())
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid {
            return Err(LookupError::BadName(name.to_string()));
        }
        let dir = dir
            .unwrap_or_else(|| std::env::temp_dir().join(format!("kvrelay-{}", effective_uid())));
        Ok(LookupEndpoint {
            socket: dir.join(format!("{name}-rank{rank}.sock")),
            token: dir.join(format!("{name}-rank{rank}.token")),
            dir,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions, touches no memory of ours and cannot fail.
    unsafe { libc::geteuid() }
}

/// Checks that `dir` is a directory (not a symlink) owned by this user that no one else
/// may enter; with `create`, makes it (mode 0700) first if it is missing.
fn private_dir(dir: &Path, create: bool) -> Result<(), LookupError> {
    if create {
        match std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error(dir, "creating the directory")(e)),
        }
    }
    let meta = std::fs::symlink_metadata(dir).map_err(io_error(dir, "reading the directory"))?;
    let unsafe_dir = |reason: String| {
        Err(LookupError::UnsafeDirectory {
            path: dir.to_path_buf(),
            reason,
        })
    };
    if !meta.is_dir() {
        return unsafe_dir("not a directory (symlinks are not followed)".into());
    }
    if meta.uid() != effective_uid() {
        return unsafe_dir(format!(
            "owned by uid {}, not {}",
            meta.uid(),
            effective_uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return unsafe_dir(format!(
            "mode {:o} lets others in; it must be 0700",
            meta.mode() & 0o777
        ));
    }
    Ok(())
}

/// What the scheduler half asks.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    /// Which of these chunk keys (LMCache key strings) the worker's tiers hold.
    Contains {
        keys: Vec<String>,
    },
    WhyAbsent {
        key: String,
    },
    /// A request ended: free what the tiers hold for it.
    Release {
        request_id: String,
        shared: bool,
    },
}

/// What the worker half answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Response {
    Found(Vec<bool>),
    WhyAbsent(Option<String>),
    Released,
    Error(String),
}

fn write_frame(stream: &mut UnixStream, value: &impl Serialize) -> Result<(), LookupError> {
    let body = serde_json::to_vec(value).map_err(|e| LookupError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME as usize {
        return Err(LookupError::FrameTooLarge {
            len: body.len() as u64,
        });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    stream
        .write_all(&frame)
        .map_err(io_error(Path::new("-"), "sending"))
}

/// Reads one frame; `Ok(None)` when the peer closed the connection between frames.
fn read_frame<T: for<'de> Deserialize<'de>>(
    stream: &mut UnixStream,
) -> Result<Option<T>, LookupError> {
    let mut header = [0u8; 4];
    match stream.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(io_error(Path::new("-"), "receiving")(e)),
    }
    let len = u32::from_le_bytes(header);
    if len > MAX_FRAME {
        return Err(LookupError::FrameTooLarge { len: len.into() });
    }
    let mut body = vec![0u8; len as usize];
    stream
        .read_exact(&mut body)
        .map_err(io_error(Path::new("-"), "receiving"))?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| LookupError::Malformed(e.to_string()))
}

/// Compares without stopping at the first difference.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The worker half's end: serves its tiers until dropped, then removes its files.
pub struct LookupServer {
    endpoint: LookupEndpoint,
    stop: Arc<AtomicBool>,
    /// A duplicate of the served listener, shut down to wake its accept loop even when the
    /// socket file is gone (a temporary-file cleaner) and nothing can connect to it.
    wake: UnixListener,
    /// The connections being served, shut down when the server stops so that no client
    /// is answered from tiers the worker has let go.
    connections: Arc<Connections>,
    thread: Option<JoinHandle<()>>,
}

impl LookupServer {
    /// Makes the private directory, writes a fresh token (mode 0600), binds the socket
    /// (mode 0600) and serves `tiers` on a thread.
    pub fn start(endpoint: LookupEndpoint, tiers: Arc<TierStack>) -> Result<Self, LookupError> {
        private_dir(&endpoint.dir, true)?;
        let socket = endpoint.socket.clone();
        if std::fs::symlink_metadata(&socket).is_ok() {
            if UnixStream::connect(&socket).is_ok() {
                return Err(LookupError::InUse(socket));
            }
            // A socket left by an engine that died: nobody listens on it.
            std::fs::remove_file(&socket).map_err(io_error(&socket, "removing a stale socket"))?;
        }
        let token: [u8; TOKEN_LEN] = rand::random();
        let temporary = endpoint
            .token
            .with_extension(format!("token.{}.tmp", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io_error(&temporary, "creating the token file"))?;
        file.write_all(&token)
            .and_then(|()| file.sync_all())
            .map_err(io_error(&temporary, "writing the token file"))?;
        std::fs::rename(&temporary, &endpoint.token)
            .map_err(io_error(&endpoint.token, "placing the token file"))?;
        let listener = UnixListener::bind(&socket).map_err(io_error(&socket, "binding"))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io_error(&socket, "restricting the socket"))?;
        let wake = listener
            .try_clone()
            .map_err(io_error(&socket, "duplicating the listener"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Connections::default());
        let thread = {
            let stop = Arc::clone(&stop);
            let connections = Arc::clone(&connections);
            std::thread::Builder::new()
                .name("kvrelay-lookup".into())
                .spawn(move || serve(listener, token, tiers, stop, connections))
                .map_err(io_error(&socket, "starting the server thread"))?
        };
        Ok(LookupServer {
            endpoint,
            stop,
            wake,
            connections,
            thread: Some(thread),
        })
    }

    pub fn endpoint(&self) -> &LookupEndpoint {
        &self.endpoint
    }
}

impl Drop for LookupServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees `stop`: a blocked accept on a listening
        // socket that is shut down returns an error.
        // SAFETY: `wake` is a descriptor this server owns and keeps open until after this
        // call; shutdown reads and writes no memory of ours.
        unsafe { libc::shutdown(self.wake.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        for stream in self.connections.open().values() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.endpoint.socket);
        let _ = std::fs::remove_file(&self.endpoint.token);
    }
}

/// The connections a server has open, by number.
#[derive(Default)]
struct Connections {
    open: Mutex<std::collections::HashMap<u64, UnixStream>>,
    next: AtomicU64,
}

impl Connections {
    fn open(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, UnixStream>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Forgets a connection when its thread ends.
struct Slot(Arc<Connections>, u64);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open().remove(&self.1);
    }
}

fn serve(
    listener: UnixListener,
    token: [u8; TOKEN_LEN],
    tiers: Arc<TierStack>,
    stop: Arc<AtomicBool>,
    connections: Arc<Connections>,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let Ok(kept) = stream.try_clone() else {
            continue;
        };
        let id = connections.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut open = connections.open();
            if open.len() >= MAX_CONNECTIONS {
                tracing::warn!("kvrelay lookup channel: {MAX_CONNECTIONS} connections are open already; closing a new one");
                continue;
            }
            open.insert(id, kept);
        }
        let slot = Slot(Arc::clone(&connections), id);
        let tiers = Arc::clone(&tiers);
        let spawned = std::thread::Builder::new()
            .name("kvrelay-lookup-conn".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = serve_connection(stream, &token, &tiers) {
                    tracing::warn!("kvrelay lookup channel: closed a connection: {e}");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("kvrelay lookup channel: cannot serve a connection: {e}");
        }
    }
}

fn serve_connection(
    mut stream: UnixStream,
    token: &[u8; TOKEN_LEN],
    tiers: &TierStack,
) -> Result<(), LookupError> {
    let io = |e| io_error(Path::new("-"), "setting timeouts")(e);
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let mut presented = [0u8; TOKEN_LEN];
    stream
        .read_exact(&mut presented)
        .map_err(io_error(Path::new("-"), "reading the token"))?;
    if !same_token(&presented, token) {
        return Err(LookupError::Refused(PathBuf::from("-")));
    }
    stream
        .write_all(&[ACCEPTED])
        .map_err(io_error(Path::new("-"), "accepting"))?;
    loop {
        stream.set_read_timeout(Some(IDLE_TIMEOUT)).map_err(io)?;
        let Some(request) = read_frame::<Request>(&mut stream)? else {
            return Ok(());
        };
        write_frame(&mut stream, &answer(request, tiers))?;
    }
}

fn answer(request: Request, tiers: &TierStack) -> Response {
    let parse = |key: &str| {
        key.parse::<CacheKey>()
            .map_err(|e| format!("chunk key {key:?}: {e}"))
    };
    match request {
        Request::Contains { keys } => {
            if keys.len() > MAX_KEYS {
                return Response::Error(format!(
                    "{} keys in one lookup; at most {MAX_KEYS}",
                    keys.len()
                ));
            }
            let keys = match keys.iter().map(|k| parse(k)).collect::<Result<Vec<_>, _>>() {
                Ok(keys) => keys,
                Err(e) => return Response::Error(e),
            };
            let mut found = vec![false; keys.len()];
            for tier in tiers.tiers() {
                tier.contains_many(&keys, &mut found);
            }
            Response::Found(found)
        }
        Request::WhyAbsent { key } => match parse(&key) {
            Ok(key) => Response::WhyAbsent(tiers.why_absent(&key)),
            Err(e) => Response::Error(e),
        },
        Request::Release { request_id, shared } => {
            if request_id.len() > MAX_REQUEST_ID {
                return Response::Error(format!(
                    "a request id of {} bytes; at most {MAX_REQUEST_ID}",
                    request_id.len()
                ));
            }
            let scope = if shared {
                RequestIdScope::Shared
            } else {
                RequestIdScope::Local
            };
            tiers.release_request(&request_id, scope);
            Response::Released
        }
    }
}

/// The scheduler half's end: a lookup-only [`Tier`] over the worker's tiers. One
/// connection, opened on first use and again after a failure; a lookup that fails is a miss
/// (vLLM then computes those tokens) and is counted in `stats().unavailable`.
pub struct LookupClient {
    endpoint: LookupEndpoint,
    connection: Mutex<Option<UnixStream>>,
    failures: AtomicU64,
}

impl LookupClient {
    pub fn new(endpoint: LookupEndpoint) -> Self {
        LookupClient {
            endpoint,
            connection: Mutex::new(None),
            failures: AtomicU64::new(0),
        }
    }

    fn connect(&self) -> Result<UnixStream, LookupError> {
        let socket = &self.endpoint.socket;
        private_dir(&self.endpoint.dir, false)?;
        let mut token = [0u8; TOKEN_LEN];
        std::fs::File::open(&self.endpoint.token)
            .and_then(|mut f| f.read_exact(&mut token))
            .map_err(io_error(&self.endpoint.token, "reading the token"))?;
        let mut stream = UnixStream::connect(socket).map_err(io_error(socket, "connecting"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .and_then(|()| stream.write_all(&token))
            .map_err(io_error(socket, "sending the token"))?;
        let mut accepted = [0u8; 1];
        match stream.read_exact(&mut accepted) {
            Ok(()) if accepted[0] == ACCEPTED => Ok(stream),
            _ => Err(LookupError::Refused(socket.clone())),
        }
    }

    /// One request and its answer; a connection kept from earlier that fails is replaced
    /// once (the worker closes idle connections).
    fn call(&self, request: &Request) -> Result<Response, LookupError> {
        let mut connection = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let reused = connection.is_some();
        let answer = match self.exchange(&mut connection, request) {
            Err(_) if reused => self.exchange(&mut connection, request),
            answer => answer,
        };
        match answer? {
            Response::Error(e) => Err(LookupError::Remote(e)),
            response => Ok(response),
        }
    }

    /// Sends `request` on `connection` (opened first if there is none) and reads the
    /// answer; a connection that fails is dropped.
    fn exchange(
        &self,
        connection: &mut Option<UnixStream>,
        request: &Request,
    ) -> Result<Response, LookupError> {
        let stream = match connection {
            Some(stream) => stream,
            None => connection.insert(self.connect()?),
        };
        let answer = write_frame(stream, request).and_then(|()| {
            read_frame::<Response>(stream)?
                .ok_or_else(|| LookupError::Remote("the worker closed the connection".into()))
        });
        if answer.is_err() {
            *connection = None;
        }
        answer
    }

    fn failed(&self, what: &str, error: &LookupError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "kvrelay lookup channel {}: {what} failed: {error}",
            self.endpoint.socket.display()
        );
    }

    fn lookup_only(&self) -> StoreError {
        StoreError::Remote {
            endpoint: self.endpoint.socket.display().to_string(),
            reason: "the scheduler process only looks the worker's tiers up; the worker process loads from them".into(),
        }
    }
}

impl Tier for LookupClient {
    fn name(&self) -> &str {
        "worker tiers (lookup channel)"
    }

    fn contains(&self, key: &CacheKey) -> bool {
        kvrelay::store::contains_by_batch(self, key)
    }

    fn contains_many(&self, keys: &[CacheKey], found: &mut [bool]) {
        let asked: Vec<usize> = (0..keys.len()).filter(|&i| !found[i]).collect();
        for batch in asked.chunks(MAX_KEYS) {
            let request = Request::Contains {
                keys: batch.iter().map(|&i| keys[i].to_string()).collect(),
            };
            match self.call(&request) {
                Ok(Response::Found(answer)) if answer.len() == batch.len() => {
                    for (&i, hit) in batch.iter().zip(answer) {
                        found[i] = hit;
                    }
                }
                Ok(other) => {
                    let error = LookupError::Malformed(format!("{other:?} answering a lookup"));
                    return self.failed("a lookup", &error);
                }
                Err(e) => return self.failed("a lookup", &e),
            }
        }
    }

    fn get(
        &self,
        _key: &CacheKey,
        _expected_fingerprint: u64,
    ) -> Result<Option<Chunk>, StoreError> {
        Err(self.lookup_only())
    }

    fn put(&self, _key: &CacheKey, _meta: ChunkMeta, _data: &[u8]) -> Result<(), StoreError> {
        Err(self.lookup_only())
    }

    fn remove(&self, _key: &CacheKey) -> Result<bool, StoreError> {
        Err(self.lookup_only())
    }

    fn stats(&self) -> TierStats {
        TierStats {
            unavailable: self.failures.load(Ordering::Relaxed),
            ..TierStats::default()
        }
    }

    fn release_request(&self, request_id: &str, scope: RequestIdScope) {
        let request = Request::Release {
            request_id: request_id.to_string(),
            shared: scope == RequestIdScope::Shared,
        };
        match self.call(&request) {
            Ok(Response::Released) => {}
            Ok(other) => self.failed(
                "a release",
                &LookupError::Malformed(format!("{other:?} answering a release")),
            ),
            Err(e) => self.failed("a release", &e),
        }
    }

    fn why_absent(&self, key: &CacheKey) -> Option<String> {
        match self.call(&Request::WhyAbsent {
            key: key.to_string(),
        }) {
            Ok(Response::WhyAbsent(why)) => why,
            Ok(other) => Some(format!("the worker answered {other:?}")),
            Err(e) => Some(format!("the worker's tiers could not be asked: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    use kvrelay::KvDtype;

    fn key(hash: u64) -> CacheKey {
        CacheKey::new("/models/tiny", 1, 0, hash, KvDtype::F32).unwrap()
    }

    /// A tier holding a set of keys that records the requests released.
    #[derive(Default)]
    struct Held {
        keys: HashSet<CacheKey>,
        released: Mutex<Vec<(String, RequestIdScope)>>,
    }

    impl Tier for Held {
        fn name(&self) -> &str {
            "held"
        }
        fn contains(&self, key: &CacheKey) -> bool {
            self.keys.contains(key)
        }
        fn get(&self, _: &CacheKey, _: u64) -> Result<Option<Chunk>, StoreError> {
            Ok(None)
        }
        fn put(&self, _: &CacheKey, _: ChunkMeta, _: &[u8]) -> Result<(), StoreError> {
            Ok(())
        }
        fn remove(&self, _: &CacheKey) -> Result<bool, StoreError> {
            Ok(false)
        }
        fn stats(&self) -> TierStats {
            TierStats::default()
        }
        fn release_request(&self, request_id: &str, scope: RequestIdScope) {
            self.released
                .lock()
                .unwrap()
                .push((request_id.to_string(), scope));
        }
    }

    fn serving(dir: &Path, keys: &[u64]) -> (LookupServer, Arc<Held>) {
        let held = Arc::new(Held {
            keys: keys.iter().map(|&h| key(h)).collect(),
            ..Held::default()
        });
        let tiers = Arc::new(TierStack::new(vec![Arc::clone(&held) as Arc<dyn Tier>]));
        let endpoint = LookupEndpoint::new(Some(dir.join("lookup")), "consumer1", 0).unwrap();
        (LookupServer::start(endpoint, tiers).unwrap(), held)
    }

    /// Connects and presents `token`; returns the stream and whether it was accepted.
    fn raw(server: &LookupServer, token: &[u8]) -> (UnixStream, bool) {
        let mut stream = UnixStream::connect(server.endpoint().socket()).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        // A connection over the limit may be closed before the token is written.
        let sent = stream.write_all(token).is_ok();
        let mut answer = [0u8; 1];
        let accepted = sent && stream.read(&mut answer).unwrap_or(0) == 1 && answer[0] == ACCEPTED;
        (stream, accepted)
    }

    fn token_of(server: &LookupServer) -> Vec<u8> {
        std::fs::read(&server.endpoint().token).unwrap()
    }

    #[test]
    fn the_scheduler_sees_what_the_worker_holds_and_releases_there() {
        let dir = tempfile::tempdir().unwrap();
        let (server, held) = serving(dir.path(), &[1, 2, 4]);
        let client = LookupClient::new(server.endpoint().clone());
        let keys: Vec<CacheKey> = (1..=4).map(key).collect();
        let stack = TierStack::new(vec![Arc::new(client) as Arc<dyn Tier>]);
        // Chunks 1 and 2 are held, 3 is not: the prefix stops there.
        assert_eq!(stack.prefix_hits(&keys), 2);
        assert_eq!(stack.why_absent(&key(3)), None);
        stack.release_request("pd-7", RequestIdScope::Shared);
        stack.release_request("cmpl-1", RequestIdScope::Local);
        assert_eq!(
            *held.released.lock().unwrap(),
            [
                ("pd-7".to_string(), RequestIdScope::Shared),
                ("cmpl-1".to_string(), RequestIdScope::Local)
            ]
        );
        assert_eq!(stack.tiers()[0].stats().unavailable, 0);
        // Files are private, and go with the server.
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&server.endpoint().dir), 0o700);
        assert_eq!(mode(&server.endpoint().token), 0o600);
        assert_eq!(mode(server.endpoint().socket()), 0o600);
        let endpoint = server.endpoint().clone();
        drop(server);
        assert!(!endpoint.socket.exists() && !endpoint.token.exists());
        // With the worker gone, a lookup is a miss counted as unavailable, not an error.
        let client = LookupClient::new(endpoint);
        assert!(!client.contains(&key(1)));
        assert_eq!(client.stats().unavailable, 1);
        assert!(client.get(&key(1), 0).is_err());
    }

    #[test]
    fn a_wrong_token_or_an_oversized_frame_gets_no_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (server, _) = serving(dir.path(), &[1]);
        let (_, accepted) = raw(&server, &[0u8; TOKEN_LEN]);
        assert!(!accepted);
        let (mut stream, accepted) = raw(&server, &token_of(&server));
        assert!(accepted);
        stream.write_all(&(MAX_FRAME + 1).to_le_bytes()).unwrap();
        let mut rest = Vec::new();
        assert_eq!(stream.read_to_end(&mut rest).unwrap_or(0), 0);
        // A malformed request is an error answer; the server keeps serving.
        let (mut stream, _) = raw(&server, &token_of(&server));
        write_frame(
            &mut stream,
            &serde_json::json!({"op": "contains", "keys": ["nope"]}),
        )
        .unwrap();
        let answer: Response = read_frame(&mut stream).unwrap().unwrap();
        assert!(matches!(answer, Response::Error(e) if e.contains("nope")));
        // A client whose token file was replaced is refused: its lookups miss.
        std::fs::write(&server.endpoint().token, [7u8; TOKEN_LEN]).unwrap();
        let client = LookupClient::new(server.endpoint().clone());
        assert!(!client.contains(&key(1)));
        assert_eq!(client.stats().unavailable, 1);
    }

    #[test]
    fn connections_beyond_the_limit_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (server, _) = serving(dir.path(), &[1]);
        let token = token_of(&server);
        let open: Vec<_> = (0..MAX_CONNECTIONS).map(|_| raw(&server, &token)).collect();
        assert!(open.iter().all(|(_, accepted)| *accepted));
        assert!(!raw(&server, &token).1);
        drop(open);
        // Slots free up as connections close.
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        while !raw(&server, &token).1 {
            assert!(std::time::Instant::now() < deadline, "no slot came free");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn unsafe_directories_names_and_live_sockets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open_dir = dir.path().join("open");
        std::fs::create_dir(&open_dir).unwrap();
        std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let endpoint = LookupEndpoint::new(Some(open_dir), "x", 0).unwrap();
        let tiers = Arc::new(TierStack::new(Vec::new()));
        let error = LookupServer::start(endpoint, Arc::clone(&tiers))
            .err()
            .unwrap();
        assert!(error.to_string().contains("mode 755"), "{error}");
        for name in ["", "../up", "a/b", ".hidden", &"n".repeat(65)] {
            assert!(matches!(
                LookupEndpoint::new(None, name, 0),
                Err(LookupError::BadName(_))
            ));
        }
        let (server, _) = serving(dir.path(), &[]);
        let again = LookupServer::start(server.endpoint().clone(), tiers)
            .err()
            .unwrap();
        assert!(matches!(again, LookupError::InUse(_)), "{again}");
    }

    /// A socket file removed under a running server (a temporary-file cleaner) must not
    /// leave dropping the server waiting forever for an accept nobody can wake by
    /// connecting.
    #[test]
    fn a_server_whose_socket_file_is_gone_still_stops() {
        let dir = tempfile::tempdir().unwrap();
        let (server, _) = serving(dir.path(), &[]);
        std::fs::remove_file(server.endpoint().socket()).unwrap();
        let (done, stopped) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(server);
            done.send(()).unwrap();
        });
        stopped
            .recv_timeout(Duration::from_secs(10))
            .expect("dropping the server hung");
    }
}
