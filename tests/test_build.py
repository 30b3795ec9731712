"""Builds (builders/build.py): python, static and script sources become images in the keg, built in a runc
container with no network, whose only lasting output is /out/app; the images run under the Mayor's runtime.

Real runc, a real keg, and the Debian base image (the session's ``debian_base`` fixture).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import urllib.request
import uuid

import pytest

import keg
from builders import build as buildlib
from builders.build import BuildFailed
from busybox import remove_cgroup_parent, why_no_containers
from conftest import free_port, import_debian_base
from keg import pkgs
from mayor.runc_runtime import RuncRuntime
from test_pkg import make_wheel

SOURCE_KID = "K-" + "ab" * 20


# ---------------------------------------------------------------- fixtures and helpers


class Builder:
    """A keg with the Debian base and one wheel, a runtime (one layer cache for the module), scratch space."""

    def __init__(self, tmp: str, layout: str):
        self.tmp = tmp
        os.chmod(tmp, 0o711)
        self.store = keg.init(os.path.join(tmp, "keg"), durable=False)
        self.base_kid = import_debian_base(self.store, layout)
        wheel_dir = os.path.join(tmp, "wheels")
        os.mkdir(wheel_dir)
        pkgs.import_packages(self.store, [make_wheel(wheel_dir, "Demo_Pkg", "1.0.2", payload=b"VALUE = 42\n")])
        self.cgroup_parent = f"keg-test-{uuid.uuid4().hex[:12]}"
        self.runtime = RuncRuntime(self.store, os.path.join(tmp, "data"), "b1", cgroup_parent=self.cgroup_parent)
        self.count = 0

    def source(self, files: dict, modes=None) -> str:
        """A source tree from {path: text}; ``modes`` {path: mode}."""
        self.count += 1
        root = os.path.join(self.tmp, f"src{self.count}")
        for path, text in files.items():
            full = os.path.join(root, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(text)
            os.chmod(full, (modes or {}).get(path, 0o644))
        os.makedirs(root, exist_ok=True)
        return root

    def build(self, app: str, source_dir: str, source_kid: str = SOURCE_KID, **options):
        """(BuildOutput or the BuildFailed raised, log bytes, [(time, chunk)])."""
        work = tempfile.mkdtemp(prefix="work-", dir=self.tmp)
        os.chmod(work, 0o711)  # as the builder does: the container's root must reach the mounts below it
        chunks = []
        try:  # the work directory need not exist yet (the builder names one inside its own scratch)
            out = buildlib.build(self.store, self.runtime, app, source_dir, source_kid, os.path.join(work, "b"),
                                 lambda data: chunks.append((time.monotonic(), data)), **options)
        except BuildFailed as err:
            out = err
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return out, b"".join(c for _, c in chunks), chunks

    def serve(self, image_kid: str, name: str):
        """Start the image's default command with $PORT on the host's network; its URL once it answers."""
        port = free_port()
        self.runtime.start(name, "K-1", {"image": image_kid, "env": {"PORT": str(port)}, "network": "host",
                                         "restart": "never", "user": "1000"})
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    response.read()
                return url
            except OSError:
                have = self.runtime.actual().get(name)
                assert have is not None and have.state == "running", self.runtime.log_tail(name, 4000)
                assert time.monotonic() < deadline, self.runtime.log_tail(name, 4000)
                time.sleep(0.1)

    def stop(self, name: str) -> None:
        self.runtime.remove(self.runtime.container_id(name))

    def layer(self, image_kid: str) -> tarfile.TarFile:
        """The image's own (top) layer as an open tarfile."""
        image = self.runtime.image(image_kid)
        digest = image["layers"][-1]["digest"]
        data = self.store.read(f"{image['path']}/blobs/sha256/{digest.split(':')[1]}")
        assert hashlib.sha256(data).hexdigest() == digest.split(":")[1]
        return tarfile.open(fileobj=io.BytesIO(data))

    def close(self) -> None:
        for have in self.runtime.actual().values():
            self.runtime.remove(have.container)
        self.runtime.close()
        remove_cgroup_parent(self.cgroup_parent)
        self.store.close()


