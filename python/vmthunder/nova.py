"""What the Nova patch (nova_patch/) calls.

Nova hands over its configuration object and plain values (Cinder connection dicts, ids);
every vmthunder-specific choice is made here, so that the Nova patch stays small. The four
calls the patch makes, each with Nova's ``CONF`` (``[vmthunder]``, ``host``,
``my_block_storage_ip``):

    vmthunder.nova.start_up(CONF)           # ComputeManager.init_host, before instances resume
    info = vmthunder.nova.attach_volume(CONF, cinder_connection_info, instance.uuid, volume_id)
    # -> {"driver_volume_type": "local", "serial": volume_id, "data": {"device_path": ...}}
    vmthunder.nova.detach_volume(CONF, instance.uuid)       # the BDM's detach
    vmthunder.nova.instance_left(CONF, instance.uuid)       # delete, shelve offload, resize away

They block in the kernel (iSCSI login, device-mapper; the extension releases the GIL): under
eventlet Nova runs them in a native thread (``nova.utils.tpool_wrap``). The ``[vmthunder]``
options themselves are defined in ``vmthunder.conf``.
"""

import logging
import os
import threading

import vmthunder
from vmthunder.tree import Tree, load_profile

LOG = logging.getLogger("vmthunder.nova")

_nodes = {}
_lock = threading.Lock()


def host_name(host):
    """Nova's host name as vmthunder uses it in IQNs and registry ids (the rule is Rust's)."""
    return vmthunder.host_name(host)


def _initiator():
    """This host's open-iSCSI initiator name (what parents grant access to), or None."""
    try:
        return vmthunder.initiator_name()
    except vmthunder.Error as e:
        LOG.warning("no iSCSI initiator name (%s): other nodes cannot relay to this one", e)
    return None


def get_node(conf, host, export_ip=None):
    """What Nova attaches through: this process's relay ``Tree`` around its ``Node``, for
    ``conf`` (Nova's ``[vmthunder]`` group, or any object with ``cache_device``,
    ``state_dir`` and, optional, ``coordination_url``, ``fanout``, ``cow_size_mib`` and
    ``queue_timeout_s``).

    Built on first use and kept, one per configuration. With ``coordination_url`` the tree
    joins the registry (tooz) and keeps itself up on a thread; without it, or while the
    registry is unreachable, every node reads the origin volume directly.
    """
    url = getattr(conf, "coordination_url", None)
    fanout = getattr(conf, "fanout", None)
    cow_size_mib = getattr(conf, "cow_size_mib", None)
    queue_timeout_s = getattr(conf, "queue_timeout_s", None)
    host = host_name(host)
    key = (host, conf.cache_device, conf.state_dir, export_ip, url, fanout, cow_size_mib, queue_timeout_s)
    with _lock:
        tree = _nodes.get(key)
        if tree is None:
            sizes = {"cow_size_mib": cow_size_mib} if cow_size_mib else {}
            if queue_timeout_s is not None:
                sizes["queue_timeout_s"] = queue_timeout_s
            node = vmthunder.Node(
                host=host, cache_device=conf.cache_device, state_dir=conf.state_dir, export_ip=export_ip, **sizes
            )
            _reassemble(node)
            _prepare_cache(node, conf.cache_device)
            _prepare_initiator(node)
            registry = None
            if url:
                from vmthunder.registry import Registry

                registry = Registry(url, host)
            extra = {"fanout": fanout} if fanout else {}
            tree = Tree(node, registry, initiator=_initiator(), export_ip=export_ip, state_dir=conf.state_dir, **extra)
            _recover(tree)
            tree.start_watch()  # upkeep heals parent paths, with or without a registry
            _nodes[key] = tree
        if tree.registry is not None and not tree.registry.started:
            try:
                tree.registry.start()
            except vmthunder.Error as e:
                LOG.warning("%s; relaying from the origin volume until it answers", e)
            else:
                rejoined = tree.rejoin()  # templates a reboot rebuilt relay again
                if rejoined:
                    LOG.info("vmthunder: relaying again for images %s", ", ".join(rejoined))
    return tree


def _reassemble(node):
    """Every VM disk the local device records comes back at its path before Nova resumes the
    instances (a rebooted host, a restarted nova-compute). A VM that cannot be rebuilt is
    logged with the reason; its data stays on the device, and its instance's start fails in
    Nova with that reason (its next attach tries again)."""
    report = node.reassemble()
    for vm_id, why in sorted(report["failed"].items()):
        LOG.error("vmthunder: disk of instance %s not rebuilt: %s", vm_id, why)
    if report["disks"]:
        LOG.info("vmthunder: rebuilt the disks of %d instance(s): %s", len(report["disks"]), ", ".join(sorted(report["disks"])))
    if report["removed"]:
        LOG.warning("vmthunder: removed what interrupted attaches and detaches left: %s", report["removed"])
    return report


def _prepare_cache(node, device):
    """Make the node's cache set at start, not in the first boot's critical path; if that
    fails the first attach tries again and raises the error where Nova reports it."""
    try:
        if node.prepare_cache():
            LOG.info("vmthunder: made the node's cache set on %s", device)
    except vmthunder.Error as e:
        LOG.warning("vmthunder: could not prepare the cache on %s (the first attach will retry): %s", device, e)


