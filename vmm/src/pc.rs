//! The PC that boots Linux: the devices wired together, and the exit handler.
//!
//! [`Pc`] holds the VM's buses with the devices of a small PC (PIC pair, PIT, RTC/CMOS,
//! COM1, ACPI PM block and reset register, I/O APIC, HPET, one local APIC per vCPU,
//! the PCI host bridge with a virtio-blk disk), loads a bzImage with the 64-bit boot
//! protocol ([`crate::boot`]) and the ACPI tables ([`crate::acpi`]), and answers every
//! vCPU event on a [`Platform`] the way KVM would: KVM's CPUID leaves with kvmclock,
//! the MSRs Linux touches, I/O and MMIO through the buses and the instruction
//! emulator, interrupts from the local APICs injected when the guest can take them.
//!
//! Interrupt wiring: ISA IRQ *n* drives PIC input *n* and I/O APIC input *n* (IRQ 0 on
//! input 2, as the MADT says); PCI INTx# drives I/O APIC inputs 16–19
//! ([`crate::pci::intx_gsi`]). The I/O APIC sends to the local APICs; a local APIC's
//! interrupt wire calls [`Kick::kick`], which the platform implements (wake the halted
//! vCPU, or recall the running one so its handler injects). The PIC's output is not
//! connected: Linux routes every ISA interrupt through the I/O APIC.
//!
//! Time: every device reads one [`Clock`]; the platform calls [`Pc::update_timers`] when
//! [`Pc::next_deadline`] passes (a timer thread per vCPU), and on a HLT with interrupts
//! enabled the handler returns [`Step::Wait`]: the platform blocks the vCPU until
//! [`Pc::interrupt_pending`] and then calls [`Pc::wake`].
//!
//! Locks: a device's lock may be held while it drives a wire into the I/O APIC, and the
//! I/O APIC's while it delivers to a local APIC; what leaves a local APIC (IPIs, EOI
//! broadcasts) is queued and delivered after its lock is released
//! ([`Pc::drain`]), so no two locks are ever taken in opposite orders.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use peregrine_abi::event::vcpu as ev;
use peregrine_abi::utcb::inj;

use crate::acpi::{self, AcpiConfig};
use crate::acpi_pm::{AcpiPm, ResetControl, PM_BASE, PM_LEN};
use crate::boot::multiboot::{self, MultibootError};
use crate::boot::{self, e820, BootInfo, E820Entry};
use crate::bus::BusDevice;
use crate::bus::{Action, Bus, IrqLine, SharedDevice};
use crate::clock::{Clock, NS_PER_SEC};
use crate::cpuid::KvmCpuid;
use crate::hpet::{Hpet, IrqPins, HPET_BASE, HPET_SIZE};
use crate::ioapic::{
    DeliveryMode, InterruptMessage, InterruptSink, IoApic, IOAPIC_BASE, IOAPIC_SIZE,
};
use crate::kvmclock::{KvmClock, TimeSample};
use crate::lapic::{self, ApicSink, Destination, Ipi, IpiMode, Lapic, LAPIC_BASE, LAPIC_SIZE};
use crate::machine::{self, past_hlt, Board, Core, CpuidFn, End, Exit, Mmio, Step};
use crate::pci::{self, PciHost, PciLayout};
use crate::pic8259::{PicPair, ELCR_BASE, MASTER_BASE, SLAVE_BASE};
use crate::pit8254::{Pit, PIT_BASE, PORT61_BASE};
use crate::rtc_cmos::{Rtc, RTC_BASE};
use crate::sync::SpinLock;
use crate::testdev::LineSink;
use crate::uart16550::{SerialSink, Uart16550};
use crate::vcpu::{bits, gpr, ArchState, Event, GuestMemory, Mtd, Platform, Segment};
use crate::virtio::block::{BlockBackend, BlockError, VirtioBlock, SECTOR_SIZE};
use crate::virtio::pci::VirtioPci;

mod msr;
mod qemu;
#[cfg(test)]
mod tests;

pub use qemu::{FwCfgSetup, QemuDevices, QemuDevicesError};

/// COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// COM1's IRQ.
pub const COM1_IRQ: u8 = 4;
/// The PCI slot of the virtio-blk disk.
pub const DISK_SLOT: u8 = 1;
/// Where the ACPI tables go (the BIOS area Linux scans for the RSDP).
pub const ACPI_ADDR: u64 = acpi::TABLES_ADDR;
/// The first MiB is split at 640 KiB: RAM below, reserved (BIOS, ACPI tables) above.
const LOW_RAM_END: u64 = 0x9_fc00;

/// How the platform gets an interrupt to a vCPU.
pub trait Kick: Send + Sync {
    /// An interrupt became pending for `vcpu`: wake it if it waits in HLT, else make it
    /// exit (recall) so its handler injects the interrupt.
    fn kick(&self, vcpu: u32);
}

/// What the PC is.
#[derive(Clone, Debug)]
pub struct PcConfig {
    /// vCPUs (1–64).
    pub vcpus: u32,
    /// Guest RAM in bytes, from guest-physical 0 (below 3 GiB).
    pub ram: u64,
    /// The guest TSC's frequency.
    pub tsc_hz: u64,
    /// The wall-clock time at clock 0, in Unix seconds (RTC and kvmclock wall clock).
    pub wall_secs: u64,
}

/// What the PC's virtio-blk function serves.
pub enum PcDisk {
    /// A disk in the VMM's memory, served in the notifying vCPU's exit.
    Ram(RamDisk),
    /// A block device model of the VMM's choosing: an
    /// [`AsyncBlock`](crate::virtio::async_block::AsyncBlock) on a disk-service session,
    /// whose completions the VMM delivers with [`Pc::disk_completions`].
    Device(Box<dyn crate::virtio::VirtioDevice>),
}

