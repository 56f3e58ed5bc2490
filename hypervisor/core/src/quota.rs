//! Per-PD kernel-memory quota, charged without a lock.
//!
//! A [`Quota`] holds `total` pages of which `avail` are not yet charged; both live in one
//! `AtomicU64` (avail in the low half, total in the high half) so every change is a
//! single compare-and-swap and the invariant `avail <= total` holds at every instant.
//!
//! Hierarchy: a child PD's quota is carved out of its parent's with [`Quota::carve`]
//! (the parent's `total` and `avail` drop by `q`, the child starts with `q`). When the
//! child is destroyed, [`Quota::merge_into`] hands the child's whole account back to the
//! parent: its unused pages become available again at once, and its still-charged pages
//! become charges of the parent, which the kernel uncharges from the parent as it frees
//! the child's remaining objects. Pages are thus conserved: the sum of all `total`s only
//! changes by creating a root quota.
//!
//! The kernel keeps the parent relation itself (no pointers here).

use core::sync::atomic::{AtomicU64, Ordering};

/// Why a quota operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaError {
    /// Not enough uncharged pages.
    OutOfMemory,
    /// More pages returned than were charged, or a count overflowed (an accounting bug
    /// in the caller; the quota is left unchanged).
    Overflow,
}

const fn pack(avail: u32, total: u32) -> u64 {
    (avail as u64) | ((total as u64) << 32)
}

const fn unpack(v: u64) -> (u32, u32) {
    (v as u32, (v >> 32) as u32)
}

/// A kernel-memory quota in pages.
#[derive(Debug)]
pub struct Quota(AtomicU64);

impl Quota {
    /// A root quota of `pages` pages, nothing charged.
    pub const fn new(pages: u32) -> Self {
        Quota(AtomicU64::new(pack(pages, pages)))
    }

