//! vCPU exit handling for the test guest's machine, platform-neutral.
//!
//! [`Machine`] holds the VM's two buses with the test devices ([`crate::testdev`]) and
//! is a [`Board`] over the machine core ([`crate::machine`]): the core answers every
//! [`Exit`] on a [`Platform`] (it reads and changes the register file the exit
//! delivered, marks what it changed in the MTD, and says what the VMM must do next, a
//! [`Step`]); the board adds the test contract's CPUID, MSR, HLT and hypercall. `nul/vmm`
//! calls it from its exit portals; the unit tests call it on a
//! [`MockVcpu`](crate::testutil::MockVcpu).
//!
//! [`portal_mtd`] is the state each event's portal must transfer for the handler here:
//! the handler reads nothing else and changes nothing else (besides the groups it
//! writes whole: the entry state at STARTUP, and an injection).
//!
//! The handler trusts nothing the guest controls: an instruction behind an MMIO or
//! string I/O exit that it cannot emulate gets #UD, and so does an instruction fetch
//! from where no RAM is; any event it cannot serve ends the VM with an [`End`] that says
//! why; it never panics. SVM without NRIP save reports no
//! instruction length for CPUID, HLT, VMMCALL, RDMSR/WRMSR, XSETBV, INVD and WBINVD: the
//! handler then skips the instruction's architectural length without prefixes (what
//! every compiler and Linux emit; a guest that adds redundant prefixes only confuses
//! itself).

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use alloc::sync::Arc;

use peregrine_abi::event::vcpu as ev;

use crate::boot::{self, BootInfo};
use crate::bus::{Action, Bus, SharedDevice};
use crate::emul::EmulError;
use crate::machine::{self, Board, Core, Exit, PortIo};
use crate::sync::SpinLock;
use crate::testdev::{self, LineSink, Mode};
use crate::vcpu::{bits, gpr, vector, ArchState, Event, Mtd, Platform};

/// Host CPUID: `(leaf, subleaf) -> [eax, ebx, ecx, edx]`.
pub type CpuidFn = fn(u32, u32) -> [u32; 4];

/// KVM's answer to an unknown hypercall (`-KVM_ENOSYS`).
pub const HC_ENOSYS: u64 = (-1000i64) as u64;

/// What the VMM does after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Reply: the vCPU runs on.
    Resume,
    /// Start the vCPU with this index (never started before), then reply.
    Start(u32),
    /// The vCPU halted with interrupts disabled: nothing wakes it, it stops for good
    /// (no reply). When every vCPU stopped, the VMM ends the VM ([`End::HaltForever`]).
    Stop,
    /// The vCPU halted with interrupts enabled and has no interrupt to take: block it
    /// until one is pending, then let the machine inject it
    /// ([`crate::pc::Pc::wake`]) and reply.
    Wait,
    /// End the VM.
    End(End),
}

