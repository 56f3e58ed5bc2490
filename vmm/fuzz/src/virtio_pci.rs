//! The virtio-over-PCI transport (with a block device behind it) driven by a stream of
//! guest accesses: BAR reads and writes (common configuration, ISR, device
//! configuration, notifications that run the queues) and PCI configuration space
//! accesses. Any sequence must leave it answering, never panicking or hanging.
//!
//! Input: bytes 0–1 the length L of the operation stream (little-endian), then the
//! stream, then guest memory from address 0 (the rest of the input, in 64 KiB).
//! Operations are 4 bytes plus data: `[kind, offset low, offset high, size]`; kind % 4:
//! 0 BAR read, 1 BAR write, 2 configuration read, 3 configuration write; the offset is
//! taken modulo the BAR's size (256 for configuration space) so it may run past the
//! end; size is 1 << (size % 4) bytes; a write takes its data from the next bytes.

use std::sync::Arc;

use peregrine_vmm::bus::{BusDevice, NoIrq};
use peregrine_vmm::pci::PciFunction;
use peregrine_vmm::virtio::block::{MemDisk, VirtioBlock, SECTOR_SIZE};
use peregrine_vmm::virtio::pci::{VirtioPci, BAR_SIZE};

use crate::Ram;

/// Where the BAR sits.
pub const BAR: u64 = 0xfe00_0000;
/// Guest memory.
const RAM: usize = 0x1_0000;

/// One input.
pub fn run(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let rest = &data[2..];
    let (ops, memory) = rest.split_at(len.min(rest.len()));
    let ram = Ram::holding(memory, RAM);
    let disk = MemDisk::new(vec![0x5a; 64 * SECTOR_SIZE as usize]);
    let mut dev = VirtioPci::new(VirtioBlock::new(disk, false, b"fuzz"), ram, Arc::new(NoIrq));
    dev.place_bar(BAR);

    let mut rest = ops;
    while rest.len() >= 4 {
        let (op, tail) = rest.split_at(4);
        let size = 1usize << (op[3] % 4);
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let write = op[0] & 1 != 0;
        let (bytes, tail) = if write {
            tail.split_at(size.min(tail.len()))
        } else {
            (&[][..], tail)
        };
        let mut buf = [0u8; 8];
        match op[0] % 4 {
            0 => dev.read(BAR, offset % BAR_SIZE, &mut buf[..size]),
            1 => {
                let _ = dev.write(BAR, offset % BAR_SIZE, bytes);
            }
            2 => dev.read_config((offset % 256) as u16, &mut buf[..size]),
            _ => dev.write_config((offset % 256) as u16, bytes),
        }
        rest = tail;
    }
}
