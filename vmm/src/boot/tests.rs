//! The boot protocol on synthetic bzImages and a mock vCPU.

use std::vec;
use std::vec::Vec;

use super::*;
use crate::testutil::MockVcpu;
use crate::vcpu::{self, Access, PagingMode};

const RAM_TOP: u64 = 0x200_0000;

/// A bzImage with `setup_sects` sectors of setup and `kernel` after them.
fn image(setup_sects: u8, kernel: &[u8], f: impl FnOnce(&mut SetupHeader)) -> Vec<u8> {
    let sects = if setup_sects == 0 { 4 } else { setup_sects } as usize;
    let mut img = vec![0u8; (sects + 1) * 512];
    img.extend_from_slice(kernel);
    let mut h = SetupHeader::zeroed();
    h.setup_sects = setup_sects;
    h.boot_flag = 0xaa55;
    h.jump = 0xeb | ((0x26c - 0x202) << 8);
    h.header = u32::from_le_bytes(*b"HdrS");
    h.version = 0x020f;
    h.loadflags = 1;
    h.xloadflags = 1;
    h.syssize = kernel.len().div_ceil(16) as u32;
    h.cmdline_size = 2047;
    h.initrd_addr_max = 0x7fff_ffff;
    h.pref_address = 0x100_0000;
    h.init_size = 0x20_0000;
    h.kernel_alignment = 0x20_0000;
    f(&mut h);
    h.write_to(&mut img[0x1f1..]);
    img
}

fn regions() -> Vec<E820Entry> {
    vec![
        E820Entry {
            addr: 0,
            size: 0x9_fc00,
            typ: e820::RAM,
        },
        E820Entry {
            addr: 0xf_0000,
            size: 0x1_0000,
            typ: e820::RESERVED,
        },
        E820Entry {
            addr: 0x10_0000,
            size: RAM_TOP - 0x10_0000,
            typ: e820::RAM,
        },
    ]
}

#[test]
fn parses_a_64bit_bzimage() {
    let kernel: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    let img = image(0, &kernel, |_| {});
    let bz = parse(&img).unwrap();
    assert_eq!(
        bz.kernel.len(),
        4096,
        "setup_sects 0 means 4: kernel at 0xa00"
    );
    assert_eq!(bz.kernel[..4], [0, 1, 2, 3]);
    assert_eq!(bz.load_addr(), 0x100_0000);
    assert_eq!(bz.init_size(), 0x20_0000);
    assert_eq!(bz.header_bytes.len(), 0x26c - 0x1f1);
    let img = image(27, &kernel, |h| h.pref_address = 0);
    let bz = parse(&img).unwrap();
    assert_eq!(bz.kernel.len(), 4096);
    assert_eq!(bz.load_addr(), DEFAULT_LOAD_ADDR);
}

#[test]
fn refuses_what_is_not_a_loadable_64bit_bzimage() {
    let k = [0u8; 64];
    assert_eq!(parse(&[0u8; 100]).err(), Some(BootError::TooShort));
    assert_eq!(parse(&[0u8; 4096]).err(), Some(BootError::NotBzImage));
    type Edit = fn(&mut SetupHeader);
    let cases: [(Edit, BootError); 5] = [
        (|h| h.header = 0x1234, BootError::NotBzImage),
        (|h| h.boot_flag = 0, BootError::NotBzImage),
        (
            |h| h.version = 0x020b,
            BootError::ProtocolTooOld { version: 0x020b },
        ),
        (|h| h.loadflags = 0, BootError::NotLoadedHigh),
        (|h| h.xloadflags = 2, BootError::No64BitEntry),
    ];
    for (f, want) in cases {
        assert_eq!(parse(&image(1, &k, f)).err(), Some(want));
    }
    let mut img = image(1, &k, |h| h.syssize = 100);
    assert_eq!(
        parse(&img).err(),
        Some(BootError::Truncated {
            need: 1024 + 1600,
            have: 1024 + 64
        })
    );
    img.truncate(700);
    assert!(matches!(parse(&img), Err(BootError::Truncated { .. })));
    assert!(std::format!("{}", BootError::ProtocolTooOld { version: 0x020b }).contains("2.11"));
    // An ELF file, say.
    let mut elf = vec![0u8; 8192];
    elf[..4].copy_from_slice(b"\x7fELF");
    assert_eq!(parse(&elf).err(), Some(BootError::NotBzImage));
}

