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
use crate::exit::{
    cr4_supported, cr_access, gp0, port_io, reflect, skip, CpuidFn, End, Reflected, Step,
};
use crate::sync::SpinLock;
use crate::vcpu::{gpr, vector, ArchState, Event, Fault, Platform};

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

/// What every machine counts and keeps, whatever its devices.
pub struct Core {
    /// Host CPUID.
    pub cpuid: CpuidFn,
    exits: AtomicU64,
    undefined: AtomicU64,
    reflected: Reflected,
    /// Per vCPU: the instructions its MMIO and string I/O exits decoded.
    decoded: DecodeCaches,
}

impl Core {
    /// The core of a machine with `vcpus` vCPUs on a host whose CPUID is `cpuid`.
    pub fn new(vcpus: u32, cpuid: CpuidFn) -> Self {
        Self {
            cpuid,
            exits: AtomicU64::new(0),
            undefined: AtomicU64::new(0),
            reflected: Reflected::default(),
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
    /// The shared counters and caches.
    fn core(&self) -> &Core;
    /// The port bus.
    fn pio(&self) -> &Bus;
    /// The MMIO bus.
    fn mmio_bus(&self) -> &Bus;
    /// Where vCPU `vcpu`'s MMIO access at `gpa` goes: the MMIO bus unless the board
    /// says otherwise.
    fn mmio(&self, vcpu: u32, gpa: u64) -> Mmio<'_> {
        let _ = (vcpu, gpa);
        Mmio::Bus(self.mmio_bus())
    }
    /// Sets vCPU `vcpu`'s entry state on `regs`, which [`handle`] zeroed (the
    /// interruptibility and injection recorded as zero already): what the board sets
    /// through the setters is what the vCPU starts with.
    fn entry_state(&self, regs: &mut ArchState, vcpu: u32);
    /// Answers CPUID (EAX, ECX in `regs`) for vCPU `vcpu`, marking the registers set.
    fn cpuid(&self, regs: &mut ArchState, vcpu: u32);
    /// HLT.
    fn hlt<P: Platform + ?Sized>(&self, p: &mut P, vcpu: u32) -> Step;
    /// VMCALL.
    fn vmcall<P: Platform + ?Sized>(&self, p: &mut P) -> Step;
    /// RDMSR (`write` false) or WRMSR.
    fn msr<P: Platform + ?Sized>(&self, p: &mut P, vcpu: u32, write: bool) -> Step;
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
            b.cpuid(p.regs_mut(), vcpu);
            skip(p.regs_mut(), 2);
            Step::Resume
        }
        Exit::Io(io) => {
            if p.regs().inst_len == 0 {
                return Step::End(End::NoLength { rip: p.regs().rip });
            }
            let action = port_io(b.pio(), io, p.regs_mut());
            act(b, p, action)
        }
        Exit::IoString(_) => {
            let rip = p.regs().rip;
            let mut io = BusIo {
                mmio: b.mmio_bus(),
                pio: b.pio(),
            };
            let res = core.decoded.emulate(vcpu, p, &mut io, None);
            emulated(b, p, res, rip)
        }
        Exit::NestedFault(f) => {
            if f.fetch() {
                return b.fetch_from_mmio(p, f.gpa);
            }
            let rip = p.regs().rip;
            let pio = b.pio();
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
        Exit::Vmcall => b.vmcall(p),
        Exit::Rdmsr => b.msr(p, vcpu, false),
        Exit::Wrmsr => b.msr(p, vcpu, true),
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
        Exit::TripleFault => Step::End(End::TripleFault { rip: p.regs().rip }),
        Exit::InvalidState => Step::End(End::InvalidState {
            qual: p.regs().qual,
        }),
        Exit::Unknown(_) => unhandled(p, exit),
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
    let (rax, rcx, rdx) = (r.gpr[gpr::RAX], r.gpr[gpr::RCX], r.gpr[gpr::RDX]);
    let v = (rdx << 32) | (rax & 0xffff_ffff);
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

/// What a device asked for.
pub(crate) fn act<B: Board + ?Sized, P: Platform + ?Sized>(
    b: &B,
    p: &mut P,
    action: Option<Action>,
) -> Step {
    match action {
        None => Step::Resume,
        Some(Action::Done(code)) => Step::End(End::Done(code)),
        Some(Action::PowerOff) => Step::End(End::PowerOff),
        Some(Action::Reset) => Step::End(End::Reset),
        Some(Action::StartVcpu(n)) => b.start_vcpu(n),
        Some(Action::Exception { vector, error }) => {
            if vector < 32 && vector != 2 {
                p.inject(Event::Exception { vector, error });
            }
            Step::Resume
        }
    }
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
}
