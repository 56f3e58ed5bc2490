//! Where the workspace is, where cargo puts its output, and how to call cargo.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The target triple of the bare-metal crates (kernel, root task, components, guests),
/// as `rust-toolchain.toml` lists it.
pub const TARGET: &str = "x86_64-unknown-none";

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn root() -> &'static Path {
    // xtask/ sits directly below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
}

/// A `cargo` command run in the workspace root: the cargo that runs us (`$CARGO`), so the
/// toolchain pinned by `rust-toolchain.toml` is used throughout.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root());
    cmd
}

/// What `cargo metadata --no-deps` says about the workspace (the part we use).
#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    /// The target directory; honours `CARGO_TARGET_DIR` and `.cargo/config.toml`.
    pub target_directory: PathBuf,
    /// All workspace packages.
    pub packages: Vec<Package>,
    /// Package ids of all members.
    pub workspace_members: Vec<String>,
    /// Package ids of the default members (the host crates).
    #[serde(default)]
    pub workspace_default_members: Vec<String>,
}

/// One package of the workspace.
#[derive(Debug, Clone, Deserialize)]
pub struct Package {
    /// Package name.
    pub name: String,
    /// Package id, as in `workspace_members`.
    pub id: String,
}

impl Metadata {
    fn names(&self, ids: &[String]) -> Vec<String> {
        let mut names: Vec<String> = self
            .packages
            .iter()
            .filter(|p| ids.contains(&p.id))
            .map(|p| p.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Names of the host crates (the workspace's default members).
    pub fn host_packages(&self) -> Vec<String> {
        self.names(&self.workspace_default_members)
    }

    /// Names of the bare-metal crates: members that are not default members.
    pub fn bare_metal_packages(&self) -> Vec<String> {
        let host = self.host_packages();
        self.names(&self.workspace_members)
            .into_iter()
            .filter(|n| !host.contains(n))
            .collect()
    }
}

/// `cargo metadata --format-version 1 --no-deps`, run once per process.
pub fn metadata() -> Result<&'static Metadata> {
    static META: OnceLock<Metadata> = OnceLock::new();
    if let Some(m) = META.get() {
        return Ok(m);
    }
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: Metadata =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata output")?;
    Ok(META.get_or_init(|| meta))
}

/// The cargo target directory of the workspace.
pub fn target_dir() -> Result<PathBuf> {
    Ok(metadata()?.target_directory.clone())
}

/// A directory below the target directory for xtask's own output (logs, ISOs, bench
/// results), created if needed.
pub fn out_dir(sub: &str) -> Result<PathBuf> {
    let dir = target_dir()?.join(sub);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Finds `program` on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Runs `cmd` with inherited stdio and fails unless it exits with status 0.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}
