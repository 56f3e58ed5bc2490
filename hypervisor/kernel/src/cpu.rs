//! The per-CPU token: the one way to this CPU's kernel-local state.
//!
//! Much of the kernel's state belongs to one CPU and is touched only by that CPU, with
//! interrupts off, so it needs no lock: the scheduler's [`CpuLocal`], and the frame, call
//! state ([`EcLocal`]), UTCB and vCPU state of each EC bound to the CPU (an EC is bound
//! to one CPU for life; another CPU hands it work only through the remote lists of
//! `sched`). What keeps two `&mut` to that state from existing at once is this token:
//! each kernel entry (syscall, trap, interrupt, VM exit, boot, the scheduler's
//! fresh-stack turns) takes one [`Cpu`] with [`Cpu::enter`] — the audited `unsafe` of
//! the pattern, after Hubris's `safe_syscall_entry` — and passes it down by reference;
//! every accessor of CPU-local state borrows it mutably for as long as its result lives,
//! so the borrow checker sees to the rest. The token is zero-sized, not `Copy`, not
//! `Send`: passing it costs nothing.
//!
//! [`CpuLocal`]: crate::sched::CpuLocal
//! [`EcLocal`]: crate::ec::EcLocal

use core::marker::PhantomData;

/// This CPU's token (see the module doc). `Deref`s to [`Ecs`], the part that reaches the
/// ECs' state, so `ec.frame(cpu)` takes either.
#[repr(transparent)]
pub struct Cpu {
    ecs: Ecs,
}

/// The part of the token that reaches the state of this CPU's ECs (frames, call state,
/// UTCBs, vCPU state); [`crate::sched::split`] hands it out beside the scheduler state.
pub struct Ecs {
    /// Neither `Send` nor `Sync`, nor constructible outside this module.
    _local: PhantomData<*mut ()>,
}

impl Cpu {
    /// Takes this CPU's token at a kernel entry.
    ///
    /// # Safety
    /// The caller runs in the kernel on its CPU's kernel stack with interrupts off (or in
    /// a trap taken in the idle loop or a vCPU's interrupt window, whose token is lent
    /// for it: no borrow of it is alive across the window), and no other token of this
    /// CPU is used until this one is gone (a path that took one before has diverged, or
    /// lent it as just said).
    #[inline(always)]
    pub unsafe fn enter() -> Cpu {
        Cpu {
            ecs: Ecs {
                _local: PhantomData,
            },
        }
    }

    /// The part that reaches the ECs' state.
    #[inline(always)]
    pub fn ecs(&mut self) -> &mut Ecs {
        &mut self.ecs
    }

    /// The whole token again from the two parts `sched::split` handed out, which it
    /// takes for as long as the result lives (a path that had split it passes it on
    /// without taking it anew).
    #[inline(always)]
    pub fn join<'a>(_: &'a mut crate::sched::CpuLocal, ecs: &'a mut Ecs) -> &'a mut Cpu {
        // SAFETY: `Cpu` is a transparent wrapper of `Ecs` (same layout, zero-sized);
        // both borrows of the token's parts are taken for `'a`, so the whole token is
        // borrowed once again, as before the split.
        unsafe { &mut *(ecs as *mut Ecs as *mut Cpu) }
    }
}

impl core::ops::Deref for Cpu {
    type Target = Ecs;
    #[inline(always)]
    fn deref(&self) -> &Ecs {
        &self.ecs
    }
}

impl core::ops::DerefMut for Cpu {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut Ecs {
        &mut self.ecs
    }
}
