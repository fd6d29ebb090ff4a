//! The `shm` channel: the receiver's PD buffer is a file in `/dev/shm` that both sides map;
//! the sender copies chunk bytes straight into the granted pages.
//!
//! A sender whose staging is a [`SharedStaging`] file does not copy: it names the bytes in a
//! `Pull` frame and the receiver copies them from its read-only mapping of that file into the
//! page, hashing them in the same pass (`copy_digest.rs`). Each byte is then read from
//! memory once, as in a plain memcpy, instead of once by the sender's copy and again by the
//! receiver's hash, which on a host whose memory reads are the limit is half the rate.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use memmap2::{Mmap, MmapMut, MmapOptions};
use parking_lot::Mutex;

use super::auth::random;
use super::buffer::PageMemory;
use super::channel::{Channel, ChannelParams, ChannelServer, Landed, Put, ServerSession};
use super::frame::{ChannelKind, Message};
use super::TransferError;
use crate::device::stream::{stream_copy, stream_fence};
use crate::device::{DeviceError, HostBuffer};
use crate::process::process_alive;

const SHM_DIR: &str = "/dev/shm";
const PREFIX: &str = "kvrelay-pd-";
const STAGE_PREFIX: &str = "kvrelay-stage-";

/// The receiver's shared PD buffer. The file is removed when this drops.
pub(crate) struct ShmPages {
    path: PathBuf,
    base: NonNull<u8>,
    len: usize,
    _map: MmapMut,
}

// SAFETY: `base` points into `_map`, which ShmPages owns; the PD buffer hands out disjoint
// page ranges only.
unsafe impl Send for ShmPages {}
// SAFETY: as above.
unsafe impl Sync for ShmPages {}

impl ShmPages {
    /// A fresh, zeroed, pre-faulted shared buffer of `len` bytes, readable only by this user,
    /// named `<prefix><pid>-<label><random hex>`.
    fn create(prefix: &str, label: &str, len: usize) -> Result<Self, TransferError> {
        remove_orphans(Path::new(SHM_DIR), prefix);
        let tag: [u8; 8] = random()?;
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("{prefix}{}-{label}{hex}", std::process::id());
        let path = Path::new(SHM_DIR).join(name);
        let io = |what: &str, e| TransferError::io(format!("{what} {}", path.display()), e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io("creating", e))?;
        let pages = Self::map(&path, &file, len);
        if pages.is_err() {
            // Best effort: the error being returned says what went wrong.
            let _ = std::fs::remove_file(&path);
        }
        pages
    }

    fn map(path: &Path, file: &File, len: usize) -> Result<Self, TransferError> {
        let io = |what: &str, e| TransferError::io(format!("{what} {}", path.display()), e);
        file.set_len(len as u64).map_err(|e| io("sizing", e))?;
        // SAFETY: the file was just created with O_EXCL and mode 0600; the only other
        // writers are senders of this user, which write granted pages only (see the module
        // documentation of `transfer` for the trust model).
        let mut map =
            unsafe { MmapOptions::new().populate().map_mut(file) }.map_err(|e| io("mapping", e))?;
        let base = NonNull::new(map.as_mut_ptr())
            .ok_or_else(|| TransferError::Config("shm mapping at null".into()))?;
        Ok(ShmPages {
            path: path.to_path_buf(),
            base,
            len,
            _map: map,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes the files that processes which died without cleaning up (killed, crashed) left
/// in `dir`: files named `<prefix><pid>-...` (PD buffers, staging), owned by this user, whose
/// process is gone. A file whose process still runs is kept, even if that pid was reused.
fn remove_orphans(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
            .filter(|&pid| pid > 0)
        else {
            continue;
        };
        let ours = entry
            .metadata()
            .is_ok_and(|m| m.file_type().is_file() && m.uid() == uid);
        if !ours || process_alive(pid) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => {
                tracing::info!(path = %entry.path().display(), pid, "removed an shm file its dead process left")
            }
            Err(error) => {
                tracing::debug!(path = %entry.path().display(), %error, "could not remove an orphaned shm file")
            }
        }
    }
}

impl PageMemory for ShmPages {
    fn base(&self) -> NonNull<u8> {
        self.base
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for ShmPages {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "could not remove PD shm file");
        }
    }
}

/// The receiving side: creates the shared PD buffer and names it in `Welcome`.
pub(crate) struct ShmServer {
    rank: u32,
    /// The file senders map and its length, once [`ChannelServer::memory`] created it.
    file: Option<(String, u64)>,
}

impl ShmServer {
    pub(crate) fn new(rank: u32) -> Self {
        ShmServer { rank, file: None }
    }
}

impl ChannelServer for ShmServer {
    fn landing(&self) -> Landed {
        Landed::Announced
    }

