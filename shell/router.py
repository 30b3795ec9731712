"""``keg router run``: the HTTP front door, nginx configured from ``/services/*.tsv``.

The router is policy over mechanism (DESIGN §1.3): it only reads and watches
``/services/`` (written by the scheduler, docs/namespace.md) and turns the
``healthy`` lines into an nginx configuration.  nginx is Debian's, run as a
child of the router with a prefix, configuration, logs and temporary files of
its own under the router's data directory (never ``/etc/nginx``).

One single-threaded loop (DESIGN §1.5):

1. read every ``/services/<service>.tsv`` at the head revision R;
2. render the configuration (a pure function of the services, the listen
   address and the domain); when it differs from the one nginx runs, write it,
   check it with ``nginx -t`` and send nginx's master SIGHUP: nginx starts new
   workers with the new configuration and lets the old ones finish the
   requests they are serving, so no connection is dropped;
3. wait on the watch stream of ``/services`` after R; on any event, or every
   few seconds to look after nginx, go to 1.

Requests: ``Host: <service>.<domain>`` goes to that service, and on any other
host a path ``/<service>/…`` goes to the service with the prefix removed (for
set-ups without DNS).  nginx retries a failed attempt (connection refused or
reset, timeout, 502, 503) on the service's other endpoints, so a replica that
dies or is being replaced costs no failed idempotent request.  A service with
no healthy endpoint answers 503, an unknown service 404; both say why in a
text body.  The on-disk layout is in docs/router.md.
"""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time

import click

from keg.errors import KegError, NotFound
from shell.target import open_keg, target_options

SERVICES = "/services"
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
COLUMNS = ("machine", "address", "port", "process", "health", "job", "release")
IDLE_CHECK = 2.0          # seconds between looks at nginx while /services is quiet
START_TIMEOUT = 20.0      # seconds for nginx to write its pid file
STOP_GRACE = 10.0         # seconds nginx gets to finish in-flight requests on a stop (SIGQUIT), then SIGTERM
WORKER_SHUTDOWN = 300     # seconds an old worker may keep serving long requests after a reload
PR_SET_PDEATHSIG = 1


class RouterError(KegError):
    """nginx could not be started, checked or reloaded."""

    exit_code = 4


