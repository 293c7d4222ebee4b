"""What the Nova patch (nova_patch/) calls.

Nova hands over plain values (its ``[vmthunder]`` option group, Cinder connection dicts,
ids); every vmthunder-specific choice is made here, so that the Nova patch stays small:

    node = vmthunder.nova.get_node(CONF.vmthunder, CONF.host, CONF.my_block_storage_ip)
    info = vmthunder.nova.attach(node, cinder_connection_info, instance.uuid, volume_id, "dm")
    # -> {"driver_volume_type": "local", "serial": volume_id, "data": {"device_path": ...}}
    vmthunder.nova.detach(node, instance.uuid)

``attach`` and ``detach`` block in the kernel (iSCSI login, device-mapper): Nova runs them in a
native thread (``nova.utils.tpool_wrap``).
"""
import os
import re
import threading

import vmthunder

_nodes = {}
_lock = threading.Lock()


def get_node(conf, host, export_ip=None):
    """This process's Node for ``conf`` (Nova's ``[vmthunder]`` group, or any object with the
    attributes ``cache_device``, ``state_dir`` and, optional, ``coordination_url``, ``fanout``).

    One Node per process and configuration: it is built on first use and kept.
    ``coordination_url`` and ``fanout`` are passed on only when set, so that a Node without the
    registry works as long as nobody asks for one.
    """
    kwargs = {"host": host, "cache_device": conf.cache_device, "state_dir": conf.state_dir,
              "export_ip": export_ip}
    for name in ("coordination_url", "fanout"):
        value = getattr(conf, name, None)
        if value is not None:
            kwargs[name] = value
    key = tuple(sorted(kwargs.items()))
    with _lock:
        node = _nodes.get(key)
        if node is None:
            node = _nodes[key] = vmthunder.Node(**kwargs)
    return node


def _stable_path(path):
    """``/dev/dm-N`` is renumbered when the kernel's devices are rebuilt (after a reboot another
    VM's snapshot may get the same N); ``/dev/mapper/<name>`` follows vmthunder's deterministic
    names, so that is what a hypervisor should keep in its configuration."""
    m = re.fullmatch(r"/dev/(dm-\d+)", path)
    if m:
        try:
            with open(f"/sys/block/{m.group(1)}/dm/name") as f:
                mapper = "/dev/mapper/" + f.read().strip()
        except OSError:
            return path
        if os.path.exists(mapper):
            return mapper
    return path


def attach(node, connection_info, vm_id, image_id, snapshot="dm"):
    """Build ``image_id``'s template on this node (once: later VMs share it) from
    ``connection_info`` (Cinder's iSCSI connection for this host), and ``vm_id``'s
    copy-on-write snapshot of it. Idempotent for the same ``vm_id``.

    Returns the os-brick style connection dict of the snapshot, a local device or file:
    ``{"driver_volume_type": "local", "serial": image_id,
       "data": {"device_path": path, "vmthunder": {...}[, "format": "qcow2"]}}``
    ("vmm" snapshots are qcow2 overlay files; "dm" ones raw block devices).
    ``data["vmthunder"]`` marks the connection as vmthunder's.
    """
    path = node.attach(image_id, sources=[connection_info], vm_id=vm_id, snapshot=snapshot)
    data = {"device_path": _stable_path(path),
            "vmthunder": {"image_id": image_id, "vm_id": vm_id, "snapshot": snapshot}}
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
