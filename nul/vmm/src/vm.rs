//! The VM: its PD with guest RAM, one vCPU per requested CPU with its own SC, and per
//! vCPU one handler EC on that vCPU's CPU serving 256 exit portals (each with the MTD
//! its exit needs, `peregrine_vmm::exit::portal_mtd`), delegated into the VM PD at the
//! vCPU's event base. Ending the VM revokes the VM PD.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use nul_rt::hc::{self, EcKind};
use nul_rt::stack::GuardedStack;
use nul_rt::utcb::UtcbRef;
use nul_rt::{sel, thread};
use peregrine_abi::event::host;
use peregrine_abi::event::{NUM_HOST_EVENTS, NUM_VCPU_EVENTS};
use peregrine_abi::perm::{self, MemPerm};
use peregrine_abi::utcb::gpr;
use peregrine_abi::{Crd, Mtd, Status, XferFlags, PAGE_BITS};
use peregrine_vmm::boot::multiboot;
use peregrine_vmm::exit::{portal_mtd, Config, End, Machine, Step};
use peregrine_vmm::machine::{Board, Core, Exit};
use peregrine_vmm::pc::{Kick, Pc, PcConfig, PcDisk, QemuDevices, RamDisk};
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

/// What the VM is: the test guest's machine, or the PC that boots Linux.
pub enum Guest {
    /// The bare-metal test guest.
    Test(Machine),
    /// A Linux kernel on the PC.
    Linux(Pc),
}

impl Guest {
    /// The machine's buses and counters (exits, instructions answered with #UD,
    /// exceptions reflected).
    pub fn core(&self) -> &Core {
        match self {
            Guest::Test(m) => m.core(),
            Guest::Linux(pc) => pc.core(),
        }
    }

    fn portal_mtd(&self, event: u64) -> Mtd {
        match self {
            Guest::Test(_) => portal_mtd(event),
            Guest::Linux(_) => Pc::portal_mtd(event),
        }
    }
}

/// What wakes a vCPU: its semaphores, and whether it waits in HLT.
pub struct VcpuSync {
    /// The vCPU EC (0 until created).
    ec: AtomicU64,
    /// Upped when an interrupt is pending for the vCPU while it waits in HLT.
    wake: u64,
    /// Upped when the vCPU's next timer deadline moved earlier.
    timer: u64,
    /// The vCPU waits in HLT.
    halted: AtomicBool,
    /// The clock time (ns) the timer thread sleeps until (`u64::MAX`: none).
    sleeping_until: AtomicU64,
}

/// The platform side of [`Kick`]: wake a halted vCPU, recall a running one.
struct Kicker(Vec<VcpuSync>);

impl Kick for Kicker {
    fn kick(&self, vcpu: u32) {
        let Some(s) = self.0.get(vcpu as usize) else {
            return;
        };
        if s.halted.load(Ordering::Acquire) {
            let _ = hc::sm_up(s.wake);
        } else {
            let ec = s.ec.load(Ordering::Acquire);
            if ec != 0 {
                let _ = hc::ec_recall(ec);
            }
            // It may have just halted: the wake-up is never lost.
            if s.halted.load(Ordering::Acquire) {
                let _ = hc::sm_up(s.wake);
            }
        }
    }
}

/// The VM's clock: the host TSC in ns (the guest's TSC is the host's).
struct TscClock {
    khz: u64,
}

impl peregrine_vmm::clock::Clock for TscClock {
    fn now_ns(&self) -> u64 {
        (u128::from(hc::rdtsc()) * 1_000_000 / u128::from(self.khz.max(1))) as u64
    }
}

