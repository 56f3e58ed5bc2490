//! Which transient-execution mitigations the kernel turns on, decided from what the CPU
//! enumerates (CPUID, IA32_ARCH_CAPABILITIES) the way Linux and KVM decide, and the boot
//! lines that list them. The kernel reads the facts and applies the choice
//! (`arch/x86/spec.rs`); the decision itself is pure and tested here.
//!
//! The threat model: protection domains and VMs are mutually distrusting; a VM and the
//! VMM that serves it (its own PD, which maps all of the guest's memory anyway) form one
//! trust domain. Barriers are paid where a CPU moves between trust domains through a VM
//! (KVM's IBPB on switching VMs; an IBPB when guest code ran and the CPU then switches to
//! another host address space, which covers what Linux's VMSCAPE mitigation covers for
//! every PD but the VM's own VMM) — never on every IPC between host PDs, which stays as
//! cheap as seL4's default configuration makes it (seL4 offers IBPB and RSB filling on
//! context switch as options, off by default; so does Linux, per process). Branch
//! predictor isolation between host PDs (Spectre v2 user to user), Spectre v1 gadgets
//! (no index masking under speculation), SSB, SMT sibling attacks (no STIBP, no core
//! scheduling) and Meltdown (no KPTI) are not handled; the boot line names the last on an
//! affected CPU.

use core::fmt;

/// What the CPU enumerates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// GenuineIntel.
    pub intel: bool,
    /// AuthenticAMD or HygonGenuine.
    pub amd: bool,
    /// VMX or SVM: the kernel runs VMs.
    pub virt: bool,
    /// VMX (L1TF's VM-entry flush concerns VT-x only).
    pub vmx: bool,
    /// SMAP (CPUID.7.0:EBX[20]).
    pub smap: bool,
    /// IBPB: CPUID.7.0:EDX[26] (Intel) or CPUID.8000_0008:EBX[12] (AMD).
    pub ibpb: bool,
    /// IBPB also clears the return-address predictor: always on Intel, on AMD when
    /// CPUID.8000_0008:EBX[30] (IBPB_RET) says so.
    pub ibpb_ret: bool,
    /// IA32_SPEC_CTRL with IBRS (CPUID.7.0:EDX[26]).
    pub spec_ctrl: bool,
    /// VERW clears the CPU buffers (CPUID.7.0:EDX[10], MD_CLEAR).
    pub md_clear: bool,
    /// IA32_FLUSH_CMD.L1D_FLUSH (CPUID.7.0:EDX[28]).
    pub l1d_flush: bool,
    /// IA32_ARCH_CAPABILITIES (0 when CPUID.7.0:EDX[29] does not enumerate it).
    pub arch_cap: u64,
    /// AMD Automatic IBRS (CPUID.8000_0021:EAX[8]).
    pub auto_ibrs: bool,
}

/// IA32_ARCH_CAPABILITIES bits (Intel's "CPUID Enumeration and Architectural MSRs").
pub mod arch_cap {
    /// Not susceptible to Meltdown (rogue data cache load) nor L1TF.
    pub const RDCL_NO: u64 = 1 << 0;
    /// Enhanced IBRS.
    pub const IBRS_ALL: u64 = 1 << 1;
    /// No L1D flush needed on VM entry.
    pub const SKIP_L1DFL_VMENTRY: u64 = 1 << 3;
    /// Not susceptible to MDS.
    pub const MDS_NO: u64 = 1 << 5;
}

/// Mitigations in force (bits of [`Choice::on`]), in the order the boot line lists them.
pub mod on {
    /// Eager FPU switching: every EC switch saves the outgoing state and loads the
    /// incoming one (LazyFP, CVE-2018-3665).
    pub const EAGER_FPU: u32 = 1 << 0;
    /// CR4.SMAP: the kernel faults on any access to user pages.
    pub const SMAP: u32 = 1 << 1;
    /// Enhanced IBRS on, once at boot (Spectre v2 against the kernel).
    pub const EIBRS: u32 = 1 << 2;
    /// AMD Automatic IBRS on, once at boot (Spectre v2 against the kernel).
    pub const AUTO_IBRS: u32 = 1 << 3;
    /// The return stack buffer is overwritten right after every VM exit, before the
    /// first `ret` (guest-planted return predictions).
    pub const RSB_VMEXIT: u32 = 1 << 4;
    /// IBPB when a CPU enters a different VM than the last one it ran (guest to guest).
    pub const IBPB_VM: u32 = 1 << 5;
    /// IBPB when a CPU that ran guest code switches to another host address space
    /// (guest to the PDs other than its VMM; VMSCAPE-style).
    pub const IBPB_HOST: u32 = 1 << 6;
    /// VERW before every return to user mode and VM entry (MDS).
    pub const VERW: u32 = 1 << 7;
    /// L1D flush before every VM entry (L1TF).
    pub const L1D_FLUSH_VM: u32 = 1 << 8;

