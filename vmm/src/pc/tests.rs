use super::*;

#[test]
fn memory_map_splits_the_first_mib() {
    let m = memory_map(256 << 20);
    assert_eq!((m[0].addr, m[0].size, m[0].typ), (0, 0x9_fc00, e820::RAM));
    assert_eq!({ m[1].typ }, e820::RESERVED);
    assert_eq!(m[1].addr + m[1].size, 0x10_0000);
    assert_eq!((m[2].addr, m[2].size), (0x10_0000, (256 << 20) - 0x10_0000));
}

#[test]
fn serial_lines_split_on_newlines() {
    let mut s = SerialLines::new(Vec::<Vec<u8>>::new());
    for b in b"hello\r\nworld\n" {
        s.put(*b);
    }
    assert_eq!(s.sink, vec![b"hello".to_vec(), b"world".to_vec()]);
}

#[test]
fn ram_disk_reads_back_writes_and_refuses_out_of_range() {
    let d: &'static mut [u8] = Box::leak(vec![0u8; 4096].into_boxed_slice());
    let mut d = RamDisk(d);
    assert_eq!(d.capacity(), 8);
    d.write(1, &[7; 512]).unwrap();
    let mut b = [0u8; 512];
    d.read(1, &mut b).unwrap();
    assert_eq!(b, [7; 512]);
    assert_eq!(d.read(8, &mut b), Err(BlockError::OutOfRange));
}
