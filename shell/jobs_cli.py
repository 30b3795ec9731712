"""``keg job``, ``keg scale`` and ``keg scheduler run``: jobs and the program that places them.

Registered on the ``keg`` group at the end of :mod:`shell.cli`; import that
module, not this one, to get the whole command.  The placement itself is
:mod:`shell.scheduler`; docs/scheduler.md describes both.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import click

from keg.errors import BadRequest, CompareFailed, NotFound
from keg.transaction import Transaction, compare, delete, put
from shell import scheduler as sched
from shell.cli import _emit_json, json_option, keg_target
from shell.target import open_keg, target_options

SCALE_RETRIES = 5   # compare-and-swap attempts of `keg scale` against concurrent writers


def _job_path(name: str) -> str:
    return f"{sched.JOBS}/{name}.json"


def _short(kid_text) -> str:
    return kid_text[:10] if isinstance(kid_text, str) and kid_text.startswith("K-") else (kid_text or "-")


def _read_job(store, name: str) -> tuple:
    """``(KID, object)`` of ``/jobs/<name>.json``.

    Raises:
        NotFound: no such job, with what to do.
    """
    path = _job_path(name)
    try:
        kid = store.kid(path)
        data = store.read(path)
    except NotFound as err:
        raise NotFound(f"no job {name}: {path} does not exist (keg job ls lists the jobs)") from err
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"{path} is not valid JSON ({err}); fix it with keg job apply") from err
    if not isinstance(obj, dict):
        raise BadRequest(f"{path} is not a JSON object; fix it with keg job apply")
    return kid, obj


@click.group("job")
def job_group():
    """Jobs: what the scheduler places (/jobs/JOB.json; see docs/scheduler.md).

    A job names an image, how many replicas of it to run, their resources,
    the labels a machine must have, and how to update them. `keg scheduler
    run` places the replicas on machines as /machines/M/procs/JOB-XXXXX.json.
    """


@job_group.command("apply")
@click.argument("file", type=click.File("rb"))
@click.option("--name", metavar="JOB",
              help="The job's name (default: the object's \"name\", else APP-TYPE from \"app\" and \"type\", "
                   "else FILE's name without .json).")
@keg_target
@json_option
def job_apply(file, name, opener, as_json):
    """Create or replace a job from FILE (a JSON object; - for standard input).

    The object is checked first: a bad field is named and nothing is
    written. Fields the scheduler does not know are kept (and named on
    standard error, in case of a typo). Prints the job, its new KID, what
    happened (created, updated, unchanged) and the revision.

    \b
    Example:
      keg job apply hello-web.json
      echo '{"image": "K-1234abcd", "replicas": 2}' | keg job apply --name batch -
    """
    data = file.read()
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"{file.name} is not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise BadRequest(f"{file.name}: a job is a JSON object, not {type(obj).__name__}")
    name = name or _default_name(obj, file.name)
    sched.check_job(name, obj)
    for key in sched.unknown_fields(obj):
        click.echo(f"keg: note: job {name}: field {key!r} is not one the scheduler reads (kept as it is)", err=True)
    body = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    path = _job_path(name)
    with opener() as store:
        try:
            current = store.kid(path)
            same = store.read(path) == body
        except NotFound:
            current, same = None, False
        if same:
            revision, kid, what = store.revision().number, current, "unchanged"
        else:
            result = store.apply(Transaction((put(path, body),), (compare(path, current),)))
            if not result.ok:
                raise result.error
            revision, kid, what = result.revision, result.kids[path], "updated" if current else "created"
    if as_json:
        _emit_json({"job": name, "path": path, "kid": kid, "action": what, "revision": revision})
    else:
        click.echo(f"{name}\t{kid}\t{what}\t{revision}")


def _default_name(obj: dict, file_name: str) -> str:
    if isinstance(obj.get("name"), str):
        return obj["name"]
    if isinstance(obj.get("app"), str) and isinstance(obj.get("type"), str):
        return f"{obj['app']}-{obj['type']}"
    base = os.path.basename(file_name)
    if file_name in ("-", "<stdin>") or not base.endswith(".json"):
        raise click.UsageError("say which job this is: --name JOB, or a \"name\" field in the object")
    return base[:-len(".json")]


def _job_rows(store) -> list:
    """One row per job: the job, what the scheduler reported, and its replicas' state now."""
    mirror = sched.Mirror(store)
    mirror.load()
    jobs, machines, procs, outputs = mirror.inputs()
    now = time.time()
    rows = []
    for name in sorted(jobs):
        job = jobs[name]
        kid, obj = mirror.values[_job_path(name)]
        obj = obj if isinstance(obj, dict) else {}
        replicas = [p for p in procs if p.job == name]
        running = [p for p in replicas if p.status and p.status.get("state") == "running"
                   and sched.alive(machines.get(p.machine), now, sched.LEASE_TTL)]
        healthy = [p for p in running if sched.replica_health(p) == "healthy"]
        report = outputs.get(f"{sched.REPORTS}/{name}.json")
        try:
            report = json.loads(report) if report is not None else {}
        except ValueError:
            report = {}
        rows.append({"job": name, "kid": kid, "wanted": obj.get("replicas"), "placed": len(replicas),
                     "running": len(running), "healthy": len(healthy), "release": obj.get("release"),
                     "image": obj.get("image"),
                     "error": job.error if isinstance(job, sched.InvalidJob) else None,
                     "problem": report.get("problem"), "unplaced": report.get("unplaced", 0),
                     "replicas": sorted(f"{p.name}@{p.machine}" for p in replicas)})
    return rows


