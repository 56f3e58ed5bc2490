//! The Linux x86 boot protocol, 64-bit entry (Documentation/arch/x86/boot.rst, "64-bit
//! Boot Protocol").
//!
//! [`parse`] checks a bzImage: boot flag 0xaa55, "HdrS" magic, protocol 2.12 or later,
//! LOADED_HIGH and XLF_KERNEL_64; the protected-mode kernel starts at
//! `(setup_sects + 1) * 512` (`setup_sects` 0 meaning 4). [`load`] puts it at its
//! `pref_address`, the command line and initrd where the protocol allows, builds the
//! zero page (setup header copied from the image, `type_of_loader` 0xff, e820 map), a
//! GDT with the `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18) descriptors the protocol
//! names, and identity page tables for the low 4 GiB (2-MiB pages); [`entry_state`]
//! then sets a vCPU up for the jump to `load address + 0x200` with RSI at the zero page.
//!
//! Guest-physical layout below 1 MiB (the same as Firecracker's, for the same reasons:
//! low, page-aligned, clear of the real-mode IVT/BDA and the EBDA):
//!
//! | address  | what                               |
//! |----------|------------------------------------|
//! | 0x0500   | GDT (4 entries)                    |
//! | 0x7000   | zero page (`boot_params`)          |
//! | 0x9000   | PML4                               |
//! | 0xa000   | PDPT                               |
//! | 0xb000   | 4 page directories (0xb000–0xefff) |
//! | 0x20000  | command line                       |
//!
//! [`multiboot`] loads Multiboot v1 images instead (entered in 32-bit protected mode).

mod layout;
pub mod multiboot;
#[cfg(test)]
mod tests;

use core::fmt;

pub use layout::{BootParams, E820Entry, Le, SetupHeader, E820_MAX};

use crate::vcpu::{bits, ArchState, GuestMemory, Segment};

/// GDT address.
pub const GDT_ADDR: u64 = 0x500;
/// Zero page address.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// PML4 address (CR3).
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT address.
pub const PDPT_ADDR: u64 = 0xa000;
/// First page directory.
pub const PD_ADDR: u64 = 0xb000;
/// Command line address.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Where the protocol says a 64-bit kernel goes if it states no preference.
pub const DEFAULT_LOAD_ADDR: u64 = 0x100_0000;
/// `__BOOT_CS`.
pub const BOOT_CS: u16 = 0x10;
/// `__BOOT_DS`.
pub const BOOT_DS: u16 = 0x18;

/// E820 types.
pub mod e820 {
    /// Usable RAM.
    pub const RAM: u32 = 1;
    /// Reserved.
    pub const RESERVED: u32 = 2;
    /// ACPI tables, reclaimable.
    pub const ACPI: u32 = 3;
    /// ACPI non-volatile storage.
    pub const NVS: u32 = 4;
}

const HDRS: u32 = u32::from_le_bytes(*b"HdrS");
const LOADED_HIGH: u8 = 1 << 0;
const XLF_KERNEL_64: u16 = 1 << 0;
const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
/// Boot protocol 2.12: the first with `xloadflags` and the 64-bit entry we use.
pub const MIN_VERSION: u16 = 0x020c;

