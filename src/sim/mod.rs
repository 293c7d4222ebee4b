//! A discrete-event simulator of a boot storm: N compute nodes each boot VMs from one image
//! at the same time, through vmthunder's relay tree (placed by [`crate::placement`] as
//! joining nodes place it), a chain, striped trees, straight from the volume, or by full
//! copies. It answers the operator's question the lab cannot (the lab holds 8-16 nodes on
//! two cores): how long will a storm of 160 or 10,000 nodes take, and with which shape.
//!
//! Parts, one job each: [`params`] (the knobs and their lab defaults, typed errors),
//! [`trace`] (the boot trace cut into chunks), [`topology`] (who reads from whom),
//! [`events`] (the ordered event queue), [`fairshare`] (max-min sharing of a link),
//! [`network`] (links and flows), [`engine`] (nodes, caches, VMs, prefetch, failover),
//! [`run`] (one storm, start to result).
//!
//! Data moves at chunk granularity (default 256 KiB of the working set in first-read order),
//! not per 4 KiB request, so 10,000 nodes replay the trace in seconds to minutes.

pub mod engine;
pub mod events;
pub mod fairshare;
pub mod network;
pub mod params;
pub mod run;
pub mod topology;
pub mod trace;

#[cfg(test)]
mod tests;

pub use params::{Failure, Params, Shape, SimError};
pub use run::{simulate, Outcome};

/// [`simulate`] on a JSON object of [`Params`], returning the [`Outcome`] as JSON.
pub fn simulate_json(params_json: &str) -> Result<String, SimError> {
    let p = Params::from_json(params_json)?;
    let out = simulate(&p)?;
    Ok(serde_json::to_string(&out).expect("an Outcome always serializes"))
}
