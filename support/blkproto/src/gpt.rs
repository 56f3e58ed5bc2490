//! GPT parsing: the protective MBR, the primary header (the backup at the disk's last
//! block when the primary is unusable) and the partition entry array, all checked
//! (signatures, CRC32s, bounds) before a partition is believed.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use bytemuck::pod_read_unaligned;
use gpt_disk_types::{
    crc::Crc, Crc32, GptHeader, GptHeaderRevision, GptPartitionEntry, Guid, MasterBootRecord,
};

/// The most partition entry array bytes a header may describe (the usual array is
/// 16 KiB; anything above this is refused rather than allocated).
pub const MAX_ENTRY_ARRAY_BYTES: u64 = 1 << 20;

/// A disk read by whole blocks.
pub trait BlockRead {
    /// Bytes per block (a power of two, at least 512).
    fn block_size(&self) -> u32;
    /// Blocks on the disk.
    fn blocks(&self) -> u64;
    /// Reads `buf.len() / block_size` blocks starting at `lba` into `buf`.
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), IoError>;
}

/// A read the disk failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoError;

/// A disk image in memory (tests, or a disk already read).
#[derive(Debug)]
pub struct SliceDisk<'a> {
    /// The image.
    pub data: &'a [u8],
    /// Bytes per block.
    pub block_size: u32,
}

impl BlockRead for SliceDisk<'_> {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn blocks(&self) -> u64 {
        self.data.len() as u64 / u64::from(self.block_size)
    }
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let start = lba
            .checked_mul(u64::from(self.block_size))
            .and_then(|s| usize::try_from(s).ok())
            .ok_or(IoError)?;
        let end = start.checked_add(buf.len()).ok_or(IoError)?;
        buf.copy_from_slice(self.data.get(start..end).ok_or(IoError)?);
        Ok(())
    }
}

/// Why one copy of the GPT (header plus entry array) is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Reading it failed.
    Io,
    /// No `"EFI PART"` signature.
    Signature,
    /// Not revision 1.x.
    Revision,
    /// Header size below 92 or above the block size.
    HeaderSize,
    /// The header's CRC32 does not match.
    HeaderCrc,
    /// The header does not say it lies where it was read.
    MyLba,
    /// The usable range is empty, reversed or passes the disk's end.
    UsableRange,
    /// Entry size not a power of two of at least 128, or the array too large.
    EntryArraySize,
    /// The entry array passes the disk's end or overlaps the usable range.
    EntryArrayPlace,
    /// The entry array's CRC32 does not match.
    EntryArrayCrc,
}

/// Why a disk's GPT is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GptError {
    /// The block size is not a power of two of at least 512, or the disk is too small
    /// to hold a GPT.
    Geometry,
    /// Reading block 0 failed.
    Io,
    /// Block 0 is not a protective MBR (no 0x55aa signature or no 0xee partition).
    NoProtectiveMbr,
    /// Neither copy is usable.
    NoValidHeader {
        /// Why the primary is not.
        primary: HeaderError,
        /// Why the backup is not.
        backup: HeaderError,
    },
    /// Entry `index` ends before it starts or reaches outside the usable range.
    PartitionOutside {
        /// The entry's index in the array.
        index: u32,
    },
    /// Entries `a` and `b` share blocks.
    Overlap {
        /// One entry's index.
        a: u32,
        /// The other's.
        b: u32,
    },
}

/// One used partition entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// The entry's index in the array (0-based; Linux's `sdaN` is index N-1).
    pub index: u32,
    /// The partition type.
    pub type_guid: Guid,
    /// The partition's own GUID.
    pub unique_guid: Guid,
    /// First block (absolute LBA).
    pub first_lba: u64,
    /// Last block, inclusive.
    pub last_lba: u64,
    /// The attribute bits.
    pub attributes: u64,
    /// The name (UCS-2 decoded, up to the first NUL).
    pub name: String,
}

impl Partition {
    /// Blocks in the partition.
    pub fn blocks(&self) -> u64 {
        self.last_lba - self.first_lba + 1
    }
}

/// A parsed, checked GPT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpt {
    /// The disk's GUID.
    pub disk_guid: Guid,
    /// First block partitions may use.
    pub first_usable_lba: u64,
    /// Last block partitions may use (inclusive).
    pub last_usable_lba: u64,
    /// The used entries, in array order.
    pub partitions: Vec<Partition>,
    /// Whether the backup copy was used (the primary is damaged).
    pub from_backup: bool,
}

/// The GPT's CRC32 (ISO-HDLC, as in the UEFI spec) of `bytes`.
fn crc32(bytes: &[u8]) -> u32 {
    Crc::<u32>::new(&Crc32::ALGORITHM).checksum(bytes)
}

