//! The `hcomm_onesided` PD channel (`HcclBatchPut` into registered memory) on the
//! `ascend-emu` test double: the shared Ascend PD channel tests (see
//! `support/ascend_pd.rs`), and a registration the library refuses.
#![cfg(feature = "ascend")]

#[path = "support/ascend_pd.rs"]
mod ascend_pd;
mod support;

ascend_pd::pd_channel_tests!(
    "hcomm_onesided",
    "HcommOnesided",
    needs "8.5.0",
    timed_out "did not complete within 5s"
);

#[test]
fn a_refused_registration_of_the_pd_buffer_is_a_typed_error_at_start() {
    let out = ascend_pd::child(
        "child_bind_only",
        "9.1.0",
        &[
            ("CHANNEL", "hcomm_onesided"),
            ("ASCEND_EMU_HCCL_REGISTER_FAIL", "1"),
        ],
    )
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("BIND-ERROR registering the PD buffer for one-sided access: HcclRegisterGlobalMem returned HcclResult 4"),
        "{text}"
    );
}
