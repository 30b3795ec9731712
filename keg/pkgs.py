"""Packages in the keg, so that builds never need the internet (DESIGN §2, §6).

Python wheels and Debian packages are kept byte for byte at::

    /pkgs/pypi/<normalized name>/<version>/<wheel file name>
    /pkgs/deb/<package>/<version>/<package>_<version without epoch>_<arch>.deb

The wheel's name is normalized as PEP 503 says (``Foo_Bar`` → ``foo-bar``),
so the directory is what a simple index serves; the file keeps its own name,
which pip needs.  A Debian file is named as in a Debian pool.

A published version never changes: importing the same file again does
nothing and succeeds, while a different file under an existing name is
refused.  All the files of one import are checked first and then written in
one transaction; a large one (above 1 MiB) is stored as chunks, each kept once.
"""

from __future__ import annotations

import dataclasses
import email.parser
import os
import re
import subprocess
import zipfile
from dataclasses import dataclass

import kid as kidlib
from keg.errors import BadRequest, KegError, NotFound
from keg.objects import OBJ_BLOB, object_id
from keg.transaction import Transaction, compare

PYPI_ROOT = "/pkgs/pypi"
DEB_ROOT = "/pkgs/deb"
MAX_METADATA = 1 << 20

# PEP 427: {distribution}-{version}(-{build tag})?-{python tag}-{abi tag}-{platform tag}.whl
WHEEL_RE = re.compile(r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._]*[A-Za-z0-9])?)-(?P<version>[A-Za-z0-9_.!+]+)"
                      r"(?:-(?P<build>[0-9][A-Za-z0-9_.]*))?-(?P<python>[A-Za-z0-9_.]+)-(?P<abi>[A-Za-z0-9_.]+)"
                      r"-(?P<platform>[A-Za-z0-9_.]+)\.whl$")
DEB_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
DEB_VERSION_RE = re.compile(r"^(?:[0-9]+:)?[0-9A-Za-z.+~-]+$")
DEB_ARCH_RE = re.compile(r"^[a-z0-9-]+$")


class BadPackage(BadRequest):
    """A package file Keg will not import; nothing was written."""


