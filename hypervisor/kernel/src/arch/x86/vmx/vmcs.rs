//! VMCS field encodings, control bits and exit reasons (Intel SDM vol. 3, appendices B
//! and C, sections 25.6–25.9), and typed access to the current VMCS.

/// 16-bit control: virtual-processor identifier.
pub const VPID: u64 = 0x0000;
/// 16-bit guest selectors: ES, CS, SS, DS, FS, GS, LDTR, TR (stride 2).
pub const GUEST_ES_SEL: u64 = 0x0800;
/// 16-bit host selectors: ES, CS, SS, DS, FS, GS, TR (stride 2).
pub const HOST_ES_SEL: u64 = 0x0c00;
/// Host CS selector.
pub const HOST_CS_SEL: u64 = 0x0c02;
/// Host SS selector.
pub const HOST_SS_SEL: u64 = 0x0c04;
/// Host DS selector.
pub const HOST_DS_SEL: u64 = 0x0c06;
/// Host FS selector.
pub const HOST_FS_SEL: u64 = 0x0c08;
/// Host GS selector.
pub const HOST_GS_SEL: u64 = 0x0c0a;
/// Host TR selector.
pub const HOST_TR_SEL: u64 = 0x0c0c;

/// 64-bit control: TSC offset.
pub const TSC_OFFSET: u64 = 0x2010;
/// Virtual-APIC page (TPR shadow).
pub const VIRTUAL_APIC_PAGE: u64 = 0x2012;
/// EPT pointer.
pub const EPT_POINTER: u64 = 0x201a;
/// Read-only: guest-physical address of an EPT violation or misconfiguration.
pub const GUEST_PHYSICAL_ADDRESS: u64 = 0x2400;
/// Guest: VMCS link pointer (all ones: none).
pub const VMCS_LINK_POINTER: u64 = 0x2800;
/// Guest IA32_DEBUGCTL.
pub const GUEST_DEBUGCTL: u64 = 0x2802;
/// Guest IA32_PAT.
pub const GUEST_PAT: u64 = 0x2804;
/// Guest IA32_EFER.
pub const GUEST_EFER: u64 = 0x2806;
/// Guest PDPTE0 (PDPTE1–3 follow, stride 2).
pub const GUEST_PDPTE0: u64 = 0x280a;
/// Host IA32_PAT.
pub const HOST_PAT: u64 = 0x2c00;
/// Host IA32_EFER.
pub const HOST_EFER: u64 = 0x2c02;

/// 32-bit controls.
pub const PIN_CONTROLS: u64 = 0x4000;
/// Primary processor-based controls.
pub const PROC_CONTROLS: u64 = 0x4002;
/// Exception bitmap.
pub const EXCEPTION_BITMAP: u64 = 0x4004;
/// VM-exit controls.
pub const EXIT_CONTROLS: u64 = 0x400c;
/// VM-entry controls.
pub const ENTRY_CONTROLS: u64 = 0x4012;
/// VM-entry interruption information.
pub const ENTRY_INTR_INFO: u64 = 0x4016;
/// VM-entry exception error code.
pub const ENTRY_EXCEPTION_ERROR: u64 = 0x4018;
/// VM-entry instruction length.
pub const ENTRY_INSTRUCTION_LEN: u64 = 0x401a;
/// TPR threshold.
pub const TPR_THRESHOLD: u64 = 0x401c;
/// Secondary processor-based controls.
pub const PROC_CONTROLS2: u64 = 0x401e;
/// Read-only: VM-instruction error.
pub const VM_INSTRUCTION_ERROR: u64 = 0x4400;
/// Read-only: exit reason.
pub const EXIT_REASON: u64 = 0x4402;
/// Read-only: VM-exit interruption information.
pub const EXIT_INTR_INFO: u64 = 0x4404;
/// Read-only: VM-exit interruption error code.
pub const EXIT_INTR_ERROR: u64 = 0x4406;
/// Read-only: IDT-vectoring information.
pub const IDT_VECTORING_INFO: u64 = 0x4408;
/// Read-only: IDT-vectoring error code.
pub const IDT_VECTORING_ERROR: u64 = 0x440a;
/// Read-only: VM-exit instruction length.
pub const EXIT_INSTRUCTION_LEN: u64 = 0x440c;
/// Read-only: VM-exit instruction information.
pub const EXIT_INSTRUCTION_INFO: u64 = 0x440e;
/// Guest segment limits: ES … TR (stride 2), then GDTR, IDTR.
pub const GUEST_ES_LIMIT: u64 = 0x4800;
/// Guest GDTR limit.
pub const GUEST_GDTR_LIMIT: u64 = 0x4810;
/// Guest IDTR limit.
pub const GUEST_IDTR_LIMIT: u64 = 0x4812;
/// Guest access rights: ES … TR (stride 2).
pub const GUEST_ES_AR: u64 = 0x4814;
/// Guest interruptibility state.
pub const GUEST_INTERRUPTIBILITY: u64 = 0x4824;
/// Guest activity state.
pub const GUEST_ACTIVITY: u64 = 0x4826;
/// Guest IA32_SYSENTER_CS.
pub const GUEST_SYSENTER_CS: u64 = 0x482a;
/// Host IA32_SYSENTER_CS.
pub const HOST_SYSENTER_CS: u64 = 0x4c00;

