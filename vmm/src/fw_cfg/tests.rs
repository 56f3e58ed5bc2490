use super::*;
use crate::boot::e820;
use crate::bus::Bus;
use crate::sync::SpinLock;
use crate::testutil::SharedMem;
use alloc::sync::Arc;
use std::string::ToString;

const RAM: u64 = 256 << 20;

fn map() -> Vec<E820Entry> {
    crate::pc::memory_map(RAM).to_vec()
}

fn device() -> FwCfg {
    let m = map();
    FwCfg::pc(&MachineInfo {
        ram: RAM,
        vcpus: 2,
        max_cpus: 4,
        e820: &m,
        uuid: *b"0123456789abcdef",
    })
}

/// The device on a port bus as the PC puts it.
fn on_bus(f: FwCfg) -> (Bus, Arc<SpinLock<FwCfg>>) {
    let f = Arc::new(SpinLock::new(f));
    let mut bus = Bus::new();
    bus.insert(SELECTOR_PORT, PORTS_LEN, f.clone()).unwrap();
    bus.insert(DMA_PORT, DMA_LEN, f.clone()).unwrap();
    (bus, f)
}

/// `out dx, ax` to the selector.
fn select(bus: &Bus, key: u16) {
    assert_eq!(bus.write(SELECTOR_PORT, &key.to_le_bytes()), Ok(None));
}

/// `n` single-byte `in al, dx` from the data port.
fn read(bus: &Bus, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            let mut b = [0xaa];
            bus.read(DATA_PORT, &mut b).unwrap();
            b[0]
        })
        .collect()
}

/// The item under `key` read through the ports, 16 bytes past its end.
fn item(bus: &Bus, key: u16, len: usize) -> Vec<u8> {
    select(bus, key);
    let v = read(bus, len + 16);
    assert_eq!(v[len..], [0; 16], "key {key:#x} reads 0 past its end");
    v[..len].to_vec()
}

