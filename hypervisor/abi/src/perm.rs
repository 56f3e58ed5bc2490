//! Per-object permission bits carried in capabilities.

bitflags::bitflags! {
    /// Permissions of a PD capability: which objects may be created in it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct PdPerm: u8 {
        /// Create PDs (children).
        const PD = 1 << 0;
        /// Create ECs in this PD.
        const EC = 1 << 1;
        /// Create SCs in this PD.
        const SC = 1 << 2;
        /// Create portals in this PD.
        const PT = 1 << 3;
        /// Create semaphores in this PD.
        const SM = 1 << 4;
    }
}

bitflags::bitflags! {
    /// Permissions of an EC capability.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct EcPerm: u8 {
        /// `ec_ctrl` (recall).
        const CTRL = 1 << 0;
        /// Bind a scheduling context to it (`create_sc`).
        const BIND_SC = 1 << 1;
        /// Bind a portal to it (`create_pt`).
        const BIND_PT = 1 << 2;
    }
}

bitflags::bitflags! {
    /// Permissions of an SC capability.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ScPerm: u8 {
        /// `sc_ctrl` (consumed time).
        const CTRL = 1 << 0;
    }
}

bitflags::bitflags! {
    /// Permissions of a portal capability.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct PtPerm: u8 {
        /// `pt_ctrl` (set the portal id).
        const CTRL = 1 << 0;
        /// `call` through it.
        const CALL = 1 << 1;
    }
}

bitflags::bitflags! {
    /// Permissions of a semaphore capability.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct SmPerm: u8 {
        /// `sm_ctrl` up.
        const UP = 1 << 0;
        /// `sm_ctrl` down; `assign_gsi` needs it too.
        const DOWN = 1 << 1;
    }
}

bitflags::bitflags! {
    /// Permissions of a memory capability.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MemPerm: u8 {
        /// Readable.
        const R = 1 << 0;
        /// Writable.
        const W = 1 << 1;
        /// Executable.
        const X = 1 << 2;
    }
}

bitflags::bitflags! {
    /// Permissions of an I/O port capability.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct PioPerm: u8 {
        /// The port may be accessed.
        const ACCESS = 1 << 0;
    }
}

/// All permission bits of any object type.
pub const ALL: u8 = 0x1f;
