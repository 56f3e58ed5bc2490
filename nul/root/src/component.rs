//! Components: child PDs started from boot modules and their event portals; once
//! started they live in the registry ([`crate::children`]).

use alloc::string::String;
use alloc::vec::Vec;

use elf::abi::PT_LOAD;
use elf::endian::LittleEndian;
use elf::ElfBytes;
use nul_rt::hc::{self, EcKind};
use nul_rt::sel;
use nul_rt::start_info::{
    self, StartInfo, IMAGE_ADDR, POOL_ADDR, SHARED_ADDR, START_INFO_ADDR, TEST_PAGE_ADDR,
};
use nul_rt::sync::Mutex;
use peregrine_abi::event::host;
use peregrine_abi::hip::ROOT_UTCB_ADDR;
use peregrine_abi::perm::{self, MemPerm, PtPerm};
use peregrine_abi::{Crd, Mtd, Status, XferFlags, PAGE_BITS};

use crate::children::{destroy_all, with, Child, CHILDREN};
use crate::mem;
use crate::services;

/// Errors of starting a component.
#[derive(Debug)]
pub enum StartError {
    /// The module is not a loadable ELF64 executable.
    BadElf,
    /// Out of memory in the root.
    NoMemory,
    /// A hypercall failed.
    #[allow(dead_code)] // shown by Debug
    Kernel(Status),
}

impl From<Status> for StartError {
    fn from(s: Status) -> Self {
        StartError::Kernel(s)
    }
}

fn delegate_obj(child_pd: u64, sel_root: u64, sel_child: u64, perm: u8) -> Result<(), Status> {
    hc::pd_delegate(
        sel::OWN_PD,
        child_pd,
        Crd::obj(sel_root, 0, perm),
        Crd::obj(sel_child, 0, perm),
        0,
        XferFlags::empty(),
    )
}

/// Components get the root's portals with the call permission only: with `ctrl` they
/// could change a portal's id, which names the component to the root's handlers.
const CALL: u8 = PtPerm::CALL.bits();

/// Gives the child a fresh page of the root at `addr` with `perm`; returns its
/// physical address (recorded in `ranges` so that removal takes it back).
pub(crate) fn give_page(
    pd: u64,
    addr: u64,
    perm: MemPerm,
    ranges: &mut Vec<(u64, u64)>,
) -> Result<u64, StartError> {
    let phys = mem::alloc(1).ok_or(StartError::NoMemory)?;
    ranges.push((phys, 1));
    hc::pd_delegate(
        sel::OWN_PD,
        pd,
        Crd::mem((mem::WINDOW + phys) >> PAGE_BITS, 0, perm),
        Crd::mem(addr >> PAGE_BITS, 0, perm),
        0,
        XferFlags::empty(),
    )?;
    Ok(phys)
}

/// A boot module the root runs as a component, as the boot configuration names it: the
/// root starts it at boot unless its arguments say `deferred`, and scenarios start
/// (again) what they need with [`start_module`].
#[derive(Debug, Clone)]
pub struct Module {
    /// Name for the console.
    pub name: String,
    /// Arguments.
    pub args: String,
    /// The ELF image: physical address and size.
    pub image: (u64, u64),
    /// CPU of the main EC.
    pub cpu: u64,
    /// Number of online CPUs.
    pub ncpus: u64,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// Kernel-memory quota in pages.
    pub quota: u64,
    /// I/O ports it gets (base, order).
    pub ports: Option<(u64, u8)>,
    /// Pages of guest RAM (a VMM).
    pub pool_pages: u64,
    /// A VMM's guest image.
    pub guest: Option<(u64, u64)>,
    /// A VMM's further modules.
    pub modules: [Option<(u64, u64)>; 2],
    /// A driver's PCI function (`pci=`).
    pub device: Option<crate::driver::Grant>,
    /// A VMM's guest boot modules (`mods=`): physical address, size, string.
    pub mods: Vec<(u64, u64, String)>,
}

