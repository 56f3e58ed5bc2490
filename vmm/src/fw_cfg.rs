//! QEMU's firmware configuration device (fw_cfg) on the PC's ports, written from its
//! documented interface (QEMU's `docs/specs/fw_cfg.rst`, the key numbers of
//! `qemu_fw_cfg.h`): what test kernels (kvm-unit-tests) and firmware read to learn the
//! machine they run on.
//!
//! | port            | width | what                                                  |
//! |-----------------|-------|-------------------------------------------------------|
//! | 0x510           | 16    | selector (write, little-endian): the item; offset 0   |
//! | 0x511 (0x510)   | 8     | data (read): the item's next byte, 0 past its end      |
//! | 0x514–0x51b     | 32/64 | DMA address (big-endian; a write of the low half at   |
//! |                 |       | 0x518 runs the transfer); reads `QEMU CFG`            |
//!
//! Items live under a 16-bit key: bit 15 says architecture-specific, bit 14 is the old
//! write channel (masked off: key 0x4003 reads what 0x0003 does), the other 14 bits
//! the index. Numbers are little-endian except the file directory's and the DMA
//! interface's, which are big-endian. Data writes through the port are ignored (as on
//! QEMU since 2.4); no item is writable through DMA either, so a DMA write fails with
//! the error bit.
//!
//! What the PC offers ([`FwCfg::pc`]): the signature, the ID (bit 0, bit 1 with DMA),
//! UUID, RAM_SIZE, NOGRAPHIC, NB_CPUS, MACHINE_ID, NUMA (no nodes), BOOT_MENU, MAX_CPUS,
//! the x86 IRQ0_OVERRIDE, the file directory with `etc/e820`, and what the VMM adds:
//! the kernel's, command line's and initrd's addresses and sizes with the command line
//! itself ([`BootItems`]), and files ([`FwCfg::add_file`]). Left out: the kernel,
//! initrd and setup *data* items (the VMM loads the kernel itself, there is no option
//! ROM to copy it; and kvm-unit-tests reads key 0x11, QEMU's KERNEL_DATA, as its
//! "MAX_RAM", where 0 means no limit), BOOT_DEVICE and KERNEL_CMDLINE (other
//! architectures'), the ACPI and SMBIOS tables, the legacy E820_TABLE and HPET items
//! (the guest has its ACPI tables in memory already).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::boot::E820Entry;
use crate::bus::{Action, BusDevice};
use crate::vcpu::GuestMemory;

/// The selector port (16-bit); the data port is the next one.
pub const SELECTOR_PORT: u64 = 0x510;
/// The data port (8-bit).
pub const DATA_PORT: u64 = 0x511;
/// Ports of the selector/data pair.
pub const PORTS_LEN: u64 = 2;
/// The DMA address register's first port.
pub const DMA_PORT: u64 = 0x514;
/// Ports of the DMA address register.
pub const DMA_LEN: u64 = 8;

