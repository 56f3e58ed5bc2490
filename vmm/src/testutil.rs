//! Test helpers: a seeded PRNG for fuzz-style tests and a recording interrupt wire.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use crate::bus::IrqLine;

/// xorshift64*: small, seeded, deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    /// An access size a guest instruction could produce.
    pub fn size(&mut self) -> usize {
        [1, 2, 4, 8][self.below(4) as usize]
    }
}

/// An interrupt wire that records its level and counts rising edges.
#[derive(Default)]
pub struct TestIrq {
    level: AtomicBool,
    rises: AtomicU32,
}

impl TestIrq {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn level(&self) -> bool {
        self.level.load(Ordering::SeqCst)
    }

    /// Rising edges since the last call.
    pub fn take_rises(&self) -> u32 {
        self.rises.swap(0, Ordering::SeqCst)
    }
}

impl IrqLine for TestIrq {
    fn set_level(&self, level: bool) {
        if level && !self.level.swap(true, Ordering::SeqCst) {
            self.rises.fetch_add(1, Ordering::SeqCst);
        }
        if !level {
            self.level.store(false, Ordering::SeqCst);
        }
    }
}
