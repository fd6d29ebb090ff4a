//! Disk tier and tier stack behaviour: restarts, corruption, fingerprints, promotion, and
//! several processes sharing one directory (children re-execute this test binary).

use std::fs::{self, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvrelay::keys::CacheKey;
use kvrelay::store::{
    ChunkMeta, CpuTier, DiskTier, DiskTierOptions, ForeignEntry, StoreError, Tier, TierStack,
};
use kvrelay::KvDtype;

const FP: u64 = 0x1234_5678_9abc_def0;
/// Tells a re-executed test binary which child role to play.
const ROLE_ENV: &str = "KVRELAY_STORE_TEST_ROLE";
const DIR_ENV: &str = "KVRELAY_STORE_TEST_DIR";

fn key(i: u64) -> CacheKey {
    CacheKey::new(
        "test/model",
        2,
        1,
        i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        KvDtype::Bf16,
    )
    .unwrap()
}

fn meta(k: &CacheKey) -> ChunkMeta {
    ChunkMeta {
        layout_fingerprint: FP,
        num_tokens: (k.chunk_hash % 256) as u32 + 1,
    }
}

/// Content derived from the key alone, so any process can check what it reads.
fn content(k: &CacheKey, len: usize) -> Vec<u8> {
    let mut x = k.chunk_hash | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sizes vary by key so a chunk mixed up with another shows up as a length mismatch too.
fn small_len(k: &CacheKey) -> usize {
    16 * 1024 + (k.chunk_hash % 61) as usize * 1024
}

/// A CPU tier of `slots` slots that hold any `small_len` chunk file.
fn cpu_tier(slots: u64) -> Arc<CpuTier> {
    const SLOT: usize = 128 << 10;
    assert!(DiskTier::file_bytes(80 * 1024) <= SLOT);
    Arc::new(CpuTier::new(slots * SLOT as u64, SLOT).unwrap())
}

fn open(dir: &Path, budget: u64) -> DiskTier {
    DiskTier::open(dir, DiskTierOptions::new(budget)).unwrap()
}

fn put(tier: &dyn Tier, k: &CacheKey, len: usize) {
    tier.put(k, meta(k), &content(k, len)).unwrap();
}

fn assert_chunk(tier: &dyn Tier, k: &CacheKey, len: usize) {
    let chunk = tier.get(k, FP).unwrap().expect("chunk present");
    assert_eq!(chunk.meta, meta(k));
    assert!(
        chunk.data[..] == content(k, len)[..],
        "content of {k} differs"
    );
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(".tmp-")
        })
        .collect()
}

fn spawn_role(test_name: &str, role: &str, dir: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test_name, "--nocapture"])
        .env(ROLE_ENV, role)
        .env(DIR_ENV, dir)
        .spawn()
        .unwrap()
}

/// `Some(dir)` when this process is a child started to play `role`.
fn child_role(role: &str) -> Option<PathBuf> {
    let is_role = std::env::var(ROLE_ENV).ok().as_deref() == Some(role);
    is_role.then(|| PathBuf::from(std::env::var(DIR_ENV).unwrap()))
}

fn is_child() -> bool {
    std::env::var_os(ROLE_ENV).is_some()
}

#[test]
fn survives_a_restart_with_the_same_index() {
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<CacheKey> = (0..12).map(key).collect();
    let before = {
        let tier = open(dir.path(), 1 << 30);
        for k in &keys {
            put(&tier, k, small_len(k));
        }
        tier.stats()
    };
    let on_disk: u64 = tier_files_bytes(dir.path());
    assert_eq!(before.entries, 12);
    assert_eq!(before.bytes, on_disk);

    let tier = open(dir.path(), 1 << 30);
    let after = tier.stats();
    assert_eq!((after.entries, after.bytes), (before.entries, before.bytes));
    for k in &keys {
        assert!(tier.contains(k));
        assert_chunk(&tier, k, small_len(k));
    }
    let listing = tier.list().unwrap();
    assert!(listing.bad.is_empty());
    assert_eq!(listing.entries.len(), 12);
    for entry in &listing.entries {
        let k: CacheKey = entry.key.parse().unwrap();
        assert_eq!(entry.payload_bytes, small_len(&k) as u64);
        assert_eq!(entry.num_tokens, meta(&k).num_tokens);
        assert_eq!(entry.layout_fingerprint, FP);
    }

    // Reopened with a budget of what is there now: one more chunk must evict to fit.
    let tier = open(dir.path(), after.bytes);
    let extra = key(100);
    put(&tier, &extra, small_len(&extra));
    let stats = tier.stats();
    assert!(stats.evictions >= 1);
    assert!(stats.bytes <= stats.budget);
    assert_eq!(stats.bytes, tier_files_bytes(dir.path()));
    assert_chunk(&tier, &extra, small_len(&extra));
}

