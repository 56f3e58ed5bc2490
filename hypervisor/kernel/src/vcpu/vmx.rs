//! The VMX backend: a VMCS per vCPU, EPT, VPID, unrestricted guest (see `crate::vcpu`).
//!
//! A vCPU's VMCS is set up on its own CPU the first time it is used there (VMPTRLD makes
//! it current; the host state of that CPU goes in once), and stays current until another
//! vCPU of the CPU needs the VMCS pointer. What the VMCS does not switch is switched here
//! around each entry: CR2, XCR0, DR0–DR3 and DR6 (lazily, see `super::Dr`), and — only
//! in the states in which the guest can use them — STAR, LSTAR, CSTAR and FMASK
//! (EFER.SCE set) and KERNEL_GS_BASE (EFER.LME set). After every exit the GDTR and IDTR
//! limits (which VM exits set to 0xffff) and TR are restored. The guest sees CR0 and
//! CR4 through read shadows: the bits VMX fixes (CR0.NE, CR4.VMXE, …) are forced in the
//! real registers and shown as the VMM set them; CR4.PKE is host-owned too (refused).
//!
//! Host interrupts exit the guest (external-interrupt exiting) without being acknowledged
//! on exit: they stay pending at the LAPIC and are taken by the kernel's own handlers in
//! the short interrupt window after the exit. NMIs exit too (virtual NMIs give the VMM an
//! NMI window). A VM entry that fails — VMfailValid, or an exit with the entry-failure
//! bit — becomes an INVALID_STATE event.

use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use peregrine_abi::event::VcpuEvent as Ev;
use peregrine_abi::hip::MAX_CPUS;
use peregrine_abi::utcb::{ctrl, inj, ArchState, Segment};
use peregrine_abi::{Mtd, Status};
use spin::Mutex;

use super::{canonical, injection, pat_ok, seg_ok, trace, Common, Next, RARE};
use super::{CR0_CD, CR0_NW, CR0_PE, CR0_PG, CR4_OK, CR4_PKE, EFER_LMA, EFER_LME, RFLAGS_OK};
use crate::arch::x86::cr;
use crate::arch::x86::msr::{rdmsr, rdmsr_raw, wrmsr, Msr};
use crate::arch::x86::vmx::vmcs::{
    self as f, entryc, exitc, pin, proc1, proc2, read, read_basic, reason as r, write,
};
use crate::arch::x86::vmx::{self, Entry, Gprs, VmxCaps};
use crate::ec::Ec;
use crate::pd::Pd;
use crate::space_guest::SpaceGuest;

const EFER_SCE: u64 = 1;
/// SCE LME LMA NXE.
const EFER_OK: u64 = 0xd01;
/// VMX access rights: segment unusable.
const AR_UNUSABLE: u32 = 1 << 16;
/// Interruptibility: blocking by NMI.
const BLOCK_NMI: u64 = 1 << 3;
/// Offset of VTPR in the virtual-APIC page.
const VTPR: usize = 0x80;
/// Interruptibility: blocking by STI or by MOV SS.
const BLOCK_STI_MOVSS: u64 = 3;
/// RFLAGS.TF.
const RFLAGS_TF: u64 = 1 << 8;

/// The VMX state of a vCPU beyond its EC, touched only by its CPU with interrupts off.
pub(super) struct State {
    gprs: Gprs,
    /// VMLAUNCH succeeded (VMRESUME next).
    launched: bool,
    /// The VMCS was set up on the vCPU's CPU.
    ready: bool,
    /// The first entry flushed this VPID's and EPTP's stale translations.
    flushed: bool,
    cr2: u64,
    /// CR8 when there is no TPR shadow (then CR8 accesses exit as CR_ACCESS).
    cr8: u64,
    /// STAR, LSTAR, CSTAR, FMASK, KERNEL_GS_BASE.
    msr: [u64; 5],
    /// The HOST_CR0 field's value: the host's CR0 at the last entry, so that CR0.TS
    /// comes back from the exit as it was (see `fpu::load_for_guest`).
    host_cr0: u64,
    /// The HOST_CR3 field's value (the host address space at the last entry).
    host_cr3: u64,
    /// The guest's EFER.SCE and EFER.LME as `prepare_entry` last found them: whether
    /// entries swap the SYSCALL MSRs and KERNEL_GS_BASE. EFER changes only through
    /// `put_state`, which makes `prepare_entry` run before the next entry (every WRMSR
    /// of the guest exits: no MSR bitmap).
    swap_sce: bool,
    swap_kgs: bool,
}

/// The VMX part of a vCPU.
pub struct Vcpu {
    /// Physical address of the VMCS (charged to the VM PD).
    vmcs: u64,
    /// The virtual-APIC page for the TPR shadow (0 without one).
    vapic: u64,
    eptp: u64,
    vpid: u16,
    st: UnsafeCell<State>,
}

impl Vcpu {
    /// The cell of the CPU-local state (borrowed through the token: `vcpu::Vcpu::parts`).
    pub(super) fn state_ptr(&self) -> *mut State {
        self.st.get()
    }
}

/// Per CPU: VMCS regions of vCPUs that went while their VMCS may be active on that CPU
/// (freed there after VMCLEAR).
static ZOMBIES: [Mutex<Vec<u64>>; MAX_CPUS] = [const { Mutex::new(Vec::new()) }; MAX_CPUS];
/// Per CPU: whether its `ZOMBIES` list may be non-empty (set after a push, so a reader
/// that sees it clear finds nothing to reap yet; it reaps on a later entry).
static ZOMBIE_ANY: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// Enters VMX operation on this CPU at bring-up.
pub fn init_cpu(cpu: usize) {
    if vmx::init_cpu(cpu) && cpu == 0 {
        let c = vmx::info();
        crate::kprintln!(
            "vmx: EPT (2M {}, 1G {}), VPID {}, unrestricted guest {}, TPR shadow {}, HLT state {}",
            c.ept_2m(),
            c.ept_1g(),
            c.vpid(),
            c.unrestricted(),
            c.proc1.1 & proc1::TPR_SHADOW != 0,
            c.hlt_state()
        );
    }
}

/// A new vCPU's VMX part for VM PD `pd` with guest space `g`.
pub fn create(pd: &Pd, g: &SpaceGuest) -> Result<Vcpu, Status> {
    let c = vmx::info();
    let vmcs = crate::kmem::alloc_frame(pd)?;
    vmx::alloc_region(vmcs);
    let vapic = if c.proc1.1 & proc1::TPR_SHADOW != 0 {
        match crate::kmem::alloc_frame(pd) {
            Ok(p) => p,
            Err(e) => {
                crate::kmem::free_frame(pd, vmcs);
                return Err(e);
            }
        }
    } else {
        0
    };
    Ok(Vcpu {
        vmcs,
        vapic,
        // Write-back, 4-level walk.
        eptp: g.root() | 6 | (3 << 3),
        vpid: if c.vpid() { vmx::alloc_vpid() } else { 0 },
        st: UnsafeCell::new(State {
            gprs: Gprs::default(),
            launched: false,
            ready: false,
            flushed: false,
            cr2: 0,
            cr8: 0,
            msr: [0; 5],
            host_cr0: 0,
            host_cr3: 0,
            swap_sce: false,
            swap_kgs: false,
        }),
    })
}

