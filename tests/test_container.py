"""The Mayor's container mechanics: safe layer unpacking, overlayfs root filesystems, the runc
configuration and the runc wrapper, with real runc and a busybox image built here."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import tempfile
import time
import uuid

import pytest
import zstandard

from busybox import busybox_layer, digest_of, make_tar, remove_cgroup_parent, snapshot, tar_entry, why_no_containers
from mayor import layers, rootfs, runtime_spec
from mayor.layers import LayerCache, LayerError, unpack_layer
from mayor.runc import Runc, RuncError, check_runc, check_runc_version, parse_runc_version
from mayor.runtime_spec import SpecError, build_config, parse_memory, ready_check, validate_spec, write_config

ID_BASE = runtime_spec.ID_BASE


@pytest.fixture
def containers_available():
    """Fail, never skip, when runc, busybox or root are missing: ./install.sh provides them."""
    why = why_no_containers()
    if why is not None:
        pytest.fail(why)


@pytest.fixture
def root_available():
    if os.geteuid() != 0:
        pytest.fail("needs root to chown, mknod and mount overlayfs")


needs_runc = pytest.mark.usefixtures("containers_available")
needs_root = pytest.mark.usefixtures("root_available")


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture
def machine():
    """A layer cache, a runc state dir and a cgroup parent of this test's own; all removed afterwards.

    Not under tmp_path: pytest's base directory is private (0700) and the container's root,
    an unprivileged host uid, must be able to reach its root filesystem.
    """
    base = tempfile.mkdtemp(prefix="keg-mayor-test-")
    os.chmod(base, 0o711)
    try:
        m = Machine(base)
        try:
            yield m
        finally:
            m.cleanup()
    finally:
        shutil.rmtree(base)


class Machine:
    """Runs containers from the busybox image the way the Mayor will: ensure, mount, configure, run."""

    def __init__(self, base: str):
        self.base = base
        self.cache = LayerCache(os.path.join(base, "layers"), uid_shift=ID_BASE)
        self.runc = Runc(os.path.join(base, "runc"))
        self.cgroup_parent = f"keg-test-{uuid.uuid4().hex[:12]}"
        self.containers = []
        self.blob = busybox_layer()
        self.layer = self.cache.ensure(digest_of(self.blob), lambda: io.BytesIO(self.blob), layers.TAR)

    def bundle(self, spec, image_config=None, cid=None):
        """Mount a root filesystem and write config.json; returns (container id, bundle dir, config)."""
        cid = cid or f"t-{uuid.uuid4().hex[:10]}"
        bundle = os.path.join(self.base, "bundles", cid)
        target = os.path.join(bundle, "rootfs")
        self.containers.append((cid, target))
        rootfs.mount_rootfs([self.layer], os.path.join(bundle, "upper"), os.path.join(bundle, "work"), target)
        config = build_config(image_config or {}, spec, target, cgroups_path=f"{self.cgroup_parent}/{cid}")
        write_config(bundle, config)
        return cid, bundle, config

    def run(self, args, image_config=None, edit=None, **spec):
        """Run to completion; returns (exit status, stdout, stderr)."""
        cid, bundle, config = self.bundle({"args": args, **spec}, image_config)
        if edit:
            edit(config)
            write_config(bundle, config)
        out, err = os.path.join(bundle, "stdout"), os.path.join(bundle, "stderr")
        code = self.runc.run(cid, bundle, out, err, timeout=30)
        with open(out) as o, open(err) as e:
            return code, o.read(), e.read()

    def cleanup(self):
        """Delete every container, unmount every root filesystem, remove the cgroups; then report a failure."""
        errors = []
        for cid, target in self.containers:
            for step in (lambda: self.runc.delete(cid, force=True), lambda: rootfs.unmount_rootfs(target)):
                try:
                    step()
                except Exception as e:  # keep cleaning; the first failure is raised below
                    errors.append(e)
        try:
            remove_cgroup_parent(self.cgroup_parent)
        except OSError as e:
            errors.append(e)
        if errors:
            raise errors[0]


# ---------------------------------------------------------------------------
# runc version check (no runc call)


@pytest.mark.parametrize(
    "text, accepted",
    [
        ("runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\nspec: 1.0.2-dev\n", True),
        ("runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u2\n", True),
        ("runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1\nspec: 1.0.2-dev\n", False),
        ("runc version 1.0.0~rc93+ds1\ncommit: 1.0.0~rc93+ds1-5+deb11u3\n", True),
        ("runc version 1.0.0~rc93+ds1\ncommit: 1.0.0~rc93+ds1-5+deb11u2\n", False),
        ("runc version 1.1.11\ncommit: v1.1.11-0-g4bccb38c\n", False),
        ("runc version 1.1.12\ncommit: v1.1.12-0-g51d5e946\n", True),
        ("runc version 1.2.0-rc.1\ncommit: v1.2.0-rc.1\n", True),
        ("runc version 1.0.3\n", False),
        ("runc version 1.1.9\ncommit: 1.1.9-0ubuntu1~22.04.1\n", False),
    ],
)
def test_runc_version_check(text, accepted):
    if accepted:
        assert check_runc_version(text).startswith("runc ")
    else:
        with pytest.raises(RuncError, match="CVE-2024-21626"):
            check_runc_version(text)


def test_runc_version_unreadable():
    with pytest.raises(RuncError, match="cannot read a version"):
        parse_runc_version("something else entirely")


@needs_runc
def test_installed_runc_is_accepted():
    assert "runc" in check_runc()


# ---------------------------------------------------------------------------
# process specs (no runc call)


def test_parse_memory():
    assert parse_memory("64Mi") == 64 * 1024 * 1024
    assert parse_memory("1G") == 10**9
    assert parse_memory("1.5Ki") == 1536
    assert parse_memory(4096) == 4096
    for bad in ("lots", "64mb", -1, True, None, "-5Mi", float("inf"), "9" * 400):
        with pytest.raises(SpecError):
            parse_memory(bad)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"args": "echo hi"}, "args must be a list"),
        ({"args": []}, "args is empty"),
        ({"resources": {"memory": -5}}, "must not be negative"),
        ({"resources": {"memory": "64Gi"}}, "exceeds this machine"),
        ({"resources": {"memory": "1Mi"}}, "below the minimum"),
        ({"resources": {"cpu": 16}}, "exceeds this machine's 4 cpus"),
        ({"resources": {"cpu": -1}}, "positive number of cores"),
        ({"resources": {"cpu": float("nan")}}, "positive number of cores"),
        ({"resources": {"pids": 0}}, "positive integer"),
        ({"resources": {"disk": 1}}, "unknown resources"),
        ({"restart": "sometimes"}, "unknown restart policy"),
        ({"network": "bridge"}, "unknown network"),
        ({"cwd": "relative/dir"}, "is relative"),
        ({"cwd": "/proc/self/fd/7"}, "CVE-2024-21626"),
        ({"env": {"A=B": "x"}}, "not a valid variable name"),
        ({"env": ["NOVALUE"]}, "must have a string value"),
        ({"user": "a:b:c"}, "uid\\[:gid\\]"),
        ({"mounts": [{"source": "rel", "destination": "/data"}]}, "absolute host path"),
        ({"mounts": [{"source": "/srv", "destination": "/sys/kernel"}]}, "/sys"),
        ("not a dict", "must be a JSON object"),
        ({"port": 70000}, "port must be a TCP port number"),
        ({"port": "80"}, "port must be a TCP port number"),
        ({"health": {"http": {"path": "/"}}}, "health.http.port is missing"),
        ({"health": {"tcp": {}}}, "health.tcp.port is missing"),
        ({"health": {"tcp": {"port": 8080, "path": "/"}}}, "health.tcp must be an object like"),
        ({"port": 8080, "health": {"tcp": {}, "http": {}}}, "exactly one check"),
        ({"stop_drain": -1}, "stop_drain"),
        ({"stop_drain": "2s"}, "stop_drain"),
    ],
)
def test_validate_spec_refuses(spec, message):
    with pytest.raises(SpecError, match=message):
        validate_spec(spec, capacity={"cpus": 4, "memory": "8Gi"})


def test_validate_spec_normalises():
    spec = validate_spec({"args": ["x"], "resources": {"memory": "64Mi", "cpu": 1}, "name": "web"})
    assert spec["resources"] == {"cpu": 1.0, "memory": 64 * 1024 * 1024, "pids": None}
    assert (spec["restart"], spec["network"], spec["readonly_rootfs"]) == ("always", "private", False)
    assert spec["name"] == "web"
    assert validate_spec({"env": ["A=1", "B=2", "A=3"]})["env"] == {"B": "2", "A": "3"}
    checked = validate_spec({"port": 20001, "health": {"http": {"path": "/ok"}}})
    assert checked["health"]["http"] == {"port": 20001, "path": "/ok"}   # the process's own port by default
    assert validate_spec({"port": 20001, "health": {"tcp": {}}})["health"]["tcp"] == {"port": 20001}
    # No check of its own: the spec says so (None); the runtime runs ready_check, which stops at its first success.
    assert validate_spec({"port": 20001})["health"] is None
    assert ready_check(20001)["tcp"] == {"port": 20001} and ready_check(20001)["until_ready"] is True
    assert ready_check(None) is None
    # A process with a port keeps serving 2 s after it is told to go (routers learn it left), others stop at once.
    assert (checked["stop_drain"], spec["stop_drain"]) == (2.0, 0.0)
    assert validate_spec({"port": 20001, "stop_drain": 0})["stop_drain"] == 0.0


def test_the_readiness_check_is_starting_until_its_first_success_and_then_stops():
    """The runtime's check of a process with a port (the shim's ``Health`` with ``ready_check``): never
    ``unhealthy``, quick during its start period, slower after, and no more checks once ready."""
    from mayor.shim import SLOW_INTERVAL, Health

    ready = Health(ready_check(8080), started=1000.0)
    assert (ready.status, ready.next_at, ready.timeout(1000.0)) == ("starting", 1000.25, 0.25)
    assert ready.result(False, 1000.3) is False and ready.next_at == 1000.55
    assert ready.result(False, 1070.0) is False     # a minute on, still not listening: still only starting
    assert (ready.status, ready.failures, ready.next_at) == ("starting", 2, 1070.0 + SLOW_INTERVAL)
    assert ready.result(True, 1071.0) is True and ready.status == "healthy"
    assert ready.next_at is None and ready.timeout(1100.0) is None
    # A check of the user's own, with the same timings, does turn unhealthy after its start period.
    own = Health(validate_spec({"port": 8080, "health": {"tcp": {}, "interval": 0.25, "threshold": 1,
                                                          "start_period": 60}})["health"], started=1000.0)
    assert own.result(False, 1000.3) is False and own.result(False, 1070.0) is True
    assert (own.status, own.next_at) == ("unhealthy", 1070.25)


@pytest.fixture
def searchable_dir():
    """A temporary directory others may search, unlike pytest's private tmp_path (see ``build_config``)."""
    base = tempfile.mkdtemp(prefix="keg-mayor-test-")
    os.chmod(base, 0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base)


