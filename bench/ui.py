"""The web UI's directory pages: a 10,000-entry directory against a 100-entry one, in one run (issue 9).

Goal: a page of the 10,000-entry directory renders within 3x the time of
the 100-entry directory's page.  Both pages show 100 entries (the default
page size) with their last change; the question is whether the size of
the directory leaks into the time of a page.

It starts a real ``keg master serve`` on 127.0.0.1 (``keg init`` in a
temporary directory), writes ``/d100`` and ``/d10000`` (one transaction
each), then measures ``GET /ui/d100`` and ``GET /ui/d10000`` over one
keep-alive connection, the two interleaved, in three cases:

``steady``    the same page again (the listing is kept: this is paging through, or a refresh);
``changing``  one entry of the directory is rewritten before each page (the listing is brought
              up to date from the change events: this is a live page of a busy directory);
``first``     the first page after the master started: the directory's names are read once
              (its tree, no child looked at), then the page's entries and their last changes.

``first`` is measured on a fresh master per round, so each round's first
pages look back through the history the earlier rounds wrote (the first
round has none: every round's figure is printed too).  A case's figure is
the median over the rounds (of each round's median, for ``steady`` and
``changing``).  Prints a table and writes ``bench/out/ui.json``.

    .venv/bin/python bench/ui.py [--rounds N] [--requests N] [--check]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

GOAL = 3.0
LISTENING = re.compile(r"at http://127\.0\.0\.1:(\d+)")
HERE = os.path.dirname(os.path.abspath(__file__))


def keg_command() -> list:
    """The ``keg`` console script next to this Python."""
    script = os.path.join(os.path.dirname(sys.executable), "keg")
    return [script] if os.path.exists(script) else [shutil.which("keg") or "keg"]


class Master:
    """``keg master serve`` on a free loopback port, over a keg made by ``keg init``."""

    def __init__(self, keg_path: str):
        self.keg_path = keg_path
        self.proc = None
        self.port = None

    def start(self) -> None:
        """Start and wait for the line that names the port."""
        self.proc = subprocess.Popen([*keg_command(), "master", "serve", "--keg", self.keg_path,
                                      "--listen", "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            match = LISTENING.search(line or "")
            if match:
                self.port = int(match.group(1))
                return
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError("keg master serve did not start")

    def stop(self) -> None:
        """SIGTERM, then wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Connection:
    """One keep-alive HTTP connection with the admin token."""

    def __init__(self, port: int, token: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, target: str, body=None) -> tuple:
        """``(status, body bytes)``."""
        self.conn.request(method, target, body=body, headers=self.headers)
        response = self.conn.getresponse()
        return response.status, response.read()

    def timed_get(self, target: str) -> float:
        """Seconds from sending a GET to having read the whole page."""
        start = time.perf_counter()
        status, body = self.call("GET", target)
        elapsed = time.perf_counter() - start
        if status != 200 or b"<table" not in body:
            raise RuntimeError(f"GET {target}: {status} {body[:200]!r}")
        return elapsed

    def close(self) -> None:
        """Drop the connection."""
        self.conn.close()


def fill(conn: Connection, directory: str, count: int) -> None:
    """``count`` small JSON entries under ``directory``, in one transaction."""
    ops = [{"op": "put", "path": f"{directory}/entry-{i:05d}.json", "value": json.dumps({"i": i})}
           for i in range(count)]
    status, body = conn.call("POST", "/v1/tx", json.dumps({"ops": ops}))
    if status != 200:
        raise RuntimeError(f"filling {directory}: {status} {body[:200]!r}")


def measure(conn: Connection, requests: int, change: bool) -> dict:
    """Median page times of /ui/d100 and /ui/d10000, interleaved; ``change`` rewrites an entry before each."""
    times: dict = {"d100": [], "d10000": []}
    for i in range(requests):
        for name in ("d100", "d10000"):
            if change:
                status, _ = conn.call("PUT", f"/v1/keg/{name}/entry-{i % 100:05d}.json", json.dumps({"round": i}))
                assert status == 200
            times[name].append(conn.timed_get(f"/ui/{name}"))
    return {name: statistics.median(values) for name, values in times.items()}


def run(rounds: int, requests: int) -> dict:
    """Every case, ``rounds`` times; the median of the rounds' medians."""
    tmp = tempfile.mkdtemp(prefix="keg-bench-ui-")
    keg_path = os.path.join(tmp, "keg")
    try:
        out = subprocess.run([*keg_command(), "init", "--keg", keg_path], capture_output=True, text=True,
                             check=True).stdout
        token = next(line.split()[2] for line in out.splitlines() if line.startswith("admin token: "))
        setup = Master(keg_path)
        setup.start()
        conn = Connection(setup.port, token)
        fill(conn, "/d100", 100)
        fill(conn, "/d10000", 10_000)
        conn.close()
        setup.stop()
        results: dict = {"steady": [], "changing": [], "first": []}
        for _ in range(rounds):
            master = Master(keg_path)
            master.start()
            conn = Connection(master.port, token)
            try:
                status, _ = conn.call("GET", "/-/jobs")   # the first request of a master pays for its caches
                assert status == 200
                results["first"].append({name: conn.timed_get(f"/ui/{name}") for name in ("d100", "d10000")})
                results["steady"].append(measure(conn, requests, change=False))
                results["changing"].append(measure(conn, requests, change=True))
            finally:
                conn.close()
                master.stop()
        summary = {}
        for case, per_round in results.items():
            small = statistics.median(r["d100"] for r in per_round)
            large = statistics.median(r["d10000"] for r in per_round)
            summary[case] = {"d100_ms": small * 1000, "d10000_ms": large * 1000, "ratio": large / small,
                             "rounds": [{"d100_ms": r["d100"] * 1000, "d10000_ms": r["d10000"] * 1000,
                                         "ratio": r["d10000"] / r["d100"]} for r in per_round]}
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh masters (default 3)")
    parser.add_argument("--requests", type=int, default=50, help="pages of each directory per case and round")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal case misses the goal")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    args = parser.parse_args()
    summary = run(args.rounds, args.requests)
    print(f"{'case':<10} {'100 entries':>12} {'10,000 entries':>15} {'ratio':>7}  goal <= {GOAL:g}x")
    for case, row in summary.items():
        goal = "met" if row["ratio"] <= GOAL else "MISSED"
        print(f"{case:<10} {row['d100_ms']:>10.2f}ms {row['d10000_ms']:>13.2f}ms {row['ratio']:>6.2f}x  {goal}")
    print("first, round by round (100 / 10,000 entries, ratio): " + ", ".join(
        f"{r['d100_ms']:.1f}/{r['d10000_ms']:.1f} ms {r['ratio']:.2f}x" for r in summary["first"]["rounds"]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ui.json"), "w") as f:
        json.dump({"goal_ratio": GOAL, "rounds": args.rounds, "requests": args.requests, "cases": summary}, f,
                  indent=2)
    missed = [c for c in summary if summary[c]["ratio"] > GOAL]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
