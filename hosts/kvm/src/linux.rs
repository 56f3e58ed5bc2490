//! The library's PC (`peregrine_vmm::pc::Pc`, the machine `nul/vmm` boots Linux on) on
//! `/dev/kvm`, with no in-kernel irqchip: the PC's own PIC, I/O APIC, local APICs,
//! PIT, RTC, HPET, ACPI PM block, COM1 and virtio-blk disk answer the guest, as on
//! Peregrine. KVM keeps what it handles in its kernel (CPUID from the PC's table, the
//! MSRs it knows, kvmclock, VMCALL); MSRs it does not know reach the PC.
//!
//! Interrupts: a local APIC that gets one kicks its vCPU ([`Kick`]): a vCPU waiting in
//! HLT is woken, a running one is made to leave `KVM_RUN` (`immediate_exit` and a
//! signal). After every exit [`Pc::settle`] injects what is pending (`KVM_INTERRUPT`)
//! when KVM says the guest can take it, else asks for the interrupt window. Time: one
//! thread per vCPU brings its timers up to date when [`Pc::next_deadline`] passes.
//!
//! Differences from the PC on Peregrine, both forced by KVM without an in-kernel local
//! APIC: CPUID offers neither x2APIC nor the TSC deadline timer (KVM answers their MSRs
//! itself, and without its own APIC it refuses them), so Linux drives the xAPIC by MMIO
//! and its timer in one-shot mode. kvmclock is KVM's (its kernel takes the MSRs the
//! PC's CPUID names).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_enable_cap, kvm_run, CpuId, KVM_CAP_X86_USER_SPACE_MSR};
use kvm_bindings::{KVM_MSR_EXIT_REASON_FILTER, KVM_MSR_EXIT_REASON_UNKNOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use peregrine_vmm::clock::Clock;
use peregrine_vmm::exit::{End, Step};
use peregrine_vmm::machine::{Board, Exit};
use peregrine_vmm::pc::{Kick, Pc, PcConfig, RamDisk};
use peregrine_vmm::vcpu::{bits, ArchState};
use vmm_kvm::ram::Ram;
use vmm_kvm::state;
use vmm_kvm::{Config, STATUS_ERROR, STATUS_HALTED, STATUS_TIMEOUT};

use crate::{complete, host_cpuid, serve, write_back, Error, HostVcpu, Served, Stdout};

/// CPUID.1:ECX bits the hosted PC does not offer (see the module's comment).
const X2APIC: u32 = 1 << 21;
const TSC_DEADLINE: u32 = 1 << 24;

/// How the waits poll as well, in case a wake-up raced the wait.
const POLL: Duration = Duration::from_millis(20);

/// The VM's clock: host time since the VM started.
struct HostClock(Instant);

impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// What the kicks, the timer threads and the vCPU threads of one vCPU share.
#[derive(Default)]
struct VcpuSync {
    /// The vCPU waits in HLT.
    halted: AtomicBool,
    /// A kick came since the vCPU last looked.
    kicked: AtomicBool,
    /// The timer's deadline moved earlier since the timer thread last looked.
    poked: AtomicBool,
    /// The clock time the timer thread sleeps until (`u64::MAX`: none).
    sleeping_until: AtomicU64,
    lock: Mutex<()>,
    wake: Condvar,
    timer: Condvar,
    /// The vCPU's `kvm_run` mapping (0 until it runs).
    run: AtomicUsize,
    /// Its thread (`pthread_t`).
    thread: AtomicU64,
}

/// The platform side of [`Kick`].
struct Kicker(Vec<VcpuSync>);

impl Kick for Kicker {
    fn kick(&self, vcpu: u32) {
        let Some(s) = self.0.get(vcpu as usize) else {
            return;
        };
        s.kicked.store(true, Ordering::Release);
        if !s.halted.load(Ordering::Acquire) {
            let run = s.run.load(Ordering::Acquire) as *mut kvm_run;
            if !run.is_null() {
                // SAFETY: `run` is the vCPU's kvm_run mapping, which lives as long as
                // its VcpuFd, kept until the process ends; KVM reads `immediate_exit`
                // at every KVM_RUN, a byte written whole.
                unsafe { core::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
                // SAFETY: the thread id is of a vCPU thread, which never ends before the
                // process; SIGUSR1 has a handler (`install_kick_signal`).
                unsafe { libc::pthread_kill(s.thread.load(Ordering::Acquire) as _, libc::SIGUSR1) };
            }
        }
        let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_all();
    }
}

extern "C" fn on_kick(_: libc::c_int) {}

/// A handler for SIGUSR1, so a kick interrupts `KVM_RUN` (`EINTR`) and nothing else.
fn install_kick_signal() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is valid (no flags, empty mask); the handler is an
    // async-signal-safe function that does nothing.
    let r = unsafe {
        let mut sa: libc::sigaction = core::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGUSR1, &sa, core::ptr::null_mut())
    };
    if r != 0 {
        return Err(format!("sigaction: {}", std::io::Error::last_os_error()).into());
    }
    Ok(())
}

