//! Joining a session's requests into fewer disk commands: consecutive reads (or
//! writes) of consecutive blocks whose buffers meet at page boundaries become one
//! command with one page list. A client whose guest scatters a large transfer over
//! single pages (as Linux's page cache and O_DIRECT buffers do) sends one descriptor per
//! page; the disk then still sees one command per large transfer.

use alloc::vec::Vec;

use crate::proto::{Op, Request};
use crate::runs::Runs;

/// Bytes of a page.
const PAGE: u64 = 4096;

/// One disk command: the requests it answers and the pages it moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// Read, write or flush.
    pub op: Op,
    /// First absolute LBA (0 for a flush).
    pub lba: u64,
    /// Blocks (0 for a flush).
    pub blocks: u32,
    /// Force unit access (writes).
    pub fua: bool,
    /// The requests it answers: tag and blocks each.
    pub members: Vec<(u32, u32)>,
    /// The DMA page list: the address of the first byte, then of each page after it.
    pub pages: Vec<u64>,
}

/// Takes requests from the front of `queue` into one command: the first, and as long
/// as it can, the following ones that continue it (same op and FUA, the next blocks,
/// their buffer starting on a page boundary right where the last one ended on one),
/// up to `max_bytes` and `max_pages` pages. A request whose buffer lies outside `runs`
/// comes back as `Err(tag)` on its own (the caller answers it BADBUF).
pub fn take(
    queue: &mut alloc::collections::VecDeque<Request>,
    runs: &Runs,
    max_bytes: u64,
    max_pages: usize,
) -> Option<Result<Command, u32>> {
    let first = queue.pop_front()?;
    if matches!(first.op, Op::Flush | Op::Discard) {
        return Some(Ok(Command {
            op: first.op,
            lba: first.lba,
            blocks: first.count,
            fua: false,
            members: alloc::vec![(first.tag, first.count)],
            pages: Vec::new(),
        }));
    }
    let Some(mut pages) = runs.pages(first.buf, first.len) else {
        return Some(Err(first.tag));
    };
    let mut c = Command {
        op: first.op,
        lba: first.lba,
        blocks: first.count,
        fua: first.fua,
        members: alloc::vec![(first.tag, first.count)],
        pages: Vec::new(),
    };
    let mut bytes = first.len;
    let mut end = first.buf + first.len;
    while let Some(next) = queue.front() {
        let joins = next.op == c.op
            && next.fua == c.fua
            && next.lba == c.lba + u64::from(c.blocks)
            && end % PAGE == 0
            && next.buf % PAGE == 0
            && bytes + next.len <= max_bytes
            && u64::from(c.blocks) + u64::from(next.count) <= u64::from(u32::MAX)
            && next.len.div_ceil(PAGE) as usize + pages.len() <= max_pages;
        if !joins {
            break;
        }
        let Some(more) = runs.pages(next.buf, next.len) else {
            break;
        };
        // The last page of the command so far must end where the page before its end
        // does: it ends on a page boundary (checked above), so the lists concatenate.
        pages.extend(more);
        bytes += next.len;
        end = next.buf + next.len;
        c.blocks += next.count;
        c.members.push((next.tag, next.count));
        queue.pop_front();
    }
    c.pages = pages;
    Some(Ok(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::VecDeque;

    fn req(tag: u32, op: Op, lba: u64, count: u32, buf: u64) -> Request {
        Request {
            tag,
            op,
            lba,
            count,
            buf,
            len: u64::from(count) * 512,
            fua: false,
        }
    }

    fn runs() -> Runs {
        let mut r = Runs::new();
        // Pages scattered in physical memory, as a guest's are.
        for i in 0..64u64 {
            r.push(PAGE, 0x100_0000 + ((i * 37) % 64) * PAGE);
        }
        r
    }

    #[test]
    fn page_per_descriptor_reads_join_into_one_command() {
        let r = runs();
        let mut q: VecDeque<Request> = (0..16)
            .map(|i| {
                req(
                    i,
                    Op::Read,
                    100 + 8 * u64::from(i),
                    8,
                    (u64::from(i) * 3 % 64) * PAGE,
                )
            })
            .collect();
        let c = take(&mut q, &r, 512 * 1024, 513).unwrap().unwrap();
        assert!(q.is_empty());
        assert_eq!(
            (c.op, c.lba, c.blocks, c.members.len()),
            (Op::Read, 100, 128, 16)
        );
        let want: Vec<u64> = (0..16u64)
            .map(|i| r.phys(i * 3 % 64 * PAGE).unwrap())
            .collect();
        assert_eq!(c.pages, want);
    }

    #[test]
    fn what_does_not_continue_starts_a_new_command() {
        let r = runs();
        let mut q: VecDeque<Request> = VecDeque::new();
        q.push_back(req(1, Op::Read, 0, 8, 0));
        q.push_back(req(2, Op::Read, 8, 8, PAGE)); // joins
        q.push_back(req(3, Op::Read, 100, 8, 2 * PAGE)); // not the next block
        q.push_back(req(4, Op::Write, 108, 8, 3 * PAGE)); // another op
        q.push_back(req(5, Op::Write, 116, 1, 4 * PAGE + 512)); // mid-page buffer
        q.push_back(Request {
            fua: true,
            ..req(6, Op::Write, 117, 8, 5 * PAGE)
        });
        q.push_back(req(7, Op::Flush, 0, 0, 0));
        q.push_back(req(8, Op::Read, 0, 8, 1 << 30)); // outside the data area
        let mut got = Vec::new();
        while let Some(c) = take(&mut q, &r, 1 << 20, 513) {
            got.push(c.map(|c| c.members.iter().map(|m| m.0).collect::<Vec<_>>()));
        }
        assert_eq!(
            got,
            [
                Ok(alloc::vec![1, 2]),
                Ok(alloc::vec![3]),
                Ok(alloc::vec![4]),
                Ok(alloc::vec![5]),
                Ok(alloc::vec![6]),
                Ok(alloc::vec![7]),
                Err(8)
            ]
        );
    }

    #[test]
    fn limits_cut_a_long_run() {
        let r = runs();
        let mut q: VecDeque<Request> = (0..64)
            .map(|i| req(i, Op::Write, 8 * u64::from(i), 8, u64::from(i) * PAGE))
            .collect();
        let c = take(&mut q, &r, 64 * 1024, 513).unwrap().unwrap();
        assert_eq!((c.blocks, c.members.len(), q.len()), (128, 16, 48));
        let c = take(&mut q, &r, 1 << 30, 5).unwrap().unwrap();
        assert_eq!((c.blocks, c.pages.len(), q.len()), (40, 5, 43));
    }
}