/// Every module the boot configuration lists for a component.
pub static MODULES: Mutex<Vec<Module>> = Mutex::new(Vec::new());

impl Module {
    /// Whether the root leaves it to a scenario to start.
    pub fn deferred(&self) -> bool {
        start_info::flag(&self.args, "deferred")
    }

    /// The `role=` argument.
    pub fn role(&self) -> &str {
        start_info::arg(&self.args, "role").unwrap_or("")
    }
}

/// The first module with `role=ROLE`.
pub fn module(role: &str) -> Option<Module> {
    MODULES.lock().iter().find(|m| m.role() == role).cloned()
}

/// Every module with `role=ROLE`.
pub fn modules(role: &str) -> Vec<Module> {
    MODULES
        .lock()
        .iter()
        .filter(|m| m.role() == role)
        .cloned()
        .collect()
}

/// Starts a component from module `m`; returns its id.
pub fn start_module(m: Module) -> Result<usize, StartError> {
    // SAFETY: boot modules lie in the root's window, mapped read-only for good.
    let image = unsafe {
        core::slice::from_raw_parts(mem::virt(m.image.0) as *const u8, m.image.1 as usize)
    };
    start(&ChildSpec {
        image,
        name: &m.name,
        args: &m.args,
        cpu: m.cpu,
        ncpus: m.ncpus,
        tsc_khz: m.tsc_khz,
        quota: m.quota,
        ports: m.ports,
        caps: &[],
        pool_pages: m.pool_pages,
        guest: m.guest,
        modules: m.modules,
        device: m.device,
        mods: &m.mods,
    })
}

/// Options for a child.
pub struct ChildSpec<'a> {
    /// ELF image bytes.
    pub image: &'a [u8],
    /// Name for the console.
    pub name: &'a str,
    /// Arguments (passed in the start-info page).
    pub args: &'a str,
    /// CPU of the main EC.
    pub cpu: u64,
    /// Number of online CPUs (for the start-info page).
    pub ncpus: u64,
    /// TSC frequency in kHz (for the start-info page).
    pub tsc_khz: u64,
    /// Kernel-memory quota in pages.
    pub quota: u64,
    /// Give it the I/O ports in this range (base, order).
    pub ports: Option<(u64, u8)>,
    /// Extra object capabilities to delegate: (root selector, child selector, perm).
    pub caps: &'a [(u64, u64, u8)],
    /// Pages of memory to map at [`POOL_ADDR`] (a VMM's guest RAM).
    pub pool_pages: u64,
    /// A boot module to map read-only in the area at [`IMAGE_ADDR`] (a VMM's guest; see
    /// [`congruent`]): physical address and size.
    pub guest: Option<(u64, u64)>,
    /// Further boot modules of a VMM (initrd, disk): physical address and size; the
    /// disk is mapped read-write.
    pub modules: [Option<(u64, u64)>; 2],
    /// A driver's PCI function, interrupts and DMA memory.
    pub device: Option<crate::driver::Grant>,
    /// A VMM's guest boot modules: physical address, size, string (the module page).
    pub mods: &'a [(u64, u64, String)],
}

/// Delegates `pages` pages of the root's window from physical `phys` to `addr` in
/// `pd`, in pieces aligned on both sides.
pub(crate) fn map_range(
    pd: u64,
    addr: u64,
    phys: u64,
    pages: u64,
    perm: MemPerm,
) -> Result<(), Status> {
    for (vpage, p, order) in mem::dual_pieces(addr >> PAGE_BITS, phys >> PAGE_BITS, pages) {
        hc::pd_delegate(
            sel::OWN_PD,
            pd,
            Crd::mem(p + (mem::WINDOW >> PAGE_BITS), order, perm),
            Crd::mem(vpage, order, perm),
            0,
            XferFlags::empty(),
        )?;
    }
    Ok(())
}

