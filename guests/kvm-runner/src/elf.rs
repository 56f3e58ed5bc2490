//! The guest image: a static ELF64 for x86_64 whose `PT_LOAD` segments are loaded at
//! their physical addresses.

use std::fmt;

/// One loadable segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment<'a> {
    /// Guest-physical load address.
    pub paddr: u64,
    /// The bytes from the file.
    pub data: &'a [u8],
    /// Size in memory (the rest beyond `data` is zero).
    pub memsz: u64,
}

/// A parsed guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image<'a> {
    /// The entry point.
    pub entry: u64,
    /// The `PT_LOAD` segments.
    pub segments: Vec<Segment<'a>>,
}

/// Why an image cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElfError {
    /// Not an ELF64 little-endian x86_64 executable.
    NotElf64,
    /// A header or segment lies outside the file.
    Truncated,
    /// A segment does not fit in guest RAM of this many bytes.
    OutsideRam(u64),
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElfError::NotElf64 => write!(f, "not an ELF64 little-endian x86_64 executable"),
            ElfError::Truncated => write!(f, "a header or segment lies outside the file"),
            ElfError::OutsideRam(ram) => {
                write!(f, "a segment lies outside guest RAM ({ram:#x} bytes)")
            }
        }
    }
}

impl std::error::Error for ElfError {}

const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;

fn u16_at(b: &[u8], at: usize) -> Result<u16, ElfError> {
    let s = b.get(at..at + 2).ok_or(ElfError::Truncated)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, ElfError> {
    let s = b.get(at..at + 4).ok_or(ElfError::Truncated)?;
    Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, ElfError> {
    let s = b.get(at..at + 8).ok_or(ElfError::Truncated)?;
    Ok(u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

/// Parses `file` and checks that every segment fits in `ram` bytes from 0.
pub fn parse(file: &[u8], ram: u64) -> Result<Image<'_>, ElfError> {
    if file.get(..4) != Some(b"\x7fELF") || file.get(4) != Some(&2) || file.get(5) != Some(&1) {
        return Err(ElfError::NotElf64);
    }
    if u16_at(file, 18)? != EM_X86_64 {
        return Err(ElfError::NotElf64);
    }
    let entry = u64_at(file, 24)?;
    let phoff = u64_at(file, 32)? as usize;
    let phentsize = u16_at(file, 54)? as usize;
    let phnum = u16_at(file, 56)? as usize;
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i.checked_mul(phentsize).ok_or(ElfError::Truncated)?)
            .ok_or(ElfError::Truncated)?;
        if u32_at(file, ph)? != PT_LOAD {
            continue;
        }
        let offset = u64_at(file, ph + 8)? as usize;
        let paddr = u64_at(file, ph + 24)?;
        let filesz = u64_at(file, ph + 32)? as usize;
        let memsz = u64_at(file, ph + 40)?;
        let data = offset
            .checked_add(filesz)
            .and_then(|end| file.get(offset..end))
            .ok_or(ElfError::Truncated)?;
        if (filesz as u64) > memsz || paddr.checked_add(memsz).is_none_or(|end| end > ram) {
            return Err(ElfError::OutsideRam(ram));
        }
        segments.push(Segment { paddr, data, memsz });
    }
    Ok(Image { entry, segments })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with one PT_LOAD of `data` at `paddr` and one PT_NOTE.
    pub fn elf(paddr: u64, data: &[u8], memsz: u64) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 2 * 56];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&2u16.to_le_bytes());
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE, skipped
        let ph = 64 + 56;
        let offset = f.len() as u64;
        f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&(data.len() as u64).to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn loads_pt_load_segments() {
        let f = elf(0x10_0000, b"\xf4\xeb\xfd", 0x1000);
        let img = parse(&f, 4 << 20).unwrap();
        assert_eq!(img.entry, 0x10_0000);
        assert_eq!(
            img.segments,
            vec![Segment {
                paddr: 0x10_0000,
                data: b"\xf4\xeb\xfd",
                memsz: 0x1000
            }]
        );
    }

    #[test]
    fn rejects_bad_images() {
        assert_eq!(parse(b"MZ", 1 << 20), Err(ElfError::NotElf64));
        let f = elf(0x10_0000, b"abc", 3);
        assert_eq!(parse(&f[..f.len() - 1], 4 << 20), Err(ElfError::Truncated));
        assert_eq!(parse(&f, 0x10_0002), Err(ElfError::OutsideRam(0x10_0002)));
        let huge = elf(u64::MAX - 1, b"abc", 3);
        assert!(parse(&huge, 4 << 20).is_err());
        let mut wrong = f.clone();
        wrong[18] = 3; // EM_386
        assert_eq!(parse(&wrong, 4 << 20), Err(ElfError::NotElf64));
    }
}
