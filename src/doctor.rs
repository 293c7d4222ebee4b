//! `vmthunder doctor`: every precondition of an attach on this node, read from the kernel and
//! the host (modules, configfs, open-iscsi, bcache-tools, the local device), each with pass or
//! fail, what was found and the fix. The checks that need the network or Nova (the registry,
//! clock skew, the Nova patch) are the Python command's (python/vmthunder/cli.py).
use std::{
    fs,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::PathBuf,
};

use serde::Serialize;

use crate::{names, node::cache::Engine, node::layout};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// A failure here makes attaches fail (the command exits non-zero); otherwise it degrades
    /// something (relaying, start-up) or is advice.
    pub blocking: bool,
    pub detail: String,
    pub fix: String,
}

impl Check {
    fn new(name: impl Into<String>, ok: bool, blocking: bool, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        let fix = if ok { String::new() } else { fix.into() };
        Check { name: name.into(), ok, blocking, detail: detail.into(), fix }
    }
}

/// What this node is configured to do: which checks apply.
#[derive(Debug, Clone)]
pub struct Options {
    pub cache_device: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub engine: Engine,
    /// Miss coalescing (LIO fileio + a tcm_loop local disk), the default.
    pub coalesce: bool,
    /// The node re-exports its templates (it has an export address).
    pub relay: bool,
    /// "vmm": qcow2 overlays (qemu-img).
    pub vmm: bool,
    /// Where /proc, /sys, /etc and /lib live ("/"; another root in unit tests).
    pub root: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Options { cache_device: None, state_dir: None, engine: Engine::Bcache, coalesce: true, relay: true, vmm: false, root: "/".into() }
    }
}

/// Every check, in the order an operator fixes them.
pub fn run(o: &Options) -> Vec<Check> {
    let mut out: Vec<Check> = modules(o).iter().map(|m| module_check(o, m)).collect();
    out.push(configfs(o));
    out.push(binary(o, "iscsiadm", "open-iscsi's iscsiadm (logins to parents and the origin)", "apt-get install open-iscsi"));
    out.push(iscsid(o));
    out.push(initiator(o));
    if o.engine == Engine::Bcache {
        out.push(binary(
            o,
            "make-bcache",
            "bcache-tools' make-bcache (formats the cache set and each image's backing device)",
            "apt-get install bcache-tools",
        ));
        out.push(bcache_udev_rule(o));
    }
    if o.vmm {
        out.push(binary(o, "qemu-img", "qemu-img (makes each VM's qcow2 overlay, snapshot_mode = vmm)", "apt-get install qemu-utils"));
    }
    out.push(cache_device(o));
    out.push(state_dir(o));
    out
}

struct Module {
    /// The name modprobe takes (as the issue and the distributions spell it).
    name: &'static str,
    why: &'static str,
}

fn modules(o: &Options) -> Vec<Module> {
    let mut m = vec![
        Module { name: "dm-snapshot", why: "each VM's copy-on-write snapshot and the template's snapshot-origin" },
        Module { name: "dm-multipath", why: "the template's paths to its parents and the origin (failover)" },
        Module { name: "iscsi_tcp", why: "the iSCSI initiator transport (logins to parents and the origin)" },
        Module { name: "target_core_mod", why: "LIO, the iSCSI target and backstores" },
    ];
    match o.engine {
        Engine::Bcache => m.push(Module { name: "bcache", why: "the cache on read (engine bcache)" }),
        Engine::DmCache => {
            m.push(Module { name: "dm-cache", why: "the cache on read (engine dm-cache)" });
            m.push(Module { name: "dm-cache-smq", why: "dm-cache's policy" });
        }
    }
    if o.coalesce {
        m.push(Module { name: "target_core_file", why: "the template's fileio backstore (miss coalescing)" });
        m.push(Module { name: "tcm_loop", why: "the node's local disk of a template, what its VMs read (miss coalescing)" });
    } else {
        m.push(Module { name: "target_core_iblock", why: "the template's block backstore (coalesce off)" });
    }
    if o.relay {
        m.push(Module { name: "iscsi_target_mod", why: "the iSCSI export to child nodes (relaying)" });
    }
    m
}

/// How the kernel has a module: loaded, built in, or only installed (loadable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleState {
    Loaded,
    BuiltIn,
    /// Not loaded; the file modprobe would load (relative to /lib/modules/<release>).
    Available(String),
    Missing,
}

fn kernel_name(name: &str) -> String {
    name.replace('-', "_")
}