    fn memory(&mut self, len: usize) -> Result<Box<dyn PageMemory>, TransferError> {
        let pages = ShmPages::create(PREFIX, &format!("{}-", self.rank), len)?;
        self.file = Some((pages.path().to_string_lossy().into_owned(), len as u64));
        Ok(Box::new(pages))
    }

    fn open(&self) -> Result<(Vec<u8>, Box<dyn ServerSession>), TransferError> {
        let (path, len) = self
            .file
            .as_ref()
            .ok_or_else(|| TransferError::Config("shm PD buffer not created yet".into()))?;
        let params = ChannelParams::write(|out| {
            ChannelParams::put_bytes(out, path.as_bytes());
            ChannelParams::put_u64(out, *len);
        });
        // Staging files a sender names are mapped once per session and kept; a sender whose
        // staging exceeds this much (a few times the PD buffer) is refused.
        let mapped_limit = (*len as usize).saturating_mul(4).max(1 << 30);
        Ok((params, Box::new(ShmSession::new(mapped_limit))))
    }
}

/// The sender's mapping of a receiver's shared PD buffer, and its own handle on the control
/// connection for the `Landed` frames.
pub(crate) struct ShmChannel {
    map: MmapMut,
    control: TcpStream,
}

impl ShmChannel {
    /// Opens the buffer `Welcome`'s parameters name, which must hold `buffer_len` bytes.
    pub(crate) fn from_params(
        params: &[u8],
        buffer_len: u64,
        control: &TcpStream,
    ) -> Result<Self, TransferError> {
        let mut p = ChannelParams::read(ChannelKind::Shm, params)?;
        let path = p.bytes("path")?;
        let len = p.u64("length")?;
        p.end()?;
        let path = std::str::from_utf8(path)
            .map_err(|_| TransferError::Protocol("shm path in Welcome is not UTF-8".into()))?;
        if len < buffer_len {
            return Err(TransferError::Protocol(format!(
                "shm buffer of {len} bytes cannot hold the announced {buffer_len}"
            )));
        }
        let map = Self::open(path, len)?;
        let control = control
            .try_clone()
            .map_err(|e| TransferError::io("cloning the PD control connection", e))?;
        Ok(ShmChannel { map, control })
    }

