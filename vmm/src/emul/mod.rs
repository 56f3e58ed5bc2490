//! Instruction emulation for MMIO and string port I/O exits, on the `iced-x86` decoder.
//!
//! A guest access to an MMIO page (an EPT/NPT violation the VMM owns) or a string port
//! instruction (INS/OUTS, which VMX and SVM report only partially) exits to the VMM,
//! which calls [`emulate`]: it fetches the instruction at CS:RIP through the
//! [`Platform`], decodes it, performs its memory accesses — RAM through the platform,
//! everything no RAM backs through the [`Io`] callback (normally the MMIO [`Bus`]) —
//! updates the register file and RIP, and marks the changed groups in the MTD.
//!
//! Emulated: MOV (register, immediate and moffs forms), MOVZX/MOVSX/MOVSXD,
//! ADD/ADC/SUB/SBB/AND/OR/XOR/CMP/TEST and INC/DEC/NEG/NOT with RFLAGS, XCHG, CMPXCHG,
//! BT/BTS/BTR/BTC, and the string
//! instructions MOVS/STOS/LODS/INS/OUTS with REP, DF and 16/32/64-bit address size. A
//! REP instruction runs at most [`MAX_REP`] iterations per call and then returns with RIP
//! unchanged (as an interrupted REP does on hardware), so one call stays short.
//! Anything else is an [`EmulError`], never a panic: the VMM injects #UD or #PF, or
//! ends the VM.
//!
//! Not modelled: segment limits and access rights (bases are applied; a flat guest has
//! no limits to check), alignment checks, atomicity of LOCKed RAM accesses against
//! other vCPUs, and an access that is partly RAM and partly MMIO within one page.
//!
//! [`instruction_length`] alone serves the SVM path without NRIP save: the kernel
//! leaves the length of an intercepted instruction to the VMM.

mod alu;
#[cfg(test)]
mod tests;

use core::fmt;

use iced_x86::{
    Decoder, DecoderError, DecoderOptions, Instruction, MemorySize, Mnemonic, OpKind, Register,
};

use alloc::vec::Vec;

use crate::bus::{Action, Bus};
use crate::sync::SpinLock;
use crate::vcpu::{self, bits, Access, ArchState, Fault, Paging, Platform, PAGE_SIZE};

/// The longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;
/// Iterations of a REP string instruction per [`emulate`] call.
pub const MAX_REP: u64 = 1024;

/// The address space of an [`Io`] access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// Guest-physical memory no RAM backs.
    Mmio,
    /// The I/O port space.
    Port,
}

/// Where the emulator sends the accesses that are not RAM.
pub trait Io {
    /// Reads `data.len()` bytes (fill all of it; all-ones where nothing answers).
    fn read(&mut self, space: Space, addr: u64, data: &mut [u8]);
    /// Writes `data`; the device's [`Action`], if any.
    fn write(&mut self, space: Space, addr: u64, data: &[u8]) -> Option<Action>;
}

/// The VM's two buses as an [`Io`]: unmapped accesses behave as on a PC (reads see
/// all-ones, writes are dropped).
pub struct BusIo<'a> {
    /// The MMIO bus.
    pub mmio: &'a Bus,
    /// The port I/O bus.
    pub pio: &'a Bus,
}

impl Io for BusIo<'_> {
    fn read(&mut self, space: Space, addr: u64, data: &mut [u8]) {
        let bus = if space == Space::Mmio {
            self.mmio
        } else {
            self.pio
        };
        let _ = bus.read(addr, data);
    }

    fn write(&mut self, space: Space, addr: u64, data: &[u8]) -> Option<Action> {
        let bus = if space == Space::Mmio {
            self.mmio
        } else {
            self.pio
        };
        bus.write(addr, data).ok().flatten()
    }
}

/// Why an instruction was not emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulError {
    /// Fetching the instruction faulted (inject #PF for a page fault).
    Fetch(Fault),
    /// The bytes are not a valid instruction: inject #UD.
    Invalid,
    /// The bytes end inside an instruction.
    Truncated,
    /// A valid instruction the emulator does not handle (or not with these operands).
    Unsupported(Mnemonic),
    /// A data access faulted (inject #PF for a page fault); for a REP instruction the
    /// registers show the iterations done.
    Access(Fault),
}

