//! Multiboot v1 (the Multiboot Specification 0.6.96): an OS image loaded the way a
//! Multiboot boot loader loads it, and the vCPU state it is entered with.
//!
//! Facts from the specification: the header (§3.1.1, §3.1.2) lies 4-byte aligned
//! completely within the first 8192 bytes of the image: `magic` 0x1BADB002, `flags`,
//! `checksum` (the three sum to 0 mod 2^32), then the address fields `header_addr`,
//! `load_addr`, `load_end_addr`, `bss_end_addr`, `entry_addr` (valid if flags bit 16)
//! and the video fields (bit 2). Flags bits 0–15 are requirements a loader that does not
//! meet them must refuse the image for; bits 16–31 are optional. Bit 0 asks for modules
//! on 4-KiB boundaries, bit 1 for the memory information, bit 2 for the video mode
//! table. The address fields (§3.1.3): the file offset of the header corresponds to
//! `header_addr`, so the text starts at file offset
//! `header offset - (header_addr - load_addr)`; `load_end_addr` 0 means up to the end of
//! the file; `bss_end_addr` 0 means no bss, otherwise the loader zeroes up to it. The
//! machine state (§3.2): EAX = 0x2BADB002, EBX = the physical address of the
//! information structure, CS a 32-bit read/execute segment and DS, ES, FS, GS, SS 32-bit
//! read/write segments, all with base 0 and limit 0xFFFFFFFF, A20 on, CR0.PG clear and
//! CR0.PE set, EFLAGS.VM and EFLAGS.IF clear; the rest is undefined (the GDTR may be
//! invalid, there is no stack). The information structure (§3.3): `flags` says which
//! fields are valid; `mem_lower`/`mem_upper` (bit 0) in KiB from 0 and from 1 MiB;
//! `cmdline` (bit 2), a C string; `mods_count`/`mods_addr` (bit 3), an array of
//! 16-byte entries `mod_start`, `mod_end` (exclusive), `string`, reserved;
//! `mmap_length`/`mmap_addr` (bit 6), entries of `size` (of the rest, 20), `base_addr`,
//! `length`, `type` (1 available RAM); `boot_loader_name` (bit 9).
//!
//! The header and the information structure are a handful of little-endian 32-bit
//! words at fixed offsets: they are read and written here by hand. ELF program headers
//! are read with the `elf` crate.
//!
//! How images load: with flags bit 16 the address fields decide (whatever the file's
//! format, as GRUB 2 and QEMU do; Peregrine's own kernel, an ELF64 file, relies on it);
//! without it the file must be an ELF32 (i386) or ELF64 (x86-64) executable, whose
//! `PT_LOAD` segments go to their physical addresses (`p_paddr`), bss zeroed. An ELF
//! entry point inside a segment's virtual range is translated to its physical address
//! (a higher-half kernel's `e_entry`, as GRUB 2 does); else it must be a physical address
//! inside a segment. The entry must lie in a segment's file-backed bytes.
//!
//! Where things go in guest RAM: the information block at [`INFO_ADDR`] (64 KiB, below
//! the 640-KiB line, clear of the IVT, the BIOS data area and the pages below 0x9000
//! where kernels (Peregrine's among them) put their AP start-up code): the information
//! structure, a flat GDT matching the entry selectors, the memory map, the module
//! array, then the strings (the command line, the boot loader name "peregrine", the
//! module strings). The modules follow the image, each on a page boundary (whatever
//! flags bit 0 says), from the first page at or above 1 MiB that is past every segment
//! and the information block, in the RAM of the memory map, below 4 GiB (as QEMU and
//! GRUB place them, after the kernel). An image segment over the information block is
//! refused; modules cannot meet the image or the block by construction.
//!
//! Everything is checked before anything is written: a refused image leaves guest
//! memory as it was. (A write can still fail if the memory map names RAM the guest
//! memory does not back: [`MultibootError::Unbacked`].)
//!
//! Video (flags bit 2) is refused: the PC has no display, so the video mode
//! information the image requires cannot be given.

use alloc::vec::Vec;
use core::fmt;

use elf::abi::{EM_386, EM_X86_64, ET_DYN, ET_EXEC, PT_LOAD};
use elf::endian::LittleEndian;
use elf::file::Class;
use elf::ElfBytes;

use super::{e820, E820Entry};
use crate::vcpu::{bits, gpr, ArchState, GuestMemory, Segment};