@needs_root
def test_config_from_image_and_spec(searchable_dir):
    root = os.path.join(searchable_dir, "root")
    unpack_layer(io.BytesIO(busybox_layer()), root, layers.TAR)
    image = {
        "config": {
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo from image"],
            "Env": ["PATH=/bin", "GREETING=image", "KEEP=1"],
            "WorkingDir": "/home/app",
            "User": "app",
        }
    }
    spec = {"env": {"GREETING": "spec"}, "resources": {"memory": "64Mi", "cpu": 0.5, "pids": 20}}
    config = build_config(image, spec, root)
    process = config["process"]
    assert process["args"] == ["/bin/sh", "-c", "echo from image"]
    assert process["env"] == ["PATH=/bin", "KEEP=1", "GREETING=spec", "HOME=/home/app"]
    assert process["cwd"] == "/home/app"
    # "app" exists only in the image's /etc/passwd, never on the host.
    assert process["user"] == {"uid": 1234, "gid": 2345, "additionalGids": [2345, 50]}
    assert process["noNewPrivileges"] is True
    assert "CAP_SYS_ADMIN" not in process["capabilities"]["bounding"]
    assert "CAP_NET_RAW" not in process["capabilities"]["bounding"]
    linux = config["linux"]
    assert linux["resources"]["memory"] == {"limit": 64 << 20, "swap": 64 << 20}
    assert linux["resources"]["cpu"] == {"quota": 50000, "period": 100000}
    assert linux["resources"]["pids"] == {"limit": 20}
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": ID_BASE, "size": 65536}]
    assert {"type": "network"} in linux["namespaces"]
    assert "/proc/sys" in linux["readonlyPaths"] and "/proc/kcore" in linux["maskedPaths"]

    spec_args = build_config(image, {"args": ["/bin/true"], "user": "0:0", "network": "host"}, root)
    assert spec_args["process"]["args"] == ["/bin/true"]
    assert spec_args["process"]["user"] == {"uid": 0, "gid": 0, "additionalGids": [0]}
    assert {"type": "network"} not in spec_args["linux"]["namespaces"]
    assert "memory" not in spec_args["linux"]["resources"]
    assert spec_args["process"]["env"][0] == "PATH=/bin"

    with pytest.raises(SpecError, match="not in the image's /etc/passwd"):
        build_config({}, {"args": ["x"], "user": "daemon"}, root)
    with pytest.raises(SpecError, match="outside the container's id range"):
        build_config({}, {"args": ["x"], "user": "70000"}, root)
    with pytest.raises(SpecError, match="nothing to run"):
        build_config({}, {}, root)


