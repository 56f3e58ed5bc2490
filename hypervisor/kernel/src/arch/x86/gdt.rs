//! GDT and TSS, one of each per CPU (SDM vol. 3 3.4.5, 7.7).
//!
//! Layout fixed for SYSCALL/SYSRET: STAR[47:32] = KERNEL_CS (SS = +8),
//! STAR[63:48] = USER_CS32 (SYSRET64: CS = +16 = USER_CS, SS = +8 = USER_DS).

use core::mem::size_of;
use core::sync::atomic::Ordering;

use peregrine_abi::hip::MAX_CPUS;

/// Kernel 64-bit code.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data/stack.
pub const KERNEL_DS: u16 = 0x10;
/// User 32-bit code (placeholder for the SYSRET layout), RPL 3.
pub const USER_CS32: u16 = 0x18 | 3;
/// User data/stack, RPL 3.
pub const USER_DS: u16 = 0x20 | 3;
/// User 64-bit code, RPL 3.
pub const USER_CS: u16 = 0x28 | 3;
/// The TSS.
pub const TSS_SEL: u16 = 0x30;

/// IST index (1-based) for NMI.
pub const IST_NMI: u8 = 1;
/// IST index for double fault.
pub const IST_DF: u8 = 2;
/// IST index for machine check.
pub const IST_MC: u8 = 3;

/// The 64-bit TSS.
#[repr(C, packed(4))]
#[derive(Debug, Clone, Copy)]
pub struct Tss {
    _r0: u32,
    /// RSP0..2.
    pub rsp: [u64; 3],
    _r1: u64,
    /// IST1..7.
    pub ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    /// I/O bitmap offset (beyond the limit: no bitmap).
    pub iomap_base: u16,
}

const _: () = assert!(size_of::<Tss>() == 104);

const NULL_TSS: Tss = Tss {
    _r0: 0,
    rsp: [0; 3],
    _r1: 0,
    ist: [0; 7],
    _r2: 0,
    _r3: 0,
    iomap_base: 104,
};

/// Bytes of the I/O permission bitmap (ports 0..0xffff).
pub const IOPB_BYTES: usize = 8192;

/// A TSS followed by its I/O permission bitmap and the terminating 0xff byte.
#[repr(C, align(16))]
struct TssIo {
    tss: Tss,
    iopb: [u8; IOPB_BYTES + 1],
}

static mut GDT: [[u64; 8]; MAX_CPUS] = [[0; 8]; MAX_CPUS];
static mut TSS: [TssIo; MAX_CPUS] = [const {
    TssIo {
        tss: NULL_TSS,
        iopb: [0xff; IOPB_BYTES + 1],
    }
}; MAX_CPUS];
/// Which space's bitmap each TSS holds (0: none).
static IOPB_KEY: [core::sync::atomic::AtomicU64; MAX_CPUS] =
    [const { core::sync::atomic::AtomicU64::new(0) }; MAX_CPUS];

