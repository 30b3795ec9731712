"""The POSIX view: `keg checkout` writes a subtree as files, `keg sync` keeps both sides in step."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

import keg
from keg import posix
from keg.transaction import Transaction, delete, put
from master.client import RemoteKeg

from conftest import keg_command
from test_cli import run

SCRIPT = """set -e
cd "$1"
echo 'hello from bash' > new.txt
sed -i 's/one/ONE/' conf/app.conf
rm old.txt
mkdir -p made/deeper
echo deep > made/deeper/file.txt
"""


def _put(store, *ops) -> int:
    result = store.apply(Transaction(tuple(ops)))
    assert result.ok, result.error
    return result.revision


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _files(directory) -> dict:
    """Relative path -> bytes of every regular file, outside .keg/."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if d != ".keg"]
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                out[os.path.relpath(full, directory)] = _read(full)
    return out


def _until(condition, timeout: float, what: str, interval: float = 0.01):
    """Poll ``condition`` until it returns something true; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _cat(remote, path):
    try:
        return remote.read(path)
    except keg.NotFound:
        return None


@pytest.fixture
def said():
    """Collects what a checkout or sync says to the user."""
    return []


# ------------------------------------------------------------- local keg

def test_checkout_writes_the_subtree_as_files(store, tmp_path, said):
    _put(store, put("/app/a.txt", "alpha\n"), put("/app/conf/app.conf", "one = 1\n"),
         put("/app/bin/run", "#!/bin/sh\necho run\n", 0o100755), put("/app/link", "conf/app.conf", 0o120000),
         put("/app/escape", "../../etc/passwd", 0o120000), put("/app/other-keg", bytes(20), 0o160000),
         put("/elsewhere.txt", "not here"))
    co = tmp_path / "co"
    done = posix.checkout(store, "/app", str(co), say=said.append)
    assert _files(co) == {"a.txt": b"alpha\n", os.path.join("conf", "app.conf"): b"one = 1\n",
                          os.path.join("bin", "run"): b"#!/bin/sh\necho run\n", "escape": b"../../etc/passwd"}
    assert os.stat(co / "bin" / "run").st_mode & 0o111 and not os.stat(co / "a.txt").st_mode & 0o111
    assert os.readlink(co / "link") == "conf/app.conf" and _read(co / "link") == b"one = 1\n"
    assert not os.path.islink(co / "escape")
    assert any("outside the checkout" in line and "/app/escape" in line for line in said)
    assert not os.path.lexists(co / "other-keg") and any("/app/other-keg: a pointer" in line for line in said)
    assert (done.files, done.links) == (3, 2)
    state = json.loads(_read(co / ".keg" / "sync.json"))
    assert state["source"] == {"keg": store.path} and state["prefix"] == "/app"
    assert state["files"]["a.txt"]["kid"] == store.kid("/app/a.txt")
    subprocess.run(["./bin/run"], cwd=co, check=True, capture_output=True)


def test_large_value_checkout_and_push_stream_the_real_bytes(store, tmp_path):
    big = os.urandom(3 << 20)
    _put(store, put("/big/blob.bin", big))
    assert store.stat("/big/blob.bin").large
    co = tmp_path / "co"
    posix.checkout(store, "/big", str(co))
    assert _read(co / "blob.bin") == big
    changed = big[:1000] + b"edited" + big[1006:]
    with open(co / "blob.bin", "r+b") as f:
        f.seek(1000)
        f.write(b"edited")
    with posix.Sync(store, str(co), say=lambda line: None) as sync:
        report = sync.step()
    assert report.pushed == 1
    entry = store.stat("/big/blob.bin")
    assert entry.large and store.read("/big/blob.bin") == changed


def test_checkout_refuses_a_directory_that_holds_files(store, tmp_path):
    _put(store, put("/a/x", "x"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    with pytest.raises(posix.DirectoryNotEmpty, match="not empty and not a checkout"):
        posix.checkout(store, "/a", str(busy))
    assert os.listdir(busy) == ["mine.txt"]
    posix.checkout(store, "/a", str(tmp_path / "co"))
    with pytest.raises(posix.DirectoryNotEmpty, match="already a checkout"):
        posix.checkout(store, "/a", str(tmp_path / "co"))
    store.checkpoint()  # another process (the command) sees checkpointed revisions only
    code, _, err = run("checkout", "/a/x", str(tmp_path / "file"), "--keg", store.path)
    assert code == 2 and "not a directory" in err


def test_step_pushes_edits_creates_deletes_and_pulls_remote_changes(store, tmp_path, said):
    _put(store, put("/p/keep.txt", "keep"), put("/p/edit.txt", "v1"), put("/p/gone.txt", "bye"))
    co = tmp_path / "co"
    posix.checkout(store, "/p", str(co))
    sync = posix.Sync(store, str(co), say=said.append)
    assert sync.scan_local() == []  # everything as checked out: nothing to do
    (co / "edit.txt").write_text("v2")
    (co / "gone.txt").unlink()
    (co / "sub" / "dir").mkdir(parents=True)
    (co / "sub" / "dir" / "new.txt").write_text("new")
    (co / "notes.txt.swp").write_text("editor junk")
    changes = sync.scan_local()
    assert [(c.path, c.action) for c in changes] == [("edit.txt", "put"), ("gone.txt", "delete"),
                                                      ("sub/dir/new.txt", "put")]
    result = sync.push(changes)
    assert result.ok
    assert store.read("/p/edit.txt") == b"v2" and store.read("/p/sub/dir/new.txt") == b"new"
    assert not store.exists("/p/gone.txt") and not store.exists("/p/notes.txt.swp")
    _put(store, put("/p/keep.txt", "changed in the keg"), delete("/p/sub", recursive=True),
         put("/p/from/keg.txt", "remote"))
    assert sync.pull() == 3
    assert _files(co) == {"keep.txt": b"changed in the keg", "edit.txt": b"v2",
                          os.path.join("from", "keg.txt"): b"remote", "notes.txt.swp": b"editor junk"}
    assert not (co / "sub").exists()  # emptied directories go too
    assert sync.step().pushed == 0


def test_conflicts_keep_both_versions_and_say_so(store, tmp_path, said):
    _put(store, put("/c/both.txt", "base"), put("/c/deleted-there.txt", "base"), put("/c/deleted-here.txt", "base"))
    co = tmp_path / "co"
    posix.checkout(store, "/c", str(co))
    sync = posix.Sync(store, str(co), say=said.append)
    (co / "both.txt").write_text("mine")
    (co / "deleted-there.txt").write_text("mine too")
    (co / "deleted-here.txt").unlink()
    _put(store, put("/c/both.txt", "theirs"), delete("/c/deleted-there.txt"), put("/c/deleted-here.txt", "theirs"))
    report = sync.step()
    names = sorted(os.listdir(co))
    copy_both = next(n for n in names if n.startswith("both.txt.conflict-"))
    copy_gone = next(n for n in names if n.startswith("deleted-there.txt.conflict-"))
    assert (co / "both.txt").read_text() == "theirs" and (co / copy_both).read_text() == "mine"
    assert (co / copy_gone).read_text() == "mine too" and not (co / "deleted-there.txt").exists()
    assert (co / "deleted-here.txt").read_text() == "theirs"
    assert len(report.conflicts) == 2
    assert any(line.startswith("keg sync: conflict on /c/both.txt") and copy_both in line for line in said)
    assert store.read(f"/c/{copy_both}") == b"mine"  # the local version reached the keg too
    assert store.read("/c/both.txt") == b"theirs"


def test_same_change_on_both_sides_is_not_a_conflict(store, tmp_path, said):
    _put(store, put("/s/a.txt", "base"))
    co = tmp_path / "co"
    posix.checkout(store, "/s", str(co))
    sync = posix.Sync(store, str(co), say=said.append)
    (co / "a.txt").write_text("same")
    _put(store, put("/s/a.txt", "same"))
    report = sync.step()
    assert report.conflicts == [] and sorted(os.listdir(co)) == [".keg", "a.txt"]


def test_sync_refuses_another_keg(store, tmp_path):
    _put(store, put("/a/x", "x"))
    co = tmp_path / "co"
    posix.checkout(store, "/a", str(co))
    other = keg.init(str(tmp_path / "other"), durable=False)
    _put(other, put("/a/y", "y"))
    with pytest.raises(posix.WrongKeg, match="was checked out from"):
        posix.Sync(other, str(co))
    other.close()
    with posix.Sync(store, str(co)):
        with pytest.raises(posix.SyncRunning, match=f"pid {os.getpid()}"):
            posix.Sync(store, str(co))
    posix.Sync(store, str(co)).close()  # free again
    with pytest.raises(posix.NotACheckout, match="keg checkout PREFIX"):
        posix.Sync(store, str(tmp_path))


# --------------------------------------------------------- through a master

def _env(server) -> dict:
    return dict(os.environ, KEG_TOKEN=server.token, KEG_NO_PROGRESS="1")


def _keg(server, *args, check=True, input=None):
    done = subprocess.run([*keg_command(), *args], env=_env(server), capture_output=True, text=True, input=input)
    if check:
        assert done.returncode == 0, (args, done.stderr)
    return done


def test_shell_script_edits_become_revisions_and_remote_puts_appear_within_a_second(master_server, tmp_path):
    remote = RemoteKeg(master_server.url, master_server.token)
    for path, text in (("/site/conf/app.conf", "one = 1\n"), ("/site/old.txt", "old\n"), ("/site/keep.txt", "k\n")):
        remote.apply(Transaction((put(path, text),)))
    co = tmp_path / "co"
    _keg(master_server, "checkout", "/site", str(co), "--url", master_server.url)
    assert master_server.token not in _read(co / ".keg" / "sync.json").decode()
    start = remote.revision().number
    log = open(tmp_path / "sync.log", "w+")
    proc = subprocess.Popen([*keg_command(), "sync", str(co), "--quiet-period", "0.2"], env=_env(master_server),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _until(lambda: "Ctrl-C stops" in (tmp_path / "sync.log").read_text(), 15, "keg sync to start")
        subprocess.run(["bash", "-c", SCRIPT, "script", str(co)], check=True)
        _until(lambda: (_cat(remote, "/site/new.txt") == b"hello from bash\n"
                        and _cat(remote, "/site/conf/app.conf") == b"ONE = 1\n"
                        and _cat(remote, "/site/old.txt") is None
                        and _cat(remote, "/site/made/deeper/file.txt") == b"deep\n"), 10,
               "the script's edits to reach the master", interval=0.05)
        logged = _keg(master_server, "log", "/site", "--url", master_server.url).stdout.splitlines()
        assert int(logged[0].split("\t")[0]) > start and "changes under /site" in "\n".join(logged)
        _keg(master_server, "put", "/site/keep.txt", "--url", master_server.url, input="from the keg\n")
        put_done = time.monotonic()
        _until(lambda: _read(co / "keep.txt") == b"from the keg\n", 1.0, "the remote put to reach the file")
        assert time.monotonic() - put_done < 1.0
        assert proc.poll() is None, (tmp_path / "sync.log").read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        remote.close()
    assert proc.returncode == 0, (tmp_path / "sync.log").read_text()


def test_sync_once_pushes_pulls_and_reports_a_conflict(master_server, tmp_path):
    url = master_server.url
    _keg(master_server, "put", "/o/shared.txt", "--url", url, input="base\n")
    _keg(master_server, "put", "/o/mine.txt", "--url", url, input="base\n")
    co = tmp_path / "co"
    _keg(master_server, "checkout", "/o", str(co), "--url", url)
    (co / "shared.txt").write_text("local edit\n")
    (co / "mine.txt").write_text("only here\n")
    _keg(master_server, "put", "/o/shared.txt", "--url", url, input="remote edit\n")
    _keg(master_server, "put", "/o/theirs.txt", "--url", url, input="new there\n")
    done = _keg(master_server, "sync", "--once", str(co))
    copy = next(n for n in os.listdir(co) if n.startswith("shared.txt.conflict-"))
    assert "conflict on /o/shared.txt" in done.stderr and copy in done.stderr
    assert "1 conflict(s)" in done.stdout
    assert _files(co) == {"shared.txt": b"remote edit\n", copy: b"local edit\n", "mine.txt": b"only here\n",
                          "theirs.txt": b"new there\n"}
    assert _keg(master_server, "cat", f"/o/{copy}", "--url", url).stdout == "local edit\n"
    assert _keg(master_server, "cat", "/o/mine.txt", "--url", url).stdout == "only here\n"
    again = _keg(master_server, "sync", "--once", str(co))
    assert "pulled 0, pushed 0, 0 conflict(s)" in again.stdout
    wrong = _keg(master_server, "sync", "--once", str(co), "--token", "kt_wrong", check=False)
    assert wrong.returncode == 6