def normalize_name(name: str) -> str:
    """A project name as PEP 503 normalizes it: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _normalize_version(version: str) -> str:
    # A wheel file name writes '-' as '_' (PEP 427); compare the two spellings as one.
    return version.strip().lower().replace("-", "_")


@dataclass(frozen=True)
class Package:
    """A checked package file and where it goes in the keg."""

    file: str
    kind: str  # "wheel" or "deb"
    name: str
    version: str
    path: str


def inspect_wheel(file: str) -> Package:
    """Check a wheel: its file name (PEP 427) and the Name and Version in its METADATA agree.

    Raises:
        BadPackage: naming what is wrong.
    """
    base = os.path.basename(file)
    m = WHEEL_RE.match(base)
    if m is None:
        raise BadPackage(f"{base} is not a wheel file name (NAME-VERSION[-BUILD]-PYTHON-ABI-PLATFORM.whl, PEP 427)")
    try:
        with zipfile.ZipFile(file) as z:
            dist_infos = sorted({n.split("/", 1)[0] for n in z.namelist()
                                 if n.split("/", 1)[0].endswith(".dist-info") and n.endswith("/METADATA")
                                 and n.count("/") == 1})
            wanted = f"{m['name']}-{m['version']}.dist-info"
            chosen = [d for d in dist_infos if d.lower() == wanted.lower()] or dist_infos
            if len(chosen) != 1:
                raise BadPackage(f"{base}: expected one {wanted}/METADATA in the wheel, found "
                                 f"{len(dist_infos)} .dist-info directories with METADATA")
            info = z.getinfo(f"{chosen[0]}/METADATA")
            if info.file_size > MAX_METADATA:
                raise BadPackage(f"{base}: {chosen[0]}/METADATA is larger than {MAX_METADATA >> 20} MiB")
            text = z.read(info).decode("utf-8", "replace")
            damaged = z.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as err:
        raise BadPackage(f"{file} is not a readable wheel (zip): {err}") from err
    if damaged is not None:
        raise BadPackage(f"{base}: {damaged} in the wheel fails its CRC check; the file is damaged")
    meta = email.parser.HeaderParser().parsestr(text)
    name, version = (meta.get("Name") or "").strip(), (meta.get("Version") or "").strip()
    if not name or not version:
        raise BadPackage(f"{base}: {chosen[0]}/METADATA has no Name or no Version")
    if normalize_name(name) != normalize_name(m["name"]):
        raise BadPackage(f"{base}: the file name says project {m['name']!r}, METADATA says {name!r}")
    if _normalize_version(version) != _normalize_version(m["version"]):
        raise BadPackage(f"{base}: the file name says version {m['version']!r}, METADATA says {version!r}")
    if "/" in version or version in (".", ".."):
        raise BadPackage(f"{base}: version {version!r} cannot be a directory name")
    return Package(file, "wheel", normalize_name(name), version, f"{PYPI_ROOT}/{normalize_name(name)}/{version}/{base}")


def inspect_deb(file: str) -> Package:
    """Read a .deb's Package, Version and Architecture with ``dpkg-deb --field``.

    Raises:
        BadPackage: the file is not a Debian package, or its fields are malformed.
        KegError: dpkg-deb is not installed.
    """
    try:
        done = subprocess.run(["dpkg-deb", "--field", file, "Package", "Version", "Architecture"],
                              capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise KegError("dpkg-deb is needed to import .deb files; install it (apt-get install dpkg)") from err
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
        raise BadPackage(f"{file} is not a readable Debian package: {why}")
    fields = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    package, version, arch = fields.get("Package", ""), fields.get("Version", ""), fields.get("Architecture", "")
    if not DEB_PACKAGE_RE.match(package):
        raise BadPackage(f"{file}: Package {package!r} is not a Debian package name")
    if not DEB_VERSION_RE.match(version):
        raise BadPackage(f"{file}: Version {version!r} is not a Debian version")
    if not DEB_ARCH_RE.match(arch):
        raise BadPackage(f"{file}: Architecture {arch!r} is not a Debian architecture")
    upstream = version.split(":", 1)[1] if ":" in version else version  # pool file names leave out the epoch
    return Package(file, "deb", package, version, f"{DEB_ROOT}/{package}/{version}/{package}_{upstream}_{arch}.deb")


def inspect(file: str) -> Package:
    """Check a ``.whl`` or ``.deb`` file and say where it goes.

    Raises:
        BadPackage: another kind of file, or a malformed one.
    """
    file = os.fspath(file)
    if not os.path.isfile(file):
        raise BadPackage(f"{file} is not a file; give .whl and .deb files")
    if file.endswith(".whl"):
        return inspect_wheel(file)
    if file.endswith(".deb"):
        return inspect_deb(file)
    raise BadPackage(f"{file}: Keg imports Python wheels (.whl) and Debian packages (.deb); "
                     "build a wheel with `pip wheel` first")


@dataclass(frozen=True)
class Imported:
    """One imported package: its keg path and KID; ``new`` False when it was there already."""

    path: str
    kid: str
    revision: int
    file: str
    kind: str
    name: str
    version: str
    new: bool

    def to_json(self) -> dict:
        """The ``--json`` form."""
        return dataclasses.asdict(self)


def plan_imports(files) -> list:
    """Check every file before anything is written; the :class:`Package` of each, once per path.

    Raises:
        BadPackage: a malformed file, or two different files for one path.
    """
    packages: dict = {}
    for file in files:
        pkg = inspect(file)
        other = packages.get(pkg.path)
        if other is not None and not os.path.samefile(other.file, pkg.file):
            raise BadPackage(f"{other.file} and {pkg.file} both go to {pkg.path}; import one of them")
        packages.setdefault(pkg.path, pkg)
    return list(packages.values())


def import_packages(store, files, progress=None) -> list:
    """Import wheels and .deb files into ``/pkgs/``, in one transaction.

    Args:
        store: a ``keg.Store`` or ``RemoteKeg``.
        files: paths of ``.whl`` and ``.deb`` files, or :class:`Package` records from :func:`plan_imports`.
        progress: called with the number of bytes read.

    Returns:
        One :class:`Imported` per distinct package, in the order given.

    Raises:
        BadPackage: a malformed file, or a different file already at a package's path.
        CompareFailed: another writer wrote one of the paths meanwhile; nothing changed.
    """
    files = list(files)
    packages = files if all(isinstance(f, Package) for f in files) else plan_imports(files)
    ops, compares, kids = [], [], {}
    for pkg in packages:
        with open(pkg.file, "rb") as stream:
            op = store.put_stream(pkg.path, stream, 0o100644, progress=progress)
        kids[pkg.path] = str(kidlib.from_oid(object_id(OBJ_BLOB, op.data)))
        try:
            present = store.stat(pkg.path)
        except NotFound:
            present = None
        if present is None:
            ops.append(op)
            compares.append(compare(pkg.path, None))
        elif present.kid != kids[pkg.path]:
            raise BadPackage(f"{pkg.path} already holds a different file ({present.kid}); a published version "
                             f"never changes: give it a new version, or remove the old one with keg rm {pkg.path}")
    if ops:
        result = store.apply(Transaction(tuple(ops), tuple(compares)))
        if not result.ok:
            raise result.error
        kids.update({p: k for p, k in result.kids.items() if k})
        revision = result.revision
    else:
        revision = store.revision().number
    written = {op.path for op in ops}
    return [Imported(p.path, kids[p.path], revision, p.file, p.kind, p.name, p.version, p.path in written)
            for p in packages]
