//! `test=vm` and `bench=vmexit`: a VM without the VMM library, driven by the root.
//!
//! The root creates a VM PD, delegates 16 pages of its own memory as guest-physical
//! 0–64 KiB (typed-item flag `GUEST`), copies a tiny 32-bit guest (assembled below) to
//! 0x1000 with a GDT and an IDT at 0x3000/0x3100, installs portals for all 256 vCPU
//! events (one handler EC on the vCPU's CPU, portal id = event number), delegates them
//! into the VM PD at event base 0 and starts a vCPU with an SC. The guest starts in flat
//! 32-bit protected mode (paging off), set up by the STARTUP reply.
//!
//! `test=vm` checks the exit sequence CPUID, I/O out (port 0x80), NPT fault (MMIO read
//! at 0x200000, emulated), I/O (0x81, the reply requests an interrupt window),
//! INTR_WINDOW (the reply injects vector 0x20), I/O (0x82, from the guest's interrupt
//! handler), HLT, VMCALL 1; then the guest spins until the root recalls the vCPU
//! (`ec_ctrl`, from another CPU when there is one): RECALL, whose reply points the guest
//! at `ud2` with an empty IDT: TRIPLE_FAULT. From there the handler plays a hostile VMM:
//! it answers with invalid state (INVALID_STATE must follow), then with random MTDs and
//! random values for `rounds=` (default 300) events; in the meantime the root revoked
//! guest page 5, which the guest read before: its final read must be an NPT fault, recalling the vCPU when it stops
//! exiting, and finally with a sane state at a `VMCALL 2`.
//!
//! `bench=vmexit` runs the guest's benchmark loop: the minimum over [`BENCH_ITER`] round
//! trips of CPUID, OUT, HLT, VMMCALL and an MMIO read (NPT fault emulated by the VMM),
//! measured by the guest with rdtsc (under `-icount shift=0`, instructions), printed as
//! `BENCH vmexit_<kind> <ticks> tsc-ticks` (the rdtsc pair's own cost, `vmexit_none`,
//! is included in each figure and printed too).

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use nul_rt::hc::{self, EcKind};
use nul_rt::utcb::UtcbRef;
use nul_rt::{println, sel, thread};
use peregrine_abi::event::vcpu as ev;
use peregrine_abi::hip::Features;
use peregrine_abi::perm::MemPerm;
use peregrine_abi::utcb::{inj, ArchState, Segment};
use peregrine_abi::{perm, Crd, Mtd, XferFlags, PAGE_BITS};

use super::{check, deadline_ms, ms, PRIO};
use crate::hip::HipView;
use crate::{mem, services};

/// Events answered with random state in the hostile phase (`rounds=`, default 300).
static HOSTILE_ROUNDS: AtomicU64 = AtomicU64::new(300);
/// Iterations of each benchmark loop (the guest keeps the minimum).
pub const BENCH_ITER: u32 = 200;

/// Guest-physical layout.
const GUEST_PAGES: u64 = 16;
const CODE: u64 = 0x1000;
const GDT: u64 = 0x3000;
const IDT: u64 = 0x3100;
const RESULTS: u64 = 0x4000;
const STACK: u64 = 0x8000;
const MMIO: u64 = 0x20_0000;

core::arch::global_asm!(
    ".pushsection .rodata.vmguest, \"a\"",
    ".global vmg_start",
    "vmg_start:",
    ".code32",
    // The test sequence.
    ".global vmg_test",
    "vmg_test:",
    "xor eax, eax",
    "cpuid",
    "out 0x80, al",
    ".global vmg_mmio",
    "vmg_mmio:",
    "mov eax, dword ptr [0x200000]",
    ".global vmg_mmio_end",
    "vmg_mmio_end:",
    "out 0x81, al",
    "hlt",
    // A page the root revokes later: in the guest TLB from here on.
    "mov eax, dword ptr [0x5000]",
    "mov eax, 1",
    ".global vmg_hc1",
    "vmg_hc1:",
    "vmmcall",
    ".global vmg_spin",
    "vmg_spin:",
    "jmp vmg_spin",
    ".global vmg_ud2",
    "vmg_ud2:",
    "ud2",
    ".global vmg_final",
    "vmg_final:",
    ".global vmg_rd",
    "vmg_rd:",
    "mov eax, dword ptr [0x5000]",
    ".global vmg_rd_end",
    "vmg_rd_end:",
    "mov eax, 2",
    ".global vmg_hc2",
    "vmg_hc2:",
    "vmmcall",
    "jmp vmg_final",
    // Vector 0x20.
    ".global vmg_isr",
    "vmg_isr:",
    "mov al, 0x20",
    "out 0x82, al",
    "iretd",
    // The benchmark: min of each round trip in esi, stored at RESULTS.
    ".global vmg_bench",
    "vmg_bench:",
    ".macro VMG_HEAD",
    "mov ebp, {iter}",
    "mov esi, 0xffffffff",
    "1:",
    "rdtsc",
    "mov edi, eax",
    ".endm",
    ".macro VMG_TAIL slot",
    "rdtsc",
    "sub eax, edi",
    "cmp eax, esi",
    "cmovb esi, eax",
    "dec ebp",
    "jnz 1b",
    "mov dword ptr [{results} + \\slot], esi",
    ".endm",
    "VMG_HEAD",
    "nop",
    "VMG_TAIL 0",
    "VMG_HEAD",
    "xor eax, eax",
    "cpuid",
    "VMG_TAIL 4",
    "VMG_HEAD",
    "out 0x80, al",
    "VMG_TAIL 8",
    "VMG_HEAD",
    "hlt",
    "VMG_TAIL 12",
    "VMG_HEAD",
    "mov eax, 3",
    ".global vmg_hc3",
    "vmg_hc3:",
    "vmmcall",
    "VMG_TAIL 16",
    "VMG_HEAD",
    ".global vmg_bmmio",
    "vmg_bmmio:",
    "mov eax, dword ptr [0x200000]",
    ".global vmg_bmmio_end",
    "vmg_bmmio_end:",
    "VMG_TAIL 20",
    "jmp vmg_final",
    // Debug-register isolation: report DR0-DR3 (eax, ebx, ecx, edx), write the values
    // the reply gives, say so, and again.
    ".global vmg_dr",
    "vmg_dr:",
    "mov eax, dr0",
    "mov ebx, dr1",
    "mov ecx, dr2",
    "mov edx, dr3",
    ".global vmg_hc4",
    "vmg_hc4:",
    "vmmcall",
    "mov dr0, eax",
    "mov dr1, ebx",
    "mov dr2, ecx",
    "mov dr3, edx",
    ".global vmg_hc5",
    "vmg_hc5:",
    "vmmcall",
    "jmp vmg_dr",
    ".code64",
    ".global vmg_end",
    "vmg_end:",
    ".popsection",
    iter = const BENCH_ITER,
    results = const RESULTS,
);

