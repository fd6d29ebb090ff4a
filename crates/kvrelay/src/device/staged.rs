//! What the vendor devices share: a plan's runs merged into contiguous device ranges laid
//! out in a host staging buffer, the packing of runs into and out of that buffer, and the
//! address checks on engine regions. (Their pool of staging buffers is [`StagingPool`].)

pub(crate) use super::pool::StagingPool;
use super::{DeviceError, EngineMemory, Region};
use crate::plan::CopyRun;

/// A plan's runs merged into contiguous device ranges, laid out one after another in a
/// host staging buffer.
pub(crate) struct StagedPlan {
    pub(crate) ranges: Vec<DeviceRange>,
    /// For each run of the plan, in plan order, its offset in the staging buffer.
    pub(crate) run_staging: Vec<usize>,
    /// Staging bytes needed.
    pub(crate) bytes: usize,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct DeviceRange {
    pub(crate) buffer: u32,
    pub(crate) offset: usize,
    pub(crate) len: usize,
    /// Offset in the staging buffer.
    pub(crate) staging: usize,
}

impl StagedPlan {
    /// Copies each run's bytes from the caller's host buffers into its place in `staging`
    /// (before a scatter's device copies).
    pub(crate) fn pack(&self, runs: &[CopyRun], host: &[&[u8]], staging: &mut [u8]) {
        for (run, &at) in runs.iter().zip(&self.run_staging) {
            staging[at..][..run.len]
                .copy_from_slice(&host[run.src_buffer as usize][run.src_offset..][..run.len]);
        }
    }

    /// Copies each run's bytes from its place in `staging` into the caller's host buffers
    /// (after a gather's device copies landed).
    pub(crate) fn unpack(&self, runs: &[CopyRun], staging: &[u8], host: &mut [&mut [u8]]) {
        for (run, &at) in runs.iter().zip(&self.run_staging) {
            host[run.dst_buffer as usize][run.dst_offset..][..run.len]
                .copy_from_slice(&staging[at..][..run.len]);
        }
    }

    pub(crate) fn new(runs: &[CopyRun], device_side: impl Fn(&CopyRun) -> (u32, usize)) -> Self {
        // Sort (device position, run index) pairs: keys next to each other sort several
        // times faster than comparisons that chase each run.
        let mut order: Vec<((u32, usize), usize)> = runs
            .iter()
            .enumerate()
            .map(|(i, run)| (device_side(run), i))
            .collect();
        order.sort_unstable();
        let mut ranges: Vec<DeviceRange> = Vec::new();
        let mut run_staging = vec![0; runs.len()];
        let mut end = 0usize;
        for ((buffer, offset), i) in order {
            let len = runs[i].len;
            match ranges.last_mut() {
                // Touching or overlapping the previous range: extend it.
                Some(r) if r.buffer == buffer && offset <= r.offset + r.len => {
                    run_staging[i] = r.staging + (offset - r.offset);
                    r.len = r.len.max(offset + len - r.offset);
                }
                _ => {
                    // DMA wants 4 KiB-aligned host operands; small ranges pack tighter.
                    let align = if len >= 4096 { 4096 } else { 64 };
                    let staging = end.next_multiple_of(align);
                    ranges.push(DeviceRange {
                        buffer,
                        offset,
                        len,
                        staging,
                    });
                    run_staging[i] = staging;
                }
            }
            end = ranges.last().map_or(0, |r| r.staging + r.len);
        }
        StagedPlan {
            ranges,
            run_staging,
            bytes: end,
        }
    }
}

/// One past the region's last device address, if that is addressable.
pub(crate) fn region_end(region: &Region) -> Option<u64> {
    region.addr.checked_add(region.len as u64)
}

pub(crate) fn bad_region(engine: &EngineMemory, index: usize, region: &Region) -> DeviceError {
    let layout = engine.layout();
    DeviceError::BadRegions {
        layout: layout.kind().to_string(),
        expected: layout.num_buffers(),
        bytes: layout.buffer_bytes(),
        found: engine.regions().len(),
        detail: format!(
            " (region {index}: {} bytes at {:#x} overflow the address space)",
            region.len, region.addr
        ),
    }
}

/// Checks that every region's device range is addressable, so `addr + offset` below
/// cannot overflow for offsets `check_gather`/`check_scatter` accepted.
pub(crate) fn check_regions(engine: &EngineMemory) -> Result<&[Region], DeviceError> {
    let regions = engine.regions();
    match regions.iter().position(|r| region_end(r).is_none()) {
        Some(i) => Err(bad_region(engine, i, &regions[i])),
        None => Ok(regions),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(src_buffer: u32, src_offset: usize, dst_offset: usize, len: usize) -> CopyRun {
        CopyRun {
            src_buffer,
            src_offset,
            dst_buffer: 0,
            dst_offset,
            len,
        }
    }

    #[test]
    fn staging_merges_touching_device_ranges_and_aligns_large_ones() {
        // Plan order interleaves two blocks' heads; on the device they are contiguous.
        let runs = [
            run(0, 8192, 0, 4096),
            run(0, 0, 4096, 4096),
            run(0, 12288, 8192, 4096),
            run(0, 4096, 12288, 4096),
            // A separate range after a gap, a small one in another buffer, and a run
            // overlapping the previous range's end.
            run(0, 20000, 16384, 100),
            run(1, 64, 16484, 32),
            run(0, 20050, 16516, 100),
        ];
        let staged = StagedPlan::new(&runs, |r| (r.src_buffer, r.src_offset));
        let ranges: Vec<_> = staged
            .ranges
            .iter()
            .map(|r| (r.buffer, r.offset, r.len, r.staging))
            .collect();
        assert_eq!(
            ranges,
            [(0, 0, 16384, 0), (0, 20000, 150, 16384), (1, 64, 32, 16576)]
        );
        assert_eq!(
            staged.run_staging,
            [8192, 0, 12288, 4096, 16384, 16576, 16434]
        );
        assert_eq!(staged.bytes, 16608);
    }
}