impl From<RamDisk> for PcDisk {
    fn from(d: RamDisk) -> Self {
        PcDisk::Ram(d)
    }
}

/// The disk's transport, as the completion path reaches it.
trait DiskQueue: Send + Sync {
    /// Runs the request queue's handler; whether the driver was interrupted.
    fn process(&self) -> bool;
}

impl<D: crate::virtio::VirtioDevice, M: GuestMemory + Send> DiskQueue
    for SpinLock<VirtioPci<D, M>>
{
    fn process(&self) -> bool {
        self.lock().process_queue(0)
    }
}

/// A disk in memory the VMM owns (a boot module's pages): writes land in it, flush has
/// nothing more to do.
pub struct RamDisk(pub &'static mut [u8]);

impl RamDisk {
    fn range(&self, sector: u64, len: usize) -> Result<core::ops::Range<usize>, BlockError> {
        let start = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(BlockError::OutOfRange)? as usize;
        let end = start.checked_add(len).ok_or(BlockError::OutOfRange)?;
        if end > self.0.len() {
            return Err(BlockError::OutOfRange);
        }
        Ok(start..end)
    }
}

impl BlockBackend for RamDisk {
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let r = self.range(sector, buf.len())?;
        buf.copy_from_slice(&self.0[r]);
        Ok(())
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
        let r = self.range(sector, buf.len())?;
        self.0[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        Ok(())
    }

    fn capacity(&self) -> u64 {
        self.0.len() as u64 / SECTOR_SIZE
    }
}

/// Serial output to a line sink, a line at a time.
pub struct SerialLines<S: LineSink> {
    buf: Vec<u8>,
    sink: S,
}

impl<S: LineSink> SerialLines<S> {
    /// Lines to `sink`.
    pub fn new(sink: S) -> Self {
        Self {
            buf: Vec::new(),
            sink,
        }
    }
}

impl<S: LineSink> SerialLines<S> {
    /// Passes on the unfinished line, if any ([`LineSink::partial`]).
    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.sink.partial(&self.buf);
            self.buf.clear();
        }
    }
}

impl<S: LineSink> SerialSink for SerialLines<S> {
    fn put(&mut self, byte: u8) {
        match byte {
            b'\n' => {
                self.sink.line(&self.buf);
                self.buf.clear();
            }
            b'\r' => {}
            b => {
                self.buf.push(b);
                if self.buf.len() >= 512 {
                    self.sink.line(&self.buf);
                    self.buf.clear();
                }
            }
        }
    }
}

/// What leaves a local APIC, delivered once its lock is released.
enum Outgoing {
    Ipi(Ipi),
    Eoi(u8),
}

/// The local APICs as the I/O APIC and the IPIs reach them.
struct Apics {
    lapics: SpinLock<Vec<Arc<SpinLock<Lapic>>>>,
    queue: SpinLock<Vec<Outgoing>>,
    /// SIPI vectors of vCPUs to start (vCPU index → vector | 0x100).
    sipi: Vec<AtomicU64>,
    /// An NMI (IPI) waits for each vCPU.
    nmi: Vec<AtomicBool>,
    /// vCPUs an INIT put into wait-for-SIPI (they run again at the next SIPI).
    init: Vec<AtomicBool>,
    /// Gets a vCPU out of the guest (or its wait) to see an NMI, INIT or SIPI.
    kick: Arc<dyn Kick>,
}

impl Apics {
    fn all(&self) -> Vec<Arc<SpinLock<Lapic>>> {
        self.lapics.lock().clone()
    }
}

impl InterruptSink for Apics {
    fn deliver(&self, msg: InterruptMessage) {
        if !matches!(msg.mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) {
            return;
        }
        let lowest = msg.mode == DeliveryMode::LowestPriority;
        for l in &self.all() {
            let mut l = l.lock();
            let hit = if msg.logical {
                l.logical_match(u32::from(msg.dest))
            } else {
                msg.dest == 0xff || l.id() == u32::from(msg.dest)
            };
            if hit {
                l.deliver(msg.vector, msg.level);
                if lowest {
                    return;
                }
            }
        }
    }
}

impl ApicSink for Apics {
    fn ipi(&self, ipi: Ipi) {
        self.queue.lock().push(Outgoing::Ipi(ipi));
    }

    fn eoi(&self, vector: u8) {
        self.queue.lock().push(Outgoing::Eoi(vector));
    }
}

/// A local APIC's interrupt wire: kicks its vCPU.
struct VcpuWire {
    vcpu: u32,
    kick: Arc<dyn Kick>,
}

impl IrqLine for VcpuWire {
    fn set_level(&self, level: bool) {
        if level {
            self.kick.kick(self.vcpu);
        }
    }
}

/// An ISA IRQ: the PIC's input and the I/O APIC's.
struct IsaLine {
    irq: u8,
    pic: Arc<SpinLock<PicPair>>,
    ioapic: Arc<SpinLock<IoApic>>,
}

impl IrqLine for IsaLine {
    fn set_level(&self, level: bool) {
        self.pic.lock().set_irq(self.irq, level);
        let pin = if self.irq == 0 { 2 } else { self.irq };
        self.ioapic.lock().set_irq(usize::from(pin), level);
    }
}

/// An I/O APIC input (PCI INTx#, HPET).
struct GsiLine {
    gsi: u8,
    ioapic: Arc<SpinLock<IoApic>>,
}

impl IrqLine for GsiLine {
    fn set_level(&self, level: bool) {
        self.ioapic.lock().set_irq(usize::from(self.gsi), level);
    }
}

