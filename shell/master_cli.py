"""``keg master serve --raft-…`` (a Raft replica), ``keg master status`` and ``keg master member``.

The options of ``keg master serve`` are declared in ``shell.cli``; when
``--raft-self`` is given it calls ``serve_replica`` here.  The other two
commands are registered on the ``master`` group by ``shell.cli``.
"""

from __future__ import annotations

import ipaddress
import json

import click

import keg

RAFT_OPTIONS_HELP = """
\b
Replicated (Raft) mode, DESIGN §4 and docs/operations-raft.md:
  --raft-self HOST:PORT      this replica's Raft address (it binds exactly there)
  --raft-peers A,B,C         every replica's Raft address, this one included;
                             each may be HOST:PORT=http://HOST:HTTPPORT when
                             its HTTP port differs from this replica's
  --raft-password-file F     the cluster password (required), same on all
Every replica starts from a copy of one `keg init`.
"""


def _password(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            password = f.read().strip()
    except OSError as err:
        raise click.BadParameter(f"cannot read {path}: {err.strerror}", param_hint="--raft-password-file") from err
    if len(password) < 16:
        raise click.BadParameter(f"the password in {path} has {len(password)} characters; use at least 16 "
                                 "(for example: head -c 32 /dev/urandom | base64)", param_hint="--raft-password-file")
    return password


def tls_context(cert_file: str | None, key_file: str | None, fastcgi_socket: str | None):
    """The server TLS context of ``--tls-cert``/``--tls-key``, or None without them; a usage error when only one is
    given, with ``--fastcgi`` (nginx speaks TLS there), or when the files do not make a certificate and its key."""
    from keg.errors import KegError
    from master.tls import expiry_warning, server_context

    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        raise click.UsageError("HTTPS needs both --tls-cert FILE and --tls-key FILE")
    if fastcgi_socket:
        raise click.UsageError("--tls-cert does not go with --fastcgi: there nginx speaks TLS to the clients "
                               "(see docs/operations.md)")
    try:
        context = server_context(cert_file, key_file)
    except KegError as err:
        raise click.BadParameter(str(err), param_hint="--tls-cert/--tls-key") from err
    warning = expiry_warning(cert_file)
    if warning:
        click.echo(f"keg master: warning: {warning}", err=True)
    return context


def hook_url(self_url: str | None, listen: str, tls) -> str | None:
    """The URL a push hook reaches this master at: ``--self-url``; with TLS and none, ``--listen``'s host when
    it is a name (the one its certificate is for); else None (the address a push came in on)."""
    if self_url or tls is None:
        return self_url
    host, _, port = listen.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        return None
    except ValueError:
        return f"https://{listen}" if host and port.isdigit() and int(port) else None


def serve_replica(keg_dir: str, listen: str, max_body: int, heartbeat: float, raft_self: str, raft_peers: str,
                  password_file: str | None, raft_dir: str | None, compact_entries: int,
                  fastcgi_socket: str | None, tls=None, hook_self_url: str | None = None) -> None:
    """Run one Raft replica of the keg in ``keg_dir`` until SIGINT/SIGTERM (see ``keg master serve``).

    With ``tls`` (a server ``ssl.SSLContext``) it serves HTTPS, and a peer given without a URL is called at
    ``https://``.  ``hook_self_url`` is ``--self-url`` (default: this replica's URL from ``--listen``).
    """
    import asyncio

    from master.app import KegApp
    from master.raft import RaftConfigError, RaftMaster, main_log_handler, parse_peers
    from master.server import serve_http

    if fastcgi_socket:
        raise click.UsageError("--fastcgi and --raft-self do not go together: a replica drives Raft from the "
                               "standalone server's event loop; put nginx in front of --listen instead")
    if not password_file:
        raise click.UsageError("--raft-password-file is required with --raft-self: the replicas authenticate "
                               "each other with it (a file holding one line of at least 16 characters)")
    password = _password(password_file)
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"{listen!r} is not HOST:PORT", param_hint="--listen")
    if int(port) == 0:
        raise click.BadParameter("a replica needs a fixed HTTP port (the other replicas call it)",
                                 param_hint="--listen")
    self_url = f"{'http' if tls is None else 'https'}://{host}:{port}"
    try:
        peers = parse_peers(raft_peers, raft_self, self_url)
    except RaftConfigError as err:
        raise click.BadParameter(str(err), param_hint="--raft-peers") from err
    main_log_handler()
    store = keg.Store(keg_dir, lock_timeout=1.0, background_checkpoints=True)
    try:
        the_master = RaftMaster(store, raft_self, peers, password, raft_dir=raft_dir,
                                compact_entries=compact_entries)
    except BaseException:
        store.close()
        raise
    # A push hook reaches this replica at --self-url, else by the name --listen gives (the name a TLS
    # certificate is for).
    app = KegApp(the_master, max_body=max_body, heartbeat=heartbeat, self_url=hook_self_url or self_url)

    def ready(h, p):
        the_master.attach(asyncio.get_running_loop())
        scheme = self_url.partition(":")[0]
        click.echo(f"keg master: serving {store.path} at {scheme}://{h}:{p} as Raft replica {raft_self} "
                   f"of {len(peers)}", err=True)

    try:
        serve_http(app, the_master, host.strip("[]"), int(port), max_body, ready=ready, tls=tls)
    finally:
        the_master.close()


