//! The emulator on a mock vCPU, with hand-assembled instructions (assembly in the
//! comment beside the bytes, Intel syntax).

use std::vec::Vec;

use super::*;
use crate::testutil::MockVcpu;
use crate::vcpu::{gpr, Mtd};

const RAM: usize = 0x10_0000;
const CODE: u64 = 0x8000;
const MMIO: u64 = 0xfee0_0000;

/// Records accesses; reads return consecutive bytes from `fill`.
#[derive(Default)]
struct TestIo {
    log: Vec<(Space, u64, Vec<u8>, bool)>,
    fill: u64,
    action: Option<Action>,
}

impl Io for TestIo {
    fn read(&mut self, space: Space, addr: u64, data: &mut [u8]) {
        data.copy_from_slice(&self.fill.to_le_bytes()[..data.len()]);
        self.log.push((space, addr, data.to_vec(), false));
    }
    fn write(&mut self, space: Space, addr: u64, data: &[u8]) -> Option<Action> {
        self.log.push((space, addr, data.to_vec(), true));
        self.action
    }
}

impl TestIo {
    fn writes(&self) -> Vec<(u64, Vec<u8>)> {
        self.log
            .iter()
            .filter(|l| l.3)
            .map(|l| (l.1, l.2.clone()))
            .collect()
    }
}

/// A 64-bit vCPU: identity map of the low 4 GiB with 1-GiB pages, code at `CODE`.
fn long_mode() -> MockVcpu {
    let mut v = MockVcpu::new(RAM);
    v.put_u64(0x1000, 0x2000 | 3);
    for i in 0..4 {
        v.put_u64(0x2000 + 8 * i, (i << 30) | 0x83);
    }
    let r = &mut v.regs;
    r.cr0 = bits::CR0_PE | bits::CR0_PG | bits::CR0_WP;
    r.cr3 = 0x1000;
    r.cr4 = bits::CR4_PAE;
    r.efer = bits::EFER_LME | bits::EFER_LMA;
    r.cs.ar = bits::AR_L | 0x9b;
    r.rip = CODE;
    r.rflags = 2;
    v
}

/// A 32-bit flat protected-mode vCPU without paging.
fn protected_mode() -> MockVcpu {
    let mut v = MockVcpu::new(RAM);
    v.regs.cr0 = bits::CR0_PE;
    v.regs.cs.ar = bits::AR_DB | 0x9b;
    v.regs.rip = CODE;
    v
}

fn run(v: &mut MockVcpu, io: &mut TestIo, code: &[u8]) -> Result<Outcome, EmulError> {
    let rip = v.regs.rip;
    v.put(rip, code);
    emulate(v, io, None)
}

#[test]
fn mov_store_and_load_register_forms() {
    let mut v = long_mode();
    let mut io = TestIo {
        fill: 0x1122_3344_5566_7788,
        ..Default::default()
    };
    v.regs.gpr[gpr::RAX] = MMIO + 0xb0;
    v.regs.gpr[gpr::RCX] = 0xdead_beef_0000_1234;
    // mov dword [rax], ecx
    let o = run(&mut v, &mut io, &[0x89, 0x08]).unwrap();
    assert_eq!(
        o,
        Outcome {
            len: 2,
            done: true,
            action: None
        }
    );
    assert_eq!(io.writes(), [(MMIO + 0xb0, std::vec![0x34, 0x12, 0, 0])]);
    assert_eq!(v.regs.rip, CODE + 2);
    assert!(v.regs.mtd.contains(Mtd::RIP_LEN));
    assert_eq!(v.regs.inst_len, 2);

    // mov eax, [rbx+0x20]: a 32-bit load zero-extends.
    v.regs.gpr[gpr::RBX] = MMIO;
    v.regs.gpr[gpr::RAX] = u64::MAX;
    run(&mut v, &mut io, &[0x8b, 0x43, 0x20]).unwrap();
    assert_eq!(v.regs.gpr[gpr::RAX], 0x5566_7788);
    assert_eq!(io.log.last().unwrap().1, MMIO + 0x20);
    assert!(v.regs.mtd.contains(Mtd::GPR_ACDB));

    // mov ax, [rbx] and mov ah, [rbx]: narrow loads merge.
    v.regs.gpr[gpr::RAX] = 0xffff_ffff_ffff_ffff;
    run(&mut v, &mut io, &[0x66, 0x8b, 0x03]).unwrap();
    assert_eq!(v.regs.gpr[gpr::RAX], 0xffff_ffff_ffff_7788);
    run(&mut v, &mut io, &[0x8a, 0x23]).unwrap();
    assert_eq!(v.regs.gpr[gpr::RAX], 0xffff_ffff_ffff_8888);

    // mov [r8], r9d
    v.regs.gpr[gpr::R8] = MMIO + 0x300;
    v.regs.gpr[gpr::R9] = 0x1_0000_0005;
    run(&mut v, &mut io, &[0x45, 0x89, 0x08]).unwrap();
    assert_eq!(
        io.writes().last().unwrap(),
        &(MMIO + 0x300, std::vec![5, 0, 0, 0])
    );

    // mov rsi, [r12+r13*8-8]
    v.regs.gpr[gpr::R12] = MMIO + 0x100;
    v.regs.gpr[gpr::R13] = 2;
    run(&mut v, &mut io, &[0x4b, 0x8b, 0x74, 0xec, 0xf8]).unwrap();
    assert_eq!(io.log.last().unwrap().1, MMIO + 0x108);
    assert_eq!(v.regs.gpr[gpr::RSI], 0x1122_3344_5566_7788);
    assert!(v.regs.mtd.contains(Mtd::GPR_BSD));
}

