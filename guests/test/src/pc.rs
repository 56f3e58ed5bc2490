//! Mode `pc`: the check list of a standard PC, with no device of the contract. The same
//! run on QEMU's own PC (`-kernel`, the Multiboot entry) and on our VMM's PC must give
//! the same lines (guests/README.md, "Mode pc").
//!
//! The guest finds: the console on COM1, the end at isa-debug-exit (port 0xF4, a dword:
//! the code), the vCPU count in QEMU's fw_cfg (ports 0x510/0x511, key 0x05), the local
//! APIC at 0xFEE0_0000 (APIC IDs 0, 1, … = vCPU index), the I/O APIC at 0xFEC0_0000
//! (ISA IRQ 0 on pin 2, IRQ 8 on pin 8, active high), the 8259 PICs (only masked), the
//! PIT (ports 0x40–0x43, channel 2's gate and output on port 0x61) and the RTC (ports
//! 0x70/0x71). APs start by INIT-SIPI-SIPI at the real-mode trampoline (boot.rs).
//!
//! Each check prints `check <name> ok`, `check <name> skipped: <why>` or
//! `check <name> FAIL <detail>`; the end code is the number of the first failing check
//! (1-based, in the order of [`CHECKS`]), 0 when all passed.

use core::arch::asm;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::arch::{self, Frame, MAX_CPUS};
use crate::checks::{expect, Detail};
use crate::{boot, println, CURRENT_CHECK};

/// The local APIC's registers (xAPIC, MMIO).
const LAPIC: u64 = 0xfee0_0000;
const APIC_ID: u64 = 0x20;
const APIC_VERSION: u64 = 0x30;
const APIC_TPR: u64 = 0x80;
const APIC_EOI: u64 = 0xb0;
const APIC_SVR: u64 = 0xf0;
const APIC_ICR_LO: u64 = 0x300;
const APIC_ICR_HI: u64 = 0x310;
const APIC_LVT_TIMER: u64 = 0x320;
const APIC_LVT_LINT0: u64 = 0x350;
const APIC_TIMER_INIT: u64 = 0x380;
const APIC_TIMER_CUR: u64 = 0x390;
const APIC_TIMER_DIV: u64 = 0x3e0;
/// The I/O APIC: index and data window.
const IOAPIC: u64 = 0xfec0_0000;
const IOAPIC_WIN: u64 = 0x10;

const MSR_APIC_BASE: u32 = 0x1b;
const MSR_PAT: u32 = 0x277;
const MSR_TSC_DEADLINE: u32 = 0x6e0;
const MSR_EFER: u32 = 0xc000_0080;
const MSR_TSC_AUX: u32 = 0xc000_0103;

/// Vectors: the local APIC timer, the IPI to vCPU 1 and its answer, the AP's wake-up,
/// the PIT (pin 2, edge), the RTC on pin 8 level-triggered and edge-triggered, spurious.
const VEC_TIMER: u8 = 0x40;
const VEC_PING: u8 = 0x41;
const VEC_PONG: u8 = 0x42;
const VEC_WAKE_AP: u8 = 0x43;
const VEC_PIT: u8 = 0x50;
const VEC_RTC_LEVEL: u8 = 0x51;
const VEC_RTC_UPDATE: u8 = 0x52;
const VEC_SPURIOUS: u8 = 0xff;

/// ICR delivery modes and flags.
const ICR_FIXED: u32 = 0;
const ICR_NMI: u32 = 4 << 8;
const ICR_INIT: u32 = 5 << 8;
const ICR_SIPI: u32 = 6 << 8;
const ICR_PENDING: u32 = 1 << 12;
const ICR_ASSERT: u32 = 1 << 14;
const ICR_SELF: u32 = 1 << 18;

/// TSC ticks per millisecond (a guess until the PIT check measures it).
static TSC_PER_MS: AtomicU64 = AtomicU64::new(3_000_000);
/// vCPUs in use (the fw_cfg count, at most [`MAX_CPUS`]).
static CPUS: AtomicU64 = AtomicU64::new(1);

/// Interrupts seen, per vCPU where two can take them.
static TIMER_IRQS: AtomicU64 = AtomicU64::new(0);
static TIMER_TSC: AtomicU64 = AtomicU64::new(0);
static PINGS: AtomicU64 = AtomicU64::new(0);
static PONGS: AtomicU64 = AtomicU64::new(0);
static NMIS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static PIT_IRQS: AtomicU64 = AtomicU64::new(0);
static LEVEL_IRQS: AtomicU64 = AtomicU64::new(0);
static RTC_IRQS: AtomicU64 = AtomicU64::new(0);
/// RTC register C as the update interrupt's handler read it.
static RTC_C: AtomicU64 = AtomicU64::new(0);

/// vCPU 1: times it reached [`secondary`], its state there, and its mailbox.
static AP_STARTS: AtomicU64 = AtomicU64::new(0);
static AP_READY: AtomicU64 = AtomicU64::new(0);
static AP_ENTRY_TPR: AtomicU64 = AtomicU64::new(u64::MAX);
static AP_APIC_ID: AtomicU64 = AtomicU64::new(u64::MAX);
static CMD: AtomicU64 = AtomicU64::new(0);
static ACK: AtomicU64 = AtomicU64::new(0);
const OP_SNAPSHOT: u64 = 1;
const OP_TPR: u64 = 2;

/// CPUID leaves compared across vCPUs (leaf 1's EBX without the APIC ID).
const LEAVES: [u32; 7] = [0, 1, 7, 0x8000_0000, 0x8000_0001, 0x8000_0007, 0x8000_0008];
/// MSRs compared across vCPUs.
const MSRS: [u32; 3] = [MSR_APIC_BASE, MSR_PAT, MSR_EFER];

/// What vCPU 1 saw for [`OP_SNAPSHOT`].
struct Snapshot {
    cpuid: [[AtomicU32; 4]; LEAVES.len()],
    msr: [AtomicU64; MSRS.len()],
    tsc: AtomicU64,
    tsc_aux: AtomicU64,
    rdtscp_aux: AtomicU64,
}

static SNAP: Snapshot = Snapshot {
    cpuid: [const { [const { AtomicU32::new(0) }; 4] }; LEAVES.len()],
    msr: [const { AtomicU64::new(0) }; MSRS.len()],
    tsc: AtomicU64::new(0),
    tsc_aux: AtomicU64::new(0),
    rdtscp_aux: AtomicU64::new(0),
};

