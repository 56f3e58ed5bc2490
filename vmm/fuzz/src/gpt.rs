//! GPT parsing (`peregrine_blkproto::gpt::parse`) of a fuzzed disk image: any image
//! must end in an error or partitions that lie inside the header's usable range and
//! the disk, without overlaps; never a panic.
//!
//! Input: byte 0: bit 0 recomputes the primary copy's CRC32s (header at block 1, its
//! entry array where the header says) before parsing, bit 1 the backup's (header at the
//! last block), so that the fuzzer gets past the checksums to the fields behind them;
//! bit 2 picks 4096-byte blocks (else 512). The rest is the disk image (whole blocks;
//! a trailing partial block is dropped).

use peregrine_blkproto::gpt::{parse, SliceDisk};

/// The GPT's CRC32 (reflected 0xedb88320).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes"))
}

/// Recomputes the CRCs of the copy whose header is at block `lba`, where its fields
/// allow (an entry array off the image, or too large, is left as it is).
fn fix(img: &mut [u8], bs: usize, lba: usize) {
    let h = lba * bs;
    if h + bs > img.len() {
        return;
    }
    let entries = u64::from(le32(img, h + 80));
    let size = u64::from(le32(img, h + 84));
    let start = le64(img, h + 72);
    let bytes = entries.saturating_mul(size);
    if bytes <= 1 << 20 {
        let from = start.saturating_mul(bs as u64);
        if let Some(end) = from.checked_add(bytes).filter(|e| *e <= img.len() as u64) {
            let crc = crc32(&img[from as usize..end as usize]);
            img[h + 88..h + 92].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let hsize = (le32(img, h + 12) as usize).clamp(92, bs);
    img[h + 16..h + 20].fill(0);
    let crc = crc32(&img[h..h + hsize]);
    img[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
}

/// One input.
pub fn run(input: &[u8]) {
    let Some((&flags, image)) = input.split_first() else {
        return;
    };
    let bs = if flags & 4 != 0 { 4096 } else { 512 };
    let mut img = image[..image.len() / bs * bs].to_vec();
    let blocks = img.len() / bs;
    if flags & 1 != 0 {
        fix(&mut img, bs, 1);
    }
    if flags & 2 != 0 && blocks > 0 {
        fix(&mut img, bs, blocks - 1);
    }
    let Ok(g) = parse(&mut SliceDisk {
        data: &img,
        block_size: bs as u32,
    }) else {
        return;
    };
    assert!(g.first_usable_lba <= g.last_usable_lba && g.last_usable_lba < blocks as u64);
    let mut parts: Vec<_> = g
        .partitions
        .iter()
        .map(|p| (p.first_lba, p.last_lba))
        .collect();
    parts.sort_unstable();
    for &(a, b) in &parts {
        assert!(g.first_usable_lba <= a && a <= b && b <= g.last_usable_lba);
    }
    for w in parts.windows(2) {
        assert!(w[0].1 < w[1].0, "overlap");
    }
}
