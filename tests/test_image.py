"""keg image: OCI layouts, OCI and docker archives and root filesystems in and out of the keg.

Images are built here without the internet: umoci makes an OCI layout from a
root filesystem holding a copy of /bin/busybox, skopeo turns it into a docker
archive, and what comes back out is checked with skopeo inspect and umoci
unpack, as a user would.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest

import keg
from keg import oci
from master.client import RemoteKeg

from conftest import head_of, keg_command
from test_cli import run

ROOT = os.geteuid() == 0
LARGE = 3 << 20  # incompressible bytes, so that a layer is above the 1 MiB chunking threshold


def sh(*args) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


def populate(rootfs, random_bytes: int = LARGE) -> None:
    """A tiny system: busybox, a shell link, a hard link, a private file, a file of someone else."""
    for d in ("bin", "etc", "data", "root"):
        os.makedirs(rootfs / d, exist_ok=True)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    os.symlink("busybox", rootfs / "bin" / "sh")
    os.link(rootfs / "bin" / "busybox", rootfs / "bin" / "ls")
    (rootfs / "etc" / "motd").write_text("hello from keg\n")
    (rootfs / "root" / "secret").write_text("s\n")
    os.chmod(rootfs / "root" / "secret", 0o600)
    os.chmod(rootfs / "root", 0o700)
    (rootfs / "data" / "random.bin").write_bytes(os.urandom(random_bytes))
    if ROOT:
        os.chown(rootfs / "etc" / "motd", 1000, 1000)


def unpack(layout, tag, bundle) -> str:
    """umoci unpack (rootless when not root); the bundle's rootfs."""
    sh("umoci", "unpack", *(() if ROOT else ("--rootless",)), "--image", f"{layout}:{tag}", bundle)
    return os.path.join(bundle, "rootfs")


def index_of(layout) -> dict:
    with open(os.path.join(layout, "index.json")) as f:
        return json.load(f)


def blob(layout, digest: str) -> bytes:
    with open(os.path.join(layout, "blobs", "sha256", digest.split(":")[1]), "rb") as f:
        return f.read()


def blob_files(layout) -> dict:
    d = os.path.join(layout, "blobs", "sha256")
    return {name: os.path.getsize(os.path.join(d, name)) for name in os.listdir(d)}


def inspect(layout, tag) -> dict:
    return json.loads(sh("skopeo", "inspect", f"oci:{layout}:{tag}"))


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """An OCI layout made by umoci: tag t, one gzip layer above 1 MiB."""
    base = tmp_path_factory.mktemp("umoci")
    lay, bundle = base / "layout", base / "bundle"
    sh("umoci", "init", "--layout", lay)
    sh("umoci", "new", "--image", f"{lay}:t")
    rootfs = unpack(lay, "t", bundle)
    populate(base / "bundle" / "rootfs")
    sh("umoci", "config", "--image", f"{lay}:t", "--config.cmd", "/bin/sh")
    sh("umoci", "repack", "--image", f"{lay}:t", bundle)
    sh("umoci", "gc", "--layout", lay)  # drop the blobs of the image before repack: only t's are left
    assert os.path.isfile(os.path.join(rootfs, "bin", "busybox"))
    return lay


@pytest.fixture(scope="module")
def docker_archive(layout, tmp_path_factory):
    """The same image as a docker archive (uncompressed layers, manifest.json)."""
    path = tmp_path_factory.mktemp("docker") / "image.tar"
    sh("skopeo", "copy", f"oci:{layout}:t", f"docker-archive:{path}:example/tool:t")
    return path


@pytest.fixture
def k(new_keg):
    return new_keg


head = head_of