/// A check's result: `Ok(None)` passed, `Ok(Some(why))` skipped.
type Verdict = Result<Option<&'static str>, Detail>;

fn pass(v: Result<(), Detail>) -> Verdict {
    v.map(|()| None)
}

fn fail(what: &'static str, got: u64, want: u64) -> Detail {
    Detail { what, got, want }
}

/// A check: name, whether it needs two vCPUs, function.
type Check = (&'static str, bool, fn() -> Verdict);

/// The check list in order.
const CHECKS: &[Check] = &[
    ("cpuid", false, cpuid),
    ("fw_cfg", false, fw_cfg),
    ("apic_base", false, apic_base),
    ("mmio_mov", false, mmio_mov),
    ("mmio_rmw", false, mmio_rmw),
    ("mmio_string", false, mmio_string),
    ("mmio_narrow", false, mmio_narrow),
    ("pit_mode0", false, pit_mode0),
    ("pit_mode2", false, pit_mode2),
    ("lapic_timer_oneshot", false, timer_oneshot),
    ("lapic_timer_periodic", false, timer_periodic),
    ("tsc_deadline", false, tsc_deadline),
    ("ioapic_pit", false, ioapic_pit),
    ("rtc_update", false, rtc_update),
    ("ioapic_level_eoi", false, ioapic_level_eoi),
    ("smp_start", true, smp_start),
    ("ipi_fixed", true, ipi_fixed),
    ("ipi_nmi", true, ipi_nmi),
    ("cpuid_smp", true, cpuid_smp),
    ("msr_smp", true, msr_smp),
    ("tsc_smp", true, tsc_smp),
    ("ipi_init", true, ipi_init),
];

/// Runs the check list on vCPU 0 and returns the end code.
pub fn run() -> u32 {
    // The 8259s stay masked (everything goes through the I/O APIC), LINT0 too.
    arch::outb(0x21, 0xff);
    arch::outb(0xa1, 0xff);
    lapic_init();
    let cpus = fw_cfg_cpus().unwrap_or(1);
    if cpus > MAX_CPUS as u64 {
        println!("guest: {} vCPUs, the checks use {}", cpus, MAX_CPUS);
    }
    CPUS.store(cpus.clamp(1, MAX_CPUS as u64), Ordering::Relaxed);
    let mut first_fail = 0;
    let mut ap_up = true;
    for (i, (name, smp, check)) in CHECKS.iter().enumerate() {
        let number = i as u32 + 1;
        CURRENT_CHECK.store(number, Ordering::Relaxed);
        let verdict = if *smp && CPUS.load(Ordering::Relaxed) < 2 {
            Ok(Some("one vCPU"))
        } else if *smp && !ap_up {
            Ok(Some("vCPU 1 did not start"))
        } else {
            check()
        };
        match verdict {
            Ok(None) => println!("check {} ok", name),
            Ok(Some(why)) => println!("check {} skipped: {}", name, why),
            Err(d) => {
                println!(
                    "check {} FAIL {}: got {:#x}, want {:#x}",
                    name, d.what, d.got, d.want
                );
                if *name == "smp_start" {
                    ap_up = false;
                }
                if first_fail == 0 {
                    first_fail = number;
                }
            }
        }
    }
    CURRENT_CHECK.store(0, Ordering::Relaxed);
    println!("guest: done {}", first_fail);
    first_fail
}

// ---- devices -------------------------------------------------------------------------

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: the local APIC page is identity-mapped MMIO; a 32-bit aligned read.
    unsafe { ((LAPIC + reg) as *const u32).read_volatile() }
}

fn lapic_write(reg: u64, v: u32) {
    // SAFETY: as for `lapic_read`.
    unsafe { ((LAPIC + reg) as *mut u32).write_volatile(v) }
}

fn eoi() {
    lapic_write(APIC_EOI, 0);
}

/// Software-enables this vCPU's local APIC (spurious vector 0xFF), masks LINT0 and the
/// timer, TPR 0.
fn lapic_init() {
    lapic_write(APIC_SVR, 0x100 | u32::from(VEC_SPURIOUS));
    lapic_write(APIC_LVT_LINT0, 1 << 16);
    lapic_write(APIC_LVT_TIMER, 1 << 16 | u32::from(VEC_TIMER));
    lapic_write(APIC_TPR, 0);
}

/// Sends an IPI (`low`: vector, delivery mode, flags) to APIC ID `dest` and waits
/// (bounded) until the ICR says it was sent.
fn send_ipi(dest: u32, low: u32) {
    lapic_write(APIC_ICR_HI, dest << 24);
    lapic_write(APIC_ICR_LO, low);
    for _ in 0..1_000_000 {
        if lapic_read(APIC_ICR_LO) & ICR_PENDING == 0 {
            break;
        }
        core::hint::spin_loop();
    }
}

fn ioapic_read(reg: u32) -> u32 {
    // SAFETY: the I/O APIC page is identity-mapped MMIO; 32-bit accesses of the index
    // and the window (vCPU 0 alone uses them).
    unsafe {
        (IOAPIC as *mut u32).write_volatile(reg);
        ((IOAPIC + IOAPIC_WIN) as *const u32).read_volatile()
    }
}

fn ioapic_write(reg: u32, v: u32) {
    // SAFETY: as for `ioapic_read`.
    unsafe {
        (IOAPIC as *mut u32).write_volatile(reg);
        ((IOAPIC + IOAPIC_WIN) as *mut u32).write_volatile(v);
    }
}

/// Routes I/O APIC `pin` to `vector` on APIC ID 0 (fixed, physical, active high), level-
/// or edge-triggered, masked or not.
fn route(pin: u32, vector: u8, level: bool, masked: bool) {
    let low = u32::from(vector) | u32::from(level) << 15 | u32::from(masked) << 16;
    ioapic_write(0x10 + 2 * pin, 1 << 16); // mask while changing
    ioapic_write(0x11 + 2 * pin, 0);
    ioapic_write(0x10 + 2 * pin, low);
}

fn cmos_read(reg: u8) -> u8 {
    arch::outb(0x70, reg);
    arch::inb(0x71)
}

