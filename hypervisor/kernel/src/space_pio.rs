//! I/O port spaces: a permission bitmap per PD, loaded into the CPU's TSS I/O bitmap
//! when the PD runs.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use peregrine_abi::Status;
use spin::Mutex;

/// Bytes of an I/O permission bitmap (one bit per port, set = denied).
pub const IOPB_BYTES: usize = 8192;
/// Quota pages a PD pays for its bitmap.
pub const IOPB_PAGES: u64 = (IOPB_BYTES as u64).div_ceil(4096);

/// A bitmap with every port denied, or `None` when the heap has no room.
fn new_bitmap() -> Option<Box<[u8; IOPB_BYTES]>> {
    let layout = core::alloc::Layout::new::<[u8; IOPB_BYTES]>();
    // SAFETY: the layout has a non-zero size; the block is checked for null, filled
    // completely before use, and owned by the Box made from it (same layout).
    unsafe {
        let p = alloc::alloc::alloc(layout) as *mut [u8; IOPB_BYTES];
        if p.is_null() {
            return None;
        }
        core::ptr::write_bytes(p as *mut u8, 0xff, IOPB_BYTES);
        Some(Box::from_raw(p))
    }
}

/// Bumped on every change of any port space: a CPU reloads its TSS bitmap when the
/// generation it loaded is stale.
pub static GEN: AtomicU64 = AtomicU64::new(1);

/// A PD's port space.
pub struct SpacePio {
    bitmap: Mutex<Option<Box<[u8; IOPB_BYTES]>>>,
    any: AtomicBool,
}

impl Default for SpacePio {
    fn default() -> Self {
        Self::new()
    }
}

impl SpacePio {
    /// No ports.
    pub const fn new() -> Self {
        SpacePio {
            bitmap: Mutex::new(None),
            any: AtomicBool::new(false),
        }
    }

    /// Allows (or denies) ports `base .. base + 2^order`. The first port allowed
    /// allocates the bitmap, after `charge` paid for it ([`IOPB_PAGES`]).
    pub fn set(
        &self,
        base: u64,
        order: u8,
        allow: bool,
        charge: impl FnOnce() -> Result<(), Status>,
    ) -> Result<(), Status> {
        let mut b = self.bitmap.lock();
        if b.is_none() {
            if !allow {
                return Ok(());
            }
            charge()?;
            // Fallible: a failed allocation is this PD's `OutOfMemory`, not a panic.
            // (The charge stays with the PD until it goes, like the bitmap would.)
            *b = Some(new_bitmap().ok_or(Status::OutOfMemory)?);
        }
        let Some(map) = b.as_mut() else {
            return Ok(());
        };
        let end = (base + (1u64 << order.min(16))).min(0x10000);
        for port in base..end {
            let (i, bit) = ((port / 8) as usize, port % 8);
            if allow {
                map[i] &= !(1 << bit);
            } else {
                map[i] |= 1 << bit;
            }
        }
        self.any.store(true, Ordering::Release);
        GEN.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Whether `port` is allowed.
    pub fn allowed(&self, port: u16) -> bool {
        match self.bitmap.lock().as_ref() {
            Some(m) => m[port as usize / 8] & (1 << (port % 8)) == 0,
            None => false,
        }
    }

    /// Loads this space of PD `pd` into the running CPU's TSS.
    pub fn activate(&self, pd: u64) {
        if !self.any.load(Ordering::Acquire) {
            crate::arch::load_iopb(0, None);
            return;
        }
        // The key names this PD's bitmap as of the current generation.
        let key = pd ^ (GEN.load(Ordering::Acquire) << 32);
        let b = self.bitmap.lock();
        crate::arch::load_iopb(key, b.as_ref().map(|m| &m[..]));
    }
}
