//! The system disk: a GPT image ([`crate::gpt_image`]) with the Linux guest's ext4
//! root as partition 1 ([`ROOT_NAME`]) and a scratch partition 2 ([`DATA_NAME`],
//! [`DATA_MIB`] MiB of a pattern, which the two-VM isolation test overwrites), and the
//! boot of Linux on Peregrine from it: QEMU's NVMe controller on the image, the disk
//! component (`nul-disk role=disk`, the NVMe driver and disk service) and a VMM whose
//! virtio-blk disk is the partition its binding (`blk=`) names, so the guest sees that
//! partition alone as `/dev/vda` and mounts it as its root.
//!
//! `cargo xtask run` keeps its image at [`default_path`] across runs (a persistent
//! disk): created on first use, recreated by `--fresh-disk`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use gpt_disk_types::{guid, Guid};
use peregrine_blkproto::binding::{Binding, Bounds};

use crate::boot::{BootSpec, Exit, RunResult};
use crate::build::Images;
use crate::gpt_image::{self, Content, Layout, Part};
use crate::linux::{self, Guest, VMM_MEM_MIB};
use crate::workspace;

/// Partition 1's name: the ext4 root.
pub const ROOT_NAME: &str = "peregrine-root";
/// Partition 2's name: scratch.
pub const DATA_NAME: &str = "peregrine-data";
/// Size of the scratch partition, MiB.
pub const DATA_MIB: u64 = 64;
/// The seed of the scratch partition's pattern ([`crate::storage::pattern`]).
pub const DATA_SEED: u64 = 0xda7a;
/// The disk's GUID (fixed: the same image on every machine).
pub const DISK_GUID: Guid = guid!("70657265-6772-696e-6500-000000000000");
/// Partition 1's unique GUID.
pub const ROOT_GUID: Guid = guid!("70657265-6772-696e-6500-000000000001");
/// Partition 2's unique GUID.
pub const DATA_GUID: Guid = guid!("70657265-6772-696e-6500-000000000002");
/// The VMM's binding unless `--part` names another.
pub const DEFAULT_BINDING: &str = "part=name:peregrine-root";
/// The disk component's arguments: QEMU's NVMe controller, MSI-X, 1024 DMA pages.
pub const DISK_ARGS: &str = "role=disk pci=nvme msi=1 dma=1024 prio=20";
/// The same, the controller polled instead of interrupting (the measured alternative,
/// `bench disk`'s `poll` rows).
pub const DISK_ARGS_POLLED: &str = "role=disk pci=nvme poll dma=1024 prio=20";
/// The NVMe controller's serial number in QEMU.
pub const NVME_SERIAL: &str = "peregrine";
/// The guest's root device on Peregrine: the session's disk, the bound partition alone.
pub const SESSION_ROOT_DEVICE: &str = "/dev/vda";

/// The partitions of the system disk whose root is the ext4 image `rootfs`.
pub fn parts(rootfs: &Path) -> Vec<Part> {
    vec![
        Part {
            name: ROOT_NAME.into(),
            type_guid: gpt_image::LINUX_ROOT_X86_64,
            unique_guid: ROOT_GUID,
            min_bytes: 0,
            content: Content::File(rootfs.to_path_buf()),
        },
        Part {
            name: DATA_NAME.into(),
            type_guid: gpt_image::LINUX_DATA,
            unique_guid: DATA_GUID,
            min_bytes: DATA_MIB << 20,
            content: Content::Pattern(DATA_SEED),
        },
    ]
}

/// Writes the system disk with the root `rootfs` to `out`.
pub fn build(rootfs: &Path, out: &Path) -> Result<Layout> {
    gpt_image::write(out, DISK_GUID, &parts(rootfs))
}

/// `cargo xtask run`'s persistent disk: `<target>/peregrine-disk.img`.
pub fn default_path() -> Result<PathBuf> {
    Ok(workspace::target_dir()?.join("peregrine-disk.img"))
}

