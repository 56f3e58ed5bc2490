//! The SVM backend: a VMCB per vCPU, nested paging, ASIDs (see `crate::vcpu`).
//!
//! The VMCB holds the guest state the VMM reads and writes (DR6 and DR7 included; DR0–DR3
//! are switched lazily, see `super::Dr`); an ASID of this CPU is re-allocated with a full
//! flush when QEMU's 16 run out. #VMEXIT restores the host's GDTR and IDTR whole (from
//! the host save area), unlike a VT-x exit. Without NRIP save (QEMU) the
//! instruction length is 0 except for I/O exits; with it (Bochs `trinity_apu`) it is
//! nRIP − RIP.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU8, Ordering};

use peregrine_abi::event::VcpuEvent as Ev;
use peregrine_abi::utcb::{ctrl, inj, ArchState, Segment};
use peregrine_abi::{Mtd, Status};

use super::{canonical, pat_ok, seg_ok, trace, Common, Next, RARE};
use super::{CR0_CD, CR0_NW, CR0_PE, CR0_PG, CR4_OK, EFER_LMA, EFER_LME, RFLAGS_OK};
use crate::arch::x86::svm::vmcb::{self as f, exit, i3, i4, Vmcb};
use crate::arch::x86::svm::{self, Gprs};
use crate::ec::Ec;
use crate::pd::Pd;
use crate::space_guest::SpaceGuest;

/// Intercepts every vCPU has (vector 3).
const BASE3: u32 = i3::INTR
    | i3::NMI
    | i3::INIT
    | i3::CPUID
    | i3::INVD
    | i3::HLT
    | i3::INVLPGA
    | i3::IOIO
    | i3::MSR
    | i3::TASK_SWITCH
    | i3::SHUTDOWN;
/// Intercepts every vCPU has (vector 4).
const BASE4: u32 = i4::VMRUN
    | i4::VMMCALL
    | i4::VMLOAD
    | i4::VMSAVE
    | i4::STGI
    | i4::CLGI
    | i4::SKINIT
    | i4::XSETBV;

/// Reads and writes of DR0–DR7 (the kernel's lazy debug-register switch: `super::Dr`).
const DR_ALL: u32 = 0x00ff_00ff;
/// CR intercepts: CR4 writes.
const CR4_WRITE: u32 = 1 << 20;

/// Whether the CPU has protection keys (CPUID 7.0:ECX.PKU): 0 unknown, 1 no, 2 yes.
static PKU: AtomicU8 = AtomicU8::new(0);

/// CR intercepts every vCPU has: CR4 writes where the CPU has protection keys, so that
/// no guest sets CR4.PKE behind the kernel (SVM has no CR4 guest/host mask; the kernel
/// refuses PKE: `super::CR4_OK`).
fn base_cr() -> u32 {
    let mut p = PKU.load(Ordering::Relaxed);
    if p == 0 {
        p = if core::arch::x86_64::__cpuid_count(7, 0).ecx & (1 << 3) != 0 {
            2
        } else {
            1
        };
        PKU.store(p, Ordering::Relaxed);
    }
    if p == 2 {
        CR4_WRITE
    } else {
        0
    }
}

const EFER_SVME: u64 = 1 << 12;
/// SCE LME LMA NXE SVME LMSLE FFXSR TCE.
const EFER_OK: u64 = 0xfd01;
const CR4_PAE: u64 = 1 << 5;
const RFLAGS_VM: u64 = 1 << 17;
const AR_L: u16 = 1 << 9;
const AR_D: u16 = 1 << 10;
/// V_IRQ | V_INTR_PRIO 15 | V_IGN_TPR.
const VINTR_REQ: u64 = (1 << 8) | (0xf << 16) | (1 << 20);
const V_INTR_MASKING: u64 = 1 << 24;

/// The SVM state of a vCPU beyond its EC, touched only by its CPU with interrupts off.
pub(super) struct State {
    gprs: Gprs,
    asid: u32,
    asid_gen: u64,
}

