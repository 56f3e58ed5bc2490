//! The platform-neutral VMM library.
//!
//! Everything here is host-testable: devices are pure state machines on a [`bus::Bus`],
//! raising interrupts through an injected [`bus::IrqLine`] and reading time from an
//! injected [`clock::Clock`], with no hypervisor types. `nul/vmm` binds these to the
//! hypervisor; the unit tests bind them to plain buffers and a manual clock.
//!
//! | module        | device                                   | where (PC defaults)      |
//! |---------------|------------------------------------------|--------------------------|
//! | [`uart16550`] | 16550A UART                              | ports 0x3f8–0x3ff, IRQ 4 |
//! | [`pic8259`]   | master/slave 8259A PIC pair + ELCR       | 0x20, 0xa0, 0x4d0        |
//! | [`pit8254`]   | 8254 PIT + port 0x61 (channel 2 gate)    | 0x40–0x43, 0x61, IRQ 0   |
//! | [`rtc_cmos`]  | MC146818 RTC and CMOS RAM                | 0x70–0x71, IRQ 8         |
//! | [`acpi_pm`]   | ACPI PM1 event/control, PM timer, reset  | 0x600–0x60b, 0xcf9       |
//! | [`ioapic`]    | 82093AA-style I/O APIC, 24 pins          | MMIO 0xfec00000          |
//! | [`lapic`]     | local APIC, xAPIC and x2APIC, timer      | MMIO 0xfee00000, MSRs    |
//! | [`hpet`]      | HPET: counter, 3 timers, legacy routing  | MMIO 0xfed00000          |
//! | [`pci`]       | PCI host bridge, bus 0, CAM and ECAM     | 0xcf8, 0xcfc, ECAM base  |
//! | [`virtio`]    | virtio-pci console and block             | PCI BAR 0, INTA#         |
//! | [`fw_cfg`]    | QEMU's fw_cfg and its DMA interface      | 0x510–0x511, 0x514       |
//! | [`qemu_testdev`] | isa-debug-exit, pc-testdev            | 0xf4, 0xe0–0xeb, 0x2000+ |
//!
//! Beside the devices: [`vcpu`] is the one trait the VMM needs from the platform (guest
//! memory, the register file, injection, a timer) with the guest page-table walker;
//! [`emul`] emulates the instructions behind MMIO and string I/O exits; [`boot`] loads a
//! Linux bzImage for the 64-bit boot protocol; [`acpi`] generates the guest's ACPI
//! tables; [`cpuid`] and [`kvmclock`] are the KVM-compatible paravirtual interface.
//! [`fw_cfg`] and [`qemu_testdev`] are QEMU's devices for test kernels (kvm-unit-tests),
//! on the PC only when the VMM asks ([`pc::Pc::add_qemu_devices`]). [`testdev`] are the
//! bare-metal test guest's devices, [`loader`] loads its ELF image and [`exit`] is its
//! machine. [`pc`] is the machine that boots Linux: every device above wired together,
//! the kernel and ACPI tables loaded, and its exit handler. Both machines are boards
//! over [`machine`], the typed exits and the exit handling they share.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod acpi;
pub mod acpi_pm;
pub mod boot;
pub mod bus;
pub mod clock;
pub mod cpuid;
pub mod diag;
pub mod emul;
pub mod exit;
pub mod fw_cfg;
pub mod hpet;
pub mod ioapic;
pub mod kvmclock;
pub mod lapic;
pub mod loader;
pub mod machine;
pub mod pc;
pub mod pci;
pub mod pic8259;
pub mod pit8254;
pub mod qemu_testdev;
pub mod rtc_cmos;
pub mod sync;
pub mod testdev;
pub mod uart16550;
pub mod vcpu;
pub mod virtio;

#[cfg(test)]
mod testutil;

/// The devices wired together the way the VMM will: shared through the bus, interrupt
/// lines into the PIC.
#[cfg(test)]
mod wiring {
    use alloc::sync::Arc;
    use alloc::vec::Vec;

    use crate::bus::{Bus, IrqLine, NoIrq, SharedDevice};
    use crate::pic8259::{PicPair, ELCR_BASE, MASTER_BASE, SLAVE_BASE};
    use crate::sync::SpinLock;
    use crate::uart16550::Uart16550;

    /// An ISA IRQ wire into the PIC pair.
    struct PicLine {
        pic: Arc<SpinLock<PicPair>>,
        irq: u8,
    }

    impl IrqLine for PicLine {
        fn set_level(&self, level: bool) {
            self.pic.lock().set_irq(self.irq, level);
        }
    }

    #[test]
    fn serial_input_reaches_the_cpu_through_the_pic() {
        let pic = Arc::new(SpinLock::new(PicPair::new(Arc::new(NoIrq))));
        let uart = Arc::new(SpinLock::new(Uart16550::new(
            Arc::new(PicLine {
                pic: pic.clone(),
                irq: 4,
            }),
            Vec::new(),
        )));
        let mut io = Bus::new();
        let p: SharedDevice = pic.clone();
        for base in [MASTER_BASE, SLAVE_BASE, ELCR_BASE] {
            io.insert(base, 2, p.clone()).unwrap();
        }
        io.insert(0x3f8, 8, uart.clone()).unwrap();

        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0x21, 0xef),
        ] {
            io.write(port, &[v]).unwrap();
        }
        io.write(0x3fc, &[0x08]).unwrap(); // MCR OUT2
        io.write(0x3f9, &[0x01]).unwrap(); // IER: receive
        assert_eq!(pic.lock().pending_vector(), None);
        assert_eq!(uart.lock().enqueue_input(b"k"), 1);
        assert_eq!(pic.lock().acknowledge(), 0x24);
        let mut c = [0];
        io.read(0x3f8, &mut c).unwrap();
        assert_eq!(&c, b"k");
        io.write(0x20, &[0x20]).unwrap(); // EOI
        io.write(0x3f8, b"!").unwrap();
        assert_eq!(uart.lock().sink().as_slice(), b"!");
        assert!(io.read(0x3f0, &mut c).is_err(), "unmapped");
    }
}