/// Frees the VMCS and virtual-APIC page (the vCPU is gone). A VMCS that may be active
/// on its CPU is cleared there first.
pub fn release(pd: &Pd, cpu: usize, v: &mut Vcpu) {
    if v.vapic != 0 {
        crate::kmem::free_frame(pd, v.vapic);
    }
    // Nobody else refers to the vCPU any more.
    let ready = v.st.get_mut().ready;
    if !ready {
        crate::kmem::free_frame(pd, v.vmcs);
        return;
    }
    crate::kmem::uncharge(pd, 1);
    if crate::platform::percpu::cpu_id() == cpu {
        crate::arch::x86::cr::without_interrupts(|| {
            // SAFETY: VMX is on here (the VMCS was set up on this CPU); the VMCS is
            // ours and was only ever active on this CPU.
            unsafe { vmx::clear(v.vmcs) };
        });
        crate::mem::free_frame(v.vmcs);
    } else {
        ZOMBIES[cpu].lock().push(v.vmcs);
        ZOMBIE_ANY[cpu].store(true, Ordering::Release);
    }
}

/// Clears and frees VMCS regions of vCPUs of this CPU that went elsewhere.
fn reap() {
    let cpu = crate::platform::percpu::cpu_id();
    if !ZOMBIE_ANY[cpu].load(Ordering::Relaxed) || !ZOMBIE_ANY[cpu].swap(false, Ordering::Acquire) {
        return;
    }
    let z = &ZOMBIES[cpu];
    let list = core::mem::take(&mut *z.lock());
    for p in list {
        // SAFETY: VMX is on here; the region was a VMCS used only on this CPU and its
        // vCPU is gone.
        unsafe { vmx::clear(p) };
        crate::mem::free_frame(p);
    }
}

/// The primary processor-based controls for `ctrl[0]` (plus the window bits `win`).
fn proc1_for(c: &VmxCaps, ctl: u64, win: u32) -> u32 {
    let on = |b: u64| ctl & b != 0;
    // MOV DR always exits (the kernel's lazy debug-register switch: `super::Dr`); the
    // DR-access exit clears it until the next exit.
    let mut p = proc1::HLT
        | proc1::UNCOND_IO
        | proc1::SECONDARY
        | proc1::TSC_OFFSETTING
        | proc1::MOV_DR
        | win;
    if c.proc1.1 & proc1::TPR_SHADOW != 0 {
        p |= proc1::TPR_SHADOW;
    } else {
        p |= proc1::CR8_LOAD | proc1::CR8_STORE;
    }
    if on(ctrl::RDTSC) || on(ctrl::RDTSCP) {
        p |= proc1::RDTSC;
    }
    if on(ctrl::INVLPG) {
        p |= proc1::INVLPG;
    }
    if on(ctrl::PAUSE) {
        p |= proc1::PAUSE;
    }
    if on(ctrl::MWAIT) {
        p |= proc1::MWAIT | proc1::MONITOR;
    }
    if on(ctrl::RDPMC) {
        p |= proc1::RDPMC;
    }
    if on(ctrl::CR3_ACCESS) {
        p |= proc1::CR3_LOAD | proc1::CR3_STORE;
    }
    (p | c.proc1.0) & c.proc1.1
}

/// The secondary processor-based controls for `ctrl[0]`.
fn proc2_for(c: &VmxCaps, ctl: u64) -> u32 {
    let mut p = proc2::EPT | proc2::UNRESTRICTED;
    if c.vpid() {
        p |= proc2::VPID;
    }
    if c.proc2.1 & proc2::RDTSCP != 0 {
        p |= proc2::RDTSCP;
    }
    // INVPCID works in the guest (else it raises #UD there although CPUID offers it);
    // with INVLPG exiting it exits instead (reported as OTHER).
    if c.proc2.1 & proc2::INVPCID != 0 {
        p |= proc2::INVPCID;
    }
    if ctl & ctrl::WBINVD != 0 {
        p |= proc2::WBINVD;
    }
    (p | c.proc2.0) & c.proc2.1
}

/// CR0 bits the guest cannot own: those VMX fixes (PE and PG are free with unrestricted
/// guest), or all of them when the VMM intercepts CR0 writes.
fn cr0_mask(c: &VmxCaps, ctl: u64) -> u64 {
    if ctl & ctrl::CR0_CR4_WRITE != 0 {
        return u64::MAX;
    }
    (c.cr0_fixed.0 & !(CR0_PE | CR0_PG)) | (!c.cr0_fixed.1 & 0xffff_ffff)
}

/// CR4 bits the guest cannot own (see [`cr0_mask`]), and PKE, which no guest may set
/// (`super::CR4_OK`): a guest write that sets it exits.
fn cr4_mask(c: &VmxCaps, ctl: u64) -> u64 {
    if ctl & ctrl::CR0_CR4_WRITE != 0 {
        return u64::MAX;
    }
    c.cr4_fixed.0 | (!c.cr4_fixed.1 & 0xffff_ffff) | CR4_PKE
}

/// The CR0 the hardware runs with for a guest-visible `v`.
fn real_cr0(c: &VmxCaps, v: u64) -> u64 {
    (v | (c.cr0_fixed.0 & !(CR0_PE | CR0_PG))) & c.cr0_fixed.1
}

/// The CR4 the hardware runs with for a guest-visible `v`.
fn real_cr4(c: &VmxCaps, v: u64) -> u64 {
    (v | c.cr4_fixed.0) & c.cr4_fixed.1
}

/// The VMX access-rights form of an ABI (SVM-format) attribute word: not present means
/// unusable.
fn ar_to_vmx(ar: u16) -> u64 {
    let a = u32::from(ar & 0xff) | (u32::from(ar & 0xf00) << 4);
    u64::from(if ar & 0x80 == 0 { a | AR_UNUSABLE } else { a })
}

/// The ABI form of VMX access rights (an unusable segment reads as not present).
fn ar_from_vmx(v: u64) -> u16 {
    let a = (v & 0xff) as u16 | ((v >> 4) & 0xf00) as u16;
    if v & u64::from(AR_UNUSABLE) != 0 {
        a & !0x80
    } else {
        a
    }
}

