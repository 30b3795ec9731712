"""OCI images in the keg: import from a layout, a tarball or a root filesystem; export to a layout (DESIGN §2, §6).

One tag of an image lives at ``/oci-images/<name>/<tag>/`` as an OCI image
layout, byte for byte what ``skopeo`` and ``umoci`` read::

    oci-layout            {"imageLayoutVersion": "1.0.0"}
    index.json            exactly one manifest, annotated org.opencontainers.image.ref.name: <tag>
    blobs/sha256/<hex>    manifests, configs and layers (above 1 MiB stored as chunk pointers)

Blobs keep their digests: importing an OCI layout and exporting it again gives
the same manifest digest, so an image keeps its identity on the way through.
The same layer imported under a thousand names is one set of chunks and one
git blob.  The tag directory's KID names the image as a whole.

Sources (:func:`open_source` tells them apart, or is told with ``kind``):

* ``oci``: an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``);
* ``oci-archive``: a tar of such a layout;
* ``docker-archive``: ``docker save`` / ``skopeo copy … docker-archive:`` output
  (``manifest.json``); its config and layers are kept as stored and an OCI
  manifest is written for them;
* ``rootfs``: a root filesystem directory, made into one deterministic
  uncompressed tar layer with an OCI config (:class:`RootfsConfig`).

Every blob is streamed: hashed with sha256 as it is cut into chunks, never
held whole.  A digest or size that does not match, a media type Keg does not
know, or an unsafe tar member name fails the import before anything is
committed; all of an image's paths are written in one transaction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import platform
import posixpath
import re
import stat
import tarfile
import time
from dataclasses import dataclass

from keg import paths
from keg.errors import BadRequest, CorruptKeg, NotFound
from keg.transaction import Transaction, compare, delete, put

ROOT = "/oci-images"
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYER_TYPES = frozenset({
    OCI_LAYER, OCI_LAYER + "+gzip", OCI_LAYER + "+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})
KINDS = ("oci", "oci-archive", "docker-archive", "rootfs")

MAX_JSON_BLOB = 4 << 20  # manifests, indexes and configs are read whole; real ones are a few KiB
MAX_INDEX_DEPTH = 4
MAX_LINK_HOPS = 8
READ_SIZE = 1 << 20
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
HEX_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_NAME = 255

# platform.machine() -> (OCI architecture, variant)
_ARCHITECTURES = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None), "aarch64": ("arm64", None), "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "i386": ("386", None), "i686": ("386", None),
    "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
}


class BadImage(BadRequest):
    """An image reference or source that cannot be imported or exported; nothing was written."""


# ----------------------------------------------------------------- references

def parse_reference(text: str) -> tuple[str, str]:
    """Split ``NAME[:TAG]`` (tag ``latest`` when left out) and check both parts.

    Raises:
        BadImage: the name or tag breaks the OCI reference rules.
    """
    name, tag = text, "latest"
    head, sep, tail = text.rpartition(":")
    if sep and "/" not in tail:
        name, tag = head, tail
    if "@" in text:
        raise BadImage(f"{text!r}: give NAME:TAG; references by digest (@sha256:…) are not tags")
    check_name(name)
    check_tag(tag)
    return name, tag


def check_name(name: str) -> str:
    """Check an image name: lower-case components like ``library/debian``, joined by '/'.

    Raises:
        BadImage: naming the rule broken.
    """
    if not name or len(name) > MAX_NAME or not NAME_RE.match(name):
        raise BadImage(f"image name {name!r} is not valid: use lower-case letters and digits, separated "
                       "by '.', '_', '__' or '-' inside a component and '/' between components "
                       f"(for example library/debian), at most {MAX_NAME} characters")
    return name


def check_tag(tag: str) -> str:
    """Check an image tag: ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``.

    Raises:
        BadImage: naming the rule broken.
    """
    if not TAG_RE.match(tag):
        raise BadImage(f"image tag {tag!r} is not valid: up to 128 letters, digits, '_', '.' and '-', "
                       "not starting with '.' or '-' (for example 12.5 or bookworm-slim)")
    return tag


def image_path(name: str, tag: str) -> str:
    """The keg directory holding tag ``tag`` of image ``name``."""
    return paths.normalize(f"{ROOT}/{check_name(name)}/{check_tag(tag)}")


def _digest_hex(digest, where: str) -> str:
    if not isinstance(digest, str):
        raise BadImage(f"{where}: the digest is missing or not a string")
    m = DIGEST_RE.match(digest)
    if m is None:
        raise BadImage(f"{where}: digest {digest!r} is not sha256:<64 lower-case hex>; "
                       "Keg imports sha256 digests only")
    return m.group(1)


def _canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def parse_json_object(data: bytes, where: str, error=None) -> dict:
    """An image document (index, manifest, config, layout) as a dict.

    Raises:
        ``error`` (default :class:`BadImage`) naming ``where``: not JSON, or not an object.
    """
    error = error or BadImage
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise error(f"{where} is not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise error(f"{where} must be a JSON object")
    return obj


# -------------------------------------------------------------------- readers

class _DirReader:
    """Files of an OCI layout directory, by their names inside it."""

    def __init__(self, root: str):
        self.root = root

    def exists(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.root, name))

    def open(self, name: str):
        """``(stream, size)`` of the file ``name``."""
        full = os.path.join(self.root, name)
        try:
            f = open(full, "rb")
        except FileNotFoundError as err:
            raise BadImage(f"{self.root}: {name} is missing; the layout is incomplete") from err
        except OSError as err:
            raise BadImage(f"{self.root}: cannot read {name}: {err.strerror}") from err
        return f, os.fstat(f.fileno()).st_size

    def blob_bytes(self) -> int:
        total = 0
        for top, _, files in os.walk(os.path.join(self.root, "blobs")):
            total += sum(os.path.getsize(os.path.join(top, f)) for f in files)
        return total

    def close(self) -> None:
        pass


def _safe_member_name(name: str, archive: str) -> str:
    """``name`` relative to the archive's root, or BadImage when it could point outside it."""
    norm = posixpath.normpath(name.replace("\\", "/")) if name else ""
    if not name or name.startswith("/") or norm == ".." or norm.startswith("../") or "\x00" in name:
        raise BadImage(f"{archive}: the tarball has a member named {name!r}, which would point outside "
                       "the archive (an absolute path or '..'); refusing the whole tarball")
    return "" if norm == "." else norm


