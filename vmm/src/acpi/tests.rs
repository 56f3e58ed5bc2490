//! The tables parsed back the way an OS reads them: signatures, lengths, checksums,
//! then the fields, checked against the devices they describe.

use super::*;
use crate::acpi_pm::{cnt, AcpiPm, ResetControl};
use crate::bus::{Action, BusDevice, NoIrq};
use crate::clock::ManualClock;
use crate::testutil::MockVcpu;
use alloc::sync::Arc;
use std::vec::Vec;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

/// Reads a table at `gpa` from guest memory, checking its header.
fn table(m: &mut MockVcpu, gpa: u64, sig: &[u8; 4]) -> Vec<u8> {
    let mut hdr = [0u8; 36];
    m.read(gpa, &mut hdr).unwrap();
    assert_eq!(&hdr[..4], sig);
    let len = u32_at(&hdr, 4) as usize;
    let mut t = std::vec![0u8; len];
    m.read(gpa, &mut t).unwrap();
    assert_eq!(sum(&t), 0, "{} checksum", std::str::from_utf8(sig).unwrap());
    assert_eq!(&t[10..16], &OEM_ID);
    t
}

struct Parsed {
    fadt: Vec<u8>,
    madt: Vec<u8>,
    dsdt: Vec<u8>,
    facs_at: u64,
}

fn parse(cpus: u8) -> (MockVcpu, Parsed) {
    let mut m = MockVcpu::new(0x10_0000);
    let rsdp_at = write(&mut m, &AcpiConfig::new(cpus), TABLES_ADDR).unwrap();
    assert_eq!(rsdp_at, TABLES_ADDR);
    let mut rsdp = [0u8; 36];
    m.read(rsdp_at, &mut rsdp).unwrap();
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "revision");
    assert_eq!(u32_at(&rsdp, 20), 36);
    let xsdt = table(&mut m, u64_at(&rsdp, 24), b"XSDT");
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| u64_at(&xsdt, o))
        .collect();
    assert_eq!(entries.len(), 4);
    let fadt = table(&mut m, entries[0], b"FACP");
    let madt = table(&mut m, entries[1], b"APIC");
    let dsdt = table(&mut m, u64_at(&fadt, 140), b"DSDT");
    let facs_at = u64_at(&fadt, 132);
    for (at, t) in build(&AcpiConfig::new(cpus), TABLES_ADDR) {
        assert!(at + t.len() as u64 <= TABLES_ADDR + TABLES_SIZE);
    }
    (
        m,
        Parsed {
            fadt,
            madt,
            dsdt,
            facs_at,
        },
    )
}

#[test]
fn fadt_describes_the_pm_block() {
    let (mut m, p) = parse(2);
    let f = &p.fadt;
    assert_eq!(f.len(), 276, "FADT 6.5");
    assert_eq!(u16_at(f, 46), u16::from(SCI_IRQ));
    assert_eq!(u32_at(f, 48), 0, "no SMI_CMD: already in ACPI mode");
    assert_eq!(u32_at(f, 56), PM_BASE as u32);
    assert_eq!(u32_at(f, 64), (PM_BASE + reg::PM1_CNT) as u32);
    assert_eq!(u32_at(f, 76), (PM_BASE + reg::PM_TMR) as u32);
    assert_eq!((f[88], f[89], f[91]), (4, 2, 4));
    assert_eq!(
        u16_at(f, 109),
        boot_arch::LEGACY_DEVICES | boot_arch::VGA_NOT_PRESENT
    );
    let flags = u32_at(f, 112);
    assert_eq!(flags & (1 << 20), 0, "not HW_REDUCED");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_ne!(flags & (1 << 8), 0, "TMR_VAL_EXT");
    // RESET_REG: system I/O, 8 bits at 0xcf9; RESET_VALUE.
    assert_eq!(f[116], 1);
    assert_eq!(f[117], 8);
    assert_eq!(u64_at(f, 120), RESET_PORT);
    assert_eq!(f[128], RESET_VALUE);
    // The extended blocks agree with the 32-bit ones.
    assert_eq!((f[148], u64_at(f, 152)), (1, PM_BASE));
    assert_eq!((f[172], u64_at(f, 176)), (1, PM_BASE + reg::PM1_CNT));
    assert_eq!(
        (f[208], f[209], u64_at(f, 212)),
        (1, 32, PM_BASE + reg::PM_TMR)
    );
    // FACS: 64-byte aligned, signature, 64 bytes.
    assert_eq!(p.facs_at % 64, 0);
    let mut facs = [0u8; 8];
    m.read(p.facs_at, &mut facs).unwrap();
    assert_eq!(&facs[..4], b"FACS");
    assert_eq!(u32_at(&facs, 4), 64);
}

