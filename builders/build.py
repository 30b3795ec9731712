"""One build: a pushed source becomes an OCI image in the keg, built in a contained process (DESIGN §6).

The builder daemon calls :func:`build` for a source it checked out; the
build runs as a runc container through the Mayor's runtime, on the base
image (``debian:bookworm`` unless ``keg.json`` names another)::

    /src     the source, read-only
    /wheels  the wheels of /pkgs/pypi the requirements need, read-only
    /out     writable, owned by the container's root; /out/app becomes /app of the image

with no network (``network: none``: a loopback of its own), memory, CPU and
pids limits, and a time limit. Nothing else the build writes survives it:
the root filesystem is an overlay discarded with the container, so the base
image and the host are untouched.

The output is taken from the host side of ``/out/app`` without following a
symlink: symlinks are stored as symlinks, ownership becomes root, setuid and
setgid bits are cleared, device nodes, fifos and sockets are dropped. The new
image is the base image's layers (their blobs reused by chunk pointer: no
upload) plus that one layer, with a config saying how to run it, written at
``/oci-images/<app>/<source KID>/`` in one transaction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import tarfile
import time
import zipfile

import kid as kidlib
from builders import kinds
from builders.kinds import BuildFailed, detect_kind  # noqa: F401  (part of this module's interface)
from keg import oci
from keg.errors import KegError, NotFound
from keg.objects import OBJ_BLOB, object_id
from keg.transaction import Transaction, compare, delete, put, put_large
from mayor import runtime_spec

BUILDER_VERSION = "1"           # part of the cache key: a change of what a build does changes it
PYPI_ROOT = "/pkgs/pypi"
BUILD_TIMEOUT = 15 * 60.0       # seconds
BUILD_MEMORY = 2 << 30          # bytes, at most the machine's
BUILD_CPUS = 2.0                # at most the machine's
BUILD_PIDS = 1024
MAX_OUTPUT_BYTES = 8 << 30      # the files of /out/app
MAX_LOG_BYTES = 16 << 20        # passed on to the log; the rest is counted, not shown
LOG_INTERVAL = 0.5              # seconds between log deliveries while output arrives
READ_SIZE = 1 << 20
BUILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROCESSES_LABEL = "org.keg.processes"


@dataclasses.dataclass
class BuildOutput:
    """A finished build: the image written and how to run its process types."""

    kind: str            # "python" | "static" | "script"
    image_kid: str       # KID of the image tag directory written
    image_path: str      # /oci-images/<app>/<source KID>
    processes: dict      # {"web": "python3 app.py", ...}
    base_kid: str


@dataclasses.dataclass(frozen=True)
class BaseImage:
    """A base image read from the keg: its tag directory, KID, manifest and config."""

    reference: str
    path: str
    kid: str
    manifest: dict
    config: dict


def _step(log, text: str) -> None:
    log(f"-----> {text}\n".encode())


# ---------------------------------------------------------------- inputs

def base_reference(settings: dict) -> str:
    """The base image a source builds on: ``keg.json``'s ``base``, else ``debian:bookworm``."""
    return settings.get("base") or kinds.DEFAULT_BASE


def _base_path(reference: str) -> str:
    name, tag = oci.parse_reference(reference)
    return oci.image_path(name, tag)


def _base_kid(keg, reference: str) -> str:
    path = _base_path(reference)
    try:
        return keg.stat(path).kid
    except NotFound as err:
        raise BuildFailed(f"the base image {reference} is not in the keg (nothing at {path}): make it with "
                          "`keg image bootstrap debian`, or name another base in keg.json") from err


def _pkgs_kid(keg) -> str | None:
    try:
        return keg.stat(PYPI_ROOT).kid
    except NotFound:
        return None


def inputs(keg, source_dir: str) -> dict:
    """What a build of ``source_dir`` depends on besides the source itself, for the build cache.

    Returns:
        ``{"kind", "base": base image KID, "pkgs": KID of /pkgs/pypi or None, "builder": version}``;
        ``pkgs`` is None for a kind that reads no wheels.

    Raises:
        BuildFailed: the kind cannot be told, or the base image is missing.
    """
    kind, settings = detect_kind(source_dir)
    return {"kind": kind, "base": _base_kid(keg, base_reference(settings)),
            "pkgs": _pkgs_kid(keg) if _reads_wheels(kind, source_dir) else None, "builder": BUILDER_VERSION}