struct HpetPins(Arc<SpinLock<IoApic>>);

impl IrqPins for HpetPins {
    fn set_pin(&self, pin: u8, level: bool) {
        self.0.lock().set_irq(usize::from(pin), level);
    }
}

/// Ports 0xcf8–0xcfb: dword accesses are the PCI host bridge's CONFIG_ADDRESS, a byte
/// access to 0xcf9 is the reset control register (as on PC chipsets).
struct ConfigAddress {
    host: Arc<SpinLock<PciHost>>,
    reset: ResetControl,
}

impl BusDevice for ConfigAddress {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if offset == 1 && data.len() == 1 {
            self.reset.read(base + 1, 0, data);
        } else {
            self.host.lock().read(base, offset, data);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        if offset == 1 && data.len() == 1 {
            self.reset.write(base + 1, 0, data)
        } else {
            self.host.lock().write(base, offset, data)
        }
    }
}

/// The PC.
pub struct Pc {
    cfg: PcConfig,
    boot: PcEntry,
    clock: Arc<dyn Clock>,
    core: Core,
    kvm: KvmCpuid,
    apics: Arc<Apics>,
    // A boxed slice (never resized), as `kvmclock` below: room for `pic`.
    lapics: Box<[Arc<SpinLock<Lapic>>]>,
    ioapic: Arc<SpinLock<IoApic>>,
    /// For ISA lines added later ([`Pc::add_qemu_devices`]).
    pic: Arc<SpinLock<PicPair>>,
    pit: Arc<SpinLock<Pit>>,
    rtc: Arc<SpinLock<Rtc>>,
    pm: Arc<SpinLock<AcpiPm>>,
    hpet: Arc<SpinLock<Hpet>>,
    uart: Arc<SpinLock<dyn UartInput>>,
    // Boxed slices, not vectors (never resized): the PC stays as small as it was with
    // the disk's handle added (nul/vmm keeps it in an enum beside the test machine).
    kvmclock: Box<[SpinLock<KvmClock>]>,
    msrs: Box<[SpinLock<msr::Msrs>]>,
    started: AtomicU64,
    /// The virtio-blk transport, for [`Pc::disk_completions`].
    disk: Option<Arc<dyn DiskQueue>>,
}

/// Where the disk's transport goes: its BAR on the MMIO bus, its function on the PCI
/// host bridge.
struct DiskSlot<'a> {
    mmio: &'a mut Bus,
    host: &'a mut PciHost,
    bar: u64,
}

impl DiskSlot<'_> {
    fn attach<D: crate::virtio::VirtioDevice + 'static, M: GuestMemory + Send + 'static>(
        &mut self,
        device: D,
        mem: M,
        line: Arc<GsiLine>,
    ) -> Arc<dyn DiskQueue> {
        let mut blk = VirtioPci::new(device, mem, line);
        blk.place_bar(self.bar);
        let blk = Arc::new(SpinLock::new(blk));
        let dev: SharedDevice = blk.clone();
        let _ = self
            .mmio
            .insert(self.bar, crate::virtio::pci::BAR_SIZE, dev);
        let _ = self.host.add(DISK_SLOT, 0, Box::new(blk.clone()));
        blk
    }
}

/// Console input into the UART, and its output's unfinished line.
trait UartInput: BusDevice {
    fn input(&mut self, bytes: &[u8]) -> usize;
    fn flush(&mut self);
}

impl<S: LineSink + 'static> UartInput for Uart16550<SerialLines<S>> {
    fn input(&mut self, bytes: &[u8]) -> usize {
        self.enqueue_input(bytes)
    }

    fn flush(&mut self) {
        self.sink().flush();
    }
}

/// Why the PC could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PcError {
    /// The kernel did not load.
    Boot(boot::BootError),
    /// The Multiboot image did not load.
    Multiboot(MultibootError),
    /// The ACPI tables did not fit in guest RAM.
    Acpi,
}

impl core::fmt::Display for PcError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PcError::Boot(e) => write!(f, "kernel: {e}"),
            PcError::Multiboot(e) => write!(f, "Multiboot image: {e}"),
            PcError::Acpi => write!(f, "the ACPI tables do not fit in guest RAM"),
        }
    }
}

/// What the PC boots.
#[derive(Clone, Copy)]
pub enum PcBoot<'a> {
    /// A Linux bzImage, entered at its 64-bit entry ([`crate::boot`]).
    Linux {
        /// The bzImage.
        kernel: &'a [u8],
        /// Its command line.
        cmdline: &'a [u8],
        /// The initrd.
        initrd: Option<&'a [u8]>,
    },
    /// A Multiboot v1 image, entered in 32-bit protected mode ([`multiboot`]).
    Multiboot {
        /// The image (ELF32, ELF64 or with the a.out-kludge address fields).
        image: &'a [u8],
        /// Its command line.
        cmdline: &'a [u8],
        /// The boot modules, in order.
        modules: &'a [multiboot::Module<'a>],
    },
}

/// How the BSP starts: what the loader placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PcEntry {
    /// At the kernel's 64-bit entry with the zero page.
    Linux(BootInfo),
    /// At the Multiboot entry with the information structure.
    Multiboot(multiboot::Loaded),
}