/// The running VM.
pub struct Vm {
    /// Devices and exit handling.
    pub machine: Guest,
    /// Per vCPU: how to wake it.
    sync: Arc<Kicker>,
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

/// A handler EC's stack: [`HANDLER_STACK`] bytes above an unmapped guard page, so an
/// overflow is a page fault the VMM reports ([`handler_fault`]), not corruption of the
/// heap below.
pub type HandlerStack = GuardedStack;

/// Whether the exit handlers overflow their stacks on purpose (`selftest=stack_overflow`):
/// the guard page's test.
pub static OVERFLOW_SELFTEST: AtomicBool = AtomicBool::new(false);

/// The TSC when the VMM's `main` began, and whether to print the boot stamps (the
/// benchmark mode): `boot_vmm_start` and `boot_guest_start`, the TSC when vCPU 0's
/// STARTUP is handled, right before the guest's first instruction.
pub static VMM_START_TSC: AtomicU64 = AtomicU64::new(0);
/// See [`VMM_START_TSC`].
pub static BOOT_STAMPS: AtomicBool = AtomicBool::new(false);
/// The benchmark mode: [`Vm::end`] prints what the VM cost in memory.
pub static BENCH_MODE: AtomicBool = AtomicBool::new(false);

/// The STARTUP portal's entry: the boot stamps once (vCPU 0, benchmark mode), then
/// [`vm_exit`]. (A portal of its own, so that no other exit pays for the test.)
extern "C" fn vm_startup(id: u64, utcb: u64) -> ! {
    if id >> 8 == 0 && BOOT_STAMPS.swap(false, Ordering::Relaxed) {
        let now = hc::rdtsc();
        vlog!(
            "BENCH boot_vmm_start {} tsc-ticks",
            VMM_START_TSC.load(Ordering::Relaxed)
        );
        vlog!("BENCH boot_guest_start {} tsc-ticks", now);
    }
    vm_exit(id, utcb)
}

/// Recurses until the stack ends (each frame keeps 512 bytes live): only the guard page
/// stops it.
#[inline(never)]
fn overflow_the_stack(depth: u64) -> u64 {
    let frame = core::hint::black_box([depth; 64]);
    if depth == u64::MAX {
        return 0;
    }
    overflow_the_stack(depth + 1).wrapping_add(frame[(depth % 64) as usize])
}

static VM: spin::Once<Vm> = spin::Once::new();
/// The disk's completion thread's stack (kept for good; its use is reported).
static COMPLETION_STACK: spin::Once<GuardedStack> = spin::Once::new();

impl Vm {
    /// The most stack any handler EC used so far, in bytes.
    pub fn stack_used(&self) -> usize {
        self.stacks
            .iter()
            .chain(COMPLETION_STACK.get())
            .map(|s| s.used(STACK_FILL))
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
        if BENCH_MODE.load(Ordering::Relaxed) {
            self.print_memory();
        }
        vlog!("vmm: {}", why);
        if let Err(e) = hc::revoke(Crd::obj(self.pd, 0, perm::ALL), true) {
            vlog!("vmm: revoking the VM PD failed: {:?}", e);
        }
        self.ended.store(true, Ordering::Release);
        crate::log::wake();
    }

