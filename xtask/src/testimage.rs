//! A tiny hand-assembled Multiboot kernel, used to test the emulator plumbing (serial
//! capture, exit codes, timeouts, the GRUB ISO) independently of the real kernel.
//!
//! Entered by the boot loader in 32-bit protected mode, it writes a message to COM1,
//! optionally writes an exit code to the `isa-debug-exit` port 0xf4 (QEMU ends there),
//! optionally writes `Shutdown` to port 0x8900 (Bochs ends there), then halts forever.

use crate::multiboot::{header_bytes, FLAG_ADDRESSES};

/// Physical load address of the image.
pub const LOAD_ADDR: u32 = 0x10_0000;
/// Size of the Multiboot header with address fields.
const HEADER_LEN: usize = 32;

/// What the test kernel does.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// Written to COM1 (port 0x3f8).
    pub serial: String,
    /// Written to port 0xf4 after the message, if any (0x10: success, 0x11: failure).
    pub debug_exit: Option<u8>,
    /// Whether to write `Shutdown` to port 0x8900 afterwards (ends Bochs).
    pub bochs_shutdown: bool,
}

/// Appends code that writes the NUL-terminated string at `addr` to `port`, byte by byte.
fn out_string(code: &mut Vec<u8>, port: u16, addr: u32) {
    code.extend([0x66, 0xba]); // mov dx, port
    code.extend(port.to_le_bytes());
    code.push(0xbe); // mov esi, addr
    code.extend(addr.to_le_bytes());
    // 1: lodsb; test al, al; jz 2f; out dx, al; jmp 1b; 2:
    code.extend([0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]);
}

/// Appends code that writes the NUL-terminated string at `addr` to COM1 like a real
/// driver: each byte only once the transmitter holding register is empty, then waits
/// until the transmitter is idle (Bochs transmits at the emulated baud rate and drops
/// what is overwritten).
fn out_serial(code: &mut Vec<u8>, addr: u32) {
    const LSR: [u8; 4] = [0x66, 0xba, 0xfd, 0x03]; // mov dx, 0x3fd (line status)
    code.push(0xbe); // mov esi, addr
    code.extend(addr.to_le_bytes());
    // top: mov dx, LSR; in al, dx; test al, 0x20; jz top
    code.extend(LSR);
    code.extend([0xec, 0xa8, 0x20, 0x74, 0xf7]);
    // lodsb; test al, al; jz end; mov dx, 0x3f8; out dx, al; jmp top; end:
    code.extend([
        0xac, 0x84, 0xc0, 0x74, 0x07, 0x66, 0xba, 0xf8, 0x03, 0xee, 0xeb, 0xeb,
    ]);
    // idle: mov dx, LSR; in al, dx; test al, 0x40; jz idle
    code.extend(LSR);
    code.extend([0xec, 0xa8, 0x40, 0x74, 0xf7]);
}

/// Appends code that writes `value` to `port`.
fn out_byte(code: &mut Vec<u8>, port: u16, value: u8) {
    code.extend([0xb0, value]); // mov al, value
    code.extend([0x66, 0xba]); // mov dx, port
    code.extend(port.to_le_bytes());
    code.push(0xee); // out dx, al
}

impl TestImage {
    /// The flat binary image: Multiboot header, code, strings.
    pub fn bytes(&self) -> Vec<u8> {
        // Two passes: the code's length does not depend on the string addresses.
        let code_len = self.code(0, 0).len();
        let msg_addr = LOAD_ADDR + (HEADER_LEN + code_len) as u32;
        let shutdown_addr = msg_addr + self.serial.len() as u32 + 1;
        let code = self.code(msg_addr, shutdown_addr);
        let mut tail = code;
        tail.extend(self.serial.as_bytes());
        tail.push(0);
        tail.extend(b"Shutdown\0");
        let end = LOAD_ADDR + (HEADER_LEN + tail.len()) as u32;
        let entry = LOAD_ADDR + HEADER_LEN as u32;
        let mut img = header_bytes(FLAG_ADDRESSES, LOAD_ADDR, LOAD_ADDR, end, end, entry);
        img.extend(tail);
        img
    }

    fn code(&self, msg_addr: u32, shutdown_addr: u32) -> Vec<u8> {
        let mut code = Vec::new();
        out_byte(&mut code, 0x3fb, 0x03); // line control: 8 data bits, no parity, 1 stop
        out_serial(&mut code, msg_addr);
        if let Some(value) = self.debug_exit {
            out_byte(&mut code, 0xf4, value);
        }
        if self.bochs_shutdown {
            out_string(&mut code, 0x8900, shutdown_addr);
        }
        code.extend([0xfa, 0xf4, 0xeb, 0xfc]); // 1: cli; hlt; jmp 1b
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_image_has_a_valid_multiboot_header() {
        let img = TestImage {
            serial: "hi\n".into(),
            debug_exit: Some(0x10),
            bochs_shutdown: true,
        };
        let bytes = img.bytes();
        let h = crate::multiboot::check(&bytes).unwrap();
        assert_eq!(h.entry_addr, LOAD_ADDR + 32);
        assert_eq!(h.load_end_addr as usize, LOAD_ADDR as usize + bytes.len());
        assert!(bytes.windows(3).any(|w| w == b"hi\n"));
    }
}
