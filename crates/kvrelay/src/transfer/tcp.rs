//! The `tcp` channel: payload travels in `Data` frames on the control connection.

use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use super::buffer::{HostPages, PageMemory};
use super::channel::{Channel, ChannelParams, ChannelServer, Landed, Passive, Put, ServerSession};
use super::frame::{data_prefix, write_all_vectored, ChannelKind, DataHeader};
use super::TransferError;

/// Socket receive buffer for PD connections. A fixed 4 MiB (the kernel doubles it for its
/// bookkeeping) beat Linux's autotuning, which grows the buffer to 32 MiB, in 11 of 12 runs
/// of `kvrelay bench transfer`'s single-stream loopback configurations (2 shared cores): the
/// bytes a reader copies out were written into the buffer recently enough to be in cache.
/// The send buffer is left to the kernel's autotuning (up to `net.ipv4.tcp_wmem`'s
/// maximum): in two races (7 rounds each, 2 loaded cores) of 12 plain loopback
/// configurations, a fixed 4 MiB send buffer lost to autotuning at every write size and
/// receive buffer (medians 1.0–1.5 against 1.3–2.2 GB/s).
const RECEIVE_BUFFER: libc::c_int = 4 << 20;

/// Bytes per `write` of a `Data` frame's payload. The frame stays one frame of up to
/// 16 MiB; writing it 1 MiB at a time lets the kernel wake the reader and free send-buffer
/// space in smaller steps, which beat 16 MiB writes in the same races (medians 1.8–2.2
/// against 1.3–1.7 GB/s with autotuned buffers on both sides).
const WRITE_SIZE: usize = 1 << 20;

/// Tunes a PD connection: no Nagle delay for the small control frames, a large receive
/// buffer, and keepalive probes so a vanished peer is noticed on an idle
/// connection. Failures only cost speed or liveness detection, so they are logged, not
/// returned.
pub(crate) fn tune_socket(stream: &TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "TCP_NODELAY not set");
    }
    let options = [
        (libc::SOL_SOCKET, libc::SO_RCVBUF, RECEIVE_BUFFER),
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 60),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6),
    ];
    for (level, name, value) in options {
        if let Err(error) = set_option(stream, level, name, value) {
            tracing::debug!(name, %error, "setsockopt failed");
        }
    }
}

/// Sets a socket's `SO_SNDBUF` and `SO_RCVBUF` (bytes; `None` keeps the kernel's
/// autotuning, which setting a size turns off). The kernel caps sizes at
/// `net.core.wmem_max` / `rmem_max`. Set the receive buffer on a listener before clients
/// connect: accepted sockets inherit it, and the handshake fixes the window scale.
pub fn set_socket_buffers(
    socket: &impl AsRawFd,
    send: Option<usize>,
    receive: Option<usize>,
) -> io::Result<()> {
    let sizes = [(libc::SO_SNDBUF, send), (libc::SO_RCVBUF, receive)];
    for (name, size) in sizes {
        if let Some(size) = size {
            let size = libc::c_int::try_from(size).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "socket buffer too large")
            })?;
            set_option(socket, libc::SOL_SOCKET, name, size)?;
        }
    }
    Ok(())
}

fn set_option(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the descriptor is an open socket that `socket` owns for the whole call; the
    // option value is a c_int whose size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends each put (up to 16 MiB) as one `Data` frame, straight from the caller's buffer, on
/// its own handle of the control connection: the 28-byte prefix and the payload's first
/// [`WRITE_SIZE`] bytes in one `writev`, the rest in writes of [`WRITE_SIZE`].
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
        let (first, rest) = src.split_at(src.len().min(WRITE_SIZE));
        write_all_vectored(&mut self.control, &[&prefix, first])
            .and_then(|()| {
                rest.chunks(WRITE_SIZE)
                    .try_for_each(|piece| self.control.write_all(piece))
            })
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