    /// The memory this VM costs beside its guest RAM, as `BENCH` lines (benchmark mode,
    /// at its end): the kernel memory (quota pages) the VMM's own objects and the VM
    /// PD's take (the VM PD's quota is carved out of the VMM's: counted once, where it
    /// is used), and the VMM's heap in use.
    fn print_memory(&self) {
        use peregrine_abi::hypercall::stat;
        let used = |pd: u64| {
            let total = hc::pd_stat(pd, stat::QUOTA_TOTAL).ok()?;
            Some((
                total,
                total.checked_sub(hc::pd_stat(pd, stat::QUOTA_AVAIL).ok()?)?,
            ))
        };
        if let (Some((_, own)), Some((vm_total, vm_used))) = (used(sel::OWN_PD), used(self.pd)) {
            vlog!(
                "BENCH mem_vmm_kernel_pages {} pages",
                own.saturating_sub(vm_total)
            );
            vlog!("BENCH mem_vm_kernel_pages {} pages", vm_used);
        }
        vlog!("BENCH mem_vmm_heap_bytes {} bytes", nul_rt::heap::used());
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

impl Vm {
    /// Blocks vCPU `n`'s handler until an interrupt is pending for it (or the VM ends).
    fn wait(&self, pc: &Pc, n: u32) {
        let Some(s) = self.sync.0.get(n as usize) else {
            return;
        };
        s.halted.store(true, Ordering::Release);
        while !pc.interrupt_pending(n) && !self.ending.load(Ordering::Acquire) {
            let _ = hc::sm_down(s.wake, true, 0);
        }
        s.halted.store(false, Ordering::Release);
    }

    /// Wakes vCPU `n`'s timer thread if its next deadline moved before the one the
    /// thread sleeps until.
    fn poke_timer(&self, pc: &Pc, n: u32) {
        let Some(s) = self.sync.0.get(n as usize) else {
            return;
        };
        if pc.next_deadline(n).unwrap_or(u64::MAX) < s.sleeping_until.load(Ordering::Acquire) {
            let _ = hc::sm_up(s.timer);
        }
    }
}

/// STARTUP of a timer thread.
extern "C" fn timer_startup(_id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    thread::startup_reply(u.get());
    hc::reply()
}

/// vCPU `n`'s timer thread: brings its timers up to date whenever the next one is due
/// (raising interrupts kicks the vCPU), then sleeps until the next deadline.
extern "C" fn timer_thread(n: u64, _utcb: u64) -> ! {
    let n = n as u32;
    loop {
        let Some(vm) = VM.get() else {
            core::hint::spin_loop();
            continue;
        };
        let Guest::Linux(pc) = &vm.machine else {
            break;
        };
        let s = &vm.sync.0[n as usize];
        if vm.ending.load(Ordering::Acquire) {
            break;
        }
        pc.update_timers(n);
        let next = pc.next_deadline(n).unwrap_or(u64::MAX);
        s.sleeping_until.store(next, Ordering::Release);
        // The deadline as a host TSC value (rounded up), 0 for none.
        let tsc = if next == u64::MAX {
            0
        } else {
            ((u128::from(next) * u128::from(vm.tsc_khz.max(1))).div_ceil(1_000_000) as u64).max(1)
        };
        let _ = hc::sm_down(s.timer, true, tsc);
    }
    loop {
        if let Some(vm) = VM.get() {
            let _ = hc::sm_down(vm.park, false, 0);
        }
    }
}

/// The running VM, once [`create`] made it.
pub fn get() -> Option<&'static Vm> {
    VM.get()
}

/// Guest console lines go to the VMM's console unchanged; an interactive console
/// (`raw`) goes out untagged, unfinished lines included.
struct GuestConsole {
    raw: bool,
}

impl LineSink for GuestConsole {
    fn line(&mut self, line: &[u8]) {
        let s = alloc::string::String::from_utf8_lossy(line).into_owned();
        if self.raw {
            crate::log::raw(s + "\n");
        } else {
            crate::log::line(s);
        }
    }

