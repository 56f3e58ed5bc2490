//! Intel VT-x: per-CPU enable (IA32_FEATURE_CONTROL, CR0/CR4 fixed bits, VMXON), the
//! capabilities the VMX MSRs report, the VMCS instructions, and the world switch.
//!
//! The world switch ([`enter`]) loads the guest's general-purpose registers (the VMCS
//! holds RSP, RIP and RFLAGS), writes HOST_RSP and runs VMLAUNCH or VMRESUME. A VM exit
//! lands at `vmx_exit` with interrupts disabled (RFLAGS is loaded as 2); host interrupts
//! are not acknowledged on exit, so one that caused the exit stays pending at the LAPIC
//! until the kernel opens a short interrupt window.

pub mod vmcs;

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use peregrine_abi::hip::{Features, MAX_CPUS};

use super::cr::{self, cr4};
use super::msr::{rdmsr_raw, wrmsr_raw};
use vmcs::{entryc, exitc, pin, proc1, proc2};

const IA32_FEATURE_CONTROL: u32 = 0x3a;
const IA32_VMX_BASIC: u32 = 0x480;
const IA32_VMX_PINBASED: u32 = 0x481;
const IA32_VMX_PROCBASED: u32 = 0x482;
const IA32_VMX_EXIT: u32 = 0x483;
const IA32_VMX_ENTRY: u32 = 0x484;
const IA32_VMX_MISC: u32 = 0x485;
const IA32_VMX_CR0_FIXED0: u32 = 0x486;
const IA32_VMX_CR0_FIXED1: u32 = 0x487;
const IA32_VMX_CR4_FIXED0: u32 = 0x488;
const IA32_VMX_CR4_FIXED1: u32 = 0x489;
const IA32_VMX_PROCBASED2: u32 = 0x48b;
const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
const IA32_VMX_TRUE_PINBASED: u32 = 0x48d;
const IA32_VMX_TRUE_PROCBASED: u32 = 0x48e;
const IA32_VMX_TRUE_EXIT: u32 = 0x48f;
const IA32_VMX_TRUE_ENTRY: u32 = 0x490;
/// IA32_PAT.
pub const IA32_PAT: u32 = 0x277;

/// FEATURE_CONTROL: lock (bit 0), VMX outside SMX (bit 2).
const FC_LOCK: u64 = 1;
const FC_VMX: u64 = 1 << 2;

/// What the VMX capability MSRs allow, as the kernel uses it (valid when [`enabled`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct VmxCaps {
    /// VMCS revision identifier.
    pub revision: u32,
    /// Pin-based controls: (must be 1, may be 1).
    pub pin: (u32, u32),
    /// Primary processor-based controls.
    pub proc1: (u32, u32),
    /// Secondary processor-based controls.
    pub proc2: (u32, u32),
    /// VM-exit controls.
    pub exit: (u32, u32),
    /// VM-entry controls.
    pub entry: (u32, u32),
    /// CR0 bits fixed to 1 / allowed to be 1 in VMX operation.
    pub cr0_fixed: (u64, u64),
    /// CR4 bits fixed to 1 / allowed to be 1.
    pub cr4_fixed: (u64, u64),
    /// IA32_VMX_EPT_VPID_CAP.
    pub ept_vpid: u64,
    /// IA32_VMX_MISC.
    pub misc: u64,
}

impl VmxCaps {
    /// VPID usable (the control and INVVPID single-context or all-context).
    pub fn vpid(&self) -> bool {
        self.proc2.1 & proc2::VPID != 0
            && self.ept_vpid & (1 << 32) != 0
            && self.ept_vpid & (3 << 41) != 0
    }
    /// Unrestricted guest.
    pub fn unrestricted(&self) -> bool {
        self.proc2.1 & proc2::UNRESTRICTED != 0
    }
    /// EPT 1 GiB pages.
    pub fn ept_1g(&self) -> bool {
        self.ept_vpid & (1 << 17) != 0
    }
    /// EPT 2 MiB pages.
    pub fn ept_2m(&self) -> bool {
        self.ept_vpid & (1 << 16) != 0
    }
    /// Activity state HLT may be entered.
    pub fn hlt_state(&self) -> bool {
        self.misc & (1 << 6) != 0
    }
    /// Software interrupts/exceptions may be injected with instruction length 0.
    pub fn zero_len_inject(&self) -> bool {
        self.misc & (1 << 30) != 0
    }
    /// Adjusts control word `want | need` to what `(must, may)` allows; `None` if a bit
    /// of `need` is not allowed.
    pub fn adjust(pair: (u32, u32), want: u32, need: u32) -> Option<u32> {
        let v = (want | need | pair.0) & pair.1;
        (v & need == need).then_some(v)
    }
}

