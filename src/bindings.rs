//! The Python module `vmthunder._vmthunder`: the `Node` class and one exception class per
//! error kind. Work runs with the GIL released; Rust `log` records go to Python's `logging`
//! under the logger name `vmthunder` (pyo3-log).
use std::{collections::BTreeMap, time::Duration};

use pyo3::{
    create_exception,
    exceptions::PyException,
    prelude::*,
    types::{PyList, PyTuple},
};
use serde_json::Value;

use crate::{
    error::{Error as RsError, Kind},
    lio::Lio,
    names,
    node::{self, Config, SnapshotMode},
};

mod tree;

create_exception!(vmthunder, Error, PyException, "Base class of every vmthunder error.");
create_exception!(vmthunder, InvalidArgument, Error, "A value passed in is malformed; nothing was created.");
create_exception!(vmthunder, NotFound, Error, "The image, VM or device does not exist on this node.");
create_exception!(vmthunder, Busy, Error, "The object is in use (by a VM or a child node).");
create_exception!(vmthunder, CacheDeviceError, Error, "The local cache device is missing, not a block device or full.");
create_exception!(vmthunder, IscsiError, Error, "open-iscsi failed: discovery, login, LUN scan or logout.");
create_exception!(vmthunder, LioError, Error, "The LIO target (configfs) refused an operation.");
create_exception!(vmthunder, DeviceMapperError, Error, "A device-mapper operation failed.");
create_exception!(vmthunder, SnapshotError, Error, "Creating or removing a VM snapshot failed.");
create_exception!(vmthunder, StateDirError, Error, "The state directory (locks, saved origins, overlays) cannot be used.");
create_exception!(
    vmthunder,
    RollbackError,
    Error,
    "An operation failed and undoing it failed too: `left_behind` lists what stayed, the message says why it failed."
);

fn to_py(e: RsError) -> PyErr {
    let m = e.message;
    let left_behind = e.left_behind;
    match e.kind {
        Kind::InvalidArgument => InvalidArgument::new_err(m),
        Kind::NotFound => NotFound::new_err(m),
        Kind::Busy => Busy::new_err(m),
        Kind::CacheDevice => CacheDeviceError::new_err(m),
        Kind::Iscsi => IscsiError::new_err(m),
        Kind::Lio => LioError::new_err(m),
        Kind::DeviceMapper => DeviceMapperError::new_err(m),
        Kind::Snapshot => SnapshotError::new_err(m),
        Kind::StateDir => StateDirError::new_err(m),
        Kind::Rollback => Python::with_gil(|py| {
            let err = RollbackError::new_err(m);
            if let Err(e) = err.value(py).setattr("left_behind", left_behind) {
                return e;
            }
            err
        }),
    }
}

fn json_to_py(py: Python<'_>, v: &Value) -> PyResult<PyObject> {
    Ok(py.import("json")?.call_method1("loads", (v.to_string(),))?.unbind())
}

fn py_to_json(py: Python<'_>, what: &str, obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    let s: String = py
        .import("json")?
        .call_method1("dumps", (obj,))
        .map_err(|e| InvalidArgument::new_err(format!("{what} is not JSON-like data: {e}")))?
        .extract()?;
    serde_json::from_str(&s).map_err(|e| InvalidArgument::new_err(format!("{what}: {e}")))
}

fn sources_json(py: Python<'_>, sources: &Bound<'_, PyAny>) -> PyResult<Vec<Value>> {
    if !(sources.is_instance_of::<PyList>() || sources.is_instance_of::<PyTuple>()) {
        return Err(InvalidArgument::new_err(format!("sources must be a list of connection dicts, got {}", sources.get_type().name()?)));
    }
    match py_to_json(py, "sources", sources)? {
        Value::Array(v) => Ok(v),
        _ => Err(InvalidArgument::new_err("sources must be a list of connection dicts")),
    }
}

