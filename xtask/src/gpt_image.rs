//! GPT disk images written by the host: a protective MBR, the primary GPT (header at
//! block 1, a 128-entry array from block 2), the partitions' contents, and the backup
//! GPT (array, then header in the last block), with 512-byte blocks. The structures
//! and their CRC32s are `gpt_disk_types`'; [`read`] checks an image with the same
//! parser the disk service uses (`peregrine_blkproto::gpt`).
//!
//! Every partition starts on a 1 MiB boundary and is a whole number of MiB long; the
//! disk ends 1 MiB after the last partition (room for the backup GPT).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bytemuck::bytes_of;
use gpt_disk_types::{
    BlockSize, GptHeader, GptPartitionAttributes, GptPartitionEntry, GptPartitionEntryArray,
    GptPartitionEntryArrayLayout, GptPartitionEntrySize, GptPartitionName, GptPartitionType, Guid,
    Lba, LbaLe, MasterBootRecord, U32Le, U64Le,
};
use peregrine_blkproto::gpt::{self, BlockRead, Gpt, IoError};

/// Bytes per block.
pub const BLOCK: u64 = 512;
/// Partition alignment and size granule, in blocks (1 MiB).
pub const ALIGN_BLOCKS: u64 = (1 << 20) / BLOCK;
/// Entries in the partition entry array (the usual 128).
pub const ENTRIES: u32 = 128;
/// Bytes per entry.
pub const ENTRY_SIZE: u32 = 128;
/// Blocks of the entry array (16 KiB).
pub const ARRAY_BLOCKS: u64 = ENTRIES as u64 * ENTRY_SIZE as u64 / BLOCK;

/// The partition type "Linux filesystem data".
pub const LINUX_DATA: Guid = gpt_disk_types::guid!("0fc63daf-8483-4772-8e79-3d69d8477de4");
/// The partition type "Linux root (x86-64)" of the Discoverable Partitions Specification.
pub const LINUX_ROOT_X86_64: Guid = gpt_disk_types::guid!("4f68bce3-e8cd-4db1-96e7-fbcaf984b709");

/// What a partition holds when the image is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Zeros (a hole in the file).
    Zero,
    /// This file's bytes from the partition's first block, zeros after them.
    File(PathBuf),
    /// `crate::storage::pattern(seed, …)` over the whole partition, so reads hit data.
    Pattern(u64),
}

/// One partition to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The name (UCS-2 in the entry, at most 35 characters).
    pub name: String,
    /// The partition type.
    pub type_guid: Guid,
    /// The partition's own GUID.
    pub unique_guid: Guid,
    /// At least this many bytes (rounded up to whole MiB).
    pub min_bytes: u64,
    /// What it holds.
    pub content: Content,
}

/// Where [`layout`] put a partition: absolute blocks `first_lba..=last_lba`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First block.
    pub first_lba: u64,
    /// Last block, inclusive.
    pub last_lba: u64,
}

impl Extent {
    /// Blocks in the extent.
    pub fn blocks(&self) -> u64 {
        self.last_lba - self.first_lba + 1
    }

    /// Byte offset of the first block.
    pub fn offset(&self) -> u64 {
        self.first_lba * BLOCK
    }

    /// Bytes in the extent.
    pub fn bytes(&self) -> u64 {
        self.blocks() * BLOCK
    }
}

/// The disk's geometry: its size and each partition's extent, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Blocks on the disk.
    pub blocks: u64,
    /// The partitions' extents.
    pub extents: Vec<Extent>,
}

/// Places partitions of `min_bytes` each one after the other from 1 MiB, each a whole
/// number of MiB (at least one), and the disk's end 1 MiB after the last.
pub fn layout(min_bytes: &[u64]) -> Layout {
    let mut next = ALIGN_BLOCKS;
    let extents = min_bytes
        .iter()
        .map(|b| {
            let blocks = b.div_ceil(BLOCK).div_ceil(ALIGN_BLOCKS).max(1) * ALIGN_BLOCKS;
            let e = Extent {
                first_lba: next,
                last_lba: next + blocks - 1,
            };
            next += blocks;
            e
        })
        .collect();
    Layout {
        blocks: next + ALIGN_BLOCKS,
        extents,
    }
}