impl PcBoot<'_> {
    /// Loads the guest into `mem`, laid out as `regions` (the PC's memory map).
    fn load<M: GuestMemory + ?Sized>(
        &self,
        mem: &mut M,
        regions: &[E820Entry],
    ) -> Result<PcEntry, PcError> {
        match *self {
            PcBoot::Linux {
                kernel,
                cmdline,
                initrd,
            } => {
                let image = boot::parse(kernel).map_err(PcError::Boot)?;
                boot::load(mem, &image, regions, cmdline, initrd)
                    .map(PcEntry::Linux)
                    .map_err(PcError::Boot)
            }
            PcBoot::Multiboot {
                image,
                cmdline,
                modules,
            } => {
                let image = multiboot::parse(image).map_err(PcError::Multiboot)?;
                multiboot::load(mem, &image, regions, cmdline, modules)
                    .map(PcEntry::Multiboot)
                    .map_err(PcError::Multiboot)
            }
        }
    }
}

/// The e820 map of a PC with `ram` bytes of RAM (below 3 GiB): RAM, the BIOS area,
/// and the PCI ECAM window reserved (so Linux uses the MCFG table's ECAM).
pub fn memory_map(ram: u64) -> [E820Entry; 4] {
    let (ecam, ecam_size) = PciLayout::DEFAULT.e820_reserved();
    [
        E820Entry {
            addr: 0,
            size: LOW_RAM_END,
            typ: e820::RAM,
        },
        E820Entry {
            addr: LOW_RAM_END,
            size: 0x10_0000 - LOW_RAM_END,
            typ: e820::RESERVED,
        },
        E820Entry {
            addr: 0x10_0000,
            size: ram.saturating_sub(0x10_0000),
            typ: e820::RAM,
        },
        E820Entry {
            addr: ecam,
            size: ecam_size,
            typ: e820::RESERVED,
        },
    ]
}

