//! kvmclock against the formulas Linux and KVM use.

use super::*;
use crate::testutil::MockVcpu;
use std::vec::Vec;

/// Linux's `pvclock_scale_delta`, transcribed (64-bit: `mul_u64_u32_shr`).
fn linux_scale_delta(mut delta: u64, mul_frac: u32, shift: i32) -> u64 {
    if shift < 0 {
        delta >>= -shift;
    } else {
        delta <<= shift;
    }
    ((delta as u128 * mul_frac as u128) >> 32) as u64
}

/// Linux's `__pvclock_read_cycles`.
fn linux_read(src: &TimeInfo, tsc: u64) -> u64 {
    src.system_time
        + linux_scale_delta(
            tsc - src.tsc_timestamp,
            src.tsc_to_system_mul,
            src.tsc_shift as i32,
        )
}

const FREQS: [u64; 9] = [
    1_000_000,
    3_579_545,
    100_000_000,
    999_999_999,
    1_000_000_000,
    2_100_000_000,
    2_994_374_000,
    4_294_967_296,
    5_000_000_000,
];

#[test]
fn scale_of_one_ghz_is_identity() {
    assert_eq!(time_scale(NS_PER_SEC, NS_PER_SEC), (1 << 31, 1));
    assert_eq!(scale_delta(12345, 1 << 31, 1), 12345);
}

#[test]
fn one_second_of_ticks_is_one_second() {
    for hz in FREQS {
        let (mul, shift) = time_scale(NS_PER_SEC, hz);
        for secs in [1u64, 10, 3600] {
            let ns = linux_scale_delta(hz * secs, mul, shift.into());
            let want = NS_PER_SEC * secs;
            // The 32-bit fraction is within a part in 2^30 (plus one ns of rounding).
            let tolerance = want / (1 << 30) + 1;
            assert!(ns.abs_diff(want) <= tolerance, "{hz} Hz, {secs} s: {ns}");
            assert_eq!(scale_delta(hz * secs, mul, shift), ns);
        }
    }
}

#[test]
fn scale_delta_matches_linux_for_random_inputs() {
    let mut rng = crate::testutil::Rng::new(3);
    for _ in 0..10_000 {
        let delta = rng.next_u64() >> rng.below(40);
        let mul = rng.next_u64() as u32;
        let shift = rng.below(9) as i8 - 4;
        let d = if shift > 0 { delta >> 8 } else { delta };
        assert_eq!(
            scale_delta(d, mul, shift),
            linux_scale_delta(d, mul, shift.into())
        );
    }
}

#[test]
fn enabling_writes_a_consistent_structure() {
    let mut m = MockVcpu::new(0x10000);
    let hz = 2_994_374_000;
    let mut c = KvmClock::new(hz);
    let now = TimeSample {
        tsc: 1_000_000_000_000,
        ns: 5_000_000,
    };
    assert_eq!(
        c.wrmsr(&mut m, MSR_KVM_SYSTEM_TIME_NEW, 0x3000 | 1, now, 0),
        Ok(true)
    );
    assert_eq!(c.rdmsr(MSR_KVM_SYSTEM_TIME_NEW), Some(0x3001));
    assert_eq!(c.enabled_at(), Some(0x3000));
    let info = TimeInfo::from_bytes(m.mem[0x3000..0x3020].try_into().unwrap());
    assert_eq!(info.version % 2, 0, "even: consistent");
    assert_eq!(info.flags, PVCLOCK_TSC_STABLE_BIT);
    assert_eq!((info.tsc_to_system_mul, info.tsc_shift), c.scale());
    assert_eq!(linux_read(&info, now.tsc), now.ns);
    // One second of TSC later, the guest reads one second later.
    let later = linux_read(&info, now.tsc + hz);
    assert!(later.abs_diff(now.ns + NS_PER_SEC) <= 2, "{later}");
    assert_eq!(info.ns_at(now.tsc + hz), later);
    // An update moves the sample and bumps the version by two.
    let v0 = info.version;
    c.update(
        &mut m,
        TimeSample {
            tsc: now.tsc + hz,
            ns: now.ns + NS_PER_SEC,
        },
    )
    .unwrap();
    let info = TimeInfo::from_bytes(m.mem[0x3000..0x3020].try_into().unwrap());
    assert_eq!(info.version, v0 + 2);
    assert_eq!(info.system_time, now.ns + NS_PER_SEC);
}

