//! `kvrelay bench store`: disk-tier put then get of random chunks against a plain file write
//! then read of the same bytes (same file sizes, same directory, no fsync on either), from
//! the page cache, then once more cold (`store_get_cold`: every file written back and
//! dropped from the page cache with `posix_fadvise(DONTNEED)` first); with `--tier redis`,
//! the Redis tier against plain SET/GET (see `store_redis.rs`).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kvrelay::keys::CacheKey;
use kvrelay::store::{ChunkMeta, DiskTier, DiskTierOptions, Tier};
use kvrelay::KvDtype;
use rand::RngCore;

use super::{best_of, gbps, print_result};

const FINGERPRINT: u64 = 0x6b76_7265_6c61_7921;

/// Which tier `bench store` measures.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchTier {
    Disk,
    /// Needs a kvrelay built with `--features redis`.
    Redis,
}

#[derive(clap::Args)]
pub struct StoreArgs {
    #[arg(long, value_enum, default_value_t = BenchTier::Disk)]
    pub tier: BenchTier,
    /// Redis URL for `--tier redis`; without it the bench runs its own `redis-server` on a
    /// free loopback port.
    #[arg(long)]
    pub url: Option<String>,
    /// Bytes of chunks written and read per round.
    #[arg(long, default_value_t = 1 << 30)]
    pub bytes: usize,
    /// Bytes per chunk.
    #[arg(long, default_value_t = 32 << 20)]
    pub chunk_bytes: usize,
    /// Directory to hold the bench's temp directory (default: the current directory, else
    /// the system temp directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Rounds; each figure is the best round.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Cold-cache rounds of the disk get and read (0 skips them).
    #[arg(long, default_value_t = 1)]
    pub cold_rounds: usize,
}

fn temp_dir(parent: Option<&Path>) -> Result<tempfile::TempDir, String> {
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix(".kvrelay-bench-store-");
        b
    };
    match parent {
        Some(dir) => builder
            .tempdir_in(dir)
            .map_err(|e| format!("{}: {e}", dir.display())),
        None => std::env::current_dir()
            .and_then(|cwd| builder.tempdir_in(cwd))
            .or_else(|_| builder.tempdir())
            .map_err(|e| format!("temp dir: {e}")),
    }
}

/// `count` random chunks of `chunk_bytes` in one buffer, and `count` keys for them.
pub fn random_chunks(args: &StoreArgs) -> Result<(Vec<u8>, Vec<CacheKey>), String> {
    if args.chunk_bytes == 0 || args.bytes < args.chunk_bytes {
        return Err("--bytes must be at least --chunk-bytes, and both above 0".into());
    }
    let count = args.bytes / args.chunk_bytes;
    let mut data = vec![0u8; count * args.chunk_bytes];
    rand::thread_rng().fill_bytes(&mut data);
    let model = CacheKey::model_name("bench/model").map_err(|e| e.to_string())?;
    let keys = (0..count as u64)
        .map(|i| CacheKey::with_model(model.clone(), 1, 0, i, KvDtype::Bf16))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    Ok((data, keys))
}

pub fn run(args: StoreArgs) -> Result<(), String> {
    match args.tier {
        BenchTier::Disk => run_disk(args),
        #[cfg(feature = "redis")]
        BenchTier::Redis => super::store_redis::run(args),
        #[cfg(not(feature = "redis"))]
        BenchTier::Redis => Err(
            "this kvrelay was built without the Redis tier; rebuild with `--features redis`".into(),
        ),
    }
}

