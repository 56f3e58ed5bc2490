//! Typed hypercall arguments: one type per hypercall, packed into and unpacked from the
//! entry registers by the same code on both sides (the kernel decodes with
//! [`HcArgs::from_regs`], the runtime encodes with [`HcArgs::to_regs`]).
//!
//! A register image is [`Regs`]: `[rdi, rsi, rdx, rax, r8, r9]`, that is the hypercall
//! word followed by arguments 1–5 in the order of ABI.md's table. Decoding never panics;
//! it fails (with the status the kernel answers) only where a field is an enumeration
//! and the value names none of its members. Bits the ABI leaves unused are ignored on
//! decoding and zero on encoding.

use crate::hypercall::{
    call_flags, ec_ctrl_op, ec_flags, lookup_flags, pd_ctrl_op, pd_flags, qpd, qpd_split,
    revoke_flags, sm_flags, Hypercall, HypercallWord,
};
use crate::{Crd, Mtd, Status, XferFlags};

/// The entry registers of a hypercall: `[rdi, rsi, rdx, rax, r8, r9]` (the hypercall
/// word, then arguments 1–5).
pub type Regs = [u64; 6];

/// The arguments of one hypercall.
pub trait HcArgs: Sized {
    /// The hypercall these are the arguments of.
    const HC: Hypercall;
    /// The entry registers that pass these arguments.
    fn to_regs(&self) -> Regs;
    /// The arguments the entry registers `r` pass; `r[0]`'s number is not checked (the
    /// dispatcher has decided it). Fails only on an enumeration value the ABI does not
    /// define.
    fn from_regs(r: &Regs) -> Result<Self, Status>;
}

/// The hypercall word of `A` with `flags` and selector `sel`.
#[inline(always)]
const fn word(hc: Hypercall, flags: u8, sel: u64) -> u64 {
    HypercallWord::new(hc, flags, sel).0
}

/// `bit` (one of the four flag bits) as a flag value if `on`.
#[inline(always)]
const fn flag(on: bool, bit: u8) -> u8 {
    if on {
        bit
    } else {
        0
    }
}

/// Whether the hypercall word of `r` has flag `bit`.
#[inline(always)]
const fn has(r: &Regs, bit: u8) -> bool {
    HypercallWord(r[0]).flags() & bit != 0
}

/// The selector of the hypercall word of `r`.
#[inline(always)]
const fn sel(r: &Regs) -> u64 {
    HypercallWord(r[0]).sel()
}

/// `call`: portal `pt` (CALL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    /// The portal.
    pub pt: u64,
    /// Fail with `Timeout` instead of waiting for a busy handler.
    pub non_blocking: bool,
}

impl HcArgs for Call {
    const HC: Hypercall = Hypercall::Call;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        let f = flag(self.non_blocking, call_flags::NON_BLOCKING);
        [word(Self::HC, f, self.pt), 0, 0, 0, 0, 0]
    }
    #[inline(always)]
    fn from_regs(r: &Regs) -> Result<Self, Status> {
        Ok(Call {
            pt: sel(r),
            non_blocking: has(r, call_flags::NON_BLOCKING),
        })
    }
}

/// `reply`: no arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply;

impl HcArgs for Reply {
    const HC: Hypercall = Hypercall::Reply;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        [word(Self::HC, 0, 0), 0, 0, 0, 0, 0]
    }
    #[inline(always)]
    fn from_regs(_: &Regs) -> Result<Self, Status> {
        Ok(Reply)
    }
}

/// `create_pd`: a PD at `dst` with `quota` pages carved out of `parent`'s (PD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreatePd {
    /// Destination selector.
    pub dst: u64,
    /// The parent PD (PD permission).
    pub parent: u64,
    /// Kernel-memory quota in pages (the kernel refuses more than `u32::MAX`).
    pub quota: u64,
    /// A virtual machine (guest-physical memory space).
    pub vm: bool,
}