#[test]
fn mov_immediate_rip_relative_and_moffs() {
    let mut v = long_mode();
    let mut io = TestIo {
        fill: 0xa5a5_a5a5_a5a5_a5a5,
        ..Default::default()
    };
    v.regs.gpr[gpr::RDI] = MMIO + 4;
    // mov byte [rdi], 0x5a
    run(&mut v, &mut io, &[0xc6, 0x07, 0x5a]).unwrap();
    // mov qword [rip+0x100], -1 (imm32 sign-extended); RIP-relative to the next
    // instruction. Code at CODE+3 is RAM: the store goes to RAM, not to the Io.
    let at = v.regs.rip;
    run(
        &mut v,
        &mut io,
        &[
            0x48, 0xc7, 0x05, 0x00, 0x01, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff,
        ],
    )
    .unwrap();
    let ram = (at + 11 + 0x100) as usize;
    assert_eq!(&v.mem[ram..ram + 8], &[0xff; 8]);
    // mov eax, [0xfec00010] (moffs64)
    run(&mut v, &mut io, &[0xa1, 0x10, 0x00, 0xc0, 0xfe, 0, 0, 0, 0]).unwrap();
    assert_eq!(v.regs.gpr[gpr::RAX], 0xa5a5_a5a5);
    // mov [0xfec00000], al (moffs64)
    run(&mut v, &mut io, &[0xa2, 0x00, 0x00, 0xc0, 0xfe, 0, 0, 0, 0]).unwrap();
    // mov word [rdi], 0x1234
    run(&mut v, &mut io, &[0x66, 0xc7, 0x07, 0x34, 0x12]).unwrap();
    assert_eq!(
        io.writes(),
        [
            (MMIO + 4, std::vec![0x5a]),
            (0xfec0_0000, std::vec![0xa5]),
            (MMIO + 4, std::vec![0x34, 0x12]),
        ]
    );
    assert_eq!(io.log[1].1, 0xfec0_0010);
    assert_eq!(v.regs.rip, at + 11 + 9 + 9 + 5);
}

#[test]
fn movzx_movsx_movsxd() {
    let mut v = long_mode();
    let mut io = TestIo {
        fill: 0x8081_8283_8485_8687,
        ..Default::default()
    };
    v.regs.gpr[gpr::RAX] = MMIO;
    v.regs.gpr[gpr::RCX] = u64::MAX;
    // movzx ecx, word [rax]
    run(&mut v, &mut io, &[0x0f, 0xb7, 0x08]).unwrap();
    assert_eq!(v.regs.gpr[gpr::RCX], 0x8687);
    // movsx rcx, byte [rax]
    run(&mut v, &mut io, &[0x48, 0x0f, 0xbe, 0x08]).unwrap();
    assert_eq!(v.regs.gpr[gpr::RCX], 0xffff_ffff_ffff_ff87);
    // movsxd rdx, dword [rax]
    run(&mut v, &mut io, &[0x48, 0x63, 0x10]).unwrap();
    assert_eq!(v.regs.gpr[gpr::RDX], 0xffff_ffff_8485_8687);
    // movsx cx, byte [rax]: 16-bit destination merges.
    v.regs.gpr[gpr::RCX] = 0x1111_1111_1111_1111;
    run(&mut v, &mut io, &[0x66, 0x0f, 0xbe, 0x08]).unwrap();
    assert_eq!(v.regs.gpr[gpr::RCX], 0x1111_1111_1111_ff87);
}

