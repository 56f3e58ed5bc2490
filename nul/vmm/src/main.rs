//! The VMM component (`nul-vmm`): one VM per instance, started by the root from a boot
//! module line such as
//!
//! ```text
//! nul-vmm guest=guest-test cpus=2 mem=16 mode=check [seed=N] [name=TAG] [cpu=N]
//! ```
//!
//! The root maps the guest's image (the boot module `guest=` names) read-only and a
//! pool of `mem` MiB for guest RAM (see `nul_rt::start_info`), and gives the VMM the
//! kernel memory for a VM PD and its vCPUs. The VMM loads the guest's ELF image, builds
//! its 64-bit entry state (identity map of 4 GiB, GDT) and runs `cpus` vCPUs, vCPU i on
//! host CPU `(cpu + i) % CPUs`; the exit handling is the vmm library's
//! (`peregrine_vmm::exit`), this crate binds it to the hypervisor ([`vm`], [`platform`]).
//! The main EC prints what the handlers queue ([`log`]); when the VM ends it reports the
//! exits and the end to the root (`nul_rt::svc::key::VM_EXITS`, `VM_END`).
//!
//! `mode=check` runs the guest's check list, `mode=bench` its exit benchmark (its
//! `BENCH` lines are printed unchanged), `mode=hostile seed=N` its hostile mode,
//! `mode=loops [flags=1]` its exception loops (flag 1: without the #DB loop),
//! `mode=loops` its exception loops (#AC, #DB; two vCPUs); `limit=S` ends the VM after
//! S seconds. At the end it prints the exits it handled and the exceptions it reflected
//! into the guest.
//!
//! `selftest=stack_overflow` makes the first exit's handler recurse until its stack
//! ends: the guard page below the stack turns that into a page fault the VMM reports,
//! ending the VM with `End::VmmFault` (the test that the guard holds).
//!
//! `mode=linux` boots a Linux bzImage (`guest=`) on the PC of `peregrine_vmm::pc`, with
//! the boot modules `initrd=` and `disk=` and the kernel command line after ` -- `;
//! `interactive` makes COM1 the console (untagged output, the root's serial input).
#![no_std]
#![no_main]

extern crate alloc;

mod log;
mod platform;
mod vm;

use core::sync::atomic::Ordering;

use nul_rt::start_info::{self, StartInfo};
use nul_rt::{hc, println, sel, svc};
use peregrine_vmm::exit::End;
use peregrine_vmm::testdev::Mode;

nul_rt::entry!(main);

/// Reported as the end when the VM could not be made.
const END_NO_VM: u64 = 0xff << 32;

use nul_rt::start::block_forever as park;

fn fail(why: &dyn core::fmt::Display) -> ! {
    println!("vmm: {}", why);
    let _ = svc::result(svc::key::VM_END, END_NO_VM);
    park()
}

/// The disk session (`blk=`), once the disk service has set it up (it answers when it
/// has its disk up: up to 30 s); guest RAM is the pool's first `mem` bytes, the rest is
/// the bounce area.
fn session(si: &StartInfo, mem: u64) -> Option<vm::Session> {
    if si.blk_ring_bytes == 0 {
        return None;
    }
    // SAFETY: the root maps the ring region read-write at VMM_RING_ADDR for
    // `blk_ring_bytes` bytes for our lifetime; atomics tolerate the service's writes.
    let ring: &'static [core::sync::atomic::AtomicU32] = unsafe {
        core::slice::from_raw_parts(
            nul_rt::blk::VMM_RING_ADDR as *const core::sync::atomic::AtomicU32,
            si.blk_ring_bytes as usize / 4,
        )
    };
    let layout = peregrine_blkproto::Layout::new(nul_rt::blk::RING_ENTRIES)?;
    let sleep = sel::alloc();
    let _ = hc::create_sm(sleep, sel::OWN_PD, 0);
    let deadline = hc::rdtsc() + 30_000 * si.tsc_khz.max(1);
    while peregrine_blkproto::ClientRing::attach(ring, layout).is_err() {
        if hc::rdtsc() > deadline {
            println!("vmm: the disk service did not set up the session in 30 s; no disk");
            return None;
        }
        let _ = hc::sm_down(sleep, false, hc::rdtsc() + 10 * si.tsc_khz.max(1));
    }
    // SAFETY: the pool's bytes after guest RAM are the VMM's own, never mapped into the
    // VM (guest RAM is the first `mem` bytes), and stay mapped for our lifetime.
    let bounce = unsafe {
        platform::GuestRam::new(
            start_info::POOL_ADDR + mem,
            si.pool_size.saturating_sub(mem),
        )
    };
    Some(vm::Session { ring, bounce })
}

