"""The Mayor's loop: read the machine's process table, plan, apply, report (DESIGN §5).

One ``Mayor`` per machine.  ``step()`` is one full turn and is what tests
call by hand; ``run()`` calls it on every change to the process table (the
master's watch stream), whenever a container exits, when a back-off ends,
and on a timer as a safety net.

Integrity on its own: the last process table read is kept in
``DATA/desired.json``, so with the master unreachable (or after a restart
while it is) the Mayor keeps supervising what it was told; status changes
wait in ``DATA/outbox.json`` and are published, newest value per path, when
the master answers again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import kid as kidlib
from keg.errors import KegError, NotFound
from keg.fsio import write_file_atomic
from keg.transaction import Delete, Transaction, delete, put
from mayor.plan import Actions, Desired, RESTART_POLICIES, failures_after_exit, plan

RESYNC_SECONDS = 30.0
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
    """

    def __init__(self, keg, name: str, runtime, data_dir: str, labels=None, clock=time.time):
        self.keg, self.name, self.runtime = keg, name, runtime
        self.data_dir = data_dir
        self.labels = dict(labels or {})
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
        os.makedirs(data_dir, exist_ok=True)
        self._load_outbox()

    # ----------------------------------------------------------- registration

    def machine_object(self) -> dict:
        """What ``machine.json`` says about this machine."""
        return {"name": self.name, "kid": self.machine_kid, "cpus": os.cpu_count() or 1,
                "memory": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "labels": self.labels,
                "runtime": getattr(self.runtime, "version", type(self.runtime).__name__)}

    def register(self) -> None:
        """Write ``/machines/<name>/machine.json`` (kept as is when it already says the same)."""
        body = (json.dumps(self.machine_object(), indent=2, sort_keys=True) + "\n").encode()
        path = f"/machines/{self.name}/machine.json"
        try:
            if self.keg.read(path) == body:
                return
        except NotFound:
            pass
        result = self.keg.apply(Transaction((put(path, body),)))
        if not result.ok:
            raise result.error

    # ---------------------------------------------------------------- desired

    def _cache_path(self) -> str:
        return os.path.join(self.data_dir, "desired.json")

    def read_desired(self) -> dict:
        """``{name: (Desired, spec)}`` from the process table; from the local copy when the master is away."""
        try:
            table = self._read_table()
        except KegError as err:
            return self._cached_desired(err)
        write_file_atomic(self._cache_path(), json.dumps(table).encode(), durable=False)
        return {n: (self._desired(n, v["kid"], v["spec"]), v["spec"]) for n, v in table.items()}

    def _read_table(self) -> dict:
        try:
            entries = self.keg.list(self.procs)
        except NotFound:
            return {}
        table = {}
        for entry in entries:
            if entry.kind != "file" or not entry.name.endswith(".json"):
                continue
            name = entry.name[:-len(".json")]
            try:
                spec = json.loads(self.keg.read(entry.path))
                if not isinstance(spec, dict):
                    raise ValueError("a process spec is a JSON object")
            except NotFound:
                continue  # removed since the listing
            except (ValueError, UnicodeDecodeError) as err:
                self.errors[name] = f"{entry.path} is not a valid spec: {err}"
                continue
            if self.errors.get(name, "").startswith(entry.path):
                del self.errors[name]  # the spec was fixed
            table[name] = {"kid": entry.kid, "spec": spec}
        return table

    def _cached_desired(self, why) -> dict:
        try:
            with open(self._cache_path(), encoding="utf-8") as f:
                table = json.load(f)
        except FileNotFoundError:
            table = {}
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
        """One turn: read, plan, apply, report. Returns the plan it carried out."""
        now = self.clock()
        desired = self.read_desired()
        actual = {n: dataclasses.replace(a, failures=self.failures.get(n, 0))
                  for n, a in self.runtime.actual().items()}
        for name, have in actual.items():
            if have.state == "exited" and have.container not in self._counted:
                self._counted.add(have.container)
                self.failures[name] = failures_after_exit(self.failures.get(name, 0), have.started, have.exited or now)
                actual[name] = dataclasses.replace(have, failures=self.failures[name])
        actions = plan({n: d for n, (d, _) in desired.items()}, actual, now)
        for line in actions.describe():
            _log(line)
        self.apply(actions, {n: s for n, (_, s) in desired.items()})
        self.last_actions = actions
        self.report({n: d for n, (d, _) in desired.items()}, actions)
        self.publish()
        return actions

    def apply(self, actions: Actions, specs: dict) -> None:
        """Carry out the steps in order; a step that fails is recorded in that process's status."""
        for step in actions.steps:
            try:
                if step.kind == "stop":
                    self.runtime.stop(step.container)
                elif step.kind == "remove":
                    self.runtime.remove(step.container)
                    self._counted.discard(step.container)
                elif step.kind == "start":
                    self.runtime.start(step.name, step.spec_kid, specs[step.name])
                    self.errors.pop(step.name, None)
            except KegError as err:
                self.errors[step.name] = str(err)
                _log(f"{step.kind} {step.name} failed: {err}")

    # ----------------------------------------------------------------- status

    def report(self, desired: dict, actions: Actions) -> None:
        """Queue one status object per process, and the Mayor's own heartbeat."""
        actual = self.runtime.actual()
        holding = dict(actions.holding)
        for name in sorted(set(desired) | set(actual) | set(self.errors)):
            have = actual.get(name)
            state = have.state if have is not None else "pending"
            if name in self.errors:
                state = "failed"
            elif have is not None and have.state == "exited" and name in holding and "back-off" in holding[name]:
                state = "backoff"
            obj = {"name": name, "state": state, "spec_kid": getattr(desired.get(name), "spec_kid", None),
                   "restarts": self.failures.get(name, 0), "last_error": self.errors.get(name)}
            if have is not None:
                obj.update({"container": have.container, "exit_code": have.exit_code, "started": have.started,
                            "exited": have.exited, "oom": have.oom})
            self.queue(f"{self.status}/{name}.json", obj)
        gone = [p for p in self._published_names() if p not in desired and p not in actual]
        for name in gone:
            self.outbox[f"{self.status}/{name}.json"] = None
        self.queue(f"{self.status}/mayor.json", {"version": VERSION, "heartbeat": self.clock(),
                                                 "processes": len(actual)})

    def _published_names(self) -> list:
        try:
            return [e.name[:-5] for e in self.keg.list(self.status) if e.name.endswith(".json")
                    and e.name != "mayor.json"]
        except KegError:
            return []

    def queue(self, path: str, obj: dict) -> None:
        """Queue a status object (the newest per path wins)."""
        self.outbox[path] = (json.dumps(obj, sort_keys=True) + "\n").encode()

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
        try:
            current = {e.path for e in self.keg.list(self.status)}
        except NotFound:
            current = set()
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

    # -------------------------------------------------------------------- run

    def _watch(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                for _event in self.keg.watch(self.procs, timeout=RESYNC_SECONDS):
                    self.changed.set()
                    if stop.is_set():
                        return
            except KegError:
                stop.wait(1.0)

    def run(self, stop: threading.Event) -> None:
        """Step on every table change, container exit, back-off end and every ``RESYNC_SECONDS``."""
        try:
            self.register()
        except KegError as err:
            _log(f"cannot register yet: {err}")
        watcher = threading.Thread(target=self._watch, args=(stop,), daemon=True, name="mayor-watch")
        watcher.start()
        while not stop.is_set():
            self.changed.clear()
            try:
                self.step()
            except KegError as err:
                _log(f"step failed: {err}")
            deadline = self.clock() + RESYNC_SECONDS
            if self.last_actions.wake_at is not None:
                deadline = min(deadline, self.last_actions.wake_at)
            while not stop.is_set() and not self.changed.is_set() and self.clock() < deadline:
                if self.runtime.wait(min(0.5, max(0.0, deadline - self.clock()))):
                    break