def _reads_wheels(kind: str, source_dir: str) -> bool:
    """Python and script builds with a requirements.txt get the wheels it needs at /wheels."""
    return kind in ("python", "script") and os.path.isfile(os.path.join(source_dir, kinds.REQUIREMENTS))


def read_base(keg, reference: str) -> BaseImage:
    """The base image's manifest and config, from its tag directory.

    Raises:
        BuildFailed: missing, or not an image a build can extend.
    """
    path = _base_path(reference)
    kid = _base_kid(keg, reference)

    def blob(desc, what):
        try:
            hex_ = oci.DIGEST_RE.match(desc.get("digest") or "").group(1)
            data = keg.read(f"{path}/blobs/sha256/{hex_}")
        except (AttributeError, NotFound) as err:
            raise BuildFailed(f"the base image {reference} is damaged: its {what} is missing; import it again") \
                from err
        if hashlib.sha256(data).hexdigest() != hex_:
            raise BuildFailed(f"the base image {reference} is damaged: its {what} does not match its digest")
        return oci.parse_json_object(data, f"{reference} {what}", BuildFailed)

    index = oci.parse_json_object(keg.read(f"{path}/index.json"), f"{path}/index.json", BuildFailed)
    manifests = [d for d in index.get("manifests") or [] if isinstance(d, dict)]
    arch = oci.machine_platform()[0]
    chosen = [d for d in manifests if d.get("mediaType") in oci.MANIFEST_TYPES
              and (d.get("platform") or {}).get("architecture", arch) == arch]
    if not chosen:
        raise BuildFailed(f"the base image {reference} has no image manifest for linux/{arch}")
    manifest = blob(chosen[0], "manifest")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not all(isinstance(d, dict) for d in layers):
        raise BuildFailed(f"the base image {reference}: its manifest lists no layers")
    config = blob(manifest.get("config") or {}, "config")
    return BaseImage(reference, path, kid, manifest, config)


# ---------------------------------------------------------------- preparing the mounts

def _copy_source(source_dir: str, dest: str) -> None:
    """Copy the source (symlinks as symlinks, no .git) readable by the container's unprivileged root."""
    shutil.copytree(source_dir, dest, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    for top, dirs, files in os.walk(dest):
        os.chmod(top, 0o755)
        for name in files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, (0o755 if st.st_mode & 0o111 else 0o644))


def _wheel_metadata(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            return z.read(names[0]).decode("utf-8", "replace") if names else ""
    except (zipfile.BadZipFile, OSError):
        return ""  # pip says what is wrong with it


def _versions(keg, name: str) -> list:
    try:
        return [e for e in keg.list(f"{PYPI_ROOT}/{name}") if e.kind == "tree"]
    except (NotFound, KegError):
        return []


def check_requirements(keg, requirements: list) -> None:
    """Every requirement has a wheel in ``/pkgs/pypi``.

    Raises:
        BuildFailed: naming every requirement without one, and how to import it.
    """
    missing = [(name, line) for name, line in requirements if not _versions(keg, name)]
    if not missing:
        return
    named = ", ".join(f"'{line}'" for _, line in missing)
    which = "requirement " + named + " has" if len(missing) == 1 else "requirements " + named + " have"
    raise BuildFailed(f"{which} no wheel in {PYPI_ROOT}: builds have no internet; download the wheels with "
                      f"`pip download --only-binary=:all: -d wheels {' '.join(n for n, _ in missing)}` and import "
                      "them with `keg pkg import wheels/*.whl`")


def stage_wheels(keg, names, dest: str) -> int:
    """Copy every wheel of the named projects, and of what they require in turn, from the keg to ``dest``.

    A project the keg has no wheel of is left for pip to report.

    Returns:
        The number of wheel files staged.
    """
    os.makedirs(dest, mode=0o755, exist_ok=True)
    queue, seen, staged = list(names), set(), 0
    while queue:
        name = queue.pop(0)
        if name in seen:
            continue
        seen.add(name)
        for version in _versions(keg, name):
            for entry in keg.list(version.path):
                if entry.kind != "file" or not entry.name.endswith(".whl") or "/" in entry.name:
                    continue
                target = os.path.join(dest, entry.name)
                with keg.open(entry.path) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, READ_SIZE)
                os.chmod(target, 0o644)
                staged += 1
                queue += kinds.wheel_requirements(_wheel_metadata(target))
    return staged


