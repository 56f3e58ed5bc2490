//! FPU/SSE/AVX state per EC (threads, handlers and vCPUs alike), switched lazily.
//!
//! The kernel itself never uses the FPU (soft-float target). Each CPU remembers whose
//! state its FPU registers hold (the *owner*). Returning to user mode in another EC sets
//! CR0.TS (once; it stays set while ECs that do not use the FPU run); that EC's first
//! FPU instruction raises #NM, and only then the owner's registers are saved to its area
//! (`xsave`, or `fxsave` without XSAVE) and the EC's are loaded. IPC between ECs that do
//! not touch the FPU thus costs nothing. A vCPU cannot be trapped through the host's
//! CR0.TS (VMRUN loads the guest's CR0), so its state is loaded eagerly before VMRUN.
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
        save(prev.fpu.0.get());
    }
    restore(ec.fpu.0.get());
    s.0 = Some(Arc::downgrade(ec));
}

/// Before returning to user mode in `ec` (on its CPU, interrupts off): the FPU traps
/// unless `ec` owns it.
pub fn switch_to(ec: &Arc<Ec>) {
    let s = slot();
    let own = is_owner(s, ec);
    if own == s.1 {
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

fn save(a: *mut Area) {
    match crate::arch::x86::cpu::info().xsave {
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
