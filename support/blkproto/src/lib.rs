//! The NUL disk service's session protocol, GPT parsing and partition bindings.
//!
//! The disk service owns the drivers' disks; each client (a VMM) gets a *session*
//! bound to one partition or block range ([`Binding`]), and can reach those blocks and
//! nothing else. This crate is the part both ends share and the part the security
//! property rests on: the wire format, the rings, the service-side validation
//! ([`proto::validate`]), GPT parsing ([`gpt::parse`]) and the binding resolution
//! ([`Binding::resolve`]). The components (the service's IPC loop, the VMM's
//! virtio-blk backend) provide the mappings and the notifications.
//!
//! # Protocol, version 1
//!
//! This section is the specification; a second implementation follows it alone.
//!
//! ## Session setup
//!
//! The client opens a session with an IPC call to the disk service's portal. The
//! service, from its *own* configuration (never from the client), knows the
//! session's extent (first absolute LBA, length in blocks), the block size, the ring
//! size `N` (a power of two, `1..=4096`), the maximum transfer in blocks and whether
//! discard is offered. Two memory regions are shared between the two: the **ring
//! region** (`512 + 48·N` bytes, page-rounded) and the **data area** (the client's
//! buffers; its size is fixed at setup). Two notifications exist: the client's
//! *doorbell* (a semaphore up or IPC call to the service) and the service's
//! *completion signal* (a semaphore the client waits on). The service initialises the
//! ring region before the client first rings the doorbell.
//!
//! ## Ring region layout (all fields little-endian)
//!
//! | bytes       | field                         | written by |
//! |-------------|-------------------------------|------------|
//! | 0..4        | magic `"PBLK"` (`0x4b4c4250`)  | service    |
//! | 4..8        | version (1)                   | service    |
//! | 8..12       | `N`, slots per ring           | service    |
//! | 12..16      | block size in bytes           | service    |
//! | 16..20      | maximum blocks per request    | service    |
//! | 20..28      | session length in blocks      | service    |
//! | 64..68      | `sq_tail`                     | client     |
//! | 128..132    | `sq_head`                     | service    |
//! | 192..196    | `cq_tail`                     | service    |
//! | 256..260    | `cq_head`                     | client     |
//! | 512..512+32N | submission ring: N descriptors | client  |
//! | 512+32N..512+48N | completion ring: N completions | service |
//!
//! Other header bytes are zero. Each counter is on its own 64-byte line. The header
//! fields are informational for the client: the service never reads them back.
//!
//! The four counters are free-running `u32`s (they wrap at 2³²); slot `i` of a ring is
//! `counter mod N`. A ring holds `tail − head` (wrapping) entries, at most `N`.
//!
//! ## Descriptor (32 bytes)
//!
//! | bytes  | field      | meaning |
//! |--------|------------|---------|
//! | 0..4   | `tag`      | the client's name for the request, echoed in its completion |
//! | 4      | `op`       | 1 READ, 2 WRITE, 3 FLUSH, 4 DISCARD |
//! | 5      | `flags`    | bit 0 FUA (WRITE only); other bits reserved, zero |
//! | 6..8   | reserved   | zero |
//! | 8..16  | `block`    | first block, in the session's numbering (0 = the session's first) |
//! | 16..20 | `count`    | blocks, `1..=max`; 0 for FLUSH |
//! | 20..24 | reserved   | zero |
//! | 24..32 | `buf`      | byte offset in the data area, a multiple of the block size; 0 for FLUSH and DISCARD |
//!
//! ## Completion (16 bytes)
//!
//! `tag: u32` @0, `status: u32` @4, `blocks: u32` @8 (blocks moved, 0 unless OK),
//! reserved `u32` @12. Status: 0 OK, 1 IOERR (the disk failed), 2 RANGE (`block +
//! count` passes the session's end or overflows), 3 BADDESC (unknown op, reserved bit
//! or field set, count 0, count above the maximum, a field the op does not use not
//! zero), 4 BADBUF (`buf` misaligned, or `buf + count·block_size` past the data area
//! or overflowing), 5 BADTAG (the tag is already in flight), 6 UNSUPPORTED (e.g.
//! DISCARD on a session without it).
//!
//! ## Submitting and completing
//!
//! 1. The client writes descriptors into slots `sq_tail, sq_tail+1, …` (never more than
//!    `N − (sq_tail − sq_head)`), then stores the new `sq_tail`, then rings the
//!    doorbell **once per batch**.
//! 2. The service, on a doorbell (or whenever it polls), loads `sq_tail`. If
//!    `sq_tail − sq_head > N` the client is hostile: the session is **broken** (all
//!    its requests are dropped, the service answers nothing more on it, and closes it).
//!    Otherwise it copies each new descriptor into private memory (reading each byte
//!    once), advances and stores `sq_head`, and validates the copy: a refused
//!    descriptor is answered with a completion carrying its error status and nothing
//!    else happens; an accepted one is translated to absolute LBAs (`first_lba +
//!    block`) and queued to the disk.
//! 3. The service takes a descriptor only when a completion slot is free for it as
//!    well as for every request already in flight, so it never has to drop a
//!    completion: a client that does not consume completions stalls only itself. The
//!    service does not look at the ring again until the next doorbell, so a client
//!    that has read completions while `sq_head ≠ sq_tail` (descriptors published but
//!    not taken) rings the doorbell again.
//! 4. The service writes completions into slots `cq_tail, …` in *any* order (as the
//!    disk finishes them), stores the new `cq_tail`, then signals the client **once
//!    per batch**. The client reads completions up to `cq_tail` and stores `cq_head`.
//!    The service requires `cq_head` to move only forward and never past `cq_tail`;
//!    otherwise the session is broken.
//!
//! Tags: a tag may be reused once its completion has been read. A descriptor whose
//! tag is in flight is refused with BADTAG (the client then sees two completions with
//! that tag: the BADTAG one, and the original request's).
//!
//! ## Memory ordering
//!
//! Counters are stored with *release* and loaded with *acquire* semantics; ring
//! entries and buffers are plain (relaxed) accesses ordered by them. The client writes
//! the descriptors (and, for WRITE, the data) before its release store of `sq_tail`;
//! the service loads `sq_tail` (acquire) before reading descriptors. The service
//! writes completions (and, for READ, the data) before its release store of
//! `cq_tail`; the client loads `cq_tail` before reading them. `sq_head` and `cq_head`
//! are released after the slots they free were read. On x86 plain aligned loads and
//! stores have these semantics; the library uses `core::sync::atomic` words
//! ([`ring::SharedMem`] for `[AtomicU32]`), so concurrent hostile writes are never a
//! data race, only bad values.
//!
//! ## Ordering of requests
//!
//! Requests in flight are independent: the service may start and complete them in any
//! order, and overlapping requests (same blocks, or the same buffer) are allowed and
//! unordered — a client that needs one write to land before another waits for the
//! first's completion. A completed WRITE is visible to every later READ. A completed
//! WRITE with FUA is durable. A FLUSH completes after every WRITE that had completed
//! before the FLUSH was submitted is durable (writes still in flight are not covered).
//!
//! ## What a session can never do
//!
//! Every block the service touches for a session is `first_lba + block` for a
//! validated `block + count ≤ length`; every data-area byte is inside the area it
//! mapped for that session. Nothing read from shared memory is trusted twice: counters
//! are checked against the service's private copies, descriptors are copied before
//! they are checked.

