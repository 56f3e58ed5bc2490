//! I/O APICs (82093AA datasheet; found in the MADT): every pin masked at boot, then
//! routed per GSI on request. ISA IRQs are translated through the MADT's overrides.

use spin::Mutex;

use crate::mem::layout::phys_to_virt;

/// Maximum I/O APICs supported.
pub const MAX_IOAPICS: usize = 8;

#[derive(Debug, Clone, Copy)]
struct IoApic {
    virt: u64,
    id: u8,
    gsi_base: u32,
    pins: u32,
}

/// ISA IRQ routing from an interrupt source override.
#[derive(Debug, Clone, Copy)]
pub struct IsaRoute {
    /// The GSI the ISA IRQ arrives at.
    pub gsi: u32,
    /// Level triggered.
    pub level: bool,
    /// Active low.
    pub active_low: bool,
}

struct State {
    apics: [Option<IoApic>; MAX_IOAPICS],
    isa: [IsaRoute; 16],
}

static STATE: Mutex<State> = Mutex::new(State {
    apics: [None; MAX_IOAPICS],
    isa: [IsaRoute {
        gsi: 0,
        level: false,
        active_low: false,
    }; 16],
});

impl IoApic {
    fn read(&self, reg: u32) -> u32 {
        // SAFETY: `virt` is the uncached physmap address of this I/O APIC's registers;
        // access is serialized by STATE's lock.
        unsafe {
            (self.virt as *mut u32).write_volatile(reg);
            ((self.virt + 0x10) as *const u32).read_volatile()
        }
    }
    fn write(&self, reg: u32, v: u32) {
        // SAFETY: as in read().
        unsafe {
            (self.virt as *mut u32).write_volatile(reg);
            ((self.virt + 0x10) as *mut u32).write_volatile(v);
        }
    }
    fn entry(&self, pin: u32) -> u64 {
        u64::from(self.read(0x10 + 2 * pin)) | (u64::from(self.read(0x11 + 2 * pin)) << 32)
    }
    fn set_entry(&self, pin: u32, e: u64) {
        // Mask first so a half-written entry never fires.
        self.write(0x10 + 2 * pin, (e as u32) | (1 << 16));
        self.write(0x11 + 2 * pin, (e >> 32) as u32);
        self.write(0x10 + 2 * pin, e as u32);
    }
}

/// Registers an I/O APIC and masks all its pins.
pub fn add(id: u8, phys: u64, gsi_base: u32) {
    let mut s = STATE.lock();
    let Some(slot) = s.apics.iter_mut().find(|a| a.is_none()) else {
        return;
    };
    let mut a = IoApic {
        virt: phys_to_virt(phys),
        id,
        gsi_base,
        pins: 0,
    };
    a.pins = ((a.read(1) >> 16) & 0xff) + 1;
    for pin in 0..a.pins {
        a.set_entry(pin, 1 << 16);
    }
    *slot = Some(a);
}

/// Records an ISA interrupt source override (called for each MADT entry).
pub fn add_override(isa_irq: u8, gsi: u32, level: bool, active_low: bool) {
    if let Some(r) = STATE.lock().isa.get_mut(usize::from(isa_irq)) {
        *r = IsaRoute {
            gsi,
            level,
            active_low,
        };
    }
}

/// Sets identity ISA routes (edge, active high) before overrides are added.
pub fn reset_isa() {
    let mut s = STATE.lock();
    for (i, r) in s.isa.iter_mut().enumerate() {
        *r = IsaRoute {
            gsi: i as u32,
            level: false,
            active_low: false,
        };
    }
}

/// The GSI and polarity of ISA IRQ `irq` (0..15).
pub fn isa_irq_to_gsi(irq: u8) -> Option<IsaRoute> {
    STATE.lock().isa.get(usize::from(irq)).copied()
}

fn with_pin<R>(gsi: u32, f: impl FnOnce(&IoApic, u32) -> R) -> Option<R> {
    let s = STATE.lock();
    let a = s
        .apics
        .iter()
        .flatten()
        .find(|a| gsi >= a.gsi_base && gsi < a.gsi_base + a.pins)?;
    Some(f(a, gsi - a.gsi_base))
}

/// Routes `gsi` to `vector` on the CPU with APIC id `dest_apic_id` (physical mode, fixed
/// delivery) and unmasks it. Returns false for an unknown GSI.
pub fn route_gsi(gsi: u32, vector: u8, dest_apic_id: u32, level: bool, active_low: bool) -> bool {
    let e = u64::from(vector)
        | (u64::from(active_low) << 13)
        | (u64::from(level) << 15)
        | (u64::from(dest_apic_id & 0xff) << 56);
    with_pin(gsi, |a, pin| a.set_entry(pin, e)).is_some()
}

/// Masks `gsi`.
pub fn mask(gsi: u32) -> bool {
    with_pin(gsi, |a, pin| {
        a.write(0x10 + 2 * pin, a.read(0x10 + 2 * pin) | (1 << 16))
    })
    .is_some()
}

/// Unmasks `gsi`.
pub fn unmask(gsi: u32) -> bool {
    with_pin(gsi, |a, pin| {
        a.write(0x10 + 2 * pin, a.read(0x10 + 2 * pin) & !(1 << 16))
    })
    .is_some()
}

/// The raw redirection entry of `gsi`.
pub fn entry(gsi: u32) -> Option<u64> {
    with_pin(gsi, |a, pin| a.entry(pin))
}

/// Number of GSIs (highest GSI + 1 over all I/O APICs).
pub fn num_gsis() -> u32 {
    STATE
        .lock()
        .apics
        .iter()
        .flatten()
        .map(|a| a.gsi_base + a.pins)
        .max()
        .unwrap_or(0)
}

/// The physical address of each I/O APIC's register page.
pub fn for_each_phys(mut f: impl FnMut(u64)) {
    for a in STATE.lock().apics.iter().flatten() {
        if let Some(p) = crate::mem::layout::virt_to_phys(a.virt) {
            f(p & !0xfff);
        }
    }
}

/// (id, GSI base, pins) of each I/O APIC.
pub fn for_each(mut f: impl FnMut(u8, u32, u32)) {
    for a in STATE.lock().apics.iter().flatten() {
        f(a.id, a.gsi_base, a.pins);
    }
}
