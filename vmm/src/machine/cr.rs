//! Control-register accesses that exit: MOV to and from CR0, CR3 and CR4, CLTS and
//! LMSW, with the #GP(0) checks of the processor the guest sees.

use peregrine_abi::event::vcpu as ev;

use super::{gp0, skip, CpuidFn, End, Step};
use crate::vcpu::{bits, ArchState, Platform};

/// CR4 bits a guest may set: what the kernel takes (VME through UMIP, FSGSBASE, PCIDE,
/// OSXSAVE, SMEP, SMAP; ABI.md); not PKE, whose PKRU the kernel does not switch.
const CR4_ALLOWED: u64 = 0x0037_0fff;

/// The CR4 bits a guest may set on a CPU whose CPUID is `cpuid` (SDM vol. 3A 2.5: a
/// bit for a feature CPUID does not report is reserved), within [`CR4_ALLOWED`].
pub(super) fn cr4_supported(cpuid: CpuidFn) -> u64 {
    let [_, _, c1, d1] = cpuid(1, 0);
    let [max, ..] = cpuid(0, 0);
    let [_, b7, c7, _] = if max >= 7 { cpuid(7, 0) } else { [0; 4] };
    let has = |reg: u32, bit: u32| reg & (1 << bit) != 0;
    let features = [
        (0, has(d1, 1)),   // VME
        (1, has(d1, 1)),   // PVI
        (2, has(d1, 4)),   // TSD
        (3, has(d1, 2)),   // DE
        (4, has(d1, 3)),   // PSE
        (5, has(d1, 6)),   // PAE
        (6, has(d1, 7)),   // MCE
        (7, has(d1, 13)),  // PGE
        (8, true),         // PCE
        (9, has(d1, 24)),  // OSFXSR
        (10, has(d1, 25)), // OSXMMEXCPT
        (11, has(c7, 2)),  // UMIP
        (16, has(b7, 0)),  // FSGSBASE
        (17, has(c1, 17)), // PCIDE
        (18, has(c1, 26)), // OSXSAVE
        (20, has(b7, 7)),  // SMEP
        (21, has(b7, 20)), // SMAP
    ];
    features
        .iter()
        .filter(|&&(_, on)| on)
        .fold(0, |m, &(bit, _)| m | 1 << bit)
        & CR4_ALLOWED
}
/// CR0.NW, CR0.CD.
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
/// CR4.PCIDE.
const CR4_PCIDE: u64 = 1 << 17;

/// Whether MOV to CR`cr` of `v` raises #GP(0) on a processor like the guest's (SDM vol.
/// 3A 2.5, MOV—Move to/from Control Registers): reserved bits, NW without CD, PG without
/// PE, clearing PG in 64-bit mode or PAE in IA-32e mode, PCIDE outside IA-32e mode or
/// with a PCID in CR3, CR3 bits 52–62.
fn cr_write_faults(regs: &ArchState, cr: u64, v: u64, cr4_ok: u64) -> bool {
    let long = regs.efer & bits::EFER_LMA != 0;
    match cr {
        0 => {
            v >> 32 != 0
                || (v & CR0_NW != 0 && v & CR0_CD == 0)
                || (v & bits::CR0_PG != 0 && v & bits::CR0_PE == 0)
                || (crate::vcpu::code_bits(regs) == 64 && v & bits::CR0_PG == 0)
        }
        3 => (v >> 52) & 0x7ff != 0,
        4 => {
            v & !cr4_ok != 0
                || (long && v & bits::CR4_PAE == 0)
                || (v & CR4_PCIDE != 0
                    && regs.cr4 & CR4_PCIDE == 0
                    && (!long || regs.cr3 & 0xfff != 0))
        }
        _ => false,
    }
}

