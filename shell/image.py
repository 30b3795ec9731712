"""``keg image``: import OCI images into /oci-images and export them as OCI layouts.

Registered on the ``keg`` group at the end of :mod:`shell.cli`; import that
module, not this one, to get the whole command.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time

import click

from builders import bootstrap
from keg import oci
from keg.errors import BadRequest
from shell.cli import _emit_json, json_option, keg_target, rev_option
from shell.progress import progress


def _command_words(text: str | None, option: str):
    """A JSON array of strings, or shell-like words, as a tuple (None when not given)."""
    if text is None:
        return None
    if text.lstrip().startswith("["):
        try:
            words = json.loads(text)
        except ValueError as err:
            raise BadRequest(f"{option}: {text!r} is not a JSON array: {err}") from err
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise BadRequest(f"{option}: give a JSON array of strings, like '[\"/bin/sh\", \"-c\"]'")
        return tuple(words)
    try:
        return tuple(shlex.split(text))
    except ValueError as err:
        raise BadRequest(f"{option}: {text!r} cannot be split into words: {err}") from err


@click.group("image")
def image_group():
    """OCI images kept in the keg, under /oci-images/NAME/TAG/.

    Each tag is an OCI image layout (oci-layout, index.json, blobs/sha256/…)
    whose large blobs are stored as content-defined chunks: the same layer
    under many names or tags is stored once. The tag directory's KID names
    the image.
    """


@image_group.command("import")
@click.argument("source", type=click.Path(exists=True, dir_okay=True, file_okay=True))
@click.argument("reference", metavar="NAME[:TAG]")
@click.option("--kind", type=click.Choice(oci.KINDS), default=None,
              help="What SOURCE is (default: detected). oci: an OCI layout directory; oci-archive: a tar of "
                   "one; docker-archive: `docker save` output; rootfs: a root filesystem directory.")
@click.option("--ref", metavar="REF",
              help="The image to take from a layout or archive that holds several (its tag or ref name).")
@click.option("--entrypoint", metavar="CMD",
              help="rootfs: the entrypoint, as shell words or a JSON array ('[\"/bin/sh\", \"-c\"]').")
@click.option("--cmd", metavar="CMD", help="rootfs: the default command, as shell words or a JSON array.")
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE",
              help="rootfs: an environment variable (repeatable); PATH has a default unless given.")
@click.option("--workdir", metavar="DIR", help="rootfs: the working directory (absolute).")
@click.option("--arch", metavar="ARCH", help="rootfs: the OCI architecture (default: this machine's, e.g. amd64).")
@click.option("--clamp-mtime", type=click.IntRange(min=0), metavar="SECONDS",
              help="rootfs: no file time later than this (seconds since 1970, like SOURCE_DATE_EPOCH), "
                   "for a layer that is the same wherever it is built.")
@keg_target
@json_option
def image_import(source, reference, kind, ref, entrypoint, cmd, env, workdir, arch, clamp_mtime,
                 opener, as_json):
    """Import the image at SOURCE as NAME:TAG (TAG defaults to latest).

    SOURCE is an OCI image layout directory, an OCI or docker-archive
    tarball, or a root filesystem directory. Layouts and archives keep their
    blobs and digests byte for byte; a root filesystem becomes one
    uncompressed tar layer (entries sorted, modes, owners and links kept)
    and a config made from the --entrypoint, --cmd, --env and --workdir
    options. Every blob is checked against its sha256 as it is read; the
    image is written in one transaction, replacing an earlier NAME:TAG, so a
    failed import changes nothing. A bar shows progress on a terminal.

    Prints /oci-images/NAME/TAG and its KID, tab-separated.

    \b
    Examples:
      keg image import ./debian-layout library/debian:bookworm
      skopeo copy docker://alpine:3 docker-archive:alpine.tar:alpine:3
      keg image import alpine.tar alpine:3
      keg image import ./rootfs tools:1 --cmd /bin/sh --env LANG=C.UTF-8
    """
    rootfs = oci.RootfsConfig(_command_words(entrypoint, "--entrypoint"), _command_words(cmd, "--cmd"),
                              tuple(env), workdir, clamp_mtime, arch)
    oci.parse_reference(reference)  # a bad name fails before the source is read
    with oci.open_source(source, kind, ref, rootfs) as src, opener() as store:
        with progress(f"import {source}", src.total) as update:
            result = oci.import_image(store, src, reference, progress=update)
    if as_json:
        _emit_json(result.to_json())
    else:
        click.echo(f"{result.path}\t{result.kid}")


@image_group.command("export")
@click.argument("reference", metavar="NAME[:TAG]")
@click.argument("dest", metavar="DIR", type=click.Path(file_okay=False))
@rev_option
@keg_target
@json_option
def image_export(reference, dest, rev, opener, as_json):
    """Write image NAME:TAG as an OCI layout in DIR, for skopeo, umoci or runc.

    DIR is created, or may be empty, or may be an OCI layout already (the
    image is added to it under TAG). Digests are those of the import: the
    manifest digest is unchanged. Each blob is checked against its sha256 as
    it is written. Prints DIR and the image's KID, tab-separated.

    \b
    Examples:
      keg image export library/debian:bookworm ./debian
      skopeo inspect oci:./debian:bookworm
      umoci unpack --image ./debian:bookworm ./bundle
    """
    with opener() as store:
        plan = oci.plan_export(store, reference, rev)
        with progress(f"export {reference}", plan.total) as update:
            result = oci.export_image(store, plan, dest, progress=update, rev=rev)
    if as_json:
        _emit_json(result.to_json())
    else:
        click.echo(f"{result.dest}\t{result.kid}")


class _DebootstrapLines:
    """debootstrap's output condensed: one line per phase (Retrieving, Extracting, …) with its count,
    redrawn in place on a terminal; warnings and errors in full."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.phase, self.count, self.started = None, 0, time.monotonic()

    def __call__(self, line: str) -> None:
        if line.startswith(("W:", "E:")):
            self._end()
            click.echo(f"debootstrap: {line}", err=True)
            return
        words = line.split()
        if len(words) < 2 or words[0] != "I:":
            return
        phase = words[1]
        if phase != self.phase:
            self._end()
            self.phase, self.count = phase, 0
        self.count += 1
        if self.tty:
            text = f"debootstrap: {' '.join(words[1:])}"[:78]
            click.echo(f"\r{text:<78}", err=True, nl=False)
        elif self.count == 1:
            click.echo(f"debootstrap: {' '.join(words[1:])}", err=True)

    def _end(self) -> None:
        if self.phase is None:
            return
        if self.tty:
            click.echo(f"\r{'debootstrap: ' + self.phase + ' (' + str(self.count) + ')':<78}", err=True)
        elif self.count > 1:
            click.echo(f"debootstrap: {self.phase}: {self.count} lines", err=True)
        self.phase = None

    def close(self) -> None:
        self._end()
        click.echo(f"debootstrap: done in {time.monotonic() - self.started:.0f} s", err=True)


