//! Passes the linker script and makes the image a fixed-address (non-PIE) ELF.
//!
//! The target defaults to static-pie; the kernel is linked at a fixed higher-half address
//! and its 32-bit boot code uses absolute 32-bit relocations, so we link with `--no-pie`.
//! The code is still compiled position-independent (RIP-relative), which is compatible.

include!("../../support/build/link.rs");

fn main() {
    link_with(
        "link.ld",
        &["-zmax-page-size=4096", "-znorelro", "--no-dynamic-linker"],
    );
}