    /// Names, in order.
    pub const NAMES: [(u32, &str); 9] = [
        (EAGER_FPU, "eager-fpu"),
        (SMAP, "smap"),
        (EIBRS, "eibrs"),
        (AUTO_IBRS, "auto-ibrs"),
        (RSB_VMEXIT, "rsb-vmexit"),
        (IBPB_VM, "ibpb-vm"),
        (IBPB_HOST, "ibpb-host"),
        (VERW, "verw"),
        (L1D_FLUSH_VM, "l1d-flush-vm"),
    ];
}

/// Issues the CPU is affected by that stay unmitigated (bits of [`Choice::open`]).
pub mod open {
    /// Meltdown: no kernel page-table isolation (the physmap is in every address space).
    pub const MELTDOWN: u32 = 1 << 0;
    /// Spectre v2 against the kernel: no eIBRS/AutoIBRS, and no retpolines (stable Rust
    /// and the prebuilt `core` offer none).
    pub const SPECTRE_V2_KERNEL: u32 = 1 << 1;
    /// Spectre v2 between VMs and from guests into host PDs: no IBPB.
    pub const SPECTRE_V2_VM: u32 = 1 << 2;
    /// MDS: affected, but VERW does not clear the buffers (no MD_CLEAR microcode).
    pub const MDS: u32 = 1 << 3;
    /// L1TF from guests: affected, but no L1D_FLUSH to flush with on VM entry.
    pub const L1TF_VM: u32 = 1 << 4;

    /// Names with the reason, in order.
    pub const NAMES: [(u32, &str); 5] = [
        (MELTDOWN, "meltdown (no KPTI)"),
        (
            SPECTRE_V2_KERNEL,
            "spectre-v2-kernel (no eIBRS/AutoIBRS, no retpolines)",
        ),
        (SPECTRE_V2_VM, "spectre-v2-vm (no IBPB)"),
        (MDS, "mds (no MD_CLEAR microcode)"),
        (L1TF_VM, "l1tf-vm (no L1D_FLUSH)"),
    ];
}

/// The decision: what is on, what stays open, and whether `mitigations=off` asked for
/// nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Choice {
    /// Bits of [`on`].
    pub on: u32,
    /// Bits of [`open`].
    pub open: u32,
    /// `mitigations=off`: everything off on purpose.
    pub off: bool,
}

/// Decides the mitigations for a CPU with `f`; `off` is `mitigations=off`.
pub fn decide(f: &Facts, off: bool) -> Choice {
    if off {
        return Choice {
            on: 0,
            open: 0,
            off: true,
        };
    }
    let cap = |b: u64| f.arch_cap & b != 0;
    let mut on = on::EAGER_FPU;
    let mut open = 0;
    if f.smap {
        on |= on::SMAP;
    }
    // Meltdown and L1TF: Intel parts without RDCL_NO (AMD is not affected).
    let meltdown = !f.amd && !cap(arch_cap::RDCL_NO);
    if meltdown {
        open |= open::MELTDOWN;
    }
    // Spectre v2 against the kernel: eIBRS (Intel) or AutoIBRS (AMD), set once.
    if f.spec_ctrl && cap(arch_cap::IBRS_ALL) {
        on |= on::EIBRS;
    } else if f.auto_ibrs {
        on |= on::AUTO_IBRS;
    } else {
        open |= open::SPECTRE_V2_KERNEL;
    }
    // MDS: Intel parts without MDS_NO; VERW clears the buffers with MD_CLEAR.
    if f.intel && !cap(arch_cap::MDS_NO) {
        if f.md_clear {
            on |= on::VERW;
        } else {
            open |= open::MDS;
        }
    }
    if f.virt {
        on |= on::RSB_VMEXIT;
        if f.ibpb {
            on |= on::IBPB_VM | on::IBPB_HOST;
        } else {
            open |= open::SPECTRE_V2_VM;
        }
        if f.vmx && f.intel && meltdown && !cap(arch_cap::SKIP_L1DFL_VMENTRY) {
            if f.l1d_flush {
                on |= on::L1D_FLUSH_VM;
            } else {
                open |= open::L1TF_VM;
            }
        }
    }
    Choice {
        on,
        open,
        off: false,
    }
}

impl Choice {
    /// The boot line: `mitigations: eager-fpu smap …` or `mitigations: off`.
    pub fn write_line(&self, out: &mut impl fmt::Write) -> fmt::Result {
        write!(out, "mitigations:")?;
        if self.off {
            return write!(out, " off");
        }
        for (bit, name) in on::NAMES {
            if self.on & bit != 0 {
                write!(out, " {name}")?;
            }
        }
        Ok(())
    }

