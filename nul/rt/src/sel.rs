//! Capability selectors: the allocator and the well-known selectors of a component.

use crate::sync::Mutex;

/// Selectors 0–31: the component's event portals (exception handlers in the root).
pub const EVT_BASE: u64 = 0;
/// The component's own PD.
pub const OWN_PD: u64 = 32;
/// The component's main EC.
pub const OWN_EC: u64 = 33;
/// The component's main SC.
pub const OWN_SC: u64 = 34;
/// For the root: the kernel PD. For others: the root's console portal.
pub const CONSOLE_PT: u64 = 35;
/// The root's service portal (children).
pub const SERVICE_PT: u64 = 36;
/// A second test/peer portal handed to test components (children).
pub const PEER_PT: u64 = 37;
/// The semaphore nobody ups that [`Mutex`](crate::sync::Mutex) waiters sleep on (made
/// at start-up).
pub const LOCK_SLEEP: u64 = 63;
/// First selector handed out by the allocator.
pub const FIRST_FREE: u64 = 64;

struct Alloc {
    next: u64,
    free: [u64; 64],
    nfree: usize,
}

static ALLOC: Mutex<Alloc> = Mutex::new(Alloc {
    next: FIRST_FREE,
    free: [0; 64],
    nfree: 0,
});

/// Allocates one selector.
pub fn alloc() -> u64 {
    let mut a = ALLOC.lock();
    if a.nfree > 0 {
        a.nfree -= 1;
        let i = a.nfree;
        return a.free[i];
    }
    let s = a.next;
    a.next += 1;
    s
}

/// Allocates `2^order` naturally aligned selectors.
pub fn alloc_aligned(order: u8) -> u64 {
    let mut a = ALLOC.lock();
    let n = 1u64 << order;
    let s = (a.next + n - 1) & !(n - 1);
    a.next = s + n;
    s
}

/// Returns a selector (its capability must be gone).
pub fn free(sel: u64) {
    let mut a = ALLOC.lock();
    if a.nfree < a.free.len() {
        let i = a.nfree;
        a.free[i] = sel;
        a.nfree += 1;
    }
}
