//! Controller registers (NVMe base specification, "Controller Registers"): offsets, bit
//! fields, CAP decoding, doorbell addresses and the enable/disable/shutdown sequences
//! with deadlines.

use crate::{Clock, Error, Mmio, Wait};

/// Controller Capabilities (64 bits).
pub const CAP: usize = 0x00;
/// Version.
pub const VS: usize = 0x08;
/// Interrupt Mask Set.
pub const INTMS: usize = 0x0c;
/// Interrupt Mask Clear.
pub const INTMC: usize = 0x10;
/// Controller Configuration.
pub const CC: usize = 0x14;
/// Controller Status.
pub const CSTS: usize = 0x1c;
/// Admin Queue Attributes.
pub const AQA: usize = 0x24;
/// Admin Submission Queue base address (64 bits).
pub const ASQ: usize = 0x28;
/// Admin Completion Queue base address (64 bits).
pub const ACQ: usize = 0x30;
/// The first doorbell (admin SQ tail).
pub const DOORBELL_BASE: usize = 0x1000;

/// Controller Configuration bits.
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1 << 0;
    /// I/O command set selected: NVM (bits 6:4 = 0).
    pub const CSS_NVM: u32 = 0 << 4;
    /// Memory page size 2^(12 + `mps`) (bits 10:7).
    pub const fn mps(mps: u32) -> u32 {
        (mps & 0xf) << 7
    }
    /// Arbitration: round robin (bits 13:11 = 0).
    pub const AMS_RR: u32 = 0 << 11;
    /// Shutdown notification: normal (bits 15:14 = 01).
    pub const SHN_NORMAL: u32 = 1 << 14;
    /// Shutdown notification mask.
    pub const SHN_MASK: u32 = 3 << 14;
    /// I/O submission queue entry size 2^`n` (bits 19:16).
    pub const fn iosqes(n: u32) -> u32 {
        (n & 0xf) << 16
    }
    /// I/O completion queue entry size 2^`n` (bits 23:20).
    pub const fn iocqes(n: u32) -> u32 {
        (n & 0xf) << 20
    }
}

/// Controller Status bits.
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1 << 0;
    /// Controller Fatal Status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown status mask (bits 3:2).
    pub const SHST_MASK: u32 = 3 << 2;
    /// Shutdown status: processing complete.
    pub const SHST_COMPLETE: u32 = 2 << 2;
    /// NVM Subsystem Reset Occurred.
    pub const NSSRO: u32 = 1 << 4;
}

/// AQA value for admin queues of `sq_entries` and `cq_entries` entries (1..=4096).
pub const fn aqa(sq_entries: u16, cq_entries: u16) -> u32 {
    ((sq_entries as u32 - 1) & 0xfff) | (((cq_entries as u32 - 1) & 0xfff) << 16)
}

/// Decoded Controller Capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Maximum queue entries supported (MQES is 0-based; the result is 2..=65536).
    pub const fn max_queue_entries(self) -> u32 {
        let mqes = (self.0 & 0xffff) as u32;
        // MQES 0 is invalid (minimum is 1, i.e. two entries); treat it as 1.
        if mqes == 0 {
            2
        } else {
            mqes + 1
        }
    }
    /// Contiguous Queues Required.
    pub const fn contiguous_required(self) -> bool {
        self.0 & (1 << 16) != 0
    }
    /// Worst-case time for CSTS.RDY to change, in milliseconds (CAP.TO, 500 ms units;
    /// at least 500 ms even if the field reads 0).
    pub const fn timeout_ms(self) -> u64 {
        let to = (self.0 >> 24) & 0xff;
        if to == 0 {
            500
        } else {
            to * 500
        }
    }
    /// Doorbell Stride field (DSTRD): doorbells are `4 << dstrd` bytes apart.
    pub const fn dstrd(self) -> u32 {
        ((self.0 >> 32) & 0xf) as u32
    }
    /// Distance between doorbells in bytes.
    pub const fn doorbell_stride(self) -> usize {
        4 << self.dstrd()
    }
    /// NVM Subsystem Reset Supported.
    pub const fn nssr_supported(self) -> bool {
        self.0 & (1 << 36) != 0
    }
    /// Command Sets Supported (8 bits).
    pub const fn css(self) -> u8 {
        ((self.0 >> 37) & 0xff) as u8
    }
    /// The NVM command set is supported.
    pub const fn supports_nvm(self) -> bool {
        self.css() & 1 != 0
    }
    /// MPSMIN: the smallest memory page size is 2^(12 + mpsmin).
    pub const fn mps_min(self) -> u32 {
        ((self.0 >> 48) & 0xf) as u32
    }
    /// MPSMAX: the largest memory page size is 2^(12 + mpsmax).
    pub const fn mps_max(self) -> u32 {
        ((self.0 >> 52) & 0xf) as u32
    }
    /// The smallest memory page size in bytes.
    pub const fn page_size_min(self) -> usize {
        1 << (12 + self.mps_min())
    }
    /// The largest memory page size in bytes.
    pub const fn page_size_max(self) -> usize {
        1 << (12 + self.mps_max())
    }
}

/// Byte offset of submission queue `qid`'s tail doorbell.
pub const fn sq_tail_doorbell(qid: u16, stride: usize) -> usize {
    DOORBELL_BASE + (2 * qid as usize) * stride
}

/// Byte offset of completion queue `qid`'s head doorbell.
pub const fn cq_head_doorbell(qid: u16, stride: usize) -> usize {
    DOORBELL_BASE + (2 * qid as usize + 1) * stride
}

