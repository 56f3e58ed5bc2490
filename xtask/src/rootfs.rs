//! The Linux guest's ext4 root file system image: a [`Tree`] of directories, files and
//! symbolic links, staged in a host directory and turned into an image with e2fsprogs'
//! `mkfs.ext4 -d`, then made reproducible with `debugfs`.
//!
//! The same tree gives the same image, byte for byte, on every run with the same
//! e2fsprogs: a fixed UUID, directory hash seed and creation time (`E2FSPROGS_FAKE_TIME`,
//! `SOURCE_DATE_EPOCH`), and every inode's owner and times set afterwards (`mkfs.ext4
//! -d` copies them from the staged files, whose change times and owner depend on who
//! staged them when). What the Linux guest puts there is [`crate::linux::rootfs_tree`];
//! its static C programs are built by [`compile_static`].

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::deps::{self, Tool};
use crate::workspace::run_checked;

/// Size of the image.
pub const IMAGE_MIB: u64 = 64;
/// The file system's label.
pub const LABEL: &str = "peregrine-root";
/// The file system's UUID (fixed, for a reproducible image).
pub const UUID: &str = "5eb0e0a1-6e9e-4e11-8c00-000000000001";
/// The seed of the directory index hash (fixed, for a reproducible image).
pub const HASH_SEED: &str = "5eb0e0a1-6e9e-4e11-8c00-000000000002";
/// Every timestamp in the image: 2023-11-14 22:13:20 UTC.
pub const EPOCH: u64 = 1_700_000_000;

/// One entry of a [`Tree`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory (mode 0755).
    Dir,
    /// A regular file with its permission bits and contents.
    File(u32, Vec<u8>),
    /// A symbolic link to the target.
    Symlink(String),
}

/// The contents of a file system: relative paths (`bin/sh`) to nodes. Adding an entry
/// adds the directories above it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, path: &str, node: Node) {
        let path = path.trim_matches('/');
        assert!(
            !path.is_empty()
                && path
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != ".."),
            "bad path {path:?}"
        );
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            self.nodes
                .entry(path[..at + i].to_string())
                .or_insert(Node::Dir);
            at += i + 1;
        }
        self.nodes.insert(path.to_string(), node);
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str) {
        self.add(path, Node::Dir);
    }

    /// Adds a regular file with permission bits `perm`.
    pub fn file(&mut self, path: &str, perm: u32, body: &[u8]) {
        self.add(path, Node::File(perm, body.to_vec()));
    }

    /// Adds the host file `from` as `path`.
    pub fn copy(&mut self, path: &str, perm: u32, from: &Path) -> Result<()> {
        let body = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.add(path, Node::File(perm, body));
        Ok(())
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.add(path, Node::Symlink(target.to_string()));
    }

    /// The node at `path`.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// Every path, parents before their entries.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    /// Creates the tree below `dir`, which must not exist yet.
    pub fn stage(&self, dir: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (path, node) in &self.nodes {
            let p = dir.join(path);
            match node {
                Node::Dir => std::fs::create_dir(&p)?,
                Node::File(perm, body) => {
                    std::fs::write(&p, body)?;
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*perm))?;
                }
                Node::Symlink(target) => std::os::unix::fs::symlink(target, &p)?,
            }
        }
        Ok(())
    }
}

/// The applet links of `busybox --list-full` output (`bin/ls`, `usr/bin/awk`, …) as
/// (path, link target) pairs, each pointing at `/bin/busybox`; `linuxrc` (an initrd
/// convention, not an applet a shell runs) and anything that is not a plain relative
/// path are left out.
pub fn busybox_links(list_full: &str) -> Vec<(String, String)> {
    list_full
        .lines()
        .map(str::trim)
        .filter(|l| {
            l.contains('/')
                && !l.starts_with('/')
                && l.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
                && !l.chars().any(char::is_whitespace)
                && *l != "bin/busybox"
        })
        .map(|l| (l.to_string(), "/bin/busybox".to_string()))
        .collect()
}

/// Adds the host's static busybox as `/bin/busybox` with a link for every applet it
/// has, so the image needs no `busybox --install`.
pub fn add_busybox(tree: &mut Tree) -> Result<()> {
    deps::ensure(&[Tool::Busybox])?;
    let busybox = Path::new("/bin/busybox");
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .context("running busybox --list-full")?;
    if !out.status.success() {
        bail!("busybox --list-full failed ({})", out.status);
    }
    tree.copy("bin/busybox", 0o755, busybox)?;
    for (path, target) in busybox_links(&String::from_utf8_lossy(&out.stdout)) {
        tree.symlink(&path, &target);
    }
    Ok(())
}