/// A boot profile from Python: [[offset, length], ...] of non-negative integers.
fn ranges_of(v: Value) -> PyResult<Vec<(u64, u64)>> {
    let Value::Array(items) = v else { return Err(InvalidArgument::new_err("ranges must be a list of [offset, length] pairs")) };
    items
        .iter()
        .enumerate()
        .map(|(i, r)| match r.as_array().map(|a| a.iter().map(Value::as_u64).collect::<Vec<_>>()).as_deref() {
            Some([Some(o), Some(l)]) => Ok((*o, *l)),
            _ => Err(InvalidArgument::new_err(format!("ranges[{i}] = {r}: expected [offset, length], non-negative integers"))),
        })
        .collect()
}

/// simulate(params) -> dict: one simulated boot storm (src/sim). `params` is a dict of
/// `sim::Params` fields (omitted ones take the lab's values); a bad or unknown field, an
/// unreadable trace or a tree that cannot be placed raise InvalidArgument naming it.
#[pyfunction]
fn simulate(py: Python<'_>, params: &Bound<'_, PyAny>) -> PyResult<PyObject> {
    let p = py_to_json(py, "params", params)?.to_string();
    let out = py.allow_threads(|| crate::sim::simulate_json(&p)).map_err(|e| InvalidArgument::new_err(e.to_string()))?;
    Ok(py.import("json")?.call_method1("loads", (out,))?.unbind())
}

/// One compute node's vmthunder state. Cheap to create: all state lives in the kernel.
#[pyclass(module = "vmthunder", frozen)]
pub struct Node {
    inner: node::Node,
}

