//! The GPT parser against images built here with `gpt_disk_types`' own types.

use bytemuck::bytes_of;
use gpt_disk_types::{
    guid, GptHeader, GptHeaderRevision, GptHeaderSignature, GptPartitionEntry,
    GptPartitionEntryArray, GptPartitionEntryArrayLayout, GptPartitionEntrySize, GptPartitionType,
    Guid, Lba, LbaLe, MasterBootRecord, U32Le,
};
use peregrine_blkproto::gpt::{parse, GptError, HeaderError, SliceDisk, MAX_ENTRY_ARRAY_BYTES};
use peregrine_blkproto::{Binding, Bounds};
use peregrine_rng::Rng;

const DISK_GUID: Guid = guid!("57a7feb6-8cd5-4922-b7bd-c78b0914e870");
const ENTRIES: u32 = 128;

/// One partition to put in an image: first and last LBA, name.
struct Spec(u64, u64, &'static str);

fn unique(i: usize) -> Guid {
    let mut b = [0u8; 16];
    b[0] = i as u8 + 1;
    b[15] = 0x42;
    Guid::from_bytes(b)
}

/// A GPT image of `blocks` blocks of `bs` bytes with `parts` (in entries 0, 1, ...).
/// `usable` overrides the header's usable range (to build bad headers).
struct Image {
    bs: usize,
    blocks: u64,
    bytes: Vec<u8>,
}

impl Image {
    fn array_blocks(bs: usize) -> u64 {
        (ENTRIES as u64 * 128).div_ceil(bs as u64)
    }

    fn new(blocks: u64, bs: usize, parts: &[Spec]) -> Image {
        let ab = Self::array_blocks(bs);
        Self::with_usable(blocks, bs, parts, 2 + ab, blocks - 2 - ab)
    }

    fn with_usable(blocks: u64, bs: usize, parts: &[Spec], first: u64, last: u64) -> Image {
        let mut bytes = vec![0u8; blocks as usize * bs];
        let mbr = MasterBootRecord::protective_mbr(blocks);
        bytes[..512].copy_from_slice(bytes_of(&mbr));
        let ab = Self::array_blocks(bs);
        let layout = GptPartitionEntryArrayLayout {
            start_lba: Lba(2),
            entry_size: GptPartitionEntrySize::new(128).unwrap(),
            num_entries: ENTRIES,
        };
        let mut storage = vec![0u8; ab as usize * bs];
        let mut array = GptPartitionEntryArray::new(
            layout,
            gpt_disk_types::BlockSize::from_usize(bs).unwrap(),
            &mut storage,
        )
        .unwrap();
        for (i, p) in parts.iter().enumerate() {
            let e = array.get_partition_entry_mut(i as u32).unwrap();
            *e = GptPartitionEntry {
                partition_type_guid: GptPartitionType::BASIC_DATA,
                unique_partition_guid: unique(i),
                starting_lba: LbaLe::from_u64(p.0),
                ending_lba: LbaLe::from_u64(p.1),
                attributes: Default::default(),
                name: p.2.parse().unwrap(),
            };
        }
        let crc = array.calculate_crc32();
        let mut img = Image { bs, blocks, bytes };
        for (hdr, arr, alt) in [(1, 2, blocks - 1), (blocks - 1, blocks - 1 - ab, 1)] {
            img.bytes[arr as usize * bs..(arr + ab) as usize * bs].copy_from_slice(&storage);
            let mut h = GptHeader {
                signature: GptHeaderSignature::EFI_COMPATIBLE_PARTITION_TABLE_HEADER,
                revision: GptHeaderRevision::VERSION_1_0,
                my_lba: LbaLe::from_u64(hdr),
                alternate_lba: LbaLe::from_u64(alt),
                first_usable_lba: LbaLe::from_u64(first),
                last_usable_lba: LbaLe::from_u64(last),
                disk_guid: DISK_GUID,
                partition_entry_lba: LbaLe::from_u64(arr),
                number_of_partition_entries: U32Le::from_u32(ENTRIES),
                partition_entry_array_crc32: crc,
                ..Default::default()
            };
            h.update_header_crc32();
            img.put_header(hdr, &h);
        }
        img
    }

    fn put_header(&mut self, lba: u64, h: &GptHeader) {
        let off = lba as usize * self.bs;
        let b = bytes_of(h);
        self.bytes[off..off + b.len()].copy_from_slice(b);
    }

    fn header(&self, lba: u64) -> GptHeader {
        let off = lba as usize * self.bs;
        bytemuck::pod_read_unaligned(&self.bytes[off..off + 92])
    }

    fn parse(&self) -> Result<peregrine_blkproto::Gpt, GptError> {
        parse(&mut SliceDisk {
            data: &self.bytes,
            block_size: self.bs as u32,
        })
    }
}

fn three() -> Vec<Spec> {
    vec![
        Spec(2048, 4095, "boot"),
        Spec(4096, 8191, "vm1"),
        Spec(8192, 16383, "vm2"),
    ]
}

#[test]
fn good_image() {
    let img = Image::new(20480, 512, &three());
    let g = img.parse().unwrap();
    assert!(!g.from_backup);
    assert_eq!(g.disk_guid, DISK_GUID);
    assert_eq!((g.first_usable_lba, g.last_usable_lba), (34, 20480 - 34));
    assert_eq!(g.partitions.len(), 3);
    let p = &g.partitions[1];
    assert_eq!(
        (p.index, p.first_lba, p.last_lba, p.blocks()),
        (1, 4096, 8191, 4096)
    );
    assert_eq!(p.name, "vm1");
    assert_eq!(p.unique_guid, unique(1));
    assert_eq!(p.type_guid, GptPartitionType::BASIC_DATA.0);
}

#[test]
fn good_image_4k_blocks() {
    let img = Image::new(4096, 4096, &[Spec(256, 511, "a"), Spec(1024, 4000, "b")]);
    let g = img.parse().unwrap();
    assert_eq!(g.first_usable_lba, 2 + 4);
    assert_eq!(g.partitions.len(), 2);
    assert_eq!(g.partitions[1].last_lba, 4000);
}

#[test]
fn bad_primary_header_crc_falls_back_to_backup() {
    let good = Image::new(20480, 512, &three()).parse().unwrap();
    let mut img = Image::new(20480, 512, &three());
    img.bytes[512 + 40] ^= 1; // first_usable_lba, under the header CRC
    let g = img.parse().unwrap();
    assert!(g.from_backup);
    assert_eq!(g.partitions, good.partitions);
}

#[test]
fn bad_primary_entries_crc_falls_back_to_backup() {
    let mut img = Image::new(20480, 512, &three());
    img.bytes[2 * 512 + 128 + 33] ^= 0x80; // entry 1's starting LBA
    let g = img.parse().unwrap();
    assert!(g.from_backup);
    assert_eq!(g.partitions[1].first_lba, 4096);
}

#[test]
fn both_copies_bad() {
    let mut img = Image::new(20480, 512, &three());
    img.bytes[512] = b'X';
    let last = (img.blocks - 1) as usize * 512;
    img.bytes[last + 16] ^= 1;
    assert_eq!(
        img.parse(),
        Err(GptError::NoValidHeader {
            primary: HeaderError::Signature,
            backup: HeaderError::HeaderCrc,
        })
    );
}

#[test]
fn no_protective_mbr() {
    let mut img = Image::new(20480, 512, &three());
    img.bytes[510] = 0;
    assert_eq!(img.parse(), Err(GptError::NoProtectiveMbr));
    let mut img = Image::new(20480, 512, &three());
    img.bytes[446 + 4] = 0x83;
    assert_eq!(img.parse(), Err(GptError::NoProtectiveMbr));
}

#[test]
fn overlapping_partitions_refused() {
    let img = Image::new(
        20480,
        512,
        &[
            Spec(2048, 4095, "a"),
            Spec(8192, 9000, "b"),
            Spec(4000, 5000, "c"),
        ],
    );
    assert_eq!(img.parse(), Err(GptError::Overlap { a: 0, b: 2 }));
    let img = Image::new(20480, 512, &[Spec(2048, 4095, "a"), Spec(4095, 4095, "b")]);
    assert_eq!(img.parse(), Err(GptError::Overlap { a: 0, b: 1 }));
}

#[test]
fn partitions_outside_the_disk_refused() {
    // Past the usable range, past the disk, reversed.
    for (i, s) in [
        Spec(2048, 20480 - 33, "x"),
        Spec(2048, 1 << 40, "x"),
        Spec(4096, 2048, "x"),
        Spec(10, 100, "x"),
    ]
    .into_iter()
    .enumerate()
    {
        let img = Image::new(20480, 512, &[Spec(100, 200, "ok"), s]);
        assert_eq!(
            img.parse(),
            Err(GptError::PartitionOutside { index: 1 }),
            "case {i}"
        );
    }
}

#[test]
fn header_usable_range_past_the_disk_refused() {
    let img = Image::with_usable(20480, 512, &[], 34, 20480);
    assert!(matches!(
        img.parse(),
        Err(GptError::NoValidHeader {
            primary: HeaderError::UsableRange,
            backup: HeaderError::UsableRange,
        })
    ));
}

/// A change to a header.
type Damage<'a> = &'a dyn Fn(&mut GptHeader);

#[test]
fn hostile_header_fields_refused() {
    let fix = |img: &mut Image, f: &dyn Fn(&mut GptHeader)| {
        let mut h = img.header(1);
        f(&mut h);
        h.update_header_crc32();
        img.put_header(1, &h);
        img.parse()
    };
    let base = Image::new(20480, 512, &three());
    let cases: [(Damage, HeaderError); 6] = [
        (
            &|h| h.number_of_partition_entries = U32Le::from_u32(u32::MAX),
            HeaderError::EntryArraySize,
        ),
        (
            &|h| h.size_of_partition_entry = U32Le::from_u32(100),
            HeaderError::EntryArraySize,
        ),
        (
            &|h| h.partition_entry_lba = LbaLe::from_u64(u64::MAX - 1),
            HeaderError::EntryArrayPlace,
        ),
        (
            &|h| h.partition_entry_lba = LbaLe::from_u64(100),
            HeaderError::EntryArrayPlace,
        ),
        (&|h| h.my_lba = LbaLe::from_u64(5), HeaderError::MyLba),
        (
            &|h| h.header_size = U32Le::from_u32(513),
            HeaderError::HeaderSize,
        ),
    ];
    for (i, (f, want)) in cases.into_iter().enumerate() {
        let mut img = Image {
            bs: base.bs,
            blocks: base.blocks,
            bytes: base.bytes.clone(),
        };
        // The backup still holds: the damage is seen and worked around.
        let g = fix(&mut img, f).unwrap();
        assert!(g.from_backup, "case {i}");
        // With the backup gone too, the primary's error is reported.
        let last = (img.blocks - 1) as usize * 512;
        img.bytes[last] = 0;
        match img.parse() {
            Err(GptError::NoValidHeader { primary, .. }) => assert_eq!(primary, want, "case {i}"),
            r => panic!("case {i}: {r:?}"),
        }
    }
    const { assert!(MAX_ENTRY_ARRAY_BYTES >= 128 * 128) };
}

#[test]
fn truncated_and_tiny_disks() {
    let img = Image::new(20480, 512, &three());
    for len in [0, 511, 512, 2048, 512 * 40] {
        let r = parse(&mut SliceDisk {
            data: &img.bytes[..len],
            block_size: 512,
        });
        assert!(r.is_err(), "{len}");
    }
    let r = parse(&mut SliceDisk {
        data: &img.bytes,
        block_size: 500,
    });
    assert_eq!(r, Err(GptError::Geometry));
}

#[test]
fn random_damage_never_panics_and_never_invents_partitions() {
    let good = Image::new(20480, 512, &three()).parse().unwrap();
    let mut rng = Rng::new(0xb10c);
    for round in 0..400 {
        let mut img = Image::new(20480, 512, &three());
        for _ in 0..1 + rng.below(8) {
            let region = if rng.chance(2) {
                0..34 * 512
            } else {
                (20480 - 33) * 512..20480 * 512
            };
            let at = region.start + rng.below((region.end - region.start) as u64) as usize;
            img.bytes[at] = rng.byte();
        }
        if let Ok(g) = img.parse() {
            assert_eq!(g.partitions, good.partitions, "round {round}");
        }
    }
}

#[test]
fn binding_resolves_against_a_parsed_gpt() {
    let img = Image::new(20480, 512, &three());
    let g = img.parse().unwrap();
    let r = |s: &str| {
        Binding::parse(s)
            .unwrap()
            .resolve(&g.partitions, img.blocks)
    };
    assert_eq!(
        r("disk=0 part=2"),
        Ok(Bounds {
            first_lba: 4096,
            blocks: 4096
        })
    );
    assert_eq!(
        r("part=name:vm2"),
        Ok(Bounds {
            first_lba: 8192,
            blocks: 8192
        })
    );
    let guid = format!("part=guid:{}", unique(0));
    assert_eq!(
        r(&guid),
        Ok(Bounds {
            first_lba: 2048,
            blocks: 2048
        })
    );
    assert_eq!(
        r("range=2048+65536"),
        Err(peregrine_blkproto::BindError::RangeOutsideDisk)
    );
    assert_eq!(
        r("part=4"),
        Err(peregrine_blkproto::BindError::NoSuchPartition)
    );
}
