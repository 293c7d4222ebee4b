#!/usr/bin/env bash
# Record a real VM boot block-read trace for vmthunder's fleet benchmark.
#
# What it does (each stage is skipped when its output already exists, so a
# re-run after a failure resumes; FORCE=1 redoes everything):
#   1. host tools: debootstrap, grub (BIOS), sfdisk -- from Debian's packages.
#   2. qemu-system-x86 from Debian 12 main, unpacked into $WORK/qemu with
#      `apt-get download` + `dpkg-deb -x` (NOT installed: installing it would
#      replace the host's newer qemu-utils, which the project needs).
#   3. a minimal Debian 12 root: `debootstrap --variant=minbase bookworm` plus
#      systemd (init), udev, dbus, openssh-server, cron and linux-image-amd64.
#   4. a 2 GiB raw disk: MBR partition table, one ext4 partition holding the
#      root, GRUB (i386-pc) in the MBR gap. The VM boots from this disk alone,
#      like a cloud image: BIOS -> GRUB -> kernel+initrd -> systemd, so the
#      trace includes the bootloader's reads of the kernel and initrd.
#   5. boots it under qemu TCG (virtio-blk disk, -snapshot so the image stays
#      pristine), with qemu's `virtio_blk_handle_read`/`_write` trace events:
#      one event per guest request as the guest issued it (before any
#      request merging in qemu), with sector and sector count. A systemd unit
#      ordered after multi-user.target prints a marker on the serial console
#      and powers the VM off. The trace is cut at the marker.
#   6. writes the JSON trace (see README.md) to $OUT.
#
# Usage: sudo bench/traces/record_boot_trace.sh
# Env:   WORK=/tmp/boottrace  OUT=<script dir>/debian12-boot.json
#        MIRROR=<from apt sources>  IMG_SIZE_MIB=2048  SMP=2  MEM_MIB=1024
#        BOOT_TIMEOUT=1800  FORCE=0  NICE=15
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-/tmp/boottrace}
OUT=${OUT:-$HERE/debian12-boot.json}
IMG_SIZE_MIB=${IMG_SIZE_MIB:-2048}
SMP=${SMP:-2}
MEM_MIB=${MEM_MIB:-1024}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-1800}
FORCE=${FORCE:-0}
NICE=${NICE:-15}
SUITE=bookworm
ROOTFS=$WORK/rootfs
IMG=$WORK/disk.raw
QEMU_DIR=$WORK/qemu
MNT=$WORK/mnt
export DEBIAN_FRONTEND=noninteractive