/// Why a kernel was not loaded. The doc comment of each variant is its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// The file is shorter than a setup header.
    TooShort,
    /// No 0xaa55 boot flag or "HdrS" magic: not a Linux bzImage.
    NotBzImage,
    /// Boot protocol older than 2.12.
    ProtocolTooOld {
        /// The image's protocol version.
        version: u16,
    },
    /// Not a bzImage (loaded high): a zImage.
    NotLoadedHigh,
    /// The kernel has no 64-bit entry point (XLF_KERNEL_64).
    No64BitEntry,
    /// The file ends before the setup code or the kernel it declares.
    Truncated {
        /// Bytes the header declares.
        need: u64,
        /// Bytes the file has.
        have: u64,
    },
    /// The command line is longer than the kernel accepts.
    CmdlineTooLong {
        /// Its length, with the terminating NUL.
        len: usize,
        /// The kernel's limit, with the NUL.
        max: usize,
    },
    /// Something does not fit in the guest's RAM.
    DoesNotFit {
        /// What.
        what: &'static str,
        /// Where it would go.
        addr: u64,
        /// How big it is.
        size: u64,
    },
    /// More memory regions than the zero page holds.
    TooManyRegions(usize),
    /// Writing guest memory failed at this address (not RAM).
    Unbacked(u64),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BootError::TooShort => write!(f, "file too short for a Linux setup header"),
            BootError::NotBzImage => write!(f, "not a Linux bzImage (no boot flag or HdrS magic)"),
            BootError::ProtocolTooOld { version } => write!(
                f,
                "boot protocol {}.{:02} is older than 2.12",
                version >> 8,
                version & 0xff
            ),
            BootError::NotLoadedHigh => write!(f, "a zImage, not a bzImage"),
            BootError::No64BitEntry => write!(f, "kernel has no 64-bit entry point"),
            BootError::Truncated { need, have } => {
                write!(
                    f,
                    "image truncated: header declares {need} bytes, file has {have}"
                )
            }
            BootError::CmdlineTooLong { len, max } => {
                write!(f, "command line of {len} bytes exceeds the kernel's {max}")
            }
            BootError::DoesNotFit { what, addr, size } => {
                write!(
                    f,
                    "{what} ({size:#x} bytes at {addr:#x}) does not fit in guest RAM"
                )
            }
            BootError::TooManyRegions(n) => write!(f, "{n} memory regions, at most {E820_MAX}"),
            BootError::Unbacked(a) => write!(f, "guest address {a:#x} is not RAM"),
        }
    }
}

/// A checked bzImage.
#[derive(Clone, Copy)]
pub struct BzImage<'a> {
    /// The setup header as in the file.
    pub header: SetupHeader,
    /// The header bytes the protocol says to copy into the zero page (0x1f1 up to
    /// 0x202 + the byte at 0x201).
    pub header_bytes: &'a [u8],
    /// The protected-mode kernel.
    pub kernel: &'a [u8],
}

impl BzImage<'_> {
    /// Where the kernel goes: `pref_address`, or the protocol's default.
    pub fn load_addr(&self) -> u64 {
        match self.header.pref_address {
            0 => DEFAULT_LOAD_ADDR,
            a => a,
        }
    }

    /// The memory the kernel needs from its load address while it decompresses.
    pub fn init_size(&self) -> u64 {
        u64::from(self.header.init_size).max(self.kernel.len() as u64)
    }
}

/// Checks that `image` is a loadable 64-bit bzImage.
pub fn parse(image: &[u8]) -> Result<BzImage<'_>, BootError> {
    let hdr = image
        .get(0x1f1..)
        .and_then(SetupHeader::from_bytes)
        .ok_or(BootError::TooShort)?;
    // Copies: the fields of a packed structure cannot be borrowed.
    let (boot_flag, magic, version) = (hdr.boot_flag, hdr.header, hdr.version);
    let (loadflags, xloadflags, setup_sects) = (hdr.loadflags, hdr.xloadflags, hdr.setup_sects);
    if boot_flag != 0xaa55 || magic != HDRS {
        return Err(BootError::NotBzImage);
    }
    if version < MIN_VERSION {
        return Err(BootError::ProtocolTooOld { version });
    }
    if loadflags & LOADED_HIGH == 0 {
        return Err(BootError::NotLoadedHigh);
    }
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry);
    }
    let sects = if setup_sects == 0 { 4 } else { setup_sects };
    let setup_len = (usize::from(sects) + 1) * 512;
    let header_end = 0x202 + usize::from(image[0x201]);
    let need = setup_len as u64 + u64::from(hdr.syssize) * 16;
    // `syssize` counts 16-byte paragraphs, rounded up: allow the last one partial.
    // The setup code must be there in full even when `syssize` claims no kernel (the
    // fuzzer's find: the paragraph slack alone let a file end inside the setup).
    if (image.len() as u64) + 15 < need || image.len() < header_end.max(setup_len) {
        return Err(BootError::Truncated {
            need,
            have: image.len() as u64,
        });
    }
    Ok(BzImage {
        header: hdr,
        header_bytes: &image[0x1f1..header_end.max(0x1f1)],
        kernel: &image[setup_len..],
    })
}

