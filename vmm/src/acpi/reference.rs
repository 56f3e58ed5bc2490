//! The tables read back by independent parsers, the way an OS reads them:
//! rust-osdev's `acpi` crate for the static tables (it checks every table's checksum
//! when it maps it), and ACPICA's `iasl` — the reference AML compiler, which Linux's
//! interpreter comes from — for the DSDT: disassembled, compiled again without errors,
//! and the disassembly's host bridge, `_CRS` and `_PRT` checked.

use std::boxed::Box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::NonNull;
use std::string::String;
use std::vec::Vec;

use acpi::fadt::Fadt;
use acpi::madt::{Madt, MadtEntry};
use acpi::mcfg::Mcfg;
use acpi::{AcpiHandler, AcpiTables, HpetInfo, PhysicalMapping};

use super::*;
use crate::hpet::{self, HPET_BASE};
use crate::ioapic::IOAPIC_BASE;
use crate::pci::{intx_gsi, PciLayout, INTX_GSIS, INTX_GSI_BASE};

/// Guest-physical memory 0..1 MiB as a host buffer that lives for the whole test run.
#[derive(Clone, Copy)]
struct Phys(&'static [u8]);

impl AcpiHandler for Phys {
    unsafe fn map_physical_region<T>(&self, pa: usize, size: usize) -> PhysicalMapping<Self, T> {
        assert!(pa.checked_add(size).is_some_and(|end| end <= self.0.len()));
        let ptr = NonNull::new(self.0[pa..].as_ptr() as *mut T).unwrap();
        // SAFETY: `ptr` points `size` readable bytes into the leaked, never-freed image
        // (checked above); the parser only reads through it, and its table structures
        // are packed, so alignment does not matter.
        unsafe { PhysicalMapping::new(pa, ptr, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// The tables for `cfg` written into a fresh 1-MiB image, parsed from the RSDP.
fn tables(cfg: &AcpiConfig) -> AcpiTables<Phys> {
    let mut img = std::vec![0u8; 0x10_0000];
    for (at, t) in build(cfg, TABLES_ADDR) {
        img[at as usize..at as usize + t.len()].copy_from_slice(&t);
    }
    let p = Phys(Box::leak(img.into_boxed_slice()));
    // SAFETY: `build` put the RSDP at TABLES_ADDR inside the image `p` maps.
    unsafe { AcpiTables::from_rsdp(p, TABLES_ADDR as usize) }.expect("RSDP and XSDT valid")
}

#[test]
fn static_tables_parse_and_match_the_devices() {
    for cpus in [1u8, 2, 4] {
        let cfg = AcpiConfig::new(cpus);
        let t = tables(&cfg);
        let sigs: Vec<String> = t.headers().map(|h| h.signature.as_str().into()).collect();
        assert_eq!(sigs, ["FACP", "APIC", "MCFG", "HPET"]);

        let madt = t.find_table::<Madt>().expect("MADT");
        let lapic_addr = madt.get().local_apic_address;
        assert_eq!(lapic_addr, LAPIC_BASE as u32);
        assert!(madt.get().supports_8259());
        let (mut lapics, mut ioapics, mut isos) = (Vec::new(), Vec::new(), Vec::new());
        for e in madt.get().entries() {
            match e {
                MadtEntry::LocalApic(l) => lapics.push((l.processor_id, l.apic_id, l.flags)),
                MadtEntry::IoApic(i) => ioapics.push((
                    i.io_apic_id,
                    i.io_apic_address,
                    i.global_system_interrupt_base,
                )),
                MadtEntry::InterruptSourceOverride(o) => {
                    isos.push((o.bus, o.irq, o.global_system_interrupt, o.flags))
                }
                MadtEntry::LocalApicNmi(_) => {}
                _ => panic!("unexpected MADT entry"),
            }
        }
        let want: Vec<_> = (0..cpus).map(|c| (c, c, 1)).collect();
        assert_eq!(lapics, want);
        assert_eq!(ioapics, [(cpus, IOAPIC_BASE as u32, 0)]);
        assert_eq!(
            isos,
            [(0, 0, 2, 0), (0, SCI_IRQ, u32::from(SCI_IRQ), 0x000d)]
        );

        let fadt = t.find_table::<Fadt>().expect("FADT");
        let pm = fadt.pm_timer_block().unwrap().expect("PM timer");
        assert_eq!(pm.address, PM_BASE + reg::PM_TMR);
        let flags = fadt.flags;
        assert!(flags.pm_timer_is_32_bit());
        assert_eq!(
            fadt.pm1a_control_block().unwrap().address,
            PM_BASE + reg::PM1_CNT
        );
        assert_eq!(t.dsdt().unwrap().length as usize + 36, dsdt(&cfg).len());

        let h = HpetInfo::new(&t).expect("HPET table");
        assert_eq!(h.base_address as u64, HPET_BASE);
        assert_eq!(h.event_timer_block_id, hpet::capabilities() as u32);
        assert_eq!(usize::from(h.num_comparators()), hpet::NUM_TIMERS);
        assert!(h.main_counter_is_64bits() && h.legacy_irq_capable());
        assert_eq!(h.pci_vendor_id(), hpet::VENDOR_ID);
        assert_eq!(h.hardware_rev(), 1);
        assert_eq!(h.hpet_number, 0);
        assert_eq!(h.clock_tick_unit, hpet::MIN_PERIODIC_TICKS);

        let mcfg = t.find_table::<Mcfg>().expect("MCFG");
        let e: Vec<_> = mcfg
            .entries()
            .iter()
            .map(|e| {
                let (base, seg) = (e.base_address, e.pci_segment_group);
                (base, seg, e.bus_number_start, e.bus_number_end)
            })
            .collect();
        assert_eq!(e, [(cfg.pci.ecam_base, 0, 0, 0)]);
    }
}

/// `iasl` (Debian package acpica-tools; `cargo xtask test` installs it).
fn iasl() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("iasl"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "iasl not found: the DSDT is checked with ACPICA's disassembler; install the \
             Debian package acpica-tools (cargo xtask test does)"
        )
    })
}

fn run_iasl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(iasl())
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running iasl");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "iasl {args:?} failed:\n{text}");
    text
}

/// The DSDT for `cfg`, disassembled by `iasl`, after checking that `iasl` compiles the
/// disassembly again without errors.
fn disassemble(cfg: &AcpiConfig, tag: &str) -> String {
    let dir =
        std::env::temp_dir().join(std::format!("peregrine-dsdt-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dsdt.dat"), dsdt(cfg)).unwrap();
    run_iasl(&dir, &["-d", "dsdt.dat"]);
    let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).expect("iasl wrote dsdt.dsl");
    let compiled = run_iasl(&dir, &["-p", "again", "dsdt.dsl"]);
    assert!(compiled.contains(" 0 Errors"), "recompiling:\n{compiled}");
    let _ = std::fs::remove_dir_all(&dir);
    dsl
}