fn cmos_write(reg: u8, v: u8) {
    arch::outb(0x70, reg);
    arch::outb(0x71, v);
}

/// Programs PIT channel `ch` (0 or 2) in `mode` (lobyte/hibyte, binary) with `count`.
fn pit_program(ch: u8, mode: u8, count: u16) {
    arch::outb(0x43, ch << 6 | 0x30 | mode << 1);
    arch::outb(0x40 + u16::from(ch), count as u8);
    arch::outb(0x40 + u16::from(ch), (count >> 8) as u8);
}

/// Latches and reads PIT channel `ch`'s counter.
fn pit_latch(ch: u8) -> u16 {
    arch::outb(0x43, ch << 6);
    let lo = arch::inb(0x40 + u16::from(ch));
    let hi = arch::inb(0x40 + u16::from(ch));
    u16::from(hi) << 8 | u16::from(lo)
}

/// Reads `buf.len()` bytes of fw_cfg item `key`.
fn fw_cfg_read(key: u16, buf: &mut [u8]) {
    arch::outw(0x510, key);
    for b in buf {
        *b = arch::inb(0x511);
    }
}

/// The vCPU count fw_cfg reports (key 0x05, `FW_CFG_NB_CPUS`), if it has the "QEMU"
/// signature (key 0x00).
fn fw_cfg_cpus() -> Option<u64> {
    let mut sig = [0; 4];
    fw_cfg_read(0, &mut sig);
    if &sig != b"QEMU" {
        return None;
    }
    let mut n = [0; 2];
    fw_cfg_read(5, &mut n);
    Some(u16::from_le_bytes(n).into())
}

fn ms(n: u64) -> u64 {
    n * TSC_PER_MS.load(Ordering::Relaxed)
}

/// Waits with interrupts enabled until `cond` holds, at most `limit` ms; whether it held.
fn wait(limit: u64, cond: impl Fn() -> bool) -> bool {
    let end = arch::rdtsc() + ms(limit);
    // SAFETY: the guest's handlers are ready for every vector the checks raise; any
    // other vector ends the run (main.rs, `trap`).
    unsafe { asm!("sti", options(nomem, nostack)) };
    let held = loop {
        if cond() {
            break true;
        }
        if arch::rdtsc() > end {
            break cond();
        }
        core::hint::spin_loop();
    };
    // SAFETY: back to interrupts off.
    unsafe { asm!("cli", options(nomem, nostack)) };
    held
}

/// Lets `n` ms pass with interrupts enabled.
fn delay(n: u64) {
    wait(n, || false);
}

// ---- interrupts ----------------------------------------------------------------------

/// The mode's interrupt handlers; false for a vector it does not expect.
pub fn trap(frame: &mut Frame) -> bool {
    let cpu = arch::cpu_of_frame(frame);
    let Ok(vector) = u8::try_from(frame.vector) else {
        return false;
    };
    match vector {
        2 => {
            NMIS[cpu].fetch_add(1, Ordering::SeqCst);
        }
        VEC_TIMER => {
            TIMER_TSC.store(arch::rdtsc(), Ordering::SeqCst);
            TIMER_IRQS.fetch_add(1, Ordering::SeqCst);
            eoi();
        }
        VEC_PING => {
            PINGS.fetch_add(1, Ordering::SeqCst);
            eoi();
            send_ipi(0, ICR_ASSERT | ICR_FIXED | u32::from(VEC_PONG));
        }
        VEC_PONG => {
            PONGS.fetch_add(1, Ordering::SeqCst);
            eoi();
        }
        VEC_WAKE_AP => eoi(),
        VEC_PIT => {
            PIT_IRQS.fetch_add(1, Ordering::SeqCst);
            eoi();
        }
        // Level-triggered: neither register C nor the EOI here (the check does them).
        VEC_RTC_LEVEL => {
            LEVEL_IRQS.fetch_add(1, Ordering::SeqCst);
        }
        VEC_RTC_UPDATE => {
            RTC_C.store(cmos_read(0x0c).into(), Ordering::SeqCst);
            RTC_IRQS.fetch_add(1, Ordering::SeqCst);
            eoi();
        }
        VEC_SPURIOUS => {}
        _ => return false,
    }
    true
}

// ---- vCPU 1 --------------------------------------------------------------------------

/// vCPU 1 (and any other AP): records how INIT left its APIC, enables it, then serves
/// its mailbox, halting in between (an IPI wakes it).
pub fn secondary(index: usize) -> ! {
    if index != 1 {
        arch::park();
    }
    AP_ENTRY_TPR.store(lapic_read(APIC_TPR).into(), Ordering::SeqCst);
    AP_APIC_ID.store((lapic_read(APIC_ID) >> 24).into(), Ordering::SeqCst);
    lapic_init();
    AP_STARTS.fetch_add(1, Ordering::SeqCst);
    let mut last = CMD.load(Ordering::SeqCst);
    AP_READY.store(1, Ordering::SeqCst);
    loop {
        let cmd = CMD.load(Ordering::SeqCst);
        if cmd == last {
            // SAFETY: STI's shadow covers HLT: an interrupt between the check and the
            // halt ends the halt; the handler returns after it.
            unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
            continue;
        }
        last = cmd;
        match cmd & 0xff {
            OP_SNAPSHOT => snapshot(),
            OP_TPR => lapic_write(APIC_TPR, (cmd >> 8 & 0xf0) as u32),
            _ => {}
        }
        ACK.store(cmd, Ordering::SeqCst);
    }
}

fn snapshot() {
    SNAP.tsc.store(arch::rdtsc(), Ordering::SeqCst);
    for (i, leaf) in LEAVES.iter().enumerate() {
        let (a, b, c, d) = arch::cpuid(*leaf, 0);
        for (slot, v) in SNAP.cpuid[i].iter().zip([a, b, c, d]) {
            slot.store(v, Ordering::SeqCst);
        }
    }
    for (slot, msr) in SNAP.msr.iter().zip(MSRS) {
        slot.store(arch::rdmsr(msr), Ordering::SeqCst);
    }
    if has_rdtscp() {
        arch::wrmsr(MSR_TSC_AUX, 0x101);
        SNAP.tsc_aux
            .store(arch::rdmsr(MSR_TSC_AUX), Ordering::SeqCst);
        SNAP.rdtscp_aux.store(rdtscp_aux().into(), Ordering::SeqCst);
    }
}

