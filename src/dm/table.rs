//! A typed device-mapper table: the targets vmthunder uses, each with a `Display`/`FromStr`
//! round trip in the kernel's own format, so an existing device is adopted only when its live
//! table equals the one we would load.
use std::{fmt, str::FromStr};

use devicemapper::{CacheTargetParams, LinearTargetParams, TargetParams};

use super::{
    multipath::MultipathParams,
    parse_err,
    snapshot::{SnapshotOriginParams, SnapshotParams},
};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Linear(LinearTargetParams),
    Cache(CacheTargetParams),
    SnapshotOrigin(SnapshotOriginParams),
    Snapshot(SnapshotParams),
    Multipath(MultipathParams),
    /// Reads return zeros, writes are dropped (a stand-in while a device is formatted).
    Zero,
}

impl Target {
    pub fn type_name(&self) -> &'static str {
        match self {
            Target::Linear(_) => "linear",
            Target::Cache(_) => "cache",
            Target::SnapshotOrigin(_) => "snapshot-origin",
            Target::Snapshot(_) => "snapshot",
            Target::Multipath(_) => "multipath",
            Target::Zero => "zero",
        }
    }

    pub fn params(&self) -> String {
        match self {
            Target::Linear(p) => p.param_str(),
            Target::Cache(p) => p.param_str(),
            Target::SnapshotOrigin(p) => p.to_string(),
            Target::Snapshot(p) => p.to_string(),
            Target::Multipath(p) => p.to_string(),
            Target::Zero => String::new(),
        }
    }

    pub fn parse(type_name: &str, params: &str) -> Result<Self> {
        let dm = |e: devicemapper::DmError| parse_err(type_name, params, &e.to_string());
        let params = params.trim();
        Ok(match type_name {
            "linear" => Target::Linear(format!("linear {params}").parse().map_err(dm)?),
            "cache" => Target::Cache(format!("cache {params}").parse().map_err(dm)?),
            "snapshot-origin" => Target::SnapshotOrigin(params.parse()?),
            "snapshot" => Target::Snapshot(params.parse()?),
            "multipath" => Target::Multipath(params.parse()?),
            "zero" if params.is_empty() => Target::Zero,
            other => return Err(parse_err(other, params, "target type not used by vmthunder")),
        })
    }
}

/// One line: start and length in sectors, and the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub start: u64,
    pub length: u64,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Table {
    pub lines: Vec<Line>,
}

impl Table {
    /// A table of one target covering `length` sectors.
    pub fn single(length: u64, target: Target) -> Self {
        Table { lines: vec![Line { start: 0, length, target }] }
    }

    pub fn length(&self) -> u64 {
        self.lines.iter().map(|l| l.length).sum()
    }

    pub fn to_kernel(&self) -> Vec<(u64, u64, String, String)> {
        self.lines.iter().map(|l| (l.start, l.length, l.target.type_name().to_string(), l.target.params())).collect()
    }