/// `name`'s state from /proc/modules' text, modules.builtin's and modules.dep's (any may be
/// empty). Names compare with '-' and '_' alike, as modprobe does.
pub fn module_state(name: &str, proc_modules: &str, builtin: &str, dep: &str) -> ModuleState {
    let want = kernel_name(name);
    if proc_modules.lines().any(|l| l.split_whitespace().next() == Some(want.as_str())) {
        return ModuleState::Loaded;
    }
    let base = |path: &str| {
        let file = path.rsplit('/').next().unwrap_or(path);
        let stem = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"].iter().find_map(|s| file.strip_suffix(s)).unwrap_or(file);
        kernel_name(stem)
    };
    if builtin.lines().any(|l| base(l.trim()) == want) {
        return ModuleState::BuiltIn;
    }
    dep.lines()
        .filter_map(|l| l.split(':').next())
        .find(|p| base(p) == want)
        .map_or(ModuleState::Missing, |p| ModuleState::Available(p.to_string()))
}

fn read(o: &Options, p: &str) -> String {
    fs::read_to_string(o.root.join(p.trim_start_matches('/'))).unwrap_or_default()
}

fn release(o: &Options) -> String {
    read(o, "/proc/sys/kernel/osrelease").trim().to_string()
}

fn module_check(o: &Options, m: &Module) -> Check {
    let rel = release(o);
    let lib = format!("/lib/modules/{rel}");
    let state = module_state(
        m.name,
        &read(o, "/proc/modules"),
        &read(o, &format!("{lib}/modules.builtin")),
        &read(o, &format!("{lib}/modules.dep")),
    );
    // A dm target or LIO fabric may also be loaded on first use, but nova-compute may run where
    // modprobe is not (a container): loaded before the first attach is what is checked.
    let boot = format!("modprobe {0} and load it at boot: echo {0} >> /etc/modules-load.d/vmthunder.conf", m.name);
    let (ok, detail, fix) = match state {
        ModuleState::Loaded => (true, "loaded".to_string(), String::new()),
        ModuleState::BuiltIn => (true, "built into the kernel".to_string(), String::new()),
        ModuleState::Available(p) => (false, format!("not loaded (installed: {lib}/{p})"), boot),
        ModuleState::Missing => (
            false,
            format!("not loaded, and kernel {rel} has no such module"),
            format!(
                "install kernel {rel}'s modules (Debian: linux-image-{rel}){}, then {boot}",
                if m.name == "bcache" { "; or, on a kernel without bcache, engine dm-cache" } else { "" }
            ),
        ),
    };
    Check::new(format!("module {}", m.name), ok, true, format!("{detail}: {}", m.why), fix)
}

fn configfs(o: &Options) -> Check {
    let mounted = read(o, "/proc/mounts").lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[2] == "configfs" && f[1] == "/sys/kernel/config"
    });
    let target = o.root.join("sys/kernel/config/target").is_dir();
    let (ok, detail) = match (mounted, target) {
        (true, true) => (true, "mounted at /sys/kernel/config, LIO's target/ present"),
        (true, false) => (false, "mounted at /sys/kernel/config, but no target/ in it (target_core_mod not loaded)"),
        (false, _) => (false, "not mounted at /sys/kernel/config (LIO is driven through it)"),
    };
    Check::new(
        "configfs",
        ok,
        true,
        detail,
        "mount -t configfs configfs /sys/kernel/config (systemd: systemctl start sys-kernel-config.mount); modprobe target_core_mod",
    )
}

fn find_in_path(o: &Options, bin: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| o.root.join(d.trim_start_matches('/')).join(bin))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0));
    found
}

fn binary(o: &Options, bin: &str, what: &str, fix: &str) -> Check {
    match find_in_path(o, bin) {
        Some(p) => Check::new(bin, true, true, format!("{}: {what}", p.display()), ""),
        None => Check::new(bin, false, true, format!("not found in PATH or /usr/sbin, /sbin: {what}"), fix),
    }
}

fn iscsid(o: &Options) -> Check {
    let running = fs::read_dir(o.root.join("proc"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_str().is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit())))
                .any(|e| fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "iscsid"))
        })
        .unwrap_or(false);
    Check::new(
        "iscsid",
        running,
        true,
        if running { "running" } else { "no iscsid process: iscsiadm cannot log in" },
        "systemctl enable --now iscsid (Debian: open-iscsi's iscsid.socket or iscsid.service)",
    )
}

