"""1,000 Mayors with the no-op runtime on one machine converge on one change (DESIGN §9, issue 6).

Usage::

    .venv/bin/python bench/mayor.py [--machines N] [--quick] [--workers W] [--rounds R] [--no-ticks] [--profile]
    .venv/bin/python bench/mayor.py --acks 30     # the change's commit alone: its acknowledgement, no Mayors

Goal: after one commit that gives every machine a new process spec, all
1,000 Mayors report the new spec running within 2 s of the commit's
acknowledgement.  Figures and method in docs/benchmarks.md, "The Mayor
(issue 6)"; results go to ``bench/out/mayor-converge.json``.

What runs:

- ``keg master serve`` on 127.0.0.1 (``bench/keg_master.py``), durable, its
  defaults.  N machine principals (``/users/mNNNN``, each with its own
  token) are created in one transaction.
- W worker processes (``bench/mayor.py --worker``), each hosting N/W real
  ``mayor.daemon.Mayor`` objects with a ``NoopRuntime``.  Each Mayor has its
  own token, its own keep-alive HTTP connection (its own ``RemoteKeg``), its
  own data directory, and its own watch stream on ``/machines/<name>`` with
  the parameters ``Mayor.run`` uses.  Each is driven as ``Mayor.run`` drives
  it, through the unchanged ``register()``, ``step()`` and ``tick()``:
  register, step once, then step when its watch shows a change under its
  ``procs/`` (or exec requests), again at once after a step that only asked
  a process to stop (the replacement starts on its exit), and tick every
  ``TICK_SECONDS`` between steps (status and the 10 s heartbeat are
  published from there).  What the
  instances of one worker share: the process, and so one CPU at a time: the
  worker's single asyncio loop reads all its watch streams and runs the steps
  and ticks of its Mayors one after the other (a step is blocking HTTP, as in
  the daemon), so at most W Mayors talk to the master at once.  Left out:
  ``Mayor.run``'s 30 s resync and back-off wake-ups, which never come due
  inside a round.  ``--no-ticks`` leaves the ticks out too.
- The observer, in this process: one watch stream on ``/machines`` as the
  admin, timestamps every ``status/web.json`` event as its bytes come off the
  socket.  After every machine has reported, the status values are read (once
  per distinct KID, at the revision of the event) to check that they say
  ``running`` with the new spec's KID; a machine converged at the first such
  event.
- One round: settle (``sync``, a pause), then one ``POST /v1/tx`` putting
  ``/machines/<n>/procs/web.json`` (the same new spec) for all N machines.
  Per-machine latency is from the answer to that request (the commit's
  acknowledgement) to the observer receiving the machine's converged status;
  the total is the largest.  Round 0 (nothing running yet → web started
  everywhere) is reported apart; the goal is judged on the median total of
  the following rounds (each replaces the running web with a new spec:
  stop, remove, start).
- CPU: user + system time from ``/proc/PID/stat`` of the master, of all
  workers and of this process over each round, up to the moment every
  machine has reported (before the observer reads any value); "others" is
  the rest of the machine's busy time (``/proc/stat``) meanwhile: other
  programs and kernel threads, so a disturbed round shows.
- Idle: after the rounds, ``--idle`` seconds with nothing changing: the
  master's CPU while the Mayors only tick (heartbeats every 10 s each).

With ``--profile`` the master and the first worker run under cProfile (the
whole run: set-up and rounds; the worker's profile counts CPU time, not wall
time) and the master's top functions are printed; the raw stats go to
``bench/out/mayor-master.pstats`` and ``mayor-worker.pstats``.

With ``--acks N`` no Mayor runs: one watch stream per ``/machines/<n>`` is
opened (as the Mayors watch) and the change's transaction is sent N times,
each timed from request to answer, the next once every stream has its
event; results go to ``bench/out/mayor-acks.json``.  This is the figure a
change to how watchers are told must not make worse.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter

from keg import paths
from keg_master import KegMasterServer, cpu_seconds
from http_load import HttpConnection, LoadError, connect, raise_open_files
from measure import Report, environment, median, summarize

HERE = os.path.dirname(os.path.abspath(__file__))
# This file is bench/mayor.py and the package it measures is ``mayor``: once the benchmark's helpers
# above are imported, take bench/ off the path so that ``import mayor.daemon`` finds the package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

GOAL_SECONDS = 2.0
CONVERGE_TIMEOUT = 120.0
READY_TIMEOUT = 600.0
SETTLE_SECONDS = 0.5
IDLE_SETTLE = 2.0
IDLE_SECONDS = 11.0       # longer than the Mayors' 10 s heartbeat: each publishes about one
CONNECT_BATCH = 50
WATCH_HEARTBEAT = 15.0    # what Mayor.run asks for: RemoteKeg.watch(timeout=RESYNC_SECONDS) → min(15, 30 / 2)
PROCESS = "web"


def machine_name(i: int) -> str:
    """The name of machine ``i``."""
    return f"m{i:04d}"


def spec(generation: int) -> str:
    """The process spec of round ``generation``: the same for every machine, new each round."""
    return json.dumps({"image": "K-" + "0" * 39 + "1", "args": ["serve", "--generation", str(generation)],
                       "env": {}, "restart": "always", "resources": {"cpu": 0.1, "memory": 64 << 20}},
                      sort_keys=True) + "\n"


def request_bytes(method: str, target: str, token: str, body: bytes = b"") -> bytes:
    """One HTTP/1.1 request to the master."""
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
    if body or method in ("POST", "PUT"):
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


def watch_target(prefix: str) -> str:
    """The watch request ``RemoteKeg.watch`` sends (NDJSON, from the head, the Mayor's heartbeat)."""
    return "/v1/watch?" + urllib.parse.urlencode({"prefix": prefix, "format": "ndjson",
                                                  "heartbeat": WATCH_HEARTBEAT})


async def open_watch(port: int, prefix: str, token: str, on_line) -> HttpConnection:
    """A watch stream as ``RemoteKeg.watch`` opens it; returns once the master answered 200.

    Raises:
        LoadError: the master refused it.
    """
    conn = await connect(port)
    headers = asyncio.get_running_loop().create_future()

    def on_headers(status, received):
        if not headers.done():
            headers.set_result(status)

    conn.stream(request_bytes("GET", watch_target(prefix), token), on_line, on_headers)
    status = await headers
    if status != 200:
        conn.close()
        raise LoadError(f"the watch of {prefix} answered {status}")
    return conn


def change_request(names: list, generation: int, token: str) -> bytes:
    """The round's ``POST /v1/tx``: the spec of ``generation`` put for every machine."""
    body = json.dumps({"ops": [{"op": "put", "path": f"/machines/{n}/procs/{PROCESS}.json", "value": spec(generation)}
                               for n in names]}).encode()
    return request_bytes("POST", "/v1/tx", token, body)


# ====================================================================== worker

def _counting_keg_class():
    from master.client import RemoteKeg

    class CountingKeg(RemoteKeg):
        """A ``RemoteKeg`` that counts its requests and their wall time (the benchmark's bookkeeping)."""

        def __init__(self, url, token, stats: dict, timeout=60.0):
            super().__init__(url, token, timeout)
            self.stats = stats

        def request(self, method, target, body=None, headers=None, ok=(200, 201)):
            start = time.perf_counter()
            try:
                return super().request(method, target, body, headers, ok)
            finally:
                kind = f"{method} {target.split('?')[0].split('/')[2]}"   # "GET keg", "POST tx", …
                self.stats["requests"][kind] += 1
                self.stats["request_seconds"][kind] += time.perf_counter() - start

    return CountingKeg


class Worker:
    """Many real Mayors in one process, each driven as ``Mayor.run`` drives it, all on one loop.

    ``Mayor.run`` (mayor/daemon.py) has a thread follow ``/machines/<name>``
    (``Mayor._watch``): an event under ``procs/`` marks the table to be read
    again, one under ``exec/`` the exec requests, and either wakes the loop,
    which steps; a step that only asked a process to stop sets
    ``Mayor.changed``, and ``run`` steps again at once (the replacement starts
    on the exit, which the no-op runtime reports at once); between steps the
    loop calls ``tick()`` every ``TICK_SECONDS`` while a process runs
    (``HEARTBEAT_SECONDS / 2`` when idle), which publishes changed status and
    the heartbeat.  This plays both parts for each Mayor, with one watch
    connection each and the same marks (``_watching``, ``_table_dirty``,
    ``_exec_dirty``, ``changed``, set and cleared as ``run`` and ``_watch``
    do); steps and ticks of the Mayors of one worker take turns.  Left out:
    the ``RESYNC_SECONDS`` (30 s) re-read and back-off wake-ups, which do not
    come due inside a round.
    """

    def __init__(self, config: dict, proto):
        from mayor import daemon
        from mayor.runtime import NoopRuntime
        self.config = config
        self.proto = proto
        self.ticks = config.get("ticks", True)
        self.tick_seconds = getattr(daemon, "TICK_SECONDS", 0.5)
        self.idle_tick_seconds = getattr(daemon, "HEARTBEAT_SECONDS", 10.0) / 2
        self.port = int(config["url"].rsplit(":", 1)[1])
        self.stats = {"requests": Counter(), "request_seconds": Counter(), "steps": 0, "step_seconds": 0.0,
                      "step_cpu": 0.0, "ticks": 0, "tick_seconds": 0.0, "tick_cpu": 0.0, "watch_events": 0,
                      "watch_events_waking": 0, "cpu": 0.0, "steps_by_round": Counter()}
        counting = _counting_keg_class()
        self.mayors = {}
        self.tokens = {}
        for name, token in config["machines"]:
            keg = counting(config["url"], token, self.stats)
            self.mayors[name] = daemon.Mayor(keg, name, NoopRuntime(), os.path.join(config["data"], name))
            self.tokens[name] = token
        self.dirty: dict = {}     # name -> None, in the order their tables changed
        self.due: dict = {}       # name -> when its next tick is due (monotonic)
        self.wake = None
        self.watches: list = []
        self.round = 0

    @staticmethod
    def _mark(mayor, flag: str) -> None:
        event = getattr(mayor, flag, None)   # absent in a Mayor without the marks: it reads on every step
        if event is not None:
            event.set()

    def _wakes(self, mayor, path: str) -> bool:
        """What ``Mayor._watch`` does with an event: mark what to read again; True when the loop should step.

        A change under ``procs/`` or the exec requests wakes it; its own status does not.
        """
        exec_dir = getattr(mayor, "exec_dir", None)
        if paths.is_under(path, mayor.procs):
            self._mark(mayor, "_table_dirty")
            return True
        if exec_dir is not None and paths.is_under(path, exec_dir):
            self._mark(mayor, "_exec_dirty")
            return True
        return False

    def _on_line(self, name: str):
        mayor = self.mayors[name]

        def on_line(line: bytes, received: float) -> None:
            obj = json.loads(line)
            if obj.get("heartbeat"):
                return
            self.stats["watch_events"] += 1
            if self._wakes(mayor, obj["path"]):
                self.stats["watch_events_waking"] += 1
                self.dirty[name] = None
                self.wake.set()
        return on_line

    async def _open_watch(self, name: str) -> None:
        self.watches.append(await open_watch(self.port, f"/machines/{name}", self.tokens[name], self._on_line(name)))

    def _step(self, name: str) -> None:
        mayor = self.mayors[name]
        changed = getattr(mayor, "changed", None)
        if changed is not None:
            changed.clear()                        # as Mayor.run does before each step
        start, cpu = time.perf_counter(), time.process_time()
        mayor.step()
        self.stats["step_cpu"] += time.process_time() - cpu
        self.stats["step_seconds"] += time.perf_counter() - start
        self.stats["steps"] += 1
        self.stats["steps_by_round"][str(self.round)] += 1
        self.due[name] = time.monotonic() + self.tick_seconds
        if changed is not None and changed.is_set():
            self.dirty[name] = None                # the step asked for another at once (a stop it only asked for)

    def _tick(self, name: str) -> None:
        mayor = self.mayors[name]
        start, cpu = time.perf_counter(), time.process_time()
        mayor.tick()
        self.stats["tick_cpu"] += time.process_time() - cpu
        self.stats["tick_seconds"] += time.perf_counter() - start
        self.stats["ticks"] += 1
        busy = mayor._busy() if hasattr(mayor, "_busy") else True
        self.due[name] = time.monotonic() + (self.tick_seconds if busy else self.idle_tick_seconds)

    async def _driver(self) -> None:
        while True:
            if not self.dirty:
                wait = max(0.0, min(self.due.values()) - time.monotonic()) if self.ticks and self.due else None
                try:
                    await asyncio.wait_for(self.wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            self.wake.clear()
            while self.dirty:                      # table changes first, as Mayor.run breaks its wait for them
                name = next(iter(self.dirty))
                del self.dirty[name]
                self._step(name)
                await asyncio.sleep(0)             # read the watch streams between steps
            if not self.ticks:
                continue
            now = time.monotonic()
            for name in sorted((n for n, t in self.due.items() if t <= now), key=self.due.get):
                if self.dirty:
                    break
                self._tick(name)
                await asyncio.sleep(0)

    def _say(self, obj) -> None:
        self.proto.write(json.dumps(obj) + "\n")
        self.proto.flush()

    async def run(self) -> None:
        """Register, watch, step once (as ``Mayor.run``), then step on changes until stdin closes."""
        loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        started = time.perf_counter()
        for mayor in self.mayors.values():
            mayor.register()
        names = list(self.mayors)
        for i in range(0, len(names), CONNECT_BATCH):
            await asyncio.gather(*(self._open_watch(n) for n in names[i:i + CONNECT_BATCH]))
        for name, mayor in self.mayors.items():  # as Mayor.run does once its watch follows the machine
            self._mark(mayor, "_table_dirty")
            mayor._watching = True
            self._step(name)
        self._say({"ready": True, "seconds": time.perf_counter() - started})
        stepper = asyncio.ensure_future(self._driver())
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                break
            command = json.loads(line)
            if "round" in command:
                self.round = command["round"]
            if command.get("stats"):
                self.stats["cpu"] = time.process_time()
                self._say({"stats": {k: (dict(v) if isinstance(v, Counter) else v) for k, v in self.stats.items()},
                           "mayors": len(self.mayors)})
        stepper.cancel()
        for conn in self.watches:
            conn.close()


def worker_main() -> None:
    """``--worker``: the configuration comes as one JSON line on stdin; answers go to stdout.

    The Mayors' own log lines (``keg mayor: …`` on stdout) go to ``config["log"]`` instead.
    """
    config = json.loads(sys.stdin.readline())
    proto = os.fdopen(os.dup(1), "w")
    log = os.open(config["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.close(log)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    if not config.get("profile"):
        asyncio.run(Worker(config, proto).run())
        return
    profile = cProfile.Profile(time.process_time)  # CPU, not wall: a worker mostly waits for the master
    profile.enable()
    try:
        asyncio.run(Worker(config, proto).run())
    finally:
        profile.disable()
        profile.dump_stats(config["profile"])


# ==================================================================== observer

class Observer:
    """One watch stream on ``/machines``: when each machine's status of the process changed, and to what."""

    def __init__(self, port: int, token: str, names: list):
        self.port, self.token, self.names = port, token, set(names)
        self.conn = None
        self.reader = None
        self.events: dict = {}     # machine -> [(received, revision, kid)] since the round began
        self.contents: dict = {}   # status KID -> parsed status object
        self.waiting: set = set()
        self.all_in = None
        self.on_all_in = None      # called when every awaited machine has reported (CPU snapshots)
        self.revisions: dict = {}  # machine -> revision of its converged status, in the last round
        self.lines = 0

    async def start(self) -> None:
        """Open the stream; returns once the master has registered it."""
        self.all_in = asyncio.Event()
        self.conn = await open_watch(self.port, "/machines", self.token, self._on_line)
        self.reader = await connect(self.port)

    def begin(self) -> None:
        """Forget the events of earlier rounds; wait for news from every machine."""
        self.events = {}
        self._await(self.names)

    def _await(self, machines) -> None:
        self.waiting = set(machines)
        self.all_in.clear()
        if not self.waiting:
            self.all_in.set()

    def _on_line(self, line: bytes, received: float) -> None:
        self.lines += 1
        obj = json.loads(line)
        if obj.get("heartbeat") or not obj["path"].endswith(f"/status/{PROCESS}.json") or not obj["new_kid"]:
            return
        machine = obj["path"].split("/")[2]
        self.events.setdefault(machine, []).append((received, obj["revision"], obj["new_kid"]))
        if machine in self.waiting:
            self.waiting.discard(machine)
            if not self.waiting:
                self.all_in.set()
                if self.on_all_in is not None:
                    self.on_all_in()

    async def _content(self, machine: str, revision: int, kid: str) -> dict:
        if kid not in self.contents:
            target = f"/v1/keg/machines/{machine}/status/{PROCESS}.json?rev={revision}"
            status, body = await self.reader.request(request_bytes("GET", target, self.token))
            if status != 200:
                raise LoadError(f"reading {target} answered {status}: {body[:200]!r}")
            self.contents[kid] = json.loads(body)
        return self.contents[kid]

    async def converged(self, spec_kid: str, timeout: float) -> dict:
        """``{machine: receive time}`` of the first status saying the spec ``spec_kid`` runs, for all machines.

        Status values are read only once every machine awaited has sent an
        event, so the reads (the observer's own work) do not load the master
        while it is being timed.

        Raises:
            LoadError: not all machines converged within ``timeout`` seconds.
        """
        deadline = time.perf_counter() + timeout
        done: dict = {}
        self.revisions = {}
        checked: dict = {}   # machine -> how many of its events were examined
        while True:
            try:
                await asyncio.wait_for(self.all_in.wait(), max(0.0, deadline - time.perf_counter()))
            except asyncio.TimeoutError:
                left = sorted(self.names - set(done))
                raise LoadError(f"{len(left)} of {len(self.names)} machines did not converge within {timeout} s "
                                f"(e.g. {left[:5]})") from None
            for machine in sorted(self.names - set(done)):
                events = self.events.get(machine, [])
                for received, revision, kid in events[checked.get(machine, 0):]:
                    status = await self._content(machine, revision, kid)
                    if status.get("state") == "running" and status.get("spec_kid") == spec_kid:
                        done[machine] = received
                        self.revisions[machine] = revision
                        break
                checked[machine] = len(events)
            if len(done) == len(self.names):
                return done
            # Some reported another state first: wait for their next event.
            self._await(m for m in self.names - set(done) if len(self.events.get(m, ())) <= checked[m])

    def close(self) -> None:
        for conn in (self.conn, self.reader):
            if conn is not None:
                conn.close()


# ======================================================================= driver

def _user_ops(names: list) -> tuple:
    """The puts creating one machine principal per name, and their tokens."""
    from master import auth
    ops, tokens = [], {}
    for name in names:
        user = auth.user_object(name, "", machine=True)
        _, tokens[name], record = auth.make_token()
        user["tokens"].append(record)
        ops.append({"op": "put", "path": f"/users/{name}/user.json", "value": json.dumps(user, indent=2) + "\n"})
    return ops, tokens


class Fleet:
    """The worker processes, driven over their stdin and stdout."""

    def __init__(self, workers: list):
        self.workers = workers   # asyncio subprocesses

    @classmethod
    async def start(cls, url: str, tokens: dict, count: int, tmp: str, profile_to: str | None = None,
                    ticks: bool = True) -> "Fleet":
        names = sorted(tokens)
        workers = []
        for w in range(count):
            mine = names[w::count]
            proc = await asyncio.create_subprocess_exec(sys.executable, os.path.abspath(__file__), "--worker",
                                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            config = {"url": url, "machines": [(n, tokens[n]) for n in mine], "data": os.path.join(tmp, "data"),
                      "log": os.path.join(tmp, f"worker-{w}.log"), "profile": profile_to if w == 0 else None,
                      "ticks": ticks}
            proc.stdin.write((json.dumps(config) + "\n").encode())
            await proc.stdin.drain()
            workers.append(proc)
        fleet = cls(workers)
        answers = await asyncio.wait_for(asyncio.gather(*(fleet._answer(p) for p in workers)), READY_TIMEOUT)
        fleet.ready_seconds = max(a["seconds"] for a in answers)
        return fleet

    @staticmethod
    async def _answer(proc) -> dict:
        line = await proc.stdout.readline()
        if not line:
            raise LoadError(f"worker {proc.pid} exited ({await proc.wait()}) before answering")
        return json.loads(line)

    async def tell(self, command: dict) -> None:
        """Send a command to every worker."""
        for proc in self.workers:
            proc.stdin.write((json.dumps(command) + "\n").encode())
            await proc.stdin.drain()

    async def stats(self) -> list:
        """Every worker's counters."""
        await self.tell({"stats": True})
        return [(await self._answer(p))["stats"] for p in self.workers]

    def cpu(self) -> float:
        """CPU seconds used by the workers so far."""
        return sum(cpu_seconds(p.pid) for p in self.workers)

    async def stop(self) -> None:
        """Close their stdin; they end by themselves (killed after 30 s)."""
        for proc in self.workers:
            if proc.returncode is None:
                proc.stdin.close()
        for proc in self.workers:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


def machine_cpu() -> dict:
    """CPU seconds the whole machine has spent busy, and lost to the hypervisor (steal), so far (``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return {"machine_busy": (user + nice + system + irq + softirq) / tick, "steal": steal / tick}


async def _settle() -> None:
    os.sync()
    await asyncio.sleep(SETTLE_SECONDS)  # the loop keeps reading: late events of the last round are taken now


async def one_round(master, fleet: Fleet, observer: Observer, writer: HttpConnection, names: list,
                    generation: int) -> dict:
    """Write the new spec to every machine in one transaction and wait until all run it."""
    await fleet.tell({"round": generation})
    await _settle()
    observer.begin()
    request = change_request(names, generation, master.token)
    before = await fleet.stats()

    def cpu_now() -> dict:
        return {"master": cpu_seconds(master.proc.pid), "workers": fleet.cpu(), "observer": time.process_time(),
                **machine_cpu()}

    snapshots = []   # CPU when every machine had reported (before the observer reads any value)
    observer.on_all_in = lambda: snapshots.append(cpu_now())
    cpu_start = cpu_now()
    sent = time.perf_counter()
    status, answer = await writer.request(request)
    acked = time.perf_counter()
    if status != 200:
        raise LoadError(f"the round's transaction answered {status}: {answer[:300]!r}")
    result = json.loads(answer)
    spec_kid = result["kids"][f"/machines/{names[0]}/procs/{PROCESS}.json"]
    done = await observer.converged(spec_kid, CONVERGE_TIMEOUT)
    observer.on_all_in = None
    last = max(done.values())
    cpu = {k: v - cpu_start[k] for k, v in snapshots[-1].items()}
    # Anything else that ran meanwhile (other programs, kernel threads): a disturbed round shows here.
    cpu["others"] = cpu["machine_busy"] - cpu["master"] - cpu["workers"] - cpu["observer"]
    after = await fleet.stats()
    latencies = [t - acked for t in done.values()]
    return {"generation": generation, "revision": result["revision"], "commit_seconds": acked - sent,
            "total_seconds": last - acked, "latency": summarize(latencies), "cpu_seconds": cpu,
            "cpu_share_of_cores": {k: v / ((os.cpu_count() or 1) * (last - sent)) for k, v in cpu.items()},
            "revisions_until_converged": max(observer.revisions.values()) - result["revision"],
            "workers": _delta(_merge(before), _merge(after))}


async def idle(master, fleet: Fleet, writer: HttpConnection, seconds: float) -> dict:
    """What the Mayors cost the master while nothing changes: ticks, heartbeats, watch streams."""
    async def head() -> int:
        status, body = await writer.request(request_bytes("GET", "/v1/head", master.token))
        if status != 200:
            raise LoadError(f"GET /v1/head answered {status}: {body[:200]!r}")
        return json.loads(body)["revision"]

    before, first = await fleet.stats(), await head()
    cpu_master, cpu_workers, start = cpu_seconds(master.proc.pid), fleet.cpu(), time.perf_counter()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - start
    master_cpu, workers_cpu = cpu_seconds(master.proc.pid) - cpu_master, fleet.cpu() - cpu_workers
    revisions, after = await head() - first, await fleet.stats()
    done = _delta(_merge(before), _merge(after))
    return {"seconds": elapsed, "master_cpu_share": master_cpu / elapsed, "workers_cpu_share": workers_cpu / elapsed,
            "revisions_per_second": revisions / elapsed,
            "transactions_per_second": done["requests"].get("POST tx", 0) / elapsed,
            "requests_per_second": sum(done["requests"].values()) / elapsed}


async def acknowledgements(master, names: list, count: int) -> dict:
    """The change's commit alone (``--acks``): ``count`` transactions of it, every machine's stream open.

    No Mayors: one watch stream per ``/machines/<n>`` (where each Mayor
    watches, with the admin's token).  Each transaction is timed from its
    request to its answer; the next is sent once every stream has received
    its event, and 0.2 s later.
    """
    events = Counter()

    def on_line(line: bytes, received: float) -> None:
        if not json.loads(line).get("heartbeat"):
            events["in"] += 1

    streams = []
    writer = await connect(master.port)
    try:
        for i in range(0, len(names), CONNECT_BATCH):
            streams += await asyncio.gather(*(open_watch(master.port, f"/machines/{n}", master.token, on_line)
                                              for n in names[i:i + CONNECT_BATCH]))
        seconds, cpu = [], []
        for generation in range(count):
            events.clear()
            cpu_before, sent = cpu_seconds(master.proc.pid), time.perf_counter()
            status, answer = await writer.request(change_request(names, generation, master.token))
            seconds.append(time.perf_counter() - sent)
            if status != 200:
                raise LoadError(f"the transaction answered {status}: {answer[:300]!r}")
            deadline = time.perf_counter() + CONVERGE_TIMEOUT
            while events["in"] < len(names):
                if time.perf_counter() > deadline:
                    raise LoadError(f"{len(names) - events['in']} streams did not get their event")
                await asyncio.sleep(0.005)
            cpu.append(cpu_seconds(master.proc.pid) - cpu_before)
            await asyncio.sleep(0.2)
    finally:
        writer.close()
        for conn in streams:
            conn.close()
    return {"seconds": seconds, "latency": summarize(seconds), "master_cpu_seconds": cpu}


def _delta(before: dict, after: dict) -> dict:
    """What the workers did between two ``_merge``d snapshots (Mayor ticks go on after convergence too)."""
    out = {}
    for key, value in after.items():
        if isinstance(value, dict):
            out[key] = {k: v - before.get(key, {}).get(k, 0) for k, v in value.items()
                        if v - before.get(key, {}).get(k, 0)}
        else:
            out[key] = value - before.get(key, 0)
    return out


async def drive(args, master, report: Report, tmp: str) -> dict:
    """Set up the machines and run the rounds; returns everything measured."""
    names = [machine_name(i) for i in range(args.machines)]
    setup = time.perf_counter()
    ops, tokens = _user_ops(names)
    master.tx(ops)
    report.figure(f"{args.machines} machine principals created (one tx)", time.perf_counter() - setup, "s")
    if args.acks:
        out = await acknowledgements(master, names, args.acks)
        ms = sorted(1000 * s for s in out["seconds"])
        report.figure(f"{args.machines}-put change acknowledged, p50", out["latency"]["p50_ms"], "ms",
                      f"min {ms[0]:.0f}  p90 {ms[int(0.9 * len(ms))]:.0f}  max {ms[-1]:.0f} ms  "
                      f"({args.acks} transactions, {args.machines} streams)")
        report.figure("master CPU per change, its deliveries included (median)", median(out["master_cpu_seconds"]),
                      "s")
        return out

    fleet = await Fleet.start(f"http://127.0.0.1:{master.port}", tokens, args.workers, tmp,
                              os.path.join(args.out, "mayor-worker.pstats") if args.profile else None,
                              ticks=not args.no_ticks)
    observer = Observer(master.port, master.token, names)
    writer = await connect(master.port)
    out: dict = {"rounds": []}
    try:
        report.figure(f"{args.machines} Mayors registered, watching, stepped once", fleet.ready_seconds, "s",
                      f"{args.workers} workers")
        await observer.start()
        for generation in range(args.rounds + 1):
            measured = await one_round(master, fleet, observer, writer, names, generation)
            out["rounds"].append(measured)
            what = "first start (round 0)" if generation == 0 else f"change, round {generation}"
            report.figure(f"{what}: all converged", measured["total_seconds"], "s",
                          f"p50 {measured['latency']['p50_ms']:.0f} ms  p99 {measured['latency']['p99_ms']:.0f} ms"
                          f"  commit {1000 * measured['commit_seconds']:.0f} ms  master CPU "
                          f"{measured['cpu_seconds']['master']:.2f} s  workers {measured['cpu_seconds']['workers']:.2f}"
                          f" s  others {measured['cpu_seconds']['others']:.2f} s  "
                          f"{measured['revisions_until_converged']} revisions  "
                          f"{sum(measured['workers']['requests'].values())} Mayor requests")
        if args.idle:
            await asyncio.sleep(IDLE_SETTLE)
            out["idle"] = spent = await idle(master, fleet, writer, args.idle)
            report.figure(f"idle {args.idle:g} s: master CPU (share of one core)", 100 * spent["master_cpu_share"], "%",
                          f"{spent['transactions_per_second']:.0f} Mayor tx/s in {spent['revisions_per_second']:.0f} "
                          f"revisions/s; workers {100 * spent['workers_cpu_share']:.0f}%")
        stats = await fleet.stats()
    finally:
        observer.close()
        writer.close()
        await fleet.stop()
    out["workers"] = _merge(stats)
    out["observer_lines"] = observer.lines
    return out


def _merge(stats: list) -> dict:
    merged = {"requests": Counter(), "request_seconds": Counter(), "steps_by_round": Counter()}
    for s in stats:
        for key in ("requests", "request_seconds", "steps_by_round"):
            merged[key].update(s[key])
        for key, value in s.items():
            if not isinstance(value, dict):
                merged[key] = merged.get(key, 0) + value
    return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in merged.items()}


def print_profile(path: str, top: int = 25) -> None:
    """The master's hottest functions, by own time and by total time."""
    stats = pstats.Stats(path)
    stats.strip_dirs()
    print(f"\n== profile of keg master serve (saved to {path})")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main() -> int:
    if "--worker" in sys.argv[1:]:
        worker_main()
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=1000, help="Mayor instances (default 1,000)")
    parser.add_argument("--quick", action="store_true", help="100 machines, 2 rounds")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: machines / 30, 2..32)")
    parser.add_argument("--rounds", type=int, default=None, help="timed changes after round 0 (default 5; quick 2)")
    parser.add_argument("--profile", action="store_true", help="run the master and one worker under cProfile")
    parser.add_argument("--idle", type=float, default=None,
                        help="after the rounds, measure this many seconds with nothing changing (default 11; 0: skip)")
    parser.add_argument("--no-ticks", action="store_true",
                        help="leave out the Mayors' ticks (status and heartbeat publishing between steps)")
    parser.add_argument("--acks", type=int, default=0, metavar="N",
                        help="no Mayors: time the acknowledgement of N changes with every machine's stream open")
    parser.add_argument("--tmp", default=None, help="where the keg and the Mayors' data go (default: the system's)")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    args = parser.parse_args()
    if args.quick:
        args.machines = 100
    args.rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    args.idle = args.idle if args.idle is not None else IDLE_SECONDS
    args.workers = args.workers or max(2, min(32, args.machines // 30))
    raise_open_files(4 * args.machines + 256)

    if args.acks:
        report = Report("mayor-acks", {"machines": args.machines, "transactions": args.acks})
    else:
        report = Report("mayor-converge", {"machines": args.machines, "workers": args.workers, "rounds": args.rounds,
                                           "ticks": not args.no_ticks, "profile": args.profile})
    profile_to = os.path.join(args.out, "mayor-master.pstats") if args.profile else None
    if profile_to:
        os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="keg-bench-mayor-", dir=args.tmp)
    try:
        with KegMasterServer(args.tmp, profile_to) as master:
            measured = asyncio.run(drive(args, master, report, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.acks:
        return _save(report, measured, args.out, profile_to)

    timed = measured["rounds"][1:]
    totals = [r["total_seconds"] for r in timed]
    p99s = [r["latency"]["p99_ms"] for r in timed]
    p50s = [r["latency"]["p50_ms"] for r in timed]
    report.figure("changes: median of the rounds' totals", median(totals), "s",
                  f"rounds {', '.join(f'{t:.2f}' for t in totals)}")
    report.figure("changes: median per-machine p50", median(p50s), "ms")
    report.figure("changes: median per-machine p99", median(p99s), "ms")
    report.figure("changes: master CPU per round (median)", median([r["cpu_seconds"]["master"] for r in timed]), "s")
    report.figure("changes: workers' CPU per round (median)", median([r["cpu_seconds"]["workers"] for r in timed]),
                  "s")
    w = measured["workers"]
    report.figure("Mayor steps (all rounds and set-up)", w["steps"], "steps",
                  f"mean {1000 * w['step_seconds'] / max(1, w['steps']):.2f} ms wall each, in its worker")
    report.goal(f"all {args.machines} converged after one change (median of rounds), s", median(totals), "<=",
                GOAL_SECONDS, "DESIGN §9")
    return _save(report, measured, args.out, profile_to)


def _save(report: Report, measured: dict, out: str, profile_to: str | None) -> int:
    path = os.path.join(out, f"{report.name}.json")
    os.makedirs(out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**report.to_json(environment(None)), "measured": measured}, f, indent=2)
        f.write("\n")
    print(f"\nresults in {path}")
    if profile_to:
        print_profile(profile_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
