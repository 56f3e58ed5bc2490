//! The root's service protocol (portal [`SERVICE_PT`](crate::sel::SERVICE_PT)).
//!
//! Every message starts with an opcode word. The root replies with one word: 0 when it
//! understood the message, 1 otherwise.
//!
//! | opcode | words | typed items | meaning |
//! |---|---|---|---|
//! | [`REGISTER`] | `[REGISTER]` | one object item: a portal | "here is my service portal" |
//! | [`RESULT`] | `[RESULT, key, value]` | — | a test result (the root keeps them in order) |
//! | [`PROGRESS`] | `[PROGRESS, count]` or `[PROGRESS, count, s0 … s10]` | — | a running counter and, optionally, how many calls ended with each status (the hostile component) |

use peregrine_abi::perm;
use peregrine_abi::{Crd, Status, Xfer, XferFlags};

use crate::utcb::UtcbRef;
use crate::{hc, sel};

/// Register a portal with the root (delegated as an object typed item).
pub const REGISTER: u64 = 1;
/// Report a test result.
pub const RESULT: u64 = 2;
/// Report progress.
pub const PROGRESS: u64 = 3;
/// Take console input: the reply is `[0, n, bytes packed 8 per word]` (up to
/// [`INPUT_MAX`] bytes the root read from its serial port).
pub const INPUT: u64 = 4;
/// The most input bytes one [`INPUT`] call returns.
pub const INPUT_MAX: usize = 64;

fn call(words: &[u64], item: Option<Xfer>) -> Result<(), Status> {
    let u = UtcbRef::main();
    u.set_msg(words);
    if let Some(x) = item {
        u.push_xfer(x);
    }
    hc::call(sel::SERVICE_PT)?;
    match u.word(0) {
        0 => Ok(()),
        _ => Err(Status::BadParameter),
    }
}

/// Registers portal `pt` (a selector of the caller) with the root.
pub fn register(pt: u64) -> Result<(), Status> {
    let x = Xfer::delegate(Crd::obj(pt, 0, perm::ALL), XferFlags::empty(), 0);
    call(&[REGISTER], Some(x))
}

/// Reports result `key` = `value`.
pub fn result(key: u64, value: u64) -> Result<(), Status> {
    call(&[RESULT, key, value], None)
}

/// Reports a progress counter.
pub fn progress(count: u64) -> Result<(), Status> {
    call(&[PROGRESS, count], None)
}

/// Status buckets of [`progress_stats`]: statuses 0–9, then everything else.
pub const STATUS_BUCKETS: usize = 11;

/// Reports a progress counter with the number of calls that ended with each status.
pub fn progress_stats(count: u64, by_status: &[u64; STATUS_BUCKETS]) -> Result<(), Status> {
    let mut w = [0u64; 2 + STATUS_BUCKETS];
    w[0] = PROGRESS;
    w[1] = count;
    w[2..].copy_from_slice(by_status);
    call(&w, None)
}

/// Takes the console input the root has (up to [`INPUT_MAX`] bytes into `buf`).
pub fn input(buf: &mut [u8]) -> Result<usize, Status> {
    call(&[INPUT], None)?;
    let u = UtcbRef::main();
    let n = (u.word(1) as usize).min(buf.len()).min(INPUT_MAX);
    for (i, b) in buf.iter_mut().enumerate().take(n) {
        *b = (u.word(2 + i / 8) >> ((i % 8) * 8)) as u8;
    }
    Ok(n)
}

/// Result keys the test components report ([`RESULT`]).
pub mod key {
    /// memcheck: checksum of its pattern page.
    pub const CHECKSUM: u64 = 1;
    /// memcheck: status of a call to the root's peer portal (0 success).
    pub const PEER_STATUS: u64 = 2;
    /// memcheck: the reply word of that call (sent 41, expect 42).
    pub const PEER_WORD: u64 = 3;
    /// memcheck: 1 when port 0x80 was delegated (lookup) and `out` to it worked.
    pub const PORT: u64 = 4;
    /// memcheck: status of the peer call after the root revoked the portal.
    pub const PEER_AFTER: u64 = 5;
    /// memcheck: 1 when reading the revoked page did NOT fault (a failure).
    pub const NO_FAULT: u64 = 6;
    /// paged: 1 when all values written to demand-paged memory read back.
    pub const PAGED_OK: u64 = 7;
    /// VMM: the number of VM exits it handled (reported before [`VM_END`]).
    pub const VM_EXITS: u64 = 8;
    /// VMM: how its VM ended (`peregrine_vmm::exit::End::code`: the guest's code for
    /// `guest done`, else the kind of end in bits 32–39).
    pub const VM_END: u64 = 9;
    /// blocker: its threads are about to block for good (the value is their count).
    pub const BLOCKED: u64 = 10;
    /// hostile: a PD chain was built to this depth and destroyed.
    pub const CHAIN: u64 = 11;
}
