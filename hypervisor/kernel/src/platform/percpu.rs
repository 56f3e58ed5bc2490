//! Per-CPU data, reached through the GS base in kernel mode.
//!
//! In the kernel GS base points at this CPU's [`PerCpu`]; while user code runs it is in
//! IA32_KERNEL_GS_BASE (entry stubs `swapgs` when they come from ring 3; the NMI, #DF
//! and #MC entries from ring 0 check the GS_BASE MSR itself, as they may interrupt the
//! instructions between an entry and its `swapgs`). Assembly uses the `PERCPU_*` offsets
//! below, pinned by assertions.

use core::mem::offset_of;
use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};

use peregrine_abi::hip::MAX_CPUS;

use crate::arch::x86::msr::{wrmsr, Msr};

/// One CPU's kernel data.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct PerCpu {
    /// Address of this structure (`gs:[0]`).
    pub self_ptr: AtomicU64,
    /// Top of this CPU's kernel stack (also TSS.RSP0).
    pub kstack_top: AtomicU64,
    /// Scratch slot for the syscall entry stub (e.g. the user RSP).
    pub scratch: AtomicU64,
    /// The current EC (owned by the lead's scheduler; 0 = idle).
    pub current: AtomicU64,
    /// CPU index (0 = BSP).
    pub cpu: AtomicU32,
    /// Local APIC id.
    pub apic_id: AtomicU32,
    /// Timer interrupts taken.
    pub ticks: AtomicU64,
    /// Second scratch slot for entry stubs.
    pub scratch2: AtomicU64,
    /// IPIs taken.
    pub ipis: AtomicU64,
    /// Where the syscall stub pushes the user frame (just past the current EC's frame).
    pub frame_top: AtomicU64,
    /// Set once the CPU has finished bring-up.
    pub online: AtomicBool,
    /// The current EC is a local EC (portal handler): its `reply` needs no saved
    /// registers (see `entry.rs`).
    pub local_ec: AtomicBool,
    /// NMIs taken (the NMI handler only counts them).
    pub nmis: AtomicU64,
    /// The VM (PD id) whose guest this CPU entered last (`spec::vm_entry`).
    pub last_vm: AtomicU64,
    /// Guest code ran here since the last switch to a host address space (`spec`).
    pub guest_ran: AtomicBool,
    /// TR's limit is the 0x67 a VT-x exit leaves (the I/O bitmap hidden: user port
    /// access faults) until the next user #GP reloads it (`gdt::tr_repair`).
    pub tr_short: AtomicBool,
    /// The VMCS current on this CPU (VMPTRLD), 0 for none (`arch::x86::vmx::load`).
    pub vmcs: AtomicU64,
    _gdtr_pad: [u8; 6],
    /// This CPU's GDTR as `lgdt` reads it (limit, then base: `gdt::restore_after_vm_exit`
    /// reloads it with `lgdt gs:[PERCPU_GDTR]`).
    pub gdtr_limit: AtomicU16,
    /// The GDTR's base.
    pub gdtr_base: AtomicU64,
}

/// Offset of [`PerCpu::self_ptr`].
pub const PERCPU_SELF: usize = 0;
/// Offset of [`PerCpu::kstack_top`].
pub const PERCPU_KSTACK_TOP: usize = 8;
/// Offset of [`PerCpu::scratch`].
pub const PERCPU_SCRATCH: usize = 16;
/// Offset of [`PerCpu::current`].
pub const PERCPU_CURRENT: usize = 24;
/// Offset of [`PerCpu::cpu`].
pub const PERCPU_CPU: usize = 32;
/// Offset of [`PerCpu::apic_id`].
pub const PERCPU_APIC_ID: usize = 36;
/// Offset of [`PerCpu::scratch2`].
pub const PERCPU_SCRATCH2: usize = 48;

