"""The scheduler: places the replicas of ``/jobs/`` onto machines (DESIGN §1.3, §7; docs/scheduler.md).

Decide, then act.  :func:`place` is a pure function of the jobs, the
machines (capacity, labels, heartbeat), the process tables with their status
and the time; it returns a :class:`Decision`, a plain record of the replicas
to place, remove and evict and of what to report per job.
:func:`service_tables` computes ``/services/<service>.tsv`` the same way, and
:func:`decision_transaction` turns both into the one guarded transaction
that the loop writes.  :class:`Scheduler` is the loop: it keeps a copy of the
paths it reads (``Mirror``), catches up by ``diff`` on every step, and steps
when the master's watch stream shows a change and at least every second (a
lease expires with time, not with a write).

What it owns: ``/machines/<m>/procs/<job>-<suffix>.json`` entries whose
``job`` names a job, ``/machines/<m>/evicted/``, ``/services/`` and
``/scheduler/``.  Every other process table entry (written by people or
scripts) is left alone, and counts against its machine's capacity and ports.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import math
import re
import time
from dataclasses import dataclass, field

import kid as kidlib
from keg.errors import BadRequest, KegError, NotFound
from keg.transaction import Transaction, compare, delete, put
from mayor.runtime_spec import SpecError, parse_memory, validate_spec

LEASE_TTL = 30.0               # seconds a heartbeat keeps a machine alive (--lease-ttl)
PORT_RANGE = (20000, 29999)    # ports given to replicas of jobs with "port": true (--ports)
DEFAULT_ADDRESS = "127.0.0.1"  # a machine.json without "address"
SUFFIX_HEX = 5                 # replica names are <job>-<5 hex digits>
MAX_JOB_NAME = 63 - 1 - SUFFIX_HEX  # so that a replica's name is a valid process name (63 at most)
MAX_REPLICAS = 100_000
NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")

# The fields of a job that are a process's (copied into every replica's spec); a change to any is a new
# release of the replicas (a rolling update).
PROCESS_FIELDS = ("image", "args", "env", "cwd", "user", "resources", "restart", "network", "health",
                  "mounts", "readonly_rootfs", "stop_grace", "stop_drain", "backoff", "init")
JOB_FIELDS = frozenset(PROCESS_FIELDS) | {"name", "app", "type", "release", "replicas", "constraints", "spread",
                                          "port", "service", "update"}
UPDATE_STRATEGIES = ("rolling",)
DEFAULT_UPDATE = {"strategy": "rolling", "max_surge": 1, "max_unavailable": 0}

JOBS = "/jobs"
MACHINES = "/machines"
SERVICES = "/services"
REPORTS = "/scheduler/jobs"
SERVICE_HEADER = "# machine\taddress\tport\tprocess\thealth\tjob\trelease\n"

_JOB_PATH = re.compile(r"^/jobs/([^/]+)\.json$")
_MACHINE_PATH = re.compile(r"^/machines/([^/]+)/machine\.json$")
_TABLE_PATH = re.compile(r"^/machines/([^/]+)/(procs|status)/([^/]+)\.json$")
_SERVICE_PATH = re.compile(r"^/services/([^/]+)\.tsv$")
_REPORT_PATH = re.compile(r"^/scheduler/jobs/([^/]+)\.json$")


def _log(message: str) -> None:
    print(f"keg scheduler: {message}", flush=True)


class JobError(BadRequest):
    """A job object that cannot be scheduled; the message names the field."""


# ------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class Job:
    """A validated job: what its replicas' specs hold and how to place and update them.

    ``template`` is the process part of every replica's spec (``job`` and
    ``release`` included; ``port`` and ``env.PORT`` are added per replica).
    """

    name: str
    replicas: int
    template: dict
    cpu: float = 0.0
    memory: int = 0
    labels: dict = field(default_factory=dict)
    spread: bool = True
    port: bool = False
    service: str | None = None
    max_surge: int = 1
    max_unavailable: int = 0

    @functools.cached_property
    def identity(self) -> tuple:
        """The :func:`identity` of its replicas' specs."""
        return identity(self.template)


@dataclass(frozen=True)
class InvalidJob:
    """A job object the scheduler cannot use: its replicas are left as they are, and the error reported."""

    name: str
    error: str


def check_name(name, what: str = "job name") -> str:
    """A name of a job, app or service: ``[a-z][a-z0-9-]*``, a DNS label.

    Raises:
        JobError: it is not one.
    """
    limit = MAX_JOB_NAME if what == "job name" else 63
    if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > limit:
        raise JobError(f"{what} {name!r} is not valid: use lowercase letters, digits and '-', starting with a "
                       f"letter, at most {limit} characters")
    return name


def _check_labels(labels, where: str) -> dict:
    if not isinstance(labels, dict):
        raise JobError(f'{where} must be an object like {{"zone": "a"}}, not {labels!r}')
    for key, value in labels.items():
        if not LABEL_RE.match(key) or not isinstance(value, str):
            raise JobError(f"{where}: {key!r}: {value!r} is not a label (a name and a string value)")
    return dict(labels)


def _check_update(update) -> dict:
    if update is None:
        return dict(DEFAULT_UPDATE)
    if not isinstance(update, dict):
        raise JobError(f'update must be an object like {{"strategy": "rolling", "max_surge": 1}}, not {update!r}')
    unknown = set(update) - set(DEFAULT_UPDATE)
    if unknown:
        raise JobError(f"unknown keys in update: {sorted(unknown)}; known: {', '.join(DEFAULT_UPDATE)}")
    out = {**DEFAULT_UPDATE, **update}
    if out["strategy"] not in UPDATE_STRATEGIES:
        raise JobError(f"update.strategy {out['strategy']!r} is not known; use {', '.join(UPDATE_STRATEGIES)}")
    for key in ("max_surge", "max_unavailable"):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPLICAS:
            raise JobError(f"update.{key} must be a whole number of replicas (0 or more), not {value!r}")
    if out["max_surge"] + out["max_unavailable"] == 0:
        raise JobError("update.max_surge and update.max_unavailable are both 0: an update could never start; "
                       "give max_surge 1 (start a new replica before removing an old one)")
    return out


