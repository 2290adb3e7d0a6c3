#!/usr/bin/env python3
"""A soak you can run: `make soak` (not in CI).

Starts `conveyor run` (memory queue, then NATS JetStream on a private nats-server), drives it
with `conveyor load` at a steady open-loop rate for the given minutes, samples the server's RSS
and CPU every second from /proc, reads the load generator's per-second latency, and fails
when, after warm-up, RSS grows past a bound or p99 latency drifts.

Settings (environment): SOAK_MINUTES (15), SOAK_RATE (events/s, 5000), SOAK_MODE (http |
batch | grpc, http), SOAK_BACKENDS ("memory nats"), SOAK_WARMUP_SECS (60),
SOAK_RSS_GROWTH_MIB (64: allowed growth of RSS over its post-warm-up level),
SOAK_P99_DRIFT (3.0: allowed ratio of the last minute's p99 to the first minute's after
warm-up), SOAK_OUT (target/soak).
"""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "conveyor")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def env(name, default):
    return type(default)(os.environ.get(name, default))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"soak: {url} did not become ready within {timeout} s")


def sample(pid, samples, stop):
    """RSS (MiB) and CPU (share of one core) of `pid`, once a second."""
    last_ticks, last_time = None, None
    while not stop.is_set():
        try:
            with open(f"/proc/{pid}/status") as f:
                rss_kib = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                ticks = int(fields[11]) + int(fields[12])
        except (OSError, StopIteration):
            return
        now = time.monotonic()
        cpu = None
        if last_ticks is not None:
            cpu = (ticks - last_ticks) / CLOCK_TICKS / (now - last_time)
        samples.append({"t": now, "rss_mib": rss_kib / 1024, "cpu": cpu})
        last_ticks, last_time = ticks, now
        stop.wait(1.0)


def soak(backend, out_dir):
    minutes = env("SOAK_MINUTES", 15.0)
    rate = env("SOAK_RATE", 5000)
    mode = env("SOAK_MODE", "http")
    warmup = env("SOAK_WARMUP_SECS", 60.0)
    growth_bound = env("SOAK_RSS_GROWTH_MIB", 64.0)
    drift_bound = env("SOAK_P99_DRIFT", 3.0)
    work = tempfile.mkdtemp(prefix=f"soak-{backend}-")
    port = free_port()
    cmd = [BIN, "run", "--host", "127.0.0.1", "--port", str(port), "--sink", "blackhole"]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "NATS_", "QUEUE_"))}
    broker = None
    if backend == "nats":
        nats = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not os.path.exists(nats):
            sys.exit("soak: nats-server not found; apt-get install nats-server")
        nats_port = free_port()
        broker = subprocess.Popen(
            [nats, "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", os.path.join(work, "js")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        child_env.update(QUEUE_TYPE="nats", NATS_URL=f"nats://127.0.0.1:{nats_port}")
    server = subprocess.Popen(cmd, cwd=work, env=child_env,
                              stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "server.log"), "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        samples, stop = [], threading.Event()
        sampler = threading.Thread(target=sample, args=(server.pid, samples, stop), daemon=True)
        sampler.start()
        report = os.path.join(out_dir, f"{backend}.json")
        load = subprocess.run(
            [BIN, "load", "--target", url, "--mode", mode, "--rate", str(rate),
             "--duration", str(int(minutes * 60)), "--report", report,
             "--chart", os.path.join(out_dir, f"{backend}.svg"), "--progress", "plain"],
            env=child_env)
        stop.set()
        sampler.join()
        if load.returncode != 0:
            return [f"{backend}: conveyor load exited {load.returncode}"], None
        with open(report) as f:
            seconds = json.load(f).get("timeline", [])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        if broker:
            broker.kill()
        shutil.rmtree(work, ignore_errors=True)

    start = samples[0]["t"] if samples else 0
    after = [s for s in samples if s["t"] - start >= warmup]
    problems = []
    if len(after) < 10:
        return [f"{backend}: too short to judge ({len(samples)} samples, warm-up {warmup} s)"], None
    baseline_rss = statistics.median(s["rss_mib"] for s in after[:30])
    peak_rss = max(s["rss_mib"] for s in after)
    if peak_rss > baseline_rss + growth_bound:
        problems.append(f"{backend}: RSS grew from {baseline_rss:.0f} MiB after warm-up to {peak_rss:.0f} MiB "
                        f"(bound +{growth_bound:.0f} MiB)")
    measured = [s for s in seconds if s["second"] >= warmup and s["requests"] > 0]
    first = measured[:60]
    last = measured[-60:]
    p99_first = statistics.median(s["p99_us"] for s in first) if first else 0
    p99_last = statistics.median(s["p99_us"] for s in last) if last else 0
    if p99_first and p99_last > drift_bound * p99_first and p99_last > 5_000:
        problems.append(f"{backend}: p99 drifted from {p99_first} µs to {p99_last} µs (bound ×{drift_bound})")
    errors = sum(s["errors"] for s in seconds)
    cpu = [s["cpu"] for s in after if s["cpu"] is not None]
    row = {
        "backend": backend, "minutes": minutes, "rate": rate, "mode": mode,
        "rss_after_warmup_mib": round(baseline_rss, 1), "rss_peak_mib": round(peak_rss, 1),
        "rss_last_mib": round(after[-1]["rss_mib"], 1),
        "cpu_mean": round(statistics.mean(cpu), 2) if cpu else None,
        "p99_first_min_us": p99_first, "p99_last_min_us": p99_last,
        "accepted": sum(s["accepted"] for s in seconds), "errors": errors,
    }
    return problems, row


def main():
    if not os.path.exists(BIN):
        sys.exit(f"soak: {BIN} missing; run `cargo build --release -p conveyor` (make soak does)")
    out_dir = os.path.join(ROOT, env("SOAK_OUT", "target/soak"))
    os.makedirs(out_dir, exist_ok=True)
    rows, problems = [], []
    for backend in env("SOAK_BACKENDS", "memory nats").split():
        found, row = soak(backend, out_dir)
        problems += found
        if row:
            rows.append(row)
    print("\n| backend | minutes | rate | mode | accepted | errors | RSS after warm-up / peak / last (MiB) "
          "| CPU (cores) | p99 first / last minute (µs) |")
    print("|---|---:|---:|---|---:|---:|---|---:|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['minutes']:g} | {r['rate']} | {r['mode']} | {r['accepted']:,} | {r['errors']} "
              f"| {r['rss_after_warmup_mib']} / {r['rss_peak_mib']} / {r['rss_last_mib']} | {r['cpu_mean']} "
              f"| {r['p99_first_min_us']} / {r['p99_last_min_us']} |")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"rows": rows, "problems": problems}, f, indent=2)
    for p in problems:
        print("FAIL:", p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