/// Makes sure the system disk `path` exists: written from `rootfs` when missing or when
/// `fresh`; returns whether it was written.
pub fn ensure(path: &Path, rootfs: &Path, fresh: bool) -> Result<bool> {
    if path.exists() && !fresh {
        return Ok(false);
    }
    build(rootfs, path).with_context(|| {
        format!(
            "building the system disk {} from {}",
            path.display(),
            rootfs.display()
        )
    })?;
    Ok(true)
}

/// Checks the binding `binding` against the image `image` as the disk service will:
/// one word (the root's `blk=` value), on disk 0 (one NVMe controller), and resolved on
/// the image's GPT (a `range=` needs none); returns the blocks it names.
pub fn resolve(image: &Path, binding: &str) -> Result<Bounds> {
    if binding.split_whitespace().count() != 1 {
        bail!("binding {binding:?}: one word (part=N, part=name:NAME, part=guid:GUID or range=FIRST+COUNT)");
    }
    let b = Binding::parse(binding).map_err(|e| anyhow::anyhow!("binding {binding:?}: {e:?}"))?;
    if b.disk != 0 {
        bail!(
            "binding {binding:?}: disk {} (there is one disk, 0)",
            b.disk
        );
    }
    let (partitions, blocks) = match b.target {
        peregrine_blkproto::binding::Target::Range { .. } => {
            let len = std::fs::metadata(image)
                .with_context(|| format!("{}", image.display()))?
                .len();
            (Vec::new(), len / gpt_image::BLOCK)
        }
        _ => {
            let (g, blocks) = gpt_image::read(image)?;
            (g.partitions, blocks)
        }
    };
    b.resolve(&partitions, blocks).map_err(|e| {
        let names: Vec<String> = partitions
            .iter()
            .map(|p| format!("{} {:?}", p.index + 1, p.name))
            .collect();
        anyhow::anyhow!(
            "binding {binding:?} on {}: {e:?} (partitions: {})",
            image.display(),
            names.join(", ")
        )
    })
}

/// The QEMU arguments attaching `image` as an NVMe controller (serial
/// [`NVME_SERIAL`]) with one namespace, written in place with QEMU's `writeback` cache:
/// what the guest flushed survives QEMU's death (see [`linux::virtio_disk`]).
pub fn nvme_args(image: &Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!(
            "file={},if=none,id=nvm,format=raw,cache=writeback",
            crate::qemu::escape_commas(&image.to_string_lossy())
        ),
        "-device".into(),
        format!("nvme,serial={NVME_SERIAL},drive=nvm"),
    ]
}

/// A Linux VM on the system disk.
#[derive(Debug, Clone)]
pub struct NvmeVm {
    /// The disk image (attached as QEMU's NVMe controller).
    pub image: PathBuf,
    /// The VMM's binding (`blk=`), one word.
    pub binding: String,
    /// vCPUs.
    pub cpus: u32,
    /// `/init`'s tests (`peregrine.test=`); empty: the shell.
    pub tests: String,
    /// More of the guest's kernel command line (`peregrine.seed=…`).
    pub args: String,
    /// The console on this terminal (the VMM's `interactive` flag).
    pub interactive: bool,
    /// Mount the session's disk as the root (`peregrine.root=`); off, the guest stays
    /// in its initramfs and the disk is just `/dev/vda`.
    pub root: bool,
    /// The VMM's name (`name=`), which tags its console lines (`[linux] …`).
    pub name: String,
    /// The host CPU of vCPU 0 (the VMM's `cpu=`); vCPU i runs on `host_cpu + i`.
    pub host_cpu: u32,
}

impl NvmeVm {
    /// The default VM on `image`: [`DEFAULT_BINDING`], one vCPU, the shell.
    pub fn new(image: &Path) -> NvmeVm {
        NvmeVm {
            image: image.to_path_buf(),
            binding: DEFAULT_BINDING.into(),
            cpus: 1,
            tests: String::new(),
            args: String::new(),
            interactive: false,
            root: true,
            name: "linux".into(),
            host_cpu: 0,
        }
    }

