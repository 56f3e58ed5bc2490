//! The register file between the VMM library ([`ArchState`], Peregrine's UTCB layout)
//! and KVM (`kvm_regs`, `kvm_sregs`), the CPUID table a machine answers, and what a
//! handled exit asks the binding to write back.

use kvm_bindings::{kvm_cpuid_entry2, kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use peregrine_abi::utcb::{inj, Segment};
use peregrine_vmm::vcpu::{gpr, ArchState, Event, Mtd};

/// A segment register in KVM's form. The library's access rights are SVM's compressed
/// form (type 0–3, S 4, DPL 5–6, P 7, AVL 8, L 9, D/B 10, G 11); a segment without P is
/// unusable.
pub fn segment_to_kvm(s: &Segment) -> kvm_segment {
    let ar = s.ar;
    let bit = |n: u16| ((ar >> n) & 1) as u8;
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.sel,
        type_: (ar & 0xf) as u8,
        present: bit(7),
        dpl: ((ar >> 5) & 3) as u8,
        db: bit(10),
        s: bit(4),
        l: bit(9),
        g: bit(11),
        avl: bit(8),
        unusable: u8::from(ar & 0x80 == 0),
        padding: 0,
    }
}

/// A segment register from KVM's form (see [`segment_to_kvm`]).
pub fn segment_from_kvm(k: &kvm_segment) -> Segment {
    let ar = u16::from(k.type_ & 0xf)
        | u16::from(k.s & 1) << 4
        | u16::from(k.dpl & 3) << 5
        | u16::from(k.present & 1 & !k.unusable) << 7
        | u16::from(k.avl & 1) << 8
        | u16::from(k.l & 1) << 9
        | u16::from(k.db & 1) << 10
        | u16::from(k.g & 1) << 11;
    Segment {
        sel: k.selector,
        ar,
        limit: k.limit,
        base: k.base,
    }
}

fn table_to_kvm(s: &Segment) -> kvm_dtable {
    kvm_dtable {
        base: s.base,
        limit: s.limit as u16,
        padding: [0; 3],
    }
}

/// The library's general-purpose registers, RIP and RFLAGS in KVM's form.
pub fn regs_to_kvm(r: &ArchState) -> kvm_regs {
    let g = &r.gpr;
    kvm_regs {
        rax: g[gpr::RAX],
        rbx: g[gpr::RBX],
        rcx: g[gpr::RCX],
        rdx: g[gpr::RDX],
        rsi: g[gpr::RSI],
        rdi: g[gpr::RDI],
        rsp: g[gpr::RSP],
        rbp: g[gpr::RBP],
        r8: g[gpr::R8],
        r9: g[gpr::R9],
        r10: g[gpr::R10],
        r11: g[gpr::R11],
        r12: g[gpr::R12],
        r13: g[gpr::R13],
        r14: g[gpr::R14],
        r15: g[gpr::R15],
        rip: r.rip,
        rflags: r.rflags,
    }
}

/// KVM's general-purpose registers, RIP and RFLAGS into `r`.
pub fn regs_from_kvm(k: &kvm_regs, r: &mut ArchState) {
    let g = &mut r.gpr;
    (g[gpr::RAX], g[gpr::RBX], g[gpr::RCX], g[gpr::RDX]) = (k.rax, k.rbx, k.rcx, k.rdx);
    (g[gpr::RSI], g[gpr::RDI], g[gpr::RSP], g[gpr::RBP]) = (k.rsi, k.rdi, k.rsp, k.rbp);
    (g[gpr::R8], g[gpr::R9], g[gpr::R10], g[gpr::R11]) = (k.r8, k.r9, k.r10, k.r11);
    (g[gpr::R12], g[gpr::R13], g[gpr::R14], g[gpr::R15]) = (k.r12, k.r13, k.r14, k.r15);
    (r.rip, r.rflags) = (k.rip, k.rflags);
}

