//! Links the VMM with the common NUL link script.
fn main() {
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let ld = dir.join("../rt/user.ld");
    println!("cargo:rerun-if-changed={}", ld.display());
    if std::env::var("TARGET")
        .map(|t| t == "x86_64-unknown-none")
        .unwrap_or(false)
    {
        println!("cargo:rustc-link-arg=-T{}", ld.display());
        println!("cargo:rustc-link-arg=--no-pie");
    }
}
