//! RDMSR and WRMSR, answered as KVM answers a Linux guest.
//!
//! Every MSR exits (the kernel intercepts them all): the architectural ones the vCPU's
//! state holds (EFER, the SYSCALL and SYSENTER MSRs, FS/GS base, KERNEL_GS_BASE, PAT,
//! TSC) are read from and written to the register file; the local APIC's (APIC base,
//! TSC deadline, the x2APIC range) and kvmclock's go to their models; a few more are
//! kept per vCPU. Any other MSR reads 0 and ignores writes, as KVM with `ignore_msrs`:
//! Linux probes many model-specific MSRs and copes with zero.

use super::Pc;
use crate::vcpu::Platform;

/// MSR numbers (SDM vol. 4, AMD APM vol. 2 appendix A).
pub mod nr {
    pub const TSC: u32 = 0x10;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MCG_CAP: u32 = 0x179;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const PAT: u32 = 0x277;
    pub const EFER: u32 = 0xc000_0080;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const FMASK: u32 = 0xc000_0084;
    pub const FS_BASE: u32 = 0xc000_0100;
    pub const GS_BASE: u32 = 0xc000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const TSC_AUX: u32 = 0xc000_0103;
}

/// Per-vCPU MSRs with no home in the register file.
#[derive(Default)]
pub struct Msrs {
    tsc_aux: u64,
    misc_enable: u64,
}

fn canonical(v: u64) -> bool {
    ((v as i64) << 16 >> 16) as u64 == v
}

impl Pc {
    /// RDMSR: the value, or `None` for #GP(0).
    pub(super) fn read_msr<P: Platform + ?Sized>(
        &self,
        p: &mut P,
        vcpu: u32,
        msr: u32,
    ) -> Option<u64> {
        let r = p.regs();
        Some(match msr {
            nr::TSC => r.tsc_val,
            nr::SYSENTER_CS => r.sysenter_cs,
            nr::SYSENTER_ESP => r.sysenter_esp,
            nr::SYSENTER_EIP => r.sysenter_eip,
            nr::PAT => r.pat,
            nr::EFER => r.efer,
            nr::STAR => r.star,
            nr::LSTAR => r.lstar,
            nr::CSTAR => r.cstar,
            nr::FMASK => r.fmask,
            nr::FS_BASE => r.fs.base,
            nr::GS_BASE => r.gs.base,
            nr::KERNEL_GS_BASE => r.kernel_gs_base,
            nr::TSC_AUX => self.msrs[vcpu as usize].lock().tsc_aux,
            nr::MISC_ENABLE => self.msrs[vcpu as usize].lock().misc_enable,
            nr::MCG_CAP => 0,
            m if super::lapic_msr(m) => {
                return self.lapics[vcpu as usize].lock().read_msr(m);
            }
            m => {
                if let Some(v) = self.kvmclock[vcpu as usize].lock().rdmsr(m) {
                    return Some(v);
                }
                0
            }
        })
    }

    /// WRMSR: false for #GP(0).
    pub(super) fn write_msr<P: Platform + ?Sized>(
        &self,
        p: &mut P,
        vcpu: u32,
        msr: u32,
        v: u64,
    ) -> bool {
        let tsc = p.regs().tsc_val;
        let r = p.regs_mut();
        match msr {
            nr::TSC => {}
            nr::SYSENTER_CS => r.set_sysenter_cs(v & 0xffff),
            nr::SYSENTER_ESP | nr::SYSENTER_EIP => {
                if !canonical(v) {
                    return false;
                }
                if msr == nr::SYSENTER_ESP {
                    r.set_sysenter_esp(v);
                } else {
                    r.set_sysenter_eip(v);
                }
            }
            nr::PAT => {
                if (0..8).any(|i| !matches!((v >> (i * 8)) as u8, 0 | 1 | 4 | 5 | 6 | 7)) {
                    return false;
                }
                r.set_pat(v);
            }
            nr::EFER => {
                // SCE, LME, LMA (kept as is), NXE, FFXSR.
                const OK: u64 = 1 | 1 << 8 | 1 << 10 | 1 << 11 | 1 << 14;
                if v & !OK != 0 {
                    return false;
                }
                r.set_efer((v & !(1 << 10)) | (r.efer & (1 << 10)));
            }
            nr::STAR => r.set_star(v),
            nr::LSTAR | nr::CSTAR | nr::KERNEL_GS_BASE => {
                if !canonical(v) {
                    return false;
                }
                match msr {
                    nr::LSTAR => r.set_lstar(v),
                    nr::CSTAR => r.set_cstar(v),
                    _ => r.set_kernel_gs_base(v),
                }
            }
            nr::FMASK => r.set_fmask(v & 0xffff_ffff),
            nr::FS_BASE | nr::GS_BASE => {
                if !canonical(v) {
                    return false;
                }
                if msr == nr::FS_BASE {
                    r.set_fs_base(v);
                } else {
                    r.set_gs_base(v);
                }
            }
            nr::TSC_AUX => self.msrs[vcpu as usize].lock().tsc_aux = v & 0xffff_ffff,
            nr::MISC_ENABLE => self.msrs[vcpu as usize].lock().misc_enable = v,
            // A new timer deadline is the platform's to notice (`Pc::next_deadline`).
            m if super::lapic_msr(m) => return self.lapics[vcpu as usize].lock().write_msr(m, v),
            m => {
                let now = self.sample(tsc);
                let wall = self.boot_wall_ns();
                let mut clock = self.kvmclock[vcpu as usize].lock();
                // A kvmclock structure the guest placed outside RAM leaves the clock
                // off; the write itself succeeds (as on KVM).
                let _ = clock.wrmsr(p, m, v, now, wall);
            }
        }
        true
    }
}
