//! `test=vmm [secs=N]`: the VMM components (modules with `guest=`, the `nul-vmm`
//! binary) run their VMs; the root waits up to `secs` (default 300) for each to report
//! how its VM ended ([`svc::key::VM_END`]). It passes when every VMM reported (none was
//! removed for a fault) and every VM that ran the check list, the benchmark or the
//! exception loops (`mode=check`, `mode=bench`, `mode=loops`) ended with `guest done
//! 0`; a hostile VM (`mode=hostile`) passes with any end its VMM reports except a fault
//! of the VMM's own exit handler (`End::VmmFault`): the VMM survived it; a Linux VM
//! (`mode=linux`) passes when it powered off; a Multiboot VM (`mode=multiboot`) when
//! it ended through isa-debug-exit with the status `expect=` names (default 1) or,
//! with `expect=triple-fault`, in a triple fault; a VMM with `selftest=stack_overflow`
//! passes when its VM ended with that fault (its handler ran into its guard page).
//!
//! With a canary (`nul-test role=canary cpu=N`), a root thread on the canary's CPU
//! calls it every 5 ms while the VMs run: every call must be answered, and never more
//! than [`CANARY_MAX_GAP_MS`] pass between two answers, so no guest on that CPU may hold
//! it.

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nul_rt::start_info::{arg, arg_u64};
use nul_rt::utcb::UtcbRef;
use nul_rt::{hc, println, sel, svc};

use super::{check, deadline_ms, echo_ok_on, ms, sleep_ms, spawn, wait_child, wait_registered};
use crate::children;
use crate::children::CHILDREN;

/// `End::code` of `End::VmmFault` (`peregrine_vmm::exit`): the VMM's exit handler took
/// an exception.
const END_VMM_FAULT: u64 = 11 << 32;

/// The longest the canary may stay silent (no answer, from one to the next).
const CANARY_MAX_GAP_MS: u64 = 1000;

/// Calls of the canary caller: asked, answered, the longest gap between two answers
/// (TSC ticks); the caller stops, and says it did.
static CANARY_ASKED: AtomicU64 = AtomicU64::new(0);
static CANARY_ANSWERED: AtomicU64 = AtomicU64::new(0);
static CANARY_GAP: AtomicU64 = AtomicU64::new(0);
static CANARY_STOP: AtomicBool = AtomicBool::new(false);
static CANARY_DONE: AtomicBool = AtomicBool::new(false);

/// A root thread on the canary's CPU: calls the canary's portal `pt` every 5 ms until
/// told to stop.
extern "C" fn canary_caller(pt: u64, utcb: u64) -> ! {
    let mut salt = 0x6361_0000;
    let mut last = hc::rdtsc();
    while !CANARY_STOP.load(Ordering::Acquire) {
        salt += 1;
        CANARY_ASKED.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the kernel passes this thread's own UTCB address.
        let u = unsafe { UtcbRef::from_addr(utcb) };
        if echo_ok_on(u, pt, 2, salt).is_ok() {
            CANARY_ANSWERED.fetch_add(1, Ordering::Relaxed);
            let now = hc::rdtsc();
            CANARY_GAP.fetch_max(now.saturating_sub(last), Ordering::Relaxed);
            last = now;
        }
        sleep_ms(5);
    }
    CANARY_DONE.store(true, Ordering::Release);
    let sm = sel::alloc();
    let _ = hc::create_sm(sm, sel::OWN_PD, 0);
    loop {
        let _ = hc::sm_down(sm, false, 0);
    }
}

/// Starts the canary caller if there is a canary; returns its CPU.
fn start_canary() -> Result<Option<u64>, ()> {
    let Some(c) = children::find("canary") else {
        return Ok(None);
    };
    let cpu = children::with(c, |c| c.cpu).unwrap_or(0);
    let Some(pt) = wait_registered(c, 10_000) else {
        check(false, "canary registered within 10 s");
        return Err(());
    };
    if let Err(e) = spawn(cpu, canary_caller, pt) {
        println!(
            "vmm: cannot start the canary caller on cpu {}: {:?}",
            cpu, e
        );
        return Err(());
    }
    Ok(Some(cpu))
}