/// The SVM part of a vCPU.
pub struct Vcpu {
    /// Physical address of the VMCB (a page charged to the VM PD).
    vmcb: u64,
    st: UnsafeCell<State>,
}

impl Vcpu {
    /// The cell of the CPU-local state (borrowed through the token: `vcpu::Vcpu::parts`).
    pub(super) fn state_ptr(&self) -> *mut State {
        self.st.get()
    }
}

/// Frees the VMCB (the vCPU is gone).
pub fn release(pd: &Pd, v: &Vcpu) {
    crate::kmem::free_frame(pd, v.vmcb);
}

/// Enables SVM on this CPU at bring-up.
pub fn init_cpu(cpu: usize) {
    if svm::init_cpu(cpu) && cpu == 0 {
        let c = svm::info();
        crate::kprintln!(
            "svm: {} ASIDs, NRIP save {}, flush by ASID {}, decode assists {}",
            c.asids,
            c.nrips,
            c.flush_by_asid,
            c.decode_assists
        );
    }
}

fn init_vmcb(v: Vmcb, ncr3: u64) {
    v.w32(f::INTERCEPT_CR, base_cr());
    v.w32(f::INTERCEPT_DR, DR_ALL);
    v.w32(f::INTERCEPT_EXC, super::FORCED_EXC);
    v.w32(f::INTERCEPT_3, BASE3);
    v.w32(f::INTERCEPT_4, BASE4);
    v.w64(f::IOPM_BASE, svm::iopm());
    v.w64(f::MSRPM_BASE, svm::msrpm());
    v.w64(f::VINTR, V_INTR_MASKING);
    v.w64(f::NP_ENABLE, 1);
    v.w64(f::N_CR3, ncr3);
    // The architectural reset state.
    let data = Segment {
        sel: 0,
        ar: 0x93,
        limit: 0xffff,
        base: 0,
    };
    for off in [f::ES, f::SS, f::DS, f::FS, f::GS] {
        v.set_seg(off, &data);
    }
    v.set_seg(
        f::CS,
        &Segment {
            sel: 0xf000,
            ar: 0x9b,
            limit: 0xffff,
            base: 0xffff_0000,
        },
    );
    let table = Segment {
        sel: 0,
        ar: 0,
        limit: 0xffff,
        base: 0,
    };
    v.set_seg(f::GDTR, &table);
    v.set_seg(f::IDTR, &table);
    v.set_seg(f::LDTR, &Segment { ar: 0x82, ..table });
    v.set_seg(f::TR, &Segment { ar: 0x8b, ..table });
    v.w64(f::EFER, EFER_SVME);
    v.w64(f::CR0, 0x6000_0010);
    v.w64(f::DR6, 0xffff_0ff0);
    v.w64(f::DR7, 0x400);
    v.w64(f::RFLAGS, 2);
    v.w64(f::RIP, 0xfff0);
    v.w64(f::G_PAT, 0x0007_0406_0007_0406);
}

/// A new vCPU's SVM part for VM PD `pd` with guest space `g`.
pub fn create(pd: &Pd, g: &SpaceGuest) -> Result<Vcpu, Status> {
    let vmcb = crate::kmem::alloc_frame(pd)?;
    init_vmcb(Vmcb::at(vmcb), g.root());
    Ok(Vcpu {
        vmcb,
        st: UnsafeCell::new(State {
            gprs: Gprs::default(),
            asid: 0,
            asid_gen: 0,
        }),
    })
}

