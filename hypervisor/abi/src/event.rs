//! Event numbers: which portal (event base + number) an event is delivered to.

/// Number of event selectors of a host EC: exception vectors 0–31.
pub const NUM_HOST_EVENTS: u64 = 32;
/// Number of event selectors of a vCPU.
pub const NUM_VCPU_EVENTS: u64 = 256;

/// Host EC events (the exception vector is the event number).
pub mod host {
    /// Divide error.
    pub const DE: u64 = 0;
    /// Debug.
    pub const DB: u64 = 1;
    /// Breakpoint.
    pub const BP: u64 = 3;
    /// Overflow.
    pub const OF: u64 = 4;
    /// Invalid opcode.
    pub const UD: u64 = 6;
    /// Device not available.
    pub const NM: u64 = 7;
    /// General protection.
    pub const GP: u64 = 13;
    /// Page fault.
    pub const PF: u64 = 14;
    /// x87 floating point.
    pub const MF: u64 = 16;
    /// Alignment check.
    pub const AC: u64 = 17;
    /// SIMD floating point.
    pub const XM: u64 = 19;
    /// Start-up of a new global EC.
    pub const STARTUP: u64 = 0x1e;
    /// Recall by `ec_ctrl`.
    pub const RECALL: u64 = 0x1f;
}

/// vCPU events: one backend-neutral numbering for VT-x and SVM. The numbers follow the
/// VMX basic exit reasons; SVM exit codes are mapped onto them by the kernel.
pub mod vcpu {
    /// Exception or NMI.
    pub const EXCEPTION: u64 = 0;
    /// External interrupt.
    pub const EXTINT: u64 = 1;
    /// Triple fault (shutdown).
    pub const TRIPLE_FAULT: u64 = 2;
    /// INIT signal.
    pub const INIT: u64 = 3;
    /// Start-up IPI.
    pub const SIPI: u64 = 4;
    /// Interrupt window open.
    pub const INTR_WINDOW: u64 = 7;
    /// NMI window open.
    pub const NMI_WINDOW: u64 = 8;
    /// Task switch.
    pub const TASK_SWITCH: u64 = 9;
    /// CPUID.
    pub const CPUID: u64 = 10;
    /// HLT.
    pub const HLT: u64 = 12;
    /// INVD (always intercepted: the guest must not discard host cache lines).
    pub const INVD: u64 = 13;
    /// INVLPG.
    pub const INVLPG: u64 = 14;
    /// RDTSC.
    pub const RDTSC: u64 = 16;
    /// VMCALL / VMMCALL.
    pub const VMCALL: u64 = 18;
    /// Control-register access.
    pub const CR_ACCESS: u64 = 28;
    /// Debug-register access.
    pub const DR_ACCESS: u64 = 29;
    /// I/O instruction.
    pub const IO: u64 = 30;
    /// RDMSR.
    pub const RDMSR: u64 = 31;
    /// WRMSR.
    pub const WRMSR: u64 = 32;
    /// VM entry failed: invalid guest state.
    pub const INVALID_STATE: u64 = 33;
    /// MWAIT.
    pub const MWAIT: u64 = 36;
    /// MONITOR.
    pub const MONITOR: u64 = 39;
    /// PAUSE.
    pub const PAUSE: u64 = 40;
    /// EPT violation / NPT fault: a guest-physical access without a mapping.
    pub const NPT_FAULT: u64 = 48;
    /// RDTSCP.
    pub const RDTSCP: u64 = 51;
    /// WBINVD.
    pub const WBINVD: u64 = 54;
    /// XSETBV.
    pub const XSETBV: u64 = 55;
    /// String I/O (INS/OUTS, with or without REP): the qualification of [`IO`]. A port
    /// access of its own so that the plain IN/OUT portal need not transfer the state
    /// only an instruction emulator needs (segments, control registers): each portal's
    /// MTD fits its exit.
    pub const IO_STRING: u64 = 0xfc;
    /// A backend-specific exit with no common number (e.g. SVM's VMRUN, VMLOAD, VMSAVE,
    /// STGI, CLGI, SKINIT, INVLPGA executed by the guest): `qual[0]` is the raw exit
    /// code, `qual[1]` the raw exit information. A VMM usually injects #UD.
    pub const OTHER: u64 = 0xfd;
    /// Start-up of a new vCPU.
    pub const STARTUP: u64 = 0xfe;
    /// Recall by `ec_ctrl`.
    pub const RECALL: u64 = 0xff;
}

