"""The master over real HTTP on loopback: reads, CAS, transactions, many clients, crashes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time

import keg

import pytest

from conftest import MasterProcess, git, init_keg_with_token, keg_command
from httpclient import Client


@pytest.fixture(params=["single", "raft"])
def master_server(request, keg_dir, tmp_path):
    """The same suite against a single-node master and against a replica of a 3-replica Raft master."""
    if request.param == "single":
        server = MasterProcess(keg_dir, init_keg_with_token(keg_dir))
        yield server
        server.stop()
        return
    from raft_harness import RaftMasterServer
    server = RaftMasterServer(str(tmp_path / "raft"))
    yield server
    server.close()


def test_put_get_etag_is_kid_and_listing(master_server):
    c = Client(master_server.url, master_server.token)
    status, headers, body = c.call("PUT", "/v1/keg/apps/web/app.json", b'{"release": 1}')
    assert status == 200
    answer = json.loads(body)
    kid = answer["kids"]["/apps/web/app.json"]
    assert headers["etag"] == f'"{kid}"' and headers["keg-revision"] == str(answer["revision"])
    status, headers, body = c.call("GET", "/v1/keg/apps/web/app.json")
    assert status == 200 and body == b'{"release": 1}' and headers["etag"] == f'"{kid}"'
    assert headers["content-type"] == "application/json" and headers["keg-kind"] == "file"
    status, _, _ = c.call("GET", "/v1/keg/apps/web/app.json", headers={"If-None-Match": f'"{kid}"'})
    assert status == 304
    status, listing = c.json("GET", "/v1/keg/apps/web")
    assert status == 200 and [e["name"] for e in listing["entries"]] == ["app.json"]
    assert listing["entries"][0]["kid"] == kid
    # Time travel: the previous revision did not have it.
    status, err = c.json("GET", f"/v1/keg/apps/web/app.json?rev={answer['revision'] - 1}")
    assert status == 404 and "does not exist" in err["error"]
    status, err = c.json("GET", "/v1/keg/nope")
    assert status == 404 and err["error_type"] == "NotFound"


def test_a_listing_with_values_carries_small_files_in_one_request(master_server):
    """``?values=1``: each small file's bytes in its entry (text, or base64 when not UTF-8), none for a
    directory or a file over 64 KiB; ``RemoteKeg.list_values`` gives what ``Store.list_values`` gives."""
    from master.client import RemoteKeg
    c = Client(master_server.url, master_server.token)
    big = b"x" * (64 * 1024 + 1)
    for path, data in (("/t/a.json", b'{"a": 1}'), ("/t/bin", b"\xff\x00\x01"), ("/t/big", big),
                       ("/t/sub/x", b"deep")):
        assert c.call("PUT", f"/v1/keg{path}", data)[0] == 200
    status, listing = c.json("GET", "/v1/keg/t?values=1")
    assert status == 200
    entries = {e["name"]: e for e in listing["entries"]}
    assert entries["a.json"]["value"] == '{"a": 1}' and entries["bin"]["value_base64"] == "/wAB"
    assert "value" not in entries["big"] and "value_base64" not in entries["big"]
    assert "value" not in entries["sub"] and entries["sub"]["kind"] == "tree"
    assert "value" not in c.json("GET", "/v1/keg/t")[1]["entries"][0]  # only when asked
    remote = RemoteKeg(master_server.url, master_server.token)
    got = {e.name: (e.kind, value) for e, value in remote.list_values("/t")}
    assert got == {"a.json": ("file", b'{"a": 1}'), "bin": ("file", b"\xff\x00\x01"), "big": ("file", None),
                   "sub": ("tree", None)}
    with pytest.raises(keg.BadRequest, match="is a file"):
        remote.list_values("/t/a.json")
    remote.close()


def test_cas_conflicts_return_412_and_change_nothing(master_server):
    c = Client(master_server.url, master_server.token)
    status, answer = c.json("PUT", "/v1/keg/counter", "0")
    base = answer["kids"]["/counter"]
    results = []

    def contender(i):
        mine = Client(master_server.url, master_server.token)
        status, body = mine.json("PUT", "/v1/keg/counter", f"from {i}", headers={"If-Match": f'"{base}"'})
        results.append((status, i, body))
        mine.close()

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r[0] == 200]
    losers = [r for r in results if r[0] == 412]
    assert len(winners) == 1 and len(losers) == 23
    assert all(body["failed_compare"]["path"] == "/counter" for _, _, body in losers)
    assert c.call("GET", "/v1/keg/counter")[2] == f"from {winners[0][1]}".encode()
    head = c.head_revision()
    status, _ = c.json("PUT", "/v1/keg/counter", "again", headers={"If-None-Match": "*"})
    assert status == 412 and c.head_revision() == head
    status, answer = c.json("POST", "/v1/tx", json.dumps(
        {"compare": [{"path": "/counter", "kid": base}], "ops": [{"op": "put", "path": "/other", "value": "x"}]}))
    assert status == 412 and answer["ok"] is False and c.head_revision() == head
    assert c.call("GET", "/v1/keg/other")[0] == 404


def test_bad_requests_say_what_was_wrong(master_server):
    c = Client(master_server.url, master_server.token)
    head = c.head_revision()
    status, err = c.json("POST", "/v1/tx", "{not json")
    assert status == 400 and "not valid JSON" in err["error"]
    status, err = c.json("POST", "/v1/tx", json.dumps({"ops": [{"op": "move", "path": "/a"}]}))
    assert status == 400 and "unknown op" in err["error"]
    status, err = c.json("PUT", "/v1/keg/a", "1", headers={"If-Match": '"K-xyz"'})
    assert status == 400 and "K-xyz" in err["error"]
    status, err = c.json("GET", "/v1/keg/a?rev=banana")
    assert status == 400
    status, err = c.json("PATCH", "/v1/keg/a", "1")
    assert status == 405
    c.json("PUT", "/v1/keg/f", "file")
    status, err = c.json("PUT", "/v1/keg/f/under", "x")
    assert status == 409 and err["error_type"] == "PathConflict"
    assert c.head_revision() == head + 1


def test_log_diff_kid_and_openapi(master_server):
    c = Client(master_server.url, master_server.token)
    first = c.json("PUT", "/v1/keg/d/a.txt", "a")[1]
    second = c.json("PUT", "/v1/keg/d/a.txt", "b")[1]
    status, log = c.json("GET", "/v1/log?path=/d/a.txt")
    assert status == 200 and [e["revision"] for e in log] == [second["revision"], first["revision"]]
    assert log[0]["author"].startswith("admin <")
    status, changes = c.json("GET", f"/v1/diff?from={first['revision']}&prefix=/d")
    assert changes == [{"path": "/d/a.txt", "old_kid": first["kids"]["/d/a.txt"],
                        "new_kid": second["kids"]["/d/a.txt"]}]
    status, found = c.json("GET", "/v1/kid/" + second["revision_kid"][:12])
    assert status == 200 and found["kind"] == "revision" and found["revision"] == second["revision"]
    status, spec = c.json("GET", "/v1/openapi.json", token=None)
    assert status == 200 and spec["openapi"].startswith("3.")
    for route in ("/v1/keg/{path}", "/v1/tx", "/v1/log", "/v1/diff", "/v1/kid/{kid}", "/v1/watch",
                  "/v1/chunks/{blake3}"):
        assert route in spec["paths"]


def test_status_says_the_role_revision_and_housekeeping(master_server):
    """``GET /v1/status`` on either master, and ``keg master status`` built on it."""
    c = Client(master_server.url, master_server.token)
    written = c.json("PUT", "/v1/keg/s/a.txt", "a")[1]
    status, found = c.json("GET", "/v1/status")
    assert status == 200 and found["revision"] >= written["revision"]
    assert found["housekeeping"]["checkpoint_error"] is None and found["housekeeping"]["repack_error"] is None
    if isinstance(master_server, MasterProcess):
        assert (found["mode"], found["role"]) == ("single", "single")
    else:
        assert found["mode"] == "raft" and found["role"] in ("leader", "follower")
    assert c.json("GET", "/v1/status", token=None)[0] == 401
    assert c.json("POST", "/v1/status", b"")[0] == 405
    done = subprocess.run([*keg_command(), "master", "status", "--url", master_server.url],
                          env={**os.environ, "KEG_TOKEN": master_server.token}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "URL\tRAFT\tROLE\tTERM\tCOMMIT\tAPPLIED\tREVISION\tLAG"
    if found["mode"] == "single":
        assert len(lines) == 2 and lines[1].startswith(f"{master_server.url}\t-\tsingle\t-\t-\t-\t")
    else:
        assert len(lines) == 4 and sorted(line.split("\t")[2] for line in lines[1:]).count("leader") == 1


def test_status_asks_a_master_older_than_v1_status_what_it_answers():
    """``fetch_status`` (keg master status) against masters that predate ``/v1/status``: a replica's
    ``/v1/raft/status``, a single master's head; an answer that is not a JSON object is refused."""
    import http.server

    from master.client import fetch_status

    answers = {}

    class Old(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = answers.get(self.path)
            self.send_response(404 if body is None else 200)
            data = b'{"error": "no such endpoint"}' if body is None else json.dumps(body).encode()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Old)
    server.timeout = 0.2
    url = f"http://127.0.0.1:{server.server_port}"

    def ask():
        """fetch_status's answer, or what it raised."""
        done = []

        def run():
            try:
                done.append(fetch_status(url, "t", timeout=5))
            except (OSError, ValueError) as err:
                done.append(err)
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            server.handle_request()   # one request, or none within server.timeout
        thread.join(10)
        return done[0] if done else None

    try:
        answers["/v1/head"] = {"revision": 7, "kid": "K-abc"}
        assert ask() == {"mode": "single", "role": "single", "revision": 7, "revision_kid": "K-abc", "term": None,
                         "commit_index": None, "url": url}
        answers["/v1/raft/status"] = {"mode": "raft", "role": "leader", "url": "http://keg1:7480", "revision": 9}
        assert ask() == answers["/v1/raft/status"]
        answers["/v1/status"] = ["not", "an", "object"]
        refused = ask()
        assert isinstance(refused, ValueError) and "answered list JSON, not a status object" in str(refused)
    finally:
        server.server_close()


