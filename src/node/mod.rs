//! One compute node: the lifecycle of templates (one image on this node:
//! iSCSI sessions -> multipath -> cache on the local device -> snapshot-origin -> LIO export) and
//! of snapshots (one VM: a dm-snapshot with its COW on the local device, or a qcow2 overlay).
//!
//! Nothing is kept in memory between calls: every call reads the kernel (dm tables, configfs,
//! iSCSI sessions) and the state dir, so a new process sees exactly what an old one built.
//! Every step adopts what exists, and a failed call undoes what it created.
pub mod cache;
pub mod carve;
pub mod layout;
pub mod lock;
pub mod paths;
pub mod prefetch;
mod template;
mod vm;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    dm::{self, Dm},
    error::{Error, Kind, Result},
    iscsi::{self, Source, Target},
    lio::Lio,
    names::{self, Parsed, Role},
    rollback::Undo,
};

/// How a VM's writable disk is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// dm-snapshot with its COW on the local device; the VM gets a block device.
    Dm,
    /// qcow2 overlay over the template device, made with qemu-img; the VM gets a file.
    Vmm,
}

impl std::str::FromStr for SnapshotMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dm" => Ok(SnapshotMode::Dm),
            "vmm" => Ok(SnapshotMode::Vmm),
            _ => Err(Error::invalid(format!("invalid snapshot mode {s:?}: expected \"dm\" or \"vmm\""))),
        }
    }
}

/// How a template reaches its parents: iSCSI logins, LUN scans and dm-multipath failover
/// (paths.rs, the logins of template.rs).
#[derive(Debug, Clone)]
pub struct PathPolicy {
    /// Seconds I/O waits on a dead parent before failing over to the next path.
    pub path_timeout_s: u32,
    /// Seconds dm-multipath holds I/O when every path is down (an outage of the origin and
    /// all parents) before failing it to the guest; 0: fail at once. Host-wide (dm_multipath's
    /// `queue_if_no_path_timeout_secs`). Upkeep (`heal_paths`) reinstates paths afterwards.
    pub queue_timeout_s: u32,
    /// How long to wait for a LUN to appear after a scan.
    pub scan_timeout: Duration,
}

/// How a template caches on the local device (cache/).
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Cache engine for new templates (an existing one keeps its own).
    pub engine: cache::Engine,
    /// Cache data per image; `None`: as large as the image.
    pub cache_sectors: Option<u64>,
    /// dm-cache block size in sectors (multiple of 64).
    pub cache_block_sectors: u64,
}

/// How a template is exported to children and read by this node's VMs (LIO, template.rs).
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// This node's name in IQNs and in the registry (lower case).
    pub host: String,
    /// Where children reach this node's exports; `None`: this node does not relay.
    pub export_ip: Option<String>,
    pub export_port: u16,
    /// VMs, children and the prefetch read a template through one page cache (LIO fileio,
    /// VMs through a local tcm_loop disk), so concurrent misses on a block fetch it once.
    /// Off: children read through iblock and VMs the cached device directly.
    pub coalesce: bool,
    /// Readahead of a coalescing template (KiB): what the page cache reads beyond a miss, i.e.
    /// fetches from the parent that no reader asked for. Measured (bench/cache_engines.py):
    /// 0 = exact (every edge 1.00 x W) but one 4 KiB page per round trip, twice the time;
    /// 4 = 1.05-1.10 x W at full speed; 128 (the kernel's default) = up to 1.35 x W.
    pub readahead_kib: u32,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The local block device carved for caches and COWs of all images.
    pub cache_device: PathBuf,
    /// Locks and qcow2 overlays.
    pub state_dir: PathBuf,
    pub paths: PathPolicy,
    pub cache: CacheConfig,
    pub export: ExportConfig,
    /// COW space per VM (dm mode).
    pub cow_sectors: u64,
    /// `status()` logs a warning for a VM whose COW is this full (percent).
    pub cow_warn_percent: u8,
}