/// Selector keys (`FW_CFG_*`).
pub mod key {
    /// "QEMU".
    pub const SIGNATURE: u16 = 0x00;
    /// Feature bits (u32): [`super::ID_TRADITIONAL`], [`super::ID_DMA`].
    pub const ID: u16 = 0x01;
    /// The VM's UUID (16 bytes).
    pub const UUID: u16 = 0x02;
    /// RAM size in bytes (u64).
    pub const RAM_SIZE: u16 = 0x03;
    /// No graphical console (u16).
    pub const NOGRAPHIC: u16 = 0x04;
    /// vCPUs at boot (u16).
    pub const NB_CPUS: u16 = 0x05;
    /// Machine ID (u16).
    pub const MACHINE_ID: u16 = 0x06;
    /// Where the kernel was loaded (u32).
    pub const KERNEL_ADDR: u16 = 0x07;
    /// The kernel's size (u32).
    pub const KERNEL_SIZE: u16 = 0x08;
    /// The command line's address on other architectures (not offered).
    pub const KERNEL_CMDLINE: u16 = 0x09;
    /// Where the initrd was loaded (u32).
    pub const INITRD_ADDR: u16 = 0x0a;
    /// The initrd's size (u32).
    pub const INITRD_SIZE: u16 = 0x0b;
    /// Boot device on other architectures (not offered).
    pub const BOOT_DEVICE: u16 = 0x0c;
    /// NUMA: node count (u64), each APIC ID's node (u64 each), each node's memory.
    pub const NUMA: u16 = 0x0d;
    /// Show the boot menu (u16).
    pub const BOOT_MENU: u16 = 0x0e;
    /// vCPUs at most: one more than the highest APIC ID (u16).
    pub const MAX_CPUS: u16 = 0x0f;
    /// The kernel's entry point (u32).
    pub const KERNEL_ENTRY: u16 = 0x10;
    /// The kernel image (not offered; kvm-unit-tests reads this key as its MAX_RAM).
    pub const KERNEL_DATA: u16 = 0x11;
    /// The initrd image (not offered).
    pub const INITRD_DATA: u16 = 0x12;
    /// Where the command line was put (u32).
    pub const CMDLINE_ADDR: u16 = 0x13;
    /// The command line's size with its NUL (u32).
    pub const CMDLINE_SIZE: u16 = 0x14;
    /// The command line, NUL-terminated.
    pub const CMDLINE_DATA: u16 = 0x15;
    /// Linux setup code's address (not offered).
    pub const SETUP_ADDR: u16 = 0x16;
    /// Linux setup code's size (not offered).
    pub const SETUP_SIZE: u16 = 0x17;
    /// Linux setup code (not offered).
    pub const SETUP_DATA: u16 = 0x18;
    /// The file directory.
    pub const FILE_DIR: u16 = 0x19;
    /// The first file's key.
    pub const FILE_FIRST: u16 = 0x20;
    /// The old write-channel bit (masked off when selecting).
    pub const WRITE_CHANNEL: u16 = 0x4000;
    /// Architecture-specific keys.
    pub const ARCH_LOCAL: u16 = 0x8000;
    /// x86: the I/O APIC has IRQ 0 on input 2 (u32, 1).
    pub const IRQ0_OVERRIDE: u16 = ARCH_LOCAL + 2;
    /// The key no item ever has.
    pub const INVALID: u16 = 0xffff;
}

/// [`key::ID`] bit: the selector/data interface (always).
pub const ID_TRADITIONAL: u32 = 1 << 0;
/// [`key::ID`] bit: the DMA interface.
pub const ID_DMA: u32 = 1 << 1;

/// The `FWCfgDmaAccess` control bits.
pub mod dma {
    /// The transfer failed (set by the device).
    pub const ERROR: u32 = 1 << 0;
    /// Copy `length` bytes of the item to `address`.
    pub const READ: u32 = 1 << 1;
    /// Advance the offset by `length`.
    pub const SKIP: u32 = 1 << 2;
    /// Select the item in bits 16–31 first.
    pub const SELECT: u32 = 1 << 3;
    /// Copy `length` bytes from `address` into the item (no item is writable).
    pub const WRITE: u32 = 1 << 4;
    /// What the DMA address register reads: "QEMU CFG", big-endian.
    pub const SIGNATURE: u64 = 0x5145_4d55_2043_4647;
    /// Size of `FWCfgDmaAccess`: control (u32), length (u32), address (u64).
    pub const ACCESS_SIZE: usize = 16;
}

/// A file name's room in a directory entry, with its NUL.
pub const FILE_NAME_MAX: usize = 56;
/// Size of a directory entry: size (u32), select (u16), reserved (u16), name.
pub const DIR_ENTRY_SIZE: usize = 64;
/// The last key a file can have (the generic space's last index).
const FILE_LAST: u16 = 0x3fff;

/// Why an item or file was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwCfgError {
    /// The file name is empty or does not fit its 56 bytes with a NUL (or holds a NUL).
    BadName,
    /// A file with that name exists.
    Exists,
    /// Every file key is taken.
    Full,
    /// The key is the device's own (signature, ID, directory) or a file's.
    Reserved(u16),
    /// Bigger than a directory entry's 32-bit size.
    TooLarge,
}

impl fmt::Display for FwCfgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FwCfgError::BadName => write!(f, "fw_cfg file name empty or over 55 bytes"),
            FwCfgError::Exists => write!(f, "fw_cfg file exists"),
            FwCfgError::Full => write!(f, "no fw_cfg file key left"),
            FwCfgError::Reserved(k) => write!(f, "fw_cfg key {k:#x} is not the VMM's"),
            FwCfgError::TooLarge => write!(f, "fw_cfg item over 4 GiB"),
        }
    }
}

