//! `kvrelay store` run as a real binary against a disk tier directory.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kvrelay::keys::CacheKey;
use kvrelay::store::{ChunkMeta, DiskTier, DiskTierOptions, Tier};
use kvrelay::KvDtype;

/// `kvrelay store ARGS DIR`, killed and failed after 20 s, so a command that blocks (on a
/// FIFO) fails the test instead of hanging it. Its output is small enough for the pipes.
fn kvrelay(args: &[&str], dir: &Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvrelay"))
        .args(["store"])
        .args(args)
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("kvrelay store {args:?} blocked for 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
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
        stdout.contains("total: 6000 bytes in 3 chunk files: 3 good, 0 damaged; 0 foreign entries"),
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
    assert!(
        stdout.contains("3 chunk files: 2 good, 1 damaged"),
        "{stdout}"
    );
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
        stdout.contains("removed 1 damaged chunks, 0 foreign entries, 1 temp files, evicted 0"),
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
fn ls_and_verify_count_the_same_files_and_gc_removes_foreign_entries() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let tier = filled_tier(dir.path());
    let damaged = tier.chunk_path(&key(1));
    fs::write(&damaged, b"KVRCHUNK but short").unwrap();
    // Key 3's valid chunk moved out and linked back, and a FIFO under key 4's name.
    let link = tier.chunk_path(&key(3));
    let target = outside.path().join("chunk.kvc");
    fs::rename(&link, &target).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let fifo = tier.chunk_path(&key(4));
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let target_bytes = fs::read(&target).unwrap();

    let counts = "2 chunk files: 1 good, 1 damaged; 2 foreign entries";
    let ls = kvrelay(&["ls"], dir.path());
    let ls_out = text(&ls);
    assert!(ls.status.success(), "{ls_out}");
    assert!(
        ls_out.contains(&format!("total: 2000 bytes in {counts}")),
        "{ls_out}"
    );
    let verify = kvrelay(&["verify"], dir.path());
    let verify_out = text(&verify);
    assert_eq!(verify.status.code(), Some(1), "{verify_out}");
    assert!(
        verify_out.contains(&format!("verified {counts}")),
        "{verify_out}"
    );
    for out in [&ls_out, &verify_out] {
        assert!(
            out.contains(&format!("DAMAGED {}", damaged.display())),
            "{out}"
        );
        assert!(
            out.contains(&format!("FOREIGN {}: a FIFO", fifo.display())),
            "{out}"
        );
        assert!(
            out.contains(&format!("FOREIGN {}: a symbolic link", link.display())),
            "{out}"
        );
    }
    // Inspection changed nothing.
    assert!(fs::symlink_metadata(&link).is_ok() && fs::symlink_metadata(&fifo).is_ok());

    let gc = kvrelay(&["gc"], dir.path());
    let gc_out = text(&gc);
    assert!(gc.status.success(), "{gc_out}");
    assert!(
        gc_out.contains("removed 1 damaged chunks, 2 foreign entries, 0 temp files"),
        "{gc_out}"
    );
    assert!(fs::symlink_metadata(&link).is_err() && fs::symlink_metadata(&fifo).is_err());
    assert_eq!(
        fs::read(&target).unwrap(),
        target_bytes,
        "the link's target changed"
    );
    let verify = kvrelay(&["verify"], dir.path());
    let verify_out = text(&verify);
    assert_eq!(verify.status.code(), Some(0), "{verify_out}");
    assert!(
        verify_out.contains("verified 1 chunk files: 1 good, 0 damaged; 0 foreign entries"),
        "{verify_out}"
    );
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
