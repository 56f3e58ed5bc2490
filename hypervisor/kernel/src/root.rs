//! Creating the kernel PD and the root PD, loading the root task (the first boot
//! module, an ELF64 executable) and building the HIP it receives.

use alloc::sync::Arc;
use alloc::vec::Vec;

use elf::abi::{PF_W, PF_X, PT_LOAD};
use elf::endian::LittleEndian;
use elf::ElfBytes;
use peregrine_abi::crd::aligned_pieces;
use peregrine_abi::hip::{
    mem_kind, CpuDesc, Features, Hip, MemDesc, HIP_SIGNATURE, MAX_CPUS, MAX_MEM_DESC,
    ROOT_HIP_ADDR, ROOT_UTCB_ADDR,
};
use peregrine_abi::perm::MemPerm;
use peregrine_abi::{sel, API_VERSION, PAGE_BITS, PAGE_SIZE};
use peregrine_core::quota::Quota;

use crate::cap::KObj;
use crate::ec::{Ec, EcKind};
use crate::frame::Frame;
use crate::pd::Pd;
use crate::sc::Sc;
use crate::sm::Sm;
use crate::{kmem, sched, space};

/// A boot module.
pub struct Module<'a> {
    /// Physical start.
    pub start: u64,
    /// Physical end (exclusive).
    pub end: u64,
    /// Command line.
    pub cmdline: &'a str,
}

/// What the platform bring-up found, for the HIP and the kernel PD.
pub struct Platform<'a> {
    /// The firmware memory map, plus the ranges the kernel uses (kind HYPERVISOR).
    pub mem: &'a [MemDesc],
    /// Physical page ranges (base page, pages) given to the kernel PD.
    pub user_ranges: &'a [(u64, u64)],
    /// Boot modules; the first is the root.
    pub modules: &'a [Module<'a>],
    /// CPUs.
    pub cpus: &'a [CpuDesc],
    /// Features.
    pub features: Features,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// APIC timer frequency in kHz.
    pub bus_khz: u64,
    /// Number of GSIs.
    pub num_gsi: u64,
    /// The first message-signalled GSI.
    pub msi_gsi_base: u64,
    /// Device memory (base page, pages) given to the kernel PD.
    pub device_ranges: &'a [(u64, u64)],
    /// ACPI RSDP address.
    pub rsdp: u64,
    /// Pages of kernel memory the root may use (its quota).
    pub root_quota: u32,
}

/// Errors that stop the boot (printed by the caller).
#[derive(Debug)]
pub enum RootError {
    /// No boot module.
    NoModule,
    /// The root module is not an ELF64 x86-64 executable with sane segments.
    BadElf,
    /// A kernel resource ran out.
    NoMemory,
}

fn map_new_pages(
    pd: &Arc<Pd>,
    vaddr: u64,
    bytes: &[u8],
    len: u64,
    perm: MemPerm,
) -> Result<(), RootError> {
    let pages = len.div_ceil(PAGE_SIZE as u64);
    for i in 0..pages {
        let phys = kmem::alloc_frame(pd).map_err(|_| RootError::NoMemory)?;
        let off = (i * PAGE_SIZE as u64) as usize;
        if off < bytes.len() {
            let n = (bytes.len() - off).min(PAGE_SIZE);
            // SAFETY: `phys` is a fresh zeroed frame in the physmap; we copy at most one
            // page into it.
            unsafe {
                core::ptr::copy_nonoverlapping(bytes[off..].as_ptr(), kmem::phys_to_virt(phys), n)
            };
        }
        let vpage = (vaddr >> PAGE_BITS) + i;
        pd.mem
            .map(pd, vpage, phys >> PAGE_BITS, 0, perm.bits())
            .map_err(|_| RootError::NoMemory)?;
    }
    Ok(())
}