/// Declares [`VcpuEvent`] from the [`vcpu`] constants: one list, so that the enum and
/// the numbers cannot drift apart.
macro_rules! vcpu_events {
    ($($(#[$doc:meta])* $name:ident = $num:ident,)*) => {
        /// The vCPU events of [`vcpu`] as an enumeration (the same numbers).
        #[repr(u8)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum VcpuEvent {
            $($(#[$doc])* $name = vcpu::$num as u8,)*
        }

        impl VcpuEvent {
            /// Every event, in increasing number.
            pub const ALL: &'static [VcpuEvent] = &[$(VcpuEvent::$name,)*];
        }

        impl TryFrom<u64> for VcpuEvent {
            /// The number, which names no event.
            type Error = u64;
            fn try_from(n: u64) -> Result<Self, u64> {
                match n {
                    $(vcpu::$num => Ok(VcpuEvent::$name),)*
                    _ => Err(n),
                }
            }
        }
    };
}

vcpu_events! {
    /// Exception or NMI.
    Exception = EXCEPTION,
    /// External interrupt.
    ExtInt = EXTINT,
    /// Triple fault (shutdown).
    TripleFault = TRIPLE_FAULT,
    /// INIT signal.
    Init = INIT,
    /// Start-up IPI.
    Sipi = SIPI,
    /// Interrupt window open.
    IntrWindow = INTR_WINDOW,
    /// NMI window open.
    NmiWindow = NMI_WINDOW,
    /// Task switch.
    TaskSwitch = TASK_SWITCH,
    /// CPUID.
    Cpuid = CPUID,
    /// HLT.
    Hlt = HLT,
    /// INVD.
    Invd = INVD,
    /// INVLPG.
    Invlpg = INVLPG,
    /// RDTSC.
    Rdtsc = RDTSC,
    /// VMCALL / VMMCALL.
    Vmcall = VMCALL,
    /// Control-register access.
    CrAccess = CR_ACCESS,
    /// Debug-register access.
    DrAccess = DR_ACCESS,
    /// I/O instruction.
    Io = IO,
    /// RDMSR.
    Rdmsr = RDMSR,
    /// WRMSR.
    Wrmsr = WRMSR,
    /// VM entry failed: invalid guest state.
    InvalidState = INVALID_STATE,
    /// MWAIT.
    Mwait = MWAIT,
    /// MONITOR.
    Monitor = MONITOR,
    /// PAUSE.
    Pause = PAUSE,
    /// EPT violation / NPT fault.
    NptFault = NPT_FAULT,
    /// RDTSCP.
    Rdtscp = RDTSCP,
    /// WBINVD.
    Wbinvd = WBINVD,
    /// XSETBV.
    Xsetbv = XSETBV,
    /// String I/O (INS/OUTS).
    IoString = IO_STRING,
    /// A backend-specific exit with no common number.
    Other = OTHER,
    /// Start-up of a new vCPU.
    Startup = STARTUP,
    /// Recall by `ec_ctrl`.
    Recall = RECALL,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every constant of [`vcpu`], written out (a constant added there without a variant
    /// fails here).
    const NUMBERS: &[u64] = &[
        vcpu::EXCEPTION,
        vcpu::EXTINT,
        vcpu::TRIPLE_FAULT,
        vcpu::INIT,
        vcpu::SIPI,
        vcpu::INTR_WINDOW,
        vcpu::NMI_WINDOW,
        vcpu::TASK_SWITCH,
        vcpu::CPUID,
        vcpu::HLT,
        vcpu::INVD,
        vcpu::INVLPG,
        vcpu::RDTSC,
        vcpu::VMCALL,
        vcpu::CR_ACCESS,
        vcpu::DR_ACCESS,
        vcpu::IO,
        vcpu::RDMSR,
        vcpu::WRMSR,
        vcpu::INVALID_STATE,
        vcpu::MWAIT,
        vcpu::MONITOR,
        vcpu::PAUSE,
        vcpu::NPT_FAULT,
        vcpu::RDTSCP,
        vcpu::WBINVD,
        vcpu::XSETBV,
        vcpu::IO_STRING,
        vcpu::OTHER,
        vcpu::STARTUP,
        vcpu::RECALL,
    ];

    #[test]
    fn every_constant_maps_to_its_variant_and_back() {
        assert_eq!(NUMBERS.len(), VcpuEvent::ALL.len());
        for (&n, &e) in NUMBERS.iter().zip(VcpuEvent::ALL) {
            assert_eq!(VcpuEvent::try_from(n), Ok(e));
            assert_eq!(e as u64, n);
        }
        assert_eq!(VcpuEvent::IoString as u64, 0xfc);
        assert_eq!(VcpuEvent::Other as u64, 0xfd);
        assert_eq!(VcpuEvent::Startup as u64, 0xfe);
        assert_eq!(VcpuEvent::Recall as u64, 0xff);
    }

    #[test]
    fn other_numbers_name_no_event() {
        for n in (0..NUM_VCPU_EVENTS + 4).filter(|n| !NUMBERS.contains(n)) {
            assert_eq!(VcpuEvent::try_from(n), Err(n));
        }
        assert_eq!(VcpuEvent::try_from(u64::MAX), Err(u64::MAX));
    }
}
