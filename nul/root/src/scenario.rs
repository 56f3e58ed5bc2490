//! Test scenarios and benchmarks run by the root (`test=NAME`, `bench=NAME`).

use nul_rt::println;

use crate::hip::HipView;

/// Runs test scenario `name`; true when it passed.
pub fn run(name: &str, _hip: &HipView) -> bool {
    match name {
        "boot" => true,
        _ => {
            println!("unknown test scenario {}", name);
            false
        }
    }
}

/// Runs benchmark `name`; true when it completed.
pub fn bench(name: &str, _hip: &HipView) -> bool {
    println!("unknown benchmark {}", name);
    false
}
