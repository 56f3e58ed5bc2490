//! Submission queue entries: the 64-byte command layout, builders for the admin and NVM
//! commands the driver uses, and parsers for the Identify data structures.

use crate::{DeviceError, Error};

/// Admin command opcodes.
pub mod admin {
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
}

/// NVM command set I/O opcodes.
pub mod io {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace data structure for the given NSID.
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller data structure.
    pub const CONTROLLER: u8 = 0x01;
    /// Active namespace ID list.
    pub const ACTIVE_NAMESPACES: u8 = 0x02;
}

/// Feature identifiers.
pub mod feature {
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
}

/// Size of a submission queue entry.
pub const SQE_SIZE: usize = 64;

/// One submission queue entry as sixteen dwords (CDW0..CDW15).
///
/// CDW0: opcode 7:0, FUSE 9:8, PSDT 15:14, CID 31:16; CDW1 NSID; CDW4-5 MPTR;
/// CDW6-7 PRP1; CDW8-9 PRP2; CDW10..15 command specific.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Command {
    pub dw: [u32; 16],
}

impl Command {
    /// A command with `opcode` and everything else zero.
    pub const fn new(opcode: u8) -> Command {
        let mut dw = [0; 16];
        dw[0] = opcode as u32;
        Command { dw }
    }
    pub const fn opcode(&self) -> u8 {
        self.dw[0] as u8
    }
    pub const fn cid(&self) -> u16 {
        (self.dw[0] >> 16) as u16
    }
    pub fn set_cid(&mut self, cid: u16) {
        self.dw[0] = (self.dw[0] & 0xffff) | ((cid as u32) << 16);
    }
    pub const fn nsid(&self) -> u32 {
        self.dw[1]
    }
    pub const fn prp1(&self) -> u64 {
        self.dw[6] as u64 | ((self.dw[7] as u64) << 32)
    }
    pub const fn prp2(&self) -> u64 {
        self.dw[8] as u64 | ((self.dw[9] as u64) << 32)
    }
    /// Sets the namespace id.
    pub const fn with_nsid(mut self, nsid: u32) -> Command {
        self.dw[1] = nsid;
        self
    }
    /// Sets PRP1 and PRP2 (PSDT stays 0: PRPs, not SGLs).
    pub const fn with_prps(mut self, prp1: u64, prp2: u64) -> Command {
        self.dw[6] = prp1 as u32;
        self.dw[7] = (prp1 >> 32) as u32;
        self.dw[8] = prp2 as u32;
        self.dw[9] = (prp2 >> 32) as u32;
        self
    }
    /// Sets Force Unit Access (CDW12 bit 30) on a read or write: the data reaches
    /// non-volatile media before the command completes.
    pub const fn with_fua(mut self) -> Command {
        self.dw[12] |= 1 << 30;
        self
    }
    /// Sets command dword `n` (10..=15).
    pub const fn with_cdw(mut self, n: usize, value: u32) -> Command {
        self.dw[n] = value;
        self
    }
    /// The little-endian bytes the device reads.
    pub fn to_bytes(&self) -> [u8; SQE_SIZE] {
        let mut out = [0; SQE_SIZE];
        for (chunk, dw) in out.chunks_exact_mut(4).zip(self.dw) {
            chunk.copy_from_slice(&dw.to_le_bytes());
        }
        out
    }
    /// Parses the bytes of an entry (the simulator's side).
    pub fn from_bytes(bytes: &[u8; SQE_SIZE]) -> Command {
        let mut dw = [0; 16];
        for (d, chunk) in dw.iter_mut().zip(bytes.chunks_exact(4)) {
            *d = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Command { dw }
    }
}

/// Identify (CNS `cns`, namespace `nsid`) into the 4 KiB page at `prp1`.
pub const fn identify(cns: u8, nsid: u32, prp1: u64) -> Command {
    Command::new(admin::IDENTIFY)
        .with_nsid(nsid)
        .with_prps(prp1, 0)
        .with_cdw(10, cns as u32)
}

/// Identify Controller (CNS 1).
pub const fn identify_controller(prp1: u64) -> Command {
    identify(cns::CONTROLLER, 0, prp1)
}

/// Identify Namespace (CNS 0) for `nsid`.
pub const fn identify_namespace(nsid: u32, prp1: u64) -> Command {
    identify(cns::NAMESPACE, nsid, prp1)
}

/// Create I/O Completion Queue `qid` of `entries` entries, physically contiguous at
/// `addr`; with `vector` the queue raises interrupt vector `vector` (IEN), without it
/// the queue is polled.
pub const fn create_io_cq(qid: u16, entries: u16, addr: u64, vector: Option<u16>) -> Command {
    let (ien, iv) = match vector {
        Some(v) => (1u32 << 1, (v as u32) << 16),
        None => (0, 0),
    };
    Command::new(admin::CREATE_IO_CQ)
        .with_prps(addr, 0)
        .with_cdw(10, qid as u32 | ((entries as u32 - 1) << 16))
        .with_cdw(11, 1 | ien | iv)
}

/// Create I/O Submission Queue `qid` of `entries` entries, physically contiguous at
/// `addr`, completing into completion queue `cqid` (priority: medium, ignored under
/// round robin).
pub const fn create_io_sq(qid: u16, entries: u16, addr: u64, cqid: u16) -> Command {
    Command::new(admin::CREATE_IO_SQ)
        .with_prps(addr, 0)
        .with_cdw(10, qid as u32 | ((entries as u32 - 1) << 16))
        .with_cdw(11, 1 | ((cqid as u32) << 16))
}

/// Delete I/O Submission Queue `qid`.
pub const fn delete_io_sq(qid: u16) -> Command {
    Command::new(admin::DELETE_IO_SQ).with_cdw(10, qid as u32)
}

/// Delete I/O Completion Queue `qid`.
pub const fn delete_io_cq(qid: u16) -> Command {
    Command::new(admin::DELETE_IO_CQ).with_cdw(10, qid as u32)
}

/// Set Features, Number of Queues: ask for `sqs` submission and `cqs` completion queues
/// (1..=65535 each; the fields are 0-based).
pub const fn set_number_of_queues(sqs: u16, cqs: u16) -> Command {
    Command::new(admin::SET_FEATURES)
        .with_cdw(10, feature::NUMBER_OF_QUEUES as u32)
        .with_cdw(11, (sqs as u32 - 1) | ((cqs as u32 - 1) << 16))
}

/// The (submission, completion) queue counts a Number of Queues completion grants
/// (DW0; 0-based fields, so the results are 1..=65536).
pub const fn queues_granted(dw0: u32) -> (u32, u32) {
    ((dw0 & 0xffff) + 1, (dw0 >> 16) + 1)
}

const fn rw(opcode: u8, nsid: u32, slba: u64, blocks: u16, prp1: u64, prp2: u64) -> Command {
    Command::new(opcode)
        .with_nsid(nsid)
        .with_prps(prp1, prp2)
        .with_cdw(10, slba as u32)
        .with_cdw(11, (slba >> 32) as u32)
        .with_cdw(12, (blocks as u32).wrapping_sub(1) & 0xffff)
}

/// Read `blocks` logical blocks (1..=65535 here; NLB is 0-based) from `slba`.
pub const fn read(nsid: u32, slba: u64, blocks: u16, prp1: u64, prp2: u64) -> Command {
    rw(io::READ, nsid, slba, blocks, prp1, prp2)
}

/// Write `blocks` logical blocks (1..=65535 here; NLB is 0-based) at `slba`.
pub const fn write(nsid: u32, slba: u64, blocks: u16, prp1: u64, prp2: u64) -> Command {
    rw(io::WRITE, nsid, slba, blocks, prp1, prp2)
}

/// Flush namespace `nsid`'s volatile write cache.
pub const fn flush(nsid: u32) -> Command {
    Command::new(io::FLUSH).with_nsid(nsid)
}

/// Size of an Identify data structure.
pub const IDENTIFY_SIZE: usize = 4096;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    le32(b, at) as u64 | ((le32(b, at + 4) as u64) << 32)
}

