//! The platform under a vCPU model: the one trait the VMM needs from below.
//!
//! `nul/vmm` implements [`Platform`] on the hypervisor (guest memory mapped into the
//! VMM, the register file from the exit portal's UTCB, injection through the reply's
//! MTD, a timeout for the timers); the tests implement it on a byte vector. The
//! register file is the ABI's [`ArchState`] itself, so state moves between the UTCB and
//! the vCPU model without translation. The VMM changes it only through
//! [`ArchState`]'s setters (`set_gpr`, `set_rip`, `advance`, `set_cr0`, `set_inj`, …),
//! which record each changed group in its `mtd`: that record is what a binding writes
//! back (the hypervisor's reply takes exactly those groups), so no change is lost to a
//! forgotten [`Mtd`] bit.
//!
//! The page-table walker ([`translate`]) follows the Intel SDM vol. 3A chapter 4
//! ("Paging"): 32-bit paging (§4.3, with PSE 4-MiB pages and PSE-36), PAE paging (§4.4),
//! 4-level and 5-level paging (§4.5) with 2-MiB and 1-GiB pages, and the page-fault
//! error code of §4.7. It checks present, write (with CR0.WP), user and no-execute; it
//! neither sets accessed/dirty bits (the instruction being emulated already caused the
//! CPU to walk and set them) nor models SMEP/SMAP, protection keys or reserved
//! physical-address bits.

pub use peregrine_abi::mtd::Mtd;
pub use peregrine_abi::utcb::{changed_groups, gpr, gpr_mtd, ArchState, Segment};

/// Control register, EFER and RFLAGS bits the VMM looks at (SDM vol. 3A §2.5, §2.2.1).
pub mod bits {
    /// CR0.PE: protected mode.
    pub const CR0_PE: u64 = 1 << 0;
    /// CR0.WP: supervisor writes honour read-only pages.
    pub const CR0_WP: u64 = 1 << 16;
    /// CR0.TS (task switched).
    pub const CR0_TS: u64 = 1 << 3;
    /// CR0.PG: paging.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4.PSE: 4-MiB pages with 32-bit paging.
    pub const CR4_PSE: u64 = 1 << 4;
    /// CR4.PAE: physical address extension.
    pub const CR4_PAE: u64 = 1 << 5;
    /// CR4.LA57: 5-level paging.
    pub const CR4_LA57: u64 = 1 << 12;
    /// EFER.LME: long mode enable.
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER.LMA: long mode active.
    pub const EFER_LMA: u64 = 1 << 10;
    /// EFER.NXE: no-execute enable.
    pub const EFER_NXE: u64 = 1 << 11;
    /// RFLAGS.CF.
    pub const CF: u64 = 1 << 0;
    /// RFLAGS.PF.
    pub const PF: u64 = 1 << 2;
    /// RFLAGS.AF.
    pub const AF: u64 = 1 << 4;
    /// RFLAGS.ZF.
    pub const ZF: u64 = 1 << 6;
    /// RFLAGS.SF.
    pub const SF: u64 = 1 << 7;
    /// RFLAGS.IF.
    pub const IF: u64 = 1 << 9;
    /// RFLAGS.DF.
    pub const DF: u64 = 1 << 10;
    /// RFLAGS.OF.
    pub const OF: u64 = 1 << 11;
    /// RFLAGS.VM: virtual-8086 mode.
    pub const VM: u64 = 1 << 17;
    /// The arithmetic flags.
    pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
    /// Segment access rights (compressed form): 64-bit code segment.
    pub const AR_L: u16 = 1 << 9;
    /// Segment access rights (compressed form): default operand size 32 bits.
    pub const AR_DB: u16 = 1 << 10;
}

/// Exception vectors (SDM vol. 3A table 6-1).
pub mod vector {
    /// Invalid opcode.
    pub const UD: u8 = 6;
    /// General protection.
    pub const GP: u8 = 13;
    /// Page fault.
    pub const PF: u8 = 14;
}

/// Page size.
pub const PAGE_SIZE: u64 = 4096;

/// A guest-physical range no RAM backs: MMIO, or nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unbacked {
    /// The first address of the access that is not RAM.
    pub gpa: u64,
}

/// Guest RAM by guest-physical address.
pub trait GuestMemory {
    /// Reads `buf.len()` bytes at `gpa`; fails if any of them is not RAM.
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), Unbacked>;
    /// Writes `buf` at `gpa`; fails (writing nothing) if any of it is not RAM.
    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Unbacked>;
    /// Reads the little-endian value of `size` bytes (4 or 8) at `gpa`, a multiple of
    /// `size`: a page-table entry. Memory that can read it in one access says so here.
    fn read_entry(&mut self, gpa: u64, size: usize) -> Result<u64, Unbacked> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b[..size.min(8)])?;
        Ok(u64::from_le_bytes(b))
    }
}