def test_chunks_are_verified(master_server):
    import blake3
    c = Client(master_server.url, master_server.token)
    data = os.urandom(5000)
    name = blake3.blake3(data).hexdigest()
    assert c.call("PUT", f"/v1/chunks/{name}", data)[0] == 201
    assert c.call("PUT", f"/v1/chunks/{name}", data)[0] == 200
    assert c.call("GET", f"/v1/chunks/{name}")[2] == data
    status, _, body = c.call("PUT", f"/v1/chunks/{'0' * 64}", data)
    assert status == 400 and b"hashes to" in body
    assert c.call("GET", f"/v1/chunks/{'0' * 64}")[0] == 404
    assert c.call("GET", "/v1/chunks/XYZ")[0] == 400


def test_many_clients_at_once_all_get_their_own_answer(master_server):
    results = {}

    def writer(n):
        mine = Client(master_server.url, master_server.token)
        for i in range(40):
            path = f"/load/w{n}/k{i}"
            status, answer = mine.json("PUT", "/v1/keg" + path, f"{n}:{i}")
            assert status == 200
            results[path] = (answer["revision"], answer["kids"][path])
        mine.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 * 40
    c = Client(master_server.url, master_server.token)
    head = c.head_revision()
    # Group commit: fewer revisions than requests, and every answer names the revision that holds it.
    assert head - 1 < 640, head
    for path, (revision, kid) in random.sample(sorted(results.items()), 50):
        status, headers, _ = c.call("HEAD", f"/v1/keg{path}?rev={revision}")
        assert status == 200 and headers["etag"] == f'"{kid}"'