impl fmt::Display for EmulError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmulError::Fetch(e) => write!(f, "instruction fetch failed: {e:?}"),
            EmulError::Invalid => write!(f, "invalid instruction"),
            EmulError::Truncated => write!(f, "instruction bytes end inside the instruction"),
            EmulError::Unsupported(m) => write!(f, "cannot emulate {m:?}"),
            EmulError::Access(e) => write!(f, "emulated access failed: {e:?}"),
        }
    }
}

/// What an emulated instruction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Instruction length in bytes.
    pub len: usize,
    /// Whether the instruction completed (RIP advanced); false for a REP instruction
    /// stopped after [`MAX_REP`] iterations, which the guest re-executes.
    pub done: bool,
    /// A VM-wide action a device asked for.
    pub action: Option<Action>,
}

/// The length of the instruction at the start of `bytes`, decoded as `bits`-bit code.
pub fn instruction_length(bytes: &[u8], bits: u32) -> Result<usize, EmulError> {
    decode(bytes, bits, 0).map(|i| i.len())
}

/// Reads up to [`MAX_INSN_LEN`] instruction bytes at CS:RIP; fewer where a later page
/// faults (the fault comes back with them), an error where the first byte does.
pub fn fetch<P: Platform + ?Sized>(
    p: &mut P,
) -> Result<([u8; MAX_INSN_LEN], usize, Option<Fault>), Fault> {
    let bits = vcpu::code_bits(p.regs());
    fetch_in(p, bits)
}

/// [`fetch`] for a vCPU running `bits`-bit code.
fn fetch_in<P: Platform + ?Sized>(
    p: &mut P,
    bits: u32,
) -> Result<([u8; MAX_INSN_LEN], usize, Option<Fault>), Fault> {
    let regs = p.regs();
    let lin = regs.cs.base.wrapping_add(mask_ip(regs.rip, bits));
    let access = Access::FETCH.at_cpl(regs);
    let regs = Paging::from(regs);
    let mut buf = [0u8; MAX_INSN_LEN];
    let first = ((PAGE_SIZE - (lin & (PAGE_SIZE - 1))) as usize).min(MAX_INSN_LEN);
    vcpu::read_virt(p, regs, lin, &mut buf[..first], access)?;
    if first == MAX_INSN_LEN {
        return Ok((buf, first, None));
    }
    match vcpu::read_virt(
        p,
        regs,
        lin.wrapping_add(first as u64),
        &mut buf[first..],
        access,
    ) {
        Ok(()) => Ok((buf, MAX_INSN_LEN, None)),
        Err(e) => Ok((buf, first, Some(e))),
    }
}

/// Emulates the instruction at CS:RIP. `gpa`, where the exit reports it, is the
/// guest-physical address of the faulting access: the emulator then uses it instead of
/// walking the guest's page tables for an instruction's one memory operand.
pub fn emulate<P: Platform + ?Sized>(
    p: &mut P,
    io: &mut dyn Io,
    gpa: Option<u64>,
) -> Result<Outcome, EmulError> {
    emulate_with(p, io, gpa, None)
}

/// [`emulate`] with the vCPU's [`DecodeCache`]: an instruction at the same RIP with the
/// same bytes in the same code size is not decoded again.
pub fn emulate_cached<P: Platform + ?Sized>(
    p: &mut P,
    io: &mut dyn Io,
    gpa: Option<u64>,
    cache: &mut DecodeCache,
) -> Result<Outcome, EmulError> {
    emulate_with(p, io, gpa, Some(cache))
}

fn emulate_with<P: Platform + ?Sized>(
    p: &mut P,
    io: &mut dyn Io,
    gpa: Option<u64>,
    cache: Option<&mut DecodeCache>,
) -> Result<Outcome, EmulError> {
    let bits = vcpu::code_bits(p.regs());
    let (bytes, n, fault) = fetch_in(p, bits).map_err(EmulError::Fetch)?;
    let rip = p.regs().rip;
    let decoded;
    let insn = match cache {
        Some(c) => c.decode(&bytes, n, bits, rip),
        None => {
            decoded = decode(&bytes[..n], bits, rip);
            decoded.as_ref().map_err(|&e| e)
        }
    };
    match insn {
        Ok(insn) => run(p, io, insn, bits, gpa),
        // The instruction runs into a page the guest cannot fetch: that fault is the
        // guest's.
        Err(EmulError::Truncated) => Err(fault.map_or(EmulError::Invalid, EmulError::Fetch)),
        Err(e) => Err(e),
    }
}

