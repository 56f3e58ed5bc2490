//! `vmm-kvm`: the test guest's machine of the VMM library (`peregrine_vmm::exit::Machine`,
//! the one `nul/vmm` runs on Peregrine) on `/dev/kvm`. By default with no in-kernel
//! irqchip: port I/O and MMIO exits go to the machine's devices, `hlt` to its HLT handler
//! (which injects the wake vector, `KVM_INTERRUPT`); with `--irqchip kernel` KVM's own
//! PIC/IOAPIC/LAPIC (`KVM_CREATE_IRQCHIP`) keep `hlt` and a waker thread wakes it (see
//! [`Irqchip::Kernel`]). The synthetic MSR reaches the machine through an MSR filter
//! (`KVM_CAP_X86_USER_SPACE_MSR`); exceptions a device raises are injected with
//! `KVM_SET_VCPU_EVENTS`; a second vCPU runs in a thread. It prints the guest's console
//! lines and ends with one `vmm-kvm: end …` line; its exit status is the guest's end
//! code (0 = every check passed) or one of `vmm_kvm::STATUS_*`.
//! `vmm-kvm --bochs-shutdown` only writes `Shutdown` to port 0x8900 (ends Bochs).

mod linux;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_enable_cap, kvm_irqchip, kvm_userspace_memory_region, CpuId,
    KVM_CAP_HALT_POLL, KVM_CAP_X86_USER_SPACE_MSR, KVM_IRQCHIP_PIC_MASTER,
    KVM_MSR_EXIT_REASON_FILTER,
};
use kvm_ioctls::{
    Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuExit, VcpuFd, VmFd,
};
use peregrine_vmm::emul::Space;
use peregrine_vmm::exit::{Config as MachineConfig, End, Machine, Step};
use peregrine_vmm::machine::{self, Board, Exit};
use peregrine_vmm::testdev::{self, LineSink, Mode};
use peregrine_vmm::vcpu::{bits, gpr, vector, ArchState, Event, GuestMemory, Platform, Unbacked};
use peregrine_vmm::{boot, loader};
use vmm_kvm::ram::Ram;
use vmm_kvm::state::{self, WriteBack};
use vmm_kvm::{Config, Irqchip, STATUS_ERROR, STATUS_HALTED, STATUS_SHUTDOWN, STATUS_TIMEOUT};

/// `KVM_INTERRUPT` = `_IOW(KVMIO, 0x86, struct kvm_interrupt)` (not wrapped by
/// kvm-ioctls).
const KVM_INTERRUPT: libc::c_ulong = 0x4004_ae86;
/// `KVM_EXIT_INTERNAL_ERROR` suberror: KVM's instruction emulator gave up.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Exits that reached user space, by kind, for the closing line.
static COUNTS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
const COUNT_NAMES: [&str; 6] = [
    "io",
    "mmio",
    "msr",
    "hlt",
    "exceptions",
    "emulation failures",
];
const IO: usize = 0;
const MMIO: usize = 1;
const MSR: usize = 2;
const HLT: usize = 3;
const EXCEPTION: usize = 4;
const EMULATION: usize = 5;

fn count(kind: usize) -> u64 {
    COUNTS[kind].fetch_add(1, Ordering::Relaxed) + 1
}

/// KVM's supported CPUID: the "host" the machine builds its CPUID answers on.
static SUPPORTED: OnceLock<Vec<kvm_cpuid_entry2>> = OnceLock::new();

/// The machine's host CPUID (a plain `fn`, as the library takes it).
fn host_cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    state::lookup(SUPPORTED.get().map_or(&[], Vec::as_slice), leaf, sub)
}

/// Guest console lines, to standard output.
struct Stdout;

impl LineSink for Stdout {
    fn line(&mut self, line: &[u8]) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(line);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }
}

/// What all vCPU threads share.
struct Shared {
    config: Config,
    machine: Machine,
    ram: Ram,
    start: Instant,
    /// vCPUs created but not started yet.
    idle: Mutex<Vec<Option<VcpuFd>>>,
}

impl Shared {
    /// Ends the process with one closing line.
    fn end(&self, status: u8, why: &str) -> ! {
        end_line(status, why, self.machine.core().exits())
    }

    /// Ends the process for the machine's `end`.
    fn end_with(&self, end: &End) -> ! {
        self.end(vmm_kvm::status(end), &end.to_string())
    }
}