class _TarReader:
    """Members of a tarball, read in place: nothing is ever extracted to disk."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.tar = tarfile.open(path, "r:*")
            infos = self.tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as err:
            why = "" if isinstance(err, tarfile.ReadError) else f" ({err})"
            raise BadImage(f"{path} is not a readable tar archive{why}; give an OCI layout directory, "
                           "an OCI or docker-archive tarball, or a root filesystem directory") from err
        self.members = {}
        for info in infos:
            name = _safe_member_name(info.name, path)
            if info.issym():
                _safe_member_name(posixpath.join(posixpath.dirname(name), info.linkname), path)
            elif info.islnk():
                _safe_member_name(info.linkname, path)
            self.members[name] = info  # a later member of the same name wins, as when a tar is unpacked

    def _resolve(self, name: str):
        info = self.members.get(name)
        for _ in range(MAX_LINK_HOPS):
            if info is None or not (info.issym() or info.islnk()):
                break
            target = posixpath.join(posixpath.dirname(info.name), info.linkname) if info.issym() else info.linkname
            info = self.members.get(_safe_member_name(target, self.path))
        if info is None or not info.isreg():
            return None
        return info

    def exists(self, name: str) -> bool:
        return self._resolve(name) is not None

    def open(self, name: str):
        """``(stream, size)`` of the member ``name`` (links inside the archive are followed)."""
        info = self._resolve(name)
        if info is None:
            raise BadImage(f"{self.path}: the tarball has no file {name}; it is incomplete")
        return self.tar.extractfile(info), info.size

    def blob_bytes(self) -> int:
        return sum(i.size for n, i in self.members.items() if n.startswith("blobs/") and i.isreg())

    def close(self) -> None:
        self.tar.close()


def _read_small(reader, name: str, where: str) -> bytes:
    stream, size = reader.open(name)
    with stream:
        if size > MAX_JSON_BLOB:
            raise BadImage(f"{where} is {size} bytes; more than the {MAX_JSON_BLOB >> 20} MiB Keg reads as JSON")
        return stream.read(MAX_JSON_BLOB + 1)


# ---------------------------------------------------------------- the writer

class _Hashing:
    """A stream that computes the sha256 and size of what is read through it."""

    def __init__(self, stream):
        self.stream, self.sha, self.size = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


class _BlobWriter:
    """Streams blobs into the keg as put ops for ``<tag dir>/blobs/sha256/<hex>``, checking digests."""

    def __init__(self, store, tag_dir: str, progress=None):
        self.store, self.tag_dir, self.progress = store, tag_dir, progress
        self.ops: dict = {}  # hex -> Put
        self.sizes: dict = {}
        self.bytes = 0

    def add(self, stream, where: str, digest: str | None = None, size: int | None = None) -> tuple[str, int]:
        """Store the bytes of ``stream`` (closed afterwards); return their digest and size.

        Raises:
            BadImage: ``digest`` or ``size`` was given and the bytes do not match it.
        """
        with stream:
            expected = _digest_hex(digest, where) if digest is not None else None
            if expected in self.ops:
                return digest, self.sizes[expected]
            reader = _Hashing(stream)
            op = self.store.put_stream(f"{self.tag_dir}/blobs/sha256/incoming", reader, 0o100644,
                                       progress=self.progress)
        got = reader.sha.hexdigest()
        if expected is not None and got != expected:
            raise BadImage(f"{where}: the blob's sha256 is {got}, not the {expected} it is named by; the source "
                           "is damaged or was changed after it was written. Nothing was imported")
        if size is not None and reader.size != size:
            raise BadImage(f"{where}: the blob has {reader.size} bytes, its descriptor says {size}; "
                           "the source is damaged. Nothing was imported")
        self.ops[got] = dataclasses.replace(op, path=f"{self.tag_dir}/blobs/sha256/{got}")
        self.sizes[got] = reader.size
        self.bytes += reader.size
        return "sha256:" + got, reader.size

    def add_bytes(self, data: bytes, where: str, digest: str | None = None) -> tuple[str, int]:
        """:meth:`add` for a small blob already in memory (manifests, configs)."""
        return self.add(io.BytesIO(data), where, digest, len(data) if digest else None)


# -------------------------------------------------------------------- sources

class _LayoutSource:
    """An OCI image layout, in a directory or a tarball."""

    def __init__(self, reader, kind: str, ref: str | None):
        self.reader, self.kind, self.ref = reader, kind, ref
        self.where = reader.root if kind == "oci" else reader.path

    @property
    def total(self) -> int:
        return self.reader.blob_bytes()

    def _index(self) -> dict:
        if not self.reader.exists("oci-layout"):
            raise BadImage(f"{self.where} has no oci-layout file, so it is not an OCI image layout")
        layout = parse_json_object(_read_small(self.reader, "oci-layout", f"{self.where}: oci-layout"),
                             f"{self.where}: oci-layout")
        version = layout.get("imageLayoutVersion")
        if not isinstance(version, str) or not version.startswith("1."):
            raise BadImage(f"{self.where}: oci-layout says imageLayoutVersion {version!r}; Keg reads 1.x layouts")
        if not self.reader.exists("index.json"):
            raise BadImage(f"{self.where} has no index.json: an OCI layout lists its images there; "
                           "the layout is incomplete (was it copied in full?)")
        index = parse_json_object(_read_small(self.reader, "index.json", f"{self.where}: index.json"),
                            f"{self.where}: index.json")
        if not isinstance(index.get("manifests"), list) or not index["manifests"]:
            raise BadImage(f"{self.where}: index.json lists no manifests; there is no image to import")
        return index

    def _choose(self, index: dict) -> dict:
        manifests = [d for d in index["manifests"] if isinstance(d, dict)]
        refs = [(d.get("annotations") or {}).get(REF_NAME) for d in manifests]
        if self.ref is not None:
            chosen = [d for d, r in zip(manifests, refs) if r == self.ref]
            if not chosen:
                raise BadImage(f"{self.where} has no image tagged {self.ref!r}; it has: "
                               f"{', '.join(sorted(r for r in refs if r)) or '(no tags)'}")
            return chosen[0]
        if len(manifests) != 1:
            raise BadImage(f"{self.where} holds {len(manifests)} images; choose one with --ref "
                           f"(tags: {', '.join(sorted(r for r in refs if r)) or '(none)'})")
        return manifests[0]

    def _json_blob(self, desc: dict, sink: _BlobWriter, where: str) -> dict:
        hex_ = _digest_hex(desc.get("digest"), where)
        data = _read_small(self.reader, f"blobs/sha256/{hex_}", where)
        sink.add_bytes(data, where, desc["digest"])
        if len(data) != desc.get("size"):
            raise BadImage(f"{where}: the blob has {len(data)} bytes, its descriptor says {desc.get('size')}; "
                           "the source is damaged. Nothing was imported")
        obj = parse_json_object(data, where)
        if "mediaType" in obj and obj["mediaType"] != desc.get("mediaType"):
            raise BadImage(f"{where}: the blob says mediaType {obj['mediaType']!r}, its descriptor "
                           f"{desc.get('mediaType')!r}")
        return obj

    def _copy(self, desc, sink: _BlobWriter, where: str, depth: int = 0) -> None:
        if not isinstance(desc, dict):
            raise BadImage(f"{where}: a descriptor must be a JSON object")
        media = desc.get("mediaType")
        if media in INDEX_TYPES:
            if depth >= MAX_INDEX_DEPTH:
                raise BadImage(f"{where}: indexes nested more than {MAX_INDEX_DEPTH} deep")
            index = self._json_blob(desc, sink, where)
            for i, child in enumerate(index.get("manifests") or []):
                self._copy(child, sink, f"{where} > manifests[{i}]", depth + 1)
        elif media in MANIFEST_TYPES:
            self._copy_manifest(desc, sink, where)
        else:
            raise BadImage(f"{where}: unknown media type {media!r}; an index may list image manifests "
                           f"({', '.join(sorted(MANIFEST_TYPES))}) or nested indexes")

    def _copy_manifest(self, desc: dict, sink: _BlobWriter, where: str) -> None:
        manifest = self._json_blob(desc, sink, where)
        config = manifest.get("config")
        layers = manifest.get("layers")
        if not isinstance(config, dict) or not isinstance(layers, list):
            raise BadImage(f"{where}: the manifest needs a 'config' descriptor and a 'layers' list")
        blobs = [("config", config, CONFIG_TYPES)] + [(f"layers[{i}]", d, LAYER_TYPES) for i, d in enumerate(layers)]
        for label, d, known in blobs:
            at = f"{where} > {label}"
            if not isinstance(d, dict):
                raise BadImage(f"{at}: a descriptor must be a JSON object")
            if d.get("mediaType") not in known:
                raise BadImage(f"{at}: unknown media type {d.get('mediaType')!r}; Keg knows "
                               f"{', '.join(sorted(known))}")
            hex_ = _digest_hex(d.get("digest"), at)
            if not isinstance(d.get("size"), int) or d["size"] < 0:
                raise BadImage(f"{at}: the descriptor's size is missing or not a non-negative integer")
            stream, _ = self.reader.open(f"blobs/sha256/{hex_}")
            sink.add(stream, f"{at} ({d['digest']})", d["digest"], d["size"])

    def emit(self, sink: _BlobWriter, tag: str) -> dict:
        """Copy the chosen image's blobs into ``sink``; the descriptor for the new index.json."""
        index = self._index()
        chosen = dict(self._choose(index))
        self._copy(chosen, sink, f"{self.where}: index.json")
        chosen["annotations"] = {**(chosen.get("annotations") or {}), REF_NAME: tag}
        return chosen

    def close(self) -> None:
        self.reader.close()