impl Pc {
    /// Builds the PC: loads `kernel` (a bzImage) with `cmdline` and `initrd` into `mem`
    /// (guest RAM, also what the virtio device's queues are read from), writes the ACPI
    /// tables, and wires the devices. Console output goes to `console` a line at a
    /// time; the disk is `disk` (a [`RamDisk`] or a [`PcDisk`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new<M: GuestMemory + Clone + Send + 'static>(
        cfg: PcConfig,
        mem: &mut M,
        kernel: &[u8],
        cmdline: &[u8],
        initrd: Option<&[u8]>,
        disk: Option<impl Into<PcDisk>>,
        console: impl LineSink + 'static,
        clock: Arc<dyn Clock>,
        kick: Arc<dyn Kick>,
        cpuid: CpuidFn,
    ) -> Result<Self, PcError> {
        let boot = PcBoot::Linux {
            kernel,
            cmdline,
            initrd,
        };
        Self::with_boot(cfg, mem, boot, disk, console, clock, kick, cpuid)
    }

    /// Builds the PC as [`Pc::new`] does, but loads `image` as a Multiboot v1 image
    /// with `cmdline` and `modules` ([`multiboot::load`]: the information structure at
    /// [`multiboot::INFO_ADDR`], the modules after the image); the BSP starts at its
    /// entry in 32-bit protected mode with EAX = 0x2BADB002 and EBX at the information
    /// structure ([`multiboot::entry_state`]); the other vCPUs start by INIT/SIPI as
    /// always.
    #[allow(clippy::too_many_arguments)]
    pub fn new_multiboot<M: GuestMemory + Clone + Send + 'static>(
        cfg: PcConfig,
        mem: &mut M,
        image: &[u8],
        cmdline: &[u8],
        modules: &[multiboot::Module<'_>],
        disk: Option<impl Into<PcDisk>>,
        console: impl LineSink + 'static,
        clock: Arc<dyn Clock>,
        kick: Arc<dyn Kick>,
        cpuid: CpuidFn,
    ) -> Result<Self, PcError> {
        let boot = PcBoot::Multiboot {
            image,
            cmdline,
            modules,
        };
        Self::with_boot(cfg, mem, boot, disk, console, clock, kick, cpuid)
    }

    /// Builds the PC with the guest `boot` says ([`Pc::new`], [`Pc::new_multiboot`]):
    /// loads it, writes the ACPI tables (the RSDP at [`ACPI_ADDR`], in the BIOS area a
    /// guest scans), and wires the devices.
    #[allow(clippy::too_many_arguments)]
    pub fn with_boot<M: GuestMemory + Clone + Send + 'static>(
        cfg: PcConfig,
        mem: &mut M,
        boot: PcBoot<'_>,
        disk: Option<impl Into<PcDisk>>,
        console: impl LineSink + 'static,
        clock: Arc<dyn Clock>,
        kick: Arc<dyn Kick>,
        cpuid: CpuidFn,
    ) -> Result<Self, PcError> {
        let regions = memory_map(cfg.ram);
        let info = boot.load(mem, &regions)?;
        let vcpus = cfg.vcpus.clamp(1, 64);
        let acpi_cfg = AcpiConfig::new(vcpus as u8);
        acpi::write(mem, &acpi_cfg, ACPI_ADDR).map_err(|_| PcError::Acpi)?;

        let apics = Arc::new(Apics {
            lapics: SpinLock::new(Vec::new()),
            queue: SpinLock::new(Vec::new()),
            sipi: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            nmi: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            init: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            kick: kick.clone(),
        });
        let lapics: Vec<Arc<SpinLock<Lapic>>> = (0..vcpus)
            .map(|i| {
                Arc::new(SpinLock::new(Lapic::new(
                    i,
                    i == 0,
                    cfg.tsc_hz,
                    clock.clone(),
                    apics.clone(),
                    Arc::new(VcpuWire {
                        vcpu: i,
                        kick: kick.clone(),
                    }),
                )))
            })
            .collect();
        *apics.lapics.lock() = lapics.clone();
        let ioapic = Arc::new(SpinLock::new(IoApic::new(
            acpi_cfg.ioapic_id,
            apics.clone(),
        )));
        let pic = Arc::new(SpinLock::new(PicPair::new(Arc::new(crate::bus::NoIrq))));
        let isa = |irq: u8| -> Arc<dyn IrqLine> {
            Arc::new(IsaLine {
                irq,
                pic: pic.clone(),
                ioapic: ioapic.clone(),
            })
        };
        let pit = Arc::new(SpinLock::new(Pit::new(clock.clone(), isa(0))));
        let mut rtc = Rtc::new(clock.clone(), isa(8), cfg.wall_secs as i64);
        rtc.set_memory_layout(cfg.ram, 0, vcpus as u8);
        let rtc = Arc::new(SpinLock::new(rtc));
        let pm = Arc::new(SpinLock::new(AcpiPm::new(
            clock.clone(),
            isa(acpi::SCI_IRQ),
            acpi_cfg.pm,
        )));
        let hpet = Arc::new(SpinLock::new(Hpet::new(
            clock.clone(),
            Arc::new(HpetPins(ioapic.clone())),
        )));
        let uart = Arc::new(SpinLock::new(Uart16550::new(
            isa(COM1_IRQ),
            SerialLines::new(console),
        )));

        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let layout = PciLayout::DEFAULT;
        let mut host = PciHost::new(layout.ecam_base);
        let disk = disk.map(|disk| {
            let line = Arc::new(GsiLine {
                gsi: pci::intx_gsi(DISK_SLOT, 0) as u8,
                ioapic: ioapic.clone(),
            });
            let mut slot = DiskSlot {
                mmio: &mut mmio,
                host: &mut host,
                bar: layout.mmio32.0,
            };
            match disk.into() {
                PcDisk::Ram(d) => slot.attach(
                    VirtioBlock::new(d, false, b"peregrine-disk"),
                    mem.clone(),
                    line,
                ),
                PcDisk::Device(d) => slot.attach(d, mem.clone(), line),
            }
        });
        let host = Arc::new(SpinLock::new(host));

        // Fixed, non-overlapping ranges on empty buses: these inserts cannot fail.
        let p: SharedDevice = pic.clone();
        for base in [MASTER_BASE, SLAVE_BASE, ELCR_BASE] {
            let _ = pio.insert(base, 2, p.clone());
        }
        let d: SharedDevice = pit.clone();
        let _ = pio.insert(PIT_BASE, 4, d.clone());
        let _ = pio.insert(PORT61_BASE, 1, d);
        let d: SharedDevice = rtc.clone();
        let _ = pio.insert(RTC_BASE, 2, d);
        let d: SharedDevice = pm.clone();
        let _ = pio.insert(PM_BASE, PM_LEN, d);
        let d: SharedDevice = uart.clone();
        let _ = pio.insert(COM1_BASE, 8, d);
        // 0xcf8–0xcfb: CONFIG_ADDRESS, whose byte 0xcf9 alone is the reset register.
        let d: SharedDevice = Arc::new(SpinLock::new(ConfigAddress {
            host: host.clone(),
            reset: ResetControl::default(),
        }));
        let _ = pio.insert(pci::CONFIG_ADDRESS, 4, d);
        let d: SharedDevice = host.clone();
        let _ = pio.insert(pci::CONFIG_DATA, 4, d.clone());
        let _ = mmio.insert(layout.ecam_base, pci::ECAM_SIZE, d);
        let d: SharedDevice = ioapic.clone();
        let _ = mmio.insert(IOAPIC_BASE, IOAPIC_SIZE, d);
        let d: SharedDevice = hpet.clone();
        let _ = mmio.insert(HPET_BASE, HPET_SIZE, d);
        // The xAPIC page: every vCPU's accesses go to its own local APIC (`lapic_mmio`).
        let d: SharedDevice = Arc::new(SpinLock::new(crate::testdev::TestPorts::default()));
        let _ = mmio.insert(LAPIC_BASE, LAPIC_SIZE, d);

        let kvmclock = (0..vcpus)
            .map(|_| SpinLock::new(KvmClock::new(cfg.tsc_hz)))
            .collect();
        let msrs = (0..vcpus)
            .map(|_| SpinLock::new(msr::Msrs::default()))
            .collect();
        Ok(Self {
            core: Core::new(vcpus, cpuid, pio, mmio),
            cfg: PcConfig { vcpus, ..cfg },
            boot: info,
            clock,
            kvm: KvmCpuid::default(),
            apics,
            lapics: lapics.into_boxed_slice(),
            ioapic,
            pic,
            pit,
            rtc,
            pm,
            hpet,
            uart,
            kvmclock,
            msrs,
            started: AtomicU64::new(1),
            disk,
        })
    }

    /// The disk's requests finished (an asynchronous disk's completion signal): runs the
    /// disk's request queue, which puts the finished requests into the used ring,
    /// starts those that waited and interrupts the driver if it asks for it. Whether
    /// it did; false without a disk. Call it from any thread (the completion thread):
    /// it takes the disk's lock as a vCPU's MMIO exit does.
    pub fn disk_completions(&self) -> bool {
        let raised = self.disk.as_ref().is_some_and(|d| d.process());
        self.drain();
        raised
    }

    /// The configuration.
    pub fn config(&self) -> &PcConfig {
        &self.cfg
    }

    /// Where the Linux kernel was loaded (`None` for a Multiboot image).
    pub fn boot_info(&self) -> Option<&BootInfo> {
        match &self.boot {
            PcEntry::Linux(info) => Some(info),
            PcEntry::Multiboot(_) => None,
        }
    }

    /// How the BSP starts: what the loader placed.
    pub fn entry(&self) -> &PcEntry {
        &self.boot
    }

    /// Console input for COM1: how many bytes it took.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        let n = self.uart.lock().input(bytes);
        self.drain();
        n
    }

    /// Passes COM1's unfinished output line on (an interactive console's prompt).
    pub fn flush_console(&self) {
        self.uart.lock().flush();
    }

    /// The state every event's portal must transfer.
    pub fn portal_mtd(event: u64) -> Mtd {
        let base = Mtd::RIP_LEN | Mtd::RFLAGS | Mtd::STA | Mtd::INJ;
        base | match event {
            ev::STARTUP => Mtd::empty(),
            ev::CPUID => Mtd::GPR_ACDB | Mtd::CR,
            ev::XSETBV => Mtd::GPR_ACDB,
            ev::RDMSR | ev::WRMSR => {
                Mtd::GPR_ACDB
                    | Mtd::EFER
                    | Mtd::FS_GS
                    | Mtd::SYSENTER
                    | Mtd::SYSCALL_SWAPGS
                    | Mtd::PAT
                    | Mtd::TSC
            }
            ev::IO => Mtd::GPR_ACDB | Mtd::QUAL,
            ev::NPT_FAULT | ev::IO_STRING | ev::EXCEPTION => {
                Mtd::GPRS | Mtd::CS_SS | Mtd::DS_ES | Mtd::FS_GS | Mtd::CR | Mtd::EFER | Mtd::QUAL
            }
            ev::CR_ACCESS => Mtd::GPRS | Mtd::CR | Mtd::EFER | Mtd::CS_SS | Mtd::QUAL,
            ev::TRIPLE_FAULT => crate::diag::SHUTDOWN_MTD,
            _ => Mtd::QUAL,
        }
    }

    /// When the next timer of `vcpu` is due (clock ns): its local APIC's, and for vCPU 0
    /// also the platform timers'.
    pub fn next_deadline(&self, vcpu: u32) -> Option<u64> {
        let mut d = self
            .lapics
            .get(vcpu as usize)
            .and_then(|l| l.lock().next_event());
        if vcpu == 0 {
            for n in [
                self.pit.lock().next_event(),
                self.hpet.lock().next_event(),
                self.rtc.lock().next_event(),
                self.pm.lock().next_event(),
            ] {
                d = match (d, n) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        d
    }

    /// Brings `vcpu`'s timers up to date (raising what expired).
    pub fn update_timers(&self, vcpu: u32) {
        if let Some(l) = self.lapics.get(vcpu as usize) {
            l.lock().update();
        }
        if vcpu == 0 {
            self.pit.lock().update();
            self.hpet.lock().update();
            self.rtc.lock().update();
            self.pm.lock().update();
        }
        self.drain();
    }

    /// Whether `vcpu` has an interrupt (or NMI) to take; for a vCPU in wait-for-SIPI,
    /// whether its SIPI came.
    pub fn interrupt_pending(&self, vcpu: u32) -> bool {
        let i = vcpu as usize;
        if self
            .apics
            .init
            .get(i)
            .is_some_and(|f| f.load(Ordering::Acquire))
        {
            return self.apics.sipi[i].load(Ordering::Acquire) != 0;
        }
        self.apics
            .nmi
            .get(i)
            .is_some_and(|f| f.load(Ordering::Acquire))
            || self
                .lapics
                .get(i)
                .is_some_and(|l| l.lock().pending_vector().is_some())
    }

    /// Whether `vcpu` waits for a SIPI after an INIT.
    fn in_init(&self, vcpu: u32) -> bool {
        self.apics
            .init
            .get(vcpu as usize)
            .is_some_and(|f| f.load(Ordering::Acquire))
    }

    /// Delivers what local APICs queued (IPIs, EOI broadcasts).
    fn drain(&self) {
        loop {
            let out = core::mem::take(&mut *self.apics.queue.lock());
            if out.is_empty() {
                return;
            }
            for o in out {
                match o {
                    Outgoing::Eoi(v) => self.ioapic.lock().end_of_interrupt(v),
                    Outgoing::Ipi(ipi) => self.ipi(ipi),
                }
            }
        }
    }

    fn ipi(&self, ipi: Ipi) {
        let mut kicks = Vec::new();
        for (i, l) in self.lapics.iter().enumerate() {
            let mut l = l.lock();
            let id = l.id();
            let hit = match ipi.dest {
                Destination::AllExcludingSelf => id != ipi.source,
                Destination::Physical(d) => d == id || d == 0xff || d == u32::MAX,
                Destination::Logical(d) => l.logical_match(d),
            };
            if !hit {
                continue;
            }
            let started = self.started.load(Ordering::Acquire) & (1u64 << i) != 0;
            match ipi.mode {
                IpiMode::Fixed | IpiMode::LowestPriority => l.deliver(ipi.vector, ipi.level),
                IpiMode::Startup => {
                    // Ignored by a running vCPU (only one in wait-for-SIPI takes it).
                    if !started || self.apics.init[i].load(Ordering::Acquire) {
                        self.apics.sipi[i].store(0x100 | u64::from(ipi.vector), Ordering::Release);
                        kicks.push(i);
                    }
                }
                IpiMode::Nmi => {
                    self.apics.nmi[i].store(true, Ordering::Release);
                    kicks.push(i);
                }
                // INIT resets a running AP's local APIC and puts it into wait-for-SIPI
                // (one never started is there already; the boot vCPU would need the
                // firmware's reset path, which the PC does not model: ignored).
                IpiMode::Init if started && i != 0 => {
                    l.reset();
                    self.apics.sipi[i].store(0, Ordering::Release);
                    self.apics.init[i].store(true, Ordering::Release);
                    kicks.push(i);
                }
                IpiMode::Init | IpiMode::Smi => {}
            }
        }
        for i in kicks {
            self.apics.kick.kick(i as u32);
        }
    }

    /// Handles `event` of vCPU `vcpu`, whose state `p` holds; then injects a pending
    /// interrupt if the vCPU can take one (else asks for an interrupt window). The
    /// caller clears the MTD before and replies with it after.
    pub fn handle<P: Platform + ?Sized>(&self, p: &mut P, vcpu: u32, exit: Exit) -> Step {
        // INIT: whatever the vCPU was doing is dropped; it waits for its SIPI.
        if self.in_init(vcpu) {
            return Step::Wait;
        }
        let step = machine::handle(self, p, vcpu, exit);
        self.settle(p, vcpu, step)
    }

    /// What follows every exit, after the exit itself gave `step`: what the local APICs
    /// queued is delivered, a pending interrupt injected if the vCPU can take one (else
    /// the window requested), and a vCPU a SIPI named started. [`Pc::handle`] ends with
    /// it; a hosted binding calls it after the accesses its kernel decoded
    /// ([`machine::access`]).
    pub fn settle<P: Platform + ?Sized>(&self, p: &mut P, vcpu: u32, step: Step) -> Step {
        self.drain();
        if self.in_init(vcpu) {
            return Step::Wait;
        }
        if step == Step::Resume {
            self.inject_pending(p, vcpu);
            // A SIPI to a vCPU never started: start it.
            for (i, s) in self.apics.sipi.iter().enumerate().skip(1) {
                let bit = 1u64 << i;
                if s.load(Ordering::Acquire) != 0
                    && self.started.fetch_or(bit, Ordering::AcqRel) & bit == 0
                {
                    return Step::Start(i as u32);
                }
            }
        }
        step
    }

    /// After [`Step::Wait`]: the vCPU has an interrupt (or the platform gives up
    /// waiting); inject it.
    pub fn wake<P: Platform + ?Sized>(&self, p: &mut P, vcpu: u32) {
        self.drain();
        let i = vcpu as usize;
        if self.in_init(vcpu) {
            if self.apics.sipi[i].load(Ordering::Acquire) != 0 {
                // The SIPI: the AP starts over in real mode at its page, as at power-on.
                self.apics.init[i].store(false, Ordering::Release);
                let r = p.regs_mut();
                self.entry_state(r, vcpu);
                for n in [2, 3, 4, 8] {
                    r.set_cr(n, 0);
                }
                r.set_intr_state(0);
                r.set_actv_state(0);
                r.set_inj(0, 0);
            }
            return;
        }
        self.inject_pending(p, vcpu);
    }

    fn inject_pending<P: Platform + ?Sized>(&self, p: &mut P, vcpu: u32) {
        let Some(l) = self.lapics.get(vcpu as usize) else {
            return;
        };
        let r = p.regs();
        let busy = r.inj_info & inj::VALID != 0;
        // An NMI first (blocking by NMI, bit 3 of the interruptibility state, holds it
        // back until the guest's IRET: the window asks for that moment).
        if self.apics.nmi[vcpu as usize].load(Ordering::Acquire) {
            if !busy && r.intr_state & 8 == 0 {
                self.apics.nmi[vcpu as usize].store(false, Ordering::Release);
                p.inject(Event::Nmi);
                return;
            }
            let r = p.regs_mut();
            r.set_inj_info(r.inj_info | inj::REQ_NMI_WINDOW);
        }
        let r = p.regs();
        let open = r.rflags & bits::IF != 0 && r.intr_state & 3 == 0;
        let mut l = l.lock();
        let Some(v) = l.pending_vector() else {
            return;
        };
        if !busy && open {
            l.accept(v);
            drop(l);
            p.inject(Event::Interrupt(v));
        } else {
            drop(l);
            let r = p.regs_mut();
            r.set_inj_info(r.inj_info | inj::REQ_INTR_WINDOW);
        }
    }

    /// The XCR0 a vCPU starts with: the user state components the host offers that
    /// Linux enables (x87, SSE, AVX, AVX-512, PKRU, AMX), not the architectural 1.
    ///
    /// QEMU's software SVM does not deliver the guest's XSETBV as an exit (the kernel
    /// asks for the intercept; the VMM never sees it), so the guest's own XCR0 write
    /// lasts only until the next VM entry, where the kernel loads the XCR0 the VMM
    /// gave. Starting with the value Linux will write keeps the two equal; with an
    /// XCR0 of 1 Linux's XRSTOR of a signal frame (whose SSE bit it always sets) fails
    /// and init dies in `rt_sigreturn`. Where the exit comes, [`Pc::handle`] takes the
    /// guest's value as it should.
    fn initial_xcr0(&self) -> u64 {
        const LINUX_USER: u64 = 0x7 | 0xe0 | 1 << 9 | 3 << 17;
        let [lo, _, _, hi] = (self.core.cpuid)(0xd, 0);
        let x = (u64::from(lo) | u64::from(hi) << 32) & LINUX_USER;
        if x & 3 == 3 {
            x
        } else {
            1
        }
    }

    /// The guest's clocks now.
    fn sample(&self, tsc: u64) -> TimeSample {
        TimeSample {
            tsc,
            ns: self.clock.now_ns(),
        }
    }

    /// Wall-clock time at clock 0, in ns since the epoch.
    fn boot_wall_ns(&self) -> u64 {
        self.cfg.wall_secs.saturating_mul(NS_PER_SEC)
    }
}

impl Board for Pc {
    #[inline]
    fn core(&self) -> &Core {
        &self.core
    }

    #[inline]
    fn mmio(&self, vcpu: u32, gpa: u64) -> Mmio<'_> {
        match self.lapics.get(vcpu as usize) {
            // This vCPU's own local APIC.
            Some(l) if (LAPIC_BASE..LAPIC_BASE + LAPIC_SIZE).contains(&gpa) => Mmio::Device {
                base: LAPIC_BASE,
                len: LAPIC_SIZE,
                device: &**l,
            },
            _ => Mmio::Bus(&self.core.mmio),
        }
    }

    /// The entry state: vCPU 0 at the kernel's 64-bit entry (or the Multiboot image's
    /// 32-bit one), the others in real mode at their SIPI's page.
    fn entry_state(&self, regs: &mut ArchState, vcpu: u32) {
        if vcpu == 0 {
            match &self.boot {
                PcEntry::Linux(info) => boot::entry_state(regs, info),
                PcEntry::Multiboot(loaded) => multiboot::entry_state(regs, loaded),
            }
        } else {
            let sipi = self
                .apics
                .sipi
                .get(vcpu as usize)
                .map_or(0, |s| s.load(Ordering::Acquire)) as u8;
            let seg = |sel: u16, base: u64, ar: u16| Segment {
                sel,
                ar,
                limit: 0xffff,
                base,
            };
            let data = seg(0, 0, 0x93);
            regs.set_cs(seg(u16::from(sipi) << 8, u64::from(sipi) << 12, 0x9b));
            regs.set_ss(data);
            regs.set_ds(data);
            regs.set_es(data);
            regs.set_fs(data);
            regs.set_gs(data);
            regs.set_tr(seg(0, 0, 0x8b));
            regs.set_ldtr(seg(0, 0, 0x82));
            regs.set_gdtr(seg(0, 0, 0));
            regs.set_idtr(seg(0, 0, 0));
            regs.set_cr0(1 << 4); // ET; CR2, CR3, CR4, CR8 zero
            regs.set_efer(0);
            regs.set_rflags(2);
            regs.set_rip(0);
            let mut gprs = [0; 16];
            gprs[gpr::RDX] = 0x600;
            regs.set_gprs(gprs);
        }
        regs.set_pat(0x0007_0406_0007_0406);
        regs.set_xcr0(self.initial_xcr0());
    }

    /// KVM's leaves with kvmclock; x2APIC and the TSC deadline timer; OSXSAVE as the
    /// guest's CR4 says; the vCPU count; an always-running APIC timer; no MTRRs,
    /// MWAITX, RDTSCP, RDPID or SVM leaf.
    fn cpuid(&self, regs: &ArchState, vcpu: u32, leaf: u32, sub: u32) -> [u32; 4] {
        if let Some(v) = self.kvm.leaf(leaf) {
            return v;
        }
        let mut v = machine::guest_cpuid(self.core.cpuid, vcpu, leaf, sub);
        match leaf {
            1 => {
                // No MTRRs (Linux then leaves their MSRs alone); HTT: the logical count
                // in EBX is valid.
                const X2APIC: u32 = 1 << 21;
                const TSC_DEADLINE: u32 = 1 << 24;
                const OSXSAVE: u32 = 1 << 27;
                v[2] = (v[2] | X2APIC | TSC_DEADLINE) & !OSXSAVE;
                if regs.cr4 & (1 << 18) != 0 {
                    v[2] |= OSXSAVE;
                }
                v[3] = (v[3] & !(1 << 12)) | 1 << 28;
                v[1] = (v[1] & !0x00ff_0000) | (self.cfg.vcpus.min(255) << 16);
            }
            // Always-running APIC timer.
            6 => v[0] |= 1 << 2,
            // No RDPID: like RDTSCP below it reads IA32_TSC_AUX, which the kernel does
            // not switch between host and guest (the guest's WRMSR lands in the PC's
            // MSR table; the instruction would read the host's value).
            7 if sub == 0 => v[2] &= !(1 << 22),
            // No MWAITX, no RDTSCP (see leaf 7).
            0x8000_0001 => {
                v[2] &= !(1 << 29);
                v[3] &= !(1 << 27);
            }
            0x8000_000a => v = [0; 4],
            _ => {}
        }
        v
    }

    #[inline]
    fn hlt<P: Platform + ?Sized>(&self, p: &mut P, vcpu: u32) -> Step {
        let rflags = p.regs().rflags;
        past_hlt(p.regs_mut());
        if rflags & bits::IF == 0 {
            return Step::Stop;
        }
        if self.interrupt_pending(vcpu) {
            Step::Resume
        } else {
            Step::Wait
        }
    }

    #[inline]
    fn rdmsr<P: Platform + ?Sized>(&self, p: &mut P, vcpu: u32, msr: u32) -> Option<u64> {
        self.read_msr(p, vcpu, msr)
    }

    #[inline]
    fn wrmsr<P: Platform + ?Sized>(&self, p: &mut P, vcpu: u32, msr: u32, v: u64) -> bool {
        self.write_msr(p, vcpu, msr, v)
    }

    #[inline]
    fn fetch_from_mmio<P: Platform + ?Sized>(&self, _p: &mut P, gpa: u64) -> Step {
        Step::End(End::FetchFromMmio { gpa })
    }

    /// The PC starts vCPUs by INIT/SIPI only.
    #[inline]
    fn start_vcpu(&self, _n: u32) -> Step {
        Step::Resume
    }

    #[inline]
    fn quiet<P: Platform + ?Sized>(&self, _p: &mut P, _exit: Exit) -> Step {
        Step::Resume
    }
}

/// Whether `msr` is the local APIC's (base, TSC deadline, the x2APIC registers).
fn lapic_msr(msr: u32) -> bool {
    msr == lapic::MSR_APIC_BASE
        || msr == lapic::MSR_TSC_DEADLINE
        || lapic::X2APIC_MSRS.contains(&msr)
}
