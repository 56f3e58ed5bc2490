use std::vec::Vec;

use super::*;
use crate::emul::EmulError;
use crate::machine::Exit;
use crate::testdev::*;
use crate::testutil::{checked_exit, MockVcpu, Rng, RANDOM_EXITS};
use crate::vcpu::GuestMemory;

type Lines = Arc<SpinLock<Vec<Vec<u8>>>>;

struct Shared(Lines);

impl LineSink for Shared {
    fn line(&mut self, line: &[u8]) {
        self.0.lock().push(line.to_vec());
    }
}

fn fake_cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    match leaf {
        0 => [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65], // AuthenticAMD
        1 => [0x0083_0f10, 0x0a00_0800, 0x0000_0028, 0x0178_bfff],
        0xd => [7, 0, 0, 0],
        0x8000_0001 => [0, 0, 0x4, 0],
        _ => [leaf, sub, 0, 0],
    }
}

const ENTRY: u64 = 0x10_0000;

fn machine(mode: Mode, vcpus: u32) -> (Machine, Lines) {
    let lines: Lines = Arc::new(SpinLock::new(Vec::new()));
    let cfg = Config {
        mode,
        vcpus,
        entry: ENTRY,
    };
    (Machine::new(cfg, Shared(lines.clone()), fake_cpuid), lines)
}

/// A vCPU at the contract's entry state with the code bytes at RIP.
fn vcpu(m: &Machine, code: &[u8]) -> MockVcpu {
    let mut v = MockVcpu::new(0x40_0000);
    boot::write_entry_tables(&mut v).unwrap();
    v.put(ENTRY, code);
    let step = checked_exit(&mut v, true, |v| m.handle(v, 0, Exit::Startup));
    assert_eq!(step, Step::Resume);
    v.regs.mtd = Mtd::empty();
    v
}

/// Runs `event` like the portal handler: the MTD cleared first; every change recorded
/// in it (`checked_exit`).
fn exit(m: &Machine, v: &mut MockVcpu, event: u64) -> Step {
    let step = checked_exit(v, false, |v| m.handle(v, 0, Exit::decode(event, &v.regs)));
    // Nothing is carried back that the portal did not deliver (injection and XCR0
    // aside: written whole).
    let allowed = portal_mtd(event) | Mtd::INJ | Mtd::XSAVE;
    assert!(
        allowed.contains(v.regs.mtd),
        "event {event:#x} replies with {:?} beyond {:?}",
        v.regs.mtd,
        allowed
    );
    step
}

fn io_qual(port: u16, size: u64, input: bool) -> u64 {
    (u64::from(port) << 16) | (size - 1) | (u64::from(input) << 3)
}

#[test]
fn startup_gives_the_contract_entry_state() {
    let (m, _) = machine(Mode::Hostile(77), 2);
    let mut v = MockVcpu::new(0x40_0000);
    v.regs.gpr = [0xdead; 16];
    v.regs.qual = [1, 2];
    let step = checked_exit(&mut v, true, |v| m.handle(v, 1, Exit::Startup));
    assert_eq!(step, Step::Resume);
    let r = v.regs;
    assert_eq!(r.rip, ENTRY);
    assert_eq!(
        [
            r.gpr[gpr::RDI],
            r.gpr[gpr::RSI],
            r.gpr[gpr::RDX],
            r.gpr[gpr::RCX]
        ],
        [1, 3, 2, 77]
    );
    assert_eq!(r.gpr[gpr::RBX], 0);
    assert_eq!(r.rflags, 2);
    assert_eq!(
        r.cr0 & (bits::CR0_PE | bits::CR0_PG),
        bits::CR0_PE | bits::CR0_PG
    );
    assert_eq!(r.cr4, bits::CR4_PAE);
    assert_eq!(r.efer, bits::EFER_LME | bits::EFER_LMA);
    assert_eq!(crate::vcpu::code_bits(&r), 64);
    assert!(r
        .mtd
        .contains(Mtd::GPRS | Mtd::CR | Mtd::EFER | Mtd::CS_SS | Mtd::GDTR));
    assert_eq!(m.core().exits(), 0);
    // The tables map the first 4 GiB 1:1 with 2-MiB pages.
    boot::write_entry_tables(&mut v).unwrap();
    let regs = v.regs;
    for va in [0u64, ENTRY + 5, MMIO_ADDR + 4, 0xffff_fff0] {
        assert_eq!(
            crate::vcpu::translate(&mut v, &regs, va, crate::vcpu::Access::WRITE),
            Ok(va)
        );
    }
}

