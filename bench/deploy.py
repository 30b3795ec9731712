"""Deploys: ``git push`` → the new release serving, for the sample app, warm caches (issue 7).

Usage::

    .venv/bin/python bench/deploy.py [--rounds 5] [--base-from /var/cache/keg/test-debian-oci]
                                     [--tmp DIR] [--out bench/out/deploy.json] [--check]

Goal (issue 7): push → new release serving in at most 10 s, and at most 1.5×
the build step, measured in the same run.

It starts ``keg up`` (master, Mayor with runc, builder, scheduler, router) in a
fresh temporary directory with the Debian base image imported from an OCI
layout, imports the example's wheel into ``/pkgs/pypi`` and pushes the
example app (examples/python-web) once: release 1 warms what a later deploy
reuses (the base layers unpacked by the Mayor, the builder's source cache).
Then each round changes ``MESSAGE`` in ``app.py`` (a new tree, so a real
build, never a cache hit), commits, and times from the start of ``git push``
until the router answers ``Host: hello.keg.localhost`` with the new message
(polled every 20 ms). Also per round:

- push: the ``git push`` command's own duration (the hook ends it after
  ``Released vN``, and, where it waits for the release to serve, after
  ``vN is serving``); its output lines are stamped as they arrive;
- build: ``seconds`` of ``/builds/hello/<source KID>/result.json`` (the
  builder's whole build: checkout, the container, writing the image), with
  ``build_seconds`` (``builders.build.build``: mounts, container, image) and
  the container alone (its ``Build finished in X s`` log line);
- a breakdown from a watch on ``/`` opened by this process: each event is
  stamped with this process's clock when it arrives, and the content of the
  paths that matter (the new process's status, ``/services/hello.tsv``) is
  read at that event's revision afterwards, so the stamps cost the cluster
  nothing while the round runs.

By default the whole bench (``keg up``, git, the HTTP polls) runs in a
network namespace of its own with only loopback (``unshare --net``;
``--host-network`` to not): replicas use ``network: host`` and the scheduler
hands out ports from 20000 on each machine without asking the host, so any
other process on the machine listening there (another ``keg up``, a test's
leftover container) would make the new replica crash-loop with "Address
already in use" and the round never end. Loopback in a namespace costs the
same as on the host.

The anchor is the build step in the same round: the ratio is total / build.
``keg up`` is stopped with SIGINT at the end, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from conftest import http_get as get, wait_until  # noqa: E402
from keg_up import Up, commit, git  # noqa: E402
from master.client import RemoteKeg  # noqa: E402

EXAMPLE = os.path.join(REPO, "examples", "python-web")
WHEEL = os.path.join(REPO, "examples", "packages", "keg_greeting-1.0-py3-none-any.whl")
BASE_LAYOUT = "/var/cache/keg/test-debian-oci"
APP = "hello"
DOMAIN = "keg.localhost"
POLL = 0.02
GOAL_SECONDS = 10.0
GOAL_RATIO = 1.5
ROUND_TIMEOUT = 180.0
NETNS_MARK = "BENCH_DEPLOY_NETNS"


# ---------------------------------------------------------------- helpers

def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("KEG_", "GIT_"))}


def percentile(values: list, q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


# ---------------------------------------------------------------- the watch

class Stamps:
    """Every event under ``/`` from revision ``since`` on, stamped with ``time.monotonic()`` on arrival."""

    def __init__(self, url: str, token: str, since: int):
        self.keg = RemoteKeg(url, token, timeout=30.0)
        self.events = []          # (monotonic, Event)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(since,), daemon=True)
        self.thread.start()

    def _run(self, since: int) -> None:
        last = since
        while not self.stop.is_set():     # the watch returns after 1 s without events: resume it
            for event in self.keg.watch("/", since=last, timeout=1.0):
                now = time.monotonic()
                with self.lock:
                    self.events.append((now, event))
                last = event.revision
                if self.stop.is_set():
                    return

    def between(self, t0: float, t1: float) -> list:
        with self.lock:
            return [(t, e) for t, e in self.events if t0 <= t <= t1]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=20)


def first(events: list, predicate):
    for t, e in events:
        if predicate(e):
            return t, e
    return None, None


def breakdown(reader: RemoteKeg, events: list, source_kid: str, release: int) -> dict:
    """Monotonic stamps of the milestones of one deploy, from the watch events of its round."""
    base = f"/builds/{APP}/{source_kid}"
    marks = {}
    marks["source"], _ = first(events, lambda e: e.path == f"/src/{APP}" and e.new_kid == source_kid)
    marks["claimed"], _ = first(events, lambda e: e.path == base + "/builder.json")
    marks["image"], _ = first(events, lambda e: e.path.startswith(f"/oci-images/{APP}/{source_kid}/"))
    marks["released"], _ = first(events, lambda e: e.path == base + "/result.json")
    # the scheduler's placement: a process spec of this release under /machines/*/procs/
    proc = None
    for t, e in events:
        if "/procs/" in e.path and e.path.startswith("/machines/") and e.new_kid and e.old_kid is None:
            try:
                spec = json.loads(reader.read(e.path, rev=e.revision))
            except Exception:  # noqa: BLE001 - a spec replaced meanwhile: not this one
                continue
            if spec.get("release") == release and spec.get("app", APP) == APP:
                marks["scheduled"], proc = t, e.path
                break
    if proc is not None:
        status_path = proc.replace("/procs/", "/status/")
        for t, e in events:
            if e.path != status_path or not e.new_kid:
                continue
            try:
                status = json.loads(reader.read(e.path, rev=e.revision))
            except Exception:  # noqa: BLE001
                continue
            state, health = status.get("state"), status.get("health")
            marks.setdefault("status_first", t)
            if state == "running":
                marks.setdefault("running", t)
            if state == "running" and health in ("healthy", None):
                marks.setdefault("healthy", t)
        for t, e in events:
            if e.path != f"/services/{APP}.tsv" or not e.new_kid:
                continue
            table = reader.read(e.path, rev=e.revision).decode()
            for line in table.splitlines():
                fields = line.split("\t")
                if line.startswith("#") or len(fields) < 7:
                    continue
                if fields[6] == str(release) and fields[4] == "healthy":
                    marks.setdefault("service", t)
    marks["proc"] = proc
    return marks


# ---------------------------------------------------------------- one deploy

def deploy_round(up: Up, reader: RemoteKeg, stamps: Stamps, repo: str, number: int, tag: str) -> dict:
    app_py = os.path.join(repo, "app.py")
    with open(app_py) as f:
        text = f.read()
    message = f"bench round {number} {tag}"
    text = re.sub(r'^MESSAGE = ".*"$', f'MESSAGE = "{message}"', text, count=1, flags=re.M)
    with open(app_py, "w") as f:
        f.write(text)
    head = commit(repo, f"round {number}")
    source_kid = "K-" + head
    want = f"Hello, Keg! This is {message}.\n"
    host = f"{APP}.{DOMAIN}"
    load = os.getloadavg()[0]

    env = dict(clean_env(), GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1")
    lines = []    # (monotonic, line) of the push's output as it arrives

    def read_output(stream):
        for raw in iter(stream.readline, b""):
            lines.append((time.monotonic(), raw.decode(errors="replace")))

    t0 = time.monotonic()
    push = subprocess.Popen(["git", "push", "keg", "main"], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    reader_thread = threading.Thread(target=read_output, args=(push.stdout,), daemon=True)
    reader_thread.start()
    push_end = served = None
    deadline = t0 + ROUND_TIMEOUT
    while served is None:
        if push_end is None and push.poll() is not None:
            push_end = time.monotonic()
            if push.returncode != 0:
                reader_thread.join(timeout=5)
                raise RuntimeError(f"round {number}: git push failed:\n{''.join(x for _, x in lines)}")
        if get(up.router_port, host)[1] == want:
            served = time.monotonic()
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"round {number}: the new release did not answer in {ROUND_TIMEOUT:g} s\n"
                               + up.logs())
        time.sleep(POLL)
    if push_end is None:
        push.wait(timeout=ROUND_TIMEOUT)
        push_end = time.monotonic()
    reader_thread.join(timeout=5)
    push.stdout.close()
    if push.returncode != 0:
        raise RuntimeError(f"round {number}: git push failed:\n{''.join(x for _, x in lines)}")
    said = {}
    for t, line in lines:
        for key, text in (("hook_started", "-----> Receiving"), ("hook_source", "       source K-"),
                          ("line_released", "-----> Released v"), ("line_serving", " is serving")):
            if text in line:
                said.setdefault(key, t)

    result = json.loads(reader.read(f"/builds/{APP}/{source_kid}/result.json"))
    if result.get("cached") or not result.get("ok"):
        raise RuntimeError(f"round {number}: not a successful new build: {result}")
    log = reader.read(f"/builds/{APP}/{source_kid}/log.txt").decode(errors="replace")
    found = re.search(r"Build finished in ([0-9.]+) s", log)
    time.sleep(0.3)   # let the watch deliver the last events of the round
    marks = breakdown(reader, stamps.between(t0, served + 0.2), source_kid, result["release"])
    marks.update(said)
    rel = lambda t: None if t is None else round(t - t0, 3)  # noqa: E731
    record = {
        "round": number, "source": source_kid, "release": result["release"], "load1": round(load, 2),
        "total": round(served - t0, 3), "push": round(push_end - t0, 3),
        "build": result["seconds"], "build_seconds": result.get("build_seconds"),
        "checkout_seconds": result.get("checkout_seconds"),
        "container": float(found.group(1)) if found else None,
        "marks": {k: rel(v) for k, v in marks.items() if k != "proc"}, "proc": marks.get("proc"),
    }
    record["ratio"] = round(record["total"] / record["build"], 3)
    record["t0"] = t0
    return record


def settle(reader: RemoteKeg, timeout: float = 120.0) -> float:
    """Wait until the machine runs one replica of the app again (the old one stopped); returns when."""
    def one() -> bool:
        procs = [e.name for e in reader.list("/machines/local/procs") if e.name.startswith(APP + "-")]
        status = [e.name for e in reader.list("/machines/local/status") if e.name.startswith(APP + "-")]
        return len(procs) == 1 and len(status) == 1
    wait_until(one, "the old replica to stop", timeout)
    return time.monotonic()


# ---------------------------------------------------------------- report

STAGES = [  # (label, from mark, to mark)
    ("push→hook runs", None, "hook_started"),
    ("hook runs→source", "hook_started", "source"),
    ("source→claimed", "source", "claimed"),
    ("claimed→released", "claimed", "released"),
    ("released→scheduled", "released", "scheduled"),
    ("scheduled→running", "scheduled", "running"),
    ("running→healthy", "running", "healthy"),
    ("healthy→in service", "healthy", "service"),
    ("in service→routed", "service", "served"),
]


def stage_values(record: dict) -> dict:
    marks = dict(record["marks"], served=record["total"])
    out = {}
    for label, a, b in STAGES:
        start = 0.0 if a is None else marks.get(a)
        end = marks.get(b)
        out[label] = None if start is None or end is None else round(end - start, 3)
    return out


def summarize(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{statistics.median(values):.2f} / {percentile(values, 90):.2f}"


def report(records: list, meta: dict) -> dict:
    print(f"\nkeg up at {meta['commit']} ({meta['dirty']}), {meta['nproc']} CPUs, "
          f"load average at start {meta['load_start']}, at end {meta['load_end']}")
    print(f"release 1 (cold): push {meta['first_push']:.2f} s, serving after {meta['first_total']:.2f} s, "
          f"build {meta['first_build']:.2f} s\n")
    header = ("round", "total s", "push s", "build s", "in build.build s", "container s", "total/build", "load1")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in records:
        print(" | ".join(str(x) for x in (r["round"], f"{r['total']:.2f}", f"{r['push']:.2f}", f"{r['build']:.2f}",
                                           f"{r['build_seconds']:.2f}" if r["build_seconds"] else "–",
                                           f"{r['container']:.1f}" if r["container"] else "–",
                                           f"{r['ratio']:.2f}", r["load1"])))
    keys = ("total", "push", "build", "build_seconds", "container", "ratio")
    summary = {k: {"median": statistics.median([r[k] for r in records if r[k] is not None]),
                   "p90": percentile([r[k] for r in records if r[k] is not None], 90)} for k in keys}
    print("median | " + " | ".join(f"{summary[k]['median']:.2f}" for k in keys))
    print("p90 | " + " | ".join(f"{summary[k]['p90']:.2f}" for k in keys))

    print("\nwhere the time goes (seconds, median / p90 over the rounds):")
    stages = {label: [stage_values(r)[label] for r in records] for label, _, _ in STAGES}
    for label, values in stages.items():
        print(f"  {label:22s} {summarize(values)}    rounds: "
              + ", ".join("–" if v is None else f"{v:.2f}" for v in values))
    for label, a, b in (("released→push says so", "released", "line_released"),
                        ("served→push says so", "served", "line_serving"),
                        ("push says so→push ends", "line_released", "push")):
        values = []
        for r in records:
            marks = dict(r["marks"], push=r["push"], served=r["total"])
            values.append(None if marks.get(a) is None or marks.get(b) is None else round(marks[b] - marks[a], 3))
        print(f"  {label:22s} {summarize(values)}    rounds: "
              + ", ".join("–" if v is None else f"{v:.2f}" for v in values))
    gone = [r.get("old_gone") for r in records]
    if any(v is not None for v in gone):
        print(f"  {'push → old replica gone':22s} {summarize(gone)}")
    total, ratio = summary["total"]["median"], summary["ratio"]["median"]
    met_total, met_ratio = summary["total"]["p90"] <= GOAL_SECONDS, ratio <= GOAL_RATIO
    print(f"\ngoal total ≤ {GOAL_SECONDS:g} s: median {total:.2f} s, p90 {summary['total']['p90']:.2f} s → "
          f"{'met' if met_total else 'MISSED'}")
    print(f"goal total/build ≤ {GOAL_RATIO:g}: median {ratio:.2f} → {'met' if met_ratio else 'MISSED'}")
    return {"summary": summary, "stages": {k: v for k, v in stages.items()}, "met": met_total and met_ratio}


# ---------------------------------------------------------------- main

def _interrupt(signum, frame):
    raise KeyboardInterrupt   # SIGTERM stops the bench as Ctrl-C does: keg up is stopped on the way out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--base-from", default=BASE_LAYOUT, help="OCI layout of the Debian base image")
    parser.add_argument("--tmp", default=None, help="where the temporary keg up data goes")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "out", "deploy.json"))
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--back-to-back", action="store_true",
                        help="start each round 2 s after the last one served, not once its old replica stopped")
    parser.add_argument("--host-network", action="store_true",
                        help="run in this machine's network namespace (default: a private one, see above)")
    args = parser.parse_args()
    if not args.host_network and os.environ.get(NETNS_MARK) != "1":
        # Re-run this script in a new network namespace: unshare execs it in this very process, so
        # signals and the exit code are the bench's own.
        os.environ[NETNS_MARK] = "1"
        os.execvp("unshare", ["unshare", "--net", "--", sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
    if os.environ.get(NETNS_MARK) == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    if not os.path.isdir(args.base_from):
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from conftest import debian_layout
        args.base_from = debian_layout()

    base = tempfile.mkdtemp(prefix="keg-bench-deploy-", dir=args.tmp)
    os.chmod(base, 0o711)   # runc mounts the containers' root filesystems as an unprivileged user
    up = stamps = reader = None
    finished = False
    previous = signal.signal(signal.SIGTERM, _interrupt)
    meta = {"nproc": os.cpu_count(), "load_start": round(os.getloadavg()[0], 2),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True).stdout.strip(),
            "dirty": "uncommitted changes" if subprocess.run(["git", "status", "--porcelain"], cwd=REPO,
                                                             capture_output=True, text=True).stdout.strip()
            else "clean", "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        print(f"starting keg up in {base} …", flush=True)
        up = Up(os.path.join(base, "keg-data"), args.base_from)
        up.keg("pkg", "import", WHEEL)
        repo = os.path.join(base, "hello")
        shutil.copytree(EXAMPLE, repo)
        git(repo, "init", "-q", "-b", "main")
        commit(repo, "first")
        git(repo, "remote", "add", "keg", f"http://admin:{up.token}@127.0.0.1:{up.port}/git/apps/{APP}.git")
        reader = RemoteKeg(up.url, up.token, timeout=30.0)

        print("release 1 (warms the caches) …", flush=True)
        t0 = time.monotonic()
        git(repo, "push", "-q", "keg", "main")
        meta["first_push"] = time.monotonic() - t0
        wait_until(lambda: get(up.router_port, f"{APP}.{DOMAIN}") == (200, "Hello, Keg! This is release one.\n"),
                   "release 1 to answer through the router", timeout=120, log=up.logs)
        meta["first_total"] = time.monotonic() - t0
        first_kid = "K-" + git(repo, "rev-parse", "HEAD").stdout.strip()
        meta["first_build"] = json.loads(reader.read(f"/builds/{APP}/{first_kid}/result.json"))["seconds"]
        time.sleep(2.0)   # let the rolling update settle (the old replica, if any, stops)

        stamps = Stamps(up.url, up.token, reader.revision().number)
        records = []
        tag = f"{int(time.time()) % 100000}"
        for number in range(1, args.rounds + 1):
            record = deploy_round(up, reader, stamps, repo, number, tag)
            records.append(record)
            print(f"round {number}: total {record['total']:.2f} s, push {record['push']:.2f} s, "
                  f"build {record['build']:.2f} s, ratio {record['ratio']:.2f}; marks {record['marks']}",
                  flush=True)
            if args.back_to_back:
                time.sleep(2.0)
            else:
                record["old_gone"] = round(settle(reader) - record["t0"], 3)
        meta["load_end"] = round(os.getloadavg()[0], 2)
        summary = report(records, meta)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rounds": records, **summary}, f, indent=2)
        print(f"\nraw results: {args.out}")
        finished = True
        return 0 if summary["met"] or not args.check else 1
    finally:
        if stamps is not None:
            stamps.close()
        if reader is not None:
            reader.close()
        if up is not None:
            code = up.stop()
            print(f"keg up stopped (exit {code})", file=sys.stderr)
        signal.signal(signal.SIGTERM, previous)
        with open("/proc/self/mounts") as f:
            left = [line.split()[1] for line in f if base in line.split()[1]]
        if left:
            # keg up left containers behind: never remove files under a mounted root filesystem
            print("keg up left mounted root filesystems (and maybe their containers) behind:\n  "
                  + "\n  ".join(left) + f"\nkept {base}; stop them before removing it", file=sys.stderr)
            finished = False
        if finished:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base} for its logs (keg-data/logs/, keg-data/mayor/) after the failure", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
