"""A Debian base image made with debootstrap and imported into the keg (DESIGN §6).

Builds run on a base image: by default ``debian:bookworm`` with ``python3``
and ``python3-pip``. This module makes it::

    debootstrap --variant=minbase --include=python3,python3-pip bookworm ROOT MIRROR
    (or, offline: debootstrap --unpack-tarball=FILE … from a tarball made once with --make-tarball)
    clean ROOT: device nodes, fifos and sockets go (runc makes /dev; the Mayor's layer
                cache refuses devices), apt's downloaded lists and .deb files go, and
                documentation (man, info, locale, doc but its copyright files), as in slim images
    keg image import ROOT debian:bookworm (one tar layer, config: Env PATH, LANG; Cmd bash)

Ownership is kept as debootstrap left it (ids 0..65535), so the Mayor's
layer cache can shift it into the machine's user-namespace range like any
other image. debootstrap needs root (it calls chroot and mknod).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
import tempfile

from keg import oci
from keg.errors import KegError

DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_INCLUDE = ("python3", "python3-pip")
DEFAULT_VARIANT = "minbase"
DEFAULT_TARBALL = "/var/cache/keg/debian-bookworm.tgz"
DISTRIBUTIONS = ("debian",)
IMAGE_ENV = (oci.DEFAULT_PATH_ENV, "LANG=C.UTF-8")
IMAGE_CMD = ("/bin/bash",)
TAIL_LINES = 20
DOC_DIRS = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale")
UNSAFE_IO = "etc/dpkg/dpkg.cfg.d/keg-bootstrap-unsafe-io"
# Left by debootstrap or apt and useless in an image: apt's package lists and downloaded packages
# (`apt-get update` fetches them again), and host files debootstrap copied in.
CLEAN_GLOBS = ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_Packages",
               "var/lib/apt/lists/*_Release", "var/lib/apt/lists/*_InRelease", "var/lib/apt/lists/*_Translation-*")


class BootstrapError(KegError):
    """debootstrap could not make the root filesystem; the message says why and what to do."""


def debootstrap_command(target: str, suite: str = DEFAULT_SUITE, mirror: str = DEFAULT_MIRROR,
                        include=DEFAULT_INCLUDE, tarball: str | None = None,
                        make_tarball: str | None = None, variant: str = DEFAULT_VARIANT) -> list:
    """The debootstrap argument list.

    Args:
        target: the directory to fill (or a scratch directory for ``make_tarball``).
        tarball: unpack the packages from this file (``--unpack-tarball``): no download.
        make_tarball: only download the packages into this file (``--make-tarball``).
    """
    argv = ["debootstrap", f"--variant={variant}"]
    if include:
        argv.append("--include=" + ",".join(include))
    if tarball is not None:
        argv.append(f"--unpack-tarball={os.path.abspath(tarball)}")
    if make_tarball is not None:
        argv.append(f"--make-tarball={os.path.abspath(make_tarball)}")
    return [*argv, suite, target, mirror]


def run_debootstrap(argv: list, on_line=None) -> None:
    """Run debootstrap, handing each line of its output to ``on_line`` as it comes.

    Raises:
        BootstrapError: debootstrap is missing, or failed (with the end of its output).
    """
    if os.geteuid() != 0:
        raise BootstrapError("debootstrap needs root (it uses chroot and mknod); run this as root")
    if shutil.which(argv[0]) is None:
        raise BootstrapError("debootstrap is not installed: apt-get install debootstrap (./install.sh does)")
    tail: list = []
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
           "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd="/")
    with proc.stdout:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            tail = (tail + [line])[-TAIL_LINES:]
            if on_line is not None:
                on_line(line)
    code = proc.wait()
    if code != 0:
        shown = "\n".join(tail)
        raise BootstrapError(f"debootstrap failed (exit code {code}); its last lines:\n{shown}")


def clean_rootfs(root: str) -> int:
    """Remove what an image layer cannot or should not carry; returns how many entries went.

    Device nodes, fifos and sockets anywhere (runc mounts a /dev of its own,
    and the Mayor refuses device nodes in layers), the contents of /dev,
    apt's downloaded package lists and archives, and documentation
    (``usr/share/{doc,man,info,locale}``, keeping copyright files).
    """
    import glob

    removed = 0
    dev = os.path.join(root, "dev")
    if os.path.isdir(dev) and not os.path.islink(dev):
        for name in os.listdir(dev):
            path = os.path.join(dev, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed += 1
    for top, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            path = os.path.join(top, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                os.unlink(path)
                removed += 1
    for pattern in CLEAN_GLOBS:
        for path in glob.glob(os.path.join(root, pattern)):
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                removed += 1
    removed += _drop_docs(root)
    return removed


def _drop_docs(root: str) -> int:
    """Remove manual pages, info pages, translations and documentation (the copyright files stay), as
    Debian's slim images do: a quarter of the image that no container reads."""
    removed = 0
    for top in DOC_DIRS:
        base = os.path.join(root, top)
        if not os.path.isdir(base) or os.path.islink(base):
            continue
        for dirpath, dirnames, filenames in os.walk(base, topdown=False):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if top == "usr/share/doc" and name == "copyright":
                    continue
                if top == "usr/share/locale" and dirpath == base:
                    continue  # locale.alias and the like, read by the C library
                os.unlink(path)
                removed += 1
            for name in dirnames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    os.unlink(path)
                elif not os.listdir(path):
                    os.rmdir(path)
    return removed


