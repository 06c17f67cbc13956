"""The relay (POST /e/{key}) under load, against a bare handler and POST /api in the same run.

    .venv/bin/python -m bench.relay [--rounds 3] [--duration 5] [--connections 64]

One stand-in Inngest, one `serve --dev` on a fresh SQLite file (the worker
delivering), a relay key made as an operator would (`keys add`), and a bare
aiohttp handler that parses the same JSON. wrk takes turns between them round
after round (the order reversed every other round), with requests of 1 event
and of 100 events; each row prints the median over rounds. At the end, every
event the relay acknowledged is counted in the database.

Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import subprocess
import sys

from bench.load import (
    HERE,
    PASSWORD,
    Run,
    free_port,
    http_json,
    prepare_database,
    scratch_dir,
    service_env,
    start,
    start_standin,
    stop,
    wait_for_port,
    wrk,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()

    procs: list = []
    work = scratch_dir("bench-relay-")
    results: dict[str, list[Run]] = {}
    try:
        inngest = start_standin(procs)
        env = service_env(work, inngest)
        prepare_database(work, env)
        added = subprocess.run(
            [sys.executable, "-m", "service", "keys", "add", "bench"],
            cwd=work, env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        key = added.stdout.strip().splitlines()[-1]
        port = free_port()
        procs.append(
            start(["-m", "service", "serve", "--dev"], cwd=work, env={**env, "PORT": str(port)})
        )
        wait_for_port("127.0.0.1", port, timeout=60, process=procs[-1])
        url = f"http://127.0.0.1:{port}"
        _, cookie = http_json(f"{url}/auth/login", {"username": "bench", "password": PASSWORD})
        bare_port = free_port()
        procs.append(start(["-m", "bench.bare", "--port", str(bare_port)], cwd=HERE.parent))
        wait_for_port("127.0.0.1", bare_port, timeout=30, process=procs[-1])
        bare = f"http://127.0.0.1:{bare_port}/api"
        targets = {
            "bare, 1 event": (bare, "relay.lua", {"EVENTS": "1"}),
            "relay, 1 event": (f"{url}/e/{key}", "relay.lua", {"EVENTS": "1"}),
            "POST /api": (f"{url}/api", "post.lua", {"COOKIE": cookie}),
            "bare, 100 events": (bare, "relay.lua", {"EVENTS": "100"}),
            "relay, 100 events": (f"{url}/e/{key}", "relay.lua", {"EVENTS": "100"}),
        }
        results = {name: [] for name in targets}
        for i in range(args.rounds):
            order = list(targets) if i % 2 == 0 else list(reversed(targets))
            for name in order:
                target, script, extra = targets[name]
                results[name].append(
                    wrk(
                        target,
                        duration=args.duration,
                        connections=args.connections,
                        env=extra,
                        script=script,
                    )
                )
            print(
                f"  round {i + 1}: "
                + "  ".join(f"{name} {results[name][-1].rps:.0f}" for name in targets),
                flush=True,
            )
    finally:
        for proc in procs:
            stop(proc)

    def median(name: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in results[name])

    print(f"wrk -t2 -c{args.connections}, {args.rounds} rounds of {args.duration} s each (medians)")
    for name in results:
        events = 100 if "100" in name else 1
        others = sum(r.refused + r.other for r in results[name])
        print(
            f"{name:20} {median(name, 'rps'):8.0f} req/s {median(name, 'rps') * events:9.0f} events/s"
            f"  p99 {median(name, 'p99_ms'):6.2f} ms  not 200: {others}"
        )
    print(
        f"relay 1 event / bare: {median('relay, 1 event', 'rps') / median('bare, 1 event', 'rps'):.1%}"
        f"   relay 1 event / POST /api: {median('relay, 1 event', 'rps') / median('POST /api', 'rps'):.2f}"
        f"   relay 100 events / bare: {median('relay, 100 events', 'rps') / median('bare, 100 events', 'rps'):.1%}"
    )
    acknowledged = sum(
        r.ok * (100 if "100" in name else 1)
        for name in results
        if name.startswith("relay")
        for r in results[name]
    )
    with sqlite3.connect(work / "service.db") as conn:
        (stored,) = conn.execute("SELECT count(*) FROM outbox WHERE origin = 'bench'").fetchone()
    print(f"relay events acknowledged {acknowledged}, stored {stored}")


if __name__ == "__main__":
    main()