@job_group.command("ls")
@keg_target
@json_option
def job_ls(opener, as_json):
    """List the jobs: replicas wanted, running and healthy, release and image.

    \b
    Columns:
      JOB        the job (/jobs/JOB.json)
      REPLICAS   wanted/running/healthy: running counts replicas whose Mayor
                 reports them running (on a machine whose heartbeat is fresh),
                 healthy those whose health check passes or that have none
                 (with a port: once it accepts connections)
      RELEASE    the job's release (- when it has none)
      IMAGE      the image KID, shortened
      NOTE       what the scheduler last said: why replicas are not placed,
                 an update in progress, or why the job itself is refused

    --json prints one object per job with the replicas' names and machines.
    """
    with opener() as store:
        rows = _job_rows(store)
    if as_json:
        _emit_json(rows)
        return
    lines = [("JOB", "REPLICAS", "RELEASE", "IMAGE", "NOTE")]
    for r in rows:
        wanted = r["wanted"] if isinstance(r["wanted"], int) else "?"
        note = r["error"] or r["problem"] or ""
        lines.append((r["job"], f"{wanted}/{r['running']}/{r['healthy']}",
                      "-" if r["release"] is None else str(r["release"]), _short(r["image"]), note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    for line in lines:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1])


@job_group.command("rm")
@click.argument("jobs", nargs=-1, required=True, metavar="JOB...")
@keg_target
@json_option
def job_rm(jobs, opener, as_json):
    """Remove jobs; the scheduler then removes their replicas from the machines.

    All the jobs go in one transaction, or none (exit 1 when one is missing).
    """
    for name in jobs:
        sched.check_name(name)
    with opener() as store:
        ops, compares = [], []
        for name in jobs:
            try:
                kid = store.kid(_job_path(name))
            except NotFound as err:
                raise NotFound(f"no job {name}: {_job_path(name)} does not exist (keg job ls lists the jobs)") \
                    from err
            ops.append(delete(_job_path(name)))
            compares.append(compare(_job_path(name), kid))
        result = store.apply(Transaction(tuple(ops), tuple(compares)))
    if not result.ok:
        raise result.error
    if as_json:
        _emit_json({"removed": list(jobs), "revision": result.revision})
    else:
        for name in jobs:
            click.echo(f"removed job {name} (revision {result.revision}); the scheduler removes its replicas")


def _scale_targets(args: tuple) -> dict:
    """``{job: replicas}`` from ``APP TYPE=N…`` or ``JOB=N…``."""
    if not args:
        raise click.UsageError("give APP TYPE=N … or JOB=N …")
    app = None
    if "=" not in args[0]:
        app, args = args[0], args[1:]
        sched.check_name(app, "app")
        if not args:
            raise click.UsageError(f"give the process types to scale: keg scale {app} web=2")
    out = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise click.UsageError(f"{arg!r}: give {'TYPE' if app else 'JOB'}=N")
        try:
            count = int(value)
        except ValueError:
            count = -1
        if not 0 <= count <= sched.MAX_REPLICAS or not value.strip().isdigit():
            raise click.UsageError(f"{arg!r}: N must be a whole number from 0 to {sched.MAX_REPLICAS}")
        name = f"{app}-{key}" if app else key
        out[sched.check_name(name)] = count
    return out


