//! What a VMM reports when its guest shuts down (a triple fault): the vCPU's state
//! and what the guest's own tables say at that moment — the bytes at RIP, the top of
//! the stack, and the IDT gates a fault would have gone through (#DF, #GP, #PF). A
//! guest that triple faults has, by definition, lost its exception handling; the
//! report is what tells a broken page table (nothing translates) from a broken stack
//! or a clobbered register, where KVM would leave the user with `-d cpu_reset`.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::vcpu::{long_mode, read_virt, translate, Access, ArchState, Fault, GuestMemory, Mtd};

/// The state a triple fault's portal delivers for the report.
pub const SHUTDOWN_MTD: Mtd = Mtd::GPRS
    .union(Mtd::RIP_LEN)
    .union(Mtd::RFLAGS)
    .union(Mtd::STA)
    .union(Mtd::INJ)
    .union(Mtd::CS_SS)
    .union(Mtd::TR)
    .union(Mtd::GDTR)
    .union(Mtd::IDTR)
    .union(Mtd::CR)
    .union(Mtd::EFER)
    .union(Mtd::QUAL);

/// The IDT vectors whose gates the report decodes: #DF, #GP, #PF.
const GATES: [u8; 3] = [8, 13, 14];

/// Shutdowns a machine resumes at most ([`impossible_shutdown`]); past them a triple
/// fault ends the VM whatever it looks like.
pub const RESUME_LIMIT: u64 = 8;

/// Whether the shutdown of a guest in state `r` cannot have happened on the processor
/// the guest sees: the event in delivery is a #PF on an instruction fetch from a page not
/// present, and CR2 lies in the IDT (the #DF's own gate could not be read), yet the
/// guest's tables translate the instruction at RIP, and the #DF and #PF gates are present
/// and their targets translate. QEMU 7.2's software SVM at times loses every
/// translation right after a VM entry in just this way (README, "The system disk");
/// the instruction never ran, so the VMM drops the failed delivery and lets the guest
/// fetch it again. A genuine triple fault fails one of the checks (or fails again, and
/// [`RESUME_LIMIT`] ends it).
pub fn impossible_shutdown<M: GuestMemory + ?Sized>(mem: &mut M, r: &ArchState) -> bool {
    const VALID: u64 = 1 << 31;
    const HW_EXCEPTION: u64 = 3;
    let info = r.inj_info;
    let fetch_not_present = r.inj_error & 0x11 == 0x10;
    if info & VALID == 0 || info & 0xff != 14 || (info >> 8) & 7 != HW_EXCEPTION {
        return false;
    }
    let idt = r.idtr.base..=r.idtr.base.saturating_add(u64::from(r.idtr.limit));
    if !fetch_not_present || !idt.contains(&r.cr2) || !long_mode(r) {
        return false;
    }
    let rip = r.cs.base.wrapping_add(r.rip);
    if translate(mem, r, rip, Access::FETCH.at_cpl(r)).is_err() {
        return false;
    }
    [8, 14].into_iter().all(|v| {
        read_gate(mem, r, v)
            .is_ok_and(|g| g.present && translate(mem, r, g.target, Access::FETCH).is_ok())
    })
}

