//! Platform bring-up: from the 64-bit entry to every CPU online and idle.

use core::sync::atomic::Ordering;

use peregrine_abi::hip::{mem_kind, MemDesc, MAX_CPUS};
use spin::Once;

use crate::arch::x86::{acpi, apic, cpu, gdt, idt, ioapic, pic, smp, spec, stack, syscall, timer};
use crate::kprintln;
use crate::mem::{self, heap, layout, pool, PAGE_SIZE};
use crate::platform::{multiboot, percpu};

/// Timer interrupts per second on every CPU while idle.
pub const TIMER_HZ: u32 = 1000;

/// What bring-up found.
#[derive(Debug)]
pub struct Platform {
    /// Physical address of the ACPI RSDP (0 if none).
    pub rsdp: u64,
    /// CPUs online (indices 0..num_cpus; APIC ids in `percpu::get(i).apic_id`).
    pub num_cpus: usize,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// LAPIC timer input frequency in kHz.
    pub bus_khz: u64,
}

static PLATFORM: Once<Platform> = Once::new();

/// The platform description (after bring-up).
pub fn platform() -> &'static Platform {
    PLATFORM.get().expect("platform not up")
}

/// IST stack pointers per CPU (NMI, #DF, #MC).
static mut IST: [[u64; 3]; MAX_CPUS] = [[0; 3]; MAX_CPUS];

/// The BSP's IST stacks until its guarded stacks are mapped (early boot only, like the
/// boot stack in `boot.S`).
#[repr(C, align(16))]
struct EarlyStack([u8; 8192]);
static mut EARLY_IST: [EarlyStack; 3] = [const { EarlyStack([0; 8192]) }; 3];

extern "C" {
    static boot_stack_top: u8;
}

/// The TSC at [`kmain`]'s first instruction (the HIP's `boot_tsc`).
pub static BOOT_TSC: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// The 64-bit entry from `boot.S` on the BSP.
#[no_mangle]
pub extern "C" fn kmain(mb_magic: u32, mb_info_phys: u32) -> ! {
    BOOT_TSC.store(crate::arch::rdtsc(), core::sync::atomic::Ordering::Relaxed);
    crate::arch::x86::serial::init();
    kprintln!();
    // Descriptor tables first, so that early faults are reported.
    let kstack = core::ptr::addr_of!(boot_stack_top) as u64;
    percpu::prepare(0, 0, kstack);
    // SAFETY: single-threaded boot; EARLY_IST is only used as CPU 0's first IST stacks.
    let ist = unsafe {
        let s = &*core::ptr::addr_of!(EARLY_IST);
        [0, 1, 2].map(|i| stack::ist_entry(0, s[i].0.as_ptr() as u64 + 8192))
    };
    // SAFETY: BSP bring-up, once; stacks are valid.
    unsafe {
        (*core::ptr::addr_of_mut!(IST))[0] = ist;
        gdt::init(0, kstack, ist);
        percpu::install(0);
    }
    idt::init();
    idt::load();
    let info = cpu::detect();
    crate::fpu::init();
    // SAFETY: BSP bring-up, once.
    unsafe {
        cpu::init_cpu();
        syscall::init_cpu();
    }
    if mb_magic != multiboot::BOOT_MAGIC {
        panic!("not started by a Multiboot loader (magic {mb_magic:#x})");
    }
    // SAFETY: the loader's pointer, boot page tables still map 0..4 GiB at the physmap.
    let bi = unsafe { multiboot::parse(u64::from(mb_info_phys)) };
    spec::init(bi.has_arg("mitigations=off"));
    // SAFETY: BSP bring-up, once, after `spec::init`; the kernel touches no user page.
    unsafe { spec::init_cpu() };

    let mut reserved = [(0u64, 0u64); 2 + 4 + 2 * multiboot::MAX_MODULES];
    let mut n = 0;
    let mut add = |r: (u64, u64)| {
        if n < reserved.len() {
            reserved[n] = (
                mem::align_down(r.0, PAGE_SIZE),
                mem::align_up(r.1, PAGE_SIZE),
            );
            n += 1;
        }
    };
    add((0, 0x10_0000));
    add(layout::image_phys());
    bi.info_ranges[..bi.info_ranges_len]
        .iter()
        .for_each(|&r| add(r));
    bi.modules().iter().for_each(|m| add((m.start, m.end)));
    pool::init(bi, &reserved[..n]);
    // SAFETY: BSP, once, after the frame pool exists; NX matches EFER.NXE.
    unsafe { crate::arch::x86::paging::init(bi, info.nx) };
    heap::init();

    // From here on the BSP runs on its guarded stacks (`stack`): the boot stack in
    // `boot.S` and EARLY_IST are left behind.
    let ist = stack::map_all(0);
    let top = stack::top(0, stack::Stack::Kernel);
    percpu::get(0).kstack_top.store(top, Ordering::Relaxed);
    gdt::set_stacks(top, ist);
    // SAFETY: `top` is the top of this CPU's freshly mapped kernel stack; nothing on the
    // boot stack is used again (`kmain_bsp` never returns and takes no arguments).
    unsafe {
        core::arch::asm!(
            "mov rsp, {top}",
            "xor ebp, ebp",
            "call {f}",
            "ud2",
            top = in(reg) top,
            f = sym kmain_bsp,
            options(noreturn)
        )
    }
}