fn tier_files_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "kvc"))
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

/// Truncates the file at `path` by `bytes`, in place.
fn cut_tail(path: &Path, bytes: u64) {
    let len = fs::metadata(path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len - bytes)
        .unwrap();
}

/// Flips a bit of the byte at `at` of the file at `path`, rewriting it through a new file,
/// as a reader must never see a file change in place.
fn flip(path: &Path, at: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 0x40;
    let tmp = path.with_extension("flip");
    fs::write(&tmp, bytes).unwrap();
    fs::rename(tmp, path).unwrap();
}

#[test]
fn damaged_chunks_are_misses_that_verify_names() {
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(open(dir.path(), 1 << 30));
    let keys: Vec<CacheKey> = (0..5).map(key).collect();
    for k in &keys {
        put(&*disk, k, small_len(k));
    }
    let path = |i: usize| disk.chunk_path(&keys[i]);
    cut_tail(&path(0), 100);
    let last = fs::metadata(path(1)).unwrap().len() as usize - 1;
    flip(&path(1), last); // last payload byte
    flip(&path(2), 21); // num_tokens, in the fixed header
    flip(&path(3), 60); // the key string, in the header
    let bad: Vec<PathBuf> = (0..4).map(path).collect();

    // verify names damage no reader has met yet.
    let listing = disk.verify().unwrap();
    let mut named: Vec<PathBuf> = listing.bad.iter().map(|b| b.path.clone()).collect();
    named.sort();
    let mut expected = bad.clone();
    expected.sort();
    assert_eq!(named, expected);
    let reasons: Vec<String> = listing.bad.iter().map(|b| b.error.to_string()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("truncated")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("payload checksum")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("header checksum")),
        "{reasons:?}"
    );
    assert_eq!(listing.entries.len(), 1);

    // A reader gets a typed error for the first two...
    for k in &keys[..2] {
        let err = disk.get(k, FP).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    }
    // ...and through the stack the other two are counted misses whose bad bytes never
    // reach the cpu tier.
    let cpu = cpu_tier(16);
    let stack = TierStack::new(vec![cpu.clone(), disk.clone()]);
    for k in &keys[2..4] {
        assert!(stack.get(k, FP).is_none());
        assert!(!cpu.contains(k));
    }
    assert_eq!(disk.stats().corrupt, 4);
    assert_chunk(&*disk, &keys[4], small_len(&keys[4]));

    // Every damaged chunk a reader met is gone: later lookups miss instead of claiming a
    // hit that cannot load, and the next save writes the chunk afresh.
    for (k, p) in keys[..4].iter().zip(&bad) {
        assert!(!p.exists(), "{} is still there", p.display());
        assert!(!disk.contains(k));
        assert!(disk.get(k, FP).unwrap().is_none());
    }
    assert!(disk.verify().unwrap().bad.is_empty());
    put(&*disk, &keys[1], small_len(&keys[1]));
    assert_chunk(&*disk, &keys[1], small_len(&keys[1]));
    assert_eq!(disk.stats().entries, 2);
}

/// Chunks larger than a read piece, below and above the size from which two threads read
/// a chunk in turns: each get verifies the whole payload (damage in a late piece, read by
/// either thread, is caught, and so is a file cut short), and a get that reuses the buffer
/// of a dropped chunk returns only its own bytes, while chunks still held keep theirs.
#[test]
fn large_chunks_are_verified_whole_and_reused_buffers_hold_only_their_chunk() {
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path(), 1 << 30);
    for (first_key, len) in [(100, (3 << 20) + 77), (200, (9 << 20) + 77)] {
        let keys: Vec<CacheKey> = (first_key..first_key + 6).map(key).collect();
        for k in &keys {
            put(&disk, k, len);
        }
        for round in 0..3 {
            // Two held at once, then dropped: the next round reads into their buffers.
            let held: Vec<_> = keys[..2]
                .iter()
                .map(|k| disk.get(k, FP).unwrap().expect("chunk present"))
                .collect();
            for (k, chunk) in keys.iter().zip(&held) {
                assert!(chunk.data[..] == content(k, len)[..], "round {round}: {k}");
            }
            drop(held);
            for k in &keys[2..] {
                assert_chunk(&disk, k, len);
            }
        }
        // One flipped byte in the payload's 9th and in its 6th 256 KiB piece (read by
        // different threads when two read), and a file cut short.
        for (k, at) in [(&keys[3], (2 << 20) + 5), (&keys[4], (5 << 18) + 100)] {
            let path = disk.chunk_path(k);
            flip(&path, at);
            let err = disk.get(k, FP).unwrap_err();
            assert!(
                matches!(&err, StoreError::Corrupt { reason, .. } if reason.contains("payload checksum")),
                "{len} bytes, flipped at {at}: {err:?}"
            );
            assert!(!path.exists());
        }
        cut_tail(&disk.chunk_path(&keys[5]), (1 << 20) + 3);
        let err = disk.get(&keys[5], FP).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { reason, .. } if reason.contains("truncated") || reason.contains("length")),
            "{len} bytes, cut short: {err:?}"
        );
        assert_chunk(&disk, &keys[2], len);
    }
}