#[test]
fn cpuid_passes_the_host_through_with_changes() {
    let (m, _) = machine(Mode::Check, 2);
    let mut v = vcpu(&m, &[]);
    v.regs.gpr[gpr::RAX] = 0;
    assert_eq!(exit(&m, &mut v, ev::CPUID), Step::Resume);
    assert_eq!(v.regs.gpr[gpr::RBX], 0x6874_7541);
    assert_eq!(v.regs.rip, ENTRY + 2);
    v.regs.gpr[gpr::RAX] = 1;
    v.regs.inst_len = 3;
    m.handle(&mut v, 1, Exit::Cpuid);
    assert_eq!(v.regs.rip, ENTRY + 5);
    assert_eq!(v.regs.gpr[gpr::RCX] as u32 & (1 << 31 | 1 << 5), 1 << 31);
    assert_eq!(v.regs.gpr[gpr::RBX] >> 24, 1, "APIC ID = vCPU index");
    v.regs.gpr[gpr::RAX] = 0x8000_0001;
    exit(&m, &mut v, ev::CPUID);
    assert_eq!(v.regs.gpr[gpr::RCX], 0, "no SVM");
    v.regs.gpr[gpr::RAX] = 0x4000_0000;
    exit(&m, &mut v, ev::CPUID);
    assert_eq!(v.regs.gpr[..4], [0; 4]);
}

#[test]
fn ports_console_magic_exception_start_and_done() {
    let (m, lines) = machine(Mode::Check, 2);
    let mut v = vcpu(&m, &[]);
    v.regs.inst_len = 2;
    for &b in b"check pio_out ok\n" {
        v.regs.gpr[gpr::RAX] = 0x1234_5600 | u64::from(b);
        v.regs.qual[0] = io_qual(0xe9, 1, false);
        assert_eq!(exit(&m, &mut v, ev::IO), Step::Resume);
    }
    assert_eq!(lines.lock().as_slice(), [b"check pio_out ok".to_vec()]);
    assert_eq!(v.regs.rip, ENTRY + 2 * 17);

    v.regs.gpr[gpr::RAX] = u64::MAX;
    v.regs.qual[0] = io_qual(0x81, 4, true);
    exit(&m, &mut v, ev::IO);
    assert_eq!(
        v.regs.gpr[gpr::RAX],
        u64::from(MAGIC),
        "in eax zero-extends"
    );
    v.regs.qual[0] = io_qual(0x81, 1, true);
    v.regs.gpr[gpr::RAX] = 0x1100;
    exit(&m, &mut v, ev::IO);
    assert_eq!(v.regs.gpr[gpr::RAX], 0x11a5, "in al merges");

    let rip = v.regs.rip;
    v.regs.gpr[gpr::RAX] = 0x42;
    v.regs.qual[0] = io_qual(0x83, 4, false);
    assert_eq!(exit(&m, &mut v, ev::IO), Step::Resume);
    assert_eq!(v.regs.rip, rip + 2, "delivered before the next instruction");
    assert_eq!((v.regs.inj_info, v.regs.inj_error), (0x8000_0b0d, 0x42));

    v.regs.qual[0] = io_qual(0xf1, 4, false);
    for n in [0, 5] {
        v.regs.gpr[gpr::RAX] = n;
        assert_eq!(
            exit(&m, &mut v, ev::IO),
            Step::Resume,
            "no vCPU {n} to start"
        );
    }
    v.regs.gpr[gpr::RAX] = 1;
    assert_eq!(exit(&m, &mut v, ev::IO), Step::Start(1));
    assert_eq!(exit(&m, &mut v, ev::IO), Step::Resume, "started once");

    v.regs.gpr[gpr::RAX] = 3;
    v.regs.qual[0] = io_qual(0xf4, 4, false);
    assert_eq!(exit(&m, &mut v, ev::IO), Step::End(End::Done(3)));
    assert_eq!(End::Done(3).code(), 3);

    // Unmapped ports read all-ones and ignore writes; string I/O ends the VM.
    v.regs.qual[0] = io_qual(0x1234, 2, true);
    v.regs.gpr[gpr::RAX] = 0;
    exit(&m, &mut v, ev::IO);
    assert_eq!(v.regs.gpr[gpr::RAX], 0xffff);
    // rep outsb from RAM to the console; rep insd from the magic port.
    v.put(v.regs.rip, &[0xf3, 0x6e, 0xf3, 0x6d]);
    v.put(0x2000, b"rep\n");
    v.regs.gpr[gpr::RSI] = 0x2000;
    v.regs.gpr[gpr::RCX] = 4;
    v.regs.gpr[gpr::RDX] = 0xe9;
    v.regs.qual[0] = io_qual(0xe9, 1, false) | 1 << 4 | 1 << 5;
    assert_eq!(exit(&m, &mut v, ev::IO_STRING), Step::Resume);
    assert_eq!(lines.lock().last().map(|l| l.as_slice()), Some(&b"rep"[..]));
    v.regs.gpr[gpr::RDI] = 0x3000;
    v.regs.gpr[gpr::RCX] = 2;
    v.regs.gpr[gpr::RDX] = 0x81;
    v.regs.qual[0] = io_qual(0x81, 4, true) | 1 << 4 | 1 << 5;
    exit(&m, &mut v, ev::IO_STRING);
    let mut d = [0u8; 8];
    v.read(0x3000, &mut d).unwrap();
    assert_eq!(d, [0xa5, 0xa5, 0x5a, 0x5a, 0xa5, 0xa5, 0x5a, 0x5a]);
    assert_eq!((v.regs.gpr[gpr::RCX], v.regs.gpr[gpr::RDI]), (0, 0x3008));
    v.regs.qual[0] = io_qual(0x80, 1, false);
    v.regs.inst_len = 0;
    assert!(matches!(
        exit(&m, &mut v, ev::IO),
        Step::End(End::NoLength { .. })
    ));
}