class _DockerArchiveSource:
    """``docker save`` output: ``manifest.json`` naming a config and layer tars."""

    kind = "docker-archive"

    def __init__(self, reader: _TarReader, ref: str | None):
        self.reader, self.ref, self.where = reader, ref, reader.path

    @property
    def total(self) -> int:
        return os.path.getsize(self.reader.path)

    def _choose(self) -> dict:
        try:
            entries = json.loads(_read_small(self.reader, "manifest.json", f"{self.where}: manifest.json"))
        except (ValueError, UnicodeDecodeError) as err:
            raise BadImage(f"{self.where}: manifest.json is not valid JSON: {err}") from err
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise BadImage(f"{self.where}: manifest.json must be a non-empty list of images")
        tags = [t for e in entries for t in (e.get("RepoTags") or [])]
        if self.ref is not None:
            for e in entries:
                for t in e.get("RepoTags") or []:
                    if self.ref in (t, t.rpartition(":")[2], t.split("/", 1)[-1]) or t.endswith("/" + self.ref):
                        return e
            raise BadImage(f"{self.where} has no image tagged {self.ref!r}; it has: {', '.join(tags) or '(no tags)'}")
        if len(entries) != 1:
            raise BadImage(f"{self.where} holds {len(entries)} images; choose one with --ref "
                           f"(tags: {', '.join(tags) or '(none)'})")
        return entries[0]

    @staticmethod
    def _named_digest(member: str) -> str | None:
        """The digest a member's name claims (``<hex>.json``, ``<hex>.tar``, ``blobs/sha256/<hex>``)."""
        base = posixpath.basename(member)
        stem = base.rsplit(".", 1)[0] if base.endswith((".json", ".tar")) else base
        return "sha256:" + stem if HEX_RE.match(stem) else None

    def _layer_media(self, member: str) -> str:
        stream, _ = self.reader.open(member)
        with stream:
            magic = stream.read(4)
        if magic[:2] == b"\x1f\x8b":
            return OCI_LAYER + "+gzip"
        if magic == b"\x28\xb5\x2f\xfd":
            return OCI_LAYER + "+zstd"
        return OCI_LAYER

    def emit(self, sink: _BlobWriter, tag: str) -> dict:
        """Store the config and layers as they are and a new OCI manifest for them."""
        entry = self._choose()
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise BadImage(f"{self.where}: manifest.json needs 'Config' (a file name) and 'Layers' (a list)")
        where = f"{self.where}: {config_name}"
        config_bytes = _read_small(self.reader, _safe_member_name(config_name, self.where), where)
        config = parse_json_object(config_bytes, where)
        diff_ids = (config.get("rootfs") or {}).get("diff_ids")
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layer_names):
            raise BadImage(f"{where}: rootfs.diff_ids must list one digest per layer ({len(layer_names)})")
        layers = []
        for name, diff_id in zip(layer_names, diff_ids):
            member = _safe_member_name(str(name), self.where)
            media = self._layer_media(member)
            stream, size = self.reader.open(member)
            claimed = self._named_digest(member) if member.startswith("blobs/") else None
            digest, size = sink.add(stream, f"{self.where}: layer {member}", claimed, size)
            if media == OCI_LAYER and digest != diff_id:
                raise BadImage(f"{self.where}: layer {member} has sha256 {digest}, the config's diff_id says "
                               f"{diff_id}; the archive is damaged. Nothing was imported")
            layers.append({"mediaType": media, "digest": digest, "size": size})
        config_digest, config_size = sink.add_bytes(config_bytes, where, self._named_digest(config_name))
        manifest = _canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                    "config": {"mediaType": OCI_CONFIG, "digest": config_digest,
                                               "size": config_size},
                                    "layers": layers})
        digest, size = sink.add_bytes(manifest, f"{self.where}: manifest")
        desc = {"mediaType": OCI_MANIFEST, "digest": digest, "size": size, "annotations": {REF_NAME: tag}}
        if isinstance(config.get("architecture"), str) and isinstance(config.get("os"), str):
            desc["platform"] = {"architecture": config["architecture"], "os": config["os"]}
        return desc

    def close(self) -> None:
        self.reader.close()


