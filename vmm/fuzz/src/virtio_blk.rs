//! The virtio block device on a request queue in guest memory the fuzzer writes: any
//! chain (header, data in either direction, status) must end in a status byte, an
//! error or a device that needs a reset, never a panic or a hang; a read-only disk is
//! never changed.
//!
//! Input: byte 0 picks the queue size (1 << (b % 9)) and, bit 7, a read-only disk;
//! byte 1 EVENT_IDX (bit 0) and indirect descriptors (bit 1); the whole input is also
//! guest memory from address 0, laid out as in [`crate::virtqueue`] (available ring at
//! 0, descriptor table at 0x210, used ring at 0x1400); headers and data buffers may sit
//! anywhere in its 64 KiB. The disk holds [`SECTORS`] sectors, so requests reach its
//! end and past it, and multi-chunk requests fit the memory.

use peregrine_vmm::virtio::block::{MemDisk, VirtioBlock, SECTOR_SIZE};
use peregrine_vmm::virtio::VirtioDevice;

use crate::Ram;

/// Sectors of the fuzzed disk.
pub const SECTORS: u64 = 160;
/// Guest memory.
const RAM: usize = 0x1_0000;

/// One input.
pub fn run(data: &[u8]) {
    let Some(q) = crate::virtqueue::queue(data) else {
        return;
    };
    let read_only = data[0] & 0x80 != 0;
    let image: Vec<u8> = (0..SECTORS * SECTOR_SIZE).map(|i| (i / 7) as u8).collect();
    let mut dev = VirtioBlock::new(MemDisk::new(image.clone()), read_only, b"fuzz");
    let mut mem = Ram::holding(data, RAM);
    let mut queues = [q];
    // Twice: the second pass finds what the first left in the available ring.
    for _ in 0..2 {
        if dev.process(0, &mut queues, &mut mem).is_err() {
            break;
        }
    }
    let mut cfg = [0u8; 8];
    dev.read_config(u64::from(data[2]), &mut cfg[..usize::from(data[3] % 9)]);
    if read_only {
        assert!(dev.backend().data == image, "a read-only disk was written");
    }
}
