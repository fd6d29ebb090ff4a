//! `kvrelay store ls|verify|gc DIR`: inspect and maintain a disk tier directory.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kvrelay::store::{DiskTier, DiskTierOptions, Listing};

#[derive(clap::Subcommand)]
pub enum StoreCommand {
    /// List every chunk (key, tokens, bytes, layout fingerprint), damaged chunk files and
    /// foreign entries, and the totals. Checks headers only; changes nothing.
    Ls { dir: PathBuf },
    /// Re-check every chunk's checksums; exit 1 if any chunk file is damaged or any entry
    /// under a chunk's name is not a regular file. Changes nothing.
    Verify { dir: PathBuf },
    /// Remove damaged chunks, foreign entries and stale temp files; with --max-bytes, also
    /// evict the least recently used chunks down to that many bytes.
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

/// The damaged chunk files and foreign entries, one line each.
fn print_problems(listing: &Listing) {
    for chunk in &listing.bad {
        // The error names the file.
        println!("DAMAGED {}", chunk.error);
    }
    for entry in &listing.foreign {
        println!(
            "FOREIGN {}: a {}, not a chunk file",
            entry.path.display(),
            entry.kind
        );
    }
}

/// The counts `ls` and `verify` both print, over the same set of files: every regular file
/// under a chunk's name is a chunk file, good or damaged; anything else there is foreign.
fn counts(listing: &Listing) -> String {
    let (good, damaged) = (listing.entries.len(), listing.bad.len());
    format!(
        "{} chunk files: {good} good, {damaged} damaged; {} foreign entries",
        good + damaged,
        listing.foreign.len()
    )
}

fn ls(dir: &Path) -> Result<ExitCode, String> {
    let listing = open(dir)?.list().map_err(|e| e.to_string())?;
    for e in &listing.entries {
        println!(
            "{}\t{} tokens\t{} bytes\t{:016x}",
            e.key, e.num_tokens, e.payload_bytes, e.layout_fingerprint
        );
    }
    print_problems(&listing);
    let total: u64 = listing.entries.iter().map(|e| e.payload_bytes).sum();
    println!("total: {total} bytes in {}", counts(&listing));
    Ok(ExitCode::SUCCESS)
}

fn verify(dir: &Path) -> Result<ExitCode, String> {
    let listing = open(dir)?.verify().map_err(|e| e.to_string())?;
    print_problems(&listing);
    println!("verified {}", counts(&listing));
    Ok(if listing.bad.is_empty() && listing.foreign.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn gc(dir: &Path, max_bytes: Option<u64>) -> Result<ExitCode, String> {
    let report = open(dir)?.gc(max_bytes).map_err(|e| e.to_string())?;
    for bad in &report.removed_bad {
        println!("removed damaged: {}", bad.error);
    }
    for entry in &report.removed_foreign {
        println!(
            "removed foreign {} (a {})",
            entry.path.display(),
            entry.kind
        );
    }
    for path in &report.removed_temp {
        println!("removed temp {}", path.display());
    }
    for entry in &report.evicted {
        println!("evicted {} ({} bytes)", entry.key, entry.file_bytes);
    }
    println!(
        "gc: removed {} damaged chunks, {} foreign entries, {} temp files, evicted {} chunks, freed {} bytes",
        report.removed_bad.len(),
        report.removed_foreign.len(),
        report.removed_temp.len(),
        report.evicted.len(),
        report.bytes_freed
    );
    Ok(ExitCode::SUCCESS)
}