/// Loads an ELF image into `pd`; returns the entry point.
fn load_elf(pd: &Arc<Pd>, image: &[u8]) -> Result<u64, RootError> {
    let f = ElfBytes::<LittleEndian>::minimal_parse(image).map_err(|_| RootError::BadElf)?;
    if f.ehdr.class != elf::file::Class::ELF64 || f.ehdr.e_machine != elf::abi::EM_X86_64 {
        return Err(RootError::BadElf);
    }
    let segs = f.segments().ok_or(RootError::BadElf)?;
    for ph in segs.iter().filter(|p| p.p_type == PT_LOAD) {
        let start = ph.p_vaddr & !0xfff;
        let end = ph
            .p_vaddr
            .checked_add(ph.p_memsz)
            .ok_or(RootError::BadElf)?;
        if ph.p_filesz > ph.p_memsz || end > ROOT_HIP_ADDR || start == 0 {
            return Err(RootError::BadElf);
        }
        let off = ph.p_offset as usize;
        let data = image
            .get(off..off + ph.p_filesz as usize)
            .ok_or(RootError::BadElf)?;
        // The first page may start before p_vaddr: build the page-aligned bytes.
        let lead = (ph.p_vaddr - start) as usize;
        let mut buf = alloc::vec![0u8; lead];
        buf.extend_from_slice(data);
        let mut perm = MemPerm::R;
        if ph.p_flags & PF_W != 0 {
            perm |= MemPerm::W;
        }
        if ph.p_flags & PF_X != 0 {
            perm |= MemPerm::X;
        }
        map_new_pages(pd, start, &buf, end - start, perm)?;
    }
    Ok(f.ehdr.e_entry)
}

/// Fills the HIP page.
fn build_hip(page: *mut u8, p: &Platform) {
    let cpu_off = core::mem::size_of::<Hip>();
    let ncpu = p.cpus.len().min(MAX_CPUS);
    let mem_off = cpu_off + MAX_CPUS * core::mem::size_of::<CpuDesc>();
    let mut mems: Vec<MemDesc> = p.mem.to_vec();
    let mut str_off = mem_off + MAX_MEM_DESC * core::mem::size_of::<MemDesc>();
    for m in p.modules {
        let bytes = m.cmdline.as_bytes();
        let aux = if str_off + bytes.len() < PAGE_SIZE {
            // SAFETY: the string fits in the page below PAGE_SIZE (checked).
            unsafe {
                core::ptr::copy_nonoverlapping(bytes.as_ptr(), page.add(str_off), bytes.len());
                *page.add(str_off + bytes.len()) = 0;
            }
            let a = str_off as u32;
            str_off += bytes.len() + 1;
            a
        } else {
            // SAFETY: PAGE_SIZE - 1 is inside the page; an empty string.
            unsafe { *page.add(PAGE_SIZE - 1) = 0 };
            (PAGE_SIZE - 1) as u32
        };
        mems.push(MemDesc {
            addr: m.start,
            size: m.end - m.start,
            kind: mem_kind::MODULE,
            aux,
        });
    }
    // Modules must survive truncation: keep them, drop the tail of the firmware map.
    if mems.len() > MAX_MEM_DESC {
        let nmod = p.modules.len();
        let keep = MAX_MEM_DESC.saturating_sub(nmod);
        let tail: Vec<MemDesc> = mems[mems.len() - nmod..].to_vec();
        mems.truncate(keep);
        mems.extend(tail);
    }
    let hip = Hip {
        signature: HIP_SIGNATURE,
        api_version: API_VERSION,
        length: str_off as u32,
        features: p.features.bits(),
        cpu_offset: cpu_off as u16,
        cpu_size: core::mem::size_of::<CpuDesc>() as u16,
        mem_offset: mem_off as u16,
        mem_size: core::mem::size_of::<MemDesc>() as u16,
        num_cpus: ncpu as u32,
        num_mem: mems.len() as u32,
        sel_num: crate::pd::SEL_NUM,
        sel_exc: peregrine_abi::event::NUM_HOST_EVENTS,
        sel_vmi: peregrine_abi::event::NUM_VCPU_EVENTS,
        num_gsi: p.num_gsi,
        msi_gsi_base: p.msi_gsi_base,
        freq_tsc_khz: p.tsc_khz,
        freq_bus_khz: p.bus_khz,
        root_quota: p.root_quota as u64,
        rsdp: p.rsdp,
        boot_tsc: crate::platform::boot::BOOT_TSC.load(core::sync::atomic::Ordering::Relaxed),
    };
    // SAFETY: the page is a fresh kernel frame; all writes stay inside it: the fixed part
    // at 0, MAX_CPUS CPU and MAX_MEM_DESC memory descriptors before the strings (the
    // layout constants above were used to place the strings after them).
    unsafe {
        core::ptr::write(page as *mut Hip, hip);
        let c = page.add(cpu_off) as *mut CpuDesc;
        for (i, d) in p.cpus.iter().take(ncpu).enumerate() {
            core::ptr::write(c.add(i), *d);
        }
        let m = page.add(mem_off) as *mut MemDesc;
        for (i, d) in mems.iter().enumerate() {
            core::ptr::write(m.add(i), *d);
        }
    }
}

