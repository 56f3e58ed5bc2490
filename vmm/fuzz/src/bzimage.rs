//! The bzImage parser and loader on arbitrary files: a clear error or a load, never a
//! panic.

use peregrine_vmm::boot::{self, e820, E820Entry};
use peregrine_vmm::vcpu::{GuestMemory, Unbacked};

/// 256 MiB of RAM that keeps nothing (the loader's writes are only bounds-checked).
struct Sink;

const RAM: u64 = 256 << 20;

impl GuestMemory for Sink {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), Unbacked> {
        match gpa.checked_add(buf.len() as u64) {
            Some(end) if end <= RAM => {
                buf.fill(0);
                Ok(())
            }
            _ => Err(Unbacked { gpa }),
        }
    }
    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Unbacked> {
        match gpa.checked_add(buf.len() as u64) {
            Some(end) if end <= RAM => Ok(()),
            _ => Err(Unbacked { gpa }),
        }
    }
}

/// One input.
pub fn run(data: &[u8]) {
    let Ok(image) = boot::parse(data) else {
        return;
    };
    let regions = [E820Entry {
        addr: 0,
        size: RAM,
        typ: e820::RAM,
    }];
    let _ = boot::load(
        &mut Sink,
        &image,
        &regions,
        b"console=ttyS0",
        Some(&data[..data.len().min(64)]),
    );
}