impl Config {
    pub fn new(host: &str, cache_device: &str, state_dir: &str) -> Self {
        Config {
            cache_device: cache_device.into(),
            state_dir: state_dir.into(),
            paths: PathPolicy { path_timeout_s: 5, queue_timeout_s: 60, scan_timeout: Duration::from_secs(15) },
            cache: CacheConfig { engine: cache::Engine::Bcache, cache_sectors: None, cache_block_sectors: 128 },
            export: ExportConfig { host: host.to_string(), export_ip: None, export_port: 3260, coalesce: true, readahead_kib: 4 },
            cow_sectors: 2 * 1024 * 1024, // 1 GiB
            cow_warn_percent: 90,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let (p, c, x) = (&self.paths, &self.cache, &self.export);
        names::validate_host(&x.host)?;
        let cd = self.cache_device.to_str().ok_or_else(|| Error::invalid("cache device path is not UTF-8"))?;
        names::validate_path("cache device", cd)?;
        let sd = self.state_dir.to_str().ok_or_else(|| Error::invalid("state dir path is not UTF-8"))?;
        names::validate_path("state dir", sd)?;
        if let Some(ip) = &x.export_ip {
            ip.parse::<std::net::Ipv4Addr>().map_err(|_| Error::invalid(format!("invalid export IP {ip:?}: expected IPv4")))?;
        }
        if x.export_port == 0 {
            return Err(Error::invalid("invalid export port 0"));
        }
        let b = c.cache_block_sectors;
        if !(64..=2_097_152).contains(&b) || b % 64 != 0 {
            return Err(Error::invalid(format!("invalid cache block size {} KiB: a multiple of 32 KiB, 32 KiB..1 GiB", b / 2)));
        }
        if !(1..=600).contains(&p.path_timeout_s) {
            return Err(Error::invalid(format!("invalid path timeout {}s: 1..600", p.path_timeout_s)));
        }
        if p.queue_timeout_s > 3600 {
            return Err(Error::invalid(format!("invalid queue timeout {}s: 0..3600 (0: no queueing)", p.queue_timeout_s)));
        }
        if x.readahead_kib > 65536 {
            return Err(Error::invalid(format!("invalid readahead {} KiB: 0..65536", x.readahead_kib)));
        }
        if !(1..=100).contains(&self.cow_warn_percent) {
            return Err(Error::invalid(format!("invalid COW warning threshold {}%: 1..100", self.cow_warn_percent)));
        }
        if self.cow_sectors < 2048 {
            return Err(Error::invalid(format!("invalid COW size {} KiB: at least 1 MiB", self.cow_sectors / 2)));
        }
        Ok(())
    }
}

pub struct Node {
    cfg: Config,
    locks: lock::Locks,
    local: carve::LocalDevice,
    overlays: vm::Overlays,
}

/// What `reassemble()` did: the VM disks back (VM id -> path), the VMs that could not be
/// rebuilt (VM id -> why, naming the VM and the image), what was removed.
#[derive(Debug, Default, Serialize)]
pub struct Reassembly {
    pub disks: BTreeMap<String, String>,
    pub failed: BTreeMap<String, String>,
    pub failed_images: BTreeMap<String, String>,
    pub removed: Vec<String>,
}

/// What `status()` reports of one image.
#[derive(Debug, Serialize)]
pub struct TemplateStatus {
    pub devices: BTreeMap<String, String>,
    pub complete: bool,
    pub size_bytes: u64,
    pub vms: Vec<String>,
    pub export_iqn: Option<String>,
    pub children: Vec<String>,
    pub child_acls: Vec<String>,
    pub cache_status: Option<String>,
    pub engine: Option<String>,
    /// Parent paths in failover order: `{"device", "state"}`, state "A" active or "F" failed.
    pub paths: Vec<Value>,
    /// Whether I/O queues (bounded) when every path is down; false after the bound expired
    /// until upkeep re-arms it, or when the node does not queue. `None` without paths.
    pub queueing: Option<bool>,
}

impl Node {
    pub fn new(cfg: Config) -> Result<Self> {
        cfg.validate()?;
        let cache_dev = dm::device_of(&cfg.cache_device)
            .map_err(|e| Error::new(Kind::CacheDevice, format!("cache device {}: {}", cfg.cache_device.display(), e.message)))?;
        let cache_total = dm::size_sectors(cache_dev)?;
        if cache_total < 16 * 2048 {
            return Err(Error::new(
                Kind::CacheDevice,
                format!("cache device {} has {} KiB: at least 16 MiB needed", cfg.cache_device.display(), cache_total / 2),
            ));
        }
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| Error::caused_by(Kind::StateDir, format!("state dir {}", cfg.state_dir.display()), e))?;
        let locks = lock::Locks::new(&cfg.state_dir);
        let local = carve::LocalDevice::new(&cfg.cache_device, cache_dev, cache_total, locks.clone());
        let overlays = vm::Overlays::new(&cfg.state_dir);
        Ok(Node { cfg, locks, local, overlays })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn lock_image(&self, image: &str) -> Result<lock::Lock> {
        self.locks.image(image, Duration::from_secs(120))
    }

    /// What the cache engines use: their settings, the local device, the cache set's lock.
    fn cache_ctx(&self) -> cache::Ctx<'_> {
        cache::Ctx { cfg: &self.cfg.cache, local: &self.local, locks: &self.locks }
    }

