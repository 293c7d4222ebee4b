#!/usr/bin/env python3
"""Where a fleet's CPU goes: run bench/fleet.py under a host-wide `perf record` and attribute
the samples of the user-mode Linux processes to guest kernel functions.

    python3 -m bench.profile_fleet --out DIR [fleet.py options...]     # record + report
    python3 -m bench.profile_fleet --report DIR/<mode>.data            # report an earlier record

While each mode's VMs run (fleet.py's monitor phase) `perf record -a -g` samples the host; before
that, every node's /proc/kallsyms is saved (DIR/<mode>-<node>.kallsyms) and the UML process ids
(DIR/<mode>-pids.txt). The Debian UML binary is stripped, but it is not position independent
and loaded at 0x60000000, so a sample's address in it is a guest kernel address: the guest's
kallsyms names it. Module code (bcache, iscsi_tcp, target_core_*) lives in the node's RAM file
like guest user code does: "M:" inclusive, and a self-time table per module and function (a
sample's own address, resolved with that node's kallsyms, which lists where it loaded them).

The report (DIR/<mode>-profile.txt and stdout): the share of samples per UML process (the
node's kernel thread; its guest processes, each a host process of its own), and the inclusive
share of chosen guest-kernel and host-kernel functions: `U:userspace` (running guest processes:
every guest syscall and page fault is a ptrace round trip), `U:vector_poll` /
`U:vector_net_start_xmit` (the NIC), `H:__x64_sys_ptrace` ... Measured on 2026-11-22
(bench/README.md): guest processes cost far more than their own work, which is
why the fleet's members and replays are written to make few syscalls.
"""

import argparse
import bisect
import collections
import os
import re
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
UML_BASE = 0x60000000  # where /usr/bin/linux.uml is linked (readelf -l)
FOCUS = re.compile(
    r"^U:(userspace|handle_syscall|handle_page_fault|put_fp_registers|get_fp_registers|"
    r"vector_poll|vector_net_start_xmit|io_thread|ubd_queue_rq|filemap_read|memcpy_orig|"
    r"tcp_sendmsg|tcp_recvmsg|timer_handler)$|^H:(__x64_sys_ptrace|__do_sys_wait4|"
    r"__x64_sys_pwrite64|__x64_sys_pread64|finish_task_switch.*)$|^[GM]:"
)


def load_kallsyms(path):
    """(sorted addresses, names) of a node's text symbols; a module's as 'name [module]'."""
    syms = []
    with open(path) as fh:
        for line in fh:
            p = line.split()
            if len(p) >= 3 and p[1].lower() in "tw":
                syms.append((int(p[0], 16), p[2] + (f" {p[3]}" if len(p) > 3 else "")))
    syms.sort()
    return [a for a, _ in syms], [n for _, n in syms]


def symbol(table, ip):
    addrs, names = table
    i = bisect.bisect_right(addrs, ip) - 1
    return names[i] if i >= 0 and ip - addrs[i] < 1 << 16 else None