extern "C" {
    static vmg_start: u8;
    static vmg_test: u8;
    static vmg_mmio: u8;
    static vmg_mmio_end: u8;
    static vmg_spin: u8;
    static vmg_ud2: u8;
    static vmg_final: u8;
    static vmg_rd: u8;
    static vmg_rd_end: u8;
    static vmg_isr: u8;
    static vmg_bench: u8;
    static vmg_bmmio: u8;
    static vmg_bmmio_end: u8;
    static vmg_end: u8;
    static vmg_hc1: u8;
    static vmg_hc2: u8;
    static vmg_hc3: u8;
    static vmg_dr: u8;
    static vmg_hc4: u8;
    static vmg_hc5: u8;
}

/// The guest-physical address of a label in the guest image.
macro_rules! gpa {
    ($l:ident) => {
        CODE + (core::ptr::addr_of!($l) as u64 - core::ptr::addr_of!(vmg_start) as u64)
    };
}

/// The guest image.
fn image() -> &'static [u8] {
    // SAFETY: `vmg_start..vmg_end` is the assembled guest in read-only data.
    unsafe {
        let s = core::ptr::addr_of!(vmg_start);
        let e = core::ptr::addr_of!(vmg_end);
        core::slice::from_raw_parts(s, e as usize - s as usize)
    }
}

/// Events seen by the handler, in order (event number, detail).
const LOG_MAX: usize = 64;
static LOG: [AtomicU64; LOG_MAX * 2] = [const { AtomicU64::new(0) }; LOG_MAX * 2];
static LOG_N: AtomicUsize = AtomicUsize::new(0);
static BENCH: AtomicBool = AtomicBool::new(false);
/// 0: test sequence, 1: hostile, 2: final.
static PHASE: AtomicU64 = AtomicU64::new(0);
static HOSTILE: AtomicU64 = AtomicU64::new(0);
static INVALIDS: AtomicU64 = AtomicU64::new(0);
static OTHERS: AtomicU64 = AtomicU64::new(0);
static RNG: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
static SM_STEP: AtomicU64 = AtomicU64::new(0);
static SM_PARK: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicBool = AtomicBool::new(false);
/// Physical address of the guest memory.
static RAM: AtomicU64 = AtomicU64::new(0);
static ERRORS: AtomicU64 = AtomicU64::new(0);
/// The platform runs VMX (the guest's hypercalls become `vmcall`).
static INTEL: AtomicBool = AtomicBool::new(false);

fn log(nr: u64, detail: u64) {
    let i = LOG_N.fetch_add(1, Ordering::Relaxed);
    if i < LOG_MAX {
        LOG[2 * i].store(nr, Ordering::Relaxed);
        LOG[2 * i + 1].store(detail, Ordering::Relaxed);
    }
}

fn rand() -> u64 {
    let mut x = RNG.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    RNG.store(x, Ordering::Relaxed);
    x
}

/// The full, sane protected-mode state at `rip`.
fn sane_state(a: &mut ArchState, rip: u64, iflag: bool) {
    let code = Segment {
        sel: 8,
        ar: 0xc9b,
        limit: 0xffff_ffff,
        base: 0,
    };
    let data = Segment {
        sel: 0x10,
        ar: 0xc93,
        ..code
    };
    a.cs = code;
    a.ds = data;
    a.es = data;
    a.ss = data;
    a.fs = data;
    a.gs = data;
    a.tr = Segment {
        sel: 0,
        ar: 0x8b,
        limit: 0x67,
        base: 0,
    };
    a.ldtr = Segment {
        sel: 0,
        ar: 0x82,
        limit: 0,
        base: 0,
    };
    a.gdtr = Segment {
        sel: 0,
        ar: 0,
        limit: 23,
        base: GDT,
    };
    a.idtr = Segment {
        sel: 0,
        ar: 0,
        limit: 0x21 * 8 - 1,
        base: IDT,
    };
    a.cr0 = 0x11;
    a.cr2 = 0;
    a.cr3 = 0;
    a.cr4 = 0;
    a.cr8 = 0;
    a.efer = 0;
    a.dr7 = 0x400;
    a.dr6 = 0xffff_0ff0;
    a.rip = rip;
    a.rflags = if iflag { 0x202 } else { 2 };
    a.gpr = [0; 16];
    a.gpr[4] = STACK;
    a.inj_info = 0;
    a.inj_error = 0;
    a.intr_state = 0;
    a.actv_state = 0;
    a.ctrl = [0; 2];
    a.tsc_off = 0;
    a.xcr0 = 1;
    a.pat = 0x0007_0406_0007_0406;
    a.sysenter_cs = 0;
    a.sysenter_esp = 0;
    a.sysenter_eip = 0;
    a.star = 0;
    a.lstar = 0;
    a.cstar = 0;
    a.fmask = 0;
    a.kernel_gs_base = 0;
    a.mtd = Mtd::all() - Mtd::PDPTE - Mtd::QUAL - Mtd::FPU;
}