@dataclass(frozen=True)
class RootfsConfig:
    """What a root filesystem import puts into the image config.

    Attributes:
        entrypoint: the program and its first arguments (``Entrypoint``).
        cmd: default arguments, or the command without an entrypoint (``Cmd``).
        env: ``NAME=value`` strings; a default ``PATH`` is added unless one is given.
        workdir: the absolute working directory (``WorkingDir``).
        clamp_mtime: no file time in the layer is later than this (seconds since
            the epoch), as with ``SOURCE_DATE_EPOCH``; None keeps times as on disk.
        architecture: the OCI architecture (``amd64``, ``arm64``…); None for this machine's.
    """

    entrypoint: tuple | None = None
    cmd: tuple | None = None
    env: tuple = ()
    workdir: str | None = None
    clamp_mtime: int | None = None
    architecture: str | None = None

    def check(self) -> None:
        """Raises BadImage when a field is malformed."""
        for item in self.env:
            if "=" not in item or item.startswith("="):
                raise BadImage(f"--env {item!r}: give NAME=value")
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise BadImage(f"--workdir {self.workdir!r} must be an absolute path")
        if self.clamp_mtime is not None and self.clamp_mtime < 0:
            raise BadImage("the mtime clamp must be seconds since 1970, not negative")


def machine_platform() -> tuple[str, str | None]:
    """This machine's OCI architecture and variant."""
    machine = platform.machine().lower()
    return _ARCHITECTURES.get(machine, (machine, None))