# ---------------------------------------------------------------- services


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One line of a ``/services/<service>.tsv``: where a replica listens and whether it is healthy."""

    address: str
    port: int
    health: str
    machine: str = ""
    process: str = ""

    @property
    def hostport(self) -> str:
        """``address:port`` as nginx wants it (an IPv6 address in brackets)."""
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


def _valid_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(HOSTNAME_RE.match(text)) and len(text) <= 253


def parse_services_tsv(text: str, warn=None) -> list:
    """The endpoints of one service table, in file order.

    The header line (``# machine  address  port …``) names the columns;
    unknown columns are ignored; a table without a header has the columns of
    docs/namespace.md.  A line with an address or port that is not one is
    left out (``warn`` is told), so nothing from the table can reach the
    nginx configuration unchecked.

    Args:
        text: the table.
        warn: called with a message for each line left out.

    Returns:
        a list of ``Endpoint``.
    """
    columns = list(COLUMNS)
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            if number == 1 or not found:
                columns = [c.strip() for c in line.lstrip("#").strip().split("\t")]
            continue
        row = dict(zip(columns, line.split("\t")))
        address, port = row.get("address", "").strip(), row.get("port", "").strip()
        if not _valid_address(address) or not port.isdigit() or not 0 < int(port) < 65536:
            if warn is not None:
                warn(f"line {number}: {address!r}:{port!r} is not an address and port; left out")
            continue
        found.append(Endpoint(address, int(port), row.get("health", "").strip(),
                              row.get("machine", "").strip(), row.get("process", "").strip()))
    return found


def healthy(endpoints) -> list:
    """The endpoints the router sends requests to: ``healthy`` lines, each address:port once."""
    seen, chosen = set(), []
    for e in endpoints:
        if e.health == "healthy" and e.hostport not in seen:
            seen.add(e.hostport)
            chosen.append(e)
    return chosen


def read_services(store, rev, cache: dict, warn=None) -> dict:
    """``{service: [Endpoint]}`` for every ``/services/<service>.tsv`` at revision ``rev``.

    ``cache`` maps a table's KID to its endpoints, so a change reads only the
    tables that changed.  A file whose name is not a service name is ignored.
    """
    try:
        entries = store.list(SERVICES, rev=rev)
    except NotFound:
        return {}
    services, kids = {}, set()
    for entry in entries:
        name = entry.path.rsplit("/", 1)[-1]
        if entry.kind != "file" or not name.endswith(".tsv"):
            continue
        service = name[:-4]
        if not NAME_RE.match(service):
            if warn is not None:
                warn(f"{entry.path}: {service!r} is not a service name ([a-z][a-z0-9-]*); ignored")
            continue
        if entry.kid not in cache:
            text = store.read(entry.path, rev=rev).decode("utf-8", "replace")
            cache[entry.kid] = parse_services_tsv(text, None if warn is None else
                                                  (lambda m, p=entry.path: warn(f"{p}: {m}")))
        kids.add(entry.kid)
        services[service] = cache[entry.kid]
    for stale in set(cache) - kids:
        del cache[stale]
    return services


# ------------------------------------------------------------ configuration


def _quoted(text: str) -> str:
    """An nginx string literal (what goes in is names and addresses already checked; this is belt and braces)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _body(text: str) -> str:
    """A ``return`` text ending in a newline (nginx reads \\n in a quoted string as one)."""
    return _quoted(text)[:-1] + '\\n"'


def _proxy(upstream: str, service: str, prefix: str) -> list:
    """The lines of a location that proxies to ``upstream``; ``prefix`` is the path prefix removed, if any."""
    target = f"http://{upstream}/" if prefix else f"http://{upstream}"
    lines = [
        f"set $keg_service {service};",
        f"proxy_pass {target};",
        "proxy_http_version 1.1;",
        "proxy_set_header Host $host;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $keg_connection;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_set_header X-Forwarded-Host $http_host;",
    ]
    if prefix:
        lines.append(f"proxy_set_header X-Forwarded-Prefix {prefix.rstrip('/')};")
    return lines


def _no_endpoint(service: str) -> list:
    return [f"set $keg_service {service};",
            f"return 503 {_body(f'keg router: service {service} has no healthy endpoint; see /services/{service}.tsv and keg ps')};"]


def render_config(services: dict, listen: str, domain: str, data_dir: str) -> str:
    """The whole nginx configuration for ``services`` (a pure function: same input, same bytes).

    Args:
        services: ``{service: [Endpoint]}``; only healthy endpoints are used.
        listen: ``HOST:PORT`` the router listens on.
        domain: ``<service>.<domain>`` names a service.
        data_dir: the router's data directory (logs, pid file, temporary files).

    Returns:
        the configuration text.
    """
    d = os.path.abspath(data_dir)
    dom = domain.lower()
    names = sorted(services)
    out = [
        "# Written by keg router run from /services/*.tsv; changes here are overwritten.",
        "daemon off;",
        "master_process on;",
        "worker_processes 1;",
        f"pid {d}/nginx.pid;",
        f"error_log {d}/error.log notice;",
        f"worker_shutdown_timeout {WORKER_SHUTDOWN}s;",
        "events { worker_connections 4096; }",
        "http {",
        "    default_type text/plain;",
        "    server_tokens off;",
        "    log_format keg '$time_iso8601\\t$keg_service\\t$status\\t$upstream_addr\\t$upstream_status\\t'",
        "                   '$request_time\\t$request_method\\t$host\\t$request_uri';",
        f"    access_log {d}/access.log keg;",
        f"    client_body_temp_path {d}/tmp/body;",
        f"    proxy_temp_path {d}/tmp/proxy;",
        f"    fastcgi_temp_path {d}/tmp/fastcgi;",
        f"    uwsgi_temp_path {d}/tmp/uwsgi;",
        f"    scgi_temp_path {d}/tmp/scgi;",
        "    server_names_hash_bucket_size 128;",
        "    map $http_upgrade $keg_connection { default upgrade; '' ''; }",
        "    proxy_next_upstream error timeout http_502 http_503;",
        "    proxy_next_upstream_tries 0;",
        "    proxy_next_upstream_timeout 30s;",
        "    proxy_connect_timeout 3s;",
        "    proxy_read_timeout 300s;",
        "    proxy_send_timeout 300s;",
        "    client_max_body_size 1g;",
        "    add_header X-Content-Type-Options nosniff always;",
    ]
    for name in names:
        live = healthy(services[name])
        if live:
            out.append(f"    upstream keg-{name} {{")
            out += [f"        server {e.hostport} max_fails=1 fail_timeout=2s;" for e in live]
            out.append("        keepalive 16;")
            out.append("    }")
    # One server per service host name.
    for name in names:
        live = healthy(services[name])
        out.append(f"    server {{ listen {listen}; server_name {name}.{dom};")
        body = _proxy(f"keg-{name}", name, "") if live else _no_endpoint(name)
        out.append("        location / { " + " ".join(body) + " }")
        out.append("    }")
    # Any other name under the domain: no such service.
    pattern = "~^(?<keg_app>[^.]+)\\." + re.escape(dom).replace("\\-", "-") + "$"
    out.append(f"    server {{ listen {listen}; server_name {_quoted(pattern)};")
    out.append("        location / { set $keg_service -; return 404 "
               + _body(f"keg router: no service named $keg_app under {dom}; services: {' '.join(names) or '(none)'}")
               + "; }")
    out.append("    }")
    # Every other host (the bare address, localhost…): /<service>/… with the prefix removed.
    out.append(f"    server {{ listen {listen} default_server; server_name _;")
    out.append("        set $keg_service -;")
    for name in names:
        live = healthy(services[name])
        out.append(f"        location = /{name} {{ return 301 /{name}/$is_args$args; }}")
        body = _proxy(f"keg-{name}", name, f"/{name}/") if live else _no_endpoint(name)
        out.append(f"        location /{name}/ {{ " + " ".join(body) + " }")
    out.append("        location / { return 404 "
               + _body(f"keg router: no service at this path; ask for http://<service>.{dom}/ or "
                       f"/<service>/ here; services: {' '.join(names) or '(none)'}") + "; }")
    out.append("    }")
    out.append("}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------- nginx


def _die_with_parent() -> None:
    """In the child before exec: nginx's master gets SIGTERM if the router dies without stopping it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Nginx:
    """Debian's nginx as a child process with a prefix of its own under ``data_dir``.

    Args:
        binary: the nginx program.
        data_dir: holds nginx.conf, nginx.pid, error.log, access.log and tmp/.
    """

    def __init__(self, binary: str, data_dir: str):
        self.binary = binary
        self.data_dir = os.path.abspath(data_dir)
        self.conf = os.path.join(self.data_dir, "nginx.conf")
        self.pid_file = os.path.join(self.data_dir, "nginx.pid")
        self.error_log = os.path.join(self.data_dir, "error.log")
        self.proc = None

    def _command(self, *extra: str) -> list:
        return [self.binary, "-p", self.data_dir + "/", "-c", self.conf, "-e", self.error_log, *extra]

    def check(self, text: str) -> None:
        """Write ``text`` to a candidate file and have ``nginx -t`` check it; the running config is untouched.

        Raises:
            RouterError: nginx refuses it (its message is in the error).
        """
        os.makedirs(os.path.join(self.data_dir, "tmp"), exist_ok=True)
        candidate = self.conf + ".new"
        with open(candidate, "w") as f:
            f.write(text)
        done = subprocess.run([self.binary, "-t", "-q", "-p", self.data_dir + "/", "-c", candidate,
                               "-e", self.error_log], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RouterError(f"nginx -t refused the configuration {candidate}: {done.stderr.strip()}")

    def install(self) -> None:
        """Make the checked candidate the configuration (an atomic rename)."""
        os.replace(self.conf + ".new", self.conf)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start nginx on the installed configuration and wait until it has written its pid file.

        Its listening sockets are bound before the pid file is written, and its
        signal handlers installed, so a reload after this is safe.

        Raises:
            RouterError: nginx exited or did not come up.
        """
        try:
            os.unlink(self.pid_file)
        except FileNotFoundError:
            pass
        self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RouterError(f"nginx exited with {self.proc.returncode} at start: {self.error_tail()}")
            try:
                with open(self.pid_file) as f:
                    if f.read().strip() == str(self.proc.pid):
                        return
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RouterError(f"nginx did not come up in {START_TIMEOUT:g} s: {self.error_tail()}")

    def reload(self) -> None:
        """SIGHUP: new workers take the new configuration; the old ones finish what they serve."""
        if not self.alive():
            raise RouterError("nginx is not running")
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGQUIT (finish in-flight requests, then exit); SIGTERM after ``grace`` seconds, SIGKILL after more."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGQUIT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait()

    def error_tail(self, size: int = 2000) -> str:
        try:
            with open(self.error_log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode("utf-8", "replace").strip() or "(error log empty)"
        except FileNotFoundError:
            return "(no error log)"


# -------------------------------------------------------------------- router


class Router:
    """The loop: services at revision R → configuration → nginx; then wait for a change after R.

    Args:
        store: a ``RemoteKeg`` or local ``Store`` (read and watch only).
        nginx: the ``Nginx`` to configure.
        listen: ``HOST:PORT``.
        domain: ``<service>.<domain>`` names a service.
        say: called with each line worth logging.
    """

    def __init__(self, store, nginx: Nginx, listen: str, domain: str, say=None):
        self.store, self.nginx, self.listen, self.domain = store, nginx, listen, domain
        self.say = say or (lambda line: None)
        self.revision = None
        self.config = None
        self.services = {}
        self.reloads = 0
        self._cache = {}
        self._refused = None

    def sync(self) -> bool:
        """Bring nginx to the head revision's services; True when its configuration changed.

        Raises:
            RouterError: nginx refused the new configuration (the old one keeps serving) or died.
        """
        head = self.store.revision().number
        services = read_services(self.store, head, self._cache, warn=lambda m: self.say(f"warning: {m}"))
        text = render_config(services, self.listen, self.domain, self.nginx.data_dir)
        self.revision = head
        if text == self._refused and self.nginx.alive():
            return False  # said once already; the last good configuration keeps serving
        self._refused = text
        if not self.nginx.alive():
            if self.nginx.proc is not None:
                self.say(f"nginx exited with {self.nginx.proc.returncode}; starting it again: "
                         f"{self.nginx.error_tail(500)}")
            self.nginx.check(text)
            self.nginx.install()
            self.nginx.start()
        elif text != self.config:
            self.nginx.check(text)
            self.nginx.install()
            self.nginx.reload()
            self.reloads += 1
        else:
            self._refused = None
            return False
        self.config, self.services, self._refused = text, services, None
        summary = ", ".join(f"{n} {len(healthy(e))}/{len(e)}" for n, e in sorted(services.items())) or "none"
        self.say(f"revision {head}: services (healthy/all) {summary}")
        return True

    def wait(self, timeout: float = IDLE_CHECK) -> bool:
        """Block until something under /services changes after the synced revision, or ``timeout`` passes.

        Returns:
            True on a change.
        """
        stream = self.store.watch(SERVICES, since=self.revision, timeout=timeout)
        try:
            for _ in stream:
                return True
        finally:
            stream.close()
        return False

    def step(self, timeout: float = IDLE_CHECK) -> bool:
        """One round: sync, then wait for a change; what tests call by hand."""
        changed = self.sync()
        self.wait(timeout)
        return changed

    def run(self) -> None:
        """Until SIGTERM or SIGINT (raised into this loop as ``Stopped``).

        Raises:
            Stopped: a signal arrived, whether it was raised here or swallowed on its way (see ``_raise_stopped``).
        """
        while True:
            if _STOP.requested:
                raise Stopped(_STOP.requested)
            try:
                self.step()
            except RouterError as err:
                if self.config is None:
                    raise
                # A refused configuration leaves the last good one serving; say so, try again on the next change.
                self.say(f"error: {err}")
                self._wait_quietly()
            except KegError as err:
                # The master is away: nginx keeps routing to what it knew (as a Mayor keeps its processes).
                self.say(f"error: {err}; nginx keeps the configuration of revision {self.revision}")
                time.sleep(IDLE_CHECK)

    def _wait_quietly(self) -> None:
        try:
            self.wait()
        except KegError:
            time.sleep(IDLE_CHECK)


class Stopped(Exception):
    """SIGTERM or SIGINT arrived."""


class _StopRequest:
    """The signal that asked the router to stop, kept apart from the exception that carries it."""

    requested: str = ""


_STOP = _StopRequest()


def _raise_stopped(signum, _frame):
    """Record the signal, then raise it into whatever runs.  The record matters: the handler may run inside a
    finalizer (a watch stream's connection closed by the garbage collector), where Python prints and drops the
    exception; ``Router.run`` then finds the record on its next round."""
    _STOP.requested = signal.Signals(signum).name
    raise Stopped(_STOP.requested)


def parse_listen(text: str) -> str:
    """``HOST:PORT`` (IPv6 in brackets) checked and returned as nginx's ``listen`` wants it.

    Raises:
        click.BadParameter: not a host and port.
    """
    host, sep, port = text.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not bare or not _valid_address(bare):
        raise click.BadParameter(f"{text!r} is not HOST:PORT", param_hint="--listen")
    return text


@click.group("router")
def router_group():
    """The HTTP front door: nginx configured from /services/*.tsv (docs/router.md)."""


@router_group.command("run")
@target_options
@click.option("--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
              help="Where nginx accepts requests.")
@click.option("--domain", default="keg.localhost", show_default=True, metavar="DOMAIN",
              help="Host SERVICE.DOMAIN goes to SERVICE; other hosts use the path prefix /SERVICE/.")
@click.option("--nginx", "nginx_binary", default="nginx", show_default=True, metavar="PROGRAM",
              help="The nginx program (Debian's nginx or nginx-light).")
@click.option("--data", "data_dir", default=None, metavar="DIR", type=click.Path(file_okay=False),
              help="The router's own directory: nginx.conf, pid file, error.log, access.log, tmp/. "
                   "Default: $HOME/.keg/router.")
def router_run(keg_dir, url, token, listen, domain, nginx_binary, data_dir):
    """Run the router until SIGTERM or SIGINT: nginx sends requests to the healthy endpoints of /services.

    Host SERVICE.DOMAIN goes to the healthy endpoints listed in
    /services/SERVICE.tsv, as does the path /SERVICE/… on any other host
    (the prefix is removed, and sent as X-Forwarded-Prefix). On every change
    under /services the configuration is regenerated, checked with nginx -t
    and loaded with SIGHUP: connections in flight are finished by the old
    workers. A failed attempt (refused, reset, timeout, 502, 503) is retried
    on the service's other endpoints. No healthy endpoint: 503; an unknown
    service: 404. Each request is a line of DIR/access.log (time, service,
    status, upstream addresses and statuses, duration, method, host, URI);
    the canary policy reads it.

    \b
    Examples:
      keg router run --url http://127.0.0.1:7480 --listen 0.0.0.0:80 --domain apps.example.com
      curl -H 'Host: hello.keg.localhost' http://127.0.0.1:8080/
      curl http://127.0.0.1:8080/hello/
    """
    listen = parse_listen(listen)
    domain = domain.strip().strip(".").lower()
    if not domain or not HOSTNAME_RE.match(domain):
        raise click.BadParameter(f"{domain!r} is not a domain name", param_hint="--domain")
    if data_dir is None:
        data_dir = os.path.join(os.path.expanduser("~"), ".keg", "router")
    os.makedirs(data_dir, exist_ok=True)
    binary = nginx_binary if os.sep in nginx_binary else (_which(nginx_binary) or nginx_binary)

    def say(line: str) -> None:
        click.echo(f"keg router: {line}", err=True)

    _STOP.requested = ""
    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    nginx = Nginx(binary, data_dir)
    try:
        with open_keg(keg_dir, url, token) as store:
            router = Router(store, nginx, listen, domain, say)
            router.sync()
            say(f"listening on http://{listen}/ for *.{domain} (nginx pid {nginx.proc.pid}, data {nginx.data_dir})")
            router.run()
    except Stopped as why:
        say(f"{why}: stopping nginx (in-flight requests are finished)")
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second TERM must not interrupt the stop
        try:
            nginx.stop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    say("stopped")


def _which(program: str):
    for directory in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]:
        candidate = os.path.join(directory, program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(router_run())
