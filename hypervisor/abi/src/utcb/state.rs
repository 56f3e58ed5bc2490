//! Changing an [`ArchState`] with a record of what changed.
//!
//! A handler that changes a vCPU's or EC's state must also name the changed group in
//! the `mtd` word: the reply carries back only what it names, so a forgotten bit drops
//! the change without a trace. The setters here write a field *and* record its
//! [`Mtd`] group, so a handler that uses them cannot forget one. The record is what a
//! binding writes back: the Peregrine kernel takes exactly the named groups from the
//! UTCB at reply; a binding on another host (KVM's `KVM_SET_REGS`/`KVM_SET_SREGS`,
//! say) writes the named groups into its vCPU and skips the rest.
//!
//! The record only grows: a binding clears it (`mtd = Mtd::empty()`) before it hands
//! the state to a handler, and reads it after.

use super::{ArchState, Segment};
use crate::mtd::Mtd;

/// The [`Mtd`] group that carries general-purpose register `index` (see
/// [`gpr`](super::gpr)).
#[inline]
pub const fn gpr_mtd(index: usize) -> Mtd {
    match index {
        0..=3 => Mtd::GPR_ACDB,
        4 => Mtd::RSP,
        5..=7 => Mtd::GPR_BSD,
        _ => Mtd::GPR_R8_R15,
    }
}

/// `set_x(v)`: writes field `x` and records `group`.
macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident($($field:ident).+: $ty:ty) => $group:ident;)*) => {
        $(
            $(#[$doc])*
            #[doc = concat!("Records [`Mtd::", stringify!($group), "`].")]
            #[inline(always)]
            pub fn $name(&mut self, v: $ty) {
                self.$($field).+ = v;
                self.mtd |= Mtd::$group;
            }
        )*
    };
}

impl ArchState {
    /// Sets general-purpose register `index` (see [`gpr`](super::gpr)); records its
    /// group ([`gpr_mtd`]).
    #[inline(always)]
    pub fn set_gpr(&mut self, index: usize, v: u64) {
        self.gpr[index] = v;
        self.mtd |= gpr_mtd(index);
    }

    /// Sets all sixteen general-purpose registers. Records [`Mtd::GPRS`].
    #[inline(always)]
    pub fn set_gprs(&mut self, v: [u64; 16]) {
        self.gpr = v;
        self.mtd |= Mtd::GPRS;
    }

    /// Moves RIP on by `len` bytes (past an instruction), wrapping. Records
    /// [`Mtd::RIP_LEN`].
    #[inline(always)]
    pub fn advance(&mut self, len: u64) {
        self.set_rip(self.rip.wrapping_add(len));
    }

    /// Sets the injection: `info` (VMX entry-interruption format with the window
    /// requests above, see [`inj`](super::inj)) and its error code. Records
    /// [`Mtd::INJ`].
    #[inline(always)]
    pub fn set_inj(&mut self, info: u64, error: u64) {
        self.inj_info = info;
        self.inj_error = error;
        self.mtd |= Mtd::INJ;
    }

    /// Sets control register CR`n` (0, 2, 3, 4 or 8; any other `n` changes nothing and
    /// records nothing). Records [`Mtd::CR`].
    #[inline(always)]
    pub fn set_cr(&mut self, n: u64, v: u64) {
        let cr = match n {
            0 => &mut self.cr0,
            2 => &mut self.cr2,
            3 => &mut self.cr3,
            4 => &mut self.cr4,
            8 => &mut self.cr8,
            _ => return,
        };
        *cr = v;
        self.mtd |= Mtd::CR;
    }

    /// Zeroes every field but the record, and records nothing: the start of a state
    /// written afresh (a vCPU's entry state), whose setters then record what it sets.
    /// A field zeroed here whose group nothing records stays as the vCPU has it.
    pub fn reset(&mut self) {
        *self = ArchState {
            mtd: self.mtd,
            ..ArchState::default()
        };
    }