def _prepare_initiator(node):
    """Make vmthunder's open-iscsi interface record at start, not in the first join's logins;
    if that fails the first login tries again and raises the error where Nova reports it."""
    try:
        if node.prepare_initiator():
            LOG.info("vmthunder: made the open-iscsi interface record for its logins")
    except vmthunder.Error as e:
        LOG.warning("vmthunder: could not make the open-iscsi interface record (the first login will retry): %s", e)


def _recover(tree):
    """Before this process attaches anything: what a nova-compute that died in the middle of a
    join left on the node (a template nothing uses, a prepared export, iSCSI sessions) goes."""
    recovered = tree.recover()
    if recovered:
        LOG.warning("vmthunder: removed what unfinished joins of an earlier nova-compute left: %s", recovered)


def _profile(tree, image_id):
    """The image's boot profile, if the operator recorded one: ``<state_dir>/profiles/<image_id>.json``
    (a trace as bench/traces/record_boot_trace.sh writes it). A broken file is logged and skipped:
    the VM boots without prefetch."""
    path = os.path.join(tree.state_dir, "profiles", f"{image_id}.json")
    if not os.path.exists(path):
        return None
    try:
        return load_profile(path)
    except (OSError, ValueError) as e:
        LOG.warning("boot profile of image %s not used: %s", image_id, e)
        return None


def attach(node, connection_info, vm_id, image_id, snapshot="dm"):
    """Build ``image_id``'s template on this node (once: later VMs share it) from its parents
    in the relay tree, the origin ``connection_info`` (Cinder's iSCSI connection for this host)
    always kept as a path, and ``vm_id``'s copy-on-write snapshot of it. Idempotent for the
    same ``vm_id``. ``node`` is what ``get_node`` returned.

    Returns the os-brick style connection dict of the snapshot, a local device or file:
    ``{"driver_volume_type": "local", "serial": image_id,
       "data": {"device_path": path, "vmthunder": {...}[, "format": "qcow2"]}}``
    ("vmm" snapshots are qcow2 overlay files; "dm" ones raw block devices).
    ``data["vmthunder"]`` marks the connection as vmthunder's.
    """
    path = node.attach(image_id, connection_info, vm_id, snapshot, profile=_profile(node, image_id))
    data = {
        "device_path": path,  # /dev/mapper/<deterministic name>, or the overlay file
        "vmthunder": {"image_id": image_id, "vm_id": vm_id, "snapshot": snapshot},
    }
    if snapshot == "vmm":
        data["format"] = "qcow2"
    return {"driver_volume_type": "local", "serial": image_id, "data": data}


def detach(node, vm_id):
    """Remove ``vm_id``'s snapshot; vmthunder removes the template when no VM and no child
    uses it. Returns False when there was nothing to remove (already gone: not an error)."""
    try:
        node.detach(vm_id)
    except vmthunder.NotFound:
        return False
    return True


# -- the calls the Nova patch makes (Nova's whole CONF) --------------------------------------------
def _tree(conf):
    return get_node(conf.vmthunder, conf.host, conf.my_block_storage_ip)


def start_up(conf):
    """nova-compute starts (``ComputeManager.init_host``, after the virt driver, before any
    instance resumes): every instance disk this host holds comes back at its path, what
    unfinished joins left goes, the cache set is made. Never raises: a failure is logged, the
    instances whose disks are missing fail to start with the reason, and the next attach
    tries again. Returns the tree, or None after a failure."""
    try:
        return _tree(conf)
    except Exception:
        LOG.exception("vmthunder could not rebuild the disks of this host")
        return None


def attach_volume(conf, connection_info, vm_id, volume_id):
    """``attach`` through this host's tree, in ``[vmthunder] snapshot_mode``."""
    return attach(_tree(conf), connection_info, vm_id, volume_id, conf.vmthunder.snapshot_mode)


def detach_volume(conf, vm_id):
    """``detach`` through this host's tree; a vmthunder.Error when the snapshot cannot go."""
    return detach(_tree(conf), vm_id)


def instance_left(conf, vm_id):
    """The instance left this host (deleted, shelve-offloaded, resized or migrated away): its
    snapshot goes, and its image's template when nothing else uses it. Never raises (Nova goes
    on with the instance): a failure is logged with what was left. Returns whether a snapshot
    went."""
    try:
        return detach_volume(conf, vm_id)
    except Exception as e:
        LOG.error("vmthunder left the snapshot of instance %s behind: %s", vm_id, e)
        return False


# A line of each file the Nova patch changes, there only once it is applied: what
# `vmthunder doctor` looks for in the Nova that this Python imports.
PATCH_MARKERS = {
    "nova/conf/__init__.py": "register_vmthunder_opts(CONF)",
    "nova/compute/manager.py": "driver_block_device.vmthunder().start_up(CONF)",
    "nova/virt/block_device.py": "class DriverVMThunderVolumeBlockDevice(DriverVolumeBlockDevice):",
    "nova/virt/libvirt/volume/volume.py": 'conf.driver_format = "qcow2"',
}
NOVA_VERSION = "34.0.0"