    /// What a template is built and torn down with.
    fn template_ctx(&self) -> template::Ctx<'_> {
        template::Ctx { paths: &self.cfg.paths, export: &self.cfg.export, cache: self.cache_ctx() }
    }

    /// What VM disks are made on.
    fn disks(&self) -> vm::Disks<'_> {
        vm::Disks { local: &self.local, overlays: &self.overlays, cow_sectors: self.cfg.cow_sectors }
    }

    /// Tear `image`'s template down if no VM and no child uses it (the caller holds the
    /// image lock). Returns whether it went.
    fn release_template(&self, dm: &Dm, image: &str) -> Result<bool> {
        template::release_if_unused(&self.template_ctx(), dm, image, &self.vms_of(dm, image)?)
    }

    /// Attach VM `vm` to image `image`: build (or reuse) the image's template from `sources`
    /// and give the VM its own writable snapshot. Returns the path to hand the hypervisor.
    pub fn attach(&self, image: &str, raw_sources: &[Value], vm: &str, mode: SnapshotMode) -> Result<String> {
        names::validate_id("image id", image)?;
        names::validate_id("VM id", vm)?;
        let sources = raw_sources.iter().map(Source::from_json).collect::<Result<Vec<_>>>()?;
        let dm = Dm::open()?;
        if let Some((other, _)) = self.find_vm(&dm, vm)? {
            if other != image {
                return Err(Error::new(Kind::Busy, format!("VM {vm:?} is already attached to image {other:?}")));
            }
        }
        let _lock = self.lock_image(image)?;
        let mut undo = Undo::default();
        let result = (|| -> Result<String> {
            let attached = self.record_attaching(image, raw_sources.last(), vm, mode, &mut undo)?;
            let t = template::ensure(&self.template_ctx(), &dm, image, &sources, &mut undo)?;
            let path = vm::ensure(&self.disks(), &dm, &t, vm, mode, attached, &mut undo)?;
            if !attached {
                self.local.space()?.update(|l| l.vms.get_mut(vm).map(|r| r.state = layout::VmState::Attached))?;
            }
            Ok(path)
        })();
        match result {
            Ok(path) => {
                undo.commit();
                log::info!("attached VM {vm} to image {image}: {path}");
                Ok(path)
            }
            Err(e) => Err(undo.rollback(e.context(format!("attach VM {vm:?} to image {image:?}")))),
        }
    }

    /// Record on the local device, before anything is built, that `vm` is being attached to
    /// `image` and where the image's template is rebuilt from after a reboot (`source`, the
    /// last of the attach's sources). Returns whether the VM was attached already: its disk
    /// then holds the guest's writes and is found again, never made anew.
    fn record_attaching<'a>(
        &'a self,
        image: &str,
        source: Option<&Value>,
        vm: &str,
        mode: SnapshotMode,
        undo: &mut Undo<'a>,
    ) -> Result<bool> {
        use layout::{TemplateRecord, VmRecord, VmState};
        let mut space = self.local.space()?;
        let (new_template, new_vm, attached) = {
            let l = space.layout();
            if let Some(r) = l.vms.get(vm) {
                if r.image != image {
                    return Err(Error::new(Kind::Busy, format!("VM {vm:?} is already attached to image {:?}", r.image)));
                }
                if r.mode != mode {
                    return Err(Error::invalid(format!(
                        "VM {vm:?} is attached to image {image:?} as a {:?} snapshot, not {mode:?}",
                        r.mode
                    )));
                }
                if r.state == VmState::Detaching {
                    return Err(Error::new(Kind::Busy, format!("VM {vm:?}: its detach did not finish; detach it again or recover")));
                }
            }
            (
                !l.templates.contains_key(image) && source.is_some(),
                !l.vms.contains_key(vm),
                l.vms.get(vm).is_some_and(|r| r.state == VmState::Attached),
            )
        };
        space.update(|l| {
            if new_template {
                l.templates.insert(image.to_string(), TemplateRecord { source: source.cloned().expect("checked") });
            }
            if new_vm {
                l.vms.insert(vm.to_string(), VmRecord { image: image.to_string(), mode, state: VmState::Attaching });
            }
        })?;
        if new_template {
            let image = image.to_string();
            undo.push(format!("record of image {image}'s template"), move || {
                self.local
                    .space()
                    .and_then(|mut s| {
                        s.update(|l| {
                            if !l.vms.values().any(|r| r.image == image) {
                                l.templates.remove(&image);
                            }
                        })
                    })
                    .map_err(|e| e.to_string())
            });
        }
        if new_vm {
            let vm = vm.to_string();
            undo.push(format!("record of VM {vm}"), move || {
                self.local
                    .space()
                    .and_then(|mut s| {
                        s.update(|l| {
                            l.vms.remove(&vm);
                        })
                    })
                    .map_err(|e| e.to_string())
            });
        }
        Ok(attached)
    }

    /// Make the node's shared cache now (bcache: the cache set, ~1-2 s of make-bcache and
    /// registration) so that the first attach does not pay for it; a no-op when it exists or
    /// the engine keeps a cache per image (dm-cache). Returns true when it made the set. The
    /// set is still released with the last image that used it.
    pub fn prepare_cache(&self) -> Result<bool> {
        if self.cfg.cache.engine != cache::Engine::Bcache {
            return Ok(false);
        }
        let dm = Dm::open()?;
        let _set = self.locks.cache_set()?;
        let mut undo = Undo::default();
        match cache::ensure_cache_set(&self.cache_ctx(), &dm, &mut undo) {
            Ok((_, created)) => {
                undo.commit();
                Ok(created)
            }
            Err(e) => Err(undo.rollback(e.context("prepare the node's cache"))),
        }
    }

    /// Make this node's open-iscsi interface record (`iscsi::IFACE`) now, so that the first
    /// join's logins do not pay for it (three `iscsiadm` runs on the critical path of a boot
    /// storm). Returns true when it made the record; the record stays (as open-iscsi's own do).
    pub fn prepare_initiator(&self) -> Result<bool> {
        iscsi::ensure_iface().map_err(|e| e.context("prepare the iSCSI initiator"))
    }

    /// Point an existing template at new parents (`sources`, parents first, the origin last):
    /// log in to the new paths, reload the multipath table in place (guest I/O is only
    /// suspended for the swap), then log out of paths no longer used. Returns the new table.
    pub fn reparent(&self, image: &str, sources: &[Value]) -> Result<String> {
        names::validate_id("image id", image)?;
        let sources = sources.iter().map(Source::from_json).collect::<Result<Vec<_>>>()?;
        if sources.is_empty() {
            return Err(Error::invalid(format!("reparent image {image:?}: at least one source is needed")));
        }
        let dm = Dm::open()?;
        let _lock = self.lock_image(image)?;
        template::reparent(&self.cfg.paths, &dm, image, &sources)
    }

    /// One upkeep round over every template's parent paths: reinstate each failed path whose
    /// iSCSI session is logged in again (nothing else does: dm-multipath has no checker of
    /// its own) and re-arm bounded queueing where an outage outlived it. Returns the paths
    /// reinstated. Cheap when nothing failed (sysfs and dm status reads); run it every few
    /// seconds (`Tree.maintain` does).
    pub fn heal_paths(&self) -> Result<Vec<paths::Healed>> {
        paths::heal(&self.cfg.paths, &self.locks, &Dm::open()?)
    }

    /// Read a recorded boot profile (`ranges`: byte offset, length; first-read order) through
    /// the image's template so that its cache holds those blocks (see prefetch.rs). Takes no
    /// lock: it only reads, and `stop()` lets a detach end it early.
    /// `depth` (reads in flight) and `reverse` (walk the profile from its end): `None` takes
    /// the defaults measured for the template's access (`prefetch::Access`).
    pub fn prefetch(
        &self,
        image: &str,
        ranges: &[(u64, u64)],
        depth: Option<usize>,
        chunk_bytes: u64,
        reverse: Option<bool>,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<prefetch::Report> {
        names::validate_id("image id", image)?;
        let dm = Dm::open()?;
        let origin = dm
            .info(&names::template_dm_name(image, Role::Origin))?
            .ok_or_else(|| Error::new(Kind::NotFound, format!("image {image:?} has no template on this node")))?;
        let size = dm::size_sectors(origin.device)? * 512;
        // A coalescing template's readers share the origin's page cache (its fileio backstore
        // reads it): read it there too, buffered. Otherwise O_DIRECT, so the cache allocates.
        let access = if template::local_disk(image).is_some() { prefetch::Access::Buffered } else { prefetch::Access::Direct };
        let reverse = reverse.unwrap_or(access.default_reverse());
        let plan = prefetch::plan(ranges, size, chunk_bytes, reverse).map_err(|e| e.context(format!("prefetch image {image:?}")))?;
        let report = prefetch::run(&origin.path(), &plan, depth.unwrap_or(access.default_depth()), access, stop)?;
        log::info!(
            "image {image}: prefetched {} of {} bytes in {:.1}s ({} reads{}{})",
            report.bytes,
            report.planned_bytes,
            report.seconds,
            report.reads,
            if reverse { ", from the end" } else { "" },
            if report.complete { "" } else { ", stopped early" }
        );
        Ok(report)
    }

    /// Remove a VM's snapshot; the template goes too when no VM and no child uses it.
    pub fn detach(&self, vm: &str) -> Result<()> {
        names::validate_id("VM id", vm)?;
        let dm = Dm::open()?;
        let (image, mode) =
            self.find_vm(&dm, vm)?.ok_or_else(|| Error::new(Kind::NotFound, format!("VM {vm:?} is not attached on this node")))?;
        let _lock = self.lock_image(&image)?;
        self.remove_vm(&dm, &image, vm, mode)?;
        log::info!("detached VM {vm} from image {image}");
        self.release_template(&dm, &image)?;
        Ok(())
    }

    /// The image whose template `vm`'s disk is a snapshot of; `None` if the VM is not here.
    pub fn image_of(&self, vm: &str) -> Result<Option<String>> {
        names::validate_id("VM id", vm)?;
        Ok(self.find_vm(&Dm::open()?, vm)?.map(|(image, _)| image))
    }

    /// Remove a VM's disk and then its record and COW slice; recorded `Detaching` first, so
    /// that a crash half-way is finished by `recover`, never rebuilt as the VM's disk. The
    /// caller holds the image lock.
    fn remove_vm(&self, dm: &Dm, image: &str, vm: &str, mode: SnapshotMode) -> Result<()> {
        use layout::VmState;
        let was = self.local.space()?.update(|l| l.vms.get_mut(vm).map(|r| std::mem::replace(&mut r.state, VmState::Detaching)))?;
        if let Err(e) = vm::remove(&self.overlays, dm, image, vm, mode) {
            if e.kind == Kind::Busy {
                // Still in use: the VM keeps its disk and its state.
                if let Some(was) = was {
                    self.local.space()?.update(|l| l.vms.get_mut(vm).map(|r| r.state = was))?;
                }
            }
            return Err(e);
        }
        let cow = names::vm_dm_name(image, vm, names::VmRole::Cow);
        self.local.space()?.update(|l| {
            l.vms.remove(vm);
            l.slices.remove(&cow);
        })
    }

    /// Tear down every template that no VM and no child uses (after children left).
    pub fn sweep(&self) -> Result<Vec<String>> {
        let dm = Dm::open()?;
        let mut removed = Vec::new();
        for image in self.images(&dm)? {
            if self.release_locked(&dm, &image)? {
                removed.push(image);
            }
        }
        Ok(removed)
    }

    /// Tear down `image`'s template if no VM and no child uses it; whether it went.
    pub fn release(&self, image: &str) -> Result<bool> {
        names::validate_id("image id", image)?;
        self.release_locked(&Dm::open()?, image)
    }

    fn release_locked(&self, dm: &Dm, image: &str) -> Result<bool> {
        let _lock = self.lock_image(image)?;
        self.release_template(dm, image)
    }

    /// Mark a join of `image` as in flight until the returned mark is dropped: a shared flock,
    /// so joins may overlap; `recover` leaves the image alone while any process holds one, and
    /// a process that dies drops its marks with it. Hold it from before the first step of a
    /// join (`prepare_export`, `prelogin`) until `attach` has returned.
    pub fn joining(&self, image: &str) -> Result<lock::Lock> {
        names::validate_id("image id", image)?;
        self.locks.join_mark(image)
    }

    /// Remove what a join of `image` that died half-way (its process crashed between the
    /// first login and the VM) left on this node: the template if no VM and no child uses it,
    /// a prepared export without a template, and the sessions to `sources` or to another
    /// node's export of `image` that no device holds (our LUN of each: a session that also
    /// carries another volume's LUN stays). `Busy` while a join of `image` is in flight in any
    /// process (see `joining`). Returns what it removed, e.g. `["LUN 1 of <iqn> at <portal>
    /// (sdc)", "session to <iqn> at <portal>"]`. Sessions are matched by target, so call it before this process's
    /// first attach when two images share an origin target.
    pub fn recover(&self, image: &str, sources: &[Value]) -> Result<Vec<String>> {
        names::validate_id("image id", image)?;
        let sources = sources.iter().map(Source::from_json).collect::<Result<Vec<_>>>()?;
        let Some(_quiet) = self.locks.no_join(image)? else {
            return Err(Error::new(Kind::Busy, format!("a join of image {image:?} is in flight on this node; nothing recovered")));
        };
        let dm = Dm::open()?;
        let _lock = self.lock_image(image)?;
        let mut removed = self.finish_unfinished_vms(&dm, image)?;
        if template::devices(&dm, image)?.is_empty() && !self.local.layout()?.templates.contains_key(image) {
            if self.drop_export_locked(&dm, image)? {
                removed.push(format!("prepared export of image {image}"));
            }
        } else if self.release_template(&dm, image)? {
            removed.push(format!("template of image {image}"));
        }
        let relays = iscsi::sessions().into_iter().filter(|s| names::is_relay_of(&s.iqn, image));
        let mut targets: Vec<Target> = relays.map(|s| Target { portal: s.portal, iqn: s.iqn, lun: 0 }).collect();
        targets.extend(sources.into_iter().flat_map(|s| s.targets));
        targets.sort_by(|a, b| (&a.iqn, &a.portal).cmp(&(&b.iqn, &b.portal)));
        targets.dedup_by(|a, b| a.iqn == b.iqn && a.portal == b.portal);
        // Every target is tried; what could not be let go of is reported together. Only our
        // LUN: a session that also carries another volume's LUN (a shared target) stays.
        let mut left = Vec::new();
        for t in targets {
            match iscsi::release_unless_used(&t) {
                Ok(Some(r)) => removed.extend(template::released(&t, &r)),
                Ok(None) => {}
                Err(e) => left.push(e.to_string()),
            }
        }
        if !removed.is_empty() {
            log::warn!("image {image}: removed what an unfinished join left: {}", removed.join(", "));
        }
        if !left.is_empty() {
            return Err(Error::new(Kind::Rollback, format!("recovering image {image:?} left: {}", left.join("; "))));
        }
        if removed.is_empty() {
            log::info!("image {image}: nothing left over to recover");
        }
        Ok(removed)
    }

    /// Remove the VMs of `image` whose attach or detach died half-way (recorded `Attaching`
    /// or `Detaching`: no guest ever had their disk, or its owner was deleting it), with their
    /// COW slices. The caller holds the image lock and the image's join mark.
    fn finish_unfinished_vms(&self, dm: &Dm, image: &str) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let unfinished: Vec<(String, layout::VmRecord)> =
            self.local.layout()?.vms.into_iter().filter(|(_, r)| r.image == image && r.state != layout::VmState::Attached).collect();
        for (vm, r) in unfinished {
            self.remove_vm(dm, image, &vm, r.mode).map_err(|e| e.context(format!("recover VM {vm:?} of image {image:?}")))?;
            removed
                .push(format!("VM {vm} (its {} did not finish)", if r.state == layout::VmState::Attaching { "attach" } else { "detach" }));
        }
        Ok(removed)
    }

    /// Rebuild, after a reboot or a restart, every VM disk the local device's layout records,
    /// at the same paths: each image's template from its recorded source (its cache reused:
    /// bcache finds its cache set and the image's blocks on the device), then each VM's
    /// snapshot over its own COW (or the template under its qcow2 overlay). What an attach or
    /// detach left half-done goes, as do slices nothing owns. Idempotent: a disk that exists is
    /// adopted. A VM whose image cannot be rebuilt is reported in `failed` with the reason;
    /// its COW is kept. Images with a join in flight in another process are left alone.
    pub fn reassemble(&self) -> Result<Reassembly> {
        let dm = Dm::open()?;
        let mut report = Reassembly::default();
        let l = self.local.layout()?;
        let mut images: Vec<String> = l.templates.keys().cloned().chain(l.vms.values().map(|r| r.image.clone())).collect();
        images.sort();
        images.dedup();
        for image in images {
            let Some(_quiet) = self.locks.no_join(&image)? else {
                log::info!("image {image}: a join is in flight; left to it");
                continue;
            };
            let _lock = self.lock_image(&image)?;
            if let Err(e) = self.reassemble_image(&dm, &image, &mut report) {
                log::warn!("image {image}: {e}");
                report.failed_images.insert(image, e.to_string());
            }
        }
        let orphans = {
            let mut space = self.local.space()?;
            let orphans = space.layout().orphan_slices();
            space.free(&orphans)?;
            orphans
        };
        report.removed.extend(orphans.into_iter().map(|n| format!("slice {n} (its owner is gone)")));
        report.removed.extend(iscsi::sweep_records(iscsi::RECORD_SWEEP_MIN_AGE));
        log::info!(
            "reassembled {} VM disk(s){}{}",
            report.disks.len(),
            if report.failed.is_empty() { String::new() } else { format!(", {} failed", report.failed.len()) },
            if report.removed.is_empty() { String::new() } else { format!("; removed {}", report.removed.join(", ")) }
        );
        Ok(report)
    }

    fn reassemble_image(&self, dm: &Dm, image: &str, report: &mut Reassembly) -> Result<()> {
        report.removed.extend(self.finish_unfinished_vms(dm, image)?);
        let l = self.local.layout()?;
        let vms: Vec<(String, SnapshotMode)> = l.vms.iter().filter(|(_, r)| r.image == image).map(|(vm, r)| (vm.clone(), r.mode)).collect();
        if vms.is_empty() {
            if self.release_template(dm, image)? {
                report.removed.push(format!("template of image {image} (no VM uses it)"));
            }
            return Ok(());
        }
        let fail_all = |report: &mut Reassembly, why: String| {
            for (vm, _) in &vms {
                log::error!("VM {vm} of image {image}: not reassembled: {why}");
                report.failed.insert(vm.clone(), format!("VM {vm:?} of image {image:?}: {why}; its copy-on-write data is kept"));
            }
        };
        let Some(rec) = l.templates.get(image) else {
            fail_all(report, "no source of the image is recorded".into());
            return Ok(());
        };
        let sources = match Source::from_json(&rec.source) {
            Ok(s) => vec![s],
            Err(e) => {
                fail_all(report, format!("its recorded source is unusable: {e}"));
                return Ok(());
            }
        };
        let mut undo = Undo::default();
        let t = match template::ensure(&self.template_ctx(), dm, image, &sources, &mut undo) {
            Ok(t) => {
                undo.commit();
                t
            }
            Err(e) => {
                fail_all(report, format!("its template cannot be rebuilt: {}", undo.rollback(e)));
                return Ok(());
            }
        };
        for (vm, mode) in vms {
            let mut undo = Undo::default();
            match vm::ensure(&self.disks(), dm, &t, &vm, mode, true, &mut undo) {
                Ok(path) => {
                    undo.commit();
                    log::info!("VM {vm} of image {image}: disk back at {path}");
                    report.disks.insert(vm, path);
                }
                Err(e) => {
                    let e = undo.rollback(e);
                    log::error!("VM {vm} of image {image}: not reassembled: {e}");
                    report.failed.insert(vm.clone(), format!("VM {vm:?} of image {image:?}: {e}; its copy-on-write data is kept"));
                }
            }
        }
        Ok(())
    }

    /// Where children log in to this node's exports.
    fn relay_portal(&self) -> Result<String> {
        let ip = self
            .cfg
            .export
            .export_ip
            .as_ref()
            .ok_or_else(|| Error::new(Kind::Lio, format!("host {} has no export_ip: it does not relay", self.cfg.export.host)))?;
        Ok(format!("{ip}:{}", self.cfg.export.export_port))
    }

    /// The connection info a child node (`initiator`) attaches with: this node's export of
    /// `image`, with CHAP credentials of its own. Works on a prepared target too.
    pub fn export_info(&self, image: &str, initiator: &str) -> Result<Value> {
        names::validate_id("image id", image)?;
        names::validate_iqn(initiator)?;
        let portal = self.relay_portal()?;
        let _lock = self.lock_image(image)?;
        let iqn = names::template_iqn(&self.cfg.export.host, image);
        let lio = Lio::new()?;
        let chap = lio.allow(&iqn, initiator).map_err(|e| {
            if e.kind == Kind::NotFound {
                Error::new(Kind::NotFound, format!("image {image:?} is not exported by {}", self.cfg.export.host))
            } else {
                e
            }
        })?;
        Ok(lio.source_for(&iqn, &portal, chap).to_json())
    }

    /// Revoke the grants of `image`'s export held by initiators not in `keep` (hosts that left
    /// the cloud) unless they still have a session. Returns the initiators revoked.
    pub fn revoke_grants(&self, image: &str, keep: &[String]) -> Result<Vec<String>> {
        names::validate_id("image id", image)?;
        for i in keep {
            names::validate_iqn(i)?;
        }
        let _lock = self.lock_image(image)?;
        Lio::new()?.revoke_except(&names::template_iqn(&self.cfg.export.host, image), keep)
    }

    /// Create this node's iSCSI target for `image` before its template exists, without a LUN:
    /// children can log in (and `export_info` grant them) while this node builds; the template's
    /// export adds LUN 0 for all of them. In a chain this takes every level's logins off the
    /// critical path. Returns whether the target is new; `drop_export` undoes it.
    pub fn prepare_export(&self, image: &str) -> Result<bool> {
        names::validate_id("image id", image)?;
        let portal = self.relay_portal()?;
        let _lock = self.lock_image(image)?;
        Lio::new()?.prepare(&names::template_iqn(&self.cfg.export.host, image), &portal)
    }

    /// Remove this node's export of `image` when the image has no template here (a prepared
    /// target whose build failed or was abandoned). Returns whether something went.
    pub fn drop_export(&self, image: &str) -> Result<bool> {
        names::validate_id("image id", image)?;
        let dm = Dm::open()?;
        let _lock = self.lock_image(image)?;
        self.drop_export_locked(&dm, image)
    }

    /// `drop_export` under the image lock the caller holds.
    fn drop_export_locked(&self, dm: &Dm, image: &str) -> Result<bool> {
        if !template::devices(dm, image)?.is_empty() {
            return Ok(false);
        }
        template::unexport_image(&self.cfg.export, &Lio::new()?, image)
            .map_err(|left| Error::new(Kind::Rollback, format!("removing the export of image {image:?} left: {left}")))
    }

    /// Log in to the targets of `source` (a connection dict) ahead of `attach`, which then
    /// reuses the sessions; no LUN scan (a prepared target has none yet). Returns how many
    /// sessions this call created.
    pub fn prelogin(&self, source: &Value) -> Result<usize> {
        let src = Source::from_json(source)?;
        let mut created = 0;
        for t in &src.targets {
            if iscsi::login(t, src.chap.as_ref(), self.cfg.paths.path_timeout_s)?.1 {
                created += 1;
            }
        }
        Ok(created)
    }

    /// Let go of `source`'s LUNs that nothing on this node uses (a `prelogin` that went
    /// unused): their disks go, and each session once it carries no other LUN. Returns how
    /// many sessions ended.
    pub fn logout_unused(&self, source: &Value) -> Result<usize> {
        let src = Source::from_json(source)?;
        let mut ended = 0;
        for t in &src.targets {
            if iscsi::release_unless_used(t)?.is_some_and(|r| r.session) {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Images with at least one device of ours on this node.
    fn images(&self, dm: &Dm) -> Result<Vec<String>> {
        let mut v: Vec<String> = dm
            .list(names::DM_PREFIX)?
            .into_iter()
            .filter_map(|d| match names::parse_dm_name(&d.name)? {
                Parsed::Template { image, .. } | Parsed::Vm { image, .. } => Some(image),
                Parsed::CacheSet => None,
            })
            .collect();
        if let Ok(rd) = std::fs::read_dir(self.overlays.root()) {
            v.extend(rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()));
        }
        let l = self.local.layout()?;
        v.extend(l.templates.into_keys());
        v.extend(l.vms.into_values().map(|r| r.image));
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// `(image, mode)` of a VM, from the dm names and the overlay files.
    fn find_vm(&self, dm: &Dm, vm: &str) -> Result<Option<(String, SnapshotMode)>> {
        if let Some(r) = self.local.layout()?.vms.remove(vm) {
            return Ok(Some((r.image, r.mode)));
        }
        for d in dm.list(names::DM_PREFIX)? {
            if let Some(Parsed::Vm { image, vm: v, .. }) = names::parse_dm_name(&d.name) {
                if v == vm {
                    return Ok(Some((image, SnapshotMode::Dm)));
                }
            }
        }
        for image in self.images(dm)? {
            if self.overlays.path(&image, vm).exists() {
                return Ok(Some((image, SnapshotMode::Vmm)));
            }
        }
        Ok(None)
    }

    /// VMs using an image, both modes.
    fn vms_of(&self, dm: &Dm, image: &str) -> Result<Vec<String>> {
        let mut v: Vec<String> = dm
            .list(names::DM_PREFIX)?
            .into_iter()
            .filter_map(|d| match names::parse_dm_name(&d.name)? {
                Parsed::Vm { image: i, vm, role: names::VmRole::Snap } if i == image => Some(vm),
                _ => None,
            })
            .collect();
        v.extend(self.overlays.list(image));
        v.extend(self.local.layout()?.vms.into_iter().filter(|(_, r)| r.image == image).map(|(vm, _)| vm));
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// Every template on this node, as `status()` reports it under "templates".
    pub fn templates(&self) -> Result<BTreeMap<String, TemplateStatus>> {
        let dm = Dm::open()?;
        let lio = Lio::new().ok();
        let mut templates = BTreeMap::new();
        for image in self.images(&dm)? {
            let devs = template::devices(&dm, &image)?;
            let mut devices: BTreeMap<String, String> =
                devs.iter().map(|(r, d)| (r.as_str().to_string(), d.path().display().to_string())).collect();
            if let Some(disk) = lio.as_ref().and_then(|l| l.find_local_disk(&image)) {
                devices.insert("disk".into(), disk.path.display().to_string());
            }
            let iqn = names::template_iqn(&self.cfg.export.host, &image);
            let exported = lio.as_ref().is_some_and(|l| l.exports().contains(&iqn));
            let size_bytes = devs.get(&Role::Origin).and_then(|d| dm::size_sectors(d.device).ok()).unwrap_or(0) * 512;
            let cache_status = cache::status(&dm, &image);
            let engine = cache::engine_of(&dm, &image)?.map(|e| e.as_str().to_string());
            templates.insert(
                image.clone(),
                TemplateStatus {
                    complete: devs.contains_key(&Role::Paths) && devs.contains_key(&Role::Origin),
                    engine,
                    paths: template::path_states(&dm, &image),
                    queueing: template::queueing(&dm, &image),
                    devices,
                    size_bytes,
                    vms: self.vms_of(&dm, &image)?,
                    children: if exported { lio.as_ref().map(|l| l.active_sessions(&iqn)).unwrap_or_default() } else { vec![] },
                    child_acls: if exported { lio.as_ref().map(|l| l.acls(&iqn)).unwrap_or_default() } else { vec![] },
                    export_iqn: exported.then_some(iqn),
                    cache_status,
                },
            );
        }
        Ok(templates)
    }

    pub fn status(&self) -> Result<Value> {
        let dm = Dm::open()?;
        let templates = self.templates()?;
        let label = self.local.label()?;
        let l = &label.layout;
        let mut vms = BTreeMap::new();
        for (vm, r) in &l.vms {
            let mut v = serde_json::json!({"image": r.image, "mode": r.mode, "state": r.state});
            if r.mode == SnapshotMode::Dm {
                let cow = names::vm_dm_name(&r.image, vm, names::VmRole::Cow);
                v["cow_size_bytes"] = l.slices.get(&cow).map(|s| s.sectors * 512).into();
                let snap = names::vm_dm_name(&r.image, vm, names::VmRole::Snap);
                if let Ok(st) = dm.status(&snap) {
                    let use_ = vm::cow_use(&st.join(" "));
                    if let Some((used, size)) = use_.sectors() {
                        if used * 100 >= size * u64::from(self.cfg.cow_warn_percent) {
                            log::warn!(
                                "VM {vm}: its copy-on-write space is {}% full ({} of {} MiB); when full its disk fails",
                                used * 100 / size.max(1),
                                used / 2048,
                                size / 2048
                            );
                        }
                    }
                    v["cow"] = serde_json::to_value(use_).expect("serialises");
                }
            }
            vms.insert(vm.clone(), v);
        }
        Ok(serde_json::json!({
            "host": self.cfg.export.host,
            "cache_device": self.cfg.cache_device,
            "local_device_bytes": self.local.total() * 512,
            "local_device_used_bytes": l.used_sectors() * 512,      // slices; the label's MiB is not counted
            "layout": {"generation": label.generation, "slices": l.slices},
            "vms": vms,
            "engine": self.cfg.cache.engine.as_str(),
            "templates": templates,
        }))
    }
}

/// Zero the head of a fresh slice: dm-cache and dm-snapshot format their metadata only when
/// they find zeroes there (a reused slice would otherwise look like a stale cache or COW).
fn zero_head(path: &Path, bytes: usize) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::new(Kind::DeviceMapper, format!("open {}: {e}", path.display())))?;
    f.write_all(&vec![0u8; bytes])
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::new(Kind::DeviceMapper, format!("zero {}: {e}", path.display())))
}
