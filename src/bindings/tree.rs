//! The relay tree's values in Python, typed: join states, registry records, placements, policy,
//! the node's templates; and the join protocol's steps over them (`placement::protocol`).
//! The registry I/O and the threads stay in Python (`vmthunder.registry`, `vmthunder.tree`).
use std::collections::{BTreeMap, HashSet};

use pyo3::{prelude::*, types::PyString};
use serde_json::Value;

use super::{json_to_py, py_to_json, to_py, Busy, InvalidArgument};
use crate::{
    names,
    node::TemplateStatus,
    placement::{protocol, JoinState, ParentRef, Placement, PlacementError, Policy, DEFAULT_FANOUT, DEFAULT_MAX_PARENTS},
    records::{HostRecord, ImageRecord},
};

/// No free parent yet, or a stale choice: Busy (retry later); bad input: InvalidArgument.
pub(super) fn placement_err(e: PlacementError) -> PyErr {
    if e.is_retryable() {
        Busy::new_err(e.to_string())
    } else {
        InvalidArgument::new_err(e.to_string())
    }
}

#[pymethods]
impl JoinState {
    /// The name records spell it with ("joining", "built", "ready", "leaving", "failed").
    fn __str__(&self) -> &'static str {
        self.as_str()
    }

    /// may_follow(from_, to) -> whether a host's own record may go from `from_` (None: it has
    /// none) to `to`.
    #[staticmethod]
    #[pyo3(name = "may_follow", signature = (from_, to))]
    fn py_may_follow(from_: Option<JoinState>, to: JoinState) -> bool {
        JoinState::may_follow(from_, to)
    }

    /// Its own attach is still placing it (joining or built): upkeep leaves it alone.
    #[getter(is_placing)]
    fn py_is_placing(&self) -> bool {
        self.is_placing()
    }
}

/// A host's record in an image's group: checked (`parse_image_record`) or our own
/// (`own_record`). Its `grants` are shown by no repr (sealed CHAP credentials).
#[pyclass(name = "ImageRecord", module = "vmthunder", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PyImageRecord(pub ImageRecord);

#[pymethods]
impl PyImageRecord {
    #[getter]
    fn host(&self) -> &str {
        &self.0.host
    }

    #[getter]
    fn state(&self) -> JoinState {
        self.0.state
    }

    #[getter]
    fn depth(&self) -> u32 {
        self.0.depth
    }

    /// "origin" or host names, in failover order.
    #[getter]
    fn parents(&self) -> Vec<String> {
        self.0.parents.clone()
    }

    #[getter]
    fn failure_domain(&self) -> Option<&str> {
        self.0.failure_domain.as_deref()
    }

    /// {host: the grant this host made for it (a sealed connection dict)}.
    #[getter]
    fn grants(&self, py: Python<'_>) -> PyResult<PyObject> {
        json_to_py(py, &Value::Object(self.0.grants.clone().into_iter().collect()))
    }

    /// grant_for(host) -> the grant this record's host made for `host` (as published: sealed
    /// for it), or None.
    fn grant_for(&self, py: Python<'_>, host: &str) -> PyResult<Option<PyObject>> {
        self.0.grants.get(host).map(|g| json_to_py(py, g)).transpose()
    }

    /// Its parents and depth.
    #[getter]
    fn placement(&self) -> PyPlacement {
        PyPlacement(self.0.placement())
    }

    /// with_state(state) -> this record in `state`; InvalidArgument if the protocol does not
    /// let `state` follow the record's own (`JoinState.may_follow`).
    fn with_state(&self, state: JoinState) -> PyResult<PyImageRecord> {
        self.0.with_state(state).map(PyImageRecord).map_err(placement_err)
    }

    /// The record as published in the registry (`parse_image_record` reads it back).
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        json_to_py(py, &self.0.to_wire())
    }

    fn __repr__(&self) -> String {
        let r = &self.0;
        format!(
            "ImageRecord(host={:?}, state={}, depth={}, parents={:?}, failure_domain={:?}, grants for {} hosts)",
            r.host,
            r.state,
            r.depth,
            r.parents,
            r.failure_domain,
            r.grants.len()
        )
    }
}