/// Enters the guest of SVM vCPU `v` (current on this CPU, FPU loaded) until an exit.
pub(super) fn run(ec: &Ec, v: &Vcpu, st: &mut State, c: &mut Common) -> Next {
    let vm = Vmcb::at(v.vmcb);
    // CS.L outside long mode is the one inconsistency a guest can load by itself (a far
    // jump); everything else `check_entry` looks at changes only through `put_state`.
    let long_cs = || (vm.r32(f::CS) >> 16) & u32::from(AR_L) != 0;
    if c.check || (long_cs() && vm.r64(f::EFER) & EFER_LMA == 0) {
        if !check_entry(vm) {
            return Next::Event(Ev::InvalidState);
        }
        c.check = false;
    }
    let (asid, gen, wrapped) = svm::asid_for(st.asid, st.asid_gen);
    st.asid = asid;
    st.asid_gen = gen;
    vm.w32(f::ASID, asid);
    let fg = super::flush_gen(ec);
    let tlb = if wrapped {
        1
    } else if fg != c.flush_seen {
        if svm::info().flush_by_asid {
            3
        } else {
            1
        }
    } else {
        0
    };
    c.flush_seen = fg;
    vm.w8(f::TLB_CONTROL, tlb);
    if trace() {
        crate::kprintln!(
            "vmrun rip {:#x} rfl {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cs {:x?} ss {:x?} inj {:#x} vintr {:#x} shadow {:#x} i3 {:#x} i4 {:#x} exc {:#x} cr {:#x} xcr0 {:#x} tlb {}",
            vm.r64(f::RIP),
            vm.r64(f::RFLAGS),
            vm.r64(f::CR0),
            vm.r64(f::CR3),
            vm.r64(f::CR4),
            vm.r64(f::EFER),
            vm.seg(f::CS),
            vm.seg(f::SS),
            vm.r64(f::EVENTINJ),
            vm.r64(f::VINTR),
            vm.r64(f::INT_SHADOW),
            vm.r32(f::INTERCEPT_3),
            vm.r32(f::INTERCEPT_4),
            vm.r32(f::INTERCEPT_EXC),
            vm.r32(f::INTERCEPT_CR),
            c.xcr0,
            tlb
        );
    }
    let host_xcr0 = super::enter_xcr0(c.xcr0);
    c.dr.enter(false);
    crate::arch::x86::spec::vm_entry(ec.pd.id);
    // SAFETY: the VMCB was built by `init_vmcb` (mandatory intercepts, permission maps,
    // the VM's nested page table) and changed only through `put_state`'s checks;
    // `check_entry` passed; SVM is on here (`create` checked `enabled_on`).
    unsafe { svm::vmrun(&mut st.gprs, v.vmcb) };
    if c.dr.live() {
        // The guest ran with its DR0–DR3 and no DR intercepts (DR6 and DR7 are in the
        // VMCB).
        c.dr.save(false, vm.r64(f::DR7));
        vm.w32(f::INTERCEPT_DR, DR_ALL);
    }
    super::leave_xcr0(host_xcr0);
    handle_exit(vm, c)
}

/// Converts SVM's I/O exit information into the VMX exit-qualification format.
fn io_qual(i1: u64) -> u64 {
    let size = if i1 & (1 << 4) != 0 {
        0
    } else if i1 & (1 << 5) != 0 {
        1
    } else {
        3
    };
    size | ((i1 & 1) << 3) | (((i1 >> 2) & 1) << 4) | (((i1 >> 3) & 1) << 5) | (i1 & 0xffff_0000)
}

