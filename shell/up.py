"""``keg up``: the whole of Keg on one machine, with one command (DESIGN §1.6).

It runs the same programs a cluster runs, each a child process with its log
in ``DATA/logs/``:

- ``keg master serve`` over ``DATA/keg`` (the web UI is the master's),
- ``keg mayor run`` for this machine (containers stopped when ``keg up`` stops),
- ``keg builder run``, ``keg scheduler run``, ``keg router run``.

On the first start it creates the keg, its admin (token printed once as
``admin token: TOKEN`` and kept in ``DATA/admin-token``, mode 0600), the
machine user of the Mayor, ``/policy/router.json`` (where apps answer), and
prepares the Debian base image that builds use. Started again with the same
``--data`` it resumes: same keg, same token, same apps. Ctrl-C (SIGINT) or
SIGTERM stops the children in reverse order and waits for them; the Mayor
stops its containers first, so nothing is left running or mounted.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import click

DEFAULT_DATA = os.path.join(os.path.expanduser("~"), ".local", "share", "keg")
BASE_IMAGE = "debian:bookworm"
BASE_TARBALL = "/var/cache/keg/debian-bookworm.tgz"
RESTARTS = 5             # a child that dies more often than this within RESTART_WINDOW stops keg up
RESTART_WINDOW = 60.0
STOP_WAIT = 60.0         # seconds a child gets to stop before it is killed


def _keg_argv() -> list:
    return [sys.executable, "-m", "shell"]


@dataclasses.dataclass
class Child:
    name: str
    argv: list
    log: str
    env: dict
    proc: subprocess.Popen | None = None
    starts: list = dataclasses.field(default_factory=list)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            log.write(f"\n=== keg up: starting {self.name} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self.env, start_new_session=True)
        self.starts = [t for t in self.starts if time.monotonic() - t < RESTART_WINDOW] + [time.monotonic()]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_WAIT)
        except subprocess.TimeoutExpired:
            click.echo(f"keg up: {self.name} did not stop within {STOP_WAIT:g} s; killing it", err=True)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _write_private(path: str, text: str) -> None:
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _first_start(data: str, machine: str, say) -> str:
    """Create the keg, its admin and the Mayor's machine user; returns the admin token."""
    import keg
    from master import auth

    ops, token = auth.initial_ops("admin", "")
    with keg.init(os.path.join(data, "keg"), initial=ops) as store:
        machine_token = auth.add_user(store, machine, machine=True)
    _write_private(os.path.join(data, "admin-token"), token + "\n")
    _write_private(os.path.join(data, "mayor-token"), machine_token + "\n")
    say(f"keg up: created the keg in {os.path.join(data, 'keg')}")
    return token