/// The running VM.
struct Vm {
    config: Config,
    pc: Pc,
    ram: Ram,
    start: Instant,
    kicker: Arc<Kicker>,
    idle: Mutex<Vec<Option<VcpuFd>>>,
    ending: AtomicBool,
}

impl Vm {
    fn end(&self, status: u8, why: &str) -> ! {
        self.ending.store(true, Ordering::Release);
        self.pc.flush_console();
        crate::end_line(status, why, self.pc.core().exits())
    }

    /// Blocks vCPU `n` until an interrupt is pending for it.
    fn wait(&self, n: u32) {
        let s = &self.kicker.0[n as usize];
        s.halted.store(true, Ordering::Release);
        while !self.pc.interrupt_pending(n) {
            let g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            if !s.kicked.swap(false, Ordering::AcqRel) {
                let _ = s.wake.wait_timeout(g, POLL);
            }
        }
        s.halted.store(false, Ordering::Release);
    }

    /// Wakes vCPU `n`'s timer thread if its next deadline moved before the one it
    /// sleeps until.
    fn poke_timer(&self, n: u32) {
        let s = &self.kicker.0[n as usize];
        let next = self.pc.next_deadline(n).unwrap_or(u64::MAX);
        if next < s.sleeping_until.load(Ordering::Acquire) {
            s.poked.store(true, Ordering::Release);
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.timer.notify_all();
        }
    }

    /// vCPU `n`'s timer thread.
    fn timers(&self, n: u32) {
        let s = &self.kicker.0[n as usize];
        let clock = HostClock(self.start);
        loop {
            self.pc.update_timers(n);
            let next = self.pc.next_deadline(n).unwrap_or(u64::MAX);
            s.sleeping_until.store(next, Ordering::Release);
            let g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            if !s.poked.swap(false, Ordering::AcqRel) {
                let now = clock.now_ns();
                if next > now {
                    let d = Duration::from_nanos(next - now).min(Duration::from_secs(1));
                    let _ = s.timer.wait_timeout(g, d);
                }
            }
        }
    }
}

/// Boots the Linux guest of `config` on the PC.
pub fn run(config: Config) -> Result<(), Error> {
    let linux = config.linux.clone().ok_or("no Linux guest")?;
    let read = |p: &str| std::fs::read(p).map_err(|e| format!("{p}: {e}"));
    let kernel = read(&linux.kernel)?;
    let initrd = linux.initrd.as_deref().map(read).transpose()?;
    let disk = linux
        .disk
        .as_deref()
        .map(read)
        .transpose()?
        .map(|d| RamDisk(Box::leak(d.into_boxed_slice())));
    install_kick_signal()?;
    let mut ram = Ram::new(config.memory_mib << 20)?;
    let (vm, supported) = crate::new_vm(&ram)?;
    // MSRs KVM does not know go to the PC.
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [
            (KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_FILTER).into(),
            0,
            0,
            0,
        ],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| format!("KVM_CAP_X86_USER_SPACE_MSR: {e}"))?;
    let mut vcpus = Vec::new();
    for id in 0..config.cpus {
        vcpus.push(vm.create_vcpu(id.into())?);
    }
    let tsc_khz = vcpus[0].get_tsc_khz().unwrap_or(1_000_000);
    let start = Instant::now();
    let kicker = Arc::new(Kicker(
        (0..config.cpus).map(|_| VcpuSync::default()).collect(),
    ));
    let wall_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let pc = Pc::new(
        PcConfig {
            vcpus: config.cpus,
            ram: ram.size(),
            tsc_hz: u64::from(tsc_khz) * 1000,
            wall_secs,
        },
        &mut ram,
        &kernel,
        linux.append.as_bytes(),
        initrd.as_deref(),
        disk,
        Stdout,
        Arc::new(HostClock(start)),
        kicker.clone(),
        host_cpuid,
    )
    .map_err(|e| format!("the PC: {e}"))?;
    for (id, vcpu) in vcpus.iter().enumerate() {
        // The PC's answers throughout, its paravirtual leaves included: they offer a
        // subset of KVM's interface (kvmclock, no port-0x80 delays) that KVM's kernel
        // implements; KVM's own list would offer what needs its in-kernel local APIC
        // (PV IPIs, PV EOI, PV unhalt).
        let table = state::cpuid_table(&supported, |leaf, sub| {
            let mut v = pc.cpuid(&ArchState::default(), id as u32, leaf, sub);
            if leaf == 1 {
                v[2] &= !(X2APIC | TSC_DEADLINE);
            }
            v
        });
        let cpuid = CpuId::from_entries(&table).map_err(|e| format!("cpuid: {e:?}"))?;
        vcpu.set_cpuid2(&cpuid)?;
    }
    let mut idle: Vec<Option<VcpuFd>> = vcpus.into_iter().map(Some).collect();
    let boot = idle[0].take().ok_or("no vCPU 0")?;
    let vm = Arc::new(Vm {
        config,
        pc,
        ram,
        start,
        kicker,
        idle: Mutex::new(idle),
        ending: AtomicBool::new(false),
    });
    if vm.config.timeout_s > 0 {
        let v = vm.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(v.config.timeout_s));
            v.end(STATUS_TIMEOUT, "timeout");
        });
    }
    start_cpu(&vm, boot, 0)?;
    loop {
        std::thread::park();
    }
}