/// The per-segment VM-entry checks of segment `i` (SDM 26.3.1.2, unrestricted guest, not
/// virtual-8086 mode): types, S bit, presence, and limit against granularity. What
/// depends on other state (DPLs against CS and CR0.PE, IA-32e mode) is left to the
/// processor's checks, which report INVALID_STATE.
fn seg_vmx_ok(i: u64, s: &Segment) -> bool {
    let ar = s.ar;
    let present = ar & 0x80 != 0;
    let ty = ar & 0xf;
    let code_data = ar & 0x10 != 0;
    let g = ar & 0x800 != 0;
    let limit_ok = (s.limit & 0xfff == 0xfff || !g) && (s.limit >> 20 == 0 || g);
    match i {
        // TR: a busy 16- or 32/64-bit TSS.
        7 => present && !code_data && (ty == 3 || ty == 11) && limit_ok,
        // LDTR: unusable, or an LDT.
        6 => !present || (!code_data && ty == 2 && limit_ok),
        // CS: an accessed code segment (or a read/write data segment in real mode).
        1 => present && code_data && matches!(ty, 3 | 9 | 11 | 13 | 15) && limit_ok,
        // SS: unusable, or an accessed read/write data segment.
        2 => !present || (code_data && (ty == 3 || ty == 7) && limit_ok),
        // DS ES FS GS: unusable, or accessed, and readable if code.
        _ => !present || (code_data && ty & 1 != 0 && (ty & 8 == 0 || ty & 2 != 0) && limit_ok),
    }
}

/// Segment `i` (0 ES, 1 CS, 2 SS, 3 DS, 4 FS, 5 GS, 6 LDTR, 7 TR).
/// Guest segment register `i` (in VMX's ES, CS, SS, DS, FS, GS, LDTR, TR order): fields
/// of the basic VMCS layout, read without zeroing (an MMIO exit reads six segments).
fn seg(i: u64) -> Segment {
    Segment {
        sel: read_basic(f::GUEST_ES_SEL + 2 * i) as u16,
        ar: ar_from_vmx(read_basic(f::GUEST_ES_AR + 2 * i)),
        limit: read_basic(f::GUEST_ES_LIMIT + 2 * i) as u32,
        base: read_basic(f::GUEST_ES_BASE + 2 * i),
    }
}

fn set_seg(i: u64, s: &Segment) {
    write(f::GUEST_ES_SEL + 2 * i, u64::from(s.sel));
    write(f::GUEST_ES_AR + 2 * i, ar_to_vmx(s.ar));
    write(f::GUEST_ES_LIMIT + 2 * i, u64::from(s.limit));
    write(f::GUEST_ES_BASE + 2 * i, s.base);
}

/// Makes `v`'s VMCS current on this CPU, setting it up at its first use (inline: it
/// runs up to three times per exit; the set-up is out of line).
#[inline(always)]
fn load(v: &Vcpu, st: &mut State) {
    // SAFETY: the vCPU is bound to this CPU, which `create` checked runs VMX; the VMCS
    // region is the vCPU's own and is only ever made current here.
    if unsafe { vmx::load(v.vmcs) } {
        // Current already: it became so here, set up.
        return;
    }
    if !st.ready {
        st.ready = true;
        init_vmcs(v);
    }
}

/// Control and host state, and the architectural reset state of the guest.
#[cold]
#[inline(never)]
fn init_vmcs(v: &Vcpu) {
    let c = vmx::info();
    let cpu = crate::platform::percpu::cpu_id();
    let need = pin::EXT_INT_EXITING | pin::NMI_EXITING | pin::VIRTUAL_NMIS;
    write(f::PIN_CONTROLS, u64::from((need | c.pin.0) & c.pin.1));
    write(f::PROC_CONTROLS, u64::from(proc1_for(c, 0, 0)));
    write(f::PROC_CONTROLS2, u64::from(proc2_for(c, 0)));
    let exit = exitc::HOST_64
        | exitc::SAVE_EFER
        | exitc::LOAD_EFER
        | exitc::SAVE_PAT
        | exitc::LOAD_PAT
        | exitc::SAVE_DEBUG;
    write(f::EXIT_CONTROLS, u64::from((exit | c.exit.0) & c.exit.1));
    let entry = entryc::LOAD_EFER | entryc::LOAD_PAT | entryc::LOAD_DEBUG;
    write(
        f::ENTRY_CONTROLS,
        u64::from((entry | c.entry.0) & c.entry.1),
    );
    write(f::EXCEPTION_BITMAP, u64::from(super::FORCED_EXC));
    if v.vpid != 0 {
        write(f::VPID, u64::from(v.vpid));
    }
    write(f::EPT_POINTER, v.eptp);
    if v.vapic != 0 {
        write(f::VIRTUAL_APIC_PAGE, v.vapic);
        write(f::TPR_THRESHOLD, 0);
    }
    write(f::CR0_MASK, cr0_mask(c, 0));
    write(f::CR4_MASK, cr4_mask(c, 0));
    write(f::VMCS_LINK_POINTER, u64::MAX);

    use crate::arch::x86::gdt;
    // Rewritten before the first entry (`State::host_cr0` starts at 0, a value CR0
    // never has here).
    write(f::HOST_CR0, cr::read_cr0() & !cr::cr0::TS);
    write(f::HOST_CR3, cr::read_cr3());
    write(f::HOST_CR4, cr::read_cr4());
    write(f::HOST_CS_SEL, u64::from(gdt::KERNEL_CS));
    for s in [f::HOST_SS_SEL, f::HOST_DS_SEL, f::HOST_ES_SEL] {
        write(s, u64::from(gdt::KERNEL_DS));
    }
    write(f::HOST_FS_SEL, 0);
    write(f::HOST_GS_SEL, 0);
    write(f::HOST_TR_SEL, u64::from(gdt::TSS_SEL));
    // SAFETY: FS_BASE, GS_BASE, PAT and EFER exist on every x86_64 CPU.
    let (fs, gs, pat, efer) = unsafe {
        (
            rdmsr(Msr::FsBase),
            rdmsr(Msr::GsBase),
            rdmsr_raw(vmx::IA32_PAT),
            rdmsr(Msr::Efer),
        )
    };
    write(f::HOST_FS_BASE, fs);
    write(f::HOST_GS_BASE, gs);
    write(f::HOST_TR_BASE, gdt::tss_base(cpu));
    write(f::HOST_GDTR_BASE, gdt::gdt_base(cpu));
    write(f::HOST_IDTR_BASE, crate::arch::x86::idt::base());
    write(f::HOST_SYSENTER_CS, 0);
    write(f::HOST_SYSENTER_ESP, 0);
    write(f::HOST_SYSENTER_EIP, 0);
    write(f::HOST_PAT, pat);
    write(f::HOST_EFER, efer);
    write(f::HOST_RIP, vmx::exit_rip());

    // The architectural reset state.
    let data = Segment {
        sel: 0,
        ar: 0x93,
        limit: 0xffff,
        base: 0,
    };
    for i in [0, 2, 3, 4, 5] {
        set_seg(i, &data);
    }
    set_seg(
        1,
        &Segment {
            sel: 0xf000,
            ar: 0x9b,
            limit: 0xffff,
            base: 0xffff_0000,
        },
    );
    set_seg(6, &Segment { ar: 0x82, ..data });
    set_seg(7, &Segment { ar: 0x8b, ..data });
    write(f::GUEST_GDTR_BASE, 0);
    write(f::GUEST_GDTR_LIMIT, 0xffff);
    write(f::GUEST_IDTR_BASE, 0);
    write(f::GUEST_IDTR_LIMIT, 0xffff);
    let cr0 = 0x6000_0010;
    write(f::CR0_SHADOW, cr0);
    write(f::GUEST_CR0, real_cr0(c, cr0));
    write(f::CR4_SHADOW, 0);
    write(f::GUEST_CR4, real_cr4(c, 0));
    write(f::GUEST_CR3, 0);
    write(f::GUEST_EFER, 0);
    write(f::GUEST_DR7, 0x400);
    write(f::GUEST_DEBUGCTL, 0);
    write(f::GUEST_RFLAGS, 2);
    write(f::GUEST_RIP, 0xfff0);
    write(f::GUEST_RSP, 0);
    write(f::GUEST_PAT, 0x0007_0406_0007_0406);
    write(f::GUEST_INTERRUPTIBILITY, 0);
    write(f::GUEST_ACTIVITY, 0);
    write(f::GUEST_PENDING_DBG, 0);
    write(f::GUEST_SYSENTER_CS, 0);
    write(f::GUEST_SYSENTER_ESP, 0);
    write(f::GUEST_SYSENTER_EIP, 0);
    write(f::ENTRY_INTR_INFO, 0);
    write(f::TSC_OFFSET, 0);
}