/// Emulates the instruction in `bytes` (fetched at CS:RIP) on the vCPU.
pub fn emulate_bytes<P: Platform + ?Sized>(
    p: &mut P,
    io: &mut dyn Io,
    bytes: &[u8],
    gpa: Option<u64>,
) -> Result<Outcome, EmulError> {
    let bits = vcpu::code_bits(p.regs());
    let insn = decode(bytes, bits, p.regs().rip)?;
    run(p, io, &insn, bits, gpa)
}

/// Executes the decoded `insn` (at CS:RIP, in `bits`-bit code).
fn run<P: Platform + ?Sized>(
    p: &mut P,
    io: &mut dyn Io,
    insn: &Instruction,
    bits: u32,
    gpa: Option<u64>,
) -> Result<Outcome, EmulError> {
    let mut cx = Cx {
        p,
        io,
        insn,
        bits,
        hint: gpa,
        action: None,
    };
    let done = cx.execute()?;
    let action = cx.action;
    let r = p.regs_mut();
    if done {
        r.set_rip(mask_ip(r.rip.wrapping_add(insn.len() as u64), bits));
        r.set_inst_len(insn.len() as u64);
        if r.intr_state & 3 != 0 {
            // Blocking by STI or MOV SS ends with the next instruction.
            r.set_intr_state(r.intr_state & !3);
        }
    }
    Ok(Outcome {
        len: insn.len(),
        done,
        action,
    })
}

/// A machine's decode caches, one per vCPU (each locked only by its vCPU's exits).
#[derive(Default)]
pub struct DecodeCaches(Vec<SpinLock<DecodeCache>>);

impl DecodeCaches {
    /// Caches for `vcpus` vCPUs.
    pub fn new(vcpus: u32) -> Self {
        Self(
            (0..vcpus)
                .map(|_| SpinLock::new(DecodeCache::default()))
                .collect(),
        )
    }

    /// [`emulate_cached`] with vCPU `vcpu`'s cache ([`emulate`] for a vCPU without).
    pub fn emulate<P: Platform + ?Sized>(
        &self,
        vcpu: u32,
        p: &mut P,
        io: &mut dyn Io,
        gpa: Option<u64>,
    ) -> Result<Outcome, EmulError> {
        match self.0.get(vcpu as usize) {
            Some(c) => emulate_cached(p, io, gpa, &mut c.lock()),
            None => emulate(p, io, gpa),
        }
    }
}

/// Entries of a [`DecodeCache`].
const DECODE_ENTRIES: usize = 8;

/// One vCPU's recently decoded instructions, by RIP. A guest touches MMIO from a few
/// instructions (a driver's register accessors), again and again; constructing iced's
/// decoder and decoding costs hundreds of instructions an exit, comparing the fetched
/// bytes with a kept decode a dozen. The key is everything the decode depends on: the
/// instruction's bytes (fetched afresh at every exit, so a changed or remapped
/// instruction is decoded again), the code size and RIP (RIP-relative operands).
#[derive(Clone, Default)]
pub struct DecodeCache {
    entries: [Decoded; DECODE_ENTRIES],
}

/// A decoded instruction and its key (`len` 0: empty).
#[derive(Clone, Copy, Default)]
struct Decoded {
    rip: u64,
    bits: u32,
    len: u32,
    /// The instruction's bytes, little-endian, zero past `len`.
    bytes: u128,
    /// Ones over the instruction's bytes.
    mask: u128,
    insn: Instruction,
}

impl DecodeCache {
    /// The instruction at the start of the `n` valid bytes of `bytes`, fetched at
    /// `rip` in `bits`-bit code: kept, or decoded (and kept).
    pub fn decode(
        &mut self,
        bytes: &[u8; MAX_INSN_LEN],
        n: usize,
        bits: u32,
        rip: u64,
    ) -> Result<&Instruction, EmulError> {
        let mut b = [0u8; 16];
        b[..MAX_INSN_LEN].copy_from_slice(bytes);
        let word = u128::from_le_bytes(b);
        let slot = &mut self.entries[(rip ^ rip >> 5) as usize % DECODE_ENTRIES];
        let hit = slot.len != 0
            && slot.rip == rip
            && slot.bits == bits
            && slot.len as usize <= n
            && word & slot.mask == slot.bytes;
        if !hit {
            let insn = decode(&bytes[..n.min(MAX_INSN_LEN)], bits, rip)?;
            let len = insn.len() as u32;
            let mask = (1u128 << (8 * len.min(15))) - 1;
            *slot = Decoded {
                rip,
                bits,
                len,
                mask,
                bytes: word & mask,
                insn,
            };
        }
        Ok(&slot.insn)
    }
}

