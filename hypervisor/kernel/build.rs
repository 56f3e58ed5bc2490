//! Passes the linker script and makes the image a fixed-address (non-PIE) ELF.
//!
//! The target defaults to static-pie; the kernel is linked at a fixed higher-half address
//! and its 32-bit boot code uses absolute 32-bit relocations, so we link with `--no-pie`.
//! The code is still compiled position-independent (RIP-relative), which is compatible.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rerun-if-changed={dir}/link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    if target.starts_with("x86_64") && target.ends_with("-none") {
        println!("cargo:rustc-link-arg-bins=-T{dir}/link.ld");
        println!("cargo:rustc-link-arg-bins=--no-pie");
        println!("cargo:rustc-link-arg-bins=-zmax-page-size=4096");
        println!("cargo:rustc-link-arg-bins=-znorelro");
        println!("cargo:rustc-link-arg-bins=--no-dynamic-linker");
    }
}