#[pymethods]
impl Node {
    /// Node(host, cache_device, state_dir, export_ip=None, export_port=3260, engine="bcache",
    ///      cache_block_kib=64, cache_size_mib=None, cow_size_mib=1024, scan_timeout_s=15.0,
    ///      path_timeout_s=5, coalesce=True, readahead_kib=4, cow_warn_percent=90, queue_timeout_s=60)
    #[new]
    #[pyo3(signature = (host, cache_device, state_dir, export_ip=None, export_port=3260, engine="bcache",
                        cache_block_kib=64, cache_size_mib=None, cow_size_mib=1024, scan_timeout_s=15.0, path_timeout_s=5,
                        coalesce=true, readahead_kib=4, cow_warn_percent=90, queue_timeout_s=60))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        host: &str,
        cache_device: &str,
        state_dir: &str,
        export_ip: Option<String>,
        export_port: u16,
        engine: &str,
        cache_block_kib: u64,
        cache_size_mib: Option<u64>,
        cow_size_mib: u64,
        scan_timeout_s: f64,
        path_timeout_s: u32,
        coalesce: bool,
        readahead_kib: u32,
        cow_warn_percent: u8,
        queue_timeout_s: u32,
    ) -> PyResult<Self> {
        if !(scan_timeout_s > 0.0 && scan_timeout_s <= 600.0) {
            return Err(InvalidArgument::new_err(format!("invalid scan_timeout_s {scan_timeout_s}: 0 < t <= 600")));
        }
        let mut cfg = Config::new(host, cache_device, state_dir);
        cfg.export.export_ip = export_ip;
        cfg.export.export_port = export_port;
        cfg.cache.cache_block_sectors = cache_block_kib.saturating_mul(2);
        cfg.cache.cache_sectors = cache_size_mib.map(|m| m.saturating_mul(2048));
        cfg.cow_sectors = cow_size_mib.saturating_mul(2048);
        cfg.paths.scan_timeout = Duration::from_secs_f64(scan_timeout_s);
        cfg.cache.engine = engine.parse().map_err(to_py)?;
        cfg.paths.path_timeout_s = path_timeout_s;
        cfg.export.coalesce = coalesce;
        cfg.export.readahead_kib = readahead_kib;
        cfg.cow_warn_percent = cow_warn_percent;
        cfg.paths.queue_timeout_s = queue_timeout_s;
        let inner = py.allow_threads(|| node::Node::new(cfg)).map_err(to_py)?;
        Ok(Node { inner })
    }

    /// Attach VM `vm_id` to image `image_id`, building the image's template from `sources`
    /// (a list of Cinder iSCSI connection_info dicts: parents first, the origin volume last)
    /// unless this node has it already. Returns the path the hypervisor opens: a block device
    /// (snapshot="dm") or a qcow2 overlay file (snapshot="vmm").
    #[pyo3(signature = (image_id, sources, vm_id, snapshot="dm"))]
    fn attach(&self, py: Python<'_>, image_id: &str, sources: &Bound<'_, PyAny>, vm_id: &str, snapshot: &str) -> PyResult<String> {
        let sources = sources_json(py, sources)?;
        let mode: SnapshotMode = snapshot.parse().map_err(to_py)?;
        py.allow_threads(|| {
            let t = std::time::Instant::now();
            let path = self.inner.attach(image_id, &sources, vm_id, mode)?;
            // for `vmthunder metrics`; a record that fails does not fail the attach
            if let Err(e) = crate::stats::record_duration(&self.inner.config().state_dir, "attach", t.elapsed().as_secs_f64()) {
                log::warn!("attach duration not recorded: {e}");
            }
            Ok(path)
        })
        .map_err(to_py)
    }

    /// Point the template of `image_id` at new parents (`sources`: parents first, the origin
    /// last), reloading its multipath table in place; returns the new table.
    fn reparent(&self, py: Python<'_>, image_id: &str, sources: &Bound<'_, PyAny>) -> PyResult<String> {
        let sources = sources_json(py, sources)?;
        py.allow_threads(|| self.inner.reparent(image_id, &sources)).map_err(to_py)
    }

    /// prefetch(image_id, ranges, depth=None, chunk_kib=64, reverse=None, stop=None) -> dict
    ///
    /// Read a boot profile (`ranges`: [(offset, length)] in bytes, first-read order) through the
    /// template so the cache holds it. `stop`: an object with `is_set()` (threading.Event),
    /// asked before each read. Returns {"bytes", "reads", "planned_bytes", "seconds", "complete"}.
    /// Defaults are measured (`prefetch::Access`): through a coalescing template's page cache
    /// forwards, 8 reads in flight; with O_DIRECT from the profile's end, 1 in flight (bcache
    /// drops the inserts of misses that come faster than its allocator frees buckets: a second
    /// pass refetched 7 % at 64 KiB x 1, 23 % at x 2).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (image_id, ranges, depth=None, chunk_kib=64, reverse=None, stop=None))]
    fn prefetch(
        &self,
        py: Python<'_>,
        image_id: &str,
        ranges: &Bound<'_, PyAny>,
        depth: Option<usize>,
        chunk_kib: u64,
        reverse: Option<bool>,
        stop: Option<PyObject>,
    ) -> PyResult<PyObject> {
        let ranges = ranges_of(py_to_json(py, "ranges", ranges)?)?;
        // A stop whose is_set() raises counts as set: better end early than read on.
        let asked = || {
            stop.as_ref().is_some_and(|s| Python::with_gil(|py| s.call_method0(py, "is_set").and_then(|v| v.is_truthy(py)).unwrap_or(true)))
        };
        let report = py
            .allow_threads(|| self.inner.prefetch(image_id, &ranges, depth, chunk_kib.saturating_mul(1024), reverse, &asked))
            .map_err(to_py)?;
        json_to_py(py, &serde_json::to_value(report).expect("report serialises"))
    }

    /// Remove the VM's snapshot; the template goes too when no VM and no child uses it, layer
    /// by layer down to the first one still open (kept then). Busy while a process holds the
    /// VM's disk or its qcow2 overlay open.
    fn detach(&self, py: Python<'_>, vm_id: &str) -> PyResult<()> {
        py.allow_threads(|| self.inner.detach(vm_id)).map_err(to_py)
    }

    /// image_of(vm_id) -> the id of the image whose template the VM's disk is a snapshot of,
    /// or None when the VM is not attached here.
    fn image_of(&self, py: Python<'_>, vm_id: &str) -> PyResult<Option<String>> {
        py.allow_threads(|| self.inner.image_of(vm_id)).map_err(to_py)
    }

    /// templates() -> {image_id: Template}: this node's templates, read from the kernel (what
    /// `status()` reports under "templates").
    fn templates(&self, py: Python<'_>) -> PyResult<BTreeMap<String, tree::PyTemplate>> {
        let t = py.allow_threads(|| self.inner.templates()).map_err(to_py)?;
        Ok(t.into_iter().map(|(image, t)| (image.clone(), tree::PyTemplate::new(image, t))).collect())
    }

    /// template(image_id) -> Template, or None when this node has no template of the image.
    fn template(&self, py: Python<'_>, image_id: &str) -> PyResult<Option<tree::PyTemplate>> {
        names::validate_id("image id", image_id).map_err(to_py)?;
        let mut t = py.allow_threads(|| self.inner.templates()).map_err(to_py)?;
        Ok(t.remove(image_id).map(|t| tree::PyTemplate::new(image_id.to_string(), t)))
    }

    /// Let a child node (its initiator IQN) read this node's copy of `image_id`; returns the
    /// connection dict (with its own CHAP credentials) the child passes to `attach`.
    fn export_info(&self, py: Python<'_>, image_id: &str, initiator: &str) -> PyResult<PyObject> {
        let v = py.allow_threads(|| self.inner.export_info(image_id, initiator)).map_err(to_py)?;
        json_to_py(py, &v)
    }

    /// Revoke the grants (ACL + CHAP) of `image_id`'s export held by initiators not in
    /// `initiators` and without a live session: hosts that left. Returns those revoked.
    fn revoke_grants(&self, py: Python<'_>, image_id: &str, initiators: Vec<String>) -> PyResult<Vec<String>> {
        py.allow_threads(|| self.inner.revoke_grants(image_id, &initiators)).map_err(to_py)
    }

    /// Make the node's shared cache (bcache cache set) now, not at the first attach.
    fn prepare_cache(&self, py: Python<'_>) -> PyResult<bool> {
        py.allow_threads(|| self.inner.prepare_cache()).map_err(to_py)
    }

    /// Make this node's open-iscsi interface record now, not at the first login.
    fn prepare_initiator(&self, py: Python<'_>) -> PyResult<bool> {
        py.allow_threads(|| self.inner.prepare_initiator()).map_err(to_py)
    }

    /// Create this node's iSCSI target for `image_id` before its template exists (no LUN):
    /// children log in and are granted (`export_info`) while this node builds; the template's
    /// export adds LUN 0 for them. Returns whether it was created. Needs `export_ip`.
    fn prepare_export(&self, py: Python<'_>, image_id: &str) -> PyResult<bool> {
        py.allow_threads(|| self.inner.prepare_export(image_id)).map_err(to_py)
    }

    /// Remove this node's export of `image_id` if the image has no template here (a prepared
    /// target whose build failed). Returns whether something was removed.
    fn drop_export(&self, py: Python<'_>, image_id: &str) -> PyResult<bool> {
        py.allow_threads(|| self.inner.drop_export(image_id)).map_err(to_py)
    }

    /// Log in to a connection dict's targets ahead of `attach` (which reuses the sessions), no
    /// LUN scan: a parent's prepared target may have no LUN yet. Returns sessions created.
    fn prelogin(&self, py: Python<'_>, source: &Bound<'_, PyAny>) -> PyResult<usize> {
        let v = py_to_json(py, "source", source)?;
        py.allow_threads(|| self.inner.prelogin(&v)).map_err(to_py)
    }

    /// Let go of a connection dict's LUNs that nothing uses (an unused `prelogin`); each session
    /// ends when it carries no other LUN. Returns how many sessions ended.
    fn logout_unused(&self, py: Python<'_>, source: &Bound<'_, PyAny>) -> PyResult<usize> {
        let v = py_to_json(py, "source", source)?;
        py.allow_threads(|| self.inner.logout_unused(&v)).map_err(to_py)
    }

    /// Tear down every template no VM and no child uses; returns their image ids.
    fn sweep(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        py.allow_threads(|| self.inner.sweep()).map_err(to_py)
    }

    /// Tear down `image_id`'s template if no VM and no child uses it; True when it went.
    fn release(&self, py: Python<'_>, image_id: &str) -> PyResult<bool> {
        py.allow_threads(|| self.inner.release(image_id)).map_err(to_py)
    }

    /// joining(image_id) -> JoinMark: marks a join of `image_id` as in flight until the mark is
    /// released (`with node.joining(image):` ...): `recover` leaves the image alone meanwhile,
    /// in every process. A process that dies drops its marks.
    fn joining(&self, py: Python<'_>, image_id: &str) -> PyResult<JoinMark> {
        let lock = py.allow_threads(|| self.inner.joining(image_id)).map_err(to_py)?;
        Ok(JoinMark { lock: std::sync::Mutex::new(Some(lock)) })
    }

    /// Remove what a join of `image_id` that died half-way left on this node (the template if
    /// nothing uses it, a prepared export without a template, its unused LUNs of `sources` or
    /// of another node's export of the image, and their sessions unless they carry another
    /// LUN); returns what it removed.
    /// Raises Busy while a join of the image is in flight (`joining`).
    fn recover(&self, py: Python<'_>, image_id: &str, sources: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
        let sources = sources_json(py, sources)?;
        py.allow_threads(|| self.inner.recover(image_id, &sources)).map_err(to_py)
    }

    /// reassemble() -> {"disks": {vm_id: path}, "failed": {vm_id: why}, "failed_images": {image_id: why}, "removed": [...]}
    ///
    /// Rebuild every VM disk the local device's layout records (after a reboot, or a restart:
    /// idempotent), at the same paths, each template reusing its cache; finish what an attach
    /// or detach left half-done. nova-compute runs it at start, before it resumes instances.
    fn reassemble(&self, py: Python<'_>) -> PyResult<PyObject> {
        let r = py.allow_threads(|| self.inner.reassemble()).map_err(to_py)?;
        json_to_py(py, &serde_json::to_value(r).expect("report serialises"))
    }

    /// heal_paths() -> [{"image", "device", "disk"}]
    ///
    /// One upkeep round over the parent paths of every template: reinstate each failed path
    /// whose iSCSI session is logged in again, re-arm bounded queueing where an outage
    /// outlived `queue_timeout_s`. Returns the paths reinstated. `Tree.maintain` runs it.
    fn heal_paths(&self, py: Python<'_>) -> PyResult<PyObject> {
        let h = py.allow_threads(|| self.inner.heal_paths()).map_err(to_py)?;
        json_to_py(py, &serde_json::to_value(h).expect("serialises"))
    }

    /// What this node holds, read from the kernel: templates, their devices, VMs and children.
    /// `counters=True` adds the kernel's counters per template: each path's parent and bytes
    /// read from it (`paths[].parent/target/portal/read_bytes`), bytes served to each child
    /// (`served`), cache hits and misses (`cache`), bytes its VMs read (`local_read_bytes`).
    #[pyo3(signature = (counters=false))]
    fn status(&self, py: Python<'_>, counters: bool) -> PyResult<PyObject> {
        let v = py
            .allow_threads(|| {
                let mut v = self.inner.status()?;
                if counters {
                    crate::stats::add_counters(&mut v);
                }
                Ok(v)
            })
            .map_err(to_py)?;
        json_to_py(py, &v)
    }

    /// metrics() -> str: this node in Prometheus' text format (status with counters, and the
    /// attach and join durations recorded in the state dir). README, "Metrics", lists them.
    fn metrics(&self, py: Python<'_>) -> PyResult<String> {
        py.allow_threads(|| {
            let mut v = self.inner.status()?;
            crate::stats::add_counters(&mut v);
            Ok(crate::stats::prometheus(&v, &crate::stats::durations(&self.inner.config().state_dir)))
        })
        .map_err(to_py)
    }

    /// record_duration(op, seconds): add one "attach" or "join" that took `seconds` to the
    /// durations `metrics()` reports (kept in the state dir, shared by this node's processes).
    fn record_duration(&self, py: Python<'_>, op: &str, seconds: f64) -> PyResult<()> {
        py.allow_threads(|| crate::stats::record_duration(&self.inner.config().state_dir, op, seconds)).map_err(to_py)
    }

    #[getter]
    fn host(&self) -> String {
        self.inner.config().export.host.clone()
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "Node(host={:?}, cache_device={:?}, state_dir={:?}, export_ip={:?})",
            c.export.host, c.cache_device, c.state_dir, c.export.export_ip
        )
    }
}