/// The header's magic.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// EAX at entry: the loader is Multiboot compliant.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header lies completely within this many bytes from the start of the image.
pub const SEARCH_LIMIT: usize = 8192;
/// The boot loader name in the information structure.
pub const BOOT_LOADER_NAME: &[u8] = b"peregrine";
/// Where the information block starts.
pub const INFO_ADDR: u64 = 0x1_0000;
/// Module alignment.
pub const PAGE: u64 = 0x1000;
/// Modules start at or above this.
pub const MODULES_FLOOR: u64 = 0x10_0000;
/// Code selector at entry (the GDT in the information block has it).
pub const CODE_SEL: u16 = 0x08;
/// Data selector at entry.
pub const DATA_SEL: u16 = 0x10;
/// The GDT in the information block: null, flat 32-bit code, flat 32-bit data.
pub const GDT: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Header flags (§3.1.2).
pub mod header_flags {
    /// Modules on 4-KiB boundaries.
    pub const PAGE_ALIGN: u32 = 1 << 0;
    /// The memory information must be given.
    pub const MEMORY_INFO: u32 = 1 << 1;
    /// The video mode table must be given.
    pub const VIDEO_MODE: u32 = 1 << 2;
    /// The address fields are valid (a.out kludge).
    pub const ADDRESS_FIELDS: u32 = 1 << 16;
    /// The requirement bits: a loader refuses an image with one it does not know.
    pub const REQUIRED: u32 = 0xffff;
    /// The requirement bits this loader knows.
    pub const KNOWN_REQUIRED: u32 = PAGE_ALIGN | MEMORY_INFO | VIDEO_MODE;
}

/// Information structure flags (§3.3): what the structure this loader writes has.
pub mod info_flags {
    /// `mem_lower`, `mem_upper`.
    pub const MEMORY: u32 = 1 << 0;
    /// `cmdline`.
    pub const CMDLINE: u32 = 1 << 2;
    /// `mods_count`, `mods_addr`.
    pub const MODS: u32 = 1 << 3;
    /// `mmap_length`, `mmap_addr`.
    pub const MMAP: u32 = 1 << 6;
    /// `boot_loader_name`.
    pub const BOOT_LOADER_NAME: u32 = 1 << 9;
}

/// Field offsets in the information structure (§3.3).
pub mod info {
    /// `flags`.
    pub const FLAGS: usize = 0;
    /// `mem_lower` (KiB).
    pub const MEM_LOWER: usize = 4;
    /// `mem_upper` (KiB).
    pub const MEM_UPPER: usize = 8;
    /// `cmdline`.
    pub const CMDLINE: usize = 16;
    /// `mods_count`.
    pub const MODS_COUNT: usize = 20;
    /// `mods_addr`.
    pub const MODS_ADDR: usize = 24;
    /// `mmap_length`.
    pub const MMAP_LENGTH: usize = 44;
    /// `mmap_addr`.
    pub const MMAP_ADDR: usize = 48;
    /// `boot_loader_name`.
    pub const BOOT_LOADER_NAME: usize = 64;
    /// Room the structure takes (0.6.96 defines 88 bytes, later versions 116; the rest
    /// is zero).
    pub const SIZE: usize = 128;
    /// Bytes per memory map entry (the `size` field, 4, and the 20 it counts).
    pub const MMAP_ENTRY: usize = 24;
    /// Bytes per module entry.
    pub const MODULE_ENTRY: usize = 16;
}

/// Offset of the GDT in the information block.
const GDT_OFFSET: usize = info::SIZE;
/// Offset of the memory map in the information block.
const MMAP_OFFSET: usize = GDT_OFFSET + 32;

/// A part of what is loaded, as errors name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Area {
    /// Image segment *n* (program header order; the a.out-kludge image is segment 0).
    Segment(usize),
    /// The information block (structure, GDT, memory map, module array, strings).
    Info,
    /// Boot module *n*.
    Module(usize),
    /// The command line.
    CommandLine,
}

impl fmt::Display for Area {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Area::Segment(n) => write!(f, "image segment {n}"),
            Area::Info => write!(f, "the Multiboot information"),
            Area::Module(n) => write!(f, "module {n}"),
            Area::CommandLine => write!(f, "the command line"),
        }
    }
}