/// The fields of the Identify Controller data structure the driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentifyController {
    /// PCI vendor id (bytes 1:0).
    pub vid: u16,
    /// PCI subsystem vendor id (bytes 3:2).
    pub ssvid: u16,
    /// Serial number, ASCII, space padded (bytes 23:4).
    pub sn: [u8; 20],
    /// Model number, ASCII, space padded (bytes 63:24).
    pub mn: [u8; 40],
    /// Firmware revision (bytes 71:64).
    pub fr: [u8; 8],
    /// Maximum data transfer size: 2^mdts minimum pages; 0 = no limit (byte 77).
    pub mdts: u8,
    /// Controller id (bytes 79:78).
    pub cntlid: u16,
    /// Version (bytes 83:80).
    pub ver: u32,
    /// SQ entry sizes: required 3:0, maximum 7:4, log2 (byte 512).
    pub sqes: u8,
    /// CQ entry sizes: required 3:0, maximum 7:4, log2 (byte 513).
    pub cqes: u8,
    /// Number of namespaces (bytes 519:516).
    pub nn: u32,
}

impl IdentifyController {
    /// Parses the 4 KiB structure; rejects a controller whose entry sizes exclude the
    /// 64-byte SQE and 16-byte CQE the driver uses.
    pub fn parse(b: &[u8]) -> Result<IdentifyController, Error> {
        if b.len() < IDENTIFY_SIZE {
            return Err(Error::InvalidArgument);
        }
        let mut sn = [0; 20];
        sn.copy_from_slice(&b[4..24]);
        let mut mn = [0; 40];
        mn.copy_from_slice(&b[24..64]);
        let mut fr = [0; 8];
        fr.copy_from_slice(&b[64..72]);
        let id = IdentifyController {
            vid: le16(b, 0),
            ssvid: le16(b, 2),
            sn,
            mn,
            fr,
            mdts: b[77],
            cntlid: le16(b, 78),
            ver: le32(b, 80),
            sqes: b[512],
            cqes: b[513],
            nn: le32(b, 516),
        };
        let fits = |v: u8, want: u8| v & 0xf <= want && want <= v >> 4;
        if !fits(id.sqes, 6) || !fits(id.cqes, 4) {
            return Err(Error::Device(DeviceError::BadIdentify));
        }
        Ok(id)
    }