def test_oci_layout_round_trip_keeps_every_digest(k, layout, tmp_path):
    code, out, err = run("image", "import", str(layout), "demo/busybox:1.0", "--keg", k)
    assert code == 0, err
    path, kid = out.strip().split("\t")
    assert path == "/oci-images/demo/busybox/1.0" and kid.startswith("K-")
    with keg.Store(k) as s:
        assert s.kid(path) == kid
        assert sorted(e.name for e in s.list(path)) == ["blobs", "index.json", "oci-layout"]
        layer = inspect(layout, "t")["Layers"][0]
        assert s.stat(f"{path}/blobs/sha256/{layer.split(':')[1]}").large  # stored as chunks

    out_dir = tmp_path / "out"
    code, out, err = run("image", "export", "demo/busybox:1.0", str(out_dir), "--keg", k)
    assert code == 0, err
    assert out.strip() == f"{out_dir}\t{kid}"
    source_manifest = index_of(layout)["manifests"][0]["digest"]
    exported = index_of(out_dir)["manifests"]
    assert [m["digest"] for m in exported] == [source_manifest]
    assert exported[0]["annotations"]["org.opencontainers.image.ref.name"] == "1.0"
    assert blob_files(out_dir) == blob_files(layout)
    assert inspect(out_dir, "1.0")["Digest"] == inspect(layout, "t")["Digest"] == source_manifest
    rootfs = unpack(out_dir, "1.0", tmp_path / "bundle")
    assert open(os.path.join(rootfs, "bin", "busybox"), "rb").read() == open("/bin/busybox", "rb").read()
    assert os.readlink(os.path.join(rootfs, "bin", "sh")) == "busybox"


def test_oci_tarball_is_the_same_image_as_its_directory(k, layout, tmp_path):
    tarball = tmp_path / "layout.tar"
    sh("tar", "-C", layout, "-cf", tarball, ".")
    assert run("image", "import", str(layout), "a:t", "--keg", k)[0] == 0
    code, out, err = run("image", "import", str(tarball), "b:t", "--json", "--keg", k)
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "oci-archive"
    assert result["manifest_digest"] == index_of(layout)["manifests"][0]["digest"]
    with keg.Store(k) as s:
        assert s.kid("/oci-images/a/t") == s.kid("/oci-images/b/t") == result["kid"]


def test_docker_archive_becomes_a_valid_oci_layout(k, docker_archive, tmp_path):
    code, out, err = run("image", "import", str(docker_archive), "example/tool:t", "--keg", k)
    assert code == 0, err
    assert run("image", "export", "example/tool:t", str(tmp_path / "out"), "--keg", k)[0] == 0
    with tarfile.open(docker_archive) as tar:
        entry = json.load(tar.extractfile("manifest.json"))[0]
        config = tar.extractfile(entry["Config"]).read()
    info = inspect(tmp_path / "out", "t")
    # Layers and config are kept as stored: their digests are those of the archive's files.
    assert info["Layers"] == json.loads(config)["rootfs"]["diff_ids"]
    manifest = json.loads(blob(tmp_path / "out", info["Digest"]))
    assert blob(tmp_path / "out", manifest["config"]["digest"]) == config
    rootfs = unpack(tmp_path / "out", "t", tmp_path / "bundle")
    assert open(os.path.join(rootfs, "etc", "motd")).read() == "hello from keg\n"


