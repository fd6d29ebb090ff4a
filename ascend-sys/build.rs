//! With feature `bindgen`, regenerates the raw bindings from `wrapper.h` into
//! `$OUT_DIR/bindings.rs` (which the crate then uses instead of the committed
//! `src/bindings.rs`), and copies them to `$ASCEND_SYS_BINDINGS_OUT` when that is set.
//! `scripts/check_ascend_bindings.sh` uses this to check that the committed file is current.
//! bindgen's layout assertions (size, alignment, field offsets) are kept: they are
//! compile-time checks in the committed file.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "bindgen")]
    generate();
}

#[cfg(feature = "bindgen")]
fn generate() {
    use vendor_dl::bindgen::callbacks::{IntKind, ParseCallbacks};

    /// Status and enum values are the C `int` of their typedef; config markers and sizes
    /// are unsigned like the fields they go in.
    #[derive(Debug)]
    struct MacroTypes;

    impl ParseCallbacks for MacroTypes {
        fn int_macro(&self, name: &str, _value: i64) -> Option<IntKind> {
            if name.starts_with("ASCEND_SYS_") || name.starts_with("HIXL_") {
                Some(IntKind::U32)
            } else {
                Some(IntKind::I32)
            }
        }
    }

    vendor_dl::generate_bindings("wrapper.h", "ASCEND_SYS_BINDINGS_OUT", |builder| {
        builder
            .allowlist_type("acl.*|Hccl.*|Hixl.*|CommMem.*|CommAddr|Endpoint.*")
            .allowlist_var("ACL_.*|HCCL_.*|HIXL_.*|COMM_MEM_.*|ASCEND_SYS_.*")
            .parse_callbacks(Box::new(MacroTypes))
    });
}
