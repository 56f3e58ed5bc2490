//! The arithmetic and logic of the emulated instructions, with their RFLAGS (SDM vol. 1
//! §3.4.3.1 and appendix A: CF, PF of the low byte, AF, ZF, SF, OF).

use iced_x86::Mnemonic;

use crate::vcpu::bits::{AF, CF, OF, PF, SF, ZF};

/// `a op b` on `size`-byte operands with carry-in `cf` (ADC, SBB): the result and the
/// arithmetic flags. `None` for a mnemonic that is not an ALU operation.
pub(super) fn op(m: Mnemonic, a: u64, b: u64, cf: bool, size: usize) -> Option<(u64, u64)> {
    let mask = super::size_mask(size);
    let sign = 1u64 << (size * 8 - 1);
    let (a, b) = (a & mask, b & mask);
    let (r, mut flags) = match m {
        Mnemonic::Add | Mnemonic::Adc => {
            let c = (m == Mnemonic::Adc && cf) as u64;
            let wide = a as u128 + b as u128 + c as u128;
            let r = wide as u64 & mask;
            let mut f = 0;
            if wide > mask as u128 {
                f |= CF;
            }
            if (a ^ r) & (b ^ r) & sign != 0 {
                f |= OF;
            }
            (r, f | ((a ^ b ^ r) & AF))
        }
        Mnemonic::Sub | Mnemonic::Sbb | Mnemonic::Cmp => {
            let c = (m == Mnemonic::Sbb && cf) as u64;
            let r = a.wrapping_sub(b).wrapping_sub(c) & mask;
            let mut f = 0;
            if (a as u128) < b as u128 + c as u128 {
                f |= CF;
            }
            if (a ^ b) & (a ^ r) & sign != 0 {
                f |= OF;
            }
            (r, f | ((a ^ b ^ r) & AF))
        }
        Mnemonic::And | Mnemonic::Test => (a & b, 0),
        Mnemonic::Or => (a | b, 0),
        Mnemonic::Xor => (a ^ b, 0),
        _ => return None,
    };
    if r == 0 {
        flags |= ZF;
    }
    if r & sign != 0 {
        flags |= SF;
    }
    if (r as u8).count_ones().is_multiple_of(2) {
        flags |= PF;
    }
    Some((r, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(m: Mnemonic, a: u64, b: u64, size: usize) -> (u64, u64) {
        op(m, a, b, false, size).unwrap()
    }

    #[test]
    fn add_flags() {
        assert_eq!(f(Mnemonic::Add, 0xff, 1, 1), (0, CF | ZF | PF | AF));
        assert_eq!(f(Mnemonic::Add, 0x7f, 1, 1), (0x80, OF | SF | AF));
        assert_eq!(f(Mnemonic::Add, 1, 2, 4), (3, PF));
        assert_eq!(
            f(Mnemonic::Add, u64::MAX, u64::MAX, 8),
            (u64::MAX - 1, CF | SF | AF)
        );
        assert_eq!(
            op(Mnemonic::Adc, 0xffff, 0, true, 2),
            Some((0, CF | ZF | PF | AF))
        );
    }

    #[test]
    fn sub_flags() {
        assert_eq!(f(Mnemonic::Sub, 0, 1, 1), (0xff, CF | SF | PF | AF));
        assert_eq!(f(Mnemonic::Cmp, 0x80, 1, 1), (0x7f, OF | AF));
        assert_eq!(f(Mnemonic::Cmp, 5, 5, 8), (0, ZF | PF));
        assert_eq!(
            op(Mnemonic::Sbb, 5, 5, true, 4),
            Some((0xffff_ffff, CF | SF | PF | AF))
        );
        assert_eq!(
            f(Mnemonic::Sub, 0x8000_0000, 1, 4),
            (0x7fff_ffff, OF | PF | AF)
        );
    }

    #[test]
    fn logic_flags_clear_cf_and_of() {
        assert_eq!(f(Mnemonic::And, 0xf0, 0x0f, 1), (0, ZF | PF));
        assert_eq!(f(Mnemonic::Or, 0x8000, 1, 2), (0x8001, SF));
        assert_eq!(f(Mnemonic::Xor, 3, 1, 4), (2, 0));
        assert_eq!(
            f(Mnemonic::Test, 0x1_0000_0000, 0x1_0000_0000, 8),
            (0x1_0000_0000, PF)
        );
        assert_eq!(op(Mnemonic::Mov, 1, 1, false, 1), None);
    }
}
