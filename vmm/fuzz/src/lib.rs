//! The fuzz targets' bodies (the VMM library's, and the disk service protocol's in
//! `blk_session` and `gpt`), one module each, so that libFuzzer (`fuzz_targets/`, via
//! `cargo xtask fuzz` or `cargo +nightly fuzz run`) and anything else that wants to
//! replay an input run the same code.
//!
//! Every target takes arbitrary bytes and must end in an error or a result, never a
//! panic, an overflow (the targets are built with overflow checks and debug
//! assertions) or a hang.

pub mod apic;
pub mod blk_session;
pub mod bzimage;
pub mod devices;
pub mod emulator;
pub mod gpt;
pub mod virtio_blk;
pub mod virtio_pci;
pub mod virtqueue;

/// Guest RAM of `len` bytes from address 0, for the targets.
pub struct Ram(pub Vec<u8>);

impl peregrine_vmm::vcpu::GuestMemory for Ram {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), peregrine_vmm::vcpu::Unbacked> {
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.0[r]);
        Ok(())
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), peregrine_vmm::vcpu::Unbacked> {
        let r = self.range(gpa, buf.len())?;
        self.0[r].copy_from_slice(buf);
        Ok(())
    }
}

impl Ram {
    /// `len` bytes of RAM starting with `data` (cut to fit), zeros after it.
    pub fn holding(data: &[u8], len: usize) -> Self {
        let mut ram = vec![0; len];
        let n = data.len().min(len);
        ram[..n].copy_from_slice(&data[..n]);
        Ram(ram)
    }

    fn range(
        &self,
        gpa: u64,
        len: usize,
    ) -> Result<std::ops::Range<usize>, peregrine_vmm::vcpu::Unbacked> {
        let end = gpa
            .checked_add(len as u64)
            .filter(|&e| e <= self.0.len() as u64)
            .ok_or(peregrine_vmm::vcpu::Unbacked { gpa })?;
        Ok(gpa as usize..end as usize)
    }
}
