//! Fuzz-style properties of the PD frame decoder and the grant check: random and mutated
//! bytes never panic, and no accepted data frame reaches outside its granted page.

use std::io::Cursor;

use kvrelay::keys::{CacheKey, ChunkHasher, HashAlgorithm, KeyDerivation};
use kvrelay::store::ChunkMeta;
use kvrelay::transfer::frame::{
    self, data_prefix, decode, num_segments, read_frame, ChannelKind, ChunkDecl, DataHeader,
    ErrorCode, Frame, FrameError, GrantCheck, Message, CHECKSUM_SEGMENT, MAX_CONTROL_BODY,
    MAX_HANDSHAKE_BODY,
};
use kvrelay::KvDtype;
use proptest::prelude::*;

fn keys() -> KeyDerivation {
    let hasher = ChunkHasher::new(HashAlgorithm::Sha256Cbor, "0", 256).unwrap();
    KeyDerivation::new("model", 2, KvDtype::Bf16, &hasher).unwrap()
}

fn samples() -> Vec<Vec<u8>> {
    let key = CacheKey::new("model", 2, 1, 0xfeed, KvDtype::Bf16).unwrap();
    let msgs = [
        Message::Hello {
            rank: 0,
            channel: ChannelKind::Tcp,
            page_size: 4096,
            fingerprint: 1,
            keys: keys(),
            nonce: [1; 32],
        },
        Message::Welcome {
            token: [2; 16],
            page_size: 4096,
            num_pages: 8,
            channel_params: b"\x01/dev/shm/kvrelay-pd-1-0-ab".to_vec(),
            skip_last_n_tokens: 1,
        },
        Message::Error {
            code: ErrorCode::Busy,
            message: "busy".into(),
        },
        Message::AllocRequest {
            request_id: "r".into(),
            chunks: vec![
                ChunkDecl {
                    key: key.clone(),
                    meta: ChunkMeta {
                        layout_fingerprint: 3,
                        num_tokens: 16,
                    },
                    len: 4096,
                };
                3
            ],
        },
        Message::AllocGrant {
            grant: 1,
            pages: vec![0, 5, 7],
        },
        Message::Seal {
            grant: 1,
            chunk: 2,
            checksum: 9,
        },
        Message::Notify {
            request_id: "r".into(),
            rank: 0,
            failure: "no".into(),
            mac: [0; 32],
        },
    ];
    let mut out: Vec<Vec<u8>> = msgs.iter().map(Message::encode).collect();
    let mut data = data_prefix(
        &DataHeader {
            grant: 1,
            chunk: 0,
            offset: 0,
        },
        8,
    )
    .to_vec();
    data.extend_from_slice(&[0xcd; 8]);
    out.push(data);
    out
}

/// What a fuzzer does to a valid frame: flip, overwrite, cut, extend.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Truncate(usize),
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
    ]
}

