//! With feature `bindgen`, regenerates the raw bindings from `wrapper.h` into
//! `$OUT_DIR/bindings.rs` (which the crate then uses instead of the committed
//! `src/bindings.rs`), and copies them to `$ASCEND_SYS_BINDINGS_OUT` when that is set.
//! `scripts/check_bindings.sh ascend-sys` uses this to check that the committed file is current.
//! bindgen's layout assertions (size, alignment, field offsets) are kept: they are
//! compile-time checks in the committed file.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "bindgen")]
    generate();
}

#[cfg(feature = "bindgen")]
fn generate() {
    // Config markers and sizes are unsigned like the fields they go in, and so is
    // `HixlStatus`; ACL and HCCL codes and enum values are C `int`.
    vendor_dl::generate_bindings(
        "wrapper.h",
        "ASCEND_SYS_BINDINGS_OUT",
        &["ASCEND_SYS_", "HIXL_"],
        |builder| {
            builder
                .allowlist_type("acl.*|Hccl.*|Hixl.*|CommMem.*|CommAddr|Endpoint.*")
                .allowlist_var("ACL_.*|HCCL_.*|HIXL_.*|COMM_MEM_.*|ASCEND_SYS_.*")
        },
    );
}
