//! The machine core: typed VM exits and the exit handling every machine shares.
//!
//! A binding (the hypervisor's exit portals in `nul/vmm`, a host on another kernel)
//! turns its exits into an [`Exit`] and calls its machine's `handle`. Both machines,
//! the test guest's ([`crate::exit::Machine`]) and the Linux PC ([`crate::pc::Pc`]),
//! are a [`Board`] — their devices and the few answers that differ (CPUID, MSRs, HLT,
//! the hypercall, the entry state) — over one [`Core`] and one [`handle`]: port and
//! string I/O, MMIO through the instruction emulator, XSETBV, INVD/WBINVD, control
//! registers, reflected exceptions, and the outcomes of emulation and device actions.

use core::sync::atomic::{AtomicU64, Ordering};

use peregrine_abi::event::vcpu as ev;

use crate::bus::{Action, Bus, BusDevice};
use crate::emul::{self, BusIo, DecodeCaches, EmulError, Io, Space};
use crate::sync::SpinLock;
use crate::vcpu::{gpr, vector, ArchState, Event, Fault, Platform};

mod cr;
mod step;

use cr::{cr4_supported, cr_access};
pub use step::{End, Step};

/// Host CPUID: `(leaf, subleaf) -> [eax, ebx, ecx, edx]`.
pub type CpuidFn = fn(u32, u32) -> [u32; 4];

/// KVM's answer to an unknown hypercall (`-KVM_ENOSYS`).
pub const HC_ENOSYS: u64 = (-1000i64) as u64;

/// A port access (IN, OUT, INS, OUTS): the exit qualification in ABI.md's (VMX's)
/// format, read through its accessors (an exit pays only for the fields it reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortIo(u32);

impl PortIo {
    /// An access of `size` bytes (1, 2 or 4) per element to `port`.
    pub fn new(port: u16, size: u8, input: bool, rep: bool) -> Self {
        let size = u32::from(size.clamp(1, 4) - 1);
        PortIo(u32::from(port) << 16 | size | u32::from(input) << 3 | u32::from(rep) << 5)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// Bytes per element: 1, 2 or 4.
    pub fn size(&self) -> usize {
        match self.0 & 7 {
            0 => 1,
            1 => 2,
            _ => 4,
        }
    }

    /// IN or INS.
    pub fn input(&self) -> bool {
        self.0 & (1 << 3) != 0
    }

    /// With a REP prefix.
    pub fn rep(&self) -> bool {
        self.0 & (1 << 5) != 0
    }
}

/// A guest-physical access no mapping allowed (EPT violation, nested page fault): the
/// address and the error code in ABI.md's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NestedFault {
    /// The guest-physical address.
    pub gpa: u64,
    /// Present (bit 0), write (1), user (2), reserved bit (3), fetch (4); final
    /// translation (32) and table walk (33) are left out.
    pub error: u32,
}

impl NestedFault {
    /// The access was a write.
    pub fn write(&self) -> bool {
        self.error & (1 << 1) != 0
    }

    /// The access was an instruction fetch.
    pub fn fetch(&self) -> bool {
        self.error & (1 << 4) != 0
    }
}

/// A VM exit, decoded: what happened, with the exit's own information as fields. The
/// register file the exit delivered stays with the [`Platform`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Before the vCPU's first entry: set its entry state.
    Startup,
    /// CPUID.
    Cpuid,
    /// IN or OUT.
    Io(PortIo),
    /// INS or OUTS (the instruction emulator runs it).
    IoString(PortIo),
    /// A guest-physical access no RAM backs: MMIO.
    NestedFault(NestedFault),
    /// HLT.
    Hlt,
    /// VMCALL / VMMCALL.
    Vmcall,
    /// RDMSR.
    Rdmsr,
    /// WRMSR.
    Wrmsr,
    /// XSETBV.
    Xsetbv,
    /// A control-register access; the qualification in ABI.md's format.
    CrAccess(u64),
    /// INVD.
    Invd,
    /// WBINVD.
    Wbinvd,
    /// PAUSE.
    Pause,
    /// The interrupt window opened.
    IntrWindow,
    /// `ec_ctrl` recalled the vCPU.
    Recall,
    /// An intercepted exception (details in the register file's qualification).
    Exception,
    /// Triple fault.
    TripleFault,
    /// The kernel or the processor refused the vCPU's state (the details in the
    /// register file's qualification).
    InvalidState,
    /// An instruction the machine does not offer (SVM's VMRUN and kin, MONITOR,
    /// MWAIT): #UD. The event number.
    Undefined(u64),
    /// Any other event: its number.
    Unknown(u64),
}