def test_rootfs_becomes_a_deterministic_image(k, tmp_path):
    rootfs = tmp_path / "rootfs"
    populate(rootfs)
    args = ("--cmd", "/bin/sh -c 'echo hi'", "--entrypoint", '["/bin/busybox"]', "--env", "LANG=C.UTF-8",
            "--workdir", "/root", "--keg", k)
    code, out, err = run("image", "import", str(rootfs), "tools", *args)
    assert code == 0, err
    path, kid = out.strip().split("\t")
    assert path == "/oci-images/tools/latest"
    # The same directory gives the same layer, config and manifest: the same KID under any name
    # (index.json names the tag, so another tag is another tree, with the same manifest).
    assert run("image", "import", str(rootfs), "tools-again", *args)[1].split("\t")[1].strip() == kid
    first, other_tag = (json.loads(run("image", "import", str(rootfs), ref, "--json", *args)[1])
                        for ref in ("tools", "tools:v1"))
    assert first["kid"] == kid and other_tag["kid"] != kid
    assert first["manifest_digest"] == other_tag["manifest_digest"]

    out_dir = tmp_path / "out"
    assert run("image", "export", "tools", str(out_dir), "--keg", k)[0] == 0
    info = inspect(out_dir, "latest")
    manifest = json.loads(blob(out_dir, info["Digest"]))
    config = json.loads(blob(out_dir, manifest["config"]["digest"]))
    assert config["os"] == "linux" and config["architecture"] == oci.machine_platform()[0]
    assert config["config"]["Entrypoint"] == ["/bin/busybox"]
    assert config["config"]["Cmd"] == ["/bin/sh", "-c", "echo hi"]
    assert config["config"]["Env"][1] == "LANG=C.UTF-8" and config["config"]["Env"][0].startswith("PATH=")
    assert config["config"]["WorkingDir"] == "/root"
    assert config["rootfs"]["diff_ids"] == [manifest["layers"][0]["digest"]]
    assert manifest["layers"][0]["mediaType"] == oci.OCI_LAYER

    with tarfile.open(fileobj=io.BytesIO(blob(out_dir, manifest["layers"][0]["digest"]))) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names, key=os.fsencode)
    by_name = {m.name: m for m in members}
    assert by_name["bin/sh"].issym() and by_name["bin/sh"].linkname == "busybox"
    assert by_name["bin/ls"].islnk() and by_name["bin/ls"].linkname == "bin/busybox"
    assert by_name["root"].mode == 0o700 and by_name["root/secret"].mode == 0o600
    assert by_name["bin/busybox"].mode == os.stat("/bin/busybox").st_mode & 0o7777
    if ROOT:
        assert (by_name["etc/motd"].uid, by_name["etc/motd"].gid) == (1000, 1000)

    bundle_rootfs = unpack(out_dir, "latest", tmp_path / "bundle")
    assert os.readlink(os.path.join(bundle_rootfs, "bin", "sh")) == "busybox"
    if ROOT:
        ran = subprocess.run(["chroot", bundle_rootfs, "/bin/sh", "-c", "busybox cat /etc/motd"],
                             capture_output=True, text=True)
        assert ran.stdout == "hello from keg\n", ran.stderr


def test_clamped_mtimes(k, tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "motd").write_text("x\n")
    assert run("image", "import", str(rootfs), "clamped", "--clamp-mtime", "1000", "--keg", k)[0] == 0
    assert run("image", "export", "clamped", str(tmp_path / "out"), "--keg", k)[0] == 0
    info = inspect(tmp_path / "out", "latest")
    layer = blob(tmp_path / "out", info["Layers"][0])
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        assert {m.mtime for m in tar.getmembers()} == {1000}
    assert info["Created"].startswith("1970-01-01T00:16:40")


