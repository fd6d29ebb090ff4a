//! The `tcp` channel: payload travels in `Data` frames on the control connection.

use std::net::TcpStream;
use std::os::fd::AsRawFd;

use super::buffer::{HostPages, PageMemory};
use super::channel::{Channel, ChannelParams, ChannelServer, Landed, Passive, Put, ServerSession};
use super::frame::{data_prefix, write_all_vectored, ChannelKind, DataHeader};
use super::TransferError;

/// Socket send buffer for PD connections: several MiB of a `Data` frame in flight. The receive
/// side keeps Linux's autotuning, which grows past what `SO_RCVBUF` may be set to.
const SEND_BUFFER: libc::c_int = 4 << 20;

/// Tunes a PD connection (public so benchmarks can give their baselines the same options): no Nagle delay for the small control frames, a large send
/// buffer, and keepalive probes so a vanished peer is noticed on an idle connection.
/// Failures only cost speed or liveness detection, so they are logged, not returned.
pub fn tune_socket(stream: &TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "TCP_NODELAY not set");
    }
    let fd = stream.as_raw_fd();
    let options = [
        (libc::SOL_SOCKET, libc::SO_SNDBUF, SEND_BUFFER),
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 60),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6),
    ];
    for (level, name, value) in options {
        // SAFETY: fd is an open socket owned by `stream`; the option value is a c_int
        // whose size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(name, error = %std::io::Error::last_os_error(), "setsockopt failed");
        }
    }
}

/// Sends each put (up to 16 MiB) as one `Data` frame: a 28-byte prefix and the payload in one
/// `writev`, straight from the caller's buffer, on its own handle of the control connection.
pub(crate) struct TcpChannel {
    control: TcpStream,
}

impl TcpChannel {
    pub(crate) fn new(control: &TcpStream) -> Result<Self, TransferError> {
        let control = control
            .try_clone()
            .map_err(|e| TransferError::io("cloning the PD control connection", e))?;
        Ok(TcpChannel { control })
    }
}

impl Channel for TcpChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Tcp
    }

    fn put(&mut self, dst: Put, src: &[u8]) -> Result<(), TransferError> {
        let header = DataHeader {
            grant: dst.grant,
            chunk: dst.chunk,
            offset: dst.chunk_offset,
        };
        let prefix = data_prefix(&header, src.len() as u32);
        write_all_vectored(&mut self.control, &[&prefix, src])
            .map_err(|e| TransferError::io("sending chunk data", e))
    }

    fn fence(&mut self) -> Result<(), TransferError> {
        Ok(())
    }
}

/// The receiving side: private host pages, filled by the receiver from `Data` frames.
pub(crate) struct TcpServer;

impl ChannelServer for TcpServer {
    fn landing(&self) -> Landed {
        Landed::InFrames
    }

    fn memory(&mut self, len: usize) -> Result<Box<dyn PageMemory>, TransferError> {
        Ok(Box::new(HostPages::new(len)?))
    }

    fn open(&self) -> Result<(Vec<u8>, Box<dyn ServerSession>), TransferError> {
        Ok((ChannelParams::write(|_| {}), Box::new(Passive)))
    }
}