fn handle_exit(vm: Vmcb, st: &mut Common) -> Next {
    // QEMU 7.2's nested SVM (software emulation) at times fetches the host's next
    // instruction after a #VMEXIT through the guest's nested page table (seen while the
    // FPU registers were switched between a vCPU and its VMM at every exit, with another
    // VM busy on another CPU; `fpu::switch_to` no longer does that): a second #VMEXIT (a
    // nested page fault) then writes the host's own state into the VMCB as the guest's,
    // or the host triple-faults. The guest's state is gone, and entering it would run
    // the guest on the host's RIP and CR3 (and show the VMM the host's addresses):
    // INVALID_STATE.
    if vm.r64(f::RIP) == svm::resume_rip() && vm.r64(f::CR3) == crate::arch::x86::cr::read_cr3() {
        st.qual = [u64::MAX, 0];
        st.inst_len = 0;
        return Next::Event(Ev::InvalidState);
    }
    let code = vm.r64(f::EXITCODE);
    let (i1, i2) = (vm.r64(f::EXITINFO1), vm.r64(f::EXITINFO2));
    if trace() {
        crate::kprintln!(
            "vm exit {:#x} info {:#x} {:#x} rip {:#x} intinfo {:#x}",
            code,
            i1,
            i2,
            vm.r64(f::RIP),
            vm.r64(f::EXITINTINFO)
        );
    }
    // An event whose delivery the exit interrupted is delivered on the next entry
    // (unless the VMM replaces it).
    let eii = vm.r64(f::EXITINTINFO);
    if eii & inj::VALID != 0 {
        vm.w64(f::EVENTINJ, eii);
    }
    st.qual = [i1, i2];
    let rip = vm.r64(f::RIP);
    let nrip = vm.r64(f::NRIP);
    st.inst_len = if svm::info().nrips && nrip > rip && nrip - rip <= 15 {
        nrip - rip
    } else {
        0
    };
    let nr = match code {
        exit::INTR | exit::NMI | exit::SMI => return Next::Interrupt,
        exit::INIT => Ev::Init,
        exit::VINTR => {
            vm.w64(f::VINTR, vm.r64(f::VINTR) & !VINTR_REQ);
            vm.w32(f::INTERCEPT_3, vm.r32(f::INTERCEPT_3) & !i3::VINTR);
            Ev::IntrWindow
        }
        exit::CPUID => Ev::Cpuid,
        exit::HLT => Ev::Hlt,
        exit::VMMCALL => Ev::Vmcall,
        exit::INVD => Ev::Invd,
        exit::PAUSE => Ev::Pause,
        exit::RDTSC => Ev::Rdtsc,
        exit::RDTSCP => Ev::Rdtscp,
        exit::WBINVD => Ev::Wbinvd,
        exit::MONITOR => Ev::Monitor,
        exit::MWAIT | exit::MWAIT_COND => Ev::Mwait,
        exit::XSETBV => Ev::Xsetbv,
        exit::INVLPG => Ev::Invlpg,
        exit::IOIO => {
            st.qual = [io_qual(i1), i1];
            if i2 > rip && i2 - rip <= 15 {
                st.inst_len = i2 - rip;
            }
            // EXITINFO1 bit 2: INS/OUTS.
            if i1 & (1 << 2) != 0 {
                Ev::IoString
            } else {
                Ev::Io
            }
        }
        exit::MSR => {
            if i1 & 1 != 0 {
                Ev::Wrmsr
            } else {
                Ev::Rdmsr
            }
        }
        exit::SHUTDOWN => Ev::TripleFault,
        exit::NPF => Ev::NptFault,
        exit::TASK_SWITCH => Ev::TaskSwitch,
        exit::EXC_MC => return super::machine_check(),
        exit::DR0_READ..=exit::DR15_WRITE => {
            // The kernel's (`super::Dr`): the MOV DR runs again without an intercept.
            st.dr.accessed();
            vm.w32(f::INTERCEPT_DR, 0);
            return Next::Interrupt;
        }
        exit::EXC_BASE..=exit::EXC_LAST => {
            let vec = code - exit::EXC_BASE;
            let has_err = matches!(vec, 8 | 10..=14 | 17 | 21 | 29 | 30);
            st.qual = [
                vec | inj::TYPE_HW_EXC
                    | if has_err { inj::ERROR_VALID } else { 0 }
                    | inj::VALID
                    | ((i1 & 0xffff_ffff) << 32),
                i2,
            ];
            Ev::Exception
        }
        exit::CR0_READ..=exit::CR15_WRITE => {
            let crn = code & 0xf;
            let read = code < 0x10;
            let gpr = if i1 & (1 << 63) != 0 {
                (i1 & 0xf) << 8
            } else {
                0
            };
            st.qual = [crn | (u64::from(read) << 4) | gpr, i1];
            Ev::CrAccess
        }
        // VMEXIT_INVALID is -1; QEMU writes it as a 32-bit -1. Taken for another exit,
        // the VMM's reply entered the guest with what QEMU's failed VMRUN left in the
        // VMCB: the host's own state.
        c if c as u32 == exit::INVALID as u32 => Ev::InvalidState,
        _ => {
            st.qual = [code, i1];
            Ev::Other
        }
    };
    Next::Event(nr)
}

