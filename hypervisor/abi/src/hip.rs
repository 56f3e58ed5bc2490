//! The hypervisor information page, mapped read-only into the root PD.

/// "PGRN" little-endian.
pub const HIP_SIGNATURE: u32 = u32::from_le_bytes(*b"PGRN");

/// Where the kernel maps the HIP in the root PD.
pub const ROOT_HIP_ADDR: u64 = 0x7fff_ffff_d000;
/// Where the kernel maps the root EC's UTCB.
pub const ROOT_UTCB_ADDR: u64 = 0x7fff_ffff_e000;
/// First address above user space (the last canonical page is never user-mapped).
pub const USER_END: u64 = 0x7fff_ffff_f000;

/// Maximum CPUs the kernel supports.
pub const MAX_CPUS: usize = 64;
/// Maximum memory descriptors in the HIP.
pub const MAX_MEM_DESC: usize = 64;

bitflags::bitflags! {
    /// Platform features in [`Hip::features`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Features: u32 {
        /// Intel VT-x.
        const VMX = 1 << 0;
        /// AMD SVM.
        const SVM = 1 << 1;
        /// Extended page tables.
        const EPT = 1 << 2;
        /// Nested page tables.
        const NPT = 1 << 3;
        /// VPID.
        const VPID = 1 << 4;
        /// Unrestricted guest.
        const UG = 1 << 5;
        /// SVM NRIP save.
        const NRIPS = 1 << 6;
        /// x2APIC mode in use.
        const X2APIC = 1 << 7;
        /// IOMMU present.
        const IOMMU = 1 << 8;
        /// Invariant TSC.
        const INVARIANT_TSC = 1 << 9;
        /// XSAVE enabled.
        const XSAVE = 1 << 10;
    }
}

/// The fixed part of the HIP; the CPU and memory descriptor arrays follow at the offsets
/// it gives.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Hip {
    /// [`HIP_SIGNATURE`].
    pub signature: u32,
    /// Interface version ([`crate::API_VERSION`]).
    pub api_version: u32,
    /// Length of the whole HIP in bytes.
    pub length: u32,
    /// [`Features`] bits.
    pub features: u32,
    /// Offset of the first [`CpuDesc`].
    pub cpu_offset: u16,
    /// Size of one [`CpuDesc`].
    pub cpu_size: u16,
    /// Offset of the first [`MemDesc`].
    pub mem_offset: u16,
    /// Size of one [`MemDesc`].
    pub mem_size: u16,
    /// Number of CPU descriptors.
    pub num_cpus: u32,
    /// Number of memory descriptors.
    pub num_mem: u32,
    /// Number of selectors in an object space.
    pub sel_num: u64,
    /// Number of host event selectors (32).
    pub sel_exc: u64,
    /// Number of vCPU event selectors (256).
    pub sel_vmi: u64,
    /// Number of GSIs (semaphores at `sel::GSI_SM_BASE` in the kernel PD).
    pub num_gsi: u64,
    /// TSC frequency in kHz.
    pub freq_tsc_khz: u64,
    /// Local APIC timer frequency in kHz.
    pub freq_bus_khz: u64,
    /// Kernel-memory quota of the root PD in pages at start.
    pub root_quota: u64,
    /// Physical address of the ACPI RSDP (0 if none was found).
    pub rsdp: u64,
    /// The TSC when the kernel's first Rust code ran on the boot CPU (for boot-time
    /// figures: under QEMU `-icount shift=0`, instructions since the virtual clock
    /// started).
    pub boot_tsc: u64,
    /// The first message-signalled GSI: GSIs below it are I/O APIC pins, those from it
    /// up to `num_gsi` are delivered by MSI/MSI-X (`assign_gsi` answers the message).
    pub msi_gsi_base: u64,
}

const _: () = assert!(core::mem::size_of::<Hip>() == 112);

/// One CPU.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuDesc {
    /// 1 when the CPU is online.
    pub online: u8,
    /// SMT thread id.
    pub thread: u8,
    /// Core id.
    pub core: u8,
    /// Package id.
    pub package: u8,
    /// Local APIC id.
    pub apic_id: u32,
}

const _: () = assert!(core::mem::size_of::<CpuDesc>() == 8);

/// Kinds of [`MemDesc`] (positive: the firmware's memory-map type).
pub mod mem_kind {
    /// Usable RAM (given to the root through the kernel PD).
    pub const AVAILABLE: u32 = 1;
    /// Reserved by the firmware.
    pub const RESERVED: u32 = 2;
    /// ACPI tables.
    pub const ACPI: u32 = 3;
    /// ACPI NVS.
    pub const NVS: u32 = 4;
    /// Used by the kernel itself.
    pub const HYPERVISOR: u32 = 0xffff_ffff;
    /// A boot module; `aux` is the offset in the HIP page of its NUL-terminated command
    /// line (the kernel copies command lines into the HIP, since the firmware leaves them
    /// in memory the kernel keeps).
    pub const MODULE: u32 = 0xffff_fffe;
}

/// One region of physical memory.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemDesc {
    /// Physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// One of [`mem_kind`].
    pub kind: u32,
    /// Kind-specific (module: command line offset in the HIP page).
    pub aux: u32,
}

const _: () = assert!(core::mem::size_of::<MemDesc>() == 24);

impl Hip {
    /// Whether `f` is present.
    pub fn has(&self, f: Features) -> bool {
        Features::from_bits_truncate(self.features).contains(f)
    }
}
