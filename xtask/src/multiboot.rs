//! Checks the kernel image's Multiboot (v1) header the way QEMU's `-kernel` loader reads
//! it: QEMU loads an ELF64 kernel only through the a.out-kludge address fields (flag bit
//! 16), so a header without them, or with addresses that do not fit the file, fails to
//! boot. Checking this after every build turns a silent "no bootable device" into a clear
//! message.

use std::fmt;

/// The Multiboot v1 header magic.
pub const MAGIC: u32 = 0x1BAD_B002;
/// Flag bit 16: the address fields (a.out kludge) are valid.
pub const FLAG_ADDRESSES: u32 = 1 << 16;
/// The header must lie within this many bytes from the start of the file.
pub const SEARCH_LIMIT: usize = 8192;

/// A Multiboot header found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// File offset of the header.
    pub offset: usize,
    /// The flags word.
    pub flags: u32,
    /// Physical address the header is loaded at.
    pub header_addr: u32,
    /// Physical address of the start of the loaded text.
    pub load_addr: u32,
    /// End of the loaded part (0: up to the end of the file).
    pub load_end_addr: u32,
    /// End of the zeroed bss (0: none).
    pub bss_end_addr: u32,
    /// Entry point.
    pub entry_addr: u32,
}

impl Header {
    /// File offset at which the loaded part begins.
    pub fn load_offset(&self) -> usize {
        self.offset - (self.header_addr - self.load_addr) as usize
    }
}

/// Why an image is not a kernel QEMU's Multiboot loader accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// No magic 0x1BADB002 at a 4-byte aligned offset in the first 8 KiB.
    NoHeader,
    /// magic + flags + checksum is not 0 (mod 2^32).
    BadChecksum {
        offset: usize,
        flags: u32,
        checksum: u32,
    },
    /// The header lacks the address fields (flag bit 16); QEMU cannot load ELF64 without.
    NoAddressFields { flags: u32 },
    /// The header is cut off by the end of the file.
    Truncated { offset: usize },
    /// header_addr below load_addr, or the load start would lie before the file start.
    BadHeaderAddr {
        header_addr: u32,
        load_addr: u32,
        offset: usize,
    },
    /// load_end_addr below load_addr, or past the end of the file.
    BadLoadEnd {
        load_addr: u32,
        load_end_addr: u32,
        available: usize,
    },
    /// bss_end_addr nonzero and below the end of the loaded part.
    BadBssEnd { load_end: u64, bss_end_addr: u32 },
    /// entry_addr outside the loaded part.
    BadEntry {
        entry_addr: u32,
        load_addr: u32,
        load_end: u64,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::NoHeader => write!(
                f,
                "no Multiboot header (magic {MAGIC:#010x}, 4-byte aligned) in the first \
                 {SEARCH_LIMIT} bytes"
            ),
            Error::BadChecksum {
                offset,
                flags,
                checksum,
            } => write!(
                f,
                "Multiboot header at offset {offset:#x}: bad checksum {checksum:#010x} for \
                 flags {flags:#010x} (magic + flags + checksum must be 0)"
            ),
            Error::NoAddressFields { flags } => write!(
                f,
                "Multiboot flags {flags:#010x} lack bit 16 (a.out kludge address fields); \
                 QEMU cannot load an ELF64 kernel without them"
            ),
            Error::Truncated { offset } => {
                write!(
                    f,
                    "Multiboot header at offset {offset:#x} is cut off by the end of file"
                )
            }
            Error::BadHeaderAddr {
                header_addr,
                load_addr,
                offset,
            } => write!(
                f,
                "Multiboot header_addr {header_addr:#x} and load_addr {load_addr:#x} do not fit \
                 the header's file offset {offset:#x} (need load_addr <= header_addr and \
                 header_addr - load_addr <= offset)"
            ),
            Error::BadLoadEnd {
                load_addr,
                load_end_addr,
                available,
            } => write!(
                f,
                "Multiboot load_end_addr {load_end_addr:#x} does not fit: load_addr \
                 {load_addr:#x}, {available:#x} bytes of file available from the load offset"
            ),
            Error::BadBssEnd {
                load_end,
                bss_end_addr,
            } => write!(
                f,
                "Multiboot bss_end_addr {bss_end_addr:#x} lies below the end of the loaded \
                 part {load_end:#x}"
            ),
            Error::BadEntry {
                entry_addr,
                load_addr,
                load_end,
            } => write!(
                f,
                "Multiboot entry_addr {entry_addr:#x} outside the loaded part \
                 [{load_addr:#x}, {load_end:#x})"
            ),
        }
    }
}