fn initiator(o: &Options) -> Check {
    let p = "/etc/iscsi/initiatorname.iscsi";
    let fix = "echo InitiatorName=$(iscsi-iname) > /etc/iscsi/initiatorname.iscsi; systemctl restart iscsid (each host its own name)";
    let text = match fs::read_to_string(o.root.join(p.trim_start_matches('/'))) {
        Ok(t) => t,
        Err(e) => return Check::new("initiator name", false, true, format!("{p}: {e}"), fix),
    };
    let name = text.lines().filter(|l| !l.trim_start().starts_with('#')).find_map(|l| l.trim().strip_prefix("InitiatorName="));
    match name.map(str::trim) {
        None => Check::new("initiator name", false, true, format!("{p} has no InitiatorName= line"), fix),
        Some(n) => match names::validate_iqn(n) {
            Ok(_) => Check::new("initiator name", true, true, format!("{n} (parents grant access to this name)"), ""),
            Err(e) => Check::new("initiator name", false, true, format!("{p}: {}", e.message), fix),
        },
    }
}

fn bcache_udev_rule(o: &Options) -> Check {
    let found = ["lib/udev/rules.d/69-bcache.rules", "usr/lib/udev/rules.d/69-bcache.rules", "etc/udev/rules.d/69-bcache.rules"]
        .iter()
        .map(|p| o.root.join(p))
        .find(|p| p.is_file());
    match found {
        Some(p) => Check::new("bcache udev rule", true, false, format!("{} (registers bcache devices as they appear; vmthunder adopts what it registered)", p.display()), ""),
        None => Check::new(
            "bcache udev rule",
            false,
            false,
            "69-bcache.rules not found: bcache-tools is not installed from its package (vmthunder registers its own devices, so attaches still work)",
            "apt-get install bcache-tools",
        ),
    }
}