/// Stops the canary caller and checks its calls.
fn stop_canary(cpu: u64) -> bool {
    CANARY_STOP.store(true, Ordering::Release);
    let end = deadline_ms(2000);
    while !CANARY_DONE.load(Ordering::Acquire) && hc::rdtsc() < end {
        sleep_ms(5);
    }
    let (asked, answered) = (
        CANARY_ASKED.load(Ordering::Relaxed),
        CANARY_ANSWERED.load(Ordering::Relaxed),
    );
    let gap_ms = CANARY_GAP.load(Ordering::Relaxed) / ms(1).max(1);
    println!(
        "vmm: canary on cpu {}: {} of {} calls answered, at most {} ms between two answers",
        cpu, answered, asked, gap_ms
    );
    let mut ok = check(
        CANARY_DONE.load(Ordering::Acquire),
        "the canary caller ran to its end",
    );
    ok &= check(
        asked >= 3 && answered == asked,
        "the canary answered every call (at least 3) while the VMs ran",
    );
    ok &= check(
        gap_ms < CANARY_MAX_GAP_MS,
        "the canary's CPU kept serving it (never a second without an answer)",
    );
    ok
}

/// Runs the scenario.
pub fn run(args: &str) -> bool {
    super::bench_more::print_boot();
    let secs = arg_u64(args, "secs").unwrap_or(300);
    let vmms: Vec<usize> = CHILDREN
        .lock()
        .iter()
        .enumerate()
        .filter(|(_, c)| arg(&c.args, "guest").is_some())
        .map(|(i, _)| i)
        .collect();
    let mut ok = check(!vmms.is_empty(), "a VMM component runs");
    let canary = match start_canary() {
        Ok(c) => c,
        Err(()) => return false,
    };
    for id in vmms {
        wait_child(id, secs * 1000, |c| {
            c.result(svc::key::VM_END).is_some() || !c.alive
        });
        let Some((name, mode, end, exits, alive, expect)) = children::with(id, |c| {
            // A VMM told to overflow its handler's stack must end its VM with the fault
            // its guard page causes.
            let mode = match arg(&c.args, "selftest") {
                Some("stack_overflow") => "stack_overflow",
                _ => arg(&c.args, "mode").unwrap_or("check"),
            };
            (
                c.name.clone(),
                String::from(mode),
                c.result(svc::key::VM_END),
                c.result(svc::key::VM_EXITS),
                c.alive,
                arg(&c.args, "expect").map(String::from),
            )
        }) else {
            continue;
        };
        println!(
            "vmm {} ({}): mode {}, end {:?}, {} exits",
            name,
            id,
            mode,
            end.map(|e| alloc::format!("{:#x}", e)),
            exits.unwrap_or(0)
        );
        ok &= check(alive, "the VMM is alive");
        ok &= check(end.is_some(), "the VMM reported the end of its VM");
        match mode.as_str() {
            "hostile" => {
                ok &= check(
                    end != Some(END_VMM_FAULT),
                    "the hostile guest's VMM did not fault (its exit handler took no exception)",
                )
            }
            "stack_overflow" => {
                ok &= check(
                    end == Some(END_VMM_FAULT),
                    "the VMM's handler stack overflow faulted (guard page), the VMM lives on",
                )
            }
            // Linux ends its run with an ACPI power-off.
            "linux" => ok &= check(end == Some(1 << 32), "the guest powered off"),
            // A Multiboot test kernel ends through isa-debug-exit: `expect=N` is the exit
            // status QEMU would give (default 1: it wrote 0, every check passed), or
            // `expect=triple-fault`.
            "multiboot" => {
                let want = match expect.as_deref() {
                    Some("triple-fault") => 3 << 32,
                    Some(s) => 12 << 32 | s.parse::<u64>().unwrap_or(u64::MAX),
                    None => 12 << 32 | 1,
                };
                ok &= check(
                    end == Some(want),
                    &alloc::format!("the guest ended as expected ({:#x})", want),
                )
            }
            _ => ok &= check(end == Some(0), "the guest ended with code 0"),
        }
    }
    if let Some(cpu) = canary {
        ok &= stop_canary(cpu);
    }
    ok
}