/// Derives EFER.LMA and the IA-32e-mode-guest entry control from EFER.LME and CR0.PG,
/// and gives an injected hardware exception the error code VMX demands (exactly for
/// vectors 8, 10–14 and 17 in protected mode).
fn prepare_entry(st: &mut State) {
    let cr0 = read(f::GUEST_CR0);
    let efer = read(f::GUEST_EFER);
    // STAR, LSTAR, CSTAR and FMASK serve only SYSCALL/SYSRET, which need EFER.SCE;
    // KERNEL_GS_BASE serves only SWAPGS, which needs 64-bit mode, possible only with
    // EFER.LME. LME may turn into LMA without an exit (a CR0 write), LME and SCE not.
    st.swap_sce = efer & EFER_SCE != 0;
    st.swap_kgs = efer & EFER_LME != 0;
    let lma = efer & EFER_LME != 0 && cr0 & CR0_PG != 0;
    write(
        f::GUEST_EFER,
        if lma {
            efer | EFER_LMA
        } else {
            efer & !EFER_LMA
        },
    );
    let e = read(f::ENTRY_CONTROLS) as u32;
    let e2 = if lma {
        e | entryc::IA32E_GUEST
    } else {
        e & !entryc::IA32E_GUEST
    };
    if e2 != e {
        write(f::ENTRY_CONTROLS, u64::from(e2));
    }
    let info = read_basic(f::ENTRY_INTR_INFO);
    if info & inj::VALID != 0 && (info >> 8) & 7 == 3 {
        let vec = info & 0xff;
        let err = cr0 & CR0_PE != 0 && matches!(vec, 8 | 10..=14 | 17);
        let want = if err {
            info | inj::ERROR_VALID
        } else {
            info & !inj::ERROR_VALID
        };
        if want != info {
            write(f::ENTRY_INTR_INFO, want);
        }
    }
}

/// Per CPU: the host's STAR, LSTAR, CSTAR and FMASK (the same on every CPU).
fn host_syscall_msrs() -> [u64; 4] {
    // SAFETY: the SYSCALL MSRs exist on every x86_64 CPU.
    unsafe {
        [
            rdmsr(Msr::Star),
            rdmsr(Msr::Lstar),
            rdmsr(Msr::Cstar),
            rdmsr(Msr::Fmask),
        ]
    }
}

const SYSCALL_MSRS: [Msr; 4] = [Msr::Star, Msr::Lstar, Msr::Cstar, Msr::Fmask];

