//! What every Linux guest xtask boots is made of: Debian's kernel, fetched once
//! ([`debian_kernel`]), the modules it needs with their dependencies ([`module_closure`]),
//! and a busybox initramfs ([`Initramfs`], a newc [`Cpio`] archive).
//!
//! The Linux guest ([`crate::linux`]), the ping-pong baseline ([`crate::baseline`]), the
//! KVM baseline ([`crate::baseline_kvm`]) and the KVM side of `bench boot`
//! ([`crate::bench_boot`]) all build on these.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::deps::{self, Tool};
use crate::workspace::{self, run_checked};

/// A newc ("070701") cpio archive, as the Linux initramfs unpacker reads it.
#[derive(Debug, Default)]
pub struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            body.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.data.extend(b"070701");
        for f in fields {
            self.data.extend(format!("{f:08x}").as_bytes());
        }
        self.data.extend(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    /// Adds a regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, body: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), body);
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120_777, (0, 0), target.as_bytes());
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

/// A busybox initramfs under construction: its directories, `/dev/console` and
/// `/bin/busybox` first, then what the caller adds.
#[derive(Debug)]
pub struct Initramfs {
    cpio: Cpio,
    dirs: Vec<String>,
}

impl Initramfs {
    /// Starts an initramfs with the directories `dirs` (in this order), `/dev/console`
    /// and the host's static `/bin/busybox`.
    pub fn new(dirs: &[&str]) -> Result<Self> {
        deps::ensure(&[Tool::Busybox])?;
        let mut ramfs = Initramfs {
            cpio: Cpio::default(),
            dirs: Vec::new(),
        };
        for d in dirs {
            ramfs.dir(d);
        }
        ramfs.cpio.char_dev("dev/console", 5, 1);
        ramfs.copy("bin/busybox", 0o755, Path::new("/bin/busybox"))?;
        Ok(ramfs)
    }

    /// Adds the directory `name` unless it is there already.
    pub fn dir(&mut self, name: &str) {
        if !self.dirs.iter().any(|d| d == name) {
            self.cpio.dir(name);
            self.dirs.push(name.to_string());
        }
    }

    /// Adds `/bin/sh`, a link to busybox.
    pub fn sh(&mut self) {
        self.cpio.symlink("bin/sh", "busybox");
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, perm: u32, body: &[u8]) {
        self.cpio.file(name, perm, body);
    }

    /// Adds the host file `from` as `name`.
    pub fn copy(&mut self, name: &str, perm: u32, from: &Path) -> Result<()> {
        let body = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.cpio.file(name, perm, &body);
        Ok(())
    }

    /// Adds the host file at the absolute `path` under the same name, with every
    /// directory above it.
    pub fn copy_at_own_path(&mut self, path: &Path, perm: u32) -> Result<()> {
        let name = path.to_string_lossy().trim_start_matches('/').to_string();
        let mut prefix = String::new();
        let parts: Vec<&str> = name.split('/').collect();
        for p in &parts[..parts.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(p);
            self.dir(&prefix);
        }
        self.copy(&name, perm, path)
    }

    /// Adds each module of `modules` (from [`module_closure`]) as `<dir>/<name>.ko`.
    pub fn modules(&mut self, dir: &str, modules: &[(String, PathBuf)]) -> Result<()> {
        for (name, path) in modules {
            self.copy(&format!("{dir}/{name}.ko"), 0o644, path)?;
        }
        Ok(())
    }

    /// The finished archive.
    pub fn finish(self) -> Vec<u8> {
        self.cpio.finish()
    }

    /// Writes the finished archive to `path`.
    pub fn write(self, path: &Path) -> Result<()> {
        std::fs::write(path, self.finish()).with_context(|| format!("writing {}", path.display()))
    }
}

/// The newest `vmlinuz-*` in `dir`.
pub fn newest_vmlinuz(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// Debian's `linux-image-amd64` kernel, fetched with `apt-get download` and unpacked
/// into `<target>/linux/root/` once (with its modules: see [`modules_dir`]).
pub fn debian_kernel() -> Result<PathBuf> {
    let dir = workspace::out_dir("linux")?;
    let extracted = dir.join("root");
    if let Some(k) = newest_vmlinuz(&extracted.join("boot")) {
        return Ok(k);
    }
    // linux-image-amd64 is a metapackage: download the image package it depends on.
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()?;
    let deps = String::from_utf8_lossy(&out.stdout);
    let Some(package) = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
    else {
        bail!(
            "no Linux kernel for the baseline: set PEREGRINE_LINUX_KERNEL to a bzImage, or \
             make `apt-cache depends linux-image-amd64` work (apt-get update)"
        );
    };
    eprintln!("xtask: fetching {package} for the Linux baseline");
    run_checked(
        Command::new("apt-get")
            .current_dir(&dir)
            .args(["download", "-q", package]),
    )?;
    let deb = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted))?;
    std::fs::remove_file(&deb)?;
    newest_vmlinuz(&extracted.join("boot")).context("the kernel package has no boot/vmlinuz-*")
}

/// The modules directory of an unpacked kernel package's kernel:
/// `<root>/boot/vmlinuz-<version>` → `<root>/lib/modules/<version>`.
pub fn modules_dir(kernel: &Path) -> Result<PathBuf> {
    let version = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("the kernel's file name is not vmlinuz-<version>")?;
    let root = kernel
        .parent()
        .and_then(Path::parent)
        .context("the kernel is not in an unpacked package's boot/")?;
    Ok(root.join("lib/modules").join(version))
}

/// A module's canonical name: `-` and `_` are the same to the kernel, which writes `_`
/// (`kvm-amd.ko` is module `kvm_amd`).
pub fn module_name(name: &str) -> String {
    name.trim_end_matches(".ko").replace('-', "_")
}