static CAPS: spin::Once<Option<VmxCaps>> = spin::Once::new();
static ENABLED: AtomicBool = AtomicBool::new(false);
static NEXT_VPID: AtomicU32 = AtomicU32::new(1);

/// Per CPU: the VMXON region (0: VMX is off on that CPU). The current VMCS is in the
/// CPU's own record (`percpu::PerCpu::vmcs`), where the entry path reads it in one
/// instruction.
static VMXON: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn pair(msr: u32) -> (u32, u32) {
    // SAFETY: called only for VMX capability MSRs, which exist when CPUID reports VMX
    // (true-control MSRs only when IA32_VMX_BASIC bit 55 says so).
    let v = unsafe { rdmsr_raw(msr) };
    (v as u32, (v >> 32) as u32)
}

/// Reads the VMX capabilities; `None` without VMX, EPT (4-level, write-back, single-
/// context INVEPT), unrestricted guest or the controls the backend relies on.
fn read_caps() -> Option<VmxCaps> {
    let ci = super::cpu::info();
    if !ci.features.contains(Features::VMX) {
        return None;
    }
    // SAFETY: the VMX capability MSRs exist when CPUID reports VMX.
    let basic = unsafe { rdmsr_raw(IA32_VMX_BASIC) };
    let truec = basic & (1 << 55) != 0;
    let pick = |t: u32, n: u32| pair(if truec { t } else { n });
    let proc1 = pick(IA32_VMX_TRUE_PROCBASED, IA32_VMX_PROCBASED);
    let proc2 = if proc1.1 & proc1::SECONDARY != 0 {
        pair(IA32_VMX_PROCBASED2)
    } else {
        (0, 0)
    };
    let ept_vpid = if proc2.1 & (proc2::EPT | proc2::VPID) != 0 {
        // SAFETY: exists when EPT or VPID may be enabled.
        unsafe { rdmsr_raw(IA32_VMX_EPT_VPID_CAP) }
    } else {
        0
    };
    // SAFETY: VMX capability MSRs (see above).
    let (cr0f, cr4f, misc) = unsafe {
        (
            (
                rdmsr_raw(IA32_VMX_CR0_FIXED0),
                rdmsr_raw(IA32_VMX_CR0_FIXED1),
            ),
            (
                rdmsr_raw(IA32_VMX_CR4_FIXED0),
                rdmsr_raw(IA32_VMX_CR4_FIXED1),
            ),
            rdmsr_raw(IA32_VMX_MISC),
        )
    };
    let c = VmxCaps {
        revision: basic as u32 & 0x7fff_ffff,
        pin: pick(IA32_VMX_TRUE_PINBASED, IA32_VMX_PINBASED),
        proc1,
        proc2,
        exit: pick(IA32_VMX_TRUE_EXIT, IA32_VMX_EXIT),
        entry: pick(IA32_VMX_TRUE_ENTRY, IA32_VMX_ENTRY),
        cr0_fixed: cr0f,
        cr4_fixed: cr4f,
        ept_vpid,
        misc,
    };
    // Physical addresses beyond 32 bits, write-back VMCS memory.
    let basic_ok = basic & (1 << 48) == 0 && (basic >> 50) & 0xf == 6;
    // EPT: 4-level walks (bit 6), WB (bit 14), INVEPT (20) single-context (25).
    let ept_ok = c.proc2.1 & proc2::EPT != 0
        && ept_vpid & (1 << 6) != 0
        && ept_vpid & (1 << 14) != 0
        && ept_vpid & (1 << 20) != 0
        && ept_vpid & (1 << 25) != 0;
    let ctl_ok = VmxCaps::adjust(
        c.pin,
        0,
        pin::EXT_INT_EXITING | pin::NMI_EXITING | pin::VIRTUAL_NMIS,
    )
    .is_some()
        && VmxCaps::adjust(
            c.proc1,
            0,
            proc1::HLT | proc1::UNCOND_IO | proc1::SECONDARY | proc1::TSC_OFFSETTING,
        )
        .is_some()
        && c.proc1.1 & proc1::INTR_WINDOW != 0
        && c.proc1.1 & proc1::NMI_WINDOW != 0
        && c.proc1.0 & proc1::MSR_BITMAPS == 0
        && VmxCaps::adjust(
            c.exit,
            0,
            exitc::HOST_64
                | exitc::SAVE_EFER
                | exitc::LOAD_EFER
                | exitc::SAVE_PAT
                | exitc::LOAD_PAT,
        )
        .is_some()
        && VmxCaps::adjust(c.entry, 0, entryc::LOAD_EFER | entryc::LOAD_PAT).is_some()
        && c.entry.1 & entryc::IA32E_GUEST != 0;
    let ok = basic_ok && ept_ok && c.unrestricted() && ctl_ok;
    if !ok {
        crate::kprintln!(
            "vmx: unusable (VMCS memory {}, EPT {}, unrestricted guest {}, controls {}): basic {:#x} pin {:x?} proc {:x?} proc2 {:x?} exit {:x?} entry {:x?} ept/vpid {:#x}",
            basic_ok,
            ept_ok,
            c.unrestricted(),
            ctl_ok,
            basic,
            c.pin,
            c.proc1,
            c.proc2,
            c.exit,
            c.entry,
            ept_vpid
        );
    }
    ok.then_some(c)
}

