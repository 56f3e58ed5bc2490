//! The PC with a Multiboot guest: its entry, its information, its refusals, and the
//! ACPI tables such a guest finds by scanning.

use super::*;
use crate::boot::multiboot;

/// A Multiboot image with the address fields: the header, then `code` at its entry,
/// loaded at 2 MiB.
fn multiboot_image(code: &[u8]) -> Vec<u8> {
    const LOAD: u32 = 0x20_0000;
    let flags = multiboot::header_flags::ADDRESS_FIELDS | multiboot::header_flags::MEMORY_INFO;
    let mut img = Vec::new();
    for w in [
        multiboot::HEADER_MAGIC,
        flags,
        0u32.wrapping_sub(multiboot::HEADER_MAGIC)
            .wrapping_sub(flags),
        LOAD,          // header_addr
        LOAD,          // load_addr
        0,             // load_end_addr: the whole file
        LOAD + 0x1000, // bss_end_addr
        LOAD + 32,     // entry_addr: right after the header
    ] {
        img.extend_from_slice(&w.to_le_bytes());
    }
    img.extend_from_slice(code);
    img
}

fn multiboot_pc(
    vcpus: u32,
    image: &[u8],
    modules: &[multiboot::Module<'_>],
) -> Result<(Pc, SharedMem), PcError> {
    let mut mem = SharedMem::new(RAM as usize);
    let pc = Pc::new_multiboot(
        PcConfig {
            vcpus,
            ram: RAM,
            tsc_hz: 1_000_000_000,
            wall_secs: 0,
        },
        &mut mem,
        image,
        b"console=com1",
        modules,
        None::<RamDisk>,
        Vec::<Vec<u8>>::new(),
        Arc::new(ManualClock::new(0)),
        Arc::new(Kicks::default()),
        host_cpuid,
    )?;
    Ok((pc, mem))
}

fn u32_in(mem: &SharedMem, gpa: u64) -> u32 {
    u32::from_le_bytes(mem.bytes(gpa, 4).try_into().unwrap())
}

/// The BSP of a Multiboot PC starts at the image's entry in 32-bit protected mode
/// without paging, EAX = 0x2BADB002 and EBX at the information structure; its first
/// instructions, MMIO accesses through absolute 32-bit addresses (which 64-bit code
/// would decode as RIP-relative), run as 32-bit code and see EAX and EBX.
#[test]
fn a_multiboot_image_runs_in_32bit_mode_with_eax_and_ebx_set() {
    const TMICT: u32 = 0xfee0_0380;
    let a = TMICT.to_le_bytes();
    let code = [
        [0x89, 0x05], // mov [TMICT], eax
        [0x8b, 0x0d], // mov ecx, [TMICT]
        [0x89, 0x1d], // mov [TMICT], ebx
        [0x8b, 0x15], // mov edx, [TMICT]
    ]
    .iter()
    .flat_map(|op| op.iter().chain(&a).copied().collect::<Vec<u8>>())
    .collect::<Vec<u8>>();
    let module = [0x5au8; 100];
    let modules = [multiboot::Module {
        data: &module,
        cmdline: b"env.txt",
    }];
    let (pc, mem) = multiboot_pc(2, &multiboot_image(&code), &modules).unwrap();
    assert!(pc.boot_info().is_none());
    let PcEntry::Multiboot(loaded) = *pc.entry() else {
        panic!("not a Multiboot entry")
    };
    let mut v = MockVcpu::new(0x40_0000);
    v.mem.copy_from_slice(&mem.bytes(0, 0x40_0000));
    assert_eq!(exit(&pc, &mut v, ev::STARTUP), Step::Resume);
    assert_eq!(v.regs.rip, 0x20_0020);
    assert_eq!(crate::vcpu::code_bits(&v.regs), 32);
    assert_eq!(v.regs.cr0 & (bits::CR0_PE | bits::CR0_PG), bits::CR0_PE);
    assert_eq!((v.regs.efer, v.regs.rflags), (0, 2));
    assert_eq!(v.regs.gpr[gpr::RAX], 0x2bad_b002);
    let info = v.regs.gpr[gpr::RBX];
    assert_eq!(info, u64::from(loaded.info));

    for (write, reg, want) in [
        (true, gpr::RAX, 0),
        (false, gpr::RCX, 0x2bad_b002),
        (true, gpr::RBX, 0),
        (false, gpr::RDX, info),
    ] {
        let rip = v.regs.rip;
        v.regs
            .set_qual([if write { 2 } else { 0 }, u64::from(TMICT)]);
        assert_eq!(exit(&pc, &mut v, ev::NPT_FAULT), Step::Resume);
        assert_eq!(v.regs.inj_info, 0, "no fault");
        assert_eq!(v.regs.rip, rip + 6, "a 6-byte instruction");
        if !write {
            assert_eq!(v.regs.gpr[reg], want);
        }
    }

    // The information: the PC's memory map, the command line, the module after the
    // image's bss.
    let map = memory_map(RAM);
    assert_eq!(u32_in(&mem, info + 8), ((RAM - 0x10_0000) / 1024) as u32);
    assert_eq!(
        u32_in(&mem, info + 44),
        4 * 24,
        "every entry of the memory map"
    );
    let mmap = u64::from(u32_in(&mem, info + 48));
    for (i, r) in map.iter().enumerate() {
        let e = mem.bytes(mmap + 24 * i as u64, 24);
        assert_eq!(u64::from_le_bytes(e[4..12].try_into().unwrap()), { r.addr });
        assert_eq!(u64::from_le_bytes(e[12..20].try_into().unwrap()), {
            r.size
        });
        assert_eq!(u32::from_le_bytes(e[20..24].try_into().unwrap()), { r.typ });
    }
    let cmd = u64::from(u32_in(&mem, info + 16));
    assert_eq!(mem.bytes(cmd, 13), b"console=com1\0");
    assert_eq!(u32_in(&mem, info + 20), 1);
    let m = u64::from(u32_in(&mem, info + 24));
    assert_eq!(
        (u32_in(&mem, m), u32_in(&mem, m + 4)),
        (0x20_1000, 0x20_1064)
    );
    assert_eq!(mem.bytes(0x20_1000, 100), module);

    // The other vCPU still waits for its SIPI: real mode.
    let mut ap = vcpu();
    checked_exit(&mut ap, true, |ap| pc.handle(ap, 1, Exit::Startup));
    assert_eq!(ap.regs.cr0 & bits::CR0_PE, 0);
}

#[test]
fn a_bad_multiboot_image_is_refused_with_its_reason() {
    let mut img = multiboot_image(&[0xf4]);
    img[8] ^= 1;
    let e = multiboot_pc(1, &img, &[]).err().unwrap();
    assert!(matches!(
        e,
        PcError::Multiboot(MultibootError::BadChecksum { .. })
    ));
    assert!(e.to_string().starts_with("Multiboot image: "), "{e}");
    // A bzImage is not a Multiboot image.
    let e = multiboot_pc(1, &bzimage(), &[]).err().unwrap();
    assert_eq!(e, PcError::Multiboot(MultibootError::NoHeader));
}

/// A guest without a pointer to the RSDP (a Multiboot guest) scans the BIOS area for
/// it on 16-byte boundaries: it is there with good checksums, and its XSDT's MADT has a
/// local APIC for every vCPU.
#[test]
fn the_rsdp_is_in_the_bios_area_and_the_madt_lists_every_vcpu() {
    let (_pc, mem) = multiboot_pc(5, &multiboot_image(&[0xf4]), &[]).unwrap();
    let sum = |b: &[u8]| b.iter().fold(0u8, |a, &x| a.wrapping_add(x));
    let rsdp = (0xe_0000..0x10_0000u64)
        .step_by(16)
        .find(|&a| mem.bytes(a, 8) == b"RSD PTR ")
        .expect("no RSDP in 0xe0000-0xfffff");
    let r = mem.bytes(rsdp, 36);
    assert_eq!(sum(&r[..20]), 0, "RSDP checksum");
    assert_eq!(sum(&r), 0, "RSDP extended checksum");
    let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
    let len = u32_in(&mem, xsdt + 4) as usize;
    let x = mem.bytes(xsdt, len);
    assert_eq!(&x[..4], b"XSDT");
    let madt = x[36..]
        .chunks(8)
        .map(|p| u64::from_le_bytes(p.try_into().unwrap()))
        .find(|&t| mem.bytes(t, 4) == b"APIC")
        .expect("no MADT");
    let m = mem.bytes(madt, u32_in(&mem, madt + 4) as usize);
    assert_eq!(sum(&m), 0, "MADT checksum");
    let mut ids = Vec::new();
    let mut p = 44;
    while p < m.len() {
        let (typ, len) = (m[p], m[p + 1] as usize);
        if typ == 0 {
            assert_eq!(m[p + 4] & 1, 1, "enabled");
            ids.push(m[p + 3]);
        }
        p += len;
    }
    assert_eq!(ids, [0, 1, 2, 3, 4]);
}