/// Posts `op` (with `arg` above its low byte) to vCPU 1, wakes it and waits for its
/// answer.
fn ap_command(op: u64, arg: u64) -> bool {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::SeqCst) + 1;
    let cmd = seq << 16 | (arg & 0xff) << 8 | op;
    CMD.store(cmd, Ordering::SeqCst);
    send_ipi(1, ICR_ASSERT | ICR_FIXED | u32::from(VEC_WAKE_AP));
    wait(2000, || ACK.load(Ordering::SeqCst) == cmd)
}

/// INIT, then two SIPIs at the trampoline, to APIC ID 1; waits for it to report.
fn start_ap() -> bool {
    AP_READY.store(0, Ordering::SeqCst);
    boot::prepare_ap(1, crate::MODE_PC, CPUS.load(Ordering::Relaxed));
    send_ipi(1, ICR_ASSERT | ICR_INIT);
    delay(10);
    for _ in 0..2 {
        send_ipi(1, ICR_ASSERT | ICR_SIPI | (boot::TRAMPOLINE >> 12) as u32);
        delay(1);
    }
    wait(3000, || AP_READY.load(Ordering::SeqCst) == 1)
}

fn has_rdtscp() -> bool {
    let (max, ..) = arch::cpuid(0x8000_0000, 0);
    max >= 0x8000_0001 && arch::cpuid(0x8000_0001, 0).3 & 1 << 27 != 0
}

fn rdtscp_aux() -> u32 {
    let aux: u32;
    // SAFETY: rdtscp reads the TSC and TSC_AUX (CPUID says it exists).
    unsafe { asm!("rdtscp", out("eax") _, out("edx") _, out("ecx") aux, options(nomem, nostack)) };
    aux
}

// ---- the checks ----------------------------------------------------------------------

/// A known vendor, leaf 1 with a family, an on-chip APIC (leaf 1 EDX bit 9) and the APIC
/// ID of the boot vCPU (EBX bits 31..24) 0.
fn cpuid() -> Verdict {
    let (max, ..) = arch::cpuid(0, 0);
    if max < 1 {
        return Err(fail("max leaf", max.into(), 1));
    }
    let (sig, b, _, d) = arch::cpuid(1, 0);
    if (sig >> 8) & 0xf == 0 {
        return Err(fail("leaf 1 family", ((sig >> 8) & 0xf).into(), 6));
    }
    expect("leaf 1 EDX.APIC", (d >> 9 & 1).into(), 1)?;
    pass(expect("leaf 1 EBX APIC ID", (b >> 24).into(), 0))
}

/// fw_cfg's signature and a vCPU count of at least one.
fn fw_cfg() -> Verdict {
    let mut sig = [0; 4];
    fw_cfg_read(0, &mut sig);
    expect(
        "signature",
        u32::from_le_bytes(sig).into(),
        u32::from_le_bytes(*b"QEMU").into(),
    )?;
    match fw_cfg_cpus() {
        Some(n) if n >= 1 => Ok(None),
        n => Err(fail("NB_CPUS", n.unwrap_or(0), 1)),
    }
}

/// IA32_APIC_BASE: enabled, the boot vCPU's flag, the default base; the APIC ID 0, a
/// version of an integrated APIC, and the SVR written at the start read back.
fn apic_base() -> Verdict {
    let base = arch::rdmsr(MSR_APIC_BASE);
    expect("IA32_APIC_BASE base", base & !0xfff & 0xf_ffff_ffff, LAPIC)?;
    expect("IA32_APIC_BASE EN|BSP", base & 0x900, 0x900)?;
    expect("APIC ID", (lapic_read(APIC_ID) >> 24).into(), 0)?;
    let ver = lapic_read(APIC_VERSION);
    if !(0x10..=0x15).contains(&(ver & 0xff)) {
        return Err(fail("APIC version", (ver & 0xff).into(), 0x14));
    }
    if (ver >> 16) & 0xff < 4 {
        return Err(fail("max LVT entry", ((ver >> 16) & 0xff).into(), 5));
    }
    pass(expect(
        "SVR",
        (lapic_read(APIC_SVR) & 0x1ff).into(),
        0x100 | u64::from(VEC_SPURIOUS),
    ))
}

fn tpr_ptr() -> u64 {
    LAPIC + APIC_TPR
}

/// Plain moves on the TPR: `mov m32, imm32`, `mov r32, m32` (base + disp32), `mov m32,
/// r32` with a REX register, base + index*4 + disp8, and the absolute `movabs`
/// (moffs) forms.
fn mmio_mov() -> Verdict {
    let v: u32;
    // SAFETY: every access is to the identity-mapped local APIC page (TPR at +0x80).
    unsafe {
        asm!("mov dword ptr [{b} + 0x80], 0x20", "mov {v:e}, dword ptr [{b} + 0x80]",
             b = in(reg) LAPIC, v = out(reg) v, options(nostack));
    }
    expect("mov m32, imm32 then mov r32, m32", v.into(), 0x20)?;
    let v: u32;
    // SAFETY: as above.
    unsafe {
        asm!("mov dword ptr [r11 + 0x80], r10d", "mov {v:e}, dword ptr [{b} + {i} * 4 + 0x10]",
             in("r11") LAPIC, in("r10") 0x30u32, b = in(reg) LAPIC, i = in(reg) 0x1cu64,
             v = out(reg) v, options(nostack));
    }
    expect("mov m32, r10d then SIB read", v.into(), 0x30)?;
    let v: u32;
    // SAFETY: as above; moffs64 = the TPR's address.
    unsafe {
        asm!("movabs dword ptr [{a}], eax", "xor eax, eax", "movabs eax, dword ptr [{a}]",
             a = const LAPIC + APIC_TPR, inout("eax") 0x40u32 => v, options(nostack));
    }
    expect("movabs moffs, eax then movabs eax, moffs", v.into(), 0x40)?;
    // The ID and version through a 64-bit base register, too.
    let id: u32;
    // SAFETY: as above.
    unsafe {
        asm!("mov {v:e}, dword ptr [{b}]", b = in(reg) LAPIC + APIC_ID, v = out(reg) id,
             options(nostack, readonly));
    }
    lapic_write(APIC_TPR, 0);
    expect("APIC ID read", (id >> 24).into(), 0)?;
    pass(expect("TPR after mov 0", lapic_read(APIC_TPR).into(), 0))
}

