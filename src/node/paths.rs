//! Paths that heal. A template's paths device is dm-multipath over the iSCSI disks of its
//! parents (the origin last). Three settings and one upkeep step keep a network outage from
//! reaching the guest, and keep one that does from killing the template:
//!
//! - `queue_if_no_path`, bounded: when every path has failed, dm-multipath holds the I/O for
//!   `queue_timeout_s` (the host-wide `queue_if_no_path_timeout_secs` of dm_multipath) and only
//!   then fails it. The bcache or dm-cache above never sees an error within the bound.
//! - The SCSI command timeout of each path disk and of the local disk is raised above the
//!   bound: a parent holding a child's read in its own queue answers late, not wrongly, and
//!   SCSI error handling must not abort it first (a dead parent is still found in
//!   `path_timeout_s` by NOP-outs, which do not depend on this timeout).
//! - `heal`: nothing in the kernel reinstates a failed path (that is multipathd's checker's
//!   job, and vmthunder runs no daemon), so upkeep reinstates each failed path whose disk is
//!   running again on a logged-in session, and re-arms queueing where the bound expired.
use std::{fs, path::Path, time::Duration};

use devicemapper::Device;
use log::{info, warn};
use serde::Serialize;

use super::{lock::Locks, PathPolicy};
use crate::{
    cmd,
    dm::{Dm, Target},
    error::{Error, Kind, Result},
    names::{self, Parsed, Role},
};

const QUEUE_PARAM: &str = "/sys/module/dm_multipath/parameters/queue_if_no_path_timeout_secs";
/// The kernel's default SCSI command timeout: what a command needs when nothing queues.
pub const SCSI_DEFAULT_TIMEOUT_S: u32 = 30;

/// A path `heal` reinstated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Healed {
    pub image: String,
    /// `major:minor` of the path's disk.
    pub device: String,
    /// Its block device name (`sdX`), if it has one.
    pub disk: Option<String>,
}

/// Bound dm-multipath's queueing to `secs` (host-wide: the module parameter applies to every
/// multipath device of the host). Loads dm-multipath first if it is not loaded yet. A kernel
/// without the parameter (before 5.11) would queue forever: refused, naming the way out.
pub(super) fn bound_queueing(secs: u32) -> Result<()> {
    if !Path::new(QUEUE_PARAM).exists() {
        let _ = cmd::run(Kind::DeviceMapper, "modprobe", &["dm-multipath"], &[], Duration::from_secs(10));
    }
    let now = fs::read_to_string(QUEUE_PARAM).map_err(|e| {
        Error::new(
            Kind::DeviceMapper,
            format!(
                "{QUEUE_PARAM}: {e}: this kernel cannot bound dm-multipath's queueing (Linux 5.11 or later can); \
         use queue_timeout_s=0 to fail I/O at once when every path is down"
            ),
        )
    })?;
    let want = secs.to_string();
    if now.trim() != want {
        fs::write(QUEUE_PARAM, &want).map_err(|e| Error::new(Kind::DeviceMapper, format!("write {want} to {QUEUE_PARAM}: {e}")))?;
        info!("dm-multipath queues I/O without a path for at most {secs}s (host-wide; was {}s)", now.trim());
    }
    Ok(())
}

/// Set the SCSI command timeout of disk `dev` (a path disk or the local disk) to `secs`.
pub(super) fn set_command_timeout(dev: Device, secs: u32) -> Result<()> {
    let p = format!("/sys/dev/block/{}:{}/device/timeout", dev.major, dev.minor);
    fs::write(&p, secs.to_string()).map_err(|e| Error::new(Kind::Iscsi, format!("write {secs} to {p}: {e}")))
}

/// The SCSI command timeout that lets a parent's queueing through: the bound plus a normal
/// command's time; the kernel's default when nothing queues.
pub(super) fn command_timeout(policy: &PathPolicy) -> u32 {
    policy.queue_timeout_s.saturating_add(SCSI_DEFAULT_TIMEOUT_S)
}

/// Each path of a multipath status line and whether it is active, in table order.
pub fn path_states(status: &str) -> Vec<(Device, bool)> {
    // "... <dev> <A|F> <fail count> <selector args>..." per path.
    let words: Vec<&str> = status.split_whitespace().collect();
    words
        .windows(2)
        .filter_map(|w| {
            let dev = w[0].contains(':').then(|| w[0].parse::<Device>().ok()).flatten()?;
            match w[1] {
                "A" => Some((dev, true)),
                "F" => Some((dev, false)),
                _ => None,
            }
        })
        .collect()
}