/// Ends the process with one closing line: why, the status, the exits by kind, and how
/// many of them the machine's exit handler took (`handled`).
fn end_line(status: u8, why: &str, handled: u64) -> ! {
    let counts: Vec<String> = COUNT_NAMES
        .iter()
        .zip(&COUNTS)
        .map(|(n, c)| format!("{n} {}", c.load(Ordering::Relaxed)))
        .collect();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "vmm-kvm: end {why} (status {status}; exits in user space: {}; handled by the \
         machine: {handled})",
        counts.join(", "),
    );
    let _ = out.flush();
    std::process::exit(status.into())
}

/// One vCPU's register file as the machine's handlers see it: filled from the exit,
/// written back by what they recorded in its MTD.
struct HostVcpu<'a> {
    regs: ArchState,
    ram: &'a Ram,
    start: &'a Instant,
}

impl<'a> HostVcpu<'a> {
    /// An empty register file over the VM's `ram`, its clock started at `start`.
    fn new(ram: &'a Ram, start: &'a Instant) -> Self {
        HostVcpu {
            regs: ArchState::default(),
            ram,
            start,
        }
    }
}

impl GuestMemory for HostVcpu<'_> {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), Unbacked> {
        self.ram.read_at(gpa, buf)
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Unbacked> {
        self.ram.write_at(gpa, buf)
    }
}

impl Platform for HostVcpu<'_> {
    fn regs(&self) -> &ArchState {
        &self.regs
    }

    fn regs_mut(&mut self) -> &mut ArchState {
        &mut self.regs
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn set_timer(&mut self, _deadline_ns: Option<u64>) {
        // The test machine arms no timer.
    }
}

/// Writes `Shutdown` to Bochs's port 0x8900 (nothing there elsewhere): how
/// the baseline's Linux ends a Bochs run.
fn bochs_shutdown() -> ExitCode {
    const PORT: u16 = 0x8900;
    // SAFETY: ioperm(2) only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(PORT.into(), 1, 1) } != 0 {
        eprintln!("vmm-kvm: ioperm: {}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    for b in b"Shutdown" {
        // SAFETY: the port was granted above; writing it has no effect on this process.
        unsafe {
            std::arch::asm!("out dx, al", in("dx") PORT, in("al") *b,
                            options(nomem, nostack));
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--bochs-shutdown") {
        return bochs_shutdown();
    }
    let config = match vmm_kvm::parse_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm-kvm: {e}");
            return ExitCode::from(2);
        }
    };
    let result = if config.linux.is_some() {
        linux::run(config)
    } else {
        run(config)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("vmm-kvm: end error: {e}");
            ExitCode::from(STATUS_ERROR)
        }
    }
}

/// A VM with `ram` as its memory (slot 0 from guest-physical 0; the caller keeps `ram`,
/// and with it the mapping, until the process ends) and KVM's supported CPUID, which
/// [`host_cpuid`] answers from now on.
fn new_vm(ram: &Ram) -> Result<(VmFd, Vec<kvm_cpuid_entry2>), Error> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let vm = kvm.create_vm()?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_base()? as u64,
    };
    // SAFETY: the region is `ram`'s one mapping, which the caller keeps until the
    // process ends.
    unsafe { vm.set_user_memory_region(region)? };
    let supported = kvm.get_supported_cpuid(256)?.as_slice().to_vec();
    let _ = SUPPORTED.set(supported.clone());
    Ok((vm, supported))
}