impl Exit {
    /// The exit of the kernel's vCPU `event` (`peregrine_abi::event::vcpu`), with the
    /// exit information `regs` holds. Inline, so that the compiler can join this match
    /// with the handler's.
    #[inline(always)]
    pub fn decode(event: u64, regs: &ArchState) -> Exit {
        let q = regs.qual;
        match event {
            ev::STARTUP => Exit::Startup,
            ev::CPUID => Exit::Cpuid,
            // The kernel delivers INS/OUTS as IO_STRING; the string bit decides anyway.
            ev::IO if q[0] & (1 << 4) == 0 => Exit::Io(PortIo(q[0] as u32)),
            ev::IO | ev::IO_STRING => Exit::IoString(PortIo(q[0] as u32)),
            ev::NPT_FAULT => Exit::NestedFault(NestedFault {
                gpa: q[1],
                error: q[0] as u32,
            }),
            ev::HLT => Exit::Hlt,
            ev::VMCALL => Exit::Vmcall,
            ev::RDMSR => Exit::Rdmsr,
            ev::WRMSR => Exit::Wrmsr,
            ev::XSETBV => Exit::Xsetbv,
            ev::CR_ACCESS => Exit::CrAccess(q[0]),
            ev::INVD => Exit::Invd,
            ev::WBINVD => Exit::Wbinvd,
            ev::PAUSE => Exit::Pause,
            ev::INTR_WINDOW => Exit::IntrWindow,
            ev::RECALL => Exit::Recall,
            ev::EXCEPTION => Exit::Exception,
            ev::TRIPLE_FAULT => Exit::TripleFault,
            ev::INVALID_STATE => Exit::InvalidState,
            ev::OTHER | ev::MONITOR | ev::MWAIT => Exit::Undefined(event),
            _ => Exit::Unknown(event),
        }
    }

    /// The kernel's event number of the exit (for reports).
    pub fn event(&self) -> u64 {
        match *self {
            Exit::Startup => ev::STARTUP,
            Exit::Cpuid => ev::CPUID,
            Exit::Io(_) => ev::IO,
            Exit::IoString(_) => ev::IO_STRING,
            Exit::NestedFault(_) => ev::NPT_FAULT,
            Exit::Hlt => ev::HLT,
            Exit::Vmcall => ev::VMCALL,
            Exit::Rdmsr => ev::RDMSR,
            Exit::Wrmsr => ev::WRMSR,
            Exit::Xsetbv => ev::XSETBV,
            Exit::CrAccess(_) => ev::CR_ACCESS,
            Exit::Invd => ev::INVD,
            Exit::Wbinvd => ev::WBINVD,
            Exit::Pause => ev::PAUSE,
            Exit::IntrWindow => ev::INTR_WINDOW,
            Exit::Recall => ev::RECALL,
            Exit::Exception => ev::EXCEPTION,
            Exit::TripleFault => ev::TRIPLE_FAULT,
            Exit::InvalidState => ev::INVALID_STATE,
            Exit::Undefined(e) | Exit::Unknown(e) => e,
        }
    }
}

