//! A virtqueue over guest memory the fuzzer writes: popping, reading, writing and
//! returning chains must end in an error or a result, never a panic or a hang.
//!
//! Input: byte 0 picks the queue size (1 << (b % 9)), byte 1 EVENT_IDX and indirect
//! descriptors; the whole input is also guest memory from address 0, where the
//! available ring sits (its index at byte 2), followed by the descriptor table at
//! 0x210, so short inputs already reach the chains; the used ring is beyond, at 0x1400.

use peregrine_vmm::virtio::Queue;

use crate::Ram;

/// The queue an input describes (size from byte 0, EVENT_IDX and indirect descriptors
/// from byte 1, the rings at the fixed places above), ready; `None` for an input too
/// short or a queue the transport would refuse.
pub fn queue(data: &[u8]) -> Option<Queue> {
    if data.len() < 4 {
        return None;
    }
    let mut q = Queue::new(256);
    q.size = 1 << (data[0] % 9);
    q.event_idx = data[1] & 1 != 0;
    q.indirect = data[1] & 2 != 0;
    q.avail_ring = 0;
    q.desc_table = 0x210;
    q.used_ring = 0x1400;
    q.check().ok()?;
    q.ready = true;
    Some(q)
}

/// One input.
pub fn run(data: &[u8]) {
    let Some(mut q) = queue(data) else {
        return;
    };
    let mut mem = Ram::holding(data, 0x2000);
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
}