/// The rest of the BSP's bring-up, on its guarded kernel stack.
extern "C" fn kmain_bsp() -> ! {
    let bi = multiboot::info();
    let info = cpu::info();
    pic::disable();
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU.
    let lapic_phys = unsafe { crate::arch::x86::msr::rdmsr(crate::arch::x86::msr::Msr::ApicBase) }
        & 0xf_ffff_f000;
    // `nox2apic` / `notscdeadline` on the command line: the xAPIC and the one-shot timer
    // even where the CPU has more (as Linux's options of the same names).
    apic::setup(
        info.x2apic && !bi.has_arg("nox2apic"),
        info.tsc_deadline && !bi.has_arg("notscdeadline"),
        lapic_phys,
    );
    apic::init_cpu();
    let bsp_apic = apic::id();
    percpu::get(0).apic_id.store(bsp_apic, Ordering::Relaxed);
    let plat = match acpi::discover(bsp_apic) {
        Ok(p) => p,
        Err(e) => {
            kprintln!("acpi: {e}; assuming one CPU");
            acpi::Platform {
                rsdp: 0,
                lapic_phys,
                apic_ids: [bsp_apic; MAX_CPUS],
                num_cpus: 1,
                has_pic: true,
            }
        }
    };
    let (tsc_khz, bus_khz) = timer::calibrate();

    let mut feat = alloc::string::String::new();
    let _ = cpu::feature_string(info.features, &mut feat);
    kprintln!(
        "Peregrine microhypervisor v{} — {} CPUs, {} MiB, features: {}",
        env!("CARGO_PKG_VERSION"),
        plat.num_cpus,
        bi.ram_bytes() >> 20,
        feat
    );
    spec::print();
    log_details(bi, &plat, tsc_khz, bus_khz);

    percpu::set_num_cpus(plat.num_cpus);
    apic::timer_periodic(TIMER_HZ);
    kprintln!("cpu 0 online (apic {})", bsp_apic);
    percpu::get(0).online.store(true, Ordering::Release);

    for cpu in 1..plat.num_cpus {
        let ist = stack::map_all(cpu);
        // SAFETY: the AP has not started; only it reads its entry afterwards.
        unsafe { (*core::ptr::addr_of_mut!(IST))[cpu] = ist };
    }
    let online = smp::start_aps(&plat.apic_ids[..plat.num_cpus]);
    PLATFORM.call_once(|| Platform {
        rsdp: plat.rsdp,
        num_cpus: online,
        tsc_khz,
        bus_khz,
    });
    kprintln!("all {} CPUs online", online);
    crate::arch::x86::selfcheck::run(online);
    if bi.has_arg("selftest=stack_overflow") {
        stack_overflow();
    }

    if bi.has_arg("fault_test") {
        // SAFETY: deliberately faults (bring-up test of the kernel fault path).
        unsafe { core::ptr::read_volatile(0x10 as *const u64) };
    }
    if bi.has_arg("user_test") {
        user_test();
    }
    if bi.has_arg("exit_after_boot") {
        selftest(online);
        kprintln!("boot ok");
        crate::arch::x86::qemu::qemu_exit(crate::arch::x86::qemu::EXIT_SUCCESS);
    }
    crate::hooks::bsp_ready()
}