/// Reads CSTS, mapping all ones (device gone) to [`Error::Gone`].
pub fn read_csts(mmio: &impl Mmio) -> Result<u32, Error> {
    match mmio.read32(CSTS) {
        u32::MAX => Err(Error::Gone),
        v => Ok(v),
    }
}

/// Waits until CSTS.RDY equals `ready`, for at most `timeout_ms`. A set CSTS.CFS is
/// [`Error::Fatal`] while waiting for ready (while disabling it is expected and ignored:
/// clearing CC.EN is how a fatal controller is reset).
pub fn wait_ready(
    mmio: &impl Mmio,
    clock: &impl Clock,
    ready: bool,
    timeout_ms: u64,
) -> Result<(), Error> {
    let start = clock.now_ms();
    loop {
        let csts = read_csts(mmio)?;
        if ready && csts & csts::CFS != 0 {
            return Err(Error::Fatal);
        }
        if (csts & csts::RDY != 0) == ready {
            return Ok(());
        }
        if clock.now_ms().saturating_sub(start) > timeout_ms {
            return Err(Error::Timeout(if ready {
                Wait::Enable
            } else {
                Wait::Disable
            }));
        }
        clock.relax();
    }
}

/// Clears CC.EN (if set, or if CSTS.RDY is still set) and waits for CSTS.RDY to clear.
pub fn disable(mmio: &impl Mmio, clock: &impl Clock, cap: Cap) -> Result<(), Error> {
    let cc_now = mmio.read32(CC);
    if cc_now == u32::MAX {
        return Err(Error::Gone);
    }
    if cc_now & cc::EN != 0 {
        // EN must not be cleared while the controller is still becoming ready (EN = 1,
        // RDY = 0): wait for RDY first; a controller that never gets there (or is
        // fatal) is disabled anyway, which is how it is reset.
        if read_csts(mmio)? & csts::RDY == 0 {
            match wait_ready(mmio, clock, true, cap.timeout_ms()) {
                Ok(()) | Err(Error::Timeout(_)) | Err(Error::Fatal) => {}
                Err(e) => return Err(e),
            }
        }
        mmio.write32(CC, cc_now & !cc::EN);
    }
    wait_ready(mmio, clock, false, cap.timeout_ms())
}

/// The CC value the driver enables with: NVM command set, 4 KiB pages, round robin,
/// 64-byte SQ entries, 16-byte CQ entries, EN.
pub const CC_ENABLE: u32 =
    cc::CSS_NVM | cc::mps(0) | cc::AMS_RR | cc::iosqes(6) | cc::iocqes(4) | cc::EN;

/// Programs the admin queues (entries and device addresses), sets CC.EN and waits for
/// CSTS.RDY. The controller must be disabled.
pub fn enable(
    mmio: &impl Mmio,
    clock: &impl Clock,
    cap: Cap,
    admin_entries: u16,
    asq: u64,
    acq: u64,
) -> Result<(), Error> {
    mmio.write32(AQA, aqa(admin_entries, admin_entries));
    mmio.write64(ASQ, asq);
    mmio.write64(ACQ, acq);
    mmio.write32(CC, CC_ENABLE);
    wait_ready(mmio, clock, true, cap.timeout_ms())
}

/// Normal shutdown: CC.SHN = 01, then waits for CSTS.SHST = complete.
pub fn shutdown(mmio: &impl Mmio, clock: &impl Clock, timeout_ms: u64) -> Result<(), Error> {
    let cc_now = mmio.read32(CC);
    mmio.write32(CC, (cc_now & !cc::SHN_MASK) | cc::SHN_NORMAL);
    let start = clock.now_ms();
    loop {
        let csts = read_csts(mmio)?;
        if csts & csts::SHST_MASK == csts::SHST_COMPLETE {
            return Ok(());
        }
        if clock.now_ms().saturating_sub(start) > timeout_ms {
            return Err(Error::Timeout(Wait::Shutdown));
        }
        clock.relax();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_decodes() {
        // MQES 1023, CQR, TO 20 (10 s), DSTRD 2, NVM css, MPSMIN 0, MPSMAX 4.
        let cap = Cap(1023 | (1 << 16) | (20 << 24) | (2u64 << 32) | (1u64 << 37) | (4u64 << 52));
        assert_eq!(cap.max_queue_entries(), 1024);
        assert!(cap.contiguous_required());
        assert_eq!(cap.timeout_ms(), 10_000);
        assert_eq!(cap.doorbell_stride(), 16);
        assert!(cap.supports_nvm());
        assert_eq!(cap.page_size_min(), 4096);
        assert_eq!(cap.page_size_max(), 65536);
        assert_eq!(Cap(0).timeout_ms(), 500);
        assert_eq!(Cap(0).max_queue_entries(), 2);
        assert!(!Cap(0).supports_nvm());
    }

    #[test]
    fn doorbells() {
        assert_eq!(sq_tail_doorbell(0, 4), 0x1000);
        assert_eq!(cq_head_doorbell(0, 4), 0x1004);
        assert_eq!(sq_tail_doorbell(3, 4), 0x1018);
        assert_eq!(cq_head_doorbell(3, 4), 0x101c);
        assert_eq!(sq_tail_doorbell(1, 4 << 3), 0x1000 + 2 * 32);
        assert_eq!(cq_head_doorbell(1, 4 << 3), 0x1000 + 3 * 32);
    }

    #[test]
    fn aqa_and_cc() {
        assert_eq!(aqa(32, 32), 31 | (31 << 16));
        assert_eq!(CC_ENABLE, 1 | (6 << 16) | (4 << 20));
    }
}
