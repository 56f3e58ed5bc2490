//! The child registry: every component the root started, by the id its portals carry,
//! and what happens to one after its start (lookup, the pager, removal). The start
//! path (`component`) and the root's service portals (`services`) both use it; neither
//! uses the other's internals through it.

use alloc::string::String;
use alloc::vec::Vec;

use nul_rt::hc;
use nul_rt::start_info::{self, PAGED_BASE};
use nul_rt::sync::Mutex;
use nul_rt::{println, sel};
use peregrine_abi::perm::{self, MemPerm};
use peregrine_abi::{Crd, XferFlags, PAGE_BITS};

use crate::mem;

/// One started component.
#[allow(dead_code)] // `ec`, `sc`: for recall and consumed-time scenarios
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
    /// Whether its main EC was started (a second STARTUP event is a fault).
    pub started: bool,
    /// A semaphore in the root that the service portal ups on every report.
    pub sm: u64,
    /// The root's selector of the portal the component registered ([`nul_rt::svc::REGISTER`]).
    pub registered: Option<u64>,
    /// Results it reported ([`nul_rt::svc::RESULT`]): (key, value) in order.
    pub results: Vec<(u64, u64)>,
    /// Last progress counter it reported ([`nul_rt::svc::PROGRESS`]).
    pub progress: u64,
    /// The last exception it took: (vector, fault address).
    pub last_fault: Option<(u64, u64)>,
    /// The root's pager backs [`PAGED_BASE`] for it on demand.
    pub paged: bool,
    /// Page faults the pager resolved.
    pub paged_faults: u64,
    /// The root's echo portal delegated to it at [`sel::PEER_PT`].
    pub peer_pt: u64,
    /// Physical address of the page shared with it at [`SHARED_ADDR`].
    pub shared: u64,
    /// Physical address of its pattern page at [`TEST_PAGE_ADDR`] (memcheck), or 0.
    pub test_page: u64,
    /// Objects the root created for it (its EC and SC, the portals it was given):
    /// destroyed with it.
    pub owned: Vec<u64>,
    /// Its calls by status, as last reported with its progress.
    pub by_status: [u64; nul_rt::svc::STATUS_BUCKETS],
}

impl Child {
    /// The `role=` argument.
    pub fn role(&self) -> &str {
        start_info::arg(&self.args, "role").unwrap_or("")
    }

    /// The first value reported for `key`.
    pub fn result(&self, key: u64) -> Option<u64> {
        self.results.iter().find(|r| r.0 == key).map(|r| r.1)
    }
}

/// All components, indexed by the id their portals carry.
pub static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// The name of a component for console tags.
pub fn name_of(id: usize) -> String {
    CHILDREN
        .lock()
        .get(id)
        .map(|c| c.name.clone())
        .unwrap_or_else(|| String::from("?"))
}

/// Removes a component: destroys its PD (the kernel stops its ECs and revokes every
/// capability derived from it) and takes its memory back.
pub fn kill(id: usize, reason: &str) {
    let (pd, mem, name, sm, mut owned) = {
        let mut ch = CHILDREN.lock();
        let Some(c) = ch.get_mut(id) else { return };
        if !c.alive {
            return;
        }
        c.alive = false;
        (
            c.pd,
            core::mem::take(&mut c.mem),
            c.name.clone(),
            c.sm,
            core::mem::take(&mut c.owned),
        )
    };
    // The portal it registered (a copy of its own, gone with its PD) leaves a
    // selector behind.
    if let Some(r) = with(id, |c| c.registered.take()).flatten() {
        owned.push(r);
    }
    println!("component {} ({}) removed: {}", name, id, reason);
    // The PD first (its ECs stop), then what the root made for it: its EC and SC
    // (their original capabilities are the root's) and its portals.
    destroy_all(&[pd]);
    // A disk session's data area is this memory: the service finishes with it first;
    // if it does not answer, the memory is revoked but never reused.
    let quarantine = !crate::session::close(id);
    destroy_all(&owned);
    for (phys, pages) in mem {
        for (p, order) in mem::aligned_pieces(phys >> PAGE_BITS, pages) {
            let _ = hc::revoke(
                Crd::mem(p + (mem::WINDOW >> PAGE_BITS), order, MemPerm::all()),
                false,
            );
        }
        if !quarantine {
            mem::free(phys, pages);
        }
    }
    // Whoever waits for this component learns of its end.
    let _ = hc::sm_up(sm);
}

/// Destroys the objects at the root's selectors `sels` and frees the selectors.
pub(crate) fn destroy_all(sels: &[u64]) {
    for &s in sels {
        let _ = hc::revoke(Crd::obj(s, 0, perm::ALL), true);
        sel::free(s);
    }
}

/// Frees what the root still keeps of a removed component (its semaphore, which told
/// waiters of its end): after this, the component has cost the kernel nothing.
pub fn reap(id: usize) {
    let sm = {
        let mut ch = CHILDREN.lock();
        match ch.get_mut(id) {
            Some(c) if !c.alive && c.sm != 0 => core::mem::replace(&mut c.sm, 0),
            _ => return,
        }
    };
    destroy_all(&[sm]);
}

/// The first living component with `role=ROLE`.
pub fn find(role: &str) -> Option<usize> {
    CHILDREN
        .lock()
        .iter()
        .position(|c| c.alive && c.role() == role)
}

/// All components with `role=ROLE`, alive or not.
pub fn find_all(role: &str) -> Vec<usize> {
    CHILDREN
        .lock()
        .iter()
        .enumerate()
        .filter(|(_, c)| c.role() == role)
        .map(|(i, _)| i)
        .collect()
}

/// Runs `f` on component `id`'s state (under the lock: keep `f` short, no hypercalls
/// that block).
pub fn with<R>(id: usize, f: impl FnOnce(&mut Child) -> R) -> Option<R> {
    CHILDREN.lock().get_mut(id).map(f)
}

/// The pager: backs `addr` in component `id` with a fresh page if the component is
/// paged and `addr` lies in its paged region. True when the fault is resolved.
pub fn page_in(id: usize, addr: u64) -> bool {
    let Some((pd, true)) = with(id, |c| (c.pd, c.paged && c.alive)) else {
        return false;
    };
    if !(PAGED_BASE..PAGED_BASE + start_info::PAGED_SIZE).contains(&addr) {
        return false;
    }
    let Some(phys) = mem::alloc(1) else {
        return false;
    };
    let rw = MemPerm::R | MemPerm::W;
    let ok = hc::pd_delegate(
        sel::OWN_PD,
        pd,
        Crd::mem((mem::WINDOW + phys) >> PAGE_BITS, 0, rw),
        Crd::mem(addr >> PAGE_BITS, 0, rw),
        0,
        XferFlags::empty(),
    )
    .is_ok();
    if !ok {
        mem::free(phys, 1);
        return false;
    }
    with(id, |c| {
        c.mem.push((phys, 1));
        c.paged_faults += 1;
    });
    true
}
