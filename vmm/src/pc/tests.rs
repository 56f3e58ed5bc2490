use super::*;

// The PC with a Multiboot guest.
mod multiboot_guest;

use crate::cpuid;
use crate::machine::{Board, Exit};
use crate::testutil::{checked_exit, RANDOM_EXITS};

#[test]
fn memory_map_splits_the_first_mib() {
    let m = memory_map(256 << 20);
    assert_eq!((m[0].addr, m[0].size, m[0].typ), (0, 0x9_fc00, e820::RAM));
    assert_eq!({ m[1].typ }, e820::RESERVED);
    assert_eq!(m[1].addr + m[1].size, 0x10_0000);
    assert_eq!((m[2].addr, m[2].size), (0x10_0000, (256 << 20) - 0x10_0000));
    assert_eq!(({ m[3].addr }, { m[3].typ }), (0xe000_0000, e820::RESERVED));
}

#[test]
fn serial_lines_split_on_newlines() {
    let mut s = SerialLines::new(Vec::<Vec<u8>>::new());
    for b in b"hello\r\nworld\n" {
        s.put(*b);
    }
    assert_eq!(s.sink, vec![b"hello".to_vec(), b"world".to_vec()]);
}

#[test]
fn ram_disk_reads_back_writes_and_refuses_out_of_range() {
    let d: &'static mut [u8] = Box::leak(vec![0u8; 4096].into_boxed_slice());
    let mut d = RamDisk(d);
    assert_eq!(d.capacity(), 8);
    d.write(1, &[7; 512]).unwrap();
    let mut b = [0u8; 512];
    d.read(1, &mut b).unwrap();
    assert_eq!(b, [7; 512]);
    assert_eq!(d.read(8, &mut b), Err(BlockError::OutOfRange));
}

use std::sync::Mutex;

use crate::boot::{BootParams, SetupHeader};
use crate::clock::ManualClock;
use crate::testutil::{MockVcpu, SharedMem};

const RAM: u64 = 0x400_0000;

/// A minimal 64-bit bzImage (as `boot`'s tests build one).
fn bzimage() -> Vec<u8> {
    let mut img = vec![0u8; 5 * 512];
    img.extend_from_slice(&[0x90; 4096]);
    let mut h = SetupHeader::zeroed();
    h.setup_sects = 4;
    h.boot_flag = 0xaa55;
    h.jump = 0xeb | ((0x26c - 0x202) << 8);
    h.header = u32::from_le_bytes(*b"HdrS");
    h.version = 0x020f;
    h.loadflags = 1;
    h.xloadflags = 1;
    h.syssize = 256;
    h.cmdline_size = 2047;
    h.initrd_addr_max = 0x7fff_ffff;
    h.pref_address = 0x100_0000;
    h.init_size = 0x20_0000;
    h.kernel_alignment = 0x20_0000;
    h.write_to(&mut img[0x1f1..]);
    img
}

/// Kicks, recorded.
#[derive(Default)]
struct Kicks(Mutex<Vec<u32>>);

impl Kick for Kicks {
    fn kick(&self, vcpu: u32) {
        self.0.lock().unwrap().push(vcpu);
    }
}

struct Setup {
    pc: Pc,
    mem: SharedMem,
    clock: Arc<ManualClock>,
    kicks: Arc<Kicks>,
}

fn host_cpuid(leaf: u32, _sub: u32) -> [u32; 4] {
    match leaf {
        1 => [
            0x800f12,
            0x0800,
            1 << 26 | 1 << 27 | 1 << 28 | 1 << 5,
            1 << 12,
        ],
        0xd => [0x7, 0x340, 0x340, 0],
        _ => [leaf, 0, 0, 0],
    }
}

fn pc(vcpus: u32) -> Setup {
    let mut mem = SharedMem::new(RAM as usize);
    let clock = Arc::new(ManualClock::new(0));
    let kicks = Arc::new(Kicks::default());
    let disk: &'static mut [u8] = Box::leak(vec![0u8; 1 << 16].into_boxed_slice());
    let pc = Pc::new(
        PcConfig {
            vcpus,
            ram: RAM,
            tsc_hz: 1_000_000_000,
            wall_secs: 0,
        },
        &mut mem,
        &bzimage(),
        b"console=ttyS0",
        Some(&[1, 2, 3]),
        Some(RamDisk(disk)),
        Vec::<Vec<u8>>::new(),
        clock.clone(),
        kicks.clone(),
        host_cpuid,
    )
    .unwrap();
    Setup {
        pc,
        mem,
        clock,
        kicks,
    }
}

fn vcpu() -> MockVcpu {
    let mut v = MockVcpu::new(0x10_0000);
    v.regs.inst_len = 0;
    v
}

/// Runs `event` like the portal handler, checking that the MTD records every change.
fn exit(pc: &Pc, v: &mut MockVcpu, event: u64) -> Step {
    let startup = event == ev::STARTUP;
    checked_exit(v, startup, |v| {
        pc.handle(v, 0, Exit::decode(event, &v.regs))
    })
}

fn rdmsr(pc: &Pc, v: &mut MockVcpu, msr: u32) -> u64 {
    v.regs.gpr[gpr::RCX] = u64::from(msr);
    v.regs.inj_info = 0;
    assert_eq!(exit(pc, v, ev::RDMSR), Step::Resume);
    assert_eq!(v.regs.inj_info, 0, "rdmsr {msr:#x} faulted");
    (v.regs.gpr[gpr::RDX] << 32) | (v.regs.gpr[gpr::RAX] & 0xffff_ffff)
}