/// A control-register access that exited (VT-x: a write that changes a bit VMX fixes,
/// such as CR4.VMXE or CR0.NE, whose value the kernel keeps in the read shadow, or
/// CR4.PKE; with `ctrl::CR0_CR4_WRITE` or `ctrl::CR3_ACCESS`, every such access).
/// `qual`: CR number (bits 0–3), access type (bits 4–5: mov to, mov from, CLTS, LMSW),
/// GPR (bits 8–11), LMSW source (bits 16–31); see ABI.md. A write the processor would
/// refuse gets #GP(0), as it would natively (the kernel would refuse the value too:
/// INVALID_STATE); `cr4_ok` are the CR4 bits the guest may set ([`cr4_supported`]).
/// The portal must transfer the GPRs, CR, EFER, CS, RIP and the qualification.
pub(super) fn cr_access<P: Platform + ?Sized>(p: &mut P, qual: u64, rip: u64, cr4_ok: u64) -> Step {
    let cr = qual & 0xf;
    let g = ((qual >> 8) & 0xf) as usize;
    let regs = p.regs_mut();
    match (qual >> 4) & 3 {
        0 => {
            // Bit 63 of a CR3 write with CR4.PCIDE only asks not to flush.
            let v = match cr {
                3 => regs.gpr[g] & !(1 << 63),
                _ => regs.gpr[g],
            };
            if !matches!(cr, 0 | 3 | 4) {
                return Step::End(End::Unhandled {
                    event: ev::CR_ACCESS,
                    qual: [qual, 0],
                    rip,
                });
            }
            if cr_write_faults(regs, cr, v, cr4_ok) {
                p.inject(gp0());
                return Step::Resume;
            }
            regs.set_cr(cr, v);
        }
        1 => {
            let v = match cr {
                0 => regs.cr0,
                3 => regs.cr3,
                4 => regs.cr4,
                _ => 0,
            };
            regs.set_gpr(g, v);
        }
        2 => regs.set_cr0(regs.cr0 & !bits::CR0_TS),
        _ => {
            // LMSW: MP, EM, TS and PE from the source; PE is never cleared.
            let src = (qual >> 16) & 0xf;
            regs.set_cr0((regs.cr0 & !0xe) | src | (regs.cr0 & 1));
        }
    }
    skip(regs, 3);
    Step::Resume
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::MockVcpu;
    use crate::vcpu::Mtd;

    #[test]
    fn cr_access_exits_are_emulated() {
        let mut v = MockVcpu::new(0x1000);
        v.regs = ArchState {
            cr0: 0x8000_0031,
            cr4: 0x20,
            rip: 0x1000,
            inst_len: 3,
            ..ArchState::default()
        };
        // mov cr4, rdx (VMX qualification: CR 4, type 0, GPR 2).
        v.regs.gpr[2] = 0x6f0;
        assert!(matches!(
            cr_access(&mut v, 4 | 2 << 8, 0x1000, 0x0037_0fff),
            Step::Resume
        ));
        assert_eq!((v.regs.cr4, v.regs.rip), (0x6f0, 0x1003));
        assert!(v.regs.mtd.contains(Mtd::CR | Mtd::RIP_LEN));
        // mov rax, cr0 (type 1, GPR 0).
        assert!(matches!(
            cr_access(&mut v, 1 << 4, 0, 0x0037_0fff),
            Step::Resume
        ));
        assert_eq!(v.regs.gpr[0], 0x8000_0031);
        // CLTS, then LMSW that sets TS and tries to clear PE.
        v.regs.cr0 |= 8;
        assert!(matches!(
            cr_access(&mut v, 2 << 4, 0, 0x0037_0fff),
            Step::Resume
        ));
        assert_eq!(v.regs.cr0 & 8, 0);
        assert!(matches!(
            cr_access(&mut v, 3 << 4 | 8 << 16, 0, 0x0037_0fff),
            Step::Resume
        ));
        assert_eq!(v.regs.cr0 & 0xf, 0x9);
        // Writes the processor refuses get #GP(0) and change nothing: CR4.VMXE, CR4.PKE,
        // CR0.NW without CD, and (in long mode) CR4 without PAE.
        v.regs.efer = 0x500;
        for (cr, val) in [(4, 0x2020), (4, 0x40_0020), (0, 0xa000_0031), (4, 0)] {
            v.regs.inj_info = 0;
            v.regs.gpr[2] = val;
            let (cr0, cr4, rip) = (v.regs.cr0, v.regs.cr4, v.regs.rip);
            assert!(matches!(
                cr_access(&mut v, cr | 2 << 8, 0x1003, 0x0037_0fff),
                Step::Resume
            ));
            assert_eq!(v.regs.inj_info, 0x8000_0b0d, "CR{cr} = {val:#x}");
            assert_eq!((v.regs.cr0, v.regs.cr4, v.regs.rip), (cr0, cr4, rip));
        }
        // A write to CR8 without a TPR shadow is not emulated: the VM ends, the VMM lives.
        assert!(matches!(
            cr_access(&mut v, 8, 0x2000, 0x0037_0fff),
            Step::End(End::Unhandled { .. })
        ));
    }

    /// The CR4 bits a guest may set follow its CPUID: here VME through PGE, PCE and
    /// OSFXSR (no SSE, XSAVE, PCID or leaf-7 features), never more than the kernel
    /// takes.
    #[test]
    fn cr4_bits_follow_cpuid() {
        let some = |leaf: u32, _: u32| match leaf {
            0 => [0xd, 0, 0, 0],
            1 => [0, 0, 0x0000_0028, 0x0178_bfff],
            _ => [0; 4],
        };
        assert_eq!(cr4_supported(some), 0x3ff);
        let all = |_: u32, _: u32| [0xd, u32::MAX, u32::MAX, u32::MAX];
        assert_eq!(cr4_supported(all), 0x0037_0fff);
    }
}
