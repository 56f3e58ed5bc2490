//! The boot protocol against the reference: Debian's bzImage loaded by `vmm::boot` and
//! by rust-vmm's `linux-loader` (into `vm-memory` guest memory, the zero page filled the
//! way Firecracker and Cloud Hypervisor fill it), then the setup header, the zero page
//! and the memory layout compared.
//!
//! The kernel: `$PEREGRINE_LINUX_KERNEL`, else the one `cargo xtask linux` fetches into
//! `<target>/linux/root/boot/`. Without it the test is ignored by a plain `cargo test`
//! (the harness prints why); `cargo xtask test` fetches the kernel and runs it with
//! `--ignored`, and then a missing kernel is a failure that says what to do.

use std::path::PathBuf;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams as LlBootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage as LlBzImage;
use linux_loader::loader::{load_cmdline, KernelLoader};
use peregrine_vmm::boot::{self, e820, BootParams, E820Entry, SetupHeader};
use peregrine_vmm::vcpu::{GuestMemory, Unbacked};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest RAM size for both loaders.
const RAM: u64 = 256 << 20;
const CMDLINE: &str = "console=ttyS0 panic=-1 rdinit=/init peregrine.test=all";

/// Guest RAM for `vmm::boot`: one flat buffer from address 0.
struct Flat(Vec<u8>);

impl GuestMemory for Flat {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), Unbacked> {
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.0[r]);
        Ok(())
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Unbacked> {
        let r = self.range(gpa, buf.len())?;
        self.0[r].copy_from_slice(buf);
        Ok(())
    }
}

impl Flat {
    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, Unbacked> {
        let end = gpa
            .checked_add(len as u64)
            .filter(|&e| e <= self.0.len() as u64);
        match end {
            Some(e) => Ok(gpa as usize..e as usize),
            None => Err(Unbacked {
                gpa: gpa.max(self.0.len() as u64),
            }),
        }
    }
}

/// The e820 map both zero pages carry: low RAM, the BIOS area (ACPI tables), RAM.
fn regions() -> Vec<E820Entry> {
    vec![
        E820Entry {
            addr: 0,
            size: 0x9_fc00,
            typ: e820::RAM,
        },
        E820Entry {
            addr: 0xe_0000,
            size: 0x2_0000,
            typ: e820::RESERVED,
        },
        E820Entry {
            addr: 0x10_0000,
            size: RAM - 0x10_0000,
            typ: e820::RAM,
        },
    ]
}

/// The bzImage: `$PEREGRINE_LINUX_KERNEL` or `<target>/linux/root/boot/vmlinuz-*`.
fn kernel_path() -> Result<PathBuf, String> {
    if let Some(k) = std::env::var_os("PEREGRINE_LINUX_KERNEL") {
        return Ok(k.into());
    }
    // <target>/debug/deps/linux_loader-… → <target>
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let target = exe
        .ancestors()
        .nth(3)
        .ok_or("no target directory above the test binary")?;
    let boot = target.join("linux/root/boot");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&boot)
        .map_err(|e| format!("{}: {e}", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| format!("no vmlinuz-* in {}", boot.display()))
}

fn read_kernel() -> Vec<u8> {
    let path = kernel_path().unwrap_or_else(|why| {
        panic!(
            "no bzImage to compare the loaders on ({why}): run `cargo xtask linux` (fetches \
             Debian's kernel into <target>/linux) or set PEREGRINE_LINUX_KERNEL"
        )
    });
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// What `vmm::boot` did.
struct Ours {
    mem: Flat,
    image: Vec<u8>,
    info: boot::BootInfo,
}

fn load_ours(image: Vec<u8>, initrd: &[u8]) -> Ours {
    let mut mem = Flat(vec![0; RAM as usize]);
    let bz = boot::parse(&image).expect("vmm::boot accepts the bzImage");
    let info = boot::load(&mut mem, &bz, &regions(), CMDLINE.as_bytes(), Some(initrd))
        .expect("vmm::boot loads it");
    Ours { mem, image, info }
}

/// The reference: linux-loader loads the kernel and the command line; the VMM's part
/// (zero page from the returned setup header, loader type, command line pointer,
/// initrd at the highest page below the kernel's limit and RAM's end, e820 map) as
/// Firecracker and Cloud Hypervisor do it.
struct Reference {
    mem: GuestMemoryMmap<()>,
    header: setup_header,
    kernel_load: u64,
    kernel_end: u64,
    initrd: (u64, u64),
}

fn load_reference(path_image: &[u8], at: u64, initrd: &[u8]) -> Reference {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let mut file = std::io::Cursor::new(path_image.to_vec());
    let r = LlBzImage::load(&mem, Some(GuestAddress(at)), &mut file, None)
        .expect("linux-loader loads the bzImage");
    let mut cmdline = Cmdline::new(4096).unwrap();
    cmdline.insert_str(CMDLINE).unwrap();
    load_cmdline(&mem, GuestAddress(boot::CMDLINE_ADDR), &cmdline).unwrap();
    let mut header = r.setup_header.expect("a bzImage has a setup header");

    // The initrd: highest page-aligned address that ends below both RAM's end and
    // initrd_addr_max.
    let limit = (mem.last_addr().raw_value() + 1).min(u64::from(header.initrd_addr_max) + 1);
    let initrd_at = (limit - initrd.len() as u64) & !0xfff;
    mem.write_slice(initrd, GuestAddress(initrd_at)).unwrap();

    let mut bp = boot_params::default();
    header.type_of_loader = 0xff;
    header.cmd_line_ptr = boot::CMDLINE_ADDR as u32;
    header.ramdisk_image = initrd_at as u32;
    header.ramdisk_size = initrd.len() as u32;
    bp.hdr = header;
    for (i, e) in regions().iter().enumerate() {
        bp.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.typ,
        };
    }
    bp.e820_entries = regions().len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &LlBootParams::new(&bp, GuestAddress(boot::ZERO_PAGE_ADDR)),
        &mem,
    )
    .unwrap();
    Reference {
        mem,
        header,
        kernel_load: r.kernel_load.raw_value(),
        kernel_end: r.kernel_end,
        initrd: (initrd_at, initrd.len() as u64),
    }
}

