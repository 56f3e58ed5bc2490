//! Links the guest at guest-physical 1 MiB with its own link script.
fn main() {
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let ld = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", ld.display());
    if std::env::var("TARGET")
        .map(|t| t == "x86_64-unknown-none")
        .unwrap_or(false)
    {
        println!("cargo:rustc-link-arg=-T{}", ld.display());
        println!("cargo:rustc-link-arg=--no-pie");
    }
}
