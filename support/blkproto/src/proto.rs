//! The wire format of one request and one completion, and the service-side validation
//! of a request against the session's limits (see the crate docs for the spec).

/// Bytes in one submission descriptor.
pub const DESC_SIZE: usize = 32;
/// Bytes in one completion entry.
pub const COMP_SIZE: usize = 16;
/// 32-bit words in one descriptor.
pub const DESC_WORDS: usize = DESC_SIZE / 4;
/// 32-bit words in one completion entry.
pub const COMP_WORDS: usize = COMP_SIZE / 4;

/// Request flag: force unit access (the write is durable when it completes).
pub const FLAG_FUA: u8 = 1 << 0;
/// Every flag bit this version defines; the others are reserved (must be zero).
pub const FLAGS_KNOWN: u8 = FLAG_FUA;

/// An operation code (`op` byte of a descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Disk to data area.
    Read,
    /// Data area to disk.
    Write,
    /// Make every write completed before this request was submitted durable.
    Flush,
    /// The blocks' contents may be dropped (reads of them return unspecified data).
    Discard,
}

impl Op {
    /// The wire code.
    pub const fn code(self) -> u8 {
        match self {
            Op::Read => 1,
            Op::Write => 2,
            Op::Flush => 3,
            Op::Discard => 4,
        }
    }

    /// The operation of a wire code, if defined.
    pub const fn from_code(code: u8) -> Option<Op> {
        match code {
            1 => Some(Op::Read),
            2 => Some(Op::Write),
            3 => Some(Op::Flush),
            4 => Some(Op::Discard),
            _ => None,
        }
    }
}

/// A submission descriptor as it lies in the ring: raw, unvalidated fields.
///
/// Layout (32 bytes, little-endian): `tag: u32` @0, `op: u8` @4, `flags: u8` @5,
/// `reserved0: u16` @6, `block: u64` @8, `count: u32` @16, `reserved1: u32` @20,
/// `buf: u64` @24.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// The client's name for the request, echoed in its completion.
    pub tag: u32,
    /// The operation code ([`Op::code`]).
    pub op: u8,
    /// Flags ([`FLAG_FUA`]); unknown bits are refused.
    pub flags: u8,
    /// Must be zero.
    pub reserved0: u16,
    /// The first block, in the session's own numbering (0 = the partition's first).
    pub block: u64,
    /// Blocks to transfer.
    pub count: u32,
    /// Must be zero.
    pub reserved1: u32,
    /// Byte offset of the buffer in the session's data area.
    pub buf: u64,
}

impl Descriptor {
    /// A descriptor for `op` with no flags.
    pub fn new(tag: u32, op: Op, block: u64, count: u32, buf: u64) -> Descriptor {
        Descriptor {
            tag,
            op: op.code(),
            flags: 0,
            reserved0: 0,
            block,
            count,
            reserved1: 0,
            buf,
        }
    }

    /// The descriptor as its eight little-endian words (word `i` = bytes `4i..4i+4`).
    pub fn to_words(&self) -> [u32; DESC_WORDS] {
        [
            self.tag,
            u32::from(self.op) | u32::from(self.flags) << 8 | u32::from(self.reserved0) << 16,
            self.block as u32,
            (self.block >> 32) as u32,
            self.count,
            self.reserved1,
            self.buf as u32,
            (self.buf >> 32) as u32,
        ]
    }

    /// The descriptor of eight words; every bit pattern decodes (validation is
    /// [`validate`]'s job).
    pub fn from_words(w: [u32; DESC_WORDS]) -> Descriptor {
        Descriptor {
            tag: w[0],
            op: w[1] as u8,
            flags: (w[1] >> 8) as u8,
            reserved0: (w[1] >> 16) as u16,
            block: u64::from(w[2]) | u64::from(w[3]) << 32,
            count: w[4],
            reserved1: w[5],
            buf: u64::from(w[6]) | u64::from(w[7]) << 32,
        }
    }

    /// The descriptor's 32 bytes.
    pub fn to_bytes(&self) -> [u8; DESC_SIZE] {
        let mut b = [0; DESC_SIZE];
        for (i, w) in self.to_words().iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// The descriptor of 32 bytes.
    pub fn from_bytes(b: &[u8; DESC_SIZE]) -> Descriptor {
        let mut w = [0; DESC_WORDS];
        for (i, w) in w.iter_mut().enumerate() {
            *w = u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        }
        Descriptor::from_words(w)
    }
}

/// A completion's status (wire `status: u32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Done.
    Ok,
    /// The disk failed the transfer.
    IoErr,
    /// The block range reaches outside the session.
    Range,
    /// A malformed descriptor: unknown op, reserved bits set, count 0 or above the
    /// session's maximum transfer.
    BadDesc,
    /// The buffer reaches outside the data area or is misaligned.
    BadBuf,
    /// The tag is already in flight.
    BadTag,
    /// A well-formed operation this session does not offer (e.g. discard).
    Unsupported,
    /// A status code this version does not define (only ever seen by a client).
    Unknown(u32),
}

