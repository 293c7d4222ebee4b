"""vmthunder: boot many identical VMs fast.

Each compute node attaches an image volume over iSCSI, caches the blocks it reads on local
storage, re-exports its cached copy to other nodes (a relay tree) and gives each VM a local
copy-on-write snapshot. The data path is the kernel's (open-iscsi, LIO, device-mapper); this
package only sets it up, tracks it and tears it down. No daemon.

    node = vmthunder.Node(host="cn1", cache_device="/dev/sdb", state_dir="/var/lib/vmthunder",
                          export_ip="198.18.0.2")
    path = node.attach(image_id, sources=[cinder_connection_info], vm_id=vm_id, snapshot="dm")
    node.export_info(image_id, initiator="iqn....:child")   # what a child logs in with
    node.detach(vm_id)
"""

import logging as _logging

from vmthunder._vmthunder import (  # noqa: F401  (re-exported API)
    Busy,
    CacheDeviceError,
    DeviceMapperError,
    Error,
    HostRecord,
    ImageRecord,
    InvalidArgument,
    IscsiError,
    JoinMark,
    JoinState,
    LioError,
    Node,
    NotFound,
    Placement,
    Policy,
    RollbackError,
    SnapshotError,
    StateDirError,
    Template,
    __version__,
    allow_initiator,
    check_grant,
    choose_parents,
    export_volume,
    grant_key,
    host_name,
    initiator_name,
    node_checks,
    own_record,
    parents_progress,
    parse_host_record,
    parse_image_record,
    seal_grant,
    simulate,
    template_iqn,
    unexport_volume,
    validate_host,
    validate_id,
    write_textfile,
)

# Rust `log` records arrive here through pyo3-log; operators configure the "vmthunder" logger.
_logging.getLogger("vmthunder").addHandler(_logging.NullHandler())

__all__ = [
    "JoinState",
    "ImageRecord",
    "HostRecord",
    "Placement",
    "Policy",
    "Template",
    "validate_host",
    "Node",
    "JoinMark",
    "Error",
    "InvalidArgument",
    "NotFound",
    "Busy",
    "CacheDeviceError",
    "IscsiError",
    "LioError",
    "DeviceMapperError",
    "SnapshotError",
    "RollbackError",
    "StateDirError",
    "__version__",
    "export_volume",
    "allow_initiator",
    "unexport_volume",
    "choose_parents",
    "parents_progress",
    "own_record",
    "simulate",
    "template_iqn",
    "validate_id",
    "host_name",
    "initiator_name",
    "parse_host_record",
    "parse_image_record",
    "check_grant",
    "grant_key",
    "seal_grant",
    "node_checks",
    "write_textfile",
]
