//! A virtqueue over guest memory the fuzzer writes: popping, reading, writing and
//! returning chains must end in an error or a result, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peregrine_vmm::vcpu::{GuestMemory, Unbacked};
use peregrine_vmm::virtio::Queue;

struct Mem(Vec<u8>);

impl GuestMemory for Mem {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), Unbacked> {
        let end = gpa
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.0.len() as u64);
        let end = end.ok_or(Unbacked { gpa })?;
        buf.copy_from_slice(&self.0[gpa as usize..end as usize]);
        Ok(())
    }
    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Unbacked> {
        let end = gpa
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.0.len() as u64);
        let end = end.ok_or(Unbacked { gpa })?;
        self.0[gpa as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mut q = Queue::new(256);
    q.size = 1 << (data[0] % 9);
    q.event_idx = data[1] & 1 != 0;
    q.indirect = data[1] & 2 != 0;
    // Rings in the first 4 KiB, the rest of memory is what the fuzzer wrote.
    q.desc_table = 0;
    q.avail_ring = 0x1000;
    q.used_ring = 0x1400;
    if q.check().is_err() {
        return;
    }
    q.ready = true;
    let mut mem = Mem(vec![0; 0x4000]);
    let n = data.len().min(mem.0.len());
    mem.0[..n].copy_from_slice(&data[..n]);
    // The fuzzer picks the available index through its bytes at 0x1002.
    for _ in 0..64 {
        match q.pop(&mut mem) {
            Ok(Some(chain)) => {
                let mut buf = [0u8; 256];
                let _ = chain.reader().read(&mut mem, &mut buf);
                let mut w = chain.writer();
                let _ = w.write(&mut mem, &buf);
                let _ = q.add_used(&mut mem, chain.head, w.written());
                let _ = q.needs_notification(&mut mem);
            }
            Ok(None) | Err(_) => break,
        }
    }
});
