//! Whether QEMU can use KVM to give our kernel hardware virtualization.
//!
//! The device node alone proves nothing: some hosts have a paravirtual `/dev/kvm` that
//! creates VMs but never returns from running an ordinary guest. KVM is "usable" only
//! when `KVM_GET_SUPPORTED_CPUID` offers VMX (leaf 1, ECX bit 5) or SVM (leaf
//! 0x8000_0001, ECX bit 2), which is what QEMU needs to pass virtualization on to the
//! kernel. `PEREGRINE_KVM=0` forces it off. When in doubt: no KVM.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

/// `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// `_IOWR(KVMIO, 0x05, struct kvm_cpuid2)` (the struct's header is 8 bytes).
const KVM_GET_SUPPORTED_CPUID: libc::c_ulong = 0xC008_AE05;
/// The only KVM API version there is.
const KVM_API_VERSION: libc::c_int = 12;
/// Room for this many `kvm_cpuid_entry2` (10 words each).
const MAX_ENTRIES: usize = 256;

/// Which virtualization extension KVM can offer a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Virt {
    /// Intel VT-x.
    Vmx,
    /// AMD SVM.
    Svm,
}

/// KVM's offer, probed once per process.
pub fn usable() -> Option<Virt> {
    static PROBE: OnceLock<Option<Virt>> = OnceLock::new();
    *PROBE.get_or_init(|| {
        if std::env::var("PEREGRINE_KVM").is_ok_and(|v| v == "0" || v == "off") {
            return None;
        }
        probe()
    })
}

fn probe() -> Option<Virt> {
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .ok()?;
    let fd = kvm.as_raw_fd();
    // SAFETY: KVM_GET_API_VERSION takes no argument; `fd` is an open file we own.
    let version = unsafe { libc::ioctl(fd, KVM_GET_API_VERSION as _, 0) };
    if version != KVM_API_VERSION {
        return None;
    }
    // struct kvm_cpuid2 { u32 nent; u32 padding; struct kvm_cpuid_entry2 entries[]; }
    // struct kvm_cpuid_entry2 { u32 function, index, flags, eax, ebx, ecx, edx, pad[3]; }
    let mut buf = vec![0u32; 2 + 10 * MAX_ENTRIES];
    buf[0] = MAX_ENTRIES as u32;
    // SAFETY: `buf` is a kvm_cpuid2 with room for `nent` = MAX_ENTRIES entries, as the
    // ioctl requires; it lives across the call and the kernel writes only within it.
    let rc = unsafe { libc::ioctl(fd, KVM_GET_SUPPORTED_CPUID as _, buf.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    let nent = (buf[0] as usize).min(MAX_ENTRIES);
    let entries = buf[2..2 + 10 * nent].chunks_exact(10);
    virt_from_cpuid(entries.map(|e| (e[0], e[5])))
}

/// The extension offered by CPUID entries given as (function, ECX).
pub fn virt_from_cpuid(entries: impl Iterator<Item = (u32, u32)>) -> Option<Virt> {
    let mut found = None;
    for (function, ecx) in entries {
        match function {
            1 if ecx & (1 << 5) != 0 => found = Some(Virt::Vmx),
            0x8000_0001 if ecx & (1 << 2) != 0 => found = found.or(Some(Virt::Svm)),
            _ => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_bits_decide() {
        assert_eq!(
            virt_from_cpuid([(1, 0), (0x8000_0001, 0)].into_iter()),
            None
        );
        assert_eq!(virt_from_cpuid([(1, 1 << 5)].into_iter()), Some(Virt::Vmx));
        assert_eq!(
            virt_from_cpuid([(0x8000_0001, 1 << 2)].into_iter()),
            Some(Virt::Svm)
        );
        assert_eq!(virt_from_cpuid([(7, u32::MAX)].into_iter()), None);
    }

    #[test]
    fn probe_does_not_crash() {
        // Whatever this host has, probing must return rather than hang or fault.
        let _ = usable();
    }
}
