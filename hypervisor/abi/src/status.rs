//! Hypercall status codes.

/// The result of every hypercall, returned in the low byte of the first result register.
///
/// The set follows NOVA's, plus [`Status::OutOfMemory`] for an exhausted kernel-memory
/// quota.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// The operation completed.
    Success = 0,
    /// A semaphore down with a deadline expired.
    Timeout = 1,
    /// The operation was aborted (e.g. the partner went away or a call was cancelled).
    Aborted = 2,
    /// The hypercall number does not exist.
    BadHypercall = 3,
    /// A selector does not name a capability of the required type or permissions.
    BadCapability = 4,
    /// An argument is out of range or malformed.
    BadParameter = 5,
    /// The hardware or kernel lacks a feature the operation needs.
    BadFeature = 6,
    /// The CPU number does not name an online CPU, or the object is bound elsewhere.
    BadCpu = 7,
    /// The device or interrupt does not exist.
    BadDevice = 8,
    /// The protection domain's kernel-memory quota is exhausted.
    OutOfMemory = 9,
}

impl Status {
    /// All statuses, in numeric order.
    pub const ALL: [Status; 10] = [
        Status::Success,
        Status::Timeout,
        Status::Aborted,
        Status::BadHypercall,
        Status::BadCapability,
        Status::BadParameter,
        Status::BadFeature,
        Status::BadCpu,
        Status::BadDevice,
        Status::OutOfMemory,
    ];

    /// Decodes the low byte of a result register. Unknown values map to `None`.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        if (raw as usize) < Self::ALL.len() {
            Some(Self::ALL[raw as usize])
        } else {
            None
        }
    }

    /// Converts `Success` into `Ok(())` and everything else into `Err(self)`.
    pub const fn into_result(self) -> Result<(), Status> {
        match self {
            Status::Success => Ok(()),
            s => Err(s),
        }
    }

    /// A short name for logs.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Timeout => "timeout",
            Status::Aborted => "aborted",
            Status::BadHypercall => "bad hypercall",
            Status::BadCapability => "bad capability",
            Status::BadParameter => "bad parameter",
            Status::BadFeature => "bad feature",
            Status::BadCpu => "bad cpu",
            Status::BadDevice => "bad device",
            Status::OutOfMemory => "out of memory",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::from_raw(s as u8), Some(s));
        }
        assert_eq!(Status::from_raw(10), None);
        assert_eq!(Status::from_raw(255), None);
    }
}
