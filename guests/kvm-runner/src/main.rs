//! `kvm-runner`: runs the test guest (`guests/test`, contract in `guests/README.md`) on
//! `/dev/kvm`, by default with no in-kernel irqchip: port I/O and MMIO exits go to
//! [`kvm_runner::platform`], `hlt` is ended by injecting vector 0x30 (`KVM_INTERRUPT`);
//! with `--irqchip kernel` KVM's own PIC/IOAPIC/LAPIC (`KVM_CREATE_IRQCHIP`) handle
//! `hlt` and a waker thread wakes it (see [`Irqchip::Kernel`]),
//! MSR 0x4000_0200 reaches user space through an MSR filter
//! (`KVM_CAP_X86_USER_SPACE_MSR`), #GP is injected with `KVM_SET_VCPU_EVENTS`, a second
//! vCPU runs in a thread. It prints the guest's console lines and ends with one
//! `runner: end …` line; its exit status is the guest's end code (0 = every check
//! passed), 124 at the time limit, 125 on a runner error, 126 on a triple fault, 127
//! when the boot vCPU halted with interrupts disabled. `kvm-runner --bochs-shutdown`
//! only writes `Shutdown` to port 0x8900 (ends Bochs).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{
    kvm_enable_cap, kvm_irqchip, kvm_regs, kvm_segment, kvm_userspace_memory_region, CpuId,
    KVM_CAP_HALT_POLL, KVM_CAP_X86_USER_SPACE_MSR, KVM_IRQCHIP_PIC_MASTER,
    KVM_MSR_EXIT_REASON_FILTER,
};
use kvm_ioctls::{
    Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuExit, VcpuFd, VmFd,
};
use kvm_runner::platform::{Platform, Request, MSR_SYNTH, VECTOR_WAKE};
use kvm_runner::{elf, layout, Config, Irqchip, Mode};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Exit status at the time limit.
const STATUS_TIMEOUT: u8 = 124;
/// Exit status on a runner error.
const STATUS_ERROR: u8 = 125;
/// Exit status on a triple fault.
const STATUS_SHUTDOWN: u8 = 126;
/// Exit status when the boot vCPU halted for good.
const STATUS_HALTED: u8 = 127;

/// `KVM_INTERRUPT` = `_IOW(KVMIO, 0x86, struct kvm_interrupt)` (not wrapped by
/// kvm-ioctls).
const KVM_INTERRUPT: libc::c_ulong = 0x4004_ae86;
/// `KVM_EXIT_INTERNAL_ERROR` suberror: KVM's instruction emulator gave up.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Exits handled in user space, by kind, for the closing line.
static COUNTS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
const COUNT_NAMES: [&str; 6] = ["io", "mmio", "msr", "hlt", "gp", "emulation failures"];

fn count(kind: usize) {
    COUNTS[kind].fetch_add(1, Ordering::Relaxed);
}

/// What all vCPU threads share.
struct Shared {
    config: Config,
    entry: u64,
    platform: Mutex<Platform<std::io::Stdout>>,
    /// vCPUs created but not started yet.
    idle: Mutex<Vec<Option<VcpuFd>>>,
}

impl Shared {
    /// Ends the process with one closing line.
    fn end(&self, status: u8, why: &str) -> ! {
        let mut p = self.platform.lock().unwrap_or_else(|e| e.into_inner());
        p.flush_console();
        let counts: Vec<String> = COUNT_NAMES
            .iter()
            .zip(&COUNTS)
            .map(|(n, c)| format!("{n} {}", c.load(Ordering::Relaxed)))
            .collect();
        let _ = writeln!(
            p.out(),
            "runner: end {why} (status {status}; user-space exits: {})",
            counts.join(", ")
        );
        let _ = p.out().flush();
        std::process::exit(status.into())
    }
}

/// Bochs's shutdown port: writing `Shutdown` there ends Bochs.
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

/// Writes `Shutdown` to Bochs's port 0x8900 (nothing there elsewhere): how the
/// baseline's Linux ends a Bochs run.
fn bochs_shutdown() -> ExitCode {
    // SAFETY: ioperm(2) only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(BOCHS_SHUTDOWN_PORT.into(), 1, 1) } != 0 {
        eprintln!("kvm-runner: ioperm: {}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    for b in b"Shutdown" {
        // SAFETY: the port was granted above; writing it has no effect on this process.
        unsafe {
            std::arch::asm!("out dx, al", in("dx") BOCHS_SHUTDOWN_PORT, in("al") *b,
                            options(nomem, nostack));
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--bochs-shutdown") {
        return bochs_shutdown();
    }
    let config = match kvm_runner::parse_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvm-runner: {e}");
            return ExitCode::from(2);
        }
    };
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("runner: end error: {e}");
            ExitCode::from(STATUS_ERROR)
        }
    }
}

