//! The start-info page the root maps into every component it starts, the fixed
//! addresses of a component's address space, and argument parsing.
//!
//! A component's main EC is entered with `rdi` = [`START_INFO_ADDR`] and `rsi` = its
//! UTCB address ([`peregrine_abi::hip::ROOT_UTCB_ADDR`], the same address as the root's).

/// Where the root maps the (read-only) start-info page of a component.
pub const START_INFO_ADDR: u64 = 0x7fff_ffff_c000;
/// A read-write page shared between the root and the component (flags, mailboxes).
pub const SHARED_ADDR: u64 = 0x7fff_ffff_b000;
/// A read-only page with a known pattern ([`pattern_word`]), for `role=memcheck`.
pub const TEST_PAGE_ADDR: u64 = 0x7fff_ffff_a000;
/// Start of the region the root's pager backs on demand (components with `paged`).
pub const PAGED_BASE: u64 = 0x6000_0000_0000;
/// Size of the paged region in bytes.
pub const PAGED_SIZE: u64 = 1 << 28;

/// Where the root maps a VMM's memory pool for guest RAM (read-write, [`StartInfo::pool_size`]
/// bytes).
pub const POOL_ADDR: u64 = 0x5000_0000_0000;
/// Where the root maps the boot module a VMM runs as its guest (read-only, at the
/// offset modulo 2 MiB of its physical address; the image starts at
/// [`StartInfo::image_addr`]).
pub const IMAGE_ADDR: u64 = 0x4f00_0000_0000;

/// Where the root maps a VMM's further boot modules (`initrd=`, `disk=`): module `i`
/// of [`StartInfo::modules`] in the area at `MODULES_ADDR + i * MODULE_STRIDE`, at the
/// offset modulo 2 MiB of its physical address (the disk read-write, the others
/// read-only).
pub const MODULES_ADDR: u64 = 0x4e00_0000_0000;
/// Address space set aside per further module.
pub const MODULE_STRIDE: u64 = 0x10_0000_0000;
/// Module slot of the initrd.
pub const MODULE_INITRD: usize = 0;
/// Module slot of the disk image.
pub const MODULE_DISK: usize = 1;

/// Where the root maps a VMM's module page (read-only) when its arguments name
/// `mods=`: [`MAX_MODS`] [`ModInfo`]s, the guest's boot modules (a Multiboot guest's).
pub const MODS_INFO_ADDR: u64 = 0x7fff_ffff_7000;
/// Boot modules a VMM passes on at most.
pub const MAX_MODS: usize = 8;
/// Module `i` of `mods=` is mapped read-only in the area at
/// `MODULES_ADDR + (MODS_SLOT + i) * MODULE_STRIDE` (after the initrd and the disk).
pub const MODS_SLOT: u64 = 2;

/// One module a VMM passes on to its guest.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModInfo {
    /// Where it is mapped (0: no module in this slot).
    pub addr: u64,
    /// Bytes.
    pub size: u64,
    /// Length of its string.
    pub string_len: u64,
    /// Its string: the module's file name and arguments as the boot configuration
    /// gives them (what a Multiboot loader puts in the module's `string`).
    pub string: [u8; 232],
}

const _: () = assert!(core::mem::size_of::<ModInfo>() * MAX_MODS <= 4096);

impl ModInfo {
    /// The module's bytes.
    ///
    /// # Safety
    /// `self` must be from the root's module page, which maps the module there for the
    /// component's lifetime.
    pub unsafe fn bytes(&self) -> &'static [u8] {
        // SAFETY: the caller's contract.
        unsafe { core::slice::from_raw_parts(self.addr as *const u8, self.size as usize) }
    }

    /// The module's string.
    pub fn string(&self) -> &str {
        let n = (self.string_len as usize).min(self.string.len());
        core::str::from_utf8(&self.string[..n]).unwrap_or("")
    }
}

/// The VMM's boot modules (`mods=`), if the root mapped a module page.
pub fn mods(si: &StartInfo) -> &'static [ModInfo] {
    if arg(si.args(), "mods").is_none() {
        return &[];
    }
    // SAFETY: with `mods=` in the arguments the root mapped the read-only module page
    // at MODS_INFO_ADDR for the component's lifetime; ModInfo is plain integers.
    let all = unsafe { &*(MODS_INFO_ADDR as *const [ModInfo; MAX_MODS]) };
    let n = all.iter().take_while(|m| m.addr != 0).count();
    &all[..n]
}

/// "NULSTART" little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"NULSTART");

/// Bytes of the argument string the page holds.
pub const ARGS_MAX: usize = 4096 - 14 * 8;