/// What every machine has, counts and keeps, whatever its devices.
pub struct Core {
    /// Host CPUID.
    pub cpuid: CpuidFn,
    /// The port bus.
    pub pio: Bus,
    /// The MMIO bus.
    pub mmio: Bus,
    exits: AtomicU64,
    undefined: AtomicU64,
    reflected: Reflected,
    resumed_shutdowns: AtomicU64,
    /// Per vCPU: the instructions its MMIO and string I/O exits decoded.
    decoded: DecodeCaches,
}

impl Core {
    /// The core of a machine with `vcpus` vCPUs on a host whose CPUID is `cpuid`, with
    /// its devices on the buses `pio` and `mmio`.
    pub fn new(vcpus: u32, cpuid: CpuidFn, pio: Bus, mmio: Bus) -> Self {
        Self {
            cpuid,
            pio,
            mmio,
            exits: AtomicU64::new(0),
            undefined: AtomicU64::new(0),
            reflected: Reflected::default(),
            resumed_shutdowns: AtomicU64::new(0),
            decoded: DecodeCaches::new(vcpus),
        }
    }

    /// Exits handled so far (STARTUP not counted).
    pub fn exits(&self) -> u64 {
        self.exits.load(Ordering::Relaxed)
    }

    /// Instructions behind MMIO or string I/O exits answered with #UD: invalid, or
    /// beyond what the emulator does.
    pub fn undefined(&self) -> u64 {
        self.undefined.load(Ordering::Relaxed)
    }

    /// Exceptions of vector `v` reflected into the guest so far.
    pub fn reflected(&self, v: u8) -> u64 {
        self.reflected.get(v)
    }

    /// Triple faults resumed as impossible (`diag::impossible_shutdown`) so far.
    pub fn resumed_shutdowns(&self) -> u64 {
        self.resumed_shutdowns.load(Ordering::Relaxed)
    }