def _status_rows(urls: list, token: str | None) -> list:
    from master.client import fetch_status
    rows, seen = [], set()
    queue = list(urls)
    while queue:
        url = queue.pop(0).rstrip("/")
        if url in seen:
            continue
        seen.add(url)
        try:
            status = fetch_status(url, token)
        except (OSError, ValueError) as err:
            rows.append({"url": url, "role": "unreachable", "error": str(err)})
            continue
        rows.append(status)
        for peer in status.get("peers", []):  # one URL is enough: the others are found through it
            if peer["url"] not in seen:
                queue.append(peer["url"])
    newest = max((r.get("revision") or 0 for r in rows), default=0)
    for row in rows:
        row["lag"] = newest - row["revision"] if row.get("revision") is not None else None
    return rows


@click.command("status")
@click.option("--url", envvar="KEG_URL", required=True, metavar="URL[,URL…]",
              help="One replica's URL is enough (the others are found through it). Default: $KEG_URL.")
@click.option("--token", envvar="KEG_TOKEN", metavar="TOKEN", help="A token that may read / (default: $KEG_TOKEN).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per replica, one per line.")
def status_cmd(url, token, as_json):
    """Show each replica: role, term, commit index, revision and lag.

    \b
    Columns: URL, Raft address, role (leader, follower, candidate, single,
    unreachable), Raft term, commit index, last applied log index, the keg's
    revision, and lag = newest revision among the replicas minus this one's.
    Below the table, on standard error, any master whose last checkpoint or
    repack failed, with the error (it stands until the next one succeeds);
    --json carries these under "housekeeping".
    Exit status 4 when a replica does not answer.
    """
    rows = _status_rows([u for u in url.split(",") if u.strip()], token)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, sort_keys=True))
    else:
        click.echo("URL\tRAFT\tROLE\tTERM\tCOMMIT\tAPPLIED\tREVISION\tLAG")
        for row in rows:
            cells = [row.get("url"), row.get("raft", "-"), row.get("role"), row.get("term"),
                     row.get("commit_index"), row.get("last_applied"), row.get("revision"), row.get("lag")]
            click.echo("\t".join("-" if c is None else str(c) for c in cells))
        for line in _housekeeping_problems(rows):
            click.echo(f"keg master status: {line}", err=True)
    if any(r.get("role") == "unreachable" for r in rows):
        raise click.exceptions.Exit(4)


def _housekeeping_problems(rows: list) -> list:
    """One line per failed checkpoint or repack a master reported."""
    lines = []
    for row in rows:
        done = row.get("housekeeping") or {}
        if done.get("checkpoint_error"):
            lines.append(f"{row['url']}: the last checkpoint failed (writes are kept in the journal and "
                         f"checkpointed again): {done['checkpoint_error']}")
        if done.get("repack_error"):
            lines.append(f"{row['url']}: the last repack failed (the old packs stay; tried again later): "
                         f"{done['repack_error']}")
    return lines


@click.command("member")
@click.argument("action", type=click.Choice(["add", "remove"]))
@click.argument("address", metavar="HOST:PORT")
@click.option("--url", envvar="KEG_URL", required=True, metavar="URL", help="Any replica (default: $KEG_URL).")
@click.option("--token", envvar="KEG_TOKEN", metavar="TOKEN", help="An administrator's token (default: $KEG_TOKEN).")
def member_cmd(action, address, url, token):
    """Add or remove one Raft replica, by its Raft address.

    \b
    Adding: start the new replica first, from a copy of the same `keg init`
    keg, with --raft-peers listing every replica and itself; then run
    `keg master member add NEW:PORT`. It catches up from the log or a snapshot.
    Removing: run `keg master member remove OLD:PORT`, then stop it.
    Change one replica at a time; see docs/operations-raft.md.
    """
    from master.client import http_connection
    from master.tls import advice

    conn = http_connection(url.split(",")[0], 30)
    try:
        conn.request("POST", "/v1/raft/members", body=json.dumps({action: address}).encode(),
                     headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        body = json.loads(response.read() or b"{}")
    except OSError as err:
        raise click.ClickException(f"{url} did not answer: {err}{advice(err, url)}") from err
    finally:
        conn.close()
    if response.status != 200:
        raise click.ClickException(f"{action} {address} failed ({response.status}): {body.get('error')}")
    click.echo(f"{'added' if action == 'add' else 'removed'} {address}")


COMMANDS = [status_cmd, member_cmd]