/// `gc` removes damaged chunks that no reader has met.
#[test]
fn gc_removes_damaged_chunks() {
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path(), 1 << 30);
    let keys: Vec<CacheKey> = (0..3).map(key).collect();
    for k in &keys {
        put(&disk, k, small_len(k));
    }
    for k in &keys[..2] {
        cut_tail(&disk.chunk_path(k), 1);
    }
    let report = disk.gc(None).unwrap();
    assert_eq!(report.removed_bad.len(), 2);
    assert!(disk.verify().unwrap().bad.is_empty());
    assert_eq!(disk.stats().entries, 1);
}

#[test]
fn another_layout_fingerprint_is_rejected() {
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(open(dir.path(), 1 << 30));
    let k = key(7);
    put(&*disk, &k, 4096);
    let err = disk.get(&k, FP + 1).unwrap_err();
    assert!(
        matches!(err, StoreError::FingerprintMismatch { expected, found, .. } if expected == FP + 1 && found == FP),
        "{err:?}"
    );
    assert_eq!(disk.stats().rejected, 1);

    let cpu = cpu_tier(4);
    let stack = TierStack::new(vec![cpu.clone(), disk.clone()]);
    assert!(stack.get(&k, FP + 1).is_none());
    assert_eq!(stack.stats().fingerprint_mismatch, 1);
    assert!(!cpu.contains(&k));
    assert!(stack.get(&k, FP).is_some());
}

/// A disk tier reading into the CPU tier's slots: a promoted chunk is the very bytes the
/// disk read (no copy), a corrupt file's slot is freed and its bytes never reach the CPU
/// tier, and with every slot held by readers a hit still loads, just without promotion.
#[test]
fn disk_reads_fill_cpu_slots_that_promotion_keeps() {
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cpu = cpu_tier(2);
    let disk = Arc::new(open(dir.path(), 1 << 30).reading_into(cpu.clone()));
    let stack = TierStack::new(vec![cpu.clone(), disk.clone()]);
    let keys: Vec<CacheKey> = (0..4).map(key).collect();
    for k in &keys {
        put(&*disk, k, small_len(k));
    }
    let first = stack.get(&keys[0], FP).unwrap();
    assert_eq!(first.data[..], content(&keys[0], small_len(&keys[0]))[..]);
    let cached = cpu.get(&keys[0], FP).unwrap().unwrap();
    assert_eq!(
        cached.data.as_ptr(),
        first.data.as_ptr(),
        "promotion copied"
    );

    let bad = disk.chunk_path(&keys[1]);
    let mut bytes = fs::read(&bad).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    fs::write(&bad, bytes).unwrap();
    assert!(stack.get(&keys[1], FP).is_none());
    assert!(!cpu.contains(&keys[1]));
    assert_eq!(stack.stats().corrupt, 1);

    // The corrupt read gave its slot back: the second slot takes keys[2].
    let second = stack.get(&keys[2], FP).unwrap();
    assert!(cpu.contains(&keys[2]));
    // Both slots held by readers: keys[3] loads from a pooled buffer, not promoted.
    let third = stack.get(&keys[3], FP).unwrap();
    assert_eq!(third.data[..], content(&keys[3], small_len(&keys[3]))[..]);
    assert!(!cpu.contains(&keys[3]));
    assert_eq!(stack.stats().promotions, 2);
    drop((first, cached, second, third));
    assert!(stack.get(&keys[3], FP).is_some());
    assert!(cpu.contains(&keys[3]) && cpu.stats().entries == 2);
}

