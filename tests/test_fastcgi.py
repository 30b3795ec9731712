"""The master's HTTP API end to end, through both front ends it ships with.

One smoke test runs twice: against ``keg master serve --listen`` (the
standalone event-loop server), and against nginx from Debian's package in
front of ``keg master serve --fastcgi`` (flup), configured by the server block
of docs/nginx.conf as shipped.  Both masters refuse bodies over ``MAX_BODY``;
nginx is allowed a larger ``NGINX_MAX_BODY``, so a body between the two tests
the master's own 413 through FastCGI and a larger one tests nginx's.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

import pytest

from conftest import REPO, MasterProcess, init_keg_with_token, keg_command

NGINX_CONF = os.path.join(REPO, "docs", "nginx.conf")
MAX_BODY = 64 << 10                 # --max-body of both masters
NGINX_MAX_BODY = 128 << 10          # client_max_body_size of the test's nginx
HEARTBEAT = "0.5"                   # short, so a stream whose client left ends soon
START_TIMEOUT = 20.0
TIMEOUT = 10.0                      # of every request the test makes
WRONG_TOKEN = "kt_0123456789abcdef_" + "x" * 32


# ---------------------------------------------------------------- nginx config

def _top_level_blocks(text: str) -> list:
    """The text of each top-level ``{ … }`` block with its head, skipping quotes and comments."""
    blocks, depth, start, quote, i = [], 0, 0, None, 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            i = text.find("\n", i)
            i = len(text) if i < 0 else i
        elif ch == "{":
            if depth == 0:
                start = text.rfind("\n", 0, i) + 1
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                blocks.append(text[start:i + 1])
        i += 1
    return blocks


def _replace(pattern: str, replacement: str, text: str, at_least: int = 1) -> str:
    """``re.sub`` on lines that must be there: the shipped config drifting must fail the test."""
    out, count = re.subn(pattern, replacement, text, flags=re.M)
    assert count >= at_least, f"docs/nginx.conf has no line matching {pattern!r}"
    return out


def nginx_config(work: str, port: int, socket_path: str) -> str:
    """An nginx.conf that serves docs/nginx.conf's FastCGI server block on 127.0.0.1:``port``."""
    with open(NGINX_CONF, encoding="utf-8") as f:
        blocks = [b for b in _top_level_blocks(f.read()) if "fastcgi_pass" in b]
    assert len(blocks) == 1, "docs/nginx.conf must have exactly one server block with fastcgi_pass"
    server = blocks[0]
    server = _replace(r"^[ \t]*listen\s.*\n", "", server)
    server = _replace(r"^[ \t]*ssl_\w+\s.*\n", "", server)
    server = _replace(r"^([ \t]*)server_name\s.*$", rf"\1server_name localhost;\n\1listen 127.0.0.1:{port};", server)
    server = _replace(r"^([ \t]*)access_log\s.*$", rf"\1access_log {work}/access.log;", server)
    server = _replace(r"^([ \t]*)error_log\s.*$", rf"\1error_log {work}/error.log info;", server)
    server = _replace(r"unix:/run/keg/master\.sock;", f"unix:{socket_path};", server, at_least=3)
    server = _replace(r"^([ \t]*)client_max_body_size 64m;", rf"\1client_max_body_size {NGINX_MAX_BODY};", server)
    # Workers run as nobody unless told otherwise, and could not open the
    # test's socket (mode 0770) in its private temporary directory.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(f"    {kind}_temp_path {work}/{kind}_temp;"
                     for kind in ("client_body", "fastcgi", "proxy", "scgi", "uwsgi"))
    return (f"{user}worker_processes 1;\npid {work}/nginx.pid;\nerror_log {work}/error.log info;\n"
            f"events {{ worker_connections 256; }}\nhttp {{\n{temp}\n    access_log {work}/access.log;\n"
            f"{server}\n}}\n")


def test_shipped_config_body_limit_matches_the_master():
    from master.app import MAX_BODY as MASTER_DEFAULT
    with open(NGINX_CONF, encoding="utf-8") as f:
        sizes = re.findall(r"^\s*client_max_body_size (\d+)m;", f.read(), re.M)
    assert sizes and all(int(size) << 20 == MASTER_DEFAULT for size in sizes)


# ---------------------------------------------------------------- front ends