/// Creates the kernel PD, the root PD and the root EC/SC on the boot CPU. The caller
/// then enters the scheduler.
pub fn create(p: &Platform, cpu: &mut crate::cpu::Cpu) -> Result<(), RootError> {
    let first = p.modules.first().ok_or(RootError::NoModule)?;

    let kern =
        Arc::new(Pd::new(None, Quota::new(0), true, false).map_err(|_| RootError::NoMemory)?);
    space::register(&kern);
    for &(base, pages) in p.user_ranges {
        for (b, order) in aligned_pieces(base, pages, 40) {
            space::kernel_root_mem(&kern, b, order);
        }
    }
    for &(base, pages) in p.device_ranges {
        for (b, order) in aligned_pieces(base, pages, 40) {
            space::kernel_root_mem(&kern, b, order);
        }
    }
    for m in p.modules {
        let b = m.start >> PAGE_BITS;
        let e = m.end.div_ceil(PAGE_SIZE as u64);
        for (pb, order) in aligned_pieces(b, e - b, 40) {
            space::kernel_root_mem(&kern, pb, order);
        }
    }
    space::kernel_root_pio(&kern);
    for gsi in 0..p.num_gsi {
        let sm = Arc::new(Sm::new_gsi(gsi as u32));
        crate::irq::register_gsi_sm(gsi as u32, sm.clone());
        space::insert_root_cap(&kern, sel::GSI_SM_BASE + gsi, KObj::Sm(sm))
            .map_err(|_| RootError::NoMemory)?;
    }

    let root = Arc::new(
        Pd::new(None, Quota::new(p.root_quota), false, false).map_err(|_| RootError::NoMemory)?,
    );
    space::insert_root_cap(&root, sel::ROOT_PD, KObj::Pd(root.clone()))
        .map_err(|_| RootError::NoMemory)?;
    space::insert_root_cap(&root, sel::KERN_PD, KObj::Pd(kern.clone()))
        .map_err(|_| RootError::NoMemory)?;

    let len = (first.end - first.start) as usize;
    // SAFETY: the module's memory is RAM the kernel PD owns but no one uses yet; the
    // physmap maps it, and the root has not started.
    let image = unsafe { core::slice::from_raw_parts(kmem::phys_to_virt(first.start), len) };
    let entry = load_elf(&root, image)?;

    let hip = kmem::alloc_frame(&root).map_err(|_| RootError::NoMemory)?;
    build_hip(kmem::phys_to_virt(hip), p);
    root.mem
        .map(
            &root,
            ROOT_HIP_ADDR >> PAGE_BITS,
            hip >> PAGE_BITS,
            0,
            MemPerm::R.bits(),
        )
        .map_err(|_| RootError::NoMemory)?;

    let utcb = kmem::alloc_frame(&root).map_err(|_| RootError::NoMemory)?;
    root.mem
        .map_kernel_page(&root, ROOT_UTCB_ADDR, utcb)
        .map_err(|_| RootError::NoMemory)?;
    let mut f = Frame::user(entry, 0);
    f.rdi = ROOT_HIP_ADDR;
    f.rsi = ROOT_UTCB_ADDR;
    let cpu_id = crate::platform::percpu::cpu_id();
    let ec = Arc::new(Ec::new(
        None,
        root.clone(),
        cpu_id,
        EcKind::Global,
        sel::ROOT_EVT_BASE,
        0,
        utcb,
        ROOT_UTCB_ADDR,
        f,
    ));
    // The EC is new, bound to this CPU and not yet visible to the scheduler.
    ec.local(cpu).started = true;
    ec.has_sc.store(true, core::sync::atomic::Ordering::Relaxed);
    root.ecs.lock().push(Arc::downgrade(&ec));
    space::insert_root_cap(&root, sel::ROOT_EC, KObj::Ec(ec.clone()))
        .map_err(|_| RootError::NoMemory)?;
    let quantum = 10_000 * p.tsc_khz / 1000;
    let sc = Arc::new(Sc::new(None, ec, 100, quantum.max(1)));
    space::insert_root_cap(&root, sel::ROOT_SC, KObj::Sc(sc.clone()))
        .map_err(|_| RootError::NoMemory)?;
    sched::enqueue(sc, cpu);
    Ok(())
}
