//! Links the guest at guest-physical 1 MiB with its own link script.

include!("../../support/build/link.rs");

fn main() {
    link_with("link.ld", &[]);
}
