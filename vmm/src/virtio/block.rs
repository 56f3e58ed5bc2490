//! virtio block device (virtio §5.2), device type 2, one request queue.
//!
//! A request is a chain: a device-readable header `{ type u32, reserved u32, sector
//! u64 }`, then the data (device-readable for OUT, device-writable for IN and GET_ID),
//! then one device-writable status byte (§5.2.6). Supported: IN, OUT, FLUSH (with
//! VIRTIO_BLK_F_FLUSH offered, so the driver sees a write-back cache and flushes),
//! GET_ID (a 20-byte serial). Anything else answers VIRTIO_BLK_S_UNSUPP; a request
//! past the end of the disk, not a whole number of sectors, with data buffers in the
//! wrong direction (device-writable for OUT, device-readable for IN), writing a
//! read-only disk or failing in the backend answers VIRTIO_BLK_S_IOERR. A chain with
//! no room for the header or the status byte cannot be answered at all: the device
//! needs a reset.
//!
//! Data moves in chunks of at most [`CHUNK`] bytes, so a guest's request size never
//! decides how much the VMM allocates.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use super::{device_type, Queue, VirtioDevice, VirtioError};
use crate::vcpu::GuestMemory;

/// Sector size: the unit of `sector` and capacity, whatever the backend's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (`seg_max`): the queue size less the
/// header and status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest piece of a request moved at once.
pub const CHUNK: usize = 64 * 1024;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;

/// Feature bits (§5.2.3).
pub mod features {
    /// `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The disk is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// FLUSH is supported (a write-back cache).
    pub const FLUSH: u64 = 1 << 9;
}

/// Request types.
pub mod req {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
}

/// Status byte values.
pub mod blk_status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// Configuration space offsets.
pub mod config {
    /// `capacity` in sectors (u64).
    pub const CAPACITY: u64 = 0;
    /// `size_max` (u32).
    pub const SIZE_MAX: u64 = 8;
    /// `seg_max` (u32).
    pub const SEG_MAX: u64 = 12;
    /// `blk_size` (u32).
    pub const BLK_SIZE: u64 = 20;
    /// Length of the fields we fill.
    pub const LEN: u64 = 24;
}

/// A backend's failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockError {
    /// The range lies past the end of the disk.
    OutOfRange,
    /// The backing store failed.
    Io,
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockError::OutOfRange => write!(f, "access past the end of the disk"),
            BlockError::Io => write!(f, "backing store I/O error"),
        }
    }
}

/// What stores the disk's sectors.
pub trait BlockBackend: Send {
    /// Fills `buf` (a whole number of sectors) from `sector` on.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// Writes `buf` (a whole number of sectors) from `sector` on.
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlockError>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), BlockError>;
    /// Size in sectors.
    fn capacity(&self) -> u64;
}

/// A disk in memory with a write-back cache: writes land in `data`, [`flush`] copies
/// them to `durable` (what would survive a power cut). For tests, and for a disk image
/// from a boot module.
///
/// [`flush`]: BlockBackend::flush
#[derive(Clone, Debug)]
pub struct MemDisk {
    /// The disk as the guest sees it.
    pub data: Vec<u8>,
    /// The disk as of the last flush.
    pub durable: Vec<u8>,
    /// Flushes so far.
    pub flushes: u32,
}

impl MemDisk {
    /// A disk holding `image`, rounded up to whole sectors.
    pub fn new(mut image: Vec<u8>) -> Self {
        let len = image.len().div_ceil(SECTOR_SIZE as usize) * SECTOR_SIZE as usize;
        image.resize(len, 0);
        Self {
            durable: image.clone(),
            data: image,
            flushes: 0,
        }
    }

    fn range(&self, sector: u64, len: usize) -> Result<core::ops::Range<usize>, BlockError> {
        let start = sector
            .checked_mul(SECTOR_SIZE)
            .filter(|&s| s <= self.data.len() as u64)
            .ok_or(BlockError::OutOfRange)? as usize;
        let end = start.checked_add(len).filter(|&e| e <= self.data.len());
        Ok(start..end.ok_or(BlockError::OutOfRange)?)
    }
}

impl BlockBackend for MemDisk {
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let r = self.range(sector, buf.len())?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
        let r = self.range(sector, buf.len())?;
        self.data[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        self.durable.copy_from_slice(&self.data);
        self.flushes += 1;
        Ok(())
    }

    fn capacity(&self) -> u64 {
        self.data.len() as u64 / SECTOR_SIZE
    }
}

/// A virtio block device over a [`BlockBackend`].
pub struct VirtioBlock<B: BlockBackend> {
    backend: B,
    read_only: bool,
    id: [u8; ID_LEN],
    sizes: [u16; 1],
}