@image_group.command("bootstrap")
@click.argument("distribution", type=click.Choice(bootstrap.DISTRIBUTIONS))
@click.option("--suite", default=bootstrap.DEFAULT_SUITE, show_default=True, help="The Debian release.")
@click.option("--mirror", default=None, metavar="URL",
              help=f"Where packages are downloaded from, and what the image's apt sources name "
                   f"(default: {bootstrap.DEFAULT_MIRROR}, or with --tarball the mirror it was made from).")
@click.option("--tarball", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Take the packages from this file (made by `debootstrap --make-tarball`, as ./install.sh "
                   f"does at {bootstrap.DEFAULT_TARBALL}): nothing is downloaded.")
@click.option("--include", "include", multiple=True, metavar="PKG",
              help="A package to install besides the minimal base (repeatable; commas allowed). "
                   f"Default: {' '.join(bootstrap.DEFAULT_INCLUDE)}. With --tarball, give what the tarball was "
                   "made with.")
@click.option("--name", default=None, help="The image name (default: the distribution, debian).")
@click.option("--tag", default=None, help="The image tag (default: the suite, bookworm).")
@keg_target
@json_option
def image_bootstrap(distribution, suite, mirror, tarball, include, name, tag, opener, as_json):
    """Build a base image with debootstrap and import it as NAME:TAG (debian:bookworm).

    debootstrap (minbase variant, needs root) installs the suite and the
    --include packages into a scratch directory; device nodes and apt's
    downloaded package lists are removed; the root filesystem is imported as
    one layer with PATH and LANG=C.UTF-8 set and bash as the command. Builds
    use debian:bookworm unless their keg.json names another base.

    \b
    Examples:
      keg image bootstrap debian
      keg image bootstrap debian --tarball /var/cache/keg/debian-bookworm.tgz
      keg image bootstrap debian --include python3,python3-pip,git --tag bookworm-git
    """
    packages = tuple(p for item in include for p in item.split(",") if p) or bootstrap.DEFAULT_INCLUDE
    reference = f"{name or distribution}:{tag or suite}"
    oci.parse_reference(reference)
    lines = _DebootstrapLines()
    where = f"from {tarball}" if tarball else f"from {mirror or bootstrap.DEFAULT_MIRROR}"
    click.echo(f"debootstrap: {suite} with {', '.join(packages)}, {where}", err=True)
    with opener() as store, tempfile.TemporaryDirectory(prefix="keg-bootstrap-") as scratch:
        root = bootstrap.bootstrap_rootfs(os.path.join(scratch, "rootfs"), suite, mirror, packages, tarball, lines)
        lines.close()
        with oci.open_source(root, kind="rootfs", rootfs=bootstrap.image_config()) as src:
            with progress(f"import {reference}", src.total) as update:
                result = oci.import_image(store, src, reference, progress=update)
    if as_json:
        _emit_json(result.to_json())
    else:
        click.echo(f"{result.path}\t{result.kid}")
