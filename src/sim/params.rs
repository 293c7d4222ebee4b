//! The simulator's parameters: what the operator asks (nodes, VMs, rate, shape) and the
//! costs measured in the lab (bench/README.md, "Simulator calibration", names each one's
//! source). Given as JSON; omitted fields take the lab's values, unknown fields are errors.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How the nodes get the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// vmthunder's relay tree with `fanout` children per relay, placed by `placement`.
    Tree,
    /// A tree of fan-out 1.
    Chain,
    /// Boot from the volume: every VM reads the origin, nothing cached.
    Direct,
    /// SplitStream-like: `fanout` stripes, each spread by its own tree in which every node
    /// is interior in at most one. Simulated only, not in the data path.
    Striped,
    /// Nova's image cache: each node copies the whole image, then its VMs read the copy.
    FullCopy,
}

/// A relay that dies during the storm: at a time, or once its children hold a share of
/// what they need from it (so that it dies while its subtree still needs data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// Host name (`cn1` .. `cnN`), or `"auto"`: the relay with the most descendants.
    pub node: String,
    #[serde(default)]
    pub at_s: Option<f64>,
    /// Dies once its children hold this share (0-1, over all of them) of the chunks they
    /// fetch through it.
    #[serde(default)]
    pub children_have: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    pub nodes: usize,
    /// The boot trace file (bench/traces/*.json); without it, `working_set_bytes` read in order.
    pub trace: Option<String>,
    /// VMs, spread round-robin over the nodes (0: one per node).
    pub vms: usize,
    /// Each node's link rate, each direction, bits per second.
    pub rate_bps: f64,
    /// The origin's uplink (default: `rate_bps`).
    pub origin_rate_bps: Option<f64>,
    pub shape: Shape,
    pub fanout: u32,
    /// Scales the trace to this working set (default: the trace's own).
    pub working_set_bytes: Option<u64>,
    /// Image size for the full copy (default: the trace's `image_bytes`).
    pub image_bytes: Option<u64>,
    /// Granularity of transfers and caching.
    pub chunk_bytes: u64,
    /// Data bytes per link bit / 8: TCP, iSCSI and Ethernet headers and pacing.
    pub link_efficiency: f64,
    /// Bytes a relay fetches per byte its readers ask (readahead windows).
    pub fetch_amplification: f64,
    /// Round trip of one hop, seconds.
    pub rtt_s: f64,
    /// A relay's (or the origin's) service time per request, seconds.
    pub service_s: f64,
    /// Requests in flight per VM and their mean size.
    pub vm_depth: u32,
    pub request_bytes: u64,
    /// Requests a session keeps in flight at most (open-iscsi `cmds_max`).
    pub session_depth: u32,
    /// The boot-profile prefetch (every node that builds a template runs it): requests in
    /// flight, their size, and whether it walks the profile from its end (the library's
    /// default until 2026-12-05, with 2 in flight) instead of ahead of the VMs.
    pub prefetch: bool,
    pub prefetch_depth: u32,
    pub prefetch_reverse: bool,
    pub prefetch_request_bytes: u64,
    /// How fast a VM reads blocks its node already holds.
    pub local_read_bps: f64,
    /// Join costs: iSCSI login to the origin, cache set-up, one registry round and the rounds
    /// of a claim (serialised by the image's lock), a switch of the paths to a parent.
    pub login_s: f64,
    pub setup_s: f64,
    pub registry_round_s: f64,
    pub registry_rounds: u32,
    pub reparent_s: f64,
    /// Active parents per node (primary + standby secondaries), as `placement::Policy`.
    pub max_parents: u32,
    pub fail: Option<Failure>,
    /// How long reads wait on a dead parent before dm-multipath takes the next path.
    pub failover_s: f64,
    /// Stop a run that has not finished by then (simulated seconds).
    pub max_time_s: f64,
}

const MIB: f64 = 1024.0 * 1024.0;

impl Default for Params {
    fn default() -> Self {
        Params {
            nodes: 8,
            trace: None,
            vms: 0,
            rate_bps: 100e6,
            origin_rate_bps: None,
            shape: Shape::Tree,
            fanout: crate::placement::DEFAULT_FANOUT,
            working_set_bytes: None,
            image_bytes: None,
            chunk_bytes: 256 * 1024,
            link_efficiency: 0.95,
            fetch_amplification: 1.06,
            rtt_s: 0.0002,
            service_s: 0.0003,
            vm_depth: 8,
            request_bytes: 40 * 1024,
            session_depth: 128,
            prefetch: true,
            prefetch_depth: 8,
            prefetch_reverse: false,
            prefetch_request_bytes: 64 * 1024,
            local_read_bps: 40.0 * MIB,
            login_s: 0.6,
            setup_s: 0.5,
            registry_round_s: 0.01,
            registry_rounds: 4,
            reparent_s: 0.5,
            max_parents: 2,
            fail: None,
            failover_s: 0.5,
            max_time_s: 1e6,
        }
    }
}