fn wrmsr(pc: &Pc, v: &mut MockVcpu, msr: u32, value: u64) {
    v.regs.gpr[gpr::RCX] = u64::from(msr);
    v.regs.gpr[gpr::RAX] = value & 0xffff_ffff;
    v.regs.gpr[gpr::RDX] = value >> 32;
    v.regs.inj_info = 0;
    assert_eq!(exit(pc, v, ev::WRMSR), Step::Resume);
    assert_eq!(v.regs.inj_info, 0, "wrmsr {msr:#x} faulted");
}

#[test]
fn the_bsp_starts_at_the_kernels_64bit_entry_with_the_zero_page() {
    let s = pc(1);
    let mut v = vcpu();
    assert_eq!(exit(&s.pc, &mut v, ev::STARTUP), Step::Resume);
    assert_eq!(v.regs.rip, 0x100_0200);
    assert_eq!(v.regs.xcr0, 7, "the XCR0 Linux will set");
    assert_eq!(v.regs.gpr[gpr::RSI], boot::ZERO_PAGE_ADDR);
    let zp = s.mem.bytes(boot::ZERO_PAGE_ADDR, BootParams::SIZE);
    let bp = BootParams::from_bytes(&zp).unwrap();
    assert_eq!({ bp.e820_entries }, 4);
    assert_eq!({ bp.e820(2).size }, RAM - 0x10_0000);
    assert_ne!({ bp.hdr.ramdisk_image }, 0);
    // The RSDP in the BIOS area where Linux looks for it.
    assert_eq!(&s.mem.bytes(ACPI_ADDR, 8), b"RSD PTR ");
}

#[test]
fn cpuid_offers_kvm_leaves_x2apic_and_tsc_deadline() {
    let s = pc(2);
    let mut v = vcpu();
    v.regs.gpr[gpr::RAX] = 0x4000_0000;
    exit(&s.pc, &mut v, ev::CPUID);
    assert_eq!(v.regs.gpr[gpr::RBX] as u32, cpuid::KVM_SIGNATURE[0]);
    assert_eq!(v.regs.rip, 2, "CPUID skipped without NRIP save");
    v.regs.gpr[gpr::RAX] = 1;
    exit(&s.pc, &mut v, ev::CPUID);
    let ecx = v.regs.gpr[gpr::RCX] as u32;
    assert_ne!(ecx & cpuid::HYPERVISOR_BIT, 0);
    assert_ne!(ecx & (1 << 21 | 1 << 24), 0);
    assert_eq!(
        ecx & (1 << 26 | 1 << 28),
        1 << 26 | 1 << 28,
        "XSAVE, AVX as the host's"
    );
    assert_eq!(
        ecx & (1 << 5 | 1 << 27),
        0,
        "no VMX; OSXSAVE only with CR4.OSXSAVE"
    );
    assert_eq!(v.regs.gpr[gpr::RDX] as u32 & (1 << 12), 0, "no MTRRs");
    assert_eq!((v.regs.gpr[gpr::RBX] >> 16) as u8, 2, "logical CPUs");
}

#[test]
fn msrs_live_in_the_register_file_and_unknown_ones_read_zero() {
    let s = pc(1);
    let mut v = vcpu();
    wrmsr(&s.pc, &mut v, msr::nr::EFER, 0xd01);
    assert!(v.regs.mtd.contains(Mtd::EFER));
    assert_eq!(rdmsr(&s.pc, &mut v, msr::nr::EFER), 0xd01 & !(1 << 10));
    wrmsr(&s.pc, &mut v, msr::nr::LSTAR, 0xffff_ffff_8100_0000);
    assert_eq!(v.regs.lstar, 0xffff_ffff_8100_0000);
    assert_eq!(rdmsr(&s.pc, &mut v, 0xc001_0015), 0);
    // A non-canonical LSTAR is a #GP.
    v.regs.gpr[gpr::RCX] = u64::from(msr::nr::LSTAR);
    v.regs.gpr[gpr::RDX] = 0x8000;
    exit(&s.pc, &mut v, ev::WRMSR);
    assert_eq!(v.regs.inj_info, 0x8000_0b0d);
    // kvmclock: enabling it writes the structure (version even, TSC-stable flag).
    wrmsr(
        &s.pc,
        &mut v,
        crate::kvmclock::MSR_KVM_SYSTEM_TIME_NEW,
        0x5000 | 1,
    );
    assert_eq!(v.mem[0x5000] & 1, 0);
    assert_ne!(v.mem[0x5000], 0);
    assert_eq!(v.mem[0x5000 + 28], crate::kvmclock::PVCLOCK_TSC_STABLE_BIT);
}