/// What the machine is, for [`FwCfg::pc`].
#[derive(Clone)]
pub struct MachineInfo<'a> {
    /// RAM in bytes.
    pub ram: u64,
    /// vCPUs at boot.
    pub vcpus: u16,
    /// vCPUs at most (APIC IDs 0 to `max_cpus - 1`).
    pub max_cpus: u16,
    /// The memory map, for `etc/e820`.
    pub e820: &'a [E820Entry],
    /// The VM's UUID.
    pub uuid: [u8; 16],
}

/// Where the VMM put the kernel, its command line and initrd (the items QEMU sets when
/// it boots a kernel itself); `None` leaves the item out (it reads 0).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootItems {
    /// KERNEL_ADDR and KERNEL_SIZE.
    pub kernel: Option<(u32, u32)>,
    /// KERNEL_ENTRY.
    pub entry: Option<u32>,
    /// CMDLINE_ADDR (0 where the command line is nowhere in memory), and the line
    /// (without a NUL) for CMDLINE_DATA, CMDLINE_SIZE counting the NUL the data gets.
    pub cmdline: Option<(u32, Vec<u8>)>,
    /// INITRD_ADDR and INITRD_SIZE.
    pub initrd: Option<(u32, u32)>,
}

/// A directory entry.
struct File {
    name: String,
    key: u16,
}

/// The DMA interface: guest memory and the address register.
struct Dma {
    mem: Box<dyn GuestMemory + Send>,
    addr: u64,
}

/// The fw_cfg device: items by key, the selected one and the offset into it.
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    /// In the order added (keys [`key::FILE_FIRST`] up); the directory lists them by name.
    files: Vec<File>,
    selected: u16,
    offset: usize,
    dma: Option<Dma>,
}

impl Default for FwCfg {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for FwCfg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FwCfg")
            .field("keys", &self.items.keys().collect::<Vec<_>>())
            .field("selected", &self.selected)
            .field("offset", &self.offset)
            .field("dma", &self.dma.is_some())
            .finish()
    }
}

/// The key an item is filed under once selected: the write-channel bit masked off.
fn normalize(key: u16) -> u16 {
    key & !key::WRITE_CHANNEL
}

/// Whether `key` is the device's own or a file's.
fn reserved(key: u16) -> bool {
    matches!(key, key::SIGNATURE | key::ID | key::FILE_DIR)
        || (key::FILE_FIRST..=FILE_LAST).contains(&key)
}

impl FwCfg {
    /// A device with the signature, the ID and an empty file directory.
    pub fn new() -> Self {
        let mut items = BTreeMap::new();
        items.insert(key::SIGNATURE, b"QEMU".to_vec());
        items.insert(key::ID, ID_TRADITIONAL.to_le_bytes().to_vec());
        items.insert(key::FILE_DIR, 0u32.to_be_bytes().to_vec());
        Self {
            items,
            files: Vec::new(),
            selected: key::SIGNATURE,
            offset: 0,
            dma: None,
        }
    }

    /// The PC's items (the module's list) for `m`, with `etc/e820`.
    pub fn pc(m: &MachineInfo<'_>) -> Self {
        let mut f = Self::new();
        let max = m.max_cpus.max(m.vcpus).max(1);
        // NUMA without nodes: the count, then a (zero) node for every APIC ID.
        let numa = vec![0u8; 8 * (1 + usize::from(max))];
        for (k, v) in [
            (key::UUID, m.uuid.to_vec()),
            (key::RAM_SIZE, m.ram.to_le_bytes().to_vec()),
            (key::NOGRAPHIC, 1u16.to_le_bytes().to_vec()),
            (key::NB_CPUS, m.vcpus.to_le_bytes().to_vec()),
            (key::MACHINE_ID, 0u16.to_le_bytes().to_vec()),
            (key::NUMA, numa),
            (key::BOOT_MENU, 0u16.to_le_bytes().to_vec()),
            (key::MAX_CPUS, max.to_le_bytes().to_vec()),
            (key::IRQ0_OVERRIDE, 1u32.to_le_bytes().to_vec()),
        ] {
            f.items.insert(k, v);
        }
        // A fresh device has no file: these cannot fail.
        let _ = f.add_file("etc/e820", e820_file(m.e820));
        f
    }

