//! FPU/SSE/AVX state per EC (threads, handlers and vCPUs alike), switched eagerly.
//!
//! The kernel itself never uses the FPU (soft-float target). Each CPU remembers whose
//! state its FPU registers hold (the *owner*). Returning to user mode in another EC saves
//! the owner's registers to its area and loads the EC's (`xsaveopt`/`xrstor`, `xsave`
//! where XSAVEOPT is missing or the owner is a vCPU, `fxsave`/`fxrstor` without XSAVE):
//! the registers always hold the running EC's state, so no other EC's values can be
//! read speculatively (LazyFP, CVE-2018-3665). The switch is skipped when the same EC
//! continues; XSAVEOPT's modified optimization writes only what changed since the
//! area's own `xrstor`. A vCPU's state is loaded the same way before VM entry.
//!
//! With `mitigations=off` the switch is lazy instead: returning to another EC sets
//! CR0.TS (once; it stays set while ECs that do not use the FPU run); that EC's first FPU
//! instruction raises #NM, and only then are the registers switched. A vCPU cannot be
//! trapped through the host's CR0.TS (VMRUN loads the guest's CR0), so its state is
//! loaded eagerly before VM entry in both modes.
//!
//! A new EC starts from the initial state (FCW 0x37f, MXCSR 0x1f80, all components in
//! their init configuration).

use alloc::sync::{Arc, Weak};
use core::cell::UnsafeCell;

use peregrine_abi::hip::MAX_CPUS;

use crate::ec::Ec;

/// An XSAVE area (legacy region, header, AVX: 832 bytes with x87|SSE|AVX, the most the
/// kernel enables in XCR0).
#[repr(C, align(64))]
pub struct Area([u8; 1024]);

/// The saved FPU state of one EC.
pub struct Fpu(UnsafeCell<Area>);

impl Fpu {
    /// The initial state.
    pub fn new() -> Self {
        let mut a = Area([0; 1024]);
        a.0[0..2].copy_from_slice(&0x37fu16.to_le_bytes());
        a.0[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        Fpu(UnsafeCell::new(a))
    }
}

impl Default for Fpu {
    fn default() -> Self {
        Self::new()
    }
}

/// Per CPU: the EC whose state the FPU registers hold, and whether CR0.TS is set.
struct Owner(UnsafeCell<(Option<Weak<Ec>>, bool)>);
// SAFETY: each CPU's slot is used only by that CPU with interrupts off.
unsafe impl Sync for Owner {}

static OWNER: [Owner; MAX_CPUS] = [const { Owner(UnsafeCell::new((None, false))) }; MAX_CPUS];

fn slot() -> &'static mut (Option<Weak<Ec>>, bool) {
    // SAFETY: this CPU's slot, interrupts off (see `Owner`); callers do not keep the
    // reference across calls that could take it again.
    unsafe { &mut *OWNER[crate::percpu::cpu_id()].0.get() }
}

fn set_ts(on: bool) {
    use crate::arch::x86::cr;
    let c0 = cr::read_cr0();
    let v = if on {
        c0 | cr::cr0::TS
    } else {
        c0 & !cr::cr0::TS
    };
    // SAFETY: only the task-switched bit changes; the kernel uses no FPU instruction.
    unsafe { cr::write_cr0(v) };
}

fn is_owner(s: &(Option<Weak<Ec>>, bool), ec: &Arc<Ec>) -> bool {
    s.0.as_ref()
        .is_some_and(|w| core::ptr::eq(w.as_ptr(), Arc::as_ptr(ec)))
}

/// Moves the FPU to `ec`: saves the owner's registers, loads `ec`'s. TS must be clear.
fn take_over(s: &mut (Option<Weak<Ec>>, bool), ec: &Arc<Ec>) {
    if let Some(prev) = s.0.take().and_then(|w| w.upgrade()) {
        // XSAVEOPT relies on the area's last `xrstor` being the state's source; a
        // guest's own XRSTORs in guest mode may match the area's linear address, so a
        // vCPU's state is saved in full.
        save(prev.fpu.0.get(), prev.kind != crate::ec::EcKind::Vcpu);
    }
    restore(ec.fpu.0.get());
    s.0 = Some(Arc::downgrade(ec));
}