/// export_volume(name, device, portal) -> iqn
///
/// Export a block device read-only through LIO as `iqn.2026-11.org.vmthunder.volume:<name>`
/// (an origin volume where there is no Cinder: test beds, benchmarks). Idempotent.
#[pyfunction]
fn export_volume(py: Python<'_>, name: &str, device: &str, portal: &str) -> PyResult<String> {
    py.allow_threads(|| {
        names::validate_id("volume name", name)?;
        let portal = crate::iscsi::conninfo::validate_portal(portal)?;
        let iqn = names::volume_iqn(name);
        Lio::new()?.export(&iqn, &format!("volume_{name}"), crate::lio::Backstore::Block, std::path::Path::new(device), &portal)?;
        Ok(iqn)
    })
    .map_err(to_py)
}

/// allow_initiator(name, initiator, portal) -> connection dict with fresh CHAP credentials
#[pyfunction]
fn allow_initiator(py: Python<'_>, name: &str, initiator: &str, portal: &str) -> PyResult<PyObject> {
    let v = py
        .allow_threads(|| {
            names::validate_id("volume name", name)?;
            let portal = crate::iscsi::conninfo::validate_portal(portal)?;
            let lio = Lio::new()?;
            let iqn = names::volume_iqn(name);
            let chap = lio.allow(&iqn, initiator)?;
            Ok(lio.source_for(&iqn, &portal, chap).to_json())
        })
        .map_err(to_py)?;
    json_to_py(py, &v)
}