/// Cross-field checks before VMRUN (APM 15.5.1); derives EFER.LMA and the CPL.
fn check_entry(vm: Vmcb) -> bool {
    let mut efer = vm.r64(f::EFER) | EFER_SVME;
    let cr0 = vm.r64(f::CR0);
    let cr4 = vm.r64(f::CR4);
    let cs = vm.seg(f::CS);
    if efer & EFER_LME != 0 && cr0 & CR0_PG == 0 && cr4 & CR4_PAE == 0 {
        // Legal, but QEMU's #VMEXIT restores the host's CR0 while the guest's EFER
        // (LME) and CR4 (no PAE) are still loaded, refuses the "switch to long mode
        // without PAE" and keeps the guest's CR0: the host runs on without paging.
        return false;
    }
    if efer & EFER_LME != 0 && cr0 & CR0_PG != 0 {
        if cr4 & CR4_PAE == 0 || cr0 & CR0_PE == 0 || cs.ar & (AR_L | AR_D) == AR_L | AR_D {
            return false;
        }
        efer |= EFER_LMA;
    } else {
        efer &= !EFER_LMA;
        // CS.L means nothing outside long mode; QEMU's VMRUN nevertheless enters a
        // "64-bit" mode with paging off from such a state and hangs there.
        if cs.ar & AR_L != 0 {
            vm.set_seg(
                f::CS,
                &Segment {
                    ar: cs.ar & !AR_L,
                    ..cs
                },
            );
        }
    }
    vm.w64(f::EFER, efer);
    let cpl = if cr0 & CR0_PE == 0 {
        0
    } else if vm.r64(f::RFLAGS) & RFLAGS_VM != 0 {
        3
    } else {
        (vm.seg(f::SS).ar >> 5) & 3
    };
    vm.w8(f::CPL, cpl as u8);
    true
}