def _walk(root: str) -> list:
    """``(name, full path, lstat)`` of everything below ``root``, parents first, names in byte order."""
    out = []

    def visit(rel: str, full: str) -> None:
        try:
            names = sorted(os.listdir(full), key=os.fsencode)
        except OSError as err:
            raise BadImage(f"cannot list {full}: {err.strerror}") from err
        for name in names:
            child, child_rel = os.path.join(full, name), f"{rel}{name}"
            st = os.lstat(child)
            out.append((child_rel, child, st))
            if stat.S_ISDIR(st.st_mode):
                visit(child_rel + "/", child)

    visit("", root)
    return out


class TarStream(io.RawIOBase):
    """A deterministic tar of walked entries, made as it is read (never whole in memory).

    Args:
        entries: ``(name in the tar, full path, lstat result)`` in the order to write them.
        clamp: no entry's mtime is later than this (None: as on disk).
        root_owned: every entry owned by uid and gid 0, setuid and setgid bits cleared (a build's output);
            otherwise owners and modes are kept (a root filesystem).
        lead: ``TarInfo`` headers written first (directories the entries do not have).
        error: the exception for a file that changes while it is read.

    ``sha256`` and ``size`` cover what was read so far: the layer's digest once read to the end.
    """

    def __init__(self, entries: list, clamp: int | None = None, root_owned: bool = False, lead=(),
                 error=BadImage):
        super().__init__()
        self.clamp, self.root_owned, self.error = clamp, root_owned, error
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._pieces = self._generate(list(lead), entries)
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self.sha256.update(piece)
            self.size += len(piece)
            self._buf = memoryview(piece)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def _info(self, name: str, st, first_of_inode: dict):
        info = tarfile.TarInfo(name)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid, info.uname, info.gname = st.st_uid, st.st_gid, "", ""
        if self.root_owned:
            info.uid = info.gid = 0
            info.mode &= ~(stat.S_ISUID | stat.S_ISGID)
        mtime = max(0, int(st.st_mtime))
        info.mtime = mtime if self.clamp is None else min(mtime, self.clamp)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
        elif stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in first_of_inode:
                info.type, info.linkname = tarfile.LNKTYPE, first_of_inode[key]
            else:
                first_of_inode[key] = name
                info.type, info.size = tarfile.REGTYPE, st.st_size
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            return None  # sockets cannot be archived; a container creates its own
        return info

    @staticmethod
    def _header(info: tarfile.TarInfo) -> bytes:
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    def _generate(self, lead: list, entries: list):
        first_of_inode: dict = {}
        written = 0
        for info in lead:
            header = self._header(info)
            written += len(header)
            yield header
        for name, full, st in entries:
            info = self._info(name, st, first_of_inode)
            if info is None:
                continue
            if info.type == tarfile.SYMTYPE:
                info.linkname = os.readlink(full)
            header = self._header(info)
            written += len(header)
            yield header
            if info.type == tarfile.REGTYPE and info.size:
                yield from self._file(full, st)
                written += info.size + (-info.size % tarfile.BLOCKSIZE)
                if info.size % tarfile.BLOCKSIZE:
                    yield tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
        end = 2 * tarfile.BLOCKSIZE
        end += -(written + end) % tarfile.RECORDSIZE  # pad to a whole record, as tarfile and GNU tar do
        yield tarfile.NUL * end

    def _file(self, full: str, st):
        """The bytes of the regular file walked as ``st``; refused if it is another file now, or shrinks."""
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as err:
            raise self.error(f"cannot read {full}: {err.strerror}") from err
        with os.fdopen(fd, "rb") as f:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
                raise self.error(f"{full} changed while it was read; archive a tree nothing writes to")
            left = st.st_size
            while left:
                data = f.read(min(READ_SIZE, left))
                if not data:
                    raise self.error(f"{full} shrank while it was read; archive a tree nothing writes to")
                left -= len(data)
                yield data


