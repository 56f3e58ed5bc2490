//! ACPI: find the RSDP and read the MADT (CPUs, I/O APICs, overrides) with the `acpi`
//! crate, whose handler maps tables through the physmap.

use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use peregrine_abi::hip::MAX_CPUS;

use super::ioapic;
use crate::mem::layout::{phys_to_ptr, phys_to_virt};

/// Maps ACPI tables through the direct map (all RAM and 0..4 GiB are mapped).
#[derive(Debug, Clone, Copy)]
pub struct PhysmapHandler;

impl AcpiHandler for PhysmapHandler {
    unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
        let virt =
            NonNull::new(phys_to_virt(phys as u64) as *mut T).expect("physmap address is non-null");
        // SAFETY: the physmap maps `phys..phys+size` permanently; unmapping is a no-op.
        unsafe { PhysicalMapping::new(phys, virt, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// What the MADT says about the platform.
#[derive(Debug)]
pub struct Platform {
    /// Physical address of the RSDP.
    pub rsdp: u64,
    /// Physical address of the local APICs' MMIO page.
    pub lapic_phys: u64,
    /// APIC ids of the usable CPUs, in MADT order.
    pub apic_ids: [u32; MAX_CPUS],
    /// Number of valid `apic_ids`.
    pub num_cpus: usize,
    /// Whether the MADT says there are 8259 PICs.
    pub has_pic: bool,
}

fn checksum_ok(phys: u64, len: usize) -> bool {
    let p = phys_to_ptr::<u8>(phys);
    // SAFETY: callers scan only BIOS areas below 1 MiB, which the physmap maps.
    (0..len)
        .map(|i| unsafe { p.add(i).read() })
        .fold(0u8, u8::wrapping_add)
        == 0
}

fn scan(from: u64, to: u64) -> Option<u64> {
    (from..to).step_by(16).find(|&a| {
        // SAFETY: as in checksum_ok.
        let sig = unsafe { phys_to_ptr::<[u8; 8]>(a).read() };
        &sig == b"RSD PTR " && checksum_ok(a, 20)
    })
}

/// Finds the RSDP in the EBDA's first KiB or the BIOS area 0xe0000..0xfffff.
pub fn find_rsdp() -> Option<u64> {
    // SAFETY: 0x40e in the BIOS data area holds the EBDA segment; it is mapped.
    let ebda = u64::from(unsafe { phys_to_ptr::<u16>(0x40e).read_unaligned() }) << 4;
    let from_ebda = if (0x8_0000..0xa_0000).contains(&ebda) {
        scan(ebda, ebda + 1024)
    } else {
        None
    };
    from_ebda.or_else(|| scan(0xe_0000, 0x10_0000))
}

/// Reads the MADT: registers I/O APICs and overrides with [`ioapic`], lists the CPUs.
/// The boot CPU (`bsp_apic_id`) comes first in the list.
pub fn discover(bsp_apic_id: u32) -> Result<Platform, &'static str> {
    let rsdp = find_rsdp().ok_or("no ACPI RSDP")?;
    // SAFETY: `rsdp` is a checksummed RSDP; the handler maps tables through the physmap.
    let tables = unsafe { AcpiTables::from_rsdp(PhysmapHandler, rsdp as usize) }
        .map_err(|_| "bad ACPI tables")?;
    let madt = tables.find_table::<Madt>().map_err(|_| "no MADT")?;
    let madt = madt.get();
    let mut p = Platform {
        rsdp,
        lapic_phys: u64::from(madt.local_apic_address),
        apic_ids: [0; MAX_CPUS],
        num_cpus: 1,
        has_pic: madt.flags & 1 != 0,
    };
    p.apic_ids[0] = bsp_apic_id;
    ioapic::reset_isa();
    let mut add_cpu = |id: u32, flags: u32| {
        if flags & 3 != 0
            && id != bsp_apic_id
            && p.num_cpus < MAX_CPUS
            && !p.apic_ids[..p.num_cpus].contains(&id)
        {
            p.apic_ids[p.num_cpus] = id;
            p.num_cpus += 1;
        }
    };
    for e in madt.entries() {
        match e {
            MadtEntry::LocalApic(l) => add_cpu(u32::from(l.apic_id), l.flags),
            MadtEntry::LocalX2Apic(l) => add_cpu(l.x2apic_id, l.flags),
            MadtEntry::IoApic(a) => ioapic::add(
                a.io_apic_id,
                u64::from(a.io_apic_address),
                a.global_system_interrupt_base,
            ),
            MadtEntry::InterruptSourceOverride(o) if o.bus == 0 => {
                let flags = o.flags;
                // MPS INTI flags: polarity bits 1:0 (3 = active low), trigger bits 3:2
                // (3 = level); 0 means "conforms to the bus" (ISA: edge, high).
                ioapic::add_override(
                    o.irq,
                    o.global_system_interrupt,
                    (flags >> 2) & 3 == 3,
                    flags & 3 == 3,
                );
            }
            MadtEntry::LocalApicAddressOverride(o) => p.lapic_phys = o.local_apic_address,
            _ => {}
        }
    }
    Ok(p)
}