/// A host's record in the hosts group, checked (`parse_host_record`).
#[pyclass(name = "HostRecord", module = "vmthunder", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PyHostRecord(pub HostRecord);

#[pymethods]
impl PyHostRecord {
    #[getter]
    fn host(&self) -> &str {
        &self.0.host
    }

    /// Its iSCSI initiator name; None: it cannot read from relays.
    #[getter]
    fn initiator(&self) -> Option<&str> {
        self.0.initiator.as_deref()
    }

    /// Where its exports are reached (an IPv4 address); None: it does not relay.
    #[getter]
    fn export_ip(&self) -> Option<String> {
        self.0.export_ip.map(|ip| ip.to_string())
    }

    #[getter]
    fn failure_domain(&self) -> Option<&str> {
        self.0.failure_domain.as_deref()
    }

    /// The public key grants for it are sealed with; None: it gets no grants.
    #[getter]
    fn grant_key(&self) -> Option<&str> {
        self.0.grant_key.as_deref()
    }

    fn __repr__(&self) -> String {
        let h = &self.0;
        format!(
            "HostRecord(host={:?}, initiator={:?}, export_ip={:?}, failure_domain={:?}, grant_key={})",
            h.host,
            h.initiator,
            h.export_ip.map(|ip| ip.to_string()),
            h.failure_domain,
            if h.grant_key.is_some() { "..." } else { "None" }
        )
    }
}

/// Placement(parents, depth): a newcomer's parents in failover order ("origin" for the origin
/// volume: first when it is the primary, else last) and its depth.
#[pyclass(name = "Placement", module = "vmthunder", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PyPlacement(pub Placement);

#[pymethods]
impl PyPlacement {
    #[new]
    fn new(parents: Vec<String>, depth: u32) -> PyResult<Self> {
        if depth == 0 {
            return Err(InvalidArgument::new_err("invalid placement depth 0: the origin's children have depth 1"));
        }
        let p = Placement { parents: parents.into_iter().map(ParentRef::from).collect(), depth };
        p.active_parents().map_err(placement_err)?;
        Ok(PyPlacement(p))
    }

    /// The origin alone, at depth 1.
    #[staticmethod]
    fn origin_only() -> Self {
        PyPlacement(Placement::origin_only())
    }

    #[getter]
    fn parents(&self) -> Vec<String> {
        self.0.parent_hosts()
    }

    #[getter]
    fn depth(&self) -> u32 {
        self.0.depth
    }

    fn __repr__(&self) -> String {
        format!("Placement(parents={:?}, depth={})", self.0.parent_hosts(), self.0.depth)
    }
}

fn knob(field: &str, v: i64) -> PyResult<u32> {
    u32::try_from(v).map_err(|_| InvalidArgument::new_err(format!("invalid policy: {field} = {v}: must be a count")))
}

/// Policy(fanout=3, max_parents=2, origin_fanout=fanout, secondary_fanout=fanout): the tree's
/// knobs (src/placement). InvalidArgument naming a bad one.
#[pyclass(name = "Policy", module = "vmthunder", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PyPolicy(pub Policy);

#[pymethods]
impl PyPolicy {
    #[new]
    #[pyo3(signature = (fanout=DEFAULT_FANOUT as i64, max_parents=DEFAULT_MAX_PARENTS as i64, origin_fanout=None, secondary_fanout=None))]
    fn new(fanout: i64, max_parents: i64, origin_fanout: Option<i64>, secondary_fanout: Option<i64>) -> PyResult<Self> {
        let p = Policy::new(
            knob("fanout", fanout)?,
            knob("max_parents", max_parents)?,
            origin_fanout.map(|v| knob("origin_fanout", v)).transpose()?,
            secondary_fanout.map(|v| knob("secondary_fanout", v)).transpose()?,
        );
        p.validate().map_err(placement_err)?;
        Ok(PyPolicy(p))
    }

    #[getter]
    fn fanout(&self) -> u32 {
        self.0.fanout
    }

    #[getter]
    fn max_parents(&self) -> u32 {
        self.0.max_parents
    }

    #[getter]
    fn origin_fanout(&self) -> u32 {
        self.0.origin_fanout
    }

    #[getter]
    fn secondary_fanout(&self) -> u32 {
        self.0.secondary_fanout
    }