/// Why a Multiboot image was not loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MultibootError {
    /// No magic 0x1BADB002 at a 4-byte aligned offset in the first 8 KiB.
    NoHeader,
    /// magic + flags + checksum is not 0.
    BadChecksum {
        /// The header's file offset.
        offset: usize,
        /// Its flags.
        flags: u32,
        /// Its checksum.
        checksum: u32,
    },
    /// The header's fields run past the end of the file or the first 8 KiB.
    HeaderTruncated {
        /// The header's file offset.
        offset: usize,
        /// Bytes its flags make it.
        len: usize,
    },
    /// Requirement bits (0–15) this loader does not know.
    UnknownRequiredFlags {
        /// The unknown bits.
        bits: u32,
    },
    /// Flags bit 2: video mode information, which this PC (no display) cannot give.
    VideoModeRequired,
    /// The address fields do not fit the header's place in the file.
    BadHeaderAddr {
        /// `header_addr`.
        header_addr: u32,
        /// `load_addr`.
        load_addr: u32,
        /// The header's file offset.
        offset: usize,
    },
    /// `load_end_addr` below `load_addr`.
    BadLoadEnd {
        /// `load_addr`.
        load_addr: u32,
        /// `load_end_addr`.
        load_end_addr: u32,
    },
    /// `bss_end_addr` below the end of the loaded part.
    BadBssEnd {
        /// The end of the loaded part.
        load_end: u64,
        /// `bss_end_addr`.
        bss_end_addr: u32,
    },
    /// No address fields (flags bit 16) and not an ELF file.
    NotElf,
    /// An ELF file whose headers cannot be read (cut off or corrupt).
    BadElf,
    /// An ELF file for another machine (ELF32 must be i386, ELF64 x86-64).
    WrongMachine {
        /// 32 or 64.
        class: u8,
        /// `e_machine`.
        machine: u16,
    },
    /// An ELF file that is not an executable (`ET_EXEC` or `ET_DYN`).
    NotExecutable {
        /// `e_type`.
        e_type: u16,
    },
    /// A segment whose file size exceeds its memory size, or whose end overflows.
    BadSegment {
        /// Which.
        index: usize,
    },
    /// Nothing to load.
    NoSegments,
    /// The file ends before the bytes the image says to load.
    Truncated {
        /// Bytes the file must have.
        need: u64,
        /// Bytes it has.
        have: u64,
    },
    /// The entry point is not in the loaded bytes of a segment.
    EntryOutside {
        /// The entry point (after translation).
        entry: u64,
    },
    /// Something lies outside the RAM of the memory map below 4 GiB.
    OutsideRam {
        /// What.
        what: Area,
        /// Its address.
        addr: u64,
        /// Its size.
        size: u64,
    },
    /// Two things overlap.
    Overlap {
        /// What.
        what: Area,
        /// Its range.
        at: (u64, u64),
        /// What it overlaps.
        with: Area,
        /// The other's range.
        other: (u64, u64),
    },
    /// Something found no room in RAM (below 4 GiB).
    DoesNotFit {
        /// What.
        what: Area,
        /// Its size.
        size: u64,
    },
    /// A string passed to the guest holds a NUL byte.
    NulInString {
        /// Which.
        what: Area,
    },
    /// Writing guest memory failed at this address (the memory map names RAM the guest
    /// memory does not back).
    Unbacked(u64),
}

