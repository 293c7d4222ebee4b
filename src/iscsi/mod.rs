//! The iSCSI initiator side: open-iscsi's `iscsiadm` for logins, sysfs for everything that can
//! be read (sessions, their SCSI host, the block device of a LUN), as os-brick does it:
//! session reuse, CHAP from the connection info, manual scan of our LUN only. Volumes behind one
//! target (Cinder's shared targets) share one session with whoever else reads them on this
//! node: letting go of our volume removes only our LUN's disk, and the session ends only when
//! it carries no other LUN.
pub mod conninfo;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::{info, warn};

pub use conninfo::{Chap, Source, Target};

use crate::{
    cmd, dm,
    error::{Error, Kind, Result},
    usage,
};

const ISCSIADM: &str = "iscsiadm";
/// iscsiadm's exit status for "no records found".
const NO_RECORDS: i32 = 21;
/// iscsiadm's exit status for "session already exists" (ISCSI_ERR_SESS_EXISTS).
const SESSION_EXISTS: i32 = 15;

/// The open-iscsi interface our node records are made under (`iscsiadm -I`): a node record is
/// keyed by target, portal and interface, so a record under this interface is one vmthunder
/// made, and it is the only kind vmthunder deletes; another user's record of the same target
/// (os-brick's, under `default`) is never touched, nor overwritten by our `-o new`. Chosen over
/// a marker value in some node parameter because every parameter changes the session it
/// logs in (timeouts, CHAP, queueing), and over "delete it when our login made the session"
/// because the session outlives the process that made it and the record outlives a reboot:
/// the interface is persistent and part of the record's identity. Its own settings are
/// open-iscsi's defaults (software iSCSI over TCP, any local address), i.e. `default`'s.
/// Sessions are shared whatever the interface: a login reuses any session to the target, as
/// os-brick's does.
pub const IFACE: &str = "vmthunder";
const LOGIN_TIMEOUT: Duration = Duration::from_secs(40);
/// iscsid's own bound on a first login: `LOGIN_ATTEMPTS` attempts of at most
/// `LOGIN_ATTEMPT_TIMEOUT_S` each, below `LOGIN_TIMEOUT`. Without it iscsid goes on retrying
/// (8 x 15 s by default) after iscsiadm was killed, and its late session makes the next login
/// fail with "session already exists".
const LOGIN_ATTEMPT_TIMEOUT_S: &str = "15";
const LOGIN_RETRIES: &str = "1";
/// How long a login that found "session already exists" waits for that session to show in sysfs.
const SESSION_APPEAR_TIMEOUT: Duration = Duration::from_secs(10);
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
        let (Some(addr), Some(port)) = (read_trim(format!("{conn}/persistent_address")), read_trim(format!("{conn}/persistent_port")))
        else {
            continue;
        };
        let addr = if addr.contains(':') { format!("[{addr}]") } else { addr };
        // /sys/devices/platform/host<H>/session<N>/iscsi_session/session<N>
        let host_no = fs::canonicalize(e.path())
            .ok()
            .and_then(|p| p.components().filter_map(|c| c.as_os_str().to_str()?.strip_prefix("host")?.parse::<u32>().ok()).next_back());
        let Some(host_no) = host_no else { continue };
        out.push(Session { sid, iqn, portal: format!("{addr}:{port}"), host_no });
    }
    out.sort_by_key(|s| s.sid);
    out
}

pub fn find_session(t: &Target) -> Option<Session> {
    sessions().into_iter().find(|s| s.iqn == t.iqn && s.portal == t.portal)
}