class _RootfsSource:
    """A root filesystem directory: one uncompressed tar layer and a config made here."""

    kind = "rootfs"

    def __init__(self, root: str, config: RootfsConfig):
        config.check()
        self.root, self.config, self.where = root, config, root
        self.entries = _walk(root)

    @property
    def total(self) -> int:
        """The layer's size, near enough for a progress bar (long names take more header blocks)."""
        data = sum(st.st_size + (-st.st_size % tarfile.BLOCKSIZE) for _, _, st in self.entries
                   if stat.S_ISREG(st.st_mode))
        return data + tarfile.BLOCKSIZE * (len(self.entries) + 2)

    def _image_config(self, diff_id: str) -> bytes:
        c = self.config
        arch, variant = (c.architecture, None) if c.architecture else machine_platform()
        env = list(c.env)
        if not any(e.startswith("PATH=") for e in env):
            env.insert(0, DEFAULT_PATH_ENV)
        run = {"Env": env}
        if c.entrypoint is not None:
            run["Entrypoint"] = list(c.entrypoint)
        if c.cmd is not None:
            run["Cmd"] = list(c.cmd)
        if c.workdir is not None:
            run["WorkingDir"] = c.workdir
        newest = max((int(st.st_mtime) for _, _, st in self.entries), default=0)
        if c.clamp_mtime is not None:
            newest = min(newest, c.clamp_mtime)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(newest))
        obj = {"created": created, "architecture": arch, "os": "linux", "config": run,
               "rootfs": {"type": "layers", "diff_ids": [diff_id]},
               "history": [{"created": created, "created_by": "keg image import (root filesystem)"}]}
        if variant:
            obj["variant"] = variant
        return _canonical_json(obj)

    def emit(self, sink: _BlobWriter, tag: str) -> dict:
        """Store the layer, the config and the manifest; the descriptor for index.json."""
        layer, layer_size = sink.add(TarStream(self.entries, self.config.clamp_mtime), f"{self.root}: layer")
        config = self._image_config(layer)
        config_digest, config_size = sink.add_bytes(config, f"{self.root}: config")
        manifest = _canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                    "config": {"mediaType": OCI_CONFIG, "digest": config_digest,
                                               "size": config_size},
                                    "layers": [{"mediaType": OCI_LAYER, "digest": layer, "size": layer_size}]})
        digest, size = sink.add_bytes(manifest, f"{self.root}: manifest")
        cfg = json.loads(config)
        platform_ = {"architecture": cfg["architecture"], "os": "linux"}
        if "variant" in cfg:
            platform_["variant"] = cfg["variant"]
        return {"mediaType": OCI_MANIFEST, "digest": digest, "size": size, "platform": platform_,
                "annotations": {REF_NAME: tag}}

    def close(self) -> None:
        pass


def detect_kind(path: str) -> str:
    """Which kind of image source ``path`` is: one of :data:`KINDS`.

    Raises:
        BadImage: nothing is at ``path``, or it is a file that is no image tarball.
    """
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "oci-layout")):
            return "oci"
        if os.path.isdir(os.path.join(path, "blobs")) and os.path.isfile(os.path.join(path, "index.json")):
            raise BadImage(f"{path} has index.json and blobs/ but no oci-layout file: if it is an OCI layout, "
                           'add oci-layout ({"imageLayoutVersion":"1.0.0"}); to import it as a root '
                           "filesystem say --kind rootfs")
        return "rootfs"
    if not os.path.exists(path):
        raise BadImage(f"{path} does not exist; give an OCI layout directory, an OCI or docker-archive "
                       "tarball, or a root filesystem directory")
    reader = _TarReader(path)
    try:
        if "oci-layout" in reader.members or "index.json" in reader.members:
            return "oci-archive"
        if "manifest.json" in reader.members:
            return "docker-archive"
    finally:
        reader.close()
    raise BadImage(f"{path} is a tarball but neither an OCI layout (oci-layout, index.json) nor a docker "
                   "archive (manifest.json); to import a root filesystem tarball, unpack it and import "
                   "the directory")


