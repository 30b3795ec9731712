"""``keg image``: import OCI images into /oci-images and export them as OCI layouts.

Registered on the ``keg`` group at the end of :mod:`shell.cli`; import that
module, not this one, to get the whole command.
"""

from __future__ import annotations

import json
import shlex

import click

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
