//! Guest RAM: one `vm-memory` mapping from guest-physical 0, which KVM maps as memory
//! slot 0 and the VMM library reads and writes through [`GuestMemory`].

use peregrine_vmm::vcpu::{GuestMemory, Unbacked};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The VM's RAM.
#[derive(Clone)]
pub struct Ram {
    mem: GuestMemoryMmap<()>,
    size: u64,
}

impl Ram {
    /// `size` bytes of zeroed RAM from guest-physical 0.
    pub fn new(size: u64) -> Result<Self, vm_memory::mmap::FromRangesError> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])?;
        Ok(Ram { mem, size })
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The host address of guest-physical 0 (for `KVM_SET_USER_MEMORY_REGION`).
    pub fn host_base(&self) -> Result<*mut u8, vm_memory::GuestMemoryError> {
        self.mem.get_host_address(GuestAddress(0))
    }

    /// Reads `buf.len()` bytes at `gpa` (all of them RAM, or an error).
    pub fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Unbacked> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| Unbacked { gpa })
    }

    /// Writes `buf` at `gpa` (all of it RAM, or an error).
    pub fn write_at(&self, gpa: u64, buf: &[u8]) -> Result<(), Unbacked> {
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| Unbacked { gpa })
    }
}

impl GuestMemory for Ram {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), Unbacked> {
        self.read_at(gpa, buf)
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Unbacked> {
        self.write_at(gpa, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_was_written_and_refuses_beyond_the_end() {
        let mut ram = Ram::new(1 << 20).unwrap();
        ram.write(0xff0, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        ram.read(0xff0, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(
            ram.write((1 << 20) - 2, &[0; 4]).is_err(),
            "straddles the end"
        );
        assert!(ram.read(1 << 20, &mut b).is_err());
        let mut shared = ram.clone();
        shared.write(0, &[9]).unwrap();
        ram.read(0, &mut b[..1]).unwrap();
        assert_eq!(b[0], 9, "clones share the mapping");
    }
}
