"""The ``keg`` command: plumbing over a keg on this machine.

Exit codes (the same for every command):

  0  done
  1  not found (path, revision or KID)
  2  usage: bad arguments, bad path, bad KID, malformed transaction
  3  compare failed: a guarded write found another value; nothing changed
  4  the keg is damaged, the master cannot be reached, or another error
  5  busy: another process holds the keg's write lock
  6  not allowed: no token, a wrong token, or a token without the right
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import click

import kid as kidlib
import keg
from keg.errors import BadRequest, CompareFailed, KegError
from keg.transaction import Transaction, compare, delete, parse_transaction, put
from master import auth
from shell.progress import progress, size_of
from shell.target import keg_target

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_COMPARE, EXIT_ERROR = 0, 1, 2, 3, 4
MAX_STDIN_TX = 64 << 20

keg_dir_option = click.option(
    "--keg", "keg_dir", envvar="KEG_DIR", metavar="DIR", required=True,
    help="The keg directory (a bare git repository). Default: $KEG_DIR.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for programs instead of lines.")
rev_option = click.option("--rev", "-r", metavar="REV", default=None,
                          help="Read at this revision: a number, a revision KID, or -N counting back from the head.")


def _emit_json(value) -> None:
    click.echo(json.dumps(value, indent=None, sort_keys=True))


def _check_tx(result: keg.TxResult) -> None:
    if not result.ok:
        raise result.error


def _print_result(result: keg.TxResult, as_json: bool) -> None:
    if as_json:
        _emit_json(result.to_json())
        return
    for path, value_kid in result.kids.items():
        click.echo(f"{path}\t{value_kid or '-'}\t{result.revision}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="keg", prog_name="keg")
def cli():
    """Keg: one versioned, content-addressed namespace in git.

    Every file and directory is a value with a KID (K- and hex, the git object
    id); every commit is a numbered revision. The plumbing commands work on a
    keg on this machine (--keg DIR or KEG_DIR) or through a master
    (--url URL and --token TOKEN, or KEG_URL and KEG_TOKEN), with the same
    output and exit codes.

    \b
    Exit codes: 0 done, 1 not found, 2 usage, 3 compare failed,
    4 damaged keg, master unreachable or other error, 5 keg busy (another
    writer), 6 not allowed (missing or wrong token, or no right).
    """


@cli.command()
@keg_dir_option
@click.option("--admin", "admin_name", default="admin", show_default=True, metavar="NAME",
              help="Name of the first user, who gets the admin group.")
@click.option("--email", default="", metavar="EMAIL", help="The admin's e-mail (recorded in commits).")
@json_option
def init(keg_dir, admin_name, email, as_json):
    """Create a new keg in DIR: revision 1 holds the first admin and the ACL.

    Prints the admin's token once, as the line `admin token: TOKEN`; only its
    hash is kept (in /users/NAME/user.json). Give it to `keg` as --token or
    KEG_TOKEN when you use the keg through a master.
    """
    auth.check_name(admin_name)
    ops, token = auth.initial_ops(admin_name, email)
    with keg.init(keg_dir, initial=ops) as store:
        head = store.revision()
    if as_json:
        _emit_json({"keg": store.path, **head.to_json(), "admin": admin_name, "admin_token": token})
    else:
        click.echo(f"initialised keg at {store.path} (revision {head.number}, {head.kid})")
        click.echo(f"admin token: {token}")
        click.echo("(shown once: Keg keeps only its hash; keep it somewhere safe)", err=True)


@cli.command("put")
@click.argument("path")
@click.argument("file", type=click.File("rb"), required=False)
@click.option("--if-match", metavar="KID", help="Write only if PATH currently has this KID (compare-and-swap).")
@click.option("--if-absent", is_flag=True, help="Write only if nothing is at PATH yet.")
@click.option("--exec", "executable", is_flag=True, help="Store the file as executable (mode 100755).")
@keg_target
@json_option
def put_cmd(path, file, if_match, if_absent, executable, opener, as_json):
    """Write FILE (or standard input) at PATH, creating directories on the way.

    A value above 1 MiB is stored as content-defined chunks, each kept once
    in the keg however many paths hold it; it is read as it is cut, never
    held whole, and through a master only the chunks it lacks are sent.
    A bar shows progress on a terminal.

    Prints PATH, its new KID and the revision, tab-separated.
    """
    if if_match and if_absent:
        raise click.UsageError("--if-match and --if-absent cannot be used together")
    compares = []
    if if_match or if_absent:
        compares.append(compare(path, if_match))
    op = put(path, b"", 0o100755 if executable else 0o100644)  # validate the path before reading input
    stream = file or sys.stdin.buffer
    with opener() as store:
        with progress(f"put {op.path}", size_of(stream)) as update:
            op = store.put_stream(op.path, stream, op.mode, progress=update)
        result = store.apply(Transaction((op,), tuple(compares)))
    _check_tx(result)
    _print_result(result, as_json)


@cli.command("cat")
@click.argument("path")
@rev_option
@keg_target
def cat_cmd(path, rev, opener):
    """Print the bytes of the file at PATH.

    A large value is streamed a chunk at a time, each chunk checked against
    its blake3 hash; a damaged or missing chunk stops the output with an
    error naming the path and the chunk (exit 4, or 1 when missing).
    """
    out = sys.stdout.buffer
    with opener() as store, store.open(path, rev) as f:
        while True:
            piece = f.read(1 << 20)
            if not piece:
                break
            out.write(piece)
    out.flush()


@cli.command("ls")
@click.argument("path", default="/")
@rev_option
@click.option("-l", "long", is_flag=True, help="Long form: kind, KID, size and path, tab-separated.")
@keg_target
@json_option
def ls_cmd(path, rev, long, opener, as_json):
    """List the directory at PATH (default /). Directories end in '/', pointers to other kegs in '@'.

    Listing a pointer lists the tree of the commit it names (see 'keg mount').
    With -l, a value stored as chunks shows its full size.
    """
    with opener() as store:
        entry = store.stat(path, rev)
        entries = store.list(path, rev) if entry.kind in ("tree", "pointer") else [entry]
    if as_json:
        _emit_json([e.to_json() for e in entries])
        return
    for e in entries:
        shown = e.name + {"tree": "/", "pointer": "@"}.get(e.kind, "")
        if long:
            click.echo(f"{e.kind}\t{e.kid}\t{e.size}\t{shown}")
        else:
            click.echo(shown)


@cli.command("rm")
@click.argument("path")
@click.option("-r", "--recursive", is_flag=True, help="Remove a directory and everything under it.")
@click.option("--if-match", metavar="KID", help="Remove only if PATH currently has this KID.")
@keg_target
@json_option
def rm_cmd(path, recursive, if_match, opener, as_json):
    """Remove the file (or with -r the directory) at PATH."""
    compares = (compare(path, if_match),) if if_match else ()
    tx = Transaction((delete(path, recursive),), compares)
    with opener() as store:
        result = store.apply(tx)
    _check_tx(result)
    _print_result(result, as_json)


@cli.command("tx")
@click.argument("file", type=click.File("rb"), required=False)
@keg_target
@json_option
def tx_cmd(file, opener, as_json):
    """Apply a transaction given as JSON in FILE or on standard input.

    \b
    {"compare": [{"path": "/a/b.txt", "kid": "K-…"}, {"path": "/new.json", "kid": null}],
     "ops": [{"op": "put", "path": "/a/b.txt", "value": "text"},
             {"op": "put", "path": "/bin.dat", "base64": "…"},
             {"op": "delete", "path": "/old.json"}]}

    Every compare must hold (kid null: the path is absent) or nothing
    changes and the exit code is 3. Prints each written path with its KID
    and the revision, or with --json the whole answer.
    """
    raw = (file or sys.stdin.buffer).read(MAX_STDIN_TX + 1)
    if len(raw) > MAX_STDIN_TX:
        raise BadRequest(f"transaction is larger than {MAX_STDIN_TX >> 20} MiB")
    try:
        obj = json.loads(raw)
    except ValueError as err:
        raise BadRequest(f"the transaction is not valid JSON: {err}") from err
    tx = parse_transaction(obj)
    with opener() as store:
        result = store.apply(tx)
    if as_json:
        _emit_json(result.to_json())
        if not result.ok:
            raise click.exceptions.Exit(result.error.exit_code)
        return
    _check_tx(result)
    _print_result(result, as_json)


@cli.command("kid")
@click.argument("path")
@rev_option
@keg_target
def kid_cmd(path, rev, opener):
    """Print the KID of the value at PATH (the git object id, as K-…)."""
    with opener() as store:
        click.echo(store.kid(path, rev))


@cli.command("resolve")
@click.argument("kid_text", metavar="KID")
@keg_target
@json_option
def resolve_cmd(kid_text, opener, as_json):
    """Say what a KID names: a file or tree value, a revision, or an identity.

    Short forms (K- and at least 8 hex digits) work like git short hashes;
    an ambiguous one is refused with the candidates listed.
    """
    try:
        kidlib.parse(kid_text)
    except kidlib.KidError as err:
        raise BadRequest(str(err)) from err
    with opener() as store:
        found = store.resolve_kid(kid_text)
    if as_json:
        _emit_json(found)
        return
    kind = found["kind"]
    if kind == "revision":
        click.echo(f"{found['kid']}\trevision\t{found['revision']}\t{found['summary']}")
    elif kind in ("file", "tree"):
        click.echo(f"{found['kid']}\t{kind}\t{found['size']}\t{' '.join(found['paths']) or '(not at head)'}")
    else:
        click.echo(f"{found['kid']}\t{kind}\t{found['path']}")


@cli.command("log")
@click.argument("path", default="/")
@rev_option
@click.option("-n", "limit", type=click.IntRange(min=1), default=None, help="Show at most this many revisions.")
@keg_target
@json_option
def log_cmd(path, rev, limit, opener, as_json):
    """Revisions that changed PATH (default: all), newest first.

    Each line: revision, revision KID, time (UTC, ISO 8601), author, summary.
    """
    with opener() as store:
        entries = store.log(path, rev, limit)
    if as_json:
        _emit_json([{**r.to_json(), "path_kid": k} for r, k in entries])
        return
    import datetime
    for r, _ in entries:
        when = datetime.datetime.fromtimestamp(r.time, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        click.echo(f"{r.number}\t{r.kid}\t{when}\t{r.author}\t{r.message.splitlines()[0]}")


@cli.command("diff")
@click.argument("rev_a", metavar="FROM")
@click.argument("rev_b", metavar="TO", required=False)
@click.option("--prefix", default="/", help="Only paths under this prefix.")
@keg_target
@json_option
def diff_cmd(rev_a, rev_b, prefix, opener, as_json):
    """Files that differ between revisions FROM and TO (default: head).

    Each line: A (added), M (modified) or D (deleted), the path, old and new KID.
    """
    with opener() as store:
        changes = store.diff(rev_a, rev_b, prefix)
    if as_json:
        _emit_json([{"path": p, "old_kid": a, "new_kid": b} for p, a, b in changes])
        return
    for path, old, new in changes:
        status = "A" if old is None else "D" if new is None else "M"
        click.echo(f"{status}\t{path}\t{old or '-'}\t{new or '-'}")


@cli.command("watch", context_settings={"ignore_unknown_options": True})
@click.argument("prefix", default="/")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--since", type=int, default=None,
              help="Start after this revision (0: from the beginning). Default: only new changes.")
@click.option("--timeout", type=float, default=None, help="Stop after this many seconds without a change.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after this many events.")
@keg_target
@json_option
def watch_cmd(prefix, command, since, timeout, count, opener, as_json):
    """Print one line per change under PREFIX, or run COMMAND per change.

    \b
    Lines: revision, action (create/update/delete), path, old KID, new KID.
    With `-- COMMAND ARGS…` the command runs once per event with
    KEG_REVISION, KEG_ACTION, KEG_PATH, KEG_OLD_KID, KEG_NEW_KID set.
    Events come in revision order with no gaps; resume with --since.
    """
    if command and command[0] == "--":
        command = command[1:]
    seen = 0
    with opener() as store:
        for event in store.watch(prefix, since, timeout=timeout):
            if command:
                env = dict(os.environ, KEG_REVISION=str(event.revision), KEG_ACTION=event.action,
                           KEG_PATH=event.path, KEG_OLD_KID=event.old_kid or "", KEG_NEW_KID=event.new_kid or "")
                subprocess.run(list(command), env=env, check=False)
            elif as_json:
                _emit_json(event.to_json())
            else:
                click.echo(f"{event.revision}\t{event.action}\t{event.path}\t"
                           f"{event.old_kid or '-'}\t{event.new_kid or '-'}")
            sys.stdout.flush()
            seen += 1
            if count is not None and seen >= count:
                return


@cli.command("compact")
@click.option("--window", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Keep the history of volatile directories for this many newest revisions.")
@keg_target
@json_option
def compact_cmd(window, opener, as_json):
    """Drop old history of volatile directories (heartbeats, status).

    Volatile directories are those matching the patterns in the keg's
    keg/config.json ("volatile", by default /machines/*/status). Reading
    one at a revision older than the window kept says it was compacted.
    Nothing else loses history, and no revision KID changes.

    Pushed sources that were received but never became /src/<app> (a push
    refused after its objects arrived) are dropped too, once an hour old.
    """
    with opener() as store:
        done = store.compact(window)
    if as_json:
        _emit_json(done)
    else:
        dropped = done.get("dropped_sources", 0)
        click.echo(f"volatile history kept from revision {done['from_revision']} ({done['kept_trees']} trees)"
                   + (f"; {dropped} pushed source(s) never committed dropped" if dropped else ""))


def _seconds(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h`` or ``1d`` as seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration: give seconds, or a number with s, m, h or d")
    if value < 0:
        raise click.BadParameter("a duration cannot be negative")
    return value


@cli.command("mount")
@click.argument("path")
@click.argument("location")
@click.option("--ref", default="HEAD", show_default=True, help="The branch or tag of LOCATION to point at.")
@keg_dir_option
@json_option
def mount_cmd(path, location, ref, keg_dir, as_json):
    """Point PATH at a commit of another keg or git repository.

    LOCATION is an absolute path to a git repository (another keg is one) or
    an http(s):// URL such as another master's /git/keg.git. Its REF is
    fetched into this keg with git, and PATH becomes a pointer (a gitlink)
    to that commit, recorded with LOCATION in the mount table /mounts.tsv in
    the same revision. Paths beneath PATH then read through the pointer;
    'keg ls' shows PATH as a pointer with the commit's KID. Mount again to
    move the pointer to the ref's newest commit.

    \b
    Example:
      keg mount --keg ~/keg /src/website /srv/git/website.git --ref main
      keg cat --keg ~/keg /src/website/index.html
    """
    from keg.mounts import mount
    with keg.Store(keg_dir) as store:
        result = mount(store, path, location, ref)
    _check_tx(result)
    _print_result(result, as_json)


@cli.command("gc")
@click.option("--grace", default="1h", show_default=True, metavar="DURATION",
              help="Keep unreferenced chunks written or touched this recently (90s, 15m, 2h, 1d).")
@keg_target
@json_option
def gc_cmd(grace, opener, as_json):
    """Delete chunks of large values that no retained revision points at.

    Every revision still in the keg's history keeps the chunks its values
    name, so time travel keeps working. A chunk nothing points at yet (sent
    for a transaction not committed so far) is kept for the grace period;
    a commit naming a collected chunk is refused, never half-applied.
    Through a master (--url) it needs write access to /.
    """
    with opener() as store:
        done = store.gc_chunks(_seconds(grace))
    if as_json:
        _emit_json(done)
    else:
        click.echo(f"removed {done['chunks']} chunks ({done['bytes']} bytes); kept {done['kept']} "
                   f"named by {done['revisions']} revisions")


@cli.group()
def master():
    """Run the master: the keg served over HTTP (and FastCGI) to every client."""


@master.command("serve")
@keg_dir_option
@click.option("--listen", default="127.0.0.1:7480", show_default=True, metavar="HOST:PORT",
              help="Serve HTTP (HTTPS with --tls-cert) here (port 0 picks a free one; the address is printed).")
@click.option("--fastcgi", "fastcgi_socket", metavar="SOCKET",
              help="Serve FastCGI on this Unix socket through flup instead, for nginx (see docs/operations.md).")
@click.option("--max-body", type=click.IntRange(min=1024), default=64 << 20, show_default=True,
              help="Largest request body in bytes; larger ones get 413.")
@click.option("--heartbeat", type=click.FloatRange(min=0.05), default=15.0, show_default=True,
              help="Seconds of silence before a watch stream sends a heartbeat.")
@click.option("--max-push", type=click.IntRange(min=1024), default=32 << 20, show_default=True,
              help="Largest pack in bytes a git push of an app may send; git refuses larger ones.")
@click.option("--self-url", metavar="URL",
              help="How programs on this machine reach this master (for push hooks; default: the address "
                   "a push came in on, or with HTTPS the host of --listen when it is a name). With HTTPS give "
                   "a name the certificate covers.")
@click.option("--raft-self", metavar="HOST:PORT",
              help="Run as a Raft replica with this Raft address (binds there); needs --raft-peers.")
@click.option("--raft-peers", metavar="A,B,C",
              help="Every replica's Raft address, this one included; HOST:PORT=URL gives a replica's HTTP URL "
                   "when its port differs from --listen's.")
@click.option("--raft-password-file", metavar="FILE",
              help="The cluster password (one line, 16+ characters, the same on every replica).")
@click.option("--raft-dir", metavar="DIR", help="Where the Raft journal lives (default: DIR/keg/raft).")
@click.option("--raft-compact-entries", type=click.IntRange(min=2), default=5000, show_default=True,
              help="Snapshot and trim the Raft log past this many entries.")
@click.option("--tls-cert", metavar="FILE",
              help="Serve HTTPS with this PEM certificate chain (the server's certificate first); needs --tls-key.")
@click.option("--tls-key", metavar="FILE", help="The PEM private key of --tls-cert (unencrypted).")
def master_serve(keg_dir, listen, fastcgi_socket, max_body, heartbeat, max_push, self_url, raft_self, raft_peers,
                 raft_password_file, raft_dir, raft_compact_entries, tls_cert, tls_key):
    """Serve the keg in DIR: REST under /v1, git fetch at /git/keg.git, watch streams.

    One process owns the keg; writes from all clients are committed in groups,
    each acknowledged only once durable. Stops cleanly on SIGINT or SIGTERM.
    Every request needs a token (see `keg init`, `keg user add`), except
    /v1/openapi.json.

    With --raft-self the process is one replica of a Raft cluster: writes are
    committed by a majority of replicas, reads are served by this one (the
    answer says its revision; ?linearizable=1 waits for the cluster), and
    every replica makes the same commits. See docs/operations-raft.md.

    With --tls-cert and --tls-key the listener speaks HTTPS only (replicas
    then call each other over HTTPS too). Clients verify the certificate
    against the system's CAs, or the CA file in SSL_CERT_FILE. See
    docs/security.md.
    """
    from shell.master_cli import hook_url, tls_context

    tls = tls_context(tls_cert, tls_key, fastcgi_socket)
    if raft_self or raft_peers or raft_password_file:
        if not (raft_self and raft_peers):
            raise click.UsageError("a Raft replica needs both --raft-self HOST:PORT and --raft-peers A,B,C")
        from shell.master_cli import serve_replica
        serve_replica(keg_dir, listen, max_body, heartbeat, raft_self, raft_peers, raft_password_file, raft_dir,
                      raft_compact_entries, fastcgi_socket, tls, self_url)
        return
    from master.app import KegApp
    from master.server import serve_fastcgi, serve_http
    from master.single import SingleMaster

    store = keg.Store(keg_dir, lock_timeout=1.0, background_checkpoints=True)
    the_master = SingleMaster(store)
    app = KegApp(the_master, max_body=max_body, heartbeat=heartbeat, max_push=max_push,
                 self_url=hook_url(self_url, listen, tls))
    try:
        if fastcgi_socket:
            serve_fastcgi(app, fastcgi_socket, ready=lambda where: click.echo(
                f"keg master: serving {store.path} over FastCGI at {where}", err=True))
        else:
            host, _, port = listen.rpartition(":")
            if not host or not port.isdigit():
                raise click.BadParameter(f"{listen!r} is not HOST:PORT", param_hint="--listen")
            scheme = "http" if tls is None else "https"
            serve_http(app, the_master, host.strip("[]"), int(port), max_body, tls=tls, ready=lambda h, p: click.echo(
                f"keg master: serving {store.path} at {scheme}://{h}:{p}", err=True))
    finally:
        the_master.close()


@cli.group()
def user():
    """Users and machines: who may use the keg (kept in /users/NAME/user.json)."""


@user.command("add")
@click.argument("name")
@click.option("--email", default="", help="E-mail, recorded as the author of the user's writes.")
@click.option("--group", "groups", multiple=True, metavar="GROUP",
              help="Add to this group (repeatable); /policy/acl.tsv grants rights to groups.")
@click.option("--machine", is_flag=True,
              help="A machine principal for a Mayor: it may write only /machines/NAME/status/.")
@keg_target
@json_option
def user_add(name, email, groups, machine, opener, as_json):
    """Create user NAME with a first token, printed once as `token: TOKEN`."""
    with opener() as store:
        token = auth.add_user(store, name, email, groups, machine)
    if as_json:
        _emit_json({"name": name, "token": token})
    else:
        click.echo(f"token: {token}")


@cli.group()
def token():
    """Tokens: create and revoke the secrets users and machines log in with."""


@token.command("new")
@click.argument("name")
@click.option("--note", default="", help="What the token is for (kept beside its hash).")
@keg_target
@json_option
def token_new(name, note, opener, as_json):
    """Give user NAME another token, printed once as `token: TOKEN` (its id first)."""
    with opener() as store:
        token_id, secret = auth.new_token(store, name, note)
    if as_json:
        _emit_json({"name": name, "id": token_id, "token": secret})
    else:
        click.echo(f"id: {token_id}")
        click.echo(f"token: {secret}")


@token.command("revoke")
@click.argument("name")
@click.argument("token_id", metavar="TOKEN_ID")
@keg_target
def token_revoke(name, token_id, opener):
    """Revoke a token of user NAME, given by its id (or the whole token)."""
    with opener() as store:
        auth.revoke_token(store, name, token_id)
    click.echo(f"revoked {token_id.split('_')[1] if token_id.startswith('kt_') else token_id} of {name}")


def main(argv=None) -> int:
    """Run ``keg``; turn errors into the documented exit codes and one-line messages."""
    try:
        returned = cli.main(args=argv, prog_name="keg", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("keg: interrupted", err=True)
        return 130
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as err:
        err.show()
        return EXIT_USAGE if isinstance(err, click.UsageError) else err.exit_code
    except CompareFailed as err:
        click.echo(f"keg: {err}", err=True)
        return EXIT_COMPARE
    except KegError as err:
        click.echo(f"keg: {err}", err=True)
        return err.exit_code
    except kidlib.KidError as err:
        click.echo(f"keg: {err}", err=True)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    # Without standalone mode click returns the code of an Exit raised by a command.
    return returned if isinstance(returned, int) else EXIT_OK


def _one_malloc_arena() -> None:
    """Ask glibc for one malloc arena, before any library thread starts.

    zstd compresses chunk groups and blake3 hashes on threads of their own; glibc
    gives each thread an arena of its own and keeps what it grew, which put a
    256 MiB ``keg put`` at 97-104 MiB peak. With one arena it stays near 75 MiB,
    as fast (docs/benchmarks.md, large values). Same as ``MALLOC_ARENA_MAX=1``;
    an explicit ``MALLOC_ARENA_MAX`` in the environment wins.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is not None:
            mallopt(-8, 1)   # M_ARENA_MAX
    except OSError:
        pass                 # not glibc: nothing to tune


def entry_point() -> None:
    """The console script: ``sys.exit(main())``."""
    _one_malloc_arena()
    sys.exit(main())


# Porcelain groups live in their own modules, which import the decorators above.
from shell.image import image_group  # noqa: E402
from shell.pkg import pkg_group  # noqa: E402

cli.add_command(image_group)
cli.add_command(pkg_group)

from shell.posix import checkout_cmd, sync_cmd  # noqa: E402

cli.add_command(checkout_cmd)
cli.add_command(sync_cmd)

from shell.mayor_cli import COMMANDS as MAYOR_COMMANDS, mayor_group  # noqa: E402

cli.add_command(mayor_group)
for _command in MAYOR_COMMANDS:
    cli.add_command(_command)


from shell.router import router_group  # noqa: E402

cli.add_command(router_group)


from shell.jobs_cli import COMMANDS as JOB_COMMANDS  # noqa: E402

for _command in JOB_COMMANDS:
    cli.add_command(_command)


from shell.master_cli import COMMANDS as MASTER_COMMANDS  # noqa: E402

for _command in MASTER_COMMANDS:
    master.add_command(_command)


from shell.apps_cli import COMMANDS as APP_COMMANDS  # noqa: E402

for _command in APP_COMMANDS:
    cli.add_command(_command)


from shell.up import up_cmd  # noqa: E402

cli.add_command(up_cmd)


if __name__ == "__main__":
    entry_point()

