//! The Multiboot loader on images assembled here byte by byte and a mock vCPU.

use std::vec;
use std::vec::Vec;

use super::*;
use crate::testutil::MockVcpu;
use crate::vcpu::{self, Mtd, PagingMode};

const RAM_TOP: u64 = 0x100_0000;

fn regions() -> Vec<E820Entry> {
    vec![
        E820Entry {
            addr: 0,
            size: 0x9_fc00,
            typ: e820::RAM,
        },
        E820Entry {
            addr: 0x9_fc00,
            size: 0x10_0000 - 0x9_fc00,
            typ: e820::RESERVED,
        },
        E820Entry {
            addr: 0x10_0000,
            size: RAM_TOP - 0x10_0000,
            typ: e820::RAM,
        },
        // An empty entry is left out of the memory map.
        E820Entry {
            addr: RAM_TOP,
            size: 0,
            typ: e820::RAM,
        },
        E820Entry {
            addr: 0xe000_0000,
            size: 0x1000_0000,
            typ: e820::RESERVED,
        },
    ]
}

/// A Multiboot header: magic, `flags`, the checksum (made right, plus `bad`), then the
/// address fields if `fields`.
fn header(flags: u32, bad: u32, fields: Option<[u32; 5]>) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&HEADER_MAGIC.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    let sum = 0u32
        .wrapping_sub(HEADER_MAGIC)
        .wrapping_sub(flags)
        .wrapping_add(bad);
    h.extend_from_slice(&sum.to_le_bytes());
    for f in fields.into_iter().flatten() {
        h.extend_from_slice(&f.to_le_bytes());
    }
    h
}

fn at(img: &mut Vec<u8>, off: usize, bytes: &[u8]) {
    if img.len() < off + bytes.len() {
        img.resize(off + bytes.len(), 0);
    }
    img[off..off + bytes.len()].copy_from_slice(bytes);
}

/// A program header: type, physical and virtual address, file bytes, memory size.
struct Ph<'a> {
    typ: u32,
    paddr: u64,
    vaddr: u64,
    data: &'a [u8],
    memsz: u64,
}

fn load_seg(paddr: u64, data: &[u8], memsz: u64) -> Ph<'_> {
    Ph {
        typ: PT_LOAD,
        paddr,
        vaddr: paddr,
        data,
        memsz,
    }
}