fn sysfs_block(o: &Options, rdev: u64) -> PathBuf {
    o.root.join(format!("sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev)))
}

/// Why the local device is taken by something other than vmthunder, if it is: mounted, swap,
/// partitioned, or held by a device that is not one of vmthunder's slices.
fn in_use_by_others(o: &Options, rdev: u64) -> Vec<String> {
    let mut why = Vec::new();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    for l in read(o, "/proc/self/mountinfo").lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 4 && f[2] == format!("{maj}:{min}") {
            why.push(format!("mounted at {}", f[4]));
        }
    }
    for l in read(o, "/proc/swaps").lines().skip(1) {
        if let Some(dev) = l.split_whitespace().next() {
            if fs::metadata(dev).is_ok_and(|m| m.rdev() == rdev) {
                why.push(format!("swap ({dev})"));
            }
        }
    }
    let sys = sysfs_block(o, rdev);
    if let Ok(d) = fs::read_dir(&sys) {
        for e in d.filter_map(|e| e.ok()) {
            if e.path().join("partition").is_file() {
                why.push(format!("has partition {}", e.file_name().to_string_lossy()));
            }
        }
    }
    if let Ok(d) = fs::read_dir(sys.join("holders")) {
        for e in d.filter_map(|e| e.ok()) {
            let holder = e.file_name().to_string_lossy().into_owned();
            let dm_name = fs::read_to_string(e.path().join("dm/name")).unwrap_or_default();
            if !dm_name.trim().starts_with(names::DM_PREFIX) {
                let shown = if dm_name.trim().is_empty() { holder } else { format!("{holder} ({})", dm_name.trim()) };
                why.push(format!("held by {shown}"));
            }
        }
    }
    why
}

fn cache_device(o: &Options) -> Check {
    const NAME: &str = "cache device";
    let Some(path) = &o.cache_device else {
        return Check::new(
            NAME,
            false,
            true,
            "not configured",
            "set [vmthunder] cache_device in nova.conf (or --cache-device): a local block device for caches and VM snapshots",
        );
    };
    let shown = path.display();
    let meta = match fs::metadata(o.root.join(path.strip_prefix("/").unwrap_or(path))) {
        Ok(m) => m,
        Err(e) => {
            return Check::new(
                NAME,
                false,
                true,
                format!("{shown}: {e}"),
                "point cache_device at an existing local block device (a partition or disk set aside for vmthunder)",
            )
        }
    };
    if !meta.file_type().is_block_device() {
        return Check::new(
            NAME,
            false,
            true,
            format!("{shown} is not a block device"),
            "point cache_device at a block device (a partition, a disk or an LV), not a file",
        );
    }
    let rdev = meta.rdev();
    let sectors = fs::read_to_string(sysfs_block(o, rdev).join("size")).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    let mib = sectors / 2048;
    if sectors < 16 * 2048 {
        return Check::new(
            NAME,
            false,
            true,
            format!("{shown} has {mib} MiB: at least 16 MiB are needed (plus the cache and each VM's COW)"),
            "use a larger device",
        );
    }
    let others = in_use_by_others(o, rdev);
    if !others.is_empty() {
        return Check::new(
            NAME,
            false,
            true,
            format!("{shown} ({mib} MiB) is in use: {}", others.join(", ")),
            "give vmthunder a device nothing else uses (unmount it, swapoff, or choose another)",
        );
    }
    match layout::Store::new(&o.root.join(path.strip_prefix("/").unwrap_or(path)), sectors).read() {
        Ok(label) => {
            let l = &label.layout;
            let what = if label.generation == 0 {
                "no vmthunder layout yet (the first attach writes one in its first MiB)".to_string()
            } else {
                format!(
                    "vmthunder layout generation {}: {} slice(s), {} template(s), {} VM(s), {} MiB used",
                    label.generation,
                    l.slices.len(),
                    l.templates.len(),
                    l.vms.len(),
                    l.used_sectors() / 2048
                )
            };
            Check::new(NAME, true, true, format!("{shown}: block device, {mib} MiB, not used by anything else; {what}"), "")
        }
        Err(e) => Check::new(
            NAME,
            false,
            true,
            format!("{shown}: {}", e.message),
            "see the message: a damaged layout is never reset by vmthunder",
        ),
    }
}

fn state_dir(o: &Options) -> Check {
    const NAME: &str = "state dir";
    let Some(dir) = &o.state_dir else {
        return Check::new(NAME, false, true, "not configured", "set [vmthunder] state_dir (or --state-dir)");
    };
    let real = o.root.join(dir.strip_prefix("/").unwrap_or(dir));
    // The nearest existing ancestor must be a writable directory (vmthunder makes the rest).
    let mut p = real.as_path();
    loop {
        match fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Check::new(
                    NAME,
                    false,
                    true,
                    format!("{} is not a directory", p.display()),
                    "remove it or choose another state_dir",
                )
            }
            Err(_) => match p.parent() {
                Some(up) => p = up,
                None => break,
            },
        }
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap_or_default();
    // SAFETY: access(2) on a NUL-terminated path.
    let writable = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0;
    let how = if p == real { "exists" } else { "will be made under" };
    Check::new(
        NAME,
        writable,
        true,
        format!("{} {how} {}{}", dir.display(), p.display(), if writable { "" } else { ": not writable" }),
        "make it writable by nova-compute's user (root)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_state_reads_loaded_builtin_and_installed_modules() {
        let procs = "dm_snapshot 35682 3 - Live 0x0\nbcache 169403 4 - Live 0x0\n";
        let builtin = "kernel/drivers/md/dm-mod.ko\nkernel/fs/configfs/configfs.ko\n";
        let dep = "kernel/drivers/target/loopback/tcm_loop.ko: kernel/drivers/target/target_core_mod.ko\n\
                   kernel/drivers/md/dm-multipath.ko.xz:\n";
        assert_eq!(module_state("dm-snapshot", procs, builtin, dep), ModuleState::Loaded);
        assert_eq!(module_state("bcache", procs, builtin, dep), ModuleState::Loaded);
        assert_eq!(module_state("dm-mod", procs, builtin, dep), ModuleState::BuiltIn);
        assert_eq!(
            module_state("tcm_loop", procs, builtin, dep),
            ModuleState::Available("kernel/drivers/target/loopback/tcm_loop.ko".into())
        );
        assert_eq!(
            module_state("dm_multipath", procs, builtin, dep),
            ModuleState::Available("kernel/drivers/md/dm-multipath.ko.xz".into())
        );
        assert_eq!(module_state("iscsi_tcp", procs, builtin, dep), ModuleState::Missing);
        // a prefix is not the module
        assert_eq!(module_state("dm-snap", procs, builtin, dep), ModuleState::Missing);
    }

    use std::path::Path;

    /// A directory removed when dropped.
    struct Root(PathBuf);
    impl Root {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Root {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn fake_root() -> Root {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let t = Root(std::env::temp_dir().join(format!("vmt-doctor-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))));
        let _ = fs::remove_dir_all(&t.0);
        let w = |p: &str, s: &str| {
            let f = t.path().join(p);
            fs::create_dir_all(f.parent().unwrap()).unwrap();
            fs::write(f, s).unwrap();
        };
        w("proc/sys/kernel/osrelease", "6.1.0-test\n");
        w(
            "proc/modules",
            "dm_snapshot 1 0 - Live 0x0\ndm_multipath 1 0 - Live 0x0\niscsi_tcp 1 0 - Live 0x0\n\
                           target_core_mod 1 0 - Live 0x0\nbcache 1 0 - Live 0x0\ntarget_core_file 1 0 - Live 0x0\n\
                           iscsi_target_mod 1 0 - Live 0x0\n",
        );
        w("lib/modules/6.1.0-test/modules.dep", "kernel/drivers/target/loopback/tcm_loop.ko:\n");
        w("lib/modules/6.1.0-test/modules.builtin", "");
        w("proc/mounts", "configfs /sys/kernel/config configfs rw 0 0\n");
        fs::create_dir_all(t.path().join("sys/kernel/config/target")).unwrap();
        w("etc/iscsi/initiatorname.iscsi", "## generated\nInitiatorName=iqn.1993-08.org.debian:01:abc\n");
        t
    }

    #[test]
    fn a_module_that_is_not_loaded_fails_and_names_itself_with_the_fix() {
        let t = fake_root();
        let o = Options { root: t.path().into(), ..Options::default() };
        let checks = run(&o);
        let tcm = checks.iter().find(|c| c.name == "module tcm_loop").unwrap();
        assert!(!tcm.ok && tcm.blocking, "{tcm:?}");
        assert!(
            tcm.detail.starts_with("not loaded (installed: /lib/modules/6.1.0-test/kernel/drivers/target/loopback/tcm_loop.ko)"),
            "{tcm:?}"
        );
        assert!(tcm.fix.starts_with("modprobe tcm_loop"), "{tcm:?}");
        let snap = checks.iter().find(|c| c.name == "module dm-snapshot").unwrap();
        assert!(snap.ok && snap.fix.is_empty(), "{snap:?}");
        assert!(checks.iter().find(|c| c.name == "configfs").unwrap().ok);
        let ini = checks.iter().find(|c| c.name == "initiator name").unwrap();
        assert!(ini.ok && ini.detail.starts_with("iqn.1993-08.org.debian:01:abc"), "{ini:?}");
        // nothing configured: the device and state dir fail and say what to set
        let dev = checks.iter().find(|c| c.name == "cache device").unwrap();
        assert!(!dev.ok && dev.fix.contains("cache_device"), "{dev:?}");
    }

    #[test]
    fn the_checks_follow_the_configuration() {
        let t = fake_root();
        let names = |o: &Options| run(o).into_iter().map(|c| c.name).collect::<Vec<_>>();
        let plain = Options { root: t.path().into(), ..Options::default() };
        assert!(names(&plain).contains(&"make-bcache".to_string()));
        assert!(!names(&plain).contains(&"qemu-img".to_string()));
        let other = Options { engine: Engine::DmCache, coalesce: false, relay: false, vmm: true, ..plain.clone() };
        let n = names(&other);
        assert!(n.contains(&"module dm-cache".to_string()) && n.contains(&"module target_core_iblock".to_string()));
        assert!(!n.iter().any(|x| x == "module bcache" || x == "make-bcache" || x == "module tcm_loop" || x == "module iscsi_target_mod"));
        assert!(n.contains(&"qemu-img".to_string()));
    }

    #[test]
    fn a_bad_initiator_name_and_a_missing_configfs_fail() {
        let t = fake_root();
        fs::write(t.path().join("etc/iscsi/initiatorname.iscsi"), "InitiatorName=not an iqn\n").unwrap();
        fs::write(t.path().join("proc/mounts"), "proc /proc proc rw 0 0\n").unwrap();
        let checks = run(&Options { root: t.path().into(), ..Options::default() });
        let ini = checks.iter().find(|c| c.name == "initiator name").unwrap();
        assert!(!ini.ok && ini.detail.contains("not an iqn"), "{ini:?}");
        let cfs = checks.iter().find(|c| c.name == "configfs").unwrap();
        assert!(!cfs.ok && cfs.detail.starts_with("not mounted"), "{cfs:?}");
    }

    #[test]
    fn a_file_is_not_a_cache_device_and_a_missing_state_dir_is_made_under_its_parent() {
        let t = fake_root();
        fs::write(t.path().join("disk.img"), vec![0u8; 4096]).unwrap();
        let o = Options {
            root: t.path().into(),
            cache_device: Some("/disk.img".into()),
            state_dir: Some("/var/lib/vmthunder".into()),
            ..Options::default()
        };
        let checks = run(&o);
        let dev = checks.iter().find(|c| c.name == "cache device").unwrap();
        assert!(!dev.ok && dev.detail == "/disk.img is not a block device", "{dev:?}");
        let sd = checks.iter().find(|c| c.name == "state dir").unwrap();
        assert!(sd.ok && sd.detail.contains("will be made under"), "{sd:?}");
    }
}