def tarball_mirror(tarball: str, suite: str = DEFAULT_SUITE) -> str | None:
    """The mirror a ``--make-tarball`` file was downloaded from, as its apt list names say.

    debootstrap finds the package lists in the tarball under names made from
    the mirror (``deb.debian.org_debian_dists_bookworm_Release``), so an
    unpack must be given that same mirror.
    """
    suffix = f"_dists_{suite}_Release"
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for info in tar:
                name = info.name.lstrip("./")
                if name.startswith("var/lib/apt/lists/") and name.endswith(suffix):
                    return "http://" + name[len("var/lib/apt/lists/"):-len(suffix)].replace("_", "/")
    except (tarfile.TarError, OSError, EOFError):
        return None  # debootstrap says what is wrong with the file
    return None


def _point_apt_at(root: str, used: str, wanted: str) -> None:
    """Make the image's apt sources name ``wanted`` where debootstrap wrote ``used``."""
    sources = os.path.join(root, "etc", "apt", "sources.list")
    if used == wanted or os.path.islink(sources) or not os.path.isfile(sources):
        return
    with open(sources, encoding="utf-8") as f:
        text = f.read()
    with open(sources, "w", encoding="utf-8") as f:
        f.write(text.replace(used, wanted))


def bootstrap_rootfs(target: str, suite: str = DEFAULT_SUITE, mirror: str | None = None,
                     include=DEFAULT_INCLUDE, tarball: str | None = None, on_line=None) -> str:
    """Make a cleaned Debian root filesystem in the new directory ``target``.

    Args:
        mirror: where packages are downloaded from, and what the image's apt
            sources name (default: ``DEFAULT_MIRROR``, or with a tarball the
            mirror it was made from).
        tarball: a file made by ``debootstrap --make-tarball`` (as ./install.sh
            does): the packages come from it and nothing is downloaded.
        on_line: called with each line debootstrap prints.

    Returns:
        ``target``.

    Raises:
        BootstrapError: ``target`` is not empty, the tarball is missing, or debootstrap failed.
    """
    if os.path.exists(target) and os.listdir(target):
        raise BootstrapError(f"{target} is not empty; debootstrap needs a new or empty directory")
    if tarball is not None and not os.path.isfile(tarball):
        raise BootstrapError(f"{tarball} does not exist; make it with ./install.sh or "
                             f"`debootstrap --make-tarball={tarball} --variant={DEFAULT_VARIANT} "
                             f"--include={','.join(include)} {suite} $(mktemp -d) {mirror}`")
    used = (tarball_mirror(tarball, suite) if tarball is not None else None) or mirror or DEFAULT_MIRROR
    os.makedirs(target, exist_ok=True)
    os.chmod(target, 0o755)
    # dpkg fsyncs every file it unpacks, which makes debootstrap take minutes on a busy disk; a scratch
    # root filesystem does not need that (as Docker's image builds do). The image's own dpkg keeps it.
    unsafe_io = os.path.join(target, UNSAFE_IO)
    os.makedirs(os.path.dirname(unsafe_io), exist_ok=True)
    with open(unsafe_io, "w", encoding="ascii") as f:
        f.write("# keg image bootstrap: no fsync while the image is made; removed afterwards\nforce-unsafe-io\n")
    run_debootstrap(debootstrap_command(target, suite, used, include, tarball=tarball), on_line)
    os.unlink(unsafe_io)
    _point_apt_at(target, used, mirror or used)
    clean_rootfs(target)
    return target


def make_tarball(path: str, suite: str = DEFAULT_SUITE, mirror: str = DEFAULT_MIRROR,
                 include=DEFAULT_INCLUDE, on_line=None) -> str:
    """Download the packages of a base image into ``path`` (``debootstrap --make-tarball``), atomically.

    Raises:
        BootstrapError: debootstrap failed.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    with tempfile.TemporaryDirectory(prefix="keg-debootstrap-") as scratch:
        run_debootstrap(debootstrap_command(scratch, suite, mirror, include, make_tarball=partial), on_line)
    os.replace(partial, path)
    return path


def image_config(env=(), cmd=IMAGE_CMD) -> oci.RootfsConfig:
    """The config of a base image: PATH, LANG=C.UTF-8 and ``env``; Cmd bash."""
    names = {e.split("=", 1)[0] for e in env}
    base = tuple(e for e in IMAGE_ENV if e.split("=", 1)[0] not in names)
    return oci.RootfsConfig(cmd=tuple(cmd), env=base + tuple(env))


def import_rootfs(store, root: str, reference: str, progress=None, env=()) -> oci.ImportResult:
    """Import a root filesystem made by :func:`bootstrap_rootfs` as image ``reference``.

    Raises:
        BadImage: a bad reference, or something in ``root`` the importer refuses.
    """
    with oci.open_source(root, kind="rootfs", rootfs=image_config(env)) as source:
        return oci.import_image(store, source, reference, progress=progress)


def bootstrap_image(store, reference: str = f"debian:{DEFAULT_SUITE}", suite: str = DEFAULT_SUITE,
                    mirror: str | None = None, include=DEFAULT_INCLUDE, tarball: str | None = None,
                    work_dir: str | None = None, on_line=None, progress=None) -> oci.ImportResult:
    """Bootstrap Debian into a scratch directory and import it as ``reference``; the scratch goes afterwards.

    Raises:
        BootstrapError, BadImage: see :func:`bootstrap_rootfs` and :func:`import_rootfs`.
    """
    oci.parse_reference(reference)  # a bad name fails before minutes of debootstrap
    scratch = tempfile.mkdtemp(prefix="keg-bootstrap-", dir=work_dir)
    try:
        root = bootstrap_rootfs(os.path.join(scratch, "rootfs"), suite, mirror, include, tarball, on_line)
        return import_rootfs(store, root, reference, progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