def test_damaged_blob_is_refused_and_nothing_is_written(k, layout, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(layout, broken)
    manifest = json.loads(blob(broken, index_of(broken)["manifests"][0]["digest"]))
    layer = broken / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.write_bytes(bytes(data))
    before = head(k)
    code, _, err = run("image", "import", str(broken), "broken:t", "--keg", k)
    assert code == 2
    assert "sha256" in err and manifest["layers"][0]["digest"].split(":")[1] in err and "Nothing was imported" in err
    assert head(k) == before
    with keg.Store(k) as s:
        assert not s.exists("/oci-images")


@pytest.mark.parametrize("damage, message", [
    ("no-index", "has no index.json"),
    ("media-type", "unknown media type 'application/x-unknown'"),
    ("size", "its descriptor says"),
])
def test_malformed_layouts_get_clear_errors(k, layout, tmp_path, damage, message):
    bad = tmp_path / "bad"
    shutil.copytree(layout, bad)
    index = index_of(bad)
    if damage == "no-index":
        os.unlink(bad / "index.json")
    else:
        manifest_digest = index["manifests"][0]["digest"]
        manifest = json.loads(blob(bad, manifest_digest))
        if damage == "media-type":
            manifest["layers"][0]["mediaType"] = "application/x-unknown"
        else:
            manifest["layers"][0]["size"] += 1
        data = json.dumps(manifest).encode()
        digest = hashlib.sha256(data).hexdigest()
        (bad / "blobs" / "sha256" / digest).write_bytes(data)
        index["manifests"][0].update(digest="sha256:" + digest, size=len(data))
        (bad / "index.json").write_text(json.dumps(index))
    before = head(k)
    code, _, err = run("image", "import", str(bad), "bad:t", "--keg", k)
    assert code == 2 and message in err, err
    assert head(k) == before


def test_tarball_with_path_traversal_is_refused(k, tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        for name, data in (("manifest.json", b"[]"), ("../../etc/evil", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    code, _, err = run("image", "import", str(evil), "evil:t", "--keg", k)
    assert code == 2 and "'../../etc/evil'" in err and "outside the archive" in err
    assert not os.path.exists(tmp_path.parent / "etc" / "evil")
    with keg.Store(k) as s:
        assert not s.exists("/oci-images")


@pytest.mark.parametrize("reference, message", [
    ("Upper:t", "image name 'Upper' is not valid"),
    ("ok:.bad", "image tag '.bad' is not valid"),
    ("a//b:t", "image name 'a//b' is not valid"),
    ("a@sha256:00", "references by digest"),
])
def test_bad_references(k, layout, reference, message):
    code, _, err = run("image", "import", str(layout), reference, "--keg", k)
    assert code == 2 and message in err


def test_options_for_a_root_filesystem_only(k, layout):
    code, _, err = run("image", "import", str(layout), "x:t", "--cmd", "/bin/sh", "--keg", k)
    assert code == 2 and "apply only to a root filesystem" in err


def test_image_inside_another_image_is_refused(k, layout):
    assert run("image", "import", str(layout), "a:b", "--keg", k)[0] == 0
    code, _, err = run("image", "import", str(layout), "a/b:c", "--keg", k)
    assert code == 2 and "inside the image at /oci-images/a/b" in err


def test_export_adds_tags_to_an_existing_layout_and_refuses_other_directories(k, layout, tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "motd").write_text("x\n")
    assert run("image", "import", str(layout), "multi:one", "--keg", k)[0] == 0
    assert run("image", "import", str(rootfs), "multi:two", "--keg", k)[0] == 0
    out = tmp_path / "out"
    assert run("image", "export", "multi:one", str(out), "--keg", k)[0] == 0
    assert run("image", "export", "multi:two", str(out), "--keg", k)[0] == 0
    assert inspect(out, "one")["Digest"] == index_of(layout)["manifests"][0]["digest"]
    assert inspect(out, "two")["Layers"]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    code, _, err = run("image", "export", "multi:one", str(tmp_path / "junk"), "--keg", k)
    assert code == 2 and "not empty and not an OCI layout" in err
    code, _, err = run("image", "export", "multi:three", str(tmp_path / "o3"), "--keg", k)
    assert code == 1 and "no image multi:three" in err


def test_import_and_export_through_a_master_with_the_installed_command(master_server, layout, tmp_path):
    target = ["--url", master_server.url, "--token", master_server.token]
    done = subprocess.run([*keg_command(), "image", "import", str(layout), "remote/img:t", *target],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    path, kid = done.stdout.strip().split("\t")
    out = tmp_path / "out"
    done = subprocess.run([*keg_command(), "image", "export", "remote/img:t", str(out), "--json", *target],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["kid"] == kid and result["path"] == path
    assert inspect(out, "t")["Digest"] == index_of(layout)["manifests"][0]["digest"]
    with RemoteKeg(master_server.url, master_server.token) as s:
        layer = inspect(layout, "t")["Layers"][0].split(":")[1]
        assert s.stat(f"{path}/blobs/sha256/{layer}").large


def _disk_use(path) -> int:
    total = 0
    for top, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(top, f)).st_blocks * 512 for f in files)
    return total


def test_fifty_imports_of_a_64_mib_image_cost_one(keg_dir, tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    (rootfs / "big.bin").write_bytes(os.urandom(64 << 20))
    with keg.init(keg_dir, durable=False) as store:
        first = oci.import_image(store, str(rootfs), "copy0")
        store.checkpoint()
        stored = [os.path.join(keg_dir, "keg", "chunks"), os.path.join(keg_dir, "objects")]
        after_first = sum(_disk_use(p) for p in stored)
        assert after_first >= 64 << 20
        for i in range(1, 50):
            again = oci.import_image(store, str(rootfs), f"copy{i}")
            assert again.kid == first.kid
        store.checkpoint()
        assert len(store.list("/oci-images")) == 50
    after_all = sum(_disk_use(p) for p in stored)
    assert after_all <= 1.05 * after_first, (after_first, after_all)