def _check_health(health):
    """The job's health check in the Mayor's form: ``"http": "/path"`` becomes ``{"path": "/path"}``
    (the Mayor checks the process's own port)."""
    if isinstance(health, dict) and isinstance(health.get("http"), str):
        return {**health, "http": {"path": health["http"]}}
    return health


def check_job(name: str, obj) -> Job:
    """Validate a job object (``/jobs/<name>.json``) before anything is written or placed.

    Args:
        name: the job's name (its file name without ``.json``).
        obj: the parsed JSON.

    Returns:
        The :class:`Job`.

    Raises:
        JobError: what is wrong, naming the field.
    """
    check_name(name)
    if not isinstance(obj, dict):
        raise JobError(f"job {name}: a job is a JSON object, not {type(obj).__name__}")
    try:
        return _check_job(name, obj)
    except SpecError as err:
        raise JobError(f"job {name}: {err}") from err
    except JobError as err:
        raise JobError(f"job {name}: {err}") from err


def _check_job(name: str, obj: dict) -> Job:
    if "name" in obj and obj["name"] != name:
        raise JobError(f"name {obj['name']!r} differs from the job's path name {name!r}")
    for key in ("app", "type"):
        if obj.get(key) is not None:
            check_name(obj[key], key)
    image = obj.get("image")
    if image is None:
        raise JobError("image is missing: give the image KID (K-…, the KID of an /oci-images/NAME/TAG directory)")
    try:
        kidlib.parse(image) if isinstance(image, str) else None
    except kidlib.KidError as err:
        raise JobError(f"image {image!r} is not a KID: {err}") from err
    if not isinstance(image, str):
        raise JobError(f"image must be a KID string, not {image!r}")
    replicas = obj.get("replicas")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 0 <= replicas <= MAX_REPLICAS:
        raise JobError(f"replicas must be a whole number from 0 to {MAX_REPLICAS}, not {replicas!r}")
    release = obj.get("release")
    if release is not None and (isinstance(release, bool) or not isinstance(release, (int, str))):
        raise JobError(f"release must be a number or a string, not {release!r}")
    constraints = obj.get("constraints") or {}
    if not isinstance(constraints, dict) or set(constraints) - {"labels"}:
        raise JobError(f'constraints must be an object like {{"labels": {{"zone": "a"}}}}, not {constraints!r}')
    labels = _check_labels(constraints.get("labels") or {}, "constraints.labels")
    for key in ("spread", "port"):
        if key in obj and not isinstance(obj[key], bool):
            raise JobError(f"{key} must be true or false, not {obj[key]!r}")
    port = obj.get("port", False)
    service = obj.get("service")
    if service is not None:
        check_name(service, "service")
        if not port:
            raise JobError('service names where the replicas\' ports are published: it needs "port": true')
    if port and obj.get("network", "host") != "host":
        raise JobError(f'network {obj["network"]!r} does not fit "port": true: a replica\'s port is reached at '
                       'its machine\'s address, so the job needs network "host" (leave network out)')
    update = _check_update(obj.get("update"))
    template = {k: obj[k] for k in PROCESS_FIELDS if obj.get(k) is not None}
    if "health" in template:
        template["health"] = _check_health(template["health"])
    if port:
        template["network"] = "host"
    env = template.get("env")
    if isinstance(env, dict) and "PORT" in env and port:
        raise JobError('env.PORT is set by the scheduler for a job with "port": true; leave it out')
    checked = validate_spec({**template, "port": PORT_RANGE[0]} if port else template)
    template["job"] = name
    if port:
        template["service"] = service or name
    if release is not None:
        template["release"] = release
    resources = checked["resources"]
    return Job(name, replicas, template, float(resources["cpu"] or 0.0), int(resources["memory"] or 0), labels,
               obj.get("spread", True), port, (service or name) if port else None,
               update["max_surge"], update["max_unavailable"])


def unknown_fields(obj: dict) -> list:
    """Top-level fields of a job object the scheduler does not read (kept, but perhaps a typo)."""
    return sorted(set(obj) - JOB_FIELDS) if isinstance(obj, dict) else []


# -------------------------------------------------------------- machines


@dataclass(frozen=True)
class Machine:
    """A machine as the scheduler sees it: capacity, labels, address, and its Mayor's last heartbeat."""

    name: str
    cpus: float = 0.0
    memory: int = 0
    labels: dict = field(default_factory=dict)
    address: str = DEFAULT_ADDRESS
    heartbeat: float | None = None
    unschedulable: bool = False
    problem: str | None = None   # machine.json could not be read: nothing is placed here


def machine_from(name: str, obj, heartbeat) -> Machine:
    """A :class:`Machine` from ``machine.json`` (None when absent) and the heartbeat of ``status/mayor.json``."""
    beat = heartbeat if isinstance(heartbeat, (int, float)) and not isinstance(heartbeat, bool) else None
    if not isinstance(obj, dict):
        return Machine(name, heartbeat=beat, unschedulable=True,
                       problem="no machine.json" if obj is None else "machine.json is not a JSON object")
    try:
        cpus = obj.get("cpus", 0)
        if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not math.isfinite(cpus) or cpus < 0:
            raise ValueError(f"cpus {cpus!r} is not a number of cores")
        memory = parse_memory(obj.get("memory", 0))
        labels = obj.get("labels") or {}
        if not isinstance(labels, dict):
            raise ValueError(f"labels {labels!r} is not an object")
        address = obj.get("address") or DEFAULT_ADDRESS
        if not isinstance(address, str):
            raise ValueError(f"address {address!r} is not a string")
    except (ValueError, SpecError) as err:
        return Machine(name, heartbeat=beat, unschedulable=True, problem=f"machine.json: {err}")
    return Machine(name, float(cpus), memory, {str(k): v for k, v in labels.items()}, address, beat,
                   obj.get("unschedulable") is True)


