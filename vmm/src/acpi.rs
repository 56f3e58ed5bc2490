//! The guest's ACPI tables, generated with rust-vmm's `acpi_tables` (no_std + alloc).
//!
//! Facts from the ACPI Specification 6.5: §5.2.5.3 RSDP (revision 2, 36 bytes, the
//! first 20 bytes and the whole structure each sum to zero), §5.2.8 XSDT, §5.2.9 FADT
//! (PM1a event/control and PM timer blocks, RESET_REG, IAPC_BOOT_ARCH, flags), §5.2.10
//! FACS (64-byte aligned), §5.2.12 MADT (Processor Local APIC type 0, I/O APIC type 1,
//! Interrupt Source Override type 2, Local APIC NMI type 4; flags bit 0 PCAT_COMPAT),
//! §7.4.2.6 `\_S5`; §6.1 and §6.2 (`_HID`, `_CID`, `_UID`, `_CRS`), §6.5.6 `_SEG`,
//! §6.5.5 `_BBN`, §6.2.13 `_PRT` (a Source of 0 means the Source Index is a GSI, which
//! ACPI defines as level-triggered, active low, shareable), §6.4 resource descriptors
//! (WordBusNumber, WordIO, DWordMemory, QWordMemory, IO, Memory32Fixed); the PCI
//! Firmware Specification 3.2 §4.1.2 (MCFG: base, segment, start and end bus); the
//! IA-PC HPET Specification 1.0a §3.2.4 (the HPET table: event timer block ID = the low
//! 32 bits of the capabilities register, base address as a GAS, HPET number, minimum
//! clock tick in periodic mode, page protection).
//!
//! What the tables describe is what the devices implement: the PM block of
//! [`acpi_pm`](crate::acpi_pm) at [`PM_BASE`] (event block 4 bytes, control 2, timer 4
//! with TMR_VAL_EXT as configured), its reset register at 0xcf9, `\_S5` with the
//! SLP_TYP value [`PmConfig`] names, SCI on IRQ 9 (level, active high, as the PM block
//! drives it), the I/O APIC at 0xfec00000 with GSI base 0, and the PIT's IRQ 0 on GSI 2.
//!
//! The DSDT has the PCI host bridge `\_SB.PCI0` (PNP0A08, compatible PNP0A03; segment 0,
//! bus 0) with the windows of [`PciLayout`] in its `_CRS` and a `_PRT` that routes
//! INTA#–INTD# of every slot to the GSI [`intx_gsi`] names (what the VMM wires each
//! function's INTx# to); `\_SB.MRES` (PNP0C02, motherboard resources) reserves the ECAM
//! window that the MCFG table describes; `\_SB.HPET` (PNP0103) and the HPET table
//! describe the [`hpet`] block.
//!
//! `acpi_tables` 0.2 has no builder for the MADT's interrupt source overrides and
//! local APIC NMIs, nor a setter for the MADT flags: the first two are added as raw
//! structures through its `add_structure`, the flags are patched into the serialized
//! table before its checksum is recomputed.
//!
//! The tables go into guest RAM from [`TABLES_ADDR`] (the BIOS area where Linux scans
//! for the RSDP when the zero page's `acpi_rsdp_addr` is 0); the e820 map must not
//! give that range to the guest as RAM.

use alloc::vec;
use alloc::vec::Vec;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::{aml, Aml, AmlSink};
use zerocopy::{Immutable, IntoBytes};

use crate::acpi_pm::{reg, PmConfig, PM_BASE, RESET_PORT, RESET_VALUE};
use crate::hpet::{self, HPET_BASE, HPET_SIZE};
use crate::ioapic::IOAPIC_BASE;
use crate::lapic::LAPIC_BASE;
use crate::pci::{intx_gsi, PciLayout, CONFIG_ADDRESS, ECAM_SIZE};
use crate::vcpu::{GuestMemory, Unbacked};

