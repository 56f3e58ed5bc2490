//! The instruction emulator on arbitrary bytes, in any mode, with all-ones MMIO and a
//! small RAM: it must return an error or an outcome, never panic or hang.
//!
//! Input: 20 bytes of set-up (mode, RFLAGS high byte, RCX, device byte and MMIO flag,
//! RSI, RDI), then the instruction bytes.

use peregrine_vmm::bus::Action;
use peregrine_vmm::emul::{self, Io, Space};
use peregrine_vmm::vcpu::{bits, gpr, ArchState, GuestMemory, Platform, Unbacked};

use crate::Ram;

struct Vcpu {
    mem: Ram,
    regs: ArchState,
}

impl GuestMemory for Vcpu {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), Unbacked> {
        self.mem.read(gpa, buf)
    }
    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Unbacked> {
        self.mem.write(gpa, buf)
    }
}

impl Platform for Vcpu {
    fn regs(&self) -> &ArchState {
        &self.regs
    }
    fn regs_mut(&mut self) -> &mut ArchState {
        &mut self.regs
    }
    fn now_ns(&self) -> u64 {
        0
    }
    fn set_timer(&mut self, _deadline_ns: Option<u64>) {}
}

struct Dev(u8);

impl Io for Dev {
    fn read(&mut self, _space: Space, _addr: u64, data: &mut [u8]) {
        data.fill(self.0);
    }
    fn write(&mut self, _space: Space, _addr: u64, _data: &[u8]) -> Option<Action> {
        None
    }
}

/// One input.
pub fn run(data: &[u8]) {
    if data.len() < 20 {
        return;
    }
    let (head, code) = data.split_at(20);
    let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap());
    let mut regs = ArchState::default();
    match head[0] % 3 {
        0 => {}
        1 => {
            regs.cr0 = bits::CR0_PE;
            regs.cs.ar = bits::AR_DB;
        }
        _ => {
            regs.cr0 = bits::CR0_PE;
            regs.efer = bits::EFER_LMA | bits::EFER_LME;
            regs.cs.ar = bits::AR_L;
        }
    }
    regs.rflags = (u64::from(head[1]) << 8) | 2;
    regs.gpr[gpr::RCX] = u64::from(head[2]);
    regs.gpr[gpr::RSI] = word(4) & 0xffff;
    regs.gpr[gpr::RDI] = word(12) & 0xffff;
    let mut vcpu = Vcpu {
        mem: Ram(vec![0; 0x1_0000]),
        regs,
    };
    let gpa = (head[3] & 1 != 0).then_some(0xfee0_0000);
    let _ = emul::emulate_bytes(&mut vcpu, &mut Dev(head[3]), code, gpa);
}