def _make_out(out: str, id_base: int) -> None:
    os.mkdir(out, 0o755)
    os.chown(out, id_base, id_base)  # the container's root owns /out


# ---------------------------------------------------------------- running the container

class _LogPump:
    """Passes the build container's new output to ``log`` at most every ``LOG_INTERVAL`` seconds."""

    def __init__(self, runtime, name: str, log):
        self.runtime, self.name, self.log = runtime, name, log
        self.seen = 0
        self.sent = 0
        self.last = 0.0
        self.tail = b""

    def pump(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < LOG_INTERVAL:
            return
        self.last = now
        total, tail = self.runtime.log_tail(self.name, 1 << 20)
        new = total - self.seen
        if new <= 0:
            return
        data = tail[-new:] if new <= len(tail) else tail
        if new > len(tail):
            data = f"[… {new - len(tail)} bytes of output skipped …]\n".encode() + data
        self.seen = total
        self.tail = (self.tail + data)[-8192:]
        if self.sent < MAX_LOG_BYTES:
            self.log(data[:MAX_LOG_BYTES - self.sent])
            self.sent += len(data)
            if self.sent >= MAX_LOG_BYTES:
                self.log(f"\n[the build's output passed {MAX_LOG_BYTES >> 20} MiB; the rest is not shown]\n"
                         .encode())

    def error_line(self) -> str | None:
        """The last ``ERROR:`` line the build printed (pip's way of saying what failed)."""
        for line in reversed(self.tail.decode("utf-8", "replace").splitlines()):
            if line.startswith("ERROR:") or line.startswith("error:"):
                return line.strip()
        return None


def _duration(seconds: float) -> str:
    if seconds >= 60:
        return f"{seconds / 60:g} minute{'s' if seconds != 60 else ''}"
    return f"{seconds:g} s"


def _limits(runtime) -> dict:
    capacity = getattr(runtime, "capacity", None) or {}
    cpus = min(BUILD_CPUS, float(capacity.get("cpus") or BUILD_CPUS))
    memory = min(BUILD_MEMORY, int(capacity.get("memory") or BUILD_MEMORY))
    return {"cpu": cpus, "memory": memory, "pids": BUILD_PIDS}


def run_container(runtime, name: str, spec: dict, timeout: float, log) -> tuple:
    """Start the build container, pass its output to ``log`` as it comes, and wait for its end.

    Returns:
        ``(actual, pump)``: the runtime's record of the exited container, and the log pump.

    Raises:
        BuildFailed: it did not end within ``timeout`` seconds (it is killed).
    """
    container = runtime.container_id(name)
    if name in runtime.actual():
        runtime.remove(container)  # left by a builder that died during a build of the same source
    shutil.rmtree(os.path.join(runtime.logs, name), ignore_errors=True)
    spec_bytes = json.dumps(spec, sort_keys=True).encode()
    spec_kid = str(kidlib.from_oid(object_id(OBJ_BLOB, spec_bytes)))
    pump = _LogPump(runtime, name, log)
    runtime.start(name, spec_kid, spec, None, 1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            actual = runtime.actual().get(name)
            pump.pump()
            if actual is not None and actual.state == "exited":
                pump.pump(force=True)
                return actual, pump
            if time.monotonic() > deadline:
                runtime.stop(container, grace=0)
                pump.pump(force=True)
                raise BuildFailed(f"the build took longer than {_duration(timeout)} and was stopped")
            runtime.wait(min(LOG_INTERVAL, max(0.0, deadline - time.monotonic()) + 0.01))
    finally:
        runtime.remove(container)
        shutil.rmtree(os.path.join(runtime.logs, name), ignore_errors=True)


# ---------------------------------------------------------------- the output layer

def _walk_output(root: str, log) -> list:
    """``(name in the layer, host path, lstat)`` of everything under ``root``, parents first, sorted.

    Nothing is followed: a symlink is an entry, never a directory to enter.
    """
    out, total = [], 0

    def visit(rel: str, full: str) -> None:
        nonlocal total
        for name in sorted(os.listdir(full), key=os.fsencode):
            child = os.path.join(full, name)
            st = os.lstat(child)
            mode = st.st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                log(f"       dropped {rel}{name}: device nodes, fifos and sockets are not kept\n".encode())
                continue
            if stat.S_ISREG(mode):
                total += st.st_size
                if total > MAX_OUTPUT_BYTES:
                    raise BuildFailed(f"the build's output in /out/app is larger than {MAX_OUTPUT_BYTES >> 30} GiB")
            out.append((f"{rel}{name}", child, st))
            if stat.S_ISDIR(mode):
                visit(f"{rel}{name}/", child)

    visit("app/", root)
    return out


def layer_stream(entries: list, top_mtime: int) -> oci.TarStream:
    """A tar of the walked output under ``app/``, made as it is read, its sha256 computed on the way.

    Every entry is owned by root (uid 0, gid 0); setuid and setgid bits are cleared.
    """
    top = tarfile.TarInfo("app")
    top.type, top.mode, top.mtime = tarfile.DIRTYPE, 0o755, top_mtime
    return oci.TarStream(entries, root_owned=True, lead=[top], error=BuildFailed)


def _output_root(out: str) -> str:
    app = os.path.join(out, "app")
    try:
        st = os.lstat(app)
    except FileNotFoundError:
        raise BuildFailed("the build left nothing in /out/app, so there is no app to run") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BuildFailed("/out/app is not a directory (a symlink?); the build must leave the app's files there")
    return app


def _output_processes(kind: str, source_dir: str, app_dir: str) -> dict:
    processes = kinds.source_processes(source_dir)
    if processes is None and kind == "script":
        processes = kinds.source_processes(app_dir)  # read without following a symlink, like the source's
    if processes is None:
        processes = kinds.default_processes(kind, source_dir)
    if not processes:
        raise BuildFailed("no process types: add a Procfile (to the source, or have keg.build write "
                          "$OUT/app/Procfile) with a line like `web: ./server --port $PORT`")
    return processes


# ---------------------------------------------------------------- the image

def _env(kind: str, base_env: list) -> list:
    env = dict(e.split("=", 1) for e in base_env if "=" in e)
    env.setdefault("PATH", BUILD_PATH)
    if kind == "python":
        env["PATH"] = "/app/.deps/bin:" + env["PATH"]
        env["PYTHONPATH"] = "/app/.deps"
        env["PYTHONUNBUFFERED"] = "1"
    return [f"{k}={v}" for k, v in env.items()]


def _image_config(base: BaseImage, kind: str, app: str, source_kid: str, layer_digest: str,
                  processes: dict) -> bytes:
    config = json.loads(json.dumps(base.config))  # a copy; unknown fields are kept
    run = config.get("config") if isinstance(config.get("config"), dict) else {}
    run = dict(run)
    run["Env"] = _env(kind, [e for e in run.get("Env") or [] if isinstance(e, str)])
    run["WorkingDir"] = "/app"
    run.pop("Entrypoint", None)
    main = "web" if "web" in processes else sorted(processes)[0]
    run["Cmd"] = ["/bin/sh", "-c", processes[main]]
    labels = dict(run.get("Labels") or {})
    labels.update({PROCESSES_LABEL: json.dumps(processes, sort_keys=True), "org.keg.kind": kind,
                   "org.keg.app": app, "org.keg.source": source_kid, "org.keg.base": base.kid})
    run["Labels"] = labels
    config["config"] = run
    rootfs = dict(config.get("rootfs") or {"type": "layers"})
    rootfs["diff_ids"] = list(rootfs.get("diff_ids") or []) + [layer_digest]
    config["rootfs"] = rootfs
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config["created"] = created
    config["history"] = list(config.get("history") or []) + [
        {"created": created, "created_by": f"keg build ({kind}) of {app} {source_kid}"}]
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def _reuse_blob(keg, base: BaseImage, digest: str, dest: str):
    """A put of a base blob at ``dest``: its chunk pointer when large (nothing uploaded), else its bytes."""
    source = f"{base.path}/blobs/sha256/{digest.split(':', 1)[1]}"
    try:
        pointer = keg.pointer(source)
        return put_large(dest, pointer) if pointer is not None else put(dest, keg.read(source))
    except NotFound as err:
        raise BuildFailed(f"the base image {base.reference} is damaged: {source} is missing") from err


def write_image(keg, app: str, source_kid: str, base: BaseImage, layer: oci.TarStream, kind: str,
                processes: dict) -> tuple:
    """Stream the layer into the keg and write the whole image at ``/oci-images/<app>/<source KID>``.

    Returns:
        ``(image path, image KID)``.
    """
    tag_dir = oci.image_path(app, source_kid)
    blobs = f"{tag_dir}/blobs/sha256"
    ops = {}
    incoming = keg.put_stream(f"{blobs}/incoming", layer)
    layer_digest = "sha256:" + layer.sha256.hexdigest()
    ops[layer_digest] = dataclasses.replace(incoming, path=f"{blobs}/{layer.sha256.hexdigest()}")
    layer_desc = {"mediaType": oci.OCI_LAYER, "digest": layer_digest, "size": layer.size}
    for desc in base.manifest["layers"]:
        if desc["digest"] not in ops:
            ops[desc["digest"]] = _reuse_blob(keg, base, desc["digest"], f"{blobs}/{desc['digest'].split(':')[1]}")
    config = _image_config(base, kind, app, source_kid, layer_digest, processes)
    config_hex = hashlib.sha256(config).hexdigest()
    ops["sha256:" + config_hex] = put(f"{blobs}/{config_hex}", config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                           "config": {"mediaType": oci.OCI_CONFIG, "digest": "sha256:" + config_hex,
                                      "size": len(config)},
                           "layers": [*base.manifest["layers"], layer_desc]},
                          sort_keys=True, separators=(",", ":")).encode()
    manifest_hex = hashlib.sha256(manifest).hexdigest()
    ops["sha256:" + manifest_hex] = put(f"{blobs}/{manifest_hex}", manifest)
    platform_ = {"architecture": base.config.get("architecture") or oci.machine_platform()[0],
                 "os": base.config.get("os") or "linux"}
    index = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [
        {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + manifest_hex, "size": len(manifest),
         "platform": platform_, "annotations": {oci.REF_NAME: source_kid}}]},
        sort_keys=True, separators=(",", ":")).encode()
    try:
        present = keg.stat(tag_dir).kid
    except NotFound:
        present = None
    head = [delete(tag_dir, recursive=True)] if present else []
    tx = Transaction(tuple([*head, put(f"{tag_dir}/oci-layout", oci.LAYOUT_BYTES), put(f"{tag_dir}/index.json", index),
                            *[ops[d] for d in sorted(ops)]]), (compare(tag_dir, present),))
    result = keg.apply(tx)
    if not result.ok:
        raise result.error
    return tag_dir, keg.stat(tag_dir, result.revision).kid