def alive(machine: Machine | None, now: float, lease_ttl: float) -> bool:
    """True while the machine's lease (last heartbeat plus ``lease_ttl``) has not run out."""
    return machine is not None and machine.heartbeat is not None and machine.heartbeat + lease_ttl >= now


# ----------------------------------------------------------------- procs


@dataclass(frozen=True)
class Proc:
    """One entry of a machine's process table, with the status its Mayor reported (None before any).

    ``spec`` is None when the entry is not a JSON object (it counts for nothing).
    """

    machine: str
    name: str
    kid: str | None
    spec: dict | None
    status: dict | None = None

    @functools.cached_property
    def job(self) -> str | None:
        """The job this entry is a replica of, when the scheduler made it (``<job>-<suffix>`` with ``job``)."""
        job = self.spec.get("job") if self.spec else None
        if isinstance(job, str) and self.name.startswith(job + "-") and len(self.name) > len(job) + 1:
            return job
        return None


def spec_cpu(spec) -> float:
    """The cores a spec asks for (0 when it says nothing or nonsense)."""
    resources = spec.get("resources") if isinstance(spec, dict) else None
    cpu = resources.get("cpu") if isinstance(resources, dict) else None
    if isinstance(cpu, bool) or not isinstance(cpu, (int, float)) or not math.isfinite(cpu) or cpu < 0:
        return 0.0
    return float(cpu)


def spec_memory(spec) -> int:
    """The bytes of memory a spec asks for (0 when it says nothing or nonsense)."""
    resources = spec.get("resources") if isinstance(spec, dict) else None
    memory = resources.get("memory") if isinstance(resources, dict) else None
    if memory is None:
        return 0
    try:
        return parse_memory(memory)
    except SpecError:
        return 0


def spec_port(spec):
    """The integer ``port`` of a spec, or None."""
    port = spec.get("port") if isinstance(spec, dict) else None
    return port if isinstance(port, int) and not isinstance(port, bool) else None


def replica_health(proc: Proc) -> str | None:
    """``healthy``, ``starting`` or ``unhealthy`` for a running replica of the current spec; None otherwise."""
    status = proc.status
    if not isinstance(status, dict) or status.get("state") != "running":
        return None
    if status.get("spec_kid") not in (None, proc.kid):
        return None  # the Mayor has not reported on this spec yet
    health = status.get("health")
    return "healthy" if health in (None, "healthy") else str(health)


_IDENTITY_FIELDS = (*PROCESS_FIELDS, "release")
_ENV = _IDENTITY_FIELDS.index("env")


def identity(spec: dict) -> tuple:
    """What makes a replica's spec the job's current one: its process fields and release, not its port (nor
    ``env.PORT``)."""
    ident = tuple(map(spec.get, _IDENTITY_FIELDS))
    env = ident[_ENV]
    if isinstance(env, dict):   # an empty env is no env, whichever way the job wrote it
        env = {k: v for k, v in env.items() if k != "PORT"} or None
        ident = ident[:_ENV] + (env,) + ident[_ENV + 1:]
    return ident


# --------------------------------------------------------------- decision


@dataclass(frozen=True)
class Placement:
    """Write a new replica ``name`` of ``job`` on ``machine`` (its path must be absent)."""

    machine: str
    name: str
    job: str
    spec: dict
    why: str


@dataclass(frozen=True)
class Removal:
    """Delete the replica ``name`` from ``machine`` (its spec must still be ``kid``)."""

    machine: str
    name: str
    job: str | None
    kid: str
    why: str


@dataclass(frozen=True)
class Eviction:
    """Delete the replica ``name`` from a dead ``machine`` and record it under ``evicted/``."""

    machine: str
    name: str
    job: str
    kid: str
    spec: dict
    why: str


@dataclass(frozen=True)
class Decision:
    """What one turn of the scheduler decided; ``reports`` is the view written to ``/scheduler/jobs/``."""

    placements: tuple = ()
    removals: tuple = ()
    evictions: tuple = ()
    reports: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.placements or self.removals or self.evictions)

    def describe(self) -> list:
        """One line per change, for the log."""
        lines = [f"evict {e.name} from {e.machine}: {e.why}" for e in self.evictions]
        lines += [f"remove {r.name} from {r.machine}: {r.why}" for r in self.removals]
        lines += [f"place {p.name} on {p.machine}: {p.why}" for p in self.placements]
        lines += [f"job {name}: {r['problem']}" for name, r in sorted(self.reports.items()) if r.get("problem")]
        return lines