fn read_trim(p: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// Whether a failed path can carry I/O again: its SCSI device is running and, for an iSCSI
/// disk, its session is logged in. `None` when it can; otherwise why not.
fn not_ready(dev: Device) -> Option<String> {
    let sys = format!("/sys/dev/block/{}:{}", dev.major, dev.minor);
    let state = read_trim(format!("{sys}/device/state")).unwrap_or_else(|| "gone".into());
    if state != "running" {
        return Some(format!("its disk is {state}"));
    }
    // .../session<N>/target.../<H:C:T:L>: an iSCSI disk; its session must be logged in.
    let real = fs::canonicalize(format!("{sys}/device")).ok()?;
    let sid = real.components().filter_map(|c| c.as_os_str().to_str()?.strip_prefix("session")?.parse::<u32>().ok()).next_back()?;
    match read_trim(format!("/sys/class/iscsi_session/session{sid}/state")) {
        Some(s) if s == "LOGGED_IN" => None,
        s => Some(format!("its iSCSI session {sid} is {}", s.unwrap_or_else(|| "gone".into()))),
    }
}

fn disk_name(dev: Device) -> Option<String> {
    fs::canonicalize(format!("/sys/dev/block/{}:{}", dev.major, dev.minor)).ok()?.file_name()?.to_str().map(str::to_string)
}

/// One upkeep round over every template's paths (see the module doc). Returns the paths it
/// reinstated. An image whose lock another call holds (an attach, a reparent) is left to the
/// next round; one that fails is logged and the others are still healed.
pub fn heal(policy: &PathPolicy, locks: &Locks, dm: &Dm) -> Result<Vec<Healed>> {
    let mut healed = Vec::new();
    for d in dm.list(names::DM_PREFIX)? {
        let Some(Parsed::Template { image, role: Role::Paths }) = names::parse_dm_name(&d.name) else { continue };
        let Ok(_lock) = locks.image(&image, Duration::from_secs(2)) else {
            info!("image {image}: busy; its paths are looked at next round");
            continue;
        };
        match heal_one(policy, dm, &image, &d.name) {
            Ok(h) => healed.extend(h),
            Err(e) => warn!("image {image}: paths not healed: {e}"),
        }
    }
    Ok(healed)
}

fn heal_one(policy: &PathPolicy, dm: &Dm, image: &str, name: &str) -> Result<Vec<Healed>> {
    let Some(Target::Multipath(table)) = dm.table(name)?.lines.into_iter().next().map(|l| l.target) else {
        return Ok(vec![]);
    };
    let states = path_states(&dm.status(name)?.join(" "));
    let mut healed = Vec::new();
    let mut active = states.iter().filter(|(_, a)| *a).count();
    for (dev, _) in states.iter().filter(|(_, a)| !*a) {
        if let Some(why) = not_ready(*dev) {
            info!("image {image}: path {dev} still failed: {why}");
            continue;
        }
        dm.message(name, &format!("reinstate_path {dev}")).map_err(|e| e.context(format!("image {image:?}")))?;
        let disk = disk_name(*dev);
        warn!("image {image}: reinstated path {dev} ({}): its session is back", disk.as_deref().unwrap_or("?"));
        healed.push(Healed { image: image.to_string(), device: dev.to_string(), disk });
        active += 1;
    }
    // The bound expired during an outage: the kernel turned queueing off (the live table shows
    // it). Once a path works again, queue again for the next outage.
    let queueing = table.features.iter().any(|f| f == "queue_if_no_path");
    if policy.queue_timeout_s > 0 && !queueing && active > 0 {
        bound_queueing(policy.queue_timeout_s)?;
        dm.message(name, "queue_if_no_path").map_err(|e| e.context(format!("image {image:?}")))?;
        warn!("image {image}: queueing without a path re-armed ({}s bound): it had expired", policy.queue_timeout_s);
    }
    Ok(healed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_states_of_a_failover_status() {
        // What 6.1 prints for two groups of one path each, the first failed.
        let s = "multipath 2 0 0 0 2 2 E 0 1 0 8:16 F 1 A 0 1 0 8:0 A 0";
        let d = |minor| Device { major: 8, minor };
        assert_eq!(path_states(s), vec![(d(16), false), (d(0), true)]);
        assert_eq!(path_states("multipath 2 0 0 0 0 0"), vec![]);
    }
}