/// The GPT structures of a disk: block 0, the primary copy (header block, then the
/// array) and the backup copy (array, then header block), every CRC32 set.
#[derive(Debug, Clone)]
pub struct Tables {
    /// The protective MBR (one block).
    pub mbr: Vec<u8>,
    /// Blocks 1 to 1 + [`ARRAY_BLOCKS`].
    pub primary: Vec<u8>,
    /// The last 1 + [`ARRAY_BLOCKS`] blocks.
    pub backup: Vec<u8>,
}

/// The tables of a disk of `layout` with GUID `disk_guid` and partitions `parts`
/// (entries 0, 1, … in order; `parts[i]` at `layout.extents[i]`).
pub fn tables(layout: &Layout, disk_guid: Guid, parts: &[Part]) -> Result<Tables> {
    if parts.len() != layout.extents.len() || parts.len() > ENTRIES as usize {
        bail!(
            "{} partitions for {} extents (at most {ENTRIES})",
            parts.len(),
            layout.extents.len()
        );
    }
    let last = layout.blocks - 1;
    let block_size = BlockSize::from_usize(BLOCK as usize).context("block size")?;
    let array_layout = GptPartitionEntryArrayLayout {
        start_lba: Lba(2),
        entry_size: GptPartitionEntrySize::new(ENTRY_SIZE).context("entry size")?,
        num_entries: ENTRIES,
    };
    let mut storage = vec![0u8; (ARRAY_BLOCKS * BLOCK) as usize];
    let mut array = GptPartitionEntryArray::new(array_layout, block_size, &mut storage)
        .map_err(|e| anyhow::anyhow!("partition entry array: {e}"))?;
    for (i, (p, e)) in parts.iter().zip(&layout.extents).enumerate() {
        let name: GptPartitionName = p
            .name
            .parse()
            .map_err(|e| anyhow::anyhow!("partition name {:?}: {e}", p.name))?;
        let entry = array
            .get_partition_entry_mut(i as u32)
            .context("entry index")?;
        *entry = GptPartitionEntry {
            partition_type_guid: GptPartitionType(p.type_guid),
            unique_partition_guid: p.unique_guid,
            starting_lba: LbaLe::from_u64(e.first_lba),
            ending_lba: LbaLe::from_u64(e.last_lba),
            attributes: GptPartitionAttributes(U64Le::from_u64(0)),
            name,
        };
    }
    let array_crc = array.calculate_crc32();
    let header = |my: u64, alternate: u64, entries: u64| {
        let mut h = GptHeader {
            my_lba: LbaLe::from_u64(my),
            alternate_lba: LbaLe::from_u64(alternate),
            first_usable_lba: LbaLe::from_u64(2 + ARRAY_BLOCKS),
            last_usable_lba: LbaLe::from_u64(last - 1 - ARRAY_BLOCKS),
            disk_guid,
            partition_entry_lba: LbaLe::from_u64(entries),
            number_of_partition_entries: U32Le::from_u32(ENTRIES),
            size_of_partition_entry: U32Le::from_u32(ENTRY_SIZE),
            partition_entry_array_crc32: array_crc,
            ..GptHeader::default()
        };
        h.update_header_crc32();
        let mut block = vec![0u8; BLOCK as usize];
        block[..core::mem::size_of::<GptHeader>()].copy_from_slice(bytes_of(&h));
        block
    };
    let mut primary = header(1, last, 2);
    primary.extend_from_slice(&storage);
    let mut backup = storage.clone();
    backup.extend(header(last, 1, last - ARRAY_BLOCKS));
    let mut mbr = vec![0u8; BLOCK as usize];
    mbr[..512].copy_from_slice(bytes_of(&MasterBootRecord::protective_mbr(layout.blocks)));
    Ok(Tables {
        mbr,
        primary,
        backup,
    })
}