#[test]
fn read_modify_write_arithmetic_sets_flags() {
    let mut v = long_mode();
    let mut io = TestIo {
        fill: 0x0000_00ff,
        ..Default::default()
    };
    v.regs.gpr[gpr::RAX] = MMIO + 0x10;
    // or dword [rax], 0x100
    run(&mut v, &mut io, &[0x81, 0x08, 0x00, 0x01, 0x00, 0x00]).unwrap();
    assert_eq!(io.writes().last().unwrap().1, [0xff, 0x01, 0, 0]);
    assert_eq!(v.regs.rflags & bits::ARITH, bits::PF);
    assert!(v.regs.mtd.contains(Mtd::RFLAGS));
    // and dword [rax], 0xfffffffe (imm8 sign-extended)
    run(&mut v, &mut io, &[0x83, 0x20, 0xfe]).unwrap();
    assert_eq!(io.writes().last().unwrap().1, [0xfe, 0, 0, 0]);
    // add [rax], ecx: 0xff + 0xffffff01 = 0 with carry.
    v.regs.gpr[gpr::RCX] = 0xffff_ff01;
    run(&mut v, &mut io, &[0x01, 0x08]).unwrap();
    assert_eq!(io.writes().last().unwrap().1, [0, 0, 0, 0]);
    assert_eq!(
        v.regs.rflags & bits::ARITH,
        bits::CF | bits::ZF | bits::PF | bits::AF
    );
    // sub ecx, [rax]: register destination, memory unchanged.
    let writes = io.writes().len();
    run(&mut v, &mut io, &[0x2b, 0x08]).unwrap();
    assert_eq!(v.regs.gpr[gpr::RCX], 0xffff_fe02);
    assert_eq!(io.writes().len(), writes);
    // cmp dword [rax], 5: flags only (0xff - 5 = 0xfa, even parity).
    run(&mut v, &mut io, &[0x83, 0x38, 0x05]).unwrap();
    assert_eq!(v.regs.rflags & bits::ARITH, bits::PF);
    assert_eq!(io.writes().len(), writes);
    // test byte [rax], 0x80
    run(&mut v, &mut io, &[0xf6, 0x00, 0x80]).unwrap();
    assert_eq!(v.regs.rflags & bits::ARITH, bits::SF);
    // xor [rax], cl
    v.regs.gpr[gpr::RCX] = 0x0f;
    run(&mut v, &mut io, &[0x30, 0x08]).unwrap();
    assert_eq!(io.writes().last().unwrap().1, [0xf0]);
    // adc byte [rax], 0 with CF set: 0xff + 0 + 1.
    v.regs.rflags |= bits::CF;
    run(&mut v, &mut io, &[0x80, 0x10, 0x00]).unwrap();
    assert_eq!(io.writes().last().unwrap().1, [0]);
    assert_ne!(v.regs.rflags & bits::CF, 0);
    assert_ne!(v.regs.rflags & 2, 0, "reserved bit 1 kept");
}

#[test]
fn xchg_and_bit_tests() {
    let mut v = long_mode();
    let mut io = TestIo {
        fill: 0x0000_0009,
        ..Default::default()
    };
    v.regs.gpr[gpr::RAX] = MMIO + 0x40;
    v.regs.gpr[gpr::RCX] = 0x77;
    // xchg [rax], ecx
    run(&mut v, &mut io, &[0x87, 0x08]).unwrap();
    assert_eq!(v.regs.gpr[gpr::RCX], 9);
    assert_eq!(
        io.writes().last().unwrap(),
        &(MMIO + 0x40, std::vec![0x77, 0, 0, 0])
    );
    // bt dword [rax], 3: CF = 1, no write.
    let writes = io.writes().len();
    run(&mut v, &mut io, &[0x0f, 0xba, 0x20, 0x03]).unwrap();
    assert_ne!(v.regs.rflags & bits::CF, 0);
    assert_eq!(io.writes().len(), writes);
    // bts dword [rax], 5
    run(&mut v, &mut io, &[0x0f, 0xba, 0x28, 0x05]).unwrap();
    assert_eq!(io.writes().last().unwrap().1, [0x29, 0, 0, 0]);
    assert_eq!(v.regs.rflags & bits::CF, 0);
    // btr dword [rax], 35 (immediate taken modulo 32): clears bit 3.
    run(&mut v, &mut io, &[0x0f, 0xba, 0x30, 0x23]).unwrap();
    assert_eq!(io.writes().last().unwrap().1, [0x01, 0, 0, 0]);
    // bt [rax], ecx with ecx = 33: the register offset selects the next dword.
    v.regs.gpr[gpr::RCX] = 33;
    run(&mut v, &mut io, &[0x0f, 0xa3, 0x08]).unwrap();
    assert_eq!(io.log.last().unwrap().1, MMIO + 0x44);
    assert_eq!(v.regs.rflags & bits::CF, 0);
    // bts [rax], ecx with ecx = -1: bit 31 of the dword below.
    v.regs.gpr[gpr::RCX] = 0xffff_ffff;
    run(&mut v, &mut io, &[0x0f, 0xab, 0x08]).unwrap();
    assert_eq!(
        io.writes().last().unwrap(),
        &(MMIO + 0x3c, std::vec![9, 0, 0, 0x80])
    );
}

