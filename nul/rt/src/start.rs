//! The entry point, the initial stack and the panic handler.
//!
//! Every component is entered at `_start` with `rdi` = an argument (the HIP address for
//! the root, a start-info address for others) and `rsi` = the address of its UTCB. The
//! stack is ours: `_start` switches to a static one before calling Rust.

use core::sync::atomic::{AtomicUsize, Ordering};

const STACK_SIZE: usize = 64 * 1024;

#[repr(align(16))]
#[allow(dead_code)] // only its address is used
struct Stack([u8; STACK_SIZE]);

#[no_mangle]
static mut NUL_MAIN_STACK: Stack = Stack([0; STACK_SIZE]);

core::arch::global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "lea rsp, [rip + NUL_MAIN_STACK + {size}]",
    "xor ebp, ebp",
    "call {entry}",
    "ud2",
    size = const STACK_SIZE,
    entry = sym rt_start,
);

extern "Rust" {
    /// The component's main function, defined by [`entry!`](crate::entry).
    fn __nul_main(arg: u64) -> !;
}

extern "C" fn rt_start(arg: u64, utcb: u64) -> ! {
    crate::utcb::set_main(utcb);
    crate::heap::init();
    crate::sync::init();
    // SAFETY: `__nul_main` is defined exactly once by the component's `entry!` macro
    // with this signature.
    unsafe { __nul_main(arg) }
}

/// Declares the component's main function: `fn main(arg: u64) -> !`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        fn __nul_main(arg: u64) -> ! {
            let f: fn(u64) -> ! = $main;
            f(arg)
        }
    };
}

static PANIC_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Installs a function the panic handler calls after printing (the root ends the
/// machine; others fault so the root reports and removes them).
pub fn set_panic_hook(f: fn() -> !) {
    PANIC_HOOK.store(f as usize, Ordering::Relaxed);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::println!("panic: {}", info);
    let h = PANIC_HOOK.load(Ordering::Relaxed);
    if h != 0 {
        // SAFETY: the only non-zero value ever stored is a `fn() -> !` (set_panic_hook).
        let f: fn() -> ! = unsafe { core::mem::transmute::<usize, fn() -> !>(h) };
        f();
    }
    // An invalid opcode: the root's exception portal reports the component and
    // removes it.
    loop {
        // SAFETY: ud2 only raises #UD, which the kernel delivers to our event portal.
        unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    }
}

/// Blocks the running EC for good (a down on a private semaphore nobody ups; without
/// one, for want of quota, it spins politely).
pub fn block_forever() -> ! {
    let sm = crate::sel::alloc();
    let _ = crate::hc::create_sm(sm, crate::sel::OWN_PD, 0);
    loop {
        let _ = crate::hc::sm_down(sm, false, 0);
        core::hint::spin_loop();
    }
}