    /// Counts an instruction answered with #UD.
    pub fn count_undefined(&self) {
        self.undefined.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a vCPU's MMIO access goes.
pub enum Mmio<'a> {
    /// The machine's MMIO bus.
    Bus(&'a Bus),
    /// One device at `[base, base + len)` (a vCPU's own local APIC), else nothing.
    Device {
        /// First address of the device's range.
        base: u64,
        /// Length of the range.
        len: u64,
        /// The device.
        device: &'a SpinLock<dyn BusDevice>,
    },
}

/// A machine's devices and the answers that differ between machines; [`handle`] does
/// the rest.
pub trait Board {
    /// The buses, counters and caches.
    fn core(&self) -> &Core;
    /// Where vCPU `vcpu`'s MMIO access at `gpa` goes: the MMIO bus unless the board
    /// says otherwise.
    fn mmio(&self, vcpu: u32, gpa: u64) -> Mmio<'_> {
        let _ = (vcpu, gpa);
        Mmio::Bus(&self.core().mmio)
    }
    /// Sets vCPU `vcpu`'s entry state on `regs`, which [`handle`] zeroed (the
    /// interruptibility and injection recorded as zero already): what the board sets
    /// through the setters is what the vCPU starts with.
    fn entry_state(&self, regs: &mut ArchState, vcpu: u32);
    /// CPUID leaf `leaf`, subleaf `sub` of vCPU `vcpu` (whose state is `regs`): EAX,
    /// EBX, ECX, EDX. By default the host's as every machine shows it
    /// ([`guest_cpuid`]).
    fn cpuid(&self, regs: &ArchState, vcpu: u32, leaf: u32, sub: u32) -> [u32; 4] {
        let _ = regs;
        guest_cpuid(self.core().cpuid, vcpu, leaf, sub)
    }
    /// HLT.
    fn hlt<P: Platform + ?Sized>(&self, p: &mut P, vcpu: u32) -> Step;
    /// The RAX a VMCALL with the state `regs` returns: by default KVM's answer to an
    /// unknown hypercall ([`HC_ENOSYS`]).
    fn hypercall(&self, regs: &ArchState) -> u64 {
        let _ = regs;
        HC_ENOSYS
    }
    /// RDMSR of `msr` by vCPU `vcpu`: its value, or `None` for #GP(0).
    fn rdmsr<P: Platform + ?Sized>(&self, p: &mut P, vcpu: u32, msr: u32) -> Option<u64>;
    /// WRMSR of `value` to `msr` by vCPU `vcpu`: false for #GP(0).
    fn wrmsr<P: Platform + ?Sized>(&self, p: &mut P, vcpu: u32, msr: u32, value: u64) -> bool;
    /// An instruction fetch from `gpa`, where no RAM is.
    fn fetch_from_mmio<P: Platform + ?Sized>(&self, p: &mut P, gpa: u64) -> Step;
    /// A device asked to start vCPU `n`.
    fn start_vcpu(&self, n: u32) -> Step;
    /// PAUSE and an open interrupt window (the machines that never ask for the window
    /// see it only from a confused kernel): the VM ends unless the board says so.
    fn quiet<P: Platform + ?Sized>(&self, p: &mut P, exit: Exit) -> Step {
        let r = p.regs();
        Step::End(End::Unhandled {
            event: exit.event(),
            qual: r.qual,
            rip: r.rip,
        })
    }
}

/// Handles `exit` of vCPU `vcpu` of the machine `b`, whose state `p` holds. The caller
/// clears the MTD before (so it names exactly what changed) and replies with it after.
#[inline]
pub fn handle<B: Board + ?Sized, P: Platform + ?Sized>(
    b: &B,
    p: &mut P,
    vcpu: u32,
    exit: Exit,
) -> Step {
    let core = b.core();
    if exit != Exit::Startup {
        core.exits.fetch_add(1, Ordering::Relaxed);
    }
    match exit {
        Exit::Startup => {
            // From zero: active, no blocking, nothing to inject; the board sets the
            // rest.
            let regs = p.regs_mut();
            regs.reset();
            regs.set_intr_state(0);
            regs.set_inj(0, 0);
            b.entry_state(regs, vcpu);
            Step::Resume
        }
        Exit::Cpuid => {
            let r = p.regs();
            let v = b.cpuid(r, vcpu, r.gpr[gpr::RAX] as u32, r.gpr[gpr::RCX] as u32);
            let regs = p.regs_mut();
            set_cpuid_result(regs, v);
            skip(regs, 2);
            Step::Resume
        }
        Exit::Io(io) => {
            if p.regs().inst_len == 0 {
                return Step::End(End::NoLength { rip: p.regs().rip });
            }
            let action = port_io(&core.pio, io, p.regs_mut());
            act(b, p, action)
        }
        Exit::IoString(_) => {
            let rip = p.regs().rip;
            let mut io = BusIo {
                mmio: &core.mmio,
                pio: &core.pio,
            };
            let res = core.decoded.emulate(vcpu, p, &mut io, None);
            emulated(b, p, res, rip)
        }
        Exit::NestedFault(f) => {
            if f.fetch() {
                return b.fetch_from_mmio(p, f.gpa);
            }
            let rip = p.regs().rip;
            let pio = &core.pio;
            let (mut on_bus, mut on_device);
            let io: &mut dyn Io = match b.mmio(vcpu, f.gpa) {
                Mmio::Bus(mmio) => {
                    on_bus = BusIo { mmio, pio };
                    &mut on_bus
                }
                Mmio::Device { base, len, device } => {
                    on_device = DeviceIo {
                        base,
                        len,
                        device,
                        pio,
                    };
                    &mut on_device
                }
            };
            let res = core.decoded.emulate(vcpu, p, io, Some(f.gpa));
            emulated(b, p, res, rip)
        }
        Exit::Hlt => b.hlt(p, vcpu),
        Exit::Vmcall => {
            let rax = b.hypercall(p.regs());
            let regs = p.regs_mut();
            regs.set_gpr(gpr::RAX, rax);
            skip(regs, 3);
            Step::Resume
        }
        Exit::Rdmsr => {
            let msr = p.regs().gpr[gpr::RCX] as u32;
            match b.rdmsr(p, vcpu, msr) {
                Some(v) => {
                    let regs = p.regs_mut();
                    set_edx_eax(regs, v);
                    skip(regs, 2);
                }
                None => p.inject(gp0()),
            }
            Step::Resume
        }
        Exit::Wrmsr => {
            let r = p.regs();
            let (msr, value) = (r.gpr[gpr::RCX] as u32, edx_eax(r));
            if b.wrmsr(p, vcpu, msr, value) {
                skip(p.regs_mut(), 2);
            } else {
                p.inject(gp0());
            }
            Step::Resume
        }
        Exit::Xsetbv => xsetbv(p, core.cpuid),
        Exit::Invd | Exit::Wbinvd => {
            skip(p.regs_mut(), 2);
            Step::Resume
        }
        Exit::Undefined(_) => {
            p.inject(Event::Exception {
                vector: vector::UD,
                error: None,
            });
            Step::Resume
        }
        Exit::Recall => Step::Resume,
        Exit::Pause | Exit::IntrWindow => b.quiet(p, exit),
        Exit::CrAccess(qual) => {
            let rip = p.regs().rip;
            cr_access(p, qual, rip, cr4_supported(core.cpuid))
        }
        Exit::Exception => match reflect(p) {
            Some(v) => {
                core.reflected.count(v);
                Step::Resume
            }
            None => unhandled(p, exit),
        },
        Exit::TripleFault => triple_fault(core, p),
        Exit::InvalidState => Step::End(End::InvalidState {
            qual: p.regs().qual,
        }),
        Exit::Unknown(_) => unhandled(p, exit),
    }
}

/// A triple fault ends the VM, unless the guest's tables make it impossible
/// ([`crate::diag::impossible_shutdown`]): then the failed delivery is dropped and the
/// guest resumes at the instruction that never ran, [`crate::diag::RESUME_LIMIT`] times
/// at most. Out of line: off the exit path's hot code.
#[cold]
#[inline(never)]
fn triple_fault<P: Platform + ?Sized>(core: &Core, p: &mut P) -> Step {
    let r = *p.regs();
    // One budget for all vCPUs: taken (atomically) only for an impossible shutdown.
    let budget = |n: u64| (n < crate::diag::RESUME_LIMIT).then_some(n + 1);
    if crate::diag::impossible_shutdown(p, &r)
        && core
            .resumed_shutdowns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, budget)
            .is_ok()
    {
        p.regs_mut().set_inj(0, 0);
        Step::Resume
    } else {
        Step::End(End::TripleFault { rip: r.rip })
    }
}