/// Writes the state `mtd` selects from vCPU `ec` into a handler's UTCB.
pub(super) fn get_state(v: &Vcpu, st: &mut State, mtd: Mtd, a: &mut ArchState) {
    let vm = Vmcb::at(v.vmcb);
    let g = &st.gprs.0;
    if mtd.contains(Mtd::GPR_ACDB) {
        a.gpr[0] = vm.r64(f::RAX);
        a.gpr[1..4].copy_from_slice(&g[1..4]);
    }
    if mtd.contains(Mtd::GPR_BSD) {
        a.gpr[5..8].copy_from_slice(&g[5..8]);
    }
    if mtd.contains(Mtd::RSP) {
        a.gpr[4] = vm.r64(f::RSP);
    }
    if mtd.contains(Mtd::GPR_R8_R15) {
        a.gpr[8..16].copy_from_slice(&g[8..16]);
    }
    if mtd.contains(Mtd::RIP_LEN) {
        a.rip = vm.r64(f::RIP);
    }
    if mtd.contains(Mtd::RFLAGS) {
        a.rflags = vm.r64(f::RFLAGS);
    }
    if mtd.contains(Mtd::INJ) {
        let e = vm.r64(f::EVENTINJ);
        let mut i = if e & inj::VALID != 0 {
            e & 0x8000_0fff
        } else {
            0
        };
        if vm.r32(f::INTERCEPT_3) & i3::VINTR != 0 {
            i |= inj::REQ_INTR_WINDOW;
        }
        a.inj_info = i;
        a.inj_error = e >> 32;
    }
    if mtd.contains(Mtd::STA) {
        a.intr_state = (vm.r64(f::INT_SHADOW) & 1) as u32;
        a.actv_state = 0;
    }
    if !mtd.intersects(RARE) {
        return;
    }
    let segs: [(Mtd, usize, &mut Segment); 10] = [
        (Mtd::DS_ES, f::DS, &mut a.ds),
        (Mtd::DS_ES, f::ES, &mut a.es),
        (Mtd::FS_GS, f::FS, &mut a.fs),
        (Mtd::FS_GS, f::GS, &mut a.gs),
        (Mtd::CS_SS, f::CS, &mut a.cs),
        (Mtd::CS_SS, f::SS, &mut a.ss),
        (Mtd::TR, f::TR, &mut a.tr),
        (Mtd::LDTR, f::LDTR, &mut a.ldtr),
        (Mtd::GDTR, f::GDTR, &mut a.gdtr),
        (Mtd::IDTR, f::IDTR, &mut a.idtr),
    ];
    for (m, off, s) in segs {
        if mtd.contains(m) {
            *s = vm.seg(off);
        }
    }
    if mtd.contains(Mtd::CR) {
        a.cr0 = vm.r64(f::CR0);
        a.cr2 = vm.r64(f::CR2);
        a.cr3 = vm.r64(f::CR3);
        a.cr4 = vm.r64(f::CR4);
        a.cr8 = vm.r64(f::VINTR) & 0xf;
    }
    if mtd.contains(Mtd::DR) {
        a.dr6 = vm.r64(f::DR6);
        a.dr7 = vm.r64(f::DR7);
    }
    if mtd.contains(Mtd::SYSENTER) {
        a.sysenter_cs = vm.r64(f::SYSENTER_CS);
        a.sysenter_esp = vm.r64(f::SYSENTER_ESP);
        a.sysenter_eip = vm.r64(f::SYSENTER_EIP);
    }
    if mtd.contains(Mtd::TSC) {
        a.tsc_off = vm.r64(f::TSC_OFFSET);
        a.tsc_val = crate::arch::rdtsc().wrapping_add(a.tsc_off);
    }
    if mtd.contains(Mtd::EFER) {
        a.efer = vm.r64(f::EFER) & !EFER_SVME;
    }
    if mtd.contains(Mtd::PDPTE) {
        a.pdpte = [0; 4];
    }
    if mtd.contains(Mtd::SYSCALL_SWAPGS) {
        a.star = vm.r64(f::STAR);
        a.lstar = vm.r64(f::LSTAR);
        a.cstar = vm.r64(f::CSTAR);
        a.fmask = vm.r64(f::SFMASK);
        a.kernel_gs_base = vm.r64(f::KERNEL_GS_BASE);
    }
    if mtd.contains(Mtd::PAT) {
        a.pat = vm.r64(f::G_PAT);
    }
}

/// VMX entry-interruption information → SVM EVENTINJ; `None` when invalid.
fn event_inj(info: u64, err: u64) -> Option<u64> {
    if info & inj::VALID == 0 {
        return Some(0);
    }
    if info & 0x7fff_f000 != 0 {
        return None;
    }
    let vector = info & 0xff;
    let ev = info & inj::ERROR_VALID;
    let ty = match (info >> 8) & 7 {
        0 => 0,
        2 if vector == 2 => 2,
        3 if vector < 32 && vector != 2 => 3,
        4 => 4,
        // INT1, INT3, INTO: exceptions on SVM (the VMM advances RIP itself).
        5 | 6 if vector < 32 => 3,
        _ => return None,
    };
    if ev != 0 && ty != 3 {
        return None;
    }
    Some(vector | (ty << 8) | ev | inj::VALID | ((err & 0xffff_ffff) << 32))
}

fn apply_ctrl(vm: Vmcb, c: [u64; 2]) {
    let mut v3 = BASE3 | (vm.r32(f::INTERCEPT_3) & i3::VINTR);
    let mut v4 = BASE4;
    let mut cr = base_cr();
    let c0 = c[0];
    let on = |b: u64| c0 & b != 0;
    if on(ctrl::RDTSC) {
        v3 |= i3::RDTSC;
    }
    if on(ctrl::RDTSCP) {
        v4 |= i4::RDTSCP;
    }
    if on(ctrl::INVLPG) {
        v3 |= i3::INVLPG;
    }
    if on(ctrl::PAUSE) {
        v3 |= i3::PAUSE;
    }
    if on(ctrl::MWAIT) {
        v4 |= i4::MONITOR | i4::MWAIT | i4::MWAIT_COND;
    }
    if on(ctrl::WBINVD) {
        v4 |= i4::WBINVD;
    }
    if on(ctrl::RDPMC) {
        v3 |= i3::RDPMC;
    }
    if on(ctrl::CR0_CR4_WRITE) {
        cr |= (1 << 16) | (1 << 20);
    }
    if on(ctrl::CR3_ACCESS) {
        cr |= (1 << 3) | (1 << 19);
    }
    vm.w32(f::INTERCEPT_3, v3);
    vm.w32(f::INTERCEPT_4, v4);
    vm.w32(f::INTERCEPT_CR, cr);
    vm.w32(f::INTERCEPT_EXC, c[1] as u32 | super::FORCED_EXC);
}

