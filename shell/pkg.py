"""``keg pkg``: import Python wheels and Debian packages into /pkgs for builds without the internet.

Registered on the ``keg`` group at the end of :mod:`shell.cli`; import that
module, not this one, to get the whole command.
"""

from __future__ import annotations

import os

import click

from keg import pkgs
from shell.cli import _emit_json, json_option, keg_target
from shell.progress import progress


@click.group("pkg")
def pkg_group():
    """Packages kept in the keg: wheels under /pkgs/pypi, .deb files under /pkgs/deb."""


@pkg_group.command("import")
@click.argument("files", nargs=-1, required=True, metavar="FILE...",
                type=click.Path(exists=True, dir_okay=False))
@keg_target
@json_option
def pkg_import(files, opener, as_json):
    """Import wheels (.whl) and Debian packages (.deb), all in one transaction.

    \b
    A wheel goes to /pkgs/pypi/NAME/VERSION/FILE, NAME normalized as PEP 503
    says (Foo_Bar -> foo-bar) and checked against the wheel's METADATA.
    A .deb goes to /pkgs/deb/PACKAGE/VERSION/PACKAGE_VERSION_ARCH.deb, from
    its control fields (read with dpkg-deb).

    Every file is checked before anything is written. Importing a file that
    is there already does nothing and succeeds; a different file under the
    same name and version is refused (a published version never changes).
    A bar shows progress on a terminal.

    Prints each package's path and KID, tab-separated.

    \b
    Examples:
      pip download --only-binary=:all: -d wheels -r requirements.txt
      keg pkg import wheels/*.whl
      apt-get download busybox-static && keg pkg import busybox-static_*.deb
    """
    planned = pkgs.plan_imports(files)
    total = sum(os.path.getsize(p.file) for p in planned)
    with opener() as store:
        with progress(f"import {len(planned)} package(s)", total) as update:
            imported = pkgs.import_packages(store, planned, progress=update)
    if as_json:
        _emit_json([i.to_json() for i in imported])
        return
    for item in imported:
        click.echo(f"{item.path}\t{item.kid}")