/// Enters the guest of VMX vCPU `v` (current on this CPU, FPU loaded) until an exit.
pub(super) fn run(ec: &Ec, v: &Vcpu, st: &mut State, c: &mut Common) -> Next {
    reap();
    load(v, st);
    if c.check {
        // VM exits keep EFER.LMA and the IA-32e-mode-guest control in step with the
        // guest, and re-inject only what the processor reported: only the VMM's writes
        // need deriving again.
        prepare_entry(st);
        c.check = false;
    }
    let fg = super::flush_gen(ec);
    if fg != c.flush_seen || !st.flushed {
        // The VM lost mappings since this vCPU's last entry (or this is its first entry:
        // the EPTP or VPID may have served an earlier vCPU on this CPU).
        vmx::invept(v.eptp);
        if v.vpid != 0 && !st.flushed {
            vmx::invvpid(v.vpid);
        }
        c.flush_seen = fg;
        st.flushed = true;
    }
    let cr3 = cr::read_cr3();
    if cr3 != st.host_cr3 {
        write(f::HOST_CR3, cr3);
        st.host_cr3 = cr3;
    }
    // The exit restores CR0 from HOST_CR0: with TS as now (a VMM of this guest runs on
    // its registers with TS set; see `fpu::load_for_guest`).
    let cr0 = cr::read_cr0();
    if cr0 != st.host_cr0 {
        write(f::HOST_CR0, cr0);
        st.host_cr0 = cr0;
    }
    if trace() {
        crate::kprintln!(
            "vmentry rip {:#x} rfl {:#x} cr0 {:#x}/{:#x} cr3 {:#x} cr4 {:#x}/{:#x} efer {:#x} cs {:x?} ss {:x?} inj {:#x} intr {:#x} actv {} proc {:#x} exc {:#x} xcr0 {:#x}",
            read_basic(f::GUEST_RIP),
            read_basic(f::GUEST_RFLAGS),
            read(f::GUEST_CR0),
            read(f::CR0_SHADOW),
            read(f::GUEST_CR3),
            read(f::GUEST_CR4),
            read(f::CR4_SHADOW),
            read(f::GUEST_EFER),
            seg(1),
            seg(2),
            read_basic(f::ENTRY_INTR_INFO),
            read_basic(f::GUEST_INTERRUPTIBILITY),
            read_basic(f::GUEST_ACTIVITY),
            read_basic(f::PROC_CONTROLS),
            read(f::EXCEPTION_BITMAP),
            c.xcr0
        );
    }
    let (swap_sce, swap_kgs) = (st.swap_sce, st.swap_kgs);
    let mut host_msrs = [0u64; 4];
    if swap_sce {
        host_msrs = host_syscall_msrs();
        for (m, val) in SYSCALL_MSRS.iter().zip(st.msr) {
            // SAFETY: the guest's values (canonical where it matters, checked by
            // `put_state`) take effect only in the guest: the kernel makes no system
            // call and the host's values are back before anything returns to user mode.
            unsafe { wrmsr(*m, val) };
        }
    }
    // The host's KERNEL_GS_BASE here is user mode's GS base, `percpu::USER_GS_BASE`:
    // a guest with the same value needs no write.
    if swap_kgs && st.msr[4] != crate::platform::percpu::USER_GS_BASE {
        // SAFETY: KERNEL_GS_BASE exists on every x86_64 CPU; the guest's value (checked
        // canonical by `put_state`) is used only by the guest's SWAPGS: the kernel
        // executes none before it restores the host's value.
        unsafe { wrmsr(Msr::KernelGsBase, st.msr[4]) };
    }
    let host_xcr0 = super::enter_xcr0(c.xcr0);
    c.dr.enter(true);
    // SAFETY: CR2 is the guest's while it runs; the kernel reads CR2 only in its
    // page-fault handler, for faults it takes itself (none between here and the exit).
    unsafe { cr::write_cr2(st.cr2) };
    crate::arch::x86::spec::vm_entry(ec.pd.id);
    // SAFETY: the VMCS was set up by `init_vmcs` for this CPU (host state, mandatory
    // exiting controls, the VM's EPT) and changed only through `put_state`'s checks and
    // `prepare_entry`; VMX is on here; interrupts are off.
    let mut res = unsafe { vmx::enter(&mut st.gprs, st.launched) };
    if res == Entry::FailValid && matches!(read(f::VM_INSTRUCTION_ERROR), 4 | 5) {
        // VMLAUNCH of a launched VMCS or VMRESUME of a clear one: the other one.
        st.launched = !st.launched;
        // SAFETY: as above.
        res = unsafe { vmx::enter(&mut st.gprs, st.launched) };
    }
    st.cr2 = cr::read_cr2();
    if c.dr.live() {
        // The guest ran with its debug registers and no MOV-DR exiting.
        c.dr.save(true, read(f::GUEST_DR7));
        write(
            f::PROC_CONTROLS,
            read_basic(f::PROC_CONTROLS) | u64::from(proc1::MOV_DR),
        );
    }
    super::leave_xcr0(host_xcr0);
    if swap_sce {
        for (m, val) in SYSCALL_MSRS.iter().zip(host_msrs) {
            // SAFETY: restores the host's own values.
            unsafe { wrmsr(*m, val) };
        }
    }
    if swap_kgs {
        // SAFETY: KERNEL_GS_BASE exists; the guest may have changed it with SWAPGS; the
        // host's own value goes back unless it is there.
        unsafe {
            st.msr[4] = rdmsr(Msr::KernelGsBase);
            if st.msr[4] != crate::platform::percpu::USER_GS_BASE {
                wrmsr(Msr::KernelGsBase, crate::platform::percpu::USER_GS_BASE);
            }
        }
    }
    // The exit left the GDTR and IDTR limits at 0xffff and TR's at 0x67.
    crate::arch::x86::gdt::restore_after_vm_exit();
    match res {
        Entry::Exited => handle_exit(st, c),
        Entry::FailValid | Entry::FailInvalid => {
            let err = if res == Entry::FailValid {
                read(f::VM_INSTRUCTION_ERROR)
            } else {
                0
            };
            if trace() {
                crate::kprintln!("vm entry failed: VM-instruction error {}", err);
            }
            c.qual = [0xffff_ffff, err];
            c.inst_len = 0;
            Next::Event(Ev::InvalidState)
        }
    }
}

/// Exits that report an instruction length.
fn has_len(reason: u32) -> bool {
    matches!(reason, 10..=32 | 36 | 39 | 40 | 46 | 47 | 50 | 51 | 53..=55 | 57..=59 | 61)
}

fn clear_proc1(bit: u32) {
    write(
        f::PROC_CONTROLS,
        read_basic(f::PROC_CONTROLS) & !u64::from(bit),
    );
}

