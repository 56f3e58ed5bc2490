//! Capability range descriptors and typed transfer items.

use crate::perm::{MemPerm, PioPerm};

/// What kind of space a [`Crd`] describes.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrdKind {
    /// The empty range.
    Null = 0,
    /// Memory pages; base and order count pages.
    Mem = 1,
    /// I/O ports.
    Pio = 2,
    /// Object capabilities; base and order count selectors.
    Obj = 3,
}

/// A capability range descriptor: `2^order` items from `base` (naturally aligned) of one
/// space, with a permission mask.
///
/// Layout: kind (bits 0–1), permissions (bits 2–6), order (bits 7–11), base (12–63).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Crd(pub u64);

impl core::fmt::Debug for Crd {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "Crd({:?} base={:#x} order={} perm={:#x})",
            self.kind(),
            self.base(),
            self.order(),
            self.perm()
        )
    }
}

impl Crd {
    /// The empty range.
    pub const NULL: Crd = Crd(0);
    /// Largest order a CRD may carry.
    pub const MAX_ORDER: u8 = 31;
    /// All five permission bits.
    pub const PERM_ALL: u8 = 0x1f;

    /// Packs a CRD. Out-of-range fields are cut; the kernel checks alignment.
    pub const fn new(kind: CrdKind, base: u64, order: u8, perm: u8) -> Self {
        Crd((kind as u64)
            | (((perm & 0x1f) as u64) << 2)
            | (((order & 0x1f) as u64) << 7)
            | (base << 12))
    }
    /// A memory range of `2^order` pages starting at page number `page`.
    pub const fn mem(page: u64, order: u8, perm: MemPerm) -> Self {
        Self::new(CrdKind::Mem, page, order, perm.bits())
    }
    /// An I/O port range.
    pub const fn pio(port: u64, order: u8) -> Self {
        Self::new(CrdKind::Pio, port, order, PioPerm::ACCESS.bits())
    }
    /// An object-capability range with the given (type-specific) permission mask.
    pub const fn obj(sel: u64, order: u8, perm: u8) -> Self {
        Self::new(CrdKind::Obj, sel, order, perm)
    }
    /// The kind of range.
    pub const fn kind(self) -> CrdKind {
        match self.0 & 3 {
            1 => CrdKind::Mem,
            2 => CrdKind::Pio,
            3 => CrdKind::Obj,
            _ => CrdKind::Null,
        }
    }
    /// The permission mask.
    pub const fn perm(self) -> u8 {
        ((self.0 >> 2) & 0x1f) as u8
    }
    /// log2 of the number of items.
    pub const fn order(self) -> u8 {
        ((self.0 >> 7) & 0x1f) as u8
    }
    /// The first item (page number, port or selector).
    pub const fn base(self) -> u64 {
        self.0 >> 12
    }
    /// Whether `base` is aligned to `2^order`.
    pub const fn is_aligned(self) -> bool {
        self.base() & ((1u64 << self.order()) - 1) == 0
    }
    /// The same range with a different permission mask.
    pub const fn with_perm(self, perm: u8) -> Self {
        Crd((self.0 & !(0x1f << 2)) | (((perm & 0x1f) as u64) << 2))
    }
}

bitflags::bitflags! {
    /// The flags word of a typed item (low 12 bits; the hotspot sits above).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct XferFlags: u64 {
        /// Delegate (create a derived capability); without it, translate (look up the
        /// receiver's name for the sender's capability).
        const DELEGATE = 1 << 0;
        /// Memory goes into the receiver's guest-physical (EPT/NPT) space.
        const GUEST = 1 << 8;
        /// Memory goes into the receiver's IOMMU (DMA) space.
        const DMA = 1 << 9;
        /// Memory goes into the receiver's host page table (the default when neither
        /// `GUEST` nor `DMA` is given).
        const HOST = 1 << 10;
    }
}

/// A typed item in the UTCB: what to send and how.
///
/// Two words: the sender's [`Crd`], then flags (bits 0–11) and the hotspot (bits 12–63)
/// that chooses which part of a larger receive window the range lands in.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Xfer {
    /// The sender's range.
    pub crd: Crd,
    /// Flags and hotspot.
    pub meta: u64,
}

const _: () = assert!(core::mem::size_of::<Xfer>() == 16);