/// The `mkfs.ext4` arguments that make `image` ([`IMAGE_MIB`] MiB) from the staged
/// directory `staged`: 4 KiB blocks and 256-byte inodes whatever the size (a small file
/// system would otherwise get 1 KiB blocks), root-owned root directory, fixed UUID and
/// hash seed, no extended attributes copied from the host.
pub fn mkfs_args(staged: &Path, image: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = [
        "-q",
        "-F",
        "-t",
        "ext4",
        "-b",
        "4096",
        "-I",
        "256",
        "-L",
        LABEL,
        "-U",
        UUID,
        "-E",
        &format!("root_owner=0:0,hash_seed={HASH_SEED},no_copy_xattrs"),
        "-d",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    a.push(staged.into());
    a.push(image.into());
    a.push(format!("{IMAGE_MIB}M").into());
    a
}

/// The `debugfs -w` script that gives every inode of `tree` the owner root and the
/// times [`EPOCH`] (`mkfs.ext4 -d` copied them from the staged files).
pub fn debugfs_script(tree: &Tree) -> String {
    let mut s = String::new();
    for path in tree.paths() {
        for (field, value) in [
            ("uid", "0".to_string()),
            ("gid", "0".to_string()),
            ("atime", format!("@{EPOCH}")),
            ("mtime", format!("@{EPOCH}")),
            ("ctime", format!("@{EPOCH}")),
            ("crtime", format!("@{EPOCH}")),
        ] {
            s += &format!("sif /{path} {field} {value}\n");
        }
    }
    s
}

/// Builds `image` from `tree`, staging it in `work` (emptied first, removed after); the
/// image is built beside the staged tree and renamed to `image` when complete.
pub fn build(tree: &Tree, work: &Path, image: &Path) -> Result<()> {
    deps::ensure(&[Tool::Ext4])?;
    if work.exists() {
        std::fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))?;
    }
    std::fs::create_dir_all(work)?;
    let staged = work.join("root");
    tree.stage(&staged)?;
    let tmp = work.join("rootfs.img");
    // Created here, so mkfs.ext4 does not announce that it creates it.
    std::fs::File::create(&tmp)?;
    let epoch = EPOCH.to_string();
    run_checked(
        Command::new(deps::MKFS_EXT4)
            .args(mkfs_args(&staged, &tmp))
            .env("E2FSPROGS_FAKE_TIME", &epoch)
            .env("SOURCE_DATE_EPOCH", &epoch),
    )?;
    let script = work.join("debugfs.cmds");
    std::fs::write(&script, debugfs_script(tree))?;
    let out = Command::new(deps::DEBUGFS)
        .arg("-w")
        .arg("-f")
        .arg(&script)
        .arg(&tmp)
        .env("E2FSPROGS_FAKE_TIME", &epoch)
        .output()
        .context("running debugfs")?;
    // debugfs reports a failed command on stderr but still exits 0.
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || err.lines().any(|l| !l.starts_with("debugfs ")) {
        bail!(
            "debugfs on {} failed ({}): {err}",
            tmp.display(),
            out.status
        );
    }
    std::fs::rename(&tmp, image)
        .with_context(|| format!("moving the image to {}", image.display()))?;
    std::fs::remove_dir_all(work).ok();
    Ok(())
}

/// Compiles the C program `source` (its text; `name.c`) statically with the host C
/// compiler (`$CC` or `cc`) into `dir/name`.
pub fn compile_static(name: &str, source: &str, dir: &Path) -> Result<PathBuf> {
    deps::ensure(&[Tool::Cc])?;
    std::fs::create_dir_all(dir)?;
    let src = dir.join(format!("{name}.c"));
    let bin = dir.join(name);
    std::fs::write(&src, source)?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    run_checked(
        Command::new(cc)
            .args(["-O2", "-static", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&bin)
            .arg(&src),
    )
    .with_context(|| format!("compiling {name}.c (needs cc and libc6-dev)"))?;
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_adds_parent_directories() {
        let mut t = Tree::new();
        t.file("usr/bin/x", 0o755, b"x");
        t.symlink("/bin/sh/", "busybox");
        t.dir("tmp");
        assert_eq!(
            t.paths().collect::<Vec<_>>(),
            ["bin", "bin/sh", "tmp", "usr", "usr/bin", "usr/bin/x"]
        );
        assert_eq!(t.get("usr"), Some(&Node::Dir));
        assert_eq!(t.get("bin/sh"), Some(&Node::Symlink("busybox".into())));
        // A later entry replaces an earlier one; parents stay.
        t.file("usr/bin/x", 0o644, b"y");
        assert_eq!(t.get("usr/bin/x"), Some(&Node::File(0o644, b"y".to_vec())));
    }

    #[test]
    #[should_panic(expected = "bad path")]
    fn tree_refuses_dot_dot() {
        Tree::new().dir("a/../b");
    }

    #[test]
    fn busybox_applets_become_links() {
        let list = "bin/ash\nlinuxrc\nusr/bin/[\n/etc/x\nsbin/switch_root\nbin/busybox\n\n";
        assert_eq!(
            busybox_links(list),
            [
                ("bin/ash".to_string(), "/bin/busybox".to_string()),
                ("usr/bin/[".into(), "/bin/busybox".into()),
                ("sbin/switch_root".into(), "/bin/busybox".into()),
            ]
        );
    }

    #[test]
    fn mkfs_arguments_are_fixed() {
        let a: Vec<String> = mkfs_args(Path::new("/s"), Path::new("/o.img"))
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        let a = a.join(" ");
        assert!(
            a.starts_with("-q -F -t ext4 -b 4096 -I 256 -L peregrine-root -U "),
            "{a}"
        );
        assert!(a.contains(&format!("-U {UUID} ")));
        assert!(a.contains(&format!("hash_seed={HASH_SEED},")));
        assert!(a.ends_with("-d /s /o.img 64M"), "{a}");
    }

    #[test]
    fn debugfs_sets_owner_and_times_of_every_inode() {
        let mut t = Tree::new();
        t.file("etc/x", 0o644, b"");
        let s = debugfs_script(&t);
        assert_eq!(s.lines().count(), 12);
        assert!(s.starts_with("sif /etc uid 0\nsif /etc gid 0\n"), "{s}");
        assert!(s.contains("sif /etc/x ctime @1700000000\n"));
        assert!(s.contains("sif /etc/x crtime @1700000000\n"));
    }
}
