//! Starting the application processors: INIT-SIPI-SIPI into a real-mode trampoline at
//! [`TRAMPOLINE`], straight to long mode, then `ap_main` on the AP's own kernel stack.

use core::sync::atomic::Ordering;

use super::stack::{self, Stack};
use super::{apic, cr, paging};
use crate::mem::layout::phys_to_ptr;
use crate::mem::pool;
use crate::platform::percpu;

/// Physical address of the trampoline page (below 1 MiB, outside the frame pool).
pub const TRAMPOLINE: u64 = 0x8000;
const PARAMS: u64 = TRAMPOLINE + 0xf00;

extern "C" {
    static trampoline_start: u8;
    static trampoline_end: u8;
    fn ap_entry64();
}

/// Busy-waits `us` microseconds on the TSC.
pub fn udelay(us: u64) {
    let end = cr::rdtsc() + us * apic::tsc_khz().max(1) / 1000;
    while cr::rdtsc() < end {
        cr::pause();
    }
}

/// Builds the temporary page table the trampoline needs (below 4 GiB): identity map of
/// the first 2 MiB plus the kernel half. Returns (pml4, [frames to free]).
fn trampoline_root() -> (u64, [u64; 3]) {
    let pml4 = pool::alloc_frame_zeroed().expect("smp: no frame");
    let pdpt = pool::alloc_frame_zeroed().expect("smp: no frame");
    let pd = pool::alloc_frame_zeroed().expect("smp: no frame");
    assert!(pml4 < (1 << 32), "trampoline CR3 must be below 4 GiB");
    // SAFETY: three fresh pool frames, mapped in the physmap and owned here.
    unsafe {
        let k = &*phys_to_ptr::<[u64; 512]>(paging::kernel_root());
        let t = &mut *phys_to_ptr::<[u64; 512]>(pml4);
        t[256..].copy_from_slice(&k[256..]);
        t[0] = pdpt | 3;
        (*phys_to_ptr::<[u64; 512]>(pdpt))[0] = pd | 3;
        (*phys_to_ptr::<[u64; 512]>(pd))[0] = 0x83; // 2 MiB at 0, present, writable
    }
    (pml4, [pml4, pdpt, pd])
}

/// Starts CPUs 1.. one after the other (each waits for the previous to be online).
/// Returns the number of CPUs online.
pub fn start_aps(apic_ids: &[u32]) -> usize {
    if apic_ids.len() <= 1 {
        return 1;
    }
    let src = core::ptr::addr_of!(trampoline_start);
    let len = core::ptr::addr_of!(trampoline_end) as usize - src as usize;
    assert!(len < 0xf00, "trampoline too large");
    // SAFETY: page 0x8000 is conventional memory below 1 MiB, never in the frame pool.
    unsafe { core::ptr::copy_nonoverlapping(src, phys_to_ptr::<u8>(TRAMPOLINE), len) };
    let (root, frames) = trampoline_root();
    let mut online = 1;
    for (cpu, &apic_id) in apic_ids.iter().enumerate().skip(1) {
        // Mapped by `stack::map_all` before.
        let top = stack::top(cpu, Stack::Kernel);
        percpu::prepare(cpu, apic_id, top);
        let params = [
            root,
            cr::read_cr4(),
            // SAFETY: reading EFER is always possible in long mode.
            unsafe { super::msr::rdmsr(super::msr::Msr::Efer) },
            top,
            ap_entry64 as *const () as u64,
            cpu as u64,
            paging::kernel_root(),
        ];
        for (i, v) in params.iter().enumerate() {
            // SAFETY: the parameter block lies in the trampoline page.
            unsafe { phys_to_ptr::<u64>(PARAMS + 8 * i as u64).write_volatile(*v) };
        }
        let p = percpu::get(cpu);
        apic::send_init(apic_id);
        udelay(10_000);
        let page = (TRAMPOLINE >> 12) as u8;
        apic::send_sipi(apic_id, page);
        let mut ok = wait_online(p, 200);
        if !ok {
            apic::send_sipi(apic_id, page);
            ok = wait_online(p, 1_000_000);
        }
        if ok {
            online += 1;
        } else {
            crate::kprintln!("cpu {} (apic {}) did not start", cpu, apic_id);
        }
    }
    for f in frames {
        pool::free_frame(f);
    }
    online
}

fn wait_online(p: &percpu::PerCpu, us: u64) -> bool {
    let end = cr::rdtsc() + us * apic::tsc_khz().max(1) / 1000;
    while cr::rdtsc() < end {
        if p.online.load(Ordering::Acquire) {
            return true;
        }
        cr::pause();
    }
    p.online.load(Ordering::Acquire)
}