/// Invalid state in every group (the kernel must refuse all of it).
fn invalid_state(a: &mut ArchState) {
    a.mtd = Mtd::all();
    a.rip = 0x8000_0000_0000_0000;
    a.cr0 = 0xffff_ffff_0000_0001;
    a.cr3 = u64::MAX;
    a.cr4 = u64::MAX;
    a.cr8 = 99;
    a.efer = 0xdead_beef;
    a.dr7 = u64::MAX;
    a.inj_info = inj::VALID | (7 << 8) | 0x30;
    a.xcr0 = 0;
    a.pat = u64::MAX;
    a.lstar = 0x8000_0000_0000_0000;
    a.sysenter_eip = 0x8000_0000_0000_0000;
    a.fmask = u64::MAX;
    a.ctrl = [u64::MAX; 2];
    a.cs = Segment {
        sel: 0x1234,
        ar: 0xf093,
        limit: 0,
        base: 0x8000_0000_0000_0000,
    };
    a.gdtr.limit = 0x10000;
    a.fs.base = 0x1234_5678_9abc_def0;
}

/// Random MTD and random values.
fn random_state(a: &mut ArchState) {
    let w = |a: &mut u64| {
        let r = rand();
        *a = if r & 1 == 0 { r } else { r & 0xffff_ffff };
    };
    a.mtd = Mtd::from_bits_truncate(rand());
    for g in a.gpr.iter_mut() {
        w(g);
    }
    for x in [
        &mut a.rip,
        &mut a.rflags,
        &mut a.inj_info,
        &mut a.inj_error,
        &mut a.cr0,
        &mut a.cr2,
        &mut a.cr3,
        &mut a.cr4,
        &mut a.cr8,
        &mut a.efer,
        &mut a.dr7,
        &mut a.tsc_off,
        &mut a.xcr0,
        &mut a.pat,
        &mut a.lstar,
        &mut a.kernel_gs_base,
    ] {
        w(x);
    }
    let [c0, c1] = &mut a.ctrl;
    w(c0);
    w(c1);
    let r = rand();
    a.intr_state = r as u32;
    a.actv_state = (r >> 32) as u32;
    for s in [
        &mut a.cs,
        &mut a.ss,
        &mut a.ds,
        &mut a.es,
        &mut a.fs,
        &mut a.gs,
        &mut a.tr,
        &mut a.ldtr,
        &mut a.gdtr,
        &mut a.idtr,
    ] {
        let r = rand();
        s.sel = r as u16;
        s.ar = (r >> 16) as u16 & if r & (1 << 62) != 0 { 0xffff } else { 0xfff };
        s.limit = (r >> 32) as u32;
        s.base = if r & (1 << 63) != 0 {
            rand()
        } else {
            rand() & 0xffff_ffff
        };
    }
    // Mostly plausible values, so that the guest really runs with random state.
    if !rand().is_multiple_of(4) {
        a.rip &= 0xffff;
        a.cr0 &= 0x8005_003b;
        a.cr3 &= 0xffff_f000;
        a.cr4 &= 0x6f;
        a.cr8 &= 0xf;
        a.efer &= 0xd01;
        a.dr7 = 0x400;
        a.inj_info &= 0x8000_07ff | inj::REQ_INTR_WINDOW;
        a.ctrl[0] &= 0x1ff;
        a.ctrl[1] &= 0xffff_ffff;
        a.xcr0 = 1;
        a.pat = 0x0007_0406_0007_0406;
        a.lstar = 0;
        a.kernel_gs_base = 0;
        for s in [
            &mut a.cs,
            &mut a.ss,
            &mut a.ds,
            &mut a.es,
            &mut a.fs,
            &mut a.gs,
            &mut a.tr,
            &mut a.ldtr,
            &mut a.gdtr,
            &mut a.idtr,
        ] {
            // Accessed, present; limit and granularity consistent (VMX checks both).
            s.ar = (s.ar & 0xeff) | 0x91;
            s.base &= 0xffff;
            if s.ar & 0x800 != 0 {
                s.limit |= 0xfff;
            } else {
                s.limit &= 0xf_ffff;
            }
        }
        // Code in CS, writable data in SS, a busy TSS and an LDT, an active vCPU.
        a.cs.ar |= 0x0a;
        a.ss.ar = (a.ss.ar & 0xf64) | 0x93;
        a.tr.ar = (a.tr.ar & 0xf00) | 0x8b;
        a.ldtr.ar = (a.ldtr.ar & 0xf00) | 0x82;
        a.actv_state = 0;
        a.gdtr.limit &= 0xffff;
        a.idtr.limit &= 0xffff;
        a.mtd -= Mtd::SYSENTER | Mtd::SYSCALL_SWAPGS;
    }
}

fn park() -> ! {
    loop {
        let _ = hc::sm_down(SM_PARK.load(Ordering::Relaxed), false, 0);
    }
}

fn bench_handler(id: u64, a: &mut ArchState) {
    match id {
        ev::STARTUP => sane_state(a, gpa!(vmg_bench), false),
        ev::CPUID => {
            a.rip += if a.inst_len != 0 { a.inst_len } else { 2 };
            a.gpr[0..4].copy_from_slice(&[0, 0x6e69_7265, 0x656e_6967, 0x7247_6550]);
            a.mtd = Mtd::RIP_LEN | Mtd::GPR_ACDB;
        }
        ev::IO => {
            a.rip += a.inst_len;
            a.mtd = Mtd::RIP_LEN;
        }
        ev::HLT => {
            a.rip += 1;
            a.mtd = Mtd::RIP_LEN;
        }
        ev::NPT_FAULT => {
            a.rip += gpa!(vmg_bmmio_end) - gpa!(vmg_bmmio);
            a.gpr[0] = 0;
            a.mtd = Mtd::RIP_LEN | Mtd::GPR_ACDB;
        }
        ev::VMCALL if a.gpr[0] == 3 => {
            a.rip += 3;
            a.mtd = Mtd::RIP_LEN;
        }
        ev::VMCALL if a.gpr[0] == 2 => {
            DONE.store(true, Ordering::Release);
            let _ = hc::sm_up(SM_STEP.load(Ordering::Relaxed));
            park()
        }
        _ => {
            println!("bench: unexpected event {:#x} at {:#x}", id, a.rip);
            ERRORS.fetch_add(1, Ordering::Relaxed);
            DONE.store(true, Ordering::Release);
            let _ = hc::sm_up(SM_STEP.load(Ordering::Relaxed));
            park()
        }
    }
}

