//! tcp: a receiver's chunks are hashed as they land. For a large request a helper thread
//! hashes while the connection's thread reads the next bytes off the socket, so reading and
//! verifying overlap instead of taking turns on one core; a small one is hashed in line, as
//! starting the thread would cost more than it saves.
//!
//! The connection's thread reads a `Data` payload straight into the granted page and counts
//! each `read`'s bytes against the chunk's checksum segments (see `frame::CHECKSUM_SEGMENT`);
//! each segment whose bytes all landed goes to the [`Verifier`] at once, whatever order the
//! sender put the chunk's pieces in (a prefiller sends each layer's slice of a chunk as soon
//! as the layer is computed, chunks interleaved). So segments are hashed while still in the
//! last-level cache, and a chunk's `Seal` only combines its segments' digests and compares
//! them with the sender's checksum. [`Verifier::finish`] returns every chunk's verdict at
//! `Commit`, the only point where the receiver answers. Nothing is shown to the engine
//! before then, so a verdict decided later than the seal changes nothing the sender or the
//! engine sees.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::mpsc;
use std::thread::{Scope, ScopedJoinHandle};

use super::copy_digest::copy_and_digest;
use super::frame::{combine_segments, segment_digest};
use super::shm::PulledBytes;
use super::TransferError;

/// One checksum segment's bytes in a granted page: ones the connection's thread wrote and
/// will not write again while the request lasts, for the verifier to hash, or (in a
/// [`SegmentCopy`]) ones only the verifier writes.
pub(crate) struct PageBytes {
    start: NonNull<u8>,
    len: usize,
}

// SAFETY: the bytes stay valid until the verifier's scope ends, and while they are in a
// job only the verifier's thread reaches them (the contracts of `Verifier::segment` and
// `Verifier::pull`).
unsafe impl Send for PageBytes {}

/// Checksum segment `index` of a chunk: copy `to.len` bytes from `from` in the pulled bytes
/// into the page at `to`, and take their digest.
pub(crate) struct SegmentCopy {
    pub index: u32,
    pub from: usize,
    pub to: PageBytes,
}

impl SegmentCopy {
    /// # Safety
    /// `to` must be valid for writes of `len` bytes, inside a granted page, and written by
    /// no one else until the verifier's scope ends.
    pub(crate) unsafe fn new(index: u32, from: usize, to: *mut u8, len: usize) -> Option<Self> {
        Some(SegmentCopy {
            index,
            from,
            to: PageBytes {
                start: NonNull::new(to)?,
                len,
            },
        })
    }

    /// Copies the segment from `source` and returns its digest.
    pub(crate) fn run(&self, source: &[u8]) -> u64 {
        let from = &source[self.from..self.from + self.to.len];
        // SAFETY: `new`'s contract makes `to` ours to write; `from` is another mapping.
        unsafe { copy_and_digest(self.to.start.as_ptr(), from.as_ptr(), from.len()) }
    }
}

