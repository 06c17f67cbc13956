"""Load benchmark: POST /api under wrk against a bare aiohttp handler, in one run.

    .venv/bin/python -m bench.load [--rounds 4] [--duration 5] [--connections 64] [--memory-minutes 0]

needs wrk (Debian: apt-get install wrk). Every server is a process of its own
on 127.0.0.1; wrk runs on the other core. In order:

1. seeds: the design users replace (session check, inline POST to Inngest);
2. baseline and service in turns: a bare aiohttp handler that parses the JSON
   and answers ok, and `inngest-outbox serve` (SQLite in WAL mode,
   synchronous=FULL, the worker delivering to a stand-in Inngest in another
   process), both up, wrk on each in turn for --rounds rounds (the order
   reversed every other round). The service's ratio is the median of the
   rounds' ratios: the shared machine's speed drifts by a fifth within a
   minute, so a baseline measured once, before or after, can be off by that
   much. Every acknowledged id is checked in the database afterwards, with
   the delivery rate to the stand-in and the time to drain what was left;
3. overload: the service with a small write queue under 4x the connections,
   to show 503 + Retry-After at once instead of an unbounded queue;
4. commit-to-delivery latency when idle (bench.delivery's measurement);
5. with --memory-minutes N: the service under full load for N minutes, its
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
import statistics
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


def start_standin(procs: list[subprocess.Popen]) -> str:
    """A stand-in Inngest on a free port, appended to ``procs``; its URL."""
    port = free_port()
    procs.append(start(["-m", "bench.standin", "--port", str(port), "--key", KEY], cwd=HERE.parent))
    wait_for_port("127.0.0.1", port, timeout=30, process=procs[-1])
    return f"http://127.0.0.1:{port}"


def wrk(
    url: str,
    *,
    duration: int,
    connections: int,
    env: dict[str, str],
    script: str = "post.lua",
    threads: int = 2,
) -> Run:
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
        "-s", str(HERE / script), url,
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
    """The process's resident memory and its children's (the SQLite rows process)."""
    total = 0.0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for each in (pid, *map(int, children)):
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


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
    return [line for f in ids_dir.rglob("ids-*.txt") for line in f.read_text().split()]


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
    parser.add_argument("--rounds", type=int, default=4, help="turns of baseline and service")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--memory-minutes", type=float, default=0)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench.load needs wrk: apt-get install wrk")

    work = scratch_dir("bench-load-")
    procs: list[subprocess.Popen] = []
    try:
        inngest = start_standin(procs)
        load = {"duration": args.duration, "connections": args.connections}

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

        # Both up at once, loaded in turns.
        port = free_port()
        procs.append(start(["-m", "bench.bare", "--port", str(port)], cwd=HERE.parent))
        wait_for_port("127.0.0.1", port, timeout=30, process=procs[-1])
        bare_url = f"http://127.0.0.1:{port}/api"
        env = service_env(work, inngest)
        prepare_database(work, env)
        service, url, cookie = start_service(work, inngest)
        procs.append(service)
        ids_dir = work / "ids"
        bare_runs: list[Run] = []
        runs: list[Run] = []
        delivered = 0
        loaded_seconds = 0.0
        accepted_before = stand_in_accepted(inngest)  # the seeds' events are there too
        for turn in range(args.rounds):

            def bare() -> None:
                bare_runs.append(wrk(bare_url, **load, env={}))

            def served(turn: int = turn) -> None:
                nonlocal delivered, loaded_seconds
                round_ids = ids_dir / str(turn)  # wrk names its files by thread: one dir a run
                round_ids.mkdir(parents=True)
                before = stand_in_accepted(inngest)
                started = time.monotonic()
                runs.append(
                    wrk(f"{url}/api", **load, env={"COOKIE": cookie, "IDS_DIR": str(round_ids)})
                )
                loaded_seconds += time.monotonic() - started
                delivered += stand_in_accepted(inngest) - before

            for measure in (bare, served) if turn % 2 == 0 else (served, bare):
                measure()
        ids = acknowledged_ids(ids_dir)
        drain_seconds = wait_delivered(inngest, accepted_before + len(ids))
        rss = rss_mib(service.pid)
        stop(procs.pop())
        stop(procs.pop())
        missing = check_stored(work, ids)
        baseline = combined("baseline", bare_runs)
        run = combined("service", runs)
        ratios = sorted(r.rps / b.rps for r, b in zip(runs, bare_runs, strict=True))

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

    print(
        f"wrk -t2 -c{args.connections} -d{args.duration}s, {args.rounds} rounds of the baseline"
        " and the service in turns, each server one process, 127.0.0.1"
    )
    for turn, (b, r) in enumerate(zip(bare_runs, runs, strict=True), 1):
        print(
            f"  round {turn}: bare {b.rps:6.0f} req/s, service {r.rps:6.0f} req/s"
            f" (p50 {r.p50_ms:5.2f} ms, p99 {r.p99_ms:5.2f} ms): {r.rps / b.rps:6.1%}"
        )
    print(line("baseline: bare aiohttp JSON handler", baseline, baseline))
    print(line("seeds: session + inline POST", seeds, baseline))
    print(
        f"{'inngest-outbox POST /api (durable)':<34} {run.rps:9.0f} req/s  p50 {run.p50_ms:6.2f} ms"
        f"  p99 {run.p99_ms:7.2f} ms  {statistics.median(ratios):6.1%} of baseline"
        f" (median of the rounds; {ratios[0]:.1%} to {ratios[-1]:.1%})"
    )
    print(f"  acknowledged {len(ids)} (wrk counted {sum(r.ok for r in runs)}), "
          f"other answers {run.other}; missing from the database: {missing}")  # fmt: skip
    print(f"  delivered to the stand-in while loaded: {delivered / loaded_seconds:.0f} events/s;"
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


def combined(name: str, runs: list[Run]) -> Run:
    """Several runs as one: mean req/s, median p50, the worst p99, counts summed."""
    return Run(
        name,
        statistics.mean(r.rps for r in runs),
        statistics.median(r.p50_ms for r in runs),
        max(r.p99_ms for r in runs),
        sum(r.ok for r in runs),
        sum(r.refused for r in runs),
        sum(r.other for r in runs),
    )


if __name__ == "__main__":
    main()