    /// Maps the buffer a receiver named in `Welcome` (a receiver must not make us write
    /// anywhere else), which must have the announced size.
    fn open(path: &str, len: u64) -> Result<MmapMut, TransferError> {
        let file = open_checked(path, PREFIX, true)?;
        let found = file.metadata().map(|m| m.len());
        if found.as_ref().ok() != Some(&len) {
            return Err(TransferError::Protocol(format!(
                "shm file {path} holds {found:?} bytes, not the announced {len}"
            )));
        }
        // SAFETY: the mapping is shared with the receiver, which does not write pages it
        // granted to us until we commit or disconnect; we write only granted ranges.
        unsafe { MmapOptions::new().populate().map_mut(&file) }
            .map_err(|e| TransferError::io(format!("mapping {path}"), e))
    }
}

/// Opens `path` after checking that it names a kvrelay file `<prefix>*` in `/dev/shm` and,
/// once open (without following a link), that it is a regular file of this user.
fn open_checked(path: &str, prefix: &str, write: bool) -> Result<File, TransferError> {
    let name = path
        .strip_prefix(SHM_DIR)
        .and_then(|p| p.strip_prefix('/'))
        .filter(|n| n.starts_with(prefix))
        .filter(|n| n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if name.is_none() {
        return Err(TransferError::Protocol(format!(
            "the peer named shm file {path:?}, which is not {SHM_DIR}/{prefix}*"
        )));
    }
    let io = |what: &str, e| TransferError::io(format!("{what} {path}"), e);
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io("opening", e))?;
    let meta = file.metadata().map_err(|e| io("inspecting", e))?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if !meta.file_type().is_file() || meta.uid() != uid {
        return Err(TransferError::Protocol(format!(
            "shm file {path} is not a regular file of uid {uid}"
        )));
    }
    Ok(file)
}

impl Channel for ShmChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Shm
    }

    fn put(&mut self, dst: Put, src: &[u8]) -> Result<(), TransferError> {
        let len = u32::try_from(src.len()).map_err(|_| {
            TransferError::Config(format!("a put of {} bytes passes MAX_PUT", src.len()))
        })?;
        if let Some((source, source_offset)) = staged_source(src) {
            // The bound a copy would have: the receiver checks the grant again.
            self.target(dst, src.len())?;
            let pull = Message::Pull {
                grant: dst.grant,
                chunk: dst.chunk,
                offset: dst.chunk_offset,
                len,
                source: source.to_string(),
                source_offset,
            };
            return self
                .control
                .write_all(&pull.encode())
                .map_err(|e| TransferError::io("naming staged chunk bytes", e));
        }
        let target = self.target(dst, src.len())?;
        // Streaming stores: the destination is read by another process, so filling this
        // cache with it (and reading each line before overwriting it) would only cost.
        // SAFETY: `target` and `src` are valid for src.len() bytes and cannot overlap: one
        // is our shared mapping, the other the caller's slice of its own memory.
        unsafe { stream_copy(target.as_mut_ptr(), src.as_ptr(), src.len()) };
        // Streaming stores are weakly ordered: drain them before the frame tells the
        // receiver to read these bytes.
        stream_fence();
        let landed = Message::Landed {
            grant: dst.grant,
            chunk: dst.chunk,
            offset: dst.chunk_offset,
            len,
        };
        self.control
            .write_all(&landed.encode())
            .map_err(|e| TransferError::io("announcing landed chunk bytes", e))
    }

    fn fence(&mut self) -> Result<(), TransferError> {
        // Each put fenced its stores before announcing them.
        Ok(())
    }
}

impl ShmChannel {
    /// The granted range `dst` of the shared mapping, `len` bytes.
    fn target(&mut self, dst: Put, len: usize) -> Result<&mut [u8], TransferError> {
        let start = usize::try_from(dst.remote_offset).unwrap_or(usize::MAX);
        let map_len = self.map.len();
        start
            .checked_add(len)
            .and_then(|end| self.map.get_mut(start..end))
            .ok_or_else(|| {
                TransferError::Protocol(format!(
                    "{len} bytes at offset {} pass the shared buffer's {map_len} bytes",
                    dst.remote_offset
                ))
            })
    }
}

/// Sender staging memory that a receiver on this host can read: a file in `/dev/shm`, mapped
/// shared. Chunk bytes put from it over the shm channel are pulled by the receiver (see the
/// module documentation); from any other memory they are copied by the sender. The bytes a
/// put names must not change until that request's send returned. The file is removed when
/// this drops (a receiver's mapping of it stays valid).
pub struct SharedStaging {
    pages: ShmPages,
    len: usize,
}

impl SharedStaging {
    /// `len` zeroed, pre-faulted bytes.
    pub fn new(len: usize) -> Result<Self, TransferError> {
        let pages = ShmPages::create(STAGE_PREFIX, "", len.max(1))?;
        let path: Arc<str> = pages.path().to_string_lossy().into();
        STAGED
            .lock()
            .insert(pages.base.as_ptr() as usize, (len, path));
        Ok(SharedStaging { pages, len })
    }
}

impl SharedStaging {
    /// This staging as a [`HostBuffer`], for users that pool and gather into those (the PD
    /// sink); puts from it are still pulled.
    pub fn into_host_buffer(self) -> Result<HostBuffer, DeviceError> {
        let (ptr, len) = (self.pages.base, self.len);
        // SAFETY: the mapping is page aligned, `len` bytes long and zero-filled at
        // creation; this staging is moved into the buffer as its owner, so nothing else
        // reaches the memory, and moving it does not move the mapping.
        unsafe { HostBuffer::from_owned_mapping(ptr, len, Box::new(self)) }
    }
}

