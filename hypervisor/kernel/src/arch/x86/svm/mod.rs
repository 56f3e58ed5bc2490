//! AMD SVM: per-CPU enable (EFER.SVME, host save area), the shared I/O and MSR
//! permission maps (everything intercepted), ASID allocation, and the world switch.
//!
//! The world switch ([`vmrun`]) runs with GIF clear from before the host's FS/GS/TR/
//! syscall MSRs are swapped out (`vmsave` host, `vmload` guest) until they are back
//! (`vmsave` guest, `vmload` host): no interrupt or NMI can see guest segment state in
//! the kernel. RFLAGS.IF is set for the VMRUN itself, since with V_INTR_MASKING the
//! host's IF at VMRUN decides whether physical interrupts exit the guest.

pub mod vmcb;

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use peregrine_abi::hip::MAX_CPUS;

use super::msr::{efer, rdmsr, rdmsr_raw, wrmsr, wrmsr_raw, Msr};

/// VM_CR: SVMDIS (bit 4) set by firmware disables SVM.
const MSR_VM_CR: u32 = 0xc001_0114;
/// VM_HSAVE_PA: the host state save area of this CPU.
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;

/// What CPUID 0x8000000A reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct SvmCaps {
    /// Number of ASIDs (ASID 0 is the host's).
    pub asids: u32,
    /// Nested paging.
    pub npt: bool,
    /// NRIP save.
    pub nrips: bool,
    /// Flush by ASID (TLB_CONTROL = 3).
    pub flush_by_asid: bool,
    /// Decode assists.
    pub decode_assists: bool,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static CAPS_ASIDS: AtomicU32 = AtomicU32::new(0);
static CAPS_FLAGS: AtomicU32 = AtomicU32::new(0);
static IOPM: AtomicU64 = AtomicU64::new(0);
static MSRPM: AtomicU64 = AtomicU64::new(0);

/// Per-CPU SVM state, touched only by its CPU (interrupts off) after bring-up.
struct PerCpu {
    /// The VM_HSAVE_PA page.
    hsave: AtomicU64,
    /// Where `vmsave` keeps the host's FS/GS/TR/LDTR/syscall MSRs during a VMRUN.
    host_area: AtomicU64,
    /// Next ASID to hand out.
    next_asid: AtomicU32,
    /// ASID generation: bumped when the ASIDs wrap (then everything is flushed).
    gen: AtomicU64,
}

static CPUS: [PerCpu; MAX_CPUS] = [const {
    PerCpu {
        hsave: AtomicU64::new(0),
        host_area: AtomicU64::new(0),
        next_asid: AtomicU32::new(1),
        gen: AtomicU64::new(1),
    }
}; MAX_CPUS];

/// Reads SVM's CPUID leaf; `None` without SVM or nested paging.
pub fn caps() -> Option<SvmCaps> {
    let ci = super::cpu::info();
    if !ci.features.contains(peregrine_abi::hip::Features::SVM) {
        return None;
    }
    // Leaf 0x8000000A exists when CPUID reports SVM.
    let r = core::arch::x86_64::__cpuid(0x8000_000a);
    let c = SvmCaps {
        asids: r.ebx,
        npt: r.edx & 1 != 0,
        nrips: r.edx & (1 << 3) != 0,
        flush_by_asid: r.edx & (1 << 6) != 0,
        decode_assists: r.edx & (1 << 7) != 0,
    };
    (c.npt && c.asids > 1).then_some(c)
}

/// Whether every CPU enabled SVM (vCPUs can be created).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// The detected capabilities (valid when [`enabled`]).
pub fn info() -> SvmCaps {
    let f = CAPS_FLAGS.load(Ordering::Relaxed);
    SvmCaps {
        asids: CAPS_ASIDS.load(Ordering::Relaxed),
        npt: f & 1 != 0,
        nrips: f & 2 != 0,
        flush_by_asid: f & 4 != 0,
        decode_assists: f & 8 != 0,
    }
}

/// Physical address of the I/O permission map (all ports intercepted).
pub fn iopm() -> u64 {
    IOPM.load(Ordering::Relaxed)
}

/// Physical address of the MSR permission map (all MSRs intercepted).
pub fn msrpm() -> u64 {
    MSRPM.load(Ordering::Relaxed)
}

static MAPS: spin::Once<bool> = spin::Once::new();

/// Allocates the shared permission maps and records the capabilities (once).
fn init_global(c: SvmCaps) -> bool {
    *MAPS.call_once(|| {
        let (Some(io), Some(msr)) = (
            crate::mem::alloc_frames(3, 1),
            crate::mem::alloc_frames(2, 1),
        ) else {
            return false;
        };
        // SAFETY: fresh frames from the pool (3 and 2 pages), mapped in the physmap.
        unsafe {
            core::ptr::write_bytes(crate::mem::phys_to_virt(io), 0xff, 3 * 4096);
            core::ptr::write_bytes(crate::mem::phys_to_virt(msr), 0xff, 2 * 4096);
        }
        IOPM.store(io, Ordering::Relaxed);
        MSRPM.store(msr, Ordering::Relaxed);
        CAPS_ASIDS.store(c.asids, Ordering::Relaxed);
        CAPS_FLAGS.store(
            u32::from(c.npt)
                | u32::from(c.nrips) << 1
                | u32::from(c.flush_by_asid) << 2
                | u32::from(c.decode_assists) << 3,
            Ordering::Relaxed,
        );
        ENABLED.store(true, Ordering::Release);
        true
    })
}