fn decode(bytes: &[u8], bits: u32, rip: u64) -> Result<Instruction, EmulError> {
    let mut d = Decoder::with_ip(bits, bytes, rip, DecoderOptions::NONE);
    let insn = d.decode();
    match d.last_error() {
        DecoderError::None => Ok(insn),
        DecoderError::NoMoreBytes => Err(EmulError::Truncated),
        _ => Err(EmulError::Invalid),
    }
}

fn mask_ip(ip: u64, bits: u32) -> u64 {
    match bits {
        64 => ip,
        32 => ip & 0xffff_ffff,
        _ => ip & 0xffff,
    }
}

fn size_mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// Per iced [`Register`] from AL on (AL–R15L, AX–R15W, EAX–R15D, RAX–R15, in iced's
/// order): the [`ArchState::gpr`] index, the size in bytes and the bit position (8 for
/// AH–BH), packed as `index | size << 4 | shift << 8`, 0 where none. A table, since the
/// emulator asks for every operand of every exit.
const GPRS: [u16; 68] = {
    let mut t = [0u16; 68];
    let mut i = 0;
    while i < 16 {
        let byte = if i < 4 {
            (i, 0)
        } else if i < 8 {
            (i - 4, 8) // AH, CH, DH, BH
        } else {
            (i - 4, 0) // SPL.. R11L: AL + 8 is SPL (index 4)
        };
        t[i] = (byte.0 | 1 << 4 | byte.1 << 8) as u16;
        t[20 + i] = (i | 2 << 4) as u16;
        t[36 + i] = (i | 4 << 4) as u16;
        t[52 + i] = (i | 8 << 4) as u16;
        i += 1;
    }
    while i < 20 {
        t[i] = ((i - 4) | 1 << 4) as u16; // R12L..R15L
        i += 1;
    }
    t
};

// The layout [`GPRS`] assumes.
const _: () = {
    let al = Register::AL as usize;
    assert!(Register::R15L as usize == al + 19);
    assert!(Register::AX as usize == al + 20);
    assert!(Register::EAX as usize == al + 36);
    assert!(Register::RAX as usize == al + 52);
    assert!(Register::R15 as usize == al + 67);
};

/// A general-purpose register: its [`ArchState::gpr`] index, size in bytes and bit
/// position (8 for AH–BH).
fn gpr(r: Register) -> Option<(usize, usize, u32)> {
    let e = *GPRS.get((r as usize).wrapping_sub(Register::AL as usize))?;
    if e == 0 {
        return None;
    }
    Some((
        usize::from(e & 0xf),
        usize::from(e >> 4 & 0xf),
        u32::from(e >> 8),
    ))
}

fn get_reg(regs: &ArchState, r: Register) -> Option<u64> {
    let (i, size, shift) = gpr(r)?;
    Some((regs.gpr[i] >> shift) & size_mask(size))
}

/// Writes a register as the CPU does: 32-bit writes zero-extend, 8/16-bit ones merge.
fn set_reg(regs: &mut ArchState, r: Register, v: u64) -> Option<()> {
    let (i, size, shift) = gpr(r)?;
    let old = regs.gpr[i];
    regs.set_gpr(
        i,
        match size {
            8 => v,
            4 => v & 0xffff_ffff,
            _ => {
                let m = size_mask(size) << shift;
                (old & !m) | ((v << shift) & m)
            }
        },
    );
    Some(())
}

/// The base of segment register `seg` for an access by `bits`-bit code (0 for all but
/// FS and GS in 64-bit code).
fn seg_base(regs: &ArchState, seg: Register, bits: u32) -> Option<u64> {
    let s = match seg {
        Register::ES => &regs.es,
        Register::CS => &regs.cs,
        Register::SS => &regs.ss,
        Register::DS => &regs.ds,
        Register::FS => &regs.fs,
        Register::GS => &regs.gs,
        _ => return None,
    };
    let flat = bits == 64 && !matches!(seg, Register::FS | Register::GS);
    Some(if flat { 0 } else { s.base })
}