/// Read-modify-write forms on the TPR: `or m32, imm8`, `and m32, imm32`, `add m32, r32`,
/// `xor m32, imm8`, `xchg m32, r32`, `test m32, imm32`, `cmp m32, imm8`, `inc m32`.
fn mmio_rmw() -> Verdict {
    let t = tpr_ptr();
    lapic_write(APIC_TPR, 0x10);
    // SAFETY: as for `mmio_mov`: the TPR.
    unsafe { asm!("or dword ptr [{t}], 0x20", t = in(reg) t, options(nostack)) };
    expect("or m32, imm8", lapic_read(APIC_TPR).into(), 0x30)?;
    // SAFETY: as above.
    unsafe { asm!("and dword ptr [{t}], 0x7fffffef", t = in(reg) t, options(nostack)) };
    expect("and m32, imm32", lapic_read(APIC_TPR).into(), 0x20)?;
    // SAFETY: as above.
    unsafe {
        asm!("add dword ptr [{t}], {r:e}", t = in(reg) t, r = in(reg) 0x11u32, options(nostack))
    };
    expect("add m32, r32", lapic_read(APIC_TPR).into(), 0x31)?;
    // SAFETY: as above.
    unsafe { asm!("xor dword ptr [{t}], 1", t = in(reg) t, options(nostack)) };
    expect("xor m32, imm8", lapic_read(APIC_TPR).into(), 0x30)?;
    // SAFETY: as above.
    unsafe { asm!("inc dword ptr [{t}]", t = in(reg) t, options(nostack)) };
    expect("inc m32", lapic_read(APIC_TPR).into(), 0x31)?;
    let old: u32;
    // SAFETY: as above.
    unsafe {
        asm!("xchg dword ptr [{t}], {r:e}", t = in(reg) t, r = inout(reg) 0x40u32 => old,
             options(nostack));
    }
    expect("xchg m32, r32: old value", old.into(), 0x31)?;
    expect(
        "xchg m32, r32: new value",
        lapic_read(APIC_TPR).into(),
        0x40,
    )?;
    let (zf_test, zf_cmp): (u8, u8);
    // SAFETY: as above (reads only).
    unsafe {
        asm!("test dword ptr [{t}], 0x40", "setz {a}", "cmp dword ptr [{t}], 0x40", "setz {b}",
             t = in(reg) t, a = out(reg_byte) zf_test, b = out(reg_byte) zf_cmp,
             options(nostack, readonly));
    }
    lapic_write(APIC_TPR, 0);
    expect("test m32, imm32 (ZF)", zf_test.into(), 0)?;
    pass(expect("cmp m32, imm8 (ZF)", zf_cmp.into(), 1))
}

/// String forms on the TPR: `movsd` memory to MMIO and back, `stosd`, `lodsd`, and
/// `rep stosd` with a count of one (RSI/RDI/RCX move as they must).
fn mmio_string() -> Verdict {
    let t = tpr_ptr();
    let src: u32 = 0x50;
    let mut dst: u32 = 0;
    let (si, di): (u64, u64);
    // SAFETY: one dword from `src` to the TPR; DF is clear.
    unsafe {
        asm!("movsd dword ptr [rdi], dword ptr [rsi]", inout("rsi") &src as *const u32 as u64 => si,
             inout("rdi") t => di, options(nostack));
    }
    expect("movsd to MMIO", lapic_read(APIC_TPR).into(), 0x50)?;
    expect("rsi after movsd", si, &src as *const u32 as u64 + 4)?;
    expect("rdi after movsd", di, t + 4)?;
    // SAFETY: one dword from the TPR to `dst`.
    unsafe {
        asm!("movsd dword ptr [rdi], dword ptr [rsi]", inout("rsi") t => _,
             inout("rdi") &mut dst as *mut u32 as u64 => _, options(nostack));
    }
    expect("movsd from MMIO", dst.into(), 0x50)?;
    // SAFETY: one dword to the TPR.
    unsafe { asm!("stosd", inout("rdi") t => _, in("eax") 0x60u32, options(nostack)) };
    expect("stosd", lapic_read(APIC_TPR).into(), 0x60)?;
    let v: u32;
    // SAFETY: one dword from the TPR.
    unsafe { asm!("lodsd", inout("rsi") t => _, out("eax") v, options(nostack, readonly)) };
    expect("lodsd", v.into(), 0x60)?;
    let (cx, di): (u64, u64);
    // SAFETY: one dword to the TPR.
    unsafe {
        asm!("rep stosd", inout("rdi") t => di, inout("rcx") 1u64 => cx, in("eax") 0x70u32,
             options(nostack));
    }
    let got = lapic_read(APIC_TPR);
    lapic_write(APIC_TPR, 0);
    expect("rep stosd", got.into(), 0x70)?;
    expect("rcx after rep stosd", cx, 0)?;
    pass(expect("rdi after rep stosd", di, t + 4))
}

/// Byte and word forms on the I/O APIC's index register (IOREGSEL, whose bits 7..0
/// select): `mov m8, imm8`, `movzx r32, m8`, `movzx r32, m16`, `movsx r32, m8`, `mov r8,
/// m8`, `mov m16, r16`; then the version through the 32-bit window.
fn mmio_narrow() -> Verdict {
    let sel = IOAPIC;
    let (zx8, zx16, sx8, r8): (u32, u32, u32, u8);
    // SAFETY: the identity-mapped I/O APIC page; IOREGSEL only.
    unsafe {
        asm!("mov byte ptr [{s}], 0x12", "movzx {a:e}, byte ptr [{s}]",
             "movzx {b:e}, word ptr [{s}]", "movsx {c:e}, byte ptr [{s}]", "mov {d}, byte ptr [{s}]",
             s = in(reg) sel, a = out(reg) zx8, b = out(reg) zx16, c = out(reg) sx8,
             d = out(reg_byte) r8, options(nostack));
    }
    expect("movzx r32, m8 after mov m8, imm8", zx8.into(), 0x12)?;
    expect("movzx r32, m16", (zx16 & 0xff).into(), 0x12)?;
    expect("movsx r32, m8", sx8.into(), 0x12)?;
    expect("mov r8, m8", r8.into(), 0x12)?;
    let v: u32;
    // SAFETY: as above.
    unsafe {
        asm!("mov word ptr [{s}], {w:x}", "mov {v:e}, dword ptr [{s}]", s = in(reg) sel,
             w = in(reg) 0x01u16, v = out(reg) v, options(nostack));
    }
    expect("mov m16, r16 then mov r32, m32", (v & 0xff).into(), 0x01)?;
    // SAFETY: as above: IOREGSEL = 1 (version), then the window.
    let ver = unsafe { ((IOAPIC + IOAPIC_WIN) as *const u32).read_volatile() };
    if ![0x11, 0x20].contains(&(ver & 0xff)) {
        return Err(fail("I/O APIC version", (ver & 0xff).into(), 0x20));
    }
    pass(expect(
        "I/O APIC max redirection entry",
        ((ver >> 16) & 0xff).into(),
        23,
    ))
}