/// Enables SVM on this CPU. Returns false when SVM is unusable here; vCPUs are then
/// refused on this CPU ([`enabled_on`]).
pub fn init_cpu(cpu: usize) -> bool {
    let Some(c) = caps() else {
        return false;
    };
    // SAFETY: VM_CR exists when CPUID reports SVM.
    if unsafe { rdmsr_raw(MSR_VM_CR) } & (1 << 4) != 0 {
        crate::kprintln!("cpu {}: SVM disabled by firmware", cpu);
        return false;
    }
    if !init_global(c) {
        return false;
    }
    let (Some(hsave), Some(host)) = (
        crate::mem::alloc_frame_zeroed(),
        crate::mem::alloc_frame_zeroed(),
    ) else {
        return false;
    };
    let p = &CPUS[cpu];
    // SAFETY: SVM exists and is not disabled (checked); setting EFER.SVME only makes
    // the SVM instructions legal; VM_HSAVE_PA takes a page-aligned frame we own.
    unsafe {
        wrmsr(Msr::Efer, rdmsr(Msr::Efer) | efer::SVME);
        wrmsr_raw(MSR_VM_HSAVE_PA, hsave);
    }
    p.hsave.store(hsave, Ordering::Relaxed);
    p.host_area.store(host, Ordering::Release);
    true
}

/// Whether CPU `cpu` runs vCPUs (SVM enabled there).
pub fn enabled_on(cpu: usize) -> bool {
    cpu < MAX_CPUS && CPUS[cpu].host_area.load(Ordering::Acquire) != 0
}

/// The ASID for a vCPU whose last ASID was `asid` of generation `gen` on this CPU.
/// Returns `(asid, gen, flush_all)`: `flush_all` when the ASIDs wrapped (every CPU-local
/// guest translation must go, since old ASIDs are handed out again).
pub fn asid_for(asid: u32, gen: u64) -> (u32, u64, bool) {
    let p = &CPUS[crate::platform::percpu::cpu_id()];
    let cur = p.gen.load(Ordering::Relaxed);
    if gen == cur && asid != 0 {
        return (asid, gen, false);
    }
    let max = CAPS_ASIDS.load(Ordering::Relaxed);
    let mut next = p.next_asid.load(Ordering::Relaxed);
    let mut g = cur;
    let mut flush = false;
    if next >= max {
        g = cur + 1;
        p.gen.store(g, Ordering::Relaxed);
        next = 1;
        flush = true;
    }
    p.next_asid.store(next + 1, Ordering::Relaxed);
    (next, g, flush)
}

extern "C" {
    /// The host's instruction after VMRUN (a label in the world switch).
    fn svm_vmrun_resume();
}

/// Where the host resumes after a #VMEXIT: a VMCB whose guest RIP is this (and whose
/// CR3 is the host's) holds the host's state, not the guest's (see `vcpu::svm`).
pub fn resume_rip() -> u64 {
    svm_vmrun_resume as *const () as u64
}

/// Guest general-purpose registers that the VMCB does not hold (RAX and RSP live in
/// it; their slots here are unused), in the x86 encoding order.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Gprs(pub [u64; 16]);

core::arch::global_asm!(
    ".global svm_world_switch",
    ".p2align 4",
    // rdi = &mut Gprs, rsi = guest VMCB (phys), rdx = host save area (phys)
    "svm_world_switch:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",
    "push rsi",
    "push rdx",
    "clgi",
    "mov rax, rdx",
    "vmsave rax",
    "mov rax, rsi",
    "vmload rax",
    "sti",
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
    "vmrun rax",
    // #VMEXIT: RAX = guest VMCB again (host RAX from the save area), GIF = 0.
    ".global svm_vmrun_resume",
    "svm_vmrun_resume:",
    "vmsave rax",
    "push rdi",
    // [rsp]: guest rdi, +8: host area, +16: guest VMCB, +24: &mut Gprs
    "mov rdi, [rsp + 24]",
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
    "pop rax",
    "vmload rax",
    "cli",
    "stgi",
    "add rsp, 16",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "call spec_rsb_fill", // before the first `ret` after the exit (arch/x86/spec.rs)
    "ret",
);

extern "C" {
    fn svm_world_switch(gprs: *mut Gprs, vmcb: u64, host: u64);
}

/// Runs the guest of `vmcb` until the next #VMEXIT. Returns with interrupts disabled
/// and GIF set; a host interrupt that caused the exit is still pending.
///
/// # Safety
/// `vmcb` must be a valid, fully initialized VMCB page owned by the running vCPU (its
/// intercepts include VMRUN, its IOPM/MSRPM intercept everything, its nested page
/// table maps only memory the VM owns), SVM must be enabled on this CPU
/// ([`init_cpu`]) and interrupts must be disabled.
pub unsafe fn vmrun(gprs: &mut Gprs, vmcb: u64) {
    let host = CPUS[crate::platform::percpu::cpu_id()]
        .host_area
        .load(Ordering::Relaxed);
    // SAFETY: forwarded to the caller; the assembly preserves the SysV callee-saved
    // registers and the stack, and restores the host's segment state before setting GIF.
    unsafe { svm_world_switch(gprs, vmcb, host) }
}