#[test]
fn loads_kernel_cmdline_initrd_and_zero_page() {
    let kernel = [0x90u8; 3000];
    let img = image(4, &kernel, |h| h.initrd_addr_max = 0x1ff_ffff);
    let bz = parse(&img).unwrap();
    let mut v = MockVcpu::new(RAM_TOP as usize);
    let rd = vec![0x5au8; 0x1800];
    let info = load(&mut v, &bz, &regions(), b"console=ttyS0 quiet", Some(&rd)).unwrap();
    assert_eq!(info.entry, 0x100_0200);
    assert_eq!(info.zero_page, ZERO_PAGE_ADDR);
    // The initrd is as high as RAM and initrd_addr_max allow, page-aligned.
    let (at, size) = info.initrd.unwrap();
    assert_eq!((at, size), (0x200_0000 - 0x2000, 0x1800));
    assert_eq!(v.mem[at as usize], 0x5a);
    assert_eq!(v.mem[0x100_0000..0x100_0000 + 3000], kernel);
    assert_eq!(&v.mem[0x20000..0x20014], b"console=ttyS0 quiet\0");

    let zp = &v.mem[ZERO_PAGE_ADDR as usize..][..4096];
    let bp = BootParams::from_bytes(zp).unwrap();
    let h = bp.hdr;
    assert_eq!({ h.type_of_loader }, 0xff);
    assert_eq!({ h.cmd_line_ptr }, 0x20000);
    assert_eq!({ h.ramdisk_image }, at as u32);
    assert_eq!({ h.ramdisk_size }, 0x1800);
    assert_eq!({ h.version }, 0x020f, "header copied from the image");
    assert_eq!(&zp[0x202..0x206], b"HdrS");
    assert_eq!(zp[0x210], 0xff);
    assert_eq!(zp[0x1e8], 3);
    assert_eq!(&zp[0x2d0 + 20..0x2d0 + 28], &0xf_0000u64.to_le_bytes());
    assert_eq!({ bp.e820(2).typ }, e820::RAM);
    assert_eq!({ bp.e820(2).addr }, 0x10_0000);

    // The vCPU state walks the identity tables: low memory and the APIC page.
    let mut regs = ArchState::default();
    entry_state(&mut regs, &info);
    assert_eq!(vcpu::paging_mode(&regs), PagingMode::Level4);
    assert_eq!(vcpu::code_bits(&regs), 64);
    assert_eq!(regs.gpr[vcpu::gpr::RSI], ZERO_PAGE_ADDR);
    assert_eq!(regs.rip, 0x100_0200);
    for va in [0x100_0200u64, 0x7000, 0xfee0_0030, 0xffff_f000] {
        assert_eq!(vcpu::translate(&mut v, &regs, va, Access::WRITE), Ok(va));
    }
    assert!(vcpu::translate(&mut v, &regs, 0x1_0000_0000, Access::READ).is_err());
    // The GDT's code descriptor is 64-bit (L set, D clear).
    let cs = u64::from_le_bytes(v.mem[0x510..0x518].try_into().unwrap());
    assert_eq!((cs >> 53) & 3, 1);
}

#[test]
fn load_errors() {
    let kernel = [0u8; 512];
    let bz_img = image(1, &kernel, |h| h.cmdline_size = 8);
    let bz = parse(&bz_img).unwrap();
    let mut v = MockVcpu::new(RAM_TOP as usize);
    assert_eq!(
        load(&mut v, &bz, &regions(), b"123456789", None),
        Err(BootError::CmdlineTooLong { len: 10, max: 9 })
    );
    assert!(load(&mut v, &bz, &regions(), b"12345678", None).is_ok());
    // The kernel's init_size runs past RAM.
    let big = image(1, &kernel, |h| h.init_size = 0x1000_0000);
    assert!(matches!(
        load(&mut v, &parse(&big).unwrap(), &regions(), b"", None),
        Err(BootError::DoesNotFit { what: "kernel", .. })
    ));
    // No room for the initrd above the kernel.
    let rd = vec![0u8; 0x100_0000];
    assert!(matches!(
        load(&mut v, &bz, &regions(), b"", Some(&rd)),
        Err(BootError::DoesNotFit { what: "initrd", .. })
    ));
    let many = vec![
        E820Entry {
            addr: 0,
            size: 0x1000,
            typ: e820::RAM
        };
        129
    ];
    assert_eq!(
        load(&mut v, &bz, &many, b"", None),
        Err(BootError::TooManyRegions(129))
    );
    // RAM the regions claim but the platform lacks.
    let mut small = MockVcpu::new(0x100_0000);
    assert_eq!(
        load(&mut small, &bz, &regions(), b"", None),
        Err(BootError::Unbacked(0x100_0000))
    );
}

#[test]
fn struct_round_trip() {
    let mut h = SetupHeader::zeroed();
    h.pref_address = 0x1122_3344_5566_7788;
    h.init_size = 0xdead_beef;
    let mut b = [0u8; SetupHeader::SIZE];
    h.write_to(&mut b);
    assert_eq!(
        &b[0x258 - 0x1f1..0x260 - 0x1f1],
        &0x1122_3344_5566_7788u64.to_le_bytes()
    );
    let back = SetupHeader::from_bytes(&b).unwrap();
    assert_eq!({ back.init_size }, 0xdead_beef);
    assert!(SetupHeader::from_bytes(&b[1..]).is_none());
}

#[test]
fn a_file_ending_inside_the_setup_code_is_truncated() {
    // syssize 0 and a file a few bytes short of its setup sectors: found by the
    // bzimage fuzz target (it panicked slicing the kernel).
    let mut img = image(2, &[], |h| h.syssize = 0);
    img.truncate(3 * 512 - 11);
    assert_eq!(
        parse(&img).err(),
        Some(BootError::Truncated {
            need: 3 * 512,
            have: 3 * 512 - 11
        })
    );
}