fn run(config: Config) -> Result<(), Error> {
    let file = std::fs::read(&config.guest).map_err(|e| format!("{}: {e}", config.guest))?;
    let mut ram = Ram::new(config.memory_mib << 20)?;
    let entry = loader::load_elf(&mut ram, &file).map_err(|e| format!("the guest: {e:?}"))?;
    boot::write_entry_tables(&mut ram).map_err(|e| format!("entry tables: {e:?}"))?;
    let (vm, supported) = new_vm(&ram)?;
    msr_filter(&vm);
    if config.irqchip == Irqchip::Kernel {
        in_kernel_irqchip(&vm)?;
    }
    let machine = Machine::new(
        MachineConfig {
            mode: config.mode,
            vcpus: config.cpus,
            entry,
        },
        Stdout,
        host_cpuid,
    );
    let mut vcpus = Vec::new();
    for id in 0..config.cpus {
        let vcpu = vm.create_vcpu(id.into())?;
        let table = state::cpuid_table(&supported, |leaf, sub| {
            if state::HYPERVISOR_LEAVES.contains(&leaf) {
                // KVM's own signature: its kernel, not the machine, answers VMCALL here.
                return state::lookup(&supported, leaf, sub);
            }
            machine.cpuid(&ArchState::default(), id, leaf, sub)
        });
        let cpuid = CpuId::from_entries(&table).map_err(|e| format!("cpuid: {e:?}"))?;
        vcpu.set_cpuid2(&cpuid)?;
        vcpus.push(Some(vcpu));
    }
    let boot = vcpus[0].take().ok_or("no vCPU 0")?;
    let shared = Arc::new(Shared {
        config,
        machine,
        ram,
        start: Instant::now(),
        idle: Mutex::new(vcpus),
    });
    if shared.config.timeout_s > 0 {
        let s = shared.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(s.config.timeout_s));
            s.end(STATUS_TIMEOUT, "timeout");
        });
    }
    startup(&boot, &shared, 0)?;
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
/// master PIC as the guest would, had it a PIC driver: IRQ 0 edge-triggered at the wake
/// vector, the others masked, auto-EOI (the guest's wake handler sends no EOI). vCPU 0's
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
        println!("vmm-kvm: KVM_CAP_HALT_POLL: {e} (halt polling stays on)");
    }
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)?;
    // SAFETY: KVM_GET_IRQCHIP with chip_id PIC_MASTER filled the union's `pic` member.
    let mut pic = unsafe { chip.chip.pic };
    pic.irq_base = testdev::WAKE_VECTOR;
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
/// it with the wake vector, as the machine's HLT handler does without an in-kernel
/// irqchip. It yields between looks, so on one CPU it runs only when the vCPU thread
/// does not, and raises no interrupt while the guest runs with interrupts disabled.
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

/// Sends `rdmsr`/`wrmsr` of the contract's MSR to user space; says so when KVM cannot.
fn msr_filter(vm: &VmFd) {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [KVM_MSR_EXIT_REASON_FILTER.into(), 0, 0, 0],
        ..Default::default()
    };
    let deny = [0u8; 1];
    let range = MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base: testdev::TEST_MSR,
        msr_count: 1,
        bitmap: &deny,
    };
    if let Err(e) = vm
        .enable_cap(&cap)
        .and_then(|()| vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range]))
    {
        println!(
            "vmm-kvm: no user-space MSR filter ({e}): MSR {:#x} raises #GP",
            testdev::TEST_MSR
        );
    }
}

/// vCPU `index`'s entry state, from the machine's STARTUP handler.
fn startup(vcpu: &VcpuFd, shared: &Shared, index: u32) -> Result<(), Error> {
    let mut p = HostVcpu::new(&shared.ram, &shared.start);
    match machine::handle(&shared.machine, &mut p, index, Exit::Startup) {
        Step::Resume => write_back(vcpu, std::ptr::null_mut(), &p.regs, false),
        other => Err(format!("STARTUP of vCPU {index}: {other:?}").into()),
    }
}

/// Writes what the handler recorded in `r`'s MTD into the vCPU (see [`WriteBack`]);
/// `completed`: KVM already finished the exit's instruction. `run` (the vCPU's
/// `kvm_run`, or null before it first runs) takes the interrupt-window request.
fn write_back(
    vcpu: &VcpuFd,
    run: *mut kvm_bindings::kvm_run,
    r: &ArchState,
    completed: bool,
) -> Result<(), Error> {
    let w = WriteBack::of(r, completed);
    if !run.is_null() {
        // SAFETY: a non-null `run` is this vCPU's kvm_run mapping, which lives as long
        // as `vcpu`; the field is plain data KVM reads at the next KVM_RUN.
        unsafe { (*run).request_interrupt_window = w.window.into() };
    }
    if w.regs {
        let mut k = state::regs_to_kvm(r);
        if completed {
            // Only the handler's results: RIP stays where KVM put it.
            k.rip = vcpu.get_regs()?.rip;
        }
        vcpu.set_regs(&k)?;
    }
    if w.sregs {
        let mut s = vcpu.get_sregs()?;
        state::sregs_to_kvm(r, &mut s);
        vcpu.set_sregs(&s)?;
    }
    if let Some(v) = w.xcr0 {
        let mut x = kvm_bindings::kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        x.xcrs[0].value = v;
        vcpu.set_xcrs(&x)?;
    }
    if let Some(v) = w.pat {
        const MSR_PAT: u32 = 0x277;
        let msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: MSR_PAT,
            data: v,
            ..Default::default()
        }])
        .map_err(|e| format!("msrs: {e:?}"))?;
        vcpu.set_msrs(&msrs)?;
    }
    match w.event {
        None => Ok(()),
        Some(Event::Interrupt(v)) => interrupt(vcpu, v),
        Some(Event::Nmi) => Ok(vcpu.nmi()?),
        Some(Event::Exception { vector, error }) => exception(vcpu, vector, error),
    }
}