fn handle_exit(st: &mut State, c: &mut Common) -> Next {
    let full = read_basic(f::EXIT_REASON) as u32;
    let reason = full & 0xffff;
    let q = read_basic(f::EXIT_QUALIFICATION);
    if trace() {
        crate::kprintln!(
            "vm exit {:#x} qual {:#x} rip {:#x} len {} intinfo {:#x} idt {:#x} gpa {:#x}",
            full,
            q,
            read_basic(f::GUEST_RIP),
            read_basic(f::EXIT_INSTRUCTION_LEN),
            read_basic(f::EXIT_INTR_INFO),
            read_basic(f::IDT_VECTORING_INFO),
            read_basic(f::GUEST_PHYSICAL_ADDRESS)
        );
    }
    if full & r::ENTRY_FAILURE != 0 {
        c.qual = [u64::from(full), q];
        c.inst_len = 0;
        return Next::Event(Ev::InvalidState);
    }
    st.launched = true;
    // An event whose delivery the exit interrupted is delivered on the next entry
    // (unless the VMM replaces it).
    let idt = read_basic(f::IDT_VECTORING_INFO);
    if idt & inj::VALID != 0 {
        write(f::ENTRY_INTR_INFO, idt & 0x8000_0fff);
        if idt & inj::ERROR_VALID != 0 {
            write(f::ENTRY_EXCEPTION_ERROR, read(f::IDT_VECTORING_ERROR));
        }
        if matches!((idt >> 8) & 7, 4..=6) {
            write(
                f::ENTRY_INSTRUCTION_LEN,
                read_basic(f::EXIT_INSTRUCTION_LEN),
            );
        }
    }
    c.qual = [q, 0];
    c.inst_len = if has_len(reason) {
        read_basic(f::EXIT_INSTRUCTION_LEN)
    } else {
        0
    };
    let nr = match reason {
        r::EXT_INT | r::IO_SMI | r::OTHER_SMI => return Next::Interrupt,
        r::EXCEPTION_NMI => {
            let info = read_basic(f::EXIT_INTR_INFO);
            if (info >> 8) & 7 == 2 {
                // A host NMI (NMI exiting): the kernel uses none; it is consumed here.
                return Next::Interrupt;
            }
            if info & (1 << 12) != 0 && idt & inj::VALID == 0 {
                // NMI unblocking by IRET before the fault: blocked again.
                write(
                    f::GUEST_INTERRUPTIBILITY,
                    read_basic(f::GUEST_INTERRUPTIBILITY) | BLOCK_NMI,
                );
            }
            let (vector, ty) = (info & 0xff, (info >> 8) & 7);
            if vector == 18 && ty == 3 {
                return super::machine_check();
            }
            if vector == 1 && ty == 3 {
                debug_exit(c, q);
            }
            let err = if info & inj::ERROR_VALID != 0 {
                read(f::EXIT_INTR_ERROR) & 0xffff_ffff
            } else {
                0
            };
            c.qual = [(info & 0x8000_0fff) | (err << 32), q];
            if matches!((info >> 8) & 7, 5 | 6) {
                c.inst_len = read_basic(f::EXIT_INSTRUCTION_LEN);
            }
            Ev::Exception
        }
        r::INTR_WINDOW => {
            clear_proc1(proc1::INTR_WINDOW);
            Ev::IntrWindow
        }
        r::NMI_WINDOW => {
            clear_proc1(proc1::NMI_WINDOW);
            Ev::NmiWindow
        }
        r::DR_ACCESS => {
            // The kernel's (`super::Dr`): the MOV DR runs again without exiting.
            c.dr.accessed();
            clear_proc1(proc1::MOV_DR);
            return Next::Interrupt;
        }
        // The event numbers of these are their basic exit reasons.
        r::TRIPLE_FAULT => Ev::TripleFault,
        r::INIT => Ev::Init,
        r::SIPI => Ev::Sipi,
        r::TASK_SWITCH => Ev::TaskSwitch,
        r::CPUID => Ev::Cpuid,
        r::HLT => Ev::Hlt,
        r::INVD => Ev::Invd,
        r::INVLPG => Ev::Invlpg,
        r::RDTSC => Ev::Rdtsc,
        r::VMCALL => Ev::Vmcall,
        r::CR_ACCESS => Ev::CrAccess,
        r::RDMSR => Ev::Rdmsr,
        r::WRMSR => Ev::Wrmsr,
        r::MWAIT => Ev::Mwait,
        r::MONITOR => Ev::Monitor,
        r::PAUSE => Ev::Pause,
        r::RDTSCP => Ev::Rdtscp,
        r::WBINVD => Ev::Wbinvd,
        r::XSETBV => Ev::Xsetbv,
        r::IO => {
            // Size − 1, in, string, rep, port (the operand-encoding bit is left out).
            c.qual = [q & 0xffff_003f, read_basic(f::EXIT_INSTRUCTION_INFO)];
            // Qualification bit 4: INS/OUTS.
            if q & (1 << 4) != 0 {
                Ev::IoString
            } else {
                Ev::Io
            }
        }
        r::EPT_VIOLATION => {
            if q & (1 << 12) != 0 && idt & inj::VALID == 0 {
                write(
                    f::GUEST_INTERRUPTIBILITY,
                    read_basic(f::GUEST_INTERRUPTIBILITY) | BLOCK_NMI,
                );
            }
            // The NPT error-code form: present, write, fetch, final / table walk.
            let present = u64::from(q & 0x38 != 0);
            let walk = q & (1 << 7) != 0 && q & (1 << 8) == 0;
            c.qual = [
                present | (q & 2) | ((q & 4) << 2) | if walk { 1 << 33 } else { 1 << 32 },
                read_basic(f::GUEST_PHYSICAL_ADDRESS),
            ];
            Ev::NptFault
        }
        r::EPT_MISCONFIG => {
            c.qual = [
                1 | (1 << 3) | (1 << 32),
                read_basic(f::GUEST_PHYSICAL_ADDRESS),
            ];
            Ev::NptFault
        }
        _ => {
            c.qual = [u64::from(full), q];
            Ev::Other
        }
    };
    Next::Event(nr)
}

/// A #DB of the guest caused this exit (the kernel intercepts #DB always): makes the
/// guest's debug state what delivering it would have made it, as SVM does before its
/// intercept, so that the VMM reflects it by injecting vector 1. A VM exit leaves DR6
/// and DR7 as they were (SDM vol. 3C 28.1): DR6 takes the exit qualification's
/// conditions (`q`: B0–B3, BD, BS, RTM), a general-detect #DB clears DR7.GD; and
/// single-stepping in an STI or MOV-SS shadow keeps its pending single step (the BS bit
/// of the pending debug exceptions, which VM entry checks against TF and the shadow).
fn debug_exit(c: &mut Common, q: u64) {
    use crate::arch::x86::dr;
    // The guest's DR6 is the kernel's copy here (saved at this exit if it was live).
    c.dr.dr6 = dr::dr6_after(c.dr.dr6, q) & 0xffff_ffff;
    if q & dr::DR6_BD != 0 {
        write(f::GUEST_DR7, read(f::GUEST_DR7) & !dr::DR7_GD);
    }
    if read_basic(f::GUEST_RFLAGS) & RFLAGS_TF != 0
        && read_basic(f::GUEST_INTERRUPTIBILITY) & BLOCK_STI_MOVSS != 0
    {
        write(
            f::GUEST_PENDING_DBG,
            read(f::GUEST_PENDING_DBG) | dr::DR6_BS,
        );
    }
}

/// Writes the state `mtd` selects from VMX vCPU `v` into a handler's UTCB.
#[inline(always)]
pub(super) fn get_state(v: &Vcpu, st: &mut State, c: &Common, mtd: Mtd, a: &mut ArchState) {
    load(v, st);
    let g = &st.gprs.0;
    if mtd.contains(Mtd::GPR_ACDB) {
        a.gpr[0..4].copy_from_slice(&g[0..4]);
    }
    if mtd.contains(Mtd::GPR_BSD) {
        a.gpr[5..8].copy_from_slice(&g[5..8]);
    }
    if mtd.contains(Mtd::RSP) {
        a.gpr[4] = read_basic(f::GUEST_RSP);
    }
    if mtd.contains(Mtd::GPR_R8_R15) {
        a.gpr[8..16].copy_from_slice(&g[8..16]);
    }
    if mtd.contains(Mtd::RIP_LEN) {
        a.rip = read_basic(f::GUEST_RIP);
    }
    if mtd.contains(Mtd::RFLAGS) {
        a.rflags = read_basic(f::GUEST_RFLAGS);
    }
    if mtd.contains(Mtd::INJ) {
        let e = read_basic(f::ENTRY_INTR_INFO);
        let mut i = if e & inj::VALID != 0 {
            e & 0x8000_0fff
        } else {
            0
        };
        let p = read_basic(f::PROC_CONTROLS) as u32;
        if p & proc1::INTR_WINDOW != 0 {
            i |= inj::REQ_INTR_WINDOW;
        }
        if p & proc1::NMI_WINDOW != 0 {
            i |= inj::REQ_NMI_WINDOW;
        }
        a.inj_info = i;
        a.inj_error = read_basic(f::ENTRY_EXCEPTION_ERROR);
    }
    if mtd.contains(Mtd::STA) {
        a.intr_state = read_basic(f::GUEST_INTERRUPTIBILITY) as u32;
        a.actv_state = read_basic(f::GUEST_ACTIVITY) as u32;
    }
    if mtd.intersects(RARE) {
        get_rare(v, st, c, mtd, a);
    }
}

