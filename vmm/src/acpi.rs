//! The guest's ACPI tables, generated with rust-vmm's `acpi_tables` (no_std + alloc).
//!
//! Facts from the ACPI Specification 6.5: §5.2.5.3 RSDP (revision 2, 36 bytes, the
//! first 20 bytes and the whole structure each sum to zero), §5.2.8 XSDT, §5.2.9 FADT
//! (PM1a event/control and PM timer blocks, RESET_REG, IAPC_BOOT_ARCH, flags), §5.2.10
//! FACS (64-byte aligned), §5.2.12 MADT (Processor Local APIC type 0, I/O APIC type 1,
//! Interrupt Source Override type 2, Local APIC NMI type 4; flags bit 0 PCAT_COMPAT),
//! §7.4.2.6 `\_S5`.
//!
//! What the tables describe is what the devices implement: the PM block of
//! [`acpi_pm`](crate::acpi_pm) at [`PM_BASE`] (event block 4 bytes, control 2, timer 4
//! with TMR_VAL_EXT as configured), its reset register at 0xcf9, `\_S5` with the
//! SLP_TYP value [`PmConfig`] names, SCI on IRQ 9 (level, active high, as the PM block
//! drives it), the I/O APIC at 0xfec00000 with GSI base 0, and the PIT's IRQ 0 on GSI 2.
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
use crate::ioapic::IOAPIC_BASE;
use crate::lapic::LAPIC_BASE;
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
}

impl AcpiConfig {
    /// `cpus` vCPUs, the default PM block, the I/O APIC's ID after the CPUs'.
    pub fn new(cpus: u8) -> Self {
        Self {
            cpus,
            pm: PmConfig::default(),
            ioapic_id: cpus,
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

/// The DSDT: `\_S5` with the PM block's SLP_TYP.
pub fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::new();
    let typ = cfg.pm.s5_slp_typ;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&typ, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    let mut t = acpi_tables::sdt::Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, 1);
    t.append_slice(&body);
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
    // XSDT: header and three pointers (FADT, MADT; the DSDT hangs off the FADT).
    let facs_at = align(xsdt_at + 36 + 8 * 2, 64);
    let facs = serialize(&acpi_tables::facs::FACS::new());
    let dsdt_at = align(facs_at + facs.len() as u64, 16);
    let dsdt = dsdt(cfg);
    let fadt_at = align(dsdt_at + dsdt.len() as u64, 16);
    let fadt = fadt(cfg, facs_at, dsdt_at);
    let madt_at = align(fadt_at + fadt.len() as u64, 16);
    let madt = madt(cfg);
    let mut xsdt = acpi_tables::xsdt::XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let rsdp = acpi_tables::rsdp::Rsdp::new(OEM_ID, xsdt_at);
    vec![
        (rsdp_at, serialize(&rsdp)),
        (xsdt_at, serialize(&xsdt)),
        (facs_at, facs),
        (dsdt_at, dsdt),
        (fadt_at, fadt),
        (madt_at, madt),
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
mod tests;
