//! The `shm` channel: the receiver's PD buffer is a file in `/dev/shm` that both sides map;
//! the sender copies chunk bytes straight into the granted pages.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use memmap2::{MmapMut, MmapOptions};

use super::auth::random;
use super::buffer::PageMemory;
use super::channel::{Channel, ChannelParams, ChannelServer, Landed, Passive, Put, ServerSession};
use super::frame::{ChannelKind, Message};
use super::TransferError;
use crate::device::stream::{stream_copy, stream_fence};
use crate::process::process_alive;

const SHM_DIR: &str = "/dev/shm";
const PREFIX: &str = "kvrelay-pd-";

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
    /// A fresh, zeroed, pre-faulted shared buffer of `len` bytes, readable only by this user.
    pub(crate) fn create(rank: u32, len: usize) -> Result<Self, TransferError> {
        remove_orphans(Path::new(SHM_DIR));
        let tag: [u8; 8] = random()?;
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let path = Path::new(SHM_DIR).join(format!("{PREFIX}{}-{rank}-{hex}", std::process::id()));
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

/// Removes the PD buffers that receivers which died without cleaning up (killed, crashed)
/// left in `dir`: files named `kvrelay-pd-<pid>-...`, owned by this user, whose process is
/// gone. A file whose process still runs is kept, even if that pid was reused.
fn remove_orphans(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
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
                tracing::info!(path = %entry.path().display(), pid, "removed a PD shm buffer its dead receiver left")
            }
            Err(error) => {
                tracing::debug!(path = %entry.path().display(), %error, "could not remove an orphaned PD shm buffer")
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
        let pages = ShmPages::create(self.rank, len)?;
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
        Ok((params, Box::new(Passive)))
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

    /// Maps the buffer a receiver named in `Welcome`, after checking that the name is a
    /// kvrelay PD file in `/dev/shm` (a receiver must not make us write elsewhere), that it
    /// is a regular file of this user, and that it has the announced size.
    fn open(path: &str, len: u64) -> Result<MmapMut, TransferError> {
        let name = path
            .strip_prefix(SHM_DIR)
            .and_then(|p| p.strip_prefix('/'))
            .filter(|n| n.starts_with(PREFIX))
            .filter(|n| n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if name.is_none() {
            return Err(TransferError::Protocol(format!(
                "receiver named shm file {path:?}, which is not {SHM_DIR}/{PREFIX}*"
            )));
        }
        let io = |what: &str, e| TransferError::io(format!("{what} {path}"), e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| io("opening", e))?;
        let meta = file.metadata().map_err(|e| io("inspecting", e))?;
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if !meta.file_type().is_file() || meta.uid() != uid || meta.len() != len {
            return Err(TransferError::Protocol(format!(
                "shm file {path} is not a regular file of uid {uid} with {len} bytes"
            )));
        }
        // SAFETY: the mapping is shared with the receiver, which does not write pages it
        // granted to us until we commit or disconnect; we write only granted ranges.
        unsafe { MmapOptions::new().populate().map_mut(&file) }.map_err(|e| io("mapping", e))
    }
}

impl Channel for ShmChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Shm
    }

    fn put(&mut self, dst: Put, src: &[u8]) -> Result<(), TransferError> {
        let len = u32::try_from(src.len()).map_err(|_| {
            TransferError::Config(format!("a put of {} bytes passes MAX_PUT", src.len()))
        })?;
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
        remove_orphans(dir.path());
        assert!(!orphan.exists());
        assert!(kept.exists());
        assert!(foreign.exists());
    }
}
