//! Physical Region Page entries: PRP1/PRP2 and PRP lists for a transfer, from the device
//! addresses of the memory pages it touches.
//!
//! PRP1 points at the first byte (any dword-aligned offset in its page). If the transfer
//! ends in the first page, PRP2 is unused (0); if it ends in the second, PRP2 is that
//! page's address; otherwise PRP2 points to a PRP list of the remaining pages' addresses,
//! 512 entries per list page, where the last entry of a full list page points to the next
//! list page when more entries follow.

use alloc::vec::Vec;

use crate::{Error, PAGE_SIZE};

/// Entries in one PRP list page.
pub const ENTRIES_PER_LIST_PAGE: usize = PAGE_SIZE / 8;

/// The number of memory pages a transfer of `len` bytes touches when it starts
/// `offset` bytes into its first page.
pub const fn pages_touched(offset: usize, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    (offset % PAGE_SIZE + len).div_ceil(PAGE_SIZE)
}

/// The number of list entries for a transfer touching `pages` pages.
const fn list_entries(pages: usize) -> usize {
    if pages <= 2 {
        0
    } else {
        pages - 1
    }
}

/// The number of PRP list pages for a transfer touching `pages` pages (0 when PRP1 and
/// PRP2 suffice).
pub const fn list_pages_needed(pages: usize) -> usize {
    let mut entries = list_entries(pages);
    let mut n = 0;
    while entries > 0 {
        n += 1;
        if entries <= ENTRIES_PER_LIST_PAGE {
            break;
        }
        // A full page holds 511 data entries and the chain pointer.
        entries -= ENTRIES_PER_LIST_PAGE - 1;
    }
    n
}

/// PRPs for one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prps {
    pub prp1: u64,
    pub prp2: u64,
    /// The contents of the list pages, in order: `list[i * 512..]` (at most 512 entries)
    /// goes to list page `i`. Empty when no list is needed.
    pub list: Vec<u64>,
}

/// Builds the PRPs for a transfer of `len` bytes (> 0).
///
/// `pages[0]` is the device address of the transfer's first byte (dword aligned);
/// `pages[1..]` are the page-aligned device addresses of the following pages, exactly
/// [`pages_touched`]`(pages[0] % PAGE_SIZE, len)` in all. `list_pages` are the device
/// addresses of page-aligned pages available for the PRP list (at least
/// [`list_pages_needed`] of them).
pub fn build(pages: &[u64], len: usize, list_pages: &[u64]) -> Result<Prps, Error> {
    let first = *pages.first().ok_or(Error::InvalidArgument)?;
    let touched = pages_touched(first as usize, len);
    if len == 0 || first % 4 != 0 || pages.len() != touched {
        return Err(Error::InvalidArgument);
    }
    if pages[1..]
        .iter()
        .chain(list_pages)
        .any(|&p| p % PAGE_SIZE as u64 != 0)
    {
        return Err(Error::InvalidArgument);
    }
    let (prp2, list) = match touched {
        1 => (0, Vec::new()),
        2 => (pages[1], Vec::new()),
        _ => {
            let needed = list_pages_needed(touched);
            if list_pages.len() < needed {
                return Err(Error::InvalidArgument);
            }
            let mut list = Vec::with_capacity(touched - 1 + needed);
            let mut rest = &pages[1..];
            let mut next_list = 1;
            while rest.len() > ENTRIES_PER_LIST_PAGE {
                let (now, later) = rest.split_at(ENTRIES_PER_LIST_PAGE - 1);
                list.extend_from_slice(now);
                list.push(list_pages[next_list]);
                next_list += 1;
                rest = later;
            }
            list.extend_from_slice(rest);
            (list_pages[0], list)
        }
    };
    Ok(Prps {
        prp1: first,
        prp2,
        list,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE as u64;

    /// Scattered pages: page i of the buffer at device address (10000 - 3 i) pages.
    fn addrs(offset: usize, len: usize) -> Vec<u64> {
        let n = pages_touched(offset, len);
        (0..n)
            .map(|i| (10_000 - 3 * i as u64) * P + if i == 0 { offset as u64 } else { 0 })
            .collect()
    }

    #[test]
    fn page_counts() {
        assert_eq!(pages_touched(0, 0), 0);
        assert_eq!(pages_touched(0, 1), 1);
        assert_eq!(pages_touched(0, 4096), 1);
        assert_eq!(pages_touched(0, 4097), 2);
        assert_eq!(pages_touched(4092, 4), 1);
        assert_eq!(pages_touched(4092, 8), 2);
        assert_eq!(pages_touched(512, 8192), 3);
        assert_eq!(list_pages_needed(2), 0);
        assert_eq!(list_pages_needed(3), 1);
        assert_eq!(list_pages_needed(513), 1);
        assert_eq!(list_pages_needed(514), 2);
        assert_eq!(list_pages_needed(1 + 511 + 512), 2);
        assert_eq!(list_pages_needed(1 + 511 + 513), 3);
    }

    #[test]
    fn one_and_two_pages() {
        let p = build(&addrs(0, 4096), 4096, &[]).unwrap();
        assert_eq!((p.prp1, p.prp2, p.list.len()), (10_000 * P, 0, 0));
        let p = build(&addrs(4092, 8), 8, &[]).unwrap();
        assert_eq!(
            (p.prp1, p.prp2, p.list.len()),
            (10_000 * P + 4092, 9_997 * P, 0)
        );
        let p = build(&addrs(0, 8192), 8192, &[]).unwrap();
        assert_eq!((p.prp1, p.prp2), (10_000 * P, 9_997 * P));
    }

    #[test]
    fn lists() {
        // Two pages of data starting mid-page touch three pages: a list of two.
        let p = build(&addrs(512, 8192), 8192, &[7 * P]).unwrap();
        assert_eq!((p.prp1, p.prp2), (10_000 * P + 512, 7 * P));
        assert_eq!(p.list, [9_997 * P, 9_994 * P]);
        // Exactly one full list page.
        let a = addrs(0, 513 * PAGE_SIZE);
        let p = build(&a, 513 * PAGE_SIZE, &[7 * P]).unwrap();
        assert_eq!(p.list, a[1..]);
        // One more page chains.
        let a = addrs(0, 514 * PAGE_SIZE);
        let p = build(&a, 514 * PAGE_SIZE, &[7 * P, 9 * P]).unwrap();
        assert_eq!(p.list.len(), 514);
        assert_eq!(p.list[..511], a[1..512]);
        assert_eq!(p.list[511], 9 * P);
        assert_eq!(p.list[512..], a[512..]);
        // Not enough list pages.
        assert!(build(&a, 514 * PAGE_SIZE, &[7 * P]).is_err());
    }

    #[test]
    fn rejects_bad_input() {
        assert!(build(&[], 4096, &[]).is_err());
        assert!(build(&[2], 4, &[]).is_err()); // not dword aligned
        assert!(build(&[0], 0, &[]).is_err());
        assert!(build(&[0, P], 4096, &[]).is_err()); // too many pages
        assert!(build(&[0, P + 8], 8192, &[]).is_err()); // unaligned later page
        assert!(build(&addrs(0, 3 * PAGE_SIZE), 3 * PAGE_SIZE, &[7]).is_err());
    }
}