/// The session to `t`, waiting up to `timeout` for it to show (polled every 200 ms).
fn wait_for_session(t: &Target, timeout: Duration) -> Option<Session> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = find_session(t) {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn node_args(t: &Target) -> Vec<&str> {
    vec!["-m", "node", "-T", &t.iqn, "-p", &t.portal, "-I", IFACE]
}

/// Where open-iscsi keeps interface records (`iscsiadm -m iface`), one file per interface.
const IFACE_RECORDS: &str = "/etc/iscsi/ifaces";

/// Create our interface record (`IFACE`) unless it exists; returns whether this call made it.
/// The record's file is looked for first: every iscsiadm run is a process start (0.3-0.9 s on a
/// loaded node), and this runs before every new node record.
pub fn ensure_iface() -> Result<bool> {
    if Path::new(IFACE_RECORDS).join(IFACE).is_file() {
        return Ok(false);
    }
    // Records kept elsewhere (another build of open-iscsi): ask the tool.
    let show = ["-m", "iface", "-I", IFACE];
    if cmd::run(Kind::Iscsi, ISCSIADM, &show, &[], ADM_TIMEOUT)?.status == 0 {
        return Ok(false);
    }
    let made = cmd::check(Kind::Iscsi, ISCSIADM, &["-m", "iface", "-I", IFACE, "-o", "new"], &[], ADM_TIMEOUT);
    // A concurrent login may have made it first.
    match made {
        Ok(_) => {
            info!("made the open-iscsi interface record {IFACE:?}");
            Ok(true)
        }
        Err(e) if cmd::run(Kind::Iscsi, ISCSIADM, &show, &[], ADM_TIMEOUT)?.status != 0 => Err(e),
        Err(_) => Ok(false),
    }
}

/// Our node record of `t` (see `IFACE`), made anew.
fn new_record(t: &Target) -> Result<()> {
    ensure_iface()?;
    let mut a = node_args(t);
    a.extend(["-o", "new"]);
    cmd::check(Kind::Iscsi, ISCSIADM, &a, &[], ADM_TIMEOUT).map(|_| ())
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
    new_record(t)?;
    let result = (|| {
        let noop = (path_timeout_s / 2).max(1).to_string();
        let replacement = path_timeout_s.to_string();
        let mut pairs = vec![
            ("node.session.scan", "manual"),
            ("node.startup", "manual"),
            ("node.session.timeo.replacement_timeout", replacement.as_str()),
            ("node.conn[0].timeo.noop_out_interval", noop.as_str()),
            ("node.conn[0].timeo.noop_out_timeout", noop.as_str()),
            ("node.conn[0].timeo.login_timeout", LOGIN_ATTEMPT_TIMEOUT_S),
            ("node.session.initial_login_retry_max", LOGIN_RETRIES),
        ];
        let mut secrets = vec![];
        match chap {
            Some(c) => {
                pairs.extend([
                    ("node.session.auth.authmethod", "CHAP"),
                    ("node.session.auth.username", c.username.as_str()),
                    ("node.session.auth.password", c.password.as_str()),
                ]);
                secrets.push(c.password.as_str());
            }
            None => pairs.push(("node.session.auth.authmethod", "None")),
        }
        update(t, &pairs, &secrets)?;
        let mut a = node_args(t);
        a.push("--login");
        let out = cmd::run(Kind::Iscsi, ISCSIADM, &a, &[], LOGIN_TIMEOUT)?;
        if out.status == SESSION_EXISTS {
            // A concurrent login, or iscsid finishing an earlier one: use that session.
            return wait_for_session(t, SESSION_APPEAR_TIMEOUT).map(|s| (s, false)).ok_or_else(|| {
                Error::new(
                    Kind::Iscsi,
                    format!("iscsiadm reports a session to {} at {} but none appeared in {:?}", t.iqn, t.portal, SESSION_APPEAR_TIMEOUT),
                )
            });
        }
        if out.status != 0 {
            return Err(Error::new(Kind::Iscsi, format!("{ISCSIADM} {} failed (exit {}): {}", a.join(" "), out.status, out.stderr.trim())));
        }
        find_session(t)
            .map(|s| (s, true))
            .ok_or_else(|| Error::new(Kind::Iscsi, format!("login to {} at {} reported success but no session appeared", t.iqn, t.portal)))
    })();
    match result {
        Ok((s, true)) => {
            info!("logged in to {} at {} (session {}, host{})", t.iqn, t.portal, s.sid, s.host_no);
            Ok((s, true))
        }
        Ok((s, false)) => {
            info!("reusing iSCSI session {} to {} at {} (it appeared during our login)", s.sid, t.iqn, t.portal);
            Ok((s, false))
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

/// Where open-iscsi keeps node records: `<iqn>/<addr>,<port>,<tpgt>/<iface>`.
const NODE_RECORDS: &str = "/etc/iscsi/nodes";

/// Seconds since the epoch at this boot (`btime` of /proc/stat).
fn boot_time() -> Option<std::time::SystemTime> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let secs = stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse::<u64>().ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Our node records (under `IFACE`) in `root` as targets (LUN 0), each with when it was last
/// written. open-iscsi keeps a record as `<iqn>/<addr>,<port>,<tpgt>/<iface>` once a target
/// portal group is known (discovery), and as the file `<iqn>/<addr>,<port>` for one made with
/// `-o new` (ours), naming its interface inside.
fn our_records(root: &Path) -> Vec<(Target, std::time::SystemTime)> {
    let mut out = Vec::new();
    let Ok(iqns) = fs::read_dir(root) else { return out };
    for iqn in iqns.filter_map(|e| e.ok()) {
        let Ok(portals) = fs::read_dir(iqn.path()) else { continue };
        for p in portals.filter_map(|e| e.ok()) {
            let Ok(meta) = fs::symlink_metadata(p.path()) else { continue };
            let name = p.file_name().to_string_lossy().into_owned();
            let (record, addr_port) = if meta.is_dir() {
                (p.path().join(IFACE), name.rsplit_once(',').map(|(ap, _tpgt)| ap.to_string()))
            } else {
                let ours = fs::read_to_string(p.path()).is_ok_and(|t| {
                    t.lines().any(|l| l.split_once('=').is_some_and(|(k, v)| k.trim() == "iface.iscsi_ifacename" && v.trim() == IFACE))
                });
                (if ours { p.path() } else { continue }, Some(name))
            };
            let Ok(meta) = fs::symlink_metadata(&record) else { continue };
            let Some((addr, port)) = addr_port.as_deref().and_then(|ap| ap.rsplit_once(',')) else { continue };
            let addr = if addr.contains(':') && !addr.starts_with('[') { format!("[{addr}]") } else { addr.to_string() };
            let written = meta.modified().unwrap_or_else(|_| std::time::SystemTime::now());
            out.push((Target { portal: format!("{addr}:{port}"), iqn: iqn.file_name().to_string_lossy().into_owned(), lun: 0 }, written));
        }
    }
    out
}

/// Delete our node records that have no session and were written before this boot or more
/// than `min_age` ago: what a login, an update or a logout killed half-way left (a record
/// under our interface is only needed while its session lives; the next login makes it
/// anew). `min_age` spares a login in flight in another process, which needs its record for
/// at most `LOGIN_TIMEOUT`. Returns what went, for the caller's report.
pub fn sweep_records(min_age: Duration) -> Vec<String> {
    let live = sessions();
    let booted = boot_time();
    let mut removed = Vec::new();
    for (t, written) in our_records(Path::new(NODE_RECORDS)) {
        let before_boot = booted.is_some_and(|b| written < b);
        let old = written.elapsed().is_ok_and(|age| age >= min_age);
        if !(before_boot || old) || live.iter().any(|s| s.iqn == t.iqn && s.portal == t.portal) {
            continue;
        }
        delete_record(&t);
        removed.push(format!("iSCSI node record of {} at {} (no session)", t.iqn, t.portal));
    }
    removed
}

/// A login in flight keeps its record at most this long (then it has a session or failed).
pub const RECORD_SWEEP_MIN_AGE: Duration = Duration::from_secs(LOGIN_TIMEOUT.as_secs() + ADM_TIMEOUT.as_secs() * 2);

/// Delete our node record of `t` (see `IFACE`), if there is one.
fn delete_record(t: &Target) {
    let mut a = node_args(t);
    a.extend(["-o", "delete"]);
    match cmd::run(Kind::Iscsi, ISCSIADM, &a, &[], ADM_TIMEOUT) {
        Ok(o) if o.status == 0 || o.status == NO_RECORDS => {}
        Ok(o) => warn!("could not delete our iscsiadm node record of {} at {}: exit {}: {}", t.iqn, t.portal, o.status, o.stderr.trim()),
        Err(e) => warn!("could not delete our iscsiadm node record of {} at {}: {e}", t.iqn, t.portal),
    }
}

/// A SCSI device (one LUN) of a session: its sysfs directory and its block device, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lun {
    pub lun: u32,
    pub sysfs: PathBuf,
    pub disk: Option<String>,
}

/// Every SCSI device (LUN) of a session, with or without a block device yet.
pub fn session_luns(s: &Session) -> Vec<Lun> {
    let mut out = Vec::new();
    let base = PathBuf::from(format!("/sys/class/iscsi_session/session{}/device", s.sid));
    let Ok(targets) = fs::read_dir(&base) else { return out };
    for t in targets.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("target")) {
        let Ok(luns) = fs::read_dir(t.path()) else { continue };
        for l in luns.filter_map(|e| e.ok()) {
            let name = l.file_name().to_string_lossy().into_owned();
            // H:C:T:L
            if name.split(':').count() != 4 {
                continue;
            }
            let Some(lun) = name.rsplit(':').next().and_then(|x| x.parse::<u32>().ok()) else { continue };
            let disk = fs::read_dir(l.path().join("block"))
                .ok()
                .and_then(|mut d| d.find_map(|e| e.ok()))
                .map(|e| e.file_name().to_string_lossy().into_owned());
            out.push(Lun { lun, sysfs: l.path(), disk });
        }
    }
    out.sort_by_key(|l| l.lun);
    out
}

/// `sdX` devices of a session, by LUN.
pub fn session_disks(s: &Session) -> Vec<(u32, String)> {
    session_luns(s).into_iter().filter_map(|l| Some((l.lun, l.disk?))).collect()
}

/// Ask the SCSI host for exactly this LUN and wait (bounded) until its block device exists.
pub fn scan_lun(s: &Session, lun: u32, timeout: Duration) -> Result<PathBuf> {
    let found = |s: &Session| session_disks(s).into_iter().find(|(l, _)| *l == lun).map(|(_, d)| d);
    if found(s).is_none() {
        let scan = format!("/sys/class/scsi_host/host{}/scan", s.host_no);
        fs::write(&scan, format!("- - {lun}")).map_err(|e| Error::new(Kind::Iscsi, format!("scan LUN {lun} through {scan}: {e}")))?;
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

/// What `release` let go of.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Released {
    /// Our LUN's disk (`sdX`), removed.
    pub disk: Option<String>,
    /// The session ended (no other LUN in it).
    pub session: bool,
}

/// `release` where a LUN still in use is not an error: `None` then.
pub fn release_unless_used(t: &Target) -> Result<Option<Released>> {
    match release(t) {
        Err(e) if e.kind == Kind::Busy => {
            info!("{e}");
            Ok(None)
        }
        r => r.map(Some),
    }
}

/// Let go of LUN `t.lun` of target `t`: its SCSI device goes (`Busy` while a device or a
/// process uses its disk: never pulled from under a reader); then the session ends, and our
/// node record with it, only if it carries no other LUN: volumes behind one target share the
/// session with their other users (os-brick's `shared_targets`), whose disks and records are
/// never touched.
pub fn release(t: &Target) -> Result<Released> {
    let mut done = Released::default();
    let Some(s) = find_session(t) else {
        return Ok(done);
    };
    for l in session_luns(&s).into_iter().filter(|l| l.lun == t.lun) {
        if let Some(disk) = &l.disk {
            let dev = dm::device_of(&Path::new("/dev").join(disk)).ok();
            if let Some(why) = dev.and_then(usage::block_in_use) {
                return Err(Error::new(Kind::Busy, format!("LUN {} of {} at {} ({disk}) is in use: {why}", t.lun, t.iqn, t.portal)));
            }
        }
        delete_scsi_device(&l)?;
        info!("removed LUN {} of {} at {}{}", t.lun, t.iqn, t.portal, l.disk.as_ref().map(|d| format!(" ({d})")).unwrap_or_default());
        done.disk = l.disk.or(done.disk);
    }
    let others: Vec<u32> = session_luns(&s).iter().map(|l| l.lun).collect();
    if !others.is_empty() {
        info!("kept iSCSI session {} to {} at {}: it carries LUN(s) {others:?} of other volumes", s.sid, t.iqn, t.portal);
        return Ok(done);
    }
    let sid = s.sid.to_string();
    cmd::check(Kind::Iscsi, ISCSIADM, &["-m", "session", "-r", &sid, "--logout"], &[], ADM_TIMEOUT)?;
    delete_record(t);
    info!("logged out of {} at {} (session {})", t.iqn, t.portal, s.sid);
    done.session = true;
    Ok(done)
}

/// Remove one SCSI device (LUN) from its host, as `echo 1 > .../device/delete`, and wait
/// (bounded) until it is gone.
fn delete_scsi_device(l: &Lun) -> Result<()> {
    let del = l.sysfs.join("delete");
    match fs::write(&del, "1") {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::new(Kind::Iscsi, format!("write 1 to {}: {e}", del.display()))),
    }
    let start = Instant::now();
    while l.sysfs.exists() {
        if start.elapsed() > ADM_TIMEOUT {
            return Err(Error::new(Kind::Iscsi, format!("{} still exists {}s after its delete", l.sysfs.display(), ADM_TIMEOUT.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_records_are_those_under_our_interface_with_their_portal() {
        let root = std::env::temp_dir().join(format!("vmthunder-nodes-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let mk = |iqn: &str, portal_dir: &str, iface: &str| {
            let d = root.join(iqn).join(portal_dir);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join(iface), "node.name = x\n").unwrap();
        };
        // A record made by `-o new`: a file, its interface inside.
        let file = |iqn: &str, portal: &str, iface: &str| {
            fs::create_dir_all(root.join(iqn)).unwrap();
            fs::write(root.join(iqn).join(portal), format!("node.name = {iqn}\niface.iscsi_ifacename = {iface}\n")).unwrap();
        };
        mk("iqn.2026-11.org.vmthunder:a:img", "198.18.0.1,3260,1", IFACE);
        mk("iqn.2026-11.org.vmthunder:a:img", "198.18.0.2,3260,1", "default"); // os-brick's: not ours
        mk("iqn.2026-11.org.vmthunder:b:img", "fd00::1,3260,1", IFACE);
        file("iqn.2026-11.org.vmthunder:c:img", "198.18.0.3,3260", IFACE);
        file("iqn.2026-11.org.vmthunder:d:img", "198.18.0.4,3260", "default");
        let mut got: Vec<(String, String)> = our_records(&root).into_iter().map(|(t, _)| (t.iqn, t.portal)).collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("iqn.2026-11.org.vmthunder:a:img".to_string(), "198.18.0.1:3260".to_string()),
                ("iqn.2026-11.org.vmthunder:b:img".to_string(), "[fd00::1]:3260".to_string()),
                ("iqn.2026-11.org.vmthunder:c:img".to_string(), "198.18.0.3:3260".to_string()),
            ]
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