/// A parameter the simulator cannot run with, or an input it cannot read.
#[derive(Debug, Clone, PartialEq)]
pub enum SimError {
    /// `field` has `value`, which breaks `reason`.
    InvalidParameter { field: &'static str, value: String, reason: &'static str },
    /// The trace file could not be read or parsed.
    Trace { path: String, message: String },
    /// The parameters are not valid JSON for [`Params`].
    Json { message: String },
    /// The tree could not be placed (a placement error, with its message).
    Placement { message: String },
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimError::InvalidParameter { field, value, reason } => {
                write!(f, "invalid simulation parameter {field} = {value}: {reason}")
            }
            SimError::Trace { path, message } => write!(f, "boot trace {path}: {message}"),
            SimError::Json { message } => write!(f, "invalid simulation parameters: {message}"),
            SimError::Placement { message } => write!(f, "placing the tree failed: {message}"),
        }
    }
}

impl std::error::Error for SimError {}

fn bad<T: fmt::Display>(field: &'static str, value: T, reason: &'static str) -> SimError {
    SimError::InvalidParameter { field, value: value.to_string(), reason }
}

impl Params {
    pub fn from_json(json: &str) -> Result<Params, SimError> {
        serde_json::from_str(json).map_err(|e| SimError::Json { message: e.to_string() })
    }

    pub fn vm_count(&self) -> usize {
        if self.vms == 0 {
            self.nodes
        } else {
            self.vms
        }
    }

    pub fn origin_rate(&self) -> f64 {
        self.origin_rate_bps.unwrap_or(self.rate_bps)
    }

    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.nodes == 0 || self.nodes > 100_000 {
            return Err(bad("nodes", self.nodes, "must be 1 to 100000"));
        }
        if self.vms > 1_000_000 {
            return Err(bad("vms", self.vms, "must be at most 1000000"));
        }
        let positive: [(&'static str, f64); 3] =
            [("rate_bps", self.rate_bps), ("origin_rate_bps", self.origin_rate()), ("local_read_bps", self.local_read_bps)];
        for (field, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(field, v, "must be a positive number"));
            }
        }
        if !(self.link_efficiency > 0.0 && self.link_efficiency <= 1.0) {
            return Err(bad("link_efficiency", self.link_efficiency, "must be in (0, 1]"));
        }
        if !(self.fetch_amplification >= 1.0 && self.fetch_amplification < 10.0) {
            return Err(bad("fetch_amplification", self.fetch_amplification, "must be in [1, 10)"));
        }
        let times: [(&'static str, f64); 8] = [
            ("rtt_s", self.rtt_s),
            ("service_s", self.service_s),
            ("login_s", self.login_s),
            ("setup_s", self.setup_s),
            ("registry_round_s", self.registry_round_s),
            ("reparent_s", self.reparent_s),
            ("failover_s", self.failover_s),
            ("max_time_s", self.max_time_s),
        ];
        for (field, v) in times {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(field, v, "must be a finite number of seconds >= 0"));
            }
        }
        if self.rtt_s + self.service_s <= 0.0 {
            return Err(bad("rtt_s", self.rtt_s, "rtt_s + service_s must be above 0"));
        }
        if self.fanout == 0 || self.fanout > 1024 {
            return Err(bad("fanout", self.fanout, "must be 1 to 1024"));
        }
        if self.chunk_bytes < 4096 || self.chunk_bytes > 64 << 20 {
            return Err(bad("chunk_bytes", self.chunk_bytes, "must be 4 KiB to 64 MiB"));
        }
        if self.vm_depth == 0 || self.request_bytes == 0 {
            return Err(bad("vm_depth", self.vm_depth, "vm_depth and request_bytes must be at least 1"));
        }
        if self.session_depth == 0 {
            return Err(bad("session_depth", self.session_depth, "must be at least 1"));
        }
        if self.prefetch && (self.prefetch_depth == 0 || self.prefetch_request_bytes == 0) {
            return Err(bad("prefetch_depth", self.prefetch_depth, "must be at least 1 with prefetch on"));
        }
        if self.max_parents == 0 {
            return Err(bad("max_parents", self.max_parents, "must be at least 1"));
        }
        if self.trace.is_none() && self.working_set_bytes.is_none() {
            return Err(bad("trace", "null", "give a trace file or working_set_bytes"));
        }
        if let Some(ws) = self.working_set_bytes {
            if ws < self.chunk_bytes {
                return Err(bad("working_set_bytes", ws, "must be at least one chunk"));
            }
        }
        if let Some(f) = &self.fail {
            match (f.at_s, f.children_have) {
                (Some(t), None) if !(t.is_finite() && t >= 0.0) => {
                    return Err(bad("fail.at_s", t, "must be a finite time >= 0"));
                }
                (None, Some(x)) if !(x > 0.0 && x < 1.0) => {
                    return Err(bad("fail.children_have", x, "must be a share in (0, 1)"));
                }
                (Some(_), None) | (None, Some(_)) => {}
                _ => return Err(bad("fail", &f.node, "give exactly one of at_s and children_have")),
            }
            if matches!(self.shape, Shape::Direct | Shape::FullCopy) {
                return Err(bad("fail.node", &f.node, "only a relay can fail: use shape tree, chain or striped"));
            }
        }
        Ok(())
    }
}