/// Queues exception `vector` (with `error` code, if any) before the guest's next
/// instruction. An exit's pending instruction (a port or MMIO access) is completed
/// first by the caller ([`complete`]).
fn exception(vcpu: &VcpuFd, vector: u8, error: Option<u32>) -> Result<(), Error> {
    count(EXCEPTION);
    let mut events = vcpu.get_vcpu_events()?;
    events.exception.injected = 1;
    events.exception.nr = vector;
    events.exception.has_error_code = error.is_some().into();
    events.exception.error_code = error.unwrap_or(0);
    vcpu.set_vcpu_events(&events)?;
    Ok(())
}

/// Completes the instruction of the last exit (`KVM_RUN` with `immediate_exit`: KVM
/// finishes a pending port or MMIO access, then returns at once).
fn complete(vcpu: &mut VcpuFd) -> Result<(), Error> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        other => Ok(other?),
    }
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
    startup(&vcpu, shared, n)?;
    let s = shared.clone();
    std::thread::spawn(move || {
        if let Err(e) = vcpu_loop(vcpu, n, &s) {
            s.end(STATUS_ERROR, &format!("error on vCPU {n}: {e}"));
        }
    });
    Ok(())
}

/// What [`serve`] did with an exit.
enum Served<'a> {
    /// The board served it: the step it asked for; `pending`: KVM still has to complete
    /// the exit's access (an exception must wait for it, [`complete`]).
    Step {
        /// The board's step.
        step: Step,
        /// An access is pending.
        pending: bool,
    },
    /// The VM ends: the exit status and why.
    End(u8, String),
    /// An exit for the caller.
    Other(VcpuExit<'a>),
}

/// Serves what `KVM_RUN` returned as every machine answers it on KVM: port I/O and MMIO,
/// decoded by KVM, go to the board's devices ([`machine::access`]); HLT and the MSRs KVM
/// hands to user space go through the board's handler on `p`'s register file (RFLAGS'
/// IF from KVM; RCX, EDX:EAX), whose MSR refusal KVM turns into #GP; a signal
/// (`EINTR`) is served as nothing; a triple fault or a failed entry end the VM. After an
/// MSR exit `p` holds nothing but RFLAGS again: the instruction is KVM's to finish.
fn serve<'a, B: Board>(
    b: &B,
    p: &mut HostVcpu<'_>,
    n: u32,
    run: *mut kvm_bindings::kvm_run,
    exit: Result<VcpuExit<'a>, kvm_ioctls::Error>,
) -> Result<Served<'a>, Error> {
    let exit = match exit {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            return Ok(Served::Step {
                step: Step::Resume,
                pending: false,
            })
        }
        Err(e) => return Err(format!("KVM_RUN: {e}").into()),
    };
    let (step, pending) = match exit {
        VcpuExit::Hlt => {
            count(HLT);
            // SAFETY: `run` is this vCPU's mapped kvm_run; `if_flag` is plain data.
            let interrupts = unsafe { (*run).if_flag } != 0;
            p.regs.rflags = 2 | if interrupts { bits::IF } else { 0 };
            (machine::handle(b, p, n, Exit::Hlt), false)
        }
        VcpuExit::Shutdown => {
            let why = format!("vCPU {n} shut down (triple fault)");
            return Ok(Served::End(STATUS_SHUTDOWN, why));
        }
        VcpuExit::FailEntry(reason, cpu) => {
            let why = format!("vCPU {n}: entry failed, reason {reason:#x} on CPU {cpu}");
            return Ok(Served::End(STATUS_ERROR, why));
        }
        VcpuExit::IoOut(port, data) => {
            count(IO);
            // SAFETY: `run` is this vCPU's mapped kvm_run; after an I/O exit its union
            // holds `io` (the element size is read, not the data).
            let size = usize::from(unsafe { (*run).__bindgen_anon_1.io.size });
            // OUTS with a REP prefix arrives as `count` elements: one access each.
            let mut action = None;
            for element in data.chunks(size.max(1)) {
                let mut d = [0u8; 4];
                let d = &mut d[..element.len().min(4)];
                d.copy_from_slice(&element[..d.len()]);
                action = machine::access(b, n, Space::Port, port.into(), d, true).or(action);
            }
            (machine::act(b, p, action), true)
        }
        VcpuExit::IoIn(port, data) => {
            count(IO);
            // SAFETY: as above.
            let size = usize::from(unsafe { (*run).__bindgen_anon_1.io.size });
            for element in data.chunks_mut(size.max(1)) {
                machine::access(b, n, Space::Port, port.into(), element, false);
            }
            (Step::Resume, false)
        }
        VcpuExit::MmioRead(addr, data) => {
            count(MMIO);
            machine::access(b, n, Space::Mmio, addr, data, false);
            (Step::Resume, false)
        }
        VcpuExit::MmioWrite(addr, data) => {
            count(MMIO);
            let mut d = [0u8; 8];
            let d = &mut d[..data.len().min(8)];
            d.copy_from_slice(&data[..d.len()]);
            let action = machine::access(b, n, Space::Mmio, addr, d, true);
            (machine::act(b, p, action), true)
        }
        VcpuExit::X86Rdmsr(exit) => {
            count(MSR);
            p.regs.set_gpr(gpr::RCX, exit.index.into());
            let step = machine::handle(b, p, n, Exit::Rdmsr);
            if state::decode_event(&p.regs).is_some() {
                *exit.error = 1;
            } else {
                let r = &p.regs.gpr;
                *exit.data = (r[gpr::RDX] << 32) | (r[gpr::RAX] & 0xffff_ffff);
            }
            p.regs = rflags_only(&p.regs);
            (step, false)
        }
        VcpuExit::X86Wrmsr(exit) => {
            count(MSR);
            p.regs.set_gpr(gpr::RCX, exit.index.into());
            p.regs.set_gpr(gpr::RAX, exit.data & 0xffff_ffff);
            p.regs.set_gpr(gpr::RDX, exit.data >> 32);
            let step = machine::handle(b, p, n, Exit::Wrmsr);
            if state::decode_event(&p.regs).is_some() {
                *exit.error = 1;
            }
            p.regs = rflags_only(&p.regs);
            (step, false)
        }
        other => return Ok(Served::Other(other)),
    };
    Ok(Served::Step { step, pending })
}

