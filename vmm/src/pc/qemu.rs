//! QEMU's devices for test kernels on the PC ([`crate::fw_cfg`],
//! [`crate::qemu_testdev`]): none unless the VMM asks for them with
//! [`Pc::add_qemu_devices`], so the Linux PC stays as it is.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use super::{memory_map, GsiLine, IsaLine, Pc};
use crate::bus::{BusError, IrqLine, SharedDevice};
use crate::fw_cfg::{self, BootItems, FwCfg, FwCfgError, MachineInfo};
use crate::qemu_testdev::{self as td, DebugExit, PcTestdev, TestdevIomem};
use crate::sync::SpinLock;
use crate::vcpu::GuestMemory;

/// Which of QEMU's test devices the PC gets; the default is none.
#[derive(Clone, Debug, Default)]
pub struct QemuDevices {
    /// fw_cfg at 0x510 (with DMA at 0x514 if asked) with these extras; `None`: none.
    pub fw_cfg: Option<FwCfgSetup>,
    /// isa-debug-exit at 0xf4–0xf7: a write ends the VM with
    /// [`End::DebugExit`](crate::machine::End::DebugExit).
    pub debug_exit: bool,
    /// pc-testdev: ports 0xe0–0xeb and 0x2000–0x2017, MMIO 0xff000000 (64 KiB).
    pub pc_testdev: bool,
}

impl QemuDevices {
    /// What kvm-unit-tests' x86 runner gives QEMU (`-device pc-testdev -device
    /// isa-debug-exit,iobase=0xf4,iosize=0x4`, and the fw_cfg every QEMU PC has), with
    /// fw_cfg's DMA interface.
    pub fn kvm_unit_tests() -> Self {
        Self {
            fw_cfg: Some(FwCfgSetup {
                dma: true,
                ..FwCfgSetup::default()
            }),
            debug_exit: true,
            pc_testdev: true,
        }
    }
}

/// What fw_cfg offers beyond the PC's own items (RAM size, vCPUs, `etc/e820`).
#[derive(Clone, Debug, Default)]
pub struct FwCfgSetup {
    /// The DMA interface at 0x514 (over the guest memory given to
    /// [`Pc::add_qemu_devices`]).
    pub dma: bool,
    /// The VM's UUID (QEMU's default: zeros).
    pub uuid: [u8; 16],
    /// Where the kernel, its command line and initrd are.
    pub boot: BootItems,
    /// Files to add (name, contents), after `etc/e820`.
    pub files: Vec<(String, Vec<u8>)>,
}

/// Why [`Pc::add_qemu_devices`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuDevicesError {
    /// A fw_cfg file was refused.
    FwCfg(FwCfgError),
    /// A device's range is taken (the devices were added before).
    Bus(BusError),
}

impl core::fmt::Display for QemuDevicesError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            QemuDevicesError::FwCfg(e) => write!(f, "{e}"),
            QemuDevicesError::Bus(e) => write!(f, "{e}"),
        }
    }
}

impl From<FwCfgError> for QemuDevicesError {
    fn from(e: FwCfgError) -> Self {
        QemuDevicesError::FwCfg(e)
    }
}

impl From<BusError> for QemuDevicesError {
    fn from(e: BusError) -> Self {
        QemuDevicesError::Bus(e)
    }
}

impl Pc {
    /// Puts the devices `devs` names on the PC's buses, before its vCPUs run; fw_cfg's
    /// DMA reads and writes `mem` (the guest RAM the PC was built over). fw_cfg
    /// describes the PC as it is: its RAM, vCPUs and [`memory_map`]. Called twice, it
    /// fails at the first range already taken (the ones before it stay).
    pub fn add_qemu_devices<M: GuestMemory + Send + 'static>(
        &mut self,
        devs: &QemuDevices,
        mem: M,
    ) -> Result<(), QemuDevicesError> {
        // Build everything first, so that a refused file leaves the buses alone.
        let fw_cfg = match &devs.fw_cfg {
            Some(setup) => {
                let map = memory_map(self.cfg.ram);
                let vcpus = self.cfg.vcpus as u16;
                let mut f = FwCfg::pc(&MachineInfo {
                    ram: self.cfg.ram,
                    vcpus,
                    max_cpus: vcpus,
                    e820: &map,
                    uuid: setup.uuid,
                });
                f.set_boot(&setup.boot);
                for (name, data) in &setup.files {
                    f.add_file(name, data.clone())?;
                }
                if setup.dma {
                    f = f.with_dma(mem);
                }
                Some(f)
            }
            None => None,
        };
        let pio = &mut self.core.pio;
        let mmio = &mut self.core.mmio;
        if let Some(f) = fw_cfg {
            let dma = f.has_dma();
            let d: SharedDevice = Arc::new(SpinLock::new(f));
            pio.insert(fw_cfg::SELECTOR_PORT, fw_cfg::PORTS_LEN, d.clone())?;
            if dma {
                pio.insert(fw_cfg::DMA_PORT, fw_cfg::DMA_LEN, d)?;
            }
        }
        if devs.debug_exit {
            let d: SharedDevice = Arc::new(SpinLock::new(DebugExit));
            pio.insert(td::DEBUG_EXIT_PORT, td::DEBUG_EXIT_LEN, d)?;
        }
        if devs.pc_testdev {
            let lines = (0..td::IRQ_LINES as u8)
                .map(|n| -> Arc<dyn IrqLine> {
                    if n < 16 {
                        Arc::new(IsaLine {
                            irq: n,
                            pic: self.pic.clone(),
                            ioapic: self.ioapic.clone(),
                        })
                    } else {
                        Arc::new(GsiLine {
                            gsi: n,
                            ioapic: self.ioapic.clone(),
                        })
                    }
                })
                .collect();
            let d: SharedDevice = Arc::new(SpinLock::new(PcTestdev::new(lines)));
            for base in [td::IOPORT, td::FLUSH_PORT, td::IOPORT_BYTE] {
                pio.insert(base, td::IOPORT_LEN, d.clone())?;
            }
            pio.insert(td::IRQ_PORT, td::IRQ_LINES, d)?;
            let m: SharedDevice = Arc::new(SpinLock::new(TestdevIomem::default()));
            mmio.insert(td::IOMEM_ADDR, td::IOMEM_LEN, m)?;
        }
        Ok(())
    }
}