    /// Adds the boot items `b` offers.
    pub fn set_boot(&mut self, b: &BootItems) {
        let u32_item = |v: u32| v.to_le_bytes().to_vec();
        let mut put = |k: u16, v: Vec<u8>| {
            self.items.insert(k, v);
        };
        if let Some((addr, size)) = b.kernel {
            put(key::KERNEL_ADDR, u32_item(addr));
            put(key::KERNEL_SIZE, u32_item(size));
        }
        if let Some(entry) = b.entry {
            put(key::KERNEL_ENTRY, u32_item(entry));
        }
        if let Some((addr, line)) = &b.cmdline {
            let mut data = line.clone();
            data.push(0);
            put(key::CMDLINE_ADDR, u32_item(*addr));
            put(key::CMDLINE_SIZE, u32_item(data.len() as u32));
            put(key::CMDLINE_DATA, data);
        }
        if let Some((addr, size)) = b.initrd {
            put(key::INITRD_ADDR, u32_item(addr));
            put(key::INITRD_SIZE, u32_item(size));
        }
    }

    /// Turns the DMA interface on, over guest memory `mem` (ID bit 1).
    pub fn with_dma(mut self, mem: impl GuestMemory + Send + 'static) -> Self {
        self.dma = Some(Dma {
            mem: Box::new(mem),
            addr: 0,
        });
        self.items
            .insert(key::ID, (ID_TRADITIONAL | ID_DMA).to_le_bytes().to_vec());
        self
    }

    /// Whether the DMA interface is on.
    pub fn has_dma(&self) -> bool {
        self.dma.is_some()
    }

