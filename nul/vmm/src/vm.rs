//! The VM: its PD with guest RAM, one vCPU per requested CPU with its own SC, and per
//! vCPU one handler EC on that vCPU's CPU serving 256 exit portals (each with the MTD
//! its exit needs, `peregrine_vmm::exit::portal_mtd`), delegated into the VM PD at the
//! vCPU's event base. Ending the VM revokes the VM PD.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use nul_rt::hc::{self, EcKind};
use nul_rt::utcb::UtcbRef;
use nul_rt::{sel, thread};
use peregrine_abi::event::{NUM_HOST_EVENTS, NUM_VCPU_EVENTS};
use peregrine_abi::perm::{self, MemPerm};
use peregrine_abi::utcb::gpr;
use peregrine_abi::{Crd, Mtd, Status, XferFlags, PAGE_BITS};
use peregrine_vmm::exit::{portal_mtd, Config, End, Machine, Step};
use peregrine_vmm::testdev::LineSink;

use crate::platform::{GuestRam, HvVcpu};
use crate::vlog;

/// Priority of the vCPUs' SCs: the main EC's (the root gives components 10), so the
/// main EC, which prints, shares the CPU with a vCPU that never exits.
pub const PRIO: u8 = 10;
/// Quantum of a vCPU's SC, in µs.
pub const QUANTUM_US: u64 = 10_000;

/// One vCPU.
pub struct Vcpu {
    /// The vCPU EC's selector.
    pub ec: u64,
    /// Its host CPU.
    pub cpu: u64,
}

/// The running VM.
pub struct Vm {
    /// Devices and exit handling.
    pub machine: Machine,
    /// Guest RAM.
    pub ram: GuestRam,
    /// The VM PD's selector.
    pub pd: u64,
    /// The vCPUs.
    pub vcpus: Vec<Vcpu>,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// Set by the first [`Vm::end`]: no more exits are handled.
    ending: AtomicBool,
    /// Set when the end is complete (reported on the console, VM PD gone).
    ended: AtomicBool,
    end_code: AtomicU64,
    /// vCPUs started and not stopped for good.
    running: AtomicU32,
    /// A semaphore nobody ups: the handler of a stopped vCPU waits on it for good.
    park: u64,
    /// The handler ECs' stacks.
    stacks: Vec<HandlerStack>,
}

/// Bytes of a handler EC's stack: the instruction emulator (decoder, page walk) runs
/// on it.
const HANDLER_STACK: usize = 64 * 1024;
/// What a fresh handler stack is filled with, to measure how much of it was used.
const STACK_FILL: u8 = 0xa5;

/// A handler EC's stack, leaked for the VMM's lifetime.
pub struct HandlerStack(&'static mut [u8]);

impl HandlerStack {
    fn new() -> Self {
        let s = alloc::vec![STACK_FILL; HANDLER_STACK].into_boxed_slice();
        HandlerStack(alloc::boxed::Box::leak(s))
    }

    /// The initial stack pointer (≡ 8 mod 16, as after a call).
    fn top(&self) -> u64 {
        ((self.0.as_ptr() as u64 + HANDLER_STACK as u64) & !0xf) - 8
    }

    /// Bytes of the stack ever used (those no longer holding the fill pattern).
    pub fn used(&self) -> usize {
        let base = self.0.as_ptr();
        let untouched = (0..HANDLER_STACK)
            // SAFETY: reads within the leaked allocation; the handler EC may write the
            // upper part concurrently, which only makes the estimate stale (bytes).
            .take_while(|&i| unsafe { core::ptr::read_volatile(base.add(i)) } == STACK_FILL)
            .count();
        HANDLER_STACK - untouched
    }
}

static VM: spin::Once<Vm> = spin::Once::new();

impl Vm {
    /// The most stack any handler EC used so far, in bytes.
    pub fn stack_used(&self) -> usize {
        self.stacks
            .iter()
            .map(HandlerStack::used)
            .max()
            .unwrap_or(0)
    }

    /// The VM's end, once it ended: its code for the root.
    pub fn ended(&self) -> Option<u64> {
        self.ended
            .load(Ordering::Acquire)
            .then(|| self.end_code.load(Ordering::Relaxed))
    }

    /// Ends the VM (once): reports why and destroys the VM PD, which stops every vCPU.
    pub fn end(&self, why: End) {
        if self.ending.swap(true, Ordering::AcqRel) {
            return;
        }
        self.end_code.store(why.code(), Ordering::Relaxed);
        vlog!("vmm: {}", why);
        if let Err(e) = hc::revoke(Crd::obj(self.pd, 0, perm::ALL), true) {
            vlog!("vmm: revoking the VM PD failed: {:?}", e);
        }
        self.ended.store(true, Ordering::Release);
        crate::log::wake();
    }

    /// Starts vCPU `n` (its SC; its STARTUP event sets the entry state).
    fn start(&self, n: u32) {
        let Some(v) = self.vcpus.get(n as usize) else {
            return;
        };
        let sc = sel::alloc();
        self.running.fetch_add(1, Ordering::AcqRel);
        match hc::create_sc(sc, sel::OWN_PD, v.ec, PRIO, QUANTUM_US) {
            Ok(()) => vlog!("vmm: vCPU {} started on cpu {}", n, v.cpu),
            Err(e) => {
                self.running.fetch_sub(1, Ordering::AcqRel);
                vlog!("vmm: cannot start vCPU {}: {:?}", n, e)
            }
        }
    }

    /// A vCPU stops for good (HLT with interrupts disabled): the last one ends the VM;
    /// any other's handler never replies, so that vCPU stays blocked in its exit.
    fn stop(&self, rip: u64) {
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.end(End::HaltForever { rip });
            return;
        }
        loop {
            let _ = hc::sm_down(self.park, false, 0);
        }
    }
}

