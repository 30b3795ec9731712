"""Every plumbing verb against a master gives the same output and exit code as on a local keg."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from conftest import init_keg_with_token, keg_command
from test_cli import run

TX_FAIL = json.dumps({"compare": [{"path": "/a/b.txt", "kid": None}], "ops": [{"op": "put", "path": "/z", "value": "z"}]})
TX_OK = json.dumps({"ops": [{"op": "put", "path": "/a/c.json", "value": "{}"},
                            {"op": "put", "path": "/a/bin", "base64": "AAEC/w=="},
                            {"op": "put", "path": "/a/run.sh", "value": "#!/bin/sh\n", "mode": "exec"}]})

SEQUENCE = [
    (("put", "/a/b.txt"), "hi\n"),
    (("cat", "/a/b.txt"), None),
    (("kid", "/a/b.txt"), None),
    (("put", "/a/b.txt", "--if-absent"), "again"),
    (("tx", "--json"), TX_FAIL),
    (("tx",), TX_OK),
    (("cat", "/a/bin"), None),
    (("ls", "-l", "/a"), None),
    (("ls", "--json", "/a/run.sh"), None),
    (("rm", "/a/c.json"), None),
    (("rm", "/a/c.json"), None),
    (("cat", "/nope"), None),
    (("cat", "/a"), None),
    (("ls", "/a/b.txt/x"), None),
    (("put", "/bad//path"), "x"),
    (("ls", "/a", "--rev", "2"), None),
    (("kid", "/a", "--rev", "-1"), None),
    (("cat", "/a/b.txt", "--rev", "99"), None),
    (("diff", "2", "--prefix", "/a"), None),
    (("watch", "/a", "--since", "1", "--count", "4"), None),
    (("log", "/a/b.txt"), None),
    (("resolve", "K-45b983be36b73c0788dc9cbcb76cbb80fc7bb057"), None),
    (("resolve", "K-zz"), None),
    (("rm", "-r", "/a", "--if-match", "K-0000000000000000000000000000000000000000"), None),
]


def _masked(text: str) -> str:
    """Log lines carry times, authors and revision KIDs that differ between any two kegs."""
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\t[^\t]*\t", "TIME\tAUTHOR\t", text)
    return re.sub(r"\t(K-[0-9a-f]{40})\t(TIME)", r"\tREVKID\t\2", text)


def assert_every_verb_matches_a_local_keg(tmp_path, url: str, token: str) -> None:
    """Run ``SEQUENCE`` on a new local keg and on the master at ``url``: the same exit codes, output and errors."""
    local = str(tmp_path / "local")
    init_keg_with_token(local)
    for args, stdin in SEQUENCE:
        here = run(*args, "--keg", local, input=stdin)
        there = run(*args, "--url", url, "--token", token, input=stdin)
        assert here[0] == there[0], (args, here, there)
        assert _masked(here[1]) == _masked(there[1]), args
        assert here[2] == there[2], args


def test_every_plumbing_verb_matches_a_local_keg(tmp_path, master_server):
    assert_every_verb_matches_a_local_keg(tmp_path, master_server.url, master_server.token)


def test_environment_and_installed_command(master_server):
    env = {"PATH": "/usr/bin:/bin", "KEG_URL": master_server.url, "KEG_TOKEN": master_server.token,
           "HOME": "/nonexistent"}
    put = subprocess.run([*keg_command(), "put", "/e.txt"], input=b"e", env=env, capture_output=True)
    assert put.returncode == 0, put.stderr
    cat = subprocess.run([*keg_command(), "cat", "/e.txt"], env=env, capture_output=True)
    assert cat.stdout == b"e"
    wrong = subprocess.run([*keg_command(), "cat", "/e.txt"], env={**env, "KEG_TOKEN": "nope"}, capture_output=True,
                           text=True)
    assert wrong.returncode == 6 and "token is not valid" in wrong.stderr
    gone = subprocess.run([*keg_command(), "cat", "/e.txt", "--url", "http://127.0.0.1:9"], env=env,
                          capture_output=True, text=True)
    assert gone.returncode == 4 and "cannot reach the master" in gone.stderr


def test_user_and_token_commands_over_the_master(master_server):
    target = ("--url", master_server.url, "--token", master_server.token)
    code, out, _ = run("user", "add", "ada", "--email", "ada@example.org", "--group", "devs", *target)
    assert code == 0 and out.startswith("token: kt_")
    ada = out.split()[1]
    assert run("cat", "/users/ada/user.json", "--url", master_server.url, "--token", ada)[0] == 6
    assert run("user", "add", "ada", *target)[0] == 3  # exists already
    code, out, _ = run("token", "new", "ada", *target)
    token_id = out.splitlines()[0].split()[1]
    assert run("token", "revoke", "ada", token_id, *target)[0] == 0
    assert run("token", "revoke", "ada", token_id, *target)[0] == 1
    assert run("user", "add", "Bad Name", *target)[0] == 2


@pytest.mark.parametrize("args", [("cat", "/x"), ("ls",)])
def test_no_keg_given_is_a_usage_error(args):
    code, _, err = run(*args)
    assert code == 2 and "--keg DIR" in err and "--url URL" in err