/// A register file with `r`'s RFLAGS (what injection decides on) and nothing recorded.
fn rflags_only(r: &ArchState) -> ArchState {
    ArchState {
        rflags: r.rflags,
        ..ArchState::default()
    }
}

/// Runs vCPU `index` until the VM ends.
fn vcpu_loop(mut vcpu: VcpuFd, index: u32, shared: &Arc<Shared>) -> Result<(), Error> {
    let m = &shared.machine;
    let run = vcpu.get_kvm_run() as *mut kvm_bindings::kvm_run;
    loop {
        let mut p = HostVcpu::new(&shared.ram, &shared.start);
        let (step, pending) = match serve(m, &mut p, index, run, vcpu.run())? {
            Served::Step { step, pending } => (step, pending),
            Served::End(status, why) => shared.end(status, &why),
            Served::Other(VcpuExit::InternalError) => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the union holds `internal`.
                let sub = unsafe { (*run).__bindgen_anon_1.internal.suberror };
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                if sub != KVM_INTERNAL_ERROR_EMULATION
                    || !matches!(shared.config.mode, Mode::Hostile(_))
                {
                    shared.end(
                        STATUS_ERROR,
                        &format!("vCPU {index}: KVM internal error, suberror {sub} at {rip:#x}"),
                    )
                }
                // What KVM's emulator cannot do (random code touching MMIO), a hostile
                // guest gets as #UD, as from the machine's own emulator on Peregrine.
                if count(EMULATION) <= 3 {
                    println!("vmm-kvm: vCPU {index}: KVM cannot emulate at {rip:#x}: #UD");
                }
                p.inject(Event::Exception {
                    vector: vector::UD,
                    error: None,
                });
                (Step::Resume, false)
            }
            Served::Other(other) => {
                let what = format!("{other:?}");
                shared.end(
                    STATUS_ERROR,
                    &format!("vCPU {index}: unexpected exit {what}"),
                )
            }
        };
        if pending && state::decode_event(&p.regs).is_some() {
            complete(&mut vcpu)?;
        }
        write_back(&vcpu, run, &p.regs, true)?;
        match step {
            Step::Resume => {}
            Step::Start(n) => start_cpu(shared, n)?,
            Step::Stop if index == 0 => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                shared.end(STATUS_HALTED, &End::HaltForever { rip }.to_string())
            }
            Step::Stop => loop {
                // A secondary vCPU that is done: nothing wakes it.
                std::thread::park();
            },
            Step::Wait => return Err("the test machine asked to wait for an interrupt".into()),
            Step::End(end) => shared.end_with(&end),
        }
    }
}
