//! `test=vmm [secs=N]`: the VMM components (modules with `guest=`, the `nul-vmm`
//! binary) run their VMs; the root waits up to `secs` (default 300) for each to report
//! how its VM ended ([`svc::key::VM_END`]). It passes when every VMM reported (none was
//! removed for a fault) and every VM that ran the check list or the benchmark
//! (`mode=check`, `mode=bench`) ended with `guest done 0`; a hostile VM (`mode=hostile`)
//! passes with any end its VMM reports: the VMM survived it; a Linux VM (`mode=linux`)
//! passes when it powered off.

use alloc::string::String;
use alloc::vec::Vec;

use nul_rt::start_info::{arg, arg_u64};
use nul_rt::{println, svc};

use super::{check, wait_child};
use crate::component::{self, CHILDREN};

/// Runs the scenario.
pub fn run(args: &str) -> bool {
    let secs = arg_u64(args, "secs").unwrap_or(300);
    let vmms: Vec<usize> = CHILDREN
        .lock()
        .iter()
        .enumerate()
        .filter(|(_, c)| arg(&c.args, "guest").is_some())
        .map(|(i, _)| i)
        .collect();
    let mut ok = check(!vmms.is_empty(), "a VMM component runs");
    for id in vmms {
        wait_child(id, secs * 1000, |c| {
            c.result(svc::key::VM_END).is_some() || !c.alive
        });
        let Some((name, mode, end, exits, alive)) = component::with(id, |c| {
            (
                c.name.clone(),
                String::from(arg(&c.args, "mode").unwrap_or("check")),
                c.result(svc::key::VM_END),
                c.result(svc::key::VM_EXITS),
                c.alive,
            )
        }) else {
            continue;
        };
        println!(
            "vmm {} ({}): mode {}, end {:?}, {} exits",
            name,
            id,
            mode,
            end.map(|e| alloc::format!("{:#x}", e)),
            exits.unwrap_or(0)
        );
        ok &= check(alive, "the VMM is alive");
        ok &= check(end.is_some(), "the VMM reported the end of its VM");
        match mode.as_str() {
            "hostile" => {}
            // Linux ends its run with an ACPI power-off.
            "linux" => ok &= check(end == Some(1 << 32), "the guest powered off"),
            _ => ok &= check(end == Some(0), "the guest ended with code 0"),
        }
    }
    ok
}