impl fmt::Display for MultibootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use MultibootError as E;
        match *self {
            E::NoHeader => write!(
                f,
                "no Multiboot header (magic {HEADER_MAGIC:#010x}, 4-byte aligned) in the \
                 first {SEARCH_LIMIT} bytes"
            ),
            E::BadChecksum {
                offset,
                flags,
                checksum,
            } => write!(
                f,
                "Multiboot header at offset {offset:#x}: bad checksum {checksum:#010x} for \
                 flags {flags:#010x} (magic + flags + checksum must be 0)"
            ),
            E::HeaderTruncated { offset, len } => write!(
                f,
                "Multiboot header at offset {offset:#x} ({len} bytes by its flags) runs past \
                 the end of the file or the first {SEARCH_LIMIT} bytes"
            ),
            E::UnknownRequiredFlags { bits } => write!(
                f,
                "Multiboot header requires features this loader does not know (flags \
                 {bits:#06x})"
            ),
            E::VideoModeRequired => write!(
                f,
                "Multiboot header requires video mode information (flags bit 2); this PC \
                 has no display"
            ),
            E::BadHeaderAddr {
                header_addr,
                load_addr,
                offset,
            } => write!(
                f,
                "Multiboot header_addr {header_addr:#x} and load_addr {load_addr:#x} do not \
                 fit the header's file offset {offset:#x} (need load_addr <= header_addr \
                 and header_addr - load_addr <= offset)"
            ),
            E::BadLoadEnd {
                load_addr,
                load_end_addr,
            } => write!(
                f,
                "Multiboot load_end_addr {load_end_addr:#x} is below load_addr {load_addr:#x}"
            ),
            E::BadBssEnd {
                load_end,
                bss_end_addr,
            } => write!(
                f,
                "Multiboot bss_end_addr {bss_end_addr:#x} is below the end of the loaded \
                 part {load_end:#x}"
            ),
            E::NotElf => write!(
                f,
                "no Multiboot address fields (flags bit 16) and not an ELF file"
            ),
            E::BadElf => write!(
                f,
                "the ELF headers cannot be read (file cut off or corrupt)"
            ),
            E::WrongMachine { class, machine } => write!(
                f,
                "ELF{class} file for machine {machine}, not {}",
                if class == 32 { "i386" } else { "x86-64" }
            ),
            E::NotExecutable { e_type } => {
                write!(f, "ELF file of type {e_type}, not an executable")
            }
            E::BadSegment { index } => write!(
                f,
                "ELF segment {index}: file size exceeds memory size, or its end overflows"
            ),
            E::NoSegments => write!(f, "the image has nothing to load"),
            E::Truncated { need, have } => write!(
                f,
                "image truncated: it loads {need} bytes of file, the file has {have}"
            ),
            E::EntryOutside { entry } => {
                write!(
                    f,
                    "entry point {entry:#x} is not in the image's loaded bytes"
                )
            }
            E::OutsideRam { what, addr, size } => write!(
                f,
                "{what} ({size:#x} bytes at {addr:#x}) is not in guest RAM below 4 GiB"
            ),
            E::Overlap {
                what,
                at,
                with,
                other,
            } => write!(
                f,
                "{what} ({:#x}..{:#x}) overlaps {with} ({:#x}..{:#x})",
                at.0, at.1, other.0, other.1
            ),
            E::DoesNotFit { what, size } => write!(
                f,
                "{what} ({size:#x} bytes) finds no room in guest RAM below 4 GiB"
            ),
            E::NulInString { what } => write!(f, "{what} holds a NUL byte"),
            E::Unbacked(a) => write!(f, "guest address {a:#x} is not RAM"),
        }
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(w)
}

/// The Multiboot header of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Its file offset.
    pub offset: usize,
    /// `flags`.
    pub flags: u32,
    /// `header_addr` (0 without flags bit 16, as the other address fields).
    pub header_addr: u32,
    /// `load_addr`.
    pub load_addr: u32,
    /// `load_end_addr`.
    pub load_end_addr: u32,
    /// `bss_end_addr`.
    pub bss_end_addr: u32,
    /// `entry_addr`.
    pub entry_addr: u32,
}

/// Finds and checks the header: the first magic at a 4-byte aligned offset whose
/// checksum holds (as GRUB and QEMU take it); its flags; its address fields if flags
/// bit 16 says they are there.
pub fn find_header(image: &[u8]) -> Result<Header, MultibootError> {
    let window = &image[..image.len().min(SEARCH_LIMIT)];
    let mut first_bad = None;
    let mut found = None;
    for offset in (0..window.len().saturating_sub(11)).step_by(4) {
        if u32_at(window, offset) != HEADER_MAGIC {
            continue;
        }
        let flags = u32_at(window, offset + 4);
        let checksum = u32_at(window, offset + 8);
        if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) == 0 {
            found = Some((offset, flags));
            break;
        }
        first_bad.get_or_insert(MultibootError::BadChecksum {
            offset,
            flags,
            checksum,
        });
    }
    let Some((offset, flags)) = found else {
        return Err(first_bad.unwrap_or(MultibootError::NoHeader));
    };
    let unknown = flags & header_flags::REQUIRED & !header_flags::KNOWN_REQUIRED;
    if unknown != 0 {
        return Err(MultibootError::UnknownRequiredFlags { bits: unknown });
    }
    if flags & header_flags::VIDEO_MODE != 0 {
        return Err(MultibootError::VideoModeRequired);
    }
    let mut h = Header {
        offset,
        flags,
        header_addr: 0,
        load_addr: 0,
        load_end_addr: 0,
        bss_end_addr: 0,
        entry_addr: 0,
    };
    if flags & header_flags::ADDRESS_FIELDS != 0 {
        let len = 32;
        if offset + len > window.len() {
            return Err(MultibootError::HeaderTruncated { offset, len });
        }
        h.header_addr = u32_at(window, offset + 12);
        h.load_addr = u32_at(window, offset + 16);
        h.load_end_addr = u32_at(window, offset + 20);
        h.bss_end_addr = u32_at(window, offset + 24);
        h.entry_addr = u32_at(window, offset + 28);
    }
    Ok(h)
}