@dataclass
class FrontEnd:
    """Where the tests send their requests; ``stop_master()`` SIGTERMs the master and returns its exit status."""

    url: str
    token: str
    stop_master: Callable[[], int]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_connectable(family, address, proc, what: str, log_path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(address)
                return
            except OSError:
                time.sleep(0.02)
    with open(log_path, errors="replace") as log:
        raise AssertionError(f"{what} did not start: {log.read()}")


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture
def standalone(keg_dir):
    """``keg master serve --listen`` on a free loopback port."""
    token = init_keg_with_token(keg_dir)
    server = MasterProcess(keg_dir, token, extra=["--max-body", str(MAX_BODY), "--heartbeat", HEARTBEAT])

    def stop_master() -> int:
        server.stop()
        return server.proc.returncode

    yield FrontEnd(server.url, token, stop_master)
    assert stop_master() == 0


@pytest.fixture
def fastcgi_master(keg_dir, tmp_path):
    """``keg master serve --fastcgi SOCK``: ``(socket path, admin token, stop_master)``."""
    token = init_keg_with_token(keg_dir)
    sock = str(tmp_path / "master.sock")
    log_path = str(tmp_path / "fastcgi-master.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*keg_command(), "master", "serve", "--keg", keg_dir, "--fastcgi", sock,
                                 "--max-body", str(MAX_BODY), "--heartbeat", HEARTBEAT],
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        _wait_connectable(socket.AF_UNIX, sock, proc, "keg master serve --fastcgi", log_path)
        yield sock, token, lambda: _stop(proc)
    finally:
        _stop(proc)
    assert proc.returncode == 0, open(log_path).read()


@pytest.fixture
def behind_nginx(fastcgi_master, tmp_path):
    """nginx on a free loopback port, in front of the FastCGI master, as docs/nginx.conf says."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert os.path.exists(nginx), "nginx is not installed; run ./install.sh"
    sock, token, stop_master = fastcgi_master
    work = tmp_path / "nginx"
    work.mkdir()
    port = _free_port()
    conf = work / "nginx.conf"
    conf.write_text(nginx_config(str(work), port, sock))
    with open(work / "stderr.log", "w") as err:
        proc = subprocess.Popen([nginx, "-c", str(conf), "-p", f"{work}/", "-g", "daemon off;"],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        _wait_connectable(socket.AF_INET, ("127.0.0.1", port), proc, "nginx", str(work / "stderr.log"))
        yield FrontEnd(f"http://127.0.0.1:{port}", token, stop_master)
    finally:
        _stop(proc, signal.SIGQUIT)     # nginx's graceful stop


@pytest.fixture(params=["standalone", "nginx+fastcgi"])
def front_end(request):
    """Each front end in turn."""
    return request.getfixturevalue("standalone" if request.param == "standalone" else "behind_nginx")


# ---------------------------------------------------------------- HTTP

@dataclass
class Reply:
    """A whole answer; header names in lower case."""

    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


class Api:
    """Requests to one front end with http.client, which sends the target exactly as given."""

    def __init__(self, front: FrontEnd):
        parsed = urllib.parse.urlsplit(front.url)
        self.host, self.port = parsed.hostname, parsed.port
        self.token = front.token

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)

    def auth(self, token="admin") -> dict:
        token = self.token if token == "admin" else token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def request(self, method: str, target: str, body=None, headers=None, token="admin") -> Reply:
        conn = self.connect()
        try:
            conn.request(method, target, body=body, headers={**self.auth(token), **(headers or {})})
            response = conn.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def put(self, path: str, data: bytes, **headers) -> Reply:
        return self.request("PUT", "/v1/keg" + path, data, {k.replace("_", "-"): v for k, v in headers.items()})

    def get(self, target: str) -> Reply:
        return self.request("GET", target)


def git_blob_kid(data: bytes) -> str:
    """The KID of a file holding ``data``: its git blob id."""
    return "K-" + hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def assert_error(reply: Reply, status: int) -> None:
    """An error answer: the status, and a JSON body that says it."""
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert body["status"] == status and body["error"]


# ---------------------------------------------------------------- the checks

def check_put_then_get(api: Api) -> str:
    put = api.put("/smoke/hello.txt", b"hello\n")
    assert put.status == 200, put.body
    kid = git_blob_kid(b"hello\n")
    assert put.headers["etag"] == f'"{kid}"' and put.json()["kids"]["/smoke/hello.txt"] == kid
    revision = put.json()["revision"]
    assert put.headers["keg-revision"] == str(revision)

    got = api.get("/v1/keg/smoke/hello.txt")
    assert (got.status, got.body) == (200, b"hello\n")
    assert got.headers["etag"] == f'"{kid}"'
    assert got.headers["keg-revision"] == str(revision)
    assert got.headers["content-type"].startswith("text/plain")

    # A chunked body (git sends large requests so) arrives whole, with no Content-Length.
    chunked = api.request("PUT", "/v1/keg/smoke/chunked", iter([b"one ", b"two ", b"three\n"]))
    assert chunked.status == 200, chunked.body
    assert api.get("/v1/keg/smoke/chunked").body == b"one two three\n"
    assert api.request("DELETE", "/v1/keg/smoke/chunked").status == 200

    head = api.request("HEAD", "/v1/keg/smoke/hello.txt")
    assert (head.status, head.body, head.headers["etag"]) == (200, b"", f'"{kid}"')
    assert head.headers["content-length"] == "6"
    return kid


def check_listing(api: Api, kid: str) -> None:
    listing = api.get("/v1/keg/smoke")
    assert listing.status == 200 and listing.headers["content-type"] == "application/json"
    body = listing.json()
    assert (body["path"], body["kind"]) == ("/smoke", "tree")
    assert [(e["name"], e["kind"], e["kid"], e["size"]) for e in body["entries"]] == \
        [("hello.txt", "file", kid, 6)]


def check_conditional_writes(api: Api, kid: str) -> None:
    wrong = "K-" + "0" * 40
    refused = api.put("/smoke/hello.txt", b"clobbered\n", If_Match=f'"{wrong}"')
    assert_error(refused, 412)
    assert refused.json()["failed_compare"] == {"path": "/smoke/hello.txt", "expected": wrong, "actual": kid}
    assert_error(api.put("/smoke/hello.txt", b"clobbered\n", If_None_Match="*"), 412)
    assert api.get("/v1/keg/smoke/hello.txt").body == b"hello\n"

    swapped = api.put("/smoke/hello.txt", b"hello again\n", If_Match=f'"{kid}"')
    assert swapped.status == 200, swapped.body
    assert swapped.headers["etag"] == '"%s"' % git_blob_kid(b"hello again\n")
    created = api.put("/smoke/new.txt", b"new\n", If_None_Match="*")
    assert created.status == 200, created.body


def check_transaction_log_and_diff(api: Api) -> None:
    before = api.get("/v1/head").json()["revision"]
    tx = {"ops": [{"op": "put", "path": "/smoke/tx/a", "value": "A"},
                  {"op": "put", "path": "/smoke/tx/b", "value": "B"},
                  {"op": "delete", "path": "/smoke/new.txt"}],
          "compare": [{"path": "/smoke/tx/a", "kid": None}]}
    done = api.request("POST", "/v1/tx", json.dumps(tx), {"Content-Type": "application/json"})
    assert done.status == 200, done.body
    result = done.json()
    assert result["ok"] and result["revision"] == before + 1
    assert api.get("/v1/keg/smoke/tx/b").body == b"B"
    assert api.get("/v1/keg/smoke/new.txt").status == 404

    log = api.get("/v1/log?path=/smoke/tx/a")
    assert log.status == 200
    assert [(e["revision"], e["path_kid"]) for e in log.json()] == [(result["revision"], git_blob_kid(b"A"))]

    diff = api.get(f"/v1/diff?from={before}&prefix=/smoke")
    assert diff.status == 200
    assert sorted((c["path"], c["new_kid"]) for c in diff.json()) == [
        ("/smoke/new.txt", None), ("/smoke/tx/a", git_blob_kid(b"A")), ("/smoke/tx/b", git_blob_kid(b"B"))]


def check_tokens(api: Api) -> None:
    anonymous = api.request("GET", "/v1/keg/smoke/hello.txt", token=None)
    assert_error(anonymous, 401)
    assert anonymous.headers["www-authenticate"].startswith("Basic")
    assert_error(api.request("GET", "/v1/keg/smoke/hello.txt", token=WRONG_TOKEN), 401)
    assert_error(api.request("PUT", "/v1/keg/smoke/evil", b"x", token=WRONG_TOKEN), 401)
    assert api.get("/v1/keg/smoke/evil").status == 404
    assert api.get("/v1/whoami").json()["name"] == "admin"


def check_bad_paths(api: Api) -> None:
    for target in ("/v1/keg/smoke/../escape", "/v1/keg/smoke/%2e%2E/escape", "/v1/keg/smoke/..%2fescape",
                   "/v1/keg/smoke/./escape", "/v1/keg/smoke//escape"):
        assert_error(api.request("PUT", target, b"x"), 400)
        assert_error(api.request("GET", target), 400)
    for path in ("/escape", "/smoke/escape"):
        assert api.get("/v1/keg" + path).status == 404
    for name in (".hidden", "..data", "..."):    # dots that do not make a segment '.' or '..'
        assert api.put(f"/smoke/dots/{name}", b"dots\n").status == 200
    assert [e["name"] for e in api.get("/v1/keg/smoke/dots").json()["entries"]] == ["...", "..data", ".hidden"]
    # Decoded once, never twice: '%252e' is a file named '%2e'; UTF-8 names arrive whole.
    assert api.put("/smoke/%252e", b"percent\n").status == 200
    assert api.put("/smoke/%C3%A9t%C3%A9", b"summer\n").status == 200
    names = [e["name"] for e in api.get("/v1/keg/smoke").json()["entries"]]
    assert "%2e" in names and "\u00e9t\u00e9" in names
    assert api.get("/v1/keg/smoke/%C3%A9t%C3%A9").body == b"summer\n"


def check_body_limits(api: Api) -> None:
    # MAX_BODY + 1 is refused by the master itself (nginx lets it through);
    # NGINX_MAX_BODY + 1 by nginx when it is there, else by the master.
    for size in (MAX_BODY + 1, NGINX_MAX_BODY + 1):
        assert_error(api.put("/smoke/big", b"x" * size), 413)
    assert api.get("/v1/keg/smoke/big").status == 404
    assert api.put("/smoke/big", b"x" * MAX_BODY).status == 200


def _write_later(api: Api, path: str, data: bytes, results: list) -> threading.Thread:
    """PUT from another thread, as another client would, appending the reply to ``results``."""
    thread = threading.Thread(target=lambda: results.append(api.put(path, data)))
    thread.start()
    return thread


def check_long_poll(api: Api) -> None:
    since = api.get("/v1/head").json()["revision"]
    conn = api.connect()
    try:
        conn.request("GET", f"/v1/watch?format=poll&since={since}&wait=5", headers=api.auth())
        response = conn.getresponse()   # the headers come at once; the answer waits for a change
        assert response.status == 200 and response.getheader("Keg-Revision") == str(since)
        started = time.monotonic()
        written: list = []
        writer = _write_later(api, "/smoke/polled", b"polled\n", written)
        answer = json.loads(response.read())
        writer.join()
    finally:
        conn.close()
    assert time.monotonic() - started < 4.5, "the long poll ran into its wait instead of waking"
    assert written[0].status == 200
    assert answer["revision"] == since + 1
    assert [(e["path"], e["new_kid"]) for e in answer["events"]] == [("/smoke/polled", git_blob_kid(b"polled\n"))]


def check_ndjson_stream(api: Api) -> None:
    conn = api.connect()
    try:
        conn.request("GET", "/v1/watch?format=ndjson&prefix=/smoke/stream", headers=api.auth())
        response = conn.getresponse()   # the stream is open from here on: no event after this is missed
        assert response.status == 200 and response.getheader("Content-Type") == "application/x-ndjson"
        written: list = []
        writers = [_write_later(api, f"/smoke/stream/{i}", b"%d" % i, written) for i in range(3)]
        events = []
        while len(events) < 3:
            line = response.readline()
            assert line, "the stream ended"
            obj = json.loads(line)
            if not obj.get("heartbeat"):
                events.append(obj)
        for writer in writers:
            writer.join()
    finally:
        conn.close()
    assert all(w.status == 200 for w in written)
    assert sorted((e["path"], e["new_kid"], e["action"]) for e in events) == [
        (f"/smoke/stream/{i}", git_blob_kid(b"%d" % i), "create") for i in range(3)]
    assert all(e["revision"] > int(response.getheader("Keg-Revision")) for e in events)


def check_git_clone(api: Api, front: FrontEnd, tmp_path) -> None:
    etag = api.get("/v1/keg/smoke/tx/a").headers["etag"]
    parsed = urllib.parse.urlsplit(front.url)
    url = f"http://admin:{front.token}@{parsed.netloc}/git/keg.git"
    clone = str(tmp_path / "clone")
    done = subprocess.run(["git", "clone", "-q", url, clone], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    kid = subprocess.run(["git", "-C", clone, "rev-parse", "HEAD:smoke/tx/a"], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert etag == f'"K-{kid}"'
    with open(os.path.join(clone, "smoke", "hello.txt"), "rb") as f:
        assert f.read() == b"hello again\n"
    pushed = subprocess.run(["git", "-C", clone, "push", "-q", "origin", "HEAD:main"], capture_output=True,
                            text=True, timeout=60)
    assert pushed.returncode != 0 and "read-only" in pushed.stderr


def test_api_smoke(front_end, tmp_path):
    api = Api(front_end)
    kid = check_put_then_get(api)
    check_listing(api, kid)
    check_conditional_writes(api, kid)
    check_transaction_log_and_diff(api)
    check_tokens(api)
    check_bad_paths(api)
    check_body_limits(api)
    check_long_poll(api)
    check_ndjson_stream(api)
    check_git_clone(api, front_end, tmp_path)


def test_stop_with_an_open_watch_stream(front_end):
    """SIGTERM stops the master cleanly while a client watches, and the client sees its stream end."""
    api = Api(front_end)
    conn = api.connect()
    try:
        conn.request("GET", "/v1/watch?format=ndjson", headers=api.auth())
        response = conn.getresponse()
        assert response.status == 200
        started = time.monotonic()
        assert front_end.stop_master() == 0
        assert time.monotonic() - started < 12, "the master took too long to stop"
        try:
            while response.readline():
                pass
        except http.client.IncompleteRead:
            pass        # nginx cuts a chunked answer whose upstream went away
    finally:
        conn.close()