    fn __repr__(&self) -> String {
        let p = &self.0;
        format!(
            "Policy(fanout={}, max_parents={}, origin_fanout={}, secondary_fanout={})",
            p.fanout, p.max_parents, p.origin_fanout, p.secondary_fanout
        )
    }
}

/// One image's template on this node, as `Node.status()["templates"][image_id]` reports it.
#[pyclass(name = "Template", module = "vmthunder", frozen)]
pub struct PyTemplate {
    image_id: String,
    t: TemplateStatus,
}

impl PyTemplate {
    pub(super) fn new(image_id: String, t: TemplateStatus) -> Self {
        PyTemplate { image_id, t }
    }
}

#[pymethods]
impl PyTemplate {
    #[getter]
    fn image_id(&self) -> &str {
        &self.image_id
    }

    /// Its stack is whole (parent paths and origin devices exist).
    #[getter]
    fn complete(&self) -> bool {
        self.t.complete
    }

    /// The VMs whose disks are snapshots of it.
    #[getter]
    fn vms(&self) -> Vec<String> {
        self.t.vms.clone()
    }

    /// Initiators of the children with a live session to its export.
    #[getter]
    fn children(&self) -> Vec<String> {
        self.t.children.clone()
    }

    /// Initiators its export has an ACL for.
    #[getter]
    fn child_acls(&self) -> Vec<String> {
        self.t.child_acls.clone()
    }

    #[getter]
    fn export_iqn(&self) -> Option<&str> {
        self.t.export_iqn.as_deref()
    }

    /// Parent paths in failover order: (device "MAJOR:MINOR", "A" active or "F" failed).
    #[getter]
    fn paths(&self) -> Vec<(String, String)> {
        let field = |p: &Value, k: &str| p.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
        self.t.paths.iter().map(|p| (field(p, "device"), field(p, "state"))).collect()
    }

    /// role -> device path.
    #[getter]
    fn devices(&self) -> BTreeMap<String, String> {
        self.t.devices.clone()
    }

    #[getter]
    fn size_bytes(&self) -> u64 {
        self.t.size_bytes
    }

    #[getter]
    fn engine(&self) -> Option<&str> {
        self.t.engine.as_deref()
    }

    #[getter]
    fn cache_status(&self) -> Option<&str> {
        self.t.cache_status.as_deref()
    }

    fn __repr__(&self) -> String {
        format!(
            "Template(image_id={:?}, complete={}, vms={:?}, children={:?}, paths={})",
            self.image_id,
            self.t.complete,
            self.t.vms,
            self.t.children,
            self.t.paths.len()
        )
    }
}

/// Host names from any iterable of str (a set, a list, dict keys); None: none.
fn host_set(what: &str, obj: Option<&Bound<'_, PyAny>>) -> PyResult<HashSet<String>> {
    let Some(obj) = obj else { return Ok(HashSet::new()) };
    if obj.is_instance_of::<PyString>() {
        return Err(InvalidArgument::new_err(format!("{what} must be a collection of host names, not one string")));
    }
    obj.try_iter()?.map(|h| h?.extract::<String>()).collect()
}

fn records_of(records: &[Bound<'_, PyImageRecord>]) -> Vec<ImageRecord> {
    records.iter().map(|r| r.get().0.clone()).collect()
}

/// parse_host_record(record) -> HostRecord, the checked record (unknown fields dropped).
/// Raises InvalidArgument naming the host and field.
#[pyfunction]
fn parse_host_record(py: Python<'_>, record: &Bound<'_, PyAny>) -> PyResult<PyHostRecord> {
    let v = py_to_json(py, "record", record)?;
    crate::records::parse_host_record(&v).map(PyHostRecord).map_err(to_py)
}

/// parse_image_record(record) -> ImageRecord, the checked record (unknown fields dropped).
/// Raises InvalidArgument naming the host and field.
#[pyfunction]
fn parse_image_record(py: Python<'_>, record: &Bound<'_, PyAny>) -> PyResult<PyImageRecord> {
    let v = py_to_json(py, "record", record)?;
    crate::records::parse_image_record(&v).map(PyImageRecord).map_err(to_py)
}

/// choose_parents(image_id, host, records, policy, *, failure_domain=None, granted=(),
///                exclude=(), early=False, last_resort=False, previous=None) -> Placement
///
/// `host`'s parents among the image's `records` (the join protocol's choice, src/placement/
/// protocol.rs): `granted`, the hosts whose grant for us passed `check_grant`; `exclude`,
/// parents given up on; `early`, we are still building; `previous`, an earlier choice, kept
/// if it still holds. Raises Busy while no parent is free (unless `last_resort`: then the
/// origin alone), InvalidArgument for bad input.
#[pyfunction]
#[pyo3(signature = (image_id, host, records, policy, *, failure_domain=None, granted=None, exclude=None, early=false,
                    last_resort=false, previous=None))]