/// Sets up and loads CPU `cpu`'s GDT and TSS; reloads all segment registers (GS base is
/// cleared: install the per-CPU pointer afterwards).
///
/// # Safety
/// Call once per CPU, on that CPU; `rsp0` and `ist` must be valid stack tops.
pub unsafe fn init(cpu: usize, rsp0: u64, ist: [u64; 3]) {
    // SAFETY: only CPU `cpu` touches GDT[cpu]/TSS[cpu], and only here.
    let (gdt, tio) = unsafe {
        (
            &mut (*core::ptr::addr_of_mut!(GDT))[cpu],
            &mut (*core::ptr::addr_of_mut!(TSS))[cpu],
        )
    };
    tio.iopb.fill(0xff);
    let tss = &mut tio.tss;
    tss.rsp[0] = rsp0;
    tss.ist[0] = ist[0];
    tss.ist[1] = ist[1];
    tss.ist[2] = ist[2];
    tss.iomap_base = 0xffff;
    let base = tss as *const Tss as u64;
    let limit = (size_of::<Tss>() + IOPB_BYTES) as u64; // includes the 0xff terminator
    gdt[0] = 0;
    gdt[1] = 0x00af_9a00_0000_ffff; // kernel code 64, DPL0
    gdt[2] = 0x00cf_9200_0000_ffff; // kernel data
    gdt[3] = 0x00cf_fa00_0000_ffff; // user code 32, DPL3
    gdt[4] = 0x00cf_f200_0000_ffff; // user data, DPL3
    gdt[5] = 0x00af_fa00_0000_ffff; // user code 64, DPL3
    gdt[6] = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40) // present, 64-bit available TSS
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    gdt[7] = base >> 32;

    #[repr(C, packed)]
    struct Ptr {
        limit: u16,
        base: u64,
    }
    let ptr = Ptr {
        limit: (size_of::<[u64; 8]>() - 1) as u16,
        base: gdt.as_ptr() as u64,
    };
    let p = crate::platform::percpu::get(cpu);
    p.gdtr_limit.store(ptr.limit, Ordering::Relaxed);
    p.gdtr_base.store(ptr.base, Ordering::Relaxed);
    // SAFETY: the GDT is valid and static; the far return reloads CS with the kernel code
    // selector at the next instruction; data selectors are valid; the TSS descriptor is
    // available (not busy) since this GDT is fresh.
    unsafe {
        core::arch::asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ss, {ds:x}",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "xor {tmp:e}, {tmp:e}",
            "mov fs, {tmp:x}",
            "mov gs, {tmp:x}",
            "ltr {tss:x}",
            ptr = in(reg) &ptr,
            cs = in(reg) u64::from(KERNEL_CS),
            ds = in(reg) u64::from(KERNEL_DS),
            tss = in(reg) u64::from(TSS_SEL),
            tmp = out(reg) _,
        );
    }
}

/// CPU `cpu`'s TSS (e.g. to read the stacks).
pub fn tss(cpu: usize) -> Tss {
    // SAFETY: a read of plain data written during that CPU's bring-up.
    unsafe { core::ptr::addr_of!((*core::ptr::addr_of!(TSS))[cpu].tss).read_volatile() }
}

/// Points this CPU's TSS at new stacks: RSP0 at `rsp0`, IST1..3 at `ist` (the BSP's move
/// from its boot stacks to its guarded ones).
pub fn set_stacks(rsp0: u64, ist: [u64; 3]) {
    let cpu = crate::platform::percpu::cpu_id();
    // SAFETY: only this CPU writes its own TSS after bring-up; the CPU reads these fields
    // only when delivering an interrupt, and interrupts are off here; an NMI taken
    // between the writes uses either the old NMI stack or the new one, both valid.
    unsafe {
        let t = core::ptr::addr_of_mut!((*core::ptr::addr_of_mut!(TSS))[cpu].tss);
        core::ptr::addr_of_mut!((*t).rsp[0]).write_unaligned(rsp0);
        for (i, &v) in ist.iter().enumerate() {
            core::ptr::addr_of_mut!((*t).ist[i]).write_unaligned(v);
        }
    }
}

/// Sets this CPU's TSS.RSP0 (the stack ring-3 interrupts push their frame on).
pub fn set_rsp0(rsp0: u64) {
    let cpu = crate::platform::percpu::cpu_id();
    // SAFETY: only this CPU writes its own TSS after bring-up; the CPU reads RSP0 only
    // when an interrupt arrives from ring 3, which cannot happen while we are here.
    unsafe {
        core::ptr::addr_of_mut!((*core::ptr::addr_of_mut!(TSS))[cpu].tss.rsp[0])
            .write_unaligned(rsp0)
    };
}

/// Loads the I/O permission bitmap of the space named `key` (None: no ports).
///
/// The TSS keeps the last bitmap copied in; switching to a space without ports only
/// moves the bitmap offset beyond the TSS limit (all ports denied), and switching back
/// to the space whose bitmap is still there (same `key`) moves it back: the 8 KiB copy
/// happens only when another space's bitmap is needed.
pub fn load_iopb(key: u64, bitmap: Option<&[u8]>) {
    let cpu = crate::platform::percpu::cpu_id();
    // SAFETY: only this CPU touches its own TSS after bring-up, and it runs kernel code
    // with interrupts off here.
    let tio = unsafe { &mut (*core::ptr::addr_of_mut!(TSS))[cpu] };
    match bitmap {
        None => {
            tio.tss.iomap_base = 0xffff;
        }
        Some(b) => {
            if IOPB_KEY[cpu].load(Ordering::Relaxed) != key {
                let n = b.len().min(IOPB_BYTES);
                tio.iopb[..n].copy_from_slice(&b[..n]);
                tio.iopb[n..IOPB_BYTES].fill(0xff);
                IOPB_KEY[cpu].store(key, Ordering::Relaxed);
            }
            tio.tss.iomap_base = size_of::<Tss>() as u16;
        }
    }
}