    fn partial(&mut self, bytes: &[u8]) {
        let s = alloc::string::String::from_utf8_lossy(bytes).into_owned();
        if self.raw {
            crate::log::raw(s);
        } else {
            crate::log::line(s);
        }
    }
}

/// A Linux guest: what the PC loads.
pub struct LinuxParams<'a> {
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The initrd.
    pub initrd: Option<&'a [u8]>,
    /// The disk image (the VMM's own copy: the guest's writes land in it).
    pub disk: Option<&'static mut [u8]>,
    /// Or a disk-service session (`blk=`), which then is the guest's disk.
    pub session: Option<Session>,
    /// The image is a Multiboot kernel (`mode=multiboot`), not a bzImage: the PC gets
    /// QEMU's test devices (fw_cfg, isa-debug-exit, pc-testdev) as well.
    pub multiboot: bool,
    /// A Multiboot kernel's boot modules: bytes and string.
    pub modules: Vec<(&'a [u8], &'a [u8])>,
    /// The console is interactive: COM1's output goes out untagged, and the root's
    /// console input comes in.
    pub interactive: bool,
}

/// A disk-service session as the root set it up (`nul_rt::blk`).
pub struct Session {
    /// The ring region.
    pub ring: &'static [core::sync::atomic::AtomicU32],
    /// The bounce area: the pool after guest RAM (data-area offset = guest RAM size).
    pub bounce: GuestRam,
}

/// The doorbell: an `up` of the disk service's wake semaphore.
struct Bell;

impl peregrine_vmm::virtio::session::Doorbell for Bell {
    fn ring_doorbell(&mut self) {
        let _ = hc::sm_up(nul_rt::blk::VMM_DOORBELL_SEL);
    }
}

/// The guest's virtio-blk on session `s` (guest RAM of `ram_len` bytes).
fn session_disk(s: Session, ram_len: u64) -> Result<PcDisk, Error> {
    use peregrine_vmm::virtio::async_block::AsyncBlock;
    use peregrine_vmm::virtio::session::{DataArea, SessionBackend};
    let layout = peregrine_blkproto::Layout::new(nul_rt::blk::RING_ENTRIES)
        .ok_or(Error::Session("layout"))?;
    let area = DataArea {
        ram_len,
        bounce_base: ram_len,
        bounce_len: s.bounce.size(),
        bounce: s.bounce,
    };
    let backend = SessionBackend::new(s.ring, layout, area, Bell)
        .map_err(|_| Error::Session("the service's ring header is not usable"))?;
    Ok(PcDisk::Device(alloc::boxed::Box::new(AsyncBlock::new(
        backend,
        false,
        b"peregrine-session",
    ))))
}

/// The disk's completion thread: on each signal of the service, completes what it
/// answered and raises the disk's interrupt (which kicks the vCPU).
extern "C" fn completion_thread(_arg: u64, _utcb: u64) -> ! {
    loop {
        let _ = hc::sm_down(nul_rt::blk::VMM_COMPLETION_SEL, false, 0);
        let Some(vm) = VM.get() else { continue };
        if let Guest::Linux(pc) = &vm.machine {
            pc.disk_completions();
        }
    }
}

/// What [`create`] needs.
pub struct Params<'a> {
    /// The guest's ELF image, or the Linux kernel's bzImage.
    pub image: &'a [u8],
    /// Set for a Linux guest.
    pub linux: Option<LinuxParams<'a>>,
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
    /// The Linux PC could not be built.
    Pc(peregrine_vmm::pc::PcError),
    /// The disk session is not usable.
    Session(&'static str),
    /// QEMU's test devices could not be added to the PC.
    Devices(peregrine_vmm::pc::QemuDevicesError),
    /// A hypercall failed: which, and its status.
    Kernel(&'static str, Status),
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Load(e) => write!(f, "guest image: {}", e),
            Error::Boot(e) => write!(f, "entry tables: {}", e),
            Error::Pc(e) => write!(f, "{}", e),
            Error::Session(why) => write!(f, "disk session: {}", why),
            Error::Devices(e) => write!(f, "QEMU's test devices: {:?}", e),
            Error::Kernel(what, s) => write!(f, "cannot {}: {:?}", what, s),
        }
    }
}

fn kernel(what: &'static str) -> impl Fn(Status) -> Error {
    move |s| Error::Kernel(what, s)
}

fn host_cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    let mut v = [r.eax, r.ebx, r.ecx, r.edx];
    // XSAVE components: only those the host kernel enabled in its XCR0 can be the
    // guest's (the kernel refuses a guest XCR0 beyond them), whatever the CPU supports.
    if leaf == 0xd {
        let host = host_xcr0();
        match sub {
            0 => {
                v[0] &= host as u32;
                v[3] &= (host >> 32) as u32;
                // The largest area the offered components need: the host's current one.
                v[2] = v[1];
            }
            // No XSAVES/XRSTORS (bit 3): supervisor state components (IA32_XSS) are not
            // offered, and VT-x raises #UD for them unless the kernel enabled them.
            1 => v[0] &= !(1 << 3),
            n if n < 64 && host & (1 << n) == 0 => v = [0; 4],
            _ => {}
        }
    }
    v
}

