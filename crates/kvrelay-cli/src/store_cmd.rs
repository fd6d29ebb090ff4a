//! `kvrelay store ls|verify|gc DIR`: inspect and maintain a disk tier directory.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kvrelay::store::{BadChunk, DiskTier, DiskTierOptions};

#[derive(clap::Subcommand)]
pub enum StoreCommand {
    /// List every chunk (key, tokens, bytes, layout fingerprint) and the total.
    Ls { dir: PathBuf },
    /// Re-check every chunk's checksums; exit 1 if any chunk is bad.
    Verify { dir: PathBuf },
    /// Remove bad chunks and stale temp files; with --max-bytes, also evict the least
    /// recently used chunks down to that many bytes.
    Gc {
        dir: PathBuf,
        #[arg(long)]
        max_bytes: Option<u64>,
    },
}

pub fn run(cmd: StoreCommand) -> Result<ExitCode, String> {
    match cmd {
        StoreCommand::Ls { dir } => ls(&dir),
        StoreCommand::Verify { dir } => verify(&dir),
        StoreCommand::Gc { dir, max_bytes } => gc(&dir, max_bytes),
    }
}

/// Opens an existing tier only: maintenance never creates or adopts a directory, and only
/// `gc` removes files.
fn open(dir: &Path) -> Result<DiskTier, String> {
    let opts = DiskTierOptions {
        create: false,
        clean_on_open: false,
        ..DiskTierOptions::new(u64::MAX)
    };
    DiskTier::open(dir, opts).map_err(|e| e.to_string())
}

fn print_bad(bad: &[BadChunk]) {
    for chunk in bad {
        // The error names the file.
        println!("BAD {}", chunk.error);
    }
}

fn ls(dir: &Path) -> Result<ExitCode, String> {
    let listing = open(dir)?.list().map_err(|e| e.to_string())?;
    for e in &listing.entries {
        println!(
            "{}\t{} tokens\t{} bytes\t{:016x}",
            e.key, e.num_tokens, e.payload_bytes, e.layout_fingerprint
        );
    }
    print_bad(&listing.bad);
    let total: u64 = listing.entries.iter().map(|e| e.payload_bytes).sum();
    println!(
        "total: {} chunks, {total} bytes, {} bad",
        listing.entries.len(),
        listing.bad.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn verify(dir: &Path) -> Result<ExitCode, String> {
    let listing = open(dir)?.verify().map_err(|e| e.to_string())?;
    print_bad(&listing.bad);
    println!(
        "verified {} chunks: {} good, {} bad",
        listing.entries.len() + listing.bad.len(),
        listing.entries.len(),
        listing.bad.len()
    );
    Ok(if listing.bad.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn gc(dir: &Path, max_bytes: Option<u64>) -> Result<ExitCode, String> {
    let report = open(dir)?.gc(max_bytes).map_err(|e| e.to_string())?;
    for bad in &report.removed_bad {
        println!("removed bad: {}", bad.error);
    }
    for path in &report.removed_temp {
        println!("removed temp {}", path.display());
    }
    for entry in &report.evicted {
        println!("evicted {} ({} bytes)", entry.key, entry.file_bytes);
    }
    println!(
        "gc: removed {} bad chunks, {} temp files, evicted {} chunks, freed {} bytes",
        report.removed_bad.len(),
        report.removed_temp.len(),
        report.evicted.len(),
        report.bytes_freed
    );
    Ok(ExitCode::SUCCESS)
}