/// PIT channel 2 in mode 0 (gate on port 0x61): OUT low after the count is written,
/// counting down, high at terminal count; times the TSC against it (10 ms).
fn pit_mode0() -> Verdict {
    const COUNT: u16 = 11932; // 10 ms at 1.193182 MHz
    let b = arch::inb(0x61);
    arch::outb(0x61, (b & !0x02) | 0x01);
    pit_program(2, 0, COUNT);
    let t0 = arch::rdtsc();
    let out_early = arch::inb(0x61) & 0x20;
    let v = pit_latch(2);
    let mut high = false;
    let mut t1 = t0;
    for _ in 0..100_000_000u64 {
        if arch::inb(0x61) & 0x20 != 0 {
            t1 = arch::rdtsc();
            high = true;
            break;
        }
        if arch::rdtsc() - t0 > 30_000_000_000 {
            break;
        }
    }
    arch::outb(0x61, b & !0x03);
    expect("OUT2 right after the count", out_early.into(), 0)?;
    if v == 0 || v > COUNT {
        return Err(fail("latched count", v.into(), COUNT.into()));
    }
    expect("OUT2 high at terminal count", high.into(), 1)?;
    let per_ms = (t1 - t0) / 10;
    if per_ms < 1000 {
        return Err(fail("TSC ticks per ms against the PIT", per_ms, 1000));
    }
    TSC_PER_MS.store(per_ms, Ordering::Relaxed);
    Ok(None)
}

/// PIT channel 0 in mode 2 (rate generator, its I/O APIC pin masked): the read-back
/// status says mode 2, lobyte/hibyte; latched counts stay within 1..=N and reload.
fn pit_mode2() -> Verdict {
    const COUNT: u16 = 0x4000; // 13.7 ms
    pit_program(0, 2, COUNT);
    arch::outb(0x43, 0xe2); // read-back: status only, channel 0
    let status = arch::inb(0x40);
    expect(
        "read-back status (RW, mode, BCD)",
        (status & 0x3f).into(),
        0x34,
    )?;
    let mut prev = pit_latch(0);
    let end = arch::rdtsc() + ms(1000);
    let (mut down, mut reload) = (false, false);
    while !(down && reload) && arch::rdtsc() < end {
        let v = pit_latch(0);
        if v == 0 || v > COUNT {
            return Err(fail("latched count", v.into(), COUNT.into()));
        }
        down |= v < prev;
        reload |= v > prev;
        prev = v;
    }
    expect("counted down", down.into(), 1)?;
    pass(expect("reloaded", reload.into(), 1))
}

/// Local APIC timer, one-shot (divide by 16): counts down, one interrupt, then 0.
fn timer_oneshot() -> Verdict {
    const COUNT: u32 = 100_000;
    lapic_write(APIC_TIMER_DIV, 0x3);
    lapic_write(APIC_LVT_TIMER, VEC_TIMER.into());
    let n = TIMER_IRQS.load(Ordering::SeqCst);
    lapic_write(APIC_TIMER_INIT, COUNT);
    let cur = lapic_read(APIC_TIMER_CUR);
    let fired = wait(1000, || TIMER_IRQS.load(Ordering::SeqCst) > n);
    delay(20);
    let after = TIMER_IRQS.load(Ordering::SeqCst) - n;
    let cur_end = lapic_read(APIC_TIMER_CUR);
    lapic_write(APIC_LVT_TIMER, 1 << 16 | u32::from(VEC_TIMER));
    if cur > COUNT {
        return Err(fail("current count after start", cur.into(), COUNT.into()));
    }
    expect("fired", fired.into(), 1)?;
    expect("interrupts after 20 ms more", after, 1)?;
    pass(expect("current count at the end", cur_end.into(), 0))
}

/// Local APIC timer, periodic: at least five interrupts, the count reloads, and it stops
/// when the initial count is set to 0.
fn timer_periodic() -> Verdict {
    lapic_write(APIC_TIMER_DIV, 0x3);
    lapic_write(APIC_LVT_TIMER, 1 << 17 | u32::from(VEC_TIMER));
    let n = TIMER_IRQS.load(Ordering::SeqCst);
    lapic_write(APIC_TIMER_INIT, 100_000);
    let five = wait(2000, || TIMER_IRQS.load(Ordering::SeqCst) >= n + 5);
    let cur = lapic_read(APIC_TIMER_CUR);
    lapic_write(APIC_TIMER_INIT, 0);
    lapic_write(APIC_LVT_TIMER, 1 << 16 | u32::from(VEC_TIMER));
    let stopped = TIMER_IRQS.load(Ordering::SeqCst);
    delay(20);
    let late = TIMER_IRQS.load(Ordering::SeqCst) - stopped;
    expect("five periods", five.into(), 1)?;
    if cur == 0 || cur > 100_000 {
        return Err(fail("current count while running", cur.into(), 100_000));
    }
    if late > 1 {
        return Err(fail("interrupts after the stop", late, 0));
    }
    Ok(None)
}

