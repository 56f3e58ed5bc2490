//! The device models on their buses, driven by a stream of guest accesses and clock
//! steps: PIC pair, PIT, RTC/CMOS, UART, ACPI PM block, PCI host
//! bridge (CAM ports and ECAM) on the port bus; I/O APIC and HPET on the MMIO bus. Any
//! sequence must leave them answering, never panicking.
//!
//! Input: operations of 4 bytes plus data: `[kind, device, offset, step]`, kind bit 0
//! write, bits 1–2 the size (1, 2, 4, 8 bytes), the device an index into the ranges
//! below, the offset within the range (modulo its length, so an access may run past
//! its end), `step` the clock advance (in 2^step/16 ns); a write takes its data from
//! the following bytes. (The reset control register at 0xcf9 is left out: it shares
//! CONFIG_ADDRESS's dword, which the VMM splits by access size.)

use std::sync::Arc;

use peregrine_vmm::acpi_pm::{AcpiPm, PmConfig, PM_BASE, PM_LEN};
use peregrine_vmm::bus::{Bus, NoIrq, SharedDevice};
use peregrine_vmm::clock::ManualClock;
use peregrine_vmm::hpet::{Hpet, IrqPins, HPET_BASE, HPET_SIZE};
use peregrine_vmm::ioapic::{InterruptMessage, InterruptSink, IoApic, IOAPIC_BASE, IOAPIC_SIZE};
use peregrine_vmm::pci::{PciHost, CONFIG_ADDRESS, CONFIG_DATA, ECAM_SIZE};
use peregrine_vmm::pic8259::{PicPair, ELCR_BASE, MASTER_BASE, SLAVE_BASE};
use peregrine_vmm::pit8254::{Pit, PIT_BASE, PORT61_BASE};
use peregrine_vmm::rtc_cmos::{Rtc, RTC_BASE};
use peregrine_vmm::sync::SpinLock;
use peregrine_vmm::uart16550::Uart16550;

struct Nowhere;

impl InterruptSink for Nowhere {
    fn deliver(&self, _msg: InterruptMessage) {}
}

impl IrqPins for Nowhere {
    fn set_pin(&self, _pin: u8, _level: bool) {}
}

const ECAM: u64 = 0xe000_0000;

/// One input.
pub fn run(data: &[u8]) {
    let clock = Arc::new(ManualClock::new(0));
    let irq = Arc::new(NoIrq);
    let pit = Arc::new(SpinLock::new(Pit::new(clock.clone(), irq.clone())));
    let rtc = Arc::new(SpinLock::new(Rtc::new(clock.clone(), irq.clone(), 0)));
    let pm = Arc::new(SpinLock::new(AcpiPm::new(
        clock.clone(),
        irq.clone(),
        PmConfig::default(),
    )));
    let hpet = Arc::new(SpinLock::new(Hpet::new(clock.clone(), Arc::new(Nowhere))));
    let pic: SharedDevice = Arc::new(SpinLock::new(PicPair::new(irq.clone())));
    let uart: SharedDevice = Arc::new(SpinLock::new(Uart16550::new(irq.clone(), Vec::new())));
    let pci: SharedDevice = Arc::new(SpinLock::new(PciHost::new(ECAM)));
    let ioapic: SharedDevice = Arc::new(SpinLock::new(IoApic::new(0, Arc::new(Nowhere))));

    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let mut ranges: Vec<(bool, u64, u64)> = Vec::new();
    let mut add = |bus: &mut Bus, is_mmio: bool, base: u64, len: u64, d: SharedDevice| {
        bus.insert(base, len, d).expect("the ranges do not overlap");
        ranges.push((is_mmio, base, len));
    };
    for base in [MASTER_BASE, SLAVE_BASE, ELCR_BASE] {
        add(&mut pio, false, base, 2, pic.clone());
    }
    add(&mut pio, false, PIT_BASE, 4, pit.clone());
    add(&mut pio, false, PORT61_BASE, 1, pit.clone());
    add(&mut pio, false, RTC_BASE, 2, rtc.clone());
    add(&mut pio, false, 0x3f8, 8, uart);
    add(&mut pio, false, PM_BASE, PM_LEN, pm.clone());
    add(&mut pio, false, CONFIG_ADDRESS, 4, pci.clone());
    add(&mut pio, false, CONFIG_DATA, 4, pci.clone());
    add(&mut mmio, true, ECAM, ECAM_SIZE, pci);
    add(&mut mmio, true, IOAPIC_BASE, IOAPIC_SIZE, ioapic);
    add(&mut mmio, true, HPET_BASE, HPET_SIZE, hpet.clone());

    let mut rest = data;
    while rest.len() >= 4 {
        let (op, tail) = rest.split_at(4);
        let size = 1usize << ((op[0] >> 1) & 3);
        let (is_mmio, base, len) = ranges[usize::from(op[1]) % ranges.len()];
        let addr = base + u64::from(op[2]) % len;
        let bus = if is_mmio { &mmio } else { &pio };
        if op[0] & 1 != 0 {
            let n = size.min(tail.len());
            let _ = bus.write(addr, &tail[..n]);
            rest = &tail[n..];
        } else {
            let mut buf = [0u8; 8];
            let _ = bus.read(addr, &mut buf[..size]);
            rest = tail;
        }
        clock.advance((1u64 << (op[3] & 63)) >> 4);
        // What the VMM's timer does when a device's next event comes due. (Each
        // device is locked on its own: a guard must not outlive its statement.)
        let now = peregrine_vmm::clock::Clock::now_ns(&*clock);
        let next = [
            pit.lock().next_event(),
            rtc.lock().next_event(),
            pm.lock().next_event(),
            hpet.lock().next_event(),
        ];
        if next.iter().flatten().any(|&t| t <= now) {
            pit.lock().update();
            rtc.lock().update();
            pm.lock().update();
            hpet.lock().update();
        }
    }
}