fn test_handler(id: u64, a: &mut ArchState) {
    let phase = PHASE.load(Ordering::Relaxed);
    if phase == 1 && id != ev::VMCALL {
        let n = HOSTILE.fetch_add(1, Ordering::Relaxed);
        if id == ev::INVALID_STATE {
            INVALIDS.fetch_add(1, Ordering::Relaxed);
        } else {
            OTHERS.fetch_add(1, Ordering::Relaxed);
        }
        if n == 0 {
            log(id, 0);
            random_state(a);
        } else if n < HOSTILE_ROUNDS.load(Ordering::Relaxed) {
            random_state(a);
        } else {
            PHASE.store(2, Ordering::Relaxed);
            // Random guest code may have overwritten the image.
            load_image(RAM.load(Ordering::Relaxed));
            sane_state(a, gpa!(vmg_final), false);
        }
        return;
    }
    match id {
        ev::STARTUP => {
            log(id, 0);
            sane_state(a, gpa!(vmg_test), true);
        }
        ev::CPUID => {
            log(id, a.gpr[0]);
            a.rip += if a.inst_len != 0 { a.inst_len } else { 2 };
            a.gpr[0..4].copy_from_slice(&[0x1234_5678, 0x11, 0x22, 0x33]);
            a.mtd = Mtd::RIP_LEN | Mtd::GPR_ACDB;
        }
        ev::IO => {
            let port = a.qual[0] >> 16;
            log(id, port << 8 | (a.gpr[0] & 0xff));
            handler_port_io();
            // Out, one byte, immediate port: 2 bytes.
            if a.qual[0] & 0xffff != 0 || a.inst_len != 2 {
                println!("vm: bad I/O exit qual {:#x} len {}", a.qual[0], a.inst_len);
                ERRORS.fetch_add(1, Ordering::Relaxed);
            }
            a.rip += a.inst_len;
            a.mtd = Mtd::RIP_LEN;
            if port == 0x81 {
                a.inj_info = inj::REQ_INTR_WINDOW;
                a.mtd |= Mtd::INJ;
            }
        }
        ev::NPT_FAULT if a.rip == gpa!(vmg_rd) => {
            // The revoked page.
            log(id, a.qual[1]);
            a.rip = gpa!(vmg_rd_end);
            a.mtd = Mtd::RIP_LEN;
        }
        ev::NPT_FAULT => {
            log(id, a.qual[1]);
            a.rip += gpa!(vmg_mmio_end) - gpa!(vmg_mmio);
            a.gpr[0] = 0xabcd;
            a.mtd = Mtd::RIP_LEN | Mtd::GPR_ACDB;
        }
        ev::INTR_WINDOW => {
            log(id, 0);
            a.inj_info = inj::VALID | inj::TYPE_EXTINT | 0x20;
            a.mtd = Mtd::INJ;
        }
        ev::HLT => {
            log(id, 0);
            a.rip += 1;
            a.mtd = Mtd::RIP_LEN;
        }
        ev::VMCALL => {
            log(id, a.gpr[0]);
            match a.gpr[0] {
                1 => {
                    a.rip = gpa!(vmg_spin);
                    a.mtd = Mtd::RIP_LEN;
                    let _ = hc::sm_up(SM_STEP.load(Ordering::Relaxed));
                }
                _ => {
                    DONE.store(true, Ordering::Release);
                    let _ = hc::sm_up(SM_STEP.load(Ordering::Relaxed));
                    park()
                }
            }
        }
        ev::RECALL if phase == 2 => {
            // The root's recall of a hostile phase that just ended: resume unchanged.
            a.mtd = Mtd::empty();
        }
        ev::RECALL => {
            log(id, a.rip);
            a.rip = gpa!(vmg_ud2);
            a.idtr.limit = 0;
            a.idtr.base = 0;
            a.mtd = Mtd::RIP_LEN | Mtd::IDTR;
        }
        ev::TRIPLE_FAULT => {
            log(id, a.rip);
            PHASE.store(1, Ordering::Relaxed);
            HOSTILE.store(0, Ordering::Relaxed);
            invalid_state(a);
        }
        _ => {
            log(id, a.rip);
            println!("vm: unexpected event {:#x} at {:#x}", id, a.rip);
            ERRORS.fetch_add(1, Ordering::Relaxed);
            sane_state(a, gpa!(vmg_final), false);
        }
    }
}

/// Port writes the exit handler made itself, each right after a VM exit.
static HANDLER_PIO: AtomicU64 = AtomicU64::new(0);

/// Writes port 0x80 (the POST-code port, which the root holds): the first port access
/// of user code after a VT-x exit, whose TR limit hides the I/O bitmap until the kernel
/// reloads TR at the resulting #GP. Without that repair the handler faults here.
fn handler_port_io() {
    // SAFETY: an OUT to port 0x80, which the root holds and nothing here listens to;
    // no memory is touched.
    unsafe {
        core::arch::asm!("out 0x80, al", in("al") 0u8, options(nomem, nostack, preserves_flags))
    };
    HANDLER_PIO.fetch_add(1, Ordering::Relaxed);
}

/// Writes XMM0 (this binary is soft-float: the compiler never uses XMM registers, so
/// the kernel's per-EC FPU state is all that keeps the value).
fn set_xmm0(v: u64) {
    // SAFETY: only XMM0 changes, which no compiled code of this soft-float binary uses.
    unsafe { core::arch::asm!("movq xmm0, {}", in(reg) v, options(nomem, nostack)) };
}

/// Reads XMM0.
fn xmm0() -> u64 {
    let v: u64;
    // SAFETY: reads XMM0 only.
    unsafe { core::arch::asm!("movq {}, xmm0", out(reg) v, options(nomem, nostack)) };
    v
}

/// Every vCPU event of the test VM (portal id = event number).
extern "C" fn vm_exit(id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let a = u.get().arch_mut();
    if BENCH.load(Ordering::Relaxed) {
        bench_handler(id, a);
    } else {
        // The handler's own FPU state: must never show up in the scenario thread's.
        set_xmm0(0xbad0_0000 | id);
        test_handler(id, a);
    }
    u.get().head.set_counts(0, 0);
    hc::reply()
}

/// The VM: PD, vCPU and SC selectors, guest memory.
struct Vm {
    vcpu: u64,
    ram: u64,
}

