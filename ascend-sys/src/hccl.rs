//! HCCL, HCCL one-sided and HIXL: what they need (libraries, symbols, versions) for the
//! capability probe, and the versioned communicator config. Their calls are bound by the
//! PD channels that use them.

use vendor_dl::symbol_name;

use crate::sys;
use crate::version::CannVersion;

/// Symbols the two-sided `hccl` channel calls (comm setup in libhcomm.so from 8.5, found
/// through libhccl.so's dependencies; ops in libhccl.so).
pub const TWO_SIDED_SYMBOLS: [&str; 6] = [
    symbol_name(sys::HCCL_SYM_GET_ROOT_INFO),
    symbol_name(sys::HCCL_SYM_COMM_INIT_ROOT_INFO_CONFIG),
    symbol_name(sys::HCCL_SYM_COMM_DESTROY),
    symbol_name(sys::HCCL_SYM_GET_ERROR_STRING),
    symbol_name(sys::HCCL_SYM_SEND),
    symbol_name(sys::HCCL_SYM_RECV),
];

/// Symbols the `hcomm_onesided` channel calls (libhcomm.so from 8.5, libhccl.so before).
pub const ONE_SIDED_SYMBOLS: [&str; 5] = [
    symbol_name(sys::HCCL_SYM_COMM_INIT_CLUSTER_INFO_MEM_CONFIG),
    symbol_name(sys::HCCL_SYM_REGISTER_GLOBAL_MEM),
    symbol_name(sys::HCCL_SYM_COMM_BIND_MEM),
    symbol_name(sys::HCCL_SYM_COMM_PREPARE),
    symbol_name(sys::HCCL_SYM_BATCH_PUT),
];

/// Symbols of HIXL's C client API (libcann_hixl.so).
pub const HIXL_SYMBOLS: [&str; 1] = [symbol_name(sys::HIXL_SYM_CLIENT_CREATE)];

/// HIXL's synchronous batch calls (CANN 9.1).
pub const HIXL_SYNC_SYMBOLS: [&str; 1] = [symbol_name(sys::HIXL_SYM_CLIENT_BATCH_PUT_SYNC)];

/// CANN 8.5 moved communicators and one-sided calls into libhcomm.so.
pub const HCOMM_SPLIT: CannVersion = CannVersion::release(8, 5, 0);
/// HIXL's C client/server API exists from 9.0 ...
pub const HIXL_C_API: CannVersion = CannVersion::release(9, 0, 0);
/// ... but 9.0's structs differ from 9.1's, which are the ones declared here; and the
/// `*Sync` calls come with 9.1.
pub const HIXL_C_API_LAYOUT: CannVersion = CannVersion::release(9, 1, 0);

/// The communicator config, version 8 (CANN 8.5; newer libraries read older versions by
/// the header's size and version fields).
#[repr(transparent)]
pub struct CommConfigV8(pub sys::HcclCommConfigV8);

impl CommConfigV8 {
    /// What the vendor's header-inline `HcclCommConfigInit` writes for version 8: the
    /// header, then every field "not set" so the library applies its defaults.
    pub fn new() -> Self {
        let mut header = [0u8; 24];
        header[..8].copy_from_slice(&(size_of::<sys::HcclCommConfigV8>() as u64).to_ne_bytes());
        header[8..12].copy_from_slice(&sys::ASCEND_SYS_HCCL_COMM_CONFIG_MAGIC.to_ne_bytes());
        header[12..16].copy_from_slice(&sys::ASCEND_SYS_HCCL_COMM_CONFIG_V8.to_ne_bytes());
        CommConfigV8(sys::HcclCommConfigV8 {
            header: header.map(|b| b as std::ffi::c_char),
            hcclBufferSize: sys::ASCEND_SYS_HCCL_NOT_SET,
            hcclDeterministic: sys::ASCEND_SYS_HCCL_NOT_SET,
            hcclCommName: [0; 128],
            hcclUdi: [0; 128],
            hcclOpExpansionMode: 0,
            hcclRdmaTrafficClass: sys::ASCEND_SYS_HCCL_NOT_SET,
            hcclRdmaServiceLevel: sys::ASCEND_SYS_HCCL_NOT_SET,
            hcclWorldRankID: 0,
            hcclJobID: 0,
            aclGraphZeroCopyEnable: 0,
            hcclExecTimeOut: -1,
            hcclAlgo: [0; 1600],
            hcclRetryEnable: [0; 50],
            hcclRetryParams: [0; 128],
        })
    }

    /// Sets the communicator's name (the one-sided setup needs a unique one per process);
    /// `None` when it does not fit the 128-byte field with its NUL or contains a NUL.
    pub fn with_name(mut self, name: &str) -> Option<Self> {
        let bytes = name.as_bytes();
        if bytes.len() >= self.0.hcclCommName.len() || bytes.contains(&0) {
            return None;
        }
        for (dst, &b) in self.0.hcclCommName.iter_mut().zip(bytes) {
            *dst = b as std::ffi::c_char;
        }
        Some(self)
    }
}

impl Default for CommConfigV8 {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_v8_header_says_its_size_magic_and_version() {
        let config = CommConfigV8::new().with_name("kvrelay-pd-0").unwrap();
        // SAFETY: reading the plain-data struct's bytes.
        let bytes: &[u8] = unsafe {
            std::slice::from_raw_parts(
                (&config.0 as *const sys::HcclCommConfigV8).cast(),
                size_of::<sys::HcclCommConfigV8>(),
            )
        };
        assert_eq!(bytes.len(), 2104);
        assert_eq!(u64::from_ne_bytes(bytes[0..8].try_into().unwrap()), 2104);
        assert_eq!(
            u32::from_ne_bytes(bytes[8..12].try_into().unwrap()),
            0xf0f0_f0f0
        );
        assert_eq!(u32::from_ne_bytes(bytes[12..16].try_into().unwrap()), 8);
        assert_eq!(&bytes[16..24], &[0; 8]);
        assert_eq!(
            u32::from_ne_bytes(bytes[24..28].try_into().unwrap()),
            u32::MAX
        );
        assert_eq!(&bytes[32..44], b"kvrelay-pd-0");
        assert_eq!(bytes[44], 0);
        assert_eq!(i32::from_ne_bytes(bytes[316..320].try_into().unwrap()), -1);
        assert!(CommConfigV8::new().with_name(&"x".repeat(128)).is_none());
        assert!(CommConfigV8::new().with_name("a\0b").is_none());
    }
}
