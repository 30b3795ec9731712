"""Apps, releases and the builder: ``keg apps``, ``keg releases``, ``keg rollback``, ``keg config``, ``keg builder run``.

Deploying is ``git push`` (docs/deploy.md); these commands look at what the
pushes made and change it: each change of config or a rollback is a new
release, deployed in one transaction with the app's jobs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

import click

from builders import releases
from keg.errors import BadRequest
from shell.cli import _emit_json, json_option
from shell.target import keg_target, open_keg, target_options


def _short(kid) -> str:
    return (kid or "-")[:14]


def _author_of_cli(store):
    """Who the local user is, for releases made by these commands (the master records the token's user)."""
    from keg.transaction import Author
    from keg.errors import KegError
    try:
        who = store.whoami() if hasattr(store, "whoami") else None
    except KegError:        # the master still records the token's user as the commit's author
        who = None
    name = (who or {}).get("name") if isinstance(who, dict) else None
    return Author(name or os.environ.get("USER", "keg"), f"{name or os.environ.get('USER', 'keg')}@keg")


@click.command("apps")
@keg_target
@json_option
def apps_cmd(opener, as_json):
    """List the apps: name, current release, image, owner.

    \b
    Example:
      keg apps
      hello   v3   K-1f3a9c0d2b4e   alice
    """
    with opener() as store:
        try:
            entries = store.list("/apps")
        except releases.NotFound:
            entries = []
        rows = []
        for entry in entries:
            if entry.kind != "tree":
                continue
            try:
                obj, _ = releases.read_app(store, entry.name)
            except releases.KegError:
                continue
            current = next((r for r in obj["releases"] if r.get("number") == obj.get("current")), {})
            rows.append({"app": entry.name, "current": obj.get("current"), "image": current.get("image"),
                         "owner": obj.get("owner"), "releases": len(obj["releases"])})
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        click.echo("no apps yet: push one with git (see `keg deploy --help`)", err=True)
    for row in rows:
        version = f"v{row['current']}" if row["current"] else "-"
        click.echo(f"{row['app']}\t{version}\t{_short(row['image'])}\t{row['owner'] or '-'}")


@click.command("releases")
@click.argument("app")
@keg_target
@json_option
def releases_cmd(app, opener, as_json):
    """List the releases of APP, newest first; `*` marks the current one.

    \b
    Example:
      keg releases hello
      * v3  2026-11-22T10:04:00Z  alice  Rollback to v1     K-1f3a9c0d2b4e
        v2  2026-11-22T10:02:00Z  alice  Build of K-8c1d…   K-77aa01b2c3d4
    """
    with opener() as store:
        obj, _ = releases.read_app(store, app)
    if as_json:
        _emit_json({"app": app, "current": obj.get("current"), "releases": obj["releases"]})
        return
    for rel in reversed(obj["releases"]):
        mark = "*" if rel.get("number") == obj.get("current") else " "
        click.echo(f"{mark} v{rel.get('number')}\t{rel.get('time', '-')}\t{rel.get('author', '-')}\t"
                   f"{rel.get('description', '')}\t{_short(rel.get('image'))}")


@click.command("rollback")
@click.argument("app")
@click.option("--to", "to", type=click.IntRange(min=1), metavar="N",
              help="The release to go back to (default: the one before the current).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the new release alone serves the app (web processes only).")
@keg_target
@json_option
def rollback_cmd(app, to, wait, opener, as_json):
    """Run an earlier release of APP again: a new release with its image, processes and config.

    Nothing is rebuilt; the app's jobs change in the same transaction, and the
    scheduler replaces the running processes.

    \b
    Examples:
      keg rollback hello          # back to the release before the current one
      keg rollback hello --to 1
    """
    with opener() as store:
        rel = releases.rollback(store, app, to, _author_of_cli(store))
        if wait and not releases.wait_serving(store, app, rel):
            click.echo(f"keg: v{rel['number']} is not serving yet; see keg ps and keg job ls", err=True)
    if as_json:
        _emit_json(rel)
    else:
        click.echo(f"{app}: {rel['description'].lower()} as v{rel['number']} (image {_short(rel['image'])})")


@click.group("config")
def config_group():
    """An app's config: environment variables of its processes. Each change is a new release."""


def _pairs(values) -> dict:
    out = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep:
            raise BadRequest(f"{text!r}: give KEY=VALUE")
        out[key] = value
    return out


def _change_config(opener, app: str, changes: dict, unset, as_json: bool) -> None:
    with opener() as store:
        rel = releases.set_config(store, app, changes, unset, _author_of_cli(store))
    if as_json:
        _emit_json(rel)
    else:
        click.echo(f"{app}: {rel['description']} as v{rel['number']}")


@config_group.command("show")
@click.argument("app")
@keg_target
@json_option
def config_show(app, opener, as_json):
    """Print APP's config, one KEY=VALUE a line."""
    with opener() as store:
        obj, _ = releases.read_app(store, app)
    config = obj.get("config") or {}
    if as_json:
        _emit_json(config)
        return
    for key in sorted(config):
        click.echo(f"{key}={config[key]}")


@config_group.command("set")
@click.argument("app")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
@keg_target
@json_option
def config_set(app, pairs, opener, as_json):
    """Set config of APP and deploy it as a new release.

    \b
    Example:
      keg config set hello GREETING=hi MODE=fast
    """
    _change_config(opener, app, _pairs(pairs), (), as_json)


@config_group.command("unset")
@click.argument("app")
@click.argument("keys", nargs=-1, required=True, metavar="KEY...")
@keg_target
@json_option
def config_unset(app, keys, opener, as_json):
    """Remove config keys of APP and deploy it as a new release."""
    _change_config(opener, app, {}, keys, as_json)


@click.group("builder")
def builder_group():
    """The builder: turns pushed sources into images and releases (DESIGN §6)."""


@builder_group.command("run")
@target_options
@click.option("--name", default=lambda: socket.gethostname().split(".")[0].lower() or "builder",
              show_default="this host's name", metavar="NAME", help="This builder's name (in build logs).")
@click.option("--data", "data_dir", required=True, metavar="DIR", type=click.Path(file_okay=False),
              help="Where the builder keeps its source cache, scratch space and containers' files.")
@click.option("--once", is_flag=True, help="Build what is pending, then exit.")
def builder_run(keg_dir, url, token, name, data_dir, once):
    """Build every pushed source in a container with no network, and release it.

    Watches /src/; for each new source it fetches the commit, builds it
    (Python, static or keg.build; see docs/builds.md) with inputs read-only
    from the keg, writes the image to /oci-images/<app>/<source KID>/, the log
    and result to /builds/<app>/<source KID>/, and makes a release in
    /apps/<app>/app.json. A build whose inputs (source tree, base image,
    packages) were built before is not built again. Stops on SIGINT/SIGTERM.

    The token needs write access to /builds, /oci-images, /apps and /jobs.

    \b
    Example:
      keg builder run --url http://127.0.0.1:7480 --token-file ... --data /var/lib/keg/builder
    """
    from builders.builder import Builder
    from mayor.runc_runtime import RuncRuntime

    store = open_keg(keg_dir, url, token)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        os.makedirs(data_dir, mode=0o711, exist_ok=True)
        os.chmod(data_dir, 0o711)
        runtime = RuncRuntime(store, os.path.join(os.path.abspath(data_dir), "runtime"), f"build-{name}",
                              cgroup_parent="keg-builds")
        builder = Builder(store, name, data_dir, runtime, git_url=url.split(",")[0] if url else None, token=token,
                          say=lambda text: click.echo(text, err=True))
        click.echo(f"keg builder: {name}, data {data_dir}; watching /src", err=True)
        if once:
            for result in builder.step():
                click.echo(json.dumps({k: result.get(k) for k in ("app", "source", "ok", "release", "error")}))
        else:
            builder.run(stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        store.close()
    click.echo("keg builder: stopped", err=True)


COMMANDS = (apps_cmd, releases_cmd, rollback_cmd, config_group, builder_group)
