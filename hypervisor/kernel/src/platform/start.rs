//! From bring-up to the root task: the kernel PD and root PD are created on the boot
//! CPU, every CPU enters its scheduler.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use peregrine_abi::hip::{mem_kind, CpuDesc, MemDesc};

use crate::platform::{boot, percpu};
use crate::root::{self, Module, Platform};
use crate::{kprintln, sched};

static GO: AtomicBool = AtomicBool::new(false);
/// Application processors that finished their per-CPU set-up (vCPU support included):
/// the root starts only after all did, so it never sees a half-initialised CPU.
static APS_READY: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Subtracts `holes` from `[s, e)`, appending the page ranges left to `out`.
fn subtract(s: u64, e: u64, holes: &[(u64, u64)], out: &mut Vec<(u64, u64)>) {
    let mut parts = alloc::vec![(s, e)];
    for &(hs, he) in holes {
        let mut next = Vec::new();
        for (a, b) in parts {
            if he <= a || hs >= b {
                next.push((a, b));
                continue;
            }
            if hs > a {
                next.push((a, hs));
            }
            if he < b {
                next.push((he, b));
            }
        }
        parts = next;
    }
    for (a, b) in parts {
        let a = a.div_ceil(4096);
        let b = b / 4096;
        if b > a {
            out.push((a, b - a));
        }
    }
}

/// The kernel PD's device memory, as page ranges (base, pages): every physical page
/// below the CPU's address width (at most 2^46) that is not RAM (`ram`: byte ranges of
/// RAM, the kernel's memory and the modules) and not the kernel's own devices: the
/// local APIC and MSI window (0xfee00000, 1 MiB) and the I/O APICs' register pages.
/// Firmware-reserved ranges (an ECAM window, the BIOS area) and ACPI tables are in it.
fn device_ranges(mut holes: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let bits = raw_cpuid::CpuId::new()
        .get_processor_capacity_feature_info()
        .map_or(36, |c| c.physical_address_bits())
        .clamp(32, 46);
    holes.push((0xfee0_0000, 0xfef0_0000));
    crate::arch::x86::ioapic::for_each_phys(|p| holes.push((p, p + 4096)));
    let mut out = Vec::new();
    subtract(0, 1u64 << bits, &holes, &mut out);
    out
}

/// The boot CPU: create the root task, then schedule.
pub fn bsp() -> ! {
    sched::init_cpu();
    // SAFETY: the boot CPU's kernel entry, interrupts off, before anything else of the
    // kernel runs on it.
    let cpu = &mut unsafe { crate::cpu::Cpu::enter() };
    let bi = crate::platform::multiboot::info();
    if bi.has_arg("trace_tick") {
        crate::trap::TRACE_TICK.store(true, Ordering::Relaxed);
    }
    if bi.has_arg("trace_hc") {
        crate::syscall::TRACE.store(true, Ordering::Relaxed);
    }
    let plat = boot::platform();

    let mut mem = Vec::new();
    let mut holes = Vec::new();
    let mut avail = Vec::new();
    let mut mods_raw: Vec<(u64, u64, alloc::string::String)> = Vec::new();
    // Page ranges, rounded outwards: write-back memory, and what the kernel PD's device
    // memory leaves out (RAM, the kernel's own memory and modules).
    let mut wb = Vec::new();
    let mut ram = Vec::new();
    boot::for_each_mem_desc(|d: MemDesc, cmd| {
        let pages = (d.addr & !0xfff, (d.addr + d.size).div_ceil(4096) * 4096);
        match d.kind {
            mem_kind::AVAILABLE | mem_kind::HYPERVISOR | mem_kind::MODULE => {
                wb.push((pages.0 >> 12, pages.1 >> 12));
                ram.push(pages);
            }
            mem_kind::ACPI | mem_kind::NVS => wb.push((pages.0 >> 12, pages.1 >> 12)),
            _ => {}
        }
        match d.kind {
            mem_kind::AVAILABLE => {
                // Reported below as the ranges the kernel PD really holds.
                avail.push((d.addr.max(0x10_0000), d.addr + d.size));
                return;
            }
            mem_kind::HYPERVISOR => holes.push((d.addr, d.addr + d.size)),
            mem_kind::MODULE => {
                holes.push((d.addr & !0xfff, (d.addr + d.size).div_ceil(4096) * 4096));
                mods_raw.push((
                    d.addr,
                    d.addr + d.size,
                    alloc::string::String::from(cmd.unwrap_or("")),
                ));
                return;
            }
            _ => {}
        }
        mem.push(d);
    });
    let mut user = Vec::new();
    for &(s, e) in &avail {
        if e > s {
            subtract(s, e, &holes, &mut user);
        }
    }
    for &(b, n) in &user {
        mem.push(MemDesc {
            addr: b * 4096,
            size: n * 4096,
            kind: mem_kind::AVAILABLE,
            aux: 0,
        });
    }
    crate::mem::set_wb_ranges(wb);
    let device = device_ranges(ram);
    let modules: Vec<Module> = mods_raw
        .iter()
        .map(|(s, e, c)| Module {
            start: *s,
            end: *e,
            cmdline: c.as_str(),
        })
        .collect();
    let cpus: Vec<CpuDesc> = (0..plat.num_cpus)
        .map(|i| CpuDesc {
            online: crate::arch::cpu_online(i as u64) as u8,
            thread: 0,
            core: i as u8,
            package: 0,
            apic_id: percpu::get(i).apic_id.load(Ordering::Relaxed),
        })
        .collect();
    let (free, _) = crate::mem::pool::stats();
    // The root may use most of the kernel pool; a reserve stays for the kernel itself.
    let root_quota = (free as u64).saturating_sub(1024).min(u32::MAX as u64) as u32;
    let user_pages: u64 = user.iter().map(|&(_, n)| n).sum();
    let p = Platform {
        mem: &mem,
        user_ranges: &user,
        modules: &modules,
        cpus: &cpus,
        features: crate::vcpu::hip_features(crate::arch::x86::cpu::info().features),
        tsc_khz: plat.tsc_khz,
        bus_khz: plat.bus_khz,
        num_gsi: crate::irq::MAX_GSI as u64,
        msi_gsi_base: crate::irq::msi_base() as u64,
        device_ranges: &device,
        rsdp: plat.rsdp,
        root_quota,
    };
    kprintln!(
        "root: {} modules, {} MiB for user space, quota {} pages",
        modules.len(),
        user_pages >> 8,
        root_quota
    );
    if bi.modules().is_empty() {
        kprintln!("no boot modules: nothing to run");
        crate::arch::x86::qemu::qemu_exit(0x11);
    }
    // Every AP ran its vCPU set-up (hooks::ap_ready) before it reaches `ap`.
    while APS_READY.load(Ordering::Acquire) + 1 < crate::arch::online_cpus() {
        core::hint::spin_loop();
    }
    if let Err(e) = root::create(&p, cpu) {
        kprintln!("cannot start the root task: {:?}", e);
        crate::arch::x86::qemu::qemu_exit(0x11);
    }
    drop(mods_raw);
    GO.store(true, Ordering::Release);
    sched::schedule()
}

/// An application processor: wait for the boot CPU, then schedule.
pub fn ap() -> ! {
    sched::init_cpu();
    APS_READY.fetch_add(1, Ordering::Release);
    // Wait with interrupts enabled, so the timer keeps ticking here.
    while !GO.load(Ordering::Acquire) {
        crate::arch::idle_wait();
    }
    sched::schedule()
}
