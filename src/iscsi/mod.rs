//! The iSCSI initiator side: open-iscsi's `iscsiadm` for logins, sysfs for everything that can
//! be read (sessions, their SCSI host, the block device of a LUN), as os-brick does it:
//! session reuse, CHAP from the connection info, manual scan, logout only when unused.
pub mod conninfo;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::{info, warn};

pub use conninfo::{Chap, Source, Target};

use crate::{
    cmd,
    dm,
    error::{Error, Kind, Result},
};

const ISCSIADM: &str = "iscsiadm";
const LOGIN_TIMEOUT: Duration = Duration::from_secs(40);
const ADM_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub sid: u32,
    pub iqn: String,
    pub portal: String,
    pub host_no: u32,
}

fn read_trim(p: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// This node's initiator name, from open-iscsi's configuration.
pub fn initiator_name() -> Result<String> {
    let p = "/etc/iscsi/initiatorname.iscsi";
    let s = fs::read_to_string(p).map_err(|e| Error::new(Kind::Iscsi, format!("{p}: {e} (is open-iscsi installed?)")))?;
    s.lines()
        .filter_map(|l| l.trim().strip_prefix("InitiatorName="))
        .next()
        .map(|n| n.trim().to_string())
        .ok_or_else(|| Error::new(Kind::Iscsi, format!("{p}: no InitiatorName= line")))
}

/// All iSCSI sessions the kernel has (sysfs, no iscsiadm).
pub fn sessions() -> Vec<Session> {
    let Ok(dir) = fs::read_dir("/sys/class/iscsi_session") else { return vec![] };
    let mut out = Vec::new();
    for e in dir.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(sid) = name.strip_prefix("session").and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Some(iqn) = read_trim(e.path().join("targetname")) else { continue };
        let conn = format!("/sys/class/iscsi_connection/connection{sid}:0");
        let (Some(addr), Some(port)) =
            (read_trim(format!("{conn}/persistent_address")), read_trim(format!("{conn}/persistent_port")))
        else {
            continue;
        };
        let addr = if addr.contains(':') { format!("[{addr}]") } else { addr };
        // /sys/devices/platform/host<H>/session<N>/iscsi_session/session<N>
        let host_no = fs::canonicalize(e.path())
            .ok()
            .and_then(|p| {
                p.components()
                    .filter_map(|c| c.as_os_str().to_str()?.strip_prefix("host")?.parse::<u32>().ok())
                    .next_back()
            });
        let Some(host_no) = host_no else { continue };
        out.push(Session { sid, iqn, portal: format!("{addr}:{port}"), host_no });
    }
    out.sort_by_key(|s| s.sid);
    out
}

pub fn find_session(t: &Target) -> Option<Session> {
    sessions().into_iter().find(|s| s.iqn == t.iqn && s.portal == t.portal)
}

fn node_args(t: &Target) -> Vec<&str> {
    vec!["-m", "node", "-T", &t.iqn, "-p", &t.portal]
}

/// Set node-record keys in one iscsiadm call (open-iscsi >= 2.1 takes several -n/-v pairs):
/// every iscsiadm run costs a process start, which dominates a join on a small node.
fn update(t: &Target, pairs: &[(&str, &str)], secrets: &[&str]) -> Result<()> {
    let mut a = node_args(t);
    a.extend(["-o", "update"]);
    for (k, v) in pairs {
        a.extend(["-n", k, "-v", v]);
    }
    cmd::check(Kind::Iscsi, ISCSIADM, &a, secrets, ADM_TIMEOUT).map(|_| ())
}

/// Log in to `t` unless a session exists already (then it is reused). Returns the session and
/// whether this call created it. No automatic LUN scan: `scan_lun` adds only the LUN we need.
///
/// `path_timeout_s` bounds how long I/O waits on a dead parent before the session fails it up
/// to dm-multipath, which then switches to the next parent or the origin (NOP-outs detect the
/// death, `replacement_timeout` bounds the wait), as multipath set-ups do it.
pub fn login(t: &Target, chap: Option<&Chap>, path_timeout_s: u32) -> Result<(Session, bool)> {
    if let Some(s) = find_session(t) {
        info!("reusing iSCSI session {} to {} at {}", s.sid, t.iqn, t.portal);
        return Ok((s, false));
    }
    let mut a = node_args(t);
    a.extend(["-o", "new"]);
    cmd::check(Kind::Iscsi, ISCSIADM, &a, &[], ADM_TIMEOUT)?;
    let result = (|| {
        let noop = (path_timeout_s / 2).max(1).to_string();
        let replacement = path_timeout_s.to_string();
        let mut pairs = vec![
            ("node.session.scan", "manual"),
            ("node.startup", "manual"),
            ("node.session.timeo.replacement_timeout", replacement.as_str()),
            ("node.conn[0].timeo.noop_out_interval", noop.as_str()),
            ("node.conn[0].timeo.noop_out_timeout", noop.as_str()),
        ];
        let mut secrets = vec![];
        match chap {
            Some(c) => {
                pairs.extend([("node.session.auth.authmethod", "CHAP"), ("node.session.auth.username", c.username.as_str()),
                              ("node.session.auth.password", c.password.as_str())]);
                secrets.push(c.password.as_str());
            }
            None => pairs.push(("node.session.auth.authmethod", "None")),
        }
        update(t, &pairs, &secrets)?;
        let mut a = node_args(t);
        a.push("--login");
        cmd::check(Kind::Iscsi, ISCSIADM, &a, &[], LOGIN_TIMEOUT)?;
        find_session(t).ok_or_else(|| Error::new(Kind::Iscsi, format!("login to {} at {} reported success but no session appeared", t.iqn, t.portal)))
    })();
    match result {
        Ok(s) => {
            info!("logged in to {} at {} (session {}, host{})", t.iqn, t.portal, s.sid, s.host_no);
            Ok((s, true))
        }
        Err(e) => {
            // iscsid may still be retrying a login iscsiadm gave up on (an unreachable
            // portal): end it, or the next login finds "session already exists".
            let mut a = node_args(t);
            a.push("--logout");
            let _ = cmd::check(Kind::Iscsi, ISCSIADM, &a, &[], ADM_TIMEOUT);
            delete_record(t);
            Err(e.context(format!("iSCSI login to {} at {}", t.iqn, t.portal)))
        }
    }
}