    /// The maximum transfer in bytes given the minimum page size (None: no limit).
    pub fn max_transfer(&self, page_size_min: usize) -> Option<usize> {
        match self.mdts {
            0 => None,
            n => page_size_min
                .checked_shl(n as u32)
                .filter(|&v| v >= page_size_min),
        }
    }

    /// The serial number with trailing spaces and NULs removed (lossy: non-ASCII is '?').
    pub fn serial(&self) -> alloc::string::String {
        ascii(&self.sn)
    }

    /// The model number, trimmed as [`IdentifyController::serial`].
    pub fn model(&self) -> alloc::string::String {
        ascii(&self.mn)
    }
}

fn ascii(b: &[u8]) -> alloc::string::String {
    let end = b
        .iter()
        .rposition(|&c| c != b' ' && c != 0)
        .map_or(0, |i| i + 1);
    b[..end]
        .iter()
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '?'
            }
        })
        .collect()
}

/// The fields of the Identify Namespace data structure the driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Namespace size in logical blocks (bytes 7:0).
    pub nsze: u64,
    /// Namespace capacity (bytes 15:8).
    pub ncap: u64,
    /// Namespace utilisation (bytes 23:16).
    pub nuse: u64,
    /// The LBA format in use (FLBAS bits 3:0, and 6:5 as bits 5:4).
    pub lba_format: u8,
    /// Logical block size in bytes (2^LBADS of the format in use).
    pub lba_size: u32,
    /// Metadata bytes per block of the format in use.
    pub metadata_size: u16,
}

