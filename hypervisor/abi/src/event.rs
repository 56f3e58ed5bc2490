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
