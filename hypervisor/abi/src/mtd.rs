//! Message transfer descriptors: which architectural state an event transfers.

bitflags::bitflags! {
    /// Selects groups of architectural state in a UTCB for exceptions and VM exits.
    ///
    /// A portal's MTD says what the kernel writes into the handler's UTCB on the event;
    /// the MTD word the handler leaves in its UTCB at reply says what the kernel takes
    /// back into the EC or vCPU.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Mtd: u64 {
        /// RAX, RCX, RDX, RBX.
        const GPR_ACDB = 1 << 0;
        /// RBP, RSI, RDI.
        const GPR_BSD = 1 << 1;
        /// RSP.
        const RSP = 1 << 2;
        /// RIP and instruction length.
        const RIP_LEN = 1 << 3;
        /// RFLAGS.
        const RFLAGS = 1 << 4;
        /// DS and ES.
        const DS_ES = 1 << 5;
        /// FS and GS.
        const FS_GS = 1 << 6;
        /// CS and SS.
        const CS_SS = 1 << 7;
        /// TR.
        const TR = 1 << 8;
        /// LDTR.
        const LDTR = 1 << 9;
        /// GDTR.
        const GDTR = 1 << 10;
        /// IDTR.
        const IDTR = 1 << 11;
        /// CR0, CR2, CR3, CR4, CR8.
        const CR = 1 << 12;
        /// DR6 and DR7.
        const DR = 1 << 13;
        /// SYSENTER CS/ESP/EIP.
        const SYSENTER = 1 << 14;
        /// Exit qualification (for exceptions: error code and fault address).
        const QUAL = 1 << 15;
        /// Execution controls (which events exit).
        const CTRL = 1 << 16;
        /// Event injection.
        const INJ = 1 << 17;
        /// Interruptibility and activity state.
        const STA = 1 << 18;
        /// TSC value and offset.
        const TSC = 1 << 19;
        /// EFER.
        const EFER = 1 << 20;
        /// PDPTEs (PAE paging without EPT/NPT walking them).
        const PDPTE = 1 << 21;
        /// R8–R15.
        const GPR_R8_R15 = 1 << 22;
        /// STAR, LSTAR, CSTAR, FMASK, KERNEL_GS_BASE.
        const SYSCALL_SWAPGS = 1 << 23;
        /// XCR0.
        const XSAVE = 1 << 24;
        /// PAT.
        const PAT = 1 << 25;
        /// The guest FPU state stays with the vCPU (reserved: the kernel always keeps it).
        const FPU = 1 << 31;
        /// All general-purpose registers.
        const GPRS = Self::GPR_ACDB.bits() | Self::GPR_BSD.bits() | Self::RSP.bits()
            | Self::GPR_R8_R15.bits();
    }
}