impl IdentifyNamespace {
    /// Parses the 4 KiB structure. An inactive namespace (all zero) or a format with an
    /// LBA size outside 512 B..=64 KiB is [`DeviceError::BadIdentify`].
    pub fn parse(b: &[u8]) -> Result<IdentifyNamespace, Error> {
        if b.len() < IDENTIFY_SIZE {
            return Err(Error::InvalidArgument);
        }
        let nlbaf = b[25] as usize; // 0-based count
        let flbas = b[26];
        let lba_format = (flbas & 0xf) | ((flbas >> 5) & 0x3) << 4;
        if lba_format as usize > nlbaf || lba_format >= 64 {
            return Err(Error::Device(DeviceError::BadIdentify));
        }
        let lbaf = le32(b, 128 + 4 * lba_format as usize);
        let lbads = (lbaf >> 16) & 0xff;
        if !(9..=16).contains(&lbads) {
            return Err(Error::Device(DeviceError::BadIdentify));
        }
        let nsze = le64(b, 0);
        if nsze == 0 {
            return Err(Error::Device(DeviceError::BadIdentify));
        }
        Ok(IdentifyNamespace {
            nsze,
            ncap: le64(b, 8),
            nuse: le64(b, 16),
            lba_format,
            lba_size: 1 << lbads,
            metadata_size: lbaf as u16,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let mut c = read(1, 0x1_2345_6789, 8, 0xaaaa_0000_1000, 0xbbbb_0000_2000);
        c.set_cid(0x1234);
        assert_eq!(c.dw[0], 0x1234_0002);
        assert_eq!(c.nsid(), 1);
        assert_eq!(c.prp1(), 0xaaaa_0000_1000);
        assert_eq!(c.prp2(), 0xbbbb_0000_2000);
        assert_eq!(c.dw[10], 0x2345_6789);
        assert_eq!(c.dw[11], 1);
        assert_eq!(c.dw[12], 7);
        assert_eq!(Command::from_bytes(&c.to_bytes()), c);
        assert_eq!(c.to_bytes()[2..4], [0x34, 0x12]);

        let c = create_io_cq(3, 64, 0x5000, Some(9));
        assert_eq!(c.opcode(), 0x05);
        assert_eq!(c.dw[10], 3 | (63 << 16));
        assert_eq!(c.dw[11], 0b11 | (9 << 16));
        assert_eq!(create_io_cq(3, 64, 0x5000, None).dw[11], 1);
        let c = create_io_sq(3, 64, 0x6000, 3);
        assert_eq!(c.opcode(), 0x01);
        assert_eq!(c.dw[11], 1 | (3 << 16));
        let c = set_number_of_queues(4, 4);
        assert_eq!((c.opcode(), c.dw[10], c.dw[11]), (0x09, 7, 3 | (3 << 16)));
        assert_eq!(queues_granted(0x0001_0003), (4, 2));
        assert_eq!(identify_controller(0x1000).dw[10], 1);
        assert_eq!(identify_namespace(5, 0x1000).dw[10], 0);
        assert_eq!(identify_namespace(5, 0x1000).nsid(), 5);
        assert_eq!(flush(1).opcode(), 0);
        assert_eq!(write(1, 0, 1, 0, 0).dw[12], 0);
        assert_eq!(delete_io_sq(2).dw[10], 2);
        assert_eq!(delete_io_cq(2).opcode(), 4);
    }

    #[test]
    fn identify_controller_parses() {
        let mut b = [0u8; 4096];
        b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        b[4..24].copy_from_slice(b"SERIAL01            ");
        b[24..64].copy_from_slice(b"Peregrine NVMe                          ");
        b[77] = 5;
        b[512] = 0x66;
        b[513] = 0x44;
        b[516..520].copy_from_slice(&3u32.to_le_bytes());
        let id = IdentifyController::parse(&b).unwrap();
        assert_eq!((id.vid, id.mdts, id.nn), (0x1b36, 5, 3));
        assert_eq!(id.serial(), "SERIAL01");
        assert_eq!(id.model(), "Peregrine NVMe");
        assert_eq!(id.max_transfer(4096), Some(128 * 1024));
        b[77] = 200; // hostile: would overflow
        assert_eq!(
            IdentifyController::parse(&b).unwrap().max_transfer(4096),
            None
        );
        b[512] = 0x55; // SQ entries of 32 bytes only
        assert!(IdentifyController::parse(&b).is_err());
        assert!(IdentifyController::parse(&b[..100]).is_err());
    }

    #[test]
    fn identify_namespace_parses() {
        let mut b = [0u8; 4096];
        b[0..8].copy_from_slice(&1000u64.to_le_bytes());
        b[25] = 1; // two formats
        b[26] = 1; // format 1 in use
        b[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        b[132..136].copy_from_slice(&((12u32 << 16) | 8).to_le_bytes());
        let ns = IdentifyNamespace::parse(&b).unwrap();
        assert_eq!(
            (ns.nsze, ns.lba_size, ns.metadata_size, ns.lba_format),
            (1000, 4096, 8, 1)
        );
        b[26] = 2; // beyond NLBAF
        assert!(IdentifyNamespace::parse(&b).is_err());
        b[26] = 0;
        b[128..132].copy_from_slice(&(40u32 << 16).to_le_bytes()); // absurd LBADS
        assert!(IdentifyNamespace::parse(&b).is_err());
        assert!(IdentifyNamespace::parse(&[0u8; 4096]).is_err());
    }
}