/// Natural-width controls: CR0 guest/host mask.
pub const CR0_MASK: u64 = 0x6000;
/// CR4 guest/host mask.
pub const CR4_MASK: u64 = 0x6002;
/// CR0 read shadow.
pub const CR0_SHADOW: u64 = 0x6004;
/// CR4 read shadow.
pub const CR4_SHADOW: u64 = 0x6006;
/// Read-only: exit qualification.
pub const EXIT_QUALIFICATION: u64 = 0x6400;
/// Guest CR0.
pub const GUEST_CR0: u64 = 0x6800;
/// Guest CR3.
pub const GUEST_CR3: u64 = 0x6802;
/// Guest CR4.
pub const GUEST_CR4: u64 = 0x6804;
/// Guest segment bases: ES … TR (stride 2), then GDTR, IDTR.
pub const GUEST_ES_BASE: u64 = 0x6806;
/// Guest GDTR base.
pub const GUEST_GDTR_BASE: u64 = 0x6816;
/// Guest IDTR base.
pub const GUEST_IDTR_BASE: u64 = 0x6818;
/// Guest DR7.
pub const GUEST_DR7: u64 = 0x681a;
/// Guest RSP.
pub const GUEST_RSP: u64 = 0x681c;
/// Guest RIP.
pub const GUEST_RIP: u64 = 0x681e;
/// Guest RFLAGS.
pub const GUEST_RFLAGS: u64 = 0x6820;
/// Guest pending debug exceptions.
pub const GUEST_PENDING_DBG: u64 = 0x6822;
/// Guest IA32_SYSENTER_ESP.
pub const GUEST_SYSENTER_ESP: u64 = 0x6824;
/// Guest IA32_SYSENTER_EIP.
pub const GUEST_SYSENTER_EIP: u64 = 0x6826;
/// Host CR0.
pub const HOST_CR0: u64 = 0x6c00;
/// Host CR3.
pub const HOST_CR3: u64 = 0x6c02;
/// Host CR4.
pub const HOST_CR4: u64 = 0x6c04;
/// Host FS base.
pub const HOST_FS_BASE: u64 = 0x6c06;
/// Host GS base.
pub const HOST_GS_BASE: u64 = 0x6c08;
/// Host TR base.
pub const HOST_TR_BASE: u64 = 0x6c0a;
/// Host GDTR base.
pub const HOST_GDTR_BASE: u64 = 0x6c0c;
/// Host IDTR base.
pub const HOST_IDTR_BASE: u64 = 0x6c0e;
/// Host IA32_SYSENTER_ESP.
pub const HOST_SYSENTER_ESP: u64 = 0x6c10;
/// Host IA32_SYSENTER_EIP.
pub const HOST_SYSENTER_EIP: u64 = 0x6c12;
/// Host RSP.
pub const HOST_RSP: u64 = 0x6c14;
/// Host RIP.
pub const HOST_RIP: u64 = 0x6c16;

/// Pin-based VM-execution controls (SDM 25.6.1).
pub mod pin {
    pub const EXT_INT_EXITING: u32 = 1 << 0;
    pub const NMI_EXITING: u32 = 1 << 3;
    pub const VIRTUAL_NMIS: u32 = 1 << 5;
}

/// Primary processor-based VM-execution controls (SDM 25.6.2).
pub mod proc1 {
    pub const INTR_WINDOW: u32 = 1 << 2;
    pub const TSC_OFFSETTING: u32 = 1 << 3;
    pub const HLT: u32 = 1 << 7;
    pub const INVLPG: u32 = 1 << 9;
    pub const MWAIT: u32 = 1 << 10;
    pub const RDPMC: u32 = 1 << 11;
    pub const RDTSC: u32 = 1 << 12;
    pub const CR3_LOAD: u32 = 1 << 15;
    pub const CR3_STORE: u32 = 1 << 16;
    pub const CR8_LOAD: u32 = 1 << 19;
    pub const CR8_STORE: u32 = 1 << 20;
    pub const TPR_SHADOW: u32 = 1 << 21;
    pub const NMI_WINDOW: u32 = 1 << 22;
    pub const MOV_DR: u32 = 1 << 23;
    pub const UNCOND_IO: u32 = 1 << 24;
    pub const MSR_BITMAPS: u32 = 1 << 28;
    pub const MONITOR: u32 = 1 << 29;
    pub const PAUSE: u32 = 1 << 30;
    pub const SECONDARY: u32 = 1 << 31;
}