fn unhandled<P: Platform + ?Sized>(p: &P, exit: Exit) -> Step {
    let r = p.regs();
    Step::End(End::Unhandled {
        event: exit.event(),
        qual: r.qual,
        rip: r.rip,
    })
}

/// XSETBV: XCR0 from EDX:EAX for ECX = 0, if it is a value the host's XSAVE allows
/// (x87 set; AVX only with SSE); else #GP(0).
fn xsetbv<P: Platform + ?Sized>(p: &mut P, cpuid: CpuidFn) -> Step {
    let r = p.regs();
    let (rcx, v) = (r.gpr[gpr::RCX], edx_eax(r));
    let [lo, _, _, hi] = cpuid(0xd, 0);
    let host = u64::from(lo) | u64::from(hi) << 32;
    let ok = rcx as u32 == 0 && v & 1 != 0 && (v & 4 == 0 || v & 2 != 0) && v & !host == 0;
    if !ok {
        p.inject(gp0());
        return Step::Resume;
    }
    let regs = p.regs_mut();
    regs.set_xcr0(v);
    skip(regs, 3);
    Step::Resume
}

/// The outcome of an emulated instruction at `rip`.
fn emulated<B: Board + ?Sized, P: Platform + ?Sized>(
    b: &B,
    p: &mut P,
    res: Result<emul::Outcome, EmulError>,
    rip: u64,
) -> Step {
    match res {
        Ok(out) => act(b, p, out.action),
        // What the decoder rejects, or the emulator does not know: #UD, as a CPU
        // without the instruction would raise (counted: `Core::undefined`).
        Err(EmulError::Invalid | EmulError::Truncated | EmulError::Unsupported(_)) => {
            b.core().count_undefined();
            p.inject(Event::Exception {
                vector: vector::UD,
                error: None,
            });
            Step::Resume
        }
        Err(EmulError::Fetch(Fault::PageFault { addr, error }))
        | Err(EmulError::Access(Fault::PageFault { addr, error })) => {
            p.regs_mut().set_cr2(addr);
            p.inject(Event::Exception {
                vector: vector::PF,
                error: Some(error),
            });
            Step::Resume
        }
        Err(error) => Step::End(End::Emulation { error, rip }),
    }
}