/// Guest memory that records every write.
struct Spy {
    mem: MockVcpu,
    log: Vec<(u64, Vec<u8>)>,
}

impl GuestMemory for Spy {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), Unbacked> {
        self.mem.read(gpa, buf)
    }
    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Unbacked> {
        self.log.push((gpa, buf.to_vec()));
        self.mem.write(gpa, buf)
    }
}

#[test]
fn version_is_odd_while_the_fields_change() {
    let mut s = Spy {
        mem: MockVcpu::new(0x10000),
        log: Vec::new(),
    };
    let mut c = KvmClock::new(1_000_000_000);
    c.wrmsr(
        &mut s,
        MSR_KVM_SYSTEM_TIME_NEW,
        0x2001,
        TimeSample::default(),
        0,
    )
    .unwrap();
    let versions: Vec<u32> = s
        .log
        .iter()
        .filter(|(a, b)| *a == 0x2000 && b.len() == 4)
        .map(|(_, b)| u32::from_le_bytes(b[..].try_into().unwrap()))
        .collect();
    assert_eq!(versions, [1, 2]);
    assert_eq!(s.log.len(), 3);
    assert_eq!(s.log[1].0, 0x2004, "fields between the two version writes");
}

#[test]
fn disabled_and_bad_addresses() {
    let mut m = MockVcpu::new(0x10000);
    let mut c = KvmClock::new(1_000_000_000);
    let t = TimeSample::default();
    // Bit 0 clear: stored, nothing written.
    c.wrmsr(&mut m, MSR_KVM_SYSTEM_TIME_NEW, 0x3000, t, 0)
        .unwrap();
    assert!(m.mem[0x3000..0x3020].iter().all(|&b| b == 0));
    assert_eq!(c.enabled_at(), None);
    c.update(&mut m, t).unwrap();
    // Crossing a page, outside RAM: an error, the clock stays off.
    assert_eq!(
        c.wrmsr(&mut m, MSR_KVM_SYSTEM_TIME_NEW, 0x3ff1, t, 0),
        Err(KvmClockError::CrossesPage(0x3ff0))
    );
    assert_eq!(c.enabled_at(), None);
    assert!(matches!(
        c.wrmsr(&mut m, MSR_KVM_SYSTEM_TIME_NEW, 0x10_0001, t, 0),
        Err(KvmClockError::Unbacked(_))
    ));
    assert!(c
        .wrmsr(&mut m, MSR_KVM_SYSTEM_TIME_NEW, u64::MAX, t, 0)
        .is_err());
    // Not ours.
    assert_eq!(c.wrmsr(&mut m, 0x10, 0, t, 0), Ok(false));
    assert_eq!(c.rdmsr(0x10), None);
}

#[test]
fn wall_clock() {
    let mut m = MockVcpu::new(0x10000);
    let mut c = KvmClock::new(1_000_000_000);
    let boot = 1_700_000_000 * NS_PER_SEC + 123_456_789;
    c.wrmsr(
        &mut m,
        MSR_KVM_WALL_CLOCK_NEW,
        0x4000,
        TimeSample::default(),
        boot,
    )
    .unwrap();
    let w = &m.mem[0x4000..0x400c];
    let word = |o: usize| u32::from_le_bytes(w[o..o + 4].try_into().unwrap());
    assert_eq!((word(0), word(4), word(8)), (2, 1_700_000_000, 123_456_789));
    // Again: the version continues from what the guest memory holds.
    write_wall_clock(&mut m, 0x4000, boot).unwrap();
    assert_eq!(
        u32::from_le_bytes(m.mem[0x4000..0x4004].try_into().unwrap()),
        4
    );
    assert_eq!(c.rdmsr(MSR_KVM_WALL_CLOCK_NEW), Some(0x4000));
}