log() { echo "[record_boot_trace] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, loop devices, mount)"
mkdir -p "$WORK"

# The Debian mirror apt is configured with (deb822 or one-line sources).
find_mirror() {
    local m
    m=$(grep -hE '^\s*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
    if [ -z "$m" ]; then
        m=$(grep -hE '^\s*deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '{for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' \
            | grep -E '/debian/?$' | head -n1 || true)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}
MIRROR=${MIRROR:-$(find_mirror)}

# ---------------------------------------------------------------- 1. host tools
host_tools() {
    local need=()
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v grub-install >/dev/null || need+=(grub2-common)
    [ -d /usr/lib/grub/i386-pc ] || need+=(grub-pc-bin)
    command -v sfdisk >/dev/null || need+=(fdisk)
    command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
    command -v losetup >/dev/null || need+=(mount)
    [ ${#need[@]} = 0 ] && return 0
    log "installing host tools: ${need[*]}"
    apt-get update -qq || true
    # Refuse anything that would remove a package (e.g. qemu-utils).
    if apt-get install -s --no-install-recommends "${need[@]}" | grep -q '^Remv'; then
        apt-get install -s --no-install-recommends "${need[@]}" | grep '^Remv' >&2
        die "installing ${need[*]} would remove packages; install them by hand"
    fi
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

# ------------------------------------------------------- 2. private qemu (TCG)
QEMU=$QEMU_DIR/usr/bin/qemu-system-x86_64
qemu_env() {
    export LD_LIBRARY_PATH=$QEMU_DIR/usr/lib/x86_64-linux-gnu:$QEMU_DIR/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}
private_qemu() {
    if [ -x "$QEMU" ]; then return 0; fi
    log "unpacking Debian 12 qemu-system-x86 into $QEMU_DIR (not installing it)"
    local debs=$WORK/debs pkgs
    rm -rf "$debs" "$QEMU_DIR"; mkdir -p "$debs" "$QEMU_DIR"
    # Exactly what apt would install (packages already on the host are left out,
    # they are found on the normal library path).
    pkgs=$(apt-get install -s --no-install-recommends qemu-system-x86 | awk '/^Inst /{print $2}')
    [ -n "$pkgs" ] || { apt-get update -qq; pkgs=$(apt-get install -s --no-install-recommends qemu-system-x86 | awk '/^Inst /{print $2}'); }
    [ -n "$pkgs" ] || die "apt-get finds no qemu-system-x86"
    (cd "$debs" && apt-get download $pkgs >/dev/null 2>&1) || die "apt-get download failed"
    for d in "$debs"/*.deb; do dpkg-deb -x "$d" "$QEMU_DIR"; done
    rm -rf "$debs"
    qemu_env
    if ldd "$QEMU" | grep -q 'not found'; then
        ldd "$QEMU" | grep 'not found' >&2; die "private qemu misses libraries"
    fi
}

# --------------------------------------------------------------- 3. root fs
cleanup_chroot() {
    for m in dev/pts dev proc sys; do
        mountpoint -q "$ROOTFS/$m" 2>/dev/null && umount -l "$ROOTFS/$m" || true
    done
}
build_rootfs() {
    if [ -f "$ROOTFS/.boottrace-done" ]; then return 0; fi
    if [ ! -f "$ROOTFS/.debootstrap-ok" ]; then
        cleanup_chroot; rm -rf "$ROOTFS"
        log "debootstrap --variant=minbase $SUITE from $MIRROR (a few minutes)"
        nice -n "$NICE" debootstrap --variant=minbase \
            --include=systemd-sysv,udev,dbus,kmod,ifupdown,iproute2,openssh-server,cron,less,procps,zstd \
            "$SUITE" "$ROOTFS" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
        touch "$ROOTFS/.debootstrap-ok"
    fi

    # System configuration of a headless server VM.
    echo debian12-boottrace > "$ROOTFS/etc/hostname"
    cat > "$ROOTFS/etc/fstab" <<'EOF'
/dev/vda1  /  ext4  errors=remount-ro  0  1
EOF
    cat > "$ROOTFS/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback
EOF
    chroot "$ROOTFS" passwd -d root >/dev/null
    # The boot-done marker: runs once multi-user.target is reached, prints a
    # line on the serial console and powers the VM off.
    cat > "$ROOTFS/etc/systemd/system/boottrace-done.service" <<'EOF'
[Unit]
Description=boot trace: mark the end of boot and power off
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "BOOTTRACE_DONE uptime=$$(cut -d" " -f1 /proc/uptime)" > /dev/ttyS0'
ExecStart=/bin/systemctl --no-block poweroff

[Install]
WantedBy=multi-user.target
EOF
    ln -sf /etc/systemd/system/boottrace-done.service \
        "$ROOTFS/etc/systemd/system/multi-user.target.wants/boottrace-done.service"
    trap cleanup_chroot EXIT
    mount -t proc proc "$ROOTFS/proc"
    mount -t sysfs sys "$ROOTFS/sys"
    mount --bind /dev "$ROOTFS/dev"
    mount --bind /dev/pts "$ROOTFS/dev/pts"
    log "installing linux-image-amd64 in the chroot"
    cat > "$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
EOF
    # No initramfs "MODULES=most" trimming: keep Debian's default, as a stock
    # install would have it.
    nice -n "$NICE" chroot "$ROOTFS" apt-get install -y -qq --no-install-recommends \
        linux-image-amd64 > "$WORK/kernel-install.log" 2>&1 \
        || { tail -20 "$WORK/kernel-install.log" >&2; die "kernel install failed"; }
    chroot "$ROOTFS" apt-get clean
    cleanup_chroot
    trap - EXIT

    touch "$ROOTFS/.boottrace-done"
}

# ---------------------------------------------------------------- 4. disk image
# The partition is mounted through a loop device with an offset (no partition
# scanning needed: some host kernels have no msdos partition support), and
# GRUB is put in place the way grub-bios-setup does it: boot.img's code in the
# MBR, core.img (diskboot + kernel + biosdisk/part_msdos/ext2) from sector 1,
# the rest of GRUB's modules and grub.cfg in /boot/grub on the root fs.
LOOP=
PART_START=2048   # sectors
cleanup_image() {
    mountpoint -q "$MNT" 2>/dev/null && umount "$MNT" || true
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null || true
    LOOP=
}
build_image() {
    if [ -f "$IMG" ] && [ -f "$IMG.done" ]; then return 0; fi
    rm -f "$IMG" "$IMG.done"
    log "building ${IMG_SIZE_MIB} MiB disk image $IMG"
    local grubdir=/usr/lib/grub/i386-pc kver part_bytes core_sectors
    truncate -s "${IMG_SIZE_MIB}M" "$IMG"
    printf 'label: dos\nstart=%d, type=83, bootable\n' "$PART_START" | sfdisk -q "$IMG"
    part_bytes=$(( IMG_SIZE_MIB * 1024 * 1024 - PART_START * 512 ))
    trap cleanup_image EXIT
    LOOP=$(losetup -f --show -o $(( PART_START * 512 )) --sizelimit "$part_bytes" "$IMG")
    mkfs.ext4 -q -L root "$LOOP"
    mkdir -p "$MNT"
    mount "$LOOP" "$MNT"
    nice -n "$NICE" cp -a "$ROOTFS/." "$MNT/"
    rm -f "$MNT/.boottrace-done" "$MNT/.debootstrap-ok"
    kver=$(ls "$MNT/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -n1)
    [ -n "$kver" ] || die "no kernel in the root fs"
    mkdir -p "$MNT/boot/grub"
    cp -a "$grubdir" "$MNT/boot/grub/"
    cat > "$MNT/boot/grub/grub.cfg" <<EOF
set timeout=0
set default=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry 'Debian GNU/Linux 12, $kver' {
    insmod part_msdos
    insmod ext2
    set root=(hd0,msdos1)
    echo 'Loading Linux $kver ...'
    linux /boot/vmlinuz-$kver root=/dev/vda1 ro console=ttyS0,115200n8
    echo 'Loading initial ramdisk ...'
    initrd /boot/initrd.img-$kver
}
EOF
    sync
    cleanup_image
    trap - EXIT
    grub-mkimage -O i386-pc -d "$grubdir" -p '(hd0,msdos1)/boot/grub' \
        -o "$WORK/core.img" biosdisk part_msdos ext2
    core_sectors=$(( ($(stat -c %s "$WORK/core.img") + 511) / 512 ))
    [ "$core_sectors" -lt "$PART_START" ] || die "core.img does not fit before the partition"
    dd if="$grubdir/boot.img" of="$IMG" bs=440 count=1 conv=notrunc status=none
    dd if="$WORK/core.img" of="$IMG" bs=512 seek=1 conv=notrunc status=none
    rm -f "$WORK/core.img"
    touch "$IMG.done"
}

# ------------------------------------------------------------ 5+6. boot, trace
boot_and_trace() {
    qemu_env
    log "booting under qemu TCG (can take several minutes)"
    nice -n "$NICE" python3 - "$QEMU" "$QEMU_DIR" "$IMG" "$WORK" "$OUT" \
        "$SMP" "$MEM_MIB" "$BOOT_TIMEOUT" <<'PYEOF'
import json, os, re, subprocess, sys, threading, time

qemu, qemu_dir, img, work, out, smp, mem, timeout = sys.argv[1:9]
smp, mem, timeout = int(smp), int(mem), float(timeout)
trace_file = os.path.join(work, "qemu-trace.log")
events_file = os.path.join(work, "trace-events.txt")
serial_file = os.path.join(work, "serial.log")
with open(events_file, "w") as f:
    f.write("virtio_blk_handle_read\nvirtio_blk_handle_write\n")
if os.path.exists(trace_file):
    os.unlink(trace_file)

cmd = [qemu,
       "-L", f"{qemu_dir}/usr/share/qemu", "-L", f"{qemu_dir}/usr/share/seabios",
       "-L", f"{qemu_dir}/usr/lib/ipxe/qemu",
       "-machine", "pc", "-accel", "tcg", "-cpu", "max",
       "-smp", str(smp), "-m", str(mem),
       "-display", "none", "-vga", "none", "-nic", "none", "-no-reboot",
       "-device", "virtio-rng-pci",
       # -snapshot: guest writes go to a temporary overlay, the image stays
       # pristine so every recording is a first boot of the same image.
       "-drive", f"file={img},format=raw,if=virtio,cache=writeback",
       "-snapshot",
       "-serial", "stdio", "-monitor", "none",
       "-msg", "timestamp=on",
       "-trace", f"events={events_file},file={trace_file}"]
version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]

t0 = time.time()
proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT)
serial = []          # (t_rel, line)
done_t = None
killer = threading.Timer(timeout, proc.kill)
killer.start()
buf = b""
with open(serial_file, "w") as slog:
    while True:
        chunk = proc.stdout.read1(4096)
        if not chunk:
            break
        now = time.time() - t0
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            text = line.decode("utf-8", "replace").rstrip("\r")
            text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
            serial.append((now, text))
            slog.write(f"{now:9.3f} {text}\n")
            slog.flush()
            if done_t is None and "BOOTTRACE_DONE" in text:
                done_t = now
                # the guest powers itself off; make sure it does, soon
                killer.cancel()
                killer = threading.Timer(120, proc.kill)
                killer.start()
proc.wait()
killer.cancel()
if done_t is None:
    sys.exit(f"boot did not finish (no BOOTTRACE_DONE marker); see {serial_file}")

ev = re.compile(r"^\d+@(\d+)\.(\d+):virtio_blk_handle_(read|write) .* sector (\d+) nsectors (\d+)")
reads, writes, late_reads = [], [], 0
with open(trace_file) as f:
    for line in f:
        m = ev.match(line)
        if not m:
            continue
        t = int(m.group(1)) + int(m.group(2)) / 1e6 - t0
        off, ln = int(m.group(4)) * 512, int(m.group(5)) * 512
        if t > done_t:
            late_reads += m.group(3) == "read"
            continue
        (reads if m.group(3) == "read" else writes).append((t, off, ln))
reads.sort(key=lambda r: r[0]); writes.sort(key=lambda r: r[0])

def union_bytes(extents):
    total, cur_s, cur_e = 0, None, None
    for s, e in sorted((o, o + l) for _, o, l in extents):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total

def first(pattern):
    for t, text in serial:
        if re.search(pattern, text):
            return round(t, 3)
    return None

uptime = None
for t, text in serial:
    m = re.search(r"BOOTTRACE_DONE uptime=([0-9.]+)", text)
    if m:
        uptime = float(m.group(1))
img_bytes = os.path.getsize(img)
lengths = sorted(l for _, _, l in reads)
kver = next((re.search(r"Linux version (\S+)", x).group(1) for _, x in serial
             if "Linux version" in x), None)
doc = {
    "name": "debian12-boot",
    "description": (
        "Guest block reads of one real first boot of a minimal Debian 12 (bookworm) "
        "server VM from a raw virtio-blk disk: SeaBIOS -> GRUB (MBR) -> Linux "
        f"{kver} + initramfs -> systemd up to multi-user.target (udev, journald, "
        "dbus, sshd, cron, getty). Root: debootstrap --variant=minbase plus "
        "systemd-sysv, udev, dbus, kmod, ifupdown, iproute2, openssh-server, cron, "
        "less, procps, linux-image-amd64, on one ext4 partition at 1 MiB. "
        f"qemu TCG, {smp} vCPU, {mem} MiB RAM, no NIC, virtio-rng. The trace ends when a "
        "unit ordered after multi-user.target prints a marker on the serial console. "
        "reads: [t_seconds since qemu start, offset_bytes, length_bytes], one entry "
        "per guest request, sorted by time, not merged."),
    "recorded_with": (f"bench/traces/record_boot_trace.sh; {version}, TCG; trace events "
                      "virtio_blk_handle_read/_write (one per guest request, before "
                      "qemu's request merging), 512-byte sectors"),
    "image_bytes": img_bytes,
    "boot_seconds": round(done_t, 3),
    "guest_uptime_at_done_seconds": uptime,
    "read_count": len(reads),
    "total_read_bytes": sum(l for _, _, l in reads),
    "unique_bytes": union_bytes(reads),
    "read_length_bytes": {"min": lengths[0], "median": lengths[len(lengths) // 2],
                          "max": lengths[-1]} if lengths else None,
    "write_count": len(writes),
    "total_write_bytes": sum(l for _, _, l in writes),
    "reads_after_done_excluded": late_reads,
    "phases_seconds": {
        "first_read": round(reads[0][0], 3) if reads else None,
        "grub_loading_linux": first(r"Loading Linux"),
        "kernel_started": first(r"Linux version"),
        "initramfs_init": first(r"Loading, please wait|Begin: Loading essential"),
        "systemd_started": first(r"systemd\[1\]|Welcome to .*Debian"),
        "boot_done": round(done_t, 3),
    },
    "reads": [[round(t, 3), o, l] for t, o, l in reads],
}
# Reads per boot stage, split at the serial console marks: firmware+GRUB
# (which reads kernel and initrd through BIOS int13), kernel+initramfs (up to
# the switch to the root's systemd), and systemd until the marker.
ph = doc["phases_seconds"]
bounds = [("firmware_grub", 0.0, ph["kernel_started"]),
          ("kernel_initramfs", ph["kernel_started"], ph["systemd_started"]),
          ("systemd", ph["systemd_started"], done_t + 1)]
stages = {}
for name, a, b in bounds:
    if a is None or b is None:
        continue
    sel = [r for r in reads if a <= r[0] < b]
    stages[name] = {"read_count": len(sel), "total_read_bytes": sum(l for _, _, l in sel),
                    "unique_bytes": union_bytes(sel)}
doc["reads_by_stage"] = stages
doc["reads"] = doc.pop("reads")   # keep the big list last
with open(out, "w") as f:
    # one read per line: small diffs, easy to eyeball
    head = {k: v for k, v in doc.items() if k != "reads"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "reads": [\n'
    text += ",\n".join(json.dumps(r) for r in doc["reads"]) + "\n ]\n}\n"
    f.write(text)
json.load(open(out))  # sanity
print(json.dumps({k: v for k, v in head.items() if k not in ("description",)}, indent=1))
PYEOF
}

if [ "$FORCE" = 1 ]; then
    cleanup_chroot   # never rm -rf a root with /dev still bound into it
    rm -rf "$ROOTFS" "$QEMU_DIR"
    rm -f "$IMG" "$IMG.done"
fi
host_tools
private_qemu
# The root fs is only needed to build the image.
[ -f "$IMG.done" ] && [ -f "$IMG" ] || build_rootfs
build_image
boot_and_trace
log "wrote $OUT"