/// Writes a GPT disk with GUID `disk_guid` and partitions `parts` to `out`: into a
/// file of this process's own beside it, renamed into place when whole (so a reader
/// never sees half an image). The file is sparse where partitions hold zeros.
pub fn write(out: &Path, disk_guid: Guid, parts: &[Part]) -> Result<Layout> {
    let mut sizes = Vec::new();
    for p in parts {
        sizes.push(match &p.content {
            Content::File(f) => std::fs::metadata(f)
                .with_context(|| format!("partition {:?}: {}", p.name, f.display()))?
                .len()
                .max(p.min_bytes),
            _ => p.min_bytes,
        });
    }
    let layout = layout(&sizes);
    let t = tables(&layout, disk_guid, parts)?;
    let tmp = out.with_extension(format!("tmp.{}", std::process::id()));
    let written = (|| -> Result<()> {
        let mut f = File::create(&tmp)?;
        f.set_len(layout.blocks * BLOCK)?;
        f.write_all(&t.mbr)?;
        f.write_all(&t.primary)?;
        f.seek(SeekFrom::Start((layout.blocks - 1 - ARRAY_BLOCKS) * BLOCK))?;
        f.write_all(&t.backup)?;
        for (p, e) in parts.iter().zip(&layout.extents) {
            f.seek(SeekFrom::Start(e.offset()))?;
            match &p.content {
                Content::Zero => {}
                Content::File(src) => {
                    let mut r =
                        File::open(src).with_context(|| format!("opening {}", src.display()))?;
                    std::io::copy(&mut r, &mut f)?;
                }
                Content::Pattern(seed) => {
                    f.write_all(&crate::storage::pattern(*seed, e.bytes() as usize))?
                }
            }
        }
        f.sync_all()?;
        Ok(())
    })();
    if let Err(e) = written {
        std::fs::remove_file(&tmp).ok();
        return Err(e.context(format!("writing {}", tmp.display())));
    }
    std::fs::rename(&tmp, out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok(layout)
}

/// A disk image file read by 512-byte blocks.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    blocks: u64,
}

impl FileDisk {
    /// Opens `path` for reading.
    pub fn open(path: &Path) -> Result<FileDisk> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let blocks = file.metadata()?.len() / BLOCK;
        Ok(FileDisk { file, blocks })
    }
}

impl BlockRead for FileDisk {
    fn block_size(&self) -> u32 {
        BLOCK as u32
    }
    fn blocks(&self) -> u64 {
        self.blocks
    }
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let at = lba.checked_mul(BLOCK).ok_or(IoError)?;
        self.file.seek(SeekFrom::Start(at)).map_err(|_| IoError)?;
        self.file.read_exact(buf).map_err(|_| IoError)
    }
}

