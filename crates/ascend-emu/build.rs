//! The test double carries the real library's SONAME, `libascendcl.so`, so that once it
//! is loaded, ascend-sys's "already loaded in this process" search step (dlopen with
//! RTLD_NOLOAD) finds it exactly as it would find the real runtime.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libascendcl.so");
}