impl HcArgs for CreatePd {
    const HC: Hypercall = Hypercall::CreatePd;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        let f = flag(self.vm, pd_flags::VM);
        [
            word(Self::HC, f, self.dst),
            self.parent,
            self.quota,
            0,
            0,
            0,
        ]
    }
    #[inline(always)]
    fn from_regs(r: &Regs) -> Result<Self, Status> {
        Ok(CreatePd {
            dst: sel(r),
            parent: r[1],
            quota: r[2],
            vm: has(r, pd_flags::VM),
        })
    }
}

/// `create_ec`: an EC at `dst` in PD `pd` (EC) on `cpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateEc {
    /// Destination selector.
    pub dst: u64,
    /// The PD (EC permission).
    pub pd: u64,
    /// The CPU.
    pub cpu: u64,
    /// UTCB address (page-aligned; unused for a vCPU).
    pub utcb: u64,
    /// Initial stack pointer (unused for a vCPU).
    pub sp: u64,
    /// Event base selector.
    pub evt: u64,
    /// A global EC (own SC) rather than a local one (portal handler).
    pub global: bool,
    /// A virtual CPU.
    pub vcpu: bool,
}

impl HcArgs for CreateEc {
    const HC: Hypercall = Hypercall::CreateEc;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        let f = flag(self.global, ec_flags::GLOBAL) | flag(self.vcpu, ec_flags::VCPU);
        [
            word(Self::HC, f, self.dst),
            self.pd,
            self.cpu,
            self.utcb,
            self.sp,
            self.evt,
        ]
    }
    #[inline(always)]
    fn from_regs(r: &Regs) -> Result<Self, Status> {
        Ok(CreateEc {
            dst: sel(r),
            pd: r[1],
            cpu: r[2],
            utcb: r[3],
            sp: r[4],
            evt: r[5],
            global: has(r, ec_flags::GLOBAL),
            vcpu: has(r, ec_flags::VCPU),
        })
    }
}

/// `create_sc`: an SC at `dst` for global EC `ec` (BIND_SC), charged to `pd` (SC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateSc {
    /// Destination selector.
    pub dst: u64,
    /// The PD charged (SC permission).
    pub pd: u64,
    /// The global EC (BIND_SC permission).
    pub ec: u64,
    /// Priority, 1..=255 (larger is more urgent).
    pub prio: u8,
    /// Time quantum in microseconds (52 bits).
    pub quantum_us: u64,
}

impl HcArgs for CreateSc {
    const HC: Hypercall = Hypercall::CreateSc;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        let q = qpd(self.prio, self.quantum_us);
        [word(Self::HC, 0, self.dst), self.pd, self.ec, q, 0, 0]
    }
    #[inline(always)]
    fn from_regs(r: &Regs) -> Result<Self, Status> {
        let (prio, quantum_us) = qpd_split(r[3]);
        Ok(CreateSc {
            dst: sel(r),
            pd: r[1],
            ec: r[2],
            prio,
            quantum_us,
        })
    }
}

/// `create_pt`: a portal at `dst` to local EC `ec` (BIND_PT), charged to `pd` (PT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreatePt {
    /// Destination selector.
    pub dst: u64,
    /// The PD charged (PT permission).
    pub pd: u64,
    /// The local EC (BIND_PT permission).
    pub ec: u64,
    /// The state transferred on a call (undefined bits are dropped).
    pub mtd: Mtd,
    /// Entry instruction pointer.
    pub ip: u64,
}

impl HcArgs for CreatePt {
    const HC: Hypercall = Hypercall::CreatePt;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        let w = word(Self::HC, 0, self.dst);
        [w, self.pd, self.ec, self.mtd.bits(), self.ip, 0]
    }
    #[inline(always)]
    fn from_regs(r: &Regs) -> Result<Self, Status> {
        Ok(CreatePt {
            dst: sel(r),
            pd: r[1],
            ec: r[2],
            mtd: Mtd::from_bits_truncate(r[3]),
            ip: r[4],
        })
    }
}

/// `create_sm`: a semaphore at `dst` with an initial count, charged to `pd` (SM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateSm {
    /// Destination selector.
    pub dst: u64,
    /// The PD charged (SM permission).
    pub pd: u64,
    /// Initial count.
    pub count: u64,
}