#[test]
fn rep_movs_between_ram_and_mmio_honours_df() {
    let mut v = long_mode();
    let mut io = TestIo::default();
    v.put(0x9000, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    v.regs.gpr[gpr::RSI] = 0x9000;
    v.regs.gpr[gpr::RDI] = MMIO;
    v.regs.gpr[gpr::RCX] = 3;
    // rep movsd
    let o = run(&mut v, &mut io, &[0xf3, 0xa5]).unwrap();
    assert!(o.done);
    assert_eq!(
        io.writes(),
        [
            (MMIO, std::vec![1, 2, 3, 4]),
            (MMIO + 4, std::vec![5, 6, 7, 8]),
            (MMIO + 8, std::vec![9, 10, 11, 12]),
        ]
    );
    assert_eq!(v.regs.gpr[gpr::RCX], 0);
    assert_eq!(v.regs.gpr[gpr::RSI], 0x900c);
    assert_eq!(v.regs.gpr[gpr::RDI], MMIO + 12);

    // std; movsb from MMIO into RAM, backwards, without REP (RCX untouched).
    io.fill = 0x42;
    v.regs.rflags |= bits::DF;
    v.regs.gpr[gpr::RSI] = MMIO + 1;
    v.regs.gpr[gpr::RDI] = 0x9100;
    v.regs.gpr[gpr::RCX] = 7;
    run(&mut v, &mut io, &[0xa4]).unwrap();
    assert_eq!(v.mem[0x9100], 0x42);
    assert_eq!(v.regs.gpr[gpr::RSI], MMIO);
    assert_eq!(v.regs.gpr[gpr::RDI], 0x90ff);
    assert_eq!(v.regs.gpr[gpr::RCX], 7);

    // rep movsb with count 0 does nothing but advance RIP.
    v.regs.gpr[gpr::RCX] = 0;
    let before = io.log.len();
    let rip = v.regs.rip;
    run(&mut v, &mut io, &[0xf3, 0xa4]).unwrap();
    assert_eq!(io.log.len(), before);
    assert_eq!(v.regs.rip, rip + 2);
}

#[test]
fn rep_stos_lods_and_address_size() {
    let mut v = long_mode();
    let mut io = TestIo {
        fill: 0x1234_5678,
        ..Default::default()
    };
    v.regs.gpr[gpr::RAX] = 0xab;
    v.regs.gpr[gpr::RDI] = MMIO + 0x10;
    v.regs.gpr[gpr::RCX] = 2;
    // rep stosb
    run(&mut v, &mut io, &[0xf3, 0xaa]).unwrap();
    assert_eq!(
        io.writes(),
        [
            (MMIO + 0x10, std::vec![0xab]),
            (MMIO + 0x11, std::vec![0xab])
        ]
    );
    // lodsd
    v.regs.gpr[gpr::RSI] = MMIO + 0x20;
    run(&mut v, &mut io, &[0xad]).unwrap();
    assert_eq!(v.regs.gpr[gpr::RAX], 0x1234_5678);
    assert_eq!(v.regs.gpr[gpr::RSI], MMIO + 0x24);
    // rep stosq with a 32-bit address size (67h): EDI and ECX wrap at 32 bits.
    v.regs.gpr[gpr::RDI] = 0xffff_ffff_0000_9000;
    v.regs.gpr[gpr::RCX] = 0xffff_ffff_0000_0001;
    run(&mut v, &mut io, &[0x67, 0xf3, 0x48, 0xab]).unwrap();
    assert_eq!(&v.mem[0x9000..0x9008], &0x1234_5678u64.to_le_bytes());
    assert_eq!(v.regs.gpr[gpr::RDI], 0x9008);
    assert_eq!(v.regs.gpr[gpr::RCX], 0);
}

#[test]
fn rep_ins_and_outs() {
    let mut v = long_mode();
    let mut io = TestIo {
        fill: 0xbeef,
        ..Default::default()
    };
    v.regs.gpr[gpr::RDX] = 0x1f0;
    v.regs.gpr[gpr::RDI] = 0x9000;
    v.regs.gpr[gpr::RCX] = 3;
    // rep insw
    run(&mut v, &mut io, &[0x66, 0xf3, 0x6d]).unwrap();
    assert_eq!(
        &v.mem[0x9000..0x9006],
        &[0xef, 0xbe, 0xef, 0xbe, 0xef, 0xbe]
    );
    assert!(io.log.iter().all(|l| l.0 == Space::Port && l.1 == 0x1f0));
    assert_eq!(io.log.len(), 3);
    // rep outsb
    io.log.clear();
    v.put(0x9100, b"hi!");
    v.regs.gpr[gpr::RSI] = 0x9100;
    v.regs.gpr[gpr::RDX] = 0x3f8;
    v.regs.gpr[gpr::RCX] = 3;
    run(&mut v, &mut io, &[0xf3, 0x6e]).unwrap();
    let out: Vec<u8> = io.log.iter().map(|l| l.2[0]).collect();
    assert_eq!(out, b"hi!");
    assert!(io
        .log
        .iter()
        .all(|l| l.0 == Space::Port && l.1 == 0x3f8 && l.3));
    // outsd with a device asking for an action.
    io.action = Some(Action::PowerOff);
    v.regs.gpr[gpr::RDX] = 0x604;
    let o = run(&mut v, &mut io, &[0x6f]).unwrap();
    assert_eq!(o.action, Some(Action::PowerOff));
}

#[test]
fn long_rep_stops_and_resumes() {
    let mut v = long_mode();
    let mut io = TestIo::default();
    let n = MAX_REP + 10;
    v.regs.gpr[gpr::RDI] = MMIO;
    v.regs.gpr[gpr::RCX] = n;
    v.put(CODE, &[0xf3, 0xaa]); // rep stosb
    let o = emulate(&mut v, &mut io, None).unwrap();
    assert!(!o.done);
    assert_eq!(v.regs.rip, CODE, "RIP stays for the rest");
    assert_eq!(v.regs.gpr[gpr::RCX], 10);
    let o = emulate(&mut v, &mut io, None).unwrap();
    assert!(o.done);
    assert_eq!(v.regs.rip, CODE + 2);
    assert_eq!(io.log.len() as u64, n);
    assert_eq!(v.regs.gpr[gpr::RDI], MMIO + n);
}

#[test]
fn protected_and_real_mode_addressing() {
    let mut v = protected_mode();
    let mut io = TestIo::default();
    v.regs.ds.base = 0x1000_0000;
    v.regs.gpr[gpr::RAX] = 0xfee0_0000 - 0x1000_0000 + 0x80;
    v.regs.gpr[gpr::RCX] = 7;
    // mov [eax], ecx (32-bit code): DS base applies.
    run(&mut v, &mut io, &[0x89, 0x08]).unwrap();
    assert_eq!(io.writes(), [(MMIO + 0x80, std::vec![7, 0, 0, 0])]);
    // mov [eax], cx in 32-bit code needs 66h.
    run(&mut v, &mut io, &[0x66, 0x89, 0x08]).unwrap();
    assert_eq!(io.writes()[1].1.len(), 2);
    // mov ecx, [eax] at EIP 0xfffffffe, CS base 0x8002 (the fetch wraps to 0x8000):
    // the 32-bit load zero-extends and EIP wraps to 0.
    v.regs.cs.base = 0x8002;
    v.regs.rip = 0xffff_fffe;
    v.regs.ds.base = 0;
    v.regs.gpr[gpr::RAX] = MMIO;
    v.regs.gpr[gpr::RCX] = u64::MAX;
    v.put(0x8000, &[0x8b, 0x08]);
    emulate(&mut v, &mut io, None).unwrap();
    assert_eq!(v.regs.gpr[gpr::RCX], 0);
    assert_eq!(v.regs.rip, 0);

    // Real mode: mov [bx+si], al with DS = 0xf000 (base 0xf0000); 16-bit offsets wrap.
    let mut v = MockVcpu::new(RAM);
    v.regs.ds.base = 0xf_0000;
    v.regs.cs.base = 0x7000;
    v.regs.rip = 0x1000;
    v.regs.gpr[gpr::RBX] = 0xfff0;
    v.regs.gpr[gpr::RSI] = 0x0020;
    v.regs.gpr[gpr::RAX] = 0x99;
    v.put(0x8000, &[0x88, 0x00]);
    emulate(&mut v, &mut io, None).unwrap();
    assert_eq!(v.mem[0xf_0010], 0x99);
    assert_eq!(v.regs.rip, 0x1002);
    // 16-bit IP wraps at 64 KiB.
    v.regs.rip = 0xffff;
    v.put(0x7000 + 0xffff, &[0x90]);
    assert_eq!(
        emulate(&mut v, &mut io, None),
        Err(EmulError::Unsupported(Mnemonic::Nop))
    );
}

#[test]
fn gpa_hint_replaces_the_walk() {
    let mut v = long_mode();
    let mut io = TestIo::default();
    // Linear 0x4000_0123 maps (identity) to 0x4000_0123; the exit says 0xfeb0_0123.
    v.regs.gpr[gpr::RAX] = 0x4000_0120;
    v.regs.gpr[gpr::RCX] = 1;
    v.put(CODE, &[0x89, 0x48, 0x03]); // mov [rax+3], ecx
    emulate(&mut v, &mut io, Some(0xfeb0_0123)).unwrap();
    assert_eq!(io.writes()[0].0, 0xfeb0_0123);
    // Without the hint the page tables say where.
    v.regs.rip = CODE;
    emulate(&mut v, &mut io, None).unwrap();
    assert_eq!(io.writes()[1].0, 0x4000_0123);
}

#[test]
fn faults_and_refusals_are_errors_not_panics() {
    let mut v = long_mode();
    let mut io = TestIo::default();
    // Data access to an unmapped page: a page fault for the guest.
    v.put_u64(0x1008, 0); // PML4[1] not present
    v.regs.gpr[gpr::RAX] = 0x80_0000_0000;
    assert_eq!(
        run(&mut v, &mut io, &[0x89, 0x08]),
        Err(EmulError::Access(Fault::PageFault {
            addr: 0x80_0000_0000,
            error: 0b10
        }))
    );
    assert_eq!(v.regs.rip, CODE, "nothing retired");
    // push es: invalid in 64-bit mode.
    assert_eq!(run(&mut v, &mut io, &[0x06]), Err(EmulError::Invalid));
    // ud2: valid, not emulated.
    assert_eq!(
        run(&mut v, &mut io, &[0x0f, 0x0b]),
        Err(EmulError::Unsupported(Mnemonic::Ud2))
    );
    // movdqa xmm0, [rax]: a vector access to MMIO.
    assert_eq!(
        run(&mut v, &mut io, &[0x66, 0x0f, 0x6f, 0x00]),
        Err(EmulError::Unsupported(Mnemonic::Movdqa))
    );
    // vmovdqu ymm0, [rax] (VEX): decoded and named.
    assert_eq!(
        run(&mut v, &mut io, &[0xc5, 0xfe, 0x6f, 0x00]),
        Err(EmulError::Unsupported(Mnemonic::Vmovdqu))
    );
    // mov ds, [rax]: a segment register destination.
    assert_eq!(
        run(&mut v, &mut io, &[0x8e, 0x18]),
        Err(EmulError::Unsupported(Mnemonic::Mov))
    );
    // rep cmpsb: not emulated.
    assert_eq!(
        run(&mut v, &mut io, &[0xf3, 0xa6]),
        Err(EmulError::Unsupported(Mnemonic::Cmpsb))
    );
    assert!(io.log.is_empty());
    // The instruction straddles into a page that is not present: #PF on the fetch.
    // First GiB through a page directory at 0x3000 and a page table at 0x4000 mapping
    // the low 1 MiB 4 KiB by 4 KiB, but for the page at 0x20000.
    v.put_u64(0x2000, 0x3000 | 3);
    v.put_u64(0x3000, 0x4000 | 3);
    for i in (0..256).filter(|&i| i != 0x20) {
        v.put_u64(0x4000 + 8 * i, (i << 12) | 3);
    }
    v.regs.rip = 0x1_ffff;
    v.put(0x1_ffff, &[0x89]);
    assert_eq!(
        emulate(&mut v, &mut io, None),
        Err(EmulError::Fetch(Fault::PageFault {
            addr: 0x2_0000,
            error: 0
        }))
    );
    // A one-byte instruction at the end of the page still runs: hlt is not emulated.
    v.put(0x1_ffff, &[0xf4]);
    assert_eq!(
        emulate(&mut v, &mut io, None),
        Err(EmulError::Unsupported(Mnemonic::Hlt))
    );
    // An empty display for each error.
    assert!(std::format!("{}", EmulError::Invalid).contains("invalid"));
}

#[test]
fn instruction_lengths_for_the_svm_path() {
    let table: [(&[u8], u32, usize); 8] = [
        (&[0x0f, 0x01, 0xd9], 64, 3),                    // vmmcall
        (&[0xe4, 0x60], 64, 2),                          // in al, 0x60
        (&[0xee], 32, 1),                                // out dx, al
        (&[0x0f, 0x30], 64, 2),                          // wrmsr
        (&[0x0f, 0xa2], 16, 2),                          // cpuid
        (&[0xc7, 0x05, 1, 0, 0, 0, 2, 0, 0, 0], 64, 10), // mov dword [rip+1], 2
        (&[0x66, 0xc7, 0x00, 0x34, 0x12, 0, 0], 16, 7),  // mov dword [bx+si], 0x1234 (16-bit code)
        (&[0xf4], 64, 1),                                // hlt
    ];
    for (bytes, bits, len) in table {
        assert_eq!(instruction_length(bytes, bits), Ok(len), "{bytes:x?}");
    }
    assert_eq!(instruction_length(&[0x8b], 64), Err(EmulError::Truncated));
    assert_eq!(instruction_length(&[], 64), Err(EmulError::Truncated));
    // Fifteen prefixes and a NOP: sixteen bytes, longer than any instruction may be.
    let mut long = [0x66u8; 16];
    long[15] = 0x90;
    assert_eq!(instruction_length(&long, 64), Err(EmulError::Invalid));
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = crate::testutil::Rng::new(7);
    let mut io = TestIo::default();
    let mut v = long_mode();
    for i in 0..20_000 {
        if i % 100 == 0 {
            v = long_mode(); // random stores may have hit the page tables
        }
        let fresh = long_mode().regs;
        v.regs = fresh;
        for r in v.regs.gpr.iter_mut() {
            *r = if rng.chance(2) {
                rng.below(RAM as u64)
            } else {
                rng.next_u64()
            };
        }
        v.regs.gpr[gpr::RCX] = rng.below(100);
        v.regs.rflags = rng.next_u64() & 0xcd5;
        let mut code = [0u8; MAX_INSN_LEN];
        code.iter_mut().for_each(|b| *b = rng.byte());
        v.put(CODE, &code);
        if rng.chance(3) {
            v.regs.cs.ar = bits::AR_DB;
            v.regs.efer = 0;
            v.regs.cr0 = bits::CR0_PE;
        }
        let _ = emulate(&mut v, &mut io, rng.chance(2).then(|| rng.next_u64()));
        io.log.clear();
    }
}

#[test]
fn bus_io_uses_the_buses() {
    use crate::sync::SpinLock;
    use alloc::sync::Arc;
    let mmio = Bus::new();
    let mut pio = Bus::new();
    struct Reg(u8);
    impl crate::bus::BusDevice for Reg {
        fn read(&mut self, _: u64, _: u64, d: &mut [u8]) {
            d.fill(self.0);
        }
        fn write(&mut self, _: u64, _: u64, d: &[u8]) -> Option<Action> {
            self.0 = d[0];
            Some(Action::Reset)
        }
    }
    let dev: crate::bus::SharedDevice = Arc::new(SpinLock::new(Reg(3)));
    pio.insert(0xcf9, 1, dev).unwrap();
    let mut io = BusIo {
        mmio: &mmio,
        pio: &pio,
    };
    let mut b = [0u8; 2];
    io.read(Space::Mmio, 0x1000, &mut b);
    assert_eq!(b, [0xff, 0xff]);
    assert_eq!(io.write(Space::Port, 0xcf9, &[6]), Some(Action::Reset));
    io.read(Space::Port, 0xcf9, &mut b[..1]);
    assert_eq!(b[0], 6);
    assert_eq!(io.write(Space::Mmio, 0, &[6]), None);
}

/// The register table gives what the first, range-by-range, mapping gave, for every
/// iced register.
#[test]
fn gpr_table_matches_the_ranges() {
    fn reference(r: Register) -> Option<(usize, usize, u32)> {
        let n = r as usize;
        let al = Register::AL as usize;
        let ax = Register::AX as usize;
        let eax = Register::EAX as usize;
        let rax = Register::RAX as usize;
        Some(match n {
            _ if (al..al + 4).contains(&n) => (n - al, 1, 0),
            _ if (al + 4..al + 8).contains(&n) => (n - al - 4, 1, 8),
            _ if (al + 8..ax).contains(&n) => (n - al - 4, 1, 0),
            _ if (ax..eax).contains(&n) => (n - ax, 2, 0),
            _ if (eax..rax).contains(&n) => (n - eax, 4, 0),
            _ if (rax..rax + 16).contains(&n) => (n - rax, 8, 0),
            _ => return None,
        })
    }
    for r in Register::values() {
        assert_eq!(super::gpr(r), reference(r), "{r:?}");
    }
    assert_eq!(super::gpr(Register::AH), Some((0, 1, 8)));
    assert_eq!(super::gpr(Register::SIL), Some((gpr::RSI, 1, 0)));
    assert_eq!(super::gpr(Register::R13W), Some((gpr::R13, 2, 0)));
}

/// Random instruction bytes in every code size, looked up again and again, some bytes
/// changed between lookups: the cache answers what a fresh decode answers, every time.
#[test]
fn decode_cache_answers_what_the_decoder_answers() {
    let mut rng = crate::testutil::Rng::new(0xdec0de);
    let mut cache = DecodeCache::default();
    // A pool of RIPs (colliding in the cache's slots) and of instructions.
    let rips: Vec<u64> = (0..12).map(|_| rng.next_u64() & 0xffff_ffff).collect();
    let mut codes: Vec<[u8; MAX_INSN_LEN]> = (0..12)
        .map(|_| core::array::from_fn(|_| rng.byte()))
        .collect();
    let (mut hits, mut same) = (0, 0);
    for _ in 0..20_000 {
        let rip = rips[rng.below(12) as usize];
        let bits = [16, 32, 64][rng.below(3) as usize];
        let c = rng.below(12) as usize;
        if rng.chance(8) {
            codes[c][rng.below(MAX_INSN_LEN as u64) as usize] = rng.byte();
        }
        let n = if rng.chance(4) {
            rng.below(MAX_INSN_LEN as u64 + 1) as usize
        } else {
            MAX_INSN_LEN
        };
        let want = decode(&codes[c][..n], bits, rip);
        let got = cache.decode(&codes[c], n, bits, rip).copied();
        match (&want, &got) {
            (Ok(a), Ok(b)) => {
                assert!(a.eq_all_bits(b), "{a:?} vs {b:?} at {rip:#x}/{bits}");
                assert_eq!(a.len(), b.len());
                same += 1;
            }
            _ => assert_eq!(want.err(), got.err()),
        }
        // A second lookup of the same is a hit, and the same instruction.
        if let Ok(a) = got {
            let again = cache.decode(&codes[c], n, bits, rip).unwrap();
            assert!(a.eq_all_bits(again));
            hits += 1;
        }
    }
    assert!(same > 5_000 && hits > 5_000, "{same} decodes, {hits} hits");
}

/// The cached path emulates as the uncached one: an MMIO store through it twice, then
/// the instruction byte changed in RAM (`mov [rbx], eax` becomes `mov [rbx], al`).
#[test]
fn cached_emulation_sees_changed_code() {
    let mut v = MockVcpu::new(RAM);
    v.regs.cr0 = bits::CR0_PE;
    v.regs.cs.ar = bits::AR_DB;
    v.regs.rip = CODE;
    v.regs.gpr[gpr::RAX] = 0x1122_3344;
    v.regs.gpr[gpr::RBX] = MMIO;
    let mut cache = DecodeCache::default();
    let mut io = TestIo::default();
    v.put(CODE, &[0x89, 0x03]); // mov [rbx], eax
    for _ in 0..2 {
        v.regs.rip = CODE;
        let o = emulate_cached(&mut v, &mut io, Some(MMIO), &mut cache).unwrap();
        assert_eq!(o.len, 2);
    }
    v.put(CODE, &[0x88, 0x03]); // mov [rbx], al
    v.regs.rip = CODE;
    emulate_cached(&mut v, &mut io, Some(MMIO), &mut cache).unwrap();
    assert_eq!(
        io.writes(),
        [
            (MMIO, std::vec![0x44, 0x33, 0x22, 0x11]),
            (MMIO, std::vec![0x44, 0x33, 0x22, 0x11]),
            (MMIO, std::vec![0x44])
        ]
    );
}

#[test]
fn inc_dec_neg_not_on_mmio() {
    use crate::vcpu::bits::{AF, CF, OF, PF, SF, ZF};
    let mut v = long_mode();
    let mut io = TestIo {
        fill: 0x7fff_ffff,
        ..Default::default()
    };
    v.regs.gpr[gpr::RDX] = MMIO + 0x80;
    // inc dword [rdx]: 0x7fffffff + 1 overflows into the sign; CF is kept.
    v.regs.rflags = 2 | CF;
    run(&mut v, &mut io, &[0xff, 0x02]).unwrap();
    assert_eq!(
        io.writes().last().unwrap(),
        &(MMIO + 0x80, std::vec![0, 0, 0, 0x80])
    );
    assert_eq!(
        v.regs.rflags & (CF | OF | SF | ZF | AF | PF),
        CF | OF | SF | AF | PF
    );
    // dec byte [rdx]: 0xff - 1, CF still kept (now clear).
    v.regs.rflags = 2;
    io.fill = 0xff;
    run(&mut v, &mut io, &[0xfe, 0x0a]).unwrap();
    assert_eq!(io.writes().last().unwrap(), &(MMIO + 0x80, std::vec![0xfe]));
    assert_eq!(v.regs.rflags & (CF | SF | ZF), SF);
    // neg word [rdx]: CF set for a non-zero operand.
    io.fill = 1;
    run(&mut v, &mut io, &[0x66, 0xf7, 0x1a]).unwrap();
    assert_eq!(
        io.writes().last().unwrap(),
        &(MMIO + 0x80, std::vec![0xff, 0xff])
    );
    assert_eq!(v.regs.rflags & (CF | SF | ZF), CF | SF);
    // neg of 0: ZF, no CF.
    io.fill = 0;
    run(&mut v, &mut io, &[0xf7, 0x1a]).unwrap();
    assert_eq!(v.regs.rflags & (CF | ZF), ZF);
    // not qword [rdx]: flags untouched.
    let before = v.regs.rflags;
    io.fill = 0x00ff_00ff_00ff_00ff;
    run(&mut v, &mut io, &[0x48, 0xf7, 0x12]).unwrap();
    assert_eq!(
        io.writes().last().unwrap(),
        &(MMIO + 0x80, 0xff00_ff00_ff00_ff00u64.to_le_bytes().to_vec())
    );
    assert_eq!(v.regs.rflags, before);
}
