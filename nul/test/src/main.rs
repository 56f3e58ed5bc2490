//! The NUL test component: one binary whose role is chosen by its arguments
//! (`role=NAME`, from the start-info page the root maps at
//! [`START_INFO_ADDR`](nul_rt::start_info::START_INFO_ADDR)). The root's test
//! scenarios (`nul/root/src/scenario`) boot it as modules such as
//! `nul-test role=echo cpu=0`.
//!
//! | role | what it does |
//! |---|---|
//! | `echo`, `canary` | serves a portal that replies with every word plus one; registers it with the root |
//! | `benchsrv` | serves a portal that replies with the words it got (IPC benchmark) |
//! | `stampsrv` | serves a portal that replies with its TSC on entry and before the reply (one-way IPC figures) |
//! | `capsrv` | like `benchsrv`, with an object-capability window (capability-transfer figure) |
//! | `fault` | prints a line, then reads an unmapped address (the root removes it) |
//! | `paged` | writes and reads back 4 pages the root's pager maps on demand |
//! | `memcheck` | checks delegated memory, port and portal; after the root revokes, touches them again |
//! | `hostile seed=N` | random hypercalls forever, reporting its count to the root |
//! | `blocker` | leaves a thread and its main EC (in a call) blocked for good |
//! | `pcidump pci=SEL` | prints the device page and reads its configuration page and each I/O BAR's first port |
//! | `blkclient blk=B mem=M seed=N [hostile]` | a disk-session client: writes, flushes, reads back its blocks; requests outside them refused (see `blkclient.rs`) |
#![no_std]
#![no_main]

extern crate alloc;

mod blkclient;
mod blocker;
mod hostile;
mod memtest;
mod pcidump;
mod server;

use nul_rt::start_info::{self, StartInfo};
use nul_rt::{hc, println};

nul_rt::entry!(main);

fn main(arg: u64) -> ! {
    let si = StartInfo::from_entry(arg);
    let args = si.args();
    let role = start_info::arg(args, "role").unwrap_or("");
    println!(
        "nul-test {} (id {}) on cpu {} of {}",
        args, si.index, si.cpu, si.ncpus
    );
    match role {
        "echo" | "canary" => server::serve(si, server::echo_handler, None),
        "benchsrv" => server::serve(si, server::bench_handler, Some(server::bench_window())),
        "stampsrv" => server::serve(si, server::stamp_handler, None),
        "capsrv" => server::serve(si, server::bench_handler, Some(server::cap_window())),
        "fault" => memtest::fault(),
        "paged" => memtest::paged(),
        "memcheck" => memtest::memcheck(si),
        "hostile" => hostile::run(si),
        "blocker" => blocker::run(si),
        "blkclient" => blkclient::run(si),
        "pcidump" => pcidump::run(si),
        _ => {
            println!("unknown role {:?}", role);
            block_forever()
        }
    }
}

pub use nul_rt::start::block_forever;

/// Sleeps about `n` milliseconds (a down with a deadline on a semaphore nobody ups).
pub fn sleep_ms(si: &StartInfo, sm: u64, n: u64) {
    let end = hc::rdtsc() + n * si.tsc_khz.max(1);
    while hc::rdtsc() < end {
        if hc::sm_down(sm, false, end).is_err_and(|e| e != peregrine_abi::Status::Timeout) {
            core::hint::spin_loop();
        }
    }
}