/// How the image is laid out in its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The header's address fields (flags bit 16).
    AddressFields,
    /// An ELF32 i386 executable.
    Elf32,
    /// An ELF64 x86-64 executable.
    Elf64,
}

/// A part of the image: file bytes at a physical address, then zeros up to its memory
/// size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// Guest-physical address.
    pub addr: u64,
    /// The bytes from the file.
    pub data: &'a [u8],
    /// Bytes in memory (at least `data.len()`; the rest zeroed).
    pub mem_size: u64,
}

impl Chunk<'_> {
    fn range(&self) -> (u64, u64) {
        (self.addr, self.addr + self.mem_size)
    }
}

/// A checked Multiboot image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image<'a> {
    /// Its header.
    pub header: Header,
    /// How it was read.
    pub format: Format,
    /// What goes where (non-empty, in program header order).
    pub chunks: Vec<Chunk<'a>>,
    /// The physical entry point.
    pub entry: u32,
}

/// Checks `image` and finds what it loads where (nothing about the guest's RAM yet:
/// [`load`] checks that).
pub fn parse(image: &[u8]) -> Result<Image<'_>, MultibootError> {
    let header = find_header(image)?;
    if header.flags & header_flags::ADDRESS_FIELDS != 0 {
        return address_fields(image, header);
    }
    elf_image(image, header)
}

/// The image as the address fields say (§3.1.3).
fn address_fields(image: &[u8], h: Header) -> Result<Image<'_>, MultibootError> {
    let back = h.header_addr.wrapping_sub(h.load_addr) as usize;
    if h.load_addr > h.header_addr || back > h.offset {
        return Err(MultibootError::BadHeaderAddr {
            header_addr: h.header_addr,
            load_addr: h.load_addr,
            offset: h.offset,
        });
    }
    let start = h.offset - back;
    let load_addr = u64::from(h.load_addr);
    let len = match h.load_end_addr {
        0 => (image.len() - start) as u64,
        end if end < h.load_addr => {
            return Err(MultibootError::BadLoadEnd {
                load_addr: h.load_addr,
                load_end_addr: end,
            })
        }
        end => u64::from(end - h.load_addr),
    };
    let need = start as u64 + len;
    if need > image.len() as u64 {
        return Err(MultibootError::Truncated {
            need,
            have: image.len() as u64,
        });
    }
    let load_end = load_addr + len;
    let mem_end = match h.bss_end_addr {
        0 => load_end,
        b if u64::from(b) < load_end => {
            return Err(MultibootError::BadBssEnd {
                load_end,
                bss_end_addr: b,
            })
        }
        b => u64::from(b),
    };
    if mem_end == load_addr {
        return Err(MultibootError::NoSegments);
    }
    let entry = u64::from(h.entry_addr);
    if !(load_addr..load_end).contains(&entry) {
        return Err(MultibootError::EntryOutside { entry });
    }
    Ok(Image {
        header: h,
        format: Format::AddressFields,
        chunks: alloc::vec![Chunk {
            addr: load_addr,
            data: &image[start..start + len as usize],
            mem_size: mem_end - load_addr,
        }],
        entry: h.entry_addr,
    })
}