/// An event to deliver to the guest at the next VM entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// An external interrupt with this vector.
    Interrupt(u8),
    /// A non-maskable interrupt.
    Nmi,
    /// A hardware exception, with its error code if the vector has one.
    Exception {
        /// Vector (0–31).
        vector: u8,
        /// Error code.
        error: Option<u32>,
    },
}

impl Event {
    /// The event in the VMX entry-interruption format (SDM vol. 3C §24.8.3) that
    /// [`ArchState::inj_info`] carries, and its error code.
    pub fn encode(self) -> (u64, u64) {
        const VALID: u64 = 1 << 31;
        const ERROR_VALID: u64 = 1 << 11;
        match self {
            Event::Interrupt(v) => (VALID | v as u64, 0),
            Event::Nmi => (VALID | (2 << 8) | 2, 0),
            Event::Exception { vector, error } => {
                let info = VALID | (3 << 8) | vector as u64;
                match error {
                    Some(e) => (info | ERROR_VALID, e as u64),
                    None => (info, 0),
                }
            }
        }
    }
}

/// What the VMM needs from the platform for one vCPU.
pub trait Platform: GuestMemory {
    /// The register file as of the exit, with the VMM's changes.
    fn regs(&self) -> &ArchState;
    /// The register file, to change through its setters, which record in its `mtd`
    /// what changed: the record tells the binding what to write back into the vCPU
    /// (cleared before an exit's handler runs, read after).
    fn regs_mut(&mut self) -> &mut ArchState;
    /// Queues `event` for the next entry (one at a time: a second replaces the first).
    fn inject(&mut self, event: Event) {
        let (info, error) = event.encode();
        let r = self.regs_mut();
        r.set_inj((r.inj_info & !0xffff_ffff) | info, error);
    }
    /// The VM's monotonic time in nanoseconds.
    fn now_ns(&self) -> u64;
    /// Arms (or with `None` disarms) the vCPU's one timer: the VMM's timer devices are
    /// updated when it expires.
    fn set_timer(&mut self, deadline_ns: Option<u64>);
}

/// Whether the vCPU is in long mode (64-bit or compatibility).
pub fn long_mode(regs: &ArchState) -> bool {
    regs.efer & bits::EFER_LMA != 0
}

/// The size of code the vCPU executes now: 16, 32 or 64 bits.
pub fn code_bits(regs: &ArchState) -> u32 {
    if regs.cr0 & bits::CR0_PE == 0 || regs.rflags & bits::VM != 0 {
        16
    } else if long_mode(regs) && regs.cs.ar & bits::AR_L != 0 {
        64
    } else if regs.cs.ar & bits::AR_DB != 0 {
        32
    } else {
        16
    }
}

/// The privilege level: SS.DPL (which VMX and SVM both keep equal to the CPL).
pub fn cpl(regs: &ArchState) -> u8 {
    if regs.cr0 & bits::CR0_PE == 0 {
        0
    } else if regs.rflags & bits::VM != 0 {
        3
    } else {
        ((regs.ss.ar >> 5) & 3) as u8
    }
}

/// The paging mode from CR0, CR4 and EFER (SDM vol. 3A §4.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    /// Paging off: linear addresses are physical (truncated to 32 bits).
    None,
    /// 32-bit paging, two levels of 1024 four-byte entries.
    Bits32,
    /// PAE paging: four PDPTEs, then two levels of 512 eight-byte entries.
    Pae,
    /// 4-level paging.
    Level4,
    /// 5-level paging.
    Level5,
}

/// The vCPU's paging mode.
pub fn paging_mode(regs: &ArchState) -> PagingMode {
    Paging::from(regs).mode()
}

/// What a page walk needs of the vCPU's state: CR0, CR3, CR4 and EFER (four words,
/// where [`ArchState`] is hundreds of bytes: the emulator copies these, not that).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Paging {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

impl From<&ArchState> for Paging {
    fn from(r: &ArchState) -> Paging {
        Paging {
            cr0: r.cr0,
            cr3: r.cr3,
            cr4: r.cr4,
            efer: r.efer,
        }
    }
}