/// unexport_volume(name): remove what export_volume made (ACLs included).
#[pyfunction]
fn unexport_volume(py: Python<'_>, name: &str) -> PyResult<()> {
    py.allow_threads(|| {
        names::validate_id("volume name", name)?;
        let exp = crate::lio::Export {
            iqn: names::volume_iqn(name),
            backstore: format!("volume_{name}"),
            portal: String::new(),
            kind: crate::lio::Backstore::Block,
        };
        Lio::new()?.unexport(&exp).map_err(|left| RsError::new(Kind::Rollback, format!("unexport {}: left {left}", exp.iqn)))
    })
    .map_err(to_py)
}

/// template_iqn(host, image_id) -> the IQN `host` exports `image_id` under (injective: ids
/// differing in case get different IQNs). Raises InvalidArgument for a bad host or id.
#[pyfunction]
fn template_iqn(host: &str, image_id: &str) -> PyResult<String> {
    names::validate_host(host).map_err(to_py)?;
    names::validate_id("image id", image_id).map_err(to_py)?;
    Ok(names::template_iqn(host, image_id))
}

/// host_name(raw) -> the host name vmthunder uses for `raw` (Nova's host name): lower case,
/// letters, digits, '-' and '.', at most 40 characters (a long one ends in a hash of it).
#[pyfunction]
fn host_name(raw: &str) -> String {
    names::host_name_from(raw)
}