#[test]
fn stack_counts_prefix_hits_and_promotes_disk_hits() {
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cpu = cpu_tier(16);
    let disk = Arc::new(open(dir.path(), 1 << 30));
    let stack = TierStack::new(vec![cpu.clone(), disk.clone()]);
    let keys: Vec<CacheKey> = (0..8).map(key).collect();
    for k in &keys[..3] {
        stack.put(k, meta(k), &content(k, small_len(k))).unwrap();
    }
    for k in &keys[3..5] {
        put(&*disk, k, small_len(k));
    }
    // keys[5] is missing; keys[6] after the gap does not count.
    put(&*cpu, &keys[6], small_len(&keys[6]));
    assert!(cpu.remove(&keys[1]).unwrap());
    assert_eq!(stack.prefix_hits(&keys), 5);
    assert_eq!(stack.prefix_hits(&keys[5..]), 0);

    for k in [&keys[1], &keys[3]] {
        assert!(!cpu.contains(k));
        let chunk = stack.get(k, FP).unwrap();
        assert!(chunk.data[..] == content(k, small_len(k))[..]);
        assert!(cpu.contains(k), "disk hit of {k} not promoted");
        assert_chunk(&*cpu, k, small_len(k));
    }
    assert!(stack.get(&keys[5], FP).is_none());
    let stats = stack.stats();
    assert_eq!((stats.hits, stats.misses, stats.promotions), (2, 1, 2));
}

#[test]
fn stack_put_fails_only_when_no_tier_stores() {
    if is_child() {
        return;
    }
    let small = Arc::new(CpuTier::new(4096, 1024).unwrap());
    let big = cpu_tier(1);
    let stack = TierStack::new(vec![small.clone(), big.clone()]);
    let k = key(1);
    stack.put(&k, meta(&k), &content(&k, 4096)).unwrap();
    assert!(!small.contains(&k) && big.contains(&k));
    let only_small = TierStack::new(vec![small]);
    let err = only_small
        .put(&k, meta(&k), &content(&k, 4096))
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::LargerThanSlot {
                size: 4096,
                slot: 1024
            }
        ),
        "{err:?}"
    );
    let none = TierStack::new(vec![]);
    assert!(matches!(
        none.put(&k, meta(&k), &[1]),
        Err(StoreError::NoTiers)
    ));
}

#[test]
fn directory_checks_and_permissions() {
    if is_child() {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let missing = base.path().join("missing");
    let opts = DiskTierOptions {
        create: false,
        ..DiskTierOptions::new(1 << 20)
    };
    let err = DiskTier::open(&missing, opts.clone()).err().unwrap();
    assert!(matches!(err, StoreError::BadDirectory { .. }), "{err:?}");

    let foreign = base.path().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let err = DiskTier::open(&foreign, DiskTierOptions::new(1 << 20))
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::BadDirectory { .. }), "{err:?}");

    let dir = base.path().join("a/b/tier");
    let tier = open(&dir, 1 << 20);
    let k = key(3);
    put(&tier, &k, 1000);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&tier.chunk_path(&k)), 0o600);
    // The tier now has a marker: opening without `create` works.
    assert!(DiskTier::open(&dir, opts).is_ok());
}

/// Runs `f` on another thread and fails the test if it has not returned within 10 s, so an
/// open that blocks (a FIFO waiting for a writer) fails the test instead of hanging it.
fn promptly<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(value) => value,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what} blocked for 10 s"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Whether the directory entry itself exists (`Path::exists` follows symlinks).
fn entry_exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