def open_source(path: str, kind: str | None = None, ref: str | None = None,
                rootfs: RootfsConfig | None = None):
    """Open an image source for :func:`import_image`; close it (or use ``with``) when done.

    Args:
        path: a directory or a tarball.
        kind: one of :data:`KINDS`, or None to detect it.
        ref: which image of a source holding several (its ref name or tag).
        rootfs: the config of a root filesystem import; only for kind ``rootfs``.

    Returns:
        A source with ``kind``, ``total`` (bytes to read, for progress) and ``close()``.

    Raises:
        BadImage: the source cannot be read as that kind.
    """
    path = os.fspath(path)
    kind = kind or detect_kind(path)
    if kind not in KINDS:
        raise BadImage(f"unknown source kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind != "rootfs" and rootfs not in (None, RootfsConfig()):
        raise BadImage(f"{path} is an image ({kind}): its config is kept byte for byte, so --entrypoint, --cmd, "
                       "--env, --workdir, --arch and --clamp-mtime apply only to a root filesystem")
    if kind in ("oci", "rootfs") and not os.path.isdir(path):
        raise BadImage(f"{path} is not a directory; a source of kind {kind} is one")
    if kind == "oci":
        return _Source(_LayoutSource(_DirReader(path), "oci", ref))
    if kind == "rootfs":
        return _Source(_RootfsSource(path, rootfs or RootfsConfig()))
    reader = _TarReader(path)
    if kind == "oci-archive":
        return _Source(_LayoutSource(reader, "oci-archive", ref))
    return _Source(_DockerArchiveSource(reader, ref))


class _Source:
    """What :func:`open_source` returns: one interface over every kind of source."""

    def __init__(self, impl):
        self._impl = impl
        self.kind, self.where = impl.kind, impl.where

    @property
    def total(self) -> int:
        """About how many bytes an import reads (for a progress bar)."""
        return self._impl.total

    def emit(self, sink: _BlobWriter, tag: str) -> dict:
        return self._impl.emit(sink, tag)

    def close(self) -> None:
        self._impl.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------- import

@dataclass(frozen=True)
class ImportResult:
    """An imported image: its keg path and KID (the tag directory), and its manifest digest."""

    path: str
    kid: str
    revision: int
    name: str
    tag: str
    manifest_digest: str
    kind: str
    blobs: int
    size: int

    def to_json(self) -> dict:
        """The ``--json`` form."""
        return dataclasses.asdict(self)


def _check_place(store, tag_dir: str):
    """The compare guarding ``tag_dir`` and whether an image is there to replace.

    Raises:
        BadImage: ``tag_dir`` would sit inside another image, or holds other images.
    """
    parts = paths.split(tag_dir)
    for i in range(2, len(parts)):
        above = "/" + "/".join(parts[:i])
        if store.exists(above + "/oci-layout"):
            raise BadImage(f"{tag_dir} would lie inside the image at {above}; choose another name")
    try:
        entry = store.stat(tag_dir)
    except NotFound:
        return compare(tag_dir, None), False
    if entry.kind != "tree" or not store.exists(tag_dir + "/oci-layout"):
        raise BadImage(f"{tag_dir} holds something other than an image (other images' names continue "
                       "below it?); choose another name or tag")
    return compare(tag_dir, entry.kid), True


def import_image(store, source, reference: str, progress=None, **source_options) -> ImportResult:
    """Import an image into ``/oci-images/<name>/<tag>/``, replacing that tag if it exists.

    Every blob is checked against its digest as it is streamed in; the tag
    directory is written in one transaction after all of them passed, so a
    failed import changes nothing.

    Args:
        store: a ``keg.Store`` or ``RemoteKeg``.
        source: what :func:`open_source` returned, or a path (opened with ``source_options``).
        reference: ``NAME[:TAG]``.
        progress: called with the number of bytes read, as they are read.

    Returns:
        The :class:`ImportResult`.

    Raises:
        BadImage: a malformed reference or source, a digest or size mismatch.
        CompareFailed: another writer changed the tag while it was imported.
    """
    name, tag = parse_reference(reference)
    tag_dir = image_path(name, tag)
    if not isinstance(source, _Source):
        with open_source(source, **source_options) as opened:
            return import_image(store, opened, reference, progress)
    guard, replace = _check_place(store, tag_dir)
    sink = _BlobWriter(store, tag_dir, progress)
    desc = source.emit(sink, tag)
    index = _canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]})
    ops = [delete(tag_dir, recursive=True)] if replace else []
    ops += [put(f"{tag_dir}/oci-layout", LAYOUT_BYTES), put(f"{tag_dir}/index.json", index)]
    ops += [sink.ops[h] for h in sorted(sink.ops)]
    result = store.apply(Transaction(tuple(ops), (guard,)))
    if not result.ok:
        raise result.error
    entry = store.stat(tag_dir, result.revision)
    return ImportResult(tag_dir, entry.kid, result.revision, name, tag, desc["digest"], source.kind,
                        len(sink.ops), sink.bytes)


# --------------------------------------------------------------------- export

@dataclass(frozen=True)
class ExportPlan:
    """What :func:`export_image` will write: the image's index and its blobs (keg entries)."""

    path: str
    kid: str
    tag: str
    index: dict
    blobs: tuple

    @property
    def total(self) -> int:
        """The bytes of all blobs."""
        return sum(e.size for e in self.blobs)


@dataclass(frozen=True)
class ExportResult:
    """An exported image: the layout directory, the image's KID and manifest digest."""

    dest: str
    path: str
    kid: str
    tag: str
    manifest_digest: str
    blobs: int
    written: int

    def to_json(self) -> dict:
        """The ``--json`` form."""
        return dataclasses.asdict(self)


