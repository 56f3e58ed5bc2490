//! The NUL disk component: a user-level NVMe driver on the PCI function the root gives
//! it (`pci=nvme msi=1 dma=KiB`, see `nul_rt::device`). It holds nothing of the
//! machine but that function's configuration page and BARs, its interrupt semaphores
//! and its DMA memory.
//!
//! The driver logic (registers, queues, commands, PRPs, timeouts) is the host-tested
//! `peregrine-nvme` crate; this component provides its MMIO (the mapped BAR 0), DMA
//! memory (the root's DMA region, device address = physical address) and clock (the
//! TSC), and turns its waits into sleeps on the MSI-X interrupt.
//!
//! Arguments: `selftest` identifies the controller and namespace 1, writes, flushes
//! and reads back a pattern in the namespace's last 64 blocks, and prints
//! `NVMe selftest ok` (or `NVMe selftest FAILED: …`); `poll` waits by polling instead
//! of the interrupt.
#![no_std]
#![no_main]

extern crate alloc;

mod hw;
mod service;

use nul_rt::device::DeviceInfo;
use nul_rt::start::block_forever;
use nul_rt::start_info::{self, StartInfo};
use nul_rt::{hc, println};
use peregrine_nvme::controller::{Config, Controller, Namespace};
use peregrine_nvme::Dma;

use crate::hw::{Bar0, DmaPool, TscClock};

nul_rt::entry!(main);

fn main(arg: u64) -> ! {
    let si = StartInfo::from_entry(arg);
    let args = si.args();
    let Some(dev) = DeviceInfo::get(si) else {
        println!("disk: no device (the root gives one with pci=)");
        block_forever()
    };
    let poll = start_info::flag(args, "poll");
    let serve = start_info::arg(args, "role") == Some("disk");
    match run(si, dev, poll, start_info::flag(args, "selftest"), serve) {
        Ok(()) => {}
        Err(e) => println!("disk: {}", e),
    }
    block_forever()
}

/// Brings the controller up and (with `selftest`) checks it.
fn run(
    si: &StartInfo,
    dev: &'static DeviceInfo,
    poll: bool,
    selftest: bool,
    serve: bool,
) -> Result<(), &'static str> {
    let bdf = dev.bdf;
    println!(
        "disk: NVMe {:02x}:{:02x}.{} ({:04x}:{:04x}), BAR0 {:#x} ({} KiB), {} KiB DMA {:#x}..{:#x}",
        (bdf >> 8) & 0xff,
        (bdf >> 3) & 0x1f,
        bdf & 7,
        dev.id & 0xffff,
        dev.id >> 16,
        dev.bars[0].phys,
        dev.bars[0].size >> 10,
        dev.dma_size >> 10,
        dev.dma_phys,
        dev.dma_phys + dev.dma_size
    );
    let bar = Bar0::new(dev).ok_or("BAR 0 is not a memory BAR")?;
    let irq = if poll {
        None
    } else {
        match hw::enable_msix(dev, si.cpu) {
            Ok(sm) => Some(sm),
            Err(e) => {
                println!("disk: no interrupt ({}), polling", e);
                None
            }
        }
    };
    hw::enable_bus_master(dev);
    let clock = TscClock::new(si.tsc_khz, irq);
    let mut c = Controller::new(bar, DmaPool::new(dev), clock, Config::default());
    c.init().map_err(|e| {
        println!("disk: controller init: {:?}", e);
        "the controller did not come up"
    })?;
    let id = c
        .identify_controller()
        .map_err(|_| "identify controller failed")?;
    let ns = c
        .identify_namespace(1)
        .map_err(|_| "identify namespace 1 failed")?;
    println!(
        "disk: {} (serial {}), namespace 1: {} blocks of {} bytes, interrupts {}",
        trim(&id.mn),
        trim(&id.sn),
        ns.blocks,
        ns.block_size,
        if irq.is_some() { "MSI-X" } else { "polled" }
    );
    let qid = c
        .create_io_queue_pair(64, irq.map(|_| 0))
        .map_err(|_| "creating the I/O queue pair failed")?;
    if serve {
        let parts = read_gpt(&mut c, qid, ns);
        let disk = service::Disk { c, qid, ns, parts };
        let wake = dev.gsi_sel;
        service::Service::new(disk, wake, irq.is_none(), si.tsc_khz)?.run();
    }
    if selftest {
        match self_test(&mut c, qid, &ns) {
            Ok(()) => {
                let clk = c.clock();
                println!(
                    "disk: waits ended by an interrupt {}, by their deadline {}",
                    clk.woken.load(core::sync::atomic::Ordering::Relaxed),
                    clk.timed_out.load(core::sync::atomic::Ordering::Relaxed)
                );
                println!("NVMe selftest ok")
            }
            Err(e) => println!("NVMe selftest FAILED: {}", e),
        }
    }
    Ok(())
}