#[test]
fn a_tsc_deadline_interrupt_is_injected_when_the_guest_can_take_it() {
    let s = pc(1);
    let mut v = vcpu();
    // x2APIC on, software-enabled, timer in TSC-deadline mode on vector 0xec.
    wrmsr(
        &s.pc,
        &mut v,
        0x1b,
        0xfee0_0000 | 1 << 11 | 1 << 10 | 1 << 8,
    );
    wrmsr(&s.pc, &mut v, 0x80f, 0x1ff);
    wrmsr(&s.pc, &mut v, 0x832, 2 << 17 | 0xec);
    wrmsr(&s.pc, &mut v, 0x6e0, 5_000);
    assert_eq!(s.pc.next_deadline(0), Some(5_000));
    // HLT with nothing pending: the vCPU waits; with IF clear it stops.
    v.regs.rflags = bits::IF;
    assert_eq!(exit(&s.pc, &mut v, ev::HLT), Step::Wait);
    v.regs.rflags = 0;
    assert_eq!(exit(&s.pc, &mut v, ev::HLT), Step::Stop);
    s.clock.set(5_000);
    s.pc.update_timers(0);
    assert_eq!(*s.kicks.0.lock().unwrap(), vec![0]);
    assert!(s.pc.interrupt_pending(0));
    // Interrupts off: an interrupt window is asked for, nothing injected.
    v.regs.inj_info = 0;
    exit(&s.pc, &mut v, ev::RECALL);
    assert_eq!(v.regs.inj_info, inj::REQ_INTR_WINDOW);
    // The window opens: the vector goes in, and the local APIC has it in service.
    v.regs.rflags = bits::IF;
    v.regs.inj_info = 0;
    exit(&s.pc, &mut v, ev::INTR_WINDOW);
    assert_eq!(v.regs.inj_info, 0x8000_00ec);
    assert!(!s.pc.interrupt_pending(0));
    wrmsr(&s.pc, &mut v, 0x80b, 0); // EOI
}

#[test]
fn serial_input_reaches_the_vcpu_through_the_io_apic() {
    let s = pc(1);
    let mut v = vcpu();
    wrmsr(
        &s.pc,
        &mut v,
        0x1b,
        0xfee0_0000 | 1 << 11 | 1 << 10 | 1 << 8,
    );
    wrmsr(&s.pc, &mut v, 0x80f, 0x1ff);
    // I/O APIC pin 4 (COM1) → vector 0x24, physical destination 0.
    let w = |reg: u32, val: u32| {
        s.pc.core()
            .mmio
            .write(IOAPIC_BASE, &reg.to_le_bytes())
            .unwrap();
        s.pc.core()
            .mmio
            .write(IOAPIC_BASE + 0x10, &val.to_le_bytes())
            .unwrap();
    };
    w(0x10 + 2 * 4, 0x24);
    w(0x11 + 2 * 4, 0);
    s.pc.core().pio.write(COM1_BASE + 4, &[0x08]).unwrap(); // MCR OUT2
    s.pc.core().pio.write(COM1_BASE + 1, &[0x01]).unwrap(); // IER: receive
    assert_eq!(s.pc.console_input(b"x"), 1);
    assert_eq!(*s.kicks.0.lock().unwrap(), vec![0]);
    v.regs.rflags = bits::IF;
    exit(&s.pc, &mut v, ev::RECALL);
    assert_eq!(v.regs.inj_info, 0x8000_0024);
}

/// vCPU 0 with x2APIC on, and vCPU 1 started by INIT/SIPI at page 0x9a: the AP's
/// register file after its STARTUP.
fn two_started(s: &Setup) -> (MockVcpu, MockVcpu) {
    let mut v = vcpu();
    wrmsr(
        &s.pc,
        &mut v,
        0x1b,
        0xfee0_0000 | 1 << 11 | 1 << 10 | 1 << 8,
    );
    wrmsr(&s.pc, &mut v, 0x80f, 0x1ff);
    wrmsr(&s.pc, &mut v, 0x830, 1 << 32 | 5 << 8 | 1 << 14);
    v.regs.gpr[gpr::RCX] = 0x830;
    v.regs.gpr[gpr::RAX] = 6 << 8 | 0x9a;
    v.regs.gpr[gpr::RDX] = 1;
    assert_eq!(exit(&s.pc, &mut v, ev::WRMSR), Step::Start(1));
    let mut ap = vcpu();
    checked_exit(&mut ap, true, |ap| s.pc.handle(ap, 1, Exit::Startup));
    (v, ap)
}

#[test]
fn a_sipi_starts_the_other_vcpu_in_real_mode_at_its_page() {
    let s = pc(2);
    // INIT, then SIPI with vector 0x9a to APIC 1 (asserted to start vCPU 1).
    let (_, ap) = two_started(&s);
    assert_eq!(
        (ap.regs.cs.sel, ap.regs.cs.base, ap.regs.rip),
        (0x9a00, 0x9a000, 0)
    );
    assert_eq!(ap.regs.cr0 & bits::CR0_PE, 0);
}

#[test]
fn an_nmi_ipi_kicks_and_is_injected_into_the_other_vcpu() {
    let s = pc(2);
    let (mut v, mut ap) = two_started(&s);
    s.kicks.0.lock().unwrap().clear();
    // NMI (delivery mode 4) to APIC 1.
    wrmsr(&s.pc, &mut v, 0x830, 1 << 32 | 4 << 8);
    assert_eq!(*s.kicks.0.lock().unwrap(), [1], "the target is kicked");
    assert!(s.pc.interrupt_pending(1), "a halted target wakes");
    // At its next exit the AP gets the NMI (vector 2, type NMI), with IF clear even.
    ap.regs.rflags = 2;
    ap.regs.inj_info = 0;
    checked_exit(&mut ap, false, |ap| {
        s.pc.handle(ap, 1, Exit::decode(ev::RECALL, &ap.regs))
    });
    assert_eq!(ap.regs.inj_info & 0x8000_07ff, 0x8000_0202);
    assert!(!s.pc.interrupt_pending(1), "taken once");
    // While an event is being injected it waits, with the NMI window asked for.
    s.pc.interrupt_pending(1);
    wrmsr(&s.pc, &mut v, 0x830, 1 << 32 | 4 << 8);
    ap.regs.inj_info = 0x8000_0030;
    checked_exit(&mut ap, false, |ap| {
        s.pc.handle(ap, 1, Exit::decode(ev::RECALL, &ap.regs))
    });
    assert_ne!(ap.regs.inj_info & inj::REQ_NMI_WINDOW, 0);
    assert!(s.pc.interrupt_pending(1));
}