/// The running VM, once [`create`] made it.
pub fn get() -> Option<&'static Vm> {
    VM.get()
}

/// Guest console lines go to the VMM's console unchanged.
struct GuestConsole;

impl LineSink for GuestConsole {
    fn line(&mut self, line: &[u8]) {
        crate::log::line(alloc::string::String::from_utf8_lossy(line).into_owned());
    }
}

/// What [`create`] needs.
pub struct Params<'a> {
    /// The guest's ELF image.
    pub image: &'a [u8],
    /// Guest RAM.
    pub ram: GuestRam,
    /// Guest configuration (mode, vCPUs).
    pub mode: peregrine_vmm::testdev::Mode,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Host CPU of vCPU 0; vCPU i runs on `(first_cpu + i) % ncpus`.
    pub first_cpu: u64,
    /// Host CPUs.
    pub ncpus: u64,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
}

/// Why the VM could not be made.
#[derive(Debug)]
pub enum Error {
    /// The guest image did not load.
    Load(peregrine_vmm::loader::LoadError),
    /// The entry tables did not fit.
    Boot(peregrine_vmm::boot::BootError),
    /// A hypercall failed: which, and its status.
    Kernel(&'static str, Status),
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Load(e) => write!(f, "guest image: {}", e),
            Error::Boot(e) => write!(f, "entry tables: {}", e),
            Error::Kernel(what, s) => write!(f, "cannot {}: {:?}", what, s),
        }
    }
}

fn kernel(what: &'static str) -> impl Fn(Status) -> Error {
    move |s| Error::Kernel(what, s)
}

fn host_cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Kernel-memory quota of the VM PD: nested page tables for the RAM (4-KiB pages at
/// worst: one table per 2 MiB, plus the upper levels) and two pages per vCPU (the vCPU
/// and its VMCB).
fn vm_quota(ram: u64, vcpus: u32) -> u64 {
    16 + (ram >> 21) + 2 * u64::from(vcpus)
}

/// Loads the guest, creates the VM and starts vCPU 0.
pub fn create(p: Params) -> Result<&'static Vm, Error> {
    let mut ram = p.ram;
    let entry = peregrine_vmm::loader::load_elf(&mut ram, p.image).map_err(Error::Load)?;
    peregrine_vmm::boot::write_entry_tables(&mut ram).map_err(Error::Boot)?;
    let cfg = Config {
        mode: p.mode,
        vcpus: p.vcpus,
        entry,
    };
    let machine = Machine::new(cfg, GuestConsole, host_cpuid);

    let pd = sel::alloc();
    hc::create_pd(pd, sel::OWN_PD, vm_quota(ram.size(), p.vcpus), true)
        .map_err(kernel("create the VM PD"))?;
    // Guest RAM, from the pool at POOL_ADDR: guest-physical 0 up.
    let pages = ram.size() >> PAGE_BITS;
    let pool = nul_rt::start_info::POOL_ADDR >> PAGE_BITS;
    let mut done = 0;
    while done < pages {
        let order = (done
            .trailing_zeros()
            .min(63 - (pages - done).leading_zeros()))
        .min(20);
        let o = order as u8;
        hc::pd_delegate(
            sel::OWN_PD,
            pd,
            Crd::mem(pool + done, o, MemPerm::all()),
            Crd::mem(done, o, MemPerm::all()),
            0,
            XferFlags::GUEST,
        )
        .map_err(kernel("delegate guest RAM"))?;
        done += 1 << order;
    }

    let mut vcpus = Vec::new();
    let mut stacks = Vec::new();
    for i in 0..p.vcpus {
        let cpu = (p.first_cpu + u64::from(i)) % p.ncpus.max(1);
        // The handler's own exceptions go to portals of the VMM on its CPU.
        let fault_ec = thread::local_ec(cpu, 0).map_err(kernel("create a fault EC"))?;
        let fault_base = sel::alloc_aligned(5);
        for v in 0..NUM_HOST_EVENTS {
            hc::create_pt(
                fault_base + v,
                sel::OWN_PD,
                fault_ec.sel,
                Mtd::GPRS | Mtd::RIP_LEN | Mtd::RFLAGS | Mtd::QUAL,
                handler_fault as *const () as u64,
            )
            .map_err(kernel("create a fault portal"))?;
            hc::pt_ctrl(fault_base + v, (u64::from(i) << 8) | v)
                .map_err(kernel("set a portal id"))?;
        }
        let stack = HandlerStack::new();
        let ec = thread::local_ec_at(cpu, fault_base, stack.top())
            .map_err(kernel("create a handler EC"))?;
        stacks.push(stack);
        let base = sel::alloc_aligned(8);
        for nr in 0..NUM_VCPU_EVENTS {
            hc::create_pt(
                base + nr,
                sel::OWN_PD,
                ec.sel,
                portal_mtd(nr),
                vm_exit as *const () as u64,
            )
            .map_err(kernel("create an exit portal"))?;
            hc::pt_ctrl(base + nr, (u64::from(i) << 8) | nr).map_err(kernel("set a portal id"))?;
        }
        let evt = u64::from(i) * NUM_VCPU_EVENTS;
        hc::pd_delegate(
            sel::OWN_PD,
            pd,
            Crd::obj(base, 8, perm::ALL),
            Crd::obj(evt, 8, perm::ALL),
            0,
            XferFlags::empty(),
        )
        .map_err(kernel("delegate the exit portals"))?;
        let v = sel::alloc();
        hc::create_ec(v, pd, EcKind::Vcpu, cpu, 0, 0, evt).map_err(kernel("create a vCPU"))?;
        vlog!("vmm: vCPU {} on cpu {}", i, cpu);
        vcpus.push(Vcpu { ec: v, cpu });
    }
    let park = sel::alloc();
    hc::create_sm(park, sel::OWN_PD, 0).map_err(kernel("create a semaphore"))?;
    let vm = VM.call_once(|| Vm {
        machine,
        ram,
        pd,
        vcpus,
        tsc_khz: p.tsc_khz,
        ending: AtomicBool::new(false),
        ended: AtomicBool::new(false),
        end_code: AtomicU64::new(0),
        running: AtomicU32::new(1),
        park,
        stacks,
    });
    let sc = sel::alloc();
    hc::create_sc(sc, sel::OWN_PD, vm.vcpus[0].ec, PRIO, QUANTUM_US)
        .map_err(kernel("create vCPU 0's SC"))?;
    Ok(vm)
}

