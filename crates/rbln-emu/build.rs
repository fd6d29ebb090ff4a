//! The test double carries the real library's SONAME, `librbln.so`, so that once it is
//! loaded, rbln-sys's "already loaded in this process" search step (dlopen with
//! RTLD_NOLOAD) finds it exactly as it would find the real runtime.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,librbln.so");
}