pub(crate) enum Job {
    /// Checksum segment `index` of `chunk`, all its bytes landed.
    Segment {
        chunk: u32,
        index: u32,
        bytes: PageBytes,
    },
    /// Segments of `chunk` to copy from a sender's staging and hash in the same pass.
    Pull {
        chunk: u32,
        source: PulledBytes,
        copies: Vec<SegmentCopy>,
    },
    /// Checksum segments of `chunk`, each (index, digest), already hashed where they were
    /// copied in.
    Digests {
        chunk: u32,
        digests: Vec<(u32, u64)>,
    },
    Seal {
        chunk: u32,
        checksum: u64,
    },
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
    /// A verifier for a request whose chunks have `segments[i]` checksum segments each: one
    /// hashing on its own thread, started in `scope`, when `beside`, else one hashing in
    /// line.
    pub(crate) fn new<'env>(
        scope: &'scope Scope<'scope, 'env>,
        request_id: &str,
        segments: Vec<usize>,
        beside: bool,
    ) -> Result<Self, TransferError> {
        let chunks = segments.len();
        let hashing = Hashing::new(request_id, segments);
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

    /// Queues checksum segment `index` of chunk `chunk`, `len` bytes at `start`, for
    /// hashing. Segments of a chunk, and of different chunks, may come in any order.
    ///
    /// # Safety
    /// The bytes must be valid for reads and written by no one from this call until the end
    /// of the scope the verifier was made in.
    pub(crate) unsafe fn segment(&self, chunk: u32, index: u32, start: *const u8, len: usize) {
        if let Some(start) = NonNull::new(start.cast_mut()) {
            self.submit(Job::Segment {
                chunk,
                index,
                bytes: PageBytes { start, len },
            });
        }
    }

    /// Copies segments of chunk `chunk` from `source` into the page and takes their digests:
    /// on the verify thread when there is one, so a pull's copy runs on two cores.
    pub(crate) fn pull(&self, chunk: u32, source: PulledBytes, copies: Vec<SegmentCopy>) {
        self.submit(Job::Pull {
            chunk,
            source,
            copies,
        });
    }

    /// Checksum segments of chunk `chunk` landed with these (index, digest), each taken
    /// from exactly the bytes written (see `copy_digest.rs`). One job for many segments:
    /// waking the verify thread per 64 KiB would cost more than the digests.
    pub(crate) fn digests(&self, chunk: u32, digests: Vec<(u32, u64)>) {
        self.submit(Job::Digests { chunk, digests });
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

/// Hashes each chunk's segments as they come, and decides its verdict at its seal.
pub(crate) struct Hashing {
    request: String,
    verdicts: Vec<Option<bool>>,
    /// Per chunk: its checksum segments.
    segments: Vec<usize>,
    /// Digests of the segments of chunks not sealed yet: as many as the sender interleaves.
    open: HashMap<u32, Vec<Option<u64>>>,
}

impl Hashing {
    fn new(request: &str, segments: Vec<usize>) -> Self {
        Hashing {
            request: request.to_string(),
            verdicts: vec![None; segments.len()],
            segments,
            open: HashMap::new(),
        }
    }

    fn record(&mut self, chunk: u32, index: u32, digest: u64) {
        let count = self.segments.get(chunk as usize).copied().unwrap_or(0);
        let digests = self.open.entry(chunk).or_insert_with(|| vec![None; count]);
        if let Some(slot) = digests.get_mut(index as usize) {
            *slot = Some(digest);
        }
    }

    /// Hashes a landed segment, or decides a seal's verdict and returns it.
    fn apply(&mut self, job: Job) -> Option<(u32, bool)> {
        match job {
            Job::Segment {
                chunk,
                index,
                bytes,
            } => {
                // SAFETY: `Verifier::segment`'s contract: valid, and written by no one until
                // the scope, which outlives this hashing, ends.
                let bytes = unsafe { std::slice::from_raw_parts(bytes.start.as_ptr(), bytes.len) };
                self.record(chunk, index, segment_digest(bytes));
                None
            }
            Job::Pull {
                chunk,
                source,
                copies,
            } => {
                for copy in copies {
                    let digest = copy.run(source.bytes());
                    self.record(chunk, copy.index, digest);
                }
                None
            }
            Job::Digests { chunk, digests } => {
                for (index, digest) in digests {
                    self.record(chunk, index, digest);
                }
                None
            }
            Job::Seal { chunk, checksum } => {
                // The connection's thread seals a chunk only once all its segments landed.
                let digests: Option<Vec<u64>> = self
                    .open
                    .remove(&chunk)
                    .and_then(|digests| digests.into_iter().collect());
                let matched = digests.is_some_and(|d| combine_segments(&d) == checksum);
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

    use crate::transfer::frame::{num_segments, CHECKSUM_SEGMENT};

    /// Hands `bytes`, chunk `chunk`, to `verifier` segment by segment, in `order`.
    ///
    /// # Safety
    /// `bytes` must outlive the verifier's scope and not be written in it.
    unsafe fn land(verifier: &Verifier<'_>, chunk: u32, bytes: &[u8], order: &[usize]) {
        for &index in order {
            let segment = bytes.chunks(CHECKSUM_SEGMENT).nth(index).unwrap();
            // SAFETY: the caller's contract.
            unsafe { verifier.segment(chunk, index as u32, segment.as_ptr(), segment.len()) };
        }
    }

    #[test]
    fn verdicts_follow_the_bytes_that_landed() {
        let good: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + (i >> 9)) as u8).collect();
        let mut bad = good.clone();
        bad[123_456] ^= 1;
        let n = num_segments(good.len());
        let in_order: Vec<usize> = (0..n).collect();
        let backwards: Vec<usize> = (0..n).rev().collect();
        for beside in [true, false] {
            let verdicts = std::thread::scope(|scope| {
                let verifier = Verifier::new(scope, "r", vec![n; 5], beside).unwrap();
                // SAFETY (all `land` calls): `good` and `bad` outlive the scope and are not
                // written in it.
                unsafe {
                    land(&verifier, 0, &good, &in_order);
                    land(&verifier, 1, &bad, &in_order);
                }
                verifier.seal(0, checksum(&good));
                verifier.seal(1, checksum(&good));
                // Chunks 2 (good, last segment first) and 3 (bad) interleave, segment by
                // segment, as when a prefiller sends each layer's slice of both.
                for (g, b) in backwards.iter().zip(&in_order) {
                    unsafe {
                        land(&verifier, 2, &good, &[*g]);
                        land(&verifier, 3, &bad, &[*b]);
                    }
                }
                verifier.seal(3, checksum(&good));
                verifier.seal(2, checksum(&good));
                // Chunk 4 misses a segment.
                unsafe { land(&verifier, 4, &good, &in_order[1..]) };
                verifier.seal(4, checksum(&good));
                verifier.finish().unwrap()
            });
            assert_eq!(
                verdicts,
                vec![
                    Some(true),
                    Some(false),
                    Some(true),
                    Some(false),
                    Some(false)
                ],
                "beside: {beside}"
            );
        }
    }

    #[test]
    fn a_chunk_sealed_without_bytes_or_unsealed_is_not_verified() {
        let data = [1u8; 64];
        let verdicts = std::thread::scope(|scope| {
            let verifier = Verifier::new(scope, "r", vec![1; 3], false).unwrap();
            // SAFETY: `data` outlives the scope and is not written in it.
            unsafe { verifier.segment(1, 0, data.as_ptr(), data.len()) };
            verifier.seal(0, checksum(&[]));
            verifier.finish().unwrap()
        });
        assert_eq!(verdicts, vec![Some(false), None, None]);
    }
}