impl Deref for SharedStaging {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the mapping holds at least `len` bytes and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.pages.base.as_ptr(), self.len) }
    }
}

impl DerefMut for SharedStaging {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for deref; &mut self makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.pages.base.as_ptr(), self.len) }
    }
}

impl Drop for SharedStaging {
    fn drop(&mut self) {
        STAGED.lock().remove(&(self.pages.base.as_ptr() as usize));
    }
}

/// This process's live [`SharedStaging`] files: start address → (length, path).
static STAGED: Mutex<BTreeMap<usize, (usize, Arc<str>)>> = Mutex::new(BTreeMap::new());

/// The staging file holding all of `bytes`, and their offset in it.
fn staged_source(bytes: &[u8]) -> Option<(Arc<str>, u64)> {
    let at = bytes.as_ptr() as usize;
    let staged = STAGED.lock();
    let (&start, (len, path)) = staged.range(..=at).next_back()?;
    let offset = at - start;
    (offset + bytes.len() <= *len).then(|| (path.clone(), offset as u64))
}

/// Bytes a sender named in a `Pull`: `len` of them from `start` of a read-only mapping of
/// its staging file, which stays mapped while this is held (the session may drop its own
/// handle meanwhile).
#[derive(Clone)]
pub(crate) struct PulledBytes {
    mapping: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl PulledBytes {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.mapping[self.start..self.start + self.len]
    }
}

/// One sender's session on the receiving side: the staging files it pulled from, mapped
/// read-only and kept for its next requests.
struct ShmSession {
    sources: HashMap<String, Arc<Mmap>>,
    mapped: usize,
    mapped_limit: usize,
}

impl ShmSession {
    fn new(mapped_limit: usize) -> Self {
        ShmSession {
            sources: HashMap::new(),
            mapped: 0,
            mapped_limit,
        }
    }

    fn map_source(&mut self, path: &str) -> Result<&Arc<Mmap>, TransferError> {
        if !self.sources.contains_key(path) {
            let file = open_checked(path, STAGE_PREFIX, false)?;
            let len = file
                .metadata()
                .map_err(|e| TransferError::io(format!("inspecting {path}"), e))?
                .len() as usize;
            if len > self.mapped_limit {
                return Err(TransferError::Protocol(format!(
                    "staging file {path} of {len} bytes is over the {} this receiver maps",
                    self.mapped_limit
                )));
            }
            if self.mapped + len > self.mapped_limit {
                // The sender's staging changed: drop the old mappings.
                self.sources.clear();
                self.mapped = 0;
            }
            // SAFETY: a read-only mapping; the sender may write the file meanwhile, which
            // only changes the bytes copied, and the copy is hashed as it is made.
            let map = unsafe { MmapOptions::new().populate().map(&file) }
                .map_err(|e| TransferError::io(format!("mapping {path}"), e))?;
            self.mapped += len;
            self.sources.insert(path.to_string(), Arc::new(map));
        }
        Ok(&self.sources[path])
    }
}

impl ServerSession for ShmSession {
    fn source(
        &mut self,
        path: &str,
        offset: u64,
        len: usize,
    ) -> Result<PulledBytes, TransferError> {
        let map = self.map_source(path)?;
        let start = usize::try_from(offset)
            .ok()
            .filter(|start| start.checked_add(len).is_some_and(|end| end <= map.len()))
            .ok_or_else(|| {
                TransferError::Protocol(format!(
                    "{len} bytes at offset {offset} pass staging file {path} ({} bytes)",
                    map.len()
                ))
            })?;
        Ok(PulledBytes {
            mapping: Arc::clone(map),
            start,
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphans_of_dead_receivers_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let live = std::process::id();
        let orphan = dir.path().join(format!("{PREFIX}{dead}-0-00112233"));
        let kept = dir.path().join(format!("{PREFIX}{live}-0-44556677"));
        let foreign = dir.path().join(format!("other-{dead}-0"));
        for path in [&orphan, &kept, &foreign] {
            std::fs::write(path, b"x").unwrap();
        }
        remove_orphans(dir.path(), PREFIX);
        assert!(!orphan.exists());
        assert!(kept.exists());
        assert!(foreign.exists());
    }
}
