//! The project's one small random generator: xorshift64*, seeded and deterministic, for
//! the host tests' random sequences (kernel core, VMM library) and the test guests'
//! hostile modes (`no_std`, no dependencies, so bare-metal crates can use it too).
//!
//! Not for anything that needs unpredictability: the same seed gives the same sequence
//! on every machine, which is the point (a failing seed can be replayed).

#![no_std]

/// The xorshift64* multiplier applied to the state to form each output.
const OUTPUT_MUL: u64 = 0x2545_f491_4f6c_dd1d;
/// 2^64 / golden ratio, the splitmix64 increment.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// One xorshift step of `state` (a zero state stays zero).
pub const fn step(mut state: u64) -> u64 {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    state
}

/// The output for a state [`step`] produced.
pub const fn output(state: u64) -> u64 {
    state.wrapping_mul(OUTPUT_MUL)
}

/// An xorshift64* generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose state is `state` exactly (non-zero, or it yields only zeros).
    pub const fn from_state(state: u64) -> Self {
        Rng(state)
    }

    /// A generator from any `seed`: the seed times the golden-ratio constant, made odd
    /// (so non-zero).
    pub const fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(GOLDEN) | 1)
    }

    /// A generator from any `seed` (0 included) through splitmix64, which spreads
    /// nearby seeds far apart; the state is made odd (so non-zero).
    pub const fn splitmix(seed: u64) -> Self {
        let mut z = seed.wrapping_add(GOLDEN);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = step(self.0);
        output(self.0)
    }

    /// A value in `0..n` (slightly biased for large `n`; 0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        match n {
            0 => 0,
            _ => self.next_u64() % n,
        }
    }

    /// A random byte.
    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    /// True about once in `one_in` calls (always for 0 and 1).
    pub fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    /// An access size a guest instruction could produce: 1, 2, 4 or 8 bytes.
    pub fn size(&mut self) -> usize {
        [1, 2, 4, 8][self.below(4) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_is_xorshift64_star() {
        // The first outputs from state 1, worked by hand from the definition.
        let mut r = Rng::from_state(1);
        let s1: u64 = 1 ^ (1 << 25);
        let s1 = s1 ^ (s1 >> 27);
        assert_eq!(r.next_u64(), s1.wrapping_mul(OUTPUT_MUL));
        assert_eq!(r.0, s1);
        assert_eq!(step(0), 0);
    }

    #[test]
    fn seeds_give_repeatable_distinct_sequences() {
        let a: [u64; 4] = core::array::from_fn({
            let mut r = Rng::new(7);
            move |_| r.next_u64()
        });
        let b: [u64; 4] = core::array::from_fn({
            let mut r = Rng::new(7);
            move |_| r.next_u64()
        });
        assert_eq!(a, b);
        assert_ne!(Rng::new(7).next_u64(), Rng::new(8).next_u64());
        // Every constructor leaves a non-zero state, seed 0 included.
        assert_ne!(Rng::new(0).0, 0);
        assert_ne!(Rng::splitmix(0).0, 0);
        assert_ne!(Rng::splitmix(0).next_u64(), Rng::splitmix(1).next_u64());
    }

    #[test]
    fn ranges_hold() {
        let mut r = Rng::new(3);
        for _ in 0..1000 {
            assert!(r.below(10) < 10);
            assert!([1, 2, 4, 8].contains(&r.size()));
        }
        assert_eq!(r.below(0), 0);
        assert!(r.chance(1));
    }
}