/// Writes a pattern into the last 64 blocks, flushes, reads it back into another
/// buffer and compares; then checks that a read past the end is refused.
fn self_test(
    c: &mut Controller<Bar0, DmaPool, TscClock>,
    qid: u16,
    ns: &Namespace,
) -> Result<(), &'static str> {
    const BLOCKS: u64 = 64;
    if ns.blocks < BLOCKS {
        return Err("namespace too small");
    }
    let len = (BLOCKS * ns.block_size as u64) as usize;
    let out = c.dma().alloc(len).map_err(|_| "no DMA memory")?;
    let back = c.dma().alloc(len).map_err(|_| "no DMA memory")?;
    let seed = hc::rdtsc();
    let mut x = seed | 1;
    let mut pattern = alloc::vec![0u8; len];
    for w in pattern.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    c.dma().write(&out, 0, &pattern);
    let lba = ns.blocks - BLOCKS;
    c.write(qid, ns, lba, &out, 0, len)
        .map_err(|_| "write failed")?;
    c.flush(qid, ns.nsid).map_err(|_| "flush failed")?;
    c.read(qid, ns, lba, &back, 0, len)
        .map_err(|_| "read failed")?;
    let mut got = alloc::vec![0u8; len];
    c.dma().read(&back, 0, &mut got);
    if got != pattern {
        return Err("read back differs from what was written");
    }
    println!(
        "disk: wrote, flushed and read back {} KiB at LBA {}",
        len >> 10,
        lba
    );
    match c.read(qid, ns, ns.blocks, &back, 0, ns.block_size as usize) {
        Err(peregrine_nvme::Error::Command(s)) => {
            println!("disk: a read past the end is refused ({:?})", s);
            Ok(())
        }
        Ok(()) => Err("a read past the end succeeded"),
        Err(_) => Err("a read past the end failed without a command status"),
    }
}

/// The disk's partitions from its GPT (none, with a message, without a valid one).
fn read_gpt(
    c: &mut service::Nvme,
    qid: u16,
    ns: Namespace,
) -> alloc::vec::Vec<peregrine_blkproto::Partition> {
    let Ok(bounce) = c.dma().alloc(service::Reader::BOUNCE) else {
        println!("disk: no DMA memory to read the GPT");
        return alloc::vec::Vec::new();
    };
    let mut r = service::Reader {
        disk: c,
        qid,
        ns,
        bounce: &bounce,
    };
    match peregrine_blkproto::parse_gpt(&mut r) {
        Ok(g) => {
            for p in &g.partitions {
                println!(
                    "disk: partition {} {:?}: LBA {}..={} ({} MiB)",
                    p.index + 1,
                    p.name,
                    p.first_lba,
                    p.last_lba,
                    (p.blocks() * u64::from(ns.block_size)) >> 20
                );
            }
            if g.from_backup {
                println!("disk: the primary GPT is damaged; using the backup");
            }
            g.partitions
        }
        Err(e) => {
            println!(
                "disk: no usable GPT ({:?}); only range= bindings resolve",
                e
            );
            alloc::vec::Vec::new()
        }
    }
}

/// An ASCII identify field without its padding.
fn trim(b: &[u8]) -> &str {
    core::str::from_utf8(b)
        .unwrap_or("?")
        .trim_end_matches([' ', '\0'])
}
