//! vCPU exit handling for the test guest's machine, platform-neutral.
//!
//! [`Machine`] puts the test devices ([`crate::testdev`]) on the two buses of a machine
//! core ([`crate::machine`]) and is a [`Board`] over it: the core answers every
//! [`Exit`] on a [`Platform`] (it reads and changes the register file the exit
//! delivered through the setters that record what changed in the MTD, and says what
//! the VMM must do next, a [`Step`]); the board adds the test contract's entry state,
//! MSR, HLT and hypercall. `nul/vmm`
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

use core::sync::atomic::{AtomicU64, Ordering};

use alloc::sync::Arc;

use peregrine_abi::event::vcpu as ev;

use crate::boot::{self, BootInfo};
use crate::bus::{Bus, SharedDevice};
use crate::machine::{self, past_hlt, Board, Core, Exit};
use crate::sync::SpinLock;
use crate::testdev::{self, LineSink, Mode};
use crate::vcpu::{bits, gpr, vector, ArchState, Event, Mtd, Platform};

// The machine core's vocabulary, where the test machine's users found it first.
pub use crate::machine::{CpuidFn, End, Step, HC_ENOSYS};

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
        // Everything the shutdown report shows.
        ev::TRIPLE_FAULT => crate::diag::SHUTDOWN_MTD,
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
            cfg,
            core: Core::new(cfg.vcpus, cpuid, pio, mmio),
            msr: AtomicU64::new(0),
            started: AtomicU64::new(1),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Handles `exit` of vCPU `vcpu`, whose state `p` holds. The caller clears the MTD
    /// before (so it names exactly what changed) and replies with it after.
    pub fn handle<P: Platform + ?Sized>(&self, p: &mut P, vcpu: u32, exit: Exit) -> Step {
        machine::handle(self, p, vcpu, exit)
    }
}

/// The test contract's answers; CPUID is the host's as every machine shows it
/// ([`machine::guest_cpuid`]).
impl Board for Machine {
    #[inline]
    fn core(&self) -> &Core {
        &self.core
    }

    /// The contract's entry state: 64-bit mode on the boot tables at the entry point,
    /// with the vCPU's index, the mode and the vCPU count in RDI, RSI/RCX and RDX.
    fn entry_state(&self, regs: &mut ArchState, vcpu: u32) {
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

    #[inline]
    fn hlt<P: Platform + ?Sized>(&self, p: &mut P, _vcpu: u32) -> Step {
        if p.regs().rflags & bits::IF == 0 {
            return Step::Stop;
        }
        past_hlt(p.regs_mut());
        p.inject(Event::Interrupt(testdev::WAKE_VECTOR));
        Step::Resume
    }

    #[inline]
    fn hypercall(&self, regs: &ArchState) -> u64 {
        if regs.gpr[gpr::RAX] == testdev::HYPERCALL {
            regs.gpr[gpr::RBX].wrapping_add(1)
        } else {
            HC_ENOSYS
        }
    }

    #[inline]
    fn rdmsr<P: Platform + ?Sized>(&self, _p: &mut P, _vcpu: u32, msr: u32) -> Option<u64> {
        (msr == testdev::TEST_MSR).then(|| self.msr.load(Ordering::Relaxed))
    }

    #[inline]
    fn wrmsr<P: Platform + ?Sized>(&self, _p: &mut P, _vcpu: u32, msr: u32, v: u64) -> bool {
        if msr != testdev::TEST_MSR {
            return false;
        }
        self.msr.store(v, Ordering::Relaxed);
        true
    }

    #[inline]
    fn fetch_from_mmio<P: Platform + ?Sized>(&self, p: &mut P, _gpa: u64) -> Step {
        // An instruction fetch where no RAM is: the all-ones an empty bus reads decode
        // to `ff ff`, no instruction: #UD (counted: `Core::undefined`).
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

#[cfg(test)]
mod tests;
