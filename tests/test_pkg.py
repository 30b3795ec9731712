"""keg pkg import: wheels into /pkgs/pypi and .deb files into /pkgs/deb, for builds without the internet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

import keg
from keg import pkgs

from conftest import head_of, keg_command
from test_cli import run


def make_wheel(directory, dist="Demo_Pkg", version="1.0.2", meta_name=None, meta_version=None,
               payload: bytes = b"VALUE = 42\n") -> str:
    """A minimal pure-Python wheel: a module, METADATA, WHEEL and RECORD."""
    path = os.path.join(str(directory), f"{dist}-{version}-py3-none-any.whl")
    info = f"{dist}-{version}.dist-info"
    module = dist.lower()
    files = {
        f"{module}/__init__.py": payload,
        f"{info}/METADATA": (f"Metadata-Version: 2.1\nName: {meta_name or dist.replace('_', '-')}\n"
                             f"Version: {meta_version or version}\nSummary: a test package\n").encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: keg-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", record)
    return path


def make_deb(directory, package="hello-keg", version="1.0-1", arch="all", content: bytes = b"hi\n") -> str:
    """A .deb built with dpkg-deb --build."""
    root = os.path.join(str(directory), f"build-{package}-{version.replace(':', '_')}")
    os.makedirs(os.path.join(root, "DEBIAN"))
    os.makedirs(os.path.join(root, "usr", "share", package))
    with open(os.path.join(root, "usr", "share", package, "greeting"), "wb") as f:
        f.write(content)
    with open(os.path.join(root, "DEBIAN", "control"), "w") as f:
        f.write(f"Package: {package}\nVersion: {version}\nArchitecture: {arch}\n"
                "Maintainer: Keg Tests <tests@example.org>\nDescription: a test package\n")
    out = os.path.join(str(directory), f"{package}-{version.replace(':', '_')}.deb")
    done = subprocess.run(["dpkg-deb", "--root-owner-group", "--build", root, out], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def k(new_keg):
    return new_keg


head = head_of


@pytest.mark.parametrize("name, normalized", [
    ("Demo_Pkg", "demo-pkg"), ("zope.interface", "zope-interface"), ("A__b--C..d", "a-b-c-d"), ("six", "six"),
])
def test_normalized_names(name, normalized):
    assert pkgs.normalize_name(name) == normalized


def test_wheel_and_deb_in_one_transaction(k, tmp_path):
    wheel = make_wheel(tmp_path)
    deb = make_deb(tmp_path, version="2:1.5-3")
    before = head(k)
    code, out, err = run("pkg", "import", wheel, deb, "--keg", k)
    assert code == 0, err
    lines = [line.split("\t") for line in out.strip().splitlines()]
    assert [p for p, _ in lines] == ["/pkgs/pypi/demo-pkg/1.0.2/Demo_Pkg-1.0.2-py3-none-any.whl",
                                     "/pkgs/deb/hello-keg/2:1.5-3/hello-keg_1.5-3_all.deb"]
    assert head(k) == before + 1
    with keg.Store(k) as s:
        for (path, kid), local in zip(lines, (wheel, deb)):
            assert s.kid(path) == kid
            assert s.read(path) == open(local, "rb").read()


def test_reimport_is_a_no_op_success(k, tmp_path):
    wheel = make_wheel(tmp_path)
    first = run("pkg", "import", wheel, "--json", "--keg", k)
    assert first[0] == 0 and json.loads(first[1])[0]["new"] is True
    before = head(k)
    again = run("pkg", "import", wheel, wheel, "--json", "--keg", k)
    assert again[0] == 0, again[2]
    [item] = json.loads(again[1])
    assert item["new"] is False and item["kid"] == json.loads(first[1])[0]["kid"] and item["revision"] == before
    assert head(k) == before


def test_a_different_file_for_a_published_version_is_refused(k, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run("pkg", "import", make_wheel(tmp_path / "a"), "--keg", k)[0] == 0
    before = head(k)
    other = make_wheel(tmp_path / "b", payload=b"VALUE = 43\n")
    code, _, err = run("pkg", "import", other, "--keg", k)
    assert code == 2 and "already holds a different file" in err and "keg rm" in err
    assert head(k) == before


@pytest.mark.parametrize("build, message", [
    (lambda d: make_wheel(d, meta_name="other-name"), "METADATA says 'other-name'"),
    (lambda d: make_wheel(d, meta_version="9.9"), "METADATA says '9.9'"),
    (lambda d: _write(d / "not-a-wheel.whl", b"plain text"), "is not a wheel file name"),
    (lambda d: _write(d / "demo-1.0-py3-none-any.whl", b"plain text"), "is not a readable wheel"),
    (lambda d: _write(d / "broken.deb", b"!<arch>\nnot really"), "is not a readable Debian package"),
    (lambda d: _write(d / "notes.txt", b"x"), "Keg imports Python wheels (.whl) and Debian packages (.deb)"),
])
def test_bad_files_are_refused_before_anything_is_written(k, tmp_path, build, message):
    good = make_wheel(tmp_path, dist="good", version="1.0")
    bad = build(tmp_path)
    before = head(k)
    code, _, err = run("pkg", "import", good, bad, "--keg", k)
    assert code == 2 and message in err, err
    assert head(k) == before
    with keg.Store(k) as s:
        assert not s.exists("/pkgs")


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_large_wheel_is_stored_as_chunks_and_installs_offline(k, tmp_path):
    wheel = make_wheel(tmp_path, dist="bigpkg", version="0.1",
                       payload=b"DATA = %r\n" % os.urandom(3 << 20).hex().encode())
    code, out, err = run("pkg", "import", wheel, "--keg", k)
    assert code == 0, err
    path = out.split("\t")[0]
    with keg.Store(k) as s:
        assert s.stat(path).large
        mirror = tmp_path / "mirror"
        mirror.mkdir()
        (mirror / os.path.basename(path)).write_bytes(s.read(path))
    # What a build does: install from the keg's copy only, never from the internet.
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(mirror),
                           "--target", str(tmp_path / "site"), "--no-compile", "--quiet", "bigpkg==0.1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "bigpkg" / "__init__.py").exists()


def test_import_through_a_master_with_the_installed_command(master_server, tmp_path):
    deb = make_deb(tmp_path, package="remote-pkg", version="0.3", arch="amd64")
    target = ["--url", master_server.url, "--token", master_server.token]
    done = subprocess.run([*keg_command(), "pkg", "import", deb, *target], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    path, kid = done.stdout.strip().split("\t")
    assert path == "/pkgs/deb/remote-pkg/0.3/remote-pkg_0.3_amd64.deb"
    cat = subprocess.run([*keg_command(), "cat", path, *target], capture_output=True)
    assert cat.stdout == open(deb, "rb").read()
    again = subprocess.run([*keg_command(), "pkg", "import", deb, *target], capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.strip() == f"{path}\t{kid}"