@click.command("scale")
@click.argument("args", nargs=-1, required=True, metavar="APP TYPE=N... | JOB=N...")
@keg_target
@json_option
def scale_cmd(args, opener, as_json):
    """Set the number of replicas of jobs: `keg scale hello web=3 worker=1` or `keg scale batch=0`.

    APP TYPE=N sets the job APP-TYPE (/jobs/APP-TYPE.json). Each job's
    replicas field is changed by compare-and-swap, all jobs in one
    transaction: a concurrent change to a job is read again and the scaling
    applied to it (other fields are kept as they are).
    """
    targets = _scale_targets(args)
    with opener() as store:
        for attempt in range(SCALE_RETRIES):
            ops, compares, before = [], [], {}
            for name, count in targets.items():
                kid, obj = _read_job(store, name)
                before[name] = obj.get("replicas")
                obj["replicas"] = count
                sched.check_job(name, obj)
                ops.append(put(_job_path(name), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))
                compares.append(compare(_job_path(name), kid))
            result = store.apply(Transaction(tuple(ops), tuple(compares)))
            if result.ok:
                break
            if not isinstance(result.error, CompareFailed) or attempt == SCALE_RETRIES - 1:
                raise result.error
    if as_json:
        _emit_json([{"job": name, "replicas": count, "was": before[name], "revision": result.revision}
                    for name, count in targets.items()])
    else:
        for name, count in targets.items():
            click.echo(f"{name}\t{before[name]} -> {count}\t{result.revision}")


@click.group("scheduler")
def scheduler_group():
    """The scheduler: places /jobs/ replicas on machines (see docs/scheduler.md)."""


def _port_range(ctx, param, value) -> tuple:
    low, sep, high = value.partition("-")
    try:
        ports = (int(low), int(high)) if sep else None
    except ValueError:
        ports = None
    if ports is None or not 1 <= ports[0] <= ports[1] <= 65535:
        raise click.BadParameter(f"{value!r}: give LOW-HIGH, two ports such as 20000-29999")
    return ports


@scheduler_group.command("run")
@target_options
@click.option("--lease-ttl", type=click.FloatRange(min=0, min_open=True), default=sched.LEASE_TTL,
              show_default=True, metavar="SECONDS",
              help="A machine whose Mayor's heartbeat is older than this is dead: its replicas are evicted "
                   "and placed elsewhere.")
@click.option("--ports", type=str, default=f"{sched.PORT_RANGE[0]}-{sched.PORT_RANGE[1]}", show_default=True,
              callback=_port_range, metavar="LOW-HIGH", help="The ports given to replicas of jobs with \"port\": true.")
@click.option("--once", is_flag=True, help="Decide and write once, print what was done, and exit.")
def scheduler_run(keg_dir, url, token, lease_ttl, ports, once):
    """Place the replicas of every job until SIGTERM or SIGINT.

    Reads /jobs/, the machines' machine.json and heartbeats, and every
    process table with its status; writes new replicas and removes
    surplus ones in /machines/M/procs/, records evicted ones in
    /machines/M/evicted/, its view of each job in /scheduler/jobs/JOB.json
    and the endpoints of each service in /services/SERVICE.tsv. It acts on
    every change the master's watch stream shows and at least every second.
    Run one per cluster, with a token that may write those paths (an admin's).

    \b
    Examples:
      keg scheduler run --url http://127.0.0.1:7480 --token "$KEG_TOKEN"
      keg scheduler run --once --lease-ttl 60
    """
    store = open_keg(keg_dir, url, token)
    try:
        scheduler = sched.Scheduler(store, lease_ttl=lease_ttl, ports=ports)
        if once:
            decision = scheduler.step()
            if not decision:
                click.echo("keg scheduler: nothing to change", err=True)
            return
        stop = threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            click.echo(f"keg scheduler: placing jobs (lease {lease_ttl:g} s, ports {ports[0]}-{ports[1]})",
                       err=True)
            scheduler.run(stop)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        click.echo("keg scheduler: stopped", err=True)
    finally:
        store.close()


COMMANDS = (job_group, scale_cmd, scheduler_group)
