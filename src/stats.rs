//! What an operator watches: the byte counters of each template's parents and children and
//! its cache's hits and misses, read from the kernel and added to `Node::status()`; the attach
//! and join durations this node's processes recorded in the state dir; and all of it in
//! Prometheus' text format (node_exporter's textfile collector). Metric names, units and
//! labels: README, "Metrics".
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    error::{Error, Kind, Result},
    iscsi, names,
    node::lock,
};

const CONFIGFS_ISCSI: &str = "/sys/kernel/config/target/iscsi";

/// Sectors read, from a block device's `stat` line (Documentation/block/stat.rst, field 3).
pub fn sectors_read(stat: &str) -> Option<u64> {
    stat.split_whitespace().nth(2)?.parse().ok()
}

/// The iSCSI session number in a block device's sysfs path
/// (`/sys/devices/platform/host0/session1/target0:0:0/0:0:0:0/block/sda`).
pub fn session_of(sysfs_path: &Path) -> Option<u32> {
    sysfs_path.components().filter_map(|c| c.as_os_str().to_str()?.strip_prefix("session")?.parse().ok()).next_back()
}

/// Cache hits and misses (reads) from a template's `cache_status`: bcache's
/// "bcache state=.. hits=N misses=N bypassed=.." or dm-cache's status line
/// ("cache <md block> <used>/<total> <block> <used>/<total> <read hits> <read misses> ...").
pub fn cache_counters(status: &str) -> Option<(u64, u64)> {
    let words: Vec<&str> = status.split_whitespace().collect();
    match words.first() {
        Some(&"bcache") => {
            let get = |k: &str| words.iter().find_map(|w| w.strip_prefix(k)?.parse::<u64>().ok());
            Some((get("hits=")?, get("misses=")?))
        }
        Some(&"cache") => Some((words.get(5)?.parse().ok()?, words.get(6)?.parse().ok()?)),
        _ => None,
    }
}