/// Where the tables start: the RSDP, 16-byte aligned in the BIOS read-only area.
pub const TABLES_ADDR: u64 = 0xe_0000;
/// Room the tables may take from [`TABLES_ADDR`].
pub const TABLES_SIZE: u64 = 0x1_0000;
/// OEM ID in every table.
pub const OEM_ID: [u8; 6] = *b"PRGRN ";
/// OEM table ID in every table.
pub const OEM_TABLE_ID: [u8; 8] = *b"PEREGRIN";
/// The SCI's IRQ (and GSI).
pub const SCI_IRQ: u8 = 9;

/// IAPC_BOOT_ARCH bits (§5.2.9.3).
pub mod boot_arch {
    /// ISA devices a PC has (PIC, PIT, RTC, UART) are there.
    pub const LEGACY_DEVICES: u16 = 1 << 0;
    /// No VGA: do not probe for one.
    pub const VGA_NOT_PRESENT: u16 = 1 << 2;
}

/// MADT flag: dual 8259 PICs are present (masked when the OS uses the I/O APIC).
pub const MADT_PCAT_COMPAT: u32 = 1;

/// What the tables describe.
#[derive(Clone, Copy, Debug)]
pub struct AcpiConfig {
    /// vCPUs: local APIC IDs 0..n, processor UIDs the same.
    pub cpus: u8,
    /// The PM block's configuration (SLP_TYP for `\_S5`, timer width).
    pub pm: PmConfig,
    /// The I/O APIC's ID (conventionally after the CPUs).
    pub ioapic_id: u8,
    /// Where the PCI host bridge's windows and ECAM are.
    pub pci: PciLayout,
}

impl AcpiConfig {
    /// `cpus` vCPUs, the default PM block, the I/O APIC's ID after the CPUs'.
    pub fn new(cpus: u8) -> Self {
        Self {
            cpus,
            pm: PmConfig::default(),
            ioapic_id: cpus,
            pci: PciLayout::DEFAULT,
        }
    }
}

/// A raw MADT structure `acpi_tables` has no type for.
#[derive(Clone, Copy, IntoBytes, Immutable)]
#[repr(transparent)]
struct RawEntry<const N: usize>([u8; N]);

impl<const N: usize> Aml for RawEntry<N> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// Interrupt Source Override (type 2): ISA `source` is `gsi` with MPS INTI `flags`.
fn source_override(source: u8, gsi: u32, flags: u16) -> RawEntry<10> {
    let mut b = [0u8; 10];
    b[..4].copy_from_slice(&[2, 10, 0, source]);
    b[4..8].copy_from_slice(&gsi.to_le_bytes());
    b[8..].copy_from_slice(&flags.to_le_bytes());
    RawEntry(b)
}

/// MPS INTI flags: active high, level triggered.
const INTI_LEVEL_HIGH: u16 = 0b01 | (0b11 << 2);

/// The 8-bit checksum that makes `data` sum to zero.
pub fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(data.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

fn serialize(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_gas(width_bits: u8, size: AccessSize, port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, width_bits, 0, size, port)
}

/// The MADT: one local APIC per vCPU, the I/O APIC, IRQ 0 on GSI 2, the SCI level
/// high, LINT1 as NMI on every CPU.
pub fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(LAPIC_BASE as u32),
    );
    for cpu in 0..cfg.cpus {
        m.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(cfg.ioapic_id, IOAPIC_BASE as u32, 0));
    m.add_structure(source_override(0, 2, 0));
    m.add_structure(source_override(
        SCI_IRQ,
        u32::from(SCI_IRQ),
        INTI_LEVEL_HIGH,
    ));
    // Local APIC NMI: all processors (UID 0xff), default polarity/trigger, LINT1.
    m.add_structure(RawEntry([4u8, 6, 0xff, 0, 0, 1]));
    let mut b = serialize(&m);
    b[40..44].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    b[9] = 0;
    b[9] = checksum(&b);
    b
}

/// PCI slots the `_PRT` routes (device 0 is the host bridge, which has no INTx#).
const PRT_SLOTS: core::ops::RangeInclusive<u8> = 1..=31;