class _Usage:
    """What is placed on each machine: cores, bytes, processes, ports, and replicas per job."""

    def __init__(self, machines: dict, procs: list, ports: tuple):
        self.machines = machines
        self.cpu = dict.fromkeys(machines, 0.0)
        self.memory = dict.fromkeys(machines, 0)
        self.count = dict.fromkeys(machines, 0)
        self.ports: dict = {m: set() for m in machines}
        self.port_range = ports
        for proc in procs:
            if proc.machine not in machines or proc.spec is None:
                continue
            self.add(proc.machine, spec_cpu(proc.spec), spec_memory(proc.spec), spec_port(proc.spec))

    def add(self, machine: str, cpu: float, memory: int, port) -> None:
        self.cpu[machine] += cpu
        self.memory[machine] += memory
        self.count[machine] += 1
        if port is not None:
            self.ports[machine].add(port)

    def load(self, machine: str) -> float:
        m = self.machines[machine]
        cpu = self.cpu[machine] / m.cpus if m.cpus else (math.inf if self.cpu[machine] else 0.0)
        memory = self.memory[machine] / m.memory if m.memory else (math.inf if self.memory[machine] else 0.0)
        return max(cpu, memory)

    def fits(self, machine: str, cpu: float, memory: int) -> bool:
        m = self.machines[machine]
        # A little slack for the sum of float cores (0.1 * 3 > 0.3): never more than a millicore.
        return self.cpu[machine] + cpu <= m.cpus + 1e-9 and self.memory[machine] + memory <= m.memory

    def free_port(self, machine: str, seed: str = ""):
        """A free port of the range on ``machine`` (not reserved; ``add`` does that), or None.

        The search starts at a place derived from ``seed`` (the replica's name) and wraps around, so that
        a replica rarely gets the port of one just removed, whose process may still be stopping.
        """
        used = self.ports[machine]
        low, high = self.port_range
        size = high - low + 1
        if len(used) >= size:
            return None
        start = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=4).digest(), "big") % size if seed else 0
        for i in range(size):
            port = low + (start + i) % size
            if port not in used:
                return port
        return None


def _suffix_names(job: str, now: float, taken: set):
    """Replica names ``<job>-<5 hex>``, derived from the job and the time (``place`` stays pure), never one in
    ``taken``."""
    n = 0
    while True:
        digest = hashlib.blake2b(f"{job}\0{now!r}\0{n}".encode(), digest_size=8).hexdigest()[:SUFFIX_HEX]
        n += 1
        name = f"{job}-{digest}"
        if name not in taken:
            taken.add(name)
            yield name


def _matches(job: Job, machine: Machine) -> bool:
    return all(machine.labels.get(k) == v for k, v in job.labels.items())


