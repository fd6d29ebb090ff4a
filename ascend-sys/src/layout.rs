//! Sizes and offsets of the declared structs, checked at compile time against what was
//! measured by compiling the vendor headers on x86_64 (reference/ascend/
//! struct_sizes_x86_64.txt). bindgen's own assertions in `bindings.rs` check that Rust
//! agrees with `wrapper.h`; these check that `wrapper.h` agrees with CANN.

#[cfg(target_arch = "x86_64")]
const _: () = {
    use std::mem::{offset_of, size_of};

    use crate::sys::*;

    assert!(size_of::<aclrtMemLocation>() == 8);
    assert!(size_of::<aclrtMemcpyBatchAttr>() == 32);
    assert!(size_of::<HcclRootInfo>() == 4108);
    assert!(size_of::<HcclCommConfigV8>() == 2104);
    assert!(offset_of!(HcclCommConfigV8, hcclExecTimeOut) == 316);
    assert!(offset_of!(HcclCommConfigV8, hcclAlgo) == 320);
    assert!(size_of::<CommMem>() == 24);
    assert!(size_of::<HcclOneSideOpDesc>() == 32);
    assert!(size_of::<HcclPrepareConfig>() == 32);
    assert!(size_of::<CommAddr>() == 40);
    assert!(size_of::<EndpointLoc>() == 64);
    assert!(size_of::<EndpointDesc>() == 160);
    assert!(size_of::<HixlConfig>() == 128);
    assert!(size_of::<HixlClientDesc>() == 128);
    assert!(size_of::<HixlServerDesc>() == 128);
    assert!(size_of::<HixlOneSideOpDesc>() == 24);
    // HIXL's descriptor puts the remote address first, HCCL's the local one.
    assert!(offset_of!(HixlOneSideOpDesc, remote_buf) == 0);
    assert!(offset_of!(HcclOneSideOpDesc, localAddr) == 0);
};
