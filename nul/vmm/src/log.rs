//! Console output of the VMM and its guest, printed by the main EC.
//!
//! The console portal is the root's, bound to the main EC's CPU, and a call carries the
//! caller's own UTCB: exit handlers (on every vCPU's CPU) cannot print themselves. They
//! queue lines here and up a semaphore; the main EC ([`serve`]) prints them in order.
//! The queue is bounded: a guest that floods the console loses lines, and the count of
//! lost lines is printed.

use alloc::collections::VecDeque;
use alloc::string::String;
use core::sync::atomic::{AtomicU64, Ordering};

use nul_rt::sync::Mutex;
use nul_rt::{hc, println, sel};

/// Lines the queue holds.
const MAX_LINES: usize = 4096;

/// Queued output: lines (tagged by the root) and raw bytes (`true`: printed as they are).
static LINES: Mutex<VecDeque<(bool, String)>> = Mutex::new(VecDeque::new());
static SM: AtomicU64 = AtomicU64::new(0);
static LOST: AtomicU64 = AtomicU64::new(0);

/// Creates the semaphore; call once before any [`line`].
pub fn init() -> Result<(), peregrine_abi::Status> {
    let sm = sel::alloc();
    hc::create_sm(sm, sel::OWN_PD, 0)?;
    SM.store(sm, Ordering::Relaxed);
    Ok(())
}

/// Queues a line for the console (from any EC on any CPU).
pub fn line(s: String) {
    push(false, s);
}

/// Queues raw console output (a guest's interactive console: no tag, no newline added).
pub fn raw(s: String) {
    push(true, s);
}

fn push(raw: bool, s: String) {
    {
        let mut q = LINES.lock();
        if q.len() >= MAX_LINES {
            LOST.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back((raw, s));
    }
    wake();
}

/// Wakes the main EC (to print, or to look at the VM's state).
pub fn wake() {
    let _ = hc::sm_up(SM.load(Ordering::Relaxed));
}

/// Queues a formatted line.
#[macro_export]
macro_rules! vlog {
    ($($arg:tt)*) => { $crate::log::line(alloc::format!($($arg)*)) };
}

/// The main EC's loop: prints queued lines, calling `after` whenever the queue is
/// empty; `after` returns the TSC deadline of its next call (0: none).
pub fn serve(mut after: impl FnMut() -> u64) -> ! {
    let mut deadline = 0;
    loop {
        let _ = hc::sm_down(SM.load(Ordering::Relaxed), true, deadline);
        loop {
            let next = LINES.lock().pop_front();
            match next {
                Some((false, l)) => println!("{}", l),
                Some((true, b)) => nul_rt::console::print_raw(b.as_bytes()),
                None => break,
            }
        }
        let lost = LOST.swap(0, Ordering::Relaxed);
        if lost > 0 {
            println!("vmm: {} console lines lost", lost);
        }
        deadline = after();
    }
}
