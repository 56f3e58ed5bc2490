#!/usr/bin/env python3
"""Checks the Multiboot a.out-kludge invariant of the kernel ELF (see link.ld).

Usage: check-image.py path/to/peregrine   -- exits non-zero with a message on failure.
"""
import struct
import sys


def main(path):
    data = open(path, "rb").read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not an ELF64 file"
    # Multiboot header: magic in the first 8 KiB, 4-byte aligned.
    off = next((o for o in range(0, min(len(data), 8192) - 32, 4)
                if struct.unpack_from("<I", data, o)[0] == 0x1BADB002), None)
    assert off is not None, "no Multiboot header in the first 8 KiB"
    magic, flags, csum, hdr, load, load_end, bss_end, entry = struct.unpack_from("<8I", data, off)
    assert (magic + flags + csum) & 0xFFFFFFFF == 0, "bad checksum"
    assert flags & (1 << 16), "a.out kludge flag missing"
    text_off = off - (hdr - load)
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    loads = []
    for i in range(e_phnum):
        p_type, _, p_offset, _, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == 1:
            loads.append((p_paddr, p_offset, p_filesz, p_memsz))
    loads.sort()
    for paddr, offset, filesz, _ in loads:
        if filesz:
            assert offset - paddr == text_off - load, (
                f"segment at {paddr:#x}: offset {offset:#x} breaks the contiguous image")
    file_end = max(p + f for p, _, f, _ in loads if f)
    mem_end = max(p + m for p, _, _, m in loads)
    assert loads[0][0] == load, f"first segment {loads[0][0]:#x} != load_addr {load:#x}"
    assert load_end >= file_end, f"load_end {load_end:#x} < end of file data {file_end:#x}"
    assert bss_end >= mem_end, f"bss_end {bss_end:#x} < end of image {mem_end:#x}"
    assert text_off + (load_end - load) <= len(data), "load_end beyond the file"
    assert load <= entry < load_end, "entry outside the loaded image"
    print(f"ok: header at file {off:#x}, load {load:#x}..{load_end:#x}, bss to {bss_end:#x}, "
          f"entry {entry:#x}")


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except AssertionError as e:
        sys.exit(f"check-image: {e}")
