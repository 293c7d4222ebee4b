//! vmthunder: fast boot of many identical VMs from one image volume.
//!
//! Layout (each folder one part of the data path):
//! - [`names`]: validation of caller input and the deterministic names of our kernel objects
//! - [`dm`]: device-mapper targets and ioctls
//! - [`iscsi`]: the open-iscsi initiator (sessions to parents)
//! - [`lio`]: the LIO target (exports to children) through configfs
//! - [`node`]: lifecycle of templates (one image on a node) and snapshots (one VM)
//! - [`placement`]: which parents a joining node takes
//! - [`sim`]: a boot-storm simulator (which shape, how long) calibrated by the lab
//! - [`usage`]: whether a device or file is still open or held (what a teardown checks)
//! - [`records`]: the registry records other hosts publish, checked (untrusted input)
//! - [`doctor`]: the node's preconditions (modules, open-iscsi, the local device) with their fixes
//! - [`stats`]: counters, durations and Prometheus text for operators
//! - [`bindings`]: the Python module
pub mod cmd;
pub mod dm;
pub mod doctor;
pub mod error;
pub mod iscsi;
pub mod lio;
pub mod names;
pub mod node;
pub mod placement;
pub mod records;
pub mod rollback;
pub mod seal;
pub mod sim;
pub mod stats;
#[cfg(test)]
mod testlog;
pub mod usage;

mod bindings;

pub use error::{Error, Kind, Result};