fn check_no_panic(bytes: &[u8]) {
    for max in [0, MAX_HANDSHAKE_BODY, MAX_CONTROL_BODY] {
        if let Ok(Frame::Message(m)) = decode(bytes, max) {
            // Whatever decodes re-encodes to a frame that decodes to the same message.
            assert_eq!(decode(&m.encode(), MAX_CONTROL_BODY), Ok(Frame::Message(m)));
        }
        let _ = read_frame(&mut Cursor::new(bytes), max);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_no_panic(&bytes);
        // With a valid header in front, the body decoders see the random bytes.
        for kind in 1u8..=13 {
            let mut framed = frame::MAGIC.to_vec();
            framed.extend_from_slice(&[frame::VERSION, kind, 0, 0]);
            framed.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            framed.extend_from_slice(&bytes);
            check_no_panic(&framed);
        }
    }

    #[test]
    fn mutated_frames_never_panic(
        which in 0usize..8,
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let all = samples();
        let mut bytes = all[which % all.len()].clone();
        for m in mutations {
            match m {
                Mutation::Set(i, b) if !bytes.is_empty() => {
                    let i = i % bytes.len();
                    bytes[i] = b;
                }
                Mutation::Set(..) => {}
                Mutation::Truncate(n) => bytes.truncate(n % (bytes.len() + 1)),
                Mutation::Append(tail) => bytes.extend_from_slice(&tail),
            }
        }
        check_no_panic(&bytes);
    }

    #[test]
    fn accepted_data_stays_inside_its_granted_page(
        page_size in 1u64..10_000,
        grants in proptest::collection::vec((0u32..64, 0u64..10_000), 1..6),
        frames in proptest::collection::vec(
            (
                0u32..3,
                0u32..8,
                prop_oneof![0u64..10_000, 0u64..20_000, any::<u64>()],
                prop_oneof![0u64..2_000, 0u64..20_000],
            ),
            1..64,
        ),
    ) {
        let chunks: Vec<(u32, u64)> = grants
            .iter()
            .map(|&(page, len)| (page, len.min(page_size)))
            .collect();
        let mut check = GrantCheck::new(1, page_size, chunks.clone());
        // Per chunk: which bytes were admitted (and landed), and the checksum segments
        // reported whole.
        let mut landed: Vec<Vec<bool>> = chunks.iter().map(|c| vec![false; c.1 as usize]).collect();
        let mut whole: Vec<Vec<u32>> = vec![Vec::new(); chunks.len()];
        for (grant, chunk, offset, len) in frames {
            let d = DataHeader { grant, chunk, offset };
            let fits = grant == 1
                && len > 0
                && chunks.get(chunk as usize).is_some_and(|c| offset.checked_add(len).is_some_and(|e| e <= c.1));
            let free = fits
                && landed[chunk as usize][offset as usize..(offset + len) as usize]
                    .iter()
                    .all(|b| !b);
            let Ok(admitted) = check.admit(&d, len) else {
                // Refused: outside the grant, or over bytes already admitted.
                prop_assert!(!free, "{:?}+{} refused", d, len);
                continue;
            };
            // Accepted: the right grant, a granted chunk, bytes of it not admitted before,
            // all inside the chunk's page and declared length.
            prop_assert!(free);
            let i = chunk as usize;
            let page_start = u64::from(chunks[i].0) * page_size;
            prop_assert_eq!(admitted, page_start + offset..page_start + offset + len);
            landed[i][offset as usize..(offset + len) as usize].fill(true);
            // A segment is reported once, when its last byte lands, with its own bytes.
            let mut reported = Vec::new();
            check.landed(chunk, offset..offset + len, |index, r| reported.push((index, r)));
            for (index, r) in reported {
                let start = u64::from(index) * CHECKSUM_SEGMENT as u64;
                let end = (start + CHECKSUM_SEGMENT as u64).min(chunks[i].1);
                prop_assert_eq!(r, page_start + start..page_start + end);
                prop_assert!(landed[i][start as usize..end as usize].iter().all(|b| *b));
                prop_assert!(!whole[i].contains(&index), "segment {} reported twice", index);
                whole[i].push(index);
            }
        }
        for (i, &(_, len)) in chunks.iter().enumerate() {
            let all_landed = landed[i].iter().all(|b| *b);
            prop_assert_eq!(check.complete(i), all_landed);
            prop_assert_eq!(whole[i].len() == num_segments(len as usize), all_landed);
        }
    }
}

/// `Hello` with one of its key-derivation strings replaced by `bad` (same length).
fn hello_with(good: &str, bad: &str) -> Vec<u8> {
    let bytes = samples()[0].clone();
    let at = bytes
        .windows(good.len())
        .position(|w| w == good.as_bytes())
        .expect("the field is in the frame");
    let mut out = bytes.clone();
    out[at..at + bad.len()].copy_from_slice(bad.as_bytes());
    out
}

#[test]
fn a_hello_with_unusable_key_derivation_fields_is_a_typed_error() {
    let Ok(Frame::Message(Message::Hello { keys: decoded, .. })) =
        decode(&samples()[0], MAX_HANDSHAKE_BODY)
    else {
        panic!("the sample Hello decodes");
    };
    assert_eq!(decoded, keys());
    for (good, bad, field) in [
        ("sha256_cbor", "sha256_cbxr", "hash_algorithm"),
        ("bfloat16", "bfloat17", "dtype"),
        ("model", "mo@el", "model"),
    ] {
        match decode(&hello_with(good, bad), MAX_HANDSHAKE_BODY) {
            Err(FrameError::BadField { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{bad}: expected a bad {field}, got {other:?}"),
        }
    }
}

#[test]
fn frames_of_the_previous_protocol_version_are_refused_by_name() {
    let mut old = samples()[0].clone();
    old[4] = frame::VERSION - 1;
    assert_eq!(
        decode(&old, MAX_HANDSHAKE_BODY),
        Err(FrameError::BadVersion(frame::VERSION - 1))
    );
}
