//! tcp: a receiver's chunks are hashed as they land. For a large request a helper thread
//! hashes while the connection's thread reads the next bytes off the socket, so reading and
//! verifying overlap instead of taking turns on one core; a small one is hashed in line, as
//! starting the thread would cost more than it saves.
//!
//! The connection's thread reads a `Data` payload straight into the granted page and, after
//! each `read`, hands the range that landed to the [`Verifier`]; at the chunk's `Seal` it
//! hands over the sender's checksum. The ranges are hashed in order (still in the
//! last-level cache: they landed microseconds ago) and compared at each seal;
//! [`Verifier::finish`] returns every chunk's verdict at `Commit`, the only point where the
//! receiver answers. Nothing is shown to the engine before then, so a verdict that arrives
//! later than the seal changes nothing the sender or the engine sees.

use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::mpsc;
use std::thread::{Scope, ScopedJoinHandle};

use super::frame::ChunkHasher;
use super::TransferError;

/// Bytes of a granted page that the connection's thread wrote and will not write again
/// while the request lasts.
pub(crate) struct Landed {
    start: NonNull<u8>,
    len: usize,
}

// SAFETY: the bytes stay valid and unwritten until the verifier's scope ends (the contract
// of `Verifier::landed`), and the verifier's thread only reads them.
unsafe impl Send for Landed {}

pub(crate) enum Job {
    Bytes { chunk: u32, bytes: Landed },
    Seal { chunk: u32, checksum: u64 },
}

/// The hashing side of one request's chunks (see the module documentation).
pub(crate) enum Verifier<'scope> {
    /// Hashes on its own thread.
    Beside {
        jobs: mpsc::Sender<Job>,
        thread: ScopedJoinHandle<'scope, Vec<Option<bool>>>,
    },
    /// Hashes on the connection's thread, as each range lands.
    InLine(Box<RefCell<Hashing>>),
}

impl<'scope> Verifier<'scope> {
    /// A verifier for a request of `chunks` chunks: one hashing on its own thread, started
    /// in `scope`, when `beside`, else one hashing in line.
    pub(crate) fn new<'env>(
        scope: &'scope Scope<'scope, 'env>,
        request_id: &str,
        chunks: usize,
        beside: bool,
    ) -> Result<Self, TransferError> {
        let hashing = Hashing::new(request_id, chunks);
        if !beside {
            return Ok(Verifier::InLine(Box::new(RefCell::new(hashing))));
        }
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("kvrelay-pd-verify".into())
            .spawn_scoped(scope, move || {
                let mut hashing = hashing;
                for job in queue {
                    hashing.apply(job);
                }
                hashing.verdicts
            })
            .map_err(|e| TransferError::io("spawning a PD verify thread", e))?;
        Ok(Verifier::Beside { jobs, thread })
    }

    fn submit(&self, job: Job) {
        match self {
            // A send fails only when the thread is gone (it panicked); `finish` reports it.
            Verifier::Beside { jobs, .. } => {
                let _ = jobs.send(job);
            }
            Verifier::InLine(hashing) => hashing.borrow_mut().apply(job),
        }
    }

    /// Queues `len` bytes at `start`, the next bytes of chunk `chunk`, for hashing.
    ///
    /// # Safety
    /// The bytes must be valid for reads, written by no one from this call until the end of
    /// the scope the verifier was made in, and follow the previous bytes queued for `chunk`
    /// in the chunk.
    pub(crate) unsafe fn landed(&self, chunk: u32, start: *const u8, len: usize) {
        if let Some(start) = NonNull::new(start.cast_mut()) {
            self.submit(Job::Bytes {
                chunk,
                bytes: Landed { start, len },
            });
        }
    }

    /// Chunk `chunk` is complete: its hash is compared with the sender's `checksum`.
    pub(crate) fn seal(&self, chunk: u32, checksum: u64) {
        self.submit(Job::Seal { chunk, checksum });
    }

    /// Waits for every queued hash; returns, per chunk, whether it matched its seal's
    /// checksum (`None` for a chunk never sealed).
    pub(crate) fn finish(self) -> Result<Vec<Option<bool>>, TransferError> {
        match self {
            Verifier::Beside { jobs, thread } => {
                drop(jobs);
                thread
                    .join()
                    .map_err(|_| TransferError::Protocol("the PD verify thread panicked".into()))
            }
            Verifier::InLine(hashing) => Ok(hashing.into_inner().verdicts),
        }
    }
}

/// Hashes each chunk's ranges in order until its seal.
pub(crate) struct Hashing {
    request: String,
    verdicts: Vec<Option<bool>>,
    open: Option<(u32, ChunkHasher)>,
}

impl Hashing {
    fn new(request: &str, chunks: usize) -> Self {
        Hashing {
            request: request.to_string(),
            verdicts: vec![None; chunks],
            open: None,
        }
    }

    fn apply(&mut self, job: Job) {
        match job {
            Job::Bytes { chunk, bytes } => {
                let hasher = match &mut self.open {
                    Some((c, hasher)) if *c == chunk => hasher,
                    open => &mut open.insert((chunk, ChunkHasher::new())).1,
                };
                // SAFETY: `Verifier::landed`'s contract: valid, and written by no one until
                // the scope, which outlives this hashing, ends.
                hasher
                    .update(unsafe { std::slice::from_raw_parts(bytes.start.as_ptr(), bytes.len) });
            }
            Job::Seal { chunk, checksum } => {
                // The connection's thread seals only the chunk whose bytes it queued last.
                let matched = self
                    .open
                    .take()
                    .is_some_and(|(c, hasher)| c == chunk && hasher.digest() == checksum);
                if !matched {
                    tracing::warn!(request = self.request, chunk, "PD chunk checksum mismatch");
                }
                if let Some(verdict) = self.verdicts.get_mut(chunk as usize) {
                    *verdict = Some(matched);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::frame::checksum;

    #[test]
    fn verdicts_follow_the_bytes_that_landed() {
        let good: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + (i >> 9)) as u8).collect();
        let mut bad = good.clone();
        bad[123_456] ^= 1;
        for beside in [true, false] {
            let verdicts = std::thread::scope(|scope| {
                let verifier = Verifier::new(scope, "r", 3, beside).unwrap();
                for (chunk, bytes) in [(0u32, &good), (1, &bad)] {
                    for piece in bytes.chunks(70_001) {
                        // SAFETY: `good` and `bad` outlive the scope and are not written in it.
                        unsafe { verifier.landed(chunk, piece.as_ptr(), piece.len()) };
                    }
                    verifier.seal(chunk, checksum(&good));
                }
                verifier.finish().unwrap()
            });
            assert_eq!(
                verdicts,
                vec![Some(true), Some(false), None],
                "beside: {beside}"
            );
        }
    }
}