    pub fn from_kernel(lines: &[(u64, u64, String, String)]) -> Result<Self> {
        let lines = lines
            .iter()
            .map(|(start, length, t, p)| Ok(Line { start: *start, length: *length, target: Target::parse(t, p)? }))
            .collect::<Result<_>>()?;
        Ok(Table { lines })
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.lines.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{} {} {}", l.start, l.length, l.target.type_name())?;
            let params = l.target.params();
            if !params.is_empty() {
                write!(f, " {params}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for Table {
    type Err = Error;
    /// `dmsetup table` format: one `start length type params...` per line.
    fn from_str(s: &str) -> Result<Self> {
        let mut lines = Vec::new();
        for line in s.lines().filter(|l| !l.trim().is_empty()) {
            let mut it = line.split_whitespace();
            let mut num = |what: &str| -> Result<u64> {
                it.next().and_then(|w| w.parse().ok()).ok_or_else(|| parse_err("table", line, &format!("bad {what}")))
            };
            let (start, length) = (num("start")?, num("length")?);
            let t = it.next().ok_or_else(|| parse_err("table", line, "missing target type"))?;
            let params = it.collect::<Vec<_>>().join(" ");
            lines.push(Line { start, length, target: Target::parse(t, &params)? });
        }
        Ok(Table { lines })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(s: &str) {
        let t: Table = s.parse().unwrap();
        assert_eq!(t.to_string(), s, "round trip");
        assert_eq!(Table::from_kernel(&t.to_kernel()).unwrap(), t);
    }

    #[test]
    fn round_trips_every_target() {
        rt("0 2048 linear 8:16 4096");
        rt("0 1048576 cache 254:1 254:2 254:0 512 1 writethrough smq 0");
        rt("0 1048576 snapshot-origin 254:3");
        rt("0 1048576 snapshot 254:3 254:5 P 8");
        rt("0 1048576 multipath 1 queue_if_no_path 0 1 1 round-robin 0 2 1 8:0 1 8:16 1");
        rt("0 1024 linear 8:16 0\n1024 1024 linear 8:32 0");
        rt("0 16 linear 8:16 0\n16 4096 zero");
    }

    #[test]
    fn rejects_unknown_and_malformed() {
        assert!("0 10 error".parse::<Table>().is_err());
        assert!("0 10 zero 8:0".parse::<Table>().is_err(), "zero takes no parameters");
        assert!("0 x linear 8:0 0".parse::<Table>().is_err());
        assert!("0 10 linear 8:0".parse::<Table>().is_err());
        assert!("0 10 snapshot 8:0 8:1 Q 8".parse::<Table>().is_err());
    }

    #[test]
    fn equality_is_semantic_for_cache_features() {
        // The crate keeps cache feature args as a set: kernel order does not matter.
        let a: Table = "0 8 cache 1:1 1:2 1:3 128 2 writethrough metadata2 smq 0".parse().unwrap();
        let b: Table = "0 8 cache 1:1 1:2 1:3 128 2 metadata2 writethrough smq 0".parse().unwrap();
        assert_eq!(a, b);
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn dev() -> impl Strategy<Value = String> {
            (0u32..300, 0u32..70000).prop_map(|(a, b)| format!("{a}:{b}"))
        }

        /// Tables in the kernel's grammar for every target vmthunder uses, with mutations:
        /// the parsers see both well-formed and near-miss input.
        fn line() -> impl Strategy<Value = String> {
            let word = prop_oneof![dev(), "[0-9]{1,20}", "[a-z_-]{1,12}", Just("P".to_string()), Just("round-robin".to_string())];
            let params = prop_oneof![
                (dev(), any::<u64>()).prop_map(|(d, o)| format!("linear {d} {o}")),
                dev().prop_map(|d| format!("snapshot-origin {d}")),
                (dev(), dev(), prop_oneof![Just("P"), Just("N"), Just("PO"), Just("X")], 0u64..1 << 20)
                    .prop_map(|(o, c, p, k)| format!("snapshot {o} {c} {p} {k}")),
                (dev(), dev(), dev(), 0u64..1 << 12).prop_map(|(m, d, o, b)| format!("cache {m} {d} {o} {b} 1 writethrough smq 0")),
                (prop::collection::vec(dev(), 0..4), any::<bool>(), 0u32..3).prop_map(|(ds, q, first)| {
                    let groups: Vec<String> = ds.iter().map(|d| format!("round-robin 0 1 1 {d} 1")).collect();
                    format!("multipath {} 0 {} {first} {}", if q { "1 queue_if_no_path" } else { "0" }, ds.len(), groups.join(" "))
                }),
                Just("zero".to_string()),
                prop::collection::vec(word, 0..12).prop_map(|w| format!("multipath {}", w.join(" "))),
                "\\PC{0,40}",
            ];
            (any::<u64>(), any::<u64>(), params).prop_map(|(a, b, p)| format!("{a} {b} {p}"))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]
            /// No panic (nor an allocation sized by a count in the input); a refusal is a typed
            /// error; what parses prints back to a table that parses to the same value.
            #[test]
            fn tables_never_panic_and_round_trip(lines in prop::collection::vec(line(), 1..4)) {
                let text = lines.join("\n");
                match text.parse::<Table>() {
                    Ok(t) => {
                        let again: Table = t.to_string().parse().unwrap();
                        prop_assert_eq!(&again, &t);
                        prop_assert_eq!(Table::from_kernel(&t.to_kernel()).unwrap(), t);
                    }
                    Err(e) => prop_assert_eq!(e.kind, crate::error::Kind::DeviceMapper),
                }
            }

            #[test]
            fn target_params_never_panic(t in prop_oneof![Just("linear"), Just("cache"), Just("snapshot"), Just("snapshot-origin"),
                                                           Just("multipath"), Just("zero")],
                                         params in prop_oneof!["\\PC{0,60}", "[0-9 ]{0,60}", "([0-9]{1,12} ){0,12}"]) {
                if let Ok(target) = Target::parse(t, &params) {
                    prop_assert_eq!(Target::parse(t, &target.params()).unwrap(), target);
                }
            }
        }

        #[test]
        fn a_huge_count_in_a_multipath_table_is_an_error_not_an_allocation() {
            for s in [
                "0 0 18446744073709551615 1",
                "0 0 1 1 round-robin 0 18446744073709551615 1 8:0 1",
                "0 0 1 4294967296 round-robin 0 1 1 8:0 1",
            ] {
                let e = s.parse::<MultipathParams>().unwrap_err();
                assert_eq!(e.kind, crate::error::Kind::DeviceMapper, "{s}");
            }
        }
    }
}
