//! Console output through a pluggable sink.
//!
//! The root installs a sink that writes to the serial port; every other component uses
//! the default, which sends each line to the root's console portal as untyped words.

use core::fmt::{self, Write};

use crate::sync::Mutex;

use crate::utcb::UtcbRef;

/// Where console bytes go.
pub type Sink = fn(&[u8]);

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

/// Installs a sink (the root's serial driver).
pub fn set_sink(s: Sink) {
    *SINK.lock() = Some(s);
}

/// Bytes of a line the console portal takes per call.
pub const LINE_MAX: usize = 480;

/// Bit of the length word that marks raw output: the root writes the bytes as they
/// are, without its `[name] ` tag (a guest's interactive console).
pub const RAW: u64 = 1 << 63;

fn portal_sink(bytes: &[u8]) {
    send(bytes, 0);
}

/// Writes `bytes` to the console untagged (through the root's console portal).
pub fn print_raw(bytes: &[u8]) {
    send(bytes, RAW);
}

fn send(bytes: &[u8], flags: u64) {
    // Words: [len | flags, bytes packed little-endian...]
    for chunk in bytes.chunks(LINE_MAX) {
        let u = UtcbRef::main();
        let utcb = u.get();
        utcb.data[0] = chunk.len() as u64 | flags;
        for (i, w) in chunk.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..w.len()].copy_from_slice(w);
            utcb.data[1 + i] = u64::from_le_bytes(b);
        }
        utcb.head.set_counts(1 + chunk.len().div_ceil(8), 0);
        let _ = crate::hc::call(crate::sel::CONSOLE_PT);
    }
}

/// Decodes a console message from untyped words (used by the root's console portal).
pub fn decode(words: &[u64], out: &mut [u8; LINE_MAX]) -> usize {
    let Some((&len, rest)) = words.split_first() else {
        return 0;
    };
    let len = ((len & !RAW) as usize).min(LINE_MAX).min(rest.len() * 8);
    for (i, b) in out.iter_mut().enumerate().take(len) {
        *b = (rest[i / 8] >> ((i % 8) * 8)) as u8;
    }
    len
}

struct LineBuf {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                flush(&self.buf[..self.len]);
                self.len = 0;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

fn flush(bytes: &[u8]) {
    let sink = *SINK.lock();
    match sink {
        Some(s) => s(bytes),
        None => portal_sink(bytes),
    }
}

/// Formats and prints one line (used by the macros).
pub fn print_line(args: fmt::Arguments) {
    let mut l = LineBuf {
        buf: [0; LINE_MAX],
        len: 0,
    };
    let _ = l.write_fmt(args);
    let _ = l.write_str("\n");
    flush(&l.buf[..l.len]);
}

/// Prints a line on the console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::print_line(format_args!($($arg)*)) };
}