/// initiator_name() -> this host's open-iSCSI initiator name (/etc/iscsi/initiatorname.iscsi);
/// raises IscsiError naming the file when there is none.
#[pyfunction]
fn initiator_name() -> PyResult<String> {
    crate::iscsi::initiator_name().map_err(to_py)
}

/// validate_id(what, value) -> value: an image or VM id as every call checks it; raises
/// InvalidArgument naming `what` and the value. Check before the id becomes a file name.
#[pyfunction]
fn validate_id(what: &str, value: &str) -> PyResult<String> {
    names::validate_id(what, value).map(str::to_string).map_err(to_py)
}

/// check_grant(grant, parent, image_id, export_ip, state_dir=None) -> the connection dict to
/// log in with, only if the grant names exactly one target, LUN 0, the IQN `parent` exports
/// `image_id` under, on a portal at `export_ip` (the parent's published export address). A
/// sealed grant (`{"sealed": ...}`) is opened first with this host's key in `state_dir`.
/// Raises InvalidArgument saying what is wrong (never the grant's CHAP secret).
#[pyfunction]
#[pyo3(signature = (grant, parent, image_id, export_ip, state_dir=None))]
fn check_grant(
    py: Python<'_>,
    grant: &Bound<'_, PyAny>,
    parent: &str,
    image_id: &str,
    export_ip: Option<&str>,
    state_dir: Option<&str>,
) -> PyResult<PyObject> {
    let g = py_to_json(py, "grant", grant)
        .map_err(|_| InvalidArgument::new_err(format!("grant of host {parent:?} for image {image_id:?}: not JSON-like data")))?;
    let v = py
        .allow_threads(|| {
            let g = if crate::seal::is_sealed(&g) {
                let dir = state_dir.ok_or_else(|| RsError::invalid("a sealed grant needs the state dir holding this host's key"))?;
                crate::seal::open(&g, &crate::seal::node_key(std::path::Path::new(dir))?)
                    .map_err(|e| RsError::invalid(format!("grant of host {parent:?} for image {image_id:?}: {}", e.message)))?
            } else {
                g
            };
            crate::records::check_grant(&g, parent, image_id, export_ip)
        })
        .map_err(to_py)?;
    json_to_py(py, &v)
}