class _Turn:
    """The working state of one call of :func:`place`."""

    def __init__(self, jobs: dict, machines: dict, procs: list, now: float, lease_ttl: float, ports: tuple):
        self.jobs, self.now, self.lease_ttl = jobs, now, lease_ttl
        self.machines = machines
        self.alive = {m for m, machine in machines.items() if alive(machine, now, lease_ttl)}
        self.usage = _Usage(machines, procs, ports)
        self.taken = {p.name for p in procs}
        self.placements, self.removals, self.evictions = [], [], []
        self.replicas: dict = {}   # job -> [Proc]; entries no job owns count only in usage and names
        for proc in procs:
            if proc.job is not None:
                self.replicas.setdefault(proc.job, []).append(proc)

    # -------------------------------------------------------------- a job

    def schedule(self, job: Job) -> dict:
        """Evict, remove and place the replicas of one job; returns its report."""
        replicas = self.replicas.get(job.name, [])
        live = []
        for proc in replicas:
            if proc.machine in self.alive:
                live.append(proc)
            else:
                self.evict(proc)
        fresh, stale = [], []
        for proc in live:
            machine = self.machines[proc.machine]
            ok = identity(proc.spec) == job.identity and not machine.unschedulable and _matches(job, machine)
            (fresh if ok else stale).append(proc)
        healthy = {p.name for p in live if replica_health(p) == "healthy"}
        per_machine: dict = {}
        for proc in live:
            per_machine[proc.machine] = per_machine.get(proc.machine, 0) + 1

        def worst_first(proc: Proc):  # which replica to let go of first
            return (proc.name in healthy, -per_machine[proc.machine], -self.usage.load(proc.machine), proc.name)

        # Too many current replicas (scaled down): let go of the surplus.
        if len(fresh) > job.replicas:
            fresh = self.scale_down(fresh, job.replicas, healthy, per_machine)
        # Old replicas (another release, a machine being drained, labels that no longer match): let one go
        # only while enough healthy replicas stay.
        stale.sort(key=worst_first)
        available = len(healthy & {p.name for p in fresh + stale})
        kept_stale = []
        for proc in stale:
            if proc.name not in healthy:
                self.remove(proc, self._stale_why(job, proc), per_machine)
            elif available - 1 >= job.replicas - job.max_unavailable:
                available -= 1
                self.remove(proc, self._stale_why(job, proc), per_machine)
            else:
                kept_stale.append(proc)
        need = job.replicas - len(fresh)
        room = job.replicas + job.max_surge - len(fresh) - len(kept_stale)
        count = max(0, min(need, room))
        why = "rolling update" if kept_stale else ("replacing an evicted replica" if any(
            e.job == job.name for e in self.evictions) else "scaling up")
        placed, problem = self.place_new(job, count, fresh, per_machine, why)
        if count and not placed and kept_stale and all(p.name in healthy for p in fresh):
            # No room to start a new replica beside the old ones: replace an old one in place.
            victim = self._room_maker(job, kept_stale)
            if victim is not None:
                kept_stale.remove(victim)
                self.remove(victim, f"{self._stale_why(job, victim)}; no room for a new replica beside it",
                            per_machine)
                problem = None
        if problem is None and kept_stale:
            pending = [p.name for p in fresh if p.name not in healthy]
            if pending:
                problem = f"rolling update: waiting for {', '.join(sorted(pending)[:3])} to be healthy"
        return self.report(job, fresh, kept_stale, placed, count - placed, problem)

    def scale_down(self, fresh: list, keep: int, healthy: set, per_machine: dict) -> list:
        """Remove all but ``keep`` of ``fresh``: unhealthy ones first, then one at a time from the machine with
        the most replicas of the job (the most loaded among equals), so what stays is spread. Returns what stays."""
        surplus = len(fresh) - keep
        sick = sorted((p for p in fresh if p.name not in healthy), key=lambda p: (-per_machine[p.machine], p.name))
        for proc in sick[:surplus]:
            self.remove(proc, "scaled down", per_machine)
        gone = {p.name for p in sick[:surplus]}
        surplus -= len(gone)
        buckets: dict = {}
        for proc in sorted(fresh, key=lambda p: p.name, reverse=True):
            if proc.name not in gone:
                buckets.setdefault(proc.machine, []).append(proc)
        heap = [(-per_machine[m], -self.usage.load(m), m) for m in buckets]
        heapq.heapify(heap)
        while surplus > 0:
            _, load, m = heapq.heappop(heap)
            proc = buckets[m].pop()
            self.remove(proc, "scaled down", per_machine)
            gone.add(proc.name)
            surplus -= 1
            if buckets[m]:
                heapq.heappush(heap, (-per_machine[m], load, m))
        return [p for p in fresh if p.name not in gone]

    def _stale_why(self, job: Job, proc: Proc) -> str:
        machine = self.machines[proc.machine]
        if machine.unschedulable:
            return f"machine {proc.machine} is unschedulable (drain)"
        if not _matches(job, machine):
            return f"machine {proc.machine} no longer has the labels the job asks for"
        return f"replaced by release {job.template.get('release', '-')}"

    def _room_maker(self, job: Job, stale: list):
        for proc in stale:
            machine = self.machines[proc.machine]
            if machine.unschedulable or not _matches(job, machine):
                continue
            u = self.usage
            if (u.cpu[proc.machine] - spec_cpu(proc.spec) + job.cpu <= machine.cpus + 1e-9
                    and u.memory[proc.machine] - spec_memory(proc.spec) + job.memory <= machine.memory):
                return proc
        return None

    def report(self, job: Job, fresh: list, stale: list, placed: int, unplaced: int, problem) -> dict:
        replicas = {p.name: p.machine for p in fresh + stale}
        replicas.update({p.name: p.machine for p in self.placements[len(self.placements) - placed:]})
        return {"job": job.name, "wanted": job.replicas, "placed": len(replicas), "current": len(fresh) + placed,
                "unplaced": unplaced, "updating": bool(stale), "release": job.template.get("release"), "image": job.template["image"],
                "service": job.service, "problem": problem, "error": None,
                "replicas": dict(sorted(replicas.items()))}

    def evict(self, proc: Proc) -> None:
        machine = self.machines.get(proc.machine)
        if machine is None or machine.problem == "no machine.json":
            why = f"machine {proc.machine} is not registered (no machine.json)"
        elif machine.heartbeat is None:
            why = f"machine {proc.machine} has never sent a heartbeat"
        else:
            why = (f"machine {proc.machine}'s lease expired: last heartbeat {self.now - machine.heartbeat:.1f} s "
                   f"ago, lease {self.lease_ttl:g} s")
        self.evictions.append(Eviction(proc.machine, proc.name, proc.job, proc.kid, proc.spec, why))

    def remove(self, proc: Proc, why: str, per_machine: dict) -> None:
        self.removals.append(Removal(proc.machine, proc.name, proc.job, proc.kid, why))
        per_machine[proc.machine] -= 1

    # -------------------------------------------------------------- place

    def candidates(self, job: Job) -> list:
        return [m for m in self.alive if not self.machines[m].unschedulable and _matches(job, self.machines[m])]

    def place_new(self, job: Job, count: int, fresh: list, per_machine: dict, why: str) -> tuple:
        """Place ``count`` new replicas of ``job``; returns ``(placed, problem or None)``.

        With spread, a machine's key is the job's current replicas there, then all of them (old ones being
        replaced count second: the spread that matters is the one after the update), then its load.
        """
        if count <= 0:
            return 0, None
        candidates = self.candidates(job)
        usage = self.usage
        current: dict = {}
        for proc in fresh:
            current[proc.machine] = current.get(proc.machine, 0) + 1

        def key(m: str) -> tuple:
            if job.spread:
                return (current.get(m, 0), per_machine.get(m, 0), usage.load(m), usage.count[m], m)
            return (0, 0, usage.load(m), usage.count[m], m)

        heap = [key(m) for m in candidates]
        heapq.heapify(heap)
        names = _suffix_names(job.name, self.now, self.taken)
        placed, no_port = 0, 0
        while placed < count and heap:
            m = heapq.heappop(heap)[-1]
            if not usage.fits(m, job.cpu, job.memory):
                continue  # only gets fuller during this job's placements
            name = next(names)
            port = usage.free_port(m, name) if job.port else None
            if job.port and port is None:
                no_port += 1
                continue
            self.placements.append(Placement(m, name, job.name, self.spec(job, port), why))
            usage.add(m, job.cpu, job.memory, port)
            per_machine[m] = per_machine.get(m, 0) + 1
            current[m] = current.get(m, 0) + 1
            placed += 1
            heapq.heappush(heap, key(m))
        if placed == count:
            return placed, None
        return placed, self._unplaced_why(job, count - placed, candidates, no_port)

    def spec(self, job: Job, port) -> dict:
        spec = dict(job.template)
        if port is not None:
            spec["port"] = port
            spec["env"] = {**spec.get("env", {}), "PORT": str(port)}
        return spec

    def _unplaced_why(self, job: Job, missing: int, candidates: list, no_port: int) -> str:
        ask = f"{job.cpu:g} cpu and {job.memory} bytes of memory"
        if not self.alive:
            return f"{missing} replica(s) not placed: no machine is alive"
        if not candidates:
            labels = ", ".join(f"{k}={v}" for k, v in sorted(job.labels.items()))
            return (f"{missing} replica(s) not placed: no live, schedulable machine"
                    + (f" has the labels {labels}" if labels else ""))
        if no_port:
            return f"{missing} replica(s) not placed: no free port in {self.usage.port_range} on {no_port} machine(s)"
        return f"{missing} replica(s) not placed: none of the {len(candidates)} machine(s) that fit has {ask} free"