/// `\_SB.PCI0`: the host bridge, its windows and interrupt routing.
fn pci_root(pci: &PciLayout, sink: &mut dyn AmlSink) {
    let (m32, m32_len) = pci.mmio32;
    let (m64, m64_len) = pci.mmio64;
    let cam = CONFIG_ADDRESS as u16;
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cam_ports = aml::IO::new(cam, cam, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, cam - 1, None);
    let io_high = aml::AddressSpace::new_io(cam + 8, 0xffffu16, None);
    let uc = aml::AddressSpaceCacheable::NotCacheable;
    let mem32 =
        aml::AddressSpace::new_memory(uc, true, m32 as u32, (m32 + m32_len - 1) as u32, None);
    let mem64 = aml::AddressSpace::new_memory(uc, true, m64, m64 + m64_len - 1, None);
    let crs = aml::ResourceTemplate::new(vec![&bus, &cam_ports, &io_low, &io_high, &mem32, &mem64]);

    // One entry per slot and pin: address (slot, any function), pin, source 0, GSI.
    let entries: Vec<(u32, u8, u32)> = PRT_SLOTS
        .flat_map(|dev| {
            (0..4u8).map(move |pin| ((u32::from(dev) << 16) | 0xffff, pin, intx_gsi(dev, pin)))
        })
        .collect();
    let packages: Vec<aml::Package> = entries
        .iter()
        .map(|(adr, pin, gsi)| aml::Package::new(vec![adr, pin, &0u8, gsi]))
        .collect();
    let prt = aml::Package::new(packages.iter().map(|p| p as &dyn Aml).collect());

    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_CID".into(), &cid),
            &aml::Name::new("_SEG".into(), &0u8),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new("_BBN".into(), &0u8),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Name::new("_PRT".into(), &prt),
        ],
    )
    .to_aml_bytes(sink);
}

/// A device with a `_HID`, `_UID` 0 and one fixed 32-bit memory range as `_CRS`.
fn fixed_device(name: &str, hid: &str, base: u64, len: u64, sink: &mut dyn AmlSink) {
    let hid = aml::EISAName::new(hid);
    let range = aml::Memory32Fixed::new(true, base as u32, len as u32);
    let crs = aml::ResourceTemplate::new(vec![&range]);
    aml::Device::new(
        name.into(),
        vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

/// AML already encoded.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.0);
    }
}

/// The DSDT: `\_S5` with the PM block's SLP_TYP; under `\_SB` the PCI host bridge, the
/// motherboard resources that reserve its ECAM window, and the HPET.
pub fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::new();
    let typ = cfg.pm.s5_slp_typ;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&typ, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    let mut sb = Vec::new();
    pci_root(&cfg.pci, &mut sb);
    fixed_device("MRES", "PNP0C02", cfg.pci.ecam_base, ECAM_SIZE, &mut sb);
    fixed_device("HPET", "PNP0103", HPET_BASE, HPET_SIZE, &mut sb);
    aml::Scope::new("\\_SB_".into(), vec![&RawAml(&sb)]).to_aml_bytes(&mut body);
    let mut t = acpi_tables::sdt::Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, 1);
    t.append_slice(&body);
    t.as_slice().to_vec()
}

/// The MCFG: the ECAM window for segment 0, bus 0.
pub fn mcfg(cfg: &AcpiConfig) -> Vec<u8> {
    let mut m = acpi_tables::mcfg::MCFG::new(OEM_ID, OEM_TABLE_ID, 1);
    m.add_ecam(cfg.pci.ecam_base, 0, 0, 0);
    serialize(&m)
}

/// The HPET table for the block at [`HPET_BASE`].
pub fn hpet_table() -> Vec<u8> {
    let mut t = acpi_tables::sdt::Sdt::new(*b"HPET", 56, 1, OEM_ID, OEM_TABLE_ID, 1);
    t.write_u32(36, hpet::capabilities() as u32);
    let gas = GAS::new(
        AddressSpace::SystemMemory,
        64,
        0,
        AccessSize::Undefined,
        HPET_BASE,
    );
    t.write_bytes(40, gas.as_bytes());
    t.write_u8(52, 0); // HPET number
    t.write_u16(53, hpet::MIN_PERIODIC_TICKS);
    t.write_u8(55, 0); // no page protection claims
    t.as_slice().to_vec()
}