/// The lines of the block that starts at the first line containing `start`, up to the
/// line that closes it.
fn block<'a>(dsl: &'a str, start: &str) -> Vec<&'a str> {
    let mut lines = dsl.lines().skip_while(|l| !l.contains(start));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("no {start} in:\n{dsl}"));
    let mut out = std::vec![first];
    let mut depth = 0i32;
    for l in lines {
        if l.trim_start().starts_with("//") {
            continue;
        }
        depth += l.matches('{').count() as i32 - l.matches('}').count() as i32;
        out.push(l);
        if depth <= 0 && l.contains('}') {
            break;
        }
    }
    out
}

/// A value as `iasl` prints it at the start of a line: `Zero`, `One` or hex.
fn value(line: &str) -> Option<u64> {
    let tok = line.trim().split([',', ' ']).next()?;
    match tok {
        "Zero" => Some(0),
        "One" => Some(1),
        t => u64::from_str_radix(t.strip_prefix("0x")?, 16).ok(),
    }
}

/// The resource descriptors of a `ResourceTemplate` block: (macro name, its values).
fn descriptors(lines: &[&str]) -> Vec<(String, Vec<u64>)> {
    let mut out: Vec<(String, Vec<u64>)> = Vec::new();
    for l in lines.iter().skip(1) {
        let t = l.trim();
        if let Some(v) = value(t) {
            out.last_mut()
                .expect("a value outside a descriptor")
                .1
                .push(v);
        } else if let Some((name, _)) = t.split_once(" (") {
            out.push((name.into(), Vec::new()));
        }
    }
    out
}