/// Why a VM ended. The doc comment of each variant is its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest reported the end of its run with this code.
    Done(u32),
    /// The guest powered the machine off.
    PowerOff,
    /// The guest reset the machine (not supported: ended).
    Reset,
    /// Triple fault (shutdown).
    TripleFault {
        /// RIP at the exit.
        rip: u64,
    },
    /// The kernel refused the vCPU's state.
    InvalidState {
        /// Exit information.
        qual: [u64; 2],
    },
    /// Every vCPU halted with interrupts disabled: nothing can wake the VM.
    HaltForever {
        /// RIP of the last HLT.
        rip: u64,
    },
    /// An event the VMM does not handle.
    Unhandled {
        /// Event number.
        event: u64,
        /// Exit information.
        qual: [u64; 2],
        /// RIP at the exit.
        rip: u64,
    },
    /// An I/O exit without an instruction length.
    NoLength {
        /// RIP.
        rip: u64,
    },
    /// Instruction fetch from guest-physical memory no RAM backs.
    FetchFromMmio {
        /// Guest-physical address.
        gpa: u64,
    },
    /// The VMM's time limit for the VM passed.
    TimeLimit {
        /// The limit in seconds.
        secs: u64,
    },
    /// The VMM's own exit handler took an exception (a VMM or kernel bug, never the
    /// guest's doing): the VMM ended the VM and lives on.
    VmmFault {
        /// Exception vector.
        vector: u64,
        /// The handler's RIP.
        rip: u64,
    },
    /// The instruction behind an MMIO access could not be emulated.
    Emulation {
        /// Why.
        error: EmulError,
        /// RIP.
        rip: u64,
    },
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            End::Done(code) => write!(f, "guest done {code}"),
            End::PowerOff => write!(f, "guest powered off"),
            End::Reset => write!(f, "guest reset (not supported)"),
            End::TripleFault { rip } => write!(f, "triple fault at rip {rip:#x}"),
            End::InvalidState { qual } => {
                write!(f, "invalid guest state ({:#x}, {:#x})", qual[0], qual[1])
            }
            End::HaltForever { rip } => {
                write!(
                    f,
                    "every vCPU halted with interrupts disabled (last at rip {rip:#x})"
                )
            }
            End::Unhandled { event, qual, rip } => write!(
                f,
                "unhandled exit {event:#x} ({:#x}, {:#x}) at rip {rip:#x}",
                qual[0], qual[1]
            ),
            End::NoLength { rip } => write!(f, "I/O exit without length at rip {rip:#x}"),
            End::FetchFromMmio { gpa } => {
                write!(f, "instruction fetch from non-RAM address {gpa:#x}")
            }
            End::TimeLimit { secs } => write!(f, "time limit of {secs} s reached"),
            End::VmmFault { vector, rip } => {
                write!(
                    f,
                    "the exit handler took exception {vector} at rip {rip:#x}"
                )
            }
            End::Emulation { error, rip } => {
                write!(f, "MMIO access not emulated at rip {rip:#x}: {error}")
            }
        }
    }
}

impl End {
    /// A number for the end (kind in bits 32–39, the guest's code in 0–31 for
    /// [`End::Done`]): how the VMM reports it to the root.
    pub fn code(&self) -> u64 {
        let kind = match self {
            End::Done(c) => return u64::from(*c),
            End::PowerOff => 1,
            End::Reset => 2,
            End::TripleFault { .. } => 3,
            End::InvalidState { .. } => 4,
            End::HaltForever { .. } => 5,
            End::Unhandled { .. } => 6,
            End::NoLength { .. } => 7,
            End::FetchFromMmio { .. } => 8,
            End::Emulation { .. } => 9,
            End::TimeLimit { .. } => 10,
            End::VmmFault { .. } => 11,
        };
        kind << 32
    }
}

/// The state the portal of `event` transfers: what the handler here reads and changes.
pub fn portal_mtd(event: u64) -> Mtd {
    match event {
        ev::STARTUP => Mtd::empty(),
        ev::CPUID | ev::VMCALL | ev::RDMSR | ev::WRMSR | ev::XSETBV => Mtd::GPR_ACDB | Mtd::RIP_LEN,

        ev::HLT => Mtd::RIP_LEN | Mtd::RFLAGS | Mtd::STA,
        ev::CR_ACCESS => Mtd::GPRS | Mtd::CR | Mtd::EFER | Mtd::CS_SS | Mtd::RIP_LEN | Mtd::QUAL,
        ev::INVD | ev::WBINVD | ev::RECALL => Mtd::RIP_LEN,
        // IN and OUT: the port and size are in the qualification, the value in RAX.
        ev::IO => Mtd::GPR_ACDB | Mtd::RIP_LEN | Mtd::QUAL,
        // Emulating MMIO accesses and string I/O needs the registers, the segments and
        // the paging state.
        ev::NPT_FAULT | ev::IO_STRING => {
            Mtd::GPRS
                | Mtd::RIP_LEN
                | Mtd::RFLAGS
                | Mtd::CS_SS
                | Mtd::DS_ES
                | Mtd::FS_GS
                | Mtd::CR
                | Mtd::EFER
                | Mtd::QUAL
                | Mtd::STA
                | Mtd::INJ
        }
        _ => Mtd::RIP_LEN | Mtd::QUAL,
    }
}

/// What the guest is and runs.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// What the guest runs.
    pub mode: Mode,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The guest's entry point.
    pub entry: u64,
}