def place(jobs: dict, machines: dict, procs, now: float, lease_ttl: float = LEASE_TTL,
          ports: tuple = PORT_RANGE) -> Decision:
    """Decide where the replicas of every job run.

    A pure function: no I/O, no clock, no randomness (replica names are
    derived from the job and ``now``).

    Args:
        jobs: ``{name: Job or InvalidJob}``; an invalid job's replicas are left as they are.
        machines: ``{name: Machine}``.
        procs: every process table entry of every machine (:class:`Proc`), with its status.
        now: the time, in the heartbeats' seconds.
        lease_ttl: seconds a heartbeat keeps a machine alive.
        ports: the inclusive range of ports given to replicas.

    Returns:
        The :class:`Decision`. Replicas on machines whose lease expired are
        evicted; replicas of a job that no longer exists are removed; each job
        gets as many current replicas as it wants on live, schedulable
        machines with its labels, spread over machines, then on the least
        loaded, never beyond a machine's cpus or memory; an update replaces
        old replicas one ``max_surge`` at a time, an old one going only once
        enough new ones are healthy.
    """
    turn = _Turn(jobs, machines, list(procs), now, lease_ttl, ports)
    reports = {}
    for name in sorted(set(turn.replicas) - set(jobs)):
        for proc in turn.replicas[name]:
            if proc.machine in turn.alive:
                turn.removals.append(Removal(proc.machine, proc.name, name, proc.kid, f"job {name} was removed"))
            else:
                turn.evict(proc)
    for name in sorted(jobs):
        job = jobs[name]
        if isinstance(job, InvalidJob):
            kept = {p.name: p.machine for p in turn.replicas.get(name, [])}
            reports[name] = {"job": name, "error": job.error, "problem": f"not scheduled: {job.error}",
                             "replicas": dict(sorted(kept.items()))}
            continue
        reports[name] = turn.schedule(job)
    return Decision(tuple(turn.placements), tuple(turn.removals), tuple(turn.evictions), reports)


# --------------------------------------------------------------- services


def _endpoint(proc: Proc, machine: Machine | None) -> tuple:
    status = proc.status or {}
    endpoint = status.get("endpoint")
    if isinstance(endpoint, str) and ":" in endpoint:
        host, _, port = endpoint.rpartition(":")
        if port.isdigit():
            return host, int(port)
    return (machine.address if machine else DEFAULT_ADDRESS), spec_port(proc.spec)


def service_tables(jobs: dict, machines: dict, procs, gone=frozenset()) -> dict:
    """The text of ``/services/<service>.tsv`` for every service of a job with ``port: true``.

    A replica is listed under its job's ``service``, or, while its job is
    invalid, under the ``service`` its spec was made with (a typo in a job
    does not empty the service).

    Args:
        jobs: ``{name: Job or InvalidJob}``.
        machines: ``{name: Machine}``.
        procs: every process table entry, with status.
        gone: ``(machine, name)`` of entries being removed or evicted (not listed).

    Returns:
        ``{service: text}``: one line per running replica, ``health`` as the router reads it.
    """
    services: dict = {}
    for job in jobs.values():
        if isinstance(job, Job) and job.service:
            services.setdefault(job.service, [])
    for proc in procs:
        job = jobs.get(proc.job) if proc.job else None
        if job is None or (proc.machine, proc.name) in gone:
            continue
        service = job.service if isinstance(job, Job) else proc.spec.get("service")
        if not isinstance(service, str):
            continue
        lines = services.setdefault(service, [])
        health = replica_health(proc)
        address, port = _endpoint(proc, machines.get(proc.machine))
        if health is None or port is None:
            continue
        release = proc.spec.get("release")
        lines.append((proc.machine, address, port, proc.status.get("kid") or "-", health, proc.job,
                      "-" if release is None else str(release)))
    return {service: SERVICE_HEADER + "".join("\t".join(map(str, line)) + "\n" for line in sorted(lines))
            for service, lines in services.items()}


# ------------------------------------------------------------ transaction


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def decision_transaction(decision: Decision, services: dict, outputs: dict, now: float, encoded=None):
    """The one transaction that carries out a decision, or None when nothing changes.

    Process table changes are guarded: a new entry's path must be absent, a
    removed one must still have the KID the decision saw, so a concurrent
    writer makes the transaction fail (and the scheduler decide again)
    rather than be overwritten. Reports and service tables are written only
    when their bytes change.

    Args:
        decision: from :func:`place`.
        services: from :func:`service_tables`.
        outputs: ``{path: bytes}`` of what ``/services/`` and ``/scheduler/jobs/`` hold now.
        now: the time recorded in eviction records.
        encoded: ``{job: (report, bytes)}`` kept between calls, so that an unchanged report is not encoded
            again (the caller's; left out, every report is encoded).
    """
    ops, compares = [], []
    replaced = {}
    for p in decision.placements:
        replaced.setdefault(p.job, []).append(f"{p.name}@{p.machine}")
    for e in decision.evictions:
        path = f"{MACHINES}/{e.machine}/procs/{e.name}.json"
        ops.append(delete(path))
        compares.append(compare(path, e.kid))
        record = {"spec": e.spec, "spec_kid": e.kid, "machine": e.machine, "job": e.job, "reason": e.why,
                  "time": now, "replaced_by": replaced.get(e.job, [])}
        ops.append(put(f"{MACHINES}/{e.machine}/evicted/{e.name}.json", _json_bytes(record)))
    for r in decision.removals:
        path = f"{MACHINES}/{r.machine}/procs/{r.name}.json"
        ops.append(delete(path))
        compares.append(compare(path, r.kid))
    for p in decision.placements:
        path = f"{MACHINES}/{p.machine}/procs/{p.name}.json"
        ops.append(put(path, _json_bytes(p.spec)))
        compares.append(compare(path, None))
    encoded = {} if encoded is None else encoded
    wanted = {}
    for job, report in decision.reports.items():
        known = encoded.get(job)
        if known is None or known[0] != report:
            known = encoded[job] = (report, _json_bytes(report))
        wanted[f"{REPORTS}/{job}.json"] = known[1]
    for job in set(encoded) - set(decision.reports):
        del encoded[job]
    wanted.update({f"{SERVICES}/{service}.tsv": text.encode() for service, text in services.items()})
    for path, body in sorted(wanted.items()):
        if outputs.get(path) != body:
            ops.append(put(path, body))
    for path in sorted(set(outputs) - set(wanted)):
        ops.append(delete(path))
    if not ops:
        return None
    return Transaction(tuple(ops), tuple(compares))


