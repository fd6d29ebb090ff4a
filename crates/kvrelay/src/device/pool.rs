//! A bounded pool of staging buffers (plain or pinned host memory), so that hot paths reuse
//! memory that is already faulted in instead of allocating, and touching, fresh buffers on
//! every plan, get or send.

use parking_lot::Mutex;

use super::DeviceError;

/// Buffers kept for reuse when no other bound is given; more concurrent users allocate and
/// drop their own.
#[cfg(any(feature = "rbln", feature = "ascend"))]
const DEFAULT_KEEP: usize = 2;

/// Staging buffers kept for reuse, at most `keep` of them; the largest are kept.
pub(crate) struct StagingPool<B> {
    buffers: Mutex<Vec<B>>,
    keep: usize,
}

impl<B: std::ops::Deref<Target = [u8]>> StagingPool<B> {
    #[cfg(any(feature = "rbln", feature = "ascend"))]
    pub(crate) fn new() -> Self {
        Self::keeping(DEFAULT_KEEP)
    }

    /// A pool that keeps at most `keep` idle buffers.
    pub(crate) fn keeping(keep: usize) -> Self {
        StagingPool {
            buffers: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A pooled buffer of at least `len` bytes, or a new one from `alloc`.
    #[cfg(any(test, feature = "rbln", feature = "ascend"))]
    pub(crate) fn take(
        &self,
        len: usize,
        alloc: impl FnOnce(usize) -> Result<B, DeviceError>,
    ) -> Result<B, DeviceError> {
        self.take_where(|b| b.len() >= len, len, alloc)
    }

    /// A pooled buffer of exactly `len` bytes, or a new one from `alloc`: for users that
    /// hand the buffer on whole (a chunk's staging, a file's contents).
    pub(crate) fn take_exact(
        &self,
        len: usize,
        alloc: impl FnOnce(usize) -> Result<B, DeviceError>,
    ) -> Result<B, DeviceError> {
        self.take_where(|b| b.len() == len, len, alloc)
    }

    fn take_where(
        &self,
        fits: impl Fn(&B) -> bool,
        len: usize,
        alloc: impl FnOnce(usize) -> Result<B, DeviceError>,
    ) -> Result<B, DeviceError> {
        let mut pool = self.buffers.lock();
        match pool.iter().position(fits) {
            Some(i) => Ok(pool.swap_remove(i)),
            None => {
                drop(pool);
                alloc(len)
            }
        }
    }

    /// Returns a buffer to the pool, which keeps the largest `keep`.
    pub(crate) fn give_back(&self, buffer: B) {
        let mut pool = self.buffers.lock();
        pool.push(buffer);
        if pool.len() > self.keep {
            let smallest = (0..pool.len()).min_by_key(|&i| pool[i].len());
            smallest.map(|i| pool.swap_remove(i));
        }
    }

    /// Idle buffers held now.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.buffers.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(len: usize) -> Result<Vec<u8>, DeviceError> {
        Ok(vec![0; len])
    }

    #[test]
    fn buffers_are_reused_and_the_pool_stays_bounded() {
        let pool = StagingPool::<Vec<u8>>::keeping(2);
        let mut a = pool.take_exact(64, alloc).unwrap();
        a[0] = 7;
        pool.give_back(a);
        // The same memory comes back for the same length, not for another one.
        assert_eq!(pool.take_exact(64, alloc).unwrap()[0], 7);
        pool.give_back(vec![7; 64]);
        assert_eq!(pool.take_exact(32, alloc).unwrap(), vec![0; 32]);
        assert_eq!(pool.idle(), 1);
        // `take` accepts a larger buffer.
        assert_eq!(pool.take(32, alloc).unwrap().len(), 64);
        for len in [8, 16, 24, 40] {
            pool.give_back(vec![0; len]);
        }
        assert_eq!(pool.idle(), 2);
        let mut kept: Vec<usize> = (0..2).map(|_| pool.take(1, alloc).unwrap().len()).collect();
        kept.sort();
        assert_eq!(kept, [24, 40], "the largest buffers are kept");
    }
}