impl std::error::Error for Error {}

fn word(image: &[u8], at: usize) -> Option<u32> {
    let bytes = image.get(at..at + 4)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// Finds and checks the Multiboot header of `image` (the whole kernel file).
pub fn check(image: &[u8]) -> Result<Header, Error> {
    let limit = image.len().min(SEARCH_LIMIT);
    let offset = (0..limit.saturating_sub(3))
        .step_by(4)
        .find(|&at| word(image, at) == Some(MAGIC))
        .ok_or(Error::NoHeader)?;
    let field = |i: usize| word(image, offset + 4 * i).ok_or(Error::Truncated { offset });
    let flags = field(1)?;
    let checksum = field(2)?;
    if MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
        return Err(Error::BadChecksum {
            offset,
            flags,
            checksum,
        });
    }
    if flags & FLAG_ADDRESSES == 0 {
        return Err(Error::NoAddressFields { flags });
    }
    let header = Header {
        offset,
        flags,
        header_addr: field(3)?,
        load_addr: field(4)?,
        load_end_addr: field(5)?,
        bss_end_addr: field(6)?,
        entry_addr: field(7)?,
    };
    let Header {
        header_addr,
        load_addr,
        load_end_addr,
        bss_end_addr,
        entry_addr,
        ..
    } = header;
    if header_addr < load_addr || (header_addr - load_addr) as usize > offset {
        return Err(Error::BadHeaderAddr {
            header_addr,
            load_addr,
            offset,
        });
    }
    let available = image.len() - header.load_offset();
    let load_end = if load_end_addr == 0 {
        u64::from(load_addr) + available as u64
    } else {
        if load_end_addr < load_addr || (load_end_addr - load_addr) as usize > available {
            return Err(Error::BadLoadEnd {
                load_addr,
                load_end_addr,
                available,
            });
        }
        u64::from(load_end_addr)
    };
    if bss_end_addr != 0 && u64::from(bss_end_addr) < load_end {
        return Err(Error::BadBssEnd {
            load_end,
            bss_end_addr,
        });
    }
    if u64::from(entry_addr) < u64::from(load_addr) || u64::from(entry_addr) >= load_end {
        return Err(Error::BadEntry {
            entry_addr,
            load_addr,
            load_end,
        });
    }
    Ok(header)
}

