"""Load benchmark: POST /api under wrk against a bare aiohttp handler, in one run.

    .venv/bin/python -m bench.load [--duration 10] [--connections 64] [--memory-minutes 0]

needs wrk (Debian: apt-get install wrk). Every server is a process of its own
on 127.0.0.1; wrk runs on the other core. In order:

1. baseline: a bare aiohttp handler that parses the JSON and answers ok,
   measured first and again right after the service (the ratio is to the
   mean of the two: the shared machine's speed drifts within a run);
2. seeds: the design users replace (session check, inline POST to Inngest);
3. service: `inngest-outbox serve` (SQLite in WAL mode, synchronous=FULL, the
   worker delivering to a stand-in Inngest in another process), with every
   acknowledged id checked in the database afterwards, the delivery rate to
   the stand-in, and the time to drain what was left;
4. overload: the service with a small write queue under 4x the connections,
   to show 503 + Retry-After at once instead of an unbounded queue;
5. commit-to-delivery latency when idle (bench.delivery's measurement);
6. with --memory-minutes N: the service under full load for N minutes, its
   resident memory sampled every 10 s.

Figures are printed as ratios to the baseline measured in the same run.
Nothing is asserted except that no acknowledged event is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.net import free_port, wait_for_port

HERE = Path(__file__).resolve().parent
LOGS = HERE / "results"
KEY = "bench-event-key"
PASSWORD = "bench password"


@dataclass
class Run:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    ok: int
    refused: int
    other: int


def scratch_dir(prefix: str) -> Path:
    """A temporary directory, removed when the benchmark exits: a run under load
    leaves gigabytes of database and WAL in it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def start(args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    # Each process's output goes to bench/results/ (ignored by git), named after its module.
    LOGS.mkdir(exist_ok=True)
    log = open(LOGS / f"{args[1].rsplit('.', 1)[-1]}-{time.time_ns()}.log", "wb")
    return subprocess.Popen(
        [sys.executable, *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT
    )


def wrk(url: str, *, duration: int, connections: int, env: dict[str, str]) -> Run:
    command = [
        "wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency",
        "-s", str(HERE / "post.lua"), url,
    ]  # fmt: skip
    out = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, check=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    ok, refused, other = map(
        int, re.search(r"STATUS ok=(\d+) refused503=(\d+) other=(\d+)", out).groups()
    )  # type: ignore[union-attr]  # noqa: E501
    p50, p99 = map(float, re.search(r"LATENCY p50=([\d.]+) p99=([\d.]+)", out).groups())  # type: ignore[union-attr]
    return Run(url, rps, p50, p99, ok, refused, other)


def http_json(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[dict, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        cookie = response.headers.get("Set-Cookie", "").split(";")[0]
        return json.loads(response.read() or b"{}"), cookie


def stand_in_accepted(url: str) -> int:
    return int(http_json(f"{url}/_stats")[0]["accepted"])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def service_env(work: Path, inngest: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "INNGEST_", "S3_"))}
    env.update(
        DATABASE_URL=f"sqlite+aiosqlite:///{work / 'service.db'}",
        INNGEST_BASE_URL=inngest,
        INNGEST_EVENT_KEY=KEY,
        LOG_LEVEL="WARNING",
        PYTHONPATH=str(HERE.parent),
    )
    env.update(extra)
    return env


def prepare_database(work: Path, env: dict[str, str]) -> None:
    """Migrate the database and add the benchmark's user, as an operator would."""
    service = [sys.executable, "-m", "service"]
    subprocess.run([*service, "migrate"], cwd=work, env=env, check=True, capture_output=True)
    subprocess.run(
        [*service, "users", "add", "bench"],
        cwd=work, env=env, input=PASSWORD + "\n", text=True, check=True, capture_output=True,
    )  # fmt: skip


def start_service(work: Path, inngest: str, **extra: str) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    env = service_env(work, inngest, PORT=str(port), **extra)
    process = start(["-m", "service", "serve", "--dev"], cwd=work, env=env)
    wait_for_port("127.0.0.1", port, timeout=60, process=process)
    url = f"http://127.0.0.1:{port}"
    _, cookie = http_json(f"{url}/auth/login", {"username": "bench", "password": PASSWORD})
    return process, url, cookie


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def acknowledged_ids(ids_dir: Path) -> list[str]:
    return [line for f in ids_dir.glob("ids-*.txt") for line in f.read_text().split()]


def check_stored(work: Path, ids: list[str]) -> int:
    with sqlite3.connect(work / "service.db") as conn:
        conn.execute("CREATE TEMP TABLE acked (id TEXT PRIMARY KEY)")
        conn.executemany("INSERT OR IGNORE INTO acked VALUES (?)", ((i,) for i in ids))
        return conn.execute(
            "SELECT count(*) FROM acked WHERE id NOT IN (SELECT event_id FROM documents)"
        ).fetchone()[0]


def wait_delivered(inngest: str, target: int, timeout: float = 300) -> float:
    started = time.monotonic()
    while stand_in_accepted(inngest) < target:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"stand-in has {stand_in_accepted(inngest)} of {target}")
        time.sleep(0.05)
    return time.monotonic() - started


def line(name: str, run: Run, base: Run) -> str:
    return (
        f"{name:<34} {run.rps:9.0f} req/s  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:7.2f} ms"
        f"  {run.rps / base.rps:6.1%} of baseline"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--memory-minutes", type=float, default=0)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench.load needs wrk: apt-get install wrk")

    work = scratch_dir("bench-load-")
    procs: list[subprocess.Popen] = []
    inngest_port = free_port()
    inngest = f"http://127.0.0.1:{inngest_port}"
    try:
        procs.append(
            start(
                ["-m", "bench.standin", "--port", str(inngest_port), "--key", KEY], cwd=HERE.parent
            )
        )
        wait_for_port("127.0.0.1", inngest_port, timeout=30, process=procs[-1])
        load = {"duration": args.duration, "connections": args.connections}

        def bare() -> Run:
            port = free_port()
            procs.append(start(["-m", "bench.bare", "--port", str(port)], cwd=HERE.parent))
            wait_for_port("127.0.0.1", port, timeout=30, process=procs[-1])
            result = wrk(f"http://127.0.0.1:{port}/api", **load, env={})
            stop(procs.pop())
            return result

        before = bare()

        port = free_port()
        procs.append(
            start(
                ["-m", "bench.seeds", "--port", str(port), "--inngest", inngest, "--key", KEY],
                cwd=HERE.parent,
            )
        )  # noqa: E501
        wait_for_port("127.0.0.1", port, timeout=30, process=procs[-1])
        _, cookie = http_json(f"http://127.0.0.1:{port}/login", {})
        seeds = wrk(f"http://127.0.0.1:{port}/api", **load, env={"COOKIE": cookie})
        stop(procs.pop())

        # The service: migrate, add the user, serve, load.
        env = service_env(work, inngest)
        prepare_database(work, env)
        service, url, cookie = start_service(work, inngest)
        procs.append(service)
        ids_dir = work / "ids"
        ids_dir.mkdir()
        delivered_before = stand_in_accepted(inngest)
        started = time.monotonic()
        run = wrk(f"{url}/api", **load, env={"COOKIE": cookie, "IDS_DIR": str(ids_dir)})
        elapsed = time.monotonic() - started
        delivered_during = stand_in_accepted(inngest) - delivered_before
        ids = acknowledged_ids(ids_dir)
        drain_seconds = wait_delivered(inngest, delivered_before + len(ids))
        rss = rss_mib(service.pid)
        stop(procs.pop())
        missing = check_stored(work, ids)
        # Measured again right after the service: the machine's speed drifts
        # (it is shared), and the ratio is to the mean of the two.
        after = bare()
        baseline = Run(
            "baseline",
            (before.rps + after.rps) / 2,
            (before.p50_ms + after.p50_ms) / 2,
            (before.p99_ms + after.p99_ms) / 2,
            before.ok + after.ok,
            before.refused + after.refused,
            before.other + after.other,
        )

        # Overload: a small write queue under 4x the connections.
        overload_env = {"WRITE_QUEUE_LIMIT": "32"}
        service, url, cookie = start_service(work, inngest, **overload_env)
        procs.append(service)
        overload = wrk(
            f"{url}/api",
            duration=args.duration,
            connections=args.connections * 4,
            env={"COOKIE": cookie},
        )  # noqa: E501
        stop(procs.pop())

        from bench.delivery import idle_latency

        latencies = asyncio.run(idle_latency(samples=200))

        memory: list[tuple[float, float]] = []
        if args.memory_minutes > 0:
            service, url, cookie = start_service(work, inngest)
            procs.append(service)
            end = time.monotonic() + args.memory_minutes * 60
            load_proc = subprocess.Popen(
                ["wrk", "-t2", f"-c{args.connections}", f"-d{int(args.memory_minutes * 60)}s",
                 "-s", str(HERE / "post.lua"), f"{url}/api"],
                env={**os.environ, "COOKIE": cookie}, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            t0 = time.monotonic()
            while time.monotonic() < end and load_proc.poll() is None:
                memory.append((time.monotonic() - t0, rss_mib(service.pid)))
                time.sleep(10)
            load_proc.wait()
            memory.append((time.monotonic() - t0, rss_mib(service.pid)))
            stop(procs.pop())
    finally:
        for proc in procs:
            stop(proc)

    print(f"wrk -t2 -c{args.connections} -d{args.duration}s, one server process, 127.0.0.1")
    print(line("baseline: bare aiohttp JSON handler", baseline, baseline))
    print(line("  measured first", before, baseline))
    print(line("  measured after the service", after, baseline))
    print(line("seeds: session + inline POST", seeds, baseline))
    print(line("inngest-outbox POST /api (durable)", run, baseline))
    print(f"  acknowledged {len(ids)} (wrk counted {run.ok}), other answers {run.other}; "
          f"missing from the database: {missing}")  # fmt: skip
    print(f"  delivered to the stand-in during the run: {delivered_during / elapsed:.0f} events/s;"
          f" the rest drained {drain_seconds:.2f} s after; service RSS {rss:.0f} MiB")  # fmt: skip
    total = overload.ok + overload.refused + overload.other
    print(
        f"overload ({args.connections * 4} connections, WRITE_QUEUE_LIMIT=32): "
        f"{overload.ok} ok, {overload.refused} 503 at once ({overload.refused / max(total, 1):.0%}),"
        f" {overload.other} other; p99 {overload.p99_ms:.2f} ms"
    )
    latencies.sort()
    print(
        f"commit to delivery, idle: p50 {latencies[len(latencies) // 2] * 1000:.2f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.2f} ms ({len(latencies)} samples)"
    )
    if memory:
        values = [m for _, m in memory]
        print(
            f"memory over {args.memory_minutes:g} min at full load: start {values[0]:.0f} MiB, "
            f"end {values[-1]:.0f} MiB, max {max(values):.0f} MiB "
            f"(samples: {', '.join(f'{m:.0f}' for m in values)})"
        )
    if missing:
        sys.exit(f"{missing} acknowledged events are missing from the database")


if __name__ == "__main__":
    main()
