//! Debug registers (SDM vol. 3B 18.2): the breakpoint addresses DR0–DR3 and the status
//! DR6, which neither VT-x nor SVM switches between host and guest. The kernel never
//! enables a breakpoint of its own (DR7 is 0x400 in the host: VT-x loads it on every
//! VM exit, SVM restores the host's value), so whatever DR0–DR3 and DR6 hold matters
//! only to the guest whose values they are.

use core::arch::asm;

/// DR6 with no condition recorded: its reserved bits (4–11, 16–31) set, RTM (16) set
/// too (active low).
pub const DR6_INIT: u64 = 0xffff_0ff0;
/// DR6 bits B0–B3: breakpoint conditions met.
pub const DR6_B: u64 = 0xf;
/// DR6.BD: general detect (a MOV DR with DR7.GD set).
pub const DR6_BD: u64 = 1 << 13;
/// DR6.BS: single step.
pub const DR6_BS: u64 = 1 << 14;
/// DR6.RTM: clear (active low) for a #DB in a transaction.
pub const DR6_RTM: u64 = 1 << 16;
/// DR7.GD: general detect enable.
pub const DR7_GD: u64 = 1 << 13;
/// DR7 bits L0–L3 and G0–G3: a breakpoint is enabled.
pub const DR7_ENABLED: u64 = 0xff;

/// Reads DR0–DR3.
pub fn read_db() -> [u64; 4] {
    let (a, b, c, d): (u64, u64, u64, u64);
    // SAFETY: reading debug registers at CPL 0 has no side effects (DR7.GD is clear in
    // the host: nothing raises a general-detect #DB).
    unsafe {
        asm!("mov {}, dr0", "mov {}, dr1", "mov {}, dr2", "mov {}, dr3",
             out(reg) a, out(reg) b, out(reg) c, out(reg) d,
             options(nomem, nostack, preserves_flags))
    };
    [a, b, c, d]
}

/// Loads DR0–DR3.
///
/// # Safety
/// No breakpoint of the host may be enabled in DR7 (the kernel enables none): the
/// addresses take effect only where a guest's DR7 enables them.
pub unsafe fn write_db(v: [u64; 4]) {
    // SAFETY: forwarded to the caller; any 64-bit value is a valid breakpoint address.
    unsafe {
        asm!("mov dr0, {}", "mov dr1, {}", "mov dr2, {}", "mov dr3, {}",
             in(reg) v[0], in(reg) v[1], in(reg) v[2], in(reg) v[3],
             options(nomem, nostack, preserves_flags))
    };
}

/// Reads DR6.
pub fn read_dr6() -> u64 {
    let v: u64;
    // SAFETY: as in `read_db`.
    unsafe { asm!("mov {}, dr6", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes DR6.
///
/// # Safety
/// Bits 32–63 of `v` must be clear (else #GP); the host never reads DR6.
pub unsafe fn write_dr6(v: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("mov dr6, {}", in(reg) v, options(nomem, nostack, preserves_flags)) };
}

/// DR6 after a #DB whose conditions are `payload` (B0–B3, BD, BS, and RTM set for a
/// #DB inside a transaction: the VT-x exit-qualification form), starting from `dr6`:
/// what the processor writes when it delivers the #DB (B0–B3 replaced, BD and BS
/// added, RTM cleared when the payload has it).
pub fn dr6_after(dr6: u64, payload: u64) -> u64 {
    let p = payload & (DR6_B | DR6_BD | DR6_BS | DR6_RTM);
    ((dr6 & !DR6_B) | DR6_INIT | p) ^ (p & DR6_RTM)
}