/// The image as its ELF program headers say.
fn elf_image(image: &[u8], header: Header) -> Result<Image<'_>, MultibootError> {
    use elf::ParseError as P;
    if !image.starts_with(b"\x7fELF") {
        return Err(MultibootError::NotElf);
    }
    let file = ElfBytes::<LittleEndian>::minimal_parse(image).map_err(|e| match e {
        P::BadMagic(_) => MultibootError::NotElf,
        _ => MultibootError::BadElf,
    })?;
    let ehdr = &file.ehdr;
    let (format, class, machine) = match ehdr.class {
        Class::ELF32 => (Format::Elf32, 32, EM_386),
        Class::ELF64 => (Format::Elf64, 64, EM_X86_64),
    };
    if ehdr.e_machine != machine {
        return Err(MultibootError::WrongMachine {
            class,
            machine: ehdr.e_machine,
        });
    }
    if ehdr.e_type != ET_EXEC && ehdr.e_type != ET_DYN {
        return Err(MultibootError::NotExecutable {
            e_type: ehdr.e_type,
        });
    }
    let mut chunks = Vec::new();
    // (vaddr, chunk) of every segment, for the entry point.
    let mut virt = Vec::new();
    for (index, ph) in file.segments().iter().flat_map(|t| t.iter()).enumerate() {
        if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        if ph.p_filesz > ph.p_memsz || ph.p_paddr.checked_add(ph.p_memsz).is_none() {
            return Err(MultibootError::BadSegment { index });
        }
        let have = image.len() as u64;
        let need = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .filter(|&n| n <= have)
            .ok_or(MultibootError::Truncated {
                need: ph.p_offset.saturating_add(ph.p_filesz),
                have,
            })?;
        let data = &image[ph.p_offset as usize..need as usize];
        chunks.push(Chunk {
            addr: ph.p_paddr,
            data,
            mem_size: ph.p_memsz,
        });
        virt.push(ph.p_vaddr);
    }
    if chunks.is_empty() {
        return Err(MultibootError::NoSegments);
    }
    let e = ehdr.e_entry;
    let inside = |base: u64, c: &Chunk<'_>| {
        e.checked_sub(base)
            .filter(|&off| off < c.data.len() as u64)
            .map(|off| c.addr + off)
    };
    let entry = virt
        .iter()
        .zip(&chunks)
        .find_map(|(&v, c)| inside(v, c))
        .or_else(|| chunks.iter().find_map(|c| inside(c.addr, c)))
        .ok_or(MultibootError::EntryOutside { entry: e })?;
    let entry = u32::try_from(entry).map_err(|_| MultibootError::EntryOutside { entry })?;
    Ok(Image {
        header,
        format,
        chunks,
        entry,
    })
}

/// A boot module: its bytes and its string.
#[derive(Clone, Copy, Debug)]
pub struct Module<'a> {
    /// The module.
    pub data: &'a [u8],
    /// Its string (a command line, conventionally the file name first), without NUL.
    pub cmdline: &'a [u8],
}

/// What [`load`] placed: what the boot vCPU starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The entry point (EIP).
    pub entry: u32,
    /// The information structure (EBX).
    pub info: u32,
    /// The GDT the entry selectors are from.
    pub gdt: u32,
    /// The end of the information block.
    pub info_end: u32,
    /// The end of the last module (the first free byte past what was loaded above the
    /// image), or the information block's end without modules.
    pub modules_end: u32,
}

const FOUR_GIB: u64 = 1 << 32;

/// The RAM region of `regions` holding `[addr, addr + size)` entirely, below 4 GiB.
fn in_ram(regions: &[E820Entry], addr: u64, size: u64) -> bool {
    let Some(end) = addr.checked_add(size) else {
        return false;
    };
    end <= FOUR_GIB
        && regions.iter().any(|r| {
            let (ra, rs, typ) = (r.addr, r.size, r.typ);
            typ == e820::RAM && addr >= ra && end <= ra.saturating_add(rs)
        })
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    Some(v.checked_add(a - 1)? & !(a - 1))
}

