"""Processes on Mayors, from the command line: ``keg mayor run``, ``run``, ``kill``, ``ps``, ``wait``,
``logs`` and ``exec``.

Every command only reads, writes and watches namespace paths (DESIGN §1.1);
the layout they share with the Mayor is in docs/operations-mayor.md:

- ``/machines/<m>/procs/<p>.json``        desired process spec (written here by ``keg run``)
- ``/machines/<m>/status/<p>.json``       what the Mayor reports about it
- ``/machines/<m>/status/mayor.json``     the Mayor's heartbeat
- ``/machines/<m>/status/logs/<p>.log``   the last 64 KiB of its output
- ``/machines/<m>/exec/<id>.json``        an exec request (``keg exec``)
- ``/machines/<m>/status/exec/<id>.json`` its result, written by the Mayor

Registered on the ``keg`` group at the end of :mod:`shell.cli`; import that
module, not this one, to get the whole command.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import sys
import threading
import time

import click

import kid as kidlib
from keg.errors import BadRequest, CompareFailed, KegError, NotFound
from keg.transaction import Transaction, compare, delete, put
from shell.cli import _emit_json, _seconds, json_option
from shell.target import keg_target, open_keg, target_options

PROCESS_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
RESERVED_NAMES = ("mayor",)       # status/mayor.json is the Mayor's own heartbeat
STATUS_RE = re.compile(r"^/machines/([^/]+)/status/([^/]+)\.json$")
ENDED = ("exited", "failed", "backoff")
STALE_AFTER = 90.0                # seconds without a heartbeat before a machine's status is doubted
WATCH_SLACK = 1.0                 # how far past a deadline a quiet watch stream may run
MAX_EXEC_TIMEOUT = 86400.0        # the Mayor refuses longer exec requests
EXEC_GRACE = 10.0                 # after its timeout, how long the Mayor has to report a stopped command
EXIT_TIMEOUT = 124                # as timeout(1)
EXIT_CANNOT_EXEC = 126            # as a shell: the command could not be run
SHORT_HEX = 12                    # hex digits of a KID shown in tables


class ProcessExists(CompareFailed):
    """``keg run`` of a name whose spec is there already (without --replace); nothing was written."""

    def __init__(self, path: str, actual):
        super().__init__(path, None, actual)
        self.args = (f"{path} exists already (spec {actual}); give --replace to replace it",)


# ------------------------------------------------------------------ helpers

def _duration(ctx, param, value):
    return None if value is None else _seconds(value)


timeout_option = click.option("--timeout", metavar="DURATION", callback=_duration,
                              help="Give up after this long (90, 90s, 15m, 2h).")
machine_option = click.option("--machine", "-m", metavar="MACHINE",
                              help="The machine the process is on (default: found by looking at every machine).")


def _check_process_name(name: str) -> str:
    if not PROCESS_NAME_RE.match(name):
        raise BadRequest(f"{name!r} is not a valid process name: use 1-63 lowercase letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")
    if name in RESERVED_NAMES:
        raise BadRequest(f"{name!r} is reserved (status/{name}.json is the Mayor's own heartbeat); choose another")
    return name


def _check_machine_name(name: str) -> str:
    if not PROCESS_NAME_RE.match(name):
        raise BadRequest(f"{name!r} is not a valid machine name: use 1-63 lowercase letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")
    return name


def _pairs(values, option: str) -> dict:
    """``("K=V", …)`` as a dict; a later K wins."""
    out = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise BadRequest(f"{option} {text!r}: give KEY=VALUE")
        out[key] = value
    return out


def _read_json(store, path: str, rev=None):
    """The JSON object at ``path``, or None when it is absent or not an object."""
    try:
        obj = json.loads(store.read(path, rev))
    except NotFound:
        return None
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _read_bytes(store, path: str, rev=None) -> bytes | None:
    try:
        return store.read(path, rev)
    except NotFound:
        return None


def _list(store, path: str, rev=None) -> list:
    try:
        return store.list(path, rev)
    except NotFound:
        return []


def _machines(store, rev=None) -> list:
    return sorted(e.name for e in _list(store, "/machines", rev) if e.kind == "tree")


def _statuses(store, machines, rev=None):
    """``(machine, name, status object)`` for every process status on ``machines``."""
    for machine in machines:
        for entry in _list(store, f"/machines/{machine}/status", rev):
            if entry.kind != "file" or not entry.name.endswith(".json") or entry.name == "mayor.json":
                continue
            obj = _read_json(store, entry.path, rev)
            if obj is not None:
                yield machine, entry.name[:-len(".json")], obj


def _previous(obj: dict) -> dict:
    previous = obj.get("previous")
    return previous if isinstance(previous, dict) else {}


def _short(kid_text) -> str:
    if not isinstance(kid_text, str) or not kid_text.startswith("K-"):
        return "-"
    return kid_text[:2 + SHORT_HEX]


def _age(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _parse_kid(text: str) -> kidlib.Kid:
    try:
        return kidlib.parse(text)
    except kidlib.KidError as err:
        raise BadRequest(str(err)) from err


def _kid_matches(wanted: kidlib.Kid, candidate) -> bool:
    return isinstance(candidate, str) and candidate.startswith("K-") and candidate[2:].startswith(wanted.hex)


def _find_kid(store, wanted: kidlib.Kid, machines, rev=None) -> tuple:
    """``(machine, name, full KID)`` of the process whose current or previous incarnation has KID ``wanted``.

    Raises:
        NotFound: no status names it.
        BadRequest: a short KID that matches several processes.
    """
    hits = {}
    for machine, name, obj in _statuses(store, machines, rev):
        for candidate in (obj.get("kid"), _previous(obj).get("kid")):
            if _kid_matches(wanted, candidate):
                hits[candidate] = (machine, name, candidate)
    if not hits:
        raise NotFound(f"no process has KID {wanted}: none of /machines/*/status names it as its current "
                       "or previous incarnation (see keg ps)")
    if len(hits) > 1:
        raise BadRequest(f"{wanted} is ambiguous: it matches {', '.join(sorted(hits))}; give more hex digits")
    return next(iter(hits.values()))


def _locate(store, proc: str, machine: str | None) -> tuple:
    """``(machine, process name)`` for PROC given as a name (machine looked up when not given) or a KID."""
    if machine is not None:
        _check_machine_name(machine)
    if proc.startswith("K-"):
        found_machine, name, _ = _find_kid(store, _parse_kid(proc), [machine] if machine else _machines(store))
        return found_machine, name
    _check_process_name(proc)
    if machine is not None:
        return machine, proc
    found = [m for m in _machines(store)
             if store.exists(f"/machines/{m}/status/{proc}.json") or store.exists(f"/machines/{m}/procs/{proc}.json")]
    if not found:
        raise NotFound(f"no process named {proc} on any machine (see keg ps --all)")
    if len(found) > 1:
        raise BadRequest(f"a process named {proc} is on several machines ({', '.join(found)}); "
                         "say which with --machine")
    return found[0], proc


def _exit_at_once(*_) -> None:
    """SIGINT while following: end now, status 130. A KeyboardInterrupt that lands while a finalizer
    runs (the watch stream being closed when it is reopened) is printed as "ignored" and lost, and the
    command would follow on; following holds nothing that needs cleaning up. The signal may come while
    the command is writing to stdout: then the flush is refused ("reentrant call") and what the write
    had not finished is dropped."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError, RuntimeError):
        pass
    os._exit(130)


