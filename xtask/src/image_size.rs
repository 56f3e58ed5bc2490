//! The kernel image's footprint for `bench ipc`: bytes of code, read-only data, data and
//! BSS from the ELF's allocated sections (the `elf` crate the kernel and the VMM use to
//! load images), as figures in unit `bytes`, mode `elf`.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use elf::endian::AnyEndian;
use elf::ElfBytes;

use crate::bench::Figure;

/// SHF_ALLOC, SHF_WRITE, SHF_EXECINSTR (ELF gABI).
const ALLOC: u64 = 0x2;
const WRITE: u64 = 0x1;
const EXEC: u64 = 0x4;
/// SHT_NOBITS: occupies memory, not file space (BSS).
const NOBITS: u32 = 8;

/// Sizes in bytes: (text, rodata, data, bss) of the allocated sections of `bytes`.
pub fn sizes(bytes: &[u8]) -> Result<[u64; 4]> {
    // (The crate's errors implement `std::error::Error` only with its `std` feature.)
    let file = ElfBytes::<AnyEndian>::minimal_parse(bytes)
        .map_err(|e| anyhow!("parsing the ELF: {e:?}"))?;
    let sections = file
        .section_headers()
        .context("the ELF has no section headers")?;
    let names = file
        .section_headers_with_strtab()
        .map_err(|e| anyhow!("reading the section names: {e:?}"))?
        .1;
    let mut s = [0u64; 4];
    for h in sections.iter().filter(|h| h.sh_flags & ALLOC != 0) {
        // By the name where it says (the kernel's linker script gives `.rodata` the
        // write flag), else by the flags.
        let name = names
            .as_ref()
            .and_then(|t| t.get(h.sh_name as usize).ok())
            .unwrap_or("");
        let i = if h.sh_type == NOBITS {
            3
        } else if h.sh_flags & EXEC != 0 {
            0
        } else if name.starts_with(".rodata") || h.sh_flags & WRITE == 0 {
            1
        } else {
            2
        };
        s[i] += h.sh_size;
    }
    Ok(s)
}

/// The figures `kernel_text`, `kernel_rodata`, `kernel_data`, `kernel_bss` of the kernel
/// image at `path`.
pub fn figures(path: &Path) -> Result<Vec<Figure>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let s = sizes(&bytes).with_context(|| format!("{}", path.display()))?;
    Ok(
        ["kernel_text", "kernel_rodata", "kernel_data", "kernel_bss"]
            .iter()
            .zip(s)
            .map(|(name, v)| Figure {
                figure: name.to_string(),
                unit: "bytes".into(),
                mode: "elf".into(),
                peregrine: Some(v as f64),
                ..Figure::default()
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_tools_own_image_has_code_and_data() {
        // Any ELF will do: the test binary itself (a host ELF with text, rodata, data
        // and BSS sections).
        let me = std::env::current_exe().unwrap();
        let s = sizes(&std::fs::read(me).unwrap()).unwrap();
        assert!(s[0] > 10_000 && s[1] > 0 && s[2] > 0, "{s:?}");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(sizes(b"not an elf").is_err());
    }
}
