"""The Debian base image: debootstrap's command, the cleaning of its root filesystem, and the image
made by `keg image bootstrap debian --tarball` running python3 under the Mayor's runc runtime."""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
import uuid

import pytest

import keg
from builders import bootstrap
from busybox import remove_cgroup_parent
from conftest import DEBIAN_TARBALL, NO_MIRROR, import_debian_base
from mayor.runc_runtime import RuncRuntime
from test_cli import run


def test_debootstrap_command_offline_and_online():
    offline = bootstrap.debootstrap_command("/t", tarball="/var/cache/x.tgz", mirror=NO_MIRROR)
    assert offline == ["debootstrap", "--variant=minbase", "--include=python3,python3-pip",
                       "--unpack-tarball=/var/cache/x.tgz", "bookworm", "/t", NO_MIRROR]
    online = bootstrap.debootstrap_command("/t", suite="trixie", include=("python3", "git"))
    assert online == ["debootstrap", "--variant=minbase", "--include=python3,git", "trixie", "/t",
                      "http://deb.debian.org/debian"]
    made = bootstrap.debootstrap_command("/scratch", make_tarball="/var/cache/keg/d.tgz")
    assert "--make-tarball=/var/cache/keg/d.tgz" in made


def test_clean_rootfs_drops_devices_fifos_and_apt_downloads(tmp_path):
    root = tmp_path / "root"
    for d in ("dev/pts", "etc", "run", "var/cache/apt/archives", "var/lib/apt/lists/partial"):
        (root / d).mkdir(parents=True)
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(root / "run/initctl")
    (root / "etc/hostname").write_text("keg\n")
    (root / "var/cache/apt/archives/python3_3.11_amd64.deb").write_bytes(b"deb")
    (root / "var/cache/apt/pkgcache.bin").write_bytes(b"bin")
    (root / "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages").write_text("x")
    assert bootstrap.clean_rootfs(str(root)) == 6
    assert os.listdir(root / "dev") == []
    assert not os.path.lexists(root / "run/initctl")
    assert (root / "etc/hostname").read_text() == "keg\n"
    assert os.listdir(root / "var/lib/apt/lists") == ["partial"]
    assert os.listdir(root / "var/cache/apt/archives") == []


def test_bootstrap_refuses_a_missing_tarball_before_running_anything(tmp_path):
    with pytest.raises(bootstrap.BootstrapError, match="install.sh"):
        bootstrap.bootstrap_rootfs(str(tmp_path / "root"), tarball=str(tmp_path / "nope.tgz"))


def test_cli_bootstrap_with_a_damaged_tarball_fails_and_changes_nothing(tmp_path, new_keg):
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"this is no tarball")
    head = keg.Store(new_keg)
    before = head.head_revision
    head.close()
    code, out, err = run("image", "bootstrap", "debian", "--tarball", str(bad), "--mirror", NO_MIRROR,
                         "--keg", new_keg)
    assert code != 0
    assert "debootstrap failed" in err
    with keg.Store(new_keg) as s:
        assert s.head_revision == before
        assert not s.exists("/oci-images")


def test_the_debian_image_runs_python3_under_runc(debian_base, tmp_path):
    """The image made by `keg image bootstrap debian --tarball` (the debian_base fixture) runs python3 as the
    Mayor runs any process: in a user namespace, files shifted into the machine's id range."""
    with open(os.path.join(debian_base, "index.json")) as f:
        index = json.load(f)
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "bookworm"
    store = keg.init(str(tmp_path / "keg"), durable=False)
    started = time.monotonic()
    kid = import_debian_base(store)
    assert time.monotonic() - started < 30
    assert store.stat("/oci-images/debian/bookworm").kid == kid
    base = tempfile.mkdtemp(prefix="keg-boot-test-")
    os.chmod(base, 0o711)
    parent = f"keg-test-{uuid.uuid4().hex[:12]}"
    rt = RuncRuntime(store, os.path.join(base, "data"), "t1", cgroup_parent=parent)
    try:
        script = ("import sys, os, ssl, json; print('python', sys.version_info[:2], 'uid', os.getuid(), "
                  "'shadow', os.stat('/etc/shadow').st_gid, 'pip', __import__('pip').__version__)")
        rt.start("py", "K-0", {"image": kid, "args": ["python3", "-c", script], "restart": "never",
                               "network": "none"})
        deadline = time.monotonic() + 60
        while rt.actual()["py"].state != "exited":
            assert time.monotonic() < deadline, rt.log_tail("py", 4000)
            rt.wait(0.5)
        out = rt.log_tail("py", 4000)[1].decode()
        assert rt.actual()["py"].exit_code == 0, out
        assert "python (3, 11) uid 0 shadow 42 pip" in out
        config = rt.image(kid)["config"]["config"]
        assert config["Cmd"] == ["/bin/bash"]
        assert "LANG=C.UTF-8" in config["Env"]
        layer = rt.layers.path(rt.image(kid)["layers"][0]["digest"])
        assert os.stat(os.path.join(layer, "usr/bin")).st_uid == rt.id_base  # root in the image, shifted
        assert os.listdir(os.path.join(layer, "dev")) == []
        rt.remove(rt.container_id("py"))
    finally:
        rt.close()
        remove_cgroup_parent(parent)
        os.system(f"umount -R -l {base} 2>/dev/null; rm -rf {base}")
        store.close()


def test_install_sh_makes_the_tarball_tests_use():
    """./install.sh prepares the offline tarball with the same packages the image is bootstrapped with."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "install.sh")) as f:
        text = f.read()
    assert DEBIAN_TARBALL in text
    assert "--make-tarball" in text and "--include=" + ",".join(bootstrap.DEFAULT_INCLUDE) in text
    assert os.path.isfile(DEBIAN_TARBALL)
