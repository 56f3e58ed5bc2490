// The linker setup every bare-metal binary's build script shares: each `build.rs`
// `include!`s this file and calls `link_with` (a build script cannot depend on a crate
// of the workspace without a build-dependency, and this is too small to be one).

/// Links the package's binaries with the linker script `script` (a path relative to the
/// package's manifest directory) as fixed-address ELF images (`--no-pie`: the bare-metal
/// target defaults to static-pie), adding `extra` linker arguments; only when building
/// for a bare-metal x86-64 target, so host builds (clippy, tests) link normally. Cargo
/// reruns the build script when the linker script changes.
fn link_with(script: &str, extra: &[&str]) {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let ld = format!("{dir}/{script}");
    println!("cargo:rerun-if-changed={ld}");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.starts_with("x86_64") && target.ends_with("-none") {
        println!("cargo:rustc-link-arg-bins=-T{ld}");
        println!("cargo:rustc-link-arg-bins=--no-pie");
        for arg in extra {
            println!("cargo:rustc-link-arg-bins={arg}");
        }
    }
}