#[test]
fn madt_lists_cpus_ioapic_and_overrides() {
    for cpus in [1u8, 2, 8] {
        let (_, p) = parse(cpus);
        let t = &p.madt;
        assert_eq!(u32_at(t, 36), LAPIC_BASE as u32);
        assert_eq!(u32_at(t, 40), MADT_PCAT_COMPAT);
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut isos = Vec::new();
        let mut nmis = 0;
        let mut o = 44;
        while o < t.len() {
            let (ty, len) = (t[o], t[o + 1] as usize);
            assert!(len >= 2 && o + len <= t.len());
            match ty {
                0 => lapics.push((t[o + 2], t[o + 3], u32_at(t, o + 4))),
                1 => ioapics.push((t[o + 2], u32_at(t, o + 4), u32_at(t, o + 8))),
                2 => isos.push((t[o + 3], u32_at(t, o + 4), u16_at(t, o + 8))),
                4 => {
                    assert_eq!((t[o + 2], t[o + 5]), (0xff, 1));
                    nmis += 1;
                }
                _ => panic!("unexpected MADT entry {ty}"),
            }
            o += len;
        }
        assert_eq!(o, t.len());
        let want: Vec<_> = (0..cpus).map(|c| (c, c, 1)).collect();
        assert_eq!(lapics, want);
        assert_eq!(ioapics, [(cpus, IOAPIC_BASE as u32, 0)]);
        assert_eq!(isos, [(0, 2, 0), (9, 9, 0x000d)]);
        assert_eq!(nmis, 1);
    }
}

/// The first element of `\_S5`'s package, decoded.
fn s5_slp_typ(dsdt: &[u8]) -> u8 {
    let at = dsdt.windows(4).position(|w| w == b"_S5_").unwrap() + 4;
    assert_eq!(dsdt[at], 0x12, "PackageOp");
    let pkglen_bytes = 1 + (dsdt[at + 1] >> 6) as usize;
    let n = at + 1 + pkglen_bytes;
    assert_eq!(dsdt[n], 4, "four elements");
    match dsdt[n + 1] {
        0x00 => 0,
        0x01 => 1,
        0x0a => dsdt[n + 2],
        op => panic!("unexpected opcode {op:#x}"),
    }
}

#[test]
fn dsdt_s5_powers_the_pm_block_off() {
    let (_, p) = parse(1);
    assert_eq!(p.dsdt[8], 2, "DSDT revision 2: 64-bit integers");
    let typ = s5_slp_typ(&p.dsdt);
    assert_eq!(typ, PmConfig::default().s5_slp_typ);
    // What Linux does to enter S5, on the device the FADT points at.
    let mut pm = AcpiPm::new(
        Arc::new(ManualClock::new(0)),
        Arc::new(NoIrq),
        PmConfig::default(),
    );
    let v = (u16::from(typ) << cnt::SLP_TYP_SHIFT) | cnt::SLP_EN;
    let off = u64::from(u32_at(&p.fadt, 64)) - PM_BASE;
    assert_eq!(
        pm.write(PM_BASE, off, &v.to_le_bytes()),
        Some(Action::PowerOff)
    );
    // And the reset register.
    let mut rc = ResetControl::default();
    let port = u64_at(&p.fadt, 120);
    assert_eq!(rc.write(port, 0, &[p.fadt[128]]), Some(Action::Reset));
}

#[test]
fn other_sleep_type_and_timer_width() {
    let mut cfg = AcpiConfig::new(1);
    cfg.pm.s5_slp_typ = 0;
    cfg.pm.timer_32bit = false;
    let d = dsdt(&cfg);
    assert_eq!(sum(&d), 0);
    assert_eq!(s5_slp_typ(&d), 0);
    let f = fadt(&cfg, 0x1000, 0x2000);
    assert_eq!(sum(&f), 0);
    assert_eq!(u32_at(&f, 112) & (1 << 8), 0);
}

#[test]
fn unbacked_memory_is_an_error() {
    let mut m = MockVcpu::new(0x1000);
    assert!(write(&mut m, &AcpiConfig::new(1), TABLES_ADDR).is_err());
}

#[test]
fn checksum_helper() {
    let mut b = std::vec![1u8, 2, 3, 0];
    b[3] = checksum(&b);
    assert_eq!(sum(&b), 0);
}