#[test]
fn mmio_register_through_the_emulator() {
    let (m, _) = machine(Mode::Check, 1);
    // mov rax, [0xd0000000]; mov [rbx], rcx (rbx = 0xd0000000); mov edx, [rbx+4]
    let code = [
        0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x00, 0xd0, 0x48, 0x89, 0x0b, 0x8b, 0x53, 0x04,
    ];
    let mut v = vcpu(&m, &code);
    v.regs.qual = [0, MMIO_ADDR];
    assert_eq!(exit(&m, &mut v, ev::NPT_FAULT), Step::Resume);
    assert_eq!(v.regs.gpr[gpr::RAX], MMIO_INIT);
    assert_eq!(v.regs.rip, ENTRY + 8);
    v.regs.gpr[gpr::RBX] = MMIO_ADDR;
    v.regs.gpr[gpr::RCX] = 0x0102_0304_0506_0708;
    v.regs.qual = [2, MMIO_ADDR];
    exit(&m, &mut v, ev::NPT_FAULT);
    v.regs.qual = [0, MMIO_ADDR + 4];
    exit(&m, &mut v, ev::NPT_FAULT);
    assert_eq!(v.regs.gpr[gpr::RDX], 0x0102_0304);
    assert_eq!(v.regs.rip, ENTRY + code.len() as u64);
    // A fetch from MMIO gets #UD (what the all-ones of an empty bus decode to), and so
    // does an invalid instruction.
    v.regs.qual = [1 << 4, MMIO_ADDR];
    v.regs.inj_info = 0;
    assert_eq!(exit(&m, &mut v, ev::NPT_FAULT), Step::Resume);
    assert_eq!(v.regs.inj_info, 0x8000_0306);
    v.regs.inj_info = 0;
    v.put(v.regs.rip, &[0x06]); // push es: invalid in 64-bit code
    v.regs.qual = [0, MMIO_ADDR];
    assert_eq!(exit(&m, &mut v, ev::NPT_FAULT), Step::Resume);
    assert_eq!(v.regs.inj_info, 0x8000_0306);
    // lock cmpxchg [rbx], ecx: equal (stores ecx), then not equal (loads eax).
    v.put(
        v.regs.rip,
        &[0xf0, 0x0f, 0xb1, 0x0b, 0xf0, 0x0f, 0xb1, 0x0b],
    );
    v.regs.gpr[gpr::RAX] = 0x0506_0708;
    v.regs.gpr[gpr::RCX] = 0xaabb_ccdd;
    v.regs.qual = [2, MMIO_ADDR];
    exit(&m, &mut v, ev::NPT_FAULT);
    assert_ne!(v.regs.rflags & bits::ZF, 0);
    exit(&m, &mut v, ev::NPT_FAULT);
    assert_eq!(v.regs.rflags & bits::ZF, 0);
    assert_eq!(v.regs.gpr[gpr::RAX], 0xaabb_ccdd);
    // An instruction the emulator does not know: #UD, counted.
    v.put(v.regs.rip, &[0x0f, 0xc7, 0x0b]); // cmpxchg8b [rbx]
    v.regs.inj_info = 0;
    assert_eq!(exit(&m, &mut v, ev::NPT_FAULT), Step::Resume);
    assert_eq!(v.regs.inj_info, 0x8000_0306);
    assert_eq!(m.core().undefined(), 3);
    // A data access whose page-table walk leaves RAM ends the VM.
    v.put(v.regs.rip, &[0x8b, 0x03]);
    v.regs.cr3 = 0x8000_0000;
    assert!(matches!(
        exit(&m, &mut v, ev::NPT_FAULT),
        Step::End(End::Emulation { .. })
    ));
}