# ------------------------------------------------------------------ state


_INVALID = object()


class Mirror:
    """The scheduler's copy of the paths it reads, at one revision of the namespace.

    ``values`` maps a path to ``(KID, value)``: parsed JSON for ``.json``
    (``_INVALID`` when it does not parse), bytes for ``.tsv``.  ``load`` reads
    everything once; ``catch_up`` reads only what ``diff`` says changed, and
    a value once read is known by its KID.
    """

    def __init__(self, keg):
        self.keg = keg
        self.values: dict = {}
        self.revision = None
        self._by_kid: dict = {}

    @staticmethod
    def relevant(path: str) -> bool:
        """True for the paths the scheduler reads."""
        return bool(_JOB_PATH.match(path) or _MACHINE_PATH.match(path) or _TABLE_PATH.match(path)
                    or _SERVICE_PATH.match(path) or _REPORT_PATH.match(path))

    def _parse(self, path: str, data: bytes):
        if _SERVICE_PATH.match(path) or _REPORT_PATH.match(path):
            return data  # the scheduler's own output: compared as bytes
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return _INVALID

    def _set(self, path: str, kid, rev) -> None:
        if kid is None:
            self.values.pop(path, None)
            return
        if kid not in self._by_kid:
            try:
                data = self.keg.read(path, rev=rev)
            except NotFound:
                self.values.pop(path, None)
                return
            self._by_kid[kid] = self._parse(path, data)
        self.values[path] = (kid, self._by_kid[kid])

    def _list(self, path: str, rev) -> list:
        try:
            return self.keg.list(path, rev=rev)
        except NotFound:
            return []

    def load(self) -> None:
        """Read every relevant path at the newest revision."""
        rev = self.keg.revision().number
        found = []
        for top in (JOBS, SERVICES, REPORTS):
            found += [(e.path, e.kid) for e in self._list(top, rev) if e.kind == "file"]
        for machine in self._list(MACHINES, rev):
            if machine.kind != "tree":
                continue
            for entry in self._list(machine.path, rev):
                if entry.kind == "file":
                    found.append((entry.path, entry.kid))
                elif entry.name in ("procs", "status"):
                    found += [(e.path, e.kid) for e in self._list(entry.path, rev) if e.kind == "file"]
        self.values = {}
        for path, kid in found:
            if self.relevant(path):
                self._set(path, kid, rev)
        self._forget_unused()
        self.revision = rev

    def catch_up(self) -> bool:
        """Bring the copy to the newest revision; True when a relevant path changed."""
        if self.revision is None:
            self.load()
            return True
        head = self.keg.revision().number
        if head == self.revision:
            return False
        changed = False
        for path, _, new in self.keg.diff(self.revision, head, "/"):
            if self.relevant(path) and self.values.get(path, (None,))[0] != new:
                self._set(path, new, head)
                changed = True
        self.revision = head
        if len(self._by_kid) > 2 * len(self.values) + 1000:
            self._forget_unused()
        return changed

    def wrote(self, ops, kids: dict) -> None:
        """Remember the values of a transaction just written, so reading them back costs nothing."""
        for op in ops:
            new = kids.get(op.path)
            if new is not None and hasattr(op, "data"):
                self._by_kid[new] = self._parse(op.path, op.data)

    def _forget_unused(self) -> None:
        used = {kid for kid, _ in self.values.values()}
        self._by_kid = {k: v for k, v in self._by_kid.items() if k in used}

    # ----------------------------------------------------------- views

    def inputs(self, job_cache: dict | None = None) -> tuple:
        """``(jobs, machines, procs, outputs)`` for :func:`place` and :func:`service_tables`."""
        job_cache = {} if job_cache is None else job_cache
        jobs, machine_objs, beats, specs, statuses, outputs = {}, {}, {}, {}, {}, {}
        for path, (kid, value) in self.values.items():
            if match := _TABLE_PATH.match(path):
                machine, table, name = match.groups()
                if table == "procs":
                    specs[(machine, name)] = (kid, value if isinstance(value, dict) else None)
                elif name == "mayor":
                    beats[machine] = value.get("heartbeat") if isinstance(value, dict) else None
                else:
                    statuses[(machine, name)] = value if isinstance(value, dict) else None
            elif match := _JOB_PATH.match(path):
                name = match.group(1)
                key = (name, kid)
                if key not in job_cache:
                    job_cache[key] = _job_or_invalid(name, value)
                jobs[name] = job_cache[key]
            elif match := _MACHINE_PATH.match(path):
                machine_objs[match.group(1)] = value
            else:
                outputs[path] = value
        names = set(machine_objs) | set(beats) | {m for m, _ in specs}
        machines = {m: machine_from(m, machine_objs.get(m), beats.get(m)) for m in names}
        procs = [Proc(m, n, kid, spec, statuses.get((m, n))) for (m, n), (kid, spec) in specs.items()]
        return jobs, machines, procs, outputs