impl<B: BlockBackend> VirtioBlock<B> {
    /// A disk on `backend`; `id` is the serial GET_ID returns (cut to 20 bytes).
    pub fn new(backend: B, read_only: bool, id: &[u8]) -> Self {
        let mut serial = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        serial[..n].copy_from_slice(&id[..n]);
        Self {
            backend,
            read_only,
            id: serial,
            sizes: [QUEUE_SIZE],
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Serves one request chain; the bytes written into it (the used length).
    fn request(
        &mut self,
        c: &super::DescriptorChain,
        mem: &mut dyn GuestMemory,
    ) -> Result<u32, VirtioError> {
        let mut r = c.reader();
        let mut hdr = [0u8; 16];
        if r.read(mem, &mut hdr)? != hdr.len() {
            return Err(VirtioError::BadRequest("block request header too short"));
        }
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        let writable = c.writable_len();
        if writable == 0 {
            return Err(VirtioError::BadRequest(
                "block request without a status byte",
            ));
        }
        let mut w = c.writer();
        let data_len = writable - 1;
        let status = match ty {
            // Data the device cannot move in the request's direction (device-readable
            // bytes after an IN's header, device-writable ones before an OUT's status)
            // is an error, not a success with nothing moved.
            req::IN if r.remaining() != 0 => blk_status::IOERR,
            req::OUT if data_len != 0 => blk_status::IOERR,
            req::IN => self.read_into(sector, data_len, &mut w, mem)?,
            req::OUT => self.write_from(sector, &mut r, mem)?,
            req::FLUSH => match self.backend.flush() {
                Ok(()) => blk_status::OK,
                Err(_) => blk_status::IOERR,
            },
            req::GET_ID => {
                let n = (data_len as usize).min(ID_LEN);
                w.write(mem, &self.id[..n])?;
                blk_status::OK
            }
            _ => blk_status::UNSUPP,
        };
        // The status byte is the last writable byte, whatever the data took.
        let skip = (data_len - u64::from(w.written())) as usize;
        w.skip(skip);
        w.write(mem, &[status])?;
        Ok(w.written())
    }

    /// A request's sector range, if it is whole sectors inside the disk.
    fn check_range(&self, sector: u64, len: u64) -> bool {
        len.is_multiple_of(SECTOR_SIZE)
            && sector
                .checked_add(len / SECTOR_SIZE)
                .is_some_and(|end| end <= self.backend.capacity())
    }

    fn read_into(
        &mut self,
        sector: u64,
        len: u64,
        w: &mut super::queue::Writer<'_>,
        mem: &mut dyn GuestMemory,
    ) -> Result<u8, VirtioError> {
        if !self.check_range(sector, len) {
            return Ok(blk_status::IOERR);
        }
        let mut buf = vec![0u8; (len as usize).min(CHUNK)];
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(CHUNK);
            if self
                .backend
                .read(sector + done / SECTOR_SIZE, &mut buf[..n])
                .is_err()
            {
                return Ok(blk_status::IOERR);
            }
            w.write(mem, &buf[..n])?;
            done += n as u64;
        }
        Ok(blk_status::OK)
    }

    fn write_from(
        &mut self,
        sector: u64,
        r: &mut super::queue::Reader<'_>,
        mem: &mut dyn GuestMemory,
    ) -> Result<u8, VirtioError> {
        let len = r.remaining();
        if self.read_only || !self.check_range(sector, len) {
            return Ok(blk_status::IOERR);
        }
        let mut buf = vec![0u8; (len as usize).min(CHUNK)];
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(CHUNK);
            r.read(mem, &mut buf[..n])?;
            if self
                .backend
                .write(sector + done / SECTOR_SIZE, &buf[..n])
                .is_err()
            {
                return Ok(blk_status::IOERR);
            }
            done += n as u64;
        }
        Ok(blk_status::OK)
    }
}

impl<B: BlockBackend> VirtioDevice for VirtioBlock<B> {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { features::RO } else { 0 };
        features::SEG_MAX | features::BLK_SIZE | features::FLUSH | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut image = [0u8; config::LEN as usize];
        let mut put =
            |off: u64, v: &[u8]| image[off as usize..off as usize + v.len()].copy_from_slice(v);
        put(config::CAPACITY, &self.backend.capacity().to_le_bytes());
        put(config::SEG_MAX, &SEG_MAX.to_le_bytes());
        put(config::BLK_SIZE, &(SECTOR_SIZE as u32).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| image.get(o.wrapping_add(i)))
                .copied()
                .unwrap_or(0);
        }
    }

    fn process(
        &mut self,
        index: u16,
        queues: &mut [Queue],
        mem: &mut dyn GuestMemory,
    ) -> Result<bool, VirtioError> {
        let Some(q) = queues.get_mut(index as usize).filter(|_| index == 0) else {
            return Ok(false);
        };
        let mut used = false;
        while let Some(c) = q.pop(mem)? {
            let len = self.request(&c, mem)?;
            q.add_used(mem, c.head, len)?;
            used = true;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests;