/// Takes back the state a VMM's reply selects, validating every value: a value that
/// would make VMRUN fail or harm the host is not written, and the vCPU's next event is
/// INVALID_STATE.
/// Takes back the groups of `mtd` within `super::SIMPLE` (GPRs, RIP, RFLAGS) from `a`,
/// reading each value once (so `a` may be the VMM's UTCB itself); false if one was
/// refused (a non-canonical RIP, not written).
#[inline(always)]
pub(super) fn put_simple(v: &Vcpu, st: &mut State, a: &ArchState, mtd: Mtd) -> bool {
    let vm = Vmcb::at(v.vmcb);
    if mtd.contains(Mtd::GPR_ACDB) {
        vm.w64(f::RAX, a.gpr[0]);
        st.gprs.0[1..4].copy_from_slice(&a.gpr[1..4]);
    }
    if mtd.contains(Mtd::GPR_BSD) {
        st.gprs.0[5..8].copy_from_slice(&a.gpr[5..8]);
    }
    if mtd.contains(Mtd::RSP) {
        vm.w64(f::RSP, a.gpr[4]);
    }
    if mtd.contains(Mtd::GPR_R8_R15) {
        st.gprs.0[8..16].copy_from_slice(&a.gpr[8..16]);
    }
    if mtd.contains(Mtd::RFLAGS) {
        vm.w64(f::RFLAGS, (a.rflags & RFLAGS_OK) | 2);
    }
    if mtd.contains(Mtd::RIP_LEN) {
        let rip = a.rip;
        if !canonical(rip) {
            return false;
        }
        vm.w64(f::RIP, rip);
    }
    true
}

