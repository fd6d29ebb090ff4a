//! The `hixl` PD channel (HIXL client/server batch puts) on the `ascend-emu` test double:
//! the shared Ascend PD channel tests (see `support/ascend_pd.rs`), and a registration the
//! server refuses.
#![cfg(feature = "ascend")]

#[path = "support/ascend_pd.rs"]
mod ascend_pd;
mod support;

// HIXL_TIMEOUT is 103901.
ascend_pd::pd_channel_tests!(
    "hixl",
    "Hixl",
    needs "9.1.0",
    timed_out "HixlCSClientBatchPutSync returned HixlStatus 103901"
);

#[test]
fn a_refused_registration_of_the_pd_buffer_is_a_typed_error_at_start() {
    let out = ascend_pd::child(
        "child_bind_only",
        "9.1.0",
        &[("CHANNEL", "hixl"), ("ASCEND_EMU_HCCL_REGISTER_FAIL", "1")],
    )
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("BIND-ERROR registering the PD buffer with the HIXL server: HixlCSServerRegMem returned HixlStatus 503900"),
        "{text}"
    );
}