/// The Rust entry of an application processor (from the trampoline, on its stack).
#[no_mangle]
pub extern "C" fn ap_main(cpu: usize) -> ! {
    let p = percpu::get(cpu);
    let kstack = p.kstack_top.load(Ordering::Relaxed);
    // SAFETY: this CPU's bring-up, once; the BSP filled IST[cpu] and the stacks before.
    unsafe {
        let ist = (*core::ptr::addr_of!(IST))[cpu];
        gdt::init(cpu, kstack, ist);
        percpu::install(cpu);
    }
    idt::load();
    // SAFETY: this CPU's bring-up, once (`spec::init` ran on the BSP).
    unsafe {
        cpu::init_cpu();
        spec::init_cpu();
        syscall::init_cpu();
    }
    apic::init_cpu();
    let id = apic::id();
    if id != p.apic_id.load(Ordering::Relaxed) {
        kprintln!("cpu {cpu}: APIC id {id} differs from the MADT's");
        p.apic_id.store(id, Ordering::Relaxed);
    }
    apic::timer_periodic(TIMER_HZ);
    kprintln!("cpu {} online (apic {})", cpu, id);
    p.online.store(true, Ordering::Release);
    crate::hooks::ap_ready(cpu)
}

/// Bring-up self-test (with `exit_after_boot`): heap growth, frames, a user root, timer
/// ticks and IPIs on every CPU.
fn selftest(cpus: usize) {
    use alloc::{boxed::Box, vec::Vec};
    let v: Vec<u64> = (0..200_000).collect(); // 1.6 MB: grows the heap
    assert_eq!(v.iter().sum::<u64>(), 199_999 * 200_000 / 2);
    let b = Box::new([7u8; 5000]);
    assert_eq!(b[4999], 7);
    drop(v);
    let f = pool::alloc_frame_zeroed().expect("frame");
    pool::free_frame(f);
    let root = crate::arch::x86::paging::new_user_root().expect("user root");
    // SAFETY: a fresh PML4 frame in the physmap.
    let t = unsafe { &*mem::phys_to_ptr::<[u64; 512]>(root) };
    // SAFETY: the kernel PML4 in the physmap.
    let k = unsafe { &*mem::phys_to_ptr::<[u64; 512]>(crate::arch::x86::paging::kernel_root()) };
    assert!(
        t[..256].iter().all(|&e| e == 0)
            && t[256..] == k[256..]
            && k[..256].iter().all(|&e| e == 0)
    );
    pool::free_frame(root);
    apic::send_ipi_others(idt::VEC_IPI_RESCHED);
    // Let every CPU take timer ticks for ~50 ms.
    let end = crate::arch::x86::cr::rdtsc() + 50 * apic::tsc_khz();
    while crate::arch::x86::cr::rdtsc() < end {
        crate::arch::x86::cr::enable_and_hlt();
    }
    crate::arch::x86::cr::cli();
    for c in 0..cpus {
        let p = percpu::get(c);
        let (t, i) = (
            p.ticks.load(Ordering::Relaxed),
            p.ipis.load(Ordering::Relaxed),
        );
        assert!(t > 0, "cpu {c} took no timer ticks");
        assert!(c == 0 || i > 0, "cpu {c} took no IPI");
    }
    let (used, mapped) = heap::stats();
    kprintln!(
        "selftest ok (heap {} KiB used of {} KiB mapped)",
        used / 1024,
        mapped / 1024
    );
}

/// `selftest=stack_overflow` (kernel command line only, never reachable from user
/// space): recurses on this CPU's kernel stack until it overflows. The guard page below
/// the stack must end this in the panic `kernel stack overflow on cpu N`.
fn stack_overflow() -> ! {
    #[inline(never)]
    fn recurse(depth: u64) -> u64 {
        // 512 bytes a frame that the optimizer cannot drop (nor the call: it is not a
        // tail call, its result is used after it).
        let frame = core::hint::black_box([depth; 64]);
        if core::hint::black_box(depth) == u64::MAX {
            return 0;
        }
        recurse(depth + 1).wrapping_add(frame[(depth % 64) as usize])
    }
    kprintln!(
        "selftest: overflowing the kernel stack of cpu {}",
        percpu::cpu_id()
    );
    let r = recurse(0);
    panic!("selftest: the recursion returned {r}")
}