/// Offset of [`PerCpu::frame_top`].
pub const PERCPU_FRAME_TOP: usize = 64;
/// Offset of [`PerCpu::guest_ran`].
pub const PERCPU_GUEST_RAN: usize = offset_of!(PerCpu, guest_ran);
/// Offset of [`PerCpu::tr_short`].
pub const PERCPU_TR_SHORT: usize = offset_of!(PerCpu, tr_short);
/// Offset of [`PerCpu::vmcs`].
pub const PERCPU_VMCS: usize = offset_of!(PerCpu, vmcs);
/// Offset of the GDTR image ([`PerCpu::gdtr_limit`], [`PerCpu::gdtr_base`] after it).
pub const PERCPU_GDTR: usize = offset_of!(PerCpu, gdtr_limit);
/// Offset of [`PerCpu::local_ec`].
pub const PERCPU_LOCAL_EC: usize = 73;
/// Alias used by the syscall entry.
pub const OFF_KSTACK_TOP: usize = PERCPU_KSTACK_TOP;
/// Alias used by the syscall entry.
pub const OFF_SCRATCH: usize = PERCPU_SCRATCH;
/// Alias used by the syscall entry.
pub const OFF_FRAME_TOP: usize = PERCPU_FRAME_TOP;

const _: () = {
    assert!(offset_of!(PerCpu, frame_top) == PERCPU_FRAME_TOP);
    assert!(offset_of!(PerCpu, local_ec) == PERCPU_LOCAL_EC);
    assert!(offset_of!(PerCpu, self_ptr) == PERCPU_SELF);
    assert!(offset_of!(PerCpu, kstack_top) == PERCPU_KSTACK_TOP);
    assert!(offset_of!(PerCpu, scratch) == PERCPU_SCRATCH);
    assert!(offset_of!(PerCpu, current) == PERCPU_CURRENT);
    assert!(offset_of!(PerCpu, cpu) == PERCPU_CPU);
    assert!(offset_of!(PerCpu, apic_id) == PERCPU_APIC_ID);
    assert!(offset_of!(PerCpu, scratch2) == PERCPU_SCRATCH2);
    assert!(offset_of!(PerCpu, gdtr_base) == PERCPU_GDTR + 2);
};

impl PerCpu {
    const fn new() -> Self {
        Self {
            self_ptr: AtomicU64::new(0),
            kstack_top: AtomicU64::new(0),
            scratch: AtomicU64::new(0),
            current: AtomicU64::new(0),
            cpu: AtomicU32::new(0),
            apic_id: AtomicU32::new(0),
            ticks: AtomicU64::new(0),
            scratch2: AtomicU64::new(0),
            ipis: AtomicU64::new(0),
            frame_top: AtomicU64::new(0),
            online: AtomicBool::new(false),
            local_ec: AtomicBool::new(false),
            nmis: AtomicU64::new(0),
            last_vm: AtomicU64::new(0),
            guest_ran: AtomicBool::new(false),
            tr_short: AtomicBool::new(false),
            vmcs: AtomicU64::new(0),
            _gdtr_pad: [0; 6],
            gdtr_limit: AtomicU16::new(0),
            gdtr_base: AtomicU64::new(0),
        }
    }
}

static PERCPU: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];
static NUM_CPUS: AtomicU32 = AtomicU32::new(1);

/// CPU `cpu`'s data (any CPU may read another's).
pub fn get(cpu: usize) -> &'static PerCpu {
    &PERCPU[cpu]
}

/// Number of CPUs found (online or being started).
pub fn num_cpus() -> usize {
    NUM_CPUS.load(Ordering::Relaxed) as usize
}

/// Sets the CPU count (boot, from the MADT).
pub fn set_num_cpus(n: usize) {
    NUM_CPUS.store(n as u32, Ordering::Relaxed);
}

/// Fills CPU `cpu`'s record before it starts.
pub fn prepare(cpu: usize, apic_id: u32, kstack_top: u64) {
    let p = &PERCPU[cpu];
    p.self_ptr
        .store(p as *const PerCpu as u64, Ordering::Relaxed);
    p.cpu.store(cpu as u32, Ordering::Relaxed);
    p.apic_id.store(apic_id, Ordering::Relaxed);
    p.kstack_top.store(kstack_top, Ordering::Relaxed);
}

