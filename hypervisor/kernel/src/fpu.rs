//! FPU/SSE/AVX state per EC (threads, handlers and vCPUs alike), switched eagerly.
//!
//! The kernel itself never uses the FPU (soft-float target). Each CPU remembers whose
//! state its FPU registers hold (the *owner*). Returning to user mode in another EC saves
//! the owner's registers to its area and loads the EC's (`xsaveopt`/`xrstor`, `xsave`
//! where XSAVEOPT is missing or the owner is a vCPU, `fxsave`/`fxrstor` without XSAVE):
//! the registers always hold the running EC's state, so no other EC's values can be
//! read speculatively (LazyFP, CVE-2018-3665). The switch is skipped when the same EC
//! continues; XSAVEOPT's modified optimization writes only what changed since the
//! area's own `xrstor`. A vCPU's state is loaded the same way before VM entry. One
//! exception: an EC of the PD that created the VM whose vCPU owns the registers (its
//! VMM, handling an exit) runs with CR0.TS set instead of switching, as in lazy mode —
//! the VM and its VMM are one trust domain, and its first FPU instruction, if any, takes
//! the registers over.
//!
//! The owner is a raw area pointer per CPU, with no reference count to maintain on the
//! IPC path: an area's `Drop` (its EC's end, on any CPU) clears the pointer, and waits
//! while that CPU is marking its slot busy to save into an area.
//!
//! With `mitigations=off` the switch is lazy instead: returning to another EC sets
//! CR0.TS (once; it stays set while ECs that do not use the FPU run); that EC's first FPU
//! instruction raises #NM, and only then are the registers switched. A vCPU cannot be
//! trapped through the host's CR0.TS (VMRUN loads the guest's CR0), so its state is
//! loaded eagerly before VM entry in both modes.
//!
//! A new EC starts from the initial state (FCW 0x37f, MXCSR 0x1f80, all components in
//! their init configuration).

use alloc::sync::Arc;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicPtr, AtomicU8, Ordering};

use peregrine_abi::hip::MAX_CPUS;

use crate::ec::{Ec, EcKind};

/// An XSAVE area (legacy region, header, AVX: 832 bytes with x87|SSE|AVX, the most the
/// kernel enables in XCR0).
#[repr(C, align(64))]
pub struct Area([u8; 1024]);

/// The saved FPU state of one EC.
#[repr(transparent)]
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