    /// The second boot line, when something stays open: `not mitigated: meltdown (no
    /// KPTI), …`.
    pub fn write_open(&self, out: &mut impl fmt::Write) -> fmt::Result {
        write!(out, "not mitigated:")?;
        let mut first = true;
        for (bit, name) in open::NAMES {
            if self.open & bit != 0 {
                write!(out, "{} {name}", if first { "" } else { "," })?;
                first = false;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(c: &Choice) -> String {
        let mut s = String::new();
        c.write_line(&mut s).unwrap();
        s
    }

    fn open_line(c: &Choice) -> String {
        let mut s = String::new();
        c.write_open(&mut s).unwrap();
        s
    }

    /// QEMU's `EPYC` model (Zen 1): SVM, SMAP, no IBPB, no AutoIBRS.
    fn qemu_epyc() -> Facts {
        Facts {
            amd: true,
            virt: true,
            smap: true,
            ..Facts::default()
        }
    }

    #[test]
    fn amd_without_ibpb() {
        let c = decide(&qemu_epyc(), false);
        assert_eq!(line(&c), "mitigations: eager-fpu smap rsb-vmexit");
        assert_eq!(
            open_line(&c),
            "not mitigated: spectre-v2-kernel (no eIBRS/AutoIBRS, no retpolines), \
             spectre-v2-vm (no IBPB)"
        );
    }

    #[test]
    fn zen4_has_everything_it_needs() {
        let f = Facts {
            ibpb: true,
            ibpb_ret: true,
            auto_ibrs: true,
            ..qemu_epyc()
        };
        let c = decide(&f, false);
        assert_eq!(
            line(&c),
            "mitigations: eager-fpu smap auto-ibrs rsb-vmexit ibpb-vm ibpb-host"
        );
        assert_eq!(c.open, 0);
    }

    /// Skylake with old microcode: no ARCH_CAPABILITIES, no MD_CLEAR, no L1D_FLUSH.
    #[test]
    fn old_intel_is_affected_by_everything() {
        let f = Facts {
            intel: true,
            virt: true,
            vmx: true,
            smap: true,
            ibpb: true,
            ibpb_ret: true,
            spec_ctrl: true,
            ..Facts::default()
        };
        let c = decide(&f, false);
        assert_eq!(
            line(&c),
            "mitigations: eager-fpu smap rsb-vmexit ibpb-vm ibpb-host"
        );
        assert_eq!(
            c.open,
            open::MELTDOWN | open::SPECTRE_V2_KERNEL | open::MDS | open::L1TF_VM
        );
        assert!(open_line(&c).starts_with("not mitigated: meltdown (no KPTI), "));
    }

    #[test]
    fn intel_with_microcode() {
        let f = Facts {
            intel: true,
            virt: true,
            vmx: true,
            smap: true,
            ibpb: true,
            ibpb_ret: true,
            spec_ctrl: true,
            md_clear: true,
            l1d_flush: true,
            ..Facts::default()
        };
        let c = decide(&f, false);
        assert_eq!(
            line(&c),
            "mitigations: eager-fpu smap rsb-vmexit ibpb-vm ibpb-host verw l1d-flush-vm"
        );
        assert_eq!(c.open, open::MELTDOWN | open::SPECTRE_V2_KERNEL);
    }

    #[test]
    fn intel_not_affected_by_meltdown_mds_l1tf() {
        let f = Facts {
            intel: true,
            virt: true,
            vmx: true,
            smap: true,
            ibpb: true,
            ibpb_ret: true,
            spec_ctrl: true,
            md_clear: true,
            l1d_flush: true,
            arch_cap: arch_cap::RDCL_NO | arch_cap::IBRS_ALL | arch_cap::MDS_NO,
            ..Facts::default()
        };
        let c = decide(&f, false);
        assert_eq!(
            line(&c),
            "mitigations: eager-fpu smap eibrs rsb-vmexit ibpb-vm ibpb-host"
        );
        assert_eq!(c.open, 0);
    }

    #[test]
    fn skip_l1dfl_vmentry_needs_no_flush() {
        let f = Facts {
            intel: true,
            virt: true,
            vmx: true,
            l1d_flush: true,
            arch_cap: arch_cap::SKIP_L1DFL_VMENTRY,
            ..Facts::default()
        };
        assert_eq!(decide(&f, false).on & on::L1D_FLUSH_VM, 0);
    }

    #[test]
    fn no_virtualization_no_vm_mitigations() {
        let f = Facts {
            virt: false,
            ibpb: true,
            ..qemu_epyc()
        };
        let c = decide(&f, false);
        assert_eq!(c.on & (on::RSB_VMEXIT | on::IBPB_VM | on::IBPB_HOST), 0);
        assert_eq!(c.open & open::SPECTRE_V2_VM, 0);
    }

    #[test]
    fn off_turns_everything_off() {
        let c = decide(&qemu_epyc(), true);
        assert_eq!(line(&c), "mitigations: off");
        assert_eq!((c.on, c.open), (0, 0));
    }
}
