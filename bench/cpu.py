"""Where a server's threads spend a run: busy, waiting for a core, or blocked.

    .venv/bin/python -m bench.cpu [--server service|bare] [--duration 16]

Starts the server (the service on SQLite with a stand-in Inngest, or the bare
aiohttp handler), loads it with wrk (64 connections) and reads, for its
threads and its children's over 10 s in the middle of the run, how much of
the time each was running and waiting on a run queue (/proc/.../schedstat):
the rest it was blocked (epoll with nothing to do, or a lock such as the GIL).
The stand-in Inngest's and wrk's threads are shown too: on 2 cores whatever
they run is taken from the server.
An event loop thread running less than 100 % of the time is not what limits
throughput on its own. Prints req/s and the loop's CPU per request.

Measured, not asserted: run the two servers back to back and compare.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path

from bench.load import (
    HERE,
    Run,
    free_port,
    prepare_database,
    scratch_dir,
    service_env,
    start,
    start_service,
    start_standin,
    stop,
    wait_for_port,
    wrk,
)

SAMPLE_SECONDS = 10.0


def threads_of(pid: int) -> dict[str, tuple[str, int, int]]:
    """Every thread of ``pid`` and of its children: (name, ns running, ns waiting for a core)."""
    found: dict[str, tuple[str, int, int]] = {}
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for each in (str(pid), *children):
        for task in Path(f"/proc/{each}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                running, waiting, _ = map(int, (task / "schedstat").read_text().split())
            except OSError:
                continue  # ended meanwhile
            found[f"{each}/{task.name}"] = (name, running, waiting)
    return found


def load_generators() -> list[int]:
    """This process's wrk children: they share the cores with the server."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "comm").read_text().strip() == "wrk":
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


def sample(server: int, others: list[int]) -> dict[str, tuple[str, int, int]]:
    """The server's threads and children, and the other processes' threads."""
    found = threads_of(server)
    for pid in others:
        with contextlib.suppress(OSError):
            for key, (name, running, waiting) in threads_of(pid).items():
                found[key] = (f"{name} (not the server)", running, waiting)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=["service", "bare"], default="service")
    parser.add_argument("--duration", type=int, default=16, help="seconds of wrk")
    args = parser.parse_args()
    work = scratch_dir("bench-cpu-")
    procs: list[subprocess.Popen] = []
    try:
        inngest = start_standin(procs)
        if args.server == "service":
            prepare_database(work, service_env(work, inngest))
            server, url, cookie = start_service(work, inngest)
            env = {"COOKIE": cookie}
        else:
            port = free_port()
            server = start(["-m", "bench.bare", "--port", str(port)], cwd=HERE.parent)
            wait_for_port("127.0.0.1", port, timeout=30, process=server)
            url, env = f"http://127.0.0.1:{port}", {}
        procs.append(server)
        result: list[Run] = []
        load = threading.Thread(
            target=lambda: result.append(
                wrk(f"{url}/api", duration=args.duration, connections=64, env=env)
            )
        )
        load.start()
        time.sleep((args.duration - SAMPLE_SECONDS) / 2)  # past the start of the load
        others = [procs[0].pid, *load_generators()]  # the stand-in Inngest, wrk
        before = sample(server.pid, others)
        time.sleep(SAMPLE_SECONDS)
        after = sample(server.pid, others)
        load.join()
    finally:
        for proc in reversed(procs):
            stop(proc)
    run = result[0]
    print(f"{args.server}: {run.rps:.0f} req/s, p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms")
    loop_key = f"{server.pid}/{server.pid}"
    for key, (name, running, waiting) in after.items():
        if key not in before:
            continue
        busy = (running - before[key][1]) / 1e9 / SAMPLE_SECONDS
        queued = (waiting - before[key][2]) / 1e9 / SAMPLE_SECONDS
        if busy < 0.005:
            continue
        owner = key.split("/")[0]
        if key == loop_key:
            role = "event loop"
        elif name.endswith("(not the server)"):
            role = f"{key} {name.removesuffix(' (not the server)')[:8]} (other)"
        elif owner != str(server.pid):
            role = f"child {owner} ({name})"
        else:
            role = f"thread {key.split('/')[1]}"  # Python 3.11 names no OS thread
        print(f"  {role:<26} running {busy:5.1%}, waiting for a core {queued:5.1%}")
        if key == loop_key:
            print(f"  {'':<26} {busy / run.rps * 1e6:.0f} us of loop CPU a request")


if __name__ == "__main__":
    main()