/// Denies every port to user mode on CPU `cpu`, the running one (the bitmap stays
/// for [`open_iopb`]).
#[inline(always)]
pub fn close_iopb(cpu: usize) {
    // SAFETY: as in `load_iopb`.
    unsafe { (*core::ptr::addr_of_mut!(TSS))[cpu].tss.iomap_base = 0xffff };
}

/// Makes the bitmap the TSS of CPU `cpu` (the running one) holds visible again if it
/// is the one named `key`; false (nothing changed) when it holds another.
#[inline(always)]
pub fn open_iopb(cpu: usize, key: u64) -> bool {
    if IOPB_KEY[cpu].load(Ordering::Relaxed) != key {
        return false;
    }
    // SAFETY: as in `load_iopb`.
    unsafe { (*core::ptr::addr_of_mut!(TSS))[cpu].tss.iomap_base = size_of::<Tss>() as u16 };
    true
}

/// CPU `cpu`'s GDT base (a VMCS host-state field).
pub fn gdt_base(cpu: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { core::ptr::addr_of!((*core::ptr::addr_of!(GDT))[cpu]) as u64 }
}

/// CPU `cpu`'s TSS base (a VMCS host-state field).
pub fn tss_base(cpu: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { core::ptr::addr_of!((*core::ptr::addr_of!(TSS))[cpu].tss) as u64 }
}

/// Restores this CPU's GDTR limit after a VT-x exit, which sets the GDTR and IDTR
/// limits to 0xffff (SDM vol. 3C 28.5.2) and TR's limit to 0x67.
///
/// With the GDTR limit at 0xffff, user code could load descriptors from the 64 KiB after
/// this CPU's GDT (the other CPUs' GDTs and whatever kernel data follows: a DPL-3 call
/// gate there would lead into ring 0): the limit goes back at once.
///
/// TR's short limit only hides the I/O permission bitmap behind the TSS, which denies
/// user mode every port (IN/OUT fault with #GP) and loosens nothing; the TSS fields the
/// processor uses in ring 0 (RSP0, the IST) lie within 0x67. So TR is reloaded lazily:
/// this marks it short, and the first user #GP after it ([`tr_repair`]) reloads it and
/// lets the instruction run again. A VMM that never touches a port between two exits of
/// its vCPU pays nothing for it.
#[inline(always)]
pub fn restore_after_vm_exit() {
    // SAFETY: `init` stored this CPU's own GDTR image in its record (the table the
    // processor already uses: only the limit changes back to the table's size; the
    // segment registers keep their descriptors).
    unsafe {
        core::arch::asm!("lgdt gs:[{off}]", off = const crate::platform::percpu::PERCPU_GDTR, options(readonly, nostack, preserves_flags));
    }
    crate::platform::percpu::set_tr_short();
    // The IDTR limit (0xffff now) needs no repair: vectors go up to 255, so no gate
    // beyond the IDT's 4 KiB is ever read.
}

/// For a #GP from user mode: if TR still has the short limit of a VT-x exit
/// ([`restore_after_vm_exit`]), reloads it with the TSS's full limit and returns true
/// (the faulting instruction, an I/O access the bitmap may allow, runs again); false if
/// TR was whole (the #GP is the thread's own).
pub fn tr_repair() -> bool {
    if !crate::platform::percpu::take_tr_short() {
        return false;
    }
    let cpu = crate::platform::percpu::cpu_id();
    // SAFETY: clearing the busy bit of this CPU's own (loaded) TSS descriptor lets `ltr`
    // load it again with the full limit; only this CPU touches its GDT after bring-up,
    // and interrupts are off in the trap handler.
    unsafe {
        let d = core::ptr::addr_of_mut!((*core::ptr::addr_of_mut!(GDT))[cpu][6]);
        d.write_volatile(d.read_volatile() & !(1 << 41));
        core::arch::asm!("ltr {0:x}", in(reg) u64::from(TSS_SEL), options(nostack, preserves_flags));
    }
    true
}