/// The capabilities (once, read on the first CPU that asks).
pub fn caps() -> Option<VmxCaps> {
    *CAPS.call_once(read_caps)
}

/// The capabilities of an enabled VMX (call only when [`enabled`]).
pub fn info() -> &'static VmxCaps {
    static NONE: VmxCaps = VmxCaps {
        revision: 0,
        pin: (0, 0),
        proc1: (0, 0),
        proc2: (0, 0),
        exit: (0, 0),
        entry: (0, 0),
        cr0_fixed: (0, 0),
        cr4_fixed: (0, 0),
        ept_vpid: 0,
        misc: 0,
    };
    match CAPS.get() {
        Some(c) => c.as_ref(),
        None => caps_slow(),
    }
    .unwrap_or(&NONE)
}

/// The first call: reads the capabilities.
#[cold]
fn caps_slow() -> Option<&'static VmxCaps> {
    CAPS.call_once(read_caps).as_ref()
}

/// Whether VMX runs on some CPU (VM PDs can be created).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Whether CPU `cpu` is in VMX operation.
pub fn enabled_on(cpu: usize) -> bool {
    cpu < MAX_CPUS && VMXON[cpu].load(Ordering::Acquire) != 0
}

/// A fresh VMCS or VMXON region: a zeroed frame with the revision identifier.
pub fn alloc_region(frame: u64) {
    let p = crate::mem::phys_to_ptr::<u32>(frame);
    // SAFETY: `frame` is a page the caller owns, mapped in the physmap.
    unsafe { p.write_volatile(info().revision) };
}