/// Sets vCPU `n`'s entry state and runs it in a thread of its own, with its timer thread.
fn start_cpu(vm: &Arc<Vm>, vcpu: VcpuFd, n: u32) -> Result<(), Error> {
    let mut p = HostVcpu::new(&vm.ram, &vm.start);
    match vm.pc.handle(&mut p, n, Exit::Startup) {
        Step::Resume => {}
        other => return Err(format!("STARTUP of vCPU {n}: {other:?}").into()),
    }
    let regs = p.regs;
    let v = vm.clone();
    std::thread::spawn(move || v.timers(n));
    let v = vm.clone();
    std::thread::spawn(move || {
        let r = write_back(&vcpu, core::ptr::null_mut(), &regs, false)
            .and_then(|()| vcpu_loop(vcpu, n, &v));
        if let Err(e) = r {
            v.end(STATUS_ERROR, &format!("error on vCPU {n}: {e}"));
        }
    });
    Ok(())
}

/// Runs vCPU `n` until the VM ends.
fn vcpu_loop(mut vcpu: VcpuFd, n: u32, vm: &Arc<Vm>) -> Result<(), Error> {
    let pc = &vm.pc;
    let run = vcpu.get_kvm_run() as *mut kvm_run;
    let s = &vm.kicker.0[n as usize];
    // SAFETY: pthread_self(3) has no preconditions.
    s.thread
        .store(unsafe { libc::pthread_self() } as u64, Ordering::Release);
    s.run.store(run as usize, Ordering::Release);
    loop {
        let mut p = HostVcpu::new(&vm.ram, &vm.start);
        let exit = vcpu.run();
        // SAFETY: `run` is this vCPU's kvm_run mapping; these fields are plain data KVM
        // wrote before returning, and a kick only ever sets `immediate_exit`.
        let ready = unsafe {
            core::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(0);
            (*run).ready_for_interrupt_injection != 0
        };
        p.regs.rflags = 2 | if ready { bits::IF } else { 0 };
        let (step, pending) = match serve(pc, &mut p, n, run, exit)? {
            Served::Step { step, pending } => (step, pending),
            Served::End(status, why) => vm.end(status, &why),
            Served::Other(VcpuExit::IrqWindowOpen | VcpuExit::Intr) => (Step::Resume, false),
            Served::Other(other) => {
                let what = format!("{other:?}");
                let rip = vcpu.get_regs().map_or(0, |r| r.rip);
                vm.end(
                    STATUS_ERROR,
                    &format!("vCPU {n}: unexpected exit {what} at {rip:#x}"),
                )
            }
        };
        let mut step = pc.settle(&mut p, n, step);
        if step == Step::Wait {
            vm.wait(n);
            p.regs.rflags = 2 | bits::IF;
            pc.wake(&mut p, n);
            step = Step::Resume;
        }
        vm.poke_timer(n);
        if pending && state::decode_event(&p.regs).is_some() {
            complete(&mut vcpu)?;
        }
        write_back(&vcpu, run, &p.regs, true)?;
        match step {
            Step::Resume | Step::Wait => {}
            Step::Start(i) => {
                let fd = vm
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(i as usize)
                    .and_then(Option::take);
                if let Some(fd) = fd {
                    start_cpu(vm, fd, i)?;
                }
            }
            Step::Stop if n == 0 => {
                let rip = vcpu.get_regs().map_or(0, |r| r.rip);
                vm.end(STATUS_HALTED, &End::HaltForever { rip }.to_string())
            }
            Step::Stop => loop {
                std::thread::park();
            },
            Step::End(end) => vm.end(vmm_kvm::status(&end), &end.to_string()),
        }
    }
}