/// grant_key(state_dir) -> this host's public key for sealed grants (64 hex digits), its key
/// pair made in `state_dir` on first use (0600). Publish it in the hosts-group record.
#[pyfunction]
fn grant_key(py: Python<'_>, state_dir: &str) -> PyResult<String> {
    names::validate_path("state dir", state_dir).map_err(to_py)?;
    py.allow_threads(|| crate::seal::node_public_key(std::path::Path::new(state_dir))).map_err(to_py)
}

/// seal_grant(grant, recipient_key) -> {"sealed": hex}: `grant` readable only by the holder of
/// `recipient_key` (what that host published as its grant_key).
#[pyfunction]
fn seal_grant(py: Python<'_>, grant: &Bound<'_, PyAny>, recipient_key: &str) -> PyResult<PyObject> {
    let g = py_to_json(py, "grant", grant)?;
    let v = crate::seal::seal(&g, recipient_key).map_err(to_py)?;
    json_to_py(py, &v)
}

/// node_checks(cache_device=None, state_dir=None, engine="bcache", coalesce=True, relay=True,
///             snapshot_mode="dm") -> [{"name", "ok", "blocking", "detail", "fix"}]
///
/// This node's preconditions for an attach that the kernel and the host show: kernel modules,
/// configfs, open-iscsi (iscsiadm, iscsid, the initiator name), bcache-tools and its udev rule,
/// the local device (a block device, large enough, used by nothing else, its layout readable),
/// the state dir. `blocking`: a failure makes attaches fail. Reads only; changes nothing.
#[pyfunction]
#[pyo3(signature = (cache_device=None, state_dir=None, engine="bcache", coalesce=true, relay=true, snapshot_mode="dm"))]
fn node_checks(
    py: Python<'_>,
    cache_device: Option<String>,
    state_dir: Option<String>,
    engine: &str,
    coalesce: bool,
    relay: bool,
    snapshot_mode: &str,
) -> PyResult<PyObject> {
    let o = crate::doctor::Options {
        cache_device: cache_device.map(Into::into),
        state_dir: state_dir.map(Into::into),
        engine: engine.parse().map_err(to_py)?,
        coalesce,
        relay,
        vmm: snapshot_mode.parse::<SnapshotMode>().map_err(to_py)? == SnapshotMode::Vmm,
        ..Default::default()
    };
    let checks = py.allow_threads(|| crate::doctor::run(&o));
    json_to_py(py, &serde_json::to_value(checks).expect("checks serialise"))
}