fn run(config: Config) -> Result<(), Error> {
    let file = std::fs::read(&config.guest).map_err(|e| format!("{}: {e}", config.guest))?;
    let ram = config.memory_mib << 20;
    let image = elf::parse(&file, ram)?;
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let vm = kvm.create_vm()?;
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram as usize)])?;
    let host = memory.get_host_address(GuestAddress(0))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram,
        userspace_addr: host as u64,
    };
    // SAFETY: the region is `memory`'s one mapping of `ram` bytes, which lives until the
    // process ends (it is leaked below).
    unsafe { vm.set_user_memory_region(region)? };
    for s in &image.segments {
        memory.write_slice(s.data, GuestAddress(s.paddr))?;
    }
    for (at, bytes) in layout::tables() {
        memory.write_slice(&bytes, GuestAddress(at))?;
    }
    std::mem::forget(memory);
    msr_filter(&vm);
    if config.irqchip == Irqchip::Kernel {
        in_kernel_irqchip(&vm)?;
    }
    let cpuid = kvm.get_supported_cpuid(256)?;
    let mut vcpus = Vec::new();
    for id in 0..config.cpus {
        let vcpu = vm.create_vcpu(id.into())?;
        vcpu.set_cpuid2(&vcpu_cpuid(&cpuid, id)?)?;
        vcpus.push(Some(vcpu));
    }
    let boot = vcpus[0].take().expect("vCPU 0");
    let shared = Arc::new(Shared {
        entry: image.entry,
        config,
        platform: Mutex::new(Platform::new(std::io::stdout())),
        idle: Mutex::new(vcpus),
    });
    if shared.config.timeout_s > 0 {
        let s = shared.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(s.config.timeout_s));
            s.end(STATUS_TIMEOUT, "timeout");
        });
    }
    entry_state(&boot, &shared, 0)?;
    if shared.config.irqchip == Irqchip::Kernel {
        // vCPU 0 runs on this thread.
        // SAFETY: gettid(2) has no preconditions.
        start_waker(Arc::new(vm), unsafe { libc::gettid() });
    }
    vcpu_loop(boot, 0, &shared)
}

/// IRQ 0 of the in-kernel PIC: the waker's line.
const WAKE_IRQ: u32 = 0;

/// Creates KVM's in-kernel PIC, IOAPIC and LAPICs (before any vCPU) and programs the
/// master PIC as the guest would, had it a PIC driver: IRQ 0 edge-triggered at vector
/// 0x30, the others masked, auto-EOI (the guest's 0x30 handler sends no EOI). vCPU 0's
/// LAPIC passes PIC interrupts through (KVM resets the BSP's LVT0 to ExtINT). No PIT: the
/// guest uses no timer. Halt polling is off, so a halted vCPU blocks at once instead of
/// spinning for up to `halt_poll_ns` of the L1 clock.
fn in_kernel_irqchip(vm: &VmFd) -> Result<(), Error> {
    vm.create_irq_chip()
        .map_err(|e| format!("KVM_CREATE_IRQCHIP: {e}"))?;
    let no_poll = kvm_enable_cap {
        cap: KVM_CAP_HALT_POLL,
        ..Default::default()
    };
    if let Err(e) = vm.enable_cap(&no_poll) {
        println!("runner: KVM_CAP_HALT_POLL: {e} (halt polling stays on)");
    }
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)?;
    // SAFETY: KVM_GET_IRQCHIP with chip_id PIC_MASTER filled the union's `pic` member.
    let mut pic = unsafe { chip.chip.pic };
    pic.irq_base = VECTOR_WAKE;
    pic.imr = !(1 << WAKE_IRQ);
    pic.auto_eoi = 1;
    pic.elcr = 0;
    pic.init_state = 0;
    pic.irr = 0;
    pic.isr = 0;
    chip.chip.pic = pic;
    vm.set_irqchip(&chip)?;
    Ok(())
}

/// Whether the thread whose `/proc/self/task/<tid>/stat` is `stat` is asleep (state
/// `S`: a vCPU thread blocked in `hlt` inside KVM).
fn sleeping(stat: &str) -> bool {
    std::fs::read_to_string(stat)
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('S'))
        })
        .unwrap_or(false)
}

