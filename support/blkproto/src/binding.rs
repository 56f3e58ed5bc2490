//! Bindings: which blocks of which disk a session may reach, as the root's boot
//! configuration names them, and their resolution against a parsed GPT.

use alloc::string::{String, ToString};

use gpt_disk_types::Guid;

use crate::gpt::Partition;

/// A session's extent on its disk: absolute blocks `first_lba..first_lba + blocks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// First block (absolute LBA).
    pub first_lba: u64,
    /// Blocks (at least 1).
    pub blocks: u64,
}

/// What a binding names on its disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The partition with this number: 1-based position in the GPT entry array (entry
    /// index + 1, as Linux numbers `sda1`, `sda2`, ...).
    Number(u32),
    /// The partition with this unique GUID.
    Guid(Guid),
    /// The one partition with this name.
    Name(String),
    /// Raw blocks `first..first + blocks` (no GPT needed).
    Range {
        /// First block (absolute LBA).
        first: u64,
        /// Blocks.
        blocks: u64,
    },
}

/// One session's binding: a disk and a target on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The disk, by the service's numbering of the drivers' disks (default 0).
    pub disk: u32,
    /// What on it.
    pub target: Target,
}

/// Why a binding string does not parse, or a binding does not resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindError {
    /// A word is not `key=value` with a known key.
    UnknownKey(String),
    /// A value does not parse.
    BadValue(String),
    /// A key given twice.
    Duplicate(String),
    /// Neither `part=` nor `range=` given, or both.
    NoTarget,
    /// No partition matches.
    NoSuchPartition,
    /// More than one partition has the name.
    AmbiguousName,
    /// The range is empty, overflows or passes the disk's end.
    RangeOutsideDisk,
}