impl Xfer {
    /// A delegation of `crd` with `flags`, placed at `hotspot` in the receive window.
    pub const fn delegate(crd: Crd, flags: XferFlags, hotspot: u64) -> Self {
        Xfer {
            crd,
            meta: flags.bits() | XferFlags::DELEGATE.bits() | (hotspot << 12),
        }
    }
    /// The flags.
    pub const fn flags(self) -> XferFlags {
        XferFlags::from_bits_truncate(self.meta & 0xfff)
    }
    /// The hotspot (in items of the range's kind).
    pub const fn hotspot(self) -> u64 {
        self.meta >> 12
    }
}

/// Computes where a delegation lands: given the sender's range (`snd_base`, `snd_order`),
/// the receiver's window (`rcv_base`, `rcv_order`) and the hotspot, returns
/// `(send_base, recv_base, order)` of the largest naturally aligned range that both sides
/// cover, or `None` when they do not intersect. This is NOVA's rule: the hotspot names a
/// point inside the window; the sent range is aligned to the smaller order around it.
pub fn delegation_target(
    snd_base: u64,
    snd_order: u8,
    rcv_base: u64,
    rcv_order: u8,
    hotspot: u64,
) -> Option<(u64, u64, u8)> {
    if snd_order > 63 || rcv_order > 63 {
        return None;
    }
    let order = snd_order.min(rcv_order);
    let mask = |o: u8| if o >= 64 { u64::MAX } else { (1u64 << o) - 1 };
    if snd_order <= rcv_order {
        // The whole sent range fits; place it in the window at the hotspot, aligned.
        let off = hotspot & mask(rcv_order) & !mask(snd_order);
        Some((snd_base, rcv_base.checked_add(off)?, order))
    } else {
        // The window is smaller: send the part of the range the hotspot selects.
        let off = hotspot & mask(snd_order) & !mask(rcv_order);
        Some((snd_base.checked_add(off)?, rcv_base, order))
    }
}

/// Splits `count` items from `base` into naturally aligned power-of-two pieces
/// `(base, order)`, largest first where alignment allows, each of order at most
/// `max_order` — the shape CRDs need.
pub fn aligned_pieces(base: u64, count: u64, max_order: u8) -> impl Iterator<Item = (u64, u8)> {
    let mut b = base;
    let end = base.saturating_add(count);
    core::iter::from_fn(move || {
        if b >= end {
            return None;
        }
        let align = if b == 0 { 63 } else { b.trailing_zeros() };
        let fit = 63 - (end - b).leading_zeros();
        let order = align.min(fit).min(max_order as u32) as u8;
        let piece = (b, order);
        b += 1u64 << order;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn pieces() {
        let v: std::vec::Vec<_> = super::aligned_pieces(3, 10, 31).collect();
        assert_eq!(v, [(3, 0), (4, 2), (8, 2), (12, 0)]);
        let total: u64 = super::aligned_pieces(0x123, 0x4567, 5)
            .map(|(_, o)| 1u64 << o)
            .sum();
        assert_eq!(total, 0x4567);
        assert!(super::aligned_pieces(0x123, 0x4567, 5).all(|(b, o)| o <= 5 && b % (1 << o) == 0));
        assert_eq!(super::aligned_pieces(5, 0, 3).count(), 0);
    }

    use super::*;

    #[test]
    fn crd_fields() {
        let c = Crd::mem(0x12345, 4, MemPerm::R | MemPerm::W);
        assert_eq!(c.kind(), CrdKind::Mem);
        assert_eq!(c.base(), 0x12345);
        assert_eq!(c.order(), 4);
        assert_eq!(c.perm(), 3);
        assert!(!c.is_aligned());
        assert!(Crd::obj(0x40, 6, 0x1f).is_aligned());
        assert_eq!(c.with_perm(1).perm(), 1);
        assert_eq!(c.with_perm(1).base(), 0x12345);
        assert_eq!(Crd::NULL.kind(), CrdKind::Null);
    }

    #[test]
    fn xfer_fields() {
        let x = Xfer::delegate(Crd::pio(0x3f8, 3), XferFlags::empty(), 0x77);
        assert!(x.flags().contains(XferFlags::DELEGATE));
        assert_eq!(x.hotspot(), 0x77);
    }

    #[test]
    fn delegation_windows() {
        // Small range into a big window: hotspot chooses the slot.
        assert_eq!(
            delegation_target(0x10, 0, 0x1000, 8, 0x35),
            Some((0x10, 0x1035, 0))
        );
        // Big range into a small window: hotspot chooses the part of the range.
        assert_eq!(
            delegation_target(0x100, 8, 0x2000, 2, 0x35),
            Some((0x134, 0x2000, 2))
        );
        // Equal orders.
        assert_eq!(
            delegation_target(0x40, 4, 0x80, 4, 0),
            Some((0x40, 0x80, 4))
        );
    }
}
