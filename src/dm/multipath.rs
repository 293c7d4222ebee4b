//! dm-multipath target (Documentation/admin-guide/device-mapper/dm-multipath? see
//! drivers/md/dm-mpath.c): `<#features> <features..> <#hw handler args> <hw handler..>
//! <#groups> <first group> (<selector> <#selector args> <#paths> <#path args> (<dev> <args..>)..)..`.
//! vmthunder uses one priority group per parent tier; the kernel prints tables in this exact
//! grammar, so `Display` of a parsed kernel table reproduces it.
use std::{fmt, str::FromStr};

use devicemapper::Device;

use super::{parse_err, snapshot::parse_dev};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultipathPath {
    pub device: Device,
    /// Selector-specific per-path arguments (round-robin: the repeat count).
    pub args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathGroup {
    pub selector: String,
    pub selector_args: Vec<String>,
    pub paths: Vec<MultipathPath>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultipathParams {
    /// e.g. `queue_if_no_path`, `retain_attached_hw_handler`, `queue_mode bio` (as words).
    pub features: Vec<String>,
    pub hw_handler: Vec<String>,
    /// 1-based index of the group tried first (0 = kernel's choice).
    pub first_group: u32,
    pub groups: Vec<PathGroup>,
}

impl MultipathParams {
    /// Round-robin over `paths` in one group: every parent serves reads.
    pub fn round_robin(paths: &[Device], queue_if_no_path: bool) -> Self {
        let features = if queue_if_no_path { vec!["queue_if_no_path".to_string()] } else { vec![] };
        MultipathParams {
            features,
            hw_handler: vec![],
            first_group: 1,
            groups: vec![PathGroup {
                selector: "round-robin".into(),
                selector_args: vec![],
                paths: paths.iter().map(|d| MultipathPath { device: *d, args: vec!["1".into()] }).collect(),
            }],
        }
    }

    /// Failover: one group per path, tried in order (the first parent, then the next...).
    pub fn failover(paths: &[Device], queue_if_no_path: bool) -> Self {
        let mut p = Self::round_robin(&[], queue_if_no_path);
        p.groups = paths
            .iter()
            .map(|d| PathGroup {
                selector: "round-robin".into(),
                selector_args: vec![],
                paths: vec![MultipathPath { device: *d, args: vec!["1".into()] }],
            })
            .collect();
        p
    }

    pub fn devices(&self) -> impl Iterator<Item = Device> + '_ {
        self.groups.iter().flat_map(|g| g.paths.iter().map(|p| p.device))
    }
}

fn counted(f: &mut fmt::Formatter<'_>, words: &[String]) -> fmt::Result {
    write!(f, "{}", words.len())?;
    for w in words {
        write!(f, " {w}")?;
    }
    Ok(())
}

impl fmt::Display for MultipathParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        counted(f, &self.features)?;
        f.write_str(" ")?;
        counted(f, &self.hw_handler)?;
        write!(f, " {} {}", self.groups.len(), self.first_group)?;
        for g in &self.groups {
            write!(f, " {} ", g.selector)?;
            counted(f, &g.selector_args)?;
            let nargs = g.paths.first().map_or(0, |p| p.args.len());
            write!(f, " {} {}", g.paths.len(), nargs)?;
            for p in &g.paths {
                write!(f, " {}", p.device)?;
                for a in &p.args {
                    write!(f, " {a}")?;
                }
            }
        }
        Ok(())
    }
}

struct Words<'a> {
    it: std::slice::Iter<'a, &'a str>,
    whole: &'a str,
}

impl<'a> Words<'a> {
    fn next(&mut self, what: &str) -> Result<&'a str> {
        self.it.next().copied().ok_or_else(|| parse_err("multipath", self.whole, &format!("missing {what}")))
    }
    fn num(&mut self, what: &str) -> Result<usize> {
        let w = self.next(what)?;
        w.parse().map_err(|_| parse_err("multipath", self.whole, &format!("{what} {w:?} is not a number")))
    }
    fn counted(&mut self, what: &str) -> Result<Vec<String>> {
        let n = self.num(what)?;
        (0..n).map(|_| self.next(what).map(str::to_string)).collect()
    }
}

impl FromStr for MultipathParams {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let v: Vec<&str> = s.split_whitespace().collect();
        let mut w = Words { it: v.iter(), whole: s };
        let features = w.counted("features")?;
        let hw_handler = w.counted("hardware handler")?;
        let ngroups = w.num("number of path groups")?;
        let first_group =
            u32::try_from(w.num("first path group")?).map_err(|_| parse_err("multipath", s, "first path group out of range"))?;
        // Counts come from the input: never sized by them beyond the words there are.
        let mut groups = Vec::with_capacity(ngroups.min(v.len()));
        for _ in 0..ngroups {
            let selector = w.next("path selector")?.to_string();
            let selector_args = w.counted("selector args")?;
            let npaths = w.num("number of paths")?;
            let nargs = w.num("number of path args")?;
            let mut paths = Vec::with_capacity(npaths.min(v.len()));
            for _ in 0..npaths {
                let device = parse_dev(w.next("path device")?, s)?;
                let args = (0..nargs).map(|_| w.next("path arg").map(str::to_string)).collect::<Result<_>>()?;
                paths.push(MultipathPath { device, args });
            }
            groups.push(PathGroup { selector, selector_args, paths });
        }
        if let Some(extra) = w.it.next() {
            return Err(parse_err("multipath", s, &format!("unexpected trailing {extra:?}")));
        }
        Ok(MultipathParams { features, hw_handler, first_group, groups })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Device = Device { major: 8, minor: 0 };
    const B: Device = Device { major: 8, minor: 16 };

    #[test]
    fn round_robin_table() {
        let p = MultipathParams::round_robin(&[A, B], true);
        assert_eq!(p.to_string(), "1 queue_if_no_path 0 1 1 round-robin 0 2 1 8:0 1 8:16 1");
        assert_eq!(p.to_string().parse::<MultipathParams>().unwrap(), p);
    }

    #[test]
    fn failover_table() {
        let p = MultipathParams::failover(&[A, B], false);
        assert_eq!(p.to_string(), "0 0 2 1 round-robin 0 1 1 8:0 1 round-robin 0 1 1 8:16 1");
        assert_eq!(p.to_string().parse::<MultipathParams>().unwrap(), p);
        assert_eq!(p.devices().collect::<Vec<_>>(), vec![A, B]);
    }

    #[test]
    fn parses_kernel_output_with_feature_args() {
        // What 6.1 prints for a bio-based table with queueing.
        let s = "3 queue_if_no_path queue_mode bio 0 1 1 service-time 0 2 2 8:0 1 1 8:16 1 1";
        let p: MultipathParams = s.parse().unwrap();
        assert_eq!(p.features, ["queue_if_no_path", "queue_mode", "bio"]);
        assert_eq!(p.groups[0].paths[1].args, ["1", "1"]);
        assert_eq!(p.to_string(), s);
    }

    #[test]
    fn rejects_malformed() {
        for bad in ["", "1", "0 0 1 1 round-robin 0 2 1 8:0 1", "0 0 1 1 round-robin 0 1 1 8:0 1 junk", "x 0 0 0"] {
            assert!(bad.parse::<MultipathParams>().is_err(), "{bad:?}");
        }
    }
}