/// The groups of `r.mtd` that live in `kvm_sregs` into `s`: segments, descriptor
/// tables, control registers and EFER.
pub fn sregs_to_kvm(r: &ArchState, s: &mut kvm_sregs) {
    let m = r.mtd;
    if m.contains(Mtd::CS_SS) {
        (s.cs, s.ss) = (segment_to_kvm(&r.cs), segment_to_kvm(&r.ss));
    }
    if m.contains(Mtd::DS_ES) {
        (s.ds, s.es) = (segment_to_kvm(&r.ds), segment_to_kvm(&r.es));
    }
    if m.contains(Mtd::FS_GS) {
        (s.fs, s.gs) = (segment_to_kvm(&r.fs), segment_to_kvm(&r.gs));
    }
    if m.contains(Mtd::TR) {
        s.tr = segment_to_kvm(&r.tr);
    }
    if m.contains(Mtd::LDTR) {
        s.ldt = segment_to_kvm(&r.ldtr);
    }
    if m.contains(Mtd::GDTR) {
        s.gdt = table_to_kvm(&r.gdtr);
    }
    if m.contains(Mtd::IDTR) {
        s.idt = table_to_kvm(&r.idtr);
    }
    if m.contains(Mtd::CR) {
        (s.cr0, s.cr2, s.cr3, s.cr4, s.cr8) = (r.cr0, r.cr2, r.cr3, r.cr4, r.cr8);
    }
    if m.contains(Mtd::EFER) {
        s.efer = r.efer;
    }
}

/// Everything of `kvm_sregs` into `r` (the inverse of [`sregs_to_kvm`] with every group).
pub fn sregs_from_kvm(s: &kvm_sregs, r: &mut ArchState) {
    (r.cs, r.ss) = (segment_from_kvm(&s.cs), segment_from_kvm(&s.ss));
    (r.ds, r.es) = (segment_from_kvm(&s.ds), segment_from_kvm(&s.es));
    (r.fs, r.gs) = (segment_from_kvm(&s.fs), segment_from_kvm(&s.gs));
    r.tr = segment_from_kvm(&s.tr);
    r.ldtr = segment_from_kvm(&s.ldt);
    for (t, k) in [(&mut r.gdtr, &s.gdt), (&mut r.idtr, &s.idt)] {
        *t = Segment {
            sel: 0,
            ar: 0,
            limit: k.limit.into(),
            base: k.base,
        };
    }
    (r.cr0, r.cr2, r.cr3, r.cr4, r.cr8) = (s.cr0, s.cr2, s.cr3, s.cr4, s.cr8);
    r.efer = s.efer;
}

/// The MTD groups that live in `kvm_regs`.
pub const REGS_GROUPS: Mtd = Mtd::GPRS.union(Mtd::RIP_LEN).union(Mtd::RFLAGS);
/// The MTD groups that live in `kvm_sregs`.
pub const SREGS_GROUPS: Mtd = Mtd::CS_SS
    .union(Mtd::DS_ES)
    .union(Mtd::FS_GS)
    .union(Mtd::TR)
    .union(Mtd::LDTR)
    .union(Mtd::GDTR)
    .union(Mtd::IDTR)
    .union(Mtd::CR)
    .union(Mtd::EFER);

/// What a handled exit asks the binding to write back into KVM, read off the MTD the
/// handler recorded: the same record `nul/vmm` replies to Peregrine with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteBack {
    /// `KVM_SET_REGS` (general-purpose registers, RIP, RFLAGS).
    pub regs: bool,
    /// `KVM_SET_SREGS` (segments, descriptor tables, control registers, EFER).
    pub sregs: bool,
    /// An event to inject.
    pub event: Option<Event>,
    /// Exit as soon as the guest can take an external interrupt
    /// (`request_interrupt_window`).
    pub window: bool,
    /// XCR0 (`KVM_SET_XCRS`).
    pub xcr0: Option<u64>,
    /// IA32_PAT (`KVM_SET_MSRS`).
    pub pat: Option<u64>,
}