/// The in-kernel irqchip's waker: whenever the vCPU thread `tid` is asleep (blocked in
/// `hlt`: nothing else in the guest's benchmark sleeps), an edge on [`WAKE_IRQ`] wakes
/// it with vector 0x30, as the runner's `KVM_INTERRUPT` does without an in-kernel
/// irqchip. It yields between looks, so on one CPU it runs only when the vCPU thread does
/// not, and raises no interrupt while the guest runs with interrupts disabled.
fn start_waker(vm: Arc<VmFd>, tid: libc::pid_t) {
    let stat = format!("/proc/self/task/{tid}/stat");
    std::thread::spawn(move || loop {
        if sleeping(&stat) {
            let _ = vm.set_irq_line(WAKE_IRQ, true);
            let _ = vm.set_irq_line(WAKE_IRQ, false);
        }
        // SAFETY: sched_yield(2) has no preconditions.
        unsafe { libc::sched_yield() };
    });
}

/// Sends `rdmsr`/`wrmsr` of MSR 0x4000_0200 to user space; says so when KVM cannot.
fn msr_filter(vm: &VmFd) {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [KVM_MSR_EXIT_REASON_FILTER.into(), 0, 0, 0],
        ..Default::default()
    };
    let deny = [0u8; 1];
    let range = MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base: MSR_SYNTH,
        msr_count: 1,
        bitmap: &deny,
    };
    if let Err(e) = vm
        .enable_cap(&cap)
        .and_then(|()| vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range]))
    {
        println!("runner: no user-space MSR filter ({e}): MSR {MSR_SYNTH:#x} raises #GP");
    }
}

/// KVM's supported CPUID with vCPU `id`'s APIC ID in leaf 1.
fn vcpu_cpuid(supported: &CpuId, id: u32) -> Result<CpuId, Error> {
    let mut entries = supported.as_slice().to_vec();
    for e in &mut entries {
        if e.function == 1 {
            e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24);
        }
    }
    Ok(CpuId::from_entries(&entries).map_err(|e| format!("cpuid: {e:?}"))?)
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The contract's entry state for vCPU `index`.
fn entry_state(vcpu: &VcpuFd, shared: &Shared, index: u32) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs = segment(layout::CODE_SEL, 0xb, true);
    let data = segment(layout::DATA_SEL, 0x3, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        limit: 0x67,
        g: 0,
        s: 0,
        db: 0,
        ..segment(layout::TSS_SEL, 0xb, false)
    };
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (layout::GDT_ENTRIES.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = layout::CR0;
    sregs.cr3 = layout::PML4;
    sregs.cr4 = layout::CR4;
    sregs.efer = layout::EFER;
    vcpu.set_sregs(&sregs)?;
    let c = &shared.config;
    vcpu.set_regs(&kvm_regs {
        rip: shared.entry,
        rflags: layout::RFLAGS,
        rdi: index.into(),
        rsi: c.mode.rsi(),
        rdx: c.cpus.into(),
        rcx: c.seed,
        ..Default::default()
    })?;
    Ok(())
}

/// Starts vCPU `n` in a thread, if it exists and is not running.
fn start_cpu(shared: &Arc<Shared>, n: u32) -> Result<(), Error> {
    let vcpu = shared
        .idle
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(n as usize)
        .and_then(Option::take);
    let Some(vcpu) = vcpu else {
        return Ok(());
    };
    entry_state(&vcpu, shared, n)?;
    let s = shared.clone();
    std::thread::spawn(move || {
        if let Err(e) = vcpu_loop(vcpu, n, &s) {
            s.end(STATUS_ERROR, &format!("error on vCPU {n}: {e}"));
        }
    });
    Ok(())
}

/// Injects exception `vector` (with `error` code, if any) before the guest's next
/// instruction: completes a pending port write first (`KVM_RUN` with
/// `immediate_exit`), then queues the exception.
fn inject_exception(vcpu: &mut VcpuFd, vector: u8, error: Option<u32>) -> Result<(), Error> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() == libc::EINTR => {}
        other => other?,
    }
    let mut events = vcpu.get_vcpu_events()?;
    events.exception.injected = 1;
    events.exception.nr = vector;
    events.exception.has_error_code = error.is_some().into();
    events.exception.error_code = error.unwrap_or(0);
    vcpu.set_vcpu_events(&events)?;
    Ok(())
}