impl Paging {
    /// The paging mode (as [`paging_mode`]).
    pub fn mode(&self) -> PagingMode {
        if self.cr0 & bits::CR0_PG == 0 {
            PagingMode::None
        } else if self.cr4 & bits::CR4_PAE == 0 {
            PagingMode::Bits32
        } else if self.efer & bits::EFER_LMA == 0 {
            PagingMode::Pae
        } else if self.cr4 & bits::CR4_LA57 != 0 {
            PagingMode::Level5
        } else {
            PagingMode::Level4
        }
    }
}

/// The kind of access a translation is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// A write.
    pub write: bool,
    /// An instruction fetch.
    pub fetch: bool,
    /// A user-mode (CPL 3) access.
    pub user: bool,
}

impl Access {
    /// A supervisor data read.
    pub const READ: Access = Access {
        write: false,
        fetch: false,
        user: false,
    };
    /// A supervisor data write.
    pub const WRITE: Access = Access {
        write: true,
        fetch: false,
        user: false,
    };
    /// A supervisor instruction fetch.
    pub const FETCH: Access = Access {
        write: false,
        fetch: true,
        user: false,
    };

    /// This access made by the vCPU at its current privilege level.
    pub fn at_cpl(self, regs: &ArchState) -> Access {
        Access {
            user: cpl(regs) == 3,
            ..self
        }
    }
}

/// Why a guest-virtual access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The guest's page tables refuse it: the VMM injects #PF with CR2 = `addr`.
    PageFault {
        /// Faulting linear address.
        addr: u64,
        /// Page-fault error code (SDM vol. 3A §4.7).
        error: u32,
    },
    /// A page-table entry or the data lies in guest-physical space no RAM backs.
    Unbacked(Unbacked),
}

const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
const PTE_NX: u64 = 1 << 63;
/// Physical-address bits of an 8-byte entry (MAXPHYADDR 52).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translates guest-virtual (linear) address `gva` to guest-physical for `access`,
/// walking the guest's page tables in guest memory. `regs`: an [`ArchState`] or its
/// [`Paging`] part.
pub fn translate<M: GuestMemory + ?Sized>(
    mem: &mut M,
    regs: impl Into<Paging>,
    gva: u64,
    access: Access,
) -> Result<u64, Fault> {
    let regs: Paging = regs.into();
    let mode = regs.mode();
    let gva = if regs.efer & bits::EFER_LMA != 0 {
        gva
    } else {
        gva & 0xffff_ffff
    };
    let nxe = regs.efer & bits::EFER_NXE != 0 && mode != PagingMode::Bits32;
    let pf = |present: bool, rsvd: bool| Fault::PageFault {
        addr: gva,
        error: present as u32
            | (access.write as u32) << 1
            | (access.user as u32) << 2
            | (rsvd as u32) << 3
            | ((access.fetch && nxe) as u32) << 4,
    };
    let read_entry = |mem: &mut M, addr: u64, size: usize| -> Result<u64, Fault> {
        mem.read_entry(addr, size).map_err(Fault::Unbacked)
    };

    // Per mode: the first table, the shift of the first level's index, and the entry
    // format (8-byte entries with 9 index bits, or 4-byte ones with 10).
    let (mut table, mut shift, wide) = match mode {
        PagingMode::None => return Ok(gva),
        PagingMode::Bits32 => (regs.cr3 & 0xffff_f000, 22, false),
        PagingMode::Pae => {
            let pdpte = read_entry(mem, (regs.cr3 & 0xffff_ffe0) + ((gva >> 30) & 3) * 8, 8)?;
            if pdpte & PTE_P == 0 {
                return Err(pf(false, false));
            }
            (pdpte & ADDR_MASK, 21, true)
        }
        PagingMode::Level4 => (regs.cr3 & ADDR_MASK, 39, true),
        PagingMode::Level5 => (regs.cr3 & ADDR_MASK, 48, true),
    };
    let (step, index_mask, entry_size, addr_mask) = if wide {
        (9, 0x1ff, 8, ADDR_MASK)
    } else {
        (10, 0x3ff, 4, 0xffff_f000)
    };
    // Large pages: PS is honoured in the PDPTE and PDE (wide) and, with CR4.PSE, in the
    // 32-bit PDE; in a PML4E or PML5E it is reserved; else it is ignored.
    let ps_max = if !wide && regs.cr4 & bits::CR4_PSE == 0 {
        0
    } else {
        30
    };
    // The AND of every level's R/W and U/S bits, the OR of their XD bits (a 4-byte entry
    // has none).
    let (mut all, mut any) = (PTE_RW | PTE_US, 0);
    loop {
        let entry = read_entry(
            mem,
            table + ((gva >> shift) & index_mask) * entry_size,
            entry_size as usize,
        )?;
        if entry & PTE_P == 0 {
            return Err(pf(false, false));
        }
        if entry & PTE_NX != 0 && !nxe {
            return Err(pf(true, true));
        }
        all &= entry;
        any |= entry;
        let large = shift > 12 && entry & PTE_PS != 0;
        if large && wide && shift > 30 {
            return Err(pf(true, true)); // PS is reserved in PML4E/PML5E
        }
        if shift == 12 || (large && shift <= ps_max) {
            let page_mask = (1u64 << shift) - 1;
            let frame = if !wide && shift > 12 {
                // PSE-36: PDE bits 20:13 are physical-address bits 39:32.
                (entry & 0xffc0_0000) | ((entry >> 13) & 0xff) << 32
            } else {
                entry & addr_mask & !page_mask
            };
            if access.user && all & PTE_US == 0
                || access.write
                    && all & PTE_RW == 0
                    && (access.user || regs.cr0 & bits::CR0_WP != 0)
                || access.fetch && any & PTE_NX != 0
            {
                return Err(pf(true, false));
            }
            return Ok(frame | (gva & page_mask));
        }
        table = entry & addr_mask;
        shift -= step;
    }
}