def report(data, kallsyms, pids_file=None, top=40, top_modules=25):
    """Text report of one perf record (see the module doc). `kallsyms`: {node: path}; the
    guest kernel's own symbols are the same on every node, a module's are where that node
    loaded it (each node's kernel thread is resolved with its own)."""
    tables = {n: load_kallsyms(p) for n, p in kallsyms.items()}
    core = tables[sorted(tables)[0]]
    main = {}
    if pids_file and os.path.exists(pids_file):
        with open(pids_file) as fh:
            main = {int(p): n for n, p in (ln.split() for ln in fh if ln.strip())}
    proc = subprocess.Popen(
        ["perf", "script", "-i", data, "-F", "comm,pid,ip,sym,dso"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    incl, per_pid, shm_of = collections.Counter(), collections.Counter(), {}
    total = uml_total = 0
    frames, pid = [], None

    def flush():
        if pid is not None:
            for f in set(frames):
                incl[f] += 1

    for line in proc.stdout:
        if not line.strip():
            continue
        if not line[0].isspace():  # a sample's header: comm pid
            flush()
            frames = []
            p = line.split()
            total += 1
            pid = int(p[1]) if p[0] == "linux.uml" and len(p) > 1 and p[1].isdigit() else None
            if pid is not None:
                uml_total += 1
                per_pid[pid] += 1
            continue
        if pid is None:
            continue
        p = line.split(None, 1)
        try:
            ip = int(p[0], 16)
        except ValueError:
            continue
        rest = p[1].strip() if len(p) > 1 else ""
        m = re.search(r"shm/#(\d+)", rest)
        if m:  # code mapped from the node's RAM file: modules in its kernel thread, else user code
            shm_of.setdefault(pid, m.group(1))
            if pid in main:
                frames.append("M:guest kernel modules")
            else:
                frames.append("G:guest user code")
        elif "(/usr/bin/linux.uml)" in rest:
            ip += UML_BASE if ip < UML_BASE else 0
            frames.append("U:" + (symbol(core, ip) or hex(ip)))
        elif ip >= 0xFFFF800000000000:
            frames.append("H:" + rest.split("+")[0].split(" (")[0])
    flush()
    proc.wait()
    out = [
        f"samples: {total} host-wide, {uml_total} in UML processes ({100 * uml_total / max(1, total):.0f} %)",
        "",
        "per UML process (share of all samples; 'guest proc' = a guest process, node by its RAM file):",
    ]
    for p, v in per_pid.most_common(top):
        who = main.get(p, f"guest proc (RAM file #{shm_of.get(p, '?')})")
        out.append(f"  {100 * v / max(1, total):5.1f} %  pid {p}  {who}")
    out += [
        "",
        "inclusive share of UML-process samples (U: guest kernel, M: guest kernel modules,",
        "H: host kernel, G: guest user code):",
    ]
    for k, v in incl.most_common():
        if FOCUS.search(k):
            out.append(f"  {100 * v / max(1, uml_total):5.1f} %  {k}")
    # Module code: perf prints a callchain's addresses in the RAM file relative to the file, but
    # a sample's own ip as the guest's virtual address, which the node's kallsyms resolves.
    selfs = collections.Counter()
    proc = subprocess.Popen(
        ["perf", "script", "-i", data, "-G", "-F", "pid,ip,dso"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    for line in proc.stdout:
        p = line.split(None, 2)
        if len(p) < 3 or "shm/#" not in p[2] or not p[0].isdigit() or int(p[0]) not in main:
            continue
        sym = symbol(tables.get(main[int(p[0])], core), int(p[1], 16))
        module = sym.rsplit(" ", 1)[1] if sym and sym.endswith("]") else "[?]"
        selfs[module] += 1
        selfs[sym or "?"] += 1
    proc.wait()
    out += ["", "self share of UML-process samples in guest kernel modules (per module, then functions):"]
    out += [f"  {100 * v / max(1, uml_total):5.1f} %  {k}" for k, v in selfs.most_common() if k.startswith("[")]
    out += [f"  {100 * v / max(1, uml_total):5.1f} %  {k}" for k, v in selfs.most_common() if not k.startswith("[")][:top_modules]
    return "\n".join(out)


def record(out_dir, fleet_argv):
    from bench import fleet as fl

    orig = fl.FleetRun.monitor

    def monitor(self, mode, procs, start_at, copies=None):
        with open(os.path.join(out_dir, f"{mode}-pids.txt"), "w") as fh:
            for n in self.fleet.nodes:
                node = self.fleet[n]
                node.check("cat /proc/kallsyms > /vmt-share/kallsyms", timeout=60)
                ks = node.read_file("kallsyms")
                with open(os.path.join(out_dir, f"{mode}-{n}.kallsyms"), "wb") as k:
                    k.write(ks if isinstance(ks, bytes) else ks.encode())
                fh.write(f"{n} {node.pid}\n")
        data = os.path.join(out_dir, f"{mode}.data")
        perf = subprocess.Popen(
            ["perf", "record", "-a", "-g", "-F", "499", "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            return orig(self, mode, procs, start_at, copies)
        finally:
            perf.send_signal(signal.SIGINT)
            perf.wait(120)
            ks = {n: os.path.join(out_dir, f"{mode}-{n}.kallsyms") for n in self.fleet.nodes}
            text = report(data, ks, os.path.join(out_dir, f"{mode}-pids.txt"))
            with open(os.path.join(out_dir, f"{mode}-profile.txt"), "w") as fh:
                fh.write(text + "\n")
            print(f"== profile of {mode} ==\n{text}", flush=True)

    fl.FleetRun.monitor = monitor
    return fl.main(fleet_argv + ["--out", out_dir])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="directory for perf data, kallsyms, reports and fleet.json")
    ap.add_argument("--report", metavar="DATA", help="only report DIR/<mode>.data recorded earlier")
    a, rest = ap.parse_known_args()
    if subprocess.run(["sh", "-c", "command -v perf"], capture_output=True).returncode != 0:
        print("perf is not installed (Debian: linux-perf)", file=sys.stderr)
        return 2
    if a.report:
        base = a.report[: -len(".data")] if a.report.endswith(".data") else a.report
        prefix = os.path.basename(base) + "-"
        ks = {
            f[len(prefix) : -len(".kallsyms")]: os.path.join(os.path.dirname(base) or ".", f)
            for f in os.listdir(os.path.dirname(base) or ".")
            if f.startswith(prefix) and f.endswith(".kallsyms")
        }
        if not ks:
            print(f"no {base}-<node>.kallsyms next to {a.report}", file=sys.stderr)
            return 2
        print(report(a.report, ks, base + "-pids.txt"))
        return 0
    if not a.out:
        ap.error("--out DIR is required to record (or --report DATA)")
    os.makedirs(a.out, exist_ok=True)
    return record(a.out, rest)


if __name__ == "__main__":
    sys.exit(main())