/// Queues external interrupt `vector` (`KVM_INTERRUPT`, user-space irqchip).
fn interrupt(vcpu: &VcpuFd, vector: u8) -> Result<(), Error> {
    let irq: u32 = vector.into();
    // SAFETY: KVM_INTERRUPT reads one `struct kvm_interrupt` (a u32) from the pointer,
    // which is valid for the call; the fd is a vCPU fd.
    let r = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_INTERRUPT, &irq as *const u32) };
    if r < 0 {
        return Err(format!("KVM_INTERRUPT: {}", std::io::Error::last_os_error()).into());
    }
    Ok(())
}

/// Runs vCPU `index` until the VM ends.
fn vcpu_loop(mut vcpu: VcpuFd, index: u32, shared: &Arc<Shared>) -> Result<(), Error> {
    let run = vcpu.get_kvm_run() as *mut kvm_bindings::kvm_run;
    let platform = || shared.platform.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let mut request = Request::None;
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                count(0);
                // SAFETY: `run` is this vCPU's mapped kvm_run; after an I/O exit its
                // union holds `io` (the element size is read, not the data).
                let size = unsafe { (*run).__bindgen_anon_1.io.size };
                request = platform().io_out(port, size.into(), data);
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                count(0);
                // SAFETY: as above.
                let size = unsafe { (*run).__bindgen_anon_1.io.size };
                platform().io_in(port, size.into(), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                count(1);
                platform().mmio_read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                count(1);
                platform().mmio_write(addr, data);
            }
            Ok(VcpuExit::X86Rdmsr(exit)) => {
                count(2);
                match platform().msr_read(exit.index) {
                    Some(v) => *exit.data = v,
                    None => *exit.error = 1,
                }
            }
            Ok(VcpuExit::X86Wrmsr(exit)) => {
                count(2);
                if !platform().msr_write(exit.index, exit.data) {
                    *exit.error = 1;
                }
            }
            Ok(VcpuExit::Hlt) => {
                count(3);
                // SAFETY: `run` is this vCPU's mapped kvm_run; `if_flag` is plain data.
                let interrupts = unsafe { (*run).if_flag } != 0;
                if interrupts {
                    interrupt(&vcpu, VECTOR_WAKE)?;
                } else if index == 0 {
                    shared.end(STATUS_HALTED, "vCPU 0 halted with interrupts disabled");
                } else {
                    // A secondary vCPU that is done: nothing wakes it.
                    loop {
                        std::thread::park();
                    }
                }
            }
            Ok(VcpuExit::Shutdown) => shared.end(
                STATUS_SHUTDOWN,
                &format!("vCPU {index} shut down (triple fault)"),
            ),
            Ok(VcpuExit::FailEntry(reason, cpu)) => shared.end(
                STATUS_ERROR,
                &format!("vCPU {index}: entry failed, reason {reason:#x} on CPU {cpu}"),
            ),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the union holds `internal`.
                let sub = unsafe { (*run).__bindgen_anon_1.internal.suberror };
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                if sub != KVM_INTERNAL_ERROR_EMULATION || shared.config.mode != Mode::Hostile {
                    shared.end(
                        STATUS_ERROR,
                        &format!("vCPU {index}: KVM internal error, suberror {sub} at {rip:#x}"),
                    )
                }
                // What KVM's emulator cannot do (random code touching MMIO), a hostile
                // guest gets as #UD, as on hardware without the instruction.
                count(5);
                if COUNTS[5].load(Ordering::Relaxed) <= 3 {
                    println!("runner: vCPU {index}: KVM cannot emulate at {rip:#x}: #UD");
                }
                inject_exception(&mut vcpu, 6, None)?;
            }
            Ok(other) => {
                let what = format!("{other:?}");
                shared.end(
                    STATUS_ERROR,
                    &format!("vCPU {index}: unexpected exit {what}"),
                )
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("KVM_RUN: {e}").into()),
        }
        match request {
            Request::None => {}
            Request::InjectGp(code) => {
                count(4);
                inject_exception(&mut vcpu, 13, Some(code))?;
            }
            Request::StartCpu(n) => start_cpu(shared, n)?,
            Request::Exit(code) => {
                let status = match code {
                    0 => 0,
                    c if c & 0xff == 0 => 1,
                    c => (c & 0xff) as u8,
                };
                shared.end(status, &format!("guest code {code}"))
            }
        }
    }
}
