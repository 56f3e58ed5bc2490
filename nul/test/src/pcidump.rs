//! `role=pcidump pci=SEL`: prints the device page the root gave it and touches what it
//! names — a dword of the configuration page, a byte of each I/O BAR's first port —
//! proving the root delegated them (a missing port or page would fault). Prints
//! `PCIDUMP ok` at the end.

use nul_rt::device::{bar_kind, DeviceInfo};
use nul_rt::println;
use nul_rt::start_info::StartInfo;

/// Runs the dump.
pub fn run(si: &StartInfo) -> ! {
    let Some(d) = DeviceInfo::get(si) else {
        println!("pcidump: no device page");
        crate::block_forever()
    };
    // SAFETY: the root maps the function's configuration page at `config`.
    let id = unsafe { core::ptr::read_volatile(d.config as *const u32) };
    println!(
        "pcidump: {:04x}:{:04x} class {:06x}, config dword 0 {:#010x}",
        d.id & 0xffff,
        d.id >> 16,
        d.class,
        id
    );
    for (i, b) in d.bars.iter().enumerate() {
        match b.kind {
            bar_kind::MEM => println!(
                "pcidump: BAR {} memory {:#x} ({} bytes) at {:#x}",
                i, b.phys, b.size, b.addr
            ),
            bar_kind::IO => {
                let v: u8;
                // SAFETY: the root delegated this BAR's ports to us (without them the
                // `in` faults, which is what this role checks); reading the first
                // register of a BAR changes nothing the root or another driver uses.
                unsafe {
                    core::arch::asm!("in al, dx", out("al") v, in("dx") b.addr as u16,
                        options(nomem, nostack))
                };
                println!(
                    "pcidump: BAR {} ports {:#x}+{} (first reads {:#04x})",
                    i, b.addr, b.size, v
                );
            }
            _ => {}
        }
    }
    println!("PCIDUMP ok");
    crate::block_forever()
}