impl HcArgs for CreateSm {
    const HC: Hypercall = Hypercall::CreateSm;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        [word(Self::HC, 0, self.dst), self.pd, self.count, 0, 0, 0]
    }
    #[inline(always)]
    fn from_regs(r: &Regs) -> Result<Self, Status> {
        Ok(CreateSm {
            dst: sel(r),
            pd: r[1],
            count: r[2],
        })
    }
}

/// `revoke`: `crd` from the caller's children (and the caller if `own`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoke {
    /// The range.
    pub crd: Crd,
    /// Also from the caller's own space.
    pub own: bool,
}

impl HcArgs for Revoke {
    const HC: Hypercall = Hypercall::Revoke;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        let f = flag(self.own, revoke_flags::SELF);
        [word(Self::HC, f, 0), self.crd.0, 0, 0, 0, 0]
    }
    #[inline(always)]
    fn from_regs(r: &Regs) -> Result<Self, Status> {
        Ok(Revoke {
            crd: Crd(r[1]),
            own: has(r, revoke_flags::SELF),
        })
    }
}

/// `lookup`: what covers the first item of `crd` (result 1: the CRD found), or with
/// `phys` the physical address of the first page of a memory CRD (the address a device
/// reaches it at by DMA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    /// The range whose first item is looked up.
    pub crd: Crd,
    /// Answer the physical address instead of the CRD
    /// ([`lookup_flags::PHYS`](crate::hypercall::lookup_flags::PHYS)).
    pub phys: bool,
}

impl HcArgs for Lookup {
    const HC: Hypercall = Hypercall::Lookup;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        let f = flag(self.phys, lookup_flags::PHYS);
        [word(Self::HC, f, 0), self.crd.0, 0, 0, 0, 0]
    }
    #[inline(always)]
    fn from_regs(r: &Regs) -> Result<Self, Status> {
        Ok(Lookup {
            crd: Crd(r[1]),
            phys: has(r, lookup_flags::PHYS),
        })
    }
}

/// Operations of `ec_ctrl` (argument 1).
#[repr(u64)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcCtrlOp {
    /// Force the EC through its RECALL event.
    Recall = ec_ctrl_op::RECALL,
}

/// `ec_ctrl`: operation `op` on EC `ec` (CTRL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EcCtrl {
    /// The EC.
    pub ec: u64,
    /// The operation.
    pub op: EcCtrlOp,
}

impl HcArgs for EcCtrl {
    const HC: Hypercall = Hypercall::EcCtrl;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        [word(Self::HC, 0, self.ec), self.op as u64, 0, 0, 0, 0]
    }
    /// Fails with `BadParameter` on an undefined operation.
    #[inline(always)]
    fn from_regs(r: &Regs) -> Result<Self, Status> {
        let op = match r[1] {
            ec_ctrl_op::RECALL => EcCtrlOp::Recall,
            _ => return Err(Status::BadParameter),
        };
        Ok(EcCtrl { ec: sel(r), op })
    }
}

/// `sc_ctrl`: the time SC `sc` (CTRL) has consumed (result 1, TSC ticks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScCtrl {
    /// The SC.
    pub sc: u64,
}

impl HcArgs for ScCtrl {
    const HC: Hypercall = Hypercall::ScCtrl;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        [word(Self::HC, 0, self.sc), 0, 0, 0, 0, 0]
    }
    #[inline(always)]
    fn from_regs(r: &Regs) -> Result<Self, Status> {
        Ok(ScCtrl { sc: sel(r) })
    }
}

/// `pt_ctrl`: set the identifier portal `pt` (CTRL) passes to its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtCtrl {
    /// The portal.
    pub pt: u64,
    /// The identifier.
    pub id: u64,
}

impl HcArgs for PtCtrl {
    const HC: Hypercall = Hypercall::PtCtrl;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        [word(Self::HC, 0, self.pt), self.id, 0, 0, 0, 0]
    }
    #[inline(always)]
    fn from_regs(r: &Regs) -> Result<Self, Status> {
        Ok(PtCtrl {
            pt: sel(r),
            id: r[1],
        })
    }
}