/// The MTD each event's portal transfers.
fn portal_mtd(nr: u64) -> Mtd {
    match nr {
        ev::CPUID => Mtd::RIP_LEN | Mtd::GPR_ACDB,
        ev::IO | ev::NPT_FAULT => Mtd::RIP_LEN | Mtd::GPR_ACDB | Mtd::QUAL,
        ev::HLT | ev::INTR_WINDOW | ev::RECALL | ev::TRIPLE_FAULT => Mtd::RIP_LEN,
        ev::VMCALL => Mtd::RIP_LEN | Mtd::GPR_ACDB,
        ev::STARTUP => Mtd::empty(),
        _ => Mtd::all(),
    }
}

fn setup(cpu: u64) -> Result<Vm, &'static str> {
    let step = sel::alloc();
    let park = sel::alloc();
    hc::create_sm(step, sel::OWN_PD, 0).map_err(|_| "create_sm")?;
    hc::create_sm(park, sel::OWN_PD, 0).map_err(|_| "create_sm")?;
    SM_STEP.store(step, Ordering::Relaxed);
    SM_PARK.store(park, Ordering::Relaxed);

    // Guest memory: code, GDT, IDT.
    let ram = mem::alloc(GUEST_PAGES).ok_or("guest memory")?;
    let img = image();
    if img.len() as u64 + CODE > GDT {
        return Err("guest image too large");
    }
    RAM.store(ram, Ordering::Relaxed);
    load_image(ram);
    Ok(Vm {
        vcpu: start_vm(ram, cpu)?,
        ram,
    })
}

/// Copies the guest image, GDT and IDT into guest memory at `ram` (physical).
fn load_image(ram: u64) {
    let img = image();
    // SAFETY: `ram` is the guest's 16 pages, mapped in the root's window; the image, the
    // GDT and the IDT fit below 0x4000 (checked in `setup`).
    unsafe {
        let base = mem::virt(ram) as *mut u8;
        core::ptr::copy_nonoverlapping(img.as_ptr(), base.add(CODE as usize), img.len());
        let gdt = base.add(GDT as usize) as *mut u64;
        *gdt.add(1) = 0x00cf_9b00_0000_ffff;
        *gdt.add(2) = 0x00cf_9300_0000_ffff;
        let isr = gpa!(vmg_isr);
        let idt = base.add(IDT as usize) as *mut u64;
        *idt.add(0x20) = (isr & 0xffff) | (8 << 16) | (0x8e00 << 32) | ((isr >> 16) << 48);
        if INTEL.load(Ordering::Relaxed) {
            // `vmmcall` (0f 01 d9) is `vmcall` (0f 01 c1) on Intel: same length.
            for hc in [
                gpa!(vmg_hc1),
                gpa!(vmg_hc2),
                gpa!(vmg_hc3),
                gpa!(vmg_hc4),
                gpa!(vmg_hc5),
            ] {
                *base.add(hc as usize + 2) = 0xc1;
            }
        }
    }
}

/// Creates the VM PD with the guest memory at `ram`, the portals and the vCPU with its
/// SC; returns the vCPU's selector.
fn start_vm(ram: u64, cpu: u64) -> Result<u64, &'static str> {
    start_vm_with(ram, cpu, vm_exit, 0, portal_mtd)
}

/// [`start_vm`] with exit handler `handler`, portal ids `id_base | event` and the
/// portals' MTDs from `mtd`.
fn start_vm_with(
    ram: u64,
    cpu: u64,
    handler: extern "C" fn(u64, u64) -> !,
    id_base: u64,
    mtd: fn(u64) -> Mtd,
) -> Result<u64, &'static str> {
    let vm = sel::alloc();
    hc::create_pd(vm, sel::OWN_PD, 64, true).map_err(|e| {
        println!("create_pd(VM): {:?}", e);
        "create_pd with the VM flag"
    })?;
    let host_page = (mem::WINDOW + ram) >> PAGE_BITS;
    for (h, g, order) in mem::dual_pieces(host_page, 0, GUEST_PAGES) {
        hc::pd_delegate(
            sel::OWN_PD,
            vm,
            Crd::mem(h, order, MemPerm::all()),
            Crd::mem(g, order, MemPerm::all()),
            0,
            XferFlags::GUEST,
        )
        .map_err(|e| {
            println!("guest delegation: {:?}", e);
            "delegate guest memory"
        })?;
    }

    // Handler and portals, delegated into the VM PD at event base 0.
    let evt = services::evt_base(cpu).ok_or("no service EC on the vCPU's CPU")?;
    let ec = thread::local_ec(cpu, evt).map_err(|_| "handler EC")?;
    let base = sel::alloc_aligned(8);
    for nr in 0..256u64 {
        hc::create_pt(
            base + nr,
            sel::OWN_PD,
            ec.sel,
            mtd(nr),
            handler as *const () as u64,
        )
        .map_err(|_| "create_pt")?;
        hc::pt_ctrl(base + nr, id_base | nr).map_err(|_| "pt_ctrl")?;
    }
    hc::pd_delegate(
        sel::OWN_PD,
        vm,
        Crd::obj(base, 8, perm::ALL),
        Crd::obj(0, 8, perm::ALL),
        0,
        XferFlags::empty(),
    )
    .map_err(|_| "delegate the portals")?;

    let vcpu = sel::alloc();
    hc::create_ec(vcpu, vm, EcKind::Vcpu, cpu, 0, 0, 0).map_err(|e| {
        println!("create_ec(vCPU): {:?}", e);
        "create the vCPU"
    })?;
    let sc = sel::alloc();
    hc::create_sc(sc, sel::OWN_PD, vcpu, PRIO, 10_000).map_err(|_| "create the vCPU's SC")?;
    Ok(vcpu)
}

fn wait_step(ms_max: u64) -> bool {
    hc::sm_down(SM_STEP.load(Ordering::Relaxed), false, deadline_ms(ms_max)).is_ok()
}

