"""The Mayor's loop: read the machine's process table, plan, apply, report (DESIGN §5).

One ``Mayor`` per machine.  ``step()`` is one full turn and is what tests
call by hand; ``run()`` calls it on every change to the process table (the
master's watch stream), whenever a container exits, when a back-off ends,
and on a timer as a safety net.

Integrity on its own: the last process table read is kept in
``DATA/state.json``, so with the master unreachable (or after a restart
while it is) the Mayor keeps supervising what it was told; status changes
wait in ``DATA/outbox.json`` and are published, newest value per path, when
the master answers again.  Counters that must outlive a restart of the
Mayor (failures for back-off, incarnations for process KIDs, the last ended
incarnation of each process) are kept in the same file, written once per
step and only when it changed (``DATA/desired.json`` of earlier versions is
read when ``state.json`` has no table).

What it writes, all under ``/machines/<name>/status/`` (volatile):

* ``<p>.json``: one object per process (DESIGN §2);
* ``mayor.json``: version, heartbeat, process count, capacity in use and
  the PID → process KID map;
* ``logs/<p>.log``: the last ``LOG_TAIL`` bytes of the process's output;
  ``log_bytes`` in ``<p>.json`` is the number of the tail's last byte;
* ``exec/<id>.json``: the output and exit code of an exec request
  ``/machines/<name>/exec/<id>.json``, while it runs and after.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import threading
import time

import pygit2

import kid as kidlib
from keg import paths
from keg.errors import CompareFailed, KegError, NotFound
from keg.fsio import write_file_atomic
from keg.store import LIST_VALUE_MAX
from keg.transaction import Delete, Transaction, compare, delete, put
from mayor.plan import Actions, Desired, RESTART_POLICIES, backoff, failures_after_exit, plan
from mayor.statefile import StateFile

RESYNC_SECONDS = 30.0     # full re-read of the process table, whatever the watch stream says
HEARTBEAT_SECONDS = 10.0  # the heartbeat in status/mayor.json is refreshed at least this often
TICK_SECONDS = 0.5        # logs and exec output are published at most this often
LOG_TAIL = 64 << 10       # bytes of each process's output kept in status/logs/<p>.log
EXEC_OUTPUT = 1 << 20     # bytes of an exec's output kept in its result
VERSION = "1"


def _log(message: str) -> None:
    print(f"keg mayor: {message}", flush=True)


class Mayor:
    """The init of one machine.

    Args:
        keg: a ``RemoteKeg`` (or a local ``Store``) holding the namespace.
        name: the machine's name (``/machines/<name>/``).
        runtime: a ``mayor.runtime.Runtime``.
        data_dir: where the Mayor keeps its own state.
        labels: ``{key: value}`` recorded in ``machine.json``.
        clock: seconds, for start and exit times and back-off.
        address: where other machines reach this machine's processes (``endpoint`` in status).
        cpus, memory: the capacity offered to the scheduler (default: the whole machine).
        heartbeat: seconds between heartbeats (``HEARTBEAT_SECONDS``); keep it well under the scheduler's lease TTL.
    """

    def __init__(self, keg, name: str, runtime, data_dir: str, labels=None, clock=time.time,
                 address: str = "127.0.0.1", cpus=None, memory=None, heartbeat: float | None = None):
        self.keg, self.name, self.runtime = keg, name, runtime
        self.data_dir = data_dir
        self.labels = dict(labels or {})
        self.address = address
        self.heartbeat_seconds = HEARTBEAT_SECONDS if heartbeat is None else heartbeat
        self.cpus = cpus if cpus is not None else (os.cpu_count() or 1)
        self.memory = memory if memory is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.clock = clock
        self.machine_kid = str(kidlib.machine_kid(name))
        self.procs = f"/machines/{name}/procs"
        self.status = f"/machines/{name}/status"
        self.failures: dict = {}
        self.errors: dict = {}         # name -> the last error starting it
        self.outbox: dict = {}         # path -> bytes waiting for the master
        self.changed = threading.Event()
        self._counted: set = set()     # exited containers already counted as failures
        self.last_actions = Actions()
        self.incarnations: dict = {}   # name -> [spec KID, incarnation of the newest start]
        self.previous: dict = {}       # name -> what the last ended incarnation left: kid, exit code, …
        self.published: dict = {}      # path -> bytes last sent (or queued): unchanged status is not sent again
        self.execs: dict = {}          # request id -> _Exec
        self.start_failures: dict = {} # name -> [spec KID, failed starts in a row, time of the last]
        self.specs: dict = {}          # name -> the validated-enough spec of the last read
        self.last_heartbeat = 0.0
        self._heartbeat_due = 0.0           # when the next periodic heartbeat is due (0: at once)
        self._heartbeat_body: dict = {}     # the last mayor.json queued, without its heartbeat time
        self.last_desired: dict = {}
        self._listed_status = False
        self._spec_cache: dict = {}         # spec KID -> spec, of the specs in the last table read
        self._table = None                  # the last table read: {name: {"kid", "spec"}}
        self._kept_table: dict = {}         # … or, before the first read, the one kept in DATA/state.json
        self._saved = b""                   # what DATA/state.json holds
        self._table_read_at = 0.0
        self._table_dirty = threading.Event()  # the watch saw a change under procs/
        self._exec_dirty = threading.Event()   # … under exec/
        self._watching = False              # the watch thread is following this machine
        self._execs_read = False
        self.exec_dir = f"/machines/{name}/exec"
        os.makedirs(data_dir, exist_ok=True)
        self._load_outbox()
        self._load_state()

    # ----------------------------------------------------------- registration

    def machine_object(self) -> dict:
        """What ``machine.json`` says about this machine."""
        return {"name": self.name, "kid": self.machine_kid, "cpus": self.cpus, "memory": self.memory,
                "labels": self.labels, "address": self.address, "version": VERSION,
                "runtime": getattr(self.runtime, "version", type(self.runtime).__name__)}

    def register(self) -> None:
        """Write ``/machines/<name>/machine.json`` (kept as is when it already says the same).

        Fields others wrote there (``unschedulable`` from ``drain-machine``, say) are kept:
        the write is a compare-and-swap on what was read, tried again if someone wrote between.
        """
        path = f"/machines/{self.name}/machine.json"
        for _ in range(5):
            try:
                old = self.keg.read(path)
                old_kid = str(kidlib.from_oid(pygit2.hash(old)))
            except NotFound:
                old, old_kid = None, None
            merged = {}
            if old is not None:
                try:
                    merged = json.loads(old)
                except ValueError:
                    merged = {}
                if not isinstance(merged, dict):
                    merged = {}
            merged.update(self.machine_object())
            body = (json.dumps(merged, indent=2, sort_keys=True) + "\n").encode()
            if old == body:
                return
            result = self.keg.apply(Transaction((put(path, body),), (compare(path, old_kid),)))
            if result.ok:
                return
            if not isinstance(result.error, CompareFailed):
                raise result.error
        raise KegError(f"cannot register {path}: it keeps changing under the Mayor")

    # ---------------------------------------------------------------- desired

    def read_desired(self) -> dict:
        """``{name: (Desired, spec)}`` from the process table; from the local copy when the master is away.

        While the watch thread follows the table (``run``), the last table read is used again until
        the watch reports a change under ``procs/`` or ``RESYNC_SECONDS`` pass; a step called by hand
        always reads.
        """
        fresh = time.monotonic() - self._table_read_at < RESYNC_SECONDS
        if self._watching and not self._table_dirty.is_set() and fresh and self._table is not None:
            table = self._table
        else:
            self._table_dirty.clear()  # a change arriving from here on makes the next step read again
            try:
                table = self._read_table()
            except KegError as err:
                self._table_dirty.set()
                return self._cached_desired(err)
            self._table, self._kept_table, self._table_read_at = table, table, time.monotonic()
        return {n: (self._desired(n, v["kid"], v["spec"]), dict(v["spec"])) for n, v in table.items()}

    def _read_table(self) -> dict:
        """The process table in one request: the listing of ``procs/`` with each spec's bytes."""
        try:
            entries = self.keg.list_values(self.procs)
        except NotFound:
            return {}
        table, specs = {}, {}
        for entry, data in entries:
            if entry.kind != "file" or not entry.name.endswith(".json"):
                continue
            name = entry.name[:-len(".json")]
            spec = self._spec_cache.get(entry.kid)  # a KID names its bytes: a spec parsed once is not parsed again
            if spec is None:
                try:
                    if data is None:
                        raise ValueError(f"larger than {LIST_VALUE_MAX} bytes")
                    spec = json.loads(data)
                    if not isinstance(spec, dict):
                        raise ValueError("a process spec is a JSON object")
                except (ValueError, UnicodeDecodeError) as err:
                    self.errors[name] = f"{entry.path} is not a valid spec: {err}"
                    continue
            specs[entry.kid] = spec
            if self.errors.get(name, "").startswith(entry.path):
                del self.errors[name]  # the spec was fixed
            table[name] = {"kid": entry.kid, "spec": spec}
        self._spec_cache = specs
        return table

    def _cached_desired(self, why) -> dict:
        table = self._kept_table
        _log(f"master unreachable ({why}); supervising the {len(table)} processes last read")
        return {n: (self._desired(n, v["kid"], v["spec"]), v["spec"]) for n, v in table.items()}

    @staticmethod
    def _desired(name: str, spec_kid: str, spec: dict) -> Desired:
        restart = spec.get("restart", "always")
        if restart not in RESTART_POLICIES:
            restart = "never"  # an invalid spec is reported by the runtime's validation, not restarted in a loop
        backoff = spec.get("backoff", {}) if isinstance(spec.get("backoff"), dict) else {}
        return Desired(name, spec_kid, restart, float(backoff.get("start", 10.0)), float(backoff.get("max", 300.0)))

    # ------------------------------------------------------------------- step

    def step(self) -> Actions:
        """One turn: read, plan, apply, report. Returns the plan it carried out.

        A stop the runtime finished at once (no process left to wait for) is followed in the same turn by
        the plan it allows (the replacement's start), so a changed spec costs one turn and one report.
        """
        desired = self.read_desired()
        wanted = {n: d for n, (d, _) in desired.items()}
        self.specs = {n: s for n, (_, s) in desired.items()}
        done = []
        for turn in range(2):
            now = self.clock()
            actions = self._hold_failed_starts(plan(wanted, self._actual(now), now), desired, now)
            for line in actions.describe():
                _log(line)
            self.apply(actions, self.specs)
            done.extend(actions.steps)
            if not self._stopped_at_once(actions):
                break
            if turn == 1:
                self.changed.set()  # look again at once
        actions = Actions(tuple(done), actions.wake_at, actions.holding)
        self.last_actions = actions
        self.last_desired = wanted
        self.report(self.last_desired, actions)
        self._save_state()
        self.publish()  # the processes' status first: exec requests must not delay it
        if not self._watching or self._exec_dirty.is_set() or self.execs or not self._execs_read:
            self._exec_dirty.clear()
            self.read_exec_requests()
            self.poll_execs()
            self.publish()
        return actions

    def _actual(self, now: float) -> dict:
        """The runtime's containers by name, with the failure counts this Mayor keeps (an exit is counted once)."""
        actual = {n: dataclasses.replace(a, failures=self.failures.get(n, 0))
                  for n, a in self.runtime.actual().items()}
        for name, have in actual.items():
            if have.state == "exited" and have.container not in self._counted:
                self._counted.add(have.container)
                self.failures[name] = failures_after_exit(self.failures.get(name, 0), have.started, have.exited or now)
                actual[name] = dataclasses.replace(have, failures=self.failures[name])
        return actual

    def _stopped_at_once(self, actions: Actions) -> bool:
        """Whether a stop that only asked found its container already gone (a quick exit, a runtime
        without processes): then the next plan can go on at once."""
        asked = {s.container for s in actions.steps if s.kind == "stop" and not s.force}
        if not asked:
            return False
        return any(a.container in asked and a.state == "exited" for a in self.runtime.actual().values())

    def _hold_failed_starts(self, actions: Actions, desired: dict, now: float) -> Actions:
        """Hold back a start that failed for the same spec until its back-off ends (a bad image is not
        fetched and refused again on every step)."""
        steps, holding, wakes = [], list(actions.holding), [actions.wake_at] if actions.wake_at else []
        for step in actions.steps:
            failed = self.start_failures.get(step.name)
            if step.kind == "start" and failed and failed[0] == step.spec_kid and step.name in desired:
                want = desired[step.name][0]
                due = failed[2] + backoff(failed[1], want.backoff_start, want.backoff_max)
                if now < due:
                    holding.append((step.name, f"back-off after a failed start: trying again in {due - now:.1f}s"))
                    wakes.append(due)
                    continue
            steps.append(step)
        if len(steps) == len(actions.steps):
            return actions
        return Actions(tuple(steps), min(wakes) if wakes else None, tuple(holding))

    def apply(self, actions: Actions, specs: dict) -> None:
        """Carry out the steps in order; a step that fails is recorded in that process's status."""
        for step in actions.steps:
            try:
                if step.kind == "stop":
                    if step.force:
                        self.runtime.stop(step.container, grace=0)
                    else:
                        self.runtime.stop(step.container, wait=False, drain=True)  # its exit wakes the loop
                elif step.kind == "remove":
                    self._remember_ended(step.name, step.container)
                    self.runtime.remove(step.container)
                    self._counted.discard(step.container)
                elif step.kind == "start":
                    spec_kid, incarnation = self._next_incarnation(step.name, step.spec_kid)
                    process_kid = str(kidlib.process_kid(self.machine_kid, step.name, spec_kid, incarnation))
                    self.runtime.start(step.name, spec_kid, specs[step.name], process_kid, incarnation)
                    self.incarnations[step.name] = [spec_kid, incarnation]
                    self.errors.pop(step.name, None)
                    self.start_failures.pop(step.name, None)
            except KegError as err:
                self.errors[step.name] = str(err)
                _log(f"{step.kind} {step.name} failed: {err}")
                if step.kind == "start":
                    last = self.start_failures.get(step.name)
                    count = last[1] + 1 if last and last[0] == step.spec_kid else 1
                    self.start_failures[step.name] = [step.spec_kid, count, self.clock()]

    def _next_incarnation(self, name: str, spec_kid: str) -> tuple:
        """``(spec KID, incarnation)`` of the next start: 0 for a new spec, one more for the same one."""
        spec_kid = str(kidlib.parse(spec_kid, allow_short=False)) if spec_kid.startswith("K-") else spec_kid
        last = self.incarnations.get(name)
        if last is not None and last[0] == spec_kid:
            return spec_kid, last[1] + 1
        return spec_kid, 0

    def _remember_ended(self, name: str, container: str) -> None:
        have = self.runtime.actual().get(name)
        if have is None or have.container != container:
            return
        self.previous[name] = {"kid": have.kid, "exit_code": have.exit_code, "exited": have.exited,
                               "oom": have.oom, "reason": have.reason}

    # ------------------------------------------------------------ local state

    def _state_path(self) -> str:
        return os.path.join(self.data_dir, "state.json")

    def _load_state(self) -> None:
        self._state_file = StateFile(self._state_path())
        saved = self._state_file.load()
        self._kept_table = saved.get("desired")
        if self._kept_table is None:  # kept apart by earlier versions
            try:
                with open(os.path.join(self.data_dir, "desired.json"), encoding="utf-8") as f:
                    self._kept_table = json.load(f)
            except (FileNotFoundError, ValueError):
                self._kept_table = {}
        self.failures.update(saved.get("failures", {}))
        self.incarnations.update(saved.get("incarnations", {}))
        self.previous.update(saved.get("previous", {}))
        self._counted.update(saved.get("counted", []))
        for name, have in self.runtime.actual().items():  # re-adopted containers know their incarnation
            if have.spec_kid and have.kid:
                self.incarnations[name] = [have.spec_kid, have.incarnation]

    def _save_state(self) -> None:
        """Add to DATA/state.json when what it holds changed (``mayor.statefile``)."""
        state = {"desired": self._kept_table, "failures": self.failures, "incarnations": self.incarnations,
                 "previous": self.previous, "counted": sorted(self._counted)}
        data = json.dumps(state, sort_keys=True).encode()
        if data != self._saved:
            self._state_file.save(data)
            self._saved = data

    # ----------------------------------------------------------------- status

    def report(self, desired: dict, actions: Actions) -> None:
        """Queue one status object per process, their log tails, and the Mayor's own heartbeat."""
        actual = self.runtime.actual()
        if any(a.state == "exited" and a.container not in self._counted for a in actual.values()):
            # An exit no plan has seen (say, a process that ended before this report): the runtime's wait()
            # counts it as seen now, so without this the restart would wait for the next resync.
            self.changed.set()
        holding = dict(actions.holding)
        for name in sorted(set(desired) | set(actual) | set(self.errors)):
            have = actual.get(name)
            state = have.state if have is not None else "pending"
            if name in self.errors:
                state = "failed"
            elif have is not None and have.state == "exited" and name in holding and "back-off" in holding[name]:
                state = "backoff"
            elif state in ("created", "unknown"):
                state = "pending"
            spec = self.specs.get(name, {})
            obj = {"name": name, "state": state, "spec_kid": getattr(desired.get(name), "spec_kid", None),
                   "image": spec.get("image"), "restarts": self.failures.get(name, 0),
                   "last_error": self.errors.get(name), "previous": self.previous.get(name),
                   "kid": None, "pid": None, "container": None, "exit_code": None, "started": None,
                   "exited": None, "oom": False, "reason": None, "health": None, "endpoint": None}
            if have is not None:
                obj.update({"kid": have.kid, "pid": have.pid if have.state == "running" else None,
                            "container": have.container, "exit_code": have.exit_code, "started": have.started,
                            "exited": have.exited, "oom": have.oom, "reason": have.reason, "health": have.health})
            port = spec.get("port")
            if have is not None and have.state == "running" and isinstance(port, int) and not isinstance(port, bool):
                obj["endpoint"] = f"{self.address}:{port}"
            total, tail = self.runtime.log_tail(name, LOG_TAIL)
            obj["log_bytes"] = total
            self.queue(f"{self.status}/{name}.json", obj)
            if total:
                self.queue_bytes(f"{self.status}/logs/{name}.log", tail)
        for name in self._published_names():
            if name not in desired and name not in actual and name not in self.errors:
                self.queue_bytes(f"{self.status}/{name}.json", None)
                self.queue_bytes(f"{self.status}/logs/{name}.log", None)
                self.previous.pop(name, None)
        self.heartbeat(actual)

    def heartbeat(self, actual=None, force: bool = False) -> None:
        """Queue ``mayor.json`` when it changed or its periodic beat is due (every ``heartbeat_seconds``)."""
        actual = self.runtime.actual() if actual is None else actual
        running = {n: a for n, a in actual.items() if a.state == "running"}
        in_use = {"cpu": 0.0, "memory": 0, "processes": len(running)}
        for name in running:
            resources = self.specs.get(name, {}).get("resources") or {}
            try:
                in_use["cpu"] += float(resources.get("cpu", 0) or 0)
                in_use["memory"] += int(resources.get("memory", 0) or 0) if isinstance(resources.get("memory", 0), int) \
                    else 0
            except (TypeError, ValueError):
                pass
        body = {"version": VERSION, "processes": len(actual), "runtime": getattr(self.runtime, "version", None),
                "pids": {str(a.pid): a.kid for a in running.values() if a.pid is not None and a.kid},
                "in_use": in_use}
        path = f"{self.status}/mayor.json"
        now = self.clock()
        due = now >= self._heartbeat_due
        if not force and not due and path in self.published and body == self._heartbeat_body:
            return
        self._heartbeat_body = dict(body)
        if due or force:
            # The beat keeps its own phase: a send for a change (which carries a fresh heartbeat too) does
            # not move it, so machines given one change together do not all beat together afterwards,
            # and the first is put off by a share of the interval of the machine's own.
            first = self._heartbeat_due == 0.0
            self._heartbeat_due = now + self.heartbeat_seconds * (0.5 + random.Random(self.name).random() / 2
                                                                  if first else 1.0)
        body["heartbeat"] = now
        self.last_heartbeat = now
        self.queue(path, body)

    def _published_names(self) -> list:
        """Names with a status object: the master's listing once, then what this Mayor sent (only it writes there)."""
        names = set()
        if not self._listed_status:
            try:
                names = {e.name[:-5] for e in self.keg.list(self.status) if e.kind == "file"
                         and e.name.endswith(".json") and e.name != "mayor.json"}
                self._listed_status = True
            except NotFound:
                self._listed_status = True
            except KegError:
                pass
        prefix = f"{self.status}/"
        for path in self.published:
            rest = path[len(prefix):] if path.startswith(prefix) else ""
            if rest.endswith(".json") and "/" not in rest and rest != "mayor.json":
                names.add(rest[:-5])
        return sorted(names)

    def queue(self, path: str, obj: dict) -> None:
        """Queue a status object (the newest per path wins; one equal to what was last sent is not sent again)."""
        self.queue_bytes(path, (json.dumps(obj, sort_keys=True) + "\n").encode())

    def queue_bytes(self, path: str, body: bytes | None) -> None:
        """Queue a value for ``path`` (None: delete it) unless the master already has exactly that."""
        if path not in self.outbox and self.published.get(path, b"") == body and (body is not None or
                                                                                   path in self.published):
            return
        self.outbox[path] = body
        self.published[path] = body

    def _outbox_path(self) -> str:
        return os.path.join(self.data_dir, "outbox.json")

    def _load_outbox(self) -> None:
        try:
            with open(self._outbox_path(), encoding="utf-8") as f:
                saved = json.load(f)
        except (FileNotFoundError, ValueError):
            return
        self.outbox.update({p: (v.encode() if v is not None else None) for p, v in saved.items()})

    def publish(self) -> bool:
        """Send the queued status in one transaction; keep it (on disk too) when the master is away."""
        if not self.outbox:
            return True
        current = set()
        for where in sorted({os.path.dirname(p) for p, body in self.outbox.items() if body is None}):
            try:
                current |= {e.path for e in self.keg.list(where)}
            except NotFound:
                pass
            except KegError as err:
                return self._keep_outbox(err)
        ops = [delete(path) if body is None else put(path, body) for path, body in sorted(self.outbox.items())]
        ops = [op for op in ops if not (isinstance(op, Delete) and op.path not in current)]
        try:
            result = self.keg.apply(Transaction(tuple(ops))) if ops else None
        except KegError as err:
            return self._keep_outbox(err)
        if result is not None and not result.ok:
            return self._keep_outbox(result.error)
        self.outbox.clear()
        try:
            os.unlink(self._outbox_path())
        except FileNotFoundError:
            pass
        return True

    def _keep_outbox(self, why) -> bool:
        saved = {p: (v.decode() if v is not None else None) for p, v in self.outbox.items()}
        write_file_atomic(self._outbox_path(), json.dumps(saved).encode(), durable=False)
        _log(f"status kept for later: {why}")
        return False

    # ------------------------------------------------------------------- exec

    def read_exec_requests(self) -> None:
        """Start the exec requests not seen yet; forget (and stop) those whose request was deleted."""
        try:
            entries = [e for e in self.keg.list(self.exec_dir) if e.kind == "file" and e.name.endswith(".json")]
        except NotFound:
            entries = []
        except KegError:
            self._exec_dirty.set()
            return  # the master is away: running execs go on, new ones wait
        self._execs_read = True
        wanted = {e.name[:-5]: e for e in entries}
        for ident, ex in list(self.execs.items()):
            if ident not in wanted:
                ex.kill()
                del self.execs[ident]
                self.queue_bytes(f"{self.status}/exec/{ident}.json", None)
        try:
            done = {e.name[:-5]: e for e in self.keg.list(f"{self.status}/exec")}
        except KegError:
            done = {}
        for ident, entry in sorted(wanted.items()):
            if ident in self.execs:
                continue
            ex = _Exec(ident)
            self.execs[ident] = ex
            if ident in done:  # carried out before this Mayor started: say so if it never finished
                try:
                    result = json.loads(self.keg.read(done[ident].path))
                except (KegError, ValueError):
                    result = {}
                if result.get("state") == "running":
                    ex.fail("the Mayor restarted while the command ran; its output after that is lost")
                    self.queue(f"{self.status}/exec/{ident}.json", ex.result())
                else:
                    ex.state = result.get("state", "exited")
                continue
            try:
                request = json.loads(self.keg.read(entry.path))
                proc, args, timeout = _check_exec_request(request)
                ex.proc = proc
                ex.start(self.runtime.exec(proc, args, timeout), timeout, self.clock())
                _log(f"exec {ident} in {proc}: {' '.join(args)}")
            except (ValueError, UnicodeDecodeError) as err:
                ex.fail(f"{entry.path} is not a valid exec request: {err}")
            except KegError as err:
                ex.fail(str(err))
            self.queue(f"{self.status}/exec/{ident}.json", ex.result())

    def poll_execs(self) -> None:
        """Collect exec output, end the ones past their timeout, queue their results."""
        for ident, ex in self.execs.items():
            if ex.state != "running":
                continue
            if ex.poll(self.clock()):
                self.queue(f"{self.status}/exec/{ident}.json", ex.result())

    # -------------------------------------------------------------------- run

    def tick(self) -> None:
        """Between steps: publish new log output, exec output and changed container states."""
        self.poll_execs()
        self.report(self.last_desired, self.last_actions)
        self.publish()


    def _watch(self, stop: threading.Event, since) -> None:
        """Wake the loop on changes to this machine's process table and exec requests (not its own status).

        Follows from ``since`` (the revision before the first table read), and after a lost stream from
        the last revision seen, so no change is missed between a read and the watch.
        """
        mine = f"/machines/{self.name}"
        while not stop.is_set():
            try:
                for event in self.keg.watch(mine, since=since, timeout=RESYNC_SECONDS):
                    since = event.revision
                    if stop.is_set():
                        return
                    if paths.is_under(event.path, self.procs):
                        self._table_dirty.set()
                    elif paths.is_under(event.path, self.exec_dir):
                        self._exec_dirty.set()
                    else:
                        continue
                    self.changed.set()
                    self.runtime.wake()
            except KegError:
                since = None  # (the revision may be past what the master keeps) the re-read covers the gap
                self._table_dirty.set()  # events may have been missed: read everything on the next step
                self._exec_dirty.set()
                self.changed.set()
                stop.wait(1.0)

    def run(self, stop: threading.Event) -> None:
        """Step on every table change, container exit, back-off end and every ``RESYNC_SECONDS``; tick between."""
        registered = False
        try:
            since = self.keg.revision().number
        except KegError:
            since = None  # the master is away: the first table read happens when it answers
        watcher = threading.Thread(target=self._watch, args=(stop, since), daemon=True, name="mayor-watch")
        self._table_dirty.set()
        self._watching = True
        watcher.start()
        while not stop.is_set():
            self.changed.clear()
            if not registered:
                try:
                    self.register()
                    registered = True
                except KegError as err:
                    _log(f"cannot register yet: {err}")
            try:
                self.step()
            except KegError as err:
                _log(f"step failed: {err}")
            deadline = self.clock() + RESYNC_SECONDS
            if self.last_actions.wake_at is not None:
                deadline = min(deadline, self.last_actions.wake_at)
            next_tick = self.clock() + TICK_SECONDS
            while not stop.is_set() and not self.changed.is_set() and self.clock() < deadline:
                exited = self.runtime.wait(max(0.0, min(next_tick, deadline) - self.clock()))
                if exited:
                    break
                if self.clock() >= next_tick:
                    try:
                        self.tick()
                    except KegError as err:
                        _log(f"publishing failed: {err}")
                    next_tick = self.clock() + (TICK_SECONDS if self._busy() else self.heartbeat_seconds / 2)
        for ex in self.execs.values():
            ex.kill()

    def stop_all(self, grace: float | None = None) -> int:
        """Stop and remove every container of this machine (``keg mayor run --stop-on-exit``); returns how many.

        Not what a Mayor does on a plain exit — containers outlive it and are
        adopted by the next start — but what ``keg up`` wants on Ctrl-C: nothing
        left running. Their status objects are removed while the master answers.
        """
        actual = self.runtime.actual()
        for wait in (False, True):  # ask them all, then wait for each: one grace in all, not one each
            for name, have in sorted(actual.items()):
                try:
                    if have.state == "running":
                        self.runtime.stop(have.container, grace, wait=wait)
                    if wait:
                        self.runtime.remove(have.container)
                except KegError as err:
                    _log(f"cannot stop {name}: {err}")
        gone = tuple(delete(f"{self.status}/{n}.json") for n in sorted(actual)
                     if f"{self.status}/{n}.json" in self.published)
        if gone:
            try:
                self.keg.apply(Transaction(gone))
            except KegError:
                pass    # the master may be gone already; the next start publishes afresh
        return len(actual)

    def _busy(self) -> bool:
        """True while output may be arriving: a process is running or an exec is."""
        return any(ex.state == "running" for ex in self.execs.values()) or any(
            a.state == "running" for a in self.runtime.actual().values())