impl Status {
    /// The wire code.
    pub const fn code(self) -> u32 {
        match self {
            Status::Ok => 0,
            Status::IoErr => 1,
            Status::Range => 2,
            Status::BadDesc => 3,
            Status::BadBuf => 4,
            Status::BadTag => 5,
            Status::Unsupported => 6,
            Status::Unknown(c) => c,
        }
    }

    /// The status of a wire code.
    pub const fn from_code(code: u32) -> Status {
        match code {
            0 => Status::Ok,
            1 => Status::IoErr,
            2 => Status::Range,
            3 => Status::BadDesc,
            4 => Status::BadBuf,
            5 => Status::BadTag,
            6 => Status::Unsupported,
            c => Status::Unknown(c),
        }
    }
}

/// A completion entry. Layout (16 bytes, little-endian): `tag: u32` @0,
/// `status: u32` @4, `blocks: u32` @8 (blocks transferred), `reserved: u32` @12 (zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request's tag.
    pub tag: u32,
    /// How it ended.
    pub status: Status,
    /// Blocks transferred (0 unless [`Status::Ok`]).
    pub blocks: u32,
}

impl Completion {
    /// The entry's four words.
    pub fn to_words(&self) -> [u32; COMP_WORDS] {
        [self.tag, self.status.code(), self.blocks, 0]
    }

    /// The entry of four words (the reserved word is ignored).
    pub fn from_words(w: [u32; COMP_WORDS]) -> Completion {
        Completion {
            tag: w[0],
            status: Status::from_code(w[1]),
            blocks: w[2],
        }
    }
}

/// What the service knows about one session, from its own configuration (never from
/// shared memory): the geometry every request is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// The session's first block as an absolute disk LBA.
    pub first_lba: u64,
    /// The session's length in blocks (session blocks are `0..blocks`).
    pub blocks: u64,
    /// Bytes per block (a power of two, at least 512).
    pub block_size: u32,
    /// Bytes in the session's data area.
    pub data_len: u64,
    /// The most blocks one request may move (at least 1).
    pub max_blocks: u32,
    /// Whether [`Op::Discard`] is offered.
    pub discard: bool,
}

impl SessionLimits {
    /// Limits for the extent `bounds`; `max_blocks` is clamped to at least 1.
    pub fn new(bounds: crate::Bounds, block_size: u32, data_len: u64, max_blocks: u32) -> Self {
        SessionLimits {
            first_lba: bounds.first_lba,
            blocks: bounds.blocks,
            block_size,
            data_len,
            max_blocks: max_blocks.max(1),
            discard: false,
        }
    }
}

/// Why a descriptor was refused; each maps to a [`Status`] ([`DescError::status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescError {
    /// The op code is not defined.
    UnknownOp,
    /// A reserved field or flag bit is not zero, or a field the op does not use is not
    /// zero (a flush's block, count and buffer; a discard's buffer; FUA on a non-write).
    Reserved,
    /// A read, write or discard of zero blocks.
    ZeroCount,
    /// More blocks than the session's maximum transfer.
    TooLarge,
    /// `block + count` overflows or passes the session's end.
    OutOfRange,
    /// The buffer overflows or passes the data area's end.
    BufferOutOfRange,
    /// The buffer does not start on a block-size boundary of the data area.
    BufferMisaligned,
    /// The op is well formed but not offered by this session.
    Unsupported,
    /// The tag is already in flight.
    TagInUse,
}

impl DescError {
    /// The status the client gets for it.
    pub const fn status(self) -> Status {
        match self {
            DescError::UnknownOp
            | DescError::Reserved
            | DescError::ZeroCount
            | DescError::TooLarge => Status::BadDesc,
            DescError::OutOfRange => Status::Range,
            DescError::BufferOutOfRange | DescError::BufferMisaligned => Status::BadBuf,
            DescError::Unsupported => Status::Unsupported,
            DescError::TagInUse => Status::BadTag,
        }
    }
}

/// A validated request, in absolute disk terms: the only form the service's disk
/// path ever sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The client's tag.
    pub tag: u32,
    /// What to do.
    pub op: Op,
    /// The first absolute disk LBA (0 for a flush).
    pub lba: u64,
    /// Blocks (0 for a flush).
    pub count: u32,
    /// The buffer's byte offset in the data area (0 for flush and discard).
    pub buf: u64,
    /// The buffer's length in bytes (`count * block_size`; 0 for flush and discard).
    pub len: u64,
    /// Force unit access (writes only).
    pub fua: bool,
}