    fn update(
        &self,
        f: impl Fn(u32, u32) -> Result<(u32, u32), QuotaError>,
    ) -> Result<(), QuotaError> {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let (a, t) = unpack(cur);
            let (na, nt) = f(a, t)?;
            match self.0.compare_exchange_weak(
                cur,
                pack(na, nt),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(v) => cur = v,
            }
        }
    }

    /// Pages not charged.
    pub fn avail(&self) -> u32 {
        unpack(self.0.load(Ordering::Acquire)).0
    }

    /// Pages this quota holds in all.
    pub fn total(&self) -> u32 {
        unpack(self.0.load(Ordering::Acquire)).1
    }

    /// Pages charged.
    pub fn used(&self) -> u32 {
        let (a, t) = unpack(self.0.load(Ordering::Acquire));
        t - a
    }

    /// Charges `n` pages (before allocating kernel memory for this PD).
    pub fn charge(&self, n: u32) -> Result<(), QuotaError> {
        self.update(|a, t| {
            a.checked_sub(n)
                .map(|a| (a, t))
                .ok_or(QuotaError::OutOfMemory)
        })
    }

    /// Returns `n` charged pages (after freeing kernel memory of this PD).
    pub fn uncharge(&self, n: u32) -> Result<(), QuotaError> {
        self.update(|a, t| match a.checked_add(n) {
            Some(na) if na <= t => Ok((na, t)),
            _ => Err(QuotaError::Overflow),
        })
    }

    /// Takes `n` uncharged pages out of this quota altogether.
    fn take(&self, n: u32) -> Result<(), QuotaError> {
        self.update(|a, t| match a.checked_sub(n) {
            Some(na) => Ok((na, t - n)),
            None => Err(QuotaError::OutOfMemory),
        })
    }

    /// Adds `avail` uncharged and `total - avail` charged pages.
    fn give(&self, avail: u32, total: u32) -> Result<(), QuotaError> {
        self.update(|a, t| match (a.checked_add(avail), t.checked_add(total)) {
            (Some(na), Some(nt)) => Ok((na, nt)),
            _ => Err(QuotaError::Overflow),
        })
    }

    /// Moves `n` uncharged pages from `from` to `to`. On failure nothing has moved.
    pub fn transfer(from: &Quota, to: &Quota, n: u32) -> Result<(), QuotaError> {
        from.take(n)?;
        if let Err(e) = to.give(n, n) {
            // `from` lost exactly `n` pages above, so giving them back cannot overflow
            // unless another CPU added pages meanwhile; then the pages stay accounted
            // nowhere but the error is still reported.
            let _ = from.give(n, n);
            return Err(e);
        }
        Ok(())
    }

    /// A child quota of `pages` pages carved out of this one.
    pub fn carve(&self, pages: u32) -> Result<Quota, QuotaError> {
        self.take(pages)?;
        Ok(Quota::new(pages))
    }

    /// Hands this (destroyed) quota's whole account to `parent` and leaves it empty:
    /// unused pages become available to the parent, pages still charged become the
    /// parent's charges. Returns the number of pages still charged.
    pub fn merge_into(&self, parent: &Quota) -> Result<u32, QuotaError> {
        let (a, t) = unpack(self.0.swap(0, Ordering::AcqRel));
        if let Err(e) = parent.give(a, t) {
            self.0.store(pack(a, t), Ordering::Release);
            return Err(e);
        }
        Ok(t - a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charge_and_uncharge() {
        let q = Quota::new(10);
        q.charge(4).unwrap();
        assert_eq!((q.avail(), q.used(), q.total()), (6, 4, 10));
        assert_eq!(q.charge(7), Err(QuotaError::OutOfMemory));
        q.charge(6).unwrap();
        assert_eq!(q.charge(1), Err(QuotaError::OutOfMemory));
        q.uncharge(10).unwrap();
        assert_eq!(q.uncharge(1), Err(QuotaError::Overflow));
        assert_eq!(q.uncharge(u32::MAX), Err(QuotaError::Overflow));
        assert_eq!(q.avail(), 10);
    }

    #[test]
    fn hierarchy_conserves_pages() {
        let root = Quota::new(100);
        let child = root.carve(30).unwrap();
        assert_eq!((root.avail(), root.total()), (70, 70));
        assert!(root.carve(71).is_err());
        let grand = child.carve(10).unwrap();
        child.charge(5).unwrap();
        grand.charge(7).unwrap();
        // The grandchild dies: its 3 unused pages return, 7 remain charged to the child.
        assert_eq!(grand.merge_into(&child).unwrap(), 7);
        assert_eq!((child.avail(), child.used(), child.total()), (18, 12, 30));
        assert_eq!(grand.total(), 0);
        child.uncharge(7).unwrap();
        assert_eq!(child.merge_into(&root).unwrap(), 5);
        root.uncharge(5).unwrap();
        assert_eq!((root.avail(), root.total()), (100, 100));
    }

    #[test]
    fn transfer_between_siblings() {
        let a = Quota::new(10);
        let b = Quota::new(u32::MAX - 5);
        Quota::transfer(&a, &b, 5).unwrap();
        assert_eq!((a.total(), b.total()), (5, u32::MAX));
        assert_eq!(Quota::transfer(&a, &b, 1), Err(QuotaError::Overflow));
        assert_eq!(a.total(), 5);
        assert_eq!(Quota::transfer(&a, &b, 6), Err(QuotaError::OutOfMemory));
        a.charge(5).unwrap();
        assert_eq!(
            Quota::transfer(&a, &Quota::new(0), 1),
            Err(QuotaError::OutOfMemory)
        );
    }

    #[test]
    fn concurrent_charges_never_overdraw() {
        let q = std::sync::Arc::new(Quota::new(10_000));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || {
                    let mut got = 0u32;
                    for _ in 0..5_000 {
                        if q.charge(1).is_ok() {
                            got += 1;
                        }
                        if got.is_multiple_of(3) && got > 0 {
                            q.uncharge(1).unwrap();
                            got -= 1;
                        }
                    }
                    got
                })
            })
            .collect();
        let sum: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(q.used(), sum);
        assert!(sum <= 10_000);
    }
}