/// The XCR0 the host kernel runs with (x87 and SSE without XSAVE).
fn host_xcr0() -> u64 {
    let c = core::arch::x86_64::__cpuid(1);
    if c.ecx & (1 << 27) == 0 {
        return 3;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: CPUID.1:ECX.OSXSAVE says CR4.OSXSAVE is set, so xgetbv is allowed at any
    // privilege level; it reads XCR0 and touches nothing else.
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    u64::from(lo) | u64::from(hi) << 32
}

/// Kernel-memory quota of the VM PD: nested page tables for the RAM (4-KiB pages at
/// worst: one table per 2 MiB, plus the upper levels), the mapping-database nodes of
/// the delegated RAM (a page per 16; one node per 4-KiB page at worst, when the pool's
/// physical and virtual alignments differ), its capability-space tables and two pages
/// per vCPU (the vCPU and its VMCB or VMCS).
fn vm_quota(ram: u64, vcpus: u32) -> u64 {
    24 + (ram >> 21) + (ram >> 12).div_ceil(16) + 2 * u64::from(vcpus)
}

/// Loads the guest, creates the VM and starts vCPU 0.
pub fn create(p: Params) -> Result<&'static Vm, Error> {
    let mut ram = p.ram;
    let mut sync = Vec::new();
    for _ in 0..p.vcpus {
        let (wake, timer) = (sel::alloc(), sel::alloc());
        hc::create_sm(wake, sel::OWN_PD, 0).map_err(kernel("create a semaphore"))?;
        hc::create_sm(timer, sel::OWN_PD, 0).map_err(kernel("create a semaphore"))?;
        sync.push(VcpuSync {
            ec: AtomicU64::new(0),
            wake,
            timer,
            halted: AtomicBool::new(false),
            sleeping_until: AtomicU64::new(u64::MAX),
        });
    }
    let sync = Arc::new(Kicker(sync));
    let linux = p.linux.is_some();
    let mut has_session = false;
    let machine = match p.linux {
        None => {
            let entry = peregrine_vmm::loader::load_elf(&mut ram, p.image).map_err(Error::Load)?;
            peregrine_vmm::boot::write_entry_tables(&mut ram).map_err(Error::Boot)?;
            let cfg = Config {
                mode: p.mode,
                vcpus: p.vcpus,
                entry,
            };
            Guest::Test(Machine::new(cfg, GuestConsole { raw: false }, host_cpuid))
        }
        Some(l) => {
            let cfg = PcConfig {
                vcpus: p.vcpus,
                ram: ram.size(),
                tsc_hz: p.tsc_khz * 1000,
                // 2026-01-01: the VMM has no wall clock of its own yet.
                wall_secs: 1_767_225_600,
            };
            let disk = match l.session {
                Some(s) => Some(session_disk(s, ram.size())?),
                None => l.disk.map(|d| PcDisk::Ram(RamDisk(d))),
            };
            has_session = matches!(disk, Some(PcDisk::Device(_)));
            let console = GuestConsole { raw: l.interactive };
            let clock = Arc::new(TscClock { khz: p.tsc_khz });
            let pc = if l.multiboot {
                let mods: Vec<multiboot::Module> = l
                    .modules
                    .iter()
                    .map(|&(data, cmdline)| multiboot::Module { data, cmdline })
                    .collect();
                let mut pc = Pc::new_multiboot(
                    cfg,
                    &mut ram,
                    p.image,
                    l.cmdline.as_bytes(),
                    &mods,
                    disk,
                    console,
                    clock,
                    sync.clone(),
                    host_cpuid,
                )
                .map_err(Error::Pc)?;
                pc.add_qemu_devices(&QemuDevices::kvm_unit_tests(), ram)
                    .map_err(Error::Devices)?;
                pc
            } else {
                Pc::new(
                    cfg,
                    &mut ram,
                    p.image,
                    l.cmdline.as_bytes(),
                    l.initrd,
                    disk,
                    console,
                    clock,
                    sync.clone(),
                    host_cpuid,
                )
                .map_err(Error::Pc)?
            };
            Guest::Linux(pc)
        }
    };

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
    let mut timer_bases = Vec::new();
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
        let stack = GuardedStack::new(HANDLER_STACK, STACK_FILL)
            .map_err(kernel("guard a handler stack"))?;
        let ec = thread::local_ec_at(cpu, fault_base, stack.top())
            .map_err(kernel("create a handler EC"))?;
        stacks.push(stack);
        let base = sel::alloc_aligned(8);
        for nr in 0..NUM_VCPU_EVENTS {
            hc::create_pt(
                base + nr,
                sel::OWN_PD,
                ec.sel,
                machine.portal_mtd(nr),
                if nr == peregrine_abi::event::vcpu::STARTUP {
                    vm_startup as *const () as u64
                } else {
                    vm_exit as *const () as u64
                },
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
        sync.0[i as usize].ec.store(v, Ordering::Release);
        vlog!("vmm: vCPU {} on cpu {}", i, cpu);
        vcpus.push(Vcpu { ec: v, cpu });
        if linux {
            // The vCPU's timer thread, on its CPU: STARTUP to its own portal, any
            // exception to the handler-fault portals.
            let tbase = sel::alloc_aligned(5);
            for e in 0..NUM_HOST_EVENTS {
                let (mtd, ip) = if e == host::STARTUP {
                    (Mtd::RSP, timer_startup as *const () as u64)
                } else {
                    (
                        Mtd::GPRS | Mtd::RIP_LEN | Mtd::RFLAGS | Mtd::QUAL,
                        handler_fault as *const () as u64,
                    )
                };
                hc::create_pt(tbase + e, sel::OWN_PD, fault_ec.sel, mtd, ip)
                    .map_err(kernel("create a timer portal"))?;
                hc::pt_ctrl(tbase + e, (u64::from(i) << 8) | e)
                    .map_err(kernel("set a portal id"))?;
            }
            timer_bases.push((cpu, tbase));
        }
    }
    vlog!(
        "vmm: {} handler stacks of {} KiB, each above an unmapped guard page",
        stacks.len(),
        HANDLER_STACK / 1024
    );
    let park = sel::alloc();
    hc::create_sm(park, sel::OWN_PD, 0).map_err(kernel("create a semaphore"))?;
    let vm = VM.call_once(|| Vm {
        machine,
        sync,
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
    if let (true, Some(&(cpu, tbase))) = (has_session, timer_bases.first()) {
        // On vCPU 0's CPU, with its timer thread's event portals, on a guarded stack
        // like the exit handlers' (it runs the same device code).
        let stack = GuardedStack::new(HANDLER_STACK, STACK_FILL)
            .map_err(kernel("guard the completion thread's stack"))?;
        // SAFETY: the stack is the thread's own for good (kept in `COMPLETION_STACK`).
        unsafe { thread::thread_on(cpu, tbase, PRIO, completion_thread, 0, stack.top()) }
            .map_err(kernel("start the disk's completion thread"))?;
        COMPLETION_STACK.call_once(|| stack);
    }
    for (i, (cpu, tbase)) in timer_bases.into_iter().enumerate() {
        thread::thread(cpu, tbase, PRIO, timer_thread, i as u64)
            .map_err(kernel("start a timer thread"))?;
    }
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
        if OVERFLOW_SELFTEST.load(Ordering::Relaxed) {
            vlog!(
                "vmm: selftest: overflowing vCPU {}'s handler stack",
                id >> 8
            );
            core::hint::black_box(overflow_the_stack(0));
        }
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
        let n = (id >> 8) as u32;
        // The portal's event and the state it delivered, as the library's typed exit
        // (decoded in each arm, next to the match on it).
        let step = match &vm.machine {
            Guest::Test(m) => {
                let exit = Exit::decode(id & 0xff, p.regs);
                m.handle(&mut p, n, exit)
            }
            Guest::Linux(pc) => {
                let exit = Exit::decode(id & 0xff, p.regs);
                let mut step = pc.handle(&mut p, n, exit);
                if step == Step::Wait {
                    vm.wait(pc, n);
                    pc.wake(&mut p, n);
                    step = Step::Resume;
                }
                vm.poke_timer(pc, n);
                step
            }
        };
        match step {
            Step::Resume | Step::Wait => {}
            Step::Start(n) => vm.start(n),
            Step::Stop => {
                let rip = p.regs.rip;
                p.regs.mtd = Mtd::empty();
                vm.stop(rip);
            }
            Step::End(why) => {
                if matches!(why, End::TripleFault { .. }) {
                    let regs = *p.regs;
                    for line in peregrine_vmm::diag::shutdown_report(&mut p, &regs) {
                        vlog!("vmm: vCPU {} at shutdown: {}", n, line);
                    }
                }
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
        let in_guard = vm
            .stacks
            .get(n)
            .is_some_and(|s| s.guard().contains(&a.qual[1]));
        if vector == host::PF && in_guard {
            vlog!(
                "vmm: vCPU {}'s exit handler overflowed its stack into the guard page at {:#x}",
                n,
                a.qual[1]
            );
        }
        vm.end(End::VmmFault { vector, rip });
        if let Some(s) = vm.stacks.get(n) {
            a.set_rip(park_handler as *const () as u64);
            a.set_gpr(gpr::RSP, s.top());
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
