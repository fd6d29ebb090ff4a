//! With feature `bindgen`, regenerates the raw bindings from `wrapper.h` into
//! `$OUT_DIR/bindings.rs` (which the crate then uses instead of the committed
//! `src/bindings.rs`), and copies them to `$RBLN_SYS_BINDINGS_OUT` when that is set.
//! `scripts/check_rbln_bindings.sh` uses this to check that the committed file is current.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "bindgen")]
    generate();
}

#[cfg(feature = "bindgen")]
fn generate() {
    // The ABI number is unsigned like `rbln_abi_current()`; status codes are `RBLNRetCode`.
    vendor_dl::generate_bindings(
        "wrapper.h",
        "RBLN_SYS_BINDINGS_OUT",
        &["RBLN_SYS_BUILT_ABI"],
        |builder| {
            builder
                .allowlist_type("RBLNRetCode|rbln_.*_fn")
                .allowlist_var("RBLNRetCode_.*|RBLN_SYM_.*|RBLN_SYS_BUILT_ABI")
        },
    );
}