#[test]
fn init_puts_a_running_ap_into_wait_for_sipi_and_the_sipi_restarts_it() {
    let s = pc(2);
    let (mut v, mut ap) = two_started(&s);
    // The AP runs somewhere in long mode.
    ap.regs.rip = 0x12_3456;
    ap.regs.cr0 = bits::CR0_PE | bits::CR0_PG;
    ap.regs.cr3 = 0x5000;
    ap.regs.cr4 = bits::CR4_PAE;
    s.kicks.0.lock().unwrap().clear();
    wrmsr(&s.pc, &mut v, 0x830, 1 << 32 | 5 << 8 | 1 << 14);
    assert_eq!(*s.kicks.0.lock().unwrap(), [1]);
    // Its next exit waits; no interrupt wakes it, only a SIPI.
    let step = checked_exit(&mut ap, false, |ap| {
        s.pc.handle(ap, 1, Exit::decode(ev::RECALL, &ap.regs))
    });
    assert_eq!(step, Step::Wait);
    assert!(!s.pc.interrupt_pending(1));
    wrmsr(&s.pc, &mut v, 0x830, 1 << 32 | 0x40); // a fixed IPI
    assert!(!s.pc.interrupt_pending(1), "only a SIPI ends wait-for-SIPI");
    // SIPI to page 0x77: real mode at 0x7700:0, paging and PAE off.
    v.regs.gpr[gpr::RCX] = 0x830;
    v.regs.gpr[gpr::RAX] = 6 << 8 | 0x77;
    v.regs.gpr[gpr::RDX] = 1;
    assert_eq!(exit(&s.pc, &mut v, ev::WRMSR), Step::Resume, "no new vCPU");
    assert!(s.pc.interrupt_pending(1));
    checked_exit(&mut ap, false, |ap| {
        s.pc.wake(ap, 1);
        Step::Resume
    });
    assert_eq!(
        (ap.regs.cs.sel, ap.regs.cs.base, ap.regs.rip),
        (0x7700, 0x77000, 0)
    );
    assert_eq!(
        (ap.regs.cr0 & bits::CR0_PG, ap.regs.cr3, ap.regs.cr4),
        (0, 0, 0)
    );
    // A SIPI to a running AP is ignored.
    v.regs.gpr[gpr::RAX] = 6 << 8 | 0x55;
    exit(&s.pc, &mut v, ev::WRMSR);
    assert!(!s.pc.interrupt_pending(1));
}

#[test]
fn power_off_through_pm1_control_ends_the_vm() {
    let s = pc(1);
    let mut v = vcpu();
    // out dx, ax to PM1_CNT with SLP_TYP 5 and SLP_EN.
    v.regs.qual[0] = 1 | (PM_BASE + 4) << 16;
    v.regs.inst_len = 1;
    v.regs.gpr[gpr::RAX] = 5 << 10 | 1 << 13;
    assert_eq!(exit(&s.pc, &mut v, ev::IO), Step::End(End::PowerOff));
    // Unknown ports read all ones.
    v.regs.qual[0] = 8 | 0x1234 << 16;
    v.regs.gpr[gpr::RAX] = 0;
    exit(&s.pc, &mut v, ev::IO);
    assert_eq!(v.regs.gpr[gpr::RAX], 0xff);
}