@needs_root
def test_private_parent_directory_is_refused(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    root = str(private / "root")
    unpack_layer(io.BytesIO(busybox_layer()), root, layers.TAR)
    with pytest.raises(SpecError, match="chmod o\\+x " + str(private)):
        build_config({}, {"args": ["/bin/true"]}, root)


@needs_root
def test_working_dir_reaching_proc_is_refused(searchable_dir):
    root = os.path.join(searchable_dir, "root")
    extra = [
        tar_entry("work", "symlink", target="/proc/self/fd/7"),
        tar_entry("up", "symlink", target="../../proc/1/cwd"),
    ]
    unpack_layer(io.BytesIO(busybox_layer(extra)), root, layers.TAR)
    for image, spec in [
        ({"config": {"WorkingDir": "/proc/self/fd/7", "Cmd": ["/bin/true"]}}, {}),
        ({"config": {"WorkingDir": "proc/self/cwd", "Cmd": ["/bin/true"]}}, {}),
        ({"config": {"Cmd": ["/bin/true"]}}, {"cwd": "/work"}),
        ({"config": {"Cmd": ["/bin/true"]}}, {"cwd": "/up"}),
        ({"config": {"Cmd": ["/bin/true"]}}, {"cwd": "/tmp/../proc/self/fd/3"}),
    ]:
        with pytest.raises(SpecError, match="CVE-2024-21626|is relative"):
            build_config(image, spec, root)


# ---------------------------------------------------------------------------
# layers


def unpack_crafted(tmp_path, entries, **kwargs):
    """Unpack a crafted tarball under tmp_path/cache; returns (error, layer dir, sandbox dir)."""
    sandbox = tmp_path / "sandbox"
    cache_root = sandbox / "cache"
    cache_root.mkdir(parents=True)
    (sandbox / "outside").mkdir()
    before = snapshot(str(sandbox))
    blob = make_tar(entries)
    cache = LayerCache(str(cache_root), **kwargs)
    error = None
    try:
        cache.ensure(digest_of(blob), lambda: io.BytesIO(blob), layers.TAR)
    except LayerError as e:
        error = e
    layer = cache.path(digest_of(blob))
    if error is not None:
        # Nothing kept, nothing written anywhere else: only the cache's empty sha256/ appeared.
        assert not os.path.exists(layer)
        assert snapshot(str(sandbox)) - before <= {"cache/sha256"}
    return error, layer, sandbox


@needs_root
@pytest.mark.parametrize(
    "entries, culprit, reason",
    [
        ([tar_entry("../evil", data=b"x")], "../evil", "'..'"),
        ([tar_entry("a/../../evil", data=b"x")], "a/../../evil", "'..'"),
        ([tar_entry("lnk", "symlink", target="/"), tar_entry("lnk/evil", data=b"x")], "lnk/evil", "symlink"),
        ([tar_entry("lnk", "symlink", target="../outside"), tar_entry("lnk/evil", data=b"x")], "lnk/evil", "symlink"),
        (
            [tar_entry("d", "dir"), tar_entry("d/l", "symlink", target="/tmp"), tar_entry("d/l/x/evil", data=b"x")],
            "d/l/x/evil",
            "symlink",
        ),
        ([tar_entry("passwd", "hardlink", target="/etc/passwd")], "passwd", "hard link target"),
        ([tar_entry("up", "hardlink", target="../outside/f")], "up", "'..'"),
        (
            [tar_entry("lnk", "symlink", target="/etc/passwd"), tar_entry("pw", "hardlink", target="lnk/x")],
            "pw",
            "hard link",
        ),
        ([tar_entry("dev/sda", "chr", dev=(8, 0))], "dev/sda", "device node refused"),
        ([tar_entry("pipe", "fifo")], "pipe", "fifo refused"),
    ],
)
def test_crafted_layers_are_refused(tmp_path, entries, culprit, reason):
    error, _, sandbox = unpack_crafted(tmp_path, [tar_entry("ok", data=b"fine"), *entries])
    assert error is not None, "the crafted layer was accepted"
    assert repr(culprit) in str(error) and reason in str(error)
    assert not os.path.exists("/evil") and not os.path.exists("/tmp/x/evil")
    assert os.listdir(sandbox / "outside") == []


@needs_root
def test_layer_contents_are_kept_faithfully(tmp_path):
    entries = [
        tar_entry("/etc", "dir"),
        tar_entry("/etc/evil", data=b"absolute names stay inside"),
        tar_entry("bin", "dir", mode=0o755, uid=0, gid=0, mtime=1_500_000_000),
        tar_entry("bin/su", data=b"#!", mode=0o4755, uid=0, gid=0),
        tar_entry("bin/wall", data=b"#!", mode=0o2755, uid=0, gid=5),
        tar_entry("home/u/notes", data=b"mine", uid=1000, gid=1000, mtime=1_400_000_000),
        tar_entry("bin/su2", "hardlink", target="bin/su"),
        tar_entry("root", "symlink", target="/", uid=7, gid=7),
        tar_entry("root-ln", "hardlink", target="root"),
        tar_entry("ok", data=b"x"),
    ]
    error, layer, sandbox = unpack_crafted(tmp_path, entries, uid_shift=ID_BASE)
    assert error is None
    assert open(os.path.join(layer, "etc/evil"), "rb").read() == b"absolute names stay inside"
    assert not os.path.exists("/etc/evil")
    su = os.stat(os.path.join(layer, "bin/su"))
    assert stat.S_IMODE(su.st_mode) == 0o4755 and (su.st_uid, su.st_gid) == (ID_BASE, ID_BASE)
    wall = os.stat(os.path.join(layer, "bin/wall"))
    assert stat.S_IMODE(wall.st_mode) == 0o2755 and wall.st_gid == ID_BASE + 5
    notes = os.stat(os.path.join(layer, "home/u/notes"))
    assert (notes.st_uid, notes.st_gid, notes.st_mtime) == (ID_BASE + 1000, ID_BASE + 1000, 1_400_000_000)
    assert os.stat(os.path.join(layer, "bin")).st_mtime == 1_500_000_000  # set after its children
    assert os.stat(os.path.join(layer, "bin/su2")).st_ino == su.st_ino
    link = os.lstat(os.path.join(layer, "root"))
    assert stat.S_ISLNK(link.st_mode) and os.readlink(os.path.join(layer, "root")) == "/"
    assert (link.st_uid, link.st_gid) == (ID_BASE + 7, ID_BASE + 7)
    assert stat.S_ISLNK(os.lstat(os.path.join(layer, "root-ln")).st_mode)
    root = os.stat(layer)
    assert (root.st_uid, stat.S_IMODE(root.st_mode)) == (ID_BASE, 0o755)
    assert os.listdir(sandbox / "outside") == []


@needs_root
def test_later_entries_replace_earlier_ones(tmp_path):
    entries = [
        tar_entry("a/b/c", data=b"deep"),
        tar_entry("a", data=b"now a file"),
        tar_entry("s", "symlink", target="/etc"),
        tar_entry("s", "dir", mode=0o750),
        tar_entry("s/inside", data=b"in a real directory"),
        tar_entry("f", data=b"old"),
        tar_entry("f", data=b"new"),
    ]
    error, layer, _ = unpack_crafted(tmp_path, entries)
    assert error is None
    assert open(os.path.join(layer, "a"), "rb").read() == b"now a file"
    assert not os.path.islink(os.path.join(layer, "s")) and os.path.isfile(os.path.join(layer, "s/inside"))
    assert not os.path.exists("/etc/inside")
    assert open(os.path.join(layer, "f"), "rb").read() == b"new"


@needs_root
def test_opaque_marker_beneath_a_symlink_is_refused(tmp_path):
    entries = [tar_entry("d", "symlink", target="/tmp"), tar_entry("d/.wh..wh..opq", data=b"")]
    error, _, _ = unpack_crafted(tmp_path, entries)
    assert error is not None and "'d/.wh..wh..opq'" in str(error) and "symlink" in str(error)
    with pytest.raises(OSError):  # nothing was set through the symlink
        os.getxattr("/tmp", "trusted.overlay.opaque")


@needs_root
def test_ids_outside_the_mapped_range_are_refused(tmp_path):
    error, _, _ = unpack_crafted(tmp_path, [tar_entry("big", data=b"x", uid=70000)], uid_shift=ID_BASE)
    assert error is not None and "'big'" in str(error) and "uid 70000" in str(error)


@needs_root
def test_devices_when_allowed(tmp_path):
    error, layer, _ = unpack_crafted(
        tmp_path, [tar_entry("dev/null", "chr", mode=0o666, dev=(1, 3)), tar_entry("fifo", "fifo")], allow_devices=True
    )
    assert error is None
    st = os.lstat(os.path.join(layer, "dev/null"))
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_ISFIFO(os.lstat(os.path.join(layer, "fifo")).st_mode)


@needs_root
def test_blob_digest_and_compression(tmp_path):
    blob = busybox_layer()
    cache = LayerCache(str(tmp_path / "cache"), uid_shift=ID_BASE)
    with pytest.raises(LayerError, match="does not match its digest"):
        cache.ensure(digest_of(b"something else"), lambda: io.BytesIO(blob), layers.TAR)
    assert os.listdir(tmp_path / "cache" / "sha256") == []

    blobs = {
        layers.TAR_GZIP: gzip.compress(blob, mtime=0),
        layers.TAR_ZSTD: zstandard.ZstdCompressor().compress(blob),
        layers.TAR: blob,
    }
    for media_type, data in blobs.items():
        path = cache.ensure(digest_of(data), lambda: io.BytesIO(data), media_type)
        assert os.path.isfile(os.path.join(path, "bin/busybox"))
        opened = []
        assert cache.ensure(digest_of(data), lambda: opened.append(1), media_type) == path
        assert opened == []  # unpacked once per digest

    with pytest.raises(LayerError, match="unknown layer media type"):
        cache.ensure(digest_of(b"x"), lambda: io.BytesIO(b"x"), "application/x-rar")
    with pytest.raises(LayerError, match="corrupt|not a readable"):
        cache.ensure(digest_of(b"garbage" * 100), lambda: io.BytesIO(b"garbage" * 100), layers.TAR_GZIP)
    assert sorted(os.listdir(tmp_path / "cache" / "sha256")) == sorted(digest_of(d)[7:] for d in blobs.values())


@needs_root
def test_whiteouts_through_overlayfs(tmp_path):
    lower = make_tar(
        [
            tar_entry("a/keep", data=b"keep"),
            tar_entry("a/gone", data=b"gone"),
            tar_entry("d/old1", data=b"1"),
            tar_entry("d/sub/old2", data=b"2"),
        ]
    )
    upper = make_tar(
        [
            tar_entry("a", "dir"),
            tar_entry("a/.wh.gone", data=b""),
            tar_entry("d", "dir"),
            tar_entry("d/.wh..wh..opq", data=b""),
            tar_entry("d/new", data=b"new"),
        ]
    )
    cache = LayerCache(str(tmp_path / "cache"), uid_shift=ID_BASE)
    dirs = [cache.ensure(digest_of(b), lambda b=b: io.BytesIO(b), layers.TAR) for b in (lower, upper)]
    gone = os.lstat(os.path.join(dirs[1], "a/gone"))
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(os.path.join(dirs[1], "d"), "trusted.overlay.opaque") == b"y"

    target = str(tmp_path / "merged")
    rootfs.mount_rootfs(dirs, str(tmp_path / "upper"), str(tmp_path / "work"), target)
    try:
        assert sorted(os.listdir(os.path.join(target, "a"))) == ["keep"]
        assert sorted(os.listdir(os.path.join(target, "d"))) == ["new"]
        os.unlink(os.path.join(target, "a", "keep"))  # writes go to the container's upper only
        assert os.path.exists(os.path.join(dirs[0], "a", "keep"))
    finally:
        rootfs.unmount_rootfs(target)
    assert not rootfs.is_mounted(target)
    assert sorted(os.listdir(os.path.join(dirs[0], "d"))) == ["old1", "sub"]  # the lower layer is pristine


# ---------------------------------------------------------------------------
# containers


@needs_runc
def test_echo_and_exit_status(machine):
    code, out, err = machine.run(["/bin/sh", "-c", "echo hello from keg; echo oops >&2; exit 3"])
    assert (code, out, err) == (3, "hello from keg\n", "oops\n")
    code, out, _ = machine.run(None, image_config={"config": {"Entrypoint": ["echo"], "Cmd": ["image", "cmd"]}})
    assert (code, out) == (0, "image cmd\n")
    code, out, _ = machine.run(["/bin/id"], user="app")
    assert out == "uid=1234(app) gid=2345(app) groups=50(staff),2345(app)\n"  # groups from the image's files


@needs_runc
def test_memory_limit_kills_the_process(machine):
    hog = "x=$(head -c {} /dev/zero | tr '\\0' a); echo survived"
    code, out, _ = machine.run(["/bin/sh", "-c", hog.format(1_000_000)], resources={"memory": "32Mi"})
    assert (code, out) == (0, "survived\n")
    code, out, _ = machine.run(["/bin/sh", "-c", hog.format(200_000_000)], resources={"memory": "32Mi"})
    assert code == 137 and out == ""  # SIGKILL from the cgroup's OOM killer


@needs_runc
def test_container_is_confined(machine):
    script = """
        mount -t tmpfs none /mnt && echo MOUNTED
        echo evil > /proc/sys/kernel/hostname && echo WROTE-PROC-SYS
        touch /sys/evil && echo WROTE-SYS
        echo 1 > /sys/kernel/mm/ksm/run && echo WROTE-SYS-KSM
        unshare -U true && echo UNSHARED
        grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status
        touch /made-in-upper && echo ROOTFS-WRITABLE
    """
    code, out, err = machine.run(["/bin/sh", "-c", script], resources={"pids": 64})
    assert code == 0, err
    for forbidden in ("MOUNTED", "WROTE-PROC-SYS", "WROTE-SYS", "UNSHARED"):
        assert forbidden not in out
    assert "Operation not permitted" in err  # unshare, refused by seccomp
    status = dict(line.split(":\t") for line in out.splitlines() if ":\t" in line)
    cap_eff = int(status["CapEff"], 16)
    assert not cap_eff & (1 << 21), "CAP_SYS_ADMIN is effective"
    assert not cap_eff & (1 << 13), "CAP_NET_RAW is effective"
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert "ROOTFS-WRITABLE" in out

    code, out, _ = machine.run(["/bin/sh", "-c", "touch /x && echo WROTE"], readonly_rootfs=True)
    assert "WROTE" not in out


@needs_runc
def test_seccomp_is_what_refuses_unshare(machine):
    """Without the profile, the same unshare succeeds: the refusal above is the filter's doing."""

    def no_seccomp(config):
        del config["linux"]["seccomp"]

    code, out, err = machine.run(["/bin/sh", "-c", "unshare -U true && echo UNSHARED"], edit=no_seccomp)
    assert "UNSHARED" in out, err


@needs_runc
def test_container_root_is_not_host_root(machine):
    cid, bundle, _ = machine.bundle({"args": ["/bin/sh", "-c", "id -u; echo started; exec sleep 30"]})
    log = os.path.join(bundle, "stdout")
    pid = machine.runc.run_detached(cid, bundle, log, os.path.join(bundle, "stderr"))
    deadline = time.monotonic() + 10
    while "started" not in open(log).read():
        assert time.monotonic() < deadline, "the container never wrote to its log"
        time.sleep(0.02)
    assert open(log).read() == "0\nstarted\n"  # root inside…
    with open(f"/proc/{pid}/status") as f:
        ids = {line.split(":")[0]: line.split()[1:] for line in f if line.startswith(("Uid:", "Gid:"))}
    assert ids["Uid"] == [str(ID_BASE)] * 4 and ids["Gid"] == [str(ID_BASE)] * 4  # …an unprivileged uid outside
    state = machine.runc.state(cid)
    assert (state["status"], state["pid"]) == ("running", pid)
    assert [c["id"] for c in machine.runc.list()] == [cid]
    result = machine.runc.exec(cid, ["/bin/cat", "/proc/self/uid_map"])
    assert result.stdout.split() == ["0", str(ID_BASE), "65536"]
    machine.runc.kill(cid, "KILL")
    deadline = time.monotonic() + 10
    while machine.runc.state(cid)["status"] != "stopped":
        assert time.monotonic() < deadline, "the container did not stop"
        time.sleep(0.02)
    machine.runc.delete(cid)
    assert machine.runc.state(cid) is None
    machine.runc.delete(cid)  # deleting twice is harmless


@needs_runc
def test_proc_working_dir_is_refused_before_runc(machine):
    with pytest.raises(SpecError, match="CVE-2024-21626"):
        machine.bundle({}, image_config={"config": {"WorkingDir": "/proc/self/fd/7", "Cmd": ["/bin/true"]}})
    assert machine.runc.list() == []
    bundles = os.path.join(machine.base, "bundles")
    assert not any(os.path.exists(os.path.join(bundles, cid, "config.json")) for cid, _ in machine.containers)


@needs_runc
def test_runc_failure_is_reported(machine):
    def vanish(config):  # past build_config's own check: what only runc can find
        config["process"]["args"] = ["/bin/no-such-program"]
    with pytest.raises(RuncError, match="failed"):
        machine.run(["/bin/true"], edit=vanish)
    with pytest.raises(SpecError, match="'/bin/no-such-program': no such executable file in the image"):
        machine.run(["/bin/no-such-program"])
