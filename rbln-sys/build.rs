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
    use bindgen::callbacks::{IntKind, ParseCallbacks};

    /// The ABI number is unsigned like `rbln_abi_current()`; status codes are `RBLNRetCode`.
    #[derive(Debug)]
    struct MacroTypes;

    impl ParseCallbacks for MacroTypes {
        fn int_macro(&self, name: &str, _value: i64) -> Option<IntKind> {
            if name == "RBLN_SYS_BUILT_ABI" {
                Some(IntKind::U32)
            } else {
                Some(IntKind::I32)
            }
        }
    }

    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-env-changed=RBLN_SYS_BINDINGS_OUT");
    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_type("RBLNRetCode|rbln_.*_fn")
        .allowlist_var("RBLNRetCode_.*|RBLN_SYM_.*|RBLN_SYS_BUILT_ABI")
        .parse_callbacks(Box::new(MacroTypes))
        .formatter(bindgen::Formatter::Prettyplease)
        .generate()
        .unwrap_or_else(|e| panic!("bindgen failed on rbln-sys/wrapper.h: {e}"));
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let generated = out.join("bindings.rs");
    bindings
        .write_to_file(&generated)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", generated.display()));
    if let Some(copy) = std::env::var_os("RBLN_SYS_BINDINGS_OUT") {
        std::fs::copy(&generated, &copy)
            .unwrap_or_else(|e| panic!("cannot copy bindings to {copy:?}: {e}"));
    }
}