/// What [`load`] placed where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The zero page.
    pub zero_page: u64,
    /// The PML4 (CR3).
    pub cr3: u64,
    /// Where the initrd went, and its size.
    pub initrd: Option<(u64, u64)>,
}

fn put<M: GuestMemory + ?Sized>(mem: &mut M, addr: u64, data: &[u8]) -> Result<(), BootError> {
    mem.write(addr, data)
        .map_err(|u| BootError::Unbacked(u.gpa))
}

/// The highest `size`-byte, `align`-aligned RAM range within one region of `regions`
/// that ends at or below `limit` and starts at or above `floor`.
fn place_high(regions: &[E820Entry], size: u64, align: u64, floor: u64, limit: u64) -> Option<u64> {
    regions
        .iter()
        .filter(|r| r.typ == e820::RAM)
        .filter_map(|r| {
            let end = (r.addr.checked_add(r.size)?).min(limit);
            let start = end.checked_sub(size)? & !(align - 1);
            (start >= r.addr.max(floor)).then_some(start)
        })
        .max()
}

fn in_ram(regions: &[E820Entry], addr: u64, size: u64) -> bool {
    regions.iter().any(|r| {
        r.typ == e820::RAM
            && addr >= r.addr
            && addr.saturating_add(size) <= r.addr.saturating_add(r.size)
    })
}

/// Loads a checked kernel, its command line and initrd into guest memory laid out as
/// `regions` (which become the e820 map), with the page tables and GDT for the 64-bit
/// entry.
pub fn load<M: GuestMemory + ?Sized>(
    mem: &mut M,
    image: &BzImage<'_>,
    regions: &[E820Entry],
    cmdline: &[u8],
    initrd: Option<&[u8]>,
) -> Result<BootInfo, BootError> {
    if regions.len() > E820_MAX {
        return Err(BootError::TooManyRegions(regions.len()));
    }
    let hdr = image.header;
    // The kernel.
    let load_addr = image.load_addr();
    if !in_ram(regions, load_addr, image.init_size()) {
        return Err(BootError::DoesNotFit {
            what: "kernel",
            addr: load_addr,
            size: image.init_size(),
        });
    }
    put(mem, load_addr, image.kernel)?;

    // The command line, NUL-terminated.
    let max = (hdr.cmdline_size as usize).saturating_add(1);
    if cmdline.len() + 1 > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len() + 1,
            max,
        });
    }
    put(mem, CMDLINE_ADDR, cmdline)?;
    put(mem, CMDLINE_ADDR + cmdline.len() as u64, &[0])?;

    // The zero page.
    let mut bp = BootParams::zeroed();
    let mut hb = [0u8; SetupHeader::SIZE];
    let n = image.header_bytes.len().min(SetupHeader::SIZE);
    hb[..n].copy_from_slice(&image.header_bytes[..n]);
    let mut h = SetupHeader::get(&hb);
    h.type_of_loader = 0xff;
    h.cmd_line_ptr = CMDLINE_ADDR as u32;
    bp.ext_cmd_line_ptr = (CMDLINE_ADDR >> 32) as u32;

    // The initrd: as high as the kernel allows, clear of the kernel.
    let mut placed = None;
    if let Some(rd) = initrd.filter(|rd| !rd.is_empty()) {
        let size = rd.len() as u64;
        let limit = if hdr.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G != 0 {
            u64::MAX
        } else {
            u64::from(hdr.initrd_addr_max) + 1
        };
        let floor = load_addr + image.init_size();
        let at = place_high(regions, size, 0x1000, floor, limit).ok_or(BootError::DoesNotFit {
            what: "initrd",
            addr: floor,
            size,
        })?;
        put(mem, at, rd)?;
        h.ramdisk_image = at as u32;
        h.ramdisk_size = size as u32;
        bp.ext_ramdisk_image = (at >> 32) as u32;
        bp.ext_ramdisk_size = (size >> 32) as u32;
        placed = Some((at, size));
    }
    bp.hdr = h;
    for (i, r) in regions.iter().enumerate() {
        bp.set_e820(i, *r);
    }
    bp.e820_entries = regions.len() as u8;
    let mut page = [0u8; BootParams::SIZE];
    bp.write_to(&mut page);
    put(mem, ZERO_PAGE_ADDR, &page)?;

    write_gdt(mem)?;
    write_page_tables(mem)?;
    Ok(BootInfo {
        entry: load_addr + 0x200,
        zero_page: ZERO_PAGE_ADDR,
        cr3: PML4_ADDR,
        initrd: placed,
    })
}

