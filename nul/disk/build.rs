//! Links the disk component with the common NUL link script.

include!("../../support/build/link.rs");

fn main() {
    link_with("../rt/user.ld", &[]);
}
