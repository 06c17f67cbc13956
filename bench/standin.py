"""Serve the stand-in Inngest (tests/fakes/inngest.py) on 127.0.0.1 for benchmarks.

python -m bench.standin --port 8288 [--key KEY]
"""

from __future__ import annotations

import argparse

from aiohttp import web

from tests.fakes.inngest import StandIn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8288)
    parser.add_argument("--key", default="bench-event-key")
    args = parser.parse_args()
    # Keep memory flat over long runs: count, do not keep, what was accepted.
    stand_in = StandIn(event_key=args.key, keep_events=False)
    web.run_app(stand_in.app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