@pytest.fixture(scope="module")
def builder(debian_base):
    why = why_no_containers()
    if why is not None:
        pytest.fail(why)  # fail, never skip: ./install.sh provides runc
    tmp = tempfile.mkdtemp(prefix="keg-build-test-")
    b = Builder(tmp, debian_base)
    yield b
    b.close()
    os.system(f"umount -R -l {tmp} 2>/dev/null")
    shutil.rmtree(tmp, ignore_errors=True)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def tree_digest(root: str) -> str:
    """A digest of every path, mode and content under ``root`` (symlinks not followed)."""
    h = hashlib.sha256()
    for top, dirs, files in sorted(os.walk(root)):
        for name in sorted(dirs + files):
            full = os.path.join(top, name)
            st = os.lstat(full)
            h.update(f"{os.path.relpath(full, root)} {st.st_mode:o} {st.st_uid}\n".encode())
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


PYTHON_APP = """\
import http.server, os
import demo_pkg

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from python, VALUE={demo_pkg.VALUE}, GREETING={os.environ.get('GREETING')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.HTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
"""


# ---------------------------------------------------------------- detection and parsing (no containers)


@pytest.mark.parametrize("files, kind", [
    ({"requirements.txt": "flask\n"}, "python"),
    ({"Procfile": "web: ./run\n"}, "python"),
    ({"main.py": "print(1)\n"}, "python"),
    ({"index.html": "<h1>hi</h1>"}, "static"),
    ({"public/index.html": "<h1>hi</h1>"}, "static"),
    ({"keg.json": '{"kind": "static"}', "app.py": ""}, "static"),
])
def test_detect_kind(tmp_path, files, kind):
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    assert buildlib.detect_kind(str(tmp_path))[0] == kind


def test_an_executable_keg_build_makes_a_script_build_and_a_plain_one_is_refused(tmp_path):
    (tmp_path / "keg.build").write_text("#!/bin/sh\n")
    (tmp_path / "app.py").write_text("")
    with pytest.raises(BuildFailed, match="chmod \\+x keg.build"):
        buildlib.detect_kind(str(tmp_path))
    os.chmod(tmp_path / "keg.build", 0o755)
    assert buildlib.detect_kind(str(tmp_path)) == ("script", {})


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ("[1]", "must be a JSON object"),
    ('{"kind": "ruby"}', "kind 'ruby' is not one Keg builds"),
    ('{"base": "Not A Name"}', "base 'Not A Name'"),
])
def test_a_bad_keg_json_fails_the_build(tmp_path, text, message):
    (tmp_path / "keg.json").write_text(text)
    with pytest.raises(BuildFailed, match=message):
        buildlib.detect_kind(str(tmp_path))


