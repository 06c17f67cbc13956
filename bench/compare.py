"""Compare this checkout's POST /api with another checkout's, under the same load.

    git worktree add /tmp/before <commit>
    .venv/bin/python -m bench.compare /tmp/before [--rounds 12] [--duration 3] [--postgres]
        [--relay-events N]

With --postgres, both run on one durable PostgreSQL (a database each). With
--relay-events N, the load is the relay's instead of POST /api's (POST
/e/{key}, N events a request, a key made by `keys add` in each checkout),
against a bare handler taking the same body.

On a shared machine the speed of one run drifts by a third within minutes (the
bare handler alone measured 11,853 to 18,779 req/s in one afternoon), so two
bench.load runs cannot tell a 10 % change from the noise. Here both services
and a bare aiohttp handler are up at once, each with its own database and a
stand-in Inngest, and short wrk runs take turns between them, round after
round (the order reversed every other round). A change is judged by the median
over rounds of the ratio of the two services' req/s in the same round.

Rounds still scatter: in one 30-round comparison (2026-11-23) the middle half
of the rounds' ratios lay between 0.988 and 1.095 around a median of 1.046.
For a change of a few per cent use 30 rounds or more, and look at how many
rounds went each way.

With --postgres, both services run on one durable PostgreSQL started for the
run (fsync and synchronous_commit on), each on a database of its own, each with
its in-process worker.

Prints each server's median req/s and p99, and the ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

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
from tests.support.postgres import start_postgres


def start_checkout(
    root: Path, inngest: str, procs: list, database: dict[str, str], relay: bool
) -> tuple[str, dict]:
    """``inngest-outbox serve`` from the checkout at ``root``; the URL to load
    and wrk's environment (a session cookie, or none for a relay key's URL).
    ``database``: DATABASE_URL, or nothing for a SQLite file of its own."""
    work = scratch_dir("bench-compare-")
    env = service_env(work, inngest, PYTHONPATH=str(root), **database)
    prepare_database(work, env)
    key = ""
    if relay:
        added = subprocess.run(
            [sys.executable, "-m", "service", "keys", "add", "bench"],
            cwd=work, env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        key = added.stdout.strip().splitlines()[-1]
    port = free_port()
    env = service_env(work, inngest, PORT=str(port), PYTHONPATH=str(root), **database)
    procs.append(start(["-m", "service", "serve", "--dev"], cwd=work, env=env))
    wait_for_port("127.0.0.1", port, timeout=60, process=procs[-1])
    url = f"http://127.0.0.1:{port}"
    if relay:
        return f"{url}/e/{key}", {}
    _, cookie = http_json(f"{url}/auth/login", {"username": "bench", "password": PASSWORD})
    return f"{url}/api", {"COOKIE": cookie}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other checkout (git worktree add ...)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk's threads")
    parser.add_argument("--postgres", action="store_true", help="both on a durable PostgreSQL")
    parser.add_argument(
        "--relay-events", type=int, default=0, help="load POST /e/{key} with this many events"
    )
    args = parser.parse_args()
    relay = args.relay_events > 0
    if not (args.other / "service").is_dir():
        sys.exit(f"{args.other} is not a checkout of inngest-outbox")

    procs: list = []
    results: dict[str, list[Run]] = {"this": [], "other": [], "bare": []}
    server = start_postgres(durable=True) if args.postgres else None

    def database() -> dict[str, str]:
        return {"DATABASE_URL": server.create_database()} if server is not None else {}

    try:
        inngest = start_standin(procs)
        targets = {
            "this": start_checkout(HERE.parent, inngest, procs, database(), relay),
            "other": start_checkout(args.other.resolve(), inngest, procs, database(), relay),
        }
        bare_port = free_port()
        procs.append(start(["-m", "bench.bare", "--port", str(bare_port)], cwd=HERE.parent))
        wait_for_port("127.0.0.1", bare_port, timeout=30, process=procs[-1])
        targets["bare"] = (f"http://127.0.0.1:{bare_port}/api", {})
        load: dict = {
            "duration": args.duration,
            "connections": args.connections,
            "threads": args.threads,
        }
        if relay:
            load["script"] = "relay.lua"
        for i in range(args.rounds):
            order = list(targets) if i % 2 == 0 else list(reversed(targets))
            for name in order:
                url, extra = targets[name]
                if relay:
                    extra = {**extra, "EVENTS": str(args.relay_events)}
                results[name].append(wrk(url, **load, env=extra))
            print(
                f"  round {i + 1}: "
                + "  ".join(f"{name} {results[name][-1].rps:.0f}" for name in targets),
                flush=True,
            )
    finally:
        for proc in procs:
            stop(proc)
        if server is not None:
            server.stop()

    def ratios(a: str, b: str) -> list[float]:
        return [x.rps / y.rps for x, y in zip(results[a], results[b], strict=True)]

    def paired(a: str, b: str) -> float:
        return statistics.median(ratios(a, b))

    what = f"POST /e/{{key}} of {args.relay_events} events" if relay else "POST /api"
    on = "a durable PostgreSQL" if args.postgres else "SQLite"
    print(
        f"{what}: wrk -t{args.threads} -c{args.connections}, {args.rounds} rounds of"
        f" {args.duration} s each, on {on}"
    )
    for name, label in (("this", "this checkout"), ("other", str(args.other)), ("bare", "bare")):
        runs = results[name]
        print(
            f"{label:40} median {statistics.median(r.rps for r in runs):7.0f} req/s"
            f"  p99 {statistics.median(r.p99_ms for r in runs):6.2f} ms"
        )
    print(f"this / other, median of the rounds' ratios: {paired('this', 'other'):.3f}")
    this_other = ratios("this", "other")
    if len(this_other) >= 2:
        # How far one comparison can be trusted: the spread of the rounds, and
        # how many went each way (by chance, about half of them would).
        low, _, high = statistics.quantiles(this_other, n=4)
        faster = sum(ratio > 1 for ratio in this_other)
        print(
            f"  rounds' ratios: quartiles {low:.3f} to {high:.3f}; "
            f"this faster in {faster} of {len(this_other)} rounds"
        )
    print(
        f"this / bare:  {paired('this', 'bare'):.1%}   other / bare: {paired('other', 'bare'):.1%}"
    )


if __name__ == "__main__":
    main()