fn read_trim(p: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn read_bytes_of(dev: &str) -> Option<u64> {
    read_trim(format!("/sys/dev/block/{dev}/stat")).as_deref().and_then(sectors_read).map(|s| s * 512)
}

/// Add the kernel's counters to `status` (what `Node::status()` returned), per template:
/// each path's parent (`target`, `portal`, `parent`: its host, or "origin") and `read_bytes`;
/// `served`: per child initiator, whether its session is live and the bytes sent to it in that
/// session; `cache`: hits and misses; `local_read_bytes`: what this node's VMs read through its
/// local disk.
pub fn add_counters(status: &mut Value) {
    let sessions = iscsi::sessions();
    let Some(templates) = status.get_mut("templates").and_then(Value::as_object_mut) else { return };
    for (image, t) in templates.iter_mut() {
        if let Some(paths) = t.get_mut("paths").and_then(Value::as_array_mut) {
            for p in paths.iter_mut() {
                let Some(dev) = p.get("device").and_then(Value::as_str).map(str::to_string) else { continue };
                p["read_bytes"] = read_bytes_of(&dev).into();
                let sid = fs::canonicalize(format!("/sys/dev/block/{dev}")).ok().and_then(|c| session_of(&c));
                if let Some(s) = sid.and_then(|sid| sessions.iter().find(|s| s.sid == sid)) {
                    p["target"] = s.iqn.clone().into();
                    p["portal"] = s.portal.clone().into();
                    p["parent"] = match names::parse_template_iqn(&s.iqn) {
                        Some((host, img)) if &img == image => host.into(),
                        _ => "origin".into(),
                    };
                }
            }
        }
        let mut served = serde_json::Map::new();
        if let Some(iqn) = t.get("export_iqn").and_then(Value::as_str) {
            let live: Vec<&str> = t["children"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
            for acl in t["child_acls"].as_array().cloned().unwrap_or_default().iter().filter_map(Value::as_str) {
                let f = PathBuf::from(CONFIGFS_ISCSI)
                    .join(iqn)
                    .join("tpgt_1/acls")
                    .join(acl)
                    .join("fabric_statistics/iscsi_sess_stats/txdata_octs");
                let session = live.contains(&acl);
                let bytes = if session { read_trim(f).and_then(|s| s.parse::<u64>().ok()) } else { None };
                served.insert(acl.to_string(), json!({"session": session, "bytes": bytes}));
            }
        }
        t["served"] = Value::Object(served);
        if let Some((hits, misses)) = t.get("cache_status").and_then(Value::as_str).and_then(cache_counters) {
            t["cache"] = json!({"hits": hits, "misses": misses});
        }
        let disk = t["devices"].get("disk").and_then(Value::as_str).and_then(|d| fs::metadata(d).ok());
        if let Some(m) = disk {
            use std::os::unix::fs::MetadataExt;
            let dev = format!("{}:{}", libc::major(m.rdev()), libc::minor(m.rdev()));
            t["local_read_bytes"] = read_bytes_of(&dev).into();
        }
    }
}

/// Durations of one kind of operation, as recorded.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Durations {
    pub count: u64,
    pub sum_s: f64,
    pub last_s: f64,
    pub max_s: f64,
}

/// What `record_duration` takes: attaches (`Node.attach`, the kernel part) and joins
/// (`Tree.attach` building an image's template through the relay tree).
pub const OPERATIONS: [&str; 2] = ["attach", "join"];

fn durations_file(state_dir: &Path) -> PathBuf {
    state_dir.join("stats").join("durations.json")
}

/// The recorded durations per operation (none recorded: empty).
pub fn durations(state_dir: &Path) -> BTreeMap<String, Durations> {
    fs::read(durations_file(state_dir)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Add one `op` that took `seconds` to the state dir's record (under a lock; written to a new
/// private file and renamed over the old one, never through a link).
pub fn record_duration(state_dir: &Path, op: &str, seconds: f64) -> Result<()> {
    if !OPERATIONS.contains(&op) {
        return Err(Error::invalid(format!("invalid operation {op:?}: expected one of {OPERATIONS:?}")));
    }
    if !(seconds.is_finite() && seconds >= 0.0) {
        return Err(Error::invalid(format!("invalid duration {seconds}: a finite number of seconds >= 0")));
    }
    let _lock = lock::acquire(&state_dir.join("locks"), "stats", Duration::from_secs(10))?;
    let mut all = durations(state_dir);
    let d = all.entry(op.to_string()).or_default();
    d.count += 1;
    d.sum_s += seconds;
    d.last_s = seconds;
    d.max_s = d.max_s.max(seconds);
    let path = durations_file(state_dir);
    let dir = path.parent().expect("has a parent");
    let err = |e: std::io::Error, what: &Path| Error::invalid(format!("{}: {e}", what.display()));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| err(e, dir))?;
    let tmp = dir.join(format!(".durations.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let body = serde_json::to_vec(&all).expect("serialises");
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&body))
        .and_then(|_| fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(err(e, &path));
    }
    Ok(())
}

/// Families in output order: name, type, help.
const FAMILIES: &[(&str, &str, &str)] = &[
    ("vmthunder_info", "gauge", "1, labelled with this node's host name, default cache engine and vmthunder version."),
    ("vmthunder_local_device_bytes", "gauge", "Size of the local (cache) device."),
    ("vmthunder_local_device_used_bytes", "gauge", "Bytes of the local device carved into slices (caches, VM copy-on-write)."),
    ("vmthunder_template_size_bytes", "gauge", "Size of each image this node holds a template of."),
    ("vmthunder_template_vms", "gauge", "VMs on this node using each image's template."),
    ("vmthunder_template_children", "gauge", "Child nodes with a live iSCSI session to this node's export of each image."),
    ("vmthunder_path_up", "gauge", "Each path of a template to a parent (position 0 first; the origin volume last): 1 active, 0 failed."),
    (
        "vmthunder_parent_read_bytes_total",
        "counter",
        "Bytes this node read from each parent path (block-layer counter of the path's iSCSI disk).",
    ),
    ("vmthunder_child_connected", "gauge", "Each child initiator granted this node's export of an image: 1 while its session is live."),
    (
        "vmthunder_child_served_bytes_total",
        "counter",
        "Bytes this node sent to each child in its current iSCSI session (LIO; restarts with the session).",
    ),
    ("vmthunder_local_read_bytes_total", "counter", "Bytes this node's own VMs read from each template (its local disk)."),
    ("vmthunder_cache_hits_total", "counter", "Reads of each template served from the local cache."),
    ("vmthunder_cache_misses_total", "counter", "Reads of each template fetched from the parents (cache misses)."),
    ("vmthunder_cache_hit_ratio", "gauge", "cache hits / (hits + misses) of each template since its cache was set up."),
    ("vmthunder_vm_cow_used_bytes", "gauge", "Bytes of each VM's copy-on-write space holding its writes (dm snapshots)."),
    ("vmthunder_vm_cow_size_bytes", "gauge", "Size of each VM's copy-on-write space; the VM's disk fails when it is full."),
    (
        "vmthunder_vm_cow_valid",
        "gauge",
        "1 while a VM's snapshot is usable, 0 once its copy-on-write space overflowed (its disk returns errors).",
    ),
    ("vmthunder_attach_duration_seconds", "summary", "Time of each VM attach on this node (Node.attach: template and snapshot)."),
    ("vmthunder_attach_last_duration_seconds", "gauge", "Time of the latest VM attach."),
    ("vmthunder_attach_max_duration_seconds", "gauge", "Longest VM attach recorded."),
    (
        "vmthunder_join_duration_seconds",
        "summary",
        "Time of each join of an image's relay tree (Tree.attach building the template: placement, logins, build).",
    ),
    ("vmthunder_join_last_duration_seconds", "gauge", "Time of the latest join."),
    ("vmthunder_join_max_duration_seconds", "gauge", "Longest join recorded."),
];

/// One sample: its labels and value.
type Sample = (Vec<(&'static str, String)>, f64);

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Prometheus text exposition (format 0.0.4) of a node: `status` is `Node::status()` with
/// `add_counters`, `durations` what `durations()` returned.
pub fn prometheus(status: &Value, durations: &BTreeMap<String, Durations>) -> String {
    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    let mut add = |name: &'static str, labels: Vec<(&'static str, String)>, v: Option<f64>| {
        if let Some(v) = v {
            samples.entry(name).or_default().push((labels, v));
        }
    };
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let f = |v: &Value| v.as_f64();
    add(
        "vmthunder_info",
        vec![("host", s(&status["host"])), ("engine", s(&status["engine"])), ("version", env!("CARGO_PKG_VERSION").to_string())],
        Some(1.0),
    );
    add("vmthunder_local_device_bytes", vec![], f(&status["local_device_bytes"]));
    add("vmthunder_local_device_used_bytes", vec![], f(&status["local_device_used_bytes"]));
    let empty = serde_json::Map::new();
    for (image, t) in status["templates"].as_object().unwrap_or(&empty) {
        let img = || vec![("image", image.clone())];
        add("vmthunder_template_size_bytes", img(), f(&t["size_bytes"]));
        add("vmthunder_template_vms", img(), t["vms"].as_array().map(|a| a.len() as f64));
        add("vmthunder_template_children", img(), t["children"].as_array().map(|a| a.len() as f64));
        for (i, p) in t["paths"].as_array().cloned().unwrap_or_default().iter().enumerate() {
            let labels = vec![
                ("image", image.clone()),
                ("position", i.to_string()),
                ("parent", p.get("parent").map(s).unwrap_or_else(|| "unknown".into())),
                ("portal", p.get("portal").map(s).unwrap_or_default()),
            ];
            add("vmthunder_path_up", labels.clone(), Some(if p["state"] == "A" { 1.0 } else { 0.0 }));
            add("vmthunder_parent_read_bytes_total", labels, f(&p["read_bytes"]));
        }
        for (initiator, c) in t["served"].as_object().unwrap_or(&empty) {
            let labels = vec![("image", image.clone()), ("initiator", initiator.clone())];
            add("vmthunder_child_connected", labels.clone(), Some(if c["session"] == true { 1.0 } else { 0.0 }));
            add("vmthunder_child_served_bytes_total", labels, f(&c["bytes"]));
        }
        add("vmthunder_local_read_bytes_total", img(), f(&t["local_read_bytes"]));
        let engine = || vec![("image", image.clone()), ("engine", s(&t["engine"]))];
        if let (Some(h), Some(m)) = (f(&t["cache"]["hits"]), f(&t["cache"]["misses"])) {
            add("vmthunder_cache_hits_total", engine(), Some(h));
            add("vmthunder_cache_misses_total", engine(), Some(m));
            add("vmthunder_cache_hit_ratio", engine(), (h + m > 0.0).then(|| h / (h + m)));
        }
    }
    for (vm, v) in status["vms"].as_object().unwrap_or(&empty) {
        let labels = || vec![("vm", vm.clone()), ("image", s(&v["image"])), ("mode", s(&v["mode"]))];
        let cow = &v["cow"];
        add("vmthunder_vm_cow_used_bytes", labels(), f(&cow["used_sectors"]).map(|x| x * 512.0));
        add("vmthunder_vm_cow_size_bytes", labels(), f(&v["cow_size_bytes"]));
        if let Some(state) = cow["state"].as_str() {
            add("vmthunder_vm_cow_valid", labels(), Some(if state == "valid" { 1.0 } else { 0.0 }));
        }
    }
    let mut out = String::new();
    for (name, kind, help) in FAMILIES {
        if let Some(op) = name.strip_suffix("_last_duration_seconds").or_else(|| name.strip_suffix("_max_duration_seconds")) {
            let d = durations.get(op.trim_start_matches("vmthunder_"));
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            if let Some(d) = d {
                let v = if name.contains("_last_") { d.last_s } else { d.max_s };
                let _ = writeln!(out, "{name} {}", number(v));
            }
            continue;
        }
        if let Some(op) = name.strip_suffix("_duration_seconds") {
            let op = op.trim_start_matches("vmthunder_");
            let d = durations.get(op).copied().unwrap_or_default();
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}_sum {}\n{name}_count {}", number(d.sum_s), d.count);
            continue;
        }
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples.get(name).map(Vec::as_slice).unwrap_or_default() {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            let l = if l.is_empty() { String::new() } else { format!("{{{}}}", l.join(",")) };
            let _ = writeln!(out, "{name}{l} {}", number(*v));
        }
    }
    out
}

/// Write `text` to `path` as node_exporter's textfile collector wants it: a new file in the
/// same directory renamed over the old one, so a scrape never reads half a file.
pub fn write_textfile(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| Error::invalid(format!("metrics file {}: not a file name", path.display())))?;
    let tmp = dir.join(format!(".{}.{}", name.to_string_lossy(), std::process::id()));
    let _ = fs::remove_file(&tmp);
    let r = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
        .and_then(|_| fs::rename(&tmp, path));
    r.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::new(Kind::InvalidArgument, format!("write metrics to {}: {e}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_from_the_kernels_text() {
        assert_eq!(
            sectors_read("      26        0    23808      167        0        0        0        0        0      130      167"),
            Some(23808)
        );
        assert_eq!(sectors_read("1 2"), None);
        assert_eq!(session_of(Path::new("/sys/devices/platform/host0/session12/target0:0:0/0:0:0:0/block/sda")), Some(12));
        assert_eq!(session_of(Path::new("/sys/devices/tcm_loop_0/tcm_loop_adapter_0/host1/target1:0:1/1:0:1:0/block/sdb")), None);
        assert_eq!(cache_counters("bcache state=clean hits=12 misses=3 bypassed=0.0k"), Some((12, 3)));
        assert_eq!(cache_counters("bcache state=clean hits= misses= bypassed="), None);
        assert_eq!(
            cache_counters("cache 8 24/4096 128 10/512 77 5 0 0 0 10 0 1 writethrough 2 migration_threshold 2048 smq 0 rw -"),
            Some((77, 5))
        );
        assert_eq!(cache_counters("linear"), None);
    }

    fn fixture() -> Value {
        json!({
            "host": "cn1", "engine": "bcache", "local_device_bytes": 268435456u64, "local_device_used_bytes": 168820736u64,
            "templates": {"im1": {
                "size_bytes": 33554432u64, "vms": ["vm1"], "children": ["iqn.x:c"], "engine": "bcache",
                "paths": [{"device": "8:0", "state": "A", "parent": "cn0", "portal": "198.18.0.1:3260", "read_bytes": 10485760u64},
                          {"device": "8:16", "state": "F", "parent": "origin", "portal": "198.18.0.9:3260", "read_bytes": 0}],
                "served": {"iqn.x:c": {"session": true, "bytes": 10502428u64}, "iqn.x:\"d\"": {"session": false, "bytes": null}},
                "cache": {"hits": 30, "misses": 10}, "local_read_bytes": 4096}},
            "vms": {"vm1": {"image": "im1", "mode": "dm", "cow_size_bytes": 33554432u64,
                            "cow": {"state": "valid", "used_sectors": 16, "size_sectors": 65536, "metadata_sectors": 16}}}
        })
    }

    #[test]
    fn prometheus_text_has_every_series_with_its_labels() {
        let mut d = BTreeMap::new();
        d.insert("attach".to_string(), Durations { count: 2, sum_s: 3.5, last_s: 1.25, max_s: 2.25 });
        let text = prometheus(&fixture(), &d);
        for line in [
            "vmthunder_info{host=\"cn1\",engine=\"bcache\",version=\"",
            "vmthunder_path_up{image=\"im1\",position=\"0\",parent=\"cn0\",portal=\"198.18.0.1:3260\"} 1\n",
            "vmthunder_path_up{image=\"im1\",position=\"1\",parent=\"origin\",portal=\"198.18.0.9:3260\"} 0\n",
            "vmthunder_parent_read_bytes_total{image=\"im1\",position=\"0\",parent=\"cn0\",portal=\"198.18.0.1:3260\"} 10485760\n",
            "vmthunder_child_served_bytes_total{image=\"im1\",initiator=\"iqn.x:c\"} 10502428\n",
            "vmthunder_child_connected{image=\"im1\",initiator=\"iqn.x:\\\"d\\\"\"} 0\n",
            "vmthunder_cache_hit_ratio{image=\"im1\",engine=\"bcache\"} 0.75\n",
            "vmthunder_vm_cow_used_bytes{vm=\"vm1\",image=\"im1\",mode=\"dm\"} 8192\n",
            "vmthunder_vm_cow_valid{vm=\"vm1\",image=\"im1\",mode=\"dm\"} 1\n",
            "vmthunder_attach_duration_seconds_sum 3.5\nvmthunder_attach_duration_seconds_count 2\n",
            "vmthunder_attach_last_duration_seconds 1.25\n",
            "vmthunder_join_duration_seconds_sum 0\nvmthunder_join_duration_seconds_count 0\n",
            "# TYPE vmthunder_cache_hits_total counter\nvmthunder_cache_hits_total{image=\"im1\",engine=\"bcache\"} 30\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // a child without a session has no byte count (no sample rather than a made-up 0)
        assert!(!text.contains("vmthunder_child_served_bytes_total{image=\"im1\",initiator=\"iqn.x:\\\"d\\\"\"}"));
        // every family once, its samples right after its TYPE line
        for (name, _, _) in FAMILIES {
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1, "{name}");
        }
    }

    #[test]
    fn durations_accumulate_in_the_state_dir_and_bad_input_is_refused() {
        let dir = std::env::temp_dir().join(format!("vmt-stats-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        record_duration(&dir, "attach", 1.5).unwrap();
        record_duration(&dir, "attach", 0.5).unwrap();
        record_duration(&dir, "join", 4.0).unwrap();
        let d = durations(&dir);
        assert_eq!(d["attach"], Durations { count: 2, sum_s: 2.0, last_s: 0.5, max_s: 1.5 });
        assert_eq!(d["join"].count, 1);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(durations_file(&dir)).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(record_duration(&dir, "boot", 1.0).unwrap_err().kind, Kind::InvalidArgument);
        assert!(record_duration(&dir, "attach", f64::NAN).unwrap_err().message.contains("NaN"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