def test_nothing_recognisable_says_what_was_looked_for(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(BuildFailed, match="keg.json.*keg.build.*requirements.txt.*index.html"):
        buildlib.detect_kind(str(tmp_path))


def test_procfile_and_requirements_parsing(tmp_path):
    from builders import kinds
    assert kinds.parse_procfile("# c\nweb: python3 app.py\nworker:  python3 w.py --x\n") == {
        "web": "python3 app.py", "worker": "python3 w.py --x"}
    with pytest.raises(BuildFailed, match="process type 'Web_1'"):
        kinds.parse_procfile("Web_1: x\n")
    with pytest.raises(BuildFailed, match="given twice"):
        kinds.parse_procfile("web: a\nweb: b\n")
    (tmp_path / "requirements.txt").write_text(
        "Flask[async]>=2.0  # web\n-r more.txt\n\nzope.interface; python_version>'3'\n")
    (tmp_path / "more.txt").write_text("requests==2.31\n")
    assert [n for n, _ in kinds.parse_requirements(str(tmp_path))] == ["flask", "requests", "zope-interface"]
    for bad in ("--index-url https://pypi.org/simple\n", "-e .\n", "foo @ https://x/y.whl\n", "./pkg\n"):
        (tmp_path / "requirements.txt").write_text(bad)
        with pytest.raises(BuildFailed, match="/pkgs/pypi|install"):
            kinds.parse_requirements(str(tmp_path))


def test_inputs_name_kind_base_and_pkgs(builder):
    source = builder.source({"requirements.txt": "demo-pkg\n", "app.py": ""})
    found = buildlib.inputs(builder.store, source)
    assert found == {"kind": "python", "base": builder.base_kid, "pkgs": builder.store.kid("/pkgs/pypi"),
                     "builder": buildlib.BUILDER_VERSION}
    static = builder.source({"index.html": "x"})
    assert buildlib.inputs(builder.store, static)["pkgs"] is None
    missing = builder.source({"keg.json": '{"base": "debian:trixie"}', "index.html": "x"})
    with pytest.raises(BuildFailed, match="debian:trixie is not in the keg.*keg image bootstrap debian"):
        buildlib.inputs(builder.store, missing)


# ---------------------------------------------------------------- the three kinds, built and run


def test_python_app_with_a_wheel_builds_and_answers_http(builder):
    source = builder.source({"app.py": PYTHON_APP, "requirements.txt": "Demo_Pkg==1.0.2\n",
                             "Procfile": "web: python3 app.py\nworker: python3 -c 'import demo_pkg'\n"})
    before = tree_digest(source)
    out, log, _ = builder.build("hello", source)
    assert isinstance(out, buildlib.BuildOutput), log.decode()
    assert out.kind == "python"
    assert out.image_path == f"/oci-images/hello/{SOURCE_KID}/"
    assert out.processes == {"web": "python3 app.py", "worker": "python3 -c 'import demo_pkg'"}
    assert out.base_kid == builder.base_kid
    assert builder.store.kid(out.image_path) == out.image_kid
    text = log.decode()
    for step in ("-----> Python app detected", "-----> Installing requirements from /pkgs/pypi",
                 "Successfully installed Demo_Pkg-1.0.2"):
        assert step in text
    assert tree_digest(source) == before
    image = builder.runtime.image(out.image_kid)
    config = image["config"]["config"]
    assert config["WorkingDir"] == "/app" and config["Cmd"] == ["/bin/sh", "-c", "python3 app.py"]
    assert "PYTHONPATH=/app/.deps" in config["Env"]
    assert json.loads(config["Labels"]["org.keg.processes"]) == out.processes
    base = builder.runtime.image(builder.base_kid)
    assert image["layers"][:-1] == base["layers"]  # the base's layers, reused
    names = builder.layer(out.image_kid).getnames()
    assert "app/app.py" in names and "app/.deps/demo_pkg/__init__.py" in names
    assert builder.store.pointer(f"{out.image_path}blobs/sha256/{base['layers'][0]['digest'][7:]}") == \
        builder.store.pointer(f"/oci-images/debian/bookworm/blobs/sha256/{base['layers'][0]['digest'][7:]}")
    url = builder.serve(out.image_kid, "hello-web")
    try:
        assert get(url) == "hello from python, VALUE=42, GREETING=None"
    finally:
        builder.stop("hello-web")


def test_static_site_is_served_on_port(builder):
    source = builder.source({"public/index.html": "<h1>static hello</h1>\n", "public/css/a.css": "h1 {}\n",
                             "README.md": "not served"})
    out, log, _ = builder.build("site", source)
    assert isinstance(out, buildlib.BuildOutput), log.decode()
    assert out.kind == "static" and "-----> Static site detected" in log.decode()
    assert "web" in out.processes and "$PORT" in out.processes["web"]
    names = builder.layer(out.image_kid).getnames()
    assert "app/public/css/a.css" in names and "app/public/README.md" not in names
    url = builder.serve(out.image_kid, "site-web")
    try:
        assert get(url) == "<h1>static hello</h1>\n"
        assert get(url + "css/a.css") == "h1 {}\n"
    finally:
        builder.stop("site-web")


SCRIPT_BUILD = """\
#!/bin/sh
set -e
echo "building in $(pwd) into $OUT"
mkdir -p "$OUT/app/bin"
cat > "$OUT/app/bin/serve" <<'EOF'
#!/bin/sh
exec python3 -m http.server "$PORT" --directory /app/www
EOF
chmod 755 "$OUT/app/bin/serve"
mkdir -p "$OUT/app/www"
echo "made by keg.build" > "$OUT/app/www/index.html"
cp /src/Procfile.out "$OUT/app/Procfile"
# what the layer must not keep as it is:
cp /bin/true "$OUT/app/setuid" && chmod 4755 "$OUT/app/setuid"
mkfifo "$OUT/app/fifo"
ln -s /etc/shadow "$OUT/app/shadow-link"
echo twin > "$OUT/app/a" && ln "$OUT/app/a" "$OUT/app/b"
chown 1234:1234 "$OUT/app/a"
"""


def test_script_build_output_becomes_app_owned_by_root_without_setuid_or_devices(builder):
    source = builder.source({"keg.build": SCRIPT_BUILD, "Procfile.out": "web: /app/bin/serve\n"},
                            {"keg.build": 0o755})
    out, log, _ = builder.build("tool", source)
    assert isinstance(out, buildlib.BuildOutput), log.decode()
    assert out.kind == "script" and out.processes == {"web": "/app/bin/serve"}
    assert "building in /src into /out" in log.decode()
    assert "dropped app/fifo" in log.decode()
    members = {m.name: m for m in builder.layer(out.image_kid).getmembers()}
    assert "app/fifo" not in members
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    assert members["app/setuid"].mode == 0o755
    assert members["app/shadow-link"].issym() and members["app/shadow-link"].linkname == "/etc/shadow"
    assert members["app/b"].islnk() and members["app/b"].linkname == "app/a"
    url = builder.serve(out.image_kid, "tool-web")
    try:
        assert get(url) == "made by keg.build\n"
    finally:
        builder.stop("tool-web")


# ---------------------------------------------------------------- failures


def test_a_missing_wheel_fails_naming_it_before_any_container(builder):
    source = builder.source({"app.py": "", "requirements.txt": "demo-pkg\nflask>=3\nRequests\n"})
    out, log, _ = builder.build("nowheel", source)
    assert isinstance(out, BuildFailed)
    assert "requirements 'flask>=3', 'Requests' have no wheel in /pkgs/pypi" in str(out)
    assert "keg pkg import" in str(out)
    assert builder.runtime.actual() == {}
    assert not builder.store.exists("/oci-images/nowheel")


def test_an_empty_procfile_fails_before_any_container(builder):
    source = builder.source({"app.py": "", "Procfile": "# nothing yet\n"})
    out, log, _ = builder.build("empty", source)
    assert isinstance(out, BuildFailed) and "names no process types" in str(out)
    assert builder.runtime.actual() == {}


def test_a_failing_build_says_why_and_writes_no_image(builder):
    source = builder.source({"keg.build": "#!/bin/sh\necho working\necho 'error: the compiler broke' >&2\nexit 3\n"},
                            {"keg.build": 0o755})
    out, log, _ = builder.build("broken", source)
    assert isinstance(out, BuildFailed)
    assert str(out) == "the build failed (exit code 3): error: the compiler broke"
    assert b"working" in log
    assert not builder.store.exists("/oci-images/broken")
    assert builder.runtime.actual() == {}


def test_a_python_app_whose_pinned_version_is_missing_fails_with_pips_words(builder):
    source = builder.source({"app.py": "", "requirements.txt": "demo-pkg==9.9\n"})
    out, log, _ = builder.build("pinned", source)
    assert isinstance(out, BuildFailed)
    assert "demo-pkg==9.9" in str(out) and "exit code 1" in str(out)


def test_a_build_that_runs_too_long_is_stopped(builder):
    source = builder.source({"keg.build": "#!/bin/sh\necho start\nsleep 300\n"}, {"keg.build": 0o755})
    started = time.monotonic()
    out, log, _ = builder.build("slow", source, timeout=3)
    assert isinstance(out, BuildFailed)
    assert str(out) == "the build took longer than 3 s and was stopped"
    assert time.monotonic() - started < 30
    assert b"start" in log
    assert builder.runtime.actual() == {}


def test_output_arrives_while_the_build_runs(builder):
    source = builder.source({"keg.build": "#!/bin/sh\nfor i in 1 2 3 4 5 6; do echo tick $i; sleep 0.4; done\n"
                                          "mkdir -p $OUT/app\necho 'web: sleep 1' > $OUT/app/Procfile\n"},
                            {"keg.build": 0o755})
    out, log, chunks = builder.build("ticks", source)
    assert isinstance(out, buildlib.BuildOutput), log.decode()
    first = next(t for t, c in chunks if b"tick 1" in c)
    last = next(t for t, c in chunks if b"tick 6" in c)
    assert last - first > 1.0  # passed on as it came, not all at the end
    gaps = [b - a for (a, _), (b, _) in zip(chunks, chunks[1:]) if a >= first and b <= last]
    assert max(gaps) < 1.2


def test_a_symlinked_out_app_is_refused(builder):
    source = builder.source({"keg.build": "#!/bin/sh\nln -s / $OUT/app\n"}, {"keg.build": 0o755})
    out, log, _ = builder.build("linked", source)
    assert isinstance(out, BuildFailed) and "/out/app is not a directory" in str(out)


# ---------------------------------------------------------------- containment


def connections_waiting(sock: socket.socket) -> int:
    """How many connections completed on a listening socket nobody accepted from (the kernel queues them)."""
    sock.setblocking(False)
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def test_a_build_cannot_reach_the_network(builder):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    probe = f"""#!/usr/bin/python3
import socket
for host, port in (("127.0.0.1", {port}), ("10.0.0.1", 80), ("1.1.1.1", 53)):
    try:
        socket.create_connection((host, port), timeout=2).close()
        print("REACHED", host)
    except OSError as err:
        print("unreachable", host, type(err).__name__, err.errno)
try:
    socket.getaddrinfo("deb.debian.org", 80)
    print("RESOLVED")
except OSError as err:
    print("no dns", err)
import os
os.makedirs("/out/app")
open("/out/app/Procfile", "w").write("web: true\\n")
"""
    source = builder.source({"keg.build": probe}, {"keg.build": 0o755})
    with server:
        out, log, _ = builder.build("netprobe", source)
        reached = connections_waiting(server)
    text = log.decode()
    assert isinstance(out, buildlib.BuildOutput), text
    assert "REACHED" not in text and "RESOLVED" not in text
    assert text.count("unreachable") == 3 and "no dns" in text
    assert reached == 0


ESCAPE = """#!/bin/sh
echo "src: $(touch /src/app.py 2>&1 || true)"
echo evil > /src/new-file 2>/dev/null && echo "WROTE SRC"
echo evil > /etc/keg-evil && echo "wrote /etc inside"
echo evil > /usr/bin/python3 && echo "overwrote python3 inside"
echo evil > /wheels/x 2>/dev/null && echo "WROTE WHEELS"
mkdir -p /out/app
ln -s / /out/app/host-root
echo evil > /out/app/host-root/tmp/keg-escape-{tag} && echo "wrote through the link inside"
ln -s /etc/passwd /out/app/passwd
ln /src/app.py /out/app/hard 2>/dev/null && echo "LINKED SRC"
echo "web: true" > /out/app/Procfile
"""


def test_writes_outside_out_change_neither_host_nor_source_nor_base(builder):
    tag = uuid.uuid4().hex[:8]
    source = builder.source({"keg.build": ESCAPE.replace("{tag}", tag), "app.py": "print('original')\n",
                             "requirements.txt": "demo-pkg\n"}, {"keg.build": 0o755})
    before = tree_digest(source)
    base = builder.runtime.image(builder.base_kid)
    base_layer = builder.runtime.layers.path(base["layers"][0]["digest"])
    with open(os.path.join(base_layer, "usr/bin/python3.11"), "rb") as f:
        python_before = hashlib.sha256(f.read()).hexdigest()
    base_kid_before = builder.store.kid("/oci-images/debian/bookworm")
    out, log, _ = builder.build("escape", source)
    text = log.decode()
    assert isinstance(out, buildlib.BuildOutput), text
    assert "Read-only file system" in text
    for never in ("WROTE SRC", "WROTE WHEELS", "LINKED SRC"):
        assert never not in text
    assert "wrote /etc inside" in text and "wrote through the link inside" in text  # inside: the discarded overlay
    assert tree_digest(source) == before
    assert not os.path.exists(f"/tmp/keg-escape-{tag}")
    assert not os.path.exists("/etc/keg-evil") and not os.path.exists(os.path.join(base_layer, "etc/keg-evil"))
    with open(os.path.join(base_layer, "usr/bin/python3.11"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == python_before
    assert os.path.islink(os.path.join(base_layer, "usr/bin/python3"))
    assert builder.store.kid("/oci-images/debian/bookworm") == base_kid_before
    members = {m.name: m for m in builder.layer(out.image_kid).getmembers()}
    assert members["app/host-root"].issym() and members["app/passwd"].issym()
    assert "app/hard" not in members


def test_a_build_through_a_master(builder, tmp_path):
    """As the builder daemon runs it: the keg is a RemoteKeg; the base layer is reused by pointer, not uploaded."""
    from conftest import MasterProcess, init_keg_with_token
    from master.client import RemoteKeg
    path = str(tmp_path / "remote-keg")
    token = init_keg_with_token(path)
    with keg.Store(path) as store:
        import_debian_base(store)
        pkgs.import_packages(store, [make_wheel(tmp_path, "Demo_Pkg", "1.0.2", payload=b"VALUE = 7\n")])
    server = MasterProcess(path, token)
    remote = RemoteKeg(server.url, token)
    runtime = RuncRuntime(remote, builder.runtime.data_dir, "b1", cgroup_parent=builder.cgroup_parent)
    try:
        source = builder.source({"app.py": PYTHON_APP, "requirements.txt": "demo-pkg\n"})
        work = tempfile.mkdtemp(prefix="work-", dir=builder.tmp)
        log = []
        out = buildlib.build(remote, runtime, "remote", source, SOURCE_KID, work, log.append)
        shutil.rmtree(work)
        assert out.processes == {"web": "python3 app.py"}
        assert remote.kid(out.image_path) == out.image_kid
        assert runtime.image(out.image_kid)["layers"][:-1] == runtime.image(out.base_kid)["layers"]
        assert buildlib.inputs(remote, source)["pkgs"] == remote.kid("/pkgs/pypi")
    finally:
        runtime.close()
        remote.close()
        server.stop()
    with keg.Store(path) as store:
        assert store.exists(f"/oci-images/remote/{SOURCE_KID}/index.json")


def wheel_requiring(directory, dist: str, requires=()) -> str:
    """A pure-Python wheel whose METADATA has Requires-Dist lines."""
    import zipfile
    path = os.path.join(str(directory), f"{dist}-1.0-py3-none-any.whl")
    info = f"{dist}-1.0.dist-info"
    files = {f"{dist}/__init__.py": f"NAME = {dist!r}\n".encode(),
             f"{info}/METADATA": ("Metadata-Version: 2.1\nName: " + dist + "\nVersion: 1.0\n"
                                  + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: keg-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n")
    return path


def test_the_requirements_own_requirements_come_from_pkgs_too(builder, tmp_path):
    top = wheel_requiring(tmp_path, "toplevel", ["middle>=1.0", "extra_only; extra == 'x'"])
    pkgs.import_packages(builder.store, [top, wheel_requiring(tmp_path, "middle"),
                                         wheel_requiring(tmp_path, "needsghost", ["ghost"])])
    source = builder.source({"app.py": "", "requirements.txt": "toplevel\n"})
    out, log, _ = builder.build("deps", source)
    assert isinstance(out, buildlib.BuildOutput), log.decode()
    assert "Staged 2 wheels" in log.decode()
    names = builder.layer(out.image_kid).getnames()
    assert "app/.deps/toplevel/__init__.py" in names and "app/.deps/middle/__init__.py" in names
    source = builder.source({"app.py": "", "requirements.txt": "needsghost\n"})
    out, log, _ = builder.build("ghost", source)
    assert isinstance(out, BuildFailed)
    assert "ghost" in str(out) and "ERROR:" in str(out), str(out)


def test_a_builder_fetches_a_source_again_until_the_master_holds_it(tmp_path, monkeypatch):
    """A builder asked to build a source the master does not hold yet (a Raft replica still fetching it) fetches
    again and checks it out once it is there; one that never comes fails with git's reason."""
    from types import SimpleNamespace

    from builders import builder as builder_module
    from test_push import make_repo, run

    keg_repo = tmp_path / "keg.git"
    run("git", "init", "-q", "--bare", str(keg_repo))
    repo = make_repo(tmp_path / "app", {"app.py": "print('hi')\n"})
    commit = run("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    said = []
    b = builder_module.Builder(SimpleNamespace(path=str(keg_repo)), "b1", str(tmp_path / "b1"), None,
                               say=said.append)
    arrives = threading.Timer(1.2, lambda: run("git", "push", "-q", str(keg_repo), "HEAD:refs/keg/src/hello",
                                               cwd=repo))
    arrives.start()
    try:
        tree = b.checkout(builder_module.Job("hello", "K-" + commit), str(tmp_path / "one" / "src"))
    finally:
        arrives.join()
    assert (tmp_path / "one" / "src" / "app.py").read_text() == "print('hi')\n"
    assert tree == run("git", "rev-parse", "HEAD^{tree}", cwd=repo).stdout.strip()
    assert len(said) >= 2 and all("cannot fetch the source of hello" in line and "trying again" in line
                                  for line in said), said

    monkeypatch.setattr(builder_module, "FETCH_DELAYS", (0.01, 0.01))
    with pytest.raises(keg.errors.KegError, match="cannot fetch the source of never.*refs/keg/src/never"):
        b.checkout(builder_module.Job("never", "K-" + "ab" * 20), str(tmp_path / "two" / "src"))
