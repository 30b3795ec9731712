"""The Mayor's real container runtime: each process an OCI container run by runc, under a shim (DESIGN §5).

One container per process name, by construction: the container id is the
machine's tag and the process name (``m1.web``) and its bundle is
``containers/<name>``, so a second start of a name fails until the first
container was removed, and runc refuses a second container of the same id.
Everything the runtime knows lives in files under ``data_dir``, so a new
``RuncRuntime`` after a crash of the Mayor (SIGKILL included) re-adopts what
is running::

    data_dir/                   mode 0711: runc enters it as the unprivileged container root
      events                    FIFO: shims write a byte on an exit or a health change; wait() polls it
      images/<image KID>.json   resolved images (manifest digest, config, layers), for starts without the master
      layers/sha256/<hex>/      unpacked layers (mayor.layers.LayerCache), owned by the shifted ids
      runc/                     runc's state directory (--root), mode 0700
      logs/<name>/<offset>.log  stdout+stderr of every incarnation of a name; <offset> is the byte offset of
                                the file's first byte in everything the name wrote, so totals survive rotation
      containers/<name>/        the bundle of a name's container:
        meta.json               name, container id, spec KID, process KID, incarnation, image (the runtime)
        shim.json               what the shim needs (the runtime)
        config.json             the runc configuration; rootfs/ (overlayfs), upper/, work/
        shim.pid                "<pid> <start time>" of the supervising shim (the shim)
        running.json            {pid, pid_start, pidns, started} of the container's init once it runs (the shim)
        health.json             {status, failures, checked, output} (the shim)
        exit.json               {exit_code, signal, exited, oom, reason} once it exited (the shim, or the
                                runtime when the shim died: exit_code null, reason "supervisor lost")
        stop-requested          written by stop(): {at, term_at, kill_at}; the exit's reason is "stopped"
        shim.log, runc.log      the shim's own complaints and runc's JSON log

The supervising shim (``mayor.shim``) is started in a session of its own and
survives the Mayor. To keep "spec written → running" close to a bare
``runc run --detach``, one spare shim is always waiting, already started:
``start`` hands it the bundle, and starts the next spare once it answered.

Times in ``Actual`` are on ``clock``: the shims record wall-clock times,
shifted by the difference between ``clock`` and ``time.time`` when the
runtime was made.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import kid as kidlib
from keg.errors import KegError, NotFound
from keg.fsio import read_ready
from keg.oci import INDEX_TYPES, MANIFEST_TYPES, ROOT as IMAGES_ROOT, machine_platform, parse_json_object
from mayor import layers as layerlib, rootfs, runtime_spec
from mayor.layers import LayerCache, LayerError
from mayor.plan import Actual
from mayor.runc import DEFAULT_INIT, Runc, RuncError, check_init, check_runc
from mayor.runtime import ExecHandle, Runtime
from mayor.shim import kill_inside, log_files, read_json, start_time, write_json

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
LOG_FILE_BYTES = 8 << 20   # a log file is rotated past this size
LOG_FILES = 2              # files kept per process name
START_TIMEOUT = 90.0       # seconds for a shim to answer (runc itself has 60)
KILL_WAIT = 10.0           # seconds for a container to die after SIGKILL
EXEC_KILL_WAIT = 5.0       # seconds for runc exec to end once its command was killed
MAX_IMAGE_DEPTH = 8        # directory levels searched below /oci-images
MAX_INDEX_DEPTH = 4
SHIM_LOST = "supervisor lost"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Layer media types LayerCache knows under another name.
MEDIA_ALIASES = {
    "application/vnd.docker.image.rootfs.diff.tar": layerlib.TAR,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": layerlib.TAR_GZIP,
}


class ContainerError(KegError):
    """A container could not be started, stopped or removed; the message says why."""


class ImageError(ContainerError):
    """The image of a process is not in the keg, not readable, or damaged."""


# ---------------------------------------------------------------------------
# helpers


def check_name(name) -> str:
    """A process name the runtime accepts (it names a directory, a container and a cgroup).

    Raises:
        ContainerError: saying what a name may be.
    """
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ContainerError(f"process name {name!r} is not valid: use 1 to 63 lower-case letters, digits, '_', "
                             "'.' and '-', starting with a letter or digit")
    return name


def machine_capacity() -> dict:
    """This machine's {cpus, memory}, as the Mayor registers them in ``machine.json``."""
    return {"cpus": os.cpu_count() or 1, "memory": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest_hex(digest, where: str) -> str:
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ImageError(f"{where}: digest {digest!r} is not sha256:<64 hex digits>")
    return digest[len("sha256:"):]


def _wait_fd(fd: int, timeout: float) -> bool:
    """Whether ``fd`` became readable within ``timeout`` seconds."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _wait_exit(pid: int, pid_start, timeout: float) -> bool:
    """Wait until process ``pid`` (if it still is the one started at ``pid_start``) is gone; True if it is."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if start_time(pid) != pid_start:
            return True  # gone already (a zombie, or the pid names another process now)
        return _wait_fd(fd, timeout)
    finally:
        os.close(fd)


def _alive(pid, pid_start) -> bool:
    return pid is not None and pid_start is not None and start_time(pid) == pid_start


def _read_shim_pid(bundle: str) -> tuple:
    try:
        with open(os.path.join(bundle, "shim.pid"), encoding="ascii") as f:
            pid, start = f.read().split()
        return int(pid), int(start)
    except (FileNotFoundError, ValueError):
        return None, None


# ---------------------------------------------------------------------------
# exec


class RuncExec(ExecHandle):
    """``runc exec`` of a command in a running container, output (stdout and stderr merged) read as it comes.

    runc copies a non-detached process's stdout and stderr through a pipe each,
    so the order of lines between the two streams is not guaranteed (within
    one stream it is). Container logs have no such limit: there runc hands our
    one pipe to the container.
    """

    def __init__(self, runc_argv: list, container: str, args: list, timeout: float, pid_file: str, namespace):
        self.pid_file, self.namespace = pid_file, namespace
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.timed_out = False
        self.proc = subprocess.Popen(
            [*runc_argv, "exec", "--pid-file", pid_file, container, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        os.set_blocking(self.proc.stdout.fileno(), False)

    def _read(self) -> bytes:
        if self.proc.stdout.closed:
            return b""
        data, ended = read_ready(self.proc.stdout.fileno())
        if ended:
            self.proc.stdout.close()
        return data

    def poll(self) -> tuple:
        if self.proc.returncode is None and not self.timed_out and time.monotonic() >= self.deadline:
            self.timed_out = True
            self.kill()
        code = self.proc.poll()
        out = self._read()
        if code is None:
            return out, None
        if code < 0:
            code = 128 - code  # runc exec itself was killed (the timeout): report it as a shell would
        out += self._read()
        if self.timed_out:
            out += f"\nkeg exec: killed after the timeout of {self.timeout:g} s\n".encode()
        if not self.proc.stdout.closed:
            self.proc.stdout.close()  # a background process may hold the pipe; the command is over
        try:
            os.unlink(self.pid_file)
        except FileNotFoundError:
            pass
        return out, code

    def kill(self) -> None:
        """SIGKILL the command in the container; runc exec reaps it and ends with 137.

        Killing runc exec first would orphan the command: its zombie, reparented
        outside the container, can hold up the container's end until the host's
        init reaps it. runc exec itself is killed only when the command is not
        known (not started yet) or runc does not end within ``EXEC_KILL_WAIT``.
        """
        if self.proc.returncode is not None:
            return
        if not kill_inside(self.pid_file, self.namespace):
            self.proc.kill()
            return
        try:
            self.proc.wait(EXEC_KILL_WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------------------
# the runtime


class RuncRuntime(Runtime):
    """Processes as runc containers, each supervised by a shim; state in files under ``data_dir``.

    Args:
        keg: a ``RemoteKeg`` or ``Store`` holding ``/oci-images``.
        data_dir: the runtime's directory (created; it and its parents must be searchable by others).
        machine: the machine's name; part of every container id.
        runc: the runc executable.
        id_base: first host uid/gid of the containers' user namespace range.
        capacity: the machine's {cpus, memory}, to refuse specs asking for more (default: this machine's,
            as ``machine_capacity()`` says).
        cgroup_parent: containers' cgroups are ``/<cgroup_parent>/<container id>``.
        clock: the clock of ``Actual.started``/``exited``.
        log_file_bytes, log_files: log rotation: size of one file, files kept per name.
        init: the init containers run under (see ``runtime_spec.build_config``): a command on PATH or a
            path, tini-static by default; None runs the process itself as PID 1.

    Raises:
        RuncError: runc is missing or lacks the CVE-2024-21626 fix, or the init is missing or unusable.
        SpecError: ``data_dir`` lies beneath a directory others cannot search.
        ContainerError: a bad machine name or cgroup parent.
    """

    def __init__(self, keg, data_dir: str, machine: str, runc: str = "runc", id_base: int = runtime_spec.ID_BASE,
                 capacity: dict | None = None, cgroup_parent: str = "keg", clock=time.time, *,
                 log_file_bytes: int = LOG_FILE_BYTES, log_files: int = LOG_FILES, init: str | None = DEFAULT_INIT):
        self.version = check_runc(runc)
        self.init = check_init(init)
        self.runc_path = shutil.which(runc)
        tag = re.sub(r"[^A-Za-z0-9_.-]", "_", str(machine))[:64].strip(".") or "machine"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", cgroup_parent or "") or ".." in cgroup_parent:
            raise ContainerError(f"cgroup parent {cgroup_parent!r} must be a relative cgroup path such as 'keg'")
        self.keg, self.machine, self.prefix = keg, machine, tag + "."
        capacity = machine_capacity() if capacity is None else capacity
        self.id_base, self.capacity, self.cgroup_parent, self.clock = id_base, capacity, cgroup_parent, clock
        self.log_file_bytes, self.log_files = log_file_bytes, log_files
        self.data_dir = os.path.abspath(data_dir)
        self.containers = os.path.join(self.data_dir, "containers")
        self.images = os.path.join(self.data_dir, "images")
        self.logs = os.path.join(self.data_dir, "logs")
        for d in (self.data_dir, self.containers, self.images, self.logs):
            os.makedirs(d, mode=0o711, exist_ok=True)
        os.chmod(self.containers, 0o711)
        runtime_spec.check_searchable(os.path.join(self.containers, "rootfs"))
        self.layers = LayerCache(os.path.join(self.data_dir, "layers"), uid_shift=id_base)
        self.runc = Runc(os.path.join(self.data_dir, "runc"), self.runc_path)
        self._offset = 0.0 if clock is time.time else clock() - time.time()
        self._events = os.path.join(self.data_dir, "events")
        if not os.path.exists(self._events):
            os.mkfifo(self._events, 0o600)
        self._events_r = os.open(self._events, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._events_w = os.open(self._events, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # no EOF without shims
        self._children: dict = {}   # pid -> Popen of shims this object started, reaped when they exit
        self._pidfds: dict = {}     # shim pid -> pidfd, for wait()
        self._seen: dict = {}       # name -> (state, health) as the last actual() reported
        self._spare = None
        self._spare = self._new_shim()

    # ------------------------------------------------------------ naming

    def container_id(self, name: str) -> str:
        """The runc container id of a process name on this machine."""
        return self.prefix + check_name(name)

    def _name_of(self, container: str) -> str:
        if not isinstance(container, str) or not container.startswith(self.prefix):
            raise ContainerError(f"{container!r} is not a container of machine {self.machine}")
        return check_name(container[len(self.prefix):])

    def _bundle(self, name: str) -> str:
        return os.path.join(self.containers, name)

    def _to_clock(self, t):
        return None if t is None else t + self._offset

    # ------------------------------------------------------------ shims

    def _new_shim(self) -> subprocess.Popen:
        """A shim process waiting for its bundle on stdin; detached in a session of its own."""
        env = {"PATH": os.environ.get("PATH", runtime_spec.DEFAULT_PATH), "PYTHONPATH": REPO_ROOT,
               "LC_ALL": "C.UTF-8"}
        proc = subprocess.Popen([sys.executable, "-S", "-m", "mayor.shim"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/", env=env,
                                start_new_session=True)
        self._children[proc.pid] = proc
        return proc

    def _reap(self) -> None:
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]

    def _launch(self, name: str, bundle: str) -> dict:
        """Hand the bundle to the spare shim (a new one if it died); its answer."""
        shim, self._spare = self._spare, None
        command = (json.dumps({"bundle": bundle}) + "\n").encode()
        try:
            shim.stdin.write(command)
            shim.stdin.close()
        except (BrokenPipeError, ValueError, AttributeError):  # no spare, or it died: start one now
            shim = self._new_shim()
            shim.stdin.write(command)
            shim.stdin.close()
        try:
            reply = self._read_answer(shim)
        finally:
            # Started after the answer, not while runc runs: on two cores a Python starting up slows runc.
            self._spare = self._new_shim()
        if reply is None:
            shim.kill()
            shim.wait()
            raise ContainerError(f"the supervisor of {name} ended without starting it; see {bundle}/shim.log")
        if not reply.get("ok"):
            shim.wait(START_TIMEOUT)  # it cleaned up runc; let it go before the bundle is removed
            raise ContainerError(f"cannot start {name}: {reply.get('error')}")
        return reply

    @staticmethod
    def _read_answer(shim: subprocess.Popen):
        fd = shim.stdout.fileno()
        data = b""
        deadline = time.monotonic() + START_TIMEOUT
        while b"\n" not in data:
            if not _wait_fd(fd, deadline - time.monotonic()):
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
        shim.stdout.close()
        try:
            return json.loads(data.split(b"\n", 1)[0]) if b"\n" in data else None
        except ValueError:
            return None

    def close(self) -> None:
        """Let go of this object's spare shim and descriptors. Containers and their shims keep running."""
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.stdin.close()  # end of input: an unused spare exits
            spare.stdout.close()
            spare.wait(10)
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds.clear()
        for fd in (self._events_r, self._events_w):
            if fd >= 0:
                os.close(fd)
        self._events_r = self._events_w = -1
        self._reap()

    # ------------------------------------------------------------ images

    def _cached_images(self, short: kidlib.Kid) -> list:
        return sorted(n[:-5] for n in os.listdir(self.images) if n.startswith(short) and n.endswith(".json"))

    def image(self, ref: str) -> dict:
        """The resolved image ``ref`` (a full or short image KID): {kid, path, manifest, config, layers}.

        Read from the keg the first time and kept under ``images/``, so that the
        Mayor can start the image again while the master is unreachable.

        Raises:
            SpecError: ``ref`` is not a KID.
            ImageError: the KID names no image in /oci-images (or several), or the image is damaged.
        """
        try:
            short = kidlib.parse(ref)
        except kidlib.KidError as err:
            raise runtime_spec.SpecError(f"image must be the KID of an image in {IMAGES_ROOT}: {err}") from err
        cached = self._cached_images(short)
        if short.is_full and cached:
            found = read_json(os.path.join(self.images, cached[0] + ".json"))
            if found is not None:
                return found
        try:
            image = self._resolve(short)
        except ImageError:
            raise
        except KegError as err:
            if len(cached) == 1 and (found := read_json(os.path.join(self.images, cached[0] + ".json"))):
                return found  # the master is away: the image read before is the same image
            raise ImageError(f"cannot read image {ref} from the keg ({err}) and it was not read here before") from err
        write_json(os.path.join(self.images, image["kid"] + ".json"), image)
        return image

    def _tag_dirs(self, rev) -> list:
        """Every image tag directory under /oci-images (one holding index.json)."""
        try:
            level = [e for e in self.keg.list(IMAGES_ROOT, rev) if e.kind == "tree"]
        except NotFound:
            return []
        found = []
        for _ in range(MAX_IMAGE_DEPTH):
            below = []
            for entry in level:
                children = self.keg.list(entry.path, rev)
                if any(c.name == "index.json" and c.kind == "file" for c in children):
                    found.append(entry)
                else:
                    below += [c for c in children if c.kind == "tree"]
            if not below:
                break
            level = below
        return found

    def _resolve(self, short: kidlib.Kid) -> dict:
        rev = self.keg.revision().number
        matches = {}
        for entry in self._tag_dirs(rev):
            if entry.kid.startswith(short):
                matches.setdefault(entry.kid, entry.path)
        if not matches:
            raise ImageError(f"image {short} is not in {IMAGES_ROOT}: no image tag directory has that KID; "
                             "import the image with `keg image import`, and give the KID `keg ls` shows for "
                             f"{IMAGES_ROOT}/<name>/<tag>")
        if len(matches) > 1:
            raise ImageError(f"image {short} is ambiguous: it matches {', '.join(sorted(matches))} "
                             f"({', '.join(sorted(matches.values()))}); give more hex digits")
        full, tag_dir = next(iter(matches.items()))
        return self._read_image(full, tag_dir, rev)

    def _blob(self, tag_dir: str, desc, rev, where: str) -> bytes:
        if not isinstance(desc, dict):
            raise ImageError(f"{where}: a descriptor must be a JSON object")
        hex_ = _digest_hex(desc.get("digest"), where)
        try:
            data = self.keg.read(f"{tag_dir}/blobs/sha256/{hex_}", rev)
        except NotFound as err:
            raise ImageError(f"{where}: blob {desc['digest']} is missing from {tag_dir}; import it again") from err
        if _sha256_hex(data) != hex_:
            raise ImageError(f"{where}: blob {desc['digest']} does not match its digest; the image is damaged")
        return data

    @staticmethod
    def _json(data: bytes, where: str) -> dict:
        return parse_json_object(data, where, ImageError)

    @staticmethod
    def _choose(manifests, where: str) -> dict:
        """The manifest for this machine among an index's (the only one, or the one for this platform)."""
        if not isinstance(manifests, list) or not manifests:
            raise ImageError(f"{where} lists no manifests")
        if len(manifests) == 1:
            return manifests[0]
        arch, variant = machine_platform()
        for desc in manifests:
            plat = desc.get("platform") or {} if isinstance(desc, dict) else {}
            if plat.get("architecture") == arch and plat.get("os", "linux") == "linux" and (
                    variant is None or plat.get("variant") in (None, variant)):
                return desc
        raise ImageError(f"{where} has no manifest for linux/{arch}")

    def _read_image(self, full: str, tag_dir: str, rev) -> dict:
        where = f"{tag_dir}/index.json"
        desc = self._choose(self._json(self.keg.read(where, rev), where).get("manifests"), where)
        for _ in range(MAX_INDEX_DEPTH):
            if not isinstance(desc, dict) or desc.get("mediaType") not in INDEX_TYPES:
                break
            where = f"{tag_dir}: index {desc.get('digest')}"
            desc = self._choose(self._json(self._blob(tag_dir, desc, rev, where), where).get("manifests"), where)
        if not isinstance(desc, dict) or desc.get("mediaType") not in MANIFEST_TYPES:
            raise ImageError(f"{where}: no image manifest (media type {desc.get('mediaType')!r})")
        where = f"{tag_dir}: manifest {desc.get('digest')}"
        manifest = self._json(self._blob(tag_dir, desc, rev, where), where)
        config_desc, layer_descs = manifest.get("config"), manifest.get("layers")
        if not isinstance(layer_descs, list) or not layer_descs:
            raise ImageError(f"{where} has no layers")
        config = self._json(self._blob(tag_dir, config_desc, rev, f"{where} > config"), f"{where} > config")
        layer_list = []
        for i, d in enumerate(layer_descs):
            if not isinstance(d, dict):
                raise ImageError(f"{where} > layers[{i}]: a descriptor must be a JSON object")
            _digest_hex(d.get("digest"), f"{where} > layers[{i}]")
            layer_list.append({"digest": d["digest"], "mediaType": d.get("mediaType"), "size": d.get("size")})
        return {"kid": full, "path": tag_dir, "manifest": desc["digest"], "config": config, "layers": layer_list}

    def _layer_dirs(self, image: dict) -> list:
        """The unpacked layers of an image, unpacking (safely) those not unpacked yet."""
        dirs = []
        for layer in image["layers"]:
            digest = layer["digest"]
            media = MEDIA_ALIASES.get(layer["mediaType"], layer["mediaType"])
            path = f"{image['path']}/blobs/sha256/{_digest_hex(digest, image['path'])}"
            try:
                dirs.append(self.layers.ensure(digest, lambda p=path: self.keg.open(p), media))
            except LayerError as err:
                raise LayerError(f"image {image['kid']} ({image['path']}), layer {digest}: {err}") from err
            except KegError as err:
                raise ImageError(f"image {image['kid']}: cannot fetch layer {digest} from {path}: {err}") from err
        return dirs

    # ------------------------------------------------------------ start

    def start(self, name, spec_kid, spec, process_kid=None, incarnation=0) -> str:
        """Create and start the container of process ``name``; returns its container id once it runs.

        Raises:
            ContainerError: a bad name, a container of that name exists, or runc failed.
            SpecError: the spec cannot run as asked.
            ImageError, LayerError: the image is unknown, unreadable or refused.
        Nothing is left behind on failure (unpacked layers stay cached).
        """
        cid = self.container_id(name)
        spec = runtime_spec.validate_spec(spec, self.capacity)
        if not spec.get("image"):
            raise runtime_spec.SpecError("the spec names no image; give the KID of an image in /oci-images")
        bundle = self._bundle(name)
        if os.path.lexists(bundle):
            raise ContainerError(f"process {name} already has a container ({cid}); stop and remove it first")
        image = self.image(spec["image"])
        layer_dirs = self._layer_dirs(image)
        try:
            os.mkdir(bundle, 0o711)  # atomic: of two starts of one name, one gets here
        except FileExistsError as err:
            raise ContainerError(f"process {name} already has a container ({cid}); stop and remove it first") from err
        try:
            write_json(os.path.join(bundle, "meta.json"),
                       {"name": name, "container": cid, "spec_kid": spec_kid, "kid": process_kid,
                        "incarnation": incarnation, "image": image["kid"], "created": time.time()})
            target = os.path.join(bundle, "rootfs")
            rootfs.mount_rootfs(layer_dirs, os.path.join(bundle, "upper"), os.path.join(bundle, "work"), target)
            config = runtime_spec.build_config(image["config"], spec, target, hostname=name,
                                               cgroups_path=f"/{self.cgroup_parent}/{cid}", id_base=self.id_base,
                                               capacity=self.capacity, init=self.init)
            runtime_spec.write_config(bundle, config)
            write_json(os.path.join(bundle, "shim.json"),
                       {"id": cid, "name": name, "runc": self.runc_path, "root": self.runc.root,
                        "logs": os.path.join(self.logs, name), "log_file_bytes": self.log_file_bytes,
                        "log_files": self.log_files, "events": self._events,
                        "health": spec["health"] or runtime_spec.ready_check(spec["port"]),
                        "stop_grace": spec["stop_grace"], "stop_drain": spec["stop_drain"]})
            self._launch(name, bundle)
        except BaseException as err:
            try:
                self._discard(name)
            except (KegError, OSError) as cleanup:
                err.add_note(f"cleaning up the failed container of {name} failed too: {cleanup}")
            raise
        return cid

    def _discard(self, name: str) -> None:
        """Remove whatever a failed start made: the runc container, the mount, the bundle."""
        bundle = self._bundle(name)
        self._kill_shim(bundle)
        self.runc.delete(self.container_id(name), force=True)
        rootfs.unmount_rootfs(os.path.join(bundle, "rootfs"))
        shutil.rmtree(bundle)

    # ------------------------------------------------------------ state

    def _observe(self, name: str) -> Actual:
        bundle = self._bundle(name)
        meta = read_json(os.path.join(bundle, "meta.json")) or {}
        base = {"name": name, "container": self.prefix + name, "spec_kid": meta.get("spec_kid") or "",
                "kid": meta.get("kid"), "incarnation": meta.get("incarnation") or 0}
        running = read_json(os.path.join(bundle, "running.json"))
        if running is None:
            return Actual(state="created", **base)
        health = None
        if os.path.exists(os.path.join(bundle, "health.json")):
            health = (read_json(os.path.join(bundle, "health.json")) or {}).get("status")
        base.update(pid=running.get("pid"), started=self._to_clock(running.get("started")), health=health)
        exited = read_json(os.path.join(bundle, "exit.json"))
        if exited is None:
            if _alive(*_read_shim_pid(bundle)):
                asked = read_json(os.path.join(bundle, "stop-requested"))
                until = asked.get("kill_at") if isinstance(asked, dict) else None
                if isinstance(until, (int, float)):
                    base["stopping_until"] = self._to_clock(until + KILL_WAIT)
                return Actual(state="running", **base)
            exited = read_json(os.path.join(bundle, "exit.json"))  # it may have finished just now
        if exited is None:
            if _alive(running.get("pid"), running.get("pid_start")):
                return Actual(state="unknown", reason=SHIM_LOST, **base)
            exited = {"exit_code": None, "signal": None, "exited": time.time(), "oom": False, "reason": SHIM_LOST}
            write_json(os.path.join(bundle, "exit.json"), exited)  # the time it was noticed, kept for back-off
        return Actual(state="exited", exit_code=exited.get("exit_code"), exited=self._to_clock(exited.get("exited")),
                      oom=bool(exited.get("oom")), reason=exited.get("reason"), **base)

    def _names(self) -> list:
        return sorted(n for n in os.listdir(self.containers) if NAME_RE.match(n))

    def actual(self) -> dict:
        self._reap()
        found = {name: self._observe(name) for name in self._names()}
        self._seen = {name: (a.state, a.health) for name, a in found.items()}
        return found

    def wait(self, timeout: float) -> bool:
        """Block until a container exits or its health changes, or ``timeout`` passes.

        Event-driven: a pidfd per live shim (a shim exits when its container
        does) and the FIFO the shims write to on a health change. Returns at
        once when something changed since the last ``actual()``.
        """
        self._reap()
        self._drain_events()  # what changed before this point shows in the comparison below
        now = {}
        for name in self._names():
            a = self._observe(name)
            now[name] = (a.state, a.health)
            pid, start = _read_shim_pid(self._bundle(name))
            if a.state in ("running", "created") and pid is not None and pid not in self._pidfds:
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
                if start_time(pid) == start:
                    self._pidfds[pid] = fd
                else:
                    os.close(fd)
        if now != self._seen:
            return True
        poller = select.poll()
        poller.register(self._events_r, select.POLLIN)
        for fd in self._pidfds.values():
            poller.register(fd, select.POLLIN)
        ready = poller.poll(max(0, int(timeout * 1000)))
        for fd, _ in ready:
            if fd == self._events_r:
                self._drain_events()
            else:
                pid = next(p for p, f in self._pidfds.items() if f == fd)
                os.close(self._pidfds.pop(pid))
        self._reap()
        return bool(ready)

    def wake(self) -> None:
        """Make a ``wait`` in progress return now (the Mayor's watch thread saw a table change)."""
        try:
            os.write(self._events_w, b"w")
        except (BlockingIOError, OSError):
            pass  # the FIFO is full (a wake is pending anyway) or the runtime is closed

    def _drain_events(self) -> None:
        try:
            while os.read(self._events_r, 4096):
                pass
        except BlockingIOError:
            pass

    # ------------------------------------------------------------ stop and remove

    def _kill_shim(self, bundle: str) -> None:
        pid, start = _read_shim_pid(bundle)
        if _alive(pid, start):
            os.kill(pid, signal.SIGKILL)
            _wait_exit(pid, start, KILL_WAIT)
        self._reap()

    def _wait_gone(self, bundle: str, timeout: float) -> bool:
        """Wait until the container of ``bundle`` exited (its shim gone, or its init if the shim is lost)."""
        pid, start = _read_shim_pid(bundle)
        if _alive(pid, start):
            done = _wait_exit(pid, start, timeout)
            self._reap()
            return done
        running = read_json(os.path.join(bundle, "running.json")) or {}
        return _wait_exit(running.get("pid"), running.get("pid_start"), timeout) if running.get("pid") else True

    def stop(self, container, grace=None, wait=True, drain=False) -> None:
        """SIGTERM the container's init, SIGKILL after ``grace`` seconds; returns once it exited.

        ``grace`` None means the spec's ``stop_grace`` (10 s unless it says otherwise). With ``wait``
        False a running container with its shim is only asked: the shim sends the SIGKILL when the
        grace is over, ``actual()`` says ``stopping_until``, and ``wait()`` returns on its exit.
        ``drain`` (with ``wait`` False) puts the spec's ``stop_drain`` before the SIGTERM: the process
        keeps serving what routers still send it while they learn it is gone.

        Raises:
            ContainerError: it would not die, even of SIGKILL.
        """
        name = self._name_of(container)
        bundle = self._bundle(name)
        if not os.path.isdir(bundle):
            return
        conf = read_json(os.path.join(bundle, "shim.json")) or {}
        if grace is None:
            grace = conf.get("stop_grace", runtime_spec.STOP_GRACE)
        have = self._observe(name)
        if have.state == "exited":
            return
        shim_pid, shim_start = _read_shim_pid(bundle)
        asking = not wait and have.state == "running" and _alive(shim_pid, shim_start)
        now = time.time()
        term_at = now + (conf.get("stop_drain", 0.0) if asking and drain else 0.0)
        asked = read_json(os.path.join(bundle, "stop-requested"))
        if not (isinstance(asked, dict) and asked.get("kill_at", 0) <= term_at + grace):
            write_json(os.path.join(bundle, "stop-requested"), {"at": now, "term_at": term_at, "kill_at": term_at + grace})
        if have.state == "created":
            self._kill_shim(bundle)
            self.runc.delete(container, force=True)
            return
        if asking:
            if term_at <= now:
                try:
                    self.runc.kill(container, "TERM")
                except RuncError:
                    pass  # it exited meanwhile: the shim reports it
            os.kill(shim_pid, signal.SIGUSR1)  # the shim reads stop-requested: SIGTERM at term_at, SIGKILL at kill_at
            return
        for signo, wait in (("TERM", grace), ("KILL", KILL_WAIT)):
            try:
                self.runc.kill(container, signo)
            except RuncError:
                pass  # it exited meanwhile ("container not running"); the wait below tells
            if self._wait_gone(bundle, wait):
                self._observe(name)  # a lost shim's exit is recorded now
                return
        raise ContainerError(f"{container} did not exit within {KILL_WAIT:g} s of SIGKILL")

    def remove(self, container) -> None:
        """Delete the container (``runc delete``), unmount its root filesystem and remove its bundle.

        A container still running is killed first. Its logs stay (they belong to the process name).
        """
        name = self._name_of(container)
        bundle = self._bundle(name)
        if os.path.isdir(bundle):
            if self._observe(name).state in ("running", "unknown", "created"):
                self.stop(container, grace=0)
            self._kill_shim(bundle)
        self.runc.delete(container, force=True)
        rootfs.unmount_rootfs(os.path.join(bundle, "rootfs"))
        if os.path.isdir(bundle):
            shutil.rmtree(bundle)
        self._seen.pop(name, None)

    # ------------------------------------------------------------ exec and logs

    def exec(self, name, args, timeout=60.0) -> ExecHandle:
        """Start ``args`` in the running container of ``name`` (``runc exec``, as its init's user).

        Raises:
            NotFound: no running container for ``name``.
            SpecError: ``args`` is not a non-empty list of strings.
        """
        check_name(name)
        if not isinstance(args, list) or not args or not all(isinstance(a, str) and "\0" not in a for a in args):
            raise runtime_spec.SpecError(f"exec needs a non-empty list of strings, not {args!r}")
        bundle = self._bundle(name)
        if not os.path.isdir(bundle) or self._observe(name).state != "running":
            raise NotFound(f"process {name} is not running here")
        namespace = (read_json(os.path.join(bundle, "running.json")) or {}).get("pidns")
        pid_file = os.path.join(bundle, f"exec-{os.getpid()}-{time.monotonic_ns()}.pid")
        return RuncExec([self.runc_path, "--root", self.runc.root], self.container_id(name), args, timeout, pid_file,
                        namespace)

    def log_tail(self, name, most) -> tuple:
        """``(total, tail)``: bytes ``name`` ever wrote here (all incarnations) and the last ``most`` of them."""
        files = log_files(os.path.join(self.logs, check_name(name)))
        if not files:
            return 0, b""
        total, chunks, need = None, [], max(0, most)
        for offset, path in reversed(files):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # rotated away just now: older than what we have
            try:
                size = os.fstat(fd).st_size
                if total is None:
                    total = offset + size
                take = min(need, size)
                if take:
                    chunks.append(os.pread(fd, take, size - take))
                    need -= take
            finally:
                os.close(fd)
            if need == 0:
                break
        return total or 0, b"".join(reversed(chunks))