def test_sigkill_mid_load_loses_no_acknowledged_write(master_server):
    acked = {}
    stop = threading.Event()

    def writer(n):
        mine = Client(master_server.url, master_server.token, timeout=5)
        i = 0
        while not stop.is_set():
            path = f"/crash/w{n}/k{i}"
            try:
                status, answer = mine.json("PUT", "/v1/keg" + path, f"value {n} {i}")
            except (OSError, ValueError):
                return  # the server died under us: this write was not acknowledged
            if status == 200:
                acked[path] = (answer["revision"], answer["kids"][path], f"value {n} {i}")
            i += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    master_server.proc.send_signal(signal.SIGKILL)
    master_server.proc.wait()
    stop.set()
    for t in threads:
        t.join()
    assert len(acked) > 100
    master_server.start()
    c = Client(master_server.url, master_server.token)
    for path, (revision, kid, value) in acked.items():
        status, headers, body = c.call("GET", f"/v1/keg{path}")
        assert status == 200 and body == value.encode() and headers["etag"] == f'"{kid}"', path
        assert c.call("HEAD", f"/v1/keg{path}?rev={revision}")[1]["etag"] == f'"{kid}"'
    # Writes go on after the restart, and the keg is a valid git repository.
    assert c.json("PUT", "/v1/keg/after", "ok")[0] == 200
    master_server.stop()
    assert git(master_server.keg_path, "fsck", "--strict").returncode == 0
    store = keg.Store(master_server.keg_path)
    for path, (revision, kid, value) in acked.items():
        assert store.kid(path, revision) == kid
    store.close()


