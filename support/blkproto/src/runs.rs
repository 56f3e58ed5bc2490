//! Where a session's data area lies in physical memory: the service learns it as runs
//! (byte offset, length, physical base) when it opens the session, and translates a
//! validated request's buffer into the page addresses a DMA engine needs.

use alloc::vec::Vec;

/// A physically contiguous piece of a data area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Byte offset in the data area.
    pub off: u64,
    /// Bytes.
    pub len: u64,
    /// Physical address of its first byte.
    pub phys: u64,
}

/// A data area's runs, in offset order, without gaps from 0.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Runs(Vec<Run>);

/// Bytes of a page (the granule of DMA page lists).
const PAGE: u64 = 4096;

impl Runs {
    /// No runs yet.
    pub fn new() -> Runs {
        Runs(Vec::new())
    }

    /// Appends the next `len` bytes, at `phys`; joins it to the last run when it
    /// continues it physically.
    pub fn push(&mut self, len: u64, phys: u64) {
        let off = self.len();
        match self.0.last_mut() {
            Some(l) if l.phys.checked_add(l.len) == Some(phys) => l.len += len,
            _ => self.0.push(Run { off, len, phys }),
        }
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.0.last().map_or(0, |r| r.off + r.len)
    }

    /// Whether nothing is covered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The runs.
    pub fn runs(&self) -> &[Run] {
        &self.0
    }

    /// The physical address of data-area byte `off`.
    pub fn phys(&self, off: u64) -> Option<u64> {
        let i = self.0.partition_point(|r| r.off + r.len <= off);
        let r = self.0.get(i)?;
        (off >= r.off).then(|| r.phys + (off - r.off))
    }

    /// The DMA page list of `[off, off + len)`: the physical address of its first
    /// byte, then that of each following page boundary inside it. `None` if any of it
    /// lies outside the runs, or `len` is 0.
    pub fn pages(&self, off: u64, len: u64) -> Option<Vec<u64>> {
        let end = off
            .checked_add(len)
            .filter(|&e| len > 0 && e <= self.len())?;
        let mut out = Vec::with_capacity((len / PAGE + 2) as usize);
        out.push(self.phys(off)?);
        let mut at = (off & !(PAGE - 1)) + PAGE;
        while at < end {
            out.push(self.phys(at)?);
            at += PAGE;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_join_and_translate() {
        let mut r = Runs::new();
        r.push(0x2000, 0x10_0000);
        r.push(0x1000, 0x10_2000); // continues the first
        r.push(0x3000, 0x50_0000);
        assert_eq!(r.runs().len(), 2);
        assert_eq!(r.len(), 0x6000);
        assert_eq!(r.phys(0), Some(0x10_0000));
        assert_eq!(r.phys(0x2fff), Some(0x10_2fff));
        assert_eq!(r.phys(0x3000), Some(0x50_0000));
        assert_eq!(r.phys(0x6000), None);
    }

    #[test]
    fn page_lists_cross_runs_and_stay_inside() {
        let mut r = Runs::new();
        r.push(0x2000, 0x10_0000);
        r.push(0x2000, 0x50_0000);
        // 512 bytes before a page boundary that is also the runs' boundary.
        assert_eq!(
            r.pages(0x1e00, 0x400),
            Some(alloc::vec![0x10_1e00, 0x50_0000])
        );
        // Page-aligned, three pages.
        assert_eq!(
            r.pages(0x1000, 0x3000),
            Some(alloc::vec![0x10_1000, 0x50_0000, 0x50_1000])
        );
        // Inside one page.
        assert_eq!(r.pages(0x2200, 0x200), Some(alloc::vec![0x50_0200]));
        // Past the end, empty, overflowing: refused.
        assert_eq!(r.pages(0x3e00, 0x400), None);
        assert_eq!(r.pages(0, 0), None);
        assert_eq!(r.pages(u64::MAX - 10, 0x400), None);
        assert_eq!(Runs::new().pages(0, 512), None);
    }

    #[test]
    fn random_page_lists_match_a_byte_model() {
        let mut r = Runs::new();
        let mut model = alloc::vec::Vec::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20 {
            let pages = next() % 4 + 1;
            let phys = (next() % 0x1000) << 12;
            for p in 0..pages * 8 {
                model.push(phys + p * 512);
            }
            r.push(pages << 12, phys);
        }
        for _ in 0..2000 {
            let off = (next() % (r.len() / 512)) * 512;
            let len = ((next() % 64) + 1) * 512;
            let got = r.pages(off, len);
            if off + len > r.len() {
                assert_eq!(got, None);
                continue;
            }
            let got = got.unwrap();
            assert_eq!(got[0], model[(off / 512) as usize]);
            let mut at = (off & !0xfff) + 0x1000;
            for g in &got[1..] {
                assert_eq!(*g, model[(at / 512) as usize]);
                at += 0x1000;
            }
            assert!(at >= off + len);
        }
    }
}