//!
//! # Example
//!
//! ```
//! use peregrine_blkproto::ring::region;
//! use peregrine_blkproto::*;
//!
//! // The root binds the session; the service resolves it against the disk's GPT.
//! let bounds = Binding::parse("range=2048+64").unwrap().resolve(&[], 4096).unwrap();
//! let limits = SessionLimits::new(bounds, 512, 8 * 512, 8);
//! let layout = Layout::new(16).unwrap();
//! let mem = region(layout.bytes()); // the shared ring region, both sides map it
//! let mut service = ServiceRing::new(&mem[..], layout, limits).unwrap();
//! let mut client = ClientRing::attach(&mem[..], layout).unwrap();
//!
//! // Client: a batch, one doorbell.
//! client.push(&Descriptor::new(1, Op::Read, 0, 4, 0));
//! client.push(&Descriptor::new(2, Op::Write, 64, 1, 0)); // past the session's end
//! assert_eq!(client.publish(), 2);
//!
//! // Service, on the doorbell: the bad one is answered by the ring itself.
//! let r = service.next_request().unwrap().unwrap();
//! assert_eq!((r.lba, r.count, r.buf, r.len), (2048, 4, 0, 2048));
//! assert_eq!(service.next_request(), Ok(None));
//! // ... the disk reads absolute LBAs 2048..2052 into the data area ...
//! service.complete(r.tag, Status::Ok, r.count).unwrap();
//! assert_eq!(service.publish(), Ok(2)); // one completion signal
//!
//! // Client, on the signal.
//! let c = client.pop_completion().unwrap().unwrap();
//! assert_eq!((c.tag, c.status), (2, Status::Range));
//! let c = client.pop_completion().unwrap().unwrap();
//! assert_eq!((c.tag, c.status, c.blocks), (1, Status::Ok, 4));
//! ```

#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod binding;
pub mod gpt;
pub mod merge;
pub mod proto;
pub mod ring;
pub mod runs;

pub use binding::{BindError, Binding, Bounds, Target};
pub use gpt::{parse as parse_gpt, BlockRead, Gpt, GptError, Partition};
pub use proto::{validate, Completion, DescError, Descriptor, Op, Request, SessionLimits, Status};
pub use ring::{ClientRing, Layout, RingError, ServiceRing, SharedMem};
pub use runs::{Run, Runs};