pub(super) fn put_state(v: &Vcpu, st: &mut State, c: &mut Common, a: &ArchState) -> bool {
    let vm = Vmcb::at(v.vmcb);
    let mtd = a.mtd;
    let mut bad = !put_simple(v, st, a, mtd);
    let mut take = |ok: bool, w: &mut dyn FnMut()| {
        if ok {
            w()
        } else {
            bad = true
        }
    };
    if mtd.contains(Mtd::INJ) {
        let windows = inj::REQ_INTR_WINDOW | inj::REQ_NMI_WINDOW;
        match event_inj(a.inj_info & !windows & 0xffff_ffff, a.inj_error) {
            Some(e) if a.inj_info >> 34 == 0 => {
                vm.w64(f::EVENTINJ, e);
                let (vi, i3v) = (vm.r64(f::VINTR), vm.r32(f::INTERCEPT_3));
                if a.inj_info & inj::REQ_INTR_WINDOW != 0 {
                    vm.w64(f::VINTR, vi | VINTR_REQ);
                    vm.w32(f::INTERCEPT_3, i3v | i3::VINTR);
                } else {
                    vm.w64(f::VINTR, vi & !VINTR_REQ);
                    vm.w32(f::INTERCEPT_3, i3v & !i3::VINTR);
                }
            }
            _ => take(false, &mut || {}),
        }
    }
    if mtd.contains(Mtd::STA) {
        vm.w64(f::INT_SHADOW, u64::from(a.intr_state & 3 != 0));
    }
    if !mtd.intersects(RARE) {
        return !bad;
    }
    let segs: [(Mtd, usize, &Segment); 10] = [
        (Mtd::DS_ES, f::DS, &a.ds),
        (Mtd::DS_ES, f::ES, &a.es),
        (Mtd::FS_GS, f::FS, &a.fs),
        (Mtd::FS_GS, f::GS, &a.gs),
        (Mtd::CS_SS, f::CS, &a.cs),
        (Mtd::CS_SS, f::SS, &a.ss),
        (Mtd::TR, f::TR, &a.tr),
        (Mtd::LDTR, f::LDTR, &a.ldtr),
        (Mtd::GDTR, f::GDTR, &a.gdtr),
        (Mtd::IDTR, f::IDTR, &a.idtr),
    ];
    for (m, off, s) in segs {
        if mtd.contains(m) {
            let mut ok = seg_ok(s);
            if off == f::CS {
                // A present code segment.
                ok &= s.ar & 0x98 == 0x98;
            }
            if off == f::GDTR || off == f::IDTR {
                ok &= s.limit <= 0xffff;
            }
            take(ok, &mut || vm.set_seg(off, s));
        }
    }
    if mtd.contains(Mtd::CR) {
        let cr0_ok = a.cr0 >> 32 == 0
            && !(a.cr0 & CR0_NW != 0 && a.cr0 & CR0_CD == 0)
            && !(a.cr0 & CR0_PG != 0 && a.cr0 & CR0_PE == 0);
        take(cr0_ok, &mut || vm.w64(f::CR0, a.cr0));
        take(a.cr3 >> 52 == 0, &mut || vm.w64(f::CR3, a.cr3));
        take(a.cr4 & !CR4_OK == 0, &mut || vm.w64(f::CR4, a.cr4));
        vm.w64(f::CR2, a.cr2);
        take(a.cr8 <= 0xf, &mut || {
            vm.w64(f::VINTR, (vm.r64(f::VINTR) & !0xff) | a.cr8)
        });
    }
    if mtd.contains(Mtd::DR) {
        take(a.dr7 >> 32 == 0 && a.dr6 >> 32 == 0, &mut || {
            vm.w64(f::DR6, a.dr6);
            vm.w64(f::DR7, a.dr7);
            c.dr.set_dr7(a.dr7);
        });
    }
    if mtd.contains(Mtd::SYSENTER) {
        take(
            a.sysenter_cs >> 32 == 0 && canonical(a.sysenter_esp) && canonical(a.sysenter_eip),
            &mut || {
                vm.w64(f::SYSENTER_CS, a.sysenter_cs);
                vm.w64(f::SYSENTER_ESP, a.sysenter_esp);
                vm.w64(f::SYSENTER_EIP, a.sysenter_eip);
            },
        );
    }
    if mtd.contains(Mtd::SYSCALL_SWAPGS) {
        take(
            canonical(a.lstar)
                && canonical(a.cstar)
                && canonical(a.kernel_gs_base)
                && a.fmask >> 32 == 0,
            &mut || {
                vm.w64(f::STAR, a.star);
                vm.w64(f::LSTAR, a.lstar);
                vm.w64(f::CSTAR, a.cstar);
                vm.w64(f::SFMASK, a.fmask);
                vm.w64(f::KERNEL_GS_BASE, a.kernel_gs_base);
            },
        );
    }
    if mtd.contains(Mtd::CTRL) {
        take(
            a.ctrl[0] & !ctrl::ALL == 0 && a.ctrl[1] >> 32 == 0,
            &mut || {
                c.ctrl = a.ctrl;
                apply_ctrl(vm, a.ctrl);
            },
        );
    }
    if mtd.contains(Mtd::TSC) {
        vm.w64(f::TSC_OFFSET, a.tsc_off);
    }
    if mtd.contains(Mtd::EFER) {
        let e = a.efer | EFER_SVME;
        take(e & !EFER_OK == 0, &mut || vm.w64(f::EFER, e));
    }
    if mtd.contains(Mtd::PAT) {
        take(pat_ok(a.pat), &mut || vm.w64(f::G_PAT, a.pat));
    }
    !bad
}