/// Reads and checks the copy whose header lies at `lba`: the header, and the entries.
fn read_copy(
    disk: &mut dyn BlockRead,
    lba: u64,
) -> Result<(GptHeader, Vec<GptPartitionEntry>), HeaderError> {
    let bs = disk.block_size() as usize;
    let blocks = disk.blocks();
    let mut block = vec![0u8; bs];
    disk.read(lba, &mut block).map_err(|_| HeaderError::Io)?;
    let size = core::mem::size_of::<GptHeader>();
    let h: GptHeader = pod_read_unaligned(&block[..size]);
    if !h.is_signature_valid() {
        return Err(HeaderError::Signature);
    }
    if h.revision.major() != GptHeaderRevision::VERSION_1_0.major() {
        return Err(HeaderError::Revision);
    }
    let hsize = h.header_size.to_u32() as usize;
    if hsize < size || hsize > bs {
        return Err(HeaderError::HeaderSize);
    }
    // The CRC covers header_size bytes with the CRC field itself as zeros.
    let stored = h.header_crc32.0.to_u32();
    block[16..20].fill(0);
    if crc32(&block[..hsize]) != stored {
        return Err(HeaderError::HeaderCrc);
    }
    if h.my_lba.to_u64() != lba {
        return Err(HeaderError::MyLba);
    }
    let first = h.first_usable_lba.to_u64();
    let last = h.last_usable_lba.to_u64();
    if first > last || last >= blocks || first < 2 {
        return Err(HeaderError::UsableRange);
    }
    let layout = h
        .get_partition_entry_array_layout()
        .map_err(|_| HeaderError::EntryArraySize)?;
    let esize = u64::from(layout.entry_size.to_u32());
    let bytes = esize * u64::from(layout.num_entries);
    if bytes > MAX_ENTRY_ARRAY_BYTES || esize as usize > MAX_ENTRY_ARRAY_BYTES as usize {
        return Err(HeaderError::EntryArraySize);
    }
    let array_blocks = bytes.div_ceil(bs as u64);
    let start = layout.start_lba.to_u64();
    let end = start
        .checked_add(array_blocks)
        .ok_or(HeaderError::EntryArrayPlace)?;
    // The array must lie on the disk, off this header, and outside the usable range.
    if start < 1
        || end > blocks
        || (start <= lba && lba < end)
        || (array_blocks > 0 && start <= last && first < end)
    {
        return Err(HeaderError::EntryArrayPlace);
    }
    let mut array = vec![0u8; (array_blocks as usize) * bs];
    disk.read(start, &mut array).map_err(|_| HeaderError::Io)?;
    if crc32(&array[..bytes as usize]) != h.partition_entry_array_crc32.0.to_u32() {
        return Err(HeaderError::EntryArrayCrc);
    }
    let entry = core::mem::size_of::<GptPartitionEntry>();
    let entries = array[..bytes as usize]
        .chunks_exact(esize as usize)
        .map(|c| pod_read_unaligned::<GptPartitionEntry>(&c[..entry]))
        .collect();
    Ok((h, entries))
}

/// Parses the GPT of `disk`: the protective MBR, then the primary copy, or the backup
/// at the last block when the primary is unusable; then the used entries, refused if
/// one reaches outside the usable range or two overlap.
pub fn parse(disk: &mut dyn BlockRead) -> Result<Gpt, GptError> {
    let bs = disk.block_size();
    if bs < 512 || !bs.is_power_of_two() || disk.blocks() < 4 {
        return Err(GptError::Geometry);
    }
    let mut block = vec![0u8; bs as usize];
    disk.read(0, &mut block).map_err(|_| GptError::Io)?;
    let mbr: MasterBootRecord = pod_read_unaligned(&block[..512]);
    if mbr.signature != [0x55, 0xaa] || !mbr.partitions.iter().any(|p| p.os_indicator == 0xee) {
        return Err(GptError::NoProtectiveMbr);
    }
    let last = disk.blocks() - 1;
    let (h, entries, from_backup) = match read_copy(disk, 1) {
        Ok((h, e)) => (h, e, false),
        Err(primary) => match read_copy(disk, last) {
            Ok((h, e)) => (h, e, true),
            Err(backup) => return Err(GptError::NoValidHeader { primary, backup }),
        },
    };
    let first_usable = h.first_usable_lba.to_u64();
    let last_usable = h.last_usable_lba.to_u64();
    let mut partitions: Vec<Partition> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if !e.is_used() {
            continue;
        }
        let index = i as u32;
        let (start, end) = (e.starting_lba.to_u64(), e.ending_lba.to_u64());
        if start > end || start < first_usable || end > last_usable {
            return Err(GptError::PartitionOutside { index });
        }
        let name = { e.name }.chars().collect();
        partitions.push(Partition {
            index,
            type_guid: { e.partition_type_guid }.0,
            unique_guid: { e.unique_partition_guid },
            first_lba: start,
            last_lba: end,
            attributes: { e.attributes }.0.to_u64(),
            name,
        });
    }
    // Sorted by start, two partitions overlap only if some neighbours do.
    let mut order: Vec<&Partition> = partitions.iter().collect();
    order.sort_by_key(|p| p.first_lba);
    if let Some(w) = order.windows(2).find(|w| w[1].first_lba <= w[0].last_lba) {
        let (a, b) = (w[0].index.min(w[1].index), w[0].index.max(w[1].index));
        return Err(GptError::Overlap { a, b });
    }
    Ok(Gpt {
        disk_guid: { h.disk_guid },
        first_usable_lba: first_usable,
        last_usable_lba: last_usable,
        partitions,
        from_backup,
    })
}