/// write_textfile(path, text): write metrics for node_exporter's textfile collector (a new
/// file renamed into place: a scrape never reads half of it).
#[pyfunction]
fn write_textfile(py: Python<'_>, path: &str, text: &str) -> PyResult<()> {
    py.allow_threads(|| crate::stats::write_textfile(std::path::Path::new(path), text)).map_err(to_py)
}

/// A join in flight (see `Node.joining`); a context manager, released on exit.
#[pyclass(module = "vmthunder")]
pub struct JoinMark {
    lock: std::sync::Mutex<Option<node::lock::Lock>>,
}

#[pymethods]
impl JoinMark {
    /// Drop the mark (again: no effect).
    fn release(&self) {
        self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __exit__(&self, _t: &Bound<'_, PyAny>, _v: &Bound<'_, PyAny>, _tb: &Bound<'_, PyAny>) -> bool {
        self.release();
        false
    }
}

#[pymodule]
fn _vmthunder(m: &Bound<'_, PyModule>) -> PyResult<()> {
    pyo3_log::init();
    let py = m.py();
    m.add_class::<Node>()?;
    m.add_class::<JoinMark>()?;
    tree::register(m)?;
    m.add_function(wrap_pyfunction!(export_volume, m)?)?;
    m.add_function(wrap_pyfunction!(simulate, m)?)?;
    m.add_function(wrap_pyfunction!(allow_initiator, m)?)?;
    m.add_function(wrap_pyfunction!(unexport_volume, m)?)?;
    m.add_function(wrap_pyfunction!(template_iqn, m)?)?;
    m.add_function(wrap_pyfunction!(validate_id, m)?)?;
    m.add_function(wrap_pyfunction!(host_name, m)?)?;
    m.add_function(wrap_pyfunction!(initiator_name, m)?)?;
    m.add_function(wrap_pyfunction!(check_grant, m)?)?;
    m.add_function(wrap_pyfunction!(grant_key, m)?)?;
    m.add_function(wrap_pyfunction!(seal_grant, m)?)?;
    m.add_function(wrap_pyfunction!(node_checks, m)?)?;
    m.add_function(wrap_pyfunction!(write_textfile, m)?)?;
    m.add("Error", py.get_type::<Error>())?;
    m.add("InvalidArgument", py.get_type::<InvalidArgument>())?;
    m.add("NotFound", py.get_type::<NotFound>())?;
    m.add("Busy", py.get_type::<Busy>())?;
    m.add("CacheDeviceError", py.get_type::<CacheDeviceError>())?;
    m.add("IscsiError", py.get_type::<IscsiError>())?;
    m.add("LioError", py.get_type::<LioError>())?;
    m.add("DeviceMapperError", py.get_type::<DeviceMapperError>())?;
    m.add("SnapshotError", py.get_type::<SnapshotError>())?;
    m.add("StateDirError", py.get_type::<StateDirError>())?;
    m.add("RollbackError", py.get_type::<RollbackError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