/// The checked GPT of the image `path`, and its size in blocks.
pub fn read(path: &Path) -> Result<(Gpt, u64)> {
    let mut disk = FileDisk::open(path)?;
    let blocks = disk.blocks;
    let g = gpt::parse(&mut disk)
        .map_err(|e| anyhow::anyhow!("{}: no usable GPT: {e:?}", path.display()))?;
    Ok((g, blocks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use peregrine_blkproto::gpt::SliceDisk;

    fn parts() -> Vec<Part> {
        vec![
            Part {
                name: "one".into(),
                type_guid: LINUX_ROOT_X86_64,
                unique_guid: gpt_disk_types::guid!("11111111-2222-3333-4444-555555555555"),
                min_bytes: 3 << 20 | 1,
                content: Content::Zero,
            },
            Part {
                name: "twö".into(),
                type_guid: LINUX_DATA,
                unique_guid: gpt_disk_types::guid!("66666666-7777-8888-9999-aaaaaaaaaaaa"),
                min_bytes: 0,
                content: Content::Pattern(3),
            },
        ]
    }

    #[test]
    fn layout_aligns_to_mib() {
        let l = layout(&[3 << 20 | 1, 0, 1 << 20]);
        let e = &l.extents;
        assert_eq!((e[0].first_lba, e[0].blocks()), (2048, 4 * 2048));
        assert_eq!((e[1].first_lba, e[1].blocks()), (5 * 2048, 2048));
        assert_eq!((e[2].first_lba, e[2].blocks()), (6 * 2048, 2048));
        assert_eq!(l.blocks, 8 * 2048);
        assert_eq!(e[1].offset(), 5 << 20);
    }

    #[test]
    fn tables_parse_back_and_both_copies_agree() {
        let p = parts();
        let l = layout(&[p[0].min_bytes, p[1].min_bytes]);
        let disk_guid = gpt_disk_types::guid!("01234567-89ab-cdef-0123-456789abcdef");
        let t = tables(&l, disk_guid, &p).unwrap();
        let mut img = vec![0u8; (l.blocks * BLOCK) as usize];
        img[..512].copy_from_slice(&t.mbr);
        img[512..512 + t.primary.len()].copy_from_slice(&t.primary);
        let end = img.len();
        img[end - t.backup.len()..].copy_from_slice(&t.backup);
        let mut d = SliceDisk {
            data: &img,
            block_size: 512,
        };
        let g = gpt::parse(&mut d).unwrap();
        assert!(!g.from_backup);
        assert_eq!(g.disk_guid, disk_guid);
        assert_eq!((g.first_usable_lba, g.last_usable_lba), (34, l.blocks - 34));
        assert_eq!(g.partitions.len(), 2);
        for (i, q) in g.partitions.iter().enumerate() {
            assert_eq!(q.index, i as u32);
            assert_eq!(q.name, p[i].name);
            assert_eq!(q.type_guid, p[i].type_guid);
            assert_eq!(q.unique_guid, p[i].unique_guid);
            assert_eq!(
                (q.first_lba, q.last_lba),
                (l.extents[i].first_lba, l.extents[i].last_lba)
            );
        }
        // The backup alone gives the same table.
        img[512..1024].fill(0);
        let mut d = SliceDisk {
            data: &img,
            block_size: 512,
        };
        let b = gpt::parse(&mut d).unwrap();
        assert!(b.from_backup);
        assert_eq!(b.partitions, g.partitions);
        // A flipped bit in the backup's array is caught by its CRC32.
        let at = end - t.backup.len() + 40;
        img[at] ^= 1;
        let mut d = SliceDisk {
            data: &img,
            block_size: 512,
        };
        assert!(matches!(
            gpt::parse(&mut d),
            Err(gpt::GptError::NoValidHeader {
                backup: gpt::HeaderError::EntryArrayCrc,
                ..
            })
        ));
    }

    #[test]
    fn tables_refuse_bad_names_and_counts() {
        let mut p = parts();
        let l = layout(&[1, 1]);
        p[0].name = "x".repeat(36);
        assert!(tables(&l, Guid::ZERO, &p).is_err());
        assert!(tables(&l, Guid::ZERO, &p[..1]).is_err());
    }

    #[test]
    fn written_image_holds_the_contents() {
        let dir = crate::workspace::out_dir("test-gpt-image").unwrap();
        let src = dir.join(format!("src.{}", std::process::id()));
        std::fs::write(&src, b"ext4 stand-in").unwrap();
        let out = dir.join(format!("disk.{}.img", std::process::id()));
        let mut p = parts();
        p[0].content = Content::File(src.clone());
        let l = write(&out, Guid::ZERO, &p).unwrap();
        let (g, blocks) = read(&out).unwrap();
        assert_eq!(blocks, l.blocks);
        assert_eq!(g.partitions[1].first_lba, l.extents[1].first_lba);
        let img = std::fs::read(&out).unwrap();
        let at = l.extents[0].offset() as usize;
        assert_eq!(&img[at..at + 13], b"ext4 stand-in");
        assert!(img[at + 13..at + 4096].iter().all(|b| *b == 0));
        let e = l.extents[1];
        let data = &img[e.offset() as usize..(e.offset() + e.bytes()) as usize];
        assert_eq!(data, crate::storage::pattern(3, e.bytes() as usize));
        std::fs::remove_file(&out).ok();
        std::fs::remove_file(&src).ok();
    }
}