/// The test guest's machine: buses, devices and the exit handler.
pub struct Machine {
    /// Port I/O.
    pub pio: Bus,
    /// MMIO.
    pub mmio: Bus,
    cfg: Config,
    core: Core,
    msr: AtomicU64,
    started: AtomicU64,
}

impl Machine {
    /// A machine with the test devices; guest console lines go to `console`.
    pub fn new(cfg: Config, console: impl LineSink + 'static, cpuid: CpuidFn) -> Self {
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let con: SharedDevice = Arc::new(SpinLock::new(testdev::DebugConsole::new(console)));
        let ports: SharedDevice = Arc::new(SpinLock::new(testdev::TestPorts::default()));
        let reg: SharedDevice = Arc::new(SpinLock::new(testdev::MmioRegister::default()));
        // Fixed, non-overlapping ranges on empty buses: these inserts cannot fail.
        let _ = pio.insert(testdev::CONSOLE_PORT, 1, con);
        let _ = pio.insert(testdev::LOW_BLOCK, testdev::BLOCK_LEN, ports.clone());
        let _ = pio.insert(testdev::HIGH_BLOCK, testdev::BLOCK_LEN, ports);
        let _ = mmio.insert(testdev::MMIO_ADDR, testdev::MMIO_LEN, reg);
        Self {
            pio,
            mmio,
            cfg,
            core: Core::new(cfg.vcpus, cpuid),
            msr: AtomicU64::new(0),
            started: AtomicU64::new(1),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Events handled so far (STARTUP not counted).
    pub fn exits(&self) -> u64 {
        self.core.exits()
    }

    /// Instructions behind MMIO or string I/O exits answered with #UD: invalid, or
    /// beyond what the emulator does.
    pub fn undefined(&self) -> u64 {
        self.core.undefined()
    }

    /// Handles `exit` of vCPU `vcpu`, whose state `p` holds. The caller clears the MTD
    /// before (so it names exactly what changed) and replies with it after.
    pub fn handle<P: Platform + ?Sized>(&self, p: &mut P, vcpu: u32, exit: Exit) -> Step {
        machine::handle(self, p, vcpu, exit)
    }

    /// Exceptions of vector `v` reflected into the guest so far.
    pub fn reflected(&self, v: u8) -> u64 {
        self.core.reflected(v)
    }

    /// The contract's entry state for vCPU `vcpu`, every group it sets marked.
    pub fn entry_state(&self, regs: &mut ArchState, vcpu: u32) {
        let info = BootInfo {
            entry: self.cfg.entry,
            zero_page: 0,
            cr3: boot::PML4_ADDR,
            initrd: None,
        };
        boot::entry_state(regs, &info);
        regs.set_gpr(gpr::RDI, u64::from(vcpu));
        regs.set_gpr(gpr::RSI, self.cfg.mode.rsi());
        regs.set_gpr(gpr::RDX, u64::from(self.cfg.vcpus));
        regs.set_gpr(gpr::RCX, self.cfg.mode.rcx());
    }

    fn cpuid_result(&self, regs: &mut ArchState, vcpu: u32) {
        let leaf = regs.gpr[gpr::RAX] as u32;
        let sub = regs.gpr[gpr::RCX] as u32;
        let mut v = match leaf {
            // The hypervisor range: no paravirtual interface offered to this guest.
            0x4000_0000..=0x4fff_ffff => [0; 4],
            _ => (self.core.cpuid)(leaf, sub),
        };
        match leaf {
            1 => {
                // Hypervisor present; no VMX, no MONITOR; the vCPU's APIC ID.
                v[2] = (v[2] | crate::cpuid::HYPERVISOR_BIT) & !(1 << 5 | 1 << 3);
                v[1] = (v[1] & 0x00ff_ffff) | (vcpu << 24);
            }
            0xb | 0x1f => v[3] = vcpu,
            // No protection keys (PKU, OSPKE): the kernel refuses CR4.PKE.
            7 if sub == 0 => v[2] &= !(1 << 3 | 1 << 4),
            // No SVM.
            0x8000_0001 => v[2] &= !(1 << 2),
            _ => {}
        }
        set_cpuid_result(regs, v);
    }
}

impl Board for Machine {
    #[inline]
    fn core(&self) -> &Core {
        &self.core
    }

    #[inline]
    fn pio(&self) -> &Bus {
        &self.pio
    }

    #[inline]
    fn mmio_bus(&self) -> &Bus {
        &self.mmio
    }

    #[inline]
    fn entry_state(&self, regs: &mut ArchState, vcpu: u32) {
        Machine::entry_state(self, regs, vcpu);
    }

    #[inline]
    fn cpuid(&self, regs: &mut ArchState, vcpu: u32) {
        self.cpuid_result(regs, vcpu);
    }

    #[inline]
    fn hlt<P: Platform + ?Sized>(&self, p: &mut P, _vcpu: u32) -> Step {
        if p.regs().rflags & bits::IF == 0 {
            return Step::Stop;
        }
        let regs = p.regs_mut();
        skip(regs, 1);
        regs.set_intr_state(regs.intr_state & !3);
        p.inject(Event::Interrupt(testdev::WAKE_VECTOR));
        Step::Resume
    }

    #[inline]
    fn vmcall<P: Platform + ?Sized>(&self, p: &mut P) -> Step {
        let regs = p.regs_mut();
        let rax = if regs.gpr[gpr::RAX] == testdev::HYPERCALL {
            regs.gpr[gpr::RBX].wrapping_add(1)
        } else {
            HC_ENOSYS
        };
        regs.set_gpr(gpr::RAX, rax);
        skip(regs, 3);
        Step::Resume
    }

    #[inline]
    fn msr<P: Platform + ?Sized>(&self, p: &mut P, _vcpu: u32, write: bool) -> Step {
        if p.regs().gpr[gpr::RCX] as u32 != testdev::TEST_MSR {
            p.inject(gp0());
            return Step::Resume;
        }
        let regs = p.regs_mut();
        if write {
            let v = (regs.gpr[gpr::RDX] << 32) | (regs.gpr[gpr::RAX] & 0xffff_ffff);
            self.msr.store(v, Ordering::Relaxed);
        } else {
            let v = self.msr.load(Ordering::Relaxed);
            regs.set_gpr(gpr::RAX, v & 0xffff_ffff);
            regs.set_gpr(gpr::RDX, v >> 32);
        }
        skip(regs, 2);
        Step::Resume
    }

    #[inline]
    fn fetch_from_mmio<P: Platform + ?Sized>(&self, p: &mut P, _gpa: u64) -> Step {
        // An instruction fetch where no RAM is: the all-ones an empty bus reads decode
        // to `ff ff`, no instruction: #UD (counted: `undefined`).
        self.core.count_undefined();
        p.inject(Event::Exception {
            vector: vector::UD,
            error: None,
        });
        Step::Resume
    }

    #[inline]
    fn start_vcpu(&self, n: u32) -> Step {
        if n == 0 || n >= self.cfg.vcpus || n >= 64 {
            return Step::Resume;
        }
        let bit = 1u64 << n;
        if self.started.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return Step::Resume;
        }
        Step::Start(n)
    }
}

/// Per exception vector: how many EXCEPTION events were reflected into the guest.
#[derive(Default)]
pub(crate) struct Reflected([AtomicU64; 32]);

impl Reflected {
    pub(crate) fn count(&self, v: u8) {
        if let Some(c) = self.0.get(usize::from(v)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn get(&self, v: u8) -> u64 {
        self.0
            .get(usize::from(v))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// Reflects the exception of an EXCEPTION event (`qual[0]`: VMX interruption
/// information with the error code in bits 32–63) into the guest, as the processor
/// would have delivered it had nobody intercepted it: the same vector with the same
/// error code; for a software exception (type 5, ICEBP; type 6, INT3/INTO: VT-x exits
/// on the instruction) RIP first moves past the instruction. Returns the vector, or
/// `None` for an event that is no exception to reflect (NMI, vector 32 and above).
///
/// The kernel intercepts #AC and #DB (and handles #MC itself) whatever the VMM asked
/// for, so that an exception that raises itself again during its own delivery cannot
/// hold a physical CPU: this is how a VMM that wants the architectural behaviour
/// answers them (what KVM does). For #DB the guest's DR6 already holds the bits of this
/// exception when the event arrives (SVM updates it before the intercept; on VT-x the
/// kernel applies the exit qualification), so the injection is all there is to do.
pub(crate) fn reflect<P: Platform + ?Sized>(p: &mut P) -> Option<u8> {
    let r = p.regs();
    let q = r.qual[0];
    let v = (q & 0xff) as u8;
    let ty = (q >> 8) & 7;
    if q & (1 << 31) == 0 || v >= 32 || v == 2 || !matches!(ty, 3 | 5 | 6) {
        return None;
    }
    let error = (q & (1 << 11) != 0).then_some((q >> 32) as u32);
    if ty != 3 {
        let len = r.inst_len;
        p.regs_mut().advance(len);
    }
    p.inject(Event::Exception { vector: v, error });
    Some(v)
}

pub(crate) fn gp0() -> Event {
    Event::Exception {
        vector: vector::GP,
        error: Some(0),
    }
}

/// A CPUID result into EAX, EBX, ECX, EDX.
pub(crate) fn set_cpuid_result(regs: &mut ArchState, v: [u32; 4]) {
    for (r, x) in [gpr::RAX, gpr::RBX, gpr::RCX, gpr::RDX].into_iter().zip(v) {
        regs.set_gpr(r, u64::from(x));
    }
}

/// A non-string IN or OUT (`io`) on the port bus `pio`: on input the value is merged
/// into AL, AX or EAX; RIP goes past the instruction. Returns what the device asks of
/// the VM.
pub(crate) fn port_io(pio: &Bus, io: PortIo, regs: &mut ArchState) -> Option<Action> {
    let size = io.size();
    let port = u64::from(io.port());
    let mut action = None;
    if io.input() {
        let mut b = [0u8; 4];
        let _ = pio.read(port, &mut b[..size]);
        let v = u64::from(u32::from_le_bytes(b));
        let old = regs.gpr[gpr::RAX];
        regs.set_gpr(
            gpr::RAX,
            match size {
                1 => (old & !0xff) | (v & 0xff),
                2 => (old & !0xffff) | (v & 0xffff),
                _ => v,
            },
        );
    } else {
        let b = regs.gpr[gpr::RAX].to_le_bytes();
        action = pio.write(port, &b[..size]).ok().flatten();
    }
    skip(regs, 0);
    action
}

/// CR4 bits a guest may set: what the kernel takes (VME through UMIP, FSGSBASE, PCIDE,
/// OSXSAVE, SMEP, SMAP; ABI.md); not PKE, whose PKRU the kernel does not switch.
const CR4_ALLOWED: u64 = 0x0037_0fff;

/// The CR4 bits a guest may set on a CPU whose CPUID is `cpuid` (SDM vol. 3A 2.5: a
/// bit for a feature CPUID does not report is reserved), within [`CR4_ALLOWED`].
pub(crate) fn cr4_supported(cpuid: CpuidFn) -> u64 {
    let [_, _, c1, d1] = cpuid(1, 0);
    let [max, ..] = cpuid(0, 0);
    let [_, b7, c7, _] = if max >= 7 { cpuid(7, 0) } else { [0; 4] };
    let has = |reg: u32, bit: u32| reg & (1 << bit) != 0;
    let features = [
        (0, has(d1, 1)),   // VME
        (1, has(d1, 1)),   // PVI
        (2, has(d1, 4)),   // TSD
        (3, has(d1, 2)),   // DE
        (4, has(d1, 3)),   // PSE
        (5, has(d1, 6)),   // PAE
        (6, has(d1, 7)),   // MCE
        (7, has(d1, 13)),  // PGE
        (8, true),         // PCE
        (9, has(d1, 24)),  // OSFXSR
        (10, has(d1, 25)), // OSXMMEXCPT
        (11, has(c7, 2)),  // UMIP
        (16, has(b7, 0)),  // FSGSBASE
        (17, has(c1, 17)), // PCIDE
        (18, has(c1, 26)), // OSXSAVE
        (20, has(b7, 7)),  // SMEP
        (21, has(b7, 20)), // SMAP
    ];
    features
        .iter()
        .filter(|&&(_, on)| on)
        .fold(0, |m, &(bit, _)| m | 1 << bit)
        & CR4_ALLOWED
}
/// CR0.NW, CR0.CD.
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
/// CR4.PCIDE.
const CR4_PCIDE: u64 = 1 << 17;

/// Whether MOV to CR`cr` of `v` raises #GP(0) on a processor like the guest's (SDM vol.
/// 3A 2.5, MOV—Move to/from Control Registers): reserved bits, NW without CD, PG without
/// PE, clearing PG in 64-bit mode or PAE in IA-32e mode, PCIDE outside IA-32e mode or
/// with a PCID in CR3, CR3 bits 52–62.
fn cr_write_faults(regs: &ArchState, cr: u64, v: u64, cr4_ok: u64) -> bool {
    let long = regs.efer & bits::EFER_LMA != 0;
    match cr {
        0 => {
            v >> 32 != 0
                || (v & CR0_NW != 0 && v & CR0_CD == 0)
                || (v & bits::CR0_PG != 0 && v & bits::CR0_PE == 0)
                || (crate::vcpu::code_bits(regs) == 64 && v & bits::CR0_PG == 0)
        }
        3 => (v >> 52) & 0x7ff != 0,
        4 => {
            v & !cr4_ok != 0
                || (long && v & bits::CR4_PAE == 0)
                || (v & CR4_PCIDE != 0
                    && regs.cr4 & CR4_PCIDE == 0
                    && (!long || regs.cr3 & 0xfff != 0))
        }
        _ => false,
    }
}

/// A control-register access that exited (VT-x: a write that changes a bit VMX fixes,
/// such as CR4.VMXE or CR0.NE, whose value the kernel keeps in the read shadow, or
/// CR4.PKE; with `ctrl::CR0_CR4_WRITE` or `ctrl::CR3_ACCESS`, every such access).
/// `qual`: CR number (bits 0–3), access type (bits 4–5: mov to, mov from, CLTS, LMSW),
/// GPR (bits 8–11), LMSW source (bits 16–31); see ABI.md. A write the processor would
/// refuse gets #GP(0), as it would natively (the kernel would refuse the value too:
/// INVALID_STATE); `cr4_ok` are the CR4 bits the guest may set ([`cr4_supported`]).
/// The portal must transfer the GPRs, CR, EFER, CS, RIP and the qualification.
pub(crate) fn cr_access<P: Platform + ?Sized>(p: &mut P, qual: u64, rip: u64, cr4_ok: u64) -> Step {
    let cr = qual & 0xf;
    let g = ((qual >> 8) & 0xf) as usize;
    let regs = p.regs_mut();
    match (qual >> 4) & 3 {
        0 => {
            // Bit 63 of a CR3 write with CR4.PCIDE only asks not to flush.
            let v = match cr {
                3 => regs.gpr[g] & !(1 << 63),
                _ => regs.gpr[g],
            };
            if !matches!(cr, 0 | 3 | 4) {
                return Step::End(End::Unhandled {
                    event: ev::CR_ACCESS,
                    qual: [qual, 0],
                    rip,
                });
            }
            if cr_write_faults(regs, cr, v, cr4_ok) {
                p.inject(gp0());
                return Step::Resume;
            }
            regs.set_cr(cr, v);
        }
        1 => {
            let v = match cr {
                0 => regs.cr0,
                3 => regs.cr3,
                4 => regs.cr4,
                _ => 0,
            };
            regs.set_gpr(g, v);
        }
        2 => regs.set_cr0(regs.cr0 & !bits::CR0_TS),
        _ => {
            // LMSW: MP, EM, TS and PE from the source; PE is never cleared.
            let src = (qual >> 16) & 0xf;
            regs.set_cr0((regs.cr0 & !0xe) | src | (regs.cr0 & 1));
        }
    }
    skip(regs, 3);
    Step::Resume
}

/// Advances RIP past the instruction: by the exit's length, or `len` when the exit
/// did not say.
pub(crate) fn skip(regs: &mut ArchState, len: u64) {
    let n = if regs.inst_len != 0 {
        regs.inst_len
    } else {
        len
    };
    regs.advance(n);
}

#[cfg(test)]
mod tests;
