//! CPU features (CPUID, VMX capability MSRs) and per-CPU control-register setup.

use raw_cpuid::CpuId;
use spin::Once;

use super::cr::{self, cr0, cr4};
use super::msr::{efer, rdmsr, wrmsr, Msr};
use peregrine_abi::hip::Features;

/// What this machine offers (read on the BSP; CPUs are assumed alike).
#[derive(Debug, Clone, Copy)]
pub struct CpuInfo {
    /// HIP feature bits.
    pub features: Features,
    /// NX (EFER.NXE) available.
    pub nx: bool,
    /// 1 GiB pages.
    pub page1g: bool,
    /// x2APIC available.
    pub x2apic: bool,
    /// TSC-deadline timer mode.
    pub tsc_deadline: bool,
    /// SMEP.
    pub smep: bool,
    /// XSAVE (and the XCR0 value the kernel sets).
    pub xsave: Option<u64>,
    /// XSAVEOPT (CPUID.(EAX=0DH,ECX=1):EAX[0]).
    pub xsaveopt: bool,
    /// TSC frequency from CPUID 0x15 in kHz, if reported.
    pub cpuid_tsc_khz: Option<u64>,
    /// Processor base frequency from CPUID 0x16 in kHz, if reported.
    pub cpuid_base_khz: Option<u64>,
    /// Vendor string.
    pub vendor: [u8; 12],
}

static INFO: Once<CpuInfo> = Once::new();
/// [`CpuInfo::xsave`]'s XCR0, 0 without XSAVE: what the VM entry paths compare a guest's
/// XCR0 with, in one load.
static HOST_XCR0: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// The XCR0 every CPU's kernel runs with (0: no XSAVE).
#[inline(always)]
pub fn host_xcr0() -> u64 {
    HOST_XCR0.load(core::sync::atomic::Ordering::Relaxed)
}

/// Detects the features (once, on the BSP).
pub fn detect() -> &'static CpuInfo {
    INFO.call_once(|| {
        let id = CpuId::new();
        let fi = id.get_feature_info();
        let ext = id.get_extended_processor_and_feature_identifiers();
        let ef = id.get_extended_feature_info();
        let mut f = Features::empty();
        let vmx = fi.as_ref().is_some_and(|f| f.has_vmx());
        let svm = ext.as_ref().is_some_and(|e| e.has_svm());
        if vmx {
            f |= Features::VMX;
            // SAFETY: the VMX capability MSRs exist when CPUID reports VMX.
            let (proc1, proc2) =
                unsafe { (rdmsr(Msr::VmxProcbasedCtls), rdmsr(Msr::VmxProcbasedCtls2)) };
            if proc1 & (1 << 63) != 0 {
                let allowed = proc2 >> 32;
                if allowed & (1 << 1) != 0 {
                    f |= Features::EPT;
                }
                if allowed & (1 << 5) != 0 {
                    f |= Features::VPID;
                }
                if allowed & (1 << 7) != 0 {
                    f |= Features::UG;
                }
            }
        }
        if svm {
            f |= Features::SVM;
            if let Some(s) = id.get_svm_info() {
                if s.has_nested_paging() {
                    f |= Features::NPT;
                }
                if s.has_nrip() {
                    f |= Features::NRIPS;
                }
            }
        }
        let x2apic = fi.as_ref().is_some_and(|f| f.has_x2apic());
        if x2apic {
            f |= Features::X2APIC;
        }
        if id
            .get_advanced_power_mgmt_info()
            .is_some_and(|a| a.has_invariant_tsc())
        {
            f |= Features::INVARIANT_TSC;
        }
        let xsave = if fi.as_ref().is_some_and(|f| f.has_xsave()) {
            f |= Features::XSAVE;
            // x87 | SSE | AVX where supported (CPUID 0xd.0 EAX: supported XCR0 bits).
            let r = raw_cpuid::native_cpuid::cpuid_count(0xd, 0);
            Some(u64::from(r.eax) & 0x7 | 0x3)
        } else {
            None
        };
        let cpuid_tsc_khz = id
            .get_tsc_info()
            .and_then(|t| t.tsc_frequency())
            .map(|hz| hz / 1000);
        let cpuid_base_khz = id
            .get_processor_frequency_info()
            .map(|p| u64::from(p.processor_base_frequency()) * 1000)
            .filter(|&k| k != 0);
        let mut vendor = [0u8; 12];
        if let Some(v) = id.get_vendor_info() {
            vendor.copy_from_slice(&v.as_str().as_bytes()[..12]);
        }
        CpuInfo {
            features: f,
            nx: ext.as_ref().is_some_and(|e| e.has_execute_disable()),
            page1g: ext.as_ref().is_some_and(|e| e.has_1gib_pages()),
            x2apic,
            tsc_deadline: fi.as_ref().is_some_and(|f| f.has_tsc_deadline()),
            smep: ef.as_ref().is_some_and(|e| e.has_smep()),
            xsave,
            xsaveopt: xsave.is_some() && raw_cpuid::native_cpuid::cpuid_count(0xd, 1).eax & 1 != 0,
            cpuid_tsc_khz,
            cpuid_base_khz,
            vendor,
        }
    })
}

/// The detected features.
pub fn info() -> &'static CpuInfo {
    INFO.get().expect("cpu::detect not called")
}

/// Sets CR0/CR4/EFER/XCR0 on this CPU: SSE (OSFXSR, OSXMMEXCPT), global pages, XSAVE,
/// SMEP, NX, SYSCALL. SMAP is one of the mitigations `spec::init_cpu` sets.
///
/// # Safety
/// Call once per CPU during its bring-up.
pub unsafe fn init_cpu() {
    let i = info();
    let mut c0 = cr::read_cr0();
    c0 = (c0 & !(cr0::EM | cr0::TS)) | cr0::MP | cr0::NE | cr0::WP;
    let mut c4 = cr::read_cr4() | cr4::PAE | cr4::PGE | cr4::OSFXSR | cr4::OSXMMEXCPT;
    if i.xsave.is_some() {
        c4 |= cr4::OSXSAVE;
    }
    if i.smep {
        c4 |= cr4::SMEP;
    }
    // SAFETY: every bit set is supported per CPUID; paging and long mode are unchanged.
    unsafe {
        cr::write_cr0(c0);
        cr::write_cr4(c4);
        if let Some(x) = i.xsave {
            cr::write_xcr0(x);
            HOST_XCR0.store(x, core::sync::atomic::Ordering::Relaxed);
        }
        let mut e = rdmsr(Msr::Efer) | efer::SCE;
        if i.nx {
            e |= efer::NXE;
        }
        wrmsr(Msr::Efer, e);
    }
}

/// Human-readable feature list for the banner.
pub fn feature_string(f: Features, out: &mut impl core::fmt::Write) -> core::fmt::Result {
    let names = [
        (Features::VMX, "VMX"),
        (Features::EPT, "EPT"),
        (Features::VPID, "VPID"),
        (Features::UG, "UG"),
        (Features::SVM, "SVM"),
        (Features::NPT, "NPT"),
        (Features::NRIPS, "NRIPS"),
        (Features::X2APIC, "x2APIC"),
        (Features::INVARIANT_TSC, "invTSC"),
        (Features::XSAVE, "XSAVE"),
    ];
    let mut first = true;
    for (bit, n) in names {
        if f.contains(bit) {
            write!(out, "{}{}", if first { "" } else { " " }, n)?;
            first = false;
        }
    }
    if first {
        write!(out, "none")?;
    }
    Ok(())
}