#[test]
fn a_fifo_under_a_chunk_name_never_blocks_and_is_removed() {
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(open(dir.path(), 1 << 30));
    let (good, k) = (key(1), key(2));
    put(&*disk, &good, small_len(&good));
    let fifo = disk.chunk_path(&k);

    // The decoder's lookup: no hit is claimed, and the FIFO goes at first sight.
    mkfifo(&fifo);
    let stack = TierStack::new(vec![disk.clone() as Arc<dyn Tier>]);
    let keys = vec![good.clone(), k.clone()];
    assert_eq!(promptly("lookup", move || stack.prefix_hits(&keys)), 1);
    assert!(!entry_exists(&fifo));

    // The decoder's load: a typed error, and the FIFO goes.
    mkfifo(&fifo);
    let (d, kk) = (disk.clone(), k.clone());
    let err = promptly("get", move || d.get(&kk, FP)).unwrap_err();
    assert!(
        matches!(&err, StoreError::NotRegularFile { path, kind: "FIFO" } if *path == fifo),
        "{err:?}"
    );
    assert!(!entry_exists(&fifo));
    assert_eq!(disk.stats().corrupt, 1);

    // `list` and `verify` report it and change nothing; `gc` removes it.
    mkfifo(&fifo);
    let foreign = vec![ForeignEntry {
        path: fifo.clone(),
        kind: "FIFO",
    }];
    for check in ["list", "verify"] {
        let d = disk.clone();
        let listing = promptly(check, move || match check {
            "list" => d.list(),
            _ => d.verify(),
        })
        .unwrap();
        assert_eq!(listing.foreign, foreign, "{check}");
        assert_eq!(listing.entries.len(), 1, "{check}");
        assert!(listing.bad.is_empty(), "{check}: {:?}", listing.bad);
        assert!(entry_exists(&fifo), "{check} removed it");
    }
    let d = disk.clone();
    let report = promptly("gc", move || d.gc(None)).unwrap();
    assert_eq!(report.removed_foreign, foreign);
    assert!(report.removed_bad.is_empty());
    assert!(!entry_exists(&fifo));

    // Opening the tier scans the directory: it removes the FIFO and keeps the chunk.
    mkfifo(&fifo);
    let path = dir.path().to_path_buf();
    let reopened = promptly("open", move || {
        DiskTier::open(path, DiskTierOptions::new(1 << 30))
    })
    .unwrap();
    assert!(!entry_exists(&fifo));
    assert_eq!(reopened.stats().entries, 1);
    assert_chunk(&reopened, &good, small_len(&good));
    // The name is free for the real chunk again.
    put(&reopened, &k, small_len(&k));
    assert_chunk(&reopened, &k, small_len(&k));
}

