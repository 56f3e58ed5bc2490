//! A local APIC and the I/O APIC wired to it the way the VMM wires them, driven by a
//! stream of guest accesses (xAPIC MMIO, x2APIC and APIC-base MSRs, the I/O APIC's
//! window), input pin changes, interrupt acceptance as the vCPU loop does it, and clock
//! steps that fire the timer. Any sequence must leave both answering, never panicking
//! or hanging (an EOI broadcast that redelivers a level interrupt included).
//!
//! Input: operations of 4 bytes plus data: `[kind, a, b, step]`; kind % 8:
//! 0 LAPIC read, 1 LAPIC write (4 bytes of data; sizes other than 4 through bit 3 of
//! kind), offset `a | b << 8` within the page; 2 RDMSR, 3 WRMSR (8 bytes of data), of
//! the x2APIC MSR 0x800 + a, or with b bit 0 the APIC base MSR, bit 1 the TSC deadline;
//! 4 I/O APIC read, 5 I/O APIC write (4 bytes; IOREGSEL at 0, IOWIN at 0x10), offset a;
//! 6 drive pin a (any number) to level b & 1; 7 accept the pending vector and, with
//! b bit 0, deliver vector a directly (a level one with bit 1). `step` advances the
//! clock by 2^step/16 ns; a due timer fires as the VMM's timer thread would fire it.

use std::sync::Arc;

use peregrine_vmm::bus::{BusDevice, NoIrq};
use peregrine_vmm::clock::{Clock, ManualClock};
use peregrine_vmm::ioapic::{InterruptMessage, InterruptSink, IoApic};
use peregrine_vmm::lapic::{ApicSink, Ipi, Lapic, LAPIC_BASE, MSR_APIC_BASE, MSR_TSC_DEADLINE};
use peregrine_vmm::sync::SpinLock;

/// What the two APICs send each other, queued: each is locked on its own and delivered
/// to after the access that caused it, as the VMM does (no call back into a locked
/// APIC).
#[derive(Default)]
struct Wires {
    to_lapic: SpinLock<Vec<InterruptMessage>>,
    eois: SpinLock<Vec<u8>>,
}

impl InterruptSink for Wires {
    fn deliver(&self, msg: InterruptMessage) {
        self.to_lapic.lock().push(msg);
    }
}

impl ApicSink for Wires {
    fn ipi(&self, _ipi: Ipi) {}
    fn eoi(&self, vector: u8) {
        self.eois.lock().push(vector);
    }
}

/// At most this many messages cross between the APICs per operation: a level
/// interrupt whose pin stays high is redelivered on every EOI, which is the guest's
/// business, not a hang of the model.
const ROUNDS: usize = 64;

/// One input.
pub fn run(data: &[u8]) {
    let clock = Arc::new(ManualClock::new(0));
    let wires = Arc::new(Wires::default());
    let mut lapic = Lapic::new(
        0,
        true,
        1_000_000_000,
        clock.clone(),
        wires.clone(),
        Arc::new(NoIrq),
    );
    let mut ioapic = IoApic::new(1, wires.clone());

    let mut rest = data;
    while rest.len() >= 4 {
        let (op, tail) = rest.split_at(4);
        let take = |n: usize| tail.split_at(n.min(tail.len()));
        let mut buf = [0u8; 8];
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x1000;
        let size = if op[0] & 8 != 0 {
            1usize << ((op[0] >> 4) & 3)
        } else {
            4
        };
        let msr = match op[2] & 3 {
            0 => 0x800 + u32::from(op[1]),
            1 => MSR_APIC_BASE,
            _ => MSR_TSC_DEADLINE,
        };
        rest = match op[0] % 8 {
            0 => {
                lapic.read(LAPIC_BASE, offset, &mut buf[..size]);
                tail
            }
            1 => {
                let (d, t) = take(size);
                let _ = lapic.write(LAPIC_BASE, offset, d);
                t
            }
            2 => {
                let _ = lapic.read_msr(msr);
                tail
            }
            3 => {
                let (d, t) = take(8);
                buf[..d.len()].copy_from_slice(d);
                let _ = lapic.write_msr(msr, u64::from_le_bytes(buf));
                t
            }
            4 => {
                ioapic.read(0, u64::from(op[1]), &mut buf[..size]);
                tail
            }
            5 => {
                let (d, t) = take(size);
                let _ = ioapic.write(0, u64::from(op[1]), d);
                t
            }
            6 => {
                ioapic.set_irq(usize::from(op[1]), op[2] & 1 != 0);
                tail
            }
            _ => {
                if let Some(v) = lapic.pending_vector() {
                    lapic.accept(v);
                }
                if op[2] & 1 != 0 {
                    lapic.deliver(op[1], op[2] & 2 != 0);
                }
                tail
            }
        };
        clock.advance((1u64 << (op[3] & 63)) >> 4);
        if lapic.next_event().is_some_and(|t| t <= clock.now_ns()) {
            lapic.update();
        }
        for _ in 0..ROUNDS {
            let msgs: Vec<InterruptMessage> = std::mem::take(&mut *wires.to_lapic.lock());
            let eois: Vec<u8> = std::mem::take(&mut *wires.eois.lock());
            if msgs.is_empty() && eois.is_empty() {
                break;
            }
            for m in msgs {
                lapic.deliver(m.vector, m.level);
            }
            for v in eois {
                ioapic.end_of_interrupt(v);
            }
        }
    }
}