/// Whether the platform runs vCPUs: SVM with NPT, or VMX with EPT and unrestricted
/// guest (then the guest's hypercalls are patched to `vmcall`).
fn virt_present(hip: &HipView) -> bool {
    let vmx = hip.0.has(Features::VMX) && hip.0.has(Features::EPT) && hip.0.has(Features::UG);
    INTEL.store(vmx, Ordering::Relaxed);
    vmx || (hip.0.has(Features::SVM) && hip.0.has(Features::NPT))
}

/// `test=vm [rounds=N] [seed=S]`.
pub fn test(hip: &HipView, args: &str) -> bool {
    if let Some(r) = nul_rt::start_info::arg_u64(args, "rounds") {
        HOSTILE_ROUNDS.store(r.max(1), Ordering::Relaxed);
    }
    if let Some(s) = nul_rt::start_info::arg_u64(args, "seed") {
        RNG.store(s | 1, Ordering::Relaxed);
    }
    if !virt_present(hip) {
        return check(false, "the platform offers SVM with NPT or VMX with EPT");
    }
    let cpu = hip.online_cpus().last().unwrap_or(0);
    println!("vm: vCPU on cpu {}", cpu);
    set_xmm0(0x1111_2222_3333_4444);
    let vm = match setup(cpu) {
        Ok(v) => v,
        Err(e) => return check(false, e),
    };
    let _ = vm.ram;
    let mut ok = check(
        wait_step(5000),
        "the guest ran its exit sequence up to VMCALL 1",
    );
    // Take guest page 5 away again (the guest read it): its next access must fault.
    let page = Crd::mem((mem::WINDOW + vm.ram) / 4096 + 5, 0, MemPerm::all());
    ok &= check(
        hc::revoke(page, false).is_ok(),
        "revoke a guest page (delegated with GUEST) from the VM",
    );
    // The guest spins now; recall it (from another CPU when there is one).
    super::sleep_ms(20);
    ok &= check(hc::ec_recall(vm.vcpu).is_ok(), "ec_ctrl recall of the vCPU");
    // Hostile phase: recall whenever the guest stops exiting.
    let end = hc::rdtsc() + ms(20_000);
    while !DONE.load(Ordering::Acquire) && hc::rdtsc() < end {
        if !wait_step(100) && PHASE.load(Ordering::Relaxed) == 1 {
            let _ = hc::ec_recall(vm.vcpu);
        }
    }
    ok &= check(DONE.load(Ordering::Acquire), "the guest reached VMCALL 2");
    let n = LOG_N.load(Ordering::Relaxed).min(LOG_MAX);
    let seq: alloc::vec::Vec<(u64, u64)> = (0..n)
        .map(|i| {
            (
                LOG[2 * i].load(Ordering::Relaxed),
                LOG[2 * i + 1].load(Ordering::Relaxed),
            )
        })
        .collect();
    for (nr, d) in &seq {
        println!("vm: event {:#x} ({:#x})", nr, d);
    }
    let want: [(u64, Option<u64>); 14] = [
        (ev::STARTUP, None),
        (ev::CPUID, Some(0)),
        (ev::IO, Some(0x8078)),
        (ev::NPT_FAULT, Some(MMIO)),
        (ev::IO, Some(0x81cd)),
        (ev::INTR_WINDOW, None),
        (ev::IO, Some(0x8220)),
        (ev::HLT, None),
        (ev::VMCALL, Some(1)),
        (ev::RECALL, None),
        (ev::TRIPLE_FAULT, Some(gpa!(vmg_ud2))),
        (ev::INVALID_STATE, None),
        (ev::NPT_FAULT, Some(0x5000)),
        (ev::VMCALL, Some(2)),
    ];
    let matches = seq.len() == want.len()
        && seq
            .iter()
            .zip(want.iter())
            .all(|(&(nr, d), &(wn, wd))| nr == wn && wd.is_none_or(|x| x == d));
    ok &= check(
        matches,
        "exit sequence STARTUP CPUID IO NPT IO INTR_WINDOW IO(isr) HLT VMCALL RECALL TRIPLE_FAULT INVALID_STATE NPT(revoked page) VMCALL",
    );
    let inv = INVALIDS.load(Ordering::Relaxed);
    println!(
        "vm: hostile VMM: {} replies with random state, {} INVALID_STATE events, {} other events",
        HOSTILE.load(Ordering::Relaxed),
        inv,
        OTHERS.load(Ordering::Relaxed)
    );
    ok &= check(
        inv >= 1,
        "invalid state in a reply is refused (INVALID_STATE)",
    );
    ok &= check(ERRORS.load(Ordering::Relaxed) == 0, "no unexpected events");
    ok &= check(
        HANDLER_PIO.load(Ordering::Relaxed) >= 1,
        "the exit handler's own port I/O right after a VM exit works",
    );
    let x = xmm0();
    ok &= check(
        x == 0x1111_2222_3333_4444,
        "the scenario thread's XMM0 survived the handler's and the guest's FPU use",
    );
    ok &= dr_isolation(cpu);
    ok &= gdt_limit(cpu);
    ok
}

/// DR0-DR3 of the two VMs of [`dr_isolation`] (A and B), as the guests set them.
const DR_MAGIC: [[u64; 4]; 2] = [
    [0xa000_0010, 0xa000_0020, 0xa000_0030, 0xa000_0040],
    [0xb000_0010, 0xb000_0020, 0xb000_0030, 0xb000_0040],
];
/// CR4.PKE.
const CR4_PKE: u64 = 1 << 22;

/// What the two VMs of [`dr_isolation`] reported (per VM: DR0-DR3 first and second
/// time), their steps (the number of `VMCALL 4`s seen), and the semaphores they wait on.
static DR_SEEN: [[AtomicU64; 8]; 2] = [const { [const { AtomicU64::new(u64::MAX) }; 8] }; 2];
static DR_STEP: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];
/// Upped by VM A's handler when its DRs are set, and by B's when B is done.
static DR_SM_ROOT: AtomicU64 = AtomicU64::new(0);
/// Upped by the root to let VM A read its DRs again.
static DR_SM_A: AtomicU64 = AtomicU64::new(0);
/// The event that followed VM B's reply with CR4.PKE.
static PKE_EVENT: AtomicU64 = AtomicU64::new(u64::MAX);
/// The event that followed VM B's reply with CR4.UMIP, on a CPU without UMIP.
static UMIP_EVENT: AtomicU64 = AtomicU64::new(u64::MAX);
/// CR4.UMIP.
const CR4_UMIP: u64 = 1 << 11;