/// Reads `buf.len()` bytes at guest-virtual `gva`, page by page.
pub fn read_virt<M: GuestMemory + ?Sized>(
    mem: &mut M,
    regs: impl Into<Paging>,
    gva: u64,
    buf: &mut [u8],
    access: Access,
) -> Result<(), Fault> {
    let regs: Paging = regs.into();
    let mut done = 0;
    while done < buf.len() {
        let va = gva.wrapping_add(done as u64);
        let chunk = (PAGE_SIZE - (va & (PAGE_SIZE - 1))).min((buf.len() - done) as u64) as usize;
        let pa = translate(mem, regs, va, access)?;
        mem.read(pa, &mut buf[done..done + chunk])
            .map_err(Fault::Unbacked)?;
        done += chunk;
    }
    Ok(())
}

/// Writes `buf` at guest-virtual `gva`, page by page (translating every page before
/// writing any, so a fault writes nothing).
pub fn write_virt<M: GuestMemory + ?Sized>(
    mem: &mut M,
    regs: impl Into<Paging>,
    gva: u64,
    buf: &[u8],
    access: Access,
) -> Result<(), Fault> {
    let regs: Paging = regs.into();
    let access = Access {
        write: true,
        ..access
    };
    let second = gva.wrapping_add(buf.len() as u64).wrapping_sub(1);
    let split = (PAGE_SIZE - (gva & (PAGE_SIZE - 1))).min(buf.len() as u64) as usize;
    let pa0 = translate(mem, regs, gva, access)?;
    if split < buf.len() {
        let pa1 = translate(mem, regs, second & !(PAGE_SIZE - 1), access)?;
        mem.write(pa0, &buf[..split]).map_err(Fault::Unbacked)?;
        return mem.write(pa1, &buf[split..]).map_err(Fault::Unbacked);
    }
    mem.write(pa0, buf).map_err(Fault::Unbacked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::MockVcpu;

    /// The fields of [`ArchState`]: the register file.
    const REGISTER_FILE: &[&str] = &[
        "mtd",
        "inst_len",
        "rip",
        "rflags",
        "intr_state",
        "actv_state",
        "inj_info",
        "inj_error",
        "gpr",
        "qual",
        "ctrl",
        "tsc_val",
        "tsc_off",
        "cr0",
        "cr2",
        "cr3",
        "cr4",
        "cr8",
        "efer",
        "pat",
        "xcr0",
        "dr7",
        "sysenter_cs",
        "sysenter_esp",
        "sysenter_eip",
        "star",
        "lstar",
        "cstar",
        "fmask",
        "kernel_gs_base",
        "es",
        "cs",
        "ss",
        "ds",
        "fs",
        "gs",
        "ldtr",
        "tr",
        "gdtr",
        "idtr",
        "pdpte",
        "dr6",
    ];

    /// Whether `line` assigns to a register-file field (`x.rip = `, `x.gpr[i] |= `,
    /// `x.fs.base = `, …).
    fn writes_register(line: &str) -> bool {
        let b = line.as_bytes();
        let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        for (at, _) in line.match_indices('.') {
            let name_end = b[at + 1..]
                .iter()
                .position(|&c| !ident(c))
                .map_or(b.len(), |n| at + 1 + n);
            if at == 0 || !REGISTER_FILE.contains(&&line[at + 1..name_end]) {
                continue;
            }
            let mut i = name_end;
            if b.get(i) == Some(&b'[') {
                match line[i..].find(']') {
                    Some(n) => i += n + 1,
                    None => continue,
                }
            }
            if b.get(i) == Some(&b'.') {
                i += 1;
                while b.get(i).is_some_and(|&c| ident(c)) {
                    i += 1;
                }
            }
            let rest = line[i..].trim_start();
            let assigns = ["|=", "&=", "^=", "+=", "-="]
                .iter()
                .any(|op| rest.starts_with(op))
                || (rest.starts_with('=') && !rest.starts_with("=="));
            if assigns {
                return true;
            }
        }
        false
    }

    /// The library changes the register file only through [`ArchState`]'s setters,
    /// which record every change in the MTD: no line outside the tests assigns to one
    /// of its fields.
    #[test]
    fn the_register_file_changes_only_through_setters() {
        for (line, yes) in [
            ("regs.rip = 5;", true),
            ("r.gpr[gpr::RAX] |= 1;", true),
            ("r.fs.base = v;", true),
            ("self.regs.mtd = Mtd::empty();", true),
            ("if r.rip == 3 {", false),
            ("regs.set_rip(r.rip + 1);", false),
            ("self.ripple = 1;", false),
        ] {
            assert_eq!(writes_register(line), yes, "{line}");
        }
        fn visit(dir: &std::path::Path, bad: &mut std::vec::Vec<std::string::String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let path = e.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if path.is_dir() {
                    visit(&path, bad);
                    continue;
                }
                if !name.ends_with(".rs") || name == "tests.rs" || name == "testutil.rs" {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                // Up to the inline test module, if any.
                let code = text.split("#[cfg(test)]\nmod tests {").next().unwrap_or("");
                for (n, line) in code.lines().enumerate() {
                    let line = line.trim_start();
                    if !line.starts_with("//") && writes_register(line) {
                        bad.push(std::format!("{}:{}: {line}", path.display(), n + 1));
                    }
                }
            }
        }
        let mut bad = std::vec::Vec::new();
        visit(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut bad,
        );
        assert!(
            bad.is_empty(),
            "use ArchState's setters:\n{}",
            bad.join("\n")
        );
    }

    fn paged(mode: PagingMode) -> MockVcpu {
        let mut v = MockVcpu::new(0x40_0000);
        let r = &mut v.regs;
        r.cr0 = bits::CR0_PE | bits::CR0_PG | bits::CR0_WP;
        match mode {
            PagingMode::Bits32 => r.cr4 = bits::CR4_PSE,
            PagingMode::Pae => r.cr4 = bits::CR4_PAE,
            PagingMode::Level4 => {
                r.cr4 = bits::CR4_PAE;
                r.efer = bits::EFER_LME | bits::EFER_LMA | bits::EFER_NXE;
            }
            _ => unreachable!(),
        }
        r.cr3 = 0x1000;
        v
    }

    #[test]
    fn no_paging_is_identity_within_4g() {
        let mut v = MockVcpu::new(0x1000);
        let r = v.regs;
        assert_eq!(paging_mode(&r), PagingMode::None);
        assert_eq!(
            translate(&mut v, &r, 0x1_2345_6789, Access::WRITE),
            Ok(0x2345_6789)
        );
    }

    #[test]
    fn four_level_walk_with_2m_1g_and_4k_pages() {
        let mut v = paged(PagingMode::Level4);
        // PML4[0] -> PDPT at 0x2000; PDPT[0] -> PD at 0x3000; PDPT[1]: 1-GiB page at 0.
        v.put_u64(0x1000, 0x2000 | 0x7);
        v.put_u64(0x2000, 0x3000 | 0x7);
        v.put_u64(0x2008, 0x4000_0000 | 0x83);
        // PD[0] -> PT at 0x4000; PD[1]: 2-MiB page at 0x20_0000, read-only.
        v.put_u64(0x3000, 0x4000 | 0x7);
        v.put_u64(0x3008, 0x20_0000 | 0x81);
        // PT[5]: 4-KiB page at 0x5000, NX.
        v.put_u64(0x4000 + 5 * 8, 0x5000 | 0x3 | PTE_NX);
        let r = v.regs;
        assert_eq!(paging_mode(&r), PagingMode::Level4);
        assert_eq!(translate(&mut v, &r, 0x5123, Access::WRITE), Ok(0x5123));
        assert_eq!(
            translate(&mut v, &r, 0x2f_fff8, Access::READ),
            Ok(0x2f_fff8)
        );
        assert_eq!(
            translate(&mut v, &r, 0x4123_4567, Access::READ),
            Ok(0x4123_4567)
        );
        // Read-only 2-MiB page, CR0.WP set: supervisor write faults (present, write).
        assert_eq!(
            translate(&mut v, &r, 0x20_0010, Access::WRITE),
            Err(Fault::PageFault {
                addr: 0x20_0010,
                error: 0b11
            })
        );
        // NX page fetched: present, instruction fetch.
        assert_eq!(
            translate(&mut v, &r, 0x5000, Access::FETCH),
            Err(Fault::PageFault {
                addr: 0x5000,
                error: 0x11
            })
        );
        // User access to a supervisor page (PT entry lacks U/S).
        let user = Access {
            user: true,
            ..Access::READ
        };
        assert_eq!(
            translate(&mut v, &r, 0x5000, user),
            Err(Fault::PageFault {
                addr: 0x5000,
                error: 0b101
            })
        );
        // Not present.
        assert_eq!(
            translate(&mut v, &r, 0x6000, Access::READ),
            Err(Fault::PageFault {
                addr: 0x6000,
                error: 0
            })
        );
        // Tables outside RAM.
        v.put_u64(0x1008, 0x8000_0000 | 0x7);
        assert_eq!(
            translate(&mut v, &r, 0x80_0000_0000, Access::READ),
            Err(Fault::Unbacked(Unbacked { gpa: 0x8000_0000 }))
        );
    }

    #[test]
    fn nx_bit_without_nxe_is_reserved() {
        let mut v = paged(PagingMode::Level4);
        v.regs.efer &= !bits::EFER_NXE;
        v.put_u64(0x1000, 0x2000 | 0x7 | PTE_NX);
        let r = v.regs;
        assert_eq!(
            translate(&mut v, &r, 0x10, Access::READ),
            Err(Fault::PageFault {
                addr: 0x10,
                error: 0b1001
            })
        );
    }

    #[test]
    fn pae_walk_uses_the_pdpte_from_cr3() {
        let mut v = paged(PagingMode::Pae);
        v.regs.cr3 = 0x1020; // 32-byte aligned PDPT
        v.put_u64(0x1020 + 3 * 8, 0x2000 | 1); // PDPTE[3] -> PD at 0x2000
        v.put_u64(0x2000 + 8, 0x3000 | 0x3); // PD[1] -> PT at 0x3000
        v.put_u64(0x3000 + 2 * 8, 0x7000 | 0x3); // PT[2]
        v.put_u64(0x2000, 0x60_0000 | 0x83); // PD[0]: 2-MiB page
        let r = v.regs;
        let va = 0xc000_0000 | (1 << 21) | (2 << 12) | 0x345;
        assert_eq!(translate(&mut v, &r, va, Access::WRITE), Ok(0x7345));
        assert_eq!(
            translate(&mut v, &r, 0xc01f_0000, Access::READ),
            Ok(0x7f_0000)
        );
        // PDPTE[0] not present.
        assert!(matches!(
            translate(&mut v, &r, 0x1000, Access::READ),
            Err(Fault::PageFault { error: 0, .. })
        ));
    }

    #[test]
    fn legacy_32bit_walk_with_pse_and_pse36() {
        let mut v = paged(PagingMode::Bits32);
        v.put_u32(0x1000 + 4, 0x2000 | 0x7); // PDE[1] -> PT at 0x2000
        v.put_u32(0x2000 + 3 * 4, 0x9000 | 0x7); // PTE[3]
        v.put_u32(0x1000 + 8, 0x80_0000 | 0x83 | (0x3 << 13)); // PDE[2]: 4 MiB, PSE-36 0x3
        let r = v.regs;
        assert_eq!(paging_mode(&r), PagingMode::Bits32);
        assert_eq!(translate(&mut v, &r, 0x40_3abc, Access::WRITE), Ok(0x9abc));
        assert_eq!(
            translate(&mut v, &r, 0x81_2345, Access::READ),
            Ok(0x3_0081_2345)
        );
        // Without PSE the PS bit is ignored: PDE[2] points at a page table at 0x80_0000.
        v.regs.cr4 = 0;
        let r = v.regs;
        assert_eq!(
            translate(&mut v, &r, 0x81_2345, Access::READ),
            Err(Fault::Unbacked(Unbacked {
                gpa: 0x80_6000 + 0x12 * 4
            }))
        );
        // A read-only page with CR0.WP clear: supervisor writes pass, user writes fault.
        v.put_u32(0x2000 + 3 * 4, 0x9000 | 0x5);
        v.regs.cr0 &= !bits::CR0_WP;
        let r = v.regs;
        assert_eq!(translate(&mut v, &r, 0x40_3000, Access::WRITE), Ok(0x9000));
        let uw = Access {
            user: true,
            ..Access::WRITE
        };
        assert_eq!(
            translate(&mut v, &r, 0x40_3000, uw),
            Err(Fault::PageFault {
                addr: 0x40_3000,
                error: 0b111
            })
        );
    }

    #[test]
    fn virtual_reads_and_writes_cross_pages() {
        let mut v = paged(PagingMode::Level4);
        v.put_u64(0x1000, 0x2000 | 0x7);
        v.put_u64(0x2000, 0x3000 | 0x7);
        v.put_u64(0x3000, 0x4000 | 0x7);
        // Virtual pages 0 and 1 map to physical 0x9000 and 0x6000 (not contiguous).
        v.put_u64(0x4000, 0x9000 | 0x3);
        v.put_u64(0x4008, 0x6000 | 0x1);
        let r = v.regs;
        write_virt(&mut v, &r, 0xffe, &[1, 2, 3, 4], Access::READ).unwrap_err();
        assert_eq!(
            v.mem[0x9ffe], 0,
            "a fault on the second page writes nothing"
        );
        v.put_u64(0x4008, 0x6000 | 0x3);
        write_virt(&mut v, &r, 0xffe, &[1, 2, 3, 4], Access::READ).unwrap();
        assert_eq!(&v.mem[0x9ffe..0xa000], &[1, 2]);
        assert_eq!(&v.mem[0x6000..0x6002], &[3, 4]);
        let mut b = [0u8; 4];
        read_virt(&mut v, &r, 0xffe, &mut b, Access::READ).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
    }

    #[test]
    fn modes_and_injection() {
        let mut v = MockVcpu::new(0x1000);
        assert_eq!(code_bits(&v.regs), 16);
        v.regs.cr0 = bits::CR0_PE;
        v.regs.cs.ar = bits::AR_DB;
        assert_eq!(code_bits(&v.regs), 32);
        v.regs.efer = bits::EFER_LMA;
        v.regs.cs.ar = bits::AR_L;
        assert_eq!(code_bits(&v.regs), 64);
        v.regs.ss.ar = 0x93 | (3 << 5);
        assert_eq!(cpl(&v.regs), 3);
        assert!(Access::READ.at_cpl(&v.regs).user);

        v.inject(Event::Exception {
            vector: vector::GP,
            error: Some(0),
        });
        assert_eq!(v.regs.inj_info, 0x8000_0b0d);
        assert!(v.regs.mtd.contains(Mtd::INJ));
        v.inject(Event::Interrupt(0x30));
        assert_eq!((v.regs.inj_info, v.regs.inj_error), (0x8000_0030, 0));
        assert_eq!(Event::Nmi.encode(), (0x8000_0202, 0));
        assert_eq!(gpr_mtd(gpr::RDI), Mtd::GPR_BSD);
        assert_eq!(gpr_mtd(gpr::R9), Mtd::GPR_R8_R15);
        v.set_timer(Some(5));
        assert_eq!(v.timer, Some(5));
    }

    /// The page walk as it was written first (level by level, every level's format
    /// decided inside the loop): the differential test's reference.
    fn reference_translate<M: GuestMemory + ?Sized>(
        mem: &mut M,
        regs: impl Into<Paging>,
        gva: u64,
        access: Access,
    ) -> Result<u64, Fault> {
        let regs: Paging = regs.into();
        let mode = regs.mode();
        let gva = if regs.efer & bits::EFER_LMA != 0 {
            gva
        } else {
            gva & 0xffff_ffff
        };
        let nxe = regs.efer & bits::EFER_NXE != 0 && mode != PagingMode::Bits32;
        let pf = |present: bool, rsvd: bool| Fault::PageFault {
            addr: gva,
            error: present as u32
                | (access.write as u32) << 1
                | (access.user as u32) << 2
                | (rsvd as u32) << 3
                | ((access.fetch && nxe) as u32) << 4,
        };
        let read_entry = |mem: &mut M, addr: u64, size: usize| -> Result<u64, Fault> {
            mem.read_entry(addr, size).map_err(Fault::Unbacked)
        };

        let (levels, mut table, wide) = match mode {
            PagingMode::None => return Ok(gva),
            PagingMode::Bits32 => (2, regs.cr3 & 0xffff_f000, false),
            PagingMode::Pae => {
                let pdpte = read_entry(mem, (regs.cr3 & 0xffff_ffe0) + ((gva >> 30) & 3) * 8, 8)?;
                if pdpte & PTE_P == 0 {
                    return Err(pf(false, false));
                }
                (2, pdpte & ADDR_MASK, true)
            }
            PagingMode::Level4 => (4, regs.cr3 & ADDR_MASK, true),
            PagingMode::Level5 => (5, regs.cr3 & ADDR_MASK, true),
        };
        let (mut writable, mut user_ok, mut no_exec) = (true, true, false);
        for level in (1..=levels).rev() {
            let (shift, index_bits, entry_size) = if wide {
                (12 + 9 * (level - 1), 0x1ff, 8)
            } else {
                (12 + 10 * (level - 1), 0x3ff, 4)
            };
            let entry = read_entry(
                mem,
                table + ((gva >> shift) & index_bits) * entry_size,
                entry_size as usize,
            )?;
            if entry & PTE_P == 0 {
                return Err(pf(false, false));
            }
            if wide && entry & PTE_NX != 0 && !nxe {
                return Err(pf(true, true));
            }
            writable &= entry & PTE_RW != 0;
            user_ok &= entry & PTE_US != 0;
            no_exec |= wide && entry & PTE_NX != 0;
            let large = level > 1 && entry & PTE_PS != 0;
            if large && (level > 3 || (!wide && regs.cr4 & bits::CR4_PSE == 0)) {
                if wide {
                    return Err(pf(true, true)); // PS is reserved in PML4E/PML5E
                }
                // Without CR4.PSE the PS bit of a 32-bit PDE is ignored.
            } else if large || level == 1 {
                let page_mask = (1u64 << shift) - 1;
                let frame = if !wide && large {
                    // PSE-36: PDE bits 20:13 are physical-address bits 39:32.
                    (entry & 0xffc0_0000) | ((entry >> 13) & 0xff) << 32
                } else if wide {
                    entry & ADDR_MASK & !page_mask
                } else {
                    entry & 0xffff_f000
                };
                if access.user && !user_ok
                    || access.write && !writable && (access.user || regs.cr0 & bits::CR0_WP != 0)
                    || access.fetch && no_exec
                {
                    return Err(pf(true, false));
                }
                return Ok(frame | (gva & page_mask));
            }
            table = if wide {
                entry & ADDR_MASK
            } else {
                entry & 0xffff_f000
            };
        }
        unreachable!("the last level always maps a page")
    }

    /// Random page tables in every mode, random addresses and accesses: the walk gives
    /// what the reference gives (address, fault and error code alike).
    #[test]
    fn walk_matches_the_reference_walk() {
        let mut rng = crate::testutil::Rng::new(0x7a1c);
        for round in 0..400 {
            let mut v = MockVcpu::new(0x2_0000);
            // Tables among 32 pages; entries point into them or past RAM, with random
            // flags (P, R/W, U/S, PS, XD set often).
            for page in 0..32u64 {
                for e in 0..512u64 {
                    let target = if rng.below(8) == 0 {
                        0x4_0000
                    } else {
                        rng.below(32) << 12
                    };
                    let mut entry =
                        target | rng.below(2) << 22 | rng.below(4) << 13 | rng.below(0x200);
                    entry |= 1 | if rng.below(3) == 0 { 0 } else { 6 };
                    if rng.below(4) == 0 {
                        entry |= PTE_NX;
                    }
                    if rng.below(6) == 0 {
                        entry &= !1;
                    }
                    v.put_u64((page << 12) + e * 8, entry);
                }
            }
            let r = &mut v.regs;
            r.cr0 = bits::CR0_PE | bits::CR0_PG | if rng.below(2) == 0 { bits::CR0_WP } else { 0 };
            r.cr3 = rng.below(32) << 12 | rng.below(0x1000) & 0xfe0;
            r.cr4 = [
                0,
                bits::CR4_PSE,
                bits::CR4_PAE,
                bits::CR4_PAE | bits::CR4_LA57,
            ][round % 4];
            r.efer = if round % 4 >= 2 && rng.below(3) != 0 {
                bits::EFER_LME | bits::EFER_LMA
            } else {
                0
            } | if rng.below(2) == 0 { bits::EFER_NXE } else { 0 };
            if rng.below(10) == 0 {
                r.cr0 &= !bits::CR0_PG;
            }
            let regs = v.regs;
            for _ in 0..64 {
                let gva = rng.next_u64();
                let access = Access {
                    write: rng.below(2) == 0,
                    fetch: rng.below(3) == 0,
                    user: rng.below(2) == 0,
                };
                assert_eq!(
                    translate(&mut v, &regs, gva, access),
                    reference_translate(&mut v, &regs, gva, access),
                    "gva {gva:#x}, {access:?}, {:?}",
                    Paging::from(&regs)
                );
            }
        }
    }
}