#[test]
fn hlt_hypercall_msr_and_the_rest() {
    let (m, _) = machine(Mode::Check, 1);
    let mut v = vcpu(&m, &[]);
    v.regs.rflags = 0x202;
    v.regs.intr_state = 1;
    assert_eq!(exit(&m, &mut v, ev::HLT), Step::Resume);
    assert_eq!(v.regs.inj_info, 0x8000_0030);
    assert_eq!((v.regs.rip, v.regs.intr_state), (ENTRY + 1, 0));
    v.regs.rflags = 2;
    assert_eq!(exit(&m, &mut v, ev::HLT), Step::Stop);

    v.regs.gpr[gpr::RAX] = HYPERCALL;
    v.regs.gpr[gpr::RBX] = 41;
    exit(&m, &mut v, ev::VMCALL);
    assert_eq!(v.regs.gpr[gpr::RAX], 42);
    assert_eq!(v.regs.rip, ENTRY + 4);
    exit(&m, &mut v, ev::VMCALL);
    assert_eq!(v.regs.gpr[gpr::RAX], HC_ENOSYS);

    v.regs.gpr[gpr::RCX] = u64::from(TEST_MSR);
    v.regs.gpr[gpr::RAX] = 0xffff_ffff_8765_4321;
    v.regs.gpr[gpr::RDX] = 0x1234;
    exit(&m, &mut v, ev::WRMSR);
    v.regs.gpr[gpr::RAX] = 0;
    v.regs.gpr[gpr::RDX] = 0;
    exit(&m, &mut v, ev::RDMSR);
    assert_eq!(
        (v.regs.gpr[gpr::RAX], v.regs.gpr[gpr::RDX]),
        (0x8765_4321, 0x1234)
    );
    let rip = v.regs.rip;
    v.regs.gpr[gpr::RCX] = 0x10;
    v.regs.inj_info = 0;
    exit(&m, &mut v, ev::RDMSR);
    assert_eq!((v.regs.rip, v.regs.inj_info), (rip, 0x8000_0b0d));

    v.regs.gpr[gpr::RCX] = 0;
    v.regs.gpr[gpr::RAX] = 3;
    v.regs.gpr[gpr::RDX] = 0;
    exit(&m, &mut v, ev::XSETBV);
    assert_eq!(v.regs.xcr0, 3);
    v.regs.gpr[gpr::RAX] = 8;
    v.regs.inj_info = 0;
    exit(&m, &mut v, ev::XSETBV);
    assert_eq!(v.regs.inj_info, 0x8000_0b0d, "x87 bit missing");

    v.regs.inj_info = 0;
    assert_eq!(exit(&m, &mut v, ev::OTHER), Step::Resume);
    assert_eq!(v.regs.inj_info, 0x8000_0306);
    assert_eq!(exit(&m, &mut v, ev::RECALL), Step::Resume);
    assert!(matches!(
        exit(&m, &mut v, ev::TRIPLE_FAULT),
        Step::End(End::TripleFault { .. })
    ));
    // A triple fault the guest's tables make impossible is resumed, without the failed
    // delivery, a bounded number of times.
    let mut lost = MockVcpu::new(0x20_0000);
    crate::testutil::lost_translations(&mut lost);
    for _ in 0..crate::diag::RESUME_LIMIT {
        (lost.regs.inj_info, lost.regs.inj_error) = (0x8000_0b0e, 0x10);
        assert_eq!(exit(&m, &mut lost, ev::TRIPLE_FAULT), Step::Resume);
        assert_eq!((lost.regs.inj_info, lost.regs.rip), (0, 0x10_0000));
    }
    (lost.regs.inj_info, lost.regs.inj_error) = (0x8000_0b0e, 0x10);
    assert!(matches!(
        exit(&m, &mut lost, ev::TRIPLE_FAULT),
        Step::End(End::TripleFault { rip: 0x10_0000 })
    ));
    assert_eq!(m.core().resumed_shutdowns(), crate::diag::RESUME_LIMIT);
    assert!(matches!(
        exit(&m, &mut v, ev::INVALID_STATE),
        Step::End(End::InvalidState { .. })
    ));
    assert!(matches!(
        exit(&m, &mut v, ev::TASK_SWITCH),
        Step::End(End::Unhandled { event: 9, .. })
    ));
    assert!(m.core().exits() > 10);
}

