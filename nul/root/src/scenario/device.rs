//! `test=devmem`: what the kernel PD offers a driver: device memory (mapped
//! uncacheable), physical addresses of memory (`lookup` with PHYS) and
//! message-signalled GSIs; and what it keeps: its own memory, the local APIC and MSI
//! window, the I/O APICs.

use nul_rt::{hc, println, sel};
use peregrine_abi::hip::mem_kind;
use peregrine_abi::hypercall::{msi_address, msi_data};
use peregrine_abi::perm::MemPerm;
use peregrine_abi::{Crd, Status, XferFlags, PAGE_BITS};

use super::check;
use crate::hip::HipView;
use crate::mem::WINDOW;

/// Takes physical page `phys` from the kernel PD into the root's window; the answer of
/// `lookup` with PHYS for the window page afterwards (an error: nothing came).
fn take(phys: u64) -> Result<u64, Status> {
    let page = phys >> PAGE_BITS;
    let _ = hc::pd_delegate(
        peregrine_abi::sel::KERN_PD,
        sel::OWN_PD,
        Crd::mem(page, 0, MemPerm::all()),
        Crd::mem(page + (WINDOW >> PAGE_BITS), 0, MemPerm::all()),
        0,
        XferFlags::empty(),
    );
    hc::lookup_phys(Crd::mem(page + (WINDOW >> PAGE_BITS), 0, MemPerm::all()))
}

/// Runs the checks.
pub fn devmem(hip: &HipView) -> bool {
    let mut ok = true;
    // q35's HPET: its capability register names its vendor and clock period.
    const HPET: u64 = 0xfed0_0000;
    let r = take(HPET);
    ok &= check(r == Ok(HPET), "take the HPET's page; lookup PHYS names it");
    if r.is_ok() {
        // SAFETY: the HPET's register page is mapped (uncacheable) at its window address;
        // offset 0 is its read-only capability register.
        let cap = unsafe { core::ptr::read_volatile((WINDOW + HPET) as *const u64) };
        println!("HPET capabilities {:#x}", cap);
        ok &= check(
            cap >> 32 != 0 && (cap >> 16) as u16 == 0x8086,
            "the HPET answers through the mapping (vendor 8086, a clock period)",
        );
    }
    for (phys, what) in [
        (0xfee0_0000, "the local APIC"),
        (0xfee8_0000, "the MSI window"),
        (0xfec0_0000, "the I/O APIC"),
    ] {
        let r = take(phys);
        println!("{}: {:?}", what, r);
        ok &= check(r.is_err(), what);
    }
    let kernel = hip
        .mems()
        .iter()
        .find(|m| m.kind == mem_kind::HYPERVISOR)
        .map(|m| (m.addr + 0xfff) & !0xfff);
    if let Some(k) = kernel {
        ok &= check(take(k).is_err(), "kernel memory stays the kernel's");
    }
    // RAM the root holds: lookup PHYS answers the frame behind the window address.
    let ram = hip
        .mems()
        .iter()
        .find(|m| m.kind == mem_kind::AVAILABLE)
        .map(|m| (m.addr + 0xfff) & !0xfff);
    if let Some(p) = ram {
        let page = (WINDOW + p) >> PAGE_BITS;
        ok &= check(
            hc::lookup_phys(Crd::mem(page, 0, MemPerm::all())) == Ok(p),
            "lookup PHYS of a RAM page in the window answers its frame",
        );
    }
    ok &= check(
        hc::lookup_phys(Crd::obj(sel::OWN_PD, 0, 0)) == Err(Status::BadParameter),
        "lookup PHYS of an object CRD is refused",
    );
    ok &= check(
        hc::lookup_phys(Crd::mem(0x7_0000_0000, 0, MemPerm::all())) == Err(Status::BadCapability),
        "lookup PHYS where nothing is mapped is refused",
    );
    // Message-signalled GSIs: routing answers the message that delivers the vector.
    let (base, n) = (hip.0.msi_gsi_base, hip.0.num_gsi);
    println!("GSIs: {} pins, {} messages", base, n - base);
    ok &= check(base > 0 && n > base, "the HIP names message-signalled GSIs");
    if n > base {
        let gsi = n - 1;
        match super::sync::take_gsi_sm(gsi) {
            Ok(sm) => {
                let r = hc::assign_gsi(sm, 0, 0);
                println!("assign_gsi({}, cpu 0): {:x?}", gsi, r);
                let apic = hip.cpus().first().map_or(0, |c| c.apic_id as u64);
                ok &= check(
                    r.is_ok_and(|v| {
                        msi_address(v) as u64 == 0xfee0_0000 | apic << 12
                            && msi_data(v) as u64 == 0x30 + gsi
                    }),
                    "assign_gsi answers the MSI address and data",
                );
                ok &= check(
                    hc::assign_gsi(sm, 4096, 0) == Err(Status::BadCpu),
                    "assign_gsi to no CPU is refused",
                );
            }
            Err(e) => ok &= check(false, &alloc::format!("take an MSI GSI: {:?}", e)),
        }
    }
    ok
}
