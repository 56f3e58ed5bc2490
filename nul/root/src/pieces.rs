//! Page arithmetic of the root's memory (no kernel calls: `tests/tests/root_pieces.rs`
//! includes this file and runs its tests on the host).

/// Splits `[base, base + count)` into naturally aligned power-of-two pieces.
pub fn aligned_pieces(mut base: u64, count: u64) -> impl Iterator<Item = (u64, u8)> {
    let end = base + count;
    core::iter::from_fn(move || {
        if base >= end {
            return None;
        }
        let align = if base == 0 { 63 } else { base.trailing_zeros() };
        let fit = 63 - (end - base).leading_zeros();
        let order = align.min(fit).min(30) as u8;
        let piece = (base, order);
        base += 1u64 << order;
        Some(piece)
    })
}

/// Splits a mapping of `count` pages from virtual page `v` to physical page `p` into
/// pieces `(v, p, order)` aligned on both sides, as CRDs need.
pub fn dual_pieces(v: u64, p: u64, count: u64) -> impl Iterator<Item = (u64, u64, u8)> {
    let mut i = 0;
    core::iter::from_fn(move || {
        if i >= count {
            return None;
        }
        let (vv, pp) = (v + i, p + i);
        let align = (vv | pp).trailing_zeros().min(30);
        let fit = 63 - (count - i).leading_zeros();
        let order = align.min(fit) as u8;
        i += 1u64 << order;
        Some((vv, pp, order))
    })
}

/// The least page number at or above `b` that is `rem` modulo `align` (a power of two,
/// `rem < align`).
pub fn first_congruent(b: u64, align: u64, rem: u64) -> u64 {
    b + (rem + align - (b & (align - 1))) % align
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congruent_starts() {
        assert_eq!(first_congruent(0, 512, 0), 0);
        assert_eq!(first_congruent(1, 512, 0), 512);
        assert_eq!(first_congruent(0x4a71, 512, 0x5d), 0x4c5d);
        assert_eq!(first_congruent(0x4a5d, 512, 0x5d), 0x4a5d);
        assert_eq!(first_congruent(0x4a5e, 512, 0x5d), 0x4c5d);
        for b in 0..2000u64 {
            let a = first_congruent(b, 512, 0x45d % 512);
            assert!(a >= b && a < b + 512 && a % 512 == 0x5d, "{b}: {a}");
        }
    }

    #[test]
    fn congruent_ranges_map_in_large_pieces() {
        // A 530-page segment at virtual page 0x45d: at a physical page congruent modulo
        // 512 it maps in 11 pieces; at 0x4a71 (not congruent) in 135.
        let good = dual_pieces(0x45d, 0x4c5d, 530).count();
        let bad = dual_pieces(0x45d, 0x4a71, 530).count();
        assert!(good <= 12 && bad > 100, "{good} {bad}");
        let mut next = (0x45d, 0x4c5d);
        for (v, p, order) in dual_pieces(0x45d, 0x4c5d, 530) {
            assert_eq!((v, p), next);
            assert_eq!((v | p) & ((1 << order) - 1), 0);
            next = (v + (1 << order), p + (1 << order));
        }
        assert_eq!(next.0, 0x45d + 530);
    }

    #[test]
    fn aligned_pieces_cover_the_range() {
        let pieces: Vec<_> = aligned_pieces(3, 13).collect();
        assert_eq!(pieces, [(3, 0), (4, 2), (8, 3)]);
    }
}
