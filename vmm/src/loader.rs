//! Loading a static ELF64 guest image (the test guest, `guests/README.md`): every
//! `PT_LOAD` segment is copied to its *physical* address (`p_paddr`) in guest RAM and
//! zero-filled up to its memory size; the entry point is the ELF entry.

use core::fmt;

use elf::abi::{EM_X86_64, PT_LOAD};
use elf::endian::LittleEndian;
use elf::ElfBytes;

use crate::vcpu::GuestMemory;

/// Why an image was not loaded. The doc comment of each variant is its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// Not an ELF64 little-endian file.
    NotElf,
    /// Not an x86-64 executable.
    WrongMachine,
    /// A segment lies outside the file, or its file size exceeds its memory size.
    BadSegment,
    /// No loadable segment.
    Empty,
    /// A segment does not fit in guest RAM.
    DoesNotFit {
        /// Guest-physical address.
        addr: u64,
        /// Size in bytes.
        size: u64,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LoadError::NotElf => write!(f, "not an ELF64 little-endian file"),
            LoadError::WrongMachine => write!(f, "not an x86-64 executable"),
            LoadError::BadSegment => write!(f, "a segment lies outside the file"),
            LoadError::Empty => write!(f, "no loadable segment"),
            LoadError::DoesNotFit { addr, size } => {
                write!(
                    f,
                    "segment of {size:#x} bytes at {addr:#x} is not in guest RAM"
                )
            }
        }
    }
}

/// Loads `image` into `mem`; returns the entry point.
pub fn load_elf<M: GuestMemory + ?Sized>(mem: &mut M, image: &[u8]) -> Result<u64, LoadError> {
    let file = ElfBytes::<LittleEndian>::minimal_parse(image).map_err(|_| LoadError::NotElf)?;
    if file.ehdr.class != elf::file::Class::ELF64 {
        return Err(LoadError::NotElf);
    }
    if file.ehdr.e_machine != EM_X86_64 {
        return Err(LoadError::WrongMachine);
    }
    let phdrs = file.segments().ok_or(LoadError::Empty)?;
    let mut loaded = 0;
    for ph in phdrs.iter().filter(|p| p.p_type == PT_LOAD) {
        if ph.p_filesz > ph.p_memsz {
            return Err(LoadError::BadSegment);
        }
        let data = usize::try_from(ph.p_offset)
            .ok()
            .zip(usize::try_from(ph.p_filesz).ok())
            .and_then(|(o, n)| image.get(o..o.checked_add(n)?))
            .ok_or(LoadError::BadSegment)?;
        let unfit = LoadError::DoesNotFit {
            addr: ph.p_paddr,
            size: ph.p_memsz,
        };
        ph.p_paddr.checked_add(ph.p_memsz).ok_or(unfit)?;
        mem.write(ph.p_paddr, data).map_err(|_| unfit)?;
        // Zero the rest (the .bss), a page of zeros at a time.
        let zeros = [0u8; 512];
        let mut at = ph.p_paddr + ph.p_filesz;
        let end = ph.p_paddr + ph.p_memsz;
        while at < end {
            let n = (end - at).min(zeros.len() as u64);
            mem.write(at, &zeros[..n as usize]).map_err(|_| unfit)?;
            at += n;
        }
        loaded += 1;
    }
    if loaded == 0 {
        return Err(LoadError::Empty);
    }
    Ok(file.ehdr.e_entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::MockVcpu;
    use std::vec::Vec;

    /// A minimal ELF64 executable: header, one program header, `code` at file offset
    /// 0x78, loaded at `paddr` with `memsz` bytes.
    fn elf(machine: u16, paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&machine.to_le_bytes());
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&paddr.wrapping_add(4).to_le_bytes()); // entry
        f.extend_from_slice(&64u64.to_le_bytes()); // phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // shoff
        f.extend_from_slice(&0u32.to_le_bytes()); // flags
        for v in [64u16, 56, 1, 64, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        // Program header.
        f.extend_from_slice(&PT_LOAD.to_le_bytes());
        f.extend_from_slice(&7u32.to_le_bytes());
        f.extend_from_slice(&0x78u64.to_le_bytes()); // offset
        f.extend_from_slice(&0xffff_8000_0000_0000u64.to_le_bytes()); // vaddr: ignored
        f.extend_from_slice(&paddr.to_le_bytes());
        f.extend_from_slice(&(code.len() as u64).to_le_bytes());
        f.extend_from_slice(&memsz.to_le_bytes());
        f.extend_from_slice(&0x1000u64.to_le_bytes());
        assert_eq!(f.len(), 0x78);
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn loads_at_the_physical_address_and_zeroes_bss() {
        let mut v = MockVcpu::new(0x20_0000);
        v.mem[0x10_0000..0x10_2000].fill(0xcc);
        let image = elf(EM_X86_64, 0x10_0000, &[1, 2, 3, 4, 5], 0x1800);
        assert_eq!(load_elf(&mut v, &image), Ok(0x10_0004));
        assert_eq!(&v.mem[0x10_0000..0x10_0005], &[1, 2, 3, 4, 5]);
        assert!(v.mem[0x10_0005..0x10_1800].iter().all(|&b| b == 0));
        assert_eq!(v.mem[0x10_1800], 0xcc);
    }

    #[test]
    fn refuses_bad_images() {
        let mut v = MockVcpu::new(0x20_0000);
        assert_eq!(load_elf(&mut v, b"not an elf"), Err(LoadError::NotElf));
        assert_eq!(
            load_elf(&mut v, &elf(3, 0x1000, &[0], 1)),
            Err(LoadError::WrongMachine)
        );
        assert_eq!(
            load_elf(&mut v, &elf(EM_X86_64, 0x1f_ffff, &[0, 0], 2)),
            Err(LoadError::DoesNotFit {
                addr: 0x1f_ffff,
                size: 2
            })
        );
        assert_eq!(
            load_elf(&mut v, &elf(EM_X86_64, u64::MAX - 1, &[0], 4)),
            Err(LoadError::DoesNotFit {
                addr: u64::MAX - 1,
                size: 4
            })
        );
        assert_eq!(
            load_elf(&mut v, &elf(EM_X86_64, 0x1000, &[0, 1], 1)),
            Err(LoadError::BadSegment)
        );
        let mut cut = elf(EM_X86_64, 0x1000, &[0; 16], 16);
        cut.truncate(0x80);
        assert_eq!(load_elf(&mut v, &cut), Err(LoadError::BadSegment));
    }
}
