//! Guest-physical layout of the entry state, all below 1 MiB: a flat GDT and the
//! identity map of the first 4 GiB (one PML4, one PDPT, four page directories of 2 MiB
//! pages, supervisor-only, writable, executable).

/// The GDT the entry state's segment registers come from.
pub const GDT: u64 = 0x500;
/// PML4 (CR3).
pub const PML4: u64 = 0x1000;
/// PDPT.
pub const PDPT: u64 = 0x2000;
/// First of the four page directories.
pub const PD: u64 = 0x3000;

/// Flat 64-bit code selector.
pub const CODE_SEL: u16 = 0x08;
/// Flat data selector.
pub const DATA_SEL: u16 = 0x10;
/// A 64-bit TSS (base 0, limit 0x67): VMX needs a usable TR.
pub const TSS_SEL: u16 = 0x18;

/// The GDT: null, code, data, TSS (16 bytes).
pub const GDT_ENTRIES: [u64; 5] = [
    0,
    0x00af_9a00_0000_ffff,
    0x00cf_9200_0000_ffff,
    0x0000_8b00_0000_0067,
    0,
];

/// CR0: PE, MP, ET, NE, WP, PG.
pub const CR0: u64 = 0x8001_0033;
/// CR4: PAE.
pub const CR4: u64 = 0x20;
/// EFER: LME, LMA.
pub const EFER: u64 = 0x500;
/// RFLAGS: only the reserved bit 1.
pub const RFLAGS: u64 = 2;

const PRESENT_WRITABLE: u64 = 0x3;
const PAGE_2M: u64 = 0x80;

/// Everything to write into guest memory: (guest-physical address, bytes).
pub fn tables() -> Vec<(u64, Vec<u8>)> {
    let gdt: Vec<u8> = GDT_ENTRIES.iter().flat_map(|e| e.to_le_bytes()).collect();
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT | PRESENT_WRITABLE).to_le_bytes());
    let mut pdpt = vec![0u8; 4096];
    for i in 0..4u64 {
        let e = (PD + i * 0x1000) | PRESENT_WRITABLE;
        pdpt[i as usize * 8..][..8].copy_from_slice(&e.to_le_bytes());
    }
    let pds: Vec<u8> = (0..4 * 512u64)
        .flat_map(|i| ((i << 21) | PAGE_2M | PRESENT_WRITABLE).to_le_bytes())
        .collect();
    vec![(GDT, gdt), (PML4, pml4), (PDPT, pdpt), (PD, pds)]
}

/// Translates `va` through the tables of [`tables`] (a check of the layout).
pub fn translate(mem: &dyn Fn(u64) -> u64, va: u64) -> Option<u64> {
    let pml4e = mem(PML4 + ((va >> 39) & 511) * 8);
    if pml4e & 1 == 0 {
        return None;
    }
    let pdpte = mem((pml4e & !0xfff) + ((va >> 30) & 511) * 8);
    if pdpte & 1 == 0 {
        return None;
    }
    let pde = mem((pdpte & !0xfff) + ((va >> 21) & 511) * 8);
    if pde & 1 == 0 || pde & PAGE_2M == 0 {
        return None;
    }
    Some((pde & !0x1f_ffff & ((1 << 52) - 1)) | (va & 0x1f_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_maps_four_gib_below_one_mib() {
        let mut ram = vec![0u8; 1 << 20];
        for (at, bytes) in tables() {
            assert!(at as usize + bytes.len() <= 1 << 20);
            ram[at as usize..][..bytes.len()].copy_from_slice(&bytes);
        }
        let read = |a: u64| u64::from_le_bytes(ram[a as usize..][..8].try_into().unwrap());
        for va in [0, 0x10_0000, 0x12_3456, 0xd000_0000, 0xffff_fff8] {
            assert_eq!(translate(&read, va), Some(va), "{va:#x}");
        }
        assert_eq!(translate(&read, 1 << 32), None);
        // The data selector of the GDT in memory.
        assert_eq!(read(GDT + u64::from(DATA_SEL)), GDT_ENTRIES[2]);
    }
}