/// TSC-deadline mode (where CPUID.1:ECX bit 24 says so): the interrupt comes at or after
/// the deadline, the MSR reads 0 after it, and a deadline in the past fires at once.
fn tsc_deadline() -> Verdict {
    if arch::cpuid(1, 0).2 & 1 << 24 == 0 {
        return Ok(Some("CPUID.1:ECX.TSC_DEADLINE is clear"));
    }
    lapic_write(APIC_LVT_TIMER, 2 << 17 | u32::from(VEC_TIMER));
    let n = TIMER_IRQS.load(Ordering::SeqCst);
    let deadline = arch::rdtsc() + ms(2);
    arch::wrmsr(MSR_TSC_DEADLINE, deadline);
    let fired = wait(1000, || TIMER_IRQS.load(Ordering::SeqCst) > n);
    let at = TIMER_TSC.load(Ordering::SeqCst);
    let msr = arch::rdmsr(MSR_TSC_DEADLINE);
    let n = TIMER_IRQS.load(Ordering::SeqCst);
    arch::wrmsr(MSR_TSC_DEADLINE, 1);
    let past = wait(100, || TIMER_IRQS.load(Ordering::SeqCst) > n);
    arch::wrmsr(MSR_TSC_DEADLINE, 0);
    lapic_write(APIC_LVT_TIMER, 1 << 16 | u32::from(VEC_TIMER));
    expect("fired", fired.into(), 1)?;
    if at < deadline {
        return Err(fail("TSC at the interrupt", at, deadline));
    }
    expect("IA32_TSC_DEADLINE after it fired", msr, 0)?;
    pass(expect("a deadline in the past fired", past.into(), 1))
}

/// The PIT's IRQ 0 through I/O APIC pin 2 (edge): periodic in mode 2 (EOI after each),
/// then exactly one interrupt from mode 0.
fn ioapic_pit() -> Verdict {
    route(2, VEC_PIT, false, false);
    let n = PIT_IRQS.load(Ordering::SeqCst);
    pit_program(0, 2, 1193); // 1 ms
    let periodic = wait(2000, || PIT_IRQS.load(Ordering::SeqCst) >= n + 5);
    // Mode 0's control word stops the counter with OUT low until the count comes.
    arch::outb(0x43, 0x30);
    delay(10);
    let n = PIT_IRQS.load(Ordering::SeqCst);
    arch::outb(0x40, (2386 & 0xff) as u8);
    arch::outb(0x40, (2386 >> 8) as u8);
    let once = wait(1000, || PIT_IRQS.load(Ordering::SeqCst) > n);
    delay(30);
    let total = PIT_IRQS.load(Ordering::SeqCst) - n;
    route(2, VEC_PIT, false, true);
    expect("five mode 2 interrupts", periodic.into(), 1)?;
    expect("mode 0 fired", once.into(), 1)?;
    pass(expect("mode 0 interrupts", total, 1))
}

/// The RTC's update-ended interrupt (register B UIE) through I/O APIC pin 8 (edge):
/// register C has IRQF and UF, and the seconds are a valid time.
fn rtc_update() -> Verdict {
    route(8, VEC_RTC_UPDATE, false, false);
    cmos_read(0x0c);
    let b = cmos_read(0x0b);
    let n = RTC_IRQS.load(Ordering::SeqCst);
    cmos_write(0x0b, (b & !0x70) | 0x10);
    let fired = wait(3000, || RTC_IRQS.load(Ordering::SeqCst) > n);
    cmos_write(0x0b, b & !0x70);
    cmos_read(0x0c);
    route(8, VEC_RTC_UPDATE, false, true);
    let sec = cmos_read(0x00);
    let sec = if b & 0x04 == 0 {
        (sec >> 4) * 10 + (sec & 0xf)
    } else {
        sec
    };
    expect("update interrupt", fired.into(), 1)?;
    expect(
        "register C (IRQF, UF)",
        RTC_C.load(Ordering::SeqCst) & 0x90,
        0x90,
    )?;
    if sec > 59 {
        return Err(fail("seconds", sec.into(), 59));
    }
    Ok(None)
}

/// A level-triggered I/O APIC pin (8, the RTC's periodic interrupt, whose line stays
/// asserted until register C is read): Remote IRR set on delivery, no second delivery
/// before the EOI, delivered again after an EOI with the line still asserted, and quiet
/// once register C is read and the interrupt ended.
fn ioapic_level_eoi() -> Verdict {
    const REMOTE_IRR: u32 = 1 << 14;
    route(8, VEC_RTC_LEVEL, true, false);
    let a = cmos_read(0x0a);
    cmos_write(0x0a, (a & 0xf0) | 0x06); // 1024 Hz
    cmos_read(0x0c);
    let b = cmos_read(0x0b);
    LEVEL_IRQS.store(0, Ordering::SeqCst);
    cmos_write(0x0b, (b & !0x70) | 0x40);
    let first = wait(1000, || LEVEL_IRQS.load(Ordering::SeqCst) >= 1);
    let irr_delivered = ioapic_read(0x10 + 16) & REMOTE_IRR;
    delay(20);
    let before_eoi = LEVEL_IRQS.load(Ordering::SeqCst);
    eoi();
    let again = wait(1000, || LEVEL_IRQS.load(Ordering::SeqCst) >= 2);
    cmos_write(0x0b, b & !0x70);
    cmos_read(0x0c);
    eoi();
    delay(20);
    let end = LEVEL_IRQS.load(Ordering::SeqCst);
    let irr_end = ioapic_read(0x10 + 16) & REMOTE_IRR;
    route(8, VEC_RTC_LEVEL, true, true);
    cmos_write(0x0a, a);
    expect("delivered", first.into(), 1)?;
    expect(
        "Remote IRR after delivery",
        irr_delivered.into(),
        REMOTE_IRR.into(),
    )?;
    expect("deliveries before the EOI", before_eoi, 1)?;
    expect("delivered again after the EOI", again.into(), 1)?;
    expect("deliveries after register C and EOI", end, 2)?;
    pass(expect("Remote IRR at the end", irr_end.into(), 0))
}

/// INIT-SIPI-SIPI to APIC ID 1: it runs the trampoline once (the second SIPI finds it
/// running), with APIC ID 1.
fn smp_start() -> Verdict {
    let started = start_ap();
    delay(20);
    expect("vCPU 1 ready", started.into(), 1)?;
    expect("vCPU 1 starts", AP_STARTS.load(Ordering::SeqCst), 1)?;
    pass(expect(
        "vCPU 1 APIC ID",
        AP_APIC_ID.load(Ordering::SeqCst),
        1,
    ))
}