/// The FADT for the PM block, pointing at `facs` and `dsdt`.
pub fn fadt(cfg: &AcpiConfig, facs: u64, dsdt: u64) -> Vec<u8> {
    let pm = PM_BASE;
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .firmware_ctrl_64(facs)
        .dsdt_64(dsdt)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    if cfg.pm.timer_32bit {
        f = f.flag(Flags::TmrValExt);
    }
    f.sci_int = u16::from(SCI_IRQ).into();
    // SMI_CMD 0: the hardware is in ACPI mode from reset, nothing to switch.
    f.pm1a_evt_blk = (pm as u32).into();
    f.pm1a_cnt_blk = ((pm + reg::PM1_CNT) as u32).into();
    f.pm_tmr_blk = ((pm + reg::PM_TMR) as u32).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.pm_tmr_len = 4;
    f.x_pm1a_evt_blk = io_gas(32, AccessSize::WordAccess, pm);
    f.x_pm1a_cnt_blk = io_gas(16, AccessSize::WordAccess, pm + reg::PM1_CNT);
    f.x_pm_tmr_blk = io_gas(32, AccessSize::DwordAccess, pm + reg::PM_TMR);
    f.reset_reg = io_gas(8, AccessSize::ByteAccess, RESET_PORT);
    f.reset_value = RESET_VALUE;
    f.iapc_boot_arch = (boot_arch::LEGACY_DEVICES | boot_arch::VGA_NOT_PRESENT).into();
    serialize(&f.finalize())
}

/// The tables laid out from `base`: (guest-physical address, bytes) of each, the RSDP
/// first.
pub fn build(cfg: &AcpiConfig, base: u64) -> Vec<(u64, Vec<u8>)> {
    let align = |a: u64, n: u64| a.div_ceil(n) * n;
    let rsdp_at = align(base, 16);
    let xsdt_at = align(rsdp_at + 36, 16);
    // XSDT: header and four pointers (FADT, MADT, MCFG, HPET; the DSDT hangs off the
    // FADT).
    let facs_at = align(xsdt_at + 36 + 8 * 4, 64);
    let facs = serialize(&acpi_tables::facs::FACS::new());
    let dsdt_at = align(facs_at + facs.len() as u64, 16);
    let dsdt = dsdt(cfg);
    let fadt_at = align(dsdt_at + dsdt.len() as u64, 16);
    let fadt = fadt(cfg, facs_at, dsdt_at);
    let madt_at = align(fadt_at + fadt.len() as u64, 16);
    let madt = madt(cfg);
    let mcfg_at = align(madt_at + madt.len() as u64, 16);
    let mcfg = mcfg(cfg);
    let hpet_at = align(mcfg_at + mcfg.len() as u64, 16);
    let hpet = hpet_table();
    let mut xsdt = acpi_tables::xsdt::XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    for at in [fadt_at, madt_at, mcfg_at, hpet_at] {
        xsdt.add_entry(at);
    }
    let rsdp = acpi_tables::rsdp::Rsdp::new(OEM_ID, xsdt_at);
    vec![
        (rsdp_at, serialize(&rsdp)),
        (xsdt_at, serialize(&xsdt)),
        (facs_at, facs),
        (dsdt_at, dsdt),
        (fadt_at, fadt),
        (madt_at, madt),
        (mcfg_at, mcfg),
        (hpet_at, hpet),
    ]
}

/// Writes the tables into guest memory from `base`; the RSDP's address (for the zero
/// page's `acpi_rsdp_addr`).
pub fn write<M: GuestMemory + ?Sized>(
    mem: &mut M,
    cfg: &AcpiConfig,
    base: u64,
) -> Result<u64, Unbacked> {
    let tables = build(cfg, base);
    for (at, bytes) in &tables {
        mem.write(*at, bytes)?;
    }
    Ok(tables[0].0)
}

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;
