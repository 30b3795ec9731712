"""git push of an app with stock git: the source lands in /src/<app>; bad pushes are refused and change nothing.

Builds themselves are in test_deploy.py; here no builder runs, so a good push
waits for one (the hook is told to give up quickly).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from conftest import GitGate, MasterProcess, git, init_keg_with_token, wait_until
from keg.errors import BadRequest
from keg.transaction import Transaction, put
from master import auth
from master.client import RemoteKeg

ACL = ("who\tprefix\trights\ngroup:admin\t/\trw\ngroup:machines\t/\tr\n"
       "group:developers\t/\tr\ngroup:developers\t/src/\trw\ngroup:developers\t/apps/\trw\n")


def run(*args, cwd=None, env=None, check=True):
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def make_repo(path, files: dict, symlinks=None, branch="main"):
    path.mkdir(parents=True, exist_ok=True)
    run("git", "init", "-q", "-b", branch, cwd=path)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    for name, target in (symlinks or {}).items():
        os.symlink(target, path / name)
    run("git", "add", "-A", cwd=path)
    run("git", "-c", "user.name=Dev", "-c", "user.email=dev@example.org", "commit", "-qm", "source", cwd=path)
    return path


@pytest.fixture
def cluster(keg_dir, monkeypatch):
    monkeypatch.setenv("KEG_BUILD_START_WAIT", "2")   # the master hands KEG_BUILD_* to the push hook
    admin_token = init_keg_with_token(keg_dir)
    server = MasterProcess(keg_dir, admin_token, extra=["--max-push", "200000"])
    admin = RemoteKeg(server.url, admin_token)
    admin.apply(Transaction((put("/policy/acl.tsv", ACL),)))
    tokens = {name: auth.add_user(admin, name, f"{name}@example.org", ["developers"]) for name in ("alice", "bob")}
    yield server, admin, tokens
    admin.close()
    server.stop()


def remote(server, user, token, app="hello"):
    return server.url.replace("http://", f"http://{user}:{token}@") + f"/git/apps/{app}.git"


def push(repo, url, refspec="main", env_extra=None):
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", **(env_extra or {}))
    return run("git", "push", url, refspec, cwd=repo, env=env, check=False)


def assert_unchanged(server, admin, head_before):
    assert admin.revision().number == head_before, "the namespace changed"
    assert not admin.exists("/src/hello")
    check = git(server.keg_path, "fsck", "--strict", "--no-dangling")
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_push_puts_the_source_in_the_keg_and_waits_for_a_builder(cluster, tmp_path):
    server, admin, tokens = cluster
    repo = make_repo(tmp_path / "app", {"Procfile": "web: python3 app.py\n", "app.py": "print('hi')\n"})
    done = push(repo, remote(server, "alice", tokens["alice"]), env_extra={})
    commit = run("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    # No builder runs here: the source arrives, then the hook says so and the push fails.
    assert "-----> Receiving hello" in done.stderr and f"source K-{commit}" in done.stderr
    assert "no builder took the build up" in done.stderr and done.returncode != 0
    entry = admin.stat("/src/hello")
    assert (entry.kind, entry.kid) == ("pointer", "K-" + commit)
    assert admin.read("/src/hello/app.py") == b"print('hi')\n"
    assert git(server.keg_path, "rev-parse", "refs/keg/src/hello").stdout.strip() == commit
    author = admin.log("/src/hello", limit=1)[0][0].author
    assert author.startswith("alice")


def test_a_refused_push_leaves_the_committed_source_safe_through_a_compact(cluster, tmp_path):
    """A push refused after its objects arrived (here it lost the compare: unrelated history sent as if
    /src/hello did not exist) leaves refs/keg/src/hello on the committed source, and ``keg compact`` keeps
    that source; the refused objects are kept for an hour, then dropped by the next compact."""
    server, admin, tokens = cluster
    repo = make_repo(tmp_path / "app", {"app.py": "print('one')\n"})
    push(repo, remote(server, "alice", tokens["alice"]))   # no builder runs: the push fails after the commit
    first = run("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    assert admin.stat("/src/hello").kid == "K-" + first
    other = make_repo(tmp_path / "other", {"app.py": "print('other')\n"})
    refused = run("git", "rev-parse", "HEAD", cwd=other).stdout.strip()
    pack = subprocess.run(["git", "pack-objects", "--stdout", "--revs", "--quiet"], cwd=other, check=True,
                          input=f"{refused}\n".encode(), capture_output=True).stdout
    alice = RemoteKeg(server.url, tokens["alice"])
    try:
        result = alice.send_source("hello", refused, pack, old=None)
    finally:
        alice.close()
    assert not result.ok and "/src/hello" in str(result.error), result

    def ref(name: str) -> str:
        return git(server.keg_path, "rev-parse", "--verify", "--quiet", name).stdout.strip()

    def has(commit: str) -> bool:
        return git(server.keg_path, "cat-file", "-e", commit + "^{tree}").returncode == 0

    assert admin.stat("/src/hello").kid == "K-" + first and ref("refs/keg/src/hello") == first
    incoming = git(server.keg_path, "for-each-ref", "--format=%(refname)", "refs/keg/incoming/").stdout.split()
    assert len(incoming) == 1 and incoming[0].startswith(f"refs/keg/incoming/hello/{refused}-"), incoming
    assert admin.compact()["dropped_sources"] == 0
    assert has(first) and has(refused)   # the refused objects are kept for now: a push may still be committing
    assert admin.read("/src/hello/app.py") == b"print('one')\n"

    # An hour later (the ref's time stamp made older), the next compact drops the refused push.
    stamp = int(incoming[0].rpartition("-")[2])
    aged = incoming[0].rpartition("-")[0] + f"-{stamp - 3601}"
    assert git(server.keg_path, "update-ref", aged, refused).returncode == 0
    assert git(server.keg_path, "update-ref", "-d", incoming[0]).returncode == 0
    assert admin.compact()["dropped_sources"] == 1
    assert has(first) and not has(refused)
    assert ref("refs/keg/src/hello") == first and admin.read("/src/hello/app.py") == b"print('one')\n"
    check = git(server.keg_path, "fsck", "--strict", "--no-dangling")
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_source_ref_left_behind_is_caught_up_before_anything_is_dropped(cluster, tmp_path):
    """A master stopped between a pointer's commit and its ``refs/keg/src/<app>`` (here: the ref put back by
    hand, and the incoming ref aged past its hour) loses nothing: ``keg compact`` first points the ref at what
    /src/<app> names, and so does a master starting on the keg."""
    server, admin, tokens = cluster
    url = remote(server, "alice", tokens["alice"])
    repo = make_repo(tmp_path / "app", {"app.py": "print('one')\n"})
    push(repo, url)
    first = run("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    (repo / "app.py").write_text("print('two')\n")
    run("git", "-c", "user.name=Dev", "-c", "user.email=dev@example.org", "commit", "-qam", "two", cwd=repo)
    push(repo, url)
    second = run("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    assert admin.stat("/src/hello").kid == "K-" + second

    def leave_behind():
        assert git(server.keg_path, "update-ref", "refs/keg/src/hello", first).returncode == 0
        aged = f"refs/keg/incoming/hello/{second}-{int(time.time()) - 7200}"
        assert git(server.keg_path, "update-ref", aged, second).returncode == 0

    def src_ref() -> str:
        return git(server.keg_path, "rev-parse", "refs/keg/src/hello").stdout.strip()

    leave_behind()
    admin.compact()
    assert src_ref() == second
    assert git(server.keg_path, "cat-file", "-e", second + "^{tree}").returncode == 0
    assert admin.read("/src/hello/app.py") == b"print('two')\n"
    leave_behind()
    server.stop()
    server.start()
    assert src_ref() == second

    # A pack the checks refuse is answered 400 (the push's hook shows the message), and nothing is kept.
    alice = RemoteKeg(server.url, tokens["alice"])
    try:
        with pytest.raises(BadRequest, match="malformed"):
            alice.send_source("hello", "0" * 40, b"PACK not really", old="K-" + second)
    finally:
        alice.close()
    assert admin.stat("/src/hello").kid == "K-" + second and src_ref() == second


def test_the_master_serves_while_a_pushed_source_is_indexed(keg_dir, tmp_path, monkeypatch):
    """A pushed source is checked and stored by a child process: while its ``index-pack`` is held (a big
    pack), the master goes on answering reads and writes, and the push completes once it is let go."""
    monkeypatch.setenv("KEG_BUILD_START_WAIT", "1")
    gate = GitGate(str(tmp_path), monkeypatch)
    admin_token = init_keg_with_token(keg_dir)
    server = MasterProcess(keg_dir, admin_token)
    admin = RemoteKeg(server.url, admin_token, timeout=10)
    try:
        repo = make_repo(tmp_path / "app", {"app.py": "print('hi')\n"})
        gate.close()
        pusher = subprocess.Popen(["git", "push", remote(server, "admin", admin_token), "main"], cwd=repo,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=dict(os.environ, GIT_TERMINAL_PROMPT="0"))
        try:
            wait_until(lambda: gate.held() >= 1, "the pushed pack's index-pack to start", timeout=30)
            started = time.monotonic()
            revision = admin.apply(Transaction((put("/notes/during-push", "still serving\n"),))).revision
            assert admin.read("/notes/during-push") == b"still serving\n"
            assert time.monotonic() - started < 5, "the master waited for the push"
            assert pusher.poll() is None and not admin.exists("/src/hello")
        finally:
            gate.open()
        out, _ = pusher.communicate(timeout=60)
        commit = run("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
        assert f"source K-{commit}" in out, out
        assert admin.stat("/src/hello").kid == "K-" + commit and admin.revision().number > revision
    finally:
        admin.close()
        server.stop()


@pytest.mark.parametrize("case", ["anonymous", "wrong-token", "other-users-app", "machine", "branch", "bad-name"])
def test_pushes_without_the_right_are_refused(cluster, tmp_path, case):
    server, admin, tokens = cluster
    if case == "other-users-app":
        admin.apply(Transaction((put("/apps/hello/app.json", json.dumps({"name": "hello", "owner": "alice",
                                                                          "releases": []})),)))
    machine_token = auth.add_user(admin, "m1", machine=True) if case == "machine" else None
    head = admin.revision().number
    repo = make_repo(tmp_path / "app", {"app.py": "print('hi')\n"})
    url = {"anonymous": server.url + "/git/apps/hello.git",
           "wrong-token": remote(server, "alice", "kt_0000000000000000_" + "x" * 40),
           "other-users-app": remote(server, "bob", tokens["bob"]),
           "machine": remote(server, "m1", machine_token),
           "branch": remote(server, "alice", tokens["alice"]),
           "bad-name": remote(server, "alice", tokens["alice"], app="Bad_Name")}[case]
    done = push(repo, url, "main:feature" if case == "branch" else "main")
    assert done.returncode != 0
    expected = {"anonymous": "could not read Username", "wrong-token": "Authentication failed",
                "other-users-app": "app hello belongs to alice", "machine": "may not push apps",
                "branch": "Keg deploys the branch main", "bad-name": "not an app name"}[case]
    assert expected in done.stderr, done.stderr
    assert_unchanged(server, admin, head)


@pytest.mark.parametrize("case", ["gitmodules", "symlink-out", "symlink-absolute", "symlink-git", "too-big",
                                  "malformed"])
def test_dangerous_or_broken_sources_are_refused(cluster, tmp_path, case):
    server, admin, tokens = cluster
    head = admin.revision().number
    files = {"app.py": "print('hi')\n"}
    symlinks = {}
    if case == "gitmodules":   # the CVE-2024-32002 shape: a submodule whose path is also a symlink to .git
        files[".gitmodules"] = '[submodule "x"]\n\tpath = A/modules/x\n\turl = ./evil\n'
        symlinks["a"] = ".git"
    elif case == "symlink-out":
        files["sub/ok.txt"] = "x"
        symlinks["sub/link"] = "../../../etc/passwd"
    elif case == "symlink-absolute":
        symlinks["passwd"] = "/etc/passwd"
    elif case == "symlink-git":
        symlinks["hooks"] = ".git/hooks"
    elif case == "too-big":
        files["blob.bin"] = os.urandom(400_000).hex()   # 800 kB of incompressible text, over --max-push
    repo = make_repo(tmp_path / "app", files, symlinks)
    if case == "malformed":
        # A tree object with an entry whose name has a slash: git fsck rejects it (fullPathname).
        blob = run("git", "hash-object", "-w", "app.py", cwd=repo).stdout.strip()
        data = b"100644 a/b\0" + bytes.fromhex(blob)
        tree = subprocess.run(["git", "hash-object", "-t", "tree", "-w", "--literally", "--stdin"], cwd=repo,
                              input=data, capture_output=True, check=True).stdout.decode().strip()
        commit = run("git", "-c", "user.name=x", "-c", "user.email=x@x", "commit-tree", tree, "-m", "bad",
                     cwd=repo).stdout.strip()
        run("git", "update-ref", "refs/heads/main", commit, cwd=repo)
    done = push(repo, remote(server, "alice", tokens["alice"]))
    assert done.returncode != 0
    expected = {"gitmodules": "submodules are not supported", "symlink-out": "leaves the source",
                "symlink-absolute": "absolute path", "symlink-git": "into .git",
                "too-big": "pack exceeds maximum allowed size", "malformed": "fullPathname"}[case]
    assert expected in done.stderr, done.stderr
    assert_unchanged(server, admin, head)