/// Whether the CPU has UMIP (CPUID 7.0:ECX bit 2).
fn cpu_umip() -> bool {
    core::arch::x86_64::__cpuid_count(7, 0).ecx & (1 << 2) != 0
}

fn dr_portal_mtd(nr: u64) -> Mtd {
    match nr {
        ev::VMCALL => Mtd::RIP_LEN | Mtd::GPR_ACDB,
        ev::STARTUP => Mtd::empty(),
        _ => Mtd::all(),
    }
}

/// The exit handler of the two VMs of [`dr_isolation`] (portal id: VM (1 A, 2 B) << 8
/// | event).
extern "C" fn dr_exit(id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let a = u.get().arch_mut();
    let vm = ((id >> 8) as usize).clamp(1, 2) - 1;
    let nr = id & 0xff;
    let root = DR_SM_ROOT.load(Ordering::Relaxed);
    match nr {
        ev::STARTUP => sane_state(a, gpa!(vmg_dr), false),
        ev::VMCALL if a.rip == gpa!(vmg_hc4) => {
            // The guest reports its DR0-DR3; the reply gives it its own values.
            let step = DR_STEP[vm].fetch_add(1, Ordering::Relaxed) as usize;
            if step < 2 {
                for (i, r) in [0, 3, 1, 2].into_iter().enumerate() {
                    // eax, ebx, ecx, edx: DR0..DR3.
                    DR_SEEN[vm][step * 4 + i].store(a.gpr[r] & 0xffff_ffff, Ordering::Relaxed);
                }
            }
            if step >= 1 {
                // A's second report: done.
                let _ = hc::sm_up(root);
                park()
            }
            let m = DR_MAGIC[vm];
            (a.gpr[0], a.gpr[3], a.gpr[1], a.gpr[2]) = (m[0], m[1], m[2], m[3]);
            a.rip += 3;
            a.mtd = Mtd::RIP_LEN | Mtd::GPR_ACDB;
        }
        ev::VMCALL if a.rip == gpa!(vmg_hc5) => {
            // The guest wrote its DR0-DR3.
            a.rip += 3;
            a.mtd = Mtd::RIP_LEN;
            if vm == 0 {
                // A waits until B ran on this CPU, then reads its DRs again.
                let _ = hc::sm_up(root);
                let _ = hc::sm_down(DR_SM_A.load(Ordering::Relaxed), false, 0);
            } else {
                // B: a reply with CR4.PKE, which the kernel must refuse.
                a.cr0 = 0x11;
                a.cr2 = 0;
                a.cr3 = 0;
                a.cr4 = CR4_PKE;
                a.cr8 = 0;
                a.mtd |= Mtd::CR;
            }
        }
        _ if vm == 1 && DR_STEP[1].load(Ordering::Relaxed) == 1 => {
            if PKE_EVENT.load(Ordering::Relaxed) == u64::MAX {
                // B's event after the reply with CR4.PKE.
                PKE_EVENT.store(nr, Ordering::Relaxed);
                if !cpu_umip() {
                    // A state the kernel accepts but the processor refuses at entry
                    // (VT-x: its CR4 fixed bits; SVM: VMRUN's checks): INVALID_STATE.
                    sane_state(a, gpa!(vmg_dr), false);
                    a.cr4 = CR4_UMIP;
                    u.get().head.set_counts(0, 0);
                    hc::reply()
                }
            } else {
                UMIP_EVENT.store(nr, Ordering::Relaxed);
            }
            let _ = hc::sm_up(root);
            park()
        }
        _ => {
            println!(
                "vm: DR VM {}: unexpected event {:#x} at {:#x}",
                vm, nr, a.rip
            );
            ERRORS.fetch_add(1, Ordering::Relaxed);
            let _ = hc::sm_up(root);
            park()
        }
    }
    u.get().head.set_counts(0, 0);
    hc::reply()
}

/// A VM for [`dr_isolation`] on `cpu` (`which`: 1 A, 2 B).
fn dr_vm(cpu: u64, which: u64) -> Result<u64, &'static str> {
    let ram = mem::alloc(GUEST_PAGES).ok_or("guest memory")?;
    load_image(ram);
    start_vm_with(ram, cpu, dr_exit, which << 8, dr_portal_mtd)
}

/// Two more VMs on the vCPU's CPU: A writes its own values to DR0-DR3; then B runs and
/// must find its DR0-DR3 as a new vCPU has them (0), writes its own; then A must find
/// its own values again: neither VM sees the other's debug registers (nor a breakpoint
/// of one fires in the other). B's VMM then replies with CR4.PKE, which the kernel
/// refuses (INVALID_STATE): a guest with CR4.PKE could read and set a PKRU the kernel
/// does not switch. On a CPU without UMIP, B's VMM then replies with CR4.UMIP, which
/// the kernel passes and the processor's entry refuses: INVALID_STATE too.
fn dr_isolation(cpu: u64) -> bool {
    let (root, a_go) = (sel::alloc(), sel::alloc());
    if hc::create_sm(root, sel::OWN_PD, 0).is_err() || hc::create_sm(a_go, sel::OWN_PD, 0).is_err()
    {
        return check(false, "create semaphores");
    }
    DR_SM_ROOT.store(root, Ordering::Relaxed);
    DR_SM_A.store(a_go, Ordering::Relaxed);
    let wait = || hc::sm_down(root, false, deadline_ms(10_000)).is_ok();
    if let Err(e) = dr_vm(cpu, 1) {
        return check(false, e);
    }
    let mut ok = check(wait(), "VM A set its debug registers");
    if let Err(e) = dr_vm(cpu, 2) {
        return check(false, e);
    }
    // B's first report, then its event after the PKE reply.
    ok &= check(wait(), "VM B ran on the same CPU");
    let _ = hc::sm_up(a_go);
    ok &= check(wait(), "VM A read its debug registers again");
    let seen = |vm: usize, step: usize| -> [u64; 4] {
        core::array::from_fn(|i| DR_SEEN[vm][step * 4 + i].load(Ordering::Relaxed))
    };
    println!(
        "vm: DR0-3: A first {:x?}, B first {:x?}, A again {:x?}",
        seen(0, 0),
        seen(1, 0),
        seen(0, 1)
    );
    ok &= check(
        seen(0, 0) == [0; 4] && seen(1, 0) == [0; 4],
        "a new VM finds DR0-DR3 clear (no other VM's values)",
    );
    ok &= check(
        seen(0, 1) == DR_MAGIC[0],
        "a VM finds its own DR0-DR3 after another VM ran on its CPU",
    );
    let pku = core::arch::x86_64::__cpuid_count(7, 0).ecx & (1 << 3) != 0;
    let e = PKE_EVENT.load(Ordering::Relaxed);
    println!(
        "vm: after a reply with CR4.PKE (CPU PKU {}): event {:#x}",
        pku, e
    );
    ok &= check(
        e == ev::INVALID_STATE,
        "a reply with CR4.PKE is refused (INVALID_STATE)",
    );
    if !cpu_umip() {
        let e = UMIP_EVENT.load(Ordering::Relaxed);
        println!(
            "vm: after a reply with CR4.UMIP (CPU without UMIP): event {:#x}",
            e
        );
        ok &= check(
            e == ev::INVALID_STATE,
            "an entry the processor refuses (CR4.UMIP without UMIP) is INVALID_STATE",
        );
    }
    ok
}