/// An ELF executable of `class` (32 or 64) for `machine`: the file header, the program
/// headers, the Multiboot header `mb` (after them, 4-aligned, within 8 KiB), then each
/// segment's bytes.
fn elf(class: u8, machine: u16, entry: u64, phs: &[Ph<'_>], mb: &[u8]) -> Vec<u8> {
    let (ehsize, phentsize) = if class == 32 { (52, 32) } else { (64, 56) };
    let mb_off = (ehsize + phentsize * phs.len()).next_multiple_of(4);
    let mut data_off = mb_off + mb.len();
    let mut f = vec![0x7f, b'E', b'L', b'F', class / 32, 1, 1];
    f.resize(16, 0);
    f.extend_from_slice(&ET_EXEC.to_le_bytes());
    f.extend_from_slice(&machine.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    let word = |f: &mut Vec<u8>, v: u64| {
        if class == 32 {
            f.extend_from_slice(&(v as u32).to_le_bytes());
        } else {
            f.extend_from_slice(&v.to_le_bytes());
        }
    };
    word(&mut f, entry);
    word(&mut f, ehsize as u64); // phoff
    word(&mut f, 0); // shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [ehsize as u16, phentsize as u16, phs.len() as u16, 0, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(f.len(), ehsize);
    let mut offsets = Vec::new();
    for p in phs {
        offsets.push(data_off);
        f.extend_from_slice(&p.typ.to_le_bytes());
        if class == 64 {
            f.extend_from_slice(&7u32.to_le_bytes()); // flags
        }
        word(&mut f, data_off as u64);
        word(&mut f, p.vaddr);
        word(&mut f, p.paddr);
        word(&mut f, p.data.len() as u64);
        word(&mut f, p.memsz);
        if class == 32 {
            f.extend_from_slice(&7u32.to_le_bytes());
        }
        word(&mut f, 0x1000);
        data_off += p.data.len();
    }
    at(&mut f, mb_off, mb);
    for (p, off) in phs.iter().zip(offsets) {
        at(&mut f, off, p.data);
    }
    f
}

/// The memory-info flag, the one images commonly set.
const MEM: u32 = header_flags::MEMORY_INFO | header_flags::PAGE_ALIGN;

fn mem() -> MockVcpu {
    MockVcpu::new(RAM_TOP as usize)
}

fn u32_mem(v: &MockVcpu, addr: u64) -> u32 {
    u32_at(&v.mem, addr as usize)
}

fn cstr(v: &MockVcpu, addr: u32) -> &[u8] {
    let s = &v.mem[addr as usize..];
    &s[..s.iter().position(|&b| b == 0).unwrap()]
}

/// Parses and loads; on an error also checks that guest memory was not touched.
fn try_load(
    img: &[u8],
    cmdline: &[u8],
    modules: &[Module<'_>],
) -> Result<(MockVcpu, Loaded), MultibootError> {
    let mut v = mem();
    let r = parse(img).and_then(|i| load(&mut v, &i, &regions(), cmdline, modules));
    match r {
        Ok(l) => Ok((v, l)),
        Err(e) => {
            assert!(v.mem.iter().all(|&b| b == 0), "{e}: memory written");
            Err(e)
        }
    }
}

fn refused_with(img: &[u8], cmdline: &[u8], modules: &[Module<'_>]) -> MultibootError {
    match try_load(img, cmdline, modules) {
        Err(e) => e,
        Ok(_) => panic!("loaded"),
    }
}

fn refused(img: &[u8]) -> MultibootError {
    refused_with(img, b"", &[])
}

#[test]
fn the_first_header_with_a_good_checksum_counts() {
    let mut img = vec![0u8; 0x40];
    at(&mut img, 0x8, &header(0, 1, None)); // bad checksum
    at(&mut img, 0x12, &header(0, 0, None)); // not 4-aligned
    at(&mut img, 0x20, &header(MEM, 0, None));
    let h = find_header(&img).unwrap();
    assert_eq!((h.offset, h.flags, h.load_addr), (0x20, MEM, 0));
    // Only the bad one: its checksum is the complaint.
    img.truncate(0x20);
    let e = find_header(&img).unwrap_err();
    assert!(matches!(e, MultibootError::BadChecksum { offset: 8, .. }));
    assert!(e.to_string().contains("checksum"), "{e}");
}

#[test]
fn elf32_segments_load_at_their_physical_addresses_and_bss_is_zeroed() {
    let text: Vec<u8> = (1..=0x30u8).collect();
    let data = [0xd0u8; 0x10];
    // A higher-half kernel: virtual 0xc010_0000, physical 1 MiB; the entry is virtual.
    let phs = [
        Ph {
            typ: PT_LOAD,
            paddr: 0x10_0000,
            vaddr: 0xc010_0000,
            data: &text,
            memsz: 0x30,
        },
        Ph {
            typ: 6, // PT_PHDR: not loaded
            paddr: 0x30_0000,
            vaddr: 0x30_0000,
            data: &[],
            memsz: 0x10,
        },
        Ph {
            typ: PT_LOAD,
            paddr: 0x10_1000,
            vaddr: 0xc010_1000,
            data: &data,
            memsz: 0x2000,
        },
    ];
    let img = elf(32, EM_386, 0xc010_0010, &phs, &header(MEM, 0, None));
    let image = parse(&img).unwrap();
    assert_eq!(image.format, Format::Elf32);
    assert_eq!(image.entry, 0x10_0010);
    assert_eq!(image.chunks.len(), 2);
    let mut v = mem();
    v.mem[0x10_1000..0x10_4000].fill(0xcc);
    let l = load(&mut v, &image, &regions(), b"", &[]).unwrap();
    assert_eq!(l.entry, 0x10_0010);
    assert_eq!(&v.mem[0x10_0000..0x10_0030], &text[..]);
    assert_eq!(&v.mem[0x10_1000..0x10_1010], &data);
    assert!(v.mem[0x10_1010..0x10_3000].iter().all(|&b| b == 0), "bss");
    assert_eq!(v.mem[0x10_3000], 0xcc, "nothing past the segment");
    assert!(v.mem[0x30_0000..0x30_0010].iter().all(|&b| b == 0));
}

#[test]
fn elf64_segments_load_by_physical_address_with_a_physical_or_virtual_entry() {
    let code = [0x90u8; 0x100];
    let seg = |data| Ph {
        typ: PT_LOAD,
        paddr: 0x20_0000,
        vaddr: 0xffff_ffff_8020_0000,
        data,
        memsz: 0x1000,
    };
    for (entry, want) in [
        (0x20_0040, 0x20_0040),
        (0xffff_ffff_8020_0080u64, 0x20_0080),
    ] {
        let img = elf(64, EM_X86_64, entry, &[seg(&code)], &header(MEM, 0, None));
        let image = parse(&img).unwrap();
        assert_eq!((image.format, image.entry), (Format::Elf64, want));
        let (v, l) = try_load(&img, b"", &[]).unwrap();
        assert_eq!(l.entry, want);
        assert_eq!(&v.mem[0x20_0000..0x20_0100], &code);
    }
}

/// The a.out kludge: the header's address fields place the file, whatever it is.
#[test]
fn address_fields_load_the_file_from_the_header_back() {
    // The header at file offset 0x1000 says it is 0x40 bytes into the text at
    // 0x10_0000: the text starts at file offset 0xfc0.
    let mut img: Vec<u8> = (0..0x1800u32).map(|i| (i % 251) as u8 | 1).collect();
    let h = header(
        header_flags::ADDRESS_FIELDS | MEM,
        0,
        Some([0x10_0040, 0x10_0000, 0x10_0500, 0x10_2000, 0x10_0060]),
    );
    at(&mut img, 0x1000, &h);
    let image = parse(&img).unwrap();
    assert_eq!(image.format, Format::AddressFields);
    assert_eq!(
        (image.header.header_addr, image.header.entry_addr),
        (0x10_0040, 0x10_0060)
    );
    let mut v = mem();
    v.mem[0x10_0000..0x10_3000].fill(0xcc);
    let l = load(&mut v, &image, &regions(), b"", &[]).unwrap();
    assert_eq!(l.entry, 0x10_0060);
    assert_eq!(&v.mem[0x10_0000..0x10_0500], &img[0xfc0..0x14c0]);
    assert_eq!(&v.mem[0x10_0040..0x10_0044], &HEADER_MAGIC.to_le_bytes());
    assert!(v.mem[0x10_0500..0x10_2000].iter().all(|&b| b == 0), "bss");
    assert_eq!(v.mem[0x10_2000], 0xcc);

    // load_end_addr 0: up to the end of the file; bss_end_addr 0: no bss.
    let mut img = vec![0xf4u8; 0x300];
    at(
        &mut img,
        0x80,
        &header(
            header_flags::ADDRESS_FIELDS,
            0,
            Some([0x20_0080, 0x20_0000, 0, 0, 0x20_02ff]),
        ),
    );
    let image = parse(&img).unwrap();
    assert_eq!(image.chunks[0].range(), (0x20_0000, 0x20_0300));
    let (v, _) = try_load(&img, b"", &[]).unwrap();
    assert_eq!(&v.mem[0x20_0000..0x20_0300], &img[..]);
    assert_eq!(v.mem[0x20_0300], 0);

    // An ELF64 file with the address fields (Peregrine's kernel): the fields decide.
    let code = [0x90u8; 0x40];
    let seg = load_seg(0x40_0000, &code, 0x40); // would load elsewhere as ELF
    let probe = elf(64, EM_X86_64, 0x40_0000, &[seg], &header(0, 0, None));
    let mb_off = find_header(&probe).unwrap().offset as u32;
    let fields = [
        0x30_0000 + mb_off,
        0x30_0000,
        0,
        0x30_1000,
        0x30_0000 + mb_off + 32,
    ];
    let seg = load_seg(0x40_0000, &code, 0x40);
    let img = elf(
        64,
        EM_X86_64,
        0x40_0000,
        &[seg],
        &header(header_flags::ADDRESS_FIELDS, 0, Some(fields)),
    );
    let image = parse(&img).unwrap();
    assert_eq!(image.format, Format::AddressFields);
    assert_eq!(image.chunks[0].addr, 0x30_0000);
    assert_eq!(image.entry, 0x30_0000 + mb_off + 32);
    let (v, _) = try_load(&img, b"", &[]).unwrap();
    assert_eq!(&v.mem[0x30_0000..0x30_0004], b"\x7fELF");
    assert!(v.mem[0x40_0000..0x40_0040].iter().all(|&b| b == 0));
}

fn small_image(paddr: u64, memsz: u64) -> Vec<u8> {
    elf(
        32,
        EM_386,
        paddr,
        &[load_seg(paddr, &[0xf4; 16], memsz)],
        &header(MEM, 0, None),
    )
}

#[test]
fn the_information_structure_describes_memory_command_line_loader_and_modules() {
    let img = small_image(0x10_0000, 0x2345);
    let one: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    let mods = [
        Module {
            data: &one,
            cmdline: b"root.elf arg",
        },
        Module {
            data: b"x",
            cmdline: b"env",
        },
        Module {
            data: b"",
            cmdline: b"",
        },
    ];
    let (v, l) = try_load(&img, b"serial verbose", &mods).unwrap();
    let i = u64::from(l.info);
    assert_eq!(i, INFO_ADDR);
    let flags = u32_mem(&v, i);
    assert_eq!(
        flags,
        info_flags::MEMORY
            | info_flags::CMDLINE
            | info_flags::MODS
            | info_flags::MMAP
            | info_flags::BOOT_LOADER_NAME
    );
    assert_eq!(u32_mem(&v, i + 4), 639, "mem_lower: KiB below 640 KiB");
    assert_eq!(
        u64::from(u32_mem(&v, i + 8)),
        (RAM_TOP - 0x10_0000) / 1024,
        "mem_upper: KiB from 1 MiB"
    );
    assert_eq!(cstr(&v, u32_mem(&v, i + 16)), b"serial verbose");
    assert_eq!(cstr(&v, u32_mem(&v, i + 64)), b"peregrine");

    // The memory map: the regions with a size, each entry's size field 20.
    let (len, addr) = (u32_mem(&v, i + 44), u32_mem(&v, i + 48));
    let want: Vec<(u64, u64, u32)> = regions()
        .iter()
        .filter(|r| r.size != 0)
        .map(|r| (r.addr, r.size, r.typ))
        .collect();
    let mut got = Vec::new();
    let mut p = u64::from(addr);
    while p < u64::from(addr + len) {
        let size = u32_mem(&v, p);
        let b = &v.mem[p as usize + 4..];
        got.push((
            u64::from_le_bytes(b[..8].try_into().unwrap()),
            u64::from_le_bytes(b[8..16].try_into().unwrap()),
            u32_at(b, 16),
        ));
        assert_eq!(size, 20);
        p += u64::from(size) + 4;
    }
    assert_eq!(got, want);

    // The modules: after the image's bss (0x10_2345), each on a page, in order, with
    // their strings; mod_end is exclusive.
    assert_eq!(u32_mem(&v, i + 20), 3);
    let m = u64::from(u32_mem(&v, i + 24));
    let entry = |n: u64| {
        let e = m + 16 * n;
        (
            u32_mem(&v, e),
            u32_mem(&v, e + 4),
            cstr(&v, u32_mem(&v, e + 8)).to_vec(),
            u32_mem(&v, e + 12),
        )
    };
    assert_eq!(
        entry(0),
        (0x10_3000, 0x10_3000 + 5000, b"root.elf arg".to_vec(), 0)
    );
    assert_eq!(entry(1), (0x10_5000, 0x10_5001, b"env".to_vec(), 0));
    assert_eq!(entry(2), (0x10_6000, 0x10_6000, Vec::new(), 0));
    assert_eq!(&v.mem[0x10_3000..0x10_3000 + 5000], &one[..]);
    assert_eq!(v.mem[0x10_5000], b'x');
    assert_eq!(l.modules_end, 0x10_6000);

    // The GDT: flat 32-bit code and data at the entry selectors.
    let g = u64::from(l.gdt);
    assert!(g >= INFO_ADDR && g + 24 <= u64::from(l.info_end));
    for (sel, d) in [(CODE_SEL, GDT[1]), (DATA_SEL, GDT[2])] {
        let e = &v.mem[(g + u64::from(sel)) as usize..][..8];
        assert_eq!(u64::from_le_bytes(e.try_into().unwrap()), d);
    }
    // Everything the block points at lies in it.
    for p in [
        u32_mem(&v, i + 16),
        u32_mem(&v, i + 64),
        addr + len,
        m as u32 + 48,
    ] {
        assert!(p <= l.info_end, "{p:#x}");
    }
}

#[test]
fn modules_go_past_every_segment_and_at_or_above_1mib() {
    // An image in low memory: the modules start at 1 MiB.
    let img = small_image(0x2_0000, 0x100);
    let (v, l) = try_load(
        &img,
        b"",
        &[Module {
            data: b"m",
            cmdline: b"",
        }],
    )
    .unwrap();
    let m = u64::from(u32_mem(&v, u64::from(l.info) + 24));
    assert_eq!(u32_mem(&v, m), 0x10_0000);
    // Two segments far apart: past the higher one, not in the gap.
    let phs = [
        load_seg(0x10_0000, &[1; 4], 4),
        load_seg(0x80_0000, &[2; 4], 0x1001),
    ];
    let img = elf(32, EM_386, 0x10_0000, &phs, &header(MEM, 0, None));
    let (v, l) = try_load(
        &img,
        b"",
        &[Module {
            data: b"m",
            cmdline: b"",
        }],
    )
    .unwrap();
    let m = u64::from(u32_mem(&v, u64::from(l.info) + 24));
    assert_eq!(u32_mem(&v, m), 0x80_2000);
    // No room past the image: refused, nothing written.
    let img = small_image(RAM_TOP - 0x1000, 0x1000);
    let big = vec![7u8; 0x2000];
    assert_eq!(
        refused_with(
            &img,
            b"",
            &[Module {
                data: &big,
                cmdline: b""
            }]
        ),
        MultibootError::DoesNotFit {
            what: Area::Module(0),
            size: 0x2000
        }
    );
}

#[test]
fn bad_headers_are_refused() {
    use MultibootError as E;
    assert_eq!(refused(&[0u8; 0x4000]), E::NoHeader);
    assert_eq!(refused(&[]), E::NoHeader);
    // Bad checksum.
    let mut img = small_image(0x10_0000, 16);
    let off = find_header(&img).unwrap().offset;
    img[off + 8] ^= 1;
    assert!(matches!(refused(&img), E::BadChecksum { offset, .. } if offset == off));
    // A good header beyond the first 8 KiB is not found.
    let mut img = vec![0u8; 0x2000];
    img.extend_from_slice(&header(MEM, 0, None));
    assert_eq!(refused(&img), E::NoHeader);
    // A header whose address fields run past 8 KiB.
    let mut img = vec![0u8; 0x2000 - 16];
    img.extend_from_slice(&header(
        header_flags::ADDRESS_FIELDS,
        0,
        Some([0x10_1ff0, 0x10_0000, 0, 0, 0x10_0000]),
    ));
    assert_eq!(
        refused(&img),
        E::HeaderTruncated {
            offset: 0x2000 - 16,
            len: 32
        }
    );
    // Requirement bits this loader does not know; unknown optional bits are fine.
    for (flags, want) in [
        (MEM | 1 << 3, Err(E::UnknownRequiredFlags { bits: 1 << 3 })),
        (
            1 << 15 | 1 << 4,
            Err(E::UnknownRequiredFlags {
                bits: 1 << 15 | 1 << 4,
            }),
        ),
        (header_flags::VIDEO_MODE, Err(E::VideoModeRequired)),
        (MEM | 1 << 20, Ok(())),
    ] {
        let img = elf(
            32,
            EM_386,
            0x10_0000,
            &[load_seg(0x10_0000, &[0; 4], 4)],
            &header(flags, 0, None),
        );
        assert_eq!(try_load(&img, b"", &[]).map(|_| ()), want, "{flags:#x}");
    }
}

#[test]
fn bad_address_fields_are_refused() {
    use MultibootError as E;
    let kludge = |f: [u32; 5]| {
        let mut img = vec![0u8; 0x200];
        at(
            &mut img,
            0x100,
            &header(header_flags::ADDRESS_FIELDS, 0, Some(f)),
        );
        img
    };
    // header_addr below load_addr; the text would start before the file.
    assert!(matches!(
        refused(&kludge([0x10_0000, 0x10_0100, 0, 0, 0x10_0100])),
        E::BadHeaderAddr { .. }
    ));
    assert!(matches!(
        refused(&kludge([0x10_0101, 0x10_0000, 0, 0, 0x10_0000])),
        E::BadHeaderAddr { .. }
    ));
    // load_end_addr below load_addr; past the end of the file.
    assert_eq!(
        refused(&kludge([0x10_0100, 0x10_0000, 0xf_0000, 0, 0x10_0000])),
        E::BadLoadEnd {
            load_addr: 0x10_0000,
            load_end_addr: 0xf_0000
        }
    );
    assert_eq!(
        refused(&kludge([0x10_0100, 0x10_0000, 0x10_0201, 0, 0x10_0000])),
        E::Truncated {
            need: 0x201,
            have: 0x200
        }
    );
    // bss_end_addr inside the loaded part.
    assert_eq!(
        refused(&kludge([0x10_0100, 0x10_0000, 0, 0x10_01ff, 0x10_0000])),
        E::BadBssEnd {
            load_end: 0x10_0200,
            bss_end_addr: 0x10_01ff
        }
    );
    // The entry in the bss or before the text.
    for entry in [0x10_0200, 0xf_ffff] {
        assert_eq!(
            refused(&kludge([0x10_0100, 0x10_0000, 0, 0x10_1000, entry])),
            E::EntryOutside {
                entry: u64::from(entry)
            }
        );
    }
    // Nothing to load.
    assert_eq!(
        refused(&kludge([0x10_0100, 0x10_0100, 0x10_0100, 0, 0x10_0100])),
        E::NoSegments
    );
}

#[test]
fn bad_elf_images_are_refused() {
    use MultibootError as E;
    let mb = header(MEM, 0, None);
    let code = [0x90u8; 64];
    // No address fields and not ELF.
    let mut img = vec![0u8; 64];
    img.extend_from_slice(&mb);
    assert_eq!(refused(&img), E::NotElf);
    // Wrong machine for the class.
    let seg = || [load_seg(0x10_0000, &code, 64)];
    assert_eq!(
        refused(&elf(32, EM_X86_64, 0x10_0000, &seg(), &mb)),
        E::WrongMachine {
            class: 32,
            machine: EM_X86_64
        }
    );
    assert_eq!(
        refused(&elf(64, EM_386, 0x10_0000, &seg(), &mb)),
        E::WrongMachine {
            class: 64,
            machine: EM_386
        }
    );
    // A relocatable object.
    let mut img = elf(32, EM_386, 0x10_0000, &seg(), &mb);
    img[16] = 1; // ET_REL
    assert_eq!(refused(&img), E::NotExecutable { e_type: 1 });
    // Truncated: the segment's bytes, or the program header table, past the end.
    let img = elf(32, EM_386, 0x10_0000, &seg(), &mb);
    let n = img.len();
    assert_eq!(
        refused(&img[..n - 1]),
        E::Truncated {
            need: n as u64,
            have: n as u64 - 1
        }
    );
    let mut img = elf(64, EM_X86_64, 0x10_0000, &seg(), &mb);
    img[0x38] = 200; // e_phnum: the table runs past the end
    assert_eq!(refused(&img), E::BadElf);
    // File size above memory size.
    assert_eq!(
        refused(&elf(
            32,
            EM_386,
            0x10_0000,
            &[load_seg(0x10_0000, &code, 8)],
            &mb
        )),
        E::BadSegment { index: 0 }
    );
    // Nothing loadable.
    let note = Ph {
        typ: 4,
        ..load_seg(0x10_0000, &code, 64)
    };
    assert_eq!(
        refused(&elf(32, EM_386, 0x10_0000, &[note], &mb)),
        E::NoSegments
    );
    // The entry outside the loaded bytes (in the bss; elsewhere).
    let bss = [load_seg(0x10_0000, &code, 0x1000)];
    for entry in [0x10_0040, 0x10_2000, 0] {
        assert_eq!(
            refused(&elf(32, EM_386, entry, &bss, &mb)),
            E::EntryOutside { entry }
        );
    }
}

#[test]
fn images_outside_ram_or_over_the_information_are_refused() {
    use MultibootError as E;
    let mb = header(MEM, 0, None);
    let code = [0x90u8; 64];
    // Past the top of RAM, in the hole below 1 MiB, across the 640-KiB line, above 4 GiB.
    for (paddr, memsz) in [
        (RAM_TOP - 0x20, 0x40),
        (0xf_0000, 0x40),
        (0x9_fc00 - 0x20, 0x40),
        (0x1_0000_0000, 0x40),
        (0xe000_0000, 0x40),
    ] {
        let phs = [
            load_seg(0x10_0000, &code, 64),
            load_seg(paddr, &code, memsz),
        ];
        let img = elf(64, EM_X86_64, 0x10_0000, &phs, &mb);
        assert_eq!(
            refused(&img),
            E::OutsideRam {
                what: Area::Segment(1),
                addr: paddr,
                size: memsz
            },
            "{paddr:#x}"
        );
    }
    // Over the information block.
    let img = small_image(INFO_ADDR + 0x20, 0x40);
    let e = refused(&img);
    assert!(
        matches!(e, E::Overlap { what: Area::Segment(0), with: Area::Info, other, .. } if other.0 == INFO_ADDR),
        "{e:?}"
    );
    assert!(e.to_string().contains("Multiboot information"), "{e}");
    // A bss reaching into it from below.
    let img = small_image(INFO_ADDR - 0x1000, 0x1001);
    assert!(matches!(
        refused(&img),
        E::Overlap {
            with: Area::Info,
            ..
        }
    ));
    // Two segments over each other.
    let phs = [
        load_seg(0x10_0000, &code, 0x1000),
        load_seg(0x10_0ff0, &code, 64),
    ];
    let e = refused(&elf(32, EM_386, 0x10_0000, &phs, &mb));
    assert_eq!(
        e,
        E::Overlap {
            what: Area::Segment(1),
            at: (0x10_0ff0, 0x10_1030),
            with: Area::Segment(0),
            other: (0x10_0000, 0x10_1000)
        }
    );
    // A command line too long for the block below 640 KiB.
    let long = vec![b'a'; 0x9_0000];
    assert!(matches!(
        refused_with(&small_image(0x10_0000, 16), &long, &[]),
        E::OutsideRam {
            what: Area::Info,
            ..
        }
    ));
    // NUL in the strings.
    assert_eq!(
        refused_with(&small_image(0x10_0000, 16), b"a\0b", &[]),
        E::NulInString {
            what: Area::CommandLine
        }
    );
    assert_eq!(
        refused_with(
            &small_image(0x10_0000, 16),
            b"",
            &[
                Module {
                    data: b"",
                    cmdline: b""
                },
                Module {
                    data: b"",
                    cmdline: b"\0"
                }
            ]
        ),
        E::NulInString {
            what: Area::Module(1)
        }
    );
}

#[test]
fn every_error_says_what_is_wrong() {
    use MultibootError as E;
    let all = [
        E::NoHeader,
        E::BadChecksum {
            offset: 0,
            flags: 0,
            checksum: 0,
        },
        E::HeaderTruncated { offset: 0, len: 32 },
        E::UnknownRequiredFlags { bits: 8 },
        E::VideoModeRequired,
        E::BadHeaderAddr {
            header_addr: 0,
            load_addr: 1,
            offset: 0,
        },
        E::BadLoadEnd {
            load_addr: 1,
            load_end_addr: 0,
        },
        E::BadBssEnd {
            load_end: 1,
            bss_end_addr: 0,
        },
        E::NotElf,
        E::BadElf,
        E::WrongMachine {
            class: 64,
            machine: 3,
        },
        E::NotExecutable { e_type: 1 },
        E::BadSegment { index: 2 },
        E::NoSegments,
        E::Truncated { need: 2, have: 1 },
        E::EntryOutside { entry: 5 },
        E::OutsideRam {
            what: Area::Module(1),
            addr: 0,
            size: 1,
        },
        E::Overlap {
            what: Area::Segment(0),
            at: (0, 1),
            with: Area::Info,
            other: (0, 1),
        },
        E::DoesNotFit {
            what: Area::Module(0),
            size: 1,
        },
        E::NulInString {
            what: Area::CommandLine,
        },
        E::Unbacked(0x1000),
    ];
    let texts: Vec<String> = all.iter().map(|e| e.to_string()).collect();
    for (i, t) in texts.iter().enumerate() {
        assert!(t.len() > 15, "{t}");
        assert!(!texts[..i].contains(t), "duplicate message {t}");
    }
}

#[test]
fn the_entry_state_is_32bit_protected_mode_without_paging() {
    let (_, l) = try_load(&small_image(0x10_0000, 16), b"", &[]).unwrap();
    let mut r = ArchState {
        cr0: bits::CR0_PG | bits::CR0_PE,
        efer: bits::EFER_LMA | bits::EFER_LME,
        rflags: 0x3202,
        ..ArchState::default()
    };
    entry_state(&mut r, &l);
    assert_eq!(vcpu::code_bits(&r), 32);
    assert_eq!(vcpu::paging_mode(&r), PagingMode::None);
    assert_eq!(
        (r.cr0 & bits::CR0_PE, r.cr0 & bits::CR0_PG),
        (bits::CR0_PE, 0)
    );
    assert_eq!((r.efer, r.cr4, r.cr3), (0, 0, 0));
    assert_eq!(r.rflags, 2, "IF, VM clear; bit 1 alone");
    assert_eq!(r.rip, 0x10_0000);
    assert_eq!(r.gpr[gpr::RAX], 0x2bad_b002);
    assert_eq!(r.gpr[gpr::RBX], INFO_ADDR);
    for s in [r.cs, r.ds, r.es, r.fs, r.gs, r.ss] {
        assert_eq!((s.base, s.limit), (0, 0xffff_ffff));
        assert_ne!(s.ar & bits::AR_DB, 0);
        assert_eq!(s.ar & bits::AR_L, 0);
    }
    assert_eq!(r.cs.ar & 0xff, 0x9b, "read/execute code");
    assert_eq!(r.ds.ar & 0xff, 0x93, "read/write data");
    assert_eq!((r.gdtr.base, r.gdtr.limit), (u64::from(l.gdt), 23));
    assert!(r.mtd.contains(
        Mtd::GPRS | Mtd::RIP_LEN | Mtd::RFLAGS | Mtd::CR | Mtd::EFER | Mtd::CS_SS | Mtd::DS_ES
    ));
}