/// User mode's GS base, on every CPU at all times (so IA32_KERNEL_GS_BASE holds it
/// whenever the kernel runs, except while the VT-x path has a guest's value there).
/// User code cannot change it: without CR4.FSGSBASE (the kernel never sets it) only a
/// segment load could, and every descriptor user mode can load (the GDT's; there is no
/// LDT) has base 0; no hypercall sets it. It was this CPU's record's address once,
/// which told user mode where a kernel object lies (a fault at `gs:[x]` reports it).
pub const USER_GS_BASE: u64 = 0;

/// Points this CPU's GS base at its record (after the GDT and segments are loaded).
///
/// # Safety
/// Call once per CPU, on that CPU, after [`prepare`].
pub unsafe fn install(cpu: usize) {
    let p = &PERCPU[cpu] as *const PerCpu as u64;
    // SAFETY: GS base must point at this CPU's record. KERNEL_GS_BASE holds what user
    // mode's GS base will be: 0, and 0 it stays ([`USER_GS_BASE`]).
    unsafe {
        wrmsr(Msr::GsBase, p);
        wrmsr(Msr::KernelGsBase, USER_GS_BASE);
    }
}

/// Records what the syscall stub needs of the EC about to run: where its frame ends and
/// whether it is a local EC.
#[inline(always)]
pub fn set_running(frame_top: u64, local_ec: bool) {
    let p = percpu();
    p.frame_top.store(frame_top, Ordering::Relaxed);
    p.local_ec.store(local_ec, Ordering::Relaxed);
}

/// Whether guest code ran on this CPU since the last switch to a host address space
/// ([`PerCpu::guest_ran`], read in one instruction).
#[inline(always)]
pub fn guest_ran() -> bool {
    let v: u8;
    // SAFETY: as in `cpu_id`.
    unsafe {
        core::arch::asm!("mov {}, byte ptr gs:[{off}]", out(reg_byte) v, off = const PERCPU_GUEST_RAN, options(nostack, readonly, preserves_flags))
    };
    v != 0
}

/// Whether `vmcs` is this CPU's current VMCS ([`PerCpu::vmcs`], one compare).
#[inline(always)]
pub fn vmcs_is(vmcs: u64) -> bool {
    let eq: u8;
    // SAFETY: as in `cpu_id`.
    unsafe {
        core::arch::asm!("cmp gs:[{off}], {v}", "sete {e}", v = in(reg) vmcs, e = out(reg_byte) eq, off = const PERCPU_VMCS, options(nostack, readonly))
    };
    eq != 0
}

/// Marks TR short on this CPU ([`PerCpu::tr_short`], one instruction).
#[inline(always)]
pub fn set_tr_short() {
    // SAFETY: as in `cpu_id`; a byte of this CPU's own record, written only on this CPU.
    unsafe {
        core::arch::asm!("mov byte ptr gs:[{off}], 1", off = const PERCPU_TR_SHORT, options(nostack, preserves_flags))
    };
}

/// Clears [`PerCpu::tr_short`] on this CPU; whether it was set.
#[inline]
pub fn take_tr_short() -> bool {
    percpu().tr_short.swap(false, Ordering::Relaxed)
}

/// This CPU's index.
#[inline]
pub fn cpu_id() -> usize {
    let v: u32;
    // SAFETY: in the kernel GS base always points at this CPU's PerCpu (install()).
    unsafe {
        core::arch::asm!("mov {:e}, gs:[{off}]", out(reg) v, off = const PERCPU_CPU, options(nostack, readonly, preserves_flags))
    };
    // SAFETY: `prepare` stores only indices of PERCPU (it indexes the array with them),
    // so the per-CPU tables indexed with this need no bounds check.
    unsafe { core::hint::assert_unchecked((v as usize) < MAX_CPUS) };
    v as usize
}

/// This CPU's data.
#[inline]
pub fn percpu() -> &'static PerCpu {
    let p: u64;
    // SAFETY: as in cpu_id; gs:[0] holds the record's own address.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) p, options(nostack, readonly, preserves_flags))
    };
    // SAFETY: the address is that of an element of the static PERCPU array.
    unsafe { &*(p as *const PerCpu) }
}