# ---------------------------------------------------------------- the build

def _check_app(app: str, source_kid: str) -> None:
    try:
        oci.image_path(app, source_kid)
        kidlib.parse(source_kid, allow_short=False)
    except (oci.BadImage, kidlib.KidError) as err:
        raise BuildFailed(f"cannot build {app!r} at {source_kid!r}: {err}") from err


def _container_name(app: str, source_kid: str) -> str:
    return f"build-{source_kid[2:14].lower()}-{app}"[:63].rstrip("-.")


def _mounts(work_dir: str, with_wheels: bool) -> list:
    mounts = [{"source": os.path.join(work_dir, "src"), "destination": "/src", "readonly": True},
              {"source": os.path.join(work_dir, "out"), "destination": "/out", "readonly": False}]
    if with_wheels:
        mounts.append({"source": os.path.join(work_dir, "wheels"), "destination": "/wheels", "readonly": True})
    return mounts


def _prepare_mounts(keg, runtime, source_dir: str, work_dir: str, requirements, log) -> None:
    """Fill ``work_dir`` with what the container mounts: src/ (a copy), out/ (its root's), wheels/ when needed.

    Raises:
        KegError: ``work_dir`` lies beneath a directory the container's root cannot search.
    """
    os.makedirs(work_dir, exist_ok=True)
    os.chmod(work_dir, 0o711)
    try:
        runtime_spec.check_searchable(os.path.join(work_dir, "src"))
    except runtime_spec.SpecError as err:
        raise KegError(f"the build's scratch directory cannot be mounted into its container: {err}") from err
    _copy_source(source_dir, os.path.join(work_dir, "src"))
    _make_out(os.path.join(work_dir, "out"), runtime.id_base)
    if requirements is not None:
        staged = stage_wheels(keg, [n for n, _ in requirements], os.path.join(work_dir, "wheels"))
        _step(log, f"Staged {staged} wheel{'s' if staged != 1 else ''} from {PYPI_ROOT} at /wheels")


