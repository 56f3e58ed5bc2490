//! Transient-execution mitigations: the facts this CPU enumerates (CPUID,
//! IA32_ARCH_CAPABILITIES), the choice `peregrine_core::mitigation::decide` makes from
//! them (on by default, all off with `mitigations=off` on the kernel command line), the
//! boot lines that list it, and the hooks on the paths it guards:
//!
//! - eager FPU switching: `fpu::switch_to` asks [`eager_fpu`];
//! - SMAP: CR4.SMAP in [`init_cpu`], RFLAGS.AC cleared on entry from ring 3 (`entry.rs`);
//! - eIBRS / AutoIBRS: set once per CPU in [`init_cpu`];
//! - RSB filling after every VM exit: the world switches call `spec_rsb_fill` before
//!   their first `ret`;
//! - IBPB when a CPU enters another VM than the last ([`vm_entry`]), and when it switches
//!   to a host address space after running guest code ([`host_space_switch`]);
//! - VERW before returning to user mode (`entry.rs`) and before VM entry, L1D flush
//!   before VM entry ([`vm_entry`]).
//!
//! `peregrine_core::mitigation` gives the reasoning per mitigation and what stays
//! unmitigated.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use peregrine_abi::hip::Features;
use peregrine_core::mitigation::{decide, on, Choice, Facts};
use raw_cpuid::native_cpuid::cpuid_count;

use super::cr::{self, cr4};
use super::msr::{rdmsr, rdmsr_raw, wrmsr, wrmsr_raw, Msr};
use crate::platform::percpu;

/// IA32_SPEC_CTRL.
const IA32_SPEC_CTRL: u32 = 0x48;
/// IA32_SPEC_CTRL.IBRS.
const SPEC_CTRL_IBRS: u64 = 1 << 0;
/// IA32_PRED_CMD (write 1: IBPB).
const IA32_PRED_CMD: u32 = 0x49;
/// IA32_ARCH_CAPABILITIES.
const IA32_ARCH_CAPABILITIES: u32 = 0x10a;
/// IA32_FLUSH_CMD (write 1: L1D flush).
const IA32_FLUSH_CMD: u32 = 0x10b;
/// EFER.AIBRSE: AMD Automatic IBRS.
const EFER_AIBRSE: u64 = 1 << 21;

/// The bits of [`on`] in force.
static ON: AtomicU32 = AtomicU32::new(0);
/// Whether IBPB leaves the return-address predictor alone (AMD without IBPB_RET): then
/// an IBPB is followed by an RSB fill.
static IBPB_NEEDS_RSB: AtomicBool = AtomicBool::new(false);
/// The decision, for the boot lines.
static CHOICE: spin::Once<Choice> = spin::Once::new();

/// Read by `trap_common`: CR4.SMAP is on, so `clac` exists and is needed.
pub static SMAP_ON: AtomicBool = AtomicBool::new(false);
/// Read by `trap_exit`: VERW before returning to user mode.
pub static VERW_ON: AtomicBool = AtomicBool::new(false);
/// Read by `spec_rsb_fill`: fill the RSB after VM exits.
pub static RSB_VMEXIT_ON: AtomicBool = AtomicBool::new(false);
/// The selector VERW checks (any valid one; the kernel's data segment).
pub static VERW_SEL: u16 = super::gdt::KERNEL_DS;

/// Mitigations [`vm_entry`] has work for.
const VM_ENTRY_WORK: u32 = on::IBPB_VM | on::IBPB_HOST | on::VERW | on::L1D_FLUSH_VM;

/// What this CPU enumerates.
fn facts(features: Features, vendor: &[u8; 12]) -> Facts {
    let l7 = cpuid_count(7, 0);
    let max_ext = cpuid_count(0x8000_0000, 0).eax;
    let e8 = if max_ext >= 0x8000_0008 {
        cpuid_count(0x8000_0008, 0).ebx
    } else {
        0
    };
    let e21 = if max_ext >= 0x8000_0021 {
        cpuid_count(0x8000_0021, 0).eax
    } else {
        0
    };
    let intel = vendor == b"GenuineIntel";
    let amd = vendor == b"AuthenticAMD" || vendor == b"HygonGenuine";
    let spec_ctrl = l7.edx & (1 << 26) != 0;
    let arch_cap = if l7.edx & (1 << 29) != 0 {
        // SAFETY: CPUID.7.0:EDX[29] enumerates IA32_ARCH_CAPABILITIES.
        unsafe { rdmsr_raw(IA32_ARCH_CAPABILITIES) }
    } else {
        0
    };
    Facts {
        intel,
        amd,
        virt: features.intersects(Features::VMX | Features::SVM),
        vmx: features.contains(Features::VMX),
        smap: l7.ebx & (1 << 20) != 0,
        ibpb: spec_ctrl || e8 & (1 << 12) != 0,
        ibpb_ret: !amd || e8 & (1 << 30) != 0,
        spec_ctrl,
        md_clear: l7.edx & (1 << 10) != 0,
        l1d_flush: l7.edx & (1 << 28) != 0,
        arch_cap,
        auto_ibrs: amd && e21 & (1 << 8) != 0,
    }
}

/// Decides the mitigations (BSP, once, before [`init_cpu`] on any CPU); `off` is
/// `mitigations=off`.
pub fn init(off: bool) {
    let i = super::cpu::info();
    let f = facts(i.features, &i.vendor);
    let c = *CHOICE.call_once(|| decide(&f, off));
    ON.store(c.on, Ordering::Relaxed);
    IBPB_NEEDS_RSB.store(!f.ibpb_ret, Ordering::Relaxed);
    SMAP_ON.store(c.on & on::SMAP != 0, Ordering::Relaxed);
    VERW_ON.store(c.on & on::VERW != 0, Ordering::Relaxed);
    RSB_VMEXIT_ON.store(c.on & on::RSB_VMEXIT != 0, Ordering::Relaxed);
}