/// [`get_state`] for the groups in `RARE` (segments, descriptor tables, control and
/// debug registers, MSRs).
#[inline(never)]
fn get_rare(v: &Vcpu, st: &State, c: &Common, mtd: Mtd, a: &mut ArchState) {
    let segs: [(Mtd, u64, &mut Segment); 8] = [
        (Mtd::DS_ES, 3, &mut a.ds),
        (Mtd::DS_ES, 0, &mut a.es),
        (Mtd::FS_GS, 4, &mut a.fs),
        (Mtd::FS_GS, 5, &mut a.gs),
        (Mtd::CS_SS, 1, &mut a.cs),
        (Mtd::CS_SS, 2, &mut a.ss),
        (Mtd::TR, 7, &mut a.tr),
        (Mtd::LDTR, 6, &mut a.ldtr),
    ];
    for (m, i, s) in segs {
        if mtd.contains(m) {
            *s = seg(i);
        }
    }
    if mtd.contains(Mtd::GDTR) {
        a.gdtr = Segment {
            sel: 0,
            ar: 0,
            limit: read(f::GUEST_GDTR_LIMIT) as u32,
            base: read(f::GUEST_GDTR_BASE),
        };
    }
    if mtd.contains(Mtd::IDTR) {
        a.idtr = Segment {
            sel: 0,
            ar: 0,
            limit: read(f::GUEST_IDTR_LIMIT) as u32,
            base: read(f::GUEST_IDTR_BASE),
        };
    }
    if mtd.contains(Mtd::CR) {
        // Basic-layout fields: read without zeroing.
        let m0 = read_basic(f::CR0_MASK);
        let m4 = read_basic(f::CR4_MASK);
        a.cr0 = (read_basic(f::GUEST_CR0) & !m0) | (read_basic(f::CR0_SHADOW) & m0);
        a.cr4 = (read_basic(f::GUEST_CR4) & !m4) | (read_basic(f::CR4_SHADOW) & m4);
        a.cr2 = st.cr2;
        a.cr3 = read_basic(f::GUEST_CR3);
        a.cr8 = if v.vapic != 0 {
            // SAFETY: the virtual-APIC page is the vCPU's own, mapped in the physmap.
            let t =
                unsafe { crate::mem::phys_to_ptr::<u32>(v.vapic + VTPR as u64).read_volatile() };
            u64::from(t >> 4) & 0xf
        } else {
            st.cr8
        };
    }
    if mtd.contains(Mtd::DR) {
        a.dr6 = c.dr.dr6;
        a.dr7 = read(f::GUEST_DR7);
    }
    if mtd.contains(Mtd::SYSENTER) {
        a.sysenter_cs = read(f::GUEST_SYSENTER_CS);
        a.sysenter_esp = read(f::GUEST_SYSENTER_ESP);
        a.sysenter_eip = read(f::GUEST_SYSENTER_EIP);
    }
    if mtd.contains(Mtd::TSC) {
        a.tsc_off = read(f::TSC_OFFSET);
        a.tsc_val = crate::arch::rdtsc().wrapping_add(a.tsc_off);
    }
    if mtd.contains(Mtd::EFER) {
        a.efer = read(f::GUEST_EFER);
    }
    if mtd.contains(Mtd::PDPTE) {
        for (i, p) in a.pdpte.iter_mut().enumerate() {
            *p = read(f::GUEST_PDPTE0 + 2 * i as u64);
        }
    }
    if mtd.contains(Mtd::SYSCALL_SWAPGS) {
        a.star = st.msr[0];
        a.lstar = st.msr[1];
        a.cstar = st.msr[2];
        a.fmask = st.msr[3];
        a.kernel_gs_base = st.msr[4];
    }
    if mtd.contains(Mtd::PAT) {
        a.pat = read(f::GUEST_PAT);
    }
}

/// Applies `ctrl` (validated) to the execution controls, keeping the window requests.
fn apply_ctrl(c: &VmxCaps, ctl: [u64; 2]) {
    let win = read_basic(f::PROC_CONTROLS) as u32 & (proc1::INTR_WINDOW | proc1::NMI_WINDOW);
    write(f::PROC_CONTROLS, u64::from(proc1_for(c, ctl[0], win)));
    write(f::PROC_CONTROLS2, u64::from(proc2_for(c, ctl[0])));
    write(
        f::EXCEPTION_BITMAP,
        (ctl[1] & 0xffff_ffff) | u64::from(super::FORCED_EXC),
    );
    // Keep what the guest sees of CR0/CR4 across a mask change.
    let (m0, m4) = (read(f::CR0_MASK), read(f::CR4_MASK));
    let cr0 = (read(f::GUEST_CR0) & !m0) | (read(f::CR0_SHADOW) & m0);
    let cr4 = (read(f::GUEST_CR4) & !m4) | (read(f::CR4_SHADOW) & m4);
    write(f::CR0_MASK, cr0_mask(c, ctl[0]));
    write(f::CR4_MASK, cr4_mask(c, ctl[0]));
    write(f::CR0_SHADOW, cr0);
    write(f::CR4_SHADOW, cr4);
}

/// Takes back the state a VMM's reply selects into VMX vCPU `v`, validating every value;
/// false if something was refused.
/// Takes back the groups of `mtd` within `super::SIMPLE` (GPRs, RIP, RFLAGS) from `a`,
/// reading each value once (so `a` may be the VMM's UTCB itself); false if one was
/// refused (a non-canonical RIP, not written). Makes the VMCS current first.
#[inline(always)]
pub(super) fn put_simple(v: &Vcpu, st: &mut State, a: &ArchState, mtd: Mtd) -> bool {
    load(v, st);
    if mtd.contains(Mtd::GPR_ACDB) {
        st.gprs.0[0..4].copy_from_slice(&a.gpr[0..4]);
    }
    if mtd.contains(Mtd::GPR_BSD) {
        st.gprs.0[5..8].copy_from_slice(&a.gpr[5..8]);
    }
    if mtd.contains(Mtd::RSP) {
        write(f::GUEST_RSP, a.gpr[4]);
    }
    if mtd.contains(Mtd::GPR_R8_R15) {
        st.gprs.0[8..16].copy_from_slice(&a.gpr[8..16]);
    }
    if mtd.contains(Mtd::RFLAGS) {
        write(f::GUEST_RFLAGS, (a.rflags & RFLAGS_OK) | 2);
    }
    if mtd.contains(Mtd::RIP_LEN) {
        let rip = a.rip;
        if !canonical(rip) {
            return false;
        }
        write(f::GUEST_RIP, rip);
    }
    true
}