/// The modules a `.ko` depends on: its `.modinfo` `depends=` list, canonical names.
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    // The key starts a `.modinfo` string: at the start of the data or after a NUL.
    let Some(at) = ko
        .windows(key.len())
        .enumerate()
        .position(|(i, w)| w == key && (i == 0 || ko[i - 1] == 0))
    else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(module_name)
        .collect()
}

/// Every `.ko` below `dir`, by canonical module name.
fn all_modules(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(file) = p
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| n.ends_with(".ko"))
            {
                found.entry(module_name(file)).or_insert(p.clone());
            }
        }
    }
    Ok(found)
}

/// The modules `wanted` need, dependencies first and each once, as (canonical name,
/// file) pairs, found under `modules_dir` (`lib/modules/<version>`). Names may be
/// written with `-` or `_`.
pub fn module_closure(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    fn visit(
        name: &str,
        all: &BTreeMap<String, PathBuf>,
        order: &mut Vec<(String, PathBuf)>,
        path: &mut Vec<String>,
    ) -> Result<()> {
        if order.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        if path.iter().any(|n| n == name) {
            bail!("module dependency cycle through {name}");
        }
        let file = all
            .get(name)
            .with_context(|| format!("module {name} not found"))?;
        let ko = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        path.push(name.to_string());
        for d in module_depends(&ko) {
            visit(&d, all, order, path)?;
        }
        path.pop();
        order.push((name.to_string(), file.clone()));
        Ok(())
    }
    let all = all_modules(modules_dir)?;
    let mut order = Vec::new();
    for w in wanted {
        visit(&module_name(w), &all, &mut order, &mut Vec::new())
            .with_context(|| format!("in {}", modules_dir.display()))?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_newc_layout() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"abc");
        let data = c.finish();
        assert!(data.starts_with(b"070701"));
        // Header 110 bytes + "init\0" padded to 116, data padded to 4.
        assert_eq!(&data[110..115], b"init\0");
        assert_eq!(&data[116..119], b"abc");
        assert_eq!(data.len() % 4, 0);
        assert_eq!(&data[14..22], b"000081ed"); // mode: regular file 0755
        assert!(data.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn reads_module_dependencies() {
        let ko = b"\x7fELF...\0license=GPL\0depends=virtio_ring,virtio\0retpoline=Y\0";
        assert_eq!(module_depends(ko), ["virtio_ring", "virtio"]);
        let ko = b"\x7fELF....license=GPL\0depends=kvm,ccp-crypto\0retpoline=Y\0";
        assert_eq!(module_depends(ko), ["kvm", "ccp_crypto"]);
        assert_eq!(module_depends(b"depends=a\0"), ["a"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"nothing").is_empty());
        // Only a whole key counts, not the tail of another.
        assert!(module_depends(b"\0softdepends=x\0").is_empty());
        assert_eq!(module_name("kvm-amd.ko"), "kvm_amd");
    }

    /// A module tree in a fresh temporary directory: (path, contents) pairs.
    fn tree(tag: &str, files: &[(&str, &[u8])]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-mods-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, body) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        dir
    }

    fn names(c: &[(String, PathBuf)]) -> Vec<&str> {
        c.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn module_closure_orders_dependencies_first() {
        let dir = tree(
            "order",
            &[
                ("kernel/arch/kvm-amd.ko", b"depends=kvm,ccp\0"),
                ("kernel/arch/kvm.ko", b"depends=irqbypass\0"),
                ("ccp.ko", b"depends=\0"),
                ("irqbypass.ko", b"x"),
            ],
        );
        let c = module_closure(&dir, &["kvm-amd"]).unwrap();
        assert_eq!(names(&c), ["irqbypass", "kvm", "ccp", "kvm_amd"]);
        assert!(c[3].1.ends_with("kernel/arch/kvm-amd.ko"));
        assert!(module_closure(&dir, &["kvm-intel"]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dash_and_underscore_name_the_same_module() {
        // The file uses `-`, a dependency list `_`, and the other file the reverse.
        let dir = tree(
            "dash",
            &[
                (
                    "a/virtio-pci.ko",
                    b"\0depends=virtio_ring,virtio-pci-legacy\0",
                ),
                ("b/virtio_ring.ko", b"\0depends=\0"),
                ("b/virtio_pci_legacy.ko", b"\0depends=virtio-ring\0"),
            ],
        );
        let dashed = module_closure(&dir, &["virtio-pci"]).unwrap();
        let underscored = module_closure(&dir, &["virtio_pci"]).unwrap();
        assert_eq!(dashed, underscored);
        assert_eq!(
            names(&dashed),
            ["virtio_ring", "virtio_pci_legacy", "virtio_pci"]
        );
        assert!(dashed[2].1.ends_with("a/virtio-pci.ko"));
        // Asking for both spellings loads the module once.
        let both = module_closure(&dir, &["virtio-ring", "virtio_ring"]).unwrap();
        assert_eq!(names(&both), ["virtio_ring"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn module_cycles_are_refused() {
        let dir = tree(
            "cycle",
            &[("a.ko", b"depends=b\0"), ("b.ko", b"depends=a\0")],
        );
        let e = module_closure(&dir, &["a"]).unwrap_err();
        assert!(format!("{e:#}").contains("cycle"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modules_dir_of_an_unpacked_kernel() {
        assert_eq!(
            modules_dir(Path::new("/t/root/boot/vmlinuz-6.1.0-41-amd64")).unwrap(),
            Path::new("/t/root/lib/modules/6.1.0-41-amd64")
        );
        assert!(modules_dir(Path::new("/t/bzImage")).is_err());
    }
}