    setters! {
        /// Sets RIP.
        set_rip(rip: u64) => RIP_LEN;
        /// Sets the instruction length.
        set_inst_len(inst_len: u64) => RIP_LEN;
        /// Sets RFLAGS.
        set_rflags(rflags: u64) => RFLAGS;
        /// Sets the interruptibility state (VMX encoding: bit 0 blocking by STI, 1 by
        /// MOV SS).
        set_intr_state(intr_state: u32) => STA;
        /// Sets the activity state.
        set_actv_state(actv_state: u32) => STA;
        /// Sets the injection's information word alone (with the window requests).
        set_inj_info(inj_info: u64) => INJ;
        /// Sets the exit qualification.
        set_qual(qual: [u64; 2]) => QUAL;
        /// Sets the execution controls.
        set_ctrl(ctrl: [u64; 2]) => CTRL;
        /// Sets the TSC offset.
        set_tsc_off(tsc_off: u64) => TSC;
        /// Sets CR0.
        set_cr0(cr0: u64) => CR;
        /// Sets CR2.
        set_cr2(cr2: u64) => CR;
        /// Sets CR3.
        set_cr3(cr3: u64) => CR;
        /// Sets CR4.
        set_cr4(cr4: u64) => CR;
        /// Sets CR8.
        set_cr8(cr8: u64) => CR;
        /// Sets EFER.
        set_efer(efer: u64) => EFER;
        /// Sets PAT.
        set_pat(pat: u64) => PAT;
        /// Sets XCR0.
        set_xcr0(xcr0: u64) => XSAVE;
        /// Sets DR6.
        set_dr6(dr6: u64) => DR;
        /// Sets DR7.
        set_dr7(dr7: u64) => DR;
        /// Sets SYSENTER_CS.
        set_sysenter_cs(sysenter_cs: u64) => SYSENTER;
        /// Sets SYSENTER_ESP.
        set_sysenter_esp(sysenter_esp: u64) => SYSENTER;
        /// Sets SYSENTER_EIP.
        set_sysenter_eip(sysenter_eip: u64) => SYSENTER;
        /// Sets STAR.
        set_star(star: u64) => SYSCALL_SWAPGS;
        /// Sets LSTAR.
        set_lstar(lstar: u64) => SYSCALL_SWAPGS;
        /// Sets CSTAR.
        set_cstar(cstar: u64) => SYSCALL_SWAPGS;
        /// Sets FMASK.
        set_fmask(fmask: u64) => SYSCALL_SWAPGS;
        /// Sets KERNEL_GS_BASE.
        set_kernel_gs_base(kernel_gs_base: u64) => SYSCALL_SWAPGS;
        /// Sets ES.
        set_es(es: Segment) => DS_ES;
        /// Sets DS.
        set_ds(ds: Segment) => DS_ES;
        /// Sets CS.
        set_cs(cs: Segment) => CS_SS;
        /// Sets SS.
        set_ss(ss: Segment) => CS_SS;
        /// Sets FS.
        set_fs(fs: Segment) => FS_GS;
        /// Sets GS.
        set_gs(gs: Segment) => FS_GS;
        /// Sets FS's base (the FS_BASE MSR).
        set_fs_base(fs.base: u64) => FS_GS;
        /// Sets GS's base (the GS_BASE MSR).
        set_gs_base(gs.base: u64) => FS_GS;
        /// Sets LDTR.
        set_ldtr(ldtr: Segment) => LDTR;
        /// Sets TR.
        set_tr(tr: Segment) => TR;
        /// Sets GDTR.
        set_gdtr(gdtr: Segment) => GDTR;
        /// Sets IDTR.
        set_idtr(idtr: Segment) => IDTR;
        /// Sets the PDPTEs.
        set_pdpte(pdpte: [u64; 4]) => PDPTE;
    }
}

