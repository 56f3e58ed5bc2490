//! Errors, and the decoding of the completion status field.

/// What a timed-out wait was waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// CSTS.RDY to clear after CC.EN was cleared.
    Disable,
    /// CSTS.RDY to set after CC.EN was set.
    Enable,
    /// CSTS.SHST to report shutdown complete.
    Shutdown,
    /// The completion of command `cid` on queue `qid`.
    Command { qid: u16, cid: u16 },
}

/// Device behaviour the driver refuses to trust.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceError {
    /// A completion names a command id that is not outstanding.
    UnknownCid { qid: u16, cid: u16 },
    /// A completion's SQ head pointer is outside the queue or beyond the tail.
    BadSqHead { qid: u16, head: u16 },
    /// A completion on queue `qid` names submission queue `sqid`.
    BadSqId { qid: u16, sqid: u16 },
    /// Identify data that makes no sense (e.g. an LBA size below 512 bytes).
    BadIdentify,
    /// Set Features (Number of Queues) granted zero queues.
    NoQueuesGranted,
}

/// Controller features the driver needs and does not find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsupported {
    /// CAP.CSS lacks the NVM command set.
    NvmCommandSet,
    /// CAP.MPSMIN is above 4 KiB.
    PageSize,
}

/// Everything that can go wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A wait ran past its deadline.
    Timeout(Wait),
    /// CSTS.CFS: controller fatal status; the controller needs a reset.
    Fatal,
    /// The registers read all ones: the device is gone (surprise removal, bus error).
    Gone,
    /// A command completed with an error status.
    Command(Status),
    /// The submission queue (or its command ids) is full.
    QueueFull,
    /// The DMA allocator could not provide memory.
    NoMemory,
    /// The device sent something invalid.
    Device(DeviceError),
    /// The controller lacks something the driver needs.
    Unsupported(Unsupported),
    /// A caller's argument is out of range (buffer too small, misaligned, no such queue).
    InvalidArgument,
    /// The controller is not initialised (call `init` first).
    NotReady,
}

/// The 15-bit status field of a completion entry (DW3 bits 31:17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Status code type (0 generic, 1 command specific, 2 media and data integrity, 3 path).
    pub sct: u8,
    /// Status code.
    pub sc: u8,
    /// Command retry delay index.
    pub crd: u8,
    /// More: further information in the Error Information log page.
    pub more: bool,
    /// Do not retry.
    pub dnr: bool,
}

/// The status codes the driver names; everything else is [`StatusKind::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    Success,
    InvalidOpcode,
    InvalidField,
    CommandIdConflict,
    DataTransferError,
    PowerLoss,
    InternalError,
    AbortRequested,
    InvalidNamespace,
    LbaOutOfRange,
    CapacityExceeded,
    NamespaceNotReady,
    CompletionQueueInvalid,
    InvalidQueueId,
    InvalidQueueSize,
    InvalidInterruptVector,
    WriteFault,
    UnrecoveredReadError,
    Other,
}

impl Status {
    /// Successful completion.
    pub const SUCCESS: Status = Status {
        sct: 0,
        sc: 0,
        crd: 0,
        more: false,
        dnr: false,
    };

    /// Decodes the status field (`dw3 >> 17`, 15 bits).
    pub const fn from_field(field: u16) -> Status {
        Status {
            sc: field as u8,
            sct: ((field >> 8) & 0x7) as u8,
            crd: ((field >> 11) & 0x3) as u8,
            more: field & (1 << 13) != 0,
            dnr: field & (1 << 14) != 0,
        }
    }

    /// Encodes the status field (the inverse of [`Status::from_field`]).
    pub const fn to_field(self) -> u16 {
        self.sc as u16
            | ((self.sct as u16 & 0x7) << 8)
            | ((self.crd as u16 & 0x3) << 11)
            | ((self.more as u16) << 13)
            | ((self.dnr as u16) << 14)
    }

    /// A generic (SCT 0) status with code `sc`.
    pub const fn generic(sc: u8) -> Status {
        Status {
            sct: 0,
            sc,
            crd: 0,
            more: false,
            dnr: false,
        }
    }

    /// Whether the command succeeded.
    pub const fn is_success(self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// The named meaning of the (SCT, SC) pair.
    pub const fn kind(self) -> StatusKind {
        use StatusKind::*;
        match (self.sct, self.sc) {
            (0, 0x00) => Success,
            (0, 0x01) => InvalidOpcode,
            (0, 0x02) => InvalidField,
            (0, 0x03) => CommandIdConflict,
            (0, 0x04) => DataTransferError,
            (0, 0x05) => PowerLoss,
            (0, 0x06) => InternalError,
            (0, 0x07) => AbortRequested,
            (0, 0x0b) => InvalidNamespace,
            (0, 0x80) => LbaOutOfRange,
            (0, 0x81) => CapacityExceeded,
            (0, 0x82) => NamespaceNotReady,
            (1, 0x00) => CompletionQueueInvalid,
            (1, 0x01) => InvalidQueueId,
            (1, 0x02) => InvalidQueueSize,
            (1, 0x08) => InvalidInterruptVector,
            (2, 0x80) => WriteFault,
            (2, 0x81) => UnrecoveredReadError,
            _ => Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_field_round_trips() {
        for field in 0..(1u16 << 15) {
            assert_eq!(Status::from_field(field).to_field(), field);
        }
    }

    #[test]
    fn status_decodes() {
        // SCT 0, SC 0x80, DNR set.
        let s = Status::from_field(0x80 | (1 << 14));
        assert_eq!(s.kind(), StatusKind::LbaOutOfRange);
        assert!(s.dnr && !s.more && !s.is_success());
        let s = Status::from_field((1 << 8) | 0x01 | (1 << 13));
        assert_eq!(s.kind(), StatusKind::InvalidQueueId);
        assert!(s.more);
        assert_eq!(Status::from_field(0).kind(), StatusKind::Success);
        assert_eq!(Status::from_field(7 << 8).kind(), StatusKind::Other);
    }
}