fn run_disk(args: StoreArgs) -> Result<(), String> {
    let (data, keys) = random_chunks(&args)?;
    let total = data.len();
    let count = keys.len();
    let chunks: Vec<&[u8]> = data.chunks_exact(args.chunk_bytes).collect();

    let root = temp_dir(args.dir.as_deref())?;
    let tier_dir = root.path().join("tier");
    let plain_dir = root.path().join("plain");
    fs::create_dir(&plain_dir).map_err(|e| e.to_string())?;
    let tier = DiskTier::open(&tier_dir, DiskTierOptions::new(2 * total as u64))
        .map_err(|e| e.to_string())?;
    let meta = ChunkMeta {
        layout_fingerprint: FINGERPRINT,
        num_tokens: 256,
    };

    // The plain files get the tier's file size: payload plus the same number of header bytes.
    tier.put(&keys[0], meta, chunks[0])
        .map_err(|e| e.to_string())?;
    let file_len = fs::metadata(tier.chunk_path(&keys[0]))
        .map_err(|e| e.to_string())?
        .len() as usize;
    let pad = vec![0u8; file_len - args.chunk_bytes];
    let plain_paths: Vec<PathBuf> = (0..count)
        .map(|i| plain_dir.join(format!("{i}.bin")))
        .collect();
    let mut read_buf = vec![0u8; file_len];

    let clear = || -> Result<(), String> {
        for (key, path) in keys.iter().zip(&plain_paths) {
            tier.remove(key).map_err(|e| e.to_string())?;
            match fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.to_string()),
                _ => {}
            }
        }
        Ok(())
    };

    let get_all = |failure: &mut Option<String>| {
        for key in &keys {
            match tier.get(key, FINGERPRINT) {
                Ok(Some(chunk)) => drop(std::hint::black_box(chunk)),
                Ok(None) => {
                    failure.get_or_insert(format!("{key} missing"));
                }
                Err(e) => {
                    failure.get_or_insert(e.to_string());
                }
            }
        }
    };
    let mut read_all = |failure: &mut Option<String>| {
        for path in &plain_paths {
            let got = File::open(path).and_then(|mut f| f.read_exact(&mut read_buf));
            if let Err(e) = got {
                failure.get_or_insert(format!("{}: {e}", path.display()));
            }
            std::hint::black_box(&read_buf);
        }
    };
    let (mut put, mut write, mut get, mut read) =
        (Duration::MAX, Duration::MAX, Duration::MAX, Duration::MAX);
    let mut failure: Option<String> = None;
    // Interleaved rounds, so a noisy moment hurts both sides alike; best of each.
    for _ in 0..args.rounds.max(1) {
        clear()?;
        put = put.min(best_of(1, || {
            for (key, chunk) in keys.iter().zip(&chunks) {
                if let Err(e) = tier.put(key, meta, chunk) {
                    failure.get_or_insert(e.to_string());
                }
            }
        }));
        write = write.min(best_of(1, || {
            for (path, chunk) in plain_paths.iter().zip(&chunks) {
                let written = File::create(path)
                    .and_then(|mut f| f.write_all(&pad).and_then(|()| f.write_all(chunk)));
                if let Err(e) = written {
                    failure.get_or_insert(format!("{}: {e}", path.display()));
                }
            }
        }));
        get = get.min(best_of(1, || get_all(&mut failure)));
        read = read.min(best_of(1, || read_all(&mut failure)));
        if let Some(failure) = failure.take() {
            return Err(failure);
        }
    }
    let tier_paths: Vec<PathBuf> = keys.iter().map(|k| tier.chunk_path(k)).collect();
    let (mut cold_get, mut cold_read) = (Duration::MAX, Duration::MAX);
    for _ in 0..args.cold_rounds {
        drop_cached(tier_paths.iter().chain(&plain_paths))?;
        cold_get = cold_get.min(best_of(1, || get_all(&mut failure)));
        cold_read = cold_read.min(best_of(1, || read_all(&mut failure)));
        if let Some(failure) = failure.take() {
            return Err(failure);
        }
    }
    clear()?;

    let extra = serde_json::json!({
        "bytes": total,
        "chunk_bytes": args.chunk_bytes,
        "dir": root.path().display().to_string(),
    });
    print_result(
        "store_put",
        "gbps",
        gbps(total, put),
        gbps(total, write),
        extra.clone(),
    );
    print_result(
        "store_get",
        "gbps",
        gbps(total, get),
        gbps(total, read),
        extra.clone(),
    );
    if args.cold_rounds > 0 {
        print_result(
            "store_get_cold",
            "gbps",
            gbps(total, cold_get),
            gbps(total, cold_read),
            extra,
        );
    }
    Ok(())
}

/// Writes each file's dirty pages back, then drops its pages from the page cache, so the
/// next read of it comes from the disk.
fn drop_cached<'a>(paths: impl Iterator<Item = &'a PathBuf>) -> Result<(), String> {
    for path in paths {
        let err = |e: std::io::Error| format!("{}: {e}", path.display());
        let file = File::open(path).map_err(err)?;
        file.sync_data().map_err(err)?;
        // SAFETY: the descriptor is open for the whole call; the advice changes no memory
        // of this process.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(err(std::io::Error::from_raw_os_error(rc)));
        }
    }
    Ok(())
}
