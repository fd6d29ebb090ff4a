//! tcp: a receiver's chunks are hashed as they land. For a large request a helper thread
//! hashes while the connection's thread reads the next bytes off the socket, so reading and
//! verifying overlap instead of taking turns on one core; a small one is hashed in line, as
//! starting the thread would cost more than it saves.
//!
//! The connection's thread reads a `Data` payload straight into the granted page. While the
//! payload extends its chunk's gapless prefix it hands each `read`'s range to the
//! [`Verifier`] as it lands; a segment that arrived early (a prefiller sends each layer's
//! slice of a chunk as soon as the layer is computed) waits in the page and is handed over
//! once the bytes before it have been. So each chunk's ranges reach the verifier in chunk
//! order, while the chunks of a request interleave: one hasher per chunk is open until its
//! `Seal`, which hands over the sender's checksum. The ranges are hashed in order (those
//! that extend the prefix still in the last-level cache: they landed microseconds ago) and
//! compared at each seal; [`Verifier::finish`] returns every chunk's verdict at `Commit`, the
//! only point where the receiver answers. Nothing is shown to the engine before then, so a
//! verdict that arrives later than the seal changes nothing the sender or the engine sees.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
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
    /// Hashes on its own thread, which reports each seal's verdict as it decides it.
    Beside {
        jobs: mpsc::Sender<Job>,
        verdicts: mpsc::Receiver<(u32, bool)>,
        /// Seals queued so far: the verdicts `finish` waits for.
        sealed: Cell<usize>,
        chunks: usize,
        thread: ScopedJoinHandle<'scope, ()>,
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
        let (decided, verdicts) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kvrelay-pd-verify".into())
            .spawn_scoped(scope, move || {
                let mut hashing = hashing;
                for job in queue {
                    if let Some(verdict) = hashing.apply(job) {
                        // The receiving side stops listening only when it gave up.
                        let _ = decided.send(verdict);
                    }
                }
            })
            .map_err(|e| TransferError::io("spawning a PD verify thread", e))?;
        Ok(Verifier::Beside {
            jobs,
            verdicts,
            sealed: Cell::new(0),
            chunks,
            thread,
        })
    }

    fn submit(&self, job: Job) {
        match self {
            // A send fails only when the thread is gone (it panicked); `finish` reports it.
            Verifier::Beside { jobs, sealed, .. } => {
                sealed.set(sealed.get() + usize::from(matches!(job, Job::Seal { .. })));
                let _ = jobs.send(job);
            }
            Verifier::InLine(hashing) => {
                hashing.borrow_mut().apply(job);
            }
        }
    }

    /// Queues `len` bytes at `start`, the next bytes of chunk `chunk`, for hashing. Calls
    /// for different chunks may interleave.
    ///
    /// # Safety
    /// The bytes must be valid for reads, written by no one from this call until the end of
    /// the scope the verifier was made in, and follow the previous bytes queued for `chunk`
    /// in the chunk (the first ones queued for it start the chunk).
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

    /// Waits for every sealed chunk's verdict; returns, per chunk, whether it matched its
    /// seal's checksum (`None` for a chunk never sealed). A verify thread is not waited for
    /// beyond its last verdict: it ends on its own, and the scope it runs in joins it after
    /// the receiver has answered.
    pub(crate) fn finish(self) -> Result<Vec<Option<bool>>, TransferError> {
        match self {
            Verifier::Beside {
                jobs,
                verdicts,
                sealed,
                chunks,
                thread,
            } => {
                drop(jobs);
                let mut out = vec![None; chunks];
                for _ in 0..sealed.get() {
                    let Ok((chunk, matched)) = verdicts.recv() else {
                        // It stopped early: only a panic does; joined here so the scope
                        // does not panic in turn.
                        let _ = thread.join();
                        return Err(TransferError::Protocol(
                            "the PD verify thread panicked".into(),
                        ));
                    };
                    if let Some(verdict) = out.get_mut(chunk as usize) {
                        *verdict = Some(matched);
                    }
                }
                Ok(out)
            }
            Verifier::InLine(hashing) => Ok(hashing.into_inner().verdicts),
        }
    }
}

/// Hashes each chunk's ranges in order until its seal.
pub(crate) struct Hashing {
    request: String,
    verdicts: Vec<Option<bool>>,
    /// The chunks with bytes queued and no seal yet: as many as the sender interleaves.
    open: HashMap<u32, ChunkHasher>,
}

impl Hashing {
    fn new(request: &str, chunks: usize) -> Self {
        Hashing {
            request: request.to_string(),
            verdicts: vec![None; chunks],
            open: HashMap::new(),
        }
    }

    /// Hashes landed bytes, or decides a seal's verdict and returns it.
    fn apply(&mut self, job: Job) -> Option<(u32, bool)> {
        match job {
            Job::Bytes { chunk, bytes } => {
                // SAFETY: `Verifier::landed`'s contract: valid, and written by no one until
                // the scope, which outlives this hashing, ends.
                let bytes = unsafe { std::slice::from_raw_parts(bytes.start.as_ptr(), bytes.len) };
                self.open.entry(chunk).or_default().update(bytes);
                None
            }
            Job::Seal { chunk, checksum } => {
                // The connection's thread seals a chunk only once all its bytes were queued.
                let matched = self
                    .open
                    .remove(&chunk)
                    .is_some_and(|hasher| hasher.digest() == checksum);
                if !matched {
                    tracing::warn!(request = self.request, chunk, "PD chunk checksum mismatch");
                }
                if let Some(verdict) = self.verdicts.get_mut(chunk as usize) {
                    *verdict = Some(matched);
                }
                Some((chunk, matched))
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
                let verifier = Verifier::new(scope, "r", 4, beside).unwrap();
                for (chunk, bytes) in [(0u32, &good), (1, &bad)] {
                    for piece in bytes.chunks(70_001) {
                        // SAFETY: `good` and `bad` outlive the scope and are not written in it.
                        unsafe { verifier.landed(chunk, piece.as_ptr(), piece.len()) };
                    }
                    verifier.seal(chunk, checksum(&good));
                }
                // Chunks 2 (good) and 3 (bad) interleave, piece by piece, as when a
                // prefiller sends each layer's slice of both as the layer is done.
                for (g, b) in good.chunks(50_000).zip(bad.chunks(50_000)) {
                    // SAFETY: as above.
                    unsafe {
                        verifier.landed(2, g.as_ptr(), g.len());
                        verifier.landed(3, b.as_ptr(), b.len());
                    }
                }
                verifier.seal(3, checksum(&good));
                verifier.seal(2, checksum(&good));
                verifier.finish().unwrap()
            });
            assert_eq!(
                verdicts,
                vec![Some(true), Some(false), Some(true), Some(false)],
                "beside: {beside}"
            );
        }
    }

    #[test]
    fn a_chunk_sealed_without_bytes_or_unsealed_is_not_verified() {
        let data = [1u8; 64];
        let verdicts = std::thread::scope(|scope| {
            let verifier = Verifier::new(scope, "r", 3, false).unwrap();
            // SAFETY: `data` outlives the scope and is not written in it.
            unsafe { verifier.landed(1, data.as_ptr(), data.len()) };
            verifier.seal(0, checksum(&[]));
            verifier.finish().unwrap()
        });
        assert_eq!(verdicts, vec![Some(false), None, None]);
    }
}