/// Before returning to user mode in `ec` (on its CPU, interrupts off): eagerly, the FPU
/// registers get `ec`'s state unless they hold it already; lazily (`mitigations=off`),
/// the FPU traps unless `ec` owns it.
pub fn switch_to(ec: &Arc<Ec>) {
    let s = slot();
    let own = is_owner(s, ec);
    if crate::arch::x86::spec::eager_fpu() {
        if !own {
            take_over(s, ec);
        }
    } else if own == s.1 {
        s.1 = !own;
        set_ts(!own);
    }
}

/// #NM from user mode in `ec`: hands it the FPU. False if the trap was not ours (TS
/// clear: a real device-not-available fault, reported to the EC's handler).
pub fn device_not_available(ec: &Arc<Ec>) -> bool {
    let s = slot();
    if !s.1 {
        return false;
    }
    set_ts(false);
    s.1 = false;
    if !is_owner(s, ec) {
        take_over(s, ec);
    }
    true
}

/// Before VMRUN of vCPU `ec`: its FPU state is loaded and TS is clear.
pub fn load_for_guest(ec: &Arc<Ec>) {
    let s = slot();
    if s.1 {
        set_ts(false);
        s.1 = false;
    }
    if !is_owner(s, ec) {
        take_over(s, ec);
    }
}

/// Saves the FPU registers to `a`; `opt`: XSAVEOPT may be used (the registers were
/// loaded from `a` by `xrstor` and `a` was not written since).
fn save(a: *mut Area, opt: bool) {
    let info = crate::arch::x86::cpu::info();
    match info.xsave {
        // SAFETY: as below; XSAVEOPT writes the same format as XSAVE, skipping only
        // components unmodified since the `xrstor` from this very area, whose values
        // the area still holds (nothing but `save` writes an area after `Fpu::new`).
        Some(x) if opt && info.xsaveopt => unsafe {
            core::arch::asm!("xsaveopt64 [{}]", in(reg) a, in("eax") x as u32, in("edx") (x >> 32) as u32, options(nostack, preserves_flags))
        },
        // SAFETY: `a` is a 64-byte aligned area of 1024 bytes, large enough for the
        // components XCR0 enables; only the owning CPU writes it (the EC is bound here)
        // and the Weak reference that led here keeps the EC's memory allocated.
        Some(x) => unsafe {
            core::arch::asm!("xsave64 [{}]", in(reg) a, in("eax") x as u32, in("edx") (x >> 32) as u32, options(nostack, preserves_flags))
        },
        // SAFETY: as above (512 bytes, 16-byte aligned suffice for fxsave).
        None => unsafe {
            core::arch::asm!("fxsave64 [{}]", in(reg) a, options(nostack, preserves_flags))
        },
    }
}

fn restore(a: *const Area) {
    match crate::arch::x86::cpu::info().xsave {
        // SAFETY: the area was initialized by `Fpu::new` (valid header: XSTATE_BV 0,
        // XCOMP_BV 0) or written by `xsave64` with the same XCR0; restoring it only
        // changes user-visible FPU registers.
        Some(x) => unsafe {
            core::arch::asm!("xrstor64 [{}]", in(reg) a, in("eax") x as u32, in("edx") (x >> 32) as u32, options(nostack, preserves_flags))
        },
        // SAFETY: as above; MXCSR in the area has no reserved bits set (init 0x1f80 or
        // saved by fxsave).
        None => unsafe {
            core::arch::asm!("fxrstor64 [{}]", in(reg) a, options(nostack, preserves_flags))
        },
    }
}