/// Where in the 2-MiB-aligned area at `base` a module whose first page is `page` goes:
/// at the same offset modulo 2 MiB as its physical address, so that it maps in the
/// largest pieces its extent allows (few page tables and mapping-database nodes), and
/// their number does not depend on where the boot loader happened to put the module.
fn congruent(base: u64, page: u64) -> u64 {
    const LARGE: u64 = 1 << 21;
    base + ((page << PAGE_BITS) & (LARGE - 1))
}

/// Loads and starts a component; returns its id.
pub fn start(spec: &ChildSpec) -> Result<usize, StartError> {
    let id = CHILDREN.lock().len();
    let pd = sel::alloc();
    hc::create_pd(pd, sel::OWN_PD, spec.quota, false)?;
    let mut owned = Vec::new();
    let r = build(spec, id, pd, &mut owned);
    if r.is_err() {
        // Destroying the PD removes everything given to it; the portals the root made
        // for it (which carry `id`) go as well.
        destroy_all(&[pd]);
        destroy_all(&owned);
        with(id, |c| c.alive = false);
    }
    r.map(|()| id)
}

/// Loads the image into `pd`, gives it its pages and capabilities, and starts it.
fn build(spec: &ChildSpec, id: usize, pd: u64, owned: &mut Vec<u64>) -> Result<(), StartError> {
    let file =
        ElfBytes::<LittleEndian>::minimal_parse(spec.image).map_err(|_| StartError::BadElf)?;
    if file.ehdr.class != elf::file::Class::ELF64 || file.ehdr.e_machine != elf::abi::EM_X86_64 {
        return Err(StartError::BadElf);
    }
    let phdrs = file.segments().ok_or(StartError::BadElf)?;
    let mut ranges = Vec::new();

    for ph in phdrs.iter().filter(|p| p.p_type == PT_LOAD) {
        let start = ph.p_vaddr & !0xfff;
        let end = (ph.p_vaddr + ph.p_memsz + 0xfff) & !0xfff;
        if end <= start || end > 0x7f00_0000_0000 {
            return Err(StartError::BadElf);
        }
        let pages = (end - start) >> PAGE_BITS;
        // Physically congruent with its virtual address modulo 2 MiB, so the mapping
        // below goes in the largest pieces the segment allows (few mapping-database
        // nodes), whatever the physical layout happens to be.
        let phys =
            mem::alloc_congruent(pages, 512, start >> PAGE_BITS).ok_or(StartError::NoMemory)?;
        ranges.push((phys, pages));
        let off = ph.p_offset as usize;
        let fsz = ph.p_filesz as usize;
        let data = spec.image.get(off..off + fsz).ok_or(StartError::BadElf)?;
        let dst = mem::virt(phys) + (ph.p_vaddr - start);
        // SAFETY: `phys` is `pages` fresh pages mapped in the root's window; the copy
        // stays within them because p_vaddr + p_filesz <= end.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), dst as *mut u8, fsz) };
        let mut perm = MemPerm::R;
        if ph.p_flags & elf::abi::PF_W != 0 {
            perm |= MemPerm::W;
        }
        if ph.p_flags & elf::abi::PF_X != 0 {
            perm |= MemPerm::X;
        }
        for (vpage, p, order) in mem::dual_pieces(start >> PAGE_BITS, phys >> PAGE_BITS, pages) {
            hc::pd_delegate(
                sel::OWN_PD,
                pd,
                Crd::mem(p + (mem::WINDOW >> PAGE_BITS), order, perm),
                Crd::mem(vpage, order, perm),
                0,
                XferFlags::empty(),
            )?;
        }
    }

    // The start-info page, the shared page and (memcheck) the pattern page.
    let info = give_page(pd, START_INFO_ADDR, MemPerm::R, &mut ranges)?;
    // SAFETY: `info` is a fresh zeroed page of the root's window, exclusively ours
    // until the child starts; StartInfo is one page of plain integers.
    let si = unsafe { &mut *(mem::virt(info) as *mut StartInfo) };
    si.magic = start_info::MAGIC;
    si.index = id as u64;
    si.cpu = spec.cpu;
    si.ncpus = spec.ncpus;
    si.tsc_khz = spec.tsc_khz;
    si.set_args(spec.args);
    let mut pool = None;
    if spec.pool_pages > 0 {
        // 2-MiB aligned, so the VMM and the VM map it with large pages (and few
        // mapping-database nodes).
        let phys = mem::alloc_aligned(spec.pool_pages, 512)
            .or_else(|| mem::alloc(spec.pool_pages))
            .ok_or(StartError::NoMemory)?;
        ranges.push((phys, spec.pool_pages));
        map_range(pd, POOL_ADDR, phys, spec.pool_pages, MemPerm::all())?;
        si.pool_size = spec.pool_pages << PAGE_BITS;
        pool = Some((phys, spec.pool_pages));
    }
    // A VMM's disk session (`blk=BINDING`): its data area is the guest RAM pool.
    if let (Some(b), Some(pool)) = (start_info::arg(spec.args, "blk"), pool) {
        si.blk_ring_bytes = crate::session::open(pd, id, b, pool, &mut ranges, owned)?;
    }
    if let Some((addr, size)) = spec.guest {
        let first = addr >> PAGE_BITS;
        let pages = (addr + size).div_ceil(1 << PAGE_BITS) - first;
        let at = congruent(IMAGE_ADDR, first);
        map_range(pd, at, first << PAGE_BITS, pages, MemPerm::R)?;
        si.image_addr = at + (addr & ((1 << PAGE_BITS) - 1));
        si.image_size = size;
    }
    for (i, m) in spec.modules.iter().enumerate() {
        let Some((addr, size)) = *m else { continue };
        let first = addr >> PAGE_BITS;
        let pages = (addr + size).div_ceil(1 << PAGE_BITS) - first;
        let at = congruent(
            start_info::MODULES_ADDR + i as u64 * start_info::MODULE_STRIDE,
            first,
        );
        let perm = if i == start_info::MODULE_DISK {
            MemPerm::R | MemPerm::W
        } else {
            MemPerm::R
        };
        map_range(pd, at, first << PAGE_BITS, pages, perm)?;
        si.modules[i] = [at + (addr & ((1 << PAGE_BITS) - 1)), size];
    }
    if !spec.mods.is_empty() {
        let page = give_page(pd, start_info::MODS_INFO_ADDR, MemPerm::R, &mut ranges)?;
        for (i, (addr, size, string)) in spec.mods.iter().take(start_info::MAX_MODS).enumerate() {
            let first = addr >> PAGE_BITS;
            let pages = (addr + size).div_ceil(1 << PAGE_BITS) - first;
            let slot = start_info::MODS_SLOT + i as u64;
            let at = congruent(
                start_info::MODULES_ADDR + slot * start_info::MODULE_STRIDE,
                first,
            );
            map_range(pd, at, first << PAGE_BITS, pages, MemPerm::R)?;
            let mut m = start_info::ModInfo {
                addr: at + (addr & ((1 << PAGE_BITS) - 1)),
                size: *size,
                string_len: 0,
                string: [0; 232],
            };
            let n = string.len().min(m.string.len());
            m.string[..n].copy_from_slice(&string.as_bytes()[..n]);
            m.string_len = n as u64;
            // SAFETY: `page` is the fresh page of the root's window given above; entry
            // `i < MAX_MODS` of the ModInfo array fits in it.
            unsafe { core::ptr::write((mem::virt(page) as *mut start_info::ModInfo).add(i), m) };
        }
    }
    let role = start_info::arg(spec.args, "role").unwrap_or("");
    let shared = give_page(pd, SHARED_ADDR, MemPerm::R | MemPerm::W, &mut ranges)?;
    if let Some(g) = &spec.device {
        let wake = crate::driver::grant(pd, g, &mut ranges)?;
        if role == "disk" {
            // The sessions page outlives a disk component that dies (the root reads
            // it): it is not among the pages taken back.
            let page = mem::alloc(1).ok_or(StartError::NoMemory)?;
            // SAFETY: a fresh page of the root's window.
            unsafe { core::ptr::write_bytes(mem::virt(page) as *mut u8, 0, 1 << PAGE_BITS) };
            map_range(
                pd,
                nul_rt::blk::SESSIONS_ADDR,
                page,
                1,
                MemPerm::R | MemPerm::W,
            )?;
            crate::session::register_disk(pd, wake, page);
        }
    }
    let mut test_page = 0;
    if role == "memcheck" {
        test_page = give_page(pd, TEST_PAGE_ADDR, MemPerm::R, &mut ranges)?;
        for i in 0..512u64 {
            // SAFETY: a word inside the fresh page just allocated.
            unsafe {
                *((mem::virt(test_page) + i * 8) as *mut u64) =
                    start_info::pattern_word(id as u64, i)
            };
        }
    }

    // Its own PD, console, service and peer portals, event portals.
    delegate_obj(pd, pd, sel::OWN_PD, perm::ALL)?;
    let svc = services::for_cpu(spec.cpu).ok_or(StartError::Kernel(Status::BadCpu))?;
    let con = services::portal(&svc, services::console_handler, Mtd::empty(), id as u64)?;
    owned.push(con);
    delegate_obj(pd, con, sel::CONSOLE_PT, CALL)?;
    let spt = services::portal(&svc, services::service_handler, Mtd::empty(), id as u64)?;
    owned.push(spt);
    delegate_obj(pd, spt, sel::SERVICE_PT, CALL)?;
    let peer = services::portal(&svc, services::echo_handler, Mtd::empty(), id as u64)?;
    owned.push(peer);
    delegate_obj(pd, peer, sel::PEER_PT, CALL)?;
    let sm = sel::alloc();
    hc::create_sm(sm, sel::OWN_PD, 0)?;
    let fault_mtd = Mtd::RIP_LEN | Mtd::QUAL | Mtd::GPRS | Mtd::RFLAGS;
    for v in 0..32u64 {
        let (h, mtd) = if v == host::STARTUP {
            (services::startup_handler as services::Handler, Mtd::RSP)
        } else {
            (services::fault_handler as services::Handler, fault_mtd)
        };
        let pt = services::portal(&svc, h, mtd, ((id as u64) << 8) | v)?;
        owned.push(pt);
        delegate_obj(pd, pt, v, CALL)?;
    }
    if let Some((base, order)) = spec.ports {
        hc::pd_delegate(
            sel::OWN_PD,
            pd,
            Crd::pio(base, order),
            Crd::pio(base, order),
            0,
            XferFlags::empty(),
        )?;
    }
    for &(r, c, p) in spec.caps {
        delegate_obj(pd, r, c, p)?;
    }

    let ec = sel::alloc();
    let sc = sel::alloc();
    owned.extend([ec, sc]);
    CHILDREN.lock().push(Child {
        name: String::from(spec.name),
        args: String::from(spec.args),
        pd,
        ec,
        sc,
        cpu: spec.cpu,
        entry: file.ehdr.e_entry,
        mem: ranges,
        alive: true,
        started: false,
        sm,
        registered: None,
        results: Vec::new(),
        progress: 0,
        last_fault: None,
        paged: role == "paged" || start_info::flag(spec.args, "paged"),
        paged_faults: 0,
        peer_pt: peer,
        shared,
        test_page,
        owned: owned.clone(),
        by_status: [0; nul_rt::svc::STATUS_BUCKETS],
    });
    hc::create_ec(ec, pd, EcKind::Global, spec.cpu, ROOT_UTCB_ADDR, 0, 0)?;
    delegate_obj(pd, ec, sel::OWN_EC, perm::ALL)?;
    // `prio=` (1..=99, default 10: the root's own SC runs at 100): a driver or service
    // that must answer before the VMs it serves run on.
    let prio = start_info::arg_u64(spec.args, "prio")
        .unwrap_or(10)
        .clamp(1, 99) as u8;
    hc::create_sc(sc, pd, ec, prio, 10_000)?;
    delegate_obj(pd, sc, sel::OWN_SC, perm::ALL)?;
    Ok(())
}