/// Enters VMX operation on this CPU. False when VMX is unusable here; vCPUs are then
/// refused on this CPU ([`enabled_on`]).
pub fn init_cpu(cpu: usize) -> bool {
    let Some(c) = caps() else {
        return false;
    };
    // SAFETY: IA32_FEATURE_CONTROL exists when CPUID reports VMX; setting the lock and
    // the VMX-enable bit when the firmware left it unlocked only permits VMXON.
    let fc = unsafe { rdmsr_raw(IA32_FEATURE_CONTROL) };
    if fc & FC_LOCK == 0 {
        // SAFETY: as above.
        unsafe { wrmsr_raw(IA32_FEATURE_CONTROL, fc | FC_LOCK | FC_VMX) };
    } else if fc & FC_VMX == 0 {
        crate::kprintln!("cpu {}: VMX disabled by firmware", cpu);
        return false;
    }
    let c0 = cr::read_cr0();
    let c4 = cr::read_cr4() | cr4::VMXE;
    if c0 & c.cr0_fixed.0 != c.cr0_fixed.0
        || c0 & !c.cr0_fixed.1 != 0
        || c4 & c.cr4_fixed.0 != c.cr4_fixed.0
        || c4 & !c.cr4_fixed.1 != 0
    {
        crate::kprintln!("cpu {}: CR0/CR4 do not fit VMX ({:#x} {:#x})", cpu, c0, c4);
        return false;
    }
    let Some(region) = crate::mem::alloc_frame_zeroed() else {
        return false;
    };
    alloc_region(region);
    // SAFETY: CR4.VMXE only makes the VMX instructions legal (CR0/CR4 fit the fixed
    // bits, checked above).
    unsafe { cr::write_cr4(c4) };
    let fail: u8;
    // SAFETY: VMXON takes the physical address of a page holding the revision id; the
    // page stays allocated for good.
    unsafe {
        core::arch::asm!("vmxon [{}]", "setbe {}", in(reg) &region, out(reg_byte) fail, options(nostack))
    };
    if fail != 0 {
        crate::kprintln!("cpu {}: VMXON failed", cpu);
        // SAFETY: back to the state before.
        unsafe { cr::write_cr4(c4 & !cr4::VMXE) };
        crate::mem::free_frame(region);
        return false;
    }
    VMXON[cpu].store(region, Ordering::Release);
    ENABLED.store(true, Ordering::Release);
    true
}

/// Makes the VMCS at `vmcs` current on this CPU (VMPTRLD unless it already is). Returns
/// false if it was not current before.
///
/// # Safety
/// VMX must be on here ([`enabled_on`]) and `vmcs` a VMCS region the caller owns, not
/// current on any other CPU.
#[inline(always)]
pub unsafe fn load(vmcs: u64) -> bool {
    if crate::platform::percpu::vmcs_is(vmcs) {
        return true;
    }
    // SAFETY: forwarded to the caller.
    unsafe { load_slow(vmcs) };
    false
}

/// [`load`] when `vmcs` is not current.
///
/// # Safety
/// As for [`load`].
#[inline(never)]
unsafe fn load_slow(vmcs: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { core::arch::asm!("vmptrld [{}]", in(reg) &vmcs, options(nostack)) };
    crate::platform::percpu::percpu()
        .vmcs
        .store(vmcs, Ordering::Relaxed);
}

/// VMCLEAR: writes the VMCS at `vmcs` back to memory and makes it inactive (and not
/// current, if it was).
///
/// # Safety
/// VMX must be on here and `vmcs` a VMCS region the caller owns, launched (if at all)
/// only on this CPU.
pub unsafe fn clear(vmcs: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { core::arch::asm!("vmclear [{}]", in(reg) &vmcs, options(nostack)) };
    if crate::platform::percpu::vmcs_is(vmcs) {
        crate::platform::percpu::percpu()
            .vmcs
            .store(0, Ordering::Relaxed);
    }
}

/// A new VPID (1..=0xffff; reused after wrap-around, so the first entry of a vCPU
/// flushes its VPID's translations).
pub fn alloc_vpid() -> u16 {
    loop {
        let v = NEXT_VPID.fetch_add(1, Ordering::Relaxed) & 0xffff;
        if v != 0 {
            return v as u16;
        }
    }
}

/// INVEPT single-context: drops the guest-physical and combined translations of `eptp`
/// on this CPU.
pub fn invept(eptp: u64) {
    let desc: [u64; 2] = [eptp, 0];
    // SAFETY: VMX is on (only vCPU code on a VMX CPU calls this); INVEPT only drops
    // cached translations; the descriptor is readable memory.
    unsafe { core::arch::asm!("invept {}, [{}]", in(reg) 1u64, in(reg) &desc, options(nostack)) };
}

/// INVVPID single-context (all-context where only that exists): drops the linear
/// translations of `vpid` on this CPU.
pub fn invvpid(vpid: u16) {
    let c = info();
    let ty: u64 = if c.ept_vpid & (1 << 41) != 0 { 1 } else { 2 };
    let desc: [u64; 2] = [u64::from(vpid), 0];
    // SAFETY: as for `invept`; the type is one the CPU reports.
    unsafe { core::arch::asm!("invvpid {}, [{}]", in(reg) ty, in(reg) &desc, options(nostack)) };
}