/// Operations of `sm_ctrl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmOp {
    /// Signal (UP permission).
    Up,
    /// Wait (DOWN permission).
    Down {
        /// Consume the whole count, not just one.
        zero: bool,
        /// Absolute TSC deadline; 0: none.
        deadline: u64,
    },
}

/// `sm_ctrl`: up or down on semaphore `sm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmCtrl {
    /// The semaphore.
    pub sm: u64,
    /// The operation.
    pub op: SmOp,
}

impl HcArgs for SmCtrl {
    const HC: Hypercall = Hypercall::SmCtrl;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        match self.op {
            SmOp::Up => [word(Self::HC, 0, self.sm), 0, 0, 0, 0, 0],
            SmOp::Down { zero, deadline } => {
                let f = sm_flags::DOWN | flag(zero, sm_flags::ZERO);
                [word(Self::HC, f, self.sm), deadline, 0, 0, 0, 0]
            }
        }
    }
    #[inline(always)]
    fn from_regs(r: &Regs) -> Result<Self, Status> {
        let op = if has(r, sm_flags::DOWN) {
            SmOp::Down {
                zero: has(r, sm_flags::ZERO),
                deadline: r[1],
            }
        } else {
            SmOp::Up
        };
        Ok(SmCtrl { sm: sel(r), op })
    }
}

/// `assign_pci`: not yet supported (the kernel answers `BadFeature`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignPci;

impl HcArgs for AssignPci {
    const HC: Hypercall = Hypercall::AssignPci;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        [word(Self::HC, 0, 0), 0, 0, 0, 0, 0]
    }
    #[inline(always)]
    fn from_regs(_: &Regs) -> Result<Self, Status> {
        Ok(AssignPci)
    }
}

/// `assign_gsi`: route the GSI behind semaphore `sm` (DOWN) to `cpu`. For a
/// message-signalled GSI (from [`Hip::msi_gsi_base`](crate::hip::Hip::msi_gsi_base) on)
/// result 1 is the MSI address and data the device must send
/// ([`msi_address`](crate::hypercall::msi_address), [`msi_data`](crate::hypercall::msi_data)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignGsi {
    /// The GSI semaphore.
    pub sm: u64,
    /// The CPU.
    pub cpu: u64,
    /// Trigger flags ([`gsi_flags`](crate::hypercall::gsi_flags)).
    pub flags: u64,
}

impl HcArgs for AssignGsi {
    const HC: Hypercall = Hypercall::AssignGsi;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        [word(Self::HC, 0, self.sm), self.cpu, self.flags, 0, 0, 0]
    }
    #[inline(always)]
    fn from_regs(r: &Regs) -> Result<Self, Status> {
        Ok(AssignGsi {
            sm: sel(r),
            cpu: r[1],
            flags: r[2],
        })
    }
}

/// Operations of `pd_ctrl` (the flags field) with their arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PdCtrlOp {
    /// Delegate `src` of the source PD into the window `dst` of PD `dst_pd`.
    Delegate {
        /// The destination PD.
        dst_pd: u64,
        /// The source range.
        src: Crd,
        /// The destination window.
        dst: Crd,
        /// The hotspot.
        hotspot: u64,
        /// Transfer flags (undefined bits are dropped).
        flags: XferFlags,
    },
    /// Move `pages` of kernel-memory quota to PD `dst_pd`.
    Quota {
        /// The destination PD.
        dst_pd: u64,
        /// Pages (the kernel refuses more than `u32::MAX`).
        pages: u64,
    },
    /// Read one figure ([`stat`](crate::hypercall::stat) item) of the source PD.
    Stat {
        /// The item.
        item: u64,
    },
}

/// `pd_ctrl`: operation `op` with source PD `src`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PdCtrl {
    /// The source PD.
    pub src: u64,
    /// The operation.
    pub op: PdCtrlOp,
}

