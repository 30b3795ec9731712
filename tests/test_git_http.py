"""Stock git over HTTP: clone and fetch the namespace; pushes refused; nothing unreachable served."""

from __future__ import annotations

import subprocess

from httpclient import Client


def _git(*args, cwd=None):
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    return done


def _authed(url: str, token: str) -> str:
    return url.replace("http://", f"http://admin:{token}@") + "/git/keg.git"


def test_clone_and_incremental_fetch_show_the_apis_kids(master_server, tmp_path):
    c = Client(master_server.url, master_server.token)
    first = c.json("PUT", "/v1/keg/apps/web/app.json", '{"release": 1}')[1]
    clone = tmp_path / "clone"
    done = _git("clone", "-q", _authed(master_server.url, master_server.token), str(clone))
    assert done.returncode == 0, done.stderr
    assert (clone / "apps" / "web" / "app.json").read_text() == '{"release": 1}'
    blob = _git("rev-parse", "HEAD:apps/web/app.json", cwd=clone).stdout.strip()
    assert "K-" + blob == first["kids"]["/apps/web/app.json"]
    assert "K-" + _git("rev-parse", "HEAD", cwd=clone).stdout.strip() == first["revision_kid"]
    # More writes, then an incremental fetch brings exactly the new revisions.
    for i in range(5):
        last = c.json("PUT", f"/v1/keg/apps/web/r{i}", str(i))[1]
    done = _git("fetch", "-v", "origin", cwd=clone)
    assert done.returncode == 0, done.stderr
    assert "K-" + _git("rev-parse", "origin/main", cwd=clone).stdout.strip() == last["revision_kid"]
    count = _git("rev-list", "--count", "HEAD..origin/main", cwd=clone).stdout.strip()
    assert count == "5"
    status, headers, _ = c.call("HEAD", "/v1/keg/apps/web")
    tree = _git("rev-parse", "origin/main:apps/web", cwd=clone).stdout.strip()
    assert headers["etag"] == f'"K-{tree}"'
    assert _git("fsck", "--strict", cwd=clone).returncode == 0


def test_push_is_refused_with_a_clear_message(master_server, tmp_path):
    clone = tmp_path / "clone"
    assert _git("clone", "-q", _authed(master_server.url, master_server.token), str(clone)).returncode == 0
    (clone / "sneaky.txt").write_text("x")
    _git("add", "sneaky.txt", cwd=clone)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x", cwd=clone)
    done = _git("push", "origin", "HEAD:main", cwd=clone)
    assert done.returncode != 0 and "read-only: write with transactions" in done.stderr
    assert Client(master_server.url, master_server.token).call("GET", "/v1/keg/sneaky.txt")[0] == 404


def test_no_dumb_http_and_no_objects_by_name(master_server):
    c = Client(master_server.url, master_server.token)
    answer = c.json("PUT", "/v1/keg/x", "secret")[1]
    oid = answer["kids"]["/x"][2:]
    for target in (f"/git/keg.git/objects/{oid[:2]}/{oid[2:]}", "/git/keg.git/objects/info/packs",
                   "/git/keg.git/HEAD"):
        status, _, _ = c.call("GET", target)
        assert status in (403, 404), target
    assert c.call("GET", "/git/other.git/info/refs")[0] == 404
