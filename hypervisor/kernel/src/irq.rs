//! Device interrupts: each GSI has a semaphore in the kernel PD; its interrupt is an
//! `up`. Level-triggered lines stay masked from delivery until the next `down`.
//!
//! GSIs below [`msi_base`] are I/O APIC pins; the rest are message-signalled: routing
//! one answers the MSI address and data its device must send (the vector is fixed per
//! GSI, so the message names the GSI), and its interrupts are edge-triggered.

use alloc::sync::Arc;

use peregrine_abi::hypercall::gsi_flags;
use peregrine_abi::Status;
use spin::Mutex;

use crate::sm::Sm;

/// GSIs the kernel routes (vectors `VECTOR_BASE + gsi`), pins and messages together.
pub const MAX_GSI: usize = 128;
const _: () =
    assert!(VECTOR_BASE as usize + MAX_GSI - 1 <= crate::arch::x86::idt::VEC_GSI_LAST as usize);

/// The first message-signalled GSI: the I/O APICs' pins come first.
pub fn msi_base() -> u32 {
    crate::arch::x86::ioapic::num_gsis().min(MAX_GSI as u32)
}
/// Vector of GSI 0.
pub const VECTOR_BASE: u8 = crate::arch::x86::idt::VEC_GSI_BASE;

const NONE: Option<Arc<Sm>> = None;
static GSI_SM: Mutex<[Option<Arc<Sm>>; MAX_GSI]> = Mutex::new([NONE; MAX_GSI]);

/// Records the semaphore of a GSI (boot).
pub fn register_gsi_sm(gsi: u32, sm: Arc<Sm>) {
    if let Some(s) = GSI_SM.lock().get_mut(gsi as usize) {
        *s = Some(sm);
    }
}

/// Routes a GSI to a CPU (`assign_gsi`); for a message-signalled GSI the answer is its
/// MSI address and data (0 for a pin).
pub fn route_gsi(gsi: u32, cpu: usize, flags: u64) -> Result<u64, Status> {
    if gsi as usize >= MAX_GSI {
        return Err(Status::BadDevice);
    }
    if gsi >= msi_base() {
        return crate::arch::msi_route(VECTOR_BASE + gsi as u8, cpu).map_err(|_| Status::BadCpu);
    }
    let (level, low) = if flags & gsi_flags::DEFAULT != 0 {
        crate::arch::gsi_default_mode(gsi)
    } else {
        (
            flags & gsi_flags::LEVEL != 0,
            flags & gsi_flags::ACTIVE_LOW != 0,
        )
    };
    crate::arch::ioapic_route(gsi, VECTOR_BASE + gsi as u8, cpu, level, low)
        .map(|()| 0)
        .map_err(|_| Status::BadDevice)
}

/// Unmasks a level-triggered GSI (its semaphore was taken down).
pub fn unmask_gsi(gsi: u32) {
    crate::arch::ioapic_unmask(gsi);
}

/// A device interrupt arrived on `vector`.
pub fn interrupt(vector: u8, cpu: &mut crate::cpu::Cpu) {
    if vector < VECTOR_BASE {
        return;
    }
    let gsi = (vector - VECTOR_BASE) as usize;
    let sm = GSI_SM.lock().get(gsi).cloned().flatten();
    if let Some(sm) = sm {
        if sm.gsi().is_some_and(|g| g.level) {
            crate::arch::ioapic_mask(gsi as u32);
        }
        sm.up(cpu);
    }
}