#[test]
fn a_symlinked_chunk_is_not_followed_and_is_removed() {
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let disk = Arc::new(open(dir.path(), 1 << 30));
    let k = key(3);
    put(&*disk, &k, small_len(&k));
    let link = disk.chunk_path(&k);
    // The valid chunk moved out of the directory and linked back: following the link would
    // load it as a hit.
    let target = outside.path().join("chunk.kvc");
    fs::rename(&link, &target).unwrap();
    let original = fs::read(&target).unwrap();
    let relink = || std::os::unix::fs::symlink(&target, &link).unwrap();
    let target_untouched = || assert_eq!(fs::read(&target).unwrap(), original);

    relink();
    let err = disk.get(&k, FP).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NotRegularFile {
                kind: "symbolic link",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!entry_exists(&link));
    target_untouched();

    relink();
    assert!(!disk.contains(&k));
    assert!(!entry_exists(&link));
    target_untouched();

    relink();
    let foreign = vec![ForeignEntry {
        path: link.clone(),
        kind: "symbolic link",
    }];
    assert_eq!(disk.list().unwrap().foreign, foreign);
    assert_eq!(disk.verify().unwrap().foreign, foreign);
    assert!(entry_exists(&link));
    assert_eq!(disk.gc(None).unwrap().removed_foreign, foreign);
    assert!(!entry_exists(&link));
    target_untouched();

    // A link to a FIFO outside is neither followed nor waited on.
    let fifo = outside.path().join("fifo");
    mkfifo(&fifo);
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    let (d, kk) = (disk.clone(), k.clone());
    let err = promptly("get", move || d.get(&kk, FP)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NotRegularFile {
                kind: "symbolic link",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!entry_exists(&link) && entry_exists(&fifo));
}

#[test]
fn a_marker_that_is_not_a_regular_file_is_refused_promptly() {
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    mkfifo(&dir.path().join(".kvrelay-disk-tier"));
    let path = dir.path().to_path_buf();
    let err = promptly("open", move || {
        DiskTier::open(path, DiskTierOptions::new(1 << 20)).err()
    })
    .expect("open refused");
    assert!(
        matches!(&err, StoreError::BadDirectory { reason, .. } if reason.contains("is a FIFO")),
        "{err:?}"
    );
}

#[test]
fn gc_removes_temp_files_of_dead_writers_only() {
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tier = open(dir.path(), 1 << 20);
    // Above any pid_max: no such process.
    let dead = dir.path().join(".tmp-2000000000-0");
    let live = dir
        .path()
        .join(format!(".tmp-{}-99999", std::process::id()));
    fs::write(&dead, b"partial").unwrap();
    fs::write(&live, b"in flight").unwrap();
    let report = tier.gc(None).unwrap();
    assert_eq!(report.removed_temp, vec![dead.clone()]);
    assert!(!dead.exists() && live.exists());
}

#[test]
fn gc_evicts_least_recently_used_down_to_max_bytes() {
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tier = open(dir.path(), 1 << 30);
    let keys: Vec<CacheKey> = (0..4).map(key).collect();
    for k in &keys {
        put(&tier, k, 10_000);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Reading key 0 makes it the most recently used.
    assert_chunk(&tier, &keys[0], 10_000);
    let one = fs::metadata(tier.chunk_path(&keys[0])).unwrap().len();
    let report = tier.gc(Some(2 * one)).unwrap();
    let evicted: Vec<&str> = report.evicted.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(evicted, [keys[1].to_string(), keys[2].to_string()]);
    assert_eq!(report.bytes_freed, 2 * one);
    assert!(tier.contains(&keys[0]) && tier.contains(&keys[3]));
    assert_eq!(tier.stats().bytes, 2 * one);
}

#[test]
fn two_processes_share_a_disk_tier() {
    const NAME: &str = "two_processes_share_a_disk_tier";
    const KEYS: u64 = 64;
    let len = |k: &CacheKey| 64 * 1024 + (k.chunk_hash % 61) as usize * 4096;
    if let Some(dir) = child_role("writer") {
        // A budget of about a third of the keys, so eviction runs while the parent reads;
        // three passes, so chunks are also replaced under the reader.
        let tier = open(&dir, 24 * 320 * 1024);
        for _ in 0..3 {
            for i in 0..KEYS {
                put(&tier, &key(i), len(&key(i)));
            }
        }
        return;
    }
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let reader = open(dir.path(), 1 << 30);
    let mut writer = spawn_role(NAME, "writer", dir.path());
    let (mut hits, mut rounds) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        for i in 0..KEYS {
            let k = key(i);
            if let Some(chunk) = reader.get(&k, FP).unwrap() {
                assert_eq!(chunk.meta, meta(&k));
                assert!(
                    chunk.data[..] == content(&k, len(&k))[..],
                    "torn read of {k}"
                );
                hits += 1;
            }
        }
        rounds += 1;
        if let Some(status) = writer.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "writer did not finish");
    };
    assert!(status.success(), "writer failed: {status}");
    // The final state: what is visible is whole, and the writer's own budget held.
    for i in 0..KEYS {
        let k = key(i);
        if reader.contains(&k) {
            assert_chunk(&reader, &k, len(&k));
            hits += 1;
        }
    }
    assert!(reader.verify().unwrap().bad.is_empty());
    assert!(tier_files_bytes(dir.path()) <= 24 * 320 * 1024);
    assert!(hits > 0, "reader never saw a chunk ({rounds} rounds)");
    eprintln!("reader: {hits} verified chunks in {rounds} rounds");
}

#[test]
fn a_killed_writer_leaves_no_partial_chunk() {
    const NAME: &str = "a_killed_writer_leaves_no_partial_chunk";
    const CHUNK: usize = 16 << 20;
    if let Some(dir) = child_role("endless_writer") {
        let tier = open(&dir, 256 << 20);
        // Bounded, in case the parent dies before it kills us.
        for i in 0..256 {
            put(&tier, &key(i), CHUNK);
        }
        return;
    }
    if is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tier = open(dir.path(), 1 << 30);
    let mut writer = spawn_role(NAME, "endless_writer", dir.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    // Kill it mid-put: once a few chunks are visible and a temp file is being written.
    while tier_files_bytes(dir.path()) < 2 * CHUNK as u64 || temp_files(dir.path()).is_empty() {
        assert!(Instant::now() < deadline, "writer made no progress");
        assert!(writer.try_wait().unwrap().is_none(), "writer exited early");
        std::thread::sleep(Duration::from_millis(1));
    }
    writer.kill().unwrap();
    writer.wait().unwrap();

    let temps = temp_files(dir.path());
    let listing = tier.verify().unwrap();
    assert!(listing.bad.is_empty(), "{:?}", listing.bad);
    assert!(listing.entries.len() >= 2);
    for entry in &listing.entries {
        let k: CacheKey = entry.key.parse().unwrap();
        assert_chunk(&tier, &k, CHUNK);
    }
    let report = tier.gc(None).unwrap();
    assert_eq!(report.removed_temp.len(), temps.len());
    assert!(temp_files(dir.path()).is_empty());
    eprintln!(
        "killed writer left {} chunks and {} temp files",
        listing.entries.len(),
        temps.len()
    );
}
