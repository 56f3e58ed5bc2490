//! The Peregrine build, run, test and benchmark tool, as a library.
//!
//! `cargo xtask …` (see `main.rs`) is a thin front end over these functions, and the
//! emulator integration tests in `tests/` call the same functions, so a test boots the
//! system exactly as a person does.
//!
//! - [`build`]: build the bare-metal components and check the kernel's Multiboot header.
//! - [`spec`]: what to boot ([`BootSpec`]) and how it ended ([`RunResult`], [`Exit`]);
//!   [`boot`]: boots a spec in either emulator.
//! - [`qemu`] and [`bochs`]: the two emulators (Bochs boots a GRUB ISO).
//! - [`conformance`]: the test guest booted directly by QEMU as a Multiboot kernel,
//!   running its PC check list (the reference for our VMM's PC).
//! - [`deps`]: host tools, installed with apt when running as root.
//! - [`suite`]: `cargo xtask test`, the README's test command and what CI runs.
//! - [`bench`]: `cargo xtask bench`.
//! - [`fuzz`]: the VMM library's fuzz targets, built and run on stable.
//! - [`guest_linux`]: what every Linux guest is built from: Debian's kernel, module
//!   dependencies, a busybox initramfs.
//! - [`linux`]: the Linux guest (kernel, initramfs, disk, ext4 root: [`rootfs`]) and
//!   its direct QEMU boot; [`storage`]: its storage tests on the ext4 root.
//! - [`bench`]: `cargo xtask bench`; [`bench_vmexit`]: its VM-exit benchmark with the
//!   KVM baseline ([`baseline_kvm`]: Linux + KVM in QEMU or Bochs running
//!   `vmm-kvm`, the VMM library hosted on KVM: `hosts/kvm`); [`bench_boot`]: the Linux boot and disk read on Peregrine,
//!   directly in QEMU and under KVM as the L1 hypervisor; [`sel4`]: seL4 beside `bench
//!   ipc`; [`provenance`] and [`plot`]: every bench JSON's provenance block and chart;
//!   [`gate`]: the regression gate on `bench/expected.json`.

pub mod baseline;
pub mod baseline_kvm;
pub mod bench;
pub mod bench_boot;
pub mod bench_disk;
pub mod bench_vmexit;
pub mod bochs;
pub mod boot;
pub mod build;
pub mod conformance;
pub mod deps;
pub mod fuzz;
pub mod gate;
pub mod gpt_image;
pub mod guest_linux;
pub mod image_size;
pub mod kvm;
pub mod linux;
pub mod multiboot;
pub mod plot;
pub mod process;
pub mod provenance;
pub mod qemu;
pub mod rootfs;
pub mod sel4;
pub mod spec;
pub mod storage;
pub mod suite;
pub mod sysdisk;
pub mod testimage;
pub mod workspace;

pub use build::{build, Images, Profile};
pub use qemu::run_qemu;
pub use spec::{BootSpec, Emulator, Exit, Output, RunResult};