    /// Sets the item under `key` (bit 15 for an architecture-specific one; bit 14 is
    /// masked off) to `data`: a well-known item's, not the device's own or a file's.
    pub fn set(&mut self, key: u16, data: Vec<u8>) -> Result<(), FwCfgError> {
        let k = normalize(key);
        if reserved(k) {
            return Err(FwCfgError::Reserved(key));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge);
        }
        self.items.insert(k, data);
        Ok(())
    }

    /// Adds the file `name` holding `data` under the next file key, which it returns;
    /// the directory lists files sorted by name, as QEMU's does.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        if name.is_empty() || name.len() >= FILE_NAME_MAX || name.contains('\0') {
            return Err(FwCfgError::BadName);
        }
        if self.files.iter().any(|f| f.name == name) {
            return Err(FwCfgError::Exists);
        }
        u32::try_from(data.len()).map_err(|_| FwCfgError::TooLarge)?;
        let key = u16::try_from(self.files.len())
            .ok()
            .and_then(|n| key::FILE_FIRST.checked_add(n))
            .filter(|&k| k <= FILE_LAST)
            .ok_or(FwCfgError::Full)?;
        self.items.insert(key, data);
        self.files.push(File {
            name: String::from(name),
            key,
        });
        self.rebuild_dir();
        Ok(key)
    }

    fn rebuild_dir(&mut self) {
        let mut sorted: Vec<&File> = self.files.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut dir = Vec::with_capacity(4 + DIR_ENTRY_SIZE * sorted.len());
        dir.extend_from_slice(&(sorted.len() as u32).to_be_bytes());
        for f in sorted {
            let size = self.items.get(&f.key).map_or(0, Vec::len) as u32;
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&f.key.to_be_bytes());
            dir.extend_from_slice(&0u16.to_be_bytes());
            let mut name = [0u8; FILE_NAME_MAX];
            name[..f.name.len()].copy_from_slice(f.name.as_bytes());
            dir.extend_from_slice(&name);
        }
        self.items.insert(key::FILE_DIR, dir);
    }

    /// The item under `key` (as selecting it would find it).
    pub fn item(&self, key: u16) -> Option<&[u8]> {
        self.items.get(&normalize(key)).map(Vec::as_slice)
    }

    /// The file `name`: its key and data.
    pub fn file(&self, name: &str) -> Option<(u16, &[u8])> {
        let f = self.files.iter().find(|f| f.name == name)?;
        Some((f.key, self.item(f.key)?))
    }

    /// A selector write: the item under `key`, from its start.
    pub fn select(&mut self, key: u16) {
        self.selected = normalize(key);
        self.offset = 0;
    }

    /// What is left of the selected item (empty for a key without one).
    fn rest(&self) -> &[u8] {
        self.items
            .get(&self.selected)
            .and_then(|d| d.get(self.offset..))
            .unwrap_or(&[])
    }

    /// A data-port read: the selected item's next byte, 0 past its end.
    pub fn read_data(&mut self) -> u8 {
        match self.rest().first().copied() {
            Some(b) => {
                self.offset += 1;
                b
            }
            None => 0,
        }
    }

    /// Runs the `FWCfgDmaAccess` at `addr` and writes its control word back: 0, or
    /// [`dma::ERROR`] (also where the structure itself cannot be read).
    fn dma_transfer(&mut self, addr: u64) {
        let Some(mut d) = self.dma.take() else {
            return;
        };
        let mut access = [0u8; dma::ACCESS_SIZE];
        let status = if d.mem.read(addr, &mut access).is_ok() {
            let word = |i: usize| {
                u32::from_be_bytes([access[i], access[i + 1], access[i + 2], access[i + 3]])
            };
            let control = word(0);
            let length = word(4);
            let address = u64::from(word(8)) << 32 | u64::from(word(12));
            self.dma_run(&mut *d.mem, control, length, address)
        } else {
            dma::ERROR
        };
        let _ = d.mem.write(addr, &status.to_be_bytes());
        self.dma = Some(d);
    }

    /// One transfer's work; the control word it leaves.
    fn dma_run(
        &mut self,
        mem: &mut (dyn GuestMemory + Send),
        control: u32,
        length: u32,
        mut address: u64,
    ) -> u32 {
        if control & dma::SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let (read, write) = (control & dma::READ != 0, control & dma::WRITE != 0);
        if !read && !write && control & dma::SKIP == 0 {
            return 0;
        }
        let mut left = length as usize;
        while left > 0 {
            let rest = self.rest();
            if rest.is_empty() {
                // Past the item's end (or no item): reads fill zeros, writes fail.
                if write && !read {
                    return dma::ERROR;
                }
                if read {
                    let zeros = [0u8; 512];
                    while left > 0 {
                        let n = left.min(zeros.len());
                        if mem.write(address, &zeros[..n]).is_err() {
                            return dma::ERROR;
                        }
                        address = address.wrapping_add(n as u64);
                        left -= n;
                    }
                }
                return 0;
            }
            let n = left.min(rest.len());
            if read {
                if mem.write(address, &rest[..n]).is_err() {
                    return dma::ERROR;
                }
            } else if write {
                // No item is writable.
                return dma::ERROR;
            }
            self.offset += n;
            address = address.wrapping_add(n as u64);
            left -= n;
        }
        0
    }

    fn dma_write(&mut self, offset: u64, data: &[u8]) {
        let Some(d) = self.dma.as_mut() else {
            return;
        };
        let run = match (offset, data.len()) {
            (0, 4) => {
                d.addr = u64::from(u32::from_be_bytes([data[0], data[1], data[2], data[3]])) << 32;
                false
            }
            (4, 4) => {
                d.addr |= u64::from(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
                true
            }
            (0, 8) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(data);
                d.addr = u64::from_be_bytes(b);
                true
            }
            _ => false,
        };
        if run {
            let addr = core::mem::take(&mut d.addr);
            self.dma_transfer(addr);
        }
    }
}

/// `etc/e820`: the map's entries as `struct e820_entry` (u64 address, u64 length, u32
/// type, little-endian, packed).
pub fn e820_file(map: &[E820Entry]) -> Vec<u8> {
    let mut v = vec![0u8; map.len() * E820Entry::SIZE];
    for (e, b) in map.iter().zip(v.chunks_exact_mut(E820Entry::SIZE)) {
        e.write_to(b);
    }
    v
}

impl BusDevice for FwCfg {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if base == DMA_PORT {
            let sig = dma::SIGNATURE.to_be_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = match &self.dma {
                    Some(_) => offset
                        .checked_add(i as u64)
                        .and_then(|o| sig.get(o as usize))
                        .copied()
                        .unwrap_or(0),
                    None => 0xff,
                };
            }
            return;
        }
        // Either port reads data (the pair is one ISA window on QEMU's PC); a wide read
        // takes the next bytes, in order.
        for b in data.iter_mut() {
            *b = self.read_data();
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        if base == DMA_PORT {
            self.dma_write(offset, data);
        } else if offset == 0 && data.len() == 2 {
            self.select(u16::from_le_bytes([data[0], data[1]]));
        }
        // Byte writes are data writes: ignored.
        None
    }
}

#[cfg(test)]
mod tests;