/// A hostile guest: random exits with random state (MSRs, ports and control registers
/// of the PC, the local APIC page) never panic the handler, and every change is in the
/// MTD the reply carries.
#[test]
fn random_exits_record_every_change() {
    use crate::testutil::Rng;
    let s = pc(2);
    let mut rng = Rng::new(13);
    let mut v = vcpu();
    for n in [1u32, 0] {
        v.regs.gpr = [0xdead; 16];
        checked_exit(&mut v, true, |v| s.pc.handle(v, n, Exit::Startup));
    }
    let events = RANDOM_EXITS;
    let msrs = [
        0x10,
        0x174,
        0x175,
        0x176,
        0x179,
        0x1a0,
        0x277,
        0xc000_0080,
        0xc000_0081,
        0xc000_0082,
        0xc000_0083,
        0xc000_0084,
        0xc000_0100,
        0xc000_0101,
        0xc000_0102,
        0xc000_0103,
        0x1b,
        0x6e0,
        0x808,
        0x80b,
        0x4b56_4d00,
        0x4b56_4d01,
        0x1234,
    ];
    let ports = [
        0x3f8u64, 0x3f9, 0x3fd, 0x20, 0x21, 0x40, 0x43, 0x61, 0x70, 0x71, 0x80, 0xcf8, 0xcfc,
        0x604, 0x600,
    ];
    let pick = |rng: &mut Rng, from: &[u64]| from[rng.below(from.len() as u64) as usize];
    for i in 0..20_000 {
        let e = pick(&mut rng, &events);
        for g in v.regs.gpr.iter_mut() {
            *g = if rng.chance(2) {
                rng.below(0x10)
            } else {
                rng.next_u64()
            };
        }
        if e == ev::RDMSR || e == ev::WRMSR {
            v.regs.gpr[gpr::RCX] = pick(&mut rng, &msrs);
            if rng.chance(2) {
                v.regs.gpr[gpr::RDX] &= 0xffff;
            }
        }
        v.regs.qual = match e {
            ev::IO | ev::IO_STRING => [
                rng.next_u64() & 0x3f | pick(&mut rng, &ports) << 16,
                rng.next_u64(),
            ],
            ev::CR_ACCESS => [rng.next_u64() & 0xf_ff30 | pick(&mut rng, &[0, 3, 4, 8]), 0],
            _ if rng.chance(2) => [rng.next_u64(), LAPIC_BASE + rng.below(0x400)],
            _ => [rng.next_u64(), rng.next_u64()],
        };
        v.regs.inst_len = rng.below(16);
        v.regs.rflags = rng.next_u64() & 0x2ff7;
        v.regs.intr_state = rng.below(4) as u32;
        v.regs.inj_info = if rng.chance(3) { 0x8000_0000 } else { 0 };
        v.regs.rip = rng.below(0x1000);
        v.regs.efer = if rng.chance(2) { 0x500 } else { 0 };
        v.regs.cr0 = if rng.chance(2) { 0x8000_0011 } else { 0x11 };
        v.regs.cr4 = rng.next_u64() & 0x20;
        v.regs.cs.ar = if rng.chance(2) { 0x29b } else { 0x49b };
        let at = rng.below(0x1000);
        let junk: Vec<u8> = (0..16).map(|_| rng.byte()).collect();
        let _ = crate::vcpu::GuestMemory::write(&mut v, at, &junk);
        s.clock.advance(rng.below(1 << 20));
        let x = Exit::decode(e, &v.regs);
        checked_exit(&mut v, false, |v| s.pc.handle(v, (i % 2) as u32, x));
    }
}