/// Checks `d` against `lim` and translates it to absolute disk terms; the session's
/// security property rests here: an `Ok` names only blocks inside
/// `lim.first_lba..lim.first_lba + lim.blocks` and only bytes inside the data area.
/// The tag's uniqueness is the ring's check ([`crate::ring::ServiceRing`]).
pub fn validate(d: &Descriptor, lim: &SessionLimits) -> Result<Request, DescError> {
    let op = Op::from_code(d.op).ok_or(DescError::UnknownOp)?;
    if d.flags & !FLAGS_KNOWN != 0 || d.reserved0 != 0 || d.reserved1 != 0 {
        return Err(DescError::Reserved);
    }
    let fua = d.flags & FLAG_FUA != 0;
    if fua && op != Op::Write {
        return Err(DescError::Reserved);
    }
    if op == Op::Flush {
        if d.block != 0 || d.count != 0 || d.buf != 0 {
            return Err(DescError::Reserved);
        }
        return Ok(Request {
            tag: d.tag,
            op,
            lba: 0,
            count: 0,
            buf: 0,
            len: 0,
            fua: false,
        });
    }
    if op == Op::Discard && d.buf != 0 {
        return Err(DescError::Reserved);
    }
    if d.count == 0 {
        return Err(DescError::ZeroCount);
    }
    if d.count > lim.max_blocks {
        return Err(DescError::TooLarge);
    }
    let end = d
        .block
        .checked_add(u64::from(d.count))
        .ok_or(DescError::OutOfRange)?;
    if end > lim.blocks {
        return Err(DescError::OutOfRange);
    }
    // Cannot overflow: the binding checked first_lba + blocks against the disk.
    let lba = lim
        .first_lba
        .checked_add(d.block)
        .ok_or(DescError::OutOfRange)?;
    if op == Op::Discard {
        if !lim.discard {
            return Err(DescError::Unsupported);
        }
        return Ok(Request {
            tag: d.tag,
            op,
            lba,
            count: d.count,
            buf: 0,
            len: 0,
            fua: false,
        });
    }
    let bs = u64::from(lim.block_size);
    if bs == 0 || !d.buf.is_multiple_of(bs) {
        return Err(DescError::BufferMisaligned);
    }
    let len = u64::from(d.count)
        .checked_mul(bs)
        .ok_or(DescError::BufferOutOfRange)?;
    let buf_end = d.buf.checked_add(len).ok_or(DescError::BufferOutOfRange)?;
    if buf_end > lim.data_len {
        return Err(DescError::BufferOutOfRange);
    }
    Ok(Request {
        tag: d.tag,
        op,
        lba,
        count: d.count,
        buf: d.buf,
        len,
        fua,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bounds;

    fn lim() -> SessionLimits {
        let mut l = SessionLimits::new(
            Bounds {
                first_lba: 1000,
                blocks: 100,
            },
            512,
            64 * 512,
            16,
        );
        l.discard = true;
        l
    }

    #[test]
    fn descriptor_bytes_round_trip() {
        let mut d = Descriptor::new(0xdead_beef, Op::Write, 0x1_2345_6789, 7, 0xabcd_0000_1000);
        d.flags = FLAG_FUA;
        let b = d.to_bytes();
        assert_eq!(&b[0..4], &0xdead_beefu32.to_le_bytes());
        assert_eq!(b[4], 2);
        assert_eq!(b[5], 1);
        assert_eq!(&b[8..16], &0x1_2345_6789u64.to_le_bytes());
        assert_eq!(&b[16..20], &7u32.to_le_bytes());
        assert_eq!(&b[24..32], &0xabcd_0000_1000u64.to_le_bytes());
        assert_eq!(Descriptor::from_bytes(&b), d);
        assert_eq!(Descriptor::from_words(d.to_words()), d);
    }

    #[test]
    fn completion_and_status_codes_round_trip() {
        for code in 0..10 {
            assert_eq!(Status::from_code(code).code(), code);
        }
        let c = Completion {
            tag: 9,
            status: Status::Range,
            blocks: 0,
        };
        assert_eq!(Completion::from_words(c.to_words()), c);
    }

    #[test]
    fn good_requests_translate_to_absolute_lbas() {
        let r = validate(&Descriptor::new(1, Op::Read, 0, 16, 0), &lim()).unwrap();
        assert_eq!((r.lba, r.count, r.buf, r.len), (1000, 16, 0, 16 * 512));
        let r = validate(&Descriptor::new(2, Op::Write, 84, 16, 48 * 512), &lim()).unwrap();
        assert_eq!((r.lba, r.len), (1084, 16 * 512));
        let r = validate(&Descriptor::new(3, Op::Flush, 0, 0, 0), &lim()).unwrap();
        assert_eq!((r.op, r.lba, r.count), (Op::Flush, 0, 0));
        let r = validate(&Descriptor::new(4, Op::Discard, 99, 1, 0), &lim()).unwrap();
        assert_eq!((r.lba, r.count, r.len), (1099, 1, 0));
        let mut d = Descriptor::new(5, Op::Write, 0, 1, 0);
        d.flags = FLAG_FUA;
        assert!(validate(&d, &lim()).unwrap().fua);
    }

    #[test]
    fn each_malformed_field_has_its_error() {
        let l = lim();
        let e = |d: Descriptor| validate(&d, &l).unwrap_err();
        let mut d = Descriptor::new(1, Op::Read, 0, 1, 0);
        for op in [0, 5, 0xff] {
            d.op = op;
            assert_eq!(e(d), DescError::UnknownOp);
        }
        let base = Descriptor::new(1, Op::Read, 0, 1, 0);
        assert_eq!(e(Descriptor { flags: 2, ..base }), DescError::Reserved);
        assert_eq!(
            e(Descriptor {
                flags: FLAG_FUA,
                ..base
            }),
            DescError::Reserved
        );
        assert_eq!(
            e(Descriptor {
                reserved0: 1,
                ..base
            }),
            DescError::Reserved
        );
        assert_eq!(
            e(Descriptor {
                reserved1: 1,
                ..base
            }),
            DescError::Reserved
        );
        assert_eq!(e(Descriptor { count: 0, ..base }), DescError::ZeroCount);
        assert_eq!(e(Descriptor { count: 17, ..base }), DescError::TooLarge);
        assert_eq!(e(Descriptor { block: 100, ..base }), DescError::OutOfRange);
        assert_eq!(
            e(Descriptor {
                block: 90,
                count: 11,
                ..base
            }),
            DescError::OutOfRange
        );
        assert_eq!(
            e(Descriptor {
                block: u64::MAX,
                ..base
            }),
            DescError::OutOfRange
        );
        assert_eq!(
            e(Descriptor { buf: 1, ..base }),
            DescError::BufferMisaligned
        );
        assert_eq!(
            e(Descriptor {
                buf: 64 * 512,
                ..base
            }),
            DescError::BufferOutOfRange
        );
        assert_eq!(
            e(Descriptor {
                buf: 63 * 512,
                count: 2,
                ..base
            }),
            DescError::BufferOutOfRange
        );
        assert_eq!(
            e(Descriptor {
                buf: u64::MAX - 511,
                ..base
            }),
            DescError::BufferOutOfRange
        );
        let flush = Descriptor::new(1, Op::Flush, 0, 0, 0);
        assert_eq!(e(Descriptor { block: 1, ..flush }), DescError::Reserved);
        assert_eq!(e(Descriptor { count: 1, ..flush }), DescError::Reserved);
        assert_eq!(e(Descriptor { buf: 512, ..flush }), DescError::Reserved);
        let discard = Descriptor::new(1, Op::Discard, 0, 1, 512);
        assert_eq!(e(discard), DescError::Reserved);
        let no_discard = SessionLimits {
            discard: false,
            ..l
        };
        assert_eq!(
            validate(&Descriptor::new(1, Op::Discard, 0, 1, 0), &no_discard),
            Err(DescError::Unsupported)
        );
        // Status mapping.
        assert_eq!(DescError::OutOfRange.status(), Status::Range);
        assert_eq!(DescError::BufferMisaligned.status(), Status::BadBuf);
        assert_eq!(DescError::TagInUse.status(), Status::BadTag);
        assert_eq!(DescError::Reserved.status(), Status::BadDesc);
    }

    #[test]
    fn session_at_the_end_of_a_huge_disk() {
        let l = SessionLimits::new(
            Bounds {
                first_lba: u64::MAX - 10,
                blocks: 10,
            },
            4096,
            u64::MAX,
            u32::MAX,
        );
        let r = validate(&Descriptor::new(1, Op::Read, 9, 1, 0), &l).unwrap();
        assert_eq!(r.lba, u64::MAX - 1);
        assert_eq!(
            validate(&Descriptor::new(1, Op::Read, 9, 2, 0), &l),
            Err(DescError::OutOfRange)
        );
        let big = Descriptor::new(1, Op::Read, 0, 10, u64::MAX - 4095);
        assert_eq!(validate(&big, &l), Err(DescError::BufferOutOfRange));
    }
}
