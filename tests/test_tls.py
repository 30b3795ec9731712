"""HTTPS: a master and a Raft cluster serving TLS (``--tls-cert``/``--tls-key``), and Keg's clients trusting them.

Certificates come from a private CA made per test (tests/tls_certs.py); the
clients are told of it the way a user does, with ``SSL_CERT_FILE``.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import MasterProcess, init_keg_with_token, keg_command, wait_until
from keg.gitenv import git_http_env
from master import tls
from raft_harness import Cluster, free_port
from test_cli_remote import assert_every_verb_matches_a_local_keg
from test_push import make_repo, push
from tls_certs import Certificates


@pytest.fixture
def certs(tmp_path):
    return Certificates(str(tmp_path / "certs"))


@pytest.fixture
def https_master(tmp_path, certs, trust):
    keg_path = str(tmp_path / "served")
    server = MasterProcess(keg_path, init_keg_with_token(keg_path), extra=["--tls-cert", certs.cert,
                                                                           "--tls-key", certs.key])
    yield server
    server.stop()


@pytest.fixture
def trust(monkeypatch, certs):
    """This process (and the programs it starts) trust the test CA, as ``SSL_CERT_FILE`` says; nothing else."""
    monkeypatch.setenv("SSL_CERT_FILE", certs.ca)
    for name in ("SSL_CERT_DIR", "GIT_SSL_CAINFO", "GIT_SSL_CAPATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tls, "_client_context", None)  # built again from SSL_CERT_FILE


def keg(*args, env=None, stdin=None):
    """The installed ``keg`` command: ``(exit code, stdout, stderr)``."""
    done = subprocess.run([*keg_command(), *args], input=stdin, capture_output=True, text=True, timeout=60,
                          env=env)
    return done.returncode, done.stdout, done.stderr


def untrusting_env() -> dict:
    """The environment without any CA setting: only the system's CAs, which did not sign the test's."""
    return {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}


def test_every_plumbing_verb_over_https_matches_a_local_keg(tmp_path, https_master, trust):
    assert https_master.url.startswith("https://127.0.0.1:")
    assert_every_verb_matches_a_local_keg(tmp_path, https_master.url, https_master.token)


def test_a_master_whose_certificate_is_not_trusted_is_refused_and_nothing_is_written(https_master, trust):
    url, token = https_master.url, https_master.token
    code, out, err = keg("put", "/secret", "--url", url, "--token", token, env=untrusting_env(), stdin="x")
    assert code == 4 and out == ""
    assert "CERTIFICATE_VERIFY_FAILED" in err and "set SSL_CERT_FILE to that CA's PEM file" in err, err
    # A watch stream gives up at once too (it retries a lost stream, not a refused certificate).
    code, out, err = keg("watch", "/", "--count", "1", "--url", url, "--token", token, env=untrusting_env())
    assert code == 4 and out == "" and "set SSL_CERT_FILE to that CA's PEM file" in err, err
    # With the CA the same command works, and the refused write is not there.
    env = {**untrusting_env(), "SSL_CERT_FILE": os.environ["SSL_CERT_FILE"]}
    code, _, err = keg("cat", "/secret", "--url", url, "--token", token, env=env)
    assert code == 1 and "/secret does not exist at revision 1" in err, err
    assert keg("put", "/secret", "--url", url, "--token", token, env=env, stdin="x")[0] == 0
    assert keg("cat", "/secret", "--url", url, "--token", token, env=env)[:2] == (0, "x")


def test_plain_http_to_the_https_listener_gets_no_answer_and_the_master_goes_on(https_master, trust):
    plain = https_master.url.replace("https://", "http://")
    code, _, err = keg("cat", "/users", "--url", plain, "--token", https_master.token)
    assert code == 4 and "closed the connection without an answer" in err and "use https://" in err, err
    code, out, err = keg("ls", "/", "--url", https_master.url, "--token", https_master.token)
    assert code == 0 and "users/" in out.split(), err
    assert https_master.proc.poll() is None


def test_git_fetches_over_https_trusting_the_ca_keg_trusts(tmp_path, https_master, trust):
    url, token = https_master.url, https_master.token
    assert keg("put", "/hello.txt", "--url", url, "--token", token, stdin="hi\n")[0] == 0
    clone = str(tmp_path / "clone")
    # git_http_env (builders, a replica's snapshot fetch) hands SSL_CERT_FILE to git as GIT_SSL_CAINFO.
    env = git_http_env(token)
    assert env["GIT_SSL_CAINFO"] == os.environ["SSL_CERT_FILE"]
    done = subprocess.run(["git", "clone", "-q", f"{url}/git/keg.git", clone], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with open(os.path.join(clone, "hello.txt")) as f:
        assert f.read() == "hi\n"
    # Without it git refuses the master, as keg does.
    bare = {k: v for k, v in env.items() if not k.startswith("GIT_SSL_")}
    bare["GIT_SSL_CAINFO"] = "/dev/null"
    done = subprocess.run(["git", "ls-remote", f"{url}/git/keg.git"], env=bare, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "certificate" in done.stderr.lower(), done.stderr


def test_a_push_over_https_reaches_the_master_from_its_hook(tmp_path, https_master, trust, monkeypatch):
    monkeypatch.setenv("KEG_BUILD_START_WAIT", "1")   # the hook waits this long for a builder (none runs here)
    https_master.stop()
    https_master.start()                               # again, with that in its environment
    repo = make_repo(tmp_path / "app", {"app.py": "print('hi')\n"})
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    url = https_master.url.replace("https://", f"https://admin:{https_master.token}@") + "/git/apps/hello.git"
    done = push(repo, url, env_extra={"GIT_SSL_CAINFO": os.environ["SSL_CERT_FILE"]})
    # The pre-receive hook committed /src/hello through the master's HTTPS URL, then waited for a builder.
    assert "-----> Receiving hello" in done.stderr and f"source K-{commit}" in done.stderr, done.stderr
    assert "no builder took the build up" in done.stderr
    code, out, err = keg("kid", "/src/hello", "--url", https_master.url, "--token", https_master.token)
    assert code == 0 and out.strip() == f"K-{commit}", err


def test_bad_tls_options_say_what_is_wrong_and_serve_nothing(tmp_path, certs):
    keg_path = str(tmp_path / "k")
    init_keg_with_token(keg_path)
    other = Certificates(str(tmp_path / "other"), "other")
    serve = ("master", "serve", "--keg", keg_path, "--listen", "127.0.0.1:0")
    cases = [
        (("--tls-cert", certs.cert), "needs both --tls-cert FILE and --tls-key FILE"),
        (("--tls-key", certs.key), "needs both --tls-cert FILE and --tls-key FILE"),
        (("--tls-cert", certs.cert, "--tls-key", other.key), f"cannot use {certs.cert} with the key {other.key}"),
        (("--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", certs.key), "nope.pem does not exist"),
        (("--tls-cert", certs.ca, "--tls-key", certs.ca), "cannot use"),
        (("--tls-cert", certs.cert, "--tls-key", certs.key, "--fastcgi", str(tmp_path / "sock")),
         "--tls-cert does not go with --fastcgi"),
    ]
    cases.append((("--tls-cert", certs.cert, "--tls-key", certs.encrypted_key),
                  f"the key {certs.encrypted_key} is encrypted"))
    for extra, message in cases:
        code, out, err = keg(*serve, *extra)
        assert code == 2 and message in err and "serving" not in err, (extra, err)
    assert not os.path.exists(tmp_path / "sock")


def test_the_certificate_must_be_for_the_host_in_the_url_and_the_hook_uses_self_url(tmp_path, trust, monkeypatch):
    monkeypatch.setenv("KEG_BUILD_START_WAIT", "1")
    named = Certificates(str(tmp_path / "named"), "named", names=("localhost",))
    monkeypatch.setenv("SSL_CERT_FILE", named.ca)
    keg_path, port = str(tmp_path / "k"), free_port()
    server = MasterProcess(keg_path, init_keg_with_token(keg_path), extra=[
        "--listen", f"127.0.0.1:{port}", "--tls-cert", named.cert, "--tls-key", named.key,
        "--self-url", f"https://localhost:{port}"])
    try:
        code, _, err = keg("ls", "/", "--url", f"https://127.0.0.1:{port}", "--token", server.token)
        assert code == 4 and "IP address mismatch" in err and "not for the host in this URL" in err, err
        by_name = f"https://localhost:{port}"
        assert keg("ls", "/", "--url", by_name, "--token", server.token)[0] == 0
        # The push hook reaches the master at --self-url, a name the certificate covers.
        repo = make_repo(tmp_path / "app", {"app.py": "print('hi')\n"})
        url = by_name.replace("https://", f"https://admin:{server.token}@") + "/git/apps/hello.git"
        done = push(repo, url, env_extra={"GIT_SSL_CAINFO": named.ca})
        assert "-----> Receiving hello" in done.stderr and "source K-" in done.stderr, done.stderr
    finally:
        server.stop()


def test_an_expired_certificate_is_named_at_the_start_and_by_the_clients(tmp_path, trust, monkeypatch):
    old = Certificates(str(tmp_path / "old"), "old", expired=True)
    monkeypatch.setenv("SSL_CERT_FILE", old.ca)
    keg_path = str(tmp_path / "k")
    server = MasterProcess(keg_path, init_keg_with_token(keg_path), extra=["--tls-cert", old.cert,
                                                                           "--tls-key", old.key])
    try:
        with open(server.log_path) as f:
            assert f"warning: the TLS certificate {old.cert} expired on" in f.read()
        code, _, err = keg("ls", "/", "--url", server.url, "--token", server.token)
        assert code == 4 and "certificate has expired" in err and "it needs a new one" in err, err
    finally:
        server.stop()


def test_a_raft_cluster_serves_https_and_its_replicas_call_each_other_over_it(tmp_path, certs, trust):
    cluster = Cluster(str(tmp_path / "cluster"), 3, tls=certs, extra=["--raft-compact-entries", "20"])
    cluster.keep_seed()
    cluster.start()
    try:
        leader = cluster.wait_leader()
        assert all(r.url.startswith("https://") for r in cluster.replicas)
        follower = next(r for r in cluster.replicas if r is not leader)
        assert cluster.write(follower, "/small", "forwarded")[0] == 200
        # A large value through a follower: its chunks go to a majority over the replicas' HTTPS first.
        big = os.urandom(3 << 20)
        status, _, answer = cluster.call(follower, "PUT", "/v1/keg/big.bin", big)
        assert status == 200, answer
        cluster.wait_converged()
        for r in cluster.replicas:  # a replica that lacked chunks fetches them in the background, over HTTPS too
            wait_until(lambda: cluster.reads(r, "/big.bin", big), f"big.bin on r{r.index}", timeout=20)
        code, out, err = keg("master", "status", "--url", follower.url, "--token", cluster.token, "--json")
        assert code == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert sorted(row["url"] for row in rows) == sorted(r.url for r in cluster.replicas)
        assert sorted(row["role"] for row in rows) == ["follower", "follower", "leader"]
        # A replica added after the log was trimmed catches up from a snapshot: a git fetch over HTTPS,
        # trusting the CA SSL_CERT_FILE names (keg.gitenv); `keg master member add` reaches the leader too.
        for i in range(40):
            assert cluster.write(cluster.replicas[i % 3], f"/n/{i}", str(i))[0] == 200
        assert cluster.status(leader)["snapshots_written"] >= 1
        new = cluster.add_replica()
        new.start()
        code, out, err = keg("master", "member", "add", new.raft, "--url", leader.url, "--token", cluster.token)
        assert code == 0 and f"added {new.raft}" in out, err
        head = cluster.wait_converged(timeout=60)
        status = cluster.status(new)
        assert status["revision_kid"] == head and status["snapshots_loaded"] == 1, status
        assert cluster.call(new, "GET", "/v1/keg/n/39")[2] == b"39"
    finally:
        cluster.close()