#[test]
fn dsdt_describes_the_pci_host_bridge() {
    let cfg = AcpiConfig::new(2);
    let dsl = disassemble(&cfg, "bridge");
    let pci0 = block(&dsl, "Device (PCI0)").join("\n");
    for want in [
        "Name (_HID, EisaId (\"PNP0A08\")",
        "Name (_CID, EisaId (\"PNP0A03\")",
        "Name (_SEG, Zero)",
        "Name (_BBN, Zero)",
        "Name (_UID, Zero)",
    ] {
        assert!(pci0.contains(want), "{want} missing in:\n{pci0}");
    }
    let l = &cfg.pci;
    let (m32, m32_len) = l.mmio32;
    let (m64, m64_len) = l.mmio64;
    let crs = descriptors(&block(&pci0, "Name (_CRS"));
    let d = |n: &str, v: &[u64]| (String::from(n), v.to_vec());
    assert_eq!(
        crs,
        [
            // Granularity, minimum, maximum, translation, length.
            d("WordBusNumber", &[0, 0, 0, 0, 1]),
            // Minimum, maximum, alignment, length.
            d("IO", &[0xcf8, 0xcf8, 1, 8]),
            d("WordIO", &[0, 0, 0xcf7, 0, 0xcf8]),
            d("WordIO", &[0, 0xd00, 0xffff, 0, 0xf300]),
            d("DWordMemory", &[0, m32, m32 + m32_len - 1, 0, m32_len]),
            d("QWordMemory", &[0, m64, m64 + m64_len - 1, 0, m64_len]),
        ]
    );
    for kind in ["WordBusNumber", "WordIO", "DWordMemory", "QWordMemory"] {
        let line = pci0.lines().find(|x| x.contains(kind)).unwrap();
        assert!(line.contains("ResourceProducer"), "{line}: a window");
    }
    // The 32-bit window ends below the ECAM window, which ends below the I/O APIC.
    assert!(m32 + m32_len <= l.ecam_base && l.ecam_base + ECAM_SIZE <= IOAPIC_BASE);
    assert!(m64 >= 1 << 32);

    let mres = block(&dsl, "Device (MRES)");
    assert!(mres.join("\n").contains("EisaId (\"PNP0C02\")"));
    assert_eq!(
        descriptors(&block(&mres.join("\n"), "Name (_CRS")),
        [d("Memory32Fixed", &[l.ecam_base, ECAM_SIZE])]
    );
    let hpet = block(&dsl, "Device (HPET)");
    assert!(hpet.join("\n").contains("EisaId (\"PNP0103\")"));
    assert_eq!(
        descriptors(&block(&hpet.join("\n"), "Name (_CRS")),
        [d("Memory32Fixed", &[HPET_BASE, hpet::HPET_SIZE])]
    );
    let s5 = block(&dsl, "Name (_S5");
    assert_eq!(value(s5[2]), Some(u64::from(cfg.pm.s5_slp_typ)));
}

#[test]
fn prt_routes_every_slot_and_pin_to_the_gsi_the_vmm_wires() {
    let dsl = disassemble(&AcpiConfig::new(1), "prt");
    let prt = block(&dsl, "Name (_PRT");
    let values: Vec<u64> = prt.iter().filter_map(|l| value(l)).collect();
    let entries: Vec<&[u64]> = values.chunks(4).collect();
    assert_eq!(entries.len(), 31 * 4, "slots 1–31, INTA#–INTD#");
    let mut seen = std::collections::BTreeSet::new();
    for e in entries {
        let (adr, pin, source, gsi) = (e[0], e[1], e[2], e[3]);
        assert_eq!(adr & 0xffff, 0xffff, "any function");
        let dev = (adr >> 16) as u8;
        assert!((1..32).contains(&dev));
        assert!(pin < 4);
        assert_eq!(source, 0, "a GSI, not a link device");
        assert_eq!(gsi, u64::from(intx_gsi(dev, pin as u8)), "{dev} pin {pin}");
        assert!(seen.insert((dev, pin)), "one entry per slot and pin");
        let gsi = gsi as u32;
        assert!((INTX_GSI_BASE..INTX_GSI_BASE + INTX_GSIS).contains(&gsi));
        assert_eq!(hpet::ROUTE_CAP & (1 << gsi), 0, "not an HPET input");
    }
    // Neighbouring slots' INTA# land on different inputs.
    assert_ne!(intx_gsi(1, 0), intx_gsi(2, 0));
    assert_eq!(intx_gsi(1, 1), intx_gsi(2, 0), "the conventional swizzle");
}

#[test]
fn another_layout_is_described_as_given() {
    let mut cfg = AcpiConfig::new(1);
    cfg.pci = PciLayout {
        ecam_base: 0xb000_0000,
        mmio32: (0x8000_0000, 0x1000_0000),
        mmio64: (0x80_0000_0000, 0x8_0000_0000),
    };
    let t = tables(&cfg);
    let mcfg = t.find_table::<Mcfg>().unwrap();
    let base = mcfg.entries()[0].base_address;
    assert_eq!(base, 0xb000_0000);
    let dsl = disassemble(&cfg, "layout");
    let crs = descriptors(&block(&dsl, "Name (_CRS"));
    assert_eq!(crs[4].1[1..3], [0x8000_0000, 0x8fff_ffff]);
    assert_eq!(crs[5].1[1..3], [0x80_0000_0000, 0x87_ffff_ffff]);
    let mres = block(&dsl, "Device (MRES)").join("\n");
    assert_eq!(
        descriptors(&block(&mres, "Name (_CRS"))[0].1,
        [0xb000_0000, ECAM_SIZE]
    );
}
