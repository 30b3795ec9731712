"""Which keg a command works on: a local directory (--keg) or a master (--url, --token).

Kept apart from ``shell.cli`` so the porcelain modules that ``shell.cli``
registers can use the same options without an import cycle.
"""

from __future__ import annotations

import functools

import click

import keg


def open_keg(keg_dir: str | None, url: str | None, token: str | None):
    """A local ``Store`` for --keg, or a ``RemoteKeg`` for --url: the commands use either alike."""
    if url:
        from master.client import RemoteKeg
        return RemoteKeg(url, token)
    if not keg_dir:
        raise click.UsageError("say which keg: --keg DIR (or KEG_DIR) for a local one, "
                               "--url URL (or KEG_URL) for a master")
    return keg.Store(keg_dir)


def target_options(command):
    """Add --keg, --url and --token (defaults from KEG_DIR, KEG_URL, KEG_TOKEN) to a command."""
    command = click.option("--token", envvar="KEG_TOKEN", metavar="TOKEN",
                           help="Token for the master (default: $KEG_TOKEN).")(command)
    command = click.option("--url", envvar="KEG_URL", metavar="URL",
                           help="Use the master at URL (http://HOST:PORT or https://HOST:PORT, whose "
                                "certificate is checked against the system's CAs or $SSL_CERT_FILE; several "
                                "comma-separated for fail-over) instead of a local keg. Default: $KEG_URL.")(command)
    return click.option("--keg", "keg_dir", envvar="KEG_DIR", metavar="DIR",
                        help="A keg directory on this machine (a bare git repository). Default: $KEG_DIR.")(command)


def keg_target(command):
    """Add --keg, --url and --token; the command gets ``opener()`` returning the keg to use."""
    @functools.wraps(command)
    def wrapper(*args, keg_dir, url, token, **kwargs):
        return command(*args, opener=lambda: open_keg(keg_dir, url, token), **kwargs)

    return target_options(wrapper)