/// Every exit of every vCPU: portal id = vCPU index << 8 | event number.
extern "C" fn vm_exit(id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let a = u.get().arch_mut();
    let got = a.mtd;
    a.mtd = Mtd::empty();
    if let Some(vm) = VM.get().filter(|vm| !vm.ending.load(Ordering::Acquire)) {
        // What the portal did not deliver is stale in the UTCB: an injection must not
        // carry an old request along.
        if !got.contains(Mtd::INJ) {
            a.inj_info = 0;
            a.inj_error = 0;
        }
        let mut p = HvVcpu {
            regs: a,
            ram: vm.ram,
            tsc_khz: vm.tsc_khz,
        };
        match vm.machine.handle(&mut p, (id >> 8) as u32, id & 0xff) {
            Step::Resume => {}
            Step::Start(n) => vm.start(n),
            Step::Stop => {
                let rip = p.regs.rip;
                p.regs.mtd = Mtd::empty();
                vm.stop(rip);
            }
            Step::End(why) => {
                p.regs.mtd = Mtd::empty();
                vm.end(why);
            }
        }
    }
    u.get().head.set_counts(0, 0);
    hc::reply()
}

/// An exception of vCPU `id >> 8`'s handler EC (vector `id & 0xff`): a bug of the VMM
/// or the kernel, never the guest's doing. Logs the handler's state, ends the VM, and
/// sends the handler to [`park_handler`] on a fresh stack: the VMM lives on.
extern "C" fn handler_fault(id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let a = u.get().arch_mut();
    let (n, vector) = ((id >> 8) as usize, id & 0xff);
    vlog!(
        "vmm: vCPU {}'s exit handler: exception {} at rip {:#x} rsp {:#x} rflags {:#x} qual {:#x} {:#x} gprs {:x?}",
        n,
        vector,
        a.rip,
        a.gpr[gpr::RSP],
        a.rflags,
        a.qual[0],
        a.qual[1],
        a.gpr
    );
    let rip = a.rip;
    a.mtd = Mtd::empty();
    if let Some(vm) = VM.get() {
        vm.end(End::VmmFault { vector, rip });
        if let Some(s) = vm.stacks.get(n) {
            a.rip = park_handler as *const () as u64;
            a.gpr[gpr::RSP] = s.top();
            a.mtd = Mtd::RIP_LEN | Mtd::RSP;
        }
    }
    u.get().head.set_counts(0, 0);
    hc::reply()
}

/// Where a faulted handler EC waits for good.
extern "C" fn park_handler() -> ! {
    loop {
        if let Some(vm) = VM.get() {
            let _ = hc::sm_down(vm.park, false, 0);
        }
    }
}