impl WriteBack {
    /// What `r`'s MTD names. `completed`: KVM finished the exit's instruction itself
    /// (HLT, RDMSR, WRMSR reach user space with RIP past them), so the handler's
    /// instruction skip is not written back.
    pub fn of(r: &ArchState, completed: bool) -> WriteBack {
        let mut regs_groups = REGS_GROUPS;
        if completed {
            regs_groups.remove(Mtd::RIP_LEN);
        }
        WriteBack {
            regs: r.mtd.intersects(regs_groups),
            sregs: r.mtd.intersects(SREGS_GROUPS),
            event: r.mtd.contains(Mtd::INJ).then(|| decode_event(r)).flatten(),
            window: r.mtd.contains(Mtd::INJ) && r.inj_info & inj::REQ_INTR_WINDOW != 0,
            xcr0: r.mtd.contains(Mtd::XSAVE).then_some(r.xcr0),
            pat: r.mtd.contains(Mtd::PAT).then_some(r.pat),
        }
    }
}

/// The event in `r.inj_info` (VMX entry-interruption format), if one is valid.
pub fn decode_event(r: &ArchState) -> Option<Event> {
    let info = r.inj_info;
    if info & (1 << 31) == 0 {
        return None;
    }
    let vector = info as u8;
    Some(match (info >> 8) & 7 {
        0 => Event::Interrupt(vector),
        2 => Event::Nmi,
        _ => Event::Exception {
            vector,
            error: (info & (1 << 11) != 0).then_some(r.inj_error as u32),
        },
    })
}

/// The CPUID table of a vCPU: for every leaf (and subleaf) KVM supports, what
/// `answer(leaf, subleaf)` (the machine's CPUID handler) returns. KVM answers CPUID
/// in the kernel from this table; the machine decides what it says.
pub fn cpuid_table(
    supported: &[kvm_cpuid_entry2],
    mut answer: impl FnMut(u32, u32) -> [u32; 4],
) -> Vec<kvm_cpuid_entry2> {
    supported
        .iter()
        .map(|e| {
            let [eax, ebx, ecx, edx] = answer(e.function, e.index);
            kvm_cpuid_entry2 {
                eax,
                ebx,
                ecx,
                edx,
                ..*e
            }
        })
        .collect()
}

/// The CPUID leaves that name the hypervisor. On KVM they stay KVM's: KVM's kernel
/// answers VMCALL (and its paravirtual MSRs) whatever the machine would, so a guest must
/// see whose interface it talks to.
pub const HYPERVISOR_LEAVES: core::ops::RangeInclusive<u32> = 0x4000_0000..=0x4fff_ffff;

/// `leaf.subleaf` looked up in KVM's supported table (zeros for a leaf it lacks; the
/// subleaf counts only for leaves KVM marks as indexed): the "host" CPUID a machine
/// builds its answers on.
pub fn lookup(table: &[kvm_cpuid_entry2], leaf: u32, sub: u32) -> [u32; 4] {
    const SIGNIFICANT_INDEX: u32 = 1;
    table
        .iter()
        .find(|e| e.function == leaf && (e.flags & SIGNIFICANT_INDEX == 0 || e.index == sub))
        .map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx])
}

#[cfg(test)]
mod tests {
    use super::*;
    use peregrine_vmm::boot::{self, BootInfo};

    fn entry() -> ArchState {
        let mut r = ArchState::default();
        boot::entry_state(
            &mut r,
            &BootInfo {
                entry: 0x10_0000,
                zero_page: 0x7000,
                cr3: boot::PML4_ADDR,
                initrd: None,
            },
        );
        r
    }