/// The report's lines for a guest in state `r` with memory `mem`. Nothing in it is
/// trusted: a table that does not translate or read is reported as such.
pub fn shutdown_report<M: GuestMemory + ?Sized>(mem: &mut M, r: &ArchState) -> Vec<String> {
    let g = &r.gpr;
    let mut out = Vec::new();
    out.push(format!(
        "rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
        r.rip, g[4], r.rflags, r.cr0, r.cr2, r.cr3, r.cr4, r.efer
    ));
    out.push(format!(
        "rax {:#x} rcx {:#x} rdx {:#x} rbx {:#x} rbp {:#x} rsi {:#x} rdi {:#x}",
        g[0], g[1], g[2], g[3], g[5], g[6], g[7]
    ));
    out.push(format!(
        "r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x} r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x}",
        g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]
    ));
    let seg =
        |s: &crate::vcpu::Segment| format!("{:#x}/{:#x}/{:#x}/{:#x}", s.sel, s.base, s.limit, s.ar);
    out.push(format!(
        "cs {} ss {} tr {} (sel/base/limit/ar) gdtr {:#x}+{:#x} idtr {:#x}+{:#x}",
        seg(&r.cs),
        seg(&r.ss),
        seg(&r.tr),
        r.gdtr.base,
        r.gdtr.limit,
        r.idtr.base,
        r.idtr.limit
    ));
    out.push(format!(
        "event in delivery {:#x} (error {:#x}), interruptibility {:#x}, activity {:#x}, qual {:#x} {:#x}",
        r.inj_info, r.inj_error, r.intr_state, r.actv_state, r.qual[0], r.qual[1]
    ));
    let code = r.cs.base.wrapping_add(r.rip);
    out.push(format!(
        "code at {:#x}: {}",
        code,
        bytes(mem, r, code, 16, Access::FETCH.at_cpl(r))
    ));
    let sp = r.ss.base.wrapping_add(g[4]);
    out.push(format!(
        "stack at {:#x}: {}",
        sp,
        bytes(mem, r, sp, 64, Access::READ.at_cpl(r))
    ));
    for v in GATES {
        let line = match read_gate(mem, r, v) {
            Ok(g) => format!(
                "target {:#x} sel {:#x} ist {} type {:#x} present {}",
                g.target, g.sel, g.ist, g.ty, g.present as u8
            ),
            Err(e) => e,
        };
        out.push(format!("idt[{v}]: {line}"));
    }
    out
}

/// An IDT gate, decoded.
struct Gate {
    target: u64,
    sel: u64,
    ist: u64,
    ty: u64,
    present: bool,
}

/// Gate `v` of the guest's IDT (16 bytes in long mode, 8 before), or why it cannot be
/// read.
fn read_gate<M: GuestMemory + ?Sized>(mem: &mut M, r: &ArchState, v: u8) -> Result<Gate, String> {
    let long = long_mode(r);
    let size: u64 = if long { 16 } else { 8 };
    let off = u64::from(v) * size;
    if off + size - 1 > u64::from(r.idtr.limit) {
        return Err("beyond the IDT's limit".into());
    }
    let mut b = [0u8; 16];
    let at = r.idtr.base.wrapping_add(off);
    read_virt(mem, r, at, &mut b[..size as usize], Access::READ).map_err(describe)?;
    let lo = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
    let mut target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
    if long {
        target |= u64::from(u32::from_le_bytes(b[8..12].try_into().unwrap_or_default())) << 32;
    }
    Ok(Gate {
        target,
        sel: (lo >> 16) & 0xffff,
        ist: (lo >> 32) & 7,
        ty: (lo >> 40) & 0xf,
        present: (lo >> 47) & 1 != 0,
    })
}

/// `len` bytes at linear address `at` as hex, or why they cannot be read.
fn bytes<M: GuestMemory + ?Sized>(
    mem: &mut M,
    r: &ArchState,
    at: u64,
    len: usize,
    access: Access,
) -> String {
    let mut b = [0u8; 64];
    let b = &mut b[..len.min(64)];
    match read_virt(mem, r, at, b, access) {
        Ok(()) => b.iter().map(|x| format!("{x:02x}")).collect(),
        Err(e) => describe(e),
    }
}

