//! I/O port spaces: a permission bitmap per PD, loaded into the CPU's TSS I/O bitmap
//! when the PD runs.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicU64, Ordering};

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

/// Source of port-space keys: every change of any port space gives that space a new,
/// never reused key, so a CPU whose TSS holds a copy under an older key reloads it.
static GEN: AtomicU64 = AtomicU64::new(1);

/// A PD's port space.
pub struct SpacePio {
    bitmap: Mutex<Option<Box<[u8; IOPB_BYTES]>>>,
    /// The key naming the bitmap's current contents (0: no port allowed yet).
    key: AtomicU64,
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
            key: AtomicU64::new(0),
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
        // A new key (the bitmap is written before, under the lock a reload takes).
        self.key.store(
            GEN.fetch_add(1, Ordering::AcqRel) | (1 << 63),
            Ordering::Release,
        );
        Ok(())
    }

    /// Whether `port` is allowed.
    pub fn allowed(&self, port: u16) -> bool {
        match self.bitmap.lock().as_ref() {
            Some(m) => m[port as usize / 8] & (1 << (port % 8)) == 0,
            None => false,
        }
    }

    /// The key under which a CPU holds this space in its TSS: 0 when the space allows
    /// no port (the bitmap offset then lies beyond the TSS limit), else a value that
    /// names this space's bitmap as it is now (changed by every `set`, never 0).
    #[inline(always)]
    pub fn key(&self) -> u64 {
        self.key.load(Ordering::Acquire)
    }

    /// Loads this space, whose [`key`](Self::key) is `key`, into the TSS of CPU `cpu`,
    /// the running one.
    #[inline(always)]
    pub fn activate(&self, cpu: usize, key: u64) {
        if key == 0 {
            crate::arch::close_iopb(cpu);
        } else if !crate::arch::open_iopb(cpu, key) {
            self.copy_in(key);
        }
    }

    /// Copies this space's bitmap into the running CPU's TSS (which holds another
    /// space's).
    #[cold]
    #[inline(never)]
    fn copy_in(&self, key: u64) {
        let b = self.bitmap.lock();
        crate::arch::load_iopb(key, b.as_ref().map(|m| &m[..]));
    }
}