impl HcArgs for PdCtrl {
    const HC: Hypercall = Hypercall::PdCtrl;
    #[inline(always)]
    fn to_regs(&self) -> Regs {
        match self.op {
            PdCtrlOp::Delegate {
                dst_pd,
                src,
                dst,
                hotspot,
                flags,
            } => [
                word(Self::HC, pd_ctrl_op::DELEGATE, self.src),
                dst_pd,
                src.0,
                dst.0,
                hotspot,
                flags.bits(),
            ],
            PdCtrlOp::Quota { dst_pd, pages } => {
                let w = word(Self::HC, pd_ctrl_op::QUOTA, self.src);
                [w, dst_pd, pages, 0, 0, 0]
            }
            PdCtrlOp::Stat { item } => {
                [word(Self::HC, pd_ctrl_op::STAT, self.src), item, 0, 0, 0, 0]
            }
        }
    }
    /// Fails with `BadParameter` on an undefined operation.
    #[inline(always)]
    fn from_regs(r: &Regs) -> Result<Self, Status> {
        let op = match HypercallWord(r[0]).flags() {
            pd_ctrl_op::DELEGATE => PdCtrlOp::Delegate {
                dst_pd: r[1],
                src: Crd(r[2]),
                dst: Crd(r[3]),
                hotspot: r[4],
                flags: XferFlags::from_bits_truncate(r[5]),
            },
            pd_ctrl_op::QUOTA => PdCtrlOp::Quota {
                dst_pd: r[1],
                pages: r[2],
            },
            pd_ctrl_op::STAT => PdCtrlOp::Stat { item: r[1] },
            _ => return Err(Status::BadParameter),
        };
        Ok(PdCtrl { src: sel(r), op })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypercall::{gsi_flags, stat};

    /// `x` survives encoding and decoding, and its register image names its hypercall.
    fn round<A: HcArgs + PartialEq + core::fmt::Debug>(x: A) -> Regs {
        let r = x.to_regs();
        assert_eq!(HypercallWord(r[0]).number(), A::HC as u8, "{x:?}");
        assert_eq!(A::from_regs(&r).as_ref(), Ok(&x));
        r
    }

    const SEL: u64 = (1 << 52) - 1;
    const W: u64 = u64::MAX;

    #[test]
    fn every_hypercall_round_trips() {
        for b in [false, true] {
            round(Call {
                pt: SEL,
                non_blocking: b,
            });
            round(CreatePd {
                dst: SEL,
                parent: W,
                quota: W,
                vm: b,
            });
            for v in [false, true] {
                round(CreateEc {
                    dst: SEL,
                    pd: W,
                    cpu: 3,
                    utcb: W - 1,
                    sp: W - 2,
                    evt: W - 3,
                    global: b,
                    vcpu: v,
                });
                round(SmCtrl {
                    sm: 9,
                    op: SmOp::Down {
                        zero: b,
                        deadline: if v { W } else { 0 },
                    },
                });
            }
            round(Revoke {
                crd: Crd(W),
                own: b,
            });
        }
        round(Reply);
        round(CreateSc {
            dst: SEL,
            pd: W,
            ec: W - 1,
            prio: 255,
            quantum_us: SEL,
        });
        round(CreateSc {
            dst: 0,
            pd: 0,
            ec: 0,
            prio: 1,
            quantum_us: 1,
        });
        round(CreatePt {
            dst: SEL,
            pd: 1,
            ec: 2,
            mtd: Mtd::all(),
            ip: W,
        });
        round(CreatePt {
            dst: 0,
            pd: 1,
            ec: 2,
            mtd: Mtd::empty(),
            ip: 0,
        });
        round(CreateSm {
            dst: SEL,
            pd: W,
            count: W,
        });
        round(Lookup {
            crd: Crd(W),
            phys: false,
        });
        round(Lookup {
            crd: Crd(W),
            phys: true,
        });
        round(EcCtrl {
            ec: SEL,
            op: EcCtrlOp::Recall,
        });
        round(ScCtrl { sc: SEL });
        round(PtCtrl { pt: SEL, id: W });
        round(SmCtrl {
            sm: SEL,
            op: SmOp::Up,
        });
        round(AssignPci);
        round(AssignGsi {
            sm: SEL,
            cpu: W,
            flags: gsi_flags::LEVEL | gsi_flags::ACTIVE_LOW,
        });
        round(PdCtrl {
            src: SEL,
            op: PdCtrlOp::Delegate {
                dst_pd: W,
                src: Crd(W - 1),
                dst: Crd(W - 2),
                hotspot: W - 3,
                flags: XferFlags::all(),
            },
        });
        round(PdCtrl {
            src: SEL,
            op: PdCtrlOp::Quota {
                dst_pd: W,
                pages: W - 1,
            },
        });
        round(PdCtrl {
            src: 0,
            op: PdCtrlOp::Stat {
                item: stat::MDB_NODES,
            },
        });
    }

    /// Register images written out by hand from ABI.md's table: `rdi` is number | flags
    /// << 8 | selector << 12; arguments 1–5 are rsi, rdx, rax, r8, r9.
    #[test]
    fn images_match_abi_md() {
        // 3 create_ec: flags bit 0 global, bit 1 vCPU; 1 PD, 2 CPU, 3 UTCB, 4 SP, 5 evt.
        let ec = CreateEc {
            dst: 0x40,
            pd: 0x11,
            cpu: 2,
            utcb: 0x7000,
            sp: 0x8000,
            evt: 0x100,
            global: true,
            vcpu: false,
        };
        assert_eq!(ec.to_regs(), [0x40_103, 0x11, 2, 0x7000, 0x8000, 0x100]);
        // 4 create_sc: 3 quantum-priority (prio bits 0-7, quantum µs bits 12-63).
        let sc = CreateSc {
            dst: 5,
            pd: 6,
            ec: 7,
            prio: 9,
            quantum_us: 10_000,
        };
        assert_eq!(sc.to_regs(), [0x5_004, 6, 7, (10_000 << 12) | 9, 0, 0]);
        // 12 sm_ctrl: bit 0 down, bit 1 zero; 1 deadline.
        let down = SmCtrl {
            sm: 0x21,
            op: SmOp::Down {
                zero: true,
                deadline: 77,
            },
        };
        assert_eq!(down.to_regs(), [0x21_30c, 77, 0, 0, 0, 0]);
        assert_eq!(
            SmCtrl {
                sm: 0x21,
                op: SmOp::Up
            }
            .to_regs()[0],
            0x21_00c
        );
        // 15 pd_ctrl op 0 delegate: 1 dst PD, 2 src CRD, 3 dst CRD, 4 hotspot, 5 flags.
        let d = PdCtrl {
            src: 1,
            op: PdCtrlOp::Delegate {
                dst_pd: 2,
                src: Crd(3),
                dst: Crd(4),
                hotspot: 5,
                flags: XferFlags::empty(),
            },
        };
        assert_eq!(d.to_regs(), [0x1_00f, 2, 3, 4, 5, 0]);
        // 15 pd_ctrl op 2 stat: 1 item.
        let s = PdCtrl {
            src: 0,
            op: PdCtrlOp::Stat {
                item: stat::POOL_FREE,
            },
        };
        assert_eq!(s.to_regs(), [0x20f, 16, 0, 0, 0, 0]);
        // 9 ec_ctrl: 1 operation (0 recall).
        assert_eq!(
            EcCtrl {
                ec: 3,
                op: EcCtrlOp::Recall
            }
            .to_regs(),
            [0x3_009, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn undefined_values_fail() {
        let mut r = EcCtrl {
            ec: 3,
            op: EcCtrlOp::Recall,
        }
        .to_regs();
        r[1] = 1;
        assert_eq!(EcCtrl::from_regs(&r), Err(Status::BadParameter));
        for op in 3..16u64 {
            let r = [0xf | (op << 8), 0, 0, 0, 0, 0];
            assert_eq!(PdCtrl::from_regs(&r), Err(Status::BadParameter));
        }
        // Unused flag bits and arguments are ignored.
        let r = [0xc | (0xc << 8) | (5 << 12), 1, 2, 3, 4, 5];
        assert_eq!(
            SmCtrl::from_regs(&r),
            Ok(SmCtrl {
                sm: 5,
                op: SmOp::Up
            })
        );
    }
}