/// #AC and #DB the VMM did not ask for (the kernel intercepts them for it) go back into
/// the guest: the same vector and error code; a software #DB (ICEBP on VT-x, type 5)
/// after RIP moves past the instruction. An NMI or a vector beyond 31 is no exception
/// to reflect.
#[test]
fn exceptions_are_reflected() {
    let (m, _) = machine(Mode::Loops(0), 1);
    let mut v = vcpu(&m, &[]);
    // #AC, hardware exception with error code 0.
    v.regs.qual = [0x8000_0b11, 0];
    assert_eq!(exit(&m, &mut v, ev::EXCEPTION), Step::Resume);
    assert_eq!((v.regs.inj_info, v.regs.inj_error), (0x8000_0b11, 0));
    assert_eq!(v.regs.rip, ENTRY);
    // #DB from a data breakpoint (DR6.B0 in the qualification).
    v.regs.inj_info = 0;
    v.regs.qual = [0x8000_0301, 1];
    assert_eq!(exit(&m, &mut v, ev::EXCEPTION), Step::Resume);
    assert_eq!(v.regs.inj_info, 0x8000_0301);
    assert_eq!(v.regs.rip, ENTRY);
    // ICEBP on VT-x: privileged software exception, one byte.
    v.regs.inj_info = 0;
    v.regs.qual = [0x8000_0501, 0];
    v.regs.inst_len = 1;
    assert_eq!(exit(&m, &mut v, ev::EXCEPTION), Step::Resume);
    assert_eq!((v.regs.inj_info, v.regs.rip), (0x8000_0301, ENTRY + 1));
    assert_eq!((m.core().reflected(1), m.core().reflected(17)), (2, 1));
    for q in [0x8000_0202, 0x8000_0340, 0x0000_0301] {
        v.regs.qual = [q, 0];
        assert!(matches!(
            exit(&m, &mut v, ev::EXCEPTION),
            Step::End(End::Unhandled { event: 0, .. })
        ));
    }
}

/// A hostile guest: random events with random state never panic the handler, and
/// every step is one of the three answers.
#[test]
fn random_exits_never_panic() {
    let (m, _) = machine(Mode::Hostile(1), 2);
    let mut rng = Rng::new(7);
    let mut v = vcpu(&m, &[]);
    let events = RANDOM_EXITS;
    for i in 0..20_000 {
        let e = events[rng.below(events.len() as u64) as usize];
        for g in v.regs.gpr.iter_mut() {
            *g = rng.next_u64();
        }
        v.regs.qual = [rng.next_u64(), rng.next_u64()];
        v.regs.inst_len = rng.below(16);
        v.regs.rip = if rng.chance(2) {
            ENTRY + rng.below(0x1000)
        } else {
            rng.next_u64()
        };
        if rng.chance(4) {
            v.regs.cr3 = rng.next_u64();
        }
        let at = ENTRY + rng.below(0x1000);
        let junk: Vec<u8> = (0..16).map(|_| rng.byte()).collect();
        let _ = v.write(at, &junk);
        let x = Exit::decode(e, &v.regs);
        checked_exit(&mut v, false, |v| m.handle(v, (i % 3) as u32, x));
    }
}

#[test]
fn ends_have_distinct_codes_and_messages() {
    let ends = [
        End::Done(0),
        End::PowerOff,
        End::Reset,
        End::TripleFault { rip: 1 },
        End::InvalidState { qual: [1, 2] },
        End::HaltForever { rip: 1 },
        End::Unhandled {
            event: 9,
            qual: [0; 2],
            rip: 1,
        },
        End::NoLength { rip: 1 },
        End::FetchFromMmio { gpa: 1 },
        End::Emulation {
            error: EmulError::Invalid,
            rip: 1,
        },
        End::TimeLimit { secs: 5 },
        End::VmmFault { vector: 0, rip: 1 },
    ];
    let codes: Vec<u64> = ends.iter().map(End::code).collect();
    for (i, c) in codes.iter().enumerate() {
        assert!(!codes[..i].contains(c), "{:?} shares its code", ends[i]);
    }
    assert_eq!(std::format!("{}", End::Done(3)), "guest done 3");
    assert_eq!(
        End::Done(u32::MAX).code(),
        0xffff_ffff,
        "below every other kind"
    );
    assert!(std::format!("{}", End::TripleFault { rip: 0x10 }).contains("0x10"));
}