fn main(info: u64) -> ! {
    vm::VMM_START_TSC.store(hc::rdtsc(), Ordering::Relaxed);
    // SAFETY: the root enters a component with its start-info page's address, mapped
    // read-only for the component's lifetime.
    let Some(si) = (unsafe { StartInfo::at(info) }) else {
        fail(&"no start-info page")
    };
    // The guest kernel's command line follows ` -- `.
    let (args, cmdline) = match si.args().split_once(" -- ") {
        Some((a, c)) => (a, c.trim()),
        None => (si.args(), ""),
    };
    let mode = start_info::arg(args, "mode").unwrap_or("check");
    // `seed=` of the hostile mode; `flags=` of the loops mode.
    let seed = if mode == "loops" {
        start_info::arg_u64(args, "flags").unwrap_or(0)
    } else {
        start_info::arg_u64(args, "seed").unwrap_or(1)
    };
    let multiboot = mode == "multiboot";
    // A Linux bzImage and a Multiboot kernel both run on the PC.
    let linux = mode == "linux" || multiboot;
    let mode = match Mode::parse(mode, seed) {
        Some(m) => m,
        None if linux => Mode::Check,
        None => fail(&alloc::format!("unknown mode {:?}", mode)),
    };
    vm::BOOT_STAMPS.store(mode == Mode::Bench, Ordering::Relaxed);
    vm::BENCH_MODE.store(mode == Mode::Bench, Ordering::Relaxed);
    match start_info::arg(args, "selftest") {
        None => {}
        Some("stack_overflow") => vm::OVERFLOW_SELFTEST.store(true, Ordering::Relaxed),
        Some(t) => fail(&alloc::format!("unknown selftest {:?}", t)),
    }
    let vcpus = start_info::arg_u64(args, "cpus").unwrap_or(1).clamp(1, 64) as u32;
    let mem = start_info::arg_u64(args, "mem").unwrap_or(16).max(4) << 20;
    if si.pool_size < mem {
        fail(&alloc::format!(
            "{} MiB of guest RAM asked for, the pool has {} MiB",
            mem >> 20,
            si.pool_size >> 20
        ));
    }
    if si.image_addr == 0 {
        fail(&"no guest image (guest=)");
    }
    // SAFETY: the root mapped the guest's boot module read-only at `image_addr` for
    // `image_size` bytes, for our lifetime; nothing writes it.
    let image =
        unsafe { core::slice::from_raw_parts(si.image_addr as *const u8, si.image_size as usize) };
    // SAFETY: the root mapped the pool read-write at POOL_ADDR for `pool_size` bytes
    // (at least `mem`, checked above); it is used for nothing but guest RAM.
    let ram = unsafe { platform::GuestRam::new(start_info::POOL_ADDR, mem) };
    if let Err(e) = log::init() {
        fail(&alloc::format!("cannot create a semaphore: {:?}", e));
    }
    let interactive = linux && start_info::flag(args, "interactive");
    let linux = linux.then(|| {
        // SAFETY: the root maps the initrd read-only and the disk read-write for our
        // lifetime; each is taken once, here, and the initrd only read.
        let (initrd, disk) = unsafe {
            (
                si.module(start_info::MODULE_INITRD).map(|m| &*m),
                si.module(start_info::MODULE_DISK),
            )
        };
        let mods = start_info::mods(si);
        println!(
            "vmm: {} {} ({} bytes), initrd {} bytes, disk {} bytes, {} modules, {} MiB, {} vCPU(s), cmdline {:?}",
            if multiboot { "Multiboot kernel" } else { "Linux" },
            start_info::arg(args, "guest").unwrap_or("?"),
            image.len(),
            initrd.map_or(0, |i| i.len()),
            disk.as_ref().map_or(0, |d| d.len()),
            mods.len(),
            mem >> 20,
            vcpus,
            cmdline
        );
        vm::LinuxParams {
            cmdline,
            initrd,
            disk,
            session: session(si, mem),
            interactive: start_info::flag(args, "interactive"),
            multiboot,
            // SAFETY: the root maps each module read-only for our lifetime.
            modules: mods
                .iter()
                .map(|m| (unsafe { m.bytes() }, m.string().as_bytes()))
                .collect(),
        }
    });
    if linux.is_none() {
        println!(
            "vmm: guest {} ({} bytes), {} MiB, {} vCPU(s), {:?}",
            start_info::arg(args, "guest").unwrap_or("?"),
            image.len(),
            mem >> 20,
            vcpus,
            mode
        );
    }
    let params = vm::Params {
        image,
        linux,
        ram,
        mode,
        vcpus,
        first_cpu: si.cpu,
        ncpus: si.ncpus,
        tsc_khz: si.tsc_khz,
    };
    if let Err(e) = vm::create(params) {
        fail(&alloc::format!("cannot create the VM: {}", e));
    }
    // `limit=S`: the VM ends after S seconds of TSC time (a hostile guest may spin).
    let limit = start_info::arg_u64(args, "limit").unwrap_or(0);
    let end_tsc = match limit {
        0 => 0,
        s => hc::rdtsc().saturating_add(s.saturating_mul(si.tsc_khz).saturating_mul(1000)),
    };
    let mut reported = false;
    // An interactive Linux console: the root's console input is polled every 10 ms.
    let poll = interactive.then(|| si.tsc_khz.saturating_mul(10).max(1));
    let mut pending: alloc::vec::Vec<u8> = alloc::vec::Vec::new();
    log::serve(move || {
        let Some(vm) = vm::get() else { return 0 };
        let mut next = end_tsc;
        if let (Some(poll), vm::Guest::Linux(pc), None) = (poll, &vm.machine, vm.ended()) {
            let mut b = [0u8; svc::INPUT_MAX];
            if pending.len() < 4096 {
                if let Ok(n) = svc::input(&mut b) {
                    pending.extend_from_slice(&b[..n]);
                }
            }
            if !pending.is_empty() {
                let n = pc.console_input(&pending);
                pending.drain(..n);
            }
            pc.flush_console();
            let t = hc::rdtsc() + poll;
            next = if next == 0 { t } else { next.min(t) };
        }
        if end_tsc != 0 && vm.ended().is_none() && hc::rdtsc() >= end_tsc {
            vm.end(End::TimeLimit { secs: limit });
            // Print the end's line first: come back at once.
            return 1;
        }
        if let (Some(code), false) = (vm.ended(), reported) {
            reported = true;
            let exits = vm.machine.core().exits();
            println!(
                "vmm: {} exits handled ({} answered with #UD), handler stack use {} bytes",
                exits,
                vm.machine.core().undefined(),
                vm.stack_used()
            );
            println!(
                "vmm: exceptions reflected into the guest: #DB {}, #AC {}",
                vm.machine.core().reflected(1),
                vm.machine.core().reflected(17)
            );
            let resumed = vm.machine.core().resumed_shutdowns();
            if resumed != 0 {
                println!("vmm: impossible shutdowns resumed: {}", resumed);
            }
            let _ = svc::result(svc::key::VM_EXITS, exits);
            let _ = svc::result(svc::key::VM_END, code);
        }
        if reported {
            0
        } else {
            next
        }
    })
}