    /// The guest's kernel command line: `/init`'s, the root on the session's disk, and
    /// `args`.
    pub fn cmdline(&self) -> String {
        let mut c = linux::cmdline(&self.tests);
        if self.root {
            c += " peregrine.root=";
            c += SESSION_ROOT_DEVICE;
        }
        if !self.args.is_empty() {
            c.push(' ');
            c += &self.args;
        }
        c
    }
}

/// `spec` (the system with the root task) with Linux on the system disk: the disk
/// component ([`DISK_ARGS`]) first, then a VMM booting `guest` whose disk is `vm`'s
/// binding (`blk=`, no RAM disk), the guest's kernel and initramfs, and QEMU's NVMe
/// controller on `vm.image`. The root runs `test=vmm`, waiting for the VM's power-off:
/// 600 s with tests, a year for the shell.
pub fn linux_on_nvme_spec(spec: BootSpec, images: &Images, guest: &Guest, vm: &NvmeVm) -> BootSpec {
    linux_vms_on_nvme_spec(spec, images, guest, DISK_ARGS, std::slice::from_ref(vm))
}

/// [`linux_on_nvme_spec`] with several VMs at once on the one disk (all of `vms` on the
/// same image), each a VMM of its own with its binding, name and host CPU, and the disk
/// component started with `disk_args` ([`DISK_ARGS`], [`DISK_ARGS_POLLED`]). QEMU gets
/// a CPU for the highest `host_cpu` (a VM's further vCPUs wrap around the CPUs there
/// are, as ever) and RAM for every VM's
/// [`VMM_MEM_MIB`] besides the system. The root waits for every VM's power-off; a
/// year when one of them runs the shell.
///
/// # Panics
///
/// Without VMs, or with VMs on different images (QEMU has one NVMe controller).
pub fn linux_vms_on_nvme_spec(
    spec: BootSpec,
    images: &Images,
    guest: &Guest,
    disk_args: &str,
    vms: &[NvmeVm],
) -> BootSpec {
    let first = vms.first().expect("at least one VM");
    assert!(
        vms.iter().all(|v| v.image == first.image),
        "the VMs share one disk image"
    );
    let root = if vms.iter().any(|v| v.tests.is_empty()) {
        "test=vmm secs=31536000"
    } else {
        "test=vmm secs=600"
    };
    let mut spec = spec.root_args(root).module(images.disk(), disk_args);
    for vm in vms {
        let flags = format!(
            "blk={} {}",
            vm.binding,
            if vm.interactive { "interactive " } else { "" }
        );
        spec = spec.module(
            images.vmm(),
            &linux::vmm_line_on(guest, &vm.name, vm.host_cpu, vm.cpus, &flags, &vm.cmdline()),
        );
    }
    let mut spec = spec
        .module(guest.kernel.clone(), "")
        .module(guest.initramfs.clone(), "");
    spec.extra_qemu_args.extend(nvme_args(&first.image));
    let cpus = vms.iter().map(|v| v.host_cpu + 1).max().unwrap_or(1);
    spec.smp = spec.smp.max(cpus);
    // Room for the guests' RAM besides the kernel, the root and the modules.
    let n = u32::try_from(vms.len()).unwrap_or(u32::MAX);
    spec.memory_mib = spec.memory_mib.max(VMM_MEM_MIB * n + 256);
    spec
}