def _watch_until(store, prefix: str, since: int, deadline=lambda: None):
    """Events under ``prefix`` after revision ``since``, ending once ``deadline()`` (monotonic) has passed.

    ``deadline`` is asked again after every event (None: never). A quiet
    watch stream ends only after its own idle timeout, so the stream is
    reopened with a shorter one when the deadline comes nearer; events of a
    revision seen in part before reopening are not given twice. Ctrl-C ends
    the command at once with status 130.
    """
    if threading.current_thread() is not threading.main_thread():
        yield from _watch_events(store, prefix, since, deadline)
        return
    previous = signal.signal(signal.SIGINT, _exit_at_once)
    try:
        yield from _watch_events(store, prefix, since, deadline)
    finally:
        signal.signal(signal.SIGINT, previous)


def _watch_events(store, prefix: str, since: int, deadline):
    seen_rev, seen_paths = since, set()
    while True:
        remaining = None if deadline() is None else deadline() - time.monotonic()
        if remaining is not None and remaining <= 0:
            return
        resume = seen_rev - 1 if seen_paths else seen_rev
        with contextlib.closing(store.watch(prefix, resume, timeout=remaining)) as stream:
            reopen = False
            for event in stream:
                if event.revision == seen_rev and event.path in seen_paths:
                    continue
                if event.revision != seen_rev:
                    seen_rev, seen_paths = event.revision, set()
                seen_paths.add(event.path)
                yield event
                until = deadline()
                if until is not None:
                    now = time.monotonic()
                    if now >= until:
                        return
                    if remaining is None or now + remaining > until + WATCH_SLACK:
                        reopen = True
                        break
            if not reopen and deadline() is None:
                return


# ------------------------------------------------------------- keg mayor

@click.group("mayor")
def mayor_group():
    """The Mayor: the daemon that runs this machine's processes (see docs/operations-mayor.md)."""


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as err:
        raise BadRequest(f"cannot read the token file {path}: {err.strerror}") from err
    if not token:
        raise BadRequest(f"the token file {path} is empty")
    return token


def _make_runtime(kind: str, store, data_dir: str, name: str, init: str, cgroup_parent: str):
    if kind == "noop":
        from mayor.runtime import NoopRuntime
        return NoopRuntime()
    try:
        from mayor.runc_runtime import RuncRuntime
    except ImportError as err:
        raise KegError(f"the runc runtime is not available in this installation ({err}); "
                       "use --runtime noop to try the Mayor without containers") from err
    return RuncRuntime(store, data_dir, name, init=None if init == "none" else init, cgroup_parent=cgroup_parent)