fn read_ref(mem: &GuestMemoryMmap<()>, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

#[test]
#[ignore = "needs Debian's bzImage: `cargo xtask linux` fetches it, `cargo xtask test` runs this"]
fn debian_bzimage_loads_the_same_with_linux_loader() {
    let path = kernel_path().unwrap_or_default();
    println!("bzImage: {}", path.display());
    compare(read_kernel());
}

fn compare(image: Vec<u8>) {
    let initrd: Vec<u8> = (0..3 * 4096 + 123).map(|i| (i * 7) as u8).collect();
    let ours = load_ours(image, &initrd);
    let bz = boot::parse(&ours.image).unwrap();
    let reference = load_reference(&ours.image, bz.load_addr(), &initrd);

    // The setup header, field by field, as both parsed it from the file.
    let h: SetupHeader = bz.header;
    let r = reference.header;
    macro_rules! same {
        ($($f:ident),*) => {$(
            let (a, b) = (h.$f, r.$f);
            assert_eq!(u64::from(a), u64::from(b), concat!("setup_header.", stringify!($f)));
        )*};
    }
    same!(
        setup_sects,
        root_flags,
        syssize,
        vid_mode,
        boot_flag,
        header,
        version,
        kernel_version,
        loadflags,
        setup_move_size,
        initrd_addr_max,
        kernel_alignment,
        relocatable_kernel,
        min_alignment,
        xloadflags,
        cmdline_size,
        hardware_subarch,
        hardware_subarch_data,
        payload_offset,
        payload_length,
        setup_data,
        pref_address,
        init_size,
        handover_offset,
        kernel_info_offset
    );
    let (version, xlf) = (h.version, h.xloadflags);
    assert!(
        version >= boot::MIN_VERSION && xlf & 1 != 0,
        "64-bit bzImage"
    );

    // Memory layout: the protected-mode kernel at the same address with the same bytes
    // (linux-loader loads at code32_start unless told; we load at pref_address, which
    // boot.rst prefers, and told it the same), the command line, the initrd.
    assert_eq!(reference.kernel_load, ours.info.entry - 0x200);
    assert_eq!(reference.kernel_load, bz.load_addr());
    let klen = (reference.kernel_end - reference.kernel_load) as usize;
    assert_eq!(klen, bz.kernel.len());
    let mut mine = vec![0u8; klen];
    let mut mem = ours.mem;
    mem.read(reference.kernel_load, &mut mine).unwrap();
    assert!(
        mine == read_ref(&reference.mem, reference.kernel_load, klen),
        "kernel bytes"
    );
    let n = CMDLINE.len() + 1;
    let mut cl = vec![0u8; n];
    mem.read(boot::CMDLINE_ADDR, &mut cl).unwrap();
    assert_eq!(cl, read_ref(&reference.mem, boot::CMDLINE_ADDR, n));
    assert_eq!(ours.info.initrd, Some(reference.initrd), "initrd placement");
    let (at, len) = reference.initrd;
    println!(
        "kernel {:#x}..{:#x} (protocol {:#x}), command line at {:#x}, initrd {:#x} bytes at {:#x}",
        reference.kernel_load,
        reference.kernel_end,
        version,
        boot::CMDLINE_ADDR,
        len,
        at
    );
    let mut rd = vec![0u8; len as usize];
    mem.read(at, &mut rd).unwrap();
    assert_eq!(rd, initrd);

    // The zero page, byte for byte, except the fields the two fill differently by
    // design: code32_start (linux-loader writes its load address there; the 64-bit entry
    // does not use it, so we keep the image's value).
    let mut zp = vec![0u8; BootParams::SIZE];
    mem.read(boot::ZERO_PAGE_ADDR, &mut zp).unwrap();
    let theirs = read_ref(&reference.mem, boot::ZERO_PAGE_ADDR, BootParams::SIZE);
    let code32 = 0x214..0x218;
    let diff: Vec<usize> = (0..BootParams::SIZE)
        .filter(|i| !code32.contains(i) && zp[*i] != theirs[*i])
        .collect();
    assert!(
        diff.is_empty(),
        "zero pages differ at {:#x?}",
        &diff[..diff.len().min(16)]
    );
    let ours_bp = BootParams::from_bytes(&zp).unwrap();
    let (ty, ptr, ent) = (
        ours_bp.hdr.type_of_loader,
        ours_bp.hdr.cmd_line_ptr,
        ours_bp.e820_entries,
    );
    assert_eq!((ty, ptr, ent), (0xff, boot::CMDLINE_ADDR as u32, 3));
    for (i, e) in regions().iter().enumerate() {
        let got = ours_bp.e820(i);
        let (a, s, t) = (got.addr, got.size, got.typ);
        assert_eq!((a, s, t), (e.addr, e.size, e.typ));
    }
}