/// The lowest page-aligned address at or above `floor` where `size` bytes fit in one RAM
/// region below 4 GiB.
fn place_up(regions: &[E820Entry], floor: u64, size: u64) -> Option<u64> {
    regions
        .iter()
        .filter(|r| r.typ == e820::RAM)
        .filter_map(|r| {
            let (ra, rs) = (r.addr, r.size);
            let at = align_up(ra.max(floor), PAGE)?;
            let end = at.checked_add(size)?;
            (end <= ra.saturating_add(rs) && end <= FOUR_GIB).then_some(at)
        })
        .min()
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// `mem_lower` and `mem_upper` (KiB) from the memory map: the RAM from 0 (at most
/// 640 KiB) and the RAM from 1 MiB up to the first hole.
fn mem_limits(regions: &[E820Entry]) -> (u32, u32) {
    let from = |at: u64| {
        regions
            .iter()
            .find(|r| r.typ == e820::RAM && { r.addr } == at)
            .map_or(0, |r| r.size / 1024)
    };
    (
        from(0).min(640) as u32,
        from(MODULES_FLOOR).min(u64::from(u32::MAX)) as u32,
    )
}

/// The information block at `base`: the structure, the GDT, the memory map, the module
/// array (with the modules at `mods`), the strings.
fn info_block(
    base: u64,
    regions: &[E820Entry],
    cmdline: &[u8],
    modules: &[Module<'_>],
    mods: &[u64],
) -> Vec<u8> {
    let entries: Vec<&E820Entry> = regions.iter().filter(|r| r.size != 0).collect();
    let mods_off = MMAP_OFFSET + entries.len() * info::MMAP_ENTRY;
    let strings_off = mods_off + modules.len() * info::MODULE_ENTRY;
    let mut b = alloc::vec![0u8; strings_off];
    let at = |off: usize| (base + off as u64) as u32;
    let strings = |b: &mut Vec<u8>, s: &[u8]| {
        let a = at(b.len());
        b.extend_from_slice(s);
        b.push(0);
        a
    };
    let cmd = strings(&mut b, cmdline);
    let name = strings(&mut b, BOOT_LOADER_NAME);
    for (i, m) in modules.iter().enumerate() {
        let s = strings(&mut b, m.cmdline);
        let e = mods_off + i * info::MODULE_ENTRY;
        put_u32(&mut b, e, mods[i] as u32);
        put_u32(&mut b, e + 4, (mods[i] + m.data.len() as u64) as u32);
        put_u32(&mut b, e + 8, s);
    }
    for (i, r) in entries.iter().enumerate() {
        let e = MMAP_OFFSET + i * info::MMAP_ENTRY;
        put_u32(&mut b, e, (info::MMAP_ENTRY - 4) as u32);
        b[e + 4..e + 12].copy_from_slice(&{ r.addr }.to_le_bytes());
        b[e + 12..e + 20].copy_from_slice(&{ r.size }.to_le_bytes());
        put_u32(&mut b, e + 20, r.typ);
    }
    for (i, d) in GDT.iter().enumerate() {
        b[GDT_OFFSET + i * 8..][..8].copy_from_slice(&d.to_le_bytes());
    }
    let (lower, upper) = mem_limits(regions);
    put_u32(
        &mut b,
        info::FLAGS,
        info_flags::MEMORY
            | info_flags::CMDLINE
            | info_flags::MODS
            | info_flags::MMAP
            | info_flags::BOOT_LOADER_NAME,
    );
    put_u32(&mut b, info::MEM_LOWER, lower);
    put_u32(&mut b, info::MEM_UPPER, upper);
    put_u32(&mut b, info::CMDLINE, cmd);
    put_u32(&mut b, info::MODS_COUNT, modules.len() as u32);
    put_u32(&mut b, info::MODS_ADDR, at(mods_off));
    put_u32(
        &mut b,
        info::MMAP_LENGTH,
        (entries.len() * info::MMAP_ENTRY) as u32,
    );
    put_u32(&mut b, info::MMAP_ADDR, at(MMAP_OFFSET));
    put_u32(&mut b, info::BOOT_LOADER_NAME, name);
    b
}

/// Loads a checked image into guest memory laid out as `regions` (which become the
/// memory map), with its command line and modules, and the information structure.
/// Checks everything first: on an error nothing was written.
pub fn load<M: GuestMemory + ?Sized>(
    mem: &mut M,
    image: &Image<'_>,
    regions: &[E820Entry],
    cmdline: &[u8],
    modules: &[Module<'_>],
) -> Result<Loaded, MultibootError> {
    if cmdline.contains(&0) {
        return Err(MultibootError::NulInString {
            what: Area::CommandLine,
        });
    }
    if let Some(i) = modules.iter().position(|m| m.cmdline.contains(&0)) {
        return Err(MultibootError::NulInString {
            what: Area::Module(i),
        });
    }
    // The information block's size does not depend on where the modules go.
    let block_len = info_block(
        INFO_ADDR,
        regions,
        cmdline,
        modules,
        &alloc::vec![0; modules.len()],
    )
    .len() as u64;
    let info_range = (INFO_ADDR, INFO_ADDR + block_len);
    if !in_ram(regions, INFO_ADDR, block_len) {
        return Err(MultibootError::OutsideRam {
            what: Area::Info,
            addr: INFO_ADDR,
            size: block_len,
        });
    }
    for (i, c) in image.chunks.iter().enumerate() {
        if !in_ram(regions, c.addr, c.mem_size) {
            return Err(MultibootError::OutsideRam {
                what: Area::Segment(i),
                addr: c.addr,
                size: c.mem_size,
            });
        }
        let overlap = |with, other| MultibootError::Overlap {
            what: Area::Segment(i),
            at: c.range(),
            with,
            other,
        };
        if overlaps(c.range(), info_range) {
            return Err(overlap(Area::Info, info_range));
        }
        if let Some(j) = image.chunks[..i]
            .iter()
            .position(|o| overlaps(c.range(), o.range()))
        {
            return Err(overlap(Area::Segment(j), image.chunks[j].range()));
        }
    }
    // The modules: after the image and the block, each on a page.
    let image_end = image.chunks.iter().map(|c| c.range().1).max().unwrap_or(0);
    let mut floor = image_end.max(info_range.1).max(MODULES_FLOOR);
    let mut mods = Vec::with_capacity(modules.len());
    for (i, m) in modules.iter().enumerate() {
        let size = m.data.len() as u64;
        let at = place_up(regions, floor, size).ok_or(MultibootError::DoesNotFit {
            what: Area::Module(i),
            size,
        })?;
        mods.push(at);
        floor = at + size;
    }
    let block = info_block(INFO_ADDR, regions, cmdline, modules, &mods);

    // Checked: now write.
    let put = |mem: &mut M, addr: u64, data: &[u8]| {
        mem.write(addr, data)
            .map_err(|u| MultibootError::Unbacked(u.gpa))
    };
    for c in &image.chunks {
        put(mem, c.addr, c.data)?;
        let zeros = [0u8; 4096];
        let mut at = c.addr + c.data.len() as u64;
        let end = c.addr + c.mem_size;
        while at < end {
            let n = (end - at).min(zeros.len() as u64);
            put(mem, at, &zeros[..n as usize])?;
            at += n;
        }
    }
    for (m, &at) in modules.iter().zip(&mods) {
        put(mem, at, m.data)?;
    }
    put(mem, INFO_ADDR, &block)?;
    Ok(Loaded {
        entry: image.entry,
        info: INFO_ADDR as u32,
        gdt: (INFO_ADDR + GDT_OFFSET as u64) as u32,
        info_end: info_range.1 as u32,
        modules_end: if modules.is_empty() {
            info_range.1 as u32
        } else {
            floor as u32
        },
    })
}

/// Sets `regs` up for the Multiboot entry (§3.2): 32-bit protected mode with paging
/// off, flat code and data segments (the selectors of the GDT [`load`] wrote, which the
/// GDTR points at), interrupts off, EFLAGS bit 1 alone, EAX = 0x2BADB002, EBX = the
/// information structure, the other registers zero (no stack); marks everything it
/// set in the MTD. A20 needs nothing: guest memory has no A20 gate.
pub fn entry_state(regs: &mut ArchState, loaded: &Loaded) {
    let code = Segment {
        sel: CODE_SEL,
        ar: 0x9b | bits::AR_DB | 0x800, // present, DPL 0, code, 32-bit, G
        limit: 0xffff_ffff,
        base: 0,
    };
    let data = Segment {
        sel: DATA_SEL,
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
        base: u64::from(loaded.gdt),
    });
    // VT-x wants a usable TR (a busy 32-bit TSS here) and an unusable LDTR, as at the
    // Linux entry ([`super::entry_state`]).
    regs.set_tr(Segment {
        sel: 0,
        ar: 0x8b,
        limit: 0x67,
        base: 0,
    });
    regs.set_ldtr(Segment::default());
    regs.set_idtr(Segment::default());
    regs.set_cr0(bits::CR0_PE | (1 << 4)); // ET
    regs.set_cr3(0);
    regs.set_cr4(0);
    regs.set_efer(0);
    regs.set_rflags(2);
    regs.set_rip(u64::from(loaded.entry));
    let mut gprs = [0; 16];
    gprs[gpr::RAX] = u64::from(BOOTLOADER_MAGIC);
    gprs[gpr::RBX] = u64::from(loaded.info);
    regs.set_gprs(gprs);
}

#[cfg(test)]
mod tests;