pub(super) fn put_state(v: &Vcpu, st: &mut State, c: &mut Common, a: &ArchState) -> bool {
    let mtd = a.mtd;
    let mut bad = !put_simple(v, st, a, mtd);
    let caps = vmx::info();
    let mut take = |ok: bool, w: &mut dyn FnMut()| {
        if ok {
            w()
        } else {
            bad = true
        }
    };
    if mtd.contains(Mtd::INJ) {
        let windows = inj::REQ_INTR_WINDOW | inj::REQ_NMI_WINDOW;
        let req = a.inj_info & !windows;
        match injection(req) {
            Some(_) if req & inj::VALID == 0 => write(f::ENTRY_INTR_INFO, 0),
            Some((vector, ty, ev)) => {
                // Software exceptions go in as hardware exceptions and software
                // interrupts with length 0 (the VMM has moved RIP past the instruction,
                // as on SVM); without zero-length injection, as external interrupts.
                let ty = match ty {
                    5 | 6 => 3,
                    4 if !caps.zero_len_inject() => 0,
                    t => t,
                };
                write(
                    f::ENTRY_INTR_INFO,
                    vector | (ty << 8) | if ev { inj::ERROR_VALID } else { 0 } | inj::VALID,
                );
                write(f::ENTRY_EXCEPTION_ERROR, a.inj_error & 0xffff_ffff);
                write(f::ENTRY_INSTRUCTION_LEN, 0);
            }
            None => take(false, &mut || {}),
        }
        if injection(req).is_some() {
            let mut p =
                read_basic(f::PROC_CONTROLS) as u32 & !(proc1::INTR_WINDOW | proc1::NMI_WINDOW);
            if a.inj_info & inj::REQ_INTR_WINDOW != 0 {
                p |= proc1::INTR_WINDOW;
            }
            if a.inj_info & inj::REQ_NMI_WINDOW != 0 {
                p |= proc1::NMI_WINDOW;
            }
            write(f::PROC_CONTROLS, u64::from(p));
        }
    }
    if mtd.contains(Mtd::STA) {
        let actv_ok = match a.actv_state {
            0 => true,
            1 => caps.hlt_state(),
            3 => caps.misc & (1 << 8) != 0,
            _ => false,
        };
        take(actv_ok, &mut || {
            write(f::GUEST_INTERRUPTIBILITY, u64::from(a.intr_state & 0xb));
            write(f::GUEST_ACTIVITY, u64::from(a.actv_state));
        });
    }
    if !mtd.intersects(RARE) {
        return !bad;
    }
    let segs: [(Mtd, u64, &Segment); 8] = [
        (Mtd::DS_ES, 3, &a.ds),
        (Mtd::DS_ES, 0, &a.es),
        (Mtd::FS_GS, 4, &a.fs),
        (Mtd::FS_GS, 5, &a.gs),
        (Mtd::CS_SS, 1, &a.cs),
        (Mtd::CS_SS, 2, &a.ss),
        (Mtd::TR, 7, &a.tr),
        (Mtd::LDTR, 6, &a.ldtr),
    ];
    for (m, i, s) in segs {
        if mtd.contains(m) {
            take(seg_ok(s) && seg_vmx_ok(i, s), &mut || set_seg(i, s));
        }
    }
    for (m, s, lim, base) in [
        (Mtd::GDTR, &a.gdtr, f::GUEST_GDTR_LIMIT, f::GUEST_GDTR_BASE),
        (Mtd::IDTR, &a.idtr, f::GUEST_IDTR_LIMIT, f::GUEST_IDTR_BASE),
    ] {
        if mtd.contains(m) {
            take(canonical(s.base) && s.limit <= 0xffff, &mut || {
                write(lim, u64::from(s.limit));
                write(base, s.base);
            });
        }
    }
    if mtd.contains(Mtd::CR) {
        let cr0_ok = a.cr0 >> 32 == 0
            && !(a.cr0 & CR0_NW != 0 && a.cr0 & CR0_CD == 0)
            && !(a.cr0 & CR0_PG != 0 && a.cr0 & CR0_PE == 0)
            && real_cr0(caps, a.cr0) & (CR0_PE | CR0_PG) == a.cr0 & (CR0_PE | CR0_PG);
        take(cr0_ok, &mut || {
            write(f::CR0_SHADOW, a.cr0);
            write(f::GUEST_CR0, real_cr0(caps, a.cr0));
        });
        take(a.cr3 >> 52 == 0, &mut || write(f::GUEST_CR3, a.cr3));
        let cr4_ok = a.cr4 & !CR4_OK == 0 && (a.cr4 | caps.cr4_fixed.0) & !caps.cr4_fixed.1 == 0;
        take(cr4_ok, &mut || {
            write(f::CR4_SHADOW, a.cr4);
            write(f::GUEST_CR4, real_cr4(caps, a.cr4));
        });
        st.cr2 = a.cr2;
        take(a.cr8 <= 0xf, &mut || {
            if v.vapic != 0 {
                // SAFETY: the virtual-APIC page is the vCPU's own, mapped in the physmap.
                unsafe {
                    crate::mem::phys_to_ptr::<u32>(v.vapic + VTPR as u64)
                        .write_volatile((a.cr8 as u32) << 4)
                };
            } else {
                st.cr8 = a.cr8;
            }
        });
    }
    if mtd.contains(Mtd::DR) {
        take(a.dr7 >> 32 == 0 && a.dr6 >> 32 == 0, &mut || {
            write(f::GUEST_DR7, a.dr7);
            c.dr.dr6 = a.dr6;
            c.dr.set_dr7(a.dr7);
        });
    }
    if mtd.contains(Mtd::SYSENTER) {
        take(
            a.sysenter_cs >> 32 == 0 && canonical(a.sysenter_esp) && canonical(a.sysenter_eip),
            &mut || {
                write(f::GUEST_SYSENTER_CS, a.sysenter_cs);
                write(f::GUEST_SYSENTER_ESP, a.sysenter_esp);
                write(f::GUEST_SYSENTER_EIP, a.sysenter_eip);
            },
        );
    }
    if mtd.contains(Mtd::SYSCALL_SWAPGS) {
        take(
            canonical(a.lstar)
                && canonical(a.cstar)
                && canonical(a.kernel_gs_base)
                && a.fmask >> 32 == 0,
            &mut || st.msr = [a.star, a.lstar, a.cstar, a.fmask, a.kernel_gs_base],
        );
    }
    if mtd.contains(Mtd::CTRL) {
        take(
            a.ctrl[0] & !ctrl::ALL == 0 && a.ctrl[1] >> 32 == 0,
            &mut || {
                c.ctrl = a.ctrl;
                apply_ctrl(caps, a.ctrl);
            },
        );
    }
    if mtd.contains(Mtd::TSC) {
        write(f::TSC_OFFSET, a.tsc_off);
    }
    if mtd.contains(Mtd::EFER) {
        take(a.efer & !EFER_OK == 0, &mut || write(f::GUEST_EFER, a.efer));
    }
    if mtd.contains(Mtd::PDPTE) {
        for (i, p) in a.pdpte.iter().enumerate() {
            write(f::GUEST_PDPTE0 + 2 * i as u64, *p);
        }
    }
    if mtd.contains(Mtd::PAT) {
        take(pat_ok(a.pat), &mut || write(f::GUEST_PAT, a.pat));
    }
    !bad
}