/// What a device asked for, as the VMM's next [`Step`]: an exception the device raises
/// is queued on `p`.
pub fn act<B: Board + ?Sized, P: Platform + ?Sized>(
    b: &B,
    p: &mut P,
    action: Option<Action>,
) -> Step {
    // Almost every access asks for nothing: that case first, and the rest out of line.
    match action {
        None => Step::Resume,
        Some(a) => act_on(b, p, a),
    }
}

#[inline(never)]
fn act_on<B: Board + ?Sized, P: Platform + ?Sized>(b: &B, p: &mut P, action: Action) -> Step {
    match action {
        Action::Done(code) => Step::End(End::Done(code)),
        Action::PowerOff => Step::End(End::PowerOff),
        Action::Reset => Step::End(End::Reset),
        Action::StartVcpu(n) => b.start_vcpu(n),
        Action::Exception { vector, error } => {
            if vector < 32 && vector != 2 {
                p.inject(Event::Exception { vector, error });
            }
            Step::Resume
        }
        Action::DebugExit(value) => Step::End(End::DebugExit { value }),
    }
}

/// An access whose instruction the platform decoded and completes itself: a hosted
/// binding's I/O or MMIO exit (KVM reports the port or address with the data and
/// finishes the instruction at the next entry). vCPU `vcpu`'s access of `data.len()`
/// bytes at `addr` in `space` goes to the board's device, as the emulator's accesses do
/// ([`Board::mmio`]); a read fills `data` (all-ones where nothing answers). Returns what
/// the device asks of the VM, for [`act`].
pub fn access<B: Board + ?Sized>(
    b: &B,
    vcpu: u32,
    space: Space,
    addr: u64,
    data: &mut [u8],
    write: bool,
) -> Option<Action> {
    let pio = &b.core().pio;
    let (mut on_bus, mut on_device);
    let io: &mut dyn Io = match (space, b.mmio(vcpu, addr)) {
        (Space::Mmio, Mmio::Device { base, len, device }) => {
            on_device = DeviceIo {
                base,
                len,
                device,
                pio,
            };
            &mut on_device
        }
        _ => {
            on_bus = BusIo {
                mmio: &b.core().mmio,
                pio,
            };
            &mut on_bus
        }
    };
    if write {
        io.write(space, addr, data)
    } else {
        io.read(space, addr, data);
        None
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
fn reflect<P: Platform + ?Sized>(p: &mut P) -> Option<u8> {
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
fn set_cpuid_result(regs: &mut ArchState, v: [u32; 4]) {
    for (r, x) in [gpr::RAX, gpr::RBX, gpr::RCX, gpr::RDX].into_iter().zip(v) {
        regs.set_gpr(r, u64::from(x));
    }
}

/// A non-string IN or OUT (`io`) on the port bus `pio`: on input the value is merged
/// into AL, AX or EAX; RIP goes past the instruction. Returns what the device asks of
/// the VM.
fn port_io(pio: &Bus, io: PortIo, regs: &mut ArchState) -> Option<Action> {
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

/// The value in EDX:EAX (WRMSR, XSETBV).
#[inline]
pub(crate) fn edx_eax(regs: &ArchState) -> u64 {
    (regs.gpr[gpr::RDX] << 32) | (regs.gpr[gpr::RAX] & 0xffff_ffff)
}

/// `v` into EDX:EAX (RDMSR).
#[inline]
pub(crate) fn set_edx_eax(regs: &mut ArchState, v: u64) {
    regs.set_gpr(gpr::RAX, v & 0xffff_ffff);
    regs.set_gpr(gpr::RDX, v >> 32);
}

/// The host's CPUID leaf `leaf`, subleaf `sub` as every machine shows it to vCPU
/// `vcpu`: the hypervisor range empty (no paravirtual interface), the hypervisor bit
/// set, no VMX, MONITOR, SVM or protection keys (PKU, OSPKE: the kernel refuses
/// CR4.PKE), the vCPU's (x2)APIC ID.
#[inline]
pub fn guest_cpuid(host: CpuidFn, vcpu: u32, leaf: u32, sub: u32) -> [u32; 4] {
    let mut v = match leaf {
        0x4000_0000..=0x4fff_ffff => [0; 4],
        _ => host(leaf, sub),
    };
    match leaf {
        1 => {
            v[2] = (v[2] | crate::cpuid::HYPERVISOR_BIT) & !(1 << 5 | 1 << 3);
            v[1] = (v[1] & 0x00ff_ffff) | (vcpu << 24);
        }
        0xb | 0x1f => v[3] = vcpu,
        7 if sub == 0 => v[2] &= !(1 << 3 | 1 << 4),
        0x8000_0001 => v[2] &= !(1 << 2),
        _ => {}
    }
    v
}

/// Past a HLT (by its length, or the one byte it has): the vCPU no longer blocks
/// interrupts for a preceding STI or MOV SS.
#[inline]
pub(crate) fn past_hlt(regs: &mut ArchState) {
    skip(regs, 1);
    regs.set_intr_state(regs.intr_state & !3);
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

/// The emulator's [`Io`] for an access that one device answers ([`Mmio::Device`]):
/// MMIO inside its range goes to it, ports to the port bus. Outside the range reads see
/// all-ones and writes are dropped, as on a PC.
struct DeviceIo<'a> {
    base: u64,
    len: u64,
    device: &'a SpinLock<dyn BusDevice>,
    pio: &'a Bus,
}

impl Io for DeviceIo<'_> {
    fn read(&mut self, space: Space, addr: u64, data: &mut [u8]) {
        if space == Space::Port {
            let _ = self.pio.read(addr, data);
        } else if within(addr, data.len(), self.base, self.len) {
            self.device.lock().read(self.base, addr - self.base, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, space: Space, addr: u64, data: &[u8]) -> Option<Action> {
        if space == Space::Port {
            self.pio.write(addr, data).ok().flatten()
        } else if within(addr, data.len(), self.base, self.len) {
            self.device.lock().write(self.base, addr - self.base, data)
        } else {
            None
        }
    }
}

/// Whether `[addr, addr + size)` lies in `[base, base + len)`.
fn within(addr: u64, size: usize, base: u64, len: u64) -> bool {
    addr >= base
        && (addr - base)
            .checked_add(size as u64)
            .is_some_and(|e| e <= len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event number decodes to the exit that gives it back; the I/O
    /// qualification's fields land where they belong.
    #[test]
    fn events_decode_and_round_trip() {
        let mut regs = ArchState::default();
        for event in 0..256u64 {
            let e = Exit::decode(event, &regs);
            if event == ev::IO {
                assert_eq!(e.event(), ev::IO);
                continue;
            }
            assert_eq!(e.event(), event, "{e:?}");
        }
        // rep insw from port 0x1f0; then a one-byte OUT to 0x80.
        regs.qual = [0x01f0_0000 | 1 | 1 << 3 | 1 << 5, 0];
        let io = PortIo::new(0x1f0, 2, true, true);
        assert_eq!(Exit::decode(ev::IO, &regs), Exit::Io(io));
        assert_eq!(
            (io.port(), io.size(), io.input(), io.rep()),
            (0x1f0, 2, true, true)
        );
        regs.qual[0] |= 1 << 4;
        assert!(
            matches!(Exit::decode(ev::IO_STRING, &regs), Exit::IoString(s) if s.port() == 0x1f0)
        );
        assert!(matches!(Exit::decode(ev::IO, &regs), Exit::IoString(_)));
        regs.qual = [0x0080_0003, 0];
        let out = PortIo::new(0x80, 4, false, false);
        assert_eq!(Exit::decode(ev::IO, &regs), Exit::Io(out));
        assert_eq!((out.size(), out.input()), (4, false));
        regs.qual = [1 << 1, 0xfee0_0030];
        let Exit::NestedFault(f) = Exit::decode(ev::NPT_FAULT, &regs) else {
            panic!("not a nested fault");
        };
        assert_eq!((f.gpa, f.write(), f.fetch()), (0xfee0_0030, true, false));
        assert_eq!(Exit::decode(ev::MWAIT, &regs), Exit::Undefined(ev::MWAIT));
        assert_eq!(Exit::decode(0x77, &regs), Exit::Unknown(0x77));
    }

    #[test]
    fn device_range_checks_the_whole_access() {
        assert!(within(0xfee0_0ffc, 4, 0xfee0_0000, 0x1000));
        assert!(!within(0xfee0_0ffd, 4, 0xfee0_0000, 0x1000));
        assert!(!within(0xfedf_ffff, 1, 0xfee0_0000, 0x1000));
        assert!(!within(u64::MAX, 8, 0, u64::MAX));
    }

    /// The hosted binding's path: decoded accesses reach the test machine's devices and
    /// their actions come back.
    #[test]
    fn decoded_accesses_reach_the_devices() {
        use crate::exit::{Config, Machine};
        use crate::testdev::{self, Mode};
        let cfg = Config {
            mode: Mode::Check,
            vcpus: 2,
            entry: 0,
        };
        let m = Machine::new(cfg, alloc::vec::Vec::new(), |_, _| [0; 4]);
        let mut v = [0u8; 8];
        assert_eq!(
            access(&m, 0, Space::Mmio, testdev::MMIO_ADDR, &mut v, false),
            None
        );
        assert_eq!(u64::from_le_bytes(v), testdev::MMIO_INIT);
        let mut w = 0x1234_5678_9abc_def0u64.to_le_bytes();
        access(&m, 0, Space::Mmio, testdev::MMIO_ADDR, &mut w, true);
        access(&m, 1, Space::Mmio, testdev::MMIO_ADDR, &mut v, false);
        assert_eq!(v, w);
        let mut none = [0u8; 4];
        access(&m, 0, Space::Mmio, 0xd100_0000, &mut none, false);
        assert_eq!(none, [0xff; 4], "nothing answers: all-ones");
        let mut magic = [0u8; 4];
        access(&m, 0, Space::Port, testdev::MAGIC_PORT, &mut magic, false);
        assert_eq!(u32::from_le_bytes(magic), testdev::MAGIC);
        let mut one = 1u32.to_le_bytes();
        assert_eq!(
            access(&m, 0, Space::Port, testdev::START_PORT, &mut one, true),
            Some(Action::StartVcpu(1))
        );
        let mut code = 7u32.to_le_bytes();
        assert_eq!(
            access(&m, 0, Space::Port, testdev::DONE_PORT, &mut code, true),
            Some(Action::Done(7))
        );
    }
}