def plan_export(store, reference: str, rev=None) -> ExportPlan:
    """Read what the image ``NAME[:TAG]`` holds in the keg.

    Raises:
        NotFound: no such image.
        CorruptKeg: its index.json is not one an import writes.
    """
    name, tag = parse_reference(reference)
    tag_dir = image_path(name, tag)
    try:
        entry = store.stat(tag_dir, rev)
    except NotFound as err:
        raise NotFound(f"no image {name}:{tag} in the keg (nothing at {tag_dir}); import one with "
                       "keg image import, or list them with keg ls /oci-images") from err
    try:
        index = json.loads(store.read(f"{tag_dir}/index.json", rev))
        blobs = tuple(store.list(f"{tag_dir}/blobs/sha256", rev))
    except (NotFound, ValueError) as err:
        raise CorruptKeg(f"{tag_dir} is not a whole image (index.json or blobs/sha256 missing or "
                         f"unreadable: {err}); import it again") from err
    names = {e.name for e in blobs}
    for desc in index.get("manifests") or []:
        if _digest_hex(desc.get("digest"), f"{tag_dir}/index.json") not in names:
            raise CorruptKeg(f"{tag_dir}: index.json names {desc.get('digest')}, which is not among its blobs")
    return ExportPlan(tag_dir, entry.kid, tag, index, blobs)


def _prepare_dest(dest: str) -> dict | None:
    """Make ``dest`` ready; the index.json of a layout already there, or None."""
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise BadImage(f"{dest} is a file; give a directory for the OCI layout")
    if os.path.isdir(dest) and os.listdir(dest):
        if not os.path.isfile(os.path.join(dest, "oci-layout")):
            raise BadImage(f"{dest} is not empty and not an OCI layout; give a new or empty directory, "
                           "or an OCI layout to add the image to")
        index_path = os.path.join(dest, "index.json")
        if not os.path.exists(index_path):
            return None
        with open(index_path, "rb") as f:
            return parse_json_object(f.read(), index_path)
    os.makedirs(dest, exist_ok=True)
    return None


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.keg-tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _export_blob(store, entry, target: str, progress, rev) -> bool:
    """Stream one blob to ``target``, checking its sha256; False when it was there already."""
    if os.path.isfile(target) and os.path.getsize(target) == entry.size:
        if progress is not None:
            progress(entry.size)
        return False  # content-addressed: a file of that name and size is that blob
    tmp = f"{target}.keg-tmp-{os.getpid()}"
    sha = hashlib.sha256()
    try:
        with store.open(entry.path, rev) as src, open(tmp, "wb") as out:
            while True:
                data = src.read(READ_SIZE)
                if not data:
                    break
                sha.update(data)
                out.write(data)
                if progress is not None:
                    progress(len(data))
            out.flush()
            os.fsync(out.fileno())
        if sha.hexdigest() != entry.name:
            raise CorruptKeg(f"{entry.path}: the value's sha256 is {sha.hexdigest()}, not the digest it is "
                             "named by; the image in the keg is damaged")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def export_image(store, plan: ExportPlan | str, dest: str, progress=None, rev=None) -> ExportResult:
    """Write an image from the keg as an OCI layout in ``dest``, for skopeo, umoci or runc.

    ``dest`` is created, or may be empty, or may be an OCI layout already: the
    image is then added to it (an image of the same tag there is replaced in
    its index.json).  Blobs are streamed and checked against their digests as
    written; index.json is written last.

    Args:
        store: a ``keg.Store`` or ``RemoteKeg``.
        plan: from :func:`plan_export`, or ``NAME[:TAG]``.
        dest: the layout directory.
        progress: called with the number of bytes written.

    Raises:
        NotFound: no such image.
        BadImage: ``dest`` is a non-empty directory that is no OCI layout.
        CorruptKeg: a blob does not match its digest.
    """
    if not isinstance(plan, ExportPlan):
        plan = plan_export(store, plan, rev)
    dest = os.fspath(dest)
    existing = _prepare_dest(dest)
    blob_dir = os.path.join(dest, "blobs", "sha256")
    os.makedirs(blob_dir, exist_ok=True)
    written = 0
    for entry in plan.blobs:
        if not HEX_RE.match(entry.name):
            continue
        written += _export_blob(store, entry, os.path.join(blob_dir, entry.name), progress, rev)
    if not os.path.exists(os.path.join(dest, "oci-layout")):
        _write_atomic(os.path.join(dest, "oci-layout"), LAYOUT_BYTES)
    ours = plan.index["manifests"]
    if existing is not None:
        kept = [d for d in existing.get("manifests") or []
                if (d.get("annotations") or {}).get(REF_NAME) != plan.tag]
        index = {**existing, "manifests": kept + ours}
    else:
        index = plan.index
    _write_atomic(os.path.join(dest, "index.json"), _canonical_json(index))
    return ExportResult(dest, plan.path, plan.kid, plan.tag, ours[0]["digest"], len(plan.blobs), written)
