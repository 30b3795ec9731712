"""``keg checkout`` and ``keg sync``: a subtree of the keg as ordinary files (see :mod:`keg.posix`).

The commands are registered on the ``keg`` group at the end of
:mod:`shell.cli`; this module does not import it at load time (that would be
an import cycle), so it declares the --keg/--url/--token options itself, with
the same environment variables.
"""

from __future__ import annotations

import signal
import threading

import click
from click.core import ParameterSource

from keg import posix
from shell.target import open_keg, target_options


def _say(line: str) -> None:
    click.echo(line, err=True)


@click.command("checkout")
@click.argument("prefix")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--rev", "-r", metavar="REV", default=None,
              help="Check out this revision: a number, a revision KID, or -N counting back from the head.")
@target_options
def checkout_cmd(prefix, directory, rev, keg_dir, url, token):
    """Write the keg directory PREFIX as ordinary files in DIR.

    DIR must be new or empty. Large values are written as their real bytes,
    streamed chunk by chunk; mode 100755 sets the exec bit; a symlink whose
    target stays inside DIR is a symlink, any other is a plain file holding
    its target (with a warning); pointers to other kegs are skipped with a
    note. Where DIR came from is kept in DIR/.keg/sync.json (never the
    token). Keep DIR in two-way sync with `keg sync DIR`.

    \b
    Example:
      export KEG_TOKEN=kt_…
      keg checkout /apps/web ./web --url http://127.0.0.1:7480
      keg sync ./web &            # edits in ./web become revisions
    """
    with open_keg(keg_dir, url, token) as store:
        done = posix.checkout(store, prefix, directory, rev, say=_say)
    click.echo(f"checked out {prefix} at revision {done.revision} into {directory}: {done.files} file(s), "
               f"{done.bytes} byte(s)" + (f", {done.links} link(s)" if done.links else ""))


def _sync_target(ctx: click.Context, state: posix.CheckoutState, keg_dir, url, token):
    """The keg to sync with: --keg/--url given on the command line, else the checkout's own source."""
    given = {name: ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE for name in ("keg_dir", "url")}
    if given["keg_dir"] or given["url"]:
        return open_keg(keg_dir if given["keg_dir"] else None, url if given["url"] else None, token)
    source = state.source
    return open_keg(source.get("keg"), source.get("url"), token)


@click.command("sync")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, exists=True))
@click.option("--quiet-period", type=click.FloatRange(min=0.0), default=posix.QUIET_PERIOD, show_default=True,
              metavar="S", help="Seconds without a local file event before local changes are pushed.")
@click.option("--once", is_flag=True, help="Pull the keg's changes and push local ones, then exit.")
@target_options
@click.pass_context
def sync_cmd(ctx, directory, quiet_period, once, keg_dir, url, token):
    """Keep the checkout DIR and the keg in two-way sync.

    Local edits (seen through inotify) are pushed as one transaction after
    a quiet period, each file guarded by a compare on the KID it was synced
    at; the keg's changes are written to the files as they happen. When a
    path changed on both sides, the keg's version is put at the path and
    yours is kept as PATH.conflict-HASH (pushed too), and a line on stderr
    says so. Runs until interrupted (Ctrl-C or SIGTERM); with --once, does
    one round and exits.

    The keg is the one DIR was checked out from (DIR/.keg/sync.json), unless
    --keg or --url is given on the command line; the token comes from
    --token or KEG_TOKEN.

    \b
    Example:
      keg checkout /etc/app ./app --url http://127.0.0.1:7480
      KEG_TOKEN=kt_… keg sync ./app
      echo 'debug = true' >> ./app/app.conf    # a new revision
    """
    state = posix.CheckoutState.load(directory)
    with _sync_target(ctx, state, keg_dir, url, token) as store, \
            posix.Sync(store, directory, quiet_period=quiet_period, say=_say) as sync:
        if once:
            _once(sync)
            return
        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            sync.run(stop, ready=lambda: _say(f"keg sync: {directory} <-> {state.prefix} from "
                                              f"{posix.describe_source(state.source)}, at revision "
                                              f"{sync.state.revision}; Ctrl-C stops"))
        except KeyboardInterrupt:
            stop.set()
        finally:
            signal.signal(signal.SIGTERM, previous)


def _once(sync: posix.Sync) -> None:
    report = sync.step(full=True)
    click.echo(f"revision {sync.state.revision}: pulled {report.pulled}, pushed {report.pushed}, "
               f"{len(report.conflicts)} conflict(s)")
    if report.error is not None:
        raise report.error
