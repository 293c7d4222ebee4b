//! dm-snapshot targets: `snapshot-origin <origin>` and
//! `snapshot <origin> <cow> <P|N|PO> <chunk sectors>` (Documentation/admin-guide/device-mapper/snapshot.rst).
use std::{fmt, str::FromStr};

use devicemapper::Device;

use super::parse_err;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOriginParams {
    pub origin: Device,
}

impl fmt::Display for SnapshotOriginParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)
    }
}

impl FromStr for SnapshotOriginParams {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.split_whitespace().collect::<Vec<_>>().as_slice() {
            [origin] => Ok(Self { origin: parse_dev(origin, s)? }),
            _ => Err(parse_err("snapshot-origin", s, "expected exactly one device")),
        }
    }
}

/// Whether the exception store survives a reboot (`P`) or lives in memory (`N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    Persistent,
    Transient,
    /// `PO`: persistent with overflow support.
    PersistentOverflow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotParams {
    pub origin: Device,
    pub cow: Device,
    pub persistence: Persistence,
    /// Chunk size in 512-byte sectors (a power of two).
    pub chunk_sectors: u64,
}

impl fmt::Display for SnapshotParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.persistence {
            Persistence::Persistent => "P",
            Persistence::Transient => "N",
            Persistence::PersistentOverflow => "PO",
        };
        write!(f, "{} {} {} {}", self.origin, self.cow, p, self.chunk_sectors)
    }
}

impl FromStr for SnapshotParams {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let v: Vec<&str> = s.split_whitespace().collect();
        let [origin, cow, p, chunk] = v.as_slice() else {
            return Err(parse_err("snapshot", s, "expected 4 fields"));
        };
        let persistence = match *p {
            "P" => Persistence::Persistent,
            "N" => Persistence::Transient,
            "PO" => Persistence::PersistentOverflow,
            other => return Err(parse_err("snapshot", s, &format!("unknown persistence {other:?}"))),
        };
        let chunk_sectors: u64 = chunk.parse().map_err(|_| parse_err("snapshot", s, "bad chunk size"))?;
        if !chunk_sectors.is_power_of_two() {
            return Err(parse_err("snapshot", s, "chunk size must be a power of two"));
        }
        Ok(Self { origin: parse_dev(origin, s)?, cow: parse_dev(cow, s)?, persistence, chunk_sectors })
    }
}

pub(super) fn parse_dev(word: &str, whole: &str) -> Result<Device> {
    Device::from_str(word).map_err(|_| parse_err("device", whole, &format!("{word:?} is not MAJOR:MINOR")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trip() {
        let s = "254:3 254:7 P 8";
        let p: SnapshotParams = s.parse().unwrap();
        assert_eq!(p.persistence, Persistence::Persistent);
        assert_eq!(p.cow, Device { major: 254, minor: 7 });
        assert_eq!(p.to_string(), s);
        assert_eq!("8:0 8:16 PO 16".parse::<SnapshotParams>().unwrap().to_string(), "8:0 8:16 PO 16");
        for bad in ["254:3 254:7 P", "254:3 254:7 X 8", "254:3 254:7 P 12", "a 254:7 P 8"] {
            assert!(bad.parse::<SnapshotParams>().is_err(), "{bad}");
        }
    }

    #[test]
    fn origin_round_trip() {
        let p: SnapshotOriginParams = "254:2".parse().unwrap();
        assert_eq!(p.to_string(), "254:2");
        assert!("254:2 254:3".parse::<SnapshotOriginParams>().is_err());
    }
}