/// Applies the per-CPU part of the choice on this CPU: CR4.SMAP, eIBRS or AutoIBRS.
///
/// # Safety
/// Call once per CPU during its bring-up, after [`init`]; the kernel never accesses
/// user pages directly (UTCBs and user memory go through the physmap).
pub unsafe fn init_cpu() {
    let m = ON.load(Ordering::Relaxed);
    // SAFETY: every bit and MSR written here is enumerated (`decide` chose it from the
    // CPUID facts); SMAP only forbids what the kernel does not do (see above).
    unsafe {
        if m & on::SMAP != 0 {
            cr::write_cr4(cr::read_cr4() | cr4::SMAP);
        }
        if m & on::EIBRS != 0 {
            wrmsr_raw(IA32_SPEC_CTRL, rdmsr_raw(IA32_SPEC_CTRL) | SPEC_CTRL_IBRS);
        }
        if m & on::AUTO_IBRS != 0 {
            wrmsr(Msr::Efer, rdmsr(Msr::Efer) | EFER_AIBRSE);
        }
    }
}

/// Prints the boot lines: `mitigations: …` and, when something stays unmitigated on
/// this CPU, `not mitigated: …`.
pub fn print() {
    let Some(c) = CHOICE.get() else {
        return;
    };
    let mut s = alloc::string::String::new();
    let _ = c.write_line(&mut s);
    crate::kprintln!("{}", s);
    if c.open != 0 {
        s.clear();
        let _ = c.write_open(&mut s);
        crate::kprintln!("{}", s);
    }
}

/// Whether every EC switch saves and loads the FPU state eagerly (LazyFP).
#[inline]
pub fn eager_fpu() -> bool {
    ON.load(Ordering::Relaxed) & on::EAGER_FPU != 0
}

/// An indirect branch prediction barrier (followed by an RSB fill where IBPB leaves the
/// return predictions alone).
fn ibpb() {
    // SAFETY: IA32_PRED_CMD exists (`decide` enables IBPB only where it is enumerated);
    // the barrier changes no architectural state.
    unsafe { wrmsr_raw(IA32_PRED_CMD, 1) };
    if IBPB_NEEDS_RSB.load(Ordering::Relaxed) {
        // SAFETY: `spec_rsb_fill_always` preserves every register but RFLAGS and
        // leaves the stack as it found it.
        unsafe { core::arch::asm!("call spec_rsb_fill_always") };
    }
}

/// Before entering a guest of the VM whose PD id is `vm` on this CPU (vcpu/svm.rs,
/// vcpu/vmx.rs, right before the world switch): IBPB when the CPU last ran another VM,
/// and the L1D flush or VERW before guest code runs.
#[inline]
pub fn vm_entry(vm: u64) {
    let m = ON.load(Ordering::Relaxed);
    if m & VM_ENTRY_WORK != 0 {
        vm_entry_work(m, vm);
    }
}

fn vm_entry_work(m: u32, vm: u64) {
    let p = percpu::percpu();
    if m & on::IBPB_VM != 0 && p.last_vm.swap(vm, Ordering::Relaxed) != vm {
        ibpb();
    }
    if m & on::IBPB_HOST != 0 {
        p.guest_ran.store(true, Ordering::Relaxed);
    }
    if m & on::L1D_FLUSH_VM != 0 {
        // SAFETY: IA32_FLUSH_CMD exists (`decide` chose the flush from its enumeration);
        // flushing the L1D changes no architectural state. It clears the CPU buffers
        // as VERW does.
        unsafe { wrmsr_raw(IA32_FLUSH_CMD, 1) };
    } else if m & on::VERW != 0 {
        verw();
    }
}

/// Before this CPU switches to a user address space (`arch::load_cr3`): the first switch
/// after guest code ran here gets an IBPB, so that a guest's branch training reaches no
/// host PD but the one that was loaded while it ran (its VMM's, in the exit loop).
#[inline]
pub fn host_space_switch() {
    if percpu::guest_ran() {
        percpu::percpu().guest_ran.store(false, Ordering::Relaxed);
        ibpb();
    }
}

/// VERW with a memory operand: clears the CPU buffers on MD_CLEAR parts.
fn verw() {
    // SAFETY: VERW only sets ZF from the selector's access rights.
    unsafe {
        core::arch::asm!("verw word ptr [rip + {sel}]", sel = sym VERW_SEL, options(nostack, readonly))
    };
}

// The RSB fill: 32 calls, each of whose return addresses leads into a speculation trap,
// then the stack pointer moved back over them. `spec_rsb_fill` (called by the VM world
// switches right after the exit, before their first `ret`) does it when RSB_VMEXIT_ON;
// `spec_rsb_fill_always` does it unconditionally. Both preserve every register but
// RFLAGS.
core::arch::global_asm!(
    ".global spec_rsb_fill",
    ".global spec_rsb_fill_always",
    ".p2align 4",
    "spec_rsb_fill:",
    "cmp byte ptr [rip + {on}], 0",
    "je 3f",
    "spec_rsb_fill_always:",
    ".rept 32",
    "call 1f",
    "2:",
    "pause",
    "lfence",
    "jmp 2b",
    "1:",
    ".endr",
    "add rsp, 32 * 8",
    "lfence",
    "3:",
    "ret",
    on = sym RSB_VMEXIT_ON,
);
