//! Capability selectors the root PD finds at start.

/// Selectors 0–31 are the root EC's event portals (its event base is 0); the root
/// creates them itself.
pub const ROOT_EVT_BASE: u64 = 0;
/// The root PD's capability to itself (all permissions).
pub const ROOT_PD: u64 = 32;
/// The root EC.
pub const ROOT_EC: u64 = 33;
/// The root EC's SC.
pub const ROOT_SC: u64 = 34;
/// The kernel PD: holds all memory not used by the kernel (pages numbered by physical
/// frame), all I/O ports, and one semaphore per GSI at [`GSI_SM_BASE`]` + gsi` of its
/// object space. The root delegates from it with `pd_ctrl`.
pub const KERN_PD: u64 = 35;
/// The first selector the root may use freely.
pub const ROOT_FIRST_FREE: u64 = 64;
/// Selector of the first GSI semaphore in the kernel PD's object space.
pub const GSI_SM_BASE: u64 = 0x1000;