def _wait_for_master(child: Child, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    with open(child.log, "rb") as log:
        log.seek(0, os.SEEK_END)
        start = max(0, log.tell() - 4096)
    while time.monotonic() < deadline:
        with open(child.log, "rb") as log:
            log.seek(start)
            text = log.read().decode(errors="replace")
        found = re.findall(r"at (http://[0-9.:\[\]a-z]+)", text)
        if found:
            return found[-1]
        if not child.alive():
            break
        time.sleep(0.05)
    with open(child.log, "rb") as log:
        tail = log.read()[-2000:].decode(errors="replace")
    raise click.ClickException(f"the master did not start; its log ({child.log}) ends with:\n{tail}")


def _ensure_base(url: str, token: str, tarball: str | None, env: dict, say, source: str | None = None) -> None:
    """Import the Debian base image once, with debootstrap's progress on the terminal.

    ``source``: an image (OCI layout, tarball) to import as the base instead of bootstrapping one.
    """
    from master.client import RemoteKeg
    from keg.errors import NotFound

    name, tag = BASE_IMAGE.split(":")
    with RemoteKeg(url, token) as remote:
        try:
            remote.stat(f"/oci-images/{name}/{tag}/index.json")
            return
        except NotFound:
            pass
    if source:
        say(f"keg up: importing the base image {BASE_IMAGE} for builds from {source}")
        argv = [*_keg_argv(), "image", "import", source, BASE_IMAGE, "--url", url]
    else:
        say(f"keg up: preparing the base image {BASE_IMAGE} for builds (first start only; a few minutes)")
        argv = [*_keg_argv(), "image", "bootstrap", "debian", "--url", url]
        if tarball:
            argv += ["--tarball", tarball]
    done = subprocess.run(argv, env=env, check=False)
    if done.returncode != 0:
        raise click.ClickException(f"preparing the base image failed (exit {done.returncode}); "
                                   "builds need it: see the lines above, then run keg up again")


@click.command("up")
@click.option("--data", "data_dir", default=lambda: os.environ.get("KEG_HOME") or DEFAULT_DATA,
              show_default="$KEG_HOME or ~/.local/share/keg", metavar="DIR", type=click.Path(file_okay=False),
              help="Where everything is kept: the keg, the Mayor's and builder's files, logs, the admin token.")
@click.option("--port", type=click.IntRange(1, 65535), default=7480, show_default=True,
              help="The master's port on 127.0.0.1: API, web UI and git.")
@click.option("--router-port", type=click.IntRange(1, 65535), default=8080, show_default=True,
              help="The router's port on 127.0.0.1, where apps answer.")
@click.option("--domain", default="keg.localhost", show_default=True, metavar="DOMAIN",
              help="Apps answer at http://APP.DOMAIN:ROUTER-PORT/ (*.localhost resolves to this machine).")
@click.option("--machine", default="local", show_default=True, metavar="NAME", help="This machine's name.")
@click.option("--runtime", "runtime_kind", type=click.Choice(["runc", "noop"]), default="runc", show_default=True,
              help="runc: real containers (needs root). noop: processes are records only (a look around).")
@click.option("--base/--no-base", "want_base", default=True, show_default=True,
              help="Prepare the Debian base image builds use, on first start.")
@click.option("--base-tarball", metavar="FILE", default=lambda: BASE_TARBALL if os.path.exists(BASE_TARBALL) else None,
              show_default=f"{BASE_TARBALL} if it exists",
              help="Bootstrap the base image offline from this debootstrap tarball (install.sh makes one).")
@click.option("--base-from", metavar="IMAGE", type=click.Path(exists=True),
              help="Import the base image from this OCI layout, OCI/docker archive or root filesystem "
                   "instead of bootstrapping Debian.")
def up_cmd(data_dir, port, router_port, domain, machine, runtime_kind, want_base, base_tarball, base_from):
    """Run Keg on this machine: master, web UI, Mayor, builder, scheduler and router.

    The first start creates a keg in DIR and prints the admin token once, as
    `admin token: TOKEN` (it is also kept in DIR/admin-token, readable only by
    you). Later starts resume with the same keg and token. Ctrl-C stops
    everything cleanly, containers included.

    \b
    Then deploy an app from its git repository:
      git remote add keg http://admin:TOKEN@127.0.0.1:7480/git/apps/hello.git
      git push keg main
      curl http://hello.keg.localhost:8080/
    """
    say = lambda text: click.echo(text, err=True)  # noqa: E731
    data = os.path.abspath(data_dir)
    os.makedirs(data, mode=0o711, exist_ok=True)
    os.chmod(data, 0o711)                                   # containers' files below must be searchable
    if runtime_kind == "runc":
        from mayor.runtime_spec import SpecError, check_searchable
        try:
            check_searchable(os.path.join(data, "rootfs"))   # the same parents as the Mayor's and builder's
        except SpecError as err:
            raise click.ClickException(f"{err} (--data {data_dir})") from err
    logs = os.path.join(data, "logs")
    os.makedirs(logs, exist_ok=True)
    first = not os.path.exists(os.path.join(data, "keg"))
    token = _first_start(data, machine, say) if first else None
    if token is None:
        try:
            with open(os.path.join(data, "admin-token")) as f:
                token = f.read().strip()
        except OSError as err:
            raise click.ClickException(f"{data}/keg exists but its admin token file cannot be read ({err})") from err
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("KEG_URL", "KEG_TOKEN", "KEG_DIR")}
    child_env = dict(env, KEG_URL=url, KEG_TOKEN=token, PYTHONUNBUFFERED="1")
    keg = _keg_argv()
    master = Child("master", [*keg, "master", "serve", "--keg", os.path.join(data, "keg"),
                              "--listen", f"127.0.0.1:{port}"], os.path.join(logs, "master.log"), env)
    others = [
        Child("mayor", [*keg, "mayor", "run", "--url", url, "--token-file", os.path.join(data, "mayor-token"),
                        "--name", machine, "--data", os.path.join(data, "mayor"), "--runtime", runtime_kind,
                        "--stop-on-exit"], os.path.join(logs, "mayor.log"), env),
        Child("scheduler", [*keg, "scheduler", "run"], os.path.join(logs, "scheduler.log"), child_env),
        Child("router", [*keg, "router", "run", "--listen", f"127.0.0.1:{router_port}", "--domain", domain,
                         "--data", os.path.join(data, "router")], os.path.join(logs, "router.log"), child_env),
    ]
    if runtime_kind == "runc":
        others.append(Child("builder", [*keg, "builder", "run", "--name", machine,
                                        "--data", os.path.join(data, "builder")],
                            os.path.join(logs, "builder.log"), child_env))
    children = [master, *others]
    stopping = []
    previous = {s: signal.signal(s, lambda *_: stopping.append(1)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        master.start()
        url = _wait_for_master(master)
        from master.client import RemoteKeg
        with RemoteKeg(url, token) as remote:
            _router_policy(remote, router_port, domain)
        if want_base and runtime_kind == "runc" and not stopping:
            _ensure_base(url, token, base_tarball, dict(env, KEG_TOKEN=token), say, base_from)
        for child in others:
            if not stopping:
                child.start()
        if not stopping:
            _greet(say, data, url, token if first else None, router_port, domain)
        while not stopping:
            time.sleep(0.25)
            for child in children:
                if child.alive() or stopping:
                    continue
                code = child.proc.returncode
                if len(child.starts) >= RESTARTS:
                    say(f"keg up: {child.name} keeps failing (exit {code}); see {child.log}. Stopping.")
                    stopping.append(1)
                    break
                say(f"keg up: {child.name} exited ({code}); starting it again (log: {child.log})")
                child.start()
    finally:
        say("keg up: stopping…")
        for child in reversed(children):
            child.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    say("keg up: stopped; start again with the same --data to resume")


def _router_policy(remote, router_port: int, domain: str) -> None:
    """``/policy/router.json``: where apps answer, for the push output and the router's defaults."""
    import json

    from keg.errors import NotFound
    from keg.transaction import Transaction, put

    body = json.dumps({"url": f"http://127.0.0.1:{router_port}", "domain": domain}, indent=2) + "\n"
    try:
        if remote.read("/policy/router.json").decode() == body:
            return
    except NotFound:
        pass
    remote.apply(Transaction((put("/policy/router.json", body),)))


def _greet(say, data: str, url: str, token: str | None, router_port: int, domain: str) -> None:
    say("")
    say(f"Keg is up: {url}/  (the web UI; the API is under /v1)")
    if token is not None:
        click.echo(f"admin token: {token}")
        say(f"  kept in {data}/admin-token (readable only by you); it is not shown again")
    else:
        say(f"  admin token: in {data}/admin-token")
    say(f"  use the command line: export KEG_URL={url} KEG_TOKEN=$(cat {data}/admin-token)")
    say("Deploy an app from its git repository:")
    host = url.split("//", 1)[1]
    click.echo(f"  git remote add keg http://admin:$(cat {data}/admin-token)@{host}/git/apps/APP.git")
    say("  git push keg main")
    say(f"Apps answer at http://APP.{domain}:{router_port}/ (or http://127.0.0.1:{router_port}/APP/)")
    say(f"Logs: {data}/logs/. Ctrl-C stops everything.")