/// Bring-up test of the ring-3 path (`user_test`): runs `ud2` in user mode; the #UD must
/// reach `hooks::user_trap` with a user frame.
fn user_test() {
    use crate::arch::x86::{entry, gdt, paging, regs::Regs};
    let root = paging::new_user_root().expect("root");
    let tbl = |p: u64| mem::phys_to_ptr::<[u64; 512]>(p);
    let code = pool::alloc_frame_zeroed().expect("frame");
    let stack = pool::alloc_frame_zeroed().expect("frame");
    let (pdpt, pd, pt) = (
        pool::alloc_frame_zeroed().expect("frame"),
        pool::alloc_frame_zeroed().expect("frame"),
        pool::alloc_frame_zeroed().expect("frame"),
    );
    // SAFETY: fresh frames in the physmap, owned by this test; user entries (P|W|U) map
    // code at 0x400000 and a stack page at 0x401000.
    unsafe {
        (*tbl(root))[0] = pdpt | 7;
        (*tbl(pdpt))[0] = pd | 7;
        (*tbl(pd))[2] = pt | 7;
        (*tbl(pt))[0] = code | 5;
        (*tbl(pt))[1] = stack | 7;
        mem::phys_to_ptr::<[u8; 2]>(code).write([0x0f, 0x0b]); // ud2
        paging::activate(root);
    }
    let regs = Regs {
        rip: 0x40_0000,
        cs: u64::from(gdt::USER_CS),
        rflags: 0x202,
        rsp: 0x40_2000,
        ss: u64::from(gdt::USER_DS),
        rax: 0x1234,
        ..Default::default()
    };
    kprintln!("user_test: entering ring 3");
    // SAFETY: a complete user frame; GS base is the kernel's; the user table shares the
    // kernel half.
    unsafe { entry::return_to(&regs) }
}

fn log_details(bi: &multiboot::BootInfo, plat: &acpi::Platform, tsc_khz: u64, bus_khz: u64) {
    let ci = cpu::info();
    kprintln!(
        "cpu: {} apic {} ({}), TSC {} kHz{}, LAPIC timer {} kHz",
        core::str::from_utf8(&ci.vendor).unwrap_or("?"),
        if apic::x2apic() { "x2APIC" } else { "xAPIC" },
        if apic::has_tsc_deadline() {
            "TSC deadline"
        } else {
            "no TSC deadline"
        },
        tsc_khz,
        if ci.cpuid_tsc_khz.is_some() {
            " (CPUID)"
        } else {
            " (PIT)"
        },
        bus_khz
    );
    kprintln!("cmdline: {}", bi.cmdline());
    for e in bi.mmap() {
        kprintln!(
            "  mem {:#012x}..{:#012x} type {}",
            e.addr,
            e.addr + e.len,
            e.kind
        );
    }
    for (i, m) in bi.modules().iter().enumerate() {
        kprintln!(
            "  module {} {:#x}..{:#x} '{}'",
            i,
            m.start,
            m.end,
            bi.module_cmdline(m)
        );
    }
    let (free, total) = pool::stats();
    kprint_pool();
    kprintln!(
        "  kernel pool {} KiB ({} KiB free), image {:#x}..{:#x}",
        total * 4,
        free * 4,
        layout::image_phys().0,
        layout::image_phys().1
    );
    kprintln!(
        "  acpi rsdp {:#x}, lapic {:#x}, pic {}",
        plat.rsdp,
        plat.lapic_phys,
        plat.has_pic
    );
    ioapic::for_each(|id, base, pins| kprintln!("  ioapic {} gsi {}..{}", id, base, base + pins));
}

fn kprint_pool() {
    pool::for_each_range(|s, e| kprintln!("  pool {:#x}..{:#x}", s, e));
}

/// Calls `f` with the memory descriptors for the HIP: the firmware map (non-RAM kinds
/// other than ACPI/NVS as RESERVED), then what the kernel uses (HYPERVISOR: image, frame
/// pool, trampoline page) and the modules (MODULE, with their raw command lines; `aux`
/// is left 0 for the caller to fill with the string's offset).
pub fn for_each_mem_desc(mut f: impl FnMut(MemDesc, Option<&str>)) {
    let desc = |addr, size, kind| MemDesc {
        addr,
        size,
        kind,
        aux: 0,
    };
    let bi = multiboot::info();
    for e in bi.mmap() {
        let kind = match e.kind {
            1 => mem_kind::AVAILABLE,
            3 => mem_kind::ACPI,
            4 => mem_kind::NVS,
            _ => mem_kind::RESERVED,
        };
        f(desc(e.addr, e.len, kind), None);
    }
    let (s, e) = layout::image_phys();
    f(desc(s, e - s, mem_kind::HYPERVISOR), None);
    pool::for_each_range(|s, e| f(desc(s, e - s, mem_kind::HYPERVISOR), None));
    f(desc(smp::TRAMPOLINE, PAGE_SIZE, mem_kind::HYPERVISOR), None);
    for m in bi.modules() {
        f(
            desc(m.start, m.end - m.start, mem_kind::MODULE),
            Some(bi.module_cmdline(m)),
        );
    }
}