def _job_or_invalid(name: str, value):
    if value is _INVALID:
        return InvalidJob(name, f"/jobs/{name}.json is not valid JSON")
    try:
        return check_job(name, value)
    except JobError as err:
        return InvalidJob(name, str(err))


# ------------------------------------------------------------------- loop


class Scheduler:
    """The scheduler's loop over a keg (a ``RemoteKeg`` or a local ``Store``).

    ``step()`` is one turn (catch up, decide, write) that tests call by hand;
    ``run()`` steps on every relevant change the watch stream shows and at
    least every ``MAX_IDLE`` seconds.

    Args:
        keg: the namespace.
        lease_ttl: seconds a heartbeat keeps a machine alive.
        ports: the inclusive range of ports for replicas.
        clock: seconds since the epoch, on the heartbeats' clock.
    """

    MIN_INTERVAL = 0.1   # steps at most this often while changes stream in
    MAX_IDLE = 1.0       # …and at least this often: leases run out with time
    RESYNC = 300.0       # a full read, whatever diff says

    def __init__(self, keg, lease_ttl: float = LEASE_TTL, ports: tuple = PORT_RANGE, clock=time.time, log=_log):
        if lease_ttl <= 0:
            raise BadRequest(f"the lease TTL must be more than 0 seconds, not {lease_ttl!r}")
        if not (isinstance(ports, tuple) and len(ports) == 2 and 1 <= ports[0] <= ports[1] <= 65535):
            raise BadRequest(f"the port range must be two ports, low to high, not {ports!r}")
        self.keg, self.lease_ttl, self.ports, self.clock, self.log = keg, lease_ttl, ports, clock, log
        self.mirror = Mirror(keg)
        self.started = clock()
        self.last_decision = Decision()
        self.last_problems: dict = {}
        self._job_cache: dict = {}
        self._encoded: dict = {}
        self._loaded_at = 0.0
        self._cut_off = False   # the last step could not read the namespace

    def step(self) -> Decision:
        """One turn: catch up with the namespace, decide, write one transaction. Returns the decision.

        Raises:
            KegError: the master could not be read or written (the next step tries again).
        """
        try:
            if self.mirror.revision is None or time.monotonic() - self._loaded_at > self.RESYNC:
                self.mirror.load()
                self._loaded_at = time.monotonic()
            else:
                try:
                    self.mirror.catch_up()
                except NotFound:  # the old revision's volatile trees were compacted away
                    self.mirror.load()
                    self._loaded_at = time.monotonic()
        except KegError:
            self._cut_off = True
            raise
        if self._cut_off:
            # The master was out of reach: so were the Mayors' heartbeats, maybe. Leases count from now.
            self.started, self._cut_off = self.clock(), False
        now = self.clock()
        jobs, machines, procs, outputs = self.mirror.inputs(self._job_cache)
        if len(self._job_cache) > 2 * len(jobs) + 100:
            self._job_cache.clear()
        # A machine's lease counts from the later of its heartbeat and this scheduler's start (or its return
        # from an outage of the master): until then heartbeats may be old through no fault of the machines.
        machines = {m: (machine if machine.heartbeat is None or machine.heartbeat >= self.started
                        else _with_heartbeat(machine, self.started)) for m, machine in machines.items()}
        decision = place(jobs, machines, procs, now, self.lease_ttl, self.ports)
        gone = {(r.machine, r.name) for r in decision.removals} | {(e.machine, e.name) for e in decision.evictions}
        services = service_tables(jobs, machines, procs, gone)
        tx = decision_transaction(decision, services, outputs, now, self._encoded)
        self._log_decision(decision)
        if tx is not None:
            result = self.keg.apply(tx)
            if not result.ok:
                self.log(f"not written, someone else changed the table first ({result.error}); deciding again")
                return Decision()
            self.mirror.wrote(tx.ops, result.kids)
        self.last_decision = decision
        return decision

    def _log_decision(self, decision: Decision) -> None:
        for line in decision.describe():
            if not line.startswith("job "):
                self.log(line)
        problems = {job: r.get("problem") for job, r in decision.reports.items() if r.get("problem")}
        for job, problem in sorted(problems.items()):
            if self.last_problems.get(job) != problem:
                self.log(f"job {job}: {problem}")
        self.last_problems = problems

    def run(self, stop) -> None:
        """Step until ``stop`` (a ``threading.Event``) is set: on changes, and at least every ``MAX_IDLE`` s.

        A heartbeat alone does not make a step sooner: it matters only for leases, which the step every
        ``MAX_IDLE`` seconds checks (with 1,000 machines, heartbeats arrive about 100 times a second).
        """
        while not stop.is_set():
            try:
                self.step()
                last, dirty = time.monotonic(), False
                # The stream ends after MAX_IDLE / 2 s without an event; while events flow, step from here.
                for event in self.keg.watch("/", since=self.mirror.revision, timeout=self.MAX_IDLE / 2):
                    if stop.is_set():
                        return
                    dirty = dirty or (event.revision > self.mirror.revision and Mirror.relevant(event.path)
                                      and not event.path.endswith("/status/mayor.json"))
                    idle = time.monotonic() - last
                    if dirty or idle >= self.MAX_IDLE:
                        if dirty and idle < self.MIN_INTERVAL:
                            # At most every MIN_INTERVAL, but then at once: waiting for the next event
                            # could wait for the stream's idle end (MAX_IDLE / 2), 0.5 s on every deploy.
                            stop.wait(self.MIN_INTERVAL - idle)
                        self.step()
                        last, dirty = time.monotonic(), False
            except KegError as err:
                self.log(f"step failed: {err}; trying again")
                stop.wait(1.0)


def _with_heartbeat(machine: Machine, heartbeat: float) -> Machine:
    from dataclasses import replace
    return replace(machine, heartbeat=heartbeat)
