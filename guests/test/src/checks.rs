//! Mode 1, the check list: each check prints `check <name> ok` or
//! `check <name> FAIL <detail>`; the end code is the number of the first failing check
//! (1-based, in the order of [`CHECKS`]), 0 when all passed.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::arch::{self, Frame};
use crate::{println, CURRENT_CHECK, INTEL, WAKEUPS};

/// #GP error code expected from the host (set while the exception check runs).
static EXPECT_GP: AtomicBool = AtomicBool::new(false);
/// Error code of the last expected #GP, `u64::MAX` before.
static GP_ERROR: AtomicU64 = AtomicU64::new(u64::MAX);
/// Set by vCPU 1 once it ran its part of the smp check.
static SMP_FLAG: AtomicU64 = AtomicU64::new(0);

/// A check's verdict: `Err` carries the detail printed after `FAIL`.
type Verdict = Result<(), Detail>;

/// A short failure detail.
pub struct Detail {
    pub what: &'static str,
    pub got: u64,
    pub want: u64,
}

pub fn expect(what: &'static str, got: u64, want: u64) -> Verdict {
    if got == want {
        Ok(())
    } else {
        Err(Detail { what, got, want })
    }
}

/// A check's name and function.
type Check = (&'static str, fn() -> Verdict);

/// The check list in order.
const CHECKS: &[Check] = &[
    ("cpuid", cpuid),
    ("pio_out", pio_out),
    ("pio_in", pio_in),
    ("mmio_read", mmio_read),
    ("mmio_write", mmio_write),
    ("hypercall", hypercall),
    ("hlt", hlt),
    ("rdtsc", rdtsc),
    ("msr", msr),
    ("exception", exception),
    ("smp", smp),
    ("pio_string", pio_string),
];

/// Runs the check list (`smp` only with `cpus` ≥ 2) and returns the end code.
pub fn run(cpus: u64) -> u32 {
    let mut first_fail = 0;
    for (i, (name, check)) in CHECKS.iter().enumerate() {
        if *name == "smp" && cpus < 2 {
            continue;
        }
        let number = i as u32 + 1;
        CURRENT_CHECK.store(number, Ordering::Relaxed);
        match check() {
            Ok(()) => println!("check {} ok", name),
            Err(d) => {
                println!(
                    "check {} FAIL {}: got {:#x}, want {:#x}",
                    name, d.what, d.got, d.want
                );
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

fn cpuid() -> Verdict {
    let (max, b, c, d) = arch::cpuid(0, 0);
    let vendor = [b, d, c];
    let known = [
        [0x756e_6547, 0x4965_6e69, 0x6c65_746e], // GenuineIntel
        [0x6874_7541, 0x6974_6e65, 0x444d_4163], // AuthenticAMD
    ];
    if !known.contains(&vendor) {
        return Err(Detail {
            what: "vendor (ebx)",
            got: b.into(),
            want: known[1][0].into(),
        });
    }
    if max < 1 {
        return expect("max leaf", max.into(), 1);
    }
    let (sig, ..) = arch::cpuid(1, 0);
    let family = (sig >> 8) & 0xf;
    if family == 0 {
        return expect("leaf 1 family", family.into(), 6);
    }
    Ok(())
}

/// A no-op `out`, then `out`s to the echo port that only the written values reaching
/// the host can make read back.
fn pio_out() -> Verdict {
    arch::outb(crate::PORT_NOP, 0);
    for v in [0x1357_9bdf_u32, 0xeca8_6420] {
        arch::outl(crate::PORT_ECHO, v);
        expect(
            "in 0x82 after out",
            arch::inl(crate::PORT_ECHO).into(),
            v.into(),
        )?;
    }
    Ok(())
}

fn pio_in() -> Verdict {
    expect(
        "in 0x81",
        arch::inl(crate::PORT_MAGIC).into(),
        crate::MAGIC_IN.into(),
    )
}

/// String I/O: `rep insd` from the magic port fills exactly the elements RCX counts and
/// moves RDI past them; `rep outsd` to the echo port leaves the last element there.
fn pio_string() -> Verdict {
    let mut buf = [0u32; 4];
    let dst = buf.as_mut_ptr();
    let (left, end): (u64, u64);
    // SAFETY: the instruction writes two dwords at `dst`, inside `buf`; DF is clear (the
    // ABI's state at every Rust call).
    unsafe {
        core::arch::asm!("rep insd", in("dx") crate::PORT_MAGIC, inout("rdi") dst => end,
                         inout("rcx") 2u64 => left, options(nostack));
    }
    expect("rcx after rep insd", left, 0)?;
    expect("rdi after rep insd", end, dst as u64 + 8)?;
    for (i, want) in [crate::MAGIC_IN, crate::MAGIC_IN, 0, 0]
        .into_iter()
        .enumerate()
    {
        // SAFETY: `buf` is live; the volatile read sees what the emulated store wrote.
        let got = unsafe { core::ptr::read_volatile(dst.add(i)) };
        expect("element after rep insd", got.into(), want.into())?;
    }
    let src = [0x2468_ace0_u32, 0x1357_9bdf];
    let (left, end): (u64, u64);
    // SAFETY: the instruction reads the two dwords of `src`; DF is clear.
    unsafe {
        core::arch::asm!("rep outsd", in("dx") crate::PORT_ECHO, inout("rsi") src.as_ptr() => end,
                         inout("rcx") 2u64 => left, options(nostack, readonly));
    }
    expect("rcx after rep outsd", left, 0)?;
    expect("rsi after rep outsd", end, src.as_ptr() as u64 + 8)?;
    expect(
        "in 0x82 after rep outsd",
        arch::inl(crate::PORT_ECHO).into(),
        src[1].into(),
    )
}

fn mmio(offset: u64) -> *mut u64 {
    (crate::MMIO_REG + offset) as *mut u64
}

fn mmio_read() -> Verdict {
    // SAFETY: the host emulates the unbacked 8-byte register (identity-mapped).
    let v = unsafe { mmio(0).read_volatile() };
    expect("read", v, crate::MMIO_INIT)?;
    // SAFETY: as above, a 4-byte read of its low half.
    let lo = unsafe { (mmio(0) as *const u32).read_volatile() };
    expect("read32", lo.into(), crate::MMIO_INIT & 0xffff_ffff)
}

fn mmio_write() -> Verdict {
    let value = 0x0123_4567_89ab_cdef;
    // SAFETY: as for `mmio_read`.
    let back = unsafe {
        mmio(0).write_volatile(value);
        mmio(0).read_volatile()
    };
    expect("read back", back, value)
}

/// KVM answers unknown hypercalls itself with -KVM_ENOSYS.
const KVM_ENOSYS: u64 = -1000i64 as u64;

fn under_kvm() -> bool {
    let (_, b, c, d) = arch::cpuid(0x4000_0000, 0);
    (b, c, d) == (0x4b4d_564b, 0x564b_4d56, 0x4d)
}

fn hypercall() -> Verdict {
    let ret = arch::hypercall(INTEL.load(Ordering::Relaxed), crate::HYPERCALL_NR, 41);
    if ret == KVM_ENOSYS && under_kvm() {
        // Documented in the contract: KVM handles every hypercall in its kernel.
        return Ok(());
    }
    expect("rax", ret, 42)
}

fn hlt() -> Verdict {
    let before = WAKEUPS.load(Ordering::Relaxed);
    arch::halt_once();
    expect("wake-ups", WAKEUPS.load(Ordering::Relaxed) - before, 1)
}

/// The TSC never goes back, and it moves on while the guest runs. (Two reads in a row
/// may be equal in an emulator that advances time in batches, as Bochs does with two
/// CPUs: only a read after some work must be larger.)
fn rdtsc() -> Verdict {
    let a = arch::rdtsc();
    let b = arch::rdtsc();
    if b < a {
        return expect("second rdtsc not before the first", b, a);
    }
    for _ in 0..100_000 {
        let c = arch::rdtsc();
        if c > a {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    expect("rdtsc after 100,000 reads moved past", arch::rdtsc(), a + 1)
}

fn msr() -> Verdict {
    expect("initial", arch::rdmsr(crate::MSR_SYNTH), 0)?;
    let value = 0x1234_5678_9abc_def0;
    arch::wrmsr(crate::MSR_SYNTH, value);
    expect("read back", arch::rdmsr(crate::MSR_SYNTH), value)
}

fn exception() -> Verdict {
    let code = 0x5a8;
    GP_ERROR.store(u64::MAX, Ordering::Relaxed);
    EXPECT_GP.store(true, Ordering::SeqCst);
    arch::outl(crate::PORT_INJECT_GP, code);
    EXPECT_GP.store(false, Ordering::SeqCst);
    expect(
        "#GP error code",
        GP_ERROR.load(Ordering::Relaxed),
        code.into(),
    )
}

fn smp() -> Verdict {
    arch::outl(crate::PORT_START_CPU, 1);
    let start = arch::rdtsc();
    // Generous: under icount a tick is an instruction; the host starts a thread.
    while SMP_FLAG.load(Ordering::Acquire) == 0 {
        if arch::rdtsc() - start > 20_000_000_000 {
            return expect("vCPU 1 flag", 0, 1);
        }
        core::hint::spin_loop();
    }
    Ok(())
}

/// vCPU 1's part of the smp check: cpuid, a port out, the flag; then it halts.
pub fn secondary() -> ! {
    let (max, ..) = arch::cpuid(0, 0);
    arch::outb(crate::PORT_NOP, 1);
    SMP_FLAG.store(u64::from(max) | 1 << 32, Ordering::Release);
    arch::park()
}

/// The expected #GP of the exception check: records its error code.
pub fn trap(frame: &mut Frame) -> bool {
    if frame.vector == 13 && EXPECT_GP.load(Ordering::SeqCst) {
        GP_ERROR.store(frame.error, Ordering::Relaxed);
        return true;
    }
    false
}
