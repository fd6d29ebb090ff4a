//! `kvrelay store` run as a real binary against a disk tier directory.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use kvrelay::keys::CacheKey;
use kvrelay::store::{ChunkMeta, DiskTier, DiskTierOptions, Tier};
use kvrelay::KvDtype;

fn kvrelay(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvrelay"))
        .args(["store"])
        .args(args)
        .arg(dir)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn key(i: u64) -> CacheKey {
    CacheKey::new("cli/model", 1, 0, 0xabc0 + i, KvDtype::F16).unwrap()
}

/// Three chunks of 1000, 2000 and 3000 bytes with 16, 32, 48 tokens.
fn filled_tier(dir: &Path) -> DiskTier {
    let tier = DiskTier::open(dir, DiskTierOptions::new(1 << 20)).unwrap();
    for i in 1..=3u64 {
        let meta = ChunkMeta {
            layout_fingerprint: 0xfeed,
            num_tokens: 16 * i as u32,
        };
        tier.put(&key(i), meta, &vec![i as u8; 1000 * i as usize])
            .unwrap();
        // Distinct modification times, so LRU order is not left to timestamp granularity.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    tier
}

#[test]
fn ls_lists_chunks_and_total() {
    let dir = tempfile::tempdir().unwrap();
    filled_tier(dir.path());
    let out = kvrelay(&["ls"], dir.path());
    let stdout = text(&out);
    assert!(out.status.success(), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&key(2).to_string()))
        .expect("key 2 listed");
    assert_eq!(
        line,
        format!("{}\t32 tokens\t2000 bytes\t000000000000feed", key(2))
    );
    assert!(
        stdout.contains("total: 3 chunks, 6000 bytes, 0 bad"),
        "{stdout}"
    );
}

#[test]
fn verify_exits_1_naming_a_bad_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let tier = filled_tier(dir.path());
    let out = kvrelay(&["verify"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let bad = tier.chunk_path(&key(3));
    let mut bytes = fs::read(&bad).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&bad, bytes).unwrap();
    let out = kvrelay(&["verify"], dir.path());
    let stdout = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(&bad.display().to_string()), "{stdout}");
    assert!(stdout.contains("payload checksum mismatch"), "{stdout}");
    assert!(stdout.contains("2 good, 1 bad"), "{stdout}");
}

#[test]
fn gc_removes_bad_chunks_temps_and_evicts_to_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let tier = filled_tier(dir.path());
    let bad = tier.chunk_path(&key(1));
    fs::write(&bad, b"KVRCHUNK but short").unwrap();
    let temp = dir.path().join(".tmp-2000000000-7");
    fs::write(&temp, b"partial").unwrap();

    let out = kvrelay(&["gc"], dir.path());
    let stdout = text(&out);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("removed 1 bad chunks, 1 temp files, evicted 0"),
        "{stdout}"
    );
    assert!(!bad.exists() && !temp.exists());

    // Keys 2 and 3 remain; a budget below both files evicts the older, key 2.
    let keep = fs::metadata(tier.chunk_path(&key(3))).unwrap().len();
    let out = kvrelay(&["gc", "--max-bytes", &keep.to_string()], dir.path());
    let stdout = text(&out);
    assert!(stdout.contains(&format!("evicted {}", key(2))), "{stdout}");
    assert!(!tier.chunk_path(&key(2)).exists());
    assert!(tier.chunk_path(&key(3)).exists());
    assert_eq!(kvrelay(&["verify"], dir.path()).status.code(), Some(0));
}

#[test]
fn a_missing_or_foreign_directory_exits_2() {
    let base = tempfile::tempdir().unwrap();
    let foreign = base.path().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("data.bin"), b"not ours").unwrap();
    for dir in [base.path().join("missing"), foreign] {
        for cmd in ["ls", "verify", "gc"] {
            let out = kvrelay(&[cmd], &dir);
            let all = text(&out);
            assert_eq!(out.status.code(), Some(2), "{cmd}: {all}");
            assert!(
                all.contains("not a usable kvrelay disk tier directory"),
                "{all}"
            );
        }
        assert!(!base.path().join("missing").exists());
    }
}
