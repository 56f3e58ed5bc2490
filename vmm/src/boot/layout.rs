//! The boot protocol's structures, byte for byte (Linux
//! `arch/x86/include/uapi/asm/bootparam.h`, Documentation/arch/x86/boot.rst and
//! zero-page.rst): `repr(C, packed)` with every offset pinned by a `const` assert, and
//! converted to and from little-endian bytes field by field (no `unsafe`).

use core::mem::{offset_of, size_of};

/// A field that has a little-endian byte form.
pub trait Le: Copy {
    /// Reads the field from the start of `b` (which holds at least its size).
    fn get(b: &[u8]) -> Self;
    /// Writes the field to the start of `b`.
    fn put(self, b: &mut [u8]);
}

macro_rules! le_int {
    ($($t:ty),*) => {$(
        impl Le for $t {
            fn get(b: &[u8]) -> Self {
                let mut a = [0u8; size_of::<$t>()];
                a.copy_from_slice(&b[..size_of::<$t>()]);
                <$t>::from_le_bytes(a)
            }
            fn put(self, b: &mut [u8]) {
                b[..size_of::<$t>()].copy_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
le_int!(u8, u16, u32, u64);

impl<const N: usize> Le for [u8; N] {
    fn get(b: &[u8]) -> Self {
        let mut a = [0u8; N];
        a.copy_from_slice(&b[..N]);
        a
    }
    fn put(self, b: &mut [u8]) {
        b[..N].copy_from_slice(&self);
    }
}

/// Declares a packed structure and its byte conversions from one field list.
macro_rules! layout {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident: $t:ty,)* }) => {
        $(#[$m])*
        #[repr(C, packed)]
        #[derive(Clone, Copy)]
        pub struct $name { $($(#[$fm])* pub $f: $t,)* }

        impl $name {
            /// Size in bytes.
            pub const SIZE: usize = size_of::<$name>();

            /// Reads the structure from the start of `b`; `None` if `b` is too short.
            pub fn from_bytes(b: &[u8]) -> Option<Self> {
                let b = b.get(..Self::SIZE)?;
                Some(Self { $($f: <$t as Le>::get(&b[offset_of!($name, $f)..]),)* })
            }

            /// Writes the structure to the start of `b` (at least [`Self::SIZE`] bytes).
            pub fn write_to(&self, b: &mut [u8]) {
                $(<$t as Le>::put(self.$f, &mut b[offset_of!($name, $f)..]);)*
            }

            /// All zeros.
            pub fn zeroed() -> Self {
                Self::from_bytes(&[0u8; size_of::<$name>()]).unwrap_or_else(|| unreachable!())
            }
        }

        impl Le for $name {
            fn get(b: &[u8]) -> Self {
                Self::from_bytes(b).unwrap_or_else(Self::zeroed)
            }
            fn put(self, b: &mut [u8]) {
                self.write_to(b)
            }
        }
    };
}

layout! {
    /// The real-mode kernel header (`struct setup_header`), at 0x1f1 in the image and in
    /// the zero page.
    pub struct SetupHeader {
        pub setup_sects: u8,
        pub root_flags: u16,
        pub syssize: u32,
        pub ram_size: u16,
        pub vid_mode: u16,
        pub root_dev: u16,
        pub boot_flag: u16,
        pub jump: u16,
        pub header: u32,
        pub version: u16,
        pub realmode_swtch: u32,
        pub start_sys_seg: u16,
        pub kernel_version: u16,
        pub type_of_loader: u8,
        pub loadflags: u8,
        pub setup_move_size: u16,
        pub code32_start: u32,
        pub ramdisk_image: u32,
        pub ramdisk_size: u32,
        pub bootsect_kludge: u32,
        pub heap_end_ptr: u16,
        pub ext_loader_ver: u8,
        pub ext_loader_type: u8,
        pub cmd_line_ptr: u32,
        pub initrd_addr_max: u32,
        pub kernel_alignment: u32,
        pub relocatable_kernel: u8,
        pub min_alignment: u8,
        pub xloadflags: u16,
        pub cmdline_size: u32,
        pub hardware_subarch: u32,
        pub hardware_subarch_data: u64,
        pub payload_offset: u32,
        pub payload_length: u32,
        pub setup_data: u64,
        pub pref_address: u64,
        pub init_size: u32,
        pub handover_offset: u32,
        pub kernel_info_offset: u32,
    }
}

layout! {
    /// One e820 entry (`struct boot_e820_entry`).
    pub struct E820Entry {
        pub addr: u64,
        pub size: u64,
        pub typ: u32,
    }
}

layout! {
    /// The zero page (`struct boot_params`). Blobs the VMM does not fill are bytes.
    pub struct BootParams {
        pub screen_info: [u8; 0x40],
        pub apm_bios_info: [u8; 0x14],
        pub _pad2: [u8; 4],
        pub tboot_addr: u64,
        pub ist_info: [u8; 0x10],
        pub acpi_rsdp_addr: u64,
        pub _pad3: [u8; 8],
        pub hd0_info: [u8; 16],
        pub hd1_info: [u8; 16],
        pub sys_desc_table: [u8; 16],
        pub olpc_ofw_header: [u8; 16],
        pub ext_ramdisk_image: u32,
        pub ext_ramdisk_size: u32,
        pub ext_cmd_line_ptr: u32,
        pub _pad4: [u8; 112],
        pub cc_blob_address: u32,
        pub edid_info: [u8; 0x80],
        pub efi_info: [u8; 0x20],
        pub alt_mem_k: u32,
        pub scratch: u32,
        pub e820_entries: u8,
        pub eddbuf_entries: u8,
        pub edd_mbr_sig_buf_entries: u8,
        pub kbd_status: u8,
        pub secure_boot: u8,
        pub _pad5: [u8; 2],
        pub sentinel: u8,
        pub _pad6: [u8; 1],
        pub hdr: SetupHeader,
        pub _pad7: [u8; 0x290 - 0x1f1 - SetupHeader::SIZE],
        pub edd_mbr_sig_buffer: [u8; 0x40],
        pub e820_table: [u8; E820_MAX * E820Entry::SIZE],
        pub _pad8: [u8; 48],
        pub eddbuf: [u8; 0x1ec],
        pub _pad9: [u8; 276],
    }
}

/// Entries in the zero page's e820 table.
pub const E820_MAX: usize = 128;

impl BootParams {
    /// Sets e820 entry `i` (below [`E820_MAX`]).
    pub fn set_e820(&mut self, i: usize, e: E820Entry) {
        let mut t = self.e820_table;
        e.write_to(&mut t[i * E820Entry::SIZE..]);
        self.e820_table = t;
    }

    /// E820 entry `i`.
    pub fn e820(&self, i: usize) -> E820Entry {
        let t = self.e820_table;
        E820Entry::get(&t[i * E820Entry::SIZE..])
    }
}

// The layouts, pinned (offsets from bootparam.h's comments and boot.rst).
const _: () = {
    assert!(SetupHeader::SIZE == 0x26c - 0x1f1);
    assert!(offset_of!(SetupHeader, boot_flag) == 0x1fe - 0x1f1);
    assert!(offset_of!(SetupHeader, header) == 0x202 - 0x1f1);
    assert!(offset_of!(SetupHeader, version) == 0x206 - 0x1f1);
    assert!(offset_of!(SetupHeader, type_of_loader) == 0x210 - 0x1f1);
    assert!(offset_of!(SetupHeader, loadflags) == 0x211 - 0x1f1);
    assert!(offset_of!(SetupHeader, ramdisk_image) == 0x218 - 0x1f1);
    assert!(offset_of!(SetupHeader, cmd_line_ptr) == 0x228 - 0x1f1);
    assert!(offset_of!(SetupHeader, initrd_addr_max) == 0x22c - 0x1f1);
    assert!(offset_of!(SetupHeader, xloadflags) == 0x236 - 0x1f1);
    assert!(offset_of!(SetupHeader, cmdline_size) == 0x238 - 0x1f1);
    assert!(offset_of!(SetupHeader, pref_address) == 0x258 - 0x1f1);
    assert!(offset_of!(SetupHeader, init_size) == 0x260 - 0x1f1);
    assert!(E820Entry::SIZE == 20);
    assert!(BootParams::SIZE == 4096);
    assert!(offset_of!(BootParams, acpi_rsdp_addr) == 0x070);
    assert!(offset_of!(BootParams, ext_ramdisk_image) == 0x0c0);
    assert!(offset_of!(BootParams, ext_cmd_line_ptr) == 0x0c8);
    assert!(offset_of!(BootParams, cc_blob_address) == 0x13c);
    assert!(offset_of!(BootParams, e820_entries) == 0x1e8);
    assert!(offset_of!(BootParams, sentinel) == 0x1ef);
    assert!(offset_of!(BootParams, hdr) == 0x1f1);
    assert!(offset_of!(BootParams, edd_mbr_sig_buffer) == 0x290);
    assert!(offset_of!(BootParams, e820_table) == 0x2d0);
    assert!(offset_of!(BootParams, eddbuf) == 0xd00);
};