def _check_exit(actual, pump, memory: int) -> None:
    """Raises BuildFailed unless the build container exited with 0."""
    if actual.oom or actual.reason == "oom":
        raise BuildFailed(f"the build ran out of memory (its limit is {memory >> 20} MiB)")
    if actual.exit_code != 0:
        said = pump.error_line()
        code = actual.exit_code if actual.exit_code is not None else "unknown"
        raise BuildFailed(f"the build failed (exit code {code})" + (f": {said}" if said else "; see its output above"))


def build(keg, runtime, app: str, source_dir: str, source_kid: str, work_dir: str, log,
          timeout: float = BUILD_TIMEOUT) -> BuildOutput:
    """Build the source checked out at ``source_dir`` into the image ``/oci-images/<app>/<source_kid>``.

    Args:
        keg: a ``RemoteKeg`` or ``keg.Store``: base images, ``/pkgs/pypi``, and where the image goes.
        runtime: a ``mayor.runc_runtime.RuncRuntime`` to run the build container.
        app: the app's name; source_kid: the KID of the pushed source (the image's tag).
        source_dir: the pushed tree; it is copied, never changed.
        work_dir: an empty (or not yet existing) scratch directory for this build, removed by the caller
            afterwards. Every directory above it must be searchable by others (o+x).
        log: called with the build's output (bytes) as it comes, at least every half second.
        timeout: seconds the build container may run before it is stopped.

    Returns:
        The :class:`BuildOutput`.

    Raises:
        BuildFailed: the message tells the pushing user what went wrong and what to do.
        KegError: the keg or the runtime failed (not the build's fault).
    """
    _check_app(app, source_kid)
    kind, settings = detect_kind(source_dir)
    _step(log, {"python": "Python app detected", "static": "Static site detected",
                "script": "keg.build script detected"}[kind])
    base = read_base(keg, base_reference(settings))
    _step(log, f"Building on {base.reference} ({base.kid})")
    processes = kinds.source_processes(source_dir)
    if kind != "script" and processes is None:
        processes = kinds.default_processes(kind, source_dir)
    if processes == {}:
        raise BuildFailed("the Procfile names no process types: add a line like `web: python3 app.py`")
    with_wheels = _reads_wheels(kind, source_dir)
    requirements = kinds.parse_requirements(source_dir) if with_wheels else []
    check_requirements(keg, requirements)

    _prepare_mounts(keg, runtime, source_dir, work_dir, requirements if with_wheels else None, log)
    spec = {"image": base.kid, "args": ["/bin/sh", "-c", kinds.build_script(kind, source_dir)],
            "env": {"OUT": "/out", "SRC": "/src", "HOME": "/tmp", "LANG": "C.UTF-8", "PATH": BUILD_PATH,
                    "KEG_APP": app, "KEG_SOURCE": source_kid, "PIP_NO_INPUT": "1",
                    "PIP_ROOT_USER_ACTION": "ignore"},
            "cwd": "/", "user": "0", "resources": _limits(runtime), "restart": "never", "network": "none",
            "mounts": _mounts(work_dir, with_wheels)}
    started = time.monotonic()
    actual, pump = run_container(runtime, _container_name(app, source_kid), spec, timeout, log)
    _check_exit(actual, pump, spec["resources"]["memory"])
    _step(log, f"Build finished in {time.monotonic() - started:.1f} s")

    app_dir = _output_root(os.path.join(work_dir, "out"))
    if processes is None:
        processes = _output_processes(kind, source_dir, app_dir)
    if not processes:
        raise BuildFailed("the Procfile names no process types: add a line like `web: python3 app.py`")
    _step(log, "Process types: " + ", ".join(f"{t} ({c})" for t, c in processes.items()))
    layer = layer_stream(_walk_output(app_dir, log), int(time.time()))
    image_path, image_kid = write_image(keg, app, source_kid, base, layer, kind, processes)
    _step(log, f"Image {image_path} ({image_kid}), {layer.size / 1e6:.1f} MB added to the base")
    return BuildOutput(kind, image_kid, image_path + "/", processes, base.kid)


__all__ = ["BuildFailed", "BuildOutput", "build", "detect_kind", "inputs", "read_base", "layer_stream",
           "write_image", "stage_wheels", "check_requirements"]