impl Drop for Fpu {
    /// The area goes away with its EC: no CPU may keep it as its owner. A CPU busy
    /// switching (saving into its owner's area, perhaps this one) is waited for.
    fn drop(&mut self) {
        let a = self.0.get();
        for o in &OWNER {
            loop {
                let cur = o.area.load(Ordering::Acquire);
                if cur == BUSY {
                    core::hint::spin_loop();
                    continue;
                }
                if cur != a
                    || o.area
                        .compare_exchange(
                            a,
                            core::ptr::null_mut(),
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok()
                {
                    break;
                }
            }
        }
    }
}

/// How state is saved and loaded: FXSAVE/FXRSTOR.
const MODE_FX: u8 = 0;
/// XSAVE/XRSTOR of every component XCR0 enables.
const MODE_XSAVE: u8 = 1;
/// As [`MODE_XSAVE`], and XSAVEOPT exists.
const MODE_XSAVEOPT: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(MODE_FX);

/// Takes the save/restore instructions from the CPU's features (BSP, once, after
/// `cpu::detect`).
pub fn init() {
    let i = crate::arch::x86::cpu::info();
    if i.xsave.is_some() {
        let m = if i.xsaveopt {
            MODE_XSAVEOPT
        } else {
            MODE_XSAVE
        };
        MODE.store(m, Ordering::Relaxed);
    }
}

/// [`Owner::area`] while its CPU saves into the owner's area (never an area's address:
/// areas are 64-byte aligned).
const BUSY: *mut Area = core::ptr::without_provenance_mut(1);

/// Per CPU: whose state the FPU registers hold.
struct Owner {
    /// The owner's area (null: nobody's; [`BUSY`]: being switched). Written by its CPU;
    /// cleared by an area's `Drop` on any CPU, which never frees an area its CPU is
    /// saving into.
    area: AtomicPtr<Area>,
    /// Used only by its CPU, interrupts off.
    local: UnsafeCell<Local>,
}

struct Local {
    /// XSAVEOPT may save the owner's state (it is not a vCPU: see [`take_over`]).
    opt: bool,
    /// CR0.TS is set (lazy switching, and eager switching while a VMM runs on its
    /// guest's registers: see [`switch_to`]).
    ts: bool,
    /// The owner is a vCPU: the id of the PD that created its VM (its VMM); 0 otherwise
    /// (PD ids start at 1).
    vmm: u64,
    /// The common case of [`switch_to`] holds: switching eagerly, with XSAVEOPT, and
    /// the owner (if any) is no vCPU (so `opt` holds and TS is clear). Kept by
    /// [`take_over`], the only place that changes the owner.
    plain: bool,
}

// SAFETY: `area` is atomic; `local` is used only by the slot's own CPU with interrupts
// off.
unsafe impl Sync for Owner {}

static OWNER: [Owner; MAX_CPUS] = [const {
    Owner {
        area: AtomicPtr::new(core::ptr::null_mut()),
        local: UnsafeCell::new(Local {
            opt: false,
            ts: false,
            vmm: 0,
            plain: false,
        }),
    }
}; MAX_CPUS];

/// This CPU's slot and its local part.
#[inline(always)]
fn slot() -> (&'static Owner, &'static mut Local) {
    slot_on(crate::platform::percpu::cpu_id())
}

/// CPU `cpu`'s slot (the running CPU's) and its local part.
#[inline(always)]
fn slot_on(cpu: usize) -> (&'static Owner, &'static mut Local) {
    let o = &OWNER[cpu];
    // SAFETY: this CPU's slot, interrupts off (see `Owner`); callers do not keep the
    // reference across calls that could take it again.
    (o, unsafe { &mut *o.local.get() })
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

/// The area of `ec`.
#[inline]
fn area(ec: &Ec) -> *mut Area {
    ec.fpu.0.get()
}

#[inline]
fn is_owner(o: &Owner, ec: &Ec) -> bool {
    o.area.load(Ordering::Relaxed) == area(ec)
}

/// Saves the owner's registers (with XSAVEOPT if `opt`), loads area `a` with `load`
/// and makes it the owner. TS must be clear.
#[inline(always)]
fn swap_in(o: &Owner, a: *mut Area, opt: bool, load: fn(*const Area)) {
    let prev = o.area.swap(BUSY, Ordering::Acquire);
    if !prev.is_null() {
        save(prev, opt);
    }
    load(a);
    o.area.store(a, Ordering::Release);
}

/// Moves the FPU to `ec`: saves the owner's registers, loads `ec`'s. TS must be clear.
#[inline(always)]
fn take_over(o: &Owner, l: &mut Local, ec: &Ec) {
    swap_in(o, area(ec), l.opt, restore);
    // XSAVEOPT relies on the area's last `xrstor` being the state's source; a guest's
    // own XRSTORs in guest mode may match the area's linear address, so a vCPU's state
    // is saved in full.
    let vcpu = ec.kind == EcKind::Vcpu;
    l.opt = !vcpu && MODE.load(Ordering::Relaxed) == MODE_XSAVEOPT;
    l.vmm = if vcpu { vmm_of(ec) } else { 0 };
    l.plain = l.opt && crate::arch::x86::spec::eager_fpu();
}

/// The id of the PD that created vCPU `ec`'s VM (0 for none).
#[cold]
fn vmm_of(ec: &Ec) -> u64 {
    ec.pd.parent.as_ref().map_or(0, |p| p.id)
}

/// Before returning to user mode in `ec` (on its CPU, interrupts off): eagerly, the FPU
/// registers get `ec`'s state unless they hold it already; lazily (`mitigations=off`),
/// the FPU traps unless `ec` owns it. `cpu` is the running CPU.
#[inline(always)]
pub fn switch_to(cpu: usize, ec: &Ec) {
    let (o, l) = slot_on(cpu);
    if l.plain && ec.kind != EcKind::Vcpu {
        // `take_over` for the common case, with what `plain` guarantees left out (its
        // bookkeeping: the new owner is no vCPU either).
        let a = area(ec);
        if o.area.load(Ordering::Relaxed) != a {
            swap_in(o, a, true, restore_xsave);
        }
        return;
    }
    if l.ts && l.vmm == ec.pd.id {
        // A VMM back on its guest's registers with TS still set (an exit's handler):
        // both ways of switching leave everything as it is (see `switch_from_guest`).
        return;
    }
    let own = is_owner(o, ec);
    if crate::arch::x86::spec::eager_fpu() {
        // Eagerly, TS is set only while a vCPU owns the registers (`l.vmm != 0`).
        if l.vmm != 0 {
            switch_from_guest(o, l, ec, own);
        } else if !own {
            take_over(o, l, ec);
        }
    } else if own == l.ts {
        l.ts = !own;
        set_ts(!own);
    }
}

/// [`switch_to`], eagerly, while the registers hold a guest's state.
#[cold]
#[inline(never)]
fn switch_from_guest(o: &Owner, l: &mut Local, ec: &Ec, own: bool) {
    // To an EC of the PD that created the VM, the guest's values may stay: the VM and
    // the VMM that serves it are one trust domain (see `hypervisor/core/src/mitigation.rs`),
    // as they do lazily; should the VMM use the FPU, it traps and takes it over. (This
    // also keeps QEMU 7.2's nested SVM stable: with the registers switched at every exit,
    // about one run in eight of the hostile-VM test saw the host's state written into a
    // guest's VMCB after a #VMEXIT, and Linux on two vCPUs at times triple-faulted the
    // host there.)
    let stay = !own && l.vmm == ec.pd.id;
    if l.ts != stay {
        l.ts = stay;
        set_ts(stay);
    }
    if !own && !stay {
        take_over(o, l, ec);
    }
}

/// #NM from user mode in `ec`: hands it the FPU. False if the trap was not ours (TS
/// clear: a real device-not-available fault, reported to the EC's handler).
pub fn device_not_available(ec: &Arc<Ec>) -> bool {
    let (o, l) = slot();
    if !l.ts {
        return false;
    }
    set_ts(false);
    l.ts = false;
    if !is_owner(o, ec) {
        take_over(o, l, ec);
    }
    true
}

/// Before entering the guest of vCPU `ec`: its FPU state is loaded, and TS is clear
/// unless the registers hold its state already. The world switch brings the host's CR0
/// back as it was (SVM keeps it in the host save area, VMX gets it from HOST_CR0, which
/// `vmx::run` keeps equal to CR0 at entry) and the guest runs on its own CR0, so a set
/// TS, which makes its VMM trap on the FPU, may stay for the round trip instead of being
/// written twice per exit.
pub fn load_for_guest(ec: &Arc<Ec>) {
    let (o, l) = slot();
    let own = is_owner(o, ec);
    if l.ts && !own {
        set_ts(false);
        l.ts = false;
    }
    if !own {
        take_over(o, l, ec);
    }
}

/// Saves the FPU registers to `a`; `opt`: XSAVEOPT may be used (the CPU has it, the
/// registers were loaded from `a` by `xrstor` and `a` was not written since).
#[inline(always)]
fn save(a: *mut Area, opt: bool) {
    if opt {
        // SAFETY: as in `save_full`; XSAVEOPT writes the same format as XSAVE, skipping
        // only components unmodified since the `xrstor` from this very area, whose
        // values the area still holds (nothing but `save` writes an area after
        // `Fpu::new`). EDX:EAX = all ones requests every component XCR0 enables.
        unsafe {
            core::arch::asm!("xsaveopt64 [{}]", in(reg) a, in("eax") u32::MAX, in("edx") u32::MAX, options(nostack, preserves_flags))
        }
    } else {
        save_full(a);
    }
}

/// [`save`] without XSAVEOPT.
#[cold]
#[inline(never)]
fn save_full(a: *mut Area) {
    if MODE.load(Ordering::Relaxed) == MODE_FX {
        // SAFETY: as below (512 bytes, 16-byte aligned suffice for fxsave).
        unsafe { core::arch::asm!("fxsave64 [{}]", in(reg) a, options(nostack, preserves_flags)) }
    } else {
        // SAFETY: `a` is a 64-byte aligned area of 1024 bytes, large enough for the
        // components XCR0 enables (EDX:EAX = all ones requests exactly those); its EC's
        // `Drop` waits while this CPU's slot is BUSY, so it stays allocated; only the
        // owning CPU writes it (ECs are bound to one CPU).
        unsafe {
            core::arch::asm!("xsave64 [{}]", in(reg) a, in("eax") u32::MAX, in("edx") u32::MAX, options(nostack, preserves_flags))
        }
    }
}

#[inline(always)]
fn restore(a: *const Area) {
    if MODE.load(Ordering::Relaxed) == MODE_FX {
        // SAFETY: MXCSR in the area has no reserved bits set (init 0x1f80 or saved by
        // fxsave); restoring only changes user-visible FPU registers.
        unsafe { core::arch::asm!("fxrstor64 [{}]", in(reg) a, options(nostack, preserves_flags)) }
    } else {
        restore_xsave(a);
    }
}

/// [`restore`] on a CPU with XSAVE.
#[inline(always)]
fn restore_xsave(a: *const Area) {
    // SAFETY: the area was initialized by `Fpu::new` (valid header: XSTATE_BV 0,
    // XCOMP_BV 0) or written by `xsave64`/`xsaveopt64` with the same XCR0 (EDX:EAX = all
    // ones: every enabled component); restoring it only changes user-visible FPU
    // registers.
    unsafe {
        core::arch::asm!("xrstor64 [{}]", in(reg) a, in("eax") u32::MAX, in("edx") u32::MAX, options(nostack, preserves_flags))
    }
}
