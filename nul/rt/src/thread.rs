//! Local ECs (portal handlers) and global threads, with their stacks and UTCBs.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicU64, Ordering};

use peregrine_abi::{Mtd, Status};

use crate::hc::{self, EcKind};
use crate::sel;

/// Where the runtime places the UTCBs of the ECs a component creates.
const UTCB_REGION: u64 = 0x7f00_0000_0000;
static NEXT_UTCB: AtomicU64 = AtomicU64::new(UTCB_REGION);

/// Stack size of a handler EC.
pub const STACK_SIZE: usize = 16 * 1024;

/// A portal handler: called with the portal id and the handler's UTCB address; must
/// end with [`hc::reply`].
pub type Handler = extern "C" fn(id: u64, utcb: u64) -> !;

fn new_stack() -> u64 {
    let stack: Box<[u8]> = alloc::vec![0u8; STACK_SIZE].into_boxed_slice();
    let top = Box::leak(stack).as_ptr() as u64 + STACK_SIZE as u64;
    // The handler is entered like a function after `call`: rsp ≡ 8 (mod 16).
    (top & !0xf) - 8
}

/// A local EC created by [`local_ec`].
#[derive(Debug, Clone, Copy)]
pub struct LocalEc {
    /// Its capability selector.
    pub sel: u64,
    /// Its UTCB address.
    pub utcb: u64,
}

/// Creates a local EC on `cpu` in the own PD, ready to serve portals.
pub fn local_ec(cpu: u64, evt_base: u64) -> Result<LocalEc, Status> {
    local_ec_at(cpu, evt_base, new_stack())
}

/// Like [`local_ec`], on a stack the caller provides: the handler is entered with
/// `rsp` = `sp` (make it ≡ 8 mod 16, as after a `call`).
pub fn local_ec_at(cpu: u64, evt_base: u64, sp: u64) -> Result<LocalEc, Status> {
    let s = sel::alloc();
    let utcb = NEXT_UTCB.fetch_add(4096, Ordering::Relaxed);
    hc::create_ec(s, sel::OWN_PD, EcKind::Local, cpu, utcb, sp, evt_base)?;
    Ok(LocalEc { sel: s, utcb })
}

/// Creates a portal to `ec` entering `handler` with `mtd`, and sets its id.
pub fn portal(ec: &LocalEc, handler: Handler, mtd: Mtd, id: u64) -> Result<u64, Status> {
    let s = sel::alloc();
    hc::create_pt(s, sel::OWN_PD, ec.sel, mtd, handler as usize as u64)?;
    hc::pt_ctrl(s, id)?;
    Ok(s)
}

/// A global thread: an EC with its own SC.
#[derive(Debug, Clone, Copy)]
pub struct Thread {
    /// EC selector.
    pub ec: u64,
    /// SC selector.
    pub sc: u64,
    /// Its UTCB address.
    pub utcb: u64,
}

/// The entry of a global thread: its argument and its UTCB address.
pub type ThreadEntry = extern "C" fn(arg: u64, utcb: u64) -> !;

/// Starts a global thread on `cpu` at `entry` (it receives `arg` in `rdi` and its UTCB
/// address in `rsi`).
///
/// The kernel delivers the new EC's STARTUP event to portal `evt_base + STARTUP`, with
/// the EC's initial RSP in the UTCB (MTD `RSP`). The stack starts with
/// `[arg, entry, utcb]`; the startup handler ([`startup_reply`]) replies with
/// RIP = entry, RDI = arg and RSI = utcb.
pub fn thread(
    cpu: u64,
    evt_base: u64,
    prio: u8,
    entry: ThreadEntry,
    arg: u64,
) -> Result<Thread, Status> {
    // SAFETY: a fresh, leaked 16 KiB stack, used by nothing else.
    unsafe { thread_on(cpu, evt_base, prio, entry, arg, new_stack()) }
}

/// [`thread`] on a stack the caller provides (e.g. one above a guard page), whose top
/// is `sp`.
///
/// # Safety
/// `sp` must be 16-byte aligned, minus 8, at the top of at least 4 KiB of writable
/// memory that stays reserved for this thread for its lifetime.
pub unsafe fn thread_on(
    cpu: u64,
    evt_base: u64,
    prio: u8,
    entry: ThreadEntry,
    arg: u64,
    sp: u64,
) -> Result<Thread, Status> {
    let ec = sel::alloc();
    let sc = sel::alloc();
    let utcb = NEXT_UTCB.fetch_add(4096, Ordering::Relaxed);
    // Initial frame read by `startup_reply`: argument, entry, UTCB. `sp - 24` keeps the
    // entry's rsp ≡ 8 (mod 16), as after a `call`.
    // SAFETY: the caller's contract: `sp` is 8 bytes below the top of a stack of this
    // thread's own; the three words written lie inside it.
    unsafe {
        *((sp - 8) as *mut u64) = utcb;
        *((sp - 16) as *mut u64) = entry as usize as u64;
        *((sp - 24) as *mut u64) = arg;
    }
    let isp = sp - 24 - 8;
    hc::create_ec(ec, sel::OWN_PD, EcKind::Global, cpu, utcb, isp, evt_base)?;
    hc::create_sc(sc, sel::OWN_PD, ec, prio, 10_000)?;
    Ok(Thread { ec, sc, utcb })
}

/// Fills the reply to a STARTUP event of a thread made by [`thread`]: reads the
/// argument, entry and UTCB from the initial stack named in the UTCB and sets RIP, RDI,
/// RSI and RSP. The portal's MTD must include `RSP`.
pub fn startup_reply(utcb: &mut peregrine_abi::Utcb) {
    use peregrine_abi::utcb::gpr;
    let a = utcb.arch_mut();
    let sp = a.gpr[gpr::RSP];
    // SAFETY: `thread` wrote these three words just above the EC's initial stack
    // pointer in this PD before creating the EC; the stack is leaked and never freed.
    let (arg, entry, u) = unsafe {
        (
            *((sp + 8) as *const u64),
            *((sp + 16) as *const u64),
            *((sp + 24) as *const u64),
        )
    };
    a.rip = entry;
    a.gpr[gpr::RDI] = arg;
    a.gpr[gpr::RSI] = u;
    a.gpr[gpr::RBP] = 0;
    a.mtd = Mtd::RIP_LEN | Mtd::GPR_BSD | Mtd::RSP;
}