/// Why a read through the guest's tables failed, for the report.
fn describe(e: Fault) -> String {
    match e {
        Fault::PageFault { addr, error } => {
            format!("#PF at {addr:#x} (error {error:#x}) in the guest's tables")
        }
        Fault::Unbacked(u) => format!("guest-physical {:#x} is not RAM", u.gpa),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{long_mode, lost_translations, MockVcpu};

    #[test]
    fn the_report_decodes_code_stack_and_gates() {
        let mut v = MockVcpu::new(0x20_0000);
        long_mode(&mut v);
        v.put(0x10_0000, &[0x0f, 0x0b, 0x90]);
        v.put_u64(0x8_0000, 0xdead_beef);
        // IDT at 0x9000, gate 14 -> 0xffff_ffff_8100_1234 through selector 0x10, IST 0.
        let lo: u64 = 0x1234 | (0x10 << 16) | (0x8e << 40) | (0x8100 << 48);
        v.put_u64(0x9000 + 14 * 16, lo);
        v.put_u32(0x9000 + 14 * 16 + 8, 0xffff_ffff);
        v.regs.rip = 0x10_0000;
        v.regs.gpr[4] = 0x8_0000;
        v.regs.idtr.base = 0x9000;
        v.regs.idtr.limit = 0xfff;
        let regs = v.regs;
        let lines = shutdown_report(&mut v, &regs);
        let all = lines.join("\n");
        assert!(all.contains("code at 0x100000: 0f0b90"), "{all}");
        assert!(all.contains("stack at 0x80000: efbeadde00000000"), "{all}");
        assert!(
            all.contains("idt[14]: target 0xffffffff81001234 sel 0x10 ist 0 type 0xe present 1"),
            "{all}"
        );
        assert!(all.contains("idt[8]: target 0x0"), "{all}");
    }

    #[test]
    fn a_shutdown_with_every_table_intact_is_impossible() {
        let mut v = MockVcpu::new(0x20_0000);
        lost_translations(&mut v);
        let r = v.regs;
        assert!(impossible_shutdown(&mut v, &r));
    }

    #[test]
    fn a_genuine_triple_fault_is_not_resumed() {
        let base = {
            let mut v = MockVcpu::new(0x20_0000);
            lost_translations(&mut v);
            v
        };
        type Change = fn(&mut MockVcpu);
        let changes: [(&str, Change); 7] = [
            ("the #DF gate not present", |v| {
                v.put_u64(0x9000 + 8 * 16, 0)
            }),
            ("the #PF gate's target unmapped", |v| {
                v.put_u32(0x9000 + 14 * 16 + 8, 0x1234)
            }),
            ("RIP unmapped", |v| v.regs.rip = 0x40_0000),
            ("CR2 outside the IDT", |v| v.regs.cr2 = 0x40_0000),
            ("a data access", |v| v.regs.inj_error = 0x2),
            ("no event in delivery", |v| v.regs.inj_info = 0),
            ("an empty IDT", |v| v.regs.idtr.limit = 0),
        ];
        for (what, change) in changes {
            let mut v = MockVcpu::new(0);
            v.mem = base.mem.clone();
            v.regs = base.regs;
            change(&mut v);
            let r = v.regs;
            assert!(!impossible_shutdown(&mut v, &r), "{what}");
        }
    }

    #[test]
    fn what_does_not_translate_is_said_not_read() {
        let mut v = MockVcpu::new(0x20_0000);
        long_mode(&mut v);
        v.regs.rip = 0xffff_ffff_8100_0000;
        v.regs.gpr[4] = 0x30_0000;
        v.regs.idtr.base = 0x9000;
        v.regs.idtr.limit = 0x8f;
        let regs = v.regs;
        let lines = shutdown_report(&mut v, &regs);
        let all = lines.join("\n");
        assert!(
            all.contains("code at 0xffffffff81000000: #PF at 0xffffffff81000000"),
            "{all}"
        );
        assert!(all.contains("stack at 0x300000: #PF"), "{all}");
        assert!(all.contains("idt[8]: target"), "{all}");
        assert!(all.contains("idt[13]: beyond the IDT's limit"), "{all}");
        assert!(all.contains("idt[14]: beyond the IDT's limit"), "{all}");
    }
}