/// Builds a Multiboot header with address fields (32 bytes), for tests and
/// [`crate::testimage`].
pub fn header_bytes(
    flags: u32,
    header_addr: u32,
    load_addr: u32,
    load_end_addr: u32,
    bss_end_addr: u32,
    entry_addr: u32,
) -> Vec<u8> {
    let checksum = 0u32.wrapping_sub(MAGIC).wrapping_sub(flags);
    [
        MAGIC,
        flags,
        checksum,
        header_addr,
        load_addr,
        load_end_addr,
        bss_end_addr,
        entry_addr,
    ]
    .iter()
    .flat_map(|w| w.to_le_bytes())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOAD: u32 = 0x10_0000;

    /// An image of `size` bytes with a header at `offset` whose load start is file
    /// offset 0.
    fn image(offset: usize, size: usize, f: impl Fn(&mut [u32; 5])) -> Vec<u8> {
        let mut img = vec![0u8; size];
        let mut a = [
            LOAD + offset as u32,
            LOAD,
            LOAD + size as u32,
            LOAD + size as u32 + 0x1000,
            LOAD + offset as u32 + 32,
        ];
        f(&mut a);
        let h = header_bytes(FLAG_ADDRESSES | 0b11, a[0], a[1], a[2], a[3], a[4]);
        img[offset..offset + 32].copy_from_slice(&h);
        img
    }

    #[test]
    fn accepts_a_good_header() {
        let h = check(&image(0x40, 0x3000, |_| {})).unwrap();
        assert_eq!(h.offset, 0x40);
        assert_eq!(h.load_offset(), 0);
        assert_eq!(h.entry_addr, LOAD + 0x60);
    }

    #[test]
    fn accepts_load_offset_inside_file_and_zero_ends() {
        // Load from file offset 0x1000 (e.g. an ELF's first segment), header at 0x1000.
        let img = image(0x1000, 0x2000, |a| {
            a[0] = LOAD;
            a[2] = 0;
            a[3] = 0;
            a[4] = LOAD + 0x100;
        });
        let h = check(&img).unwrap();
        assert_eq!(h.load_offset(), 0x1000);
    }

    #[test]
    fn rejects_missing_magic_and_unaligned_or_late_magic() {
        assert_eq!(check(&[0u8; 64]), Err(Error::NoHeader));
        let mut img = vec![0u8; 0x3000];
        img[2..6].copy_from_slice(&MAGIC.to_le_bytes());
        assert_eq!(check(&img), Err(Error::NoHeader));
        let mut img = vec![0u8; 0x3000];
        img[0x2000..0x2004].copy_from_slice(&MAGIC.to_le_bytes());
        assert_eq!(check(&img), Err(Error::NoHeader));
    }

    #[test]
    fn rejects_bad_checksum() {
        let mut img = image(0, 0x1000, |_| {});
        img[8] ^= 1;
        assert!(matches!(
            check(&img),
            Err(Error::BadChecksum { offset: 0, .. })
        ));
    }

    #[test]
    fn rejects_header_without_address_fields() {
        let mut img = vec![0u8; 0x100];
        img[..32].copy_from_slice(&header_bytes(0b11, 0, 0, 0, 0, 0));
        assert_eq!(check(&img), Err(Error::NoAddressFields { flags: 0b11 }));
    }

    #[test]
    fn rejects_truncated_header() {
        let img = image(0, 0x100, |_| {});
        assert_eq!(check(&img[..20]), Err(Error::Truncated { offset: 0 }));
    }

    #[test]
    fn rejects_header_addr_before_load_or_file_start() {
        let img = image(0x40, 0x1000, |a| a[0] = LOAD - 4);
        assert!(matches!(check(&img), Err(Error::BadHeaderAddr { .. })));
        let img = image(0x40, 0x1000, |a| a[0] = LOAD + 0x80);
        assert!(matches!(check(&img), Err(Error::BadHeaderAddr { .. })));
    }

    #[test]
    fn rejects_load_end_past_file_or_before_load() {
        let img = image(0x40, 0x1000, |a| a[2] = LOAD + 0x1001);
        assert!(matches!(
            check(&img),
            Err(Error::BadLoadEnd {
                available: 0x1000,
                ..
            })
        ));
        let img = image(0x40, 0x1000, |a| a[2] = LOAD - 1);
        assert!(matches!(check(&img), Err(Error::BadLoadEnd { .. })));
    }

    #[test]
    fn rejects_bss_end_below_load_end() {
        let img = image(0x40, 0x1000, |a| a[3] = LOAD + 0x800);
        assert!(matches!(check(&img), Err(Error::BadBssEnd { .. })));
    }

    #[test]
    fn rejects_entry_outside_loaded_part() {
        let img = image(0x40, 0x1000, |a| a[4] = LOAD + 0x1000);
        assert!(matches!(check(&img), Err(Error::BadEntry { .. })));
        let img = image(0x40, 0x1000, |a| a[4] = LOAD - 1);
        assert!(matches!(check(&img), Err(Error::BadEntry { .. })));
    }

    #[test]
    fn messages_name_the_problem() {
        let msg = Error::NoAddressFields { flags: 3 }.to_string();
        assert!(msg.contains("bit 16"), "{msg}");
        assert!(Error::NoHeader.to_string().contains("0x1badb002"));
    }
}