def test_http_details_keep_alive_pipelining_and_head(master_server):
    import socket
    host, port = master_server.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port))) as s:
        auth = f"Authorization: Bearer {master_server.token}\r\n"
        s.sendall((f"PUT /v1/keg/p1 HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1\r\n\r\n1"
                   f"GET /v1/keg/p1 HTTP/1.1\r\nHost: x\r\n{auth}\r\n"
                   f"HEAD /v1/keg/p1 HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").encode())
        data = b""
        while True:
            got = s.recv(65536)
            if not got:
                break
            data += got
    answers = data.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"200", b"200"]
    assert answers[1].endswith(b"\r\n\r\n1") and answers[2].endswith(b"\r\n\r\n")
    assert b"Content-Length: 1\r\n" in answers[2]


def test_stalled_client_does_not_block_others(master_server):
    import socket
    host, port = master_server.url.rsplit("/", 1)[1].split(":")
    stalled = socket.create_connection((host, int(port)))
    stalled.sendall(b"PUT /v1/keg/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly a part")
    c = Client(master_server.url, master_server.token, timeout=5)
    started = time.monotonic()
    for i in range(20):
        assert c.json("PUT", f"/v1/keg/fast/{i}", "x")[0] == 200
    assert time.monotonic() - started < 5
    stalled.close()


def test_sigterm_stops_cleanly_and_the_keg_is_current_on_disk(master_server):
    c = Client(master_server.url, master_server.token)
    for i in range(30):
        last = c.json("PUT", f"/v1/keg/t/{i}", str(i))[1]
    master_server.stop()
    assert master_server.proc.returncode == 0
    # The journal was checkpointed: stock git sees the last acknowledged revision.
    assert "K-" + git(master_server.keg_path, "rev-parse", "main").stdout.strip() == last["revision_kid"]
    store = keg.Store(master_server.keg_path)
    assert store.read("/t/29") == b"29"
