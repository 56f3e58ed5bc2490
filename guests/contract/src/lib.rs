//! The numbers of the test guest's contract (`guests/README.md`, "The test guest's
//! contract"), in one place for the three parties to it: the guest itself
//! (`guests/test`) and the VMM library's devices and exit handler (`vmm`, inside the
//! bare-metal VMM component and the KVM-hosted `vmm-kvm`).
//!
//! `no_std` and without dependencies, so the bare-metal guest can use it as it is. The
//! types are the natural ones (a port is 16 bits, a vector 8); a party that keeps them
//! wider converts.

#![no_std]

/// Console port: one character per `out`.
pub const PORT_CONSOLE: u16 = 0xe9;
/// No-op exit (the port-out test and benchmark).
pub const PORT_NOP: u16 = 0x80;
/// Reads [`MAGIC_IN`].
pub const PORT_MAGIC: u16 = 0x81;
/// Echo: reads the last dword written to it (initially 0).
pub const PORT_ECHO: u16 = 0x82;
/// Writing a value asks the host to inject #GP with its low 16 bits as the error code.
pub const PORT_INJECT_GP: u16 = 0x83;
/// Writing n asks the host to start vCPU n.
pub const PORT_START_CPU: u16 = 0xf1;
/// Writing the result code ends the run.
pub const PORT_EXIT: u16 = 0xf4;
/// What [`PORT_MAGIC`] reads.
pub const MAGIC_IN: u32 = 0x5a5a_a5a5;
/// The emulated MMIO register's guest-physical address (8 bytes that read back the last
/// value written).
pub const MMIO_REG: u64 = 0xd000_0000;
/// The MMIO register's value at reset.
pub const MMIO_INIT: u64 = 0x1122_3344_5566_7788;
/// The synthetic MSR the host intercepts and stores.
pub const MSR_SYNTH: u32 = 0x4000_0200;
/// `rax` of the contract's hypercall ("PERE"); the answer is `rbx + 1`.
pub const HYPERCALL_NR: u64 = 0x5045_5245;
/// The vector the host injects to end a `hlt`.
pub const VECTOR_WAKE: u8 = 0x30;

/// Mode (`rsi` at entry): the check list.
pub const MODE_CHECK: u64 = 1;
/// Mode: the exit benchmark.
pub const MODE_BENCH: u64 = 2;
/// Mode: the hostile guest (seed in `rcx`).
pub const MODE_HOSTILE: u64 = 3;
/// Mode: the exception loops, #AC and #DB (flags in `rcx`).
pub const MODE_LOOPS: u64 = 4;
/// Mode: the PC check list (no contract device: COM1, isa-debug-exit, fw_cfg, the
/// APICs, PIT and RTC of a standard PC). The guest takes it from its Multiboot command
/// line (`mode=pc`), a host of the contract never passes it.
pub const MODE_PC: u64 = 5;
/// Mode (Multiboot command line `mode=exit code=N`): write N to isa-debug-exit at once.
pub const MODE_EXIT: u64 = 6;
/// Mode (`mode=triple`): triple-fault (an empty IDT, then an exception).
pub const MODE_TRIPLE: u64 = 7;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hypercall_number_spells_pere() {
        assert_eq!(&HYPERCALL_NR.to_be_bytes()[4..], b"PERE");
    }

    #[test]
    fn ports_are_distinct() {
        let ports = [
            PORT_CONSOLE,
            PORT_NOP,
            PORT_MAGIC,
            PORT_ECHO,
            PORT_INJECT_GP,
            PORT_START_CPU,
            PORT_EXIT,
        ];
        for (i, p) in ports.iter().enumerate() {
            assert!(!ports[i + 1..].contains(p), "port {p:#x} twice");
        }
    }
}