fn delete_record(t: &Target) {
    let mut a = node_args(t);
    a.extend(["-o", "delete"]);
    if let Err(e) = cmd::check(Kind::Iscsi, ISCSIADM, &a, &[], ADM_TIMEOUT) {
        warn!("could not delete the iscsiadm node record of {} at {}: {e}", t.iqn, t.portal);
    }
}

/// `sdX` devices of a session, by LUN.
pub fn session_disks(s: &Session) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let base = PathBuf::from(format!("/sys/class/iscsi_session/session{}/device", s.sid));
    let Ok(targets) = fs::read_dir(&base) else { return out };
    for t in targets.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("target")) {
        let Ok(luns) = fs::read_dir(t.path()) else { continue };
        for l in luns.filter_map(|e| e.ok()) {
            let name = l.file_name().to_string_lossy().into_owned();
            // H:C:T:L
            let Some(lun) = name.rsplit(':').next().and_then(|x| x.parse::<u32>().ok()) else { continue };
            if name.split(':').count() != 4 {
                continue;
            }
            if let Ok(blocks) = fs::read_dir(l.path().join("block")) {
                for b in blocks.filter_map(|e| e.ok()) {
                    out.push((lun, b.file_name().to_string_lossy().into_owned()));
                }
            }
        }
    }
    out.sort();
    out
}

/// Ask the SCSI host for exactly this LUN and wait (bounded) until its block device exists.
pub fn scan_lun(s: &Session, lun: u32, timeout: Duration) -> Result<PathBuf> {
    let found = |s: &Session| session_disks(s).into_iter().find(|(l, _)| *l == lun).map(|(_, d)| d);
    if found(s).is_none() {
        let scan = format!("/sys/class/scsi_host/host{}/scan", s.host_no);
        fs::write(&scan, format!("- - {lun}"))
            .map_err(|e| Error::new(Kind::Iscsi, format!("scan LUN {lun} through {scan}: {e}")))?;
    }
    let start = Instant::now();
    loop {
        if let Some(d) = found(s) {
            let p = PathBuf::from("/dev").join(&d);
            let size_ok = dm::device_of(&p).and_then(dm::size_sectors).is_ok_and(|n| n > 0);
            // A disk still being added refuses opens (ENXIO) for a moment: a dm table load
            // over it (a template's paths, a reparent) would fail.
            if size_ok && fs::File::open(&p).is_ok() {
                return Ok(p);
            }
        }
        if start.elapsed() > timeout {
            return Err(Error::new(
                Kind::Iscsi,
                format!("LUN {lun} of {} at {} did not appear within {}s (wrong LUN?)", s.iqn, s.portal, timeout.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `logout_if_unused` where a held session is not an error: whether a session ended.
pub fn logout_unless_held(t: &Target) -> Result<bool> {
    match logout_if_unused(t) {
        Err(e) if e.kind == Kind::Busy => Ok(false),
        r => r,
    }
}

/// Log out of a session unless one of its disks is still held (by a dm device) — then
/// `Busy`. Removes the iscsiadm node record too.
pub fn logout_if_unused(t: &Target) -> Result<bool> {
    let Some(s) = find_session(t) else {
        return Ok(false);
    };
    for (_, disk) in session_disks(&s) {
        let held = fs::read_dir(format!("/sys/block/{disk}/holders")).map(|d| d.count()).unwrap_or(0);
        if held > 0 {
            return Err(Error::new(Kind::Busy, format!("session {} to {}: {disk} is still in use", s.sid, t.iqn)));
        }
    }
    let mut a = node_args(t);
    a.push("--logout");
    cmd::check(Kind::Iscsi, ISCSIADM, &a, &[], ADM_TIMEOUT)?;
    delete_record(t);
    info!("logged out of {} at {} (session {})", t.iqn, t.portal, s.sid);
    Ok(true)
}