fn le16(v: u16) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn le32(v: u32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

#[test]
fn every_key_reads_its_item_then_zeros() {
    let mut f = device();
    f.set_boot(&BootItems {
        kernel: Some((0x10_0000, 0x4_2000)),
        entry: Some(0x10_000c),
        cmdline: Some((0x9_0000, b"console=ttyS0 x".to_vec())),
        initrd: Some((0x800_0000, 0x1234)),
    });
    let (bus, _) = on_bus(f);
    let mut numa = vec![0u8; 8 * 5];
    numa[0] = 0;
    let want: &[(u16, Vec<u8>)] = &[
        (key::SIGNATURE, b"QEMU".to_vec()),
        (key::ID, le32(ID_TRADITIONAL)),
        (key::UUID, b"0123456789abcdef".to_vec()),
        (key::RAM_SIZE, RAM.to_le_bytes().to_vec()),
        (key::NOGRAPHIC, le16(1)),
        (key::NB_CPUS, le16(2)),
        (key::MACHINE_ID, le16(0)),
        (key::KERNEL_ADDR, le32(0x10_0000)),
        (key::KERNEL_SIZE, le32(0x4_2000)),
        (key::INITRD_ADDR, le32(0x800_0000)),
        (key::INITRD_SIZE, le32(0x1234)),
        (key::NUMA, numa),
        (key::BOOT_MENU, le16(0)),
        (key::MAX_CPUS, le16(4)),
        (key::KERNEL_ENTRY, le32(0x10_000c)),
        (key::CMDLINE_ADDR, le32(0x9_0000)),
        (key::CMDLINE_SIZE, le32(16)),
        (key::CMDLINE_DATA, b"console=ttyS0 x\0".to_vec()),
        (key::IRQ0_OVERRIDE, le32(1)),
    ];
    for (k, v) in want {
        assert_eq!(&item(&bus, *k, v.len()), v, "key {k:#x}");
    }
    // The keys the PC leaves out read 0 from the first byte: kvm-unit-tests' MAX_RAM
    // (QEMU's KERNEL_DATA) is 0, "no limit".
    for k in [
        key::KERNEL_CMDLINE,
        key::BOOT_DEVICE,
        key::KERNEL_DATA,
        key::INITRD_DATA,
        key::SETUP_ADDR,
        key::SETUP_SIZE,
        key::SETUP_DATA,
        0x1a,
        0x1f,
        key::ARCH_LOCAL,
        key::ARCH_LOCAL + 1,
        key::ARCH_LOCAL + 3,
    ] {
        assert_eq!(item(&bus, k, 0), [], "key {k:#x}");
    }
    // The well-known items every fw_cfg has are there without set_boot too.
    let (bus, _) = on_bus(device());
    assert_eq!(item(&bus, key::KERNEL_ADDR, 0), []);
    assert_eq!(item(&bus, key::CMDLINE_SIZE, 0), []);
    assert_eq!(item(&bus, key::RAM_SIZE, 8), RAM.to_le_bytes());
}

#[test]
fn bad_selectors_read_zero_and_the_write_bit_is_masked() {
    let (bus, _) = on_bus(device());
    for k in [key::INVALID, 0x3fff, 0xbfff, 0x7fff, 0x2f, 0x1000] {
        assert_eq!(item(&bus, k, 0), [], "key {k:#x}");
    }
    // Bit 14 (the old write channel) selects the same item.
    assert_eq!(item(&bus, key::WRITE_CHANNEL | key::NB_CPUS, 2), le16(2));
    assert_eq!(item(&bus, key::WRITE_CHANNEL | key::SIGNATURE, 4), b"QEMU");
    assert_eq!(
        item(&bus, key::WRITE_CHANNEL | key::IRQ0_OVERRIDE, 4),
        le32(1)
    );
    // Bit 15 is a different space: 0x8000 | NB_CPUS is no item.
    assert_eq!(item(&bus, key::ARCH_LOCAL | key::NB_CPUS, 0), []);
}

#[test]
fn selecting_restarts_and_data_writes_are_ignored() {
    let (bus, f) = on_bus(device());
    select(&bus, key::SIGNATURE);
    assert_eq!(read(&bus, 2), b"QE");
    // Byte writes to either port are data writes: no effect, not even on the offset.
    bus.write(DATA_PORT, &[0x55]).unwrap();
    bus.write(SELECTOR_PORT, &[key::NB_CPUS as u8]).unwrap();
    assert_eq!(read(&bus, 1), b"M");
    // Reselecting the same key starts over.
    select(&bus, key::SIGNATURE);
    assert_eq!(read(&bus, 4), b"QEMU");
    // Past the end the offset stays put: 0 however often.
    assert_eq!(read(&bus, 100), [0; 100]);
    select(&bus, key::SIGNATURE);
    // A byte read of the selector port reads data too, and a word read two bytes.
    let mut b = [0u8; 1];
    bus.read(SELECTOR_PORT, &mut b).unwrap();
    assert_eq!(b, *b"Q");
    let mut w = [0u8; 2];
    bus.read(SELECTOR_PORT, &mut w).unwrap();
    assert_eq!(w, *b"EM");
    // A dword at the selector runs past the pair: not the device's.
    assert!(bus.write(SELECTOR_PORT, &[0; 4]).is_err());
    assert_eq!(f.lock().read_data(), b'U');
    assert_eq!(f.lock().read_data(), 0);
    // The direct interface agrees with the ports.
    assert_eq!(f.lock().item(key::NB_CPUS), Some(&le16(2)[..]));
    assert_eq!(f.lock().item(0x4005), Some(&le16(2)[..]));
    assert_eq!(f.lock().item(0x1000), None);
}

#[test]
fn file_directory_is_big_endian_sorted_by_name() {
    let mut f = device();
    assert_eq!(f.add_file("opt/z", vec![1, 2, 3]), Ok(0x21));
    assert_eq!(
        f.add_file("bootorder", b"/pci@i0cf8/x\0".to_vec()),
        Ok(0x22)
    );
    assert_eq!(f.add_file("opt/a", Vec::new()), Ok(0x23));
    let long = "n".repeat(FILE_NAME_MAX - 1);
    assert_eq!(f.add_file(&long, vec![9]), Ok(0x24));
    // Refused: a taken name, names without room for their NUL, empty, with a NUL.
    assert_eq!(f.add_file("opt/z", vec![]), Err(FwCfgError::Exists));
    assert_eq!(
        f.add_file(&"n".repeat(FILE_NAME_MAX), vec![]),
        Err(FwCfgError::BadName)
    );
    assert_eq!(f.add_file("", vec![]), Err(FwCfgError::BadName));
    assert_eq!(f.add_file("a\0b", vec![]), Err(FwCfgError::BadName));
    // Items set by key cannot take the device's own keys or files'.
    for k in [
        key::SIGNATURE,
        key::ID,
        key::FILE_DIR,
        0x20,
        0x21,
        0x3fff,
        0x4019,
    ] {
        assert_eq!(f.set(k, vec![1]), Err(FwCfgError::Reserved(k)));
    }
    assert_eq!(f.set(key::BOOT_MENU | key::WRITE_CHANNEL, le16(1)), Ok(()));
    assert_eq!(f.item(key::BOOT_MENU), Some(&le16(1)[..]));

    let (bus, _) = on_bus(f);
    select(&bus, key::FILE_DIR);
    let count = u32::from_be_bytes(read(&bus, 4).try_into().unwrap());
    assert_eq!(count, 5);
    let entries: Vec<(u32, u16, u16, std::string::String)> = (0..count)
        .map(|_| {
            let e = read(&bus, DIR_ENTRY_SIZE);
            let name = &e[8..];
            let end = name.iter().position(|&b| b == 0).unwrap();
            assert!(name[end..].iter().all(|&b| b == 0), "NUL-padded");
            (
                u32::from_be_bytes(e[0..4].try_into().unwrap()),
                u16::from_be_bytes(e[4..6].try_into().unwrap()),
                u16::from_be_bytes(e[6..8].try_into().unwrap()),
                std::str::from_utf8(&name[..end]).unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(read(&bus, 8), [0; 8], "nothing after the last entry");
    let e820_size = 20 * map().len() as u32;
    assert_eq!(
        entries,
        [
            (13, 0x22, 0, "bootorder".to_string()),
            (e820_size, 0x20, 0, "etc/e820".to_string()),
            (1, 0x24, 0, long.clone()),
            (0, 0x23, 0, "opt/a".to_string()),
            (3, 0x21, 0, "opt/z".to_string()),
        ]
    );
    // Each entry's key selects its file.
    assert_eq!(item(&bus, 0x21, 3), [1, 2, 3]);
    assert_eq!(item(&bus, 0x24, 1), [9]);
    assert_eq!(item(&bus, 0x23, 0), []);
}

#[test]
fn a_bare_device_has_an_empty_directory() {
    let (bus, _) = on_bus(FwCfg::new());
    assert_eq!(item(&bus, key::FILE_DIR, 4), [0; 4]);
    assert_eq!(item(&bus, key::SIGNATURE, 4), b"QEMU");
    assert_eq!(item(&bus, key::ID, 4), le32(1));
    assert_eq!(item(&bus, key::RAM_SIZE, 0), []);
}

#[test]
fn e820_is_the_pcs_memory_map() {
    let f = device();
    let (k, data) = f.file("etc/e820").unwrap();
    assert_eq!(k, key::FILE_FIRST);
    let m = map();
    assert_eq!(data.len(), 20 * m.len());
    let entries: Vec<(u64, u64, u32)> = data
        .chunks_exact(20)
        .map(|c| {
            (
                u64::from_le_bytes(c[0..8].try_into().unwrap()),
                u64::from_le_bytes(c[8..16].try_into().unwrap()),
                u32::from_le_bytes(c[16..20].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            (0, 0x9_fc00, e820::RAM),
            (0x9_fc00, 0x10_0000 - 0x9_fc00, e820::RESERVED),
            (0x10_0000, RAM - 0x10_0000, e820::RAM),
            (
                crate::pci::PciLayout::DEFAULT.e820_reserved().0,
                crate::pci::PciLayout::DEFAULT.e820_reserved().1,
                e820::RESERVED
            ),
        ]
    );
    assert_eq!(e820_file(&[]), []);
}

// --- DMA ---

const ACCESS: u64 = 0x1000;
const BUF: u64 = 0x2000;
const MEM: usize = 0x10_000;

fn dma_setup() -> (Bus, SharedMem) {
    let mem = SharedMem::new(MEM);
    let mut f = device().with_dma(mem.clone());
    f.add_file("opt/blob", (0..=255u8).collect()).unwrap();
    (on_bus(f).0, mem)
}

fn put(mem: &SharedMem, gpa: u64, b: &[u8]) {
    mem.0.lock()[gpa as usize..gpa as usize + b.len()].copy_from_slice(b);
}

/// Writes an access at `at` and starts it with the two halves of the address register;
/// the control word left.
fn transfer_at(bus: &Bus, mem: &SharedMem, at: u64, control: u32, len: u32, addr: u64) -> u32 {
    let mut a = Vec::new();
    a.extend_from_slice(&control.to_be_bytes());
    a.extend_from_slice(&len.to_be_bytes());
    a.extend_from_slice(&addr.to_be_bytes());
    if at + 16 <= MEM as u64 {
        put(mem, at, &a);
    }
    // `outl` of the big-endian halves: high at 0x514, low at 0x518 (which starts it).
    bus.write(DMA_PORT, &((at >> 32) as u32).to_be_bytes())
        .unwrap();
    bus.write(DMA_PORT + 4, &(at as u32).to_be_bytes()).unwrap();
    if at + 4 <= MEM as u64 {
        u32::from_be_bytes(mem.bytes(at, 4).try_into().unwrap())
    } else {
        u32::MAX
    }
}

fn transfer(bus: &Bus, mem: &SharedMem, control: u32, len: u32, addr: u64) -> u32 {
    transfer_at(bus, mem, ACCESS, control, len, addr)
}

fn sel(key: u16) -> u32 {
    u32::from(key) << 16 | dma::SELECT
}

#[test]
fn dma_register_reads_its_signature_and_id_says_dma() {
    let (bus, _) = dma_setup();
    let mut q = [0u8; 4];
    bus.read(DMA_PORT, &mut q).unwrap();
    assert_eq!(&q, b"QEMU");
    bus.read(DMA_PORT + 4, &mut q).unwrap();
    assert_eq!(&q, b" CFG");
    let mut b = [0u8; 1];
    bus.read(DMA_PORT + 7, &mut b).unwrap();
    assert_eq!(&b, b"G");
    assert_eq!(item(&bus, key::ID, 4), le32(ID_TRADITIONAL | ID_DMA));
    // Without DMA: ID bit 0 only, and the register is not there.
    let (bus, f) = on_bus(device());
    assert!(!f.lock().has_dma());
    assert_eq!(item(&bus, key::ID, 4), le32(1));
    let mut q = [0u8; 4];
    f.lock().read(DMA_PORT, 0, &mut q);
    assert_eq!(q, [0xff; 4]);
    assert_eq!(f.lock().write(DMA_PORT, 4, &[0; 4]), None);
}

#[test]
fn dma_select_read_and_skip() {
    let (bus, mem) = dma_setup();
    let blob = 0x21;
    // Select and read 16 bytes.
    assert_eq!(transfer(&bus, &mem, sel(blob) | dma::READ, 16, BUF), 0);
    assert_eq!(mem.bytes(BUF, 16), (0..16u8).collect::<Vec<_>>());
    // Read on from the offset without selecting.
    assert_eq!(transfer(&bus, &mem, dma::READ, 4, BUF), 0);
    assert_eq!(mem.bytes(BUF, 4), [16, 17, 18, 19]);
    // Skip 100, read 2: 120 and 121.
    assert_eq!(transfer(&bus, &mem, dma::SKIP, 100, 0), 0);
    assert_eq!(transfer(&bus, &mem, dma::READ, 2, BUF), 0);
    assert_eq!(mem.bytes(BUF, 2), [120, 121]);
    // The port interface shares the offset.
    assert_eq!(read(&bus, 1), [122]);
    // Read across the end: the rest, then zeros; after that, all zeros.
    put(&mem, BUF, &[0xee; 300]);
    assert_eq!(transfer(&bus, &mem, sel(blob) | dma::SKIP, 250, 0), 0);
    assert_eq!(transfer(&bus, &mem, dma::READ, 10, BUF), 0);
    assert_eq!(
        mem.bytes(BUF, 11),
        [250, 251, 252, 253, 254, 255, 0, 0, 0, 0, 0xee]
    );
    put(&mem, BUF, &[0xee; 300]);
    assert_eq!(transfer(&bus, &mem, dma::READ, 300, BUF), 0);
    assert_eq!(mem.bytes(BUF, 300), [0; 300]);
    // Skipping past the end is no error.
    assert_eq!(transfer(&bus, &mem, sel(blob) | dma::SKIP, 1000, 0), 0);
    // Select alone, then read over the port.
    assert_eq!(transfer(&bus, &mem, sel(key::SIGNATURE), 99, BUF), 0);
    assert_eq!(read(&bus, 4), b"QEMU");
    // A read of a key without an item fills zeros.
    put(&mem, BUF, &[0xee; 8]);
    assert_eq!(transfer(&bus, &mem, sel(0x1234) | dma::READ, 8, BUF), 0);
    assert_eq!(mem.bytes(BUF, 8), [0; 8]);
    // The directory and e820 through DMA, as firmware reads them.
    assert_eq!(
        transfer(&bus, &mem, sel(key::FILE_DIR) | dma::READ, 4, BUF),
        0
    );
    assert_eq!(mem.bytes(BUF, 4), 2u32.to_be_bytes());
    assert_eq!(transfer(&bus, &mem, sel(0x20) | dma::READ, 80, BUF), 0);
    assert_eq!(mem.bytes(BUF, 80), e820_file(&map()));
    // Zero length does nothing but select.
    assert_eq!(transfer(&bus, &mem, sel(blob) | dma::READ, 0, BUF), 0);
    assert_eq!(read(&bus, 2), [0, 1]);
}

#[test]
fn dma_errors() {
    let (bus, mem) = dma_setup();
    // Writes: no item is writable, past the end neither; zero length is fine.
    assert_eq!(
        transfer(&bus, &mem, sel(0x21) | dma::WRITE, 4, BUF),
        dma::ERROR
    );
    assert_eq!(
        transfer(&bus, &mem, sel(0x1234) | dma::WRITE, 4, BUF),
        dma::ERROR
    );
    assert_eq!(transfer(&bus, &mem, sel(0x21) | dma::WRITE, 0, BUF), 0);
    // READ wins over WRITE and SKIP.
    assert_eq!(
        transfer(
            &bus,
            &mem,
            sel(0x21) | dma::READ | dma::WRITE | dma::SKIP,
            2,
            BUF
        ),
        0
    );
    assert_eq!(mem.bytes(BUF, 2), [0, 1]);
    // The guest's error bit on input is no error.
    assert_eq!(
        transfer(&bus, &mem, sel(0x21) | dma::ERROR | dma::READ, 2, BUF),
        0
    );
    // No control bits: nothing happens.
    assert_eq!(transfer(&bus, &mem, 0, 2, BUF), 0);
    // A destination outside RAM, or running out of it, or wrapping.
    assert_eq!(
        transfer(&bus, &mem, sel(0x21) | dma::READ, 4, 1 << 40),
        dma::ERROR
    );
    assert_eq!(
        transfer(&bus, &mem, sel(0x21) | dma::READ, 32, MEM as u64 - 16),
        dma::ERROR
    );
    assert_eq!(
        transfer(&bus, &mem, sel(0x21) | dma::READ, 32, u64::MAX - 8),
        dma::ERROR
    );
    assert_eq!(
        transfer(&bus, &mem, sel(0x1234) | dma::READ, 32, u64::MAX - 8),
        dma::ERROR,
        "zero fill past the end of RAM"
    );
    // An access structure outside RAM: nothing to read, nothing written back.
    let before = mem.bytes(0, MEM);
    transfer_at(&bus, &mem, 1 << 33, sel(0x21) | dma::READ, 4, BUF);
    assert_eq!(mem.bytes(0, MEM), before);
    // One that runs past the end of RAM: only its control word is there, and gets
    // the error bit.
    assert_eq!(
        transfer_at(&bus, &mem, MEM as u64 - 8, dma::READ, 4, BUF),
        dma::ERROR
    );
    assert_eq!(mem.bytes(0, MEM - 8), before[..MEM - 8]);
}

#[test]
fn dma_address_register_halves_and_reset() {
    let (bus, mem) = dma_setup();
    let access = |at: u64, control: u32| {
        let mut a = Vec::new();
        a.extend_from_slice(&control.to_be_bytes());
        a.extend_from_slice(&4u32.to_be_bytes());
        a.extend_from_slice(&BUF.to_be_bytes());
        put(&mem, at, &a);
    };
    // A high half alone starts nothing.
    access(ACCESS, sel(0x21) | dma::READ);
    bus.write(DMA_PORT, &0u32.to_be_bytes()).unwrap();
    assert_eq!(mem.bytes(ACCESS, 4), (sel(0x21) | dma::READ).to_be_bytes());
    // The low half does, and the register is 0 again after.
    bus.write(DMA_PORT + 4, &(ACCESS as u32).to_be_bytes())
        .unwrap();
    assert_eq!(mem.bytes(ACCESS, 4), [0; 4]);
    assert_eq!(mem.bytes(BUF, 4), [0, 1, 2, 3]);
    // A stale high half does not survive the transfer: a low write alone goes below 4 GiB.
    bus.write(DMA_PORT, &1u32.to_be_bytes()).unwrap();
    access(ACCESS, sel(0x21) | dma::SKIP);
    bus.write(DMA_PORT + 4, &(ACCESS as u32).to_be_bytes())
        .unwrap();
    assert_eq!(
        mem.bytes(ACCESS, 4),
        (sel(0x21) | dma::SKIP).to_be_bytes(),
        "went to 4 GiB + ACCESS"
    );
    access(ACCESS, dma::READ);
    bus.write(DMA_PORT + 4, &(ACCESS as u32).to_be_bytes())
        .unwrap();
    assert_eq!(mem.bytes(ACCESS, 4), [0; 4]);
    // One 64-bit write (an MMIO-style access) starts it too.
    access(ACCESS, sel(0x21) | dma::READ);
    bus.write(DMA_PORT, &ACCESS.to_be_bytes()).unwrap();
    assert_eq!(mem.bytes(ACCESS, 4), [0; 4]);
    // Other widths and offsets are ignored.
    access(ACCESS, sel(0x21) | dma::READ);
    bus.write(DMA_PORT + 4, &(ACCESS as u16).to_be_bytes())
        .unwrap();
    bus.write(DMA_PORT + 6, &[0; 2]).unwrap();
    bus.write(DMA_PORT + 2, &[0; 4]).unwrap();
    assert_eq!(mem.bytes(ACCESS, 4), (sel(0x21) | dma::READ).to_be_bytes());
}