/// Whether a run of [`linux_on_nvme_spec`] with tests ended as the guest's power-off:
/// the VMM reported it and the root's `test=vmm` passed.
pub fn vm_powered_off(r: &RunResult) -> bool {
    r.exit == Exit::Success && r.passed("vmm") && r.serial.contains("vmm: guest powered off")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> Guest {
        Guest {
            kernel: "/g/vmlinuz-6.1".into(),
            initramfs: "/g/initramfs.cpio".into(),
            disk: "/g/disk.img".into(),
            disk_md5: String::new(),
            rootfs: "/g/rootfs.img".into(),
        }
    }

    fn images() -> Images {
        Images { dir: "/i".into() }
    }

    #[test]
    fn the_module_list_starts_the_disk_component_before_the_vmm() {
        let mut vm = NvmeVm::new(Path::new("/t/peregrine,disk.img"));
        vm.cpus = 2;
        vm.interactive = true;
        let spec = linux_on_nvme_spec(BootSpec::new("run", &images()), &images(), &guest(), &vm);
        let m: Vec<(String, &str)> = spec
            .modules
            .iter()
            .map(|(p, a)| (p.to_string_lossy().into_owned(), a.as_str()))
            .collect();
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].1, "test=vmm secs=31536000");
        assert_eq!((m[1].0.as_str(), m[1].1), ("/i/nul-disk", DISK_ARGS));
        assert_eq!(m[2].0, "/i/nul-vmm");
        assert_eq!(
            m[2].1,
            "name=linux guest=vmlinuz-6.1 initrd=initramfs.cpio cpus=2 mem=256 mode=linux \
             cpu=0 blk=part=name:peregrine-root interactive -- console=ttyS0 panic=-1 \
             rdinit=/init peregrine.root=/dev/vda"
        );
        assert!(!m[2].1.contains("disk="), "no RAM disk");
        assert_eq!(m[3].0, "/g/vmlinuz-6.1");
        assert_eq!(m[4].0, "/g/initramfs.cpio");
        assert_eq!(
            spec.extra_qemu_args.join(" "),
            "-drive file=/t/peregrine,,disk.img,if=none,id=nvm,format=raw,cache=writeback \
             -device nvme,serial=peregrine,drive=nvm"
        );
        assert!(spec.memory_mib >= VMM_MEM_MIB + 256);
    }

    #[test]
    fn tests_and_seed_reach_the_guest() {
        let vm = NvmeVm {
            binding: "part=2".into(),
            tests: "root,persist-write".into(),
            args: "peregrine.seed=9".into(),
            ..NvmeVm::new(Path::new("/d.img"))
        };
        let spec = linux_on_nvme_spec(BootSpec::new("t", &images()), &images(), &guest(), &vm);
        assert_eq!(spec.modules[0].1, "test=vmm secs=600");
        let vmm = &spec.modules[2].1;
        assert!(vmm.contains(" blk=part=2 -- "), "{vmm}");
        assert!(
            vmm.ends_with(
                " -- console=ttyS0 panic=-1 rdinit=/init quiet peregrine.test=root,persist-write \
                 peregrine.root=/dev/vda peregrine.seed=9"
            ),
            "{vmm}"
        );
    }

    #[test]
    fn several_vms_share_the_disk_component_and_the_disk() {
        let img = Path::new("/d.img");
        let a = NvmeVm {
            name: "linux-a".into(),
            tests: "root".into(),
            ..NvmeVm::new(img)
        };
        let b = NvmeVm {
            name: "linux-b".into(),
            host_cpu: 1,
            binding: "part=2".into(),
            tests: "size".into(),
            root: false,
            ..NvmeVm::new(img)
        };
        let spec = linux_vms_on_nvme_spec(
            BootSpec::new("t", &images()),
            &images(),
            &guest(),
            DISK_ARGS_POLLED,
            &[a.clone(), b],
        );
        let m: Vec<&str> = spec.modules.iter().map(|(_, a)| a.as_str()).collect();
        assert_eq!(m.len(), 6);
        assert_eq!(m[0], "test=vmm secs=600");
        assert_eq!(m[1], DISK_ARGS_POLLED);
        assert!(
            m[2].starts_with("name=linux-a guest=vmlinuz-6.1 "),
            "{}",
            m[2]
        );
        assert!(
            m[2].contains(" cpu=0 blk=part=name:peregrine-root -- "),
            "{}",
            m[2]
        );
        assert!(m[3].starts_with("name=linux-b "), "{}", m[3]);
        assert!(m[3].contains(" cpu=1 blk=part=2 -- "), "{}", m[3]);
        assert!(!m[3].contains("peregrine.root="), "{}", m[3]);
        assert_eq!(
            (spec.modules[4].0.as_path(), spec.modules[5].0.as_path()),
            (Path::new("/g/vmlinuz-6.1"), Path::new("/g/initramfs.cpio"))
        );
        assert_eq!(spec.smp, 2);
        assert!(spec.memory_mib >= 2 * VMM_MEM_MIB + 256);
        assert_eq!(
            spec.extra_qemu_args
                .iter()
                .filter(|a| *a == "-drive")
                .count(),
            1
        );
        // One VM: what linux_on_nvme_spec gives.
        let one = linux_vms_on_nvme_spec(
            BootSpec::new("t", &images()),
            &images(),
            &guest(),
            DISK_ARGS,
            std::slice::from_ref(&a),
        );
        let single = linux_on_nvme_spec(BootSpec::new("t", &images()), &images(), &guest(), &a);
        assert_eq!(one.modules, single.modules);
        assert_eq!((one.smp, one.memory_mib), (1, 512));
    }

    #[test]
    #[should_panic(expected = "one disk image")]
    fn vms_on_two_images_are_refused() {
        let vms = [
            NvmeVm::new(Path::new("/a.img")),
            NvmeVm::new(Path::new("/b.img")),
        ];
        linux_vms_on_nvme_spec(
            BootSpec::new("t", &images()),
            &images(),
            &guest(),
            DISK_ARGS,
            &vms,
        );
    }

    #[test]
    fn the_system_disk_has_root_and_data() {
        let dir = workspace::out_dir("test-sysdisk").unwrap();
        let rootfs = dir.join(format!("rootfs.{}", std::process::id()));
        // A stand-in root of 3 MiB and a bit: its partition is rounded up to 4 MiB.
        std::fs::write(&rootfs, vec![0xe4; (3 << 20) + 5]).unwrap();
        let img = dir.join(format!("disk.{}.img", std::process::id()));
        assert!(ensure(&img, &rootfs, false).unwrap());
        assert!(!ensure(&img, &rootfs, false).unwrap(), "kept");
        let (g, blocks) = gpt_image::read(&img).unwrap();
        assert_eq!(g.disk_guid, DISK_GUID);
        let p = &g.partitions;
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].name.as_str(), p[0].unique_guid),
            (ROOT_NAME, ROOT_GUID)
        );
        assert_eq!(
            (p[1].name.as_str(), p[1].unique_guid),
            (DATA_NAME, DATA_GUID)
        );
        assert_eq!((p[0].first_lba, p[0].blocks()), (2048, 4 * 2048));
        assert_eq!((p[1].first_lba, p[1].blocks()), (5 * 2048, DATA_MIB * 2048));
        assert_eq!(blocks, (5 + DATA_MIB + 1) * 2048);
        // Every binding form resolves; the default one to the root.
        for b in [
            DEFAULT_BINDING,
            "part=1",
            "part=guid:70657265-6772-696e-6500-000000000001",
        ] {
            let r = resolve(&img, b).unwrap();
            assert_eq!((r.first_lba, r.blocks), (2048, 4 * 2048), "{b}");
        }
        assert_eq!(
            resolve(&img, "part=name:peregrine-data").unwrap().first_lba,
            5 * 2048
        );
        assert_eq!(resolve(&img, "range=0+34").unwrap().blocks, 34);
        for b in [
            "part=3",
            "part=name:nope",
            "disk=1",
            "disk=1 part=1",
            "part=1 part=2",
            "range=0+999999999",
            "",
        ] {
            assert!(resolve(&img, b).is_err(), "{b:?}");
        }
        // A fresh disk is the built one again: the root's first bytes back.
        std::fs::write(&rootfs, b"second").unwrap();
        assert!(ensure(&img, &rootfs, true).unwrap());
        let data = std::fs::read(&img).unwrap();
        assert_eq!(&data[1 << 20..(1 << 20) + 6], b"second");
        std::fs::remove_file(&img).ok();
        std::fs::remove_file(&rootfs).ok();
    }
}