#[allow(clippy::too_many_arguments)]
fn choose_parents(
    image_id: &str,
    host: &str,
    records: Vec<Bound<'_, PyImageRecord>>,
    policy: &PyPolicy,
    failure_domain: Option<&str>,
    granted: Option<&Bound<'_, PyAny>>,
    exclude: Option<&Bound<'_, PyAny>>,
    early: bool,
    last_resort: bool,
    previous: Option<PyRef<'_, PyPlacement>>,
) -> PyResult<PyPlacement> {
    names::validate_host(host).map_err(to_py)?;
    let (granted, exclude) = (host_set("granted", granted)?, host_set("exclude", exclude)?);
    let view = protocol::View { image: image_id, host, failure_domain, granted: &granted, exclude: &exclude, early };
    protocol::choose(&view, &records_of(&records), &policy.0, previous.as_ref().map(|p| &p.0), last_resort)
        .map(PyPlacement)
        .map_err(placement_err)
}

/// parents_progress(parents, records, want) -> (gone, waiting): of `parents` (the origin
/// skipped), those given up on (no record, or leaving or failed) and those not yet `want`
/// (BUILT: built or ready; READY: ready).
#[pyfunction]
fn parents_progress(parents: Vec<String>, records: Vec<Bound<'_, PyImageRecord>>, want: JoinState) -> (Vec<String>, Vec<String>) {
    protocol::parents_progress(&parents, &records_of(&records), want)
}

/// own_record(host, placement, state, *, was=None, failure_domain=None, grants=None) ->
/// ImageRecord: this host's record in `state`, its last published one having been in `was`
/// (None: it has none). InvalidArgument if the protocol does not allow that transition.
#[pyfunction]
#[pyo3(signature = (host, placement, state, *, was=None, failure_domain=None, grants=None))]
fn own_record(
    py: Python<'_>,
    host: &str,
    placement: &PyPlacement,
    state: JoinState,
    was: Option<JoinState>,
    failure_domain: Option<String>,
    grants: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyImageRecord> {
    names::validate_host(host).map_err(to_py)?;
    let grants = match grants.map(|g| py_to_json(py, "grants", g)).transpose()? {
        None => BTreeMap::new(),
        Some(Value::Object(m)) => m.into_iter().collect(),
        Some(_) => return Err(InvalidArgument::new_err("grants must be a dict {host: grant}")),
    };
    protocol::own_record(host, was, state, &placement.0, failure_domain, grants).map(PyImageRecord).map_err(placement_err)
}

/// validate_host(what, value) -> value: a host name as vmthunder accepts it (lower-case
/// letters, digits, '-', '.'; at most 40 characters); InvalidArgument naming `what` otherwise.
#[pyfunction]
fn validate_host(what: &str, value: &str) -> PyResult<String> {
    names::validate_host_as(what, value).map(str::to_string).map_err(to_py)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<JoinState>()?;
    m.add_class::<PyImageRecord>()?;
    m.add_class::<PyHostRecord>()?;
    m.add_class::<PyPlacement>()?;
    m.add_class::<PyPolicy>()?;
    m.add_class::<PyTemplate>()?;
    m.add_function(wrap_pyfunction!(parse_host_record, m)?)?;
    m.add_function(wrap_pyfunction!(parse_image_record, m)?)?;
    m.add_function(wrap_pyfunction!(choose_parents, m)?)?;
    m.add_function(wrap_pyfunction!(parents_progress, m)?)?;
    m.add_function(wrap_pyfunction!(own_record, m)?)?;
    m.add_function(wrap_pyfunction!(validate_host, m)?)?;
    Ok(())
}