/// Parses a decimal or `0x` hexadecimal number.
fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl Binding {
    /// Parses whitespace-separated `key=value` words:
    ///
    /// - `disk=N`: the disk (default 0);
    /// - `part=N`: partition number N (1-based); `part=name:NAME`: the partition named
    ///   NAME; `part=guid:GUID`: the partition whose unique GUID is GUID
    ///   (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`);
    /// - `range=FIRST+COUNT`: raw blocks FIRST..FIRST+COUNT.
    ///
    /// Exactly one of `part=` and `range=`; numbers decimal or `0x` hex.
    pub fn parse(s: &str) -> Result<Binding, BindError> {
        let mut disk = None;
        let mut target = None;
        for word in s.split_whitespace() {
            let (key, val) = word
                .split_once('=')
                .ok_or_else(|| BindError::UnknownKey(word.to_string()))?;
            let bad = || BindError::BadValue(word.to_string());
            match key {
                "disk" => {
                    if disk.is_some() {
                        return Err(BindError::Duplicate(key.to_string()));
                    }
                    disk = Some(
                        number(val)
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or_else(bad)?,
                    );
                }
                "part" | "range" => {
                    if target.is_some() {
                        return Err(BindError::Duplicate(key.to_string()));
                    }
                    let t = if key == "range" {
                        let (a, b) = val.split_once('+').ok_or_else(bad)?;
                        Target::Range {
                            first: number(a).ok_or_else(bad)?,
                            blocks: number(b).ok_or_else(bad)?,
                        }
                    } else if let Some(n) = val.strip_prefix("name:") {
                        if n.is_empty() {
                            return Err(bad());
                        }
                        Target::Name(n.to_string())
                    } else if let Some(g) = val.strip_prefix("guid:") {
                        Target::Guid(Guid::try_parse(g).map_err(|_| bad())?)
                    } else {
                        let n = number(val)
                            .and_then(|n| u32::try_from(n).ok())
                            .filter(|n| *n != 0)
                            .ok_or_else(bad)?;
                        Target::Number(n)
                    };
                    target = Some(t);
                }
                _ => return Err(BindError::UnknownKey(key.to_string())),
            }
        }
        Ok(Binding {
            disk: disk.unwrap_or(0),
            target: target.ok_or(BindError::NoTarget)?,
        })
    }

    /// The blocks the binding names on a disk of `disk_blocks` blocks whose checked
    /// partitions are `partitions` ([`crate::gpt::parse`]).
    pub fn resolve(&self, partitions: &[Partition], disk_blocks: u64) -> Result<Bounds, BindError> {
        let p = match &self.target {
            Target::Range { first, blocks } => {
                let end = first
                    .checked_add(*blocks)
                    .ok_or(BindError::RangeOutsideDisk)?;
                if *blocks == 0 || end > disk_blocks {
                    return Err(BindError::RangeOutsideDisk);
                }
                return Ok(Bounds {
                    first_lba: *first,
                    blocks: *blocks,
                });
            }
            Target::Number(n) => partitions
                .iter()
                .find(|p| p.index.checked_add(1) == Some(*n)),
            Target::Guid(g) => partitions.iter().find(|p| p.unique_guid == *g),
            Target::Name(name) => {
                let mut it = partitions.iter().filter(|p| p.name == *name);
                let p = it.next();
                if it.next().is_some() {
                    return Err(BindError::AmbiguousName);
                }
                p
            }
        };
        let p = p.ok_or(BindError::NoSuchPartition)?;
        // The GPT parser checked this already; a binding never trusts that it ran.
        if p.first_lba > p.last_lba || p.last_lba >= disk_blocks {
            return Err(BindError::RangeOutsideDisk);
        }
        Ok(Bounds {
            first_lba: p.first_lba,
            blocks: p.blocks(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn part(index: u32, first: u64, last: u64, name: &str, g: u8) -> Partition {
        let mut b = [0u8; 16];
        b[0] = g;
        Partition {
            index,
            type_guid: Guid::ZERO,
            unique_guid: Guid::from_bytes(b),
            first_lba: first,
            last_lba: last,
            attributes: 0,
            name: name.to_string(),
        }
    }

    #[test]
    fn parses_every_form() {
        let b = |s| Binding::parse(s).unwrap();
        assert_eq!(
            b("disk=0 part=2"),
            Binding {
                disk: 0,
                target: Target::Number(2)
            }
        );
        assert_eq!(b("part=name:vm1").target, Target::Name("vm1".to_string()));
        assert_eq!(
            b("  range=2048+65536   disk=0x3 "),
            Binding {
                disk: 3,
                target: Target::Range {
                    first: 2048,
                    blocks: 65536
                }
            }
        );
        let g = "57a7feb6-8cd5-4922-b7bd-c78b0914e870";
        assert_eq!(
            b(&alloc::format!("part=guid:{g}")).target,
            Target::Guid(Guid::try_parse(g).unwrap())
        );
    }

    #[test]
    fn refuses_malformed_strings() {
        let e = |s| Binding::parse(s).unwrap_err();
        assert_eq!(e(""), BindError::NoTarget);
        assert_eq!(e("disk=1"), BindError::NoTarget);
        assert!(matches!(e("part"), BindError::UnknownKey(_)));
        assert!(matches!(e("size=3 part=1"), BindError::UnknownKey(_)));
        assert!(matches!(e("part=1 range=0+1"), BindError::Duplicate(_)));
        assert!(matches!(e("disk=1 disk=2 part=1"), BindError::Duplicate(_)));
        for bad in [
            "part=0",
            "part=x",
            "part=-1",
            "part=4294967296",
            "part=name:",
            "part=guid:nope",
            "range=5",
            "range=+5",
            "range=1+",
            "range=1+99999999999999999999",
            "disk=4294967296 part=1",
        ] {
            assert!(matches!(e(bad), BindError::BadValue(_)), "{bad}");
        }
    }

    #[test]
    fn resolves_and_refuses() {
        let parts = vec![
            part(0, 34, 99, "a", 1),
            part(3, 100, 199, "vm", 2),
            part(4, 200, 299, "vm", 3),
        ];
        let r = |s| Binding::parse(s).unwrap().resolve(&parts, 1000);
        assert_eq!(
            r("part=4"),
            Ok(Bounds {
                first_lba: 100,
                blocks: 100
            })
        );
        assert_eq!(r("part=2"), Err(BindError::NoSuchPartition));
        assert_eq!(r("part=name:a").unwrap().first_lba, 34);
        assert_eq!(r("part=name:vm"), Err(BindError::AmbiguousName));
        assert_eq!(r("part=name:zz"), Err(BindError::NoSuchPartition));
        assert_eq!(
            r("range=0+1000"),
            Ok(Bounds {
                first_lba: 0,
                blocks: 1000
            })
        );
        assert_eq!(r("range=1+1000"), Err(BindError::RangeOutsideDisk));
        assert_eq!(r("range=5+0"), Err(BindError::RangeOutsideDisk));
        assert_eq!(
            r("range=0xffffffffffffffff+2"),
            Err(BindError::RangeOutsideDisk)
        );
        // A partition list that was not checked against this disk.
        let b = Binding::parse("part=5").unwrap();
        assert_eq!(b.resolve(&parts, 250), Err(BindError::RangeOutsideDisk));
    }
}