/// A disk-service session as the PC's disk: the guest's request goes out on the
/// session when the driver notifies, and the completion signal
/// ([`Pc::disk_completions`]) finishes it and interrupts the vCPU through the I/O APIC.
#[test]
fn a_session_disk_completes_through_the_io_apic() {
    use crate::virtio::async_block::AsyncBlock;
    use crate::virtio::pci::{common, NOTIFY_CFG};
    use crate::virtio::queue::tests::{get, put, Driver};
    use crate::virtio::session::{DataArea, Doorbell, SessionBackend};
    use crate::virtio::{feature, status};
    use peregrine_blkproto::ring::{region, Layout};
    use peregrine_blkproto::{Bounds, ServiceRing, SessionLimits, Status};
    use std::sync::atomic::AtomicU32;

    struct Bell(Arc<AtomicU32>);
    impl Doorbell for Bell {
        fn ring_doorbell(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    let mut mem = SharedMem::new(RAM as usize);
    let layout = Layout::new(8).unwrap();
    let ring: &'static [AtomicU32] = Box::leak(region(layout.bytes()).into_boxed_slice());
    let limits = SessionLimits::new(
        Bounds {
            first_lba: 34,
            blocks: 128,
        },
        512,
        RAM + 0x1_0000,
        8,
    );
    let mut svc = ServiceRing::new(ring, layout, limits).unwrap();
    let rings = Arc::new(AtomicU32::new(0));
    let area = DataArea {
        ram_len: RAM,
        bounce_base: RAM,
        bounce_len: 0x1_0000,
        bounce: SharedMem::new(0x1_0000),
    };
    let backend = SessionBackend::new(ring, layout, area, Bell(rings.clone())).unwrap();
    let disk = PcDisk::Device(Box::new(AsyncBlock::new(backend, false, b"session")));
    let kicks = Arc::new(Kicks::default());
    let pc = Pc::new(
        PcConfig {
            vcpus: 1,
            ram: RAM,
            tsc_hz: 1_000_000_000,
            wall_secs: 0,
        },
        &mut mem,
        &bzimage(),
        b"console=ttyS0",
        None,
        Some(disk),
        Vec::<Vec<u8>>::new(),
        Arc::new(ManualClock::new(0)),
        kicks.clone(),
        host_cpuid,
    )
    .unwrap();
    let mut v = vcpu();
    wrmsr(&pc, &mut v, 0x1b, 0xfee0_0000 | 1 << 11 | 1 << 10 | 1 << 8);
    wrmsr(&pc, &mut v, 0x80f, 0x1ff);
    // The disk's INTA# → vector 0x30.
    let gsi = pci::intx_gsi(DISK_SLOT, 0);
    for (reg, val) in [(0x10 + 2 * gsi, 0x30u32), (0x11 + 2 * gsi, 0)] {
        pc.core()
            .mmio
            .write(IOAPIC_BASE, &reg.to_le_bytes())
            .unwrap();
        pc.core()
            .mmio
            .write(IOAPIC_BASE + 0x10, &val.to_le_bytes())
            .unwrap();
    }
    // The driver brings the device up through its BAR.
    let bar = PciLayout::DEFAULT.mmio32.0;
    let w = |off: u64, val: u64, size: usize| {
        pc.core()
            .mmio
            .write(bar + off, &val.to_le_bytes()[..size])
            .unwrap();
    };
    let d = Driver::new(256, 0x10_0000);
    w(common::DEVICE_STATUS, 0, 1);
    w(
        common::DEVICE_STATUS,
        u64::from(status::ACKNOWLEDGE | status::DRIVER),
        1,
    );
    w(common::DRIVER_FEATURE_SELECT, 1, 4);
    w(common::DRIVER_FEATURE, feature::VERSION_1 >> 32, 4);
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    w(common::DEVICE_STATUS, u64::from(s), 1);
    w(common::QUEUE_SELECT, 0, 2);
    w(common::QUEUE_SIZE, 256, 2);
    w(common::QUEUE_DESC, d.desc, 8);
    w(common::QUEUE_DRIVER, d.avail, 8);
    w(common::QUEUE_DEVICE, d.used, 8);
    w(common::QUEUE_ENABLE, 1, 2);
    w(common::DEVICE_STATUS, u64::from(s | status::DRIVER_OK), 1);
    // A read of sector 2 into a page of guest RAM.
    let mut d = d;
    let mut hdr = [0u8; 16];
    hdr[8..].copy_from_slice(&2u64.to_le_bytes());
    put(&mut mem, 0x20_0000, &hdr);
    d.add_chain(
        &mut mem,
        &[
            (0x20_0000, 16, false),
            (0x20_1000, 512, true),
            (0x20_2000, 1, true),
        ],
    );
    w(NOTIFY_CFG, 0, 2);
    assert_eq!(rings.load(Ordering::SeqCst), 1, "the doorbell rang");
    assert!(!pc.disk_completions(), "nothing finished yet");
    // The service: the descriptor points at the guest's buffer.
    let r = svc.next_request().unwrap().unwrap();
    assert_eq!((r.lba, r.count, r.buf), (36, 1, 0x20_1000));
    put(&mut mem, r.buf, &[0x5a; 512]);
    svc.complete(r.tag, Status::Ok, 1).unwrap();
    assert_eq!(svc.publish(), Ok(1));
    assert!(kicks.0.lock().unwrap().is_empty());
    assert!(
        pc.disk_completions(),
        "the completion interrupts the driver"
    );
    assert_eq!(d.take_used(&mut mem), [(0, 513)]);
    assert_eq!(get(&mut mem, 0x20_2000, 1), [0]);
    assert_eq!(*kicks.0.lock().unwrap(), vec![0]);
    v.regs.rflags = bits::IF;
    exit(&pc, &mut v, ev::RECALL);
    assert_eq!(v.regs.inj_info, 0x8000_0030);
}

// QEMU's test devices on the PC ([`Pc::add_qemu_devices`]), through the exit handler.
mod qemu {
    use super::*;
    use crate::fw_cfg::{self, dma, key};
    use crate::qemu_testdev as td;

    /// `out` of `size` bytes of `value` to `port`, through an I/O exit (with interrupts
    /// disabled: [`take`] takes what it raised).
    fn out(s: &Setup, v: &mut MockVcpu, port: u64, size: u64, value: u64) -> Step {
        v.regs.rflags = 0;
        v.regs.qual[0] = (size - 1) | port << 16;
        v.regs.inst_len = 1;
        v.regs.gpr[gpr::RAX] = value;
        exit(&s.pc, v, ev::IO)
    }

    /// `in` of `size` bytes from `port`, through an I/O exit.
    fn inp(s: &Setup, v: &mut MockVcpu, port: u64, size: u64) -> u64 {
        v.regs.rflags = 0;
        v.regs.qual[0] = (size - 1) | 8 | port << 16;
        v.regs.inst_len = 1;
        v.regs.gpr[gpr::RAX] = 0;
        assert_eq!(exit(&s.pc, v, ev::IO), Step::Resume);
        v.regs.gpr[gpr::RAX] & ((1 << (size * 8)) - 1)
    }

    fn with_devices(vcpus: u32, devs: &QemuDevices) -> Setup {
        let mut s = pc(vcpus);
        let mem = s.mem.clone();
        s.pc.add_qemu_devices(devs, mem).unwrap();
        s
    }

    #[test]
    fn the_linux_pc_has_none_of_them_by_default() {
        let s = pc(1);
        let mut v = vcpu();
        for port in [0x510, 0x511, 0x514, 0xf4, 0xe0, 0xe8, 0x2000, 0x200e] {
            assert_eq!(inp(&s, &mut v, port, 1), 0xff, "port {port:#x}");
        }
        assert_eq!(out(&s, &mut v, 0xf4, 4, 1), Step::Resume);
        assert!(s.pc.core().mmio.resolve(td::IOMEM_ADDR, 1).is_none());
    }

    #[test]
    fn fw_cfg_reads_the_pcs_configuration_through_port_exits() {
        let s = with_devices(
            2,
            &QemuDevices {
                fw_cfg: Some(FwCfgSetup {
                    boot: fw_cfg::BootItems {
                        cmdline: Some((0x2_0000, b"a=1".to_vec())),
                        ..Default::default()
                    },
                    files: vec![("opt/org.example/x".into(), vec![7; 3])],
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        let mut v = vcpu();
        // kvm-unit-tests' fwcfg_get_u(): `out dx, ax` of the key, then byte `in`s.
        let get = |v: &mut MockVcpu, k: u16, n: usize| -> Vec<u8> {
            out(&s, v, fw_cfg::SELECTOR_PORT, 2, u64::from(k));
            (0..n)
                .map(|_| inp(&s, v, fw_cfg::DATA_PORT, 1) as u8)
                .collect()
        };
        assert_eq!(get(&mut v, key::SIGNATURE, 4), b"QEMU");
        assert_eq!(get(&mut v, key::ID, 4), [1, 0, 0, 0], "no DMA asked");
        assert_eq!(get(&mut v, key::RAM_SIZE, 8), RAM.to_le_bytes());
        assert_eq!(get(&mut v, key::NB_CPUS, 2), [2, 0]);
        assert_eq!(get(&mut v, key::MAX_CPUS, 2), [2, 0]);
        assert_eq!(
            get(&mut v, key::KERNEL_DATA, 8),
            [0; 8],
            "MAX_RAM: no limit"
        );
        assert_eq!(get(&mut v, key::CMDLINE_DATA, 5), b"a=1\0\0");
        let e820 = get(&mut v, 0x20, 4 * 20 + 1);
        assert_eq!(&e820[..80], &fw_cfg::e820_file(&memory_map(RAM))[..]);
        assert_eq!(e820[80], 0);
        assert_eq!(get(&mut v, 0x21, 4), [7, 7, 7, 0]);
        assert_eq!(get(&mut v, key::FILE_DIR, 4), 2u32.to_be_bytes());
        // No DMA register without DMA.
        assert_eq!(inp(&s, &mut v, fw_cfg::DMA_PORT, 4), 0xffff_ffff);
        // A refused file refuses the lot, and the buses stay as they were.
        let mut t = pc(1);
        let bad = QemuDevices {
            fw_cfg: Some(FwCfgSetup {
                files: vec![("etc/e820".into(), Vec::new())],
                ..Default::default()
            }),
            debug_exit: true,
            ..Default::default()
        };
        let n = t.pc.core().pio.len();
        let mem = t.mem.clone();
        assert_eq!(
            t.pc.add_qemu_devices(&bad, mem),
            Err(QemuDevicesError::FwCfg(fw_cfg::FwCfgError::Exists))
        );
        assert_eq!(t.pc.core().pio.len(), n);
    }

    #[test]
    fn fw_cfg_dma_reads_guest_memory_the_pc_was_built_over() {
        let s = with_devices(1, &QemuDevices::kvm_unit_tests());
        let mut v = vcpu();
        assert_eq!(
            inp(&s, &mut v, fw_cfg::DMA_PORT, 4),
            0x554d_4551,
            "\"QEMU\""
        );
        out(&s, &mut v, fw_cfg::SELECTOR_PORT, 2, u64::from(key::ID));
        assert_eq!(inp(&s, &mut v, fw_cfg::DATA_PORT, 1), 3);
        // Select NB_CPUS and read it to 0x3000 with an access at 0x2000.
        let access = 0x2000u64;
        let mut a = (u32::from(key::NB_CPUS) << 16 | dma::SELECT | dma::READ)
            .to_be_bytes()
            .to_vec();
        a.extend_from_slice(&2u32.to_be_bytes());
        a.extend_from_slice(&0x3000u64.to_be_bytes());
        s.mem.0.lock()[access as usize..access as usize + 16].copy_from_slice(&a);
        // `outl(bswap32(addr), 0x518)`: the little-endian eax of the big-endian half.
        let low = u32::from_le_bytes((access as u32).to_be_bytes());
        out(&s, &mut v, fw_cfg::DMA_PORT + 4, 4, u64::from(low));
        assert_eq!(s.mem.bytes(access, 4), [0; 4], "control 0: done");
        assert_eq!(s.mem.bytes(0x3000, 2), [1, 0]);
    }

    #[test]
    fn debug_exit_ends_the_vm_with_its_status() {
        let s = with_devices(1, &QemuDevices::kvm_unit_tests());
        let mut v = vcpu();
        // kvm-unit-tests' exit(code): `outl(code, 0xf4)`.
        let step = out(&s, &mut v, td::DEBUG_EXIT_PORT, 4, 0);
        assert_eq!(step, Step::End(End::DebugExit { value: 0 }));
        let Step::End(end) = out(&s, &mut v, td::DEBUG_EXIT_PORT, 4, 0x7f) else {
            panic!("no end")
        };
        assert_eq!(end, End::DebugExit { value: 0x7f });
        assert_eq!(end.exit_status(), Some(0xff));
        assert_eq!(end.code(), 12 << 32 | 0xff);
        assert_eq!(End::PowerOff.exit_status(), None);
        assert!(end.to_string().contains("status 255"), "{end}");
        // realmode.c's `outb(code, 0xf4)`.
        assert_eq!(
            out(&s, &mut v, td::DEBUG_EXIT_PORT, 1, 0x1_0003),
            Step::End(End::DebugExit { value: 3 })
        );
        // The largest value: the status keeps its 33 bits, the report its low 32.
        let end = End::DebugExit { value: u32::MAX };
        assert_eq!(end.exit_status(), Some(0x1_ffff_ffff));
        assert_eq!(end.code(), 12 << 32 | 0xffff_ffff);
    }

    /// Programs I/O APIC `pin` to `vector` (physical destination 0), edge or level.
    fn route(s: &Setup, pin: u32, vector: u8, level: bool) {
        let w = |reg: u32, val: u32| {
            s.pc.core()
                .mmio
                .write(IOAPIC_BASE, &reg.to_le_bytes())
                .unwrap();
            s.pc.core()
                .mmio
                .write(IOAPIC_BASE + 0x10, &val.to_le_bytes())
                .unwrap();
        };
        w(0x11 + 2 * pin, 0);
        w(0x10 + 2 * pin, u32::from(vector) | u32::from(level) << 15);
    }

    /// Takes the interrupt pending for vCPU 0 at a recall exit: its vector, if any.
    fn take(s: &Setup, v: &mut MockVcpu) -> Option<u8> {
        v.regs.rflags = bits::IF;
        v.regs.inj_info = 0;
        v.regs.intr_state = 0;
        exit(&s.pc, v, ev::RECALL);
        (v.regs.inj_info & 0x8000_0000 != 0).then_some(v.regs.inj_info as u8)
    }

    /// The x2APIC EOI write (interrupts disabled: a redelivered interrupt waits).
    fn eoi(s: &Setup, v: &mut MockVcpu) {
        v.regs.rflags = 0;
        v.regs.inj_info = 0;
        v.regs.gpr[gpr::RCX] = 0x80b;
        v.regs.gpr[gpr::RAX] = 0;
        v.regs.gpr[gpr::RDX] = 0;
        assert_eq!(exit(&s.pc, v, ev::WRMSR), Step::Resume);
        assert_eq!(v.regs.inj_info & 0xffff_ffff, 0, "nothing injected");
    }

    #[test]
    fn testdev_irq_lines_reach_the_pic_and_the_io_apic() {
        let s = with_devices(1, &QemuDevices::kvm_unit_tests());
        let mut v = vcpu();
        wrmsr(
            &s.pc,
            &mut v,
            0x1b,
            0xfee0_0000 | 1 << 11 | 1 << 10 | 1 << 8,
        );
        wrmsr(&s.pc, &mut v, 0x80f, 0x1ff);

        // ioapic.c's edge test: toggle line 0x0e, pin 14 edge-triggered.
        route(&s, 14, 0x2e, false);
        assert_eq!(out(&s, &mut v, td::IRQ_PORT + 0x0e, 1, 1), Step::Resume);
        assert_eq!(out(&s, &mut v, td::IRQ_PORT + 0x0e, 1, 0), Step::Resume);
        assert_eq!(take(&s, &mut v), Some(0x2e));
        eoi(&s, &mut v);
        assert_eq!(take(&s, &mut v), None, "one edge, one interrupt");
        // The PIC saw it too: IRQ 14 is the slave's input 6 (its IRR, read at 0xa0).
        assert_eq!(inp(&s, &mut v, 0xa0, 1) & 1 << 6, 1 << 6);

        // Level-triggered: the interrupt comes again after EOI while the line stays high.
        route(&s, 14, 0x3e, true);
        out(&s, &mut v, td::IRQ_PORT + 0x0e, 1, 1);
        assert_eq!(take(&s, &mut v), Some(0x3e));
        eoi(&s, &mut v);
        assert_eq!(take(&s, &mut v), Some(0x3e), "still high");
        out(&s, &mut v, td::IRQ_PORT + 0x0e, 1, 0);
        eoi(&s, &mut v);
        assert_eq!(take(&s, &mut v), None);
        assert_eq!(
            s.pc.ioapic.lock().entry(14).unwrap() & crate::ioapic::rte::REMOTE_IRR,
            0
        );

        // Line 0 is ISA IRQ 0: I/O APIC input 2 and the master PIC's input 0.
        route(&s, 2, 0x30, false);
        out(&s, &mut v, td::IRQ_PORT, 1, 1);
        assert_eq!(take(&s, &mut v), Some(0x30));
        eoi(&s, &mut v);
        assert_eq!(inp(&s, &mut v, 0x20, 1) & 1, 1);
        out(&s, &mut v, td::IRQ_PORT, 1, 0);

        // Lines 16-23 are I/O APIC inputs 16-23.
        route(&s, 19, 0x40, false);
        out(&s, &mut v, td::IRQ_PORT + 19, 1, 1);
        assert_eq!(take(&s, &mut v), Some(0x40));
        eoi(&s, &mut v);

        // The register ports and the memory area.
        out(&s, &mut v, td::IOPORT, 4, 0xdead_beef);
        assert_eq!(inp(&s, &mut v, td::IOPORT, 2), 0xbeef);
        assert_eq!(inp(&s, &mut v, td::IOPORT_BYTE + 3, 1), 0xde);
        assert_eq!(out(&s, &mut v, td::FLUSH_PORT, 4, 0x1000), Step::Resume);
        let m = &s.pc.core().mmio;
        m.write(td::IOMEM_ADDR + 8, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 2];
        m.read(td::IOMEM_ADDR + 9, &mut b).unwrap();
        assert_eq!(b, [2, 3]);
    }

    #[test]
    fn adding_the_devices_twice_is_refused() {
        let mut s = with_devices(1, &QemuDevices::kvm_unit_tests());
        let mem = s.mem.clone();
        assert!(matches!(
            s.pc.add_qemu_devices(&QemuDevices::kvm_unit_tests(), mem),
            Err(QemuDevicesError::Bus(_))
        ));
    }
}