/// Selectors beyond the kernel's GDT (indices 8 and up) that user mode could use
/// (`lar`, `lsl` or `verr` with RPL 3 succeeded), found by [`gdt_probe`].
static GDT_HITS: AtomicU64 = AtomicU64::new(u64::MAX);
/// The first such selector (0: none).
static GDT_FIRST: AtomicU64 = AtomicU64::new(0);
/// Upped by [`gdt_probe`] when it is done.
static GDT_SM: AtomicU64 = AtomicU64::new(0);

/// Whether `lar`, `lsl` or `verr` accept selector `s` at CPL 3: true when the
/// descriptor lies within the GDT limit and user mode may look at it.
fn selector_usable(s: u16) -> bool {
    let (lar, lsl, verr): (u8, u8, u8);
    // SAFETY: LAR, LSL and VERR only read the descriptor table (a selector outside its
    // limit or an unusable descriptor clears ZF, nothing faults); they write the
    // output registers and flags only.
    unsafe {
        core::arch::asm!(
            "lar {t:e}, {s:e}",
            "setz {a}",
            "lsl {t:e}, {s:e}",
            "setz {b}",
            "verr {s:x}",
            "setz {c}",
            s = in(reg) u32::from(s),
            t = out(reg) _,
            a = out(reg_byte) lar,
            b = out(reg_byte) lsl,
            c = out(reg_byte) verr,
            options(nostack, readonly),
        )
    };
    lar | lsl | verr != 0
}

/// A root thread on the vCPU's CPU (`arg`): probes every selector from index 8 up with
/// RPL 3.
extern "C" fn gdt_probe(_arg: u64, _utcb: u64) -> ! {
    let mut hits = 0;
    let mut first = 0;
    for index in 8..8192u16 {
        let s = (index << 3) | 3;
        if selector_usable(s) {
            if first == 0 {
                first = u64::from(s);
            }
            hits += 1;
        }
    }
    GDT_FIRST.store(first, Ordering::Relaxed);
    GDT_HITS.store(hits, Ordering::Release);
    let _ = hc::sm_up(GDT_SM.load(Ordering::Relaxed));
    park()
}

/// After the VM ran on `cpu`: user code on that CPU finds no descriptor beyond the GDT
/// (a VM exit sets the GDTR limit to 0xffff; the kernel must restore its own).
fn gdt_limit(cpu: u64) -> bool {
    let sm = sel::alloc();
    if hc::create_sm(sm, sel::OWN_PD, 0).is_err() {
        return check(false, "create a semaphore");
    }
    GDT_SM.store(sm, Ordering::Relaxed);
    if let Err(e) = super::spawn(cpu, gdt_probe, cpu) {
        println!("vm: cannot start the GDT probe on cpu {}: {:?}", cpu, e);
        return check(false, "start a thread on the vCPU's CPU");
    }
    let _ = hc::sm_down(sm, false, deadline_ms(10_000));
    let hits = GDT_HITS.load(Ordering::Acquire);
    println!(
        "vm: cpu {}: {} selectors beyond the GDT usable from user mode (first {:#x})",
        cpu,
        hits,
        GDT_FIRST.load(Ordering::Relaxed)
    );
    check(
        hits == 0,
        "after VM exits no selector beyond the kernel's GDT is usable from user mode",
    )
}

/// `bench=vmexit`.
pub fn bench(hip: &HipView) -> bool {
    if !virt_present(hip) {
        println!("bench vmexit: no SVM with NPT or VMX with EPT");
        return false;
    }
    BENCH.store(true, Ordering::Relaxed);
    let cpu = hip.online_cpus().last().unwrap_or(0);
    let vm = match setup(cpu) {
        Ok(v) => v,
        Err(e) => {
            println!("bench vmexit: {}", e);
            return false;
        }
    };
    if !wait_step(120_000) || ERRORS.load(Ordering::Relaxed) != 0 {
        println!("bench vmexit: the guest did not finish");
        return false;
    }
    let r = |slot: u64| {
        // SAFETY: the results lie in the guest's memory, mapped in the root's window;
        // the guest finished writing them (it is parked).
        unsafe { core::ptr::read_volatile(mem::virt(vm.ram + RESULTS + slot) as *const u32) }
    };
    for (slot, name) in [
        (0, "vmexit_none"),
        (4, "vmexit_cpuid"),
        (8, "vmexit_pio_out"),
        (12, "vmexit_hlt"),
        (16, "vmexit_hypercall"),
        (20, "vmexit_mmio"),
    ] {
        println!("BENCH {} {} tsc-ticks", name, r(slot));
    }
    println!(
        "bench: vmexit min of {} iterations each, guest rdtsc deltas",
        BENCH_ITER
    );
    true
}