/// The start-info page.
#[repr(C)]
pub struct StartInfo {
    /// [`MAGIC`].
    pub magic: u64,
    /// The component's index in the root (the id its portals carry).
    pub index: u64,
    /// The CPU its main EC runs on.
    pub cpu: u64,
    /// Number of online CPUs.
    pub ncpus: u64,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// A VMM's disk session (`blk=`): bytes of its ring region at
    /// [`crate::blk::VMM_RING_ADDR`] (0: none).
    pub blk_ring_bytes: u64,
    /// Bytes of the memory pool at [`POOL_ADDR`] (0: none).
    pub pool_size: u64,
    /// Address of the guest image (inside the mapping at [`IMAGE_ADDR`]; 0: none).
    pub image_addr: u64,
    /// Bytes of the guest image.
    pub image_size: u64,
    /// Further boot modules (address and size; 0 if absent): [`MODULE_INITRD`],
    /// [`MODULE_DISK`].
    pub modules: [[u64; 2]; 2],
    /// Length of the argument string.
    pub args_len: u64,
    /// The argument string (the module command line without the file name).
    pub args: [u8; ARGS_MAX],
}

const _: () = assert!(core::mem::size_of::<StartInfo>() == 4096);

impl StartInfo {
    /// The start-info page at `addr`, if it carries the magic.
    ///
    /// # Safety
    /// `addr` must be 0 or the address of a mapped, readable page that stays mapped.
    pub unsafe fn at(addr: u64) -> Option<&'static StartInfo> {
        if addr == 0 || addr & 0xfff != 0 {
            return None;
        }
        // SAFETY: the caller guarantees a mapped page; StartInfo is plain integers.
        let s = unsafe { &*(addr as *const StartInfo) };
        (s.magic == MAGIC).then_some(s)
    }

    /// The start-info page a component's main EC was entered with (`arg`, from `rdi`);
    /// without one (not started by the root) it says so and blocks for good.
    pub fn from_entry(arg: u64) -> &'static StartInfo {
        // SAFETY: the root enters components with the start-info page's address in
        // rdi, mapped read-only for the component's lifetime; `at` checks the alignment
        // and the magic.
        match unsafe { StartInfo::at(arg) } {
            Some(si) => si,
            None => {
                crate::println!("no start-info page at {:#x}", arg);
                crate::start::block_forever()
            }
        }
    }

    /// Further boot module `i`, if the root gave it.
    ///
    /// # Safety
    /// The start-info page must be the root's, which maps the module there for the
    /// component's lifetime (read-write for [`MODULE_DISK`], read-only otherwise); the
    /// caller must not make two live slices of the same module.
    pub unsafe fn module(&self, i: usize) -> Option<&'static mut [u8]> {
        let [addr, size] = *self.modules.get(i)?;
        // SAFETY: per the contract above, `[addr, addr + size)` is mapped for us; a
        // read-only module is only ever read through the slice (callers' duty).
        (addr != 0)
            .then(|| unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, size as usize) })
    }

    /// The argument string.
    pub fn args(&self) -> &str {
        let n = (self.args_len as usize).min(ARGS_MAX);
        core::str::from_utf8(&self.args[..n]).unwrap_or("")
    }

    /// Writes `args` into the page (truncated at a character boundary if too long).
    pub fn set_args(&mut self, args: &str) {
        let mut n = args.len().min(ARGS_MAX);
        while !args.is_char_boundary(n) {
            n -= 1;
        }
        self.args[..n].copy_from_slice(&args.as_bytes()[..n]);
        self.args_len = n as u64;
    }
}

/// The value of `key=` in an argument string.
pub fn arg<'a>(args: &'a str, key: &str) -> Option<&'a str> {
    args.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The numeric value of `key=` (decimal, or hex with `0x`).
pub fn arg_u64(args: &str, key: &str) -> Option<u64> {
    let v = arg(args, key)?.replace('_', "");
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Whether the bare word `key` appears in an argument string.
pub fn flag(args: &str, key: &str) -> bool {
    args.split_whitespace().any(|w| w == key)
}

/// Word `i` of the memcheck pattern page of component `index`.
pub const fn pattern_word(index: u64, i: u64) -> u64 {
    (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (index << 48) ^ 0x5a5a
}

/// The checksum both sides compute over a page of words.
pub fn checksum(words: &[u64]) -> u64 {
    words.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &w| {
        (h ^ w).rotate_left(13).wrapping_mul(0x100_0000_01b3)
    })
}

/// Where `role=benchsrv` opens its delegation window for the one-page benchmark.
pub const BENCH_WINDOW_ADDR: u64 = 0x6100_0000_0000;
