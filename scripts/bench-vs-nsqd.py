#!/usr/bin/env python3
"""knsq side by side with the reference nsqd: every workload against each server in turn,
several rounds, one table of medians and ratios. Run through scripts/bench-vs-nsqd.sh, which
builds the binaries and sets up the plotting environment; see docs/performance.md.

Each measurement starts a fresh server (fresh data directory) so no run inherits another's
queue. Rounds alternate the order (nsqd first, then knsq first) so a change in the machine's
load shifts both alike. Only the standard library is used to measure; `--plot` (with
matplotlib) draws the scaling curves from the JSON the measuring run wrote.
"""

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

MSG = 200  # body size, as in NSQ's published figures


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """nsqd, knsq-broker or the bench tool's floor server, on free loopback ports."""

    def __init__(self, kind, ctx, flags=()):
        self.kind = kind
        self.data = tempfile.mkdtemp(prefix=f"{kind}-", dir=ctx.tmp)
        self.tcp = f"127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}"
        if kind == "floor":
            cmd = [ctx.bench, "floor", "--address", self.tcp]
        else:
            binary = ctx.nsqd if kind == "nsqd" else ctx.knsq
            cmd = [
                binary,
                f"--tcp-address={self.tcp}",
                f"--http-address={self.http}",
                f"--https-address=127.0.0.1:{free_port()}",
                f"--data-path={self.data}",
                "--log-level=warn",
                *flags,
                *ctx.extra_flags,
            ]
        self.log = open(os.path.join(self.data, "server.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(_split(self.tcp), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"{kind} did not start: {cmd}")
                time.sleep(0.02)

    def rss_kb(self, field="VmRSS"):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def cpu_split(self):
        """User and system (kernel) time of every thread, those that ended included."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def post(self, path):
        req = urllib.request.Request(f"http://{self.http}{path}", data=b"", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.data, ignore_errors=True)


@contextlib.contextmanager
def serving(ctx, kind, flags=()):
    """A fresh server for one measurement, stopped (and its data removed) afterwards."""
    s = Server(kind, ctx, flags)
    try:
        yield s
    finally:
        s.stop()


def _split(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def bench(ctx, server, mode, *args, wire=()):
    """Runs knsq-bench; its JSON reports by side."""
    cmd = [ctx.bench, mode, "--address", server.tcp, "--size", str(MSG), "--json", *args]
    if "--tls" in wire:
        wire = ("--tls", "--tls-root-ca-file", ctx.certs["ca"])
    out = subprocess.run(
        [*cmd, *wire], capture_output=True, text=True, timeout=ctx.timeout
    )
    reports = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            reports[r["side"]] = r
    if out.returncode != 0 or not reports:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()} {out.stdout.strip()}")
    return reports


def bench_writer(ctx, server, batch):
    """nsq's own bench_writer (GOMAXPROCS connections); msgs/s."""
    out = subprocess.run(
        [
            os.path.join(ctx.nsq_bin, "bench_writer"),
            f"--nsqd-tcp-address={server.tcp}",
            f"--runfor={ctx.runfor}",
            f"--size={MSG}",
            f"--batch-size={batch}",
            "--topic=bench",
        ],
        capture_output=True,
        text=True,
        timeout=ctx.timeout,
    )
    for part in out.stderr.split(" - "):
        if part.endswith("ops/s"):
            return float(part[: -len("ops/s")])
    raise RuntimeError(f"bench_writer: {out.stderr}")


def channel(server, topic="bench", name="ch"):
    # nsqd creates a channel only in an existing topic.
    server.post(f"/topic/create?topic={topic}")
    server.post(f"/channel/create?topic={topic}&channel={name}")


def preload(ctx, server, count, topic="bench", wire=()):
    bench(ctx, server, "writer", "--topic", topic, "--batch-size", "200",
          "--count", str(count), "--runfor", "0", wire=wire)


# ---- workloads: each runs against one fresh server and returns one number ----

MEMORY = ("--mem-queue-size=10000000",)
DISK = ("--mem-queue-size=0",)


def children_cpu():
    """CPU seconds of the finished child processes (the load tool's runs)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@contextlib.contextmanager
def costs(ctx, kind, server):
    """Where a run's CPU went, per message: the load tool's, and the server's in user space
    and in the kernel (the syscalls that carry the messages, loopback delivery included).
    The caller sets `msgs` on the yielded dict; the split lands in ctx.costs[kind]."""
    client, (user, kernel) = children_cpu(), server.cpu_split()
    run = {}
    yield run
    (user2, kernel2), client2 = server.cpu_split(), children_cpu()
    per = 1e6 / max(run["msgs"], 1)
    ctx.costs.setdefault(kind, []).append(
        {"client": (client2 - client) * per, "user": (user2 - user) * per,
         "kernel": (kernel2 - kernel) * per})


def w_writer(flags, *args, wire=(), channels=0):
    """Publishes for RUNFOR; msgs/s, and where the CPU went (ctx.costs)."""
    def run(ctx, kind):
        with serving(ctx, kind, flags) as s:
            for i in range(channels):
                channel(s, name=f"ch{i}")
            with costs(ctx, kind, s) as c:
                r = bench(ctx, s, "writer", "--runfor", ctx.runfor, *args, wire=wire)["writer"]
                c["msgs"] = r["msgs"]
            return r["msgs_per_sec"]
    return run


def w_bench_writer(flags, batch):
    def run(ctx, kind):
        with serving(ctx, kind, flags) as s:
            return bench_writer(ctx, s, batch)
    return run


def w_consume(flags, wire=()):
    """Consumes a preloaded queue with RDY 2500 to the last message."""
    def run(ctx, kind):
        with serving(ctx, kind, flags) as s:
            channel(s)
            preload(ctx, s, ctx.consume_count, wire=wire)
            # To 99 % of the queue: the last, partial output buffer waits for the client's
            # output buffer timeout, which is not throughput.
            count = ctx.consume_count * 99 // 100
            r = bench(ctx, s, "reader", "--rdy", "2500", "--count", str(count),
                      "--runfor", "0", wire=wire)
            return r["reader"]["msgs_per_sec"]
    return run


def w_fanout(ctx, kind):
    """1 topic → 10 channels, one consumer each, publishing (MPUB 200) while they consume:
    messages delivered per second over all channels."""
    with serving(ctx, kind, MEMORY) as s:
        for i in range(10):
            channel(s, name=f"ch{i}")
        r = bench(ctx, s, "both", "-c", "10", "--writers", "1", "--channels", "10",
                  "--batch-size", "200", "--runfor", ctx.runfor)
        return r["reader"]["msgs_per_sec"]


def w_e2e(rate, buffered):
    """p99 publish-to-receipt latency (ms) at a fixed publish rate, one consumer."""
    def run(ctx, kind):
        with serving(ctx, kind, MEMORY) as s:
            channel(s)
            extra = () if buffered else ("--output-buffer-size", "-1")
            r = bench(ctx, s, "both", "--rate", str(rate), "--writers", "4", "--batch-size",
                      "10", "--runfor", ctx.runfor, *extra)
            return r["reader"]["p99_ns"] / 1e6
    return run


def w_cpu(batch, writers):
    """Server CPU microseconds per message published and consumed at 50k msgs/s."""
    def run(ctx, kind):
        with serving(ctx, kind, MEMORY) as s:
            channel(s)
            with costs(ctx, kind, s) as c:
                r = bench(ctx, s, "both", "--rate", "50000", "--writers", str(writers),
                          "--batch-size", str(batch), "--runfor", ctx.runfor)
                c["msgs"] = r["writer"]["msgs"]
            split = ctx.costs[kind][-1]
            return split["user"] + split["kernel"]
    return run


def rss_queue(ctx, kind):
    """Bytes of RSS per queued message (1M in memory), and RSS (MB) after consuming them."""
    with serving(ctx, kind, MEMORY) as s:
        channel(s)
        time.sleep(0.5)
        before = s.rss_kb()
        preload(ctx, s, ctx.rss_count)
        time.sleep(0.5)
        queued = s.rss_kb()
        bench(ctx, s, "reader", "--count", str(ctx.rss_count), "--runfor", "0")
        time.sleep(ctx.settle)
        after = s.rss_kb()
        return (queued - before) * 1024 / ctx.rss_count, after / 1024, queued / 1024


def w_floor(ctx, _kind):
    with serving(ctx, "floor") as s:
        return bench(ctx, s, "writer", "--batch-size", "1", "--runfor", ctx.runfor)[
            "writer"]["msgs_per_sec"]


def w_floor_bench_writer(ctx, _kind):
    with serving(ctx, "floor") as s:
        return bench_writer(ctx, s, 1)


# Rows whose targets are out of reach on this kind of machine: the table says where their CPU
# goes and what bounds them.
BOUNDED = {"pub100", "cpu_pub1"}

# Rows measured against the floor too: (floor row's key, label, how, target share or None).
FLOORS = {
    "pub1": ("floor", "round-trip floor (do-nothing server), PUB one at a time", w_floor,
             0.85),
    "bw_pub1": ("bw_floor", "round-trip floor (do-nothing server), nsq's bench_writer PUB",
                w_floor_bench_writer, None),
}


# (key, label, unit, higher is better, workload, target ratio or None)
def workloads(ctx):
    sync = {"nsqd": ("--mem-queue-size=0", "--sync-every=1"), "knsq": ("--sync-publish",)}
    rows = [
        ("mpub", "MPUB 200, 1 producer (memory)", "msgs/s", True,
         w_writer(MEMORY, "--batch-size", "200"), 2.5),
        ("pub1", "PUB one at a time, 1 producer", "msgs/s", True,
         w_writer(MEMORY, "--batch-size", "1"), 1.5),
        ("pub100", "PUB one at a time, 100 producers", "msgs/s", True,
         w_writer(MEMORY, "--batch-size", "1", "-c", "100"), 2.0),
        ("consume", "consume RDY 2500 (memory)", "msgs/s", True, w_consume(MEMORY), 2.5),
        ("fanout", "fan-out 1 topic → 10 channels, 10 consumers", "deliveries/s", True,
         w_fanout, 2.0),
        ("disk_mpub", "disk path MPUB 200 (--mem-queue-size=0)", "msgs/s", True,
         w_writer(DISK, "--batch-size", "200", channels=1), 5.0),
        ("disk_consume", "disk path consume", "msgs/s", True, w_consume(DISK), 5.0),
        ("sync_mpub", "--sync-publish MPUB 200, 4 producers (nsqd: --sync-every=1)", "msgs/s",
         True, "sync", 1.0),
        ("sync_pub", "--sync-publish PUB, 4 producers (nsqd: --sync-every=1)", "msgs/s",
         True, "sync1", 1.0),
        ("tls_mpub", "TLS MPUB 200", "msgs/s", True,
         w_writer(MEMORY, "--batch-size", "200", wire=("--tls",)), 1.0),
        ("tls_consume", "TLS consume", "msgs/s", True, w_consume(MEMORY, ("--tls",)), 1.0),
        ("snappy_mpub", "snappy MPUB 200", "msgs/s", True,
         w_writer(MEMORY, "--batch-size", "200", wire=("--snappy",)), 1.0),
        ("snappy_consume", "snappy consume", "msgs/s", True,
         w_consume(MEMORY, ("--snappy",)), 1.0),
        ("e2e10k", "e2e p99 at 10k msgs/s, default buffering", "ms", False,
         w_e2e(10_000, True), 2.0),
        ("e2e50k", "e2e p99 at 50k msgs/s, default buffering", "ms", False,
         w_e2e(50_000, True), 2.0),
        ("e2e10k_unbuf", "e2e p99 at 10k msgs/s, unbuffered", "ms", False,
         w_e2e(10_000, False), 2.0),
        ("e2e50k_unbuf", "e2e p99 at 50k msgs/s, unbuffered", "ms", False,
         w_e2e(50_000, False), 2.0),
        ("cpu_batched", "server CPU per message at 50k msgs/s, MPUB 200", "µs", False,
         w_cpu(200, 1), 3.0),
        ("cpu_pub1", "server CPU per message at 50k msgs/s, PUB, 4 producers", "µs", False,
         w_cpu(1, 4), 2.0),
    ]
    resolved = []
    for key, label, unit, higher, fn, target in rows:
        if fn in ("sync", "sync1"):
            batch = "200" if fn == "sync" else "1"
            fn = _per_kind({k: w_writer(f + ("--mem-queue-size=0",) if k == "knsq" else f,
                                        "--batch-size", batch, "-c", "4", channels=1)
                            for k, f in sync.items()})
        resolved.append((key, label, unit, higher, fn, target))
    if ctx.nsq_bin and os.path.exists(os.path.join(ctx.nsq_bin, "bench_writer")):
        resolved.append(("bw_mpub", "MPUB 200 with nsq's bench_writer (2 conns)", "msgs/s",
                         True, w_bench_writer(MEMORY, 200), 2.5))
        resolved.append(("bw_pub1", "PUB with nsq's bench_writer (2 conns)", "msgs/s", True,
                         w_bench_writer(MEMORY, 1), 1.5))
    return resolved


def _per_kind(fns):
    return lambda ctx, kind: fns[kind](ctx, kind)


def scaling(ctx):
    """Throughput and RSS against connections, topics and channels per topic (knsq and nsqd
    alike, one round each point)."""
    curves = {
        # N producers publishing one at a time, one consumer.
        "connections": [(n, ("-c", "1", "--writers", str(n), "--batch-size", "1"))
                        for n in ctx.points["connections"]],
        # One producer and one consumer per topic; MPUB batches go to the topics in turn.
        "topics": [(n, ("-c", str(n), "--writers", "1", "--topics", str(n),
                        "--batch-size", "20")) for n in ctx.points["topics"]],
        # One producer; one consumer per channel of one topic.
        "channels": [(n, ("-c", str(n), "--writers", "1", "--channels", str(n),
                          "--batch-size", "200")) for n in ctx.points["channels"]],
    }
    out = {}
    for curve, points in curves.items():
        out[curve] = []
        for n, args in points:
            point = {"n": n}
            for kind in ctx.kinds:
                with serving(ctx, kind, MEMORY) as s:
                    try:
                        r = bench(ctx, s, "both", "--runfor", ctx.runfor, *args)
                    except RuntimeError as e:
                        # One point that fails (a descriptor limit, say) costs that point only.
                        point[kind] = {"error": str(e)}
                        continue
                    point[kind] = {
                        "msgs_per_sec": r["reader"]["msgs_per_sec"],
                        "rss_mb": s.rss_kb() / 1024,
                        "peak_rss_mb": s.rss_kb("VmHWM") / 1024,
                    }
            out[curve].append(point)
            print(f"  {curve}={n}: " + ", ".join(
                f"{k} failed: {point[k]['error']}" if "error" in point[k] else
                f"{k} {point[k]['msgs_per_sec']:.0f} msgs/s {point[k]['rss_mb']:.0f} MB"
                for k in ctx.kinds), flush=True)
    return out


def make_certs(tmp):
    d = os.path.join(tmp, "certs")
    os.makedirs(d)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", *ec, "-keyout", f"{d}/ca-key.pem", "-out", f"{d}/ca.pem",
        "-days", "1", "-subj", "/CN=knsq bench CA", "-addext",
        "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("openssl", "req", *ec, "-keyout", f"{d}/key.pem", "-out", f"{d}/csr.pem",
        "-subj", "/CN=localhost")
    with open(f"{d}/ext", "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", f"{d}/csr.pem", "-CA", f"{d}/ca.pem", "-CAkey",
        f"{d}/ca-key.pem", "-CAcreateserial", "-days", "1", "-extfile", f"{d}/ext",
        "-out", f"{d}/cert.pem")
    return {"ca": f"{d}/ca.pem", "cert": f"{d}/cert.pem", "key": f"{d}/key.pem"}


def fmt(v, unit):
    if v is None:
        return "–"
    if unit in ("msgs/s", "deliveries/s"):
        return f"{v:,.0f}"
    return f"{v:.3g}" if v < 10 else f"{v:.1f}"


def measure(ctx):
    results = {"load_before": load_average(), "rounds": ctx.rounds, "runfor": ctx.runfor,
               "kinds": ctx.kinds, "rows": []}
    tls_flags = ("--tls-cert=" + ctx.certs["cert"], "--tls-key=" + ctx.certs["key"])
    for key, label, unit, higher, fn, target in workloads(ctx):
        if ctx.only and key not in ctx.only:
            continue
        values = {k: [] for k in ctx.kinds}
        floor = []
        ctx.costs = {}
        for r in range(ctx.rounds):
            order = ctx.kinds if r % 2 == 0 else list(reversed(ctx.kinds))
            if key in FLOORS:
                # The floor in the same rounds, so that it meets the same load.
                floor.append(FLOORS[key][2](ctx, "floor"))
            for kind in order:
                # TLS rows need the certificate on the server's command line.
                ctx.extra_flags = tls_flags if key.startswith("tls") else ()
                values[kind].append(fn(ctx, kind))
        ctx.extra_flags = ()
        measured = _row(key, label, unit, higher, target, values)
        results["rows"].append(measured)
        print(_line(measured, ctx.kinds), flush=True)
        if key in BOUNDED and ctx.costs.keys() == values.keys():
            row = _bound_row(key, measured, ctx.costs)
            results["rows"].append(row)
            print(f"  {row['label']}: " + "; ".join(
                f"{k} {row['split_text'][k]}" for k in ctx.kinds) + (
                f"; best reachable ×{row['best_ratio']:.2f}" if "best_ratio" in row else ""),
                flush=True)
        if floor:
            floor_key, floor_label, _, share = FLOORS[key]
            row = {"key": floor_key, "label": floor_label, "unit": "msgs/s",
                   "floor": statistics.median(floor), "values": floor, "target": share}
            row["knsq_vs_floor"] = measured["median"]["knsq"] / row["floor"]
            results["rows"].append(row)
            print(f"{floor_label}: {row['floor']:,.0f} msgs/s; knsq at "
                  f"{row['knsq_vs_floor']:.0%} of it", flush=True)
    if not ctx.only or "rss" in ctx.only:
        rss = {k: [] for k in ctx.kinds}
        for r in range(ctx.rss_rounds):
            order = ctx.kinds if r % 2 == 0 else list(reversed(ctx.kinds))
            for kind in order:
                rss[kind].append(rss_queue(ctx, kind))
        per_msg = {k: [v[0] for v in rss[k]] for k in ctx.kinds}
        row = _row("rss", f"RSS per queued {MSG}-byte message ({ctx.rss_count:,} queued)",
                   "B", False, None, per_msg)
        row["after_consume_mb"] = {k: statistics.median(v[1] for v in rss[k]) for k in rss}
        row["queued_mb"] = {k: statistics.median(v[2] for v in rss[k]) for k in rss}
        results["rows"].append(row)
        print(_line(row, ctx.kinds) + "; RSS queued/after consuming (MB): " + ", ".join(
            f"{k} {row['queued_mb'][k]:.0f}/{row['after_consume_mb'][k]:.0f}" for k in rss),
            flush=True)
    if ctx.scaling:
        results["scaling"] = scaling(ctx)
    results["load_after"] = load_average()
    return results


def _row(key, label, unit, higher, target, values):
    med = {k: statistics.median(v) for k, v in values.items()}
    row = {"key": key, "label": label, "unit": unit, "higher_is_better": higher,
           "target": target, "values": values, "median": med}
    if "nsqd" in med and med["nsqd"] and med["knsq"]:
        # Always "how many times better knsq is": >1 means knsq wins.
        row["ratio"] = med["knsq"] / med["nsqd"] if higher else med["nsqd"] / med["knsq"]
    return row


def _bound_row(key, measured, split):
    """Where a row's CPU went (medians of µs per message: the load tool, the server in user
    space, the server's kernel work) and the best ratio to nsqd that knsq could reach with
    its user space at zero, its syscalls as they are.

    Throughput rows (`pub100`): the tool and the server share the machine's CPUs, so no more
    than CPUs ÷ (tool + knsq kernel) messages a second get through. CPU rows: nsqd's CPU per
    message ÷ knsq's kernel time per message."""
    med = {k: {part: statistics.median(r[part] for r in runs) for part in runs[0]}
           for k, runs in split.items()}
    row = {"key": f"{key}_bound", "unit": "µs", "split": med,
           "split_text": {k: f"{m['client']:.2g} / {m['user']:.2g} / {m['kernel']:.2g}"
                          for k, m in med.items()}}
    nsqd = measured["median"].get("nsqd")
    knsq = med.get("knsq")
    row["label"] = "↳ where its CPU goes, µs per message: load tool / server user / server kernel"
    if key.startswith("cpu"):
        if nsqd and knsq:
            row["best_ratio"] = nsqd / knsq["kernel"]
    elif knsq:
        row["bound"] = os.cpu_count() * 1e6 / (knsq["client"] + knsq["kernel"])
        if nsqd:
            row["best_ratio"] = row["bound"] / nsqd
    return row


def _line(row, kinds):
    med = "  ".join(f"{k} {fmt(row['median'][k], row['unit'])}" for k in kinds)
    ratio = f"  ×{row['ratio']:.2f}" if "ratio" in row else ""
    return f"{row['label']}: {med} {row['unit']}{ratio}"


def table(results):
    kinds = results["kinds"]
    lines = [
        f"Load average before/after: {results['load_before']} / {results['load_after']}; "
        f"{results['rounds']} rounds of {results['runfor']}, medians.",
        "",
        "| workload | unit | " + " | ".join(kinds) + " | knsq ÷ nsqd (better = >1) | target | met |",
        "|---|---|" + "---|" * len(kinds) + "---|---|---|",
    ]
    for row in results["rows"]:
        if row["key"].endswith("_bound"):
            reach = []
            if "bound" in row:
                reach.append(f"knsq's user space at zero: {fmt(row['bound'], 'msgs/s')} msgs/s")
            if "best_ratio" in row:
                reach.append(f"best reachable ×{row['best_ratio']:.2f}")
            lines.append(
                f"| {row['label']} | µs | "
                + " | ".join(row["split_text"].get(k, "–") for k in kinds)
                + f" | {', '.join(reach) or '–'} | – | – |")
            continue
        if row["key"].endswith("floor"):
            vs, share = row["knsq_vs_floor"], row.get("target", 0.85)
            target_text, met = (f"≥ {share:.0%}", "yes" if vs >= share else "no") if share \
                else ("–", "–")
            lines.append(
                f"| {row['label']} | msgs/s | " + " | ".join(
                    fmt(row["floor"], "msgs/s") if k == "knsq" else "–" for k in kinds)
                + f" | knsq = {vs:.0%} of floor | {target_text} | {met} |")
            continue
        ratio = row.get("ratio")
        target = row.get("target")
        if row["key"] == "rss":
            target_text, met = "≤ 240 B", row["median"]["knsq"] <= 240
        elif target and target > 1:
            target_text, met = f"≥ {target:g}×", ratio is not None and ratio >= target
        else:
            target_text, met = "≥ 1× (not slower)", ratio is not None and ratio >= 1
        cells = " | ".join(fmt(row["median"].get(k), row["unit"]) for k in kinds)
        lines.append(
            f"| {row['label']} | {row['unit']} | {cells} | "
            + (f"{ratio:.2f}" if ratio else "–") + f" | {target_text} | "
            + ("yes" if met else ("no" if ratio or row['key'] == 'rss' else "–")) + " |")
    return "\n".join(lines)


def plot(results, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaling = results.get("scaling") or {}
    titles = {"connections": "producers (connections)", "topics": "topics",
              "channels": "channels per topic"}
    for curve, points in scaling.items():
        fig, (thr, rss) = plt.subplots(1, 2, figsize=(10, 4))
        for kind in results["kinds"]:
            ok = [p for p in points if "error" not in p[kind]]
            xs = [p["n"] for p in ok]
            thr.plot(xs, [p[kind]["msgs_per_sec"] for p in ok], marker="o", label=kind)
            rss.plot(xs, [p[kind]["peak_rss_mb"] for p in ok], marker="o", label=kind)
        for ax, ylabel in ((thr, "messages delivered / s"), (rss, "peak RSS (MB)")):
            ax.set_xscale("log")
            ax.set_xlabel(titles[curve])
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"knsq and nsqd against {titles[curve]}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"scaling-{curve}.png")
        fig.savefig(path, dpi=90)
        print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bin-dir", required=True, help="knsq-broker and knsq-bench")
    p.add_argument("--nsq-bin", default=os.environ.get("NSQ_BIN_DIR") or None)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runfor", default="5s")
    p.add_argument("--smoke", action="store_true", help="seconds-long, tiny counts")
    p.add_argument("--scaling", action="store_true")
    p.add_argument("--only", default="", help="comma-separated workload keys")
    p.add_argument("--plot", metavar="RESULTS_JSON", help="only draw the plots")
    a = p.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    if a.plot:
        with open(a.plot) as f:
            plot(json.load(f), a.out_dir)
        return 0

    class Ctx:
        pass

    ctx = Ctx()
    ctx.knsq = os.path.join(a.bin_dir, "knsq-broker")
    ctx.bench = os.path.join(a.bin_dir, "knsq-bench")
    ctx.nsq_bin = a.nsq_bin
    ctx.nsqd = os.path.join(a.nsq_bin, "nsqd") if a.nsq_bin else None
    if ctx.nsqd and not os.access(ctx.nsqd, os.X_OK):
        sys.exit(f"NSQ_BIN_DIR={a.nsq_bin} has no executable nsqd")
    ctx.kinds = ["nsqd", "knsq"] if ctx.nsqd else ["knsq"]
    ctx.rounds, ctx.runfor, ctx.only = a.rounds, a.runfor, set(filter(None, a.only.split(",")))
    ctx.scaling = a.scaling
    ctx.timeout = 600
    ctx.extra_flags = ()
    if a.smoke:
        ctx.rounds, ctx.runfor = 1, "300ms"
        ctx.consume_count, ctx.rss_count, ctx.rss_rounds, ctx.settle = 20_000, 20_000, 1, 0.5
        ctx.points = {"connections": [1, 10], "topics": [1, 3], "channels": [1, 3]}
    else:
        ctx.consume_count, ctx.rss_count, ctx.rss_rounds, ctx.settle = 2_000_000, 1_000_000, 3, 5
        ctx.points = {"connections": [1, 10, 100, 1000, 10000], "topics": [1, 10, 100, 1000],
                      "channels": [1, 10, 100]}
    ctx.tmp = tempfile.mkdtemp(prefix="bench-vs-nsqd-")
    try:
        ctx.certs = make_certs(ctx.tmp)
        if not ctx.nsqd:
            print("NSQ_BIN_DIR is not set: the reference nsqd is skipped, knsq runs alone",
                  flush=True)
        print(f"servers: {', '.join(ctx.kinds)}; load average {load_average()}", flush=True)
        results = measure(ctx)
    finally:
        shutil.rmtree(ctx.tmp, ignore_errors=True)
    text = table(results)
    print()
    print(text)
    with open(os.path.join(a.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(a.out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
