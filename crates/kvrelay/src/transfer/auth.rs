//! Shared-secret proofs (HMAC-SHA256) and the randomness for nonces and session tokens.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::frame::{MAC_LEN, NONCE_LEN};
use super::TransferError;

type HmacSha256 = Hmac<Sha256>;

/// Which party a proof speaks for; each signs a distinct label so a proof cannot be
/// reflected back to the side that sent it.
#[derive(Clone, Copy)]
pub(crate) enum Role {
    Sender,
    Receiver,
}

fn mac(secret: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC accepts keys of any length.
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    for p in parts {
        m.update(p);
    }
    m
}

fn proof_mac(
    secret: &[u8],
    role: Role,
    sender_nonce: &[u8],
    receiver_nonce: &[u8],
    rank: u32,
) -> HmacSha256 {
    let label: &[u8] = match role {
        Role::Sender => b"kvrelay-pd-v1 sender",
        Role::Receiver => b"kvrelay-pd-v1 receiver",
    };
    mac(
        secret,
        &[label, sender_nonce, receiver_nonce, &rank.to_le_bytes()],
    )
}

/// The proof `role` sends; all zeros when no secret is configured.
pub(crate) fn proof(
    secret: Option<&[u8]>,
    role: Role,
    sender_nonce: &[u8; NONCE_LEN],
    receiver_nonce: &[u8; NONCE_LEN],
    rank: u32,
) -> [u8; MAC_LEN] {
    secret.map_or([0; MAC_LEN], |s| {
        proof_mac(s, role, sender_nonce, receiver_nonce, rank)
            .finalize()
            .into_bytes()
            .into()
    })
}

/// Checks a proof from `role` in constant time.
pub(crate) fn verify_proof(
    secret: &[u8],
    role: Role,
    sender_nonce: &[u8; NONCE_LEN],
    receiver_nonce: &[u8; NONCE_LEN],
    rank: u32,
    proof: &[u8; MAC_LEN],
) -> bool {
    proof_mac(secret, role, sender_nonce, receiver_nonce, rank)
        .verify_slice(proof)
        .is_ok()
}

fn notify_mac(secret: &[u8], request_id: &str, rank: u32, failure: &str) -> HmacSha256 {
    let id_len = (request_id.len() as u32).to_le_bytes();
    let failure_len = (failure.len() as u32).to_le_bytes();
    mac(
        secret,
        &[
            b"kvrelay-pd-v1 notify",
            &id_len,
            request_id.as_bytes(),
            &rank.to_le_bytes(),
            &failure_len,
            failure.as_bytes(),
        ],
    )
}

/// The MAC of a KV-ready (or failure) notification; all zeros when no secret is
/// configured.
pub(crate) fn notification_mac(
    secret: Option<&[u8]>,
    request_id: &str,
    rank: u32,
    failure: &str,
) -> [u8; MAC_LEN] {
    secret.map_or([0; MAC_LEN], |s| {
        notify_mac(s, request_id, rank, failure)
            .finalize()
            .into_bytes()
            .into()
    })
}

pub(crate) fn verify_notification(
    secret: &[u8],
    request_id: &str,
    rank: u32,
    failure: &str,
    tag: &[u8; MAC_LEN],
) -> bool {
    notify_mac(secret, request_id, rank, failure)
        .verify_slice(tag)
        .is_ok()
}

/// `N` bytes from the kernel's CSPRNG.
pub(crate) fn random<const N: usize>() -> Result<[u8; N], TransferError> {
    let mut out = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: the pointer and length describe the unfilled tail of `out`.
        let n = unsafe { libc::getrandom(out[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(TransferError::io("getrandom", err));
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_secret_role_nonces_and_rank() {
        let (s, r) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let p = proof(Some(b"k"), Role::Sender, &s, &r, 3);
        assert!(verify_proof(b"k", Role::Sender, &s, &r, 3, &p));
        assert!(!verify_proof(b"x", Role::Sender, &s, &r, 3, &p));
        assert!(!verify_proof(b"k", Role::Receiver, &s, &r, 3, &p));
        assert!(!verify_proof(b"k", Role::Sender, &r, &s, 3, &p));
        assert!(!verify_proof(b"k", Role::Sender, &s, &r, 4, &p));
        let tag = notification_mac(Some(b"k"), "req", 1, "");
        assert!(verify_notification(b"k", "req", 1, "", &tag));
        assert!(!verify_notification(b"k", "req", 0, "", &tag));
        // A forged failure (or a ready notification turned into one) does not verify.
        assert!(!verify_notification(b"k", "req", 1, "gone", &tag));
        let failed = notification_mac(Some(b"k"), "req", 1, "gone");
        assert!(verify_notification(b"k", "req", 1, "gone", &failed));
        assert!(!verify_notification(b"k", "req", 1, "", &failed));
        assert_ne!(random::<16>().unwrap(), random::<16>().unwrap());
    }
}
