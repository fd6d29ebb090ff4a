//! The `hccl` PD channel (two-sided `HcclSend`/`HcclRecv`) on the `ascend-emu` test
//! double: the shared Ascend PD channel tests (see `support/ascend_pd.rs`).
#![cfg(feature = "ascend")]

#[path = "support/ascend_pd.rs"]
mod ascend_pd;
mod support;

ascend_pd::pd_channel_tests!(
    "hccl",
    "Hccl",
    needs "8.5.0",
    timed_out "did not complete within 5s"
);