/// Guest general-purpose registers the VMCS does not hold (its RSP slot is unused), in
/// the x86 encoding order.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Gprs(pub [u64; 16]);

core::arch::global_asm!(
    ".global vmx_world_switch",
    ".p2align 4",
    // rdi = &mut Gprs, esi = launched; returns 0 after a VM exit, 1 VMfailValid,
    // 2 VMfailInvalid.
    "vmx_world_switch:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",
    "mov rax, {host_rsp}",
    "vmwrite rax, rsp",
    "test esi, esi",
    "mov rax, [rdi + 0]",
    "mov rcx, [rdi + 8]",
    "mov rdx, [rdi + 16]",
    "mov rbx, [rdi + 24]",
    "mov rbp, [rdi + 40]",
    "mov rsi, [rdi + 48]",
    "mov r8, [rdi + 64]",
    "mov r9, [rdi + 72]",
    "mov r10, [rdi + 80]",
    "mov r11, [rdi + 88]",
    "mov r12, [rdi + 96]",
    "mov r13, [rdi + 104]",
    "mov r14, [rdi + 112]",
    "mov r15, [rdi + 120]",
    "mov rdi, [rdi + 56]",
    "jz 2f",
    "vmresume",
    "jmp 3f",
    "2:",
    "vmlaunch",
    "3:",
    // VM entry failed: CF = VMfailInvalid, ZF = VMfailValid.
    "mov eax, 1",
    "mov ecx, 2",
    "cmovc eax, ecx",
    "add rsp, 8",
    "jmp 4f",
    ".global vmx_exit",
    "vmx_exit:",
    // RSP = HOST_RSP: [rsp] = &mut Gprs.
    "push rdi",
    "mov rdi, [rsp + 8]",
    "mov [rdi + 0], rax",
    "mov [rdi + 8], rcx",
    "mov [rdi + 16], rdx",
    "mov [rdi + 24], rbx",
    "mov [rdi + 40], rbp",
    "mov [rdi + 48], rsi",
    "mov [rdi + 64], r8",
    "mov [rdi + 72], r9",
    "mov [rdi + 80], r10",
    "mov [rdi + 88], r11",
    "mov [rdi + 96], r12",
    "mov [rdi + 104], r13",
    "mov [rdi + 112], r14",
    "mov [rdi + 120], r15",
    "pop rax",
    "mov [rdi + 56], rax",
    "add rsp, 8",
    "xor eax, eax",
    "4:",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "call spec_rsb_fill", // before the first `ret` after the exit (arch/x86/spec.rs)
    "ret",
    host_rsp = const vmcs::HOST_RSP,
);

extern "C" {
    fn vmx_world_switch(gprs: *mut Gprs, launched: u32) -> u32;
    fn vmx_exit();
}

/// The host RIP of every VMCS.
pub fn exit_rip() -> u64 {
    vmx_exit as *const () as u64
}

/// How a VM entry ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// The guest ran (or the entry failed while loading guest state): read the exit
    /// reason.
    Exited,
    /// VMfailValid: the VM-instruction error field says why.
    FailValid,
    /// VMfailInvalid: no current VMCS.
    FailInvalid,
}

/// Runs the guest of the current VMCS until the next VM exit. Returns with interrupts
/// disabled; a host interrupt that caused the exit is still pending.
///
/// # Safety
/// The current VMCS must be fully initialized by the vCPU code (host state of this CPU,
/// HOST_RIP = [`exit_rip`], the mandatory exiting controls, an EPT that maps only
/// memory the VM owns); `launched` must say whether VMLAUNCH succeeded for it; VMX is on
/// here and interrupts are disabled.
pub unsafe fn enter(gprs: &mut Gprs, launched: bool) -> Entry {
    // SAFETY: forwarded to the caller; the assembly preserves the SysV callee-saved
    // registers and the stack; the VM exit reloads the host state the VMCS holds.
    match unsafe { vmx_world_switch(gprs, u32::from(launched)) } {
        0 => Entry::Exited,
        1 => Entry::FailValid,
        _ => Entry::FailInvalid,
    }
}
