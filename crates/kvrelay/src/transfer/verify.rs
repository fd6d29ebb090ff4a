//! tcp: a receiver's chunks are hashed on a helper thread while the connection's thread
//! reads the next bytes off the socket, so reading and verifying overlap instead of taking
//! turns on one core.
//!
//! The connection's thread reads a `Data` payload straight into the granted page and, after
//! each `read`, hands the range that landed to the [`Verifier`]; at the chunk's `Seal` it
//! hands over the sender's checksum. The verifier's thread hashes the ranges in order
//! (still in the last-level cache: they landed microseconds ago) and compares at each seal;
//! [`Verifier::finish`] returns every chunk's verdict at `Commit`, the only point where the
//! receiver answers. Nothing is shown to the engine before then, so a verdict that arrives
//! later than the seal changes nothing the sender or the engine sees.

use std::ptr::NonNull;
use std::sync::mpsc;
use std::thread::{Scope, ScopedJoinHandle};

use super::frame::ChunkHasher;
use super::TransferError;

/// Bytes of a granted page that the connection's thread wrote and will not write again
/// while the request lasts.
struct Landed {
    start: NonNull<u8>,
    len: usize,
}

// SAFETY: the bytes stay valid and unwritten until the verifier's scope ends (the contract
// of `Verifier::landed`), and the verifier's thread only reads them.
unsafe impl Send for Landed {}

enum Job {
    Bytes { chunk: u32, bytes: Landed },
    Seal { chunk: u32, checksum: u64 },
}

/// The hashing side of one request's chunks (see the module documentation).
pub(crate) struct Verifier<'scope> {
    jobs: mpsc::Sender<Job>,
    thread: ScopedJoinHandle<'scope, Vec<Option<bool>>>,
}

impl<'scope> Verifier<'scope> {
    /// Starts the hashing thread, in `scope`, for a request of `chunks` chunks.
    pub(crate) fn spawn<'env>(
        scope: &'scope Scope<'scope, 'env>,
        request_id: &str,
        chunks: usize,
    ) -> Result<Self, TransferError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let request = request_id.to_string();
        let thread = std::thread::Builder::new()
            .name("kvrelay-pd-verify".into())
            .spawn_scoped(scope, move || verify(&request, chunks, queue))
            .map_err(|e| TransferError::io("spawning a PD verify thread", e))?;
        Ok(Verifier { jobs, thread })
    }

    /// Queues `len` bytes at `start`, the next bytes of chunk `chunk`, for hashing.
    ///
    /// # Safety
    /// The bytes must be valid for reads, written by no one from this call until the end of
    /// the scope the verifier was spawned in, and follow the previous bytes queued for
    /// `chunk` in the chunk.
    pub(crate) unsafe fn landed(&self, chunk: u32, start: *const u8, len: usize) {
        if let Some(start) = NonNull::new(start.cast_mut()) {
            // A send fails only when the thread is gone (it panicked); `finish` reports it.
            let _ = self.jobs.send(Job::Bytes {
                chunk,
                bytes: Landed { start, len },
            });
        }
    }

    /// Chunk `chunk` is complete: its hash is compared with the sender's `checksum`.
    pub(crate) fn seal(&self, chunk: u32, checksum: u64) {
        let _ = self.jobs.send(Job::Seal { chunk, checksum });
    }

    /// Waits for every queued hash; returns, per chunk, whether it matched its seal's
    /// checksum (`None` for a chunk never sealed).
    pub(crate) fn finish(self) -> Result<Vec<Option<bool>>, TransferError> {
        drop(self.jobs);
        self.thread
            .join()
            .map_err(|_| TransferError::Protocol("the PD verify thread panicked".into()))
    }
}

/// The verifier's thread: hashes each chunk's ranges in order until its seal.
fn verify(request: &str, chunks: usize, queue: mpsc::Receiver<Job>) -> Vec<Option<bool>> {
    let mut verdicts = vec![None; chunks];
    let mut open: Option<(u32, ChunkHasher)> = None;
    for job in queue {
        match job {
            Job::Bytes { chunk, bytes } => {
                let hasher = match &mut open {
                    Some((c, hasher)) if *c == chunk => hasher,
                    _ => &mut open.insert((chunk, ChunkHasher::new())).1,
                };
                // SAFETY: `Verifier::landed`'s contract: valid, and written by no one until
                // the scope, which outlives this thread, ends.
                hasher
                    .update(unsafe { std::slice::from_raw_parts(bytes.start.as_ptr(), bytes.len) });
            }
            Job::Seal { chunk, checksum } => {
                // The connection's thread seals only the chunk whose bytes it queued last.
                let matched = open
                    .take()
                    .is_some_and(|(c, hasher)| c == chunk && hasher.digest() == checksum);
                if !matched {
                    tracing::warn!(request, chunk, "PD chunk checksum mismatch");
                }
                if let Some(verdict) = verdicts.get_mut(chunk as usize) {
                    *verdict = Some(matched);
                }
            }
        }
    }
    verdicts
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
        let verdicts = std::thread::scope(|scope| {
            let verifier = Verifier::spawn(scope, "r", 3).unwrap();
            for (chunk, bytes) in [(0u32, &good), (1, &bad)] {
                for piece in bytes.chunks(70_001) {
                    // SAFETY: `good` and `bad` outlive the scope and are not written in it.
                    unsafe { verifier.landed(chunk, piece.as_ptr(), piece.len()) };
                }
                verifier.seal(chunk, checksum(&good));
            }
            verifier.finish().unwrap()
        });
        assert_eq!(verdicts, vec![Some(true), Some(false), None]);
    }
}