    #[test]
    fn the_entry_state_survives_the_round_trip() {
        let r = entry();
        let mut s = kvm_sregs::default();
        sregs_to_kvm(&r, &mut s);
        let k = regs_to_kvm(&r);
        assert_eq!((k.rip, k.rsi, k.rflags), (0x10_0000, 0x7000, 2));
        assert_eq!((s.cs.l, s.cs.db, s.cs.type_, s.cs.present), (1, 0, 0xb, 1));
        assert_eq!((s.ds.db, s.ds.g, s.ds.unusable), (1, 1, 0));
        assert_eq!(s.ldt.unusable, 1, "LDTR without P is unusable");
        assert_eq!(s.tr.type_, 0xb, "a busy 64-bit TSS");
        let mut back = ArchState::default();
        regs_from_kvm(&k, &mut back);
        sregs_from_kvm(&s, &mut back);
        assert_eq!(back.gpr, r.gpr);
        assert_eq!((back.rip, back.rflags), (r.rip, r.rflags));
        for (a, b) in [
            (back.cs, r.cs),
            (back.ds, r.ds),
            (back.ss, r.ss),
            (back.tr, r.tr),
            (back.ldtr, r.ldtr),
        ] {
            assert_eq!(
                (a.sel, a.ar, a.limit, a.base),
                (b.sel, b.ar, b.limit, b.base)
            );
        }
        assert_eq!(
            (back.gdtr.base, back.gdtr.limit),
            (r.gdtr.base, r.gdtr.limit)
        );
        assert_eq!(
            (back.cr0, back.cr3, back.cr4, back.efer),
            (r.cr0, r.cr3, r.cr4, r.efer)
        );
    }

    #[test]
    fn only_recorded_groups_are_written() {
        let mut r = entry();
        let mut s = kvm_sregs::default();
        r.mtd = Mtd::CR;
        sregs_to_kvm(&r, &mut s);
        assert_eq!(s.cr3, boot::PML4_ADDR);
        assert_eq!(s.cs.selector, 0, "segments were not named");
        r.mtd = Mtd::RIP_LEN;
        assert_eq!(
            WriteBack::of(&r, false),
            WriteBack {
                regs: true,
                sregs: false,
                event: None,
                window: false,
                xcr0: None,
                pat: None,
            }
        );
        assert!(!WriteBack::of(&r, true).regs, "KVM already moved RIP");
        r.mtd = Mtd::GPR_ACDB | Mtd::RIP_LEN;
        assert!(
            WriteBack::of(&r, true).regs,
            "a result register still is written"
        );
        r.mtd = Mtd::XSAVE | Mtd::PAT;
        (r.xcr0, r.pat) = (7, 0x0007_0406_0007_0406);
        let w = WriteBack::of(&r, false);
        assert_eq!((w.xcr0, w.pat), (Some(7), Some(0x0007_0406_0007_0406)));
        assert!(!w.regs && !w.sregs);
    }

    #[test]
    fn injected_events_decode() {
        let mut r = ArchState::default();
        for e in [
            Event::Interrupt(0x30),
            Event::Nmi,
            Event::Exception {
                vector: 13,
                error: Some(0),
            },
            Event::Exception {
                vector: 6,
                error: None,
            },
        ] {
            (r.inj_info, r.inj_error) = e.encode();
            r.mtd = Mtd::INJ;
            assert_eq!(WriteBack::of(&r, true).event, Some(e));
        }
        r.inj_info = 0x30;
        assert_eq!(decode_event(&r), None, "not valid");
        r.inj_info = inj::REQ_INTR_WINDOW;
        let w = WriteBack::of(&r, true);
        assert!(w.window && w.event.is_none());
    }

    #[test]
    fn the_table_holds_the_machines_answers() {
        let e = |function, index, flags| kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax: function,
            ebx: index,
            ..Default::default()
        };
        let supported = [e(0, 0, 0), e(7, 0, 1), e(7, 1, 1), e(0x4000_0000, 0, 0)];
        assert_eq!(lookup(&supported, 7, 1), [7, 1, 0, 0]);
        assert_eq!(lookup(&supported, 0, 5), [0, 0, 0, 0], "index ignored");
        assert_eq!(lookup(&supported, 0x8000_0000, 0), [0; 4], "absent");
        let t = cpuid_table(&supported, |leaf, sub| match leaf {
            0x4000_0000 => [0; 4],
            _ => [leaf + 1, sub, 3, 4],
        });
        assert_eq!(t.len(), 4);
        assert_eq!((t[2].function, t[2].index, t[2].flags), (7, 1, 1));
        assert_eq!((t[2].eax, t[2].ebx, t[2].ecx, t[2].edx), (8, 1, 3, 4));
        assert_eq!(t[3].eax, 0, "the machine hides KVM's signature");
    }
}
