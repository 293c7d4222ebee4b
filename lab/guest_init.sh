#!/bin/sh
# vmthunder kernel-test harness: PID 1 of a User-Mode-Linux node.
#
# The root filesystem is the HOST's / (hostfs, read-only).  Stage 1 builds a private writable
# overlay (upper layer = guest tmpfs) and chroots into it; stage 2 sets the node up and then
# runs the command loop that the host drives through the console (see harness/_node.py).
#
# Kernel command line parameters read here (set by the harness):
#   vmt_node=NAME  vmt_host=HOSTNAME  vmt_ip=ADDR/PREFIX  vmt_if=IFACE  vmt_iqn=IQN
#   vmt_mac=MAC    fixed NIC address (a restarted node keeps it: no stale ARP entries elsewhere)
#   vmt_share=HOST_DIR   per-node host directory, mounted rw at /vmt-share
#
# Console protocol (one line per request, written by the host into the console FIFO):
#   run ID    start /vmt-share/cmd/ID.sh in the background, in its own session; it writes
#             ID.pid (session id), ID.out (stdout+stderr), and finally ID.rc (exit status,
#             created by rename, so its presence means "finished")
#   kill ID   SIGTERM, then SIGKILL 2 s later, the session of command ID
#   halt      leave the loop, sync, power off
# A console EOF (the host process went away) also powers the node off.

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
SHARE_MNT=/vmt-share

if [ "${1:-}" != stage2 ]; then
    # ---- stage 1: read-only hostfs root -> writable overlay root ----
    mount -t proc proc /proc
    mount -t tmpfs -o mode=755 tmpfs /run
    KV=$(uname -r)
    insmod "/usr/lib/uml/modules/$KV/kernel/fs/overlayfs/overlay.ko" \
        || echo "VMT: insmod overlay failed"
    mkdir -p /run/ov/u /run/ov/w /run/ov/r
    if ! mount -t overlay overlay -o lowerdir=/,upperdir=/run/ov/u,workdir=/run/ov/w /run/ov/r; then
        echo "@@VMT FAILED overlay@@"
        sync; poweroff -f
    fi
    mount --move /proc /run/ov/r/proc
    cd /run/ov/r || exit 1
    exec chroot . /bin/sh "$0" stage2
fi

# ---- stage 2: inside the overlay root (host files visible, writes private to this node) ----
fail() { echo "@@VMT FAILED $*@@"; sync; poweroff -f; }

KV=$(uname -r)
NODE=node; VHOST=node; NIP=; NIF=vec0; SHARE=; IQN=; MAC=
for kv in $(cat /proc/cmdline); do
    case $kv in
        vmt_node=*)  NODE=${kv#*=} ;;
        vmt_host=*)  VHOST=${kv#*=} ;;
        vmt_ip=*)    NIP=${kv#*=} ;;
        vmt_if=*)    NIF=${kv#*=} ;;
        vmt_share=*) SHARE=${kv#*=} ;;
        vmt_iqn=*)   IQN=${kv#*=} ;;
        vmt_mac=*)   MAC=${kv#*=} ;;
    esac
    # the kernel hands unknown "key=value" parameters to init as environment variables:
    # keep them out of the commands' environment
    case ${kv%%=*} in
        *[!A-Za-z0-9_]*|[0-9]*|'') ;;
        *) [ "$kv" != "${kv%%=*}" ] && unset "${kv%%=*}" ;;
    esac
done

mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /run/lock /var/lib/iscsi /etc/target /etc/iscsi "$SHARE_MNT"
mkdir -p /lib/modules && ln -sfn "/usr/lib/uml/modules/$KV" "/lib/modules/$KV"
modprobe configfs 2>/dev/null
mount -t configfs configfs /sys/kernel/config || echo "VMT: configfs mount failed"

[ -n "$SHARE" ] || fail "no vmt_share on the kernel command line"
mount -t hostfs hostfs "$SHARE_MNT" -o "$SHARE" || fail "cannot mount share $SHARE"

# Environment for every command (PATH with the host's python, PYTHONPATH, HOME, extras),
# written by the harness.
export HOME=/root
[ -r "$SHARE_MNT/env.sh" ] && . "$SHARE_MNT/env.sh"
export DM_DISABLE_UDEV=1     # no udev: libdevmapper creates the /dev/mapper nodes itself

hostname "$VHOST"
echo "$VHOST" > /etc/hostname
printf '127.0.0.1 localhost %s\n' "$VHOST" > /etc/hosts

ip link set lo up
[ -n "$MAC" ] && { ip link set "$NIF" address "$MAC" || echo "VMT: cannot set MAC $MAC"; }
if [ -n "$NIP" ]; then
    ip addr add "$NIP" dev "$NIF" && ip link set "$NIF" up || echo "VMT: network setup on $NIF failed"
fi

for m in dm-mod dm-cache dm-cache-smq dm-snapshot dm-multipath dm-round-robin dm-queue-length \
         target_core_mod target_core_iblock target_core_file tcm_loop iscsi_target_mod iscsi_tcp sd_mod bcache; do
    modprobe "$m" 2>/dev/null || echo "VMT: modprobe $m failed"
done

# open-iscsi initiator: unique IQN per node, own iscsid
[ -n "$IQN" ] || IQN="iqn.2026-11.org.vmthunder.test:$VHOST"
echo "InitiatorName=$IQN" > /etc/iscsi/initiatorname.iscsi
rm -rf /etc/iscsi/nodes /etc/iscsi/send_targets
iscsid || echo "VMT: iscsid failed"

dmesg -n 1                   # keep kernel chatter off the console
stty -echo -onlcr 2>/dev/null
cd /

CMD=$SHARE_MNT/cmd
mkdir -p "$CMD"
: > "$SHARE_MNT/ready"
echo "@@VMT READY $NODE@@"

# ---- command loop ----
while read -r verb arg; do
    case $verb in
        run)
            # The inner "setsid sh" is not a process-group leader, so setsid does not fork:
            # its $$ is the new session id, which "kill ID" signals as a whole.
            /bin/sh -c '
                setsid /bin/sh -c "echo \$\$ > $0/$1.pid; cd /; exec /bin/sh $0/$1.sh" \
                    </dev/null >"$0/$1.out" 2>&1
                echo $? > "$0/$1.rc.tmp"
                mv "$0/$1.rc.tmp" "$0/$1.rc"' "$CMD" "$arg" </dev/null >/dev/null 2>&1 &
            ;;
        kill)
            # in the background: the pid file may not exist yet if the command just started
            (
                i=0
                while [ ! -s "$CMD/$arg.pid" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
                p=$(cat "$CMD/$arg.pid" 2>/dev/null)
                if [ -n "$p" ] && [ ! -e "$CMD/$arg.rc" ]; then
                    # (dash's kill does not accept "--"; "-PID" means the process group)
                    kill -TERM "-$p"; sleep 2; kill -KILL "-$p"
                fi
            ) </dev/null >/dev/null 2>&1 &
            ;;
        halt)
            break
            ;;
    esac
    jobs >/dev/null 2>&1     # dash reaps finished children (and adopted orphans) here
done
echo "@@VMT HALT $NODE@@"
sync
poweroff -f