/// Writes the GDT and the identity page tables of the 64-bit entry (what [`load`] puts
/// below 1 MiB besides the zero page and the command line), for other guests entered
/// the same way ([`entry_state`] with a [`BootInfo`] whose `cr3` is [`PML4_ADDR`]).
pub fn write_entry_tables<M: GuestMemory + ?Sized>(mem: &mut M) -> Result<(), BootError> {
    write_gdt(mem)?;
    write_page_tables(mem)
}

/// The GDT: null, null, `__BOOT_CS` (64-bit code), `__BOOT_DS` (flat data).
pub const GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

fn write_gdt<M: GuestMemory + ?Sized>(mem: &mut M) -> Result<(), BootError> {
    let mut b = [0u8; 32];
    for (i, d) in GDT.iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&d.to_le_bytes());
    }
    put(mem, GDT_ADDR, &b)
}

/// Identity page tables for the low 4 GiB: PML4 → PDPT → four page directories of
/// 2-MiB pages (present, writable).
fn write_page_tables<M: GuestMemory + ?Sized>(mem: &mut M) -> Result<(), BootError> {
    put(mem, PML4_ADDR, &(PDPT_ADDR | 3).to_le_bytes())?;
    let mut pdpt = [0u8; 4096];
    for i in 0..4u64 {
        pdpt[i as usize * 8..][..8].copy_from_slice(&((PD_ADDR + i * 0x1000) | 3).to_le_bytes());
    }
    put(mem, PDPT_ADDR, &pdpt)?;
    let mut pd = [0u8; 4096];
    for d in 0..4u64 {
        for i in 0..512u64 {
            let e = ((d * 512 + i) << 21) | 0x83;
            pd[i as usize * 8..][..8].copy_from_slice(&e.to_le_bytes());
        }
        put(mem, PD_ADDR + d * 0x1000, &pd)?;
    }
    Ok(())
}

/// Sets `regs` up for the 64-bit entry: long mode with paging on the identity tables,
/// CS = `__BOOT_CS`, the data segments `__BOOT_DS`, interrupts off, RSI at the zero
/// page, RIP at the entry; marks everything it set in the MTD.
pub fn entry_state(regs: &mut ArchState, info: &BootInfo) {
    let code = Segment {
        sel: BOOT_CS,
        ar: 0x9b | bits::AR_L | 0x800, // present, DPL 0, code, L, G
        limit: 0xffff_ffff,
        base: 0,
    };
    let data = Segment {
        sel: BOOT_DS,
        ar: 0x93 | bits::AR_DB | 0x800,
        limit: 0xffff_ffff,
        base: 0,
    };
    regs.set_cs(code);
    regs.set_ss(data);
    regs.set_ds(data);
    regs.set_es(data);
    regs.set_fs(data);
    regs.set_gs(data);
    regs.set_gdtr(Segment {
        sel: 0,
        ar: 0,
        limit: (GDT.len() * 8 - 1) as u32,
        base: GDT_ADDR,
    });
    // VT-x enters a 64-bit guest only with a busy 64-bit TSS in TR (the reset state's
    // 16-bit TSS is refused) and an LDTR that is unusable or an LDT; Linux loads its own
    // before it needs them.
    regs.set_tr(Segment {
        sel: 0,
        ar: 0x8b,
        limit: 0x67,
        base: 0,
    });
    regs.set_ldtr(Segment::default());
    regs.set_idtr(Segment::default());
    regs.set_cr0(bits::CR0_PE | bits::CR0_PG | (1 << 4)); // ET
    regs.set_cr3(info.cr3);
    regs.set_cr4(bits::CR4_PAE);
    regs.set_efer(bits::EFER_LME | bits::EFER_LMA);
    regs.set_rflags(2);
    regs.set_rip(info.entry);
    let mut gprs = [0; 16];
    gprs[crate::vcpu::gpr::RSI] = info.zero_page;
    regs.set_gprs(gprs);
}
