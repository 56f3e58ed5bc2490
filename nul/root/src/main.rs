//! The NUL root task.
//!
//! The first boot module. It receives the HIP and capabilities to its own PD, EC, SC and
//! the kernel PD; takes every I/O port and all memory from the kernel PD; starts one
//! service EC per CPU (console, start-up and exception portals); starts the other boot
//! modules as child PDs with only what they need (a VMM, a module with `guest=NAME`,
//! also gets module NAME mapped as its guest image, which is then no component, and a
//! memory pool for guest RAM); reports and removes a component that faults; and runs
//! the test scenario named by its `test=` argument.
#![no_std]
#![no_main]

extern crate alloc;

// Lookups by role and removal serve the scenarios (not built into the production root).
#[cfg_attr(not(feature = "scenarios"), allow(dead_code))]
mod children;
#[cfg_attr(not(feature = "scenarios"), allow(dead_code))]
mod component;
mod driver;
mod hip;
mod mem;
mod pci;
mod pieces;
#[cfg(feature = "scenarios")]
mod scenario;
mod serial;
mod services;
mod session;

use nul_rt::{hc, println, sel};
use peregrine_abi::{Crd, XferFlags};

nul_rt::entry!(main);

fn fail() -> ! {
    serial::exit(false)
}

fn main(hip_addr: u64) -> ! {
    #[cfg(feature = "scenarios")]
    scenario::bench_more::ROOT_START_TSC.store(hc::rdtsc(), core::sync::atomic::Ordering::Relaxed);
    // Ports first: the console needs COM1.
    let ports = hc::pd_delegate(
        peregrine_abi::sel::KERN_PD,
        sel::OWN_PD,
        Crd::pio(0, 16),
        Crd::pio(0, 16),
        0,
        XferFlags::empty(),
    );
    nul_rt::console::set_sink(serial::root_sink);
    nul_rt::start::set_panic_hook(fail);
    if let Err(e) = ports {
        println!("cannot take I/O ports: {:?}", e);
        fail();
    }
    // SAFETY: the kernel enters the root with the HIP's address in rdi.
    let Some(hip) = (unsafe { hip::HipView::new(hip_addr) }) else {
        println!("no HIP at {:#x}", hip_addr);
        fail();
    };
    #[cfg(feature = "scenarios")]
    scenario::bench_more::KERNEL_ENTRY_TSC
        .store(hip.0.boot_tsc, core::sync::atomic::Ordering::Relaxed);
    let ncpu = hip.online_cpus().count();
    let free = mem::init(&hip);
    println!(
        "NUL root: {} CPUs, {} MiB free, TSC {} kHz, {} GSIs",
        ncpu,
        (free * 4096) >> 20,
        hip.0.freq_tsc_khz,
        hip.0.num_gsi
    );
    driver::init(hip.0.msi_gsi_base, hip.0.num_gsi);
    session::set_tsc_khz(hip.0.freq_tsc_khz);
    // PCI is walked when the first driver (`pci=`) asks for its function.
    pci::set_rsdp(hip.0.rsdp);
    if let Err(e) = services::init(hip.online_cpus()) {
        println!("cannot create service ECs: {:?}", e);
        fail();
    }

    let mut modules = hip.modules();
    let own = modules.next().map(|m| hip.cmdline(m)).unwrap_or("");
    let (_, args) = hip::split_cmdline(own);

    // Start every other module as a component, spread over the CPUs. A module that a
    // VMM names with `guest=NAME` is that VMM's guest, not a component.
    let cpus: alloc::vec::Vec<u64> = hip.online_cpus().collect();
    let mods: alloc::vec::Vec<(&str, &str, u64, u64)> = modules
        .map(|m| {
            let (path, margs) = hip::split_cmdline(hip.cmdline(m));
            (
                path.rsplit('/').next().unwrap_or(path),
                margs,
                m.addr,
                m.size,
            )
        })
        .collect();
    let mut guests: alloc::vec::Vec<&str> = mods
        .iter()
        .flat_map(|m| ["guest", "initrd", "disk"].map(|k| hip::arg(m.1, k)))
        .flatten()
        .collect();
    // A VMM's guest boot modules (`mods=a,b`) are no components either.
    guests.extend(
        mods.iter()
            .filter_map(|m| hip::arg(m.1, "mods"))
            .flat_map(|l| l.split(',')),
    );
    for (i, &(file, margs, addr, size)) in
        mods.iter().filter(|m| !guests.contains(&m.0)).enumerate()
    {
        let cpu = hip::arg(margs, "cpu")
            .and_then(|c| c.parse().ok())
            .unwrap_or(cpus[i % cpus.len()]);
        // A VMM (`guest=`): its guest's image, a pool for guest RAM (`mem=` MiB) and
        // the kernel memory for a VM PD and, per vCPU (`cpus=`), its 256 exit portals,
        // handler EC with its 32 fault portals and fault EC, vCPU and SC.
        let guest = hip::arg(margs, "guest").map(|g| mods.iter().find(|m| m.0 == g));
        let vmm_mem = nul_rt::start_info::arg_u64(margs, "mem")
            .unwrap_or(16)
            .min(1024);
        let vmm_cpus = nul_rt::start_info::arg_u64(margs, "cpus")
            .unwrap_or(1)
            .min(64);
        // A disk session's client gets 1 MiB more for its bounce area.
        let bounce = if hip::arg(margs, "blk").is_some() {
            256
        } else {
            0
        };
        let (guest, pool_pages, quota) = match guest {
            Some(Some(g)) => (
                Some((g.2, g.3)),
                (vmm_mem << 8) + bounce,
                // + mapping-database nodes of the pool, in the VMM and in the VM (a
                // page per 16 nodes, one node per 4 KiB at worst).
                192 + vmm_mem + 2 * ((vmm_mem << 8) / 16) + vmm_cpus * 360,
            ),
            Some(None) => {
                println!(
                    "cannot start {}: no module {:?}",
                    file,
                    hip::arg(margs, "guest")
                );
                continue;
            }
            // `quota=` pages (a hostile component that builds deep PD chains); a disk
            // session's client (`blk=`) gets `mem=` MiB as its data area.
            None => (
                None,
                if hip::arg(margs, "blk").is_some() {
                    vmm_mem << 8
                } else {
                    0
                },
                nul_rt::start_info::arg_u64(margs, "quota")
                    .unwrap_or(256)
                    .clamp(64, 1 << 16),
            ),
        };
        let name = hip::arg(margs, "name").unwrap_or(file);
        // A driver (`pci=`): its function, `msi=` interrupts (default 1) and `dma=` KiB
        // of DMA memory (default 256).
        let device = match hip::arg(margs, "pci") {
            Some(p) => match pci::claim(p) {
                Some(func) => Some(driver::Grant {
                    func,
                    msi: nul_rt::start_info::arg_u64(margs, "msi")
                        .unwrap_or(1)
                        .min(32),
                    dma_pages: nul_rt::start_info::arg_u64(margs, "dma")
                        .unwrap_or(256)
                        .clamp(4, 1 << 20)
                        .div_ceil(4),
                }),
                None => {
                    println!("cannot start {}: no free PCI function pci={}", name, p);
                    continue;
                }
            },
            None => None,
        };
        let m = component::Module {
            name: name.into(),
            args: margs.into(),
            image: (addr, size),
            cpu,
            ncpus: cpus.len() as u64,
            tsc_khz: hip.0.freq_tsc_khz,
            quota,
            // The memcheck test component checks an I/O port delegation (POST port).
            ports: (hip::arg(margs, "role") == Some("memcheck")).then_some((0x80, 0)),
            pool_pages,
            guest,
            modules: ["initrd", "disk"].map(|k| {
                hip::arg(margs, k)
                    .and_then(|n| mods.iter().find(|m| m.0 == n))
                    .map(|m| (m.2, m.3))
            }),
            device,
            // Its string: the file name and the arguments the boot configuration gives.
            mods: hip::arg(margs, "mods")
                .map(|l| {
                    l.split(',')
                        .filter_map(|n| mods.iter().find(|m| m.0 == n))
                        .map(|m| {
                            let s = if m.1.is_empty() {
                                alloc::string::String::from(m.0)
                            } else {
                                alloc::format!("{} {}", m.0, m.1)
                            };
                            (m.2, m.3, s)
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        component::MODULES.lock().push(m.clone());
        if m.deferred() {
            println!("{} (deferred: a scenario starts it)", name);
            continue;
        }
        match component::start_module(m) {
            Ok(id) => println!("started {} (id {}) on cpu {}", name, id, cpu),
            Err(e) => println!("cannot start {}: {:?}", name, e),
        }
    }

    // The scenario runs in a thread at the components' priority on the first CPU, not
    // at the root EC's (100): the root's service handlers, which run on the components'
    // SCs, share locks (heap, console, component table) with the scenario code. The
    // locks (`nul_rt::sync::Mutex`) let a preempted holder of a lower priority run, but
    // each such wait costs a sleep.
    MAIN_ARGS.call_once(|| (alloc::string::String::from(args), hip));
    let cpu0 = cpus[0];
    let evt = services::evt_base(cpu0).unwrap_or(0);
    if let Err(e) = nul_rt::thread::thread(cpu0, evt, MAIN_PRIO, run_main, 0) {
        println!("cannot start the scenario thread: {:?}", e);
        fail();
    }
    block_forever()
}

static MAIN_ARGS: spin::Once<(alloc::string::String, hip::HipView)> = spin::Once::new();

/// The priority of the root's main thread (the components' priority, see above).
#[cfg(feature = "scenarios")]
const MAIN_PRIO: u8 = scenario::PRIO;
/// The priority of the root's main thread (the components' priority, see above).
#[cfg(not(feature = "scenarios"))]
const MAIN_PRIO: u8 = 10;

pub use nul_rt::start::block_forever;

/// The scenario thread: runs the `test=` or `bench=` named in the root's arguments.
extern "C" fn run_main(_arg: u64, utcb: u64) -> ! {
    // This thread is the root's main flow from here on (the root EC only blocks):
    // `UtcbRef::main()` is its UTCB.
    nul_rt::utcb::set_main(utcb);
    let Some((args, hip)) = MAIN_ARGS.get() else {
        fail();
    };
    #[cfg(feature = "scenarios")]
    if let Some(t) = hip::arg(args, "test") {
        let ok = scenario::run(t, args, hip);
        if ok {
            println!("PASS {}", t);
        } else {
            println!("FAIL {}", t);
        }
        serial::exit(ok);
    }
    #[cfg(feature = "scenarios")]
    if let Some(b) = hip::arg(args, "bench") {
        let ok = scenario::bench(b, args, hip);
        if !ok {
            println!("FAIL bench {}", b);
        }
        serial::exit(ok);
    }
    #[cfg(not(feature = "scenarios"))]
    let _ = hip;
    #[cfg(not(feature = "scenarios"))]
    if let Some(t) = hip::arg(args, "test").or(hip::arg(args, "bench")) {
        println!("FAIL {}: this root is built without scenarios", t);
        serial::exit(false);
    }
    if hip::flag(args, "exit") {
        println!("root done");
        serial::exit(true);
    }
    block_forever()
}
