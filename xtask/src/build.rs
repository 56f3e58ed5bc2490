//! `cargo xtask build`: the bare-metal components, and the kernel's Multiboot check.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::workspace::{self, TARGET};

/// A bare-metal component: its package and the binary it produces.
#[derive(Debug, Clone, Copy)]
pub struct Component {
    /// Cargo package name.
    pub package: &'static str,
    /// Binary name (the file in the output directory).
    pub binary: &'static str,
}

/// The kernel binary.
pub const KERNEL: Component = Component {
    package: "peregrine-kernel",
    binary: "peregrine",
};
/// The root task binary (the first boot module).
pub const ROOT: Component = Component {
    package: "nul-root",
    binary: "nul-root",
};

/// The test and benchmark component (one binary, started with a `role=` argument).
pub const TEST: Component = Component {
    package: "nul-test",
    binary: "nul-test",
};

/// The bare-metal test and benchmark guest (`guests/test`): a boot module for the VMM
/// and the guest of the KVM runner (contract: `guests/README.md`).
pub const GUEST_TEST: Component = Component {
    package: "guest-test",
    binary: "guest-test",
};

/// The VMM component (one VM per instance; the root starts it from a module line with
/// `guest=`).
pub const VMM: Component = Component {
    package: "nul-vmm",
    binary: "nul-vmm",
};

/// The disk component (NVMe driver and disk service).
pub const DISK: Component = Component {
    package: "nul-disk",
    binary: "nul-disk",
};

/// Everything `build` builds, in one place: add new NUL components here.
pub const COMPONENTS: &[Component] = &[KERNEL, ROOT, TEST, VMM, GUEST_TEST, DISK];

/// Which cargo profile to build the components with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// `--release` (the default: the system is benchmarked as built).
    #[default]
    Release,
    /// The dev profile (`cargo xtask build --debug`).
    Debug,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }
}

/// The built images: `<target>/x86_64-unknown-none/<profile>/`.
#[derive(Debug, Clone)]
pub struct Images {
    /// The output directory.
    pub dir: PathBuf,
}

impl Images {
    /// The images of `profile` in the workspace's target directory (built or not).
    pub fn locate(profile: Profile) -> Result<Self> {
        Ok(Images {
            dir: workspace::target_dir()?.join(TARGET).join(profile.dir()),
        })
    }

    /// Path of a component's binary.
    pub fn path(&self, component: Component) -> PathBuf {
        self.dir.join(component.binary)
    }

    /// The kernel image.
    pub fn kernel(&self) -> PathBuf {
        self.path(KERNEL)
    }

    /// The root task image.
    pub fn root(&self) -> PathBuf {
        self.path(ROOT)
    }

    /// The test/benchmark component image.
    pub fn test_component(&self) -> PathBuf {
        self.path(TEST)
    }

    /// The VMM component image.
    pub fn vmm(&self) -> PathBuf {
        self.path(VMM)
    }

    /// The disk component image.
    pub fn disk(&self) -> PathBuf {
        self.path(DISK)
    }

    /// The test guest's ELF image.
    pub fn guest_test(&self) -> PathBuf {
        self.path(GUEST_TEST)
    }
}

/// The root's feature with its test and benchmark scenarios (`test=`, `bench=`).
pub const SCENARIOS: &str = "nul-root/scenarios";

/// The `cargo build` arguments for the components; `scenarios`: the root with its test
/// and benchmark scenarios ([`SCENARIOS`]).
pub fn cargo_args(profile: Profile, scenarios: bool) -> Vec<String> {
    let mut args = vec!["build".to_string(), "--target".into(), TARGET.into()];
    if profile == Profile::Release {
        args.push("--release".into());
    }
    for c in COMPONENTS {
        args.extend(["-p".to_string(), c.package.to_string()]);
    }
    if scenarios {
        args.extend(["--features".to_string(), SCENARIOS.to_string()]);
    }
    args
}

/// Builds all components, the root with its scenarios (what every test and benchmark
/// boots), and checks the kernel's Multiboot header.
pub fn build(profile: Profile) -> Result<Images> {
    build_with(profile, true)
}

/// [`build`], the root with its scenarios or (`scenarios` false: the production root)
/// without.
pub fn build_with(profile: Profile, scenarios: bool) -> Result<Images> {
    crate::deps::ensure_rust_target()?;
    workspace::run_checked(workspace::cargo().args(cargo_args(profile, scenarios)))?;
    let images = Images::locate(profile)?;
    for c in COMPONENTS {
        let path = images.path(*c);
        anyhow::ensure!(
            path.is_file(),
            "{} was built but {} is missing (is the binary named {:?}?)",
            c.package,
            path.display(),
            c.binary
        );
    }
    check_kernel(&images.kernel())?;
    Ok(images)
}

/// Checks the Multiboot header of the kernel file at `path`.
pub fn check_kernel(path: &Path) -> Result<crate::multiboot::Header> {
    let image = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    crate::multiboot::check(&image).with_context(|| {
        format!(
            "{} is not bootable by QEMU's Multiboot loader",
            path.display()
        )
    })
}
