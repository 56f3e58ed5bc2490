//! Components: child PDs started from boot modules, their event portals, and their
//! removal when they fault.

use alloc::string::String;
use alloc::vec::Vec;

use elf::abi::PT_LOAD;
use elf::endian::LittleEndian;
use elf::ElfBytes;
use nul_rt::hc::{self, EcKind};
use nul_rt::{println, sel};
use peregrine_abi::event::host;
use peregrine_abi::hip::ROOT_UTCB_ADDR;
use peregrine_abi::perm::{self, MemPerm};
use peregrine_abi::{Crd, Mtd, Status, XferFlags, PAGE_BITS};
use spin::Mutex;

use crate::mem;
use crate::services;

/// One started component.
pub struct Child {
    /// Name (module file name without directories).
    pub name: String,
    /// Arguments.
    pub args: String,
    /// Its PD selector in the root.
    pub pd: u64,
    /// Its main EC and SC selectors in the root.
    pub ec: u64,
    /// SC selector.
    pub sc: u64,
    /// CPU of its main EC.
    pub cpu: u64,
    /// ELF entry.
    pub entry: u64,
    /// Physical ranges (address, pages) the root gave it.
    pub mem: Vec<(u64, u64)>,
    /// Still running.
    pub alive: bool,
}

/// All components, indexed by the id their portals carry.
pub static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// Errors of starting a component.
#[derive(Debug)]
pub enum StartError {
    /// The module is not a loadable ELF64 executable.
    BadElf,
    /// Out of memory in the root.
    NoMemory,
    /// A hypercall failed.
    Kernel(Status),
}

impl From<Status> for StartError {
    fn from(s: Status) -> Self {
        StartError::Kernel(s)
    }
}

/// The name of a component for console tags.
pub fn name_of(id: usize) -> String {
    CHILDREN
        .lock()
        .get(id)
        .map(|c| c.name.clone())
        .unwrap_or_else(|| String::from("?"))
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
    /// Kernel-memory quota in pages.
    pub quota: u64,
    /// Give it the I/O ports in this range (base, order).
    pub ports: Option<(u64, u8)>,
    /// Extra object capabilities to delegate: (root selector, child selector, perm).
    pub caps: &'a [(u64, u64, u8)],
}

/// Loads and starts a component; returns its id.
pub fn start(spec: &ChildSpec) -> Result<usize, StartError> {
    let file = ElfBytes::<LittleEndian>::minimal_parse(spec.image).map_err(|_| StartError::BadElf)?;
    if file.ehdr.class != elf::file::Class::ELF64 || file.ehdr.e_machine != elf::abi::EM_X86_64 {
        return Err(StartError::BadElf);
    }
    let phdrs = file.segments().ok_or(StartError::BadElf)?;

    let id = CHILDREN.lock().len();
    let pd = sel::alloc();
    hc::create_pd(pd, sel::OWN_PD, spec.quota, false)?;
    let mut ranges = Vec::new();

    for ph in phdrs.iter().filter(|p| p.p_type == PT_LOAD) {
        let start = ph.p_vaddr & !0xfff;
        let end = (ph.p_vaddr + ph.p_memsz + 0xfff) & !0xfff;
        if end <= start || end > 0x7f00_0000_0000 {
            return Err(StartError::BadElf);
        }
        let pages = (end - start) >> PAGE_BITS;
        let phys = mem::alloc(pages).ok_or(StartError::NoMemory)?;
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
        for (i, (p, order)) in mem::aligned_pieces(phys >> PAGE_BITS, pages).enumerate() {
            let _ = i;
            let vpage = (start >> PAGE_BITS) + (p - (phys >> PAGE_BITS));
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

    // Its own PD, console and service portals, event portals.
    delegate_obj(pd, pd, sel::OWN_PD, perm::ALL)?;
    let svc = services::for_cpu(spec.cpu).ok_or(StartError::Kernel(Status::BadCpu))?;
    let con = services::portal(&svc, services::console_handler, Mtd::empty(), id as u64)?;
    delegate_obj(pd, con, sel::CONSOLE_PT, perm::ALL)?;
    let fault_mtd = Mtd::RIP_LEN | Mtd::QUAL | Mtd::GPRS | Mtd::RFLAGS;
    for v in 0..32u64 {
        let (h, mtd) = if v == host::STARTUP {
            (services::startup_handler as services::Handler, Mtd::RSP)
        } else {
            (services::fault_handler as services::Handler, fault_mtd)
        };
        let pt = services::portal(&svc, h, mtd, ((id as u64) << 8) | v)?;
        delegate_obj(pd, pt, v, perm::ALL)?;
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
    });
    hc::create_ec(ec, pd, EcKind::Global, spec.cpu, ROOT_UTCB_ADDR, 0, 0)?;
    delegate_obj(pd, ec, sel::OWN_EC, perm::ALL)?;
    hc::create_sc(sc, pd, ec, 10, 10_000)?;
    delegate_obj(pd, sc, sel::OWN_SC, perm::ALL)?;
    Ok(id)
}

/// Removes a component: destroys its PD (the kernel stops its ECs and revokes every
/// capability derived from it) and takes its memory back.
pub fn kill(id: usize, reason: &str) {
    let (pd, mem, name) = {
        let mut ch = CHILDREN.lock();
        let Some(c) = ch.get_mut(id) else { return };
        if !c.alive {
            return;
        }
        c.alive = false;
        (c.pd, core::mem::take(&mut c.mem), c.name.clone())
    };
    println!("component {} removed: {}", name, reason);
    let _ = hc::revoke(Crd::obj(pd, 0, perm::ALL), true);
    for (phys, pages) in mem {
        for (p, order) in mem::aligned_pieces(phys >> PAGE_BITS, pages) {
            let _ = hc::revoke(
                Crd::mem(p + (mem::WINDOW >> PAGE_BITS), order, MemPerm::all()),
                false,
            );
        }
        mem::free(phys, pages);
    }
}