def _check_exec_request(request) -> tuple:
    """``(proc, args, timeout)`` of an exec request, or ValueError saying what is wrong."""
    if not isinstance(request, dict):
        raise ValueError("an exec request is a JSON object")
    proc, args, timeout = request.get("proc"), request.get("args"), request.get("timeout", 60)
    if not isinstance(proc, str) or not proc:
        raise ValueError("proc must name a process")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise ValueError("args must be a non-empty list of strings")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
        raise ValueError("timeout must be a number of seconds between 0 and 86400")
    return proc, args, float(timeout)


class _Exec:
    """One exec request as the Mayor carries it out."""

    def __init__(self, ident: str):
        self.ident, self.proc = ident, None
        self.state, self.exit_code, self.error = "running", None, None
        self.output, self.dropped = bytearray(), 0
        self.handle, self.deadline = None, None

    def start(self, handle, timeout: float, now: float) -> None:
        self.handle, self.deadline = handle, now + timeout

    def fail(self, error: str) -> None:
        self.state, self.error = "failed", error

    def _add(self, data: bytes) -> None:
        self.output += data
        if len(self.output) > EXEC_OUTPUT:
            cut = len(self.output) - EXEC_OUTPUT
            del self.output[:cut]
            self.dropped += cut

    def poll(self, now: float) -> bool:
        """Collect what is new; True when the result changed."""
        data, code = self.handle.poll()
        if data:
            self._add(data)
        if code is not None:
            self.state, self.exit_code = "exited", code
            return True
        if now >= self.deadline:
            self.handle.kill()
            self.fail("timed out; the command was killed")
            return True
        return bool(data)

    def kill(self) -> None:
        if self.handle is not None and self.state == "running":
            self.handle.kill()

    def result(self) -> dict:
        return {"id": self.ident, "proc": self.proc, "state": self.state, "exit_code": self.exit_code,
                "error": self.error, "output": self.output.decode("utf-8", "replace"),
                "output_dropped": self.dropped}
