//! The KVM-compatible paravirtual CPUID leaves (Linux `Documentation/virt/kvm/x86/cpuid.rst`),
//! so an unmodified Linux finds "KVM" and uses kvmclock ([`crate::kvmclock`]).
//!
//! | leaf       | eax                 | ebx, ecx, edx            |
//! |------------|---------------------|--------------------------|
//! | 0x40000000 | highest leaf        | "KVMKVMKVM\0\0\0"        |
//! | 0x40000001 | KVM_FEATURE_* bits  | edx: hints (none)        |
//!
//! Linux looks here only when leaf 1 ECX bit 31 ("hypervisor present") is set: the
//! VMM sets [`HYPERVISOR_BIT`] in the leaf-1 values it passes through.

/// Leaf 1 ECX bit 31: running under a hypervisor.
pub const HYPERVISOR_BIT: u32 = 1 << 31;
/// The signature leaf.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// The features leaf.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// KVM_FEATURE_* bits of leaf 0x40000001 EAX.
pub mod features {
    /// kvmclock at the old MSRs (0x11, 0x12).
    pub const CLOCKSOURCE: u32 = 1 << 0;
    /// Port 0x80 delays are not needed.
    pub const NOP_IO_DELAY: u32 = 1 << 1;
    /// kvmclock at MSR_KVM_WALL_CLOCK_NEW / MSR_KVM_SYSTEM_TIME_NEW.
    pub const CLOCKSOURCE2: u32 = 1 << 3;
    /// Paravirtual EOI (MSR_KVM_PV_EOI_EN).
    pub const PV_EOI: u32 = 1 << 6;
    /// The kvmclock's PVCLOCK_TSC_STABLE_BIT may be trusted.
    pub const CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
}

/// The paravirtual features the VMM implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmCpuid {
    /// KVM_FEATURE_* bits offered.
    pub features: u32,
}

impl Default for KvmCpuid {
    /// kvmclock (new MSRs, stable bit) and no port-0x80 delays; PV EOI only where the
    /// VMM implements it.
    fn default() -> Self {
        Self {
            features: features::CLOCKSOURCE2
                | features::NOP_IO_DELAY
                | features::CLOCKSOURCE_STABLE_BIT,
        }
    }
}

impl KvmCpuid {
    /// `[eax, ebx, ecx, edx]` of `leaf` if it is one of the paravirtual leaves; `None`
    /// for any other (the caller answers those).
    pub fn leaf(&self, leaf: u32) -> Option<[u32; 4]> {
        match leaf {
            KVM_CPUID_SIGNATURE => Some([
                KVM_CPUID_FEATURES,
                KVM_SIGNATURE[0],
                KVM_SIGNATURE[1],
                KVM_SIGNATURE[2],
            ]),
            KVM_CPUID_FEATURES => Some([self.features, 0, 0, 0]),
            // The rest of the hypervisor range reads zero, as on KVM.
            0x4000_0002..=0x4000_00ff => Some([0; 4]),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_spells_kvm() {
        let c = KvmCpuid::default();
        let [max, b, cx, d] = c.leaf(KVM_CPUID_SIGNATURE).unwrap();
        assert_eq!(max, 0x4000_0001);
        let mut sig = std::vec::Vec::new();
        for r in [b, cx, d] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(sig, b"KVMKVMKVM\0\0\0");
    }

    #[test]
    fn features_match_the_linux_abi() {
        let c = KvmCpuid::default();
        let [eax, ebx, ecx, edx] = c.leaf(KVM_CPUID_FEATURES).unwrap();
        assert_eq!(eax, (1 << 3) | (1 << 1) | (1 << 24));
        assert_eq!((ebx, ecx, edx), (0, 0, 0));
        let pv = KvmCpuid {
            features: c.features | features::PV_EOI,
        };
        assert_eq!(pv.leaf(KVM_CPUID_FEATURES).unwrap()[0] & (1 << 6), 1 << 6);
        assert_eq!(c.leaf(0x4000_0010), Some([0; 4]));
        assert_eq!(c.leaf(0x0000_0001), None);
        assert_eq!(c.leaf(0x4000_0100), None);
    }
}