/// Secondary processor-based VM-execution controls (SDM 25.6.2).
pub mod proc2 {
    pub const EPT: u32 = 1 << 1;
    pub const RDTSCP: u32 = 1 << 3;
    pub const VPID: u32 = 1 << 5;
    pub const WBINVD: u32 = 1 << 6;
    pub const UNRESTRICTED: u32 = 1 << 7;
    pub const INVPCID: u32 = 1 << 12;
}

/// VM-exit controls (SDM 25.7.1).
pub mod exitc {
    pub const SAVE_DEBUG: u32 = 1 << 2;
    pub const HOST_64: u32 = 1 << 9;
    pub const SAVE_PAT: u32 = 1 << 18;
    pub const LOAD_PAT: u32 = 1 << 19;
    pub const SAVE_EFER: u32 = 1 << 20;
    pub const LOAD_EFER: u32 = 1 << 21;
}

/// VM-entry controls (SDM 25.8.1).
pub mod entryc {
    pub const LOAD_DEBUG: u32 = 1 << 2;
    pub const IA32E_GUEST: u32 = 1 << 9;
    pub const LOAD_PAT: u32 = 1 << 14;
    pub const LOAD_EFER: u32 = 1 << 15;
}

/// Basic exit reasons (SDM appendix C); bit 31 of the exit-reason field marks a VM-entry
/// failure.
pub mod reason {
    pub const EXCEPTION_NMI: u32 = 0;
    pub const EXT_INT: u32 = 1;
    pub const TRIPLE_FAULT: u32 = 2;
    pub const INIT: u32 = 3;
    pub const SIPI: u32 = 4;
    pub const IO_SMI: u32 = 5;
    pub const OTHER_SMI: u32 = 6;
    pub const INTR_WINDOW: u32 = 7;
    pub const NMI_WINDOW: u32 = 8;
    pub const TASK_SWITCH: u32 = 9;
    pub const CPUID: u32 = 10;
    pub const HLT: u32 = 12;
    pub const INVD: u32 = 13;
    pub const INVLPG: u32 = 14;
    pub const RDTSC: u32 = 16;
    pub const VMCALL: u32 = 18;
    pub const CR_ACCESS: u32 = 28;
    pub const DR_ACCESS: u32 = 29;
    pub const IO: u32 = 30;
    pub const RDMSR: u32 = 31;
    pub const WRMSR: u32 = 32;
    pub const INVALID_GUEST_STATE: u32 = 33;
    pub const MSR_LOADING: u32 = 34;
    pub const MWAIT: u32 = 36;
    pub const MONITOR: u32 = 39;
    pub const PAUSE: u32 = 40;
    pub const MACHINE_CHECK: u32 = 41;
    pub const EPT_VIOLATION: u32 = 48;
    pub const EPT_MISCONFIG: u32 = 49;
    pub const RDTSCP: u32 = 51;
    pub const WBINVD: u32 = 54;
    pub const XSETBV: u32 = 55;
    /// Bit 31: the VM entry failed.
    pub const ENTRY_FAILURE: u32 = 1 << 31;
}

/// Reads field `f` of the current VMCS (0 if the read fails: no current VMCS or an
/// unsupported field, which the kernel's fixed encodings never are).
#[inline]
pub fn read(f: u64) -> u64 {
    let v: u64;
    // SAFETY: VMREAD only reads the current VMCS; a failure sets flags (ignored here,
    // preserved by nothing) and leaves the destination unchanged (zeroed first).
    unsafe {
        core::arch::asm!("xor {v:e}, {v:e}", "vmread {v}, {f}", f = in(reg) f, v = out(reg) v, options(nostack))
    };
    v
}

/// Reads field `f`, one every VMX processor has (a guest register or exit information
/// of the basic VMCS layout), of the current VMCS, which the caller knows there is: the
/// hot path's read, without [`read`]'s zeroing for a read that fails.
#[inline(always)]
pub fn read_basic(f: u64) -> u64 {
    let v: u64;
    // SAFETY: VMREAD only reads the current VMCS; were there none, it would set flags
    // (ignored) and leave the register as it was: some value, never undefined behaviour.
    unsafe {
        core::arch::asm!("vmread {v}, {f}", f = in(reg) f, v = out(reg) v, options(nostack, readonly))
    };
    v
}

/// Writes field `f` of the current VMCS.
///
/// Only the vCPU code writes the VMCS, and only fields whose checks turn bad values into
/// VM-entry failures that it reports (never host-state fields from user input).
#[inline]
pub fn write(f: u64, v: u64) {
    // SAFETY: VMWRITE changes only the current VMCS in memory the kernel owns; what the
    // VMCS then says is checked by the processor at the next VM entry.
    unsafe { core::arch::asm!("vmwrite {f}, {v}", f = in(reg) f, v = in(reg) v, options(nostack)) };
}