def _register_or_explain(the_mayor, name: str) -> None:
    """Register now, so a wrong token is an error at start; an unreachable master is not (§5.6)."""
    from master.auth import Forbidden, Unauthenticated
    from master.client import Unreachable
    try:
        the_mayor.register()
    except Unreachable as err:
        click.echo(f"keg mayor: master unreachable at start ({err}); supervising from local state", err=True)
    except (Forbidden, Unauthenticated) as err:
        raise type(err)(f"{err}: a Mayor needs the token of machine user {name} "
                        f"(create it with: keg user add {name} --machine)") from err


@mayor_group.command("run")
@target_options
@click.option("--token-file", metavar="FILE", type=click.Path(dir_okay=False),
              help="Read the token from FILE (keeps it out of the process list).")
@click.option("--name", required=True, metavar="NAME",
              help="This machine's name: the Mayor runs /machines/NAME/procs/ and writes /machines/NAME/status/.")
@click.option("--data", "data_dir", required=True, metavar="DIR", type=click.Path(file_okay=False),
              help="Where the Mayor keeps its own state (layer cache, containers, the last process table).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="A label recorded in /machines/NAME/machine.json for placement (repeatable).")
@click.option("--runtime", "runtime_kind", type=click.Choice(["runc", "noop"]), default="runc",
              show_default=True, help="runc: real containers. noop: processes are records only (trials, tests).")
@click.option("--address", default="127.0.0.1", show_default=True, metavar="ADDRESS",
              help="Where other machines (the router) reach this machine's processes; "
                   "each process with a port is published as ADDRESS:PORT.")
@click.option("--cpus", type=click.FloatRange(min=0, min_open=True), metavar="CORES",
              help="CPU cores offered to the scheduler (default: all of this machine's).")
@click.option("--memory", "memory_text", metavar="SIZE",
              help="Memory offered to the scheduler: bytes or 8Gi, 512Mi… (default: all of this machine's).")
@click.option("--heartbeat", type=click.FloatRange(min=0.2, max=3600), default=10.0, show_default=True,
              metavar="SECONDS", help="Refresh the heartbeat in status/mayor.json this often; keep it well under "
                                      "the scheduler's --lease-ttl (30 s by default).")
@click.option("--init", default="tini-static", show_default=True, metavar="PATH|none",
              help="The statically linked init every container's process runs under (bound at /dev/init), so "
                   "SIGTERM stops it and its orphans are reaped; `none` runs the process itself as PID 1, "
                   "where it ignores SIGTERM unless it handles it. A spec may say \"init\": false.")
@click.option("--cgroup-parent", default="keg", show_default=True, metavar="PATH",
              help="Containers' cgroups are /PATH/<container id> in every hierarchy, beside the Mayor's own "
                   "(so they outlive a restart of its service); a relative cgroup path such as keg or keg/web.")
@click.option("--stop-on-exit", is_flag=True,
              help="On SIGTERM/SIGINT stop and remove every container first (keg up does this); "
                   "by default they keep running and the next start adopts them.")
def mayor_run(keg_dir, url, token, token_file, name, data_dir, labels, runtime_kind, address, cpus, memory_text,
              heartbeat, init, cgroup_parent, stop_on_exit):
    """Run the Mayor of machine NAME until SIGTERM or SIGINT.

    It registers /machines/NAME/machine.json, then runs the processes of
    /machines/NAME/procs/ as containers and reports them in
    /machines/NAME/status/, acting on every change it sees through the
    master's watch stream. With the master unreachable it keeps running and
    restarting processes from the table it read last. On SIGTERM it stops,
    exit status 0, and leaves the containers running: the next start adopts
    them.

    The token must be machine user NAME's (keg user add NAME --machine):
    it may write only /machines/NAME/status/ and machine.json.

    \b
    Examples:
      keg user add web1 --machine            # prints the token once
      keg mayor run --url http://master:7480 --token-file /etc/keg/token \\
          --name web1 --data /var/lib/keg/mayor --label zone=a
      keg mayor run --url http://127.0.0.1:7480 --name dev --data /tmp/mayor --runtime noop
    """
    from mayor.daemon import Mayor

    ctx = click.get_current_context()
    if token_file:
        if token and ctx.get_parameter_source("token") == click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError("give --token or --token-file, not both")
        token = _read_token_file(token_file)
    _check_machine_name(name)
    label_map = _pairs(labels, "--label")
    memory = None
    if memory_text is not None:
        from mayor.runtime_spec import SpecError, parse_memory
        try:
            memory = parse_memory(memory_text)
        except SpecError as err:
            raise click.BadParameter(str(err), param_hint="--memory") from err
    if not address or any(c.isspace() or c in "/\t" for c in address):
        raise click.BadParameter(f"{address!r} is not a host address", param_hint="--address")
    if url:
        from master.client import RemoteKeg
        store = RemoteKeg(url, token, timeout=10.0)
    else:
        store = open_keg(keg_dir, url, token)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        the_mayor = Mayor(store, name, _make_runtime(runtime_kind, store, data_dir, name, init, cgroup_parent), data_dir,
                          labels=label_map, address=address, cpus=cpus, memory=memory, heartbeat=heartbeat)
        _register_or_explain(the_mayor, name)
        click.echo(f"keg mayor: machine {name} ({the_mayor.machine_kid}), runtime {runtime_kind}, "
                   f"data {data_dir}", err=True)
        the_mayor.run(stop)
        if stop_on_exit:
            count = the_mayor.stop_all()
            click.echo(f"keg mayor: stopped {count} container(s) of {name}", err=True)
            return
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        store.close()
    click.echo(f"keg mayor: stopped; the containers of {name} keep running", err=True)


# ---------------------------------------------------------- run and kill

def _image_kid(store, text: str) -> str:
    """The full KID of an image given as a KID (short forms too) or as NAME[:TAG] under /oci-images."""
    if text.startswith("K-"):
        found = store.resolve_kid(str(_parse_kid(text)))
        if found.get("kind") != "tree":
            raise BadRequest(f"{text} is a {found.get('kind')}, not an image: an image's KID is that of its "
                             "directory /oci-images/NAME/TAG (see keg ls -l /oci-images/NAME)")
        return found["kid"]
    from keg import oci
    path = oci.image_path(*oci.parse_reference(text))
    try:
        return store.kid(path)
    except NotFound as err:
        raise NotFound(f"no image {text}: {path} does not exist (import it with keg image import)") from err


def _health(command: str | None, http: str | None, interval: float | None):
    """The spec's ``health``: ``{"exec": [...]}`` or ``{"http": {"port", "path"}}``, or None."""
    if command is not None and http is not None:
        raise click.UsageError("give --health-cmd or --health-http, not both")
    if command is None and http is None:
        if interval is not None:
            raise click.UsageError("--health-interval needs --health-cmd or --health-http")
        return None
    if http is not None:
        port, _, path = http.partition("/")
        if not port.isdigit():
            raise BadRequest(f"--health-http {http!r}: give PORT or PORT/PATH, like 8080/healthz")
        health = {"http": {"port": int(port), "path": "/" + path}}
    elif command.lstrip().startswith("["):
        try:
            words = json.loads(command)
        except ValueError as err:
            raise BadRequest(f"--health-cmd: {command!r} is not a JSON array: {err}") from err
        health = {"exec": words}
    elif command.strip():
        health = {"exec": ["/bin/sh", "-c", command]}  # a string is a shell command, as Docker's
    else:
        raise BadRequest("--health-cmd is empty")
    if interval is not None:
        health["interval"] = interval
    return health


def _build_spec(image, args, restart, env, memory, cpu, pids, network, health, cwd, user, stop_grace) -> dict:
    spec = {"image": image, "restart": restart, "network": network}
    if args:
        spec["args"] = list(args)
    if env:
        spec["env"] = _pairs(env, "--env")
    resources = {k: v for k, v in (("cpu", cpu), ("memory", memory), ("pids", pids)) if v is not None}
    if resources:
        spec["resources"] = resources
    for key, value in (("health", health), ("cwd", cwd), ("user", user), ("stop_grace", stop_grace)):
        if value is not None:
            spec[key] = value
    from mayor.runtime_spec import validate_spec
    validate_spec(spec)  # a spec the Mayor would refuse is refused here, before anything is written
    return spec


@click.command("run")
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[-- ARGS...]")
@click.option("--image", required=True, metavar="IMAGE",
              help="The image: its KID (K-…, short forms too) or NAME[:TAG] under /oci-images.")
@click.option("--machine", "-m", required=True, metavar="MACHINE", help="The machine to run it on.")
@click.option("--restart", type=click.Choice(["always", "on-failure", "never"]), default="always",
              show_default=True, help="Restart after it exits: always, only after a failure, or never.")
@click.option("--env", "-e", multiple=True, metavar="NAME=VALUE", help="An environment variable (repeatable).")
@click.option("--memory", metavar="SIZE", help="Memory limit: bytes, or with k, M, G, Ki, Mi, Gi (64Mi).")
@click.option("--cpu", type=float, metavar="CORES", help="CPU limit in cores (0.5 = half a core).")
@click.option("--pids", type=click.IntRange(min=1), metavar="N", help="At most N processes and threads.")
@click.option("--network", type=click.Choice(["private", "none", "host"]), default="private", show_default=True,
              help="private or none: a network namespace of its own, loopback only; host: the machine's network.")
@click.option("--health-cmd", metavar="CMD",
              help="A health check run inside the container, healthy when it exits 0: a shell command, or a "
                   "JSON array of words.")
@click.option("--health-http", metavar="PORT[/PATH]",
              help="A health check by HTTP GET of PATH on PORT in the container, healthy on 2xx and 3xx.")
@click.option("--health-interval", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Seconds between health checks (default: the Mayor's, 10).")
@click.option("--cwd", metavar="DIR", help="Working directory in the container (default: the image's).")
@click.option("--user", metavar="USER[:GROUP]", help="User to run as, by id or by name in the image.")
@click.option("--stop-grace", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Seconds between SIGTERM and SIGKILL when stopping it (default: the Mayor's, 10).")
@click.option("--replace", is_flag=True, help="Replace the spec if NAME exists already (the process restarts).")
@keg_target
@json_option
def run_cmd(name, args, image, machine, restart, env, memory, cpu, pids, network, health_cmd, health_http,
            health_interval, cwd, user, stop_grace, replace, opener, as_json):
    """Run process NAME on MACHINE: write its spec to /machines/MACHINE/procs/NAME.json.

    The machine's Mayor notices the new spec and starts it; follow it with
    keg ps, keg logs NAME -f, keg wait. ARGS after `--` replace the image's
    command; without them the image's entrypoint and command run. A NAME
    that exists already is refused (exit 3) unless --replace is given.

    Prints the spec's KID: the process runs as long as that spec is there,
    and a changed spec (a new KID) is a new process.

    \b
    Examples:
      keg run web --image app:1.4 -m m1 --memory 256Mi --cpu 0.5 --health-http 8080/healthz \\
          -- serve --port 8080
      keg run nightly --image K-3f9c2a1b -m m2 --restart never -e MODE=full -- /bin/backup
      keg run web --image app:1.5 -m m1 --replace -- serve --port 8080
    """
    _check_process_name(name)
    _check_machine_name(machine)
    if args and args[0] == "--":
        args = args[1:]
    path = f"/machines/{machine}/procs/{name}.json"
    health = _health(health_cmd, health_http, health_interval)
    with opener() as store:
        spec = _build_spec(_image_kid(store, image), args, restart, env, memory, cpu, pids, network, health,
                           cwd, user, stop_grace)
        body = json.dumps(spec, indent=2, sort_keys=True) + "\n"
        compares = () if replace else (compare(path, None),)
        result = store.apply(Transaction((put(path, body),), compares))
        if not result.ok:
            if isinstance(result.error, CompareFailed):
                raise ProcessExists(path, result.error.actual) from None
            raise result.error
        if not store.exists(f"/machines/{machine}/machine.json"):
            click.echo(f"keg: note: machine {machine} has not registered (no Mayor has run there yet); "
                       "the process starts when one does", err=True)
    spec_kid = result.kids[path]
    if as_json:
        _emit_json({"machine": machine, "name": name, "path": path, "spec_kid": spec_kid,
                    "revision": result.revision, "spec": spec})
    else:
        click.echo(spec_kid)


@click.command("kill")
@click.argument("name")
@click.option("--machine", "-m", required=True, metavar="MACHINE", help="The machine it runs on.")
@keg_target
@json_option
def kill_cmd(name, machine, opener, as_json):
    """Stop process NAME on MACHINE: delete its spec; the Mayor then stops it.

    Its status disappears once the Mayor has stopped it (SIGTERM, then
    SIGKILL after the spec's stop_grace).

    \b
    Example:
      keg kill web -m m1
    """
    _check_process_name(name)
    _check_machine_name(machine)
    path = f"/machines/{machine}/procs/{name}.json"
    with opener() as store:
        try:
            current = store.kid(path)
        except NotFound as err:
            raise NotFound(f"no process {name} on machine {machine}: {path} does not exist") from err
        result = store.apply(Transaction((delete(path),), (compare(path, current),)))
    if not result.ok:
        raise result.error
    if as_json:
        _emit_json({"machine": machine, "name": name, "path": path, "spec_kid": current,
                    "revision": result.revision})
    else:
        click.echo(f"stopping {name} on {machine} (spec {current} removed in revision {result.revision})")


# ------------------------------------------------------------------- ps

PS_COLUMNS = ("MACHINE", "NAME", "STATE", "PID", "RESTARTS", "HEALTH", "AGE", "KID", "IMAGE")


def _heartbeats(store, machines) -> dict:
    out = {}
    for machine in machines:
        mayor = _read_json(store, f"/machines/{machine}/status/mayor.json") or {}
        beat = mayor.get("heartbeat")
        out[machine] = beat if isinstance(beat, (int, float)) else None
    return out


def _ps_rows(store, machines, include_all: bool) -> list:
    rows = []
    for machine, name, obj in _statuses(store, machines):
        if include_all or obj.get("state") != "exited":
            rows.append({**obj, "machine": machine, "name": name})
    if include_all:
        reported = {(r["machine"], r["name"]) for r in rows}
        for machine in machines:
            for entry in _list(store, f"/machines/{machine}/procs"):
                name = entry.name[:-len(".json")]
                if entry.kind == "file" and entry.name.endswith(".json") and (machine, name) not in reported:
                    rows.append({"machine": machine, "name": name, "state": "unreported", "spec_kid": entry.kid})
    return sorted(rows, key=lambda r: (r["machine"], r["name"]))


def _state_text(row: dict, stale: bool) -> str:
    state = str(row.get("state") or "-")
    if state == "exited" and row.get("exit_code") is not None:
        state += f"({'oom' if row.get('oom') else row['exit_code']})"
    return state + ("?" if stale else "")


def _ps_line(row: dict, now: float, stale: bool) -> tuple:
    since = row.get("exited") if row.get("state") in ENDED and row.get("exited") else row.get("started")
    age = now - since if isinstance(since, (int, float)) and since else None
    return (row["machine"], row["name"], _state_text(row, stale), str(row.get("pid") or "-"),
            str(row.get("restarts", 0) if row.get("restarts") is not None else "-"), str(row.get("health") or "-"),
            _age(age), _short(row.get("kid")), _short(row.get("image")))


@click.command("ps")
@click.option("--machine", "-m", metavar="MACHINE", help="Only processes on this machine.")
@click.option("--all", "-a", "include_all", is_flag=True,
              help="Also processes that have exited for good, and specs no Mayor has reported on yet.")
@keg_target
@json_option
def ps_cmd(machine, include_all, opener, as_json):
    """List processes on every machine (or one), from /machines/*/status/.

    \b
    Columns:
      MACHINE NAME   where it runs and its name in the machine's table
      STATE          pending, pulling, running, backoff (exited, restarting soon),
                     failed (could not start; see keg logs or --json's last_error),
                     exited(CODE) (ended, not restarting: only with --all),
                     unreported (a spec its Mayor has not reported on: only with --all);
                     a trailing ? means the machine's Mayor has not reported for 90 s
      PID            the container's init on the machine
      RESTARTS       exits in a row (forgotten once it has run 10 minutes)
      HEALTH         starting, healthy or unhealthy (- without a health check;
                     a process with a port is starting until it listens)
      AGE            time in its state: since it started, or since it exited
      KID IMAGE      the incarnation's process KID and the image, shortened

    --json prints every status object as the Mayor wrote it, with machine,
    name and stale added, one JSON list.

    \b
    Examples:
      keg ps
      keg ps -m m1 --all
      keg ps --json | jq -r '.[] | select(.state == "failed") | .name'
    """
    with opener() as store:
        if machine is not None:
            _check_machine_name(machine)
            if not store.exists(f"/machines/{machine}"):
                raise NotFound(f"no machine {machine}: /machines/{machine} does not exist")
        machines = [machine] if machine else _machines(store)
        rows = _ps_rows(store, machines, include_all)
        beats = _heartbeats(store, sorted({r["machine"] for r in rows}))
    now = time.time()
    stale = {m for m, beat in beats.items() if beat is None or now - beat > STALE_AFTER}
    if as_json:
        _emit_json([{**r, "stale": r["machine"] in stale} for r in rows])
        return
    lines = [PS_COLUMNS] + [_ps_line(r, now, r["machine"] in stale) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(PS_COLUMNS))]
    for line in lines:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    for m in sorted(stale):
        beat = beats[m]
        when = "has never reported" if beat is None else f"last reported {_age(now - beat)} ago"
        click.echo(f"keg: machine {m}'s Mayor {when}; its processes' state may be out of date", err=True)


# ------------------------------------------------------------------ wait

class _Waited:
    """One KID ``keg wait`` waits for."""

    def __init__(self, given: str, machine: str, name: str, kid: str):
        self.given, self.machine, self.name, self.kid = given, machine, name, kid
        self.path = f"/machines/{machine}/status/{name}.json"
        self.last = None        # the status object last seen
        self.ended = False
        self.exit_code = None
        self.state = None
        self.reason = None

    def see(self, obj: dict | None) -> bool:
        """Update from the process's status (None: deleted); True once this incarnation has ended."""
        if obj is None:
            if self.last is not None:
                self.see_ended(self.last, deleted=True)
            else:
                self._end(None, "removed", "its status was removed before it ended")
            return self.ended
        if obj.get("kid") == self.kid:
            self.last = obj
            if obj.get("state") in ENDED:
                self.see_ended(obj)
        elif _previous(obj).get("kid") == self.kid:
            prev = _previous(obj)
            self._end(prev.get("exit_code"), "exited", prev.get("reason"))
        else:
            self._end(None, "gone", "later incarnations replaced it before its exit was seen")
        return self.ended

    def see_ended(self, obj: dict, deleted: bool = False) -> None:
        if obj.get("kid") == self.kid and obj.get("state") in ENDED:
            self._end(obj.get("exit_code"), "failed" if obj.get("state") == "failed" else "exited",
                      obj.get("last_error") if obj.get("state") == "failed" else obj.get("reason"))
        elif deleted:
            self._end(None, "removed", "it was stopped and removed (its spec was deleted) before it ended")

    def _end(self, code, state: str, reason) -> None:
        self.ended, self.exit_code, self.state, self.reason = True, code, state, reason

    def line(self) -> str:
        if self.state == "exited" and isinstance(self.exit_code, int):
            return f"{self.given} exit {self.exit_code}"
        return f"{self.given} {self.state}: {self.reason or 'no exit code'}"

    def to_json(self) -> dict:
        return {"kid": self.kid, "given": self.given, "machine": self.machine, "name": self.name,
                "ended": self.ended, "state": self.state, "exit_code": self.exit_code, "reason": self.reason}


def _wait_for(store, waited: list, head: int, deadline, as_json: bool) -> None:
    def done(w):
        if not as_json:
            click.echo(w.line())
            sys.stdout.flush()

    for w in waited:
        if w.see(_read_json(store, w.path, head)):
            done(w)
    pending = [w for w in waited if not w.ended]
    if not pending:
        return
    machines = {w.machine for w in pending}
    prefix = f"/machines/{machines.pop()}/status" if len(machines) == 1 else "/machines"
    for event in _watch_until(store, prefix, head, lambda: deadline):
        for w in [w for w in pending if w.path == event.path]:
            obj = None if event.new_kid is None else _read_json(store, event.path, event.revision)
            if w.see(obj):
                done(w)
        pending = [w for w in pending if not w.ended]
        if not pending:
            return


@click.command("wait")
@click.argument("kids", nargs=-1, required=True, metavar="KID...")
@timeout_option
@keg_target
@json_option
def wait_cmd(kids, timeout, opener, as_json):
    """Wait until the processes with these process KIDs have all ended.

    A process KID names one incarnation of a process (keg ps shows it;
    short forms of 8 or more hex digits work). It has ended when its
    status says exited, failed or backoff, or when a restart has moved it to
    "previous". Prints `KID exit CODE` as each ends (`KID failed: WHY` when
    it could not start). The status is followed through the watch stream;
    nothing is polled.

    Exit status: 0 when every one exited with 0, 1 otherwise, 124 when
    --timeout passed first (the ones still running are named).

    \b
    Examples:
      keg wait K-5e1f0c2a
      keg wait $(keg ps --json | jq -r '.[] | select(.name | startswith("batch-")) | .kid') --timeout 1h
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    wanted = [(text, _parse_kid(text)) for text in kids]
    with opener() as store:
        head = store.revision().number
        machines = _machines(store, head)
        waited = [_Waited(text, *_find_kid(store, k, machines, head)) for text, k in wanted]
        _wait_for(store, waited, head, deadline, as_json)
    if as_json:
        _emit_json([w.to_json() for w in waited])
    running = [w for w in waited if not w.ended]
    if running:
        click.echo(f"keg: timed out after {timeout:g}s; still running: "
                   + ", ".join(f"{w.given} ({w.machine}/{w.name})" for w in running), err=True)
        raise click.exceptions.Exit(EXIT_TIMEOUT)
    if any(not (w.state == "exited" and w.exit_code == 0) for w in waited):
        raise click.exceptions.Exit(1)


# ------------------------------------------------------------------ logs

def _last_lines(data: bytes, lines: int | None) -> bytes:
    if lines is None:
        return data
    return b"".join(data.splitlines(keepends=True)[-lines:]) if lines > 0 else b""


def _write(data: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _note(text: str) -> None:
    sys.stdout.flush()
    click.echo(f"keg: {text}", err=True)


def _total(status: dict | None, tail: bytes) -> int:
    total = (status or {}).get("log_bytes")
    return total if isinstance(total, int) and total >= len(tail) else len(tail)


def _print_new(tail: bytes, total: int, printed: int) -> int:
    """Print what of ``tail`` (whose last byte is byte ``total`` of the output) is past byte ``printed``."""
    new = total - printed
    if new <= 0:
        if new < 0:
            _note(f"the log starts again (the Mayor counted {total} bytes, {printed} were shown)")
            _write(tail)
        return total
    if new > len(tail):
        _note(f"… {new - len(tail)} bytes not kept …")
        _write(tail)
    else:
        _write(tail[len(tail) - new:])
    return total


def _finished(store, machine: str, name: str, status: dict | None, rev) -> bool:
    """True when the process has exited and will not be restarted."""
    if status is None:
        return True
    state = status.get("state")
    if state not in ("exited", "failed"):
        return False
    spec = _read_json(store, f"/machines/{machine}/procs/{name}.json", rev)
    if spec is None:
        return True
    restart = spec.get("restart", "always")
    return restart == "never" or (restart == "on-failure" and state == "exited" and status.get("exit_code") == 0
                                  and not status.get("oom"))


def _follow(store, machine: str, name: str, since: int, printed: int) -> None:
    status_path = f"/machines/{machine}/status/{name}.json"
    log_path = f"/machines/{machine}/status/logs/{name}.log"
    handled = since
    for event in _watch_until(store, f"/machines/{machine}", since):
        if event.revision <= handled or event.path not in (status_path, log_path,
                                                           f"/machines/{machine}/procs/{name}.json"):
            continue
        handled = event.revision  # the Mayor writes the log and the status in one revision: read both once
        status = _read_json(store, status_path, event.revision)
        if status is None:  # its log went in the same revision
            _note(f"{name} on {machine} was removed")
            return
        tail = _read_bytes(store, log_path, event.revision) or b""
        printed = _print_new(tail, _total(status, tail), printed)
        if _finished(store, machine, name, status, event.revision):
            return


@click.command("logs")
@click.argument("proc", metavar="PROC")
@machine_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output as it comes.")
@click.option("--tail", "lines", type=click.IntRange(min=0), metavar="N", help="Start with the last N lines only.")
@keg_target
def logs_cmd(proc, machine, follow, lines, opener):
    """Print the output (stdout and stderr) of process PROC.

    PROC is a process name (its machine is found when only one has it;
    else say --machine) or a process KID. The Mayor keeps the last 64 KiB of
    a process's output, over all its incarnations, in
    /machines/MACHINE/status/logs/PROC.log; what came earlier is no longer
    kept, which is said on standard error.

    With -f it keeps following through the watch stream, printing only new
    output, until Ctrl-C, the process is removed, or it has exited and will
    not be restarted.

    \b
    Examples:
      keg logs web -m m1 --tail 20
      keg logs K-5e1f0c2a -f
    """
    with opener() as store:
        machine, name = _locate(store, proc, machine)
        head = store.revision().number
        status = _read_json(store, f"/machines/{machine}/status/{name}.json", head)
        tail = _read_bytes(store, f"/machines/{machine}/status/logs/{name}.log", head)
        if tail is None and status is None and not store.exists(f"/machines/{machine}/procs/{name}.json", head):
            raise NotFound(f"no process {name} on machine {machine}")
        tail = tail or b""
        total = _total(status, tail)
        shown = _last_lines(tail, lines)
        if lines is None and total > len(tail):
            _note(f"… {total - len(tail)} earlier bytes not kept …")
        _write(shown)
        if follow and not _finished(store, machine, name, status, head):
            _follow(store, machine, name, head, total)


# ------------------------------------------------------------------ exec

def _check_running(store, machine: str, name: str) -> None:
    status = _read_json(store, f"/machines/{machine}/status/{name}.json")
    if status is None:
        raise NotFound(f"no process {name} reported on machine {machine} (see keg ps -m {machine} --all)")
    if status.get("state") != "running":
        raise BadRequest(f"{name} on {machine} is {status.get('state')}, not running")


def _exec_code(obj: dict, machine: str, name: str) -> int:
    if obj.get("state") == "failed":
        error = str(obj.get("error") or "no reason given")
        _note(f"exec in {name} on {machine} failed: {error}")
        timed_out = obj.get("reason") == "timeout" or error.startswith("timed out")
        return EXIT_TIMEOUT if timed_out else EXIT_CANNOT_EXEC
    code = obj.get("exit_code")
    if not isinstance(code, int):
        return EXIT_CANNOT_EXEC
    return 128 - code if code < 0 else code  # killed by signal N: 128+N, as a shell says


def _follow_exec(store, machine: str, name: str, request_id: str, since: int, timeout: float) -> int:
    result_path = f"/machines/{machine}/status/exec/{request_id}.json"
    printed, picked_up = 0, False
    started = time.monotonic()

    def deadline():  # the Mayor has the timeout to start it, and a grace to report it stopped
        return started + timeout + (EXEC_GRACE if picked_up else 0.0)

    for event in _watch_until(store, f"/machines/{machine}/status/exec", since, deadline):
        if event.path != result_path or event.new_kid is None:
            continue
        obj = _read_json(store, result_path, event.revision)
        if obj is None:
            continue
        picked_up = True
        # The Mayor keeps the last MiB of output; output_dropped counts the bytes cut from its start.
        output = (obj.get("output") if isinstance(obj.get("output"), str) else "").encode("utf-8")
        dropped = obj.get("output_dropped") if isinstance(obj.get("output_dropped"), int) else 0
        printed = _print_new(output, dropped + len(output), printed)
        if obj.get("state") in ("exited", "failed"):
            return _exec_code(obj, machine, name)
    if not picked_up:
        _note(f"the Mayor of {machine} did not pick up the request within {timeout:g}s: is it running? "
              f"(keg ps -m {machine} shows when it last reported)")
    else:
        _note(f"the command in {name} on {machine} did not finish within {timeout:g}s")
    return EXIT_TIMEOUT


@click.command("exec")
@click.argument("proc", metavar="PROC")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD...")
@machine_option
@click.option("--timeout", metavar="DURATION", callback=_duration, default="60",
              help="Stop the command after this long (90, 90s, 15m); also how long to wait for the "
                   "Mayor to start it. Default: 60s.")
@keg_target
def exec_cmd(proc, command, machine, timeout, opener):
    """Run CMD inside the running container of process PROC and print its output.

    PROC is a process name (its machine found as for keg logs) or a process
    KID. The request is written to /machines/MACHINE/exec/ID.json; the
    Mayor runs the command and reports its output and exit code in
    /machines/MACHINE/status/exec/ID.json, which this follows through the
    watch stream and prints as it grows (stdout and stderr merged). The
    request is deleted afterwards. There is no standard input.

    Exit status: the command's (128+N when a signal N ended it), 126 when it
    could not be run, 124 when it did not finish, or the Mayor did not start
    it, within --timeout.

    \b
    Examples:
      keg exec web -- cat /etc/os-release
      keg exec web -m m1 --timeout 5m -- /app/manage.py migrate
    """
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise click.UsageError("give the command to run after --")
    if not 0 < timeout <= MAX_EXEC_TIMEOUT:
        raise click.BadParameter(f"give more than 0 and at most {MAX_EXEC_TIMEOUT // 3600:g}h",
                                 param_hint="--timeout")
    with opener() as store:
        machine, name = _locate(store, proc, machine)
        _check_running(store, machine, name)
        request_id = "x-" + secrets.token_hex(8)
        request_path = f"/machines/{machine}/exec/{request_id}.json"
        body = json.dumps({"proc": name, "args": list(command), "timeout": timeout}, sort_keys=True) + "\n"
        result = store.apply(Transaction((put(request_path, body),), (compare(request_path, None),)))
        if not result.ok:
            raise result.error
        try:
            code = _follow_exec(store, machine, name, request_id, result.revision, timeout)
        finally:
            with contextlib.suppress(KegError):
                store.apply(Transaction((delete(request_path),)))
    if code:
        raise click.exceptions.Exit(code)


COMMANDS = (run_cmd, kill_cmd, ps_cmd, wait_cmd, logs_cmd, exec_cmd)