/// The groups in which `a` and `b` differ (their records aside): what a handler that
/// turned `a` into `b` must have recorded. Tests of handlers compare it with the
/// record.
pub fn changed_groups(a: &ArchState, b: &ArchState) -> Mtd {
    let mut m = Mtd::empty();
    let mut diff = |differs: bool, group: Mtd| {
        if differs {
            m |= group;
        }
    };
    for i in 0..16 {
        diff(a.gpr[i] != b.gpr[i], gpr_mtd(i));
    }
    diff((a.rip, a.inst_len) != (b.rip, b.inst_len), Mtd::RIP_LEN);
    diff(a.rflags != b.rflags, Mtd::RFLAGS);
    diff(
        (a.intr_state, a.actv_state) != (b.intr_state, b.actv_state),
        Mtd::STA,
    );
    diff(
        (a.inj_info, a.inj_error) != (b.inj_info, b.inj_error),
        Mtd::INJ,
    );
    diff(a.qual != b.qual, Mtd::QUAL);
    diff(a.ctrl != b.ctrl, Mtd::CTRL);
    diff((a.tsc_val, a.tsc_off) != (b.tsc_val, b.tsc_off), Mtd::TSC);
    diff(
        (a.cr0, a.cr2, a.cr3, a.cr4, a.cr8) != (b.cr0, b.cr2, b.cr3, b.cr4, b.cr8),
        Mtd::CR,
    );
    diff(a.efer != b.efer, Mtd::EFER);
    diff(a.pat != b.pat, Mtd::PAT);
    diff(a.xcr0 != b.xcr0, Mtd::XSAVE);
    diff((a.dr6, a.dr7) != (b.dr6, b.dr7), Mtd::DR);
    diff(
        (a.sysenter_cs, a.sysenter_esp, a.sysenter_eip)
            != (b.sysenter_cs, b.sysenter_esp, b.sysenter_eip),
        Mtd::SYSENTER,
    );
    diff(
        (a.star, a.lstar, a.cstar, a.fmask, a.kernel_gs_base)
            != (b.star, b.lstar, b.cstar, b.fmask, b.kernel_gs_base),
        Mtd::SYSCALL_SWAPGS,
    );
    diff((a.es, a.ds) != (b.es, b.ds), Mtd::DS_ES);
    diff((a.cs, a.ss) != (b.cs, b.ss), Mtd::CS_SS);
    diff((a.fs, a.gs) != (b.fs, b.gs), Mtd::FS_GS);
    diff(a.ldtr != b.ldtr, Mtd::LDTR);
    diff(a.tr != b.tr, Mtd::TR);
    diff(a.gdtr != b.gdtr, Mtd::GDTR);
    diff(a.idtr != b.idtr, Mtd::IDTR);
    diff(a.pdpte != b.pdpte, Mtd::PDPTE);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::utcb::gpr;

    type Setter = fn(&mut ArchState);
    type SegmentSetter = fn(&mut ArchState, Segment);

    /// Every setter changes its field and records exactly its group, which
    /// [`changed_groups`] agrees with.
    #[test]
    fn each_setter_records_its_group() {
        let seg = Segment {
            sel: 8,
            ar: 0x9b,
            limit: 0xffff,
            base: 0x1000,
        };
        let cases: &[(Setter, Mtd)] = &[
            (|r| r.set_gpr(gpr::RAX, 1), Mtd::GPR_ACDB),
            (|r| r.set_gpr(gpr::RBX, 1), Mtd::GPR_ACDB),
            (|r| r.set_gpr(gpr::RSP, 1), Mtd::RSP),
            (|r| r.set_gpr(gpr::RBP, 1), Mtd::GPR_BSD),
            (|r| r.set_gpr(gpr::RDI, 1), Mtd::GPR_BSD),
            (|r| r.set_gpr(gpr::R8, 1), Mtd::GPR_R8_R15),
            (|r| r.set_gpr(gpr::R15, 1), Mtd::GPR_R8_R15),
            (|r| r.set_gprs([1; 16]), Mtd::GPRS),
            (|r| r.advance(3), Mtd::RIP_LEN),
            (|r| r.set_rip(1), Mtd::RIP_LEN),
            (|r| r.set_inst_len(1), Mtd::RIP_LEN),
            (|r| r.set_rflags(2), Mtd::RFLAGS),
            (|r| r.set_intr_state(1), Mtd::STA),
            (|r| r.set_actv_state(1), Mtd::STA),
            (|r| r.set_inj(1 << 31, 3), Mtd::INJ),
            (|r| r.set_inj_info(1 << 32), Mtd::INJ),
            (|r| r.set_qual([1, 2]), Mtd::QUAL),
            (|r| r.set_ctrl([1, 2]), Mtd::CTRL),
            (|r| r.set_tsc_off(1), Mtd::TSC),
            (|r| r.set_cr(0, 1), Mtd::CR),
            (|r| r.set_cr(2, 1), Mtd::CR),
            (|r| r.set_cr(3, 1), Mtd::CR),
            (|r| r.set_cr(4, 1), Mtd::CR),
            (|r| r.set_cr(8, 1), Mtd::CR),
            (|r| r.set_cr0(1), Mtd::CR),
            (|r| r.set_cr2(1), Mtd::CR),
            (|r| r.set_cr3(1), Mtd::CR),
            (|r| r.set_cr4(1), Mtd::CR),
            (|r| r.set_cr8(1), Mtd::CR),
            (|r| r.set_efer(1), Mtd::EFER),
            (|r| r.set_pat(1), Mtd::PAT),
            (|r| r.set_xcr0(1), Mtd::XSAVE),
            (|r| r.set_dr6(1), Mtd::DR),
            (|r| r.set_dr7(1), Mtd::DR),
            (|r| r.set_sysenter_cs(1), Mtd::SYSENTER),
            (|r| r.set_sysenter_esp(1), Mtd::SYSENTER),
            (|r| r.set_sysenter_eip(1), Mtd::SYSENTER),
            (|r| r.set_star(1), Mtd::SYSCALL_SWAPGS),
            (|r| r.set_lstar(1), Mtd::SYSCALL_SWAPGS),
            (|r| r.set_cstar(1), Mtd::SYSCALL_SWAPGS),
            (|r| r.set_fmask(1), Mtd::SYSCALL_SWAPGS),
            (|r| r.set_kernel_gs_base(1), Mtd::SYSCALL_SWAPGS),
            (|r| r.set_fs_base(1), Mtd::FS_GS),
            (|r| r.set_gs_base(1), Mtd::FS_GS),
            (|r| r.set_pdpte([1; 4]), Mtd::PDPTE),
        ];
        let seg_cases: &[(SegmentSetter, Mtd)] = &[
            (ArchState::set_es, Mtd::DS_ES),
            (ArchState::set_ds, Mtd::DS_ES),
            (ArchState::set_cs, Mtd::CS_SS),
            (ArchState::set_ss, Mtd::CS_SS),
            (ArchState::set_fs, Mtd::FS_GS),
            (ArchState::set_gs, Mtd::FS_GS),
            (ArchState::set_ldtr, Mtd::LDTR),
            (ArchState::set_tr, Mtd::TR),
            (ArchState::set_gdtr, Mtd::GDTR),
            (ArchState::set_idtr, Mtd::IDTR),
        ];
        let check = |r: &ArchState, group: Mtd| {
            assert_eq!(r.mtd, group);
            assert_eq!(changed_groups(&ArchState::default(), r), group);
        };
        for &(set, group) in cases {
            let mut r = ArchState::default();
            set(&mut r);
            check(&r, group);
        }
        for &(set, group) in seg_cases {
            let mut r = ArchState::default();
            set(&mut r, seg);
            check(&r, group);
        }
        let mut r = ArchState::default();
        r.set_cr(1, 5);
        assert_eq!(r.mtd, Mtd::empty(), "no CR1");
    }

    #[test]
    fn reset_zeroes_and_keeps_the_record() {
        let mut r = ArchState::default();
        r.set_rip(5);
        r.qual = [1, 2];
        r.reset();
        assert_eq!((r.rip, r.qual, r.mtd), (0, [0; 2], Mtd::RIP_LEN));
    }
}