fn mem_size(m: MemorySize) -> Option<usize> {
    Some(match m {
        MemorySize::UInt8 | MemorySize::Int8 => 1,
        MemorySize::UInt16 | MemorySize::Int16 => 2,
        MemorySize::UInt32 | MemorySize::Int32 => 4,
        MemorySize::UInt64 | MemorySize::Int64 => 8,
        _ => return None,
    })
}

/// The emulation of one decoded instruction.
struct Cx<'a, P: Platform + ?Sized> {
    p: &'a mut P,
    io: &'a mut dyn Io,
    insn: &'a Instruction,
    /// The code size (16, 32 or 64) the instruction was decoded in.
    bits: u32,
    hint: Option<u64>,
    action: Option<Action>,
}

impl<P: Platform + ?Sized> Cx<'_, P> {
    fn unsupported(&self) -> EmulError {
        EmulError::Unsupported(self.insn.mnemonic())
    }

    fn regs(&self) -> &ArchState {
        self.p.regs()
    }

    /// Guest-physical address of `[lin, lin + len)` (which stays in one page), from the
    /// exit's address when `hinted`, else by walking the guest's page tables.
    fn phys(&mut self, lin: u64, write: bool, hinted: bool) -> Result<u64, EmulError> {
        if let (true, Some(gpa)) = (hinted, self.hint) {
            return Ok((gpa & !(PAGE_SIZE - 1)) | (lin & (PAGE_SIZE - 1)));
        }
        let regs = self.p.regs();
        let access = Access {
            write,
            ..Access::READ
        }
        .at_cpl(regs);
        let regs = Paging::from(regs);
        vcpu::translate(self.p, regs, lin, access).map_err(EmulError::Access)
    }

    /// Splits a linear access at page boundaries: (offset into the buffer, length).
    fn chunks(lin: u64, len: usize) -> [(usize, usize); 2] {
        let first = ((PAGE_SIZE - (lin & (PAGE_SIZE - 1))) as usize).min(len);
        [(0, first), (first, len - first)]
    }

    fn read_mem(&mut self, lin: u64, buf: &mut [u8], hinted: bool) -> Result<(), EmulError> {
        let hinted = hinted && Self::chunks(lin, buf.len())[1].1 == 0;
        let mut pas = [0u64; 2];
        for (k, (off, len)) in Self::chunks(lin, buf.len()).into_iter().enumerate() {
            if len > 0 {
                pas[k] = self.phys(lin.wrapping_add(off as u64), false, hinted)?;
            }
        }
        for (k, (off, len)) in Self::chunks(lin, buf.len()).into_iter().enumerate() {
            let part = &mut buf[off..off + len];
            if len > 0 && self.p.read(pas[k], part).is_err() {
                self.io.read(Space::Mmio, pas[k], part);
            }
        }
        Ok(())
    }

    fn write_mem(&mut self, lin: u64, buf: &[u8], hinted: bool) -> Result<(), EmulError> {
        let hinted = hinted && Self::chunks(lin, buf.len())[1].1 == 0;
        let mut pas = [0u64; 2];
        for (k, (off, len)) in Self::chunks(lin, buf.len()).into_iter().enumerate() {
            if len > 0 {
                pas[k] = self.phys(lin.wrapping_add(off as u64), true, hinted)?;
            }
        }
        for (k, (off, len)) in Self::chunks(lin, buf.len()).into_iter().enumerate() {
            let part = &buf[off..off + len];
            if len > 0 && self.p.write(pas[k], part).is_err() {
                if let Some(a) = self.io.write(Space::Mmio, pas[k], part) {
                    self.action = Some(a);
                }
            }
        }
        Ok(())
    }

    fn load(&mut self, lin: u64, size: usize, hinted: bool) -> Result<u64, EmulError> {
        let mut b = [0u8; 8];
        self.read_mem(lin, &mut b[..size], hinted)?;
        Ok(u64::from_le_bytes(b))
    }

    fn store(&mut self, lin: u64, size: usize, v: u64, hinted: bool) -> Result<(), EmulError> {
        self.write_mem(lin, &v.to_le_bytes()[..size], hinted)
    }

    /// The memory operand: its index, linear address and size.
    fn mem_operand(&self) -> Result<(u32, u64, usize), EmulError> {
        let insn = self.insn;
        let i = (0..insn.op_count())
            .find(|&i| insn.op_kind(i) == OpKind::Memory)
            .ok_or_else(|| self.unsupported())?;
        let size = mem_size(insn.memory_size()).ok_or_else(|| self.unsupported())?;
        let (regs, bits) = (self.regs(), self.bits);
        let lin = insn
            .virtual_address(i, 0, |r, _, _| {
                get_reg(regs, r).or_else(|| seg_base(regs, r, bits))
            })
            .ok_or_else(|| self.unsupported())?;
        let lin = if vcpu::long_mode(regs) {
            lin
        } else {
            lin & 0xffff_ffff
        };
        Ok((i, lin, size))
    }

    /// Operand `i` as a value of `size` bytes: a register or a (sign-extended) immediate.
    fn value(&self, i: u32, size: usize) -> Result<u64, EmulError> {
        let v = match self.insn.op_kind(i) {
            OpKind::Register => {
                get_reg(self.regs(), self.insn.op_register(i)).ok_or_else(|| self.unsupported())?
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => self.insn.immediate(i),
            _ => return Err(self.unsupported()),
        };
        Ok(v & size_mask(size))
    }

    /// The register operand `i`, checked to be a general-purpose register.
    fn reg_operand(&self, i: u32) -> Result<Register, EmulError> {
        let r = self.insn.op_register(i);
        match (self.insn.op_kind(i), gpr(r)) {
            (OpKind::Register, Some(_)) => Ok(r),
            _ => Err(self.unsupported()),
        }
    }

    fn set(&mut self, r: Register, v: u64) -> Result<(), EmulError> {
        set_reg(self.p.regs_mut(), r, v).ok_or_else(|| self.unsupported())
    }

    fn set_flags(&mut self, flags: u64, which: u64) {
        let r = self.p.regs_mut();
        r.set_rflags((r.rflags & !which) | (flags & which));
    }

    /// Runs the instruction; false if a REP instruction stopped early.
    fn execute(&mut self) -> Result<bool, EmulError> {
        use Mnemonic as M;
        let m = self.insn.mnemonic();
        let string = (0..self.insn.op_count()).any(|i| {
            matches!(
                self.insn.op_kind(i),
                OpKind::MemorySegSI
                    | OpKind::MemorySegESI
                    | OpKind::MemorySegRSI
                    | OpKind::MemoryESDI
                    | OpKind::MemoryESEDI
                    | OpKind::MemoryESRDI
            )
        });
        if string {
            return self.string();
        }
        match m {
            M::Mov => self.mov(),
            M::Movzx | M::Movsx | M::Movsxd => self.movx(m != M::Movzx),
            M::Add | M::Adc | M::Sub | M::Sbb | M::And | M::Or | M::Xor | M::Cmp | M::Test => {
                self.arith(m)
            }
            M::Xchg => self.xchg(),
            M::Inc | M::Dec | M::Neg | M::Not => self.unary(m),
            M::Bt | M::Bts | M::Btr | M::Btc => self.bit(m),
            M::Cmpxchg => self.cmpxchg(),
            _ => Err(self.unsupported()),
        }
        .map(|()| true)
    }

    fn mov(&mut self) -> Result<(), EmulError> {
        let (i, lin, size) = self.mem_operand()?;
        if i == 0 {
            let v = self.value(1, size)?;
            self.store(lin, size, v, true)
        } else {
            let r = self.reg_operand(0)?;
            let v = self.load(lin, size, true)?;
            self.set(r, v)
        }
    }

    fn movx(&mut self, signed: bool) -> Result<(), EmulError> {
        let (_, lin, size) = self.mem_operand()?;
        let r = self.reg_operand(0)?;
        let mut v = self.load(lin, size, true)?;
        if signed {
            let sh = 64 - 8 * size as u32;
            v = (((v << sh) as i64) >> sh) as u64;
        }
        self.set(r, v)
    }

    fn arith(&mut self, m: Mnemonic) -> Result<(), EmulError> {
        let (i, lin, size) = self.mem_operand()?;
        let mem = self.load(lin, size, true)?;
        let (a, b) = if i == 0 {
            (mem, self.value(1, size)?)
        } else {
            (self.value(0, size)?, mem)
        };
        let cf = self.regs().rflags & bits::CF != 0;
        let (r, flags) = alu::op(m, a, b, cf, size).ok_or_else(|| self.unsupported())?;
        self.set_flags(flags, bits::ARITH);
        if matches!(m, Mnemonic::Cmp | Mnemonic::Test) {
            Ok(())
        } else if i == 0 {
            self.store(lin, size, r, true)
        } else {
            let reg = self.reg_operand(0)?;
            self.set(reg, r)
        }
    }

    /// INC, DEC, NEG and NOT of a memory operand: INC and DEC set the arithmetic flags
    /// but CF (kept), NEG all of them (CF = the operand was not 0), NOT none.
    fn unary(&mut self, m: Mnemonic) -> Result<(), EmulError> {
        let (_, lin, size) = self.mem_operand()?;
        let v = self.load(lin, size, true)?;
        let (r, flags, which) = match m {
            Mnemonic::Inc => {
                let (r, f) =
                    alu::op(Mnemonic::Add, v, 1, false, size).ok_or_else(|| self.unsupported())?;
                (r, f, bits::ARITH & !bits::CF)
            }
            Mnemonic::Dec => {
                let (r, f) =
                    alu::op(Mnemonic::Sub, v, 1, false, size).ok_or_else(|| self.unsupported())?;
                (r, f, bits::ARITH & !bits::CF)
            }
            Mnemonic::Neg => {
                let (r, f) =
                    alu::op(Mnemonic::Sub, 0, v, false, size).ok_or_else(|| self.unsupported())?;
                (r, f, bits::ARITH)
            }
            _ => (!v & size_mask(size), 0, 0),
        };
        self.set_flags(flags, which);
        self.store(lin, size, r, true)
    }

    fn xchg(&mut self) -> Result<(), EmulError> {
        let (i, lin, size) = self.mem_operand()?;
        let reg = self.reg_operand(1 - i)?;
        let rv = self.value(1 - i, size)?;
        let mv = self.load(lin, size, true)?;
        self.store(lin, size, rv, true)?;
        self.set(reg, mv)
    }

    /// CMPXCHG with a memory destination: compares the accumulator with it (flags as
    /// CMP); equal: stores the source there, else loads it into the accumulator (and,
    /// unlike the locked hardware cycle, does not write the device back).
    fn cmpxchg(&mut self) -> Result<(), EmulError> {
        let (i, lin, size) = self.mem_operand()?;
        if i != 0 {
            return Err(self.unsupported());
        }
        let acc = match size {
            1 => Register::AL,
            2 => Register::AX,
            4 => Register::EAX,
            _ => Register::RAX,
        };
        let a = get_reg(self.regs(), acc).ok_or_else(|| self.unsupported())?;
        let src = self.value(1, size)?;
        let m = self.load(lin, size, true)?;
        let (_, flags) =
            alu::op(Mnemonic::Cmp, a, m, false, size).ok_or_else(|| self.unsupported())?;
        self.set_flags(flags, bits::ARITH);
        if a & size_mask(size) == m {
            self.store(lin, size, src, true)
        } else {
            self.set(acc, m)
        }
    }

    fn bit(&mut self, m: Mnemonic) -> Result<(), EmulError> {
        let (_, mut lin, size) = self.mem_operand()?;
        let nbits = 8 * size as i64;
        let bit = if self.insn.op_kind(1) == OpKind::Register {
            // A register offset may address any bit relative to the operand (signed).
            let sh = 64 - nbits as u32;
            let off = ((self.value(1, size)? << sh) as i64) >> sh;
            lin = lin.wrapping_add((off.div_euclid(nbits) * size as i64) as u64);
            off.rem_euclid(nbits) as u32
        } else {
            (self.value(1, 1)? % nbits as u64) as u32
        };
        let v = self.load(lin, size, true)?;
        let old = (v >> bit) & 1;
        self.set_flags(old, bits::CF);
        let new = match m {
            Mnemonic::Bts => v | (1 << bit),
            Mnemonic::Btr => v & !(1 << bit),
            Mnemonic::Btc => v ^ (1 << bit),
            _ => return Ok(()),
        };
        self.store(lin, size, new, true)
    }

    /// MOVS, STOS, LODS, INS, OUTS, with or without REP.
    fn string(&mut self) -> Result<bool, EmulError> {
        use Mnemonic as M;
        let insn = self.insn;
        let m = insn.mnemonic();
        let (si, di, cx, addr_size) =
            match (0..insn.op_count()).map(|i| insn.op_kind(i)).find(|k| {
                matches!(
                    k,
                    OpKind::MemorySegSI
                        | OpKind::MemoryESDI
                        | OpKind::MemorySegESI
                        | OpKind::MemoryESEDI
                        | OpKind::MemorySegRSI
                        | OpKind::MemoryESRDI
                )
            }) {
                Some(OpKind::MemorySegSI | OpKind::MemoryESDI) => {
                    (Register::SI, Register::DI, Register::CX, 2)
                }
                Some(OpKind::MemorySegESI | OpKind::MemoryESEDI) => {
                    (Register::ESI, Register::EDI, Register::ECX, 4)
                }
                _ => (Register::RSI, Register::RDI, Register::RCX, 8),
            };
        let size = mem_size(insn.memory_size()).ok_or_else(|| self.unsupported())?;
        if !matches!(
            m,
            M::Movsb
                | M::Movsw
                | M::Movsd
                | M::Movsq
                | M::Stosb
                | M::Stosw
                | M::Stosd
                | M::Stosq
                | M::Lodsb
                | M::Lodsw
                | M::Lodsd
                | M::Lodsq
                | M::Insb
                | M::Insw
                | M::Insd
                | M::Outsb
                | M::Outsw
                | M::Outsd
        ) {
            return Err(self.unsupported());
        }
        let rep = insn.has_rep_prefix() || insn.has_repne_prefix();
        let count = if rep {
            get_reg(self.regs(), cx).unwrap_or(0)
        } else {
            1
        };
        let step = if self.regs().rflags & bits::DF != 0 {
            (size as u64).wrapping_neg()
        } else {
            size as u64
        };
        let amask = size_mask(addr_size);
        let acc = match size {
            1 => Register::AL,
            2 => Register::AX,
            4 => Register::EAX,
            _ => Register::RAX,
        };
        let port = get_reg(self.regs(), Register::DX).unwrap_or(0);
        let src_seg = insn.memory_segment();
        let iterations = count.min(MAX_REP);
        for _ in 0..iterations {
            let regs = self.regs();
            let rsi = get_reg(regs, si).unwrap_or(0);
            let rdi = get_reg(regs, di).unwrap_or(0);
            let src = seg_base(regs, src_seg, self.bits)
                .unwrap_or(0)
                .wrapping_add(rsi);
            let dst = seg_base(regs, Register::ES, self.bits)
                .unwrap_or(0)
                .wrapping_add(rdi);
            let (src, dst) = if vcpu::long_mode(regs) {
                (src, dst)
            } else {
                (src & 0xffff_ffff, dst & 0xffff_ffff)
            };
            let (adv_si, adv_di) = match m {
                M::Movsb | M::Movsw | M::Movsd | M::Movsq => {
                    let v = self.load(src, size, false)?;
                    self.store(dst, size, v, false)?;
                    (true, true)
                }
                M::Stosb | M::Stosw | M::Stosd | M::Stosq => {
                    let v = get_reg(self.regs(), acc).unwrap_or(0);
                    self.store(dst, size, v, false)?;
                    (false, true)
                }
                M::Lodsb | M::Lodsw | M::Lodsd | M::Lodsq => {
                    let v = self.load(src, size, false)?;
                    self.set(acc, v)?;
                    (true, false)
                }
                M::Insb | M::Insw | M::Insd => {
                    let mut b = [0u8; 8];
                    // Check the destination before the port read, which may have
                    // side effects.
                    self.phys(dst, true, false)?;
                    self.io.read(Space::Port, port, &mut b[..size]);
                    self.write_mem(dst, &b[..size], false)?;
                    (false, true)
                }
                M::Outsb | M::Outsw | M::Outsd => {
                    let v = self.load(src, size, false)?;
                    if let Some(a) = self.io.write(Space::Port, port, &v.to_le_bytes()[..size]) {
                        self.action = Some(a);
                    }
                    (true, false)
                }
                _ => return Err(self.unsupported()),
            };
            if adv_si {
                self.set(si, rsi.wrapping_add(step) & amask)?;
            }
            if adv_di {
                self.set(di, rdi.wrapping_add(step) & amask)?;
            }
            if rep {
                let c = get_reg(self.regs(), cx).unwrap_or(0);
                self.set(cx, c.wrapping_sub(1) & amask)?;
            }
        }
        Ok(count <= MAX_REP)
    }
}