/// A fixed IPI to vCPU 1, which answers with one to vCPU 0; and a self-IPI.
fn ipi_fixed() -> Verdict {
    let (pings, pongs) = (PINGS.load(Ordering::SeqCst), PONGS.load(Ordering::SeqCst));
    send_ipi(1, ICR_ASSERT | ICR_FIXED | u32::from(VEC_PING));
    let back = wait(1000, || PONGS.load(Ordering::SeqCst) > pongs);
    expect("answer from vCPU 1", back.into(), 1)?;
    expect("IPIs vCPU 1 took", PINGS.load(Ordering::SeqCst) - pings, 1)?;
    let pongs = PONGS.load(Ordering::SeqCst);
    send_ipi(0, ICR_ASSERT | ICR_FIXED | ICR_SELF | u32::from(VEC_PONG));
    let own = wait(1000, || PONGS.load(Ordering::SeqCst) > pongs);
    pass(expect("self IPI", own.into(), 1))
}

/// An NMI IPI to vCPU 1 (halted): its NMI handler runs once.
fn ipi_nmi() -> Verdict {
    let n = NMIS[1].load(Ordering::SeqCst);
    send_ipi(1, ICR_ASSERT | ICR_NMI);
    let got = wait(1000, || NMIS[1].load(Ordering::SeqCst) > n);
    delay(10);
    expect("NMI on vCPU 1", got.into(), 1)?;
    pass(expect("NMIs", NMIS[1].load(Ordering::SeqCst) - n, 1))
}

/// CPUID agrees between the vCPUs but for the APIC ID (leaf 1 EBX 31..24), which is
/// each one's local APIC ID.
fn cpuid_smp() -> Verdict {
    expect("vCPU 1 answered", ap_command(OP_SNAPSHOT, 0).into(), 1)?;
    for (i, leaf) in LEAVES.iter().enumerate() {
        let (a, b, c, d) = arch::cpuid(*leaf, 0);
        let mine = [a, b, c, d];
        for (r, slot) in SNAP.cpuid[i].iter().enumerate() {
            let (mut theirs, mut ours) = (slot.load(Ordering::SeqCst), mine[r]);
            if *leaf == 1 && r == 1 {
                expect("vCPU 1 leaf 1 EBX APIC ID", (theirs >> 24).into(), 1)?;
                theirs &= 0x00ff_ffff;
                ours &= 0x00ff_ffff;
            }
            if theirs != ours {
                return Err(fail(
                    "a CPUID register of vCPU 1 (got) and vCPU 0 (want)",
                    u64::from(*leaf) << 32 | u64::from(theirs),
                    u64::from(*leaf) << 32 | u64::from(ours),
                ));
            }
        }
    }
    Ok(None)
}

/// MSRs agree between the vCPUs: IA32_APIC_BASE (but for the BSP flag), PAT, EFER; and
/// each has its own TSC_AUX, which RDTSCP returns.
fn msr_smp() -> Verdict {
    expect("vCPU 1 answered", ap_command(OP_SNAPSHOT, 0).into(), 1)?;
    for (slot, msr) in SNAP.msr.iter().zip(MSRS) {
        let (mut theirs, mut ours) = (slot.load(Ordering::SeqCst), arch::rdmsr(msr));
        if msr == MSR_APIC_BASE {
            expect("vCPU 1 IA32_APIC_BASE.BSP", theirs & 0x100, 0)?;
            expect("vCPU 0 IA32_APIC_BASE.BSP", ours & 0x100, 0x100)?;
            theirs &= !0x100;
            ours &= !0x100;
        }
        if theirs != ours {
            return Err(fail(
                "an MSR of vCPU 1 (got) and vCPU 0 (want)",
                theirs,
                ours,
            ));
        }
    }
    if !has_rdtscp() {
        return Ok(Some("no RDTSCP: TSC_AUX not checked"));
    }
    arch::wrmsr(MSR_TSC_AUX, 0x100);
    expect("vCPU 0 TSC_AUX", arch::rdmsr(MSR_TSC_AUX), 0x100)?;
    expect("vCPU 0 RDTSCP aux", rdtscp_aux().into(), 0x100)?;
    expect("vCPU 1 TSC_AUX", SNAP.tsc_aux.load(Ordering::SeqCst), 0x101)?;
    pass(expect(
        "vCPU 1 RDTSCP aux",
        SNAP.rdtscp_aux.load(Ordering::SeqCst),
        0x101,
    ))
}

/// vCPU 1's TSC, read between two reads of vCPU 0's, lies between them.
fn tsc_smp() -> Verdict {
    let t0 = arch::rdtsc();
    let answered = ap_command(OP_SNAPSHOT, 0);
    let t2 = arch::rdtsc();
    expect("vCPU 1 answered", answered.into(), 1)?;
    let t1 = SNAP.tsc.load(Ordering::SeqCst);
    if t1 < t0 {
        return Err(fail("vCPU 1 TSC not before vCPU 0's", t1, t0));
    }
    if t1 > t2 {
        return Err(fail("vCPU 1 TSC not after vCPU 0's", t1, t2));
    }
    Ok(None)
}

/// INIT to vCPU 1 (after it set its TPR) resets it: SIPIs start it again with TPR 0,
/// once, and it answers IPIs.
fn ipi_init() -> Verdict {
    expect("TPR set on vCPU 1", ap_command(OP_TPR, 0x10).into(), 1)?;
    let starts = AP_STARTS.load(Ordering::SeqCst);
    let started = start_ap();
    delay(20);
    expect("vCPU 1 ready again", started.into(), 1)?;
    expect(
        "vCPU 1 starts",
        AP_STARTS.load(Ordering::SeqCst) - starts,
        1,
    )?;
    expect(
        "vCPU 1 TPR after INIT",
        AP_ENTRY_TPR.load(Ordering::SeqCst),
        0,
    )?;
    let pongs = PONGS.load(Ordering::SeqCst);
    send_ipi(1, ICR_ASSERT | ICR_FIXED | u32::from(VEC_PING));
    let back = wait(1000, || PONGS.load(Ordering::SeqCst) > pongs);
    pass(expect("answer from vCPU 1 after INIT", back.into(), 1))
}
