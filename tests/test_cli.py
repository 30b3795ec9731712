"""The keg command, through click's runner and as the installed program."""

import json
import subprocess

import pytest
from click.testing import CliRunner

from shell.cli import cli, main

from conftest import git, keg_command


def run(*args, input=None):
    """Run keg in process and return (exit code, stdout, stderr) as a user sees them."""
    runner = CliRunner()
    import io
    import contextlib
    err = io.StringIO()
    with runner.isolation(input=input) as (out, _, _):
        with contextlib.redirect_stderr(err):
            code = main(list(args))
        stdout = out.getvalue().decode("utf-8", "backslashreplace")
    return code, stdout, err.getvalue()


@pytest.fixture
def k(keg_dir):
    code, out, _ = run("init", "--keg", keg_dir)
    assert code == 0 and "initialised keg" in out
    return keg_dir


def test_readme_sequence_with_the_installed_command(keg_dir):
    keg = keg_command()
    assert subprocess.run([*keg, "init", "--keg", keg_dir], capture_output=True).returncode == 0
    put = subprocess.run([*keg, "put", "/a/b.txt", "--keg", keg_dir], input=b"hi\n", capture_output=True)
    assert put.returncode == 0, put.stderr
    cat = subprocess.run([*keg, "cat", "/a/b.txt", "--keg", keg_dir], capture_output=True, text=True)
    assert cat.stdout == "hi\n"
    kid = subprocess.run([*keg, "kid", "/a/b.txt", "--keg", keg_dir], capture_output=True, text=True)
    assert kid.stdout.strip() == "K-" + git(keg_dir, "rev-parse", "main:a/b.txt").stdout.strip()
    assert "put /a/b.txt" in git(keg_dir, "log", "-1", "--format=%s", "main").stdout
    assert git(keg_dir, "show", "main:a/b.txt").stdout == "hi\n"


def test_keg_dir_from_environment(keg_dir, monkeypatch):
    monkeypatch.setenv("KEG_DIR", keg_dir)
    assert run("init")[0] == 0
    assert run("put", "/x", input="1")[0] == 0
    assert run("cat", "/x")[1] == "1"


def test_put_prints_path_kid_revision_and_json(k):
    code, out, _ = run("put", "/p.json", "--keg", k, input='{"a":1}')
    path, kid, rev = out.strip().split("\t")
    assert code == 0 and path == "/p.json" and kid.startswith("K-") and rev == "2"
    code, out, _ = run("put", "/q", "--json", "--keg", k, input="q")
    assert json.loads(out)["revision"] == 3


def test_compare_failed_exits_3_and_changes_nothing(k):
    run("put", "/a", "--keg", k, input="1")
    code, _, err = run("put", "/a", "--if-absent", "--keg", k, input="2")
    assert code == 3 and "compare failed on /a" in err
    tx = {"compare": [{"path": "/a", "kid": "K-" + "0" * 40}], "ops": [{"op": "put", "path": "/b", "value": "b"}]}
    code, out, _ = run("tx", "--json", "--keg", k, input=json.dumps(tx))
    assert code == 3 and json.loads(out)["failed_compare"]["path"] == "/a"
    assert run("cat", "/a", "--keg", k)[1] == "1"
    assert run("ls", "--keg", k)[1] == "a\npolicy/\nusers/\n"  # /b was not written


def test_if_match_is_compare_and_swap(k):
    run("put", "/a", "--keg", k, input="1")
    current = run("kid", "/a", "--keg", k)[1].strip()
    assert run("put", "/a", "--if-match", current, "--keg", k, input="2")[0] == 0
    assert run("put", "/a", "--if-match", current, "--keg", k, input="3")[0] == 3
    assert run("cat", "/a", "--keg", k)[1] == "2"


def test_tx_applies_puts_and_deletes(k):
    run("put", "/old.json", "--keg", k, input="{}")
    tx = {"compare": [{"path": "/new.json", "kid": None}],
          "ops": [{"op": "put", "path": "/new.json", "value": "{}"}, {"op": "put", "path": "/bin", "base64": "AAE="},
                  {"op": "delete", "path": "/old.json"}]}
    code, out, _ = run("tx", "--keg", k, input=json.dumps(tx))
    assert code == 0 and "/old.json\t-\t3" in out
    assert run("ls", "--keg", k)[1] == "bin\nnew.json\npolicy/\nusers/\n"


@pytest.mark.parametrize("args, stdin, code, message", [
    (("cat", "/missing"), None, 1, "does not exist"),
    (("put", "/a/../b"), "x", 2, "'..'"),
    (("put", "relative"), "x", 2, "absolute"),
    (("cat", "/a", "--rev", "K-zz"), None, 2, "lowercase hex"),
    (("resolve", "K-123"), None, 2, "at least 8"),
    (("resolve", "nonsense"), None, 2, "starts with 'K-'"),
    (("tx",), "{not json", 2, "not valid JSON"),
    (("tx",), '{"ops": [{"op": "frob", "path": "/a"}]}', 2, "unknown op"),
    (("rm", "/nothing"), None, 1, "does not exist"),
    (("cat", "/a", "--rev", "77"), None, 1, "revision 77 does not exist"),
    (("bogus",), None, 2, "No such command"),
])
def test_errors_have_documented_exit_codes_and_clear_messages(k, args, stdin, code, message):
    got, _, err = run(*args, "--keg", k, input=stdin) if args != ("bogus",) else run(*args, input=stdin)
    assert got == code and message in err
    assert run("log", "--keg", k)[1].count("\n") == 1  # still only revision 1


def test_missing_keg_is_a_clear_error(tmp_path):
    code, _, err = run("ls", "--keg", str(tmp_path / "nope"))
    assert code == 1 and "no keg at" in err and "keg init" in err


def test_ls_long_log_diff_resolve(k):
    run("put", "/d/a.txt", "--keg", k, input="a")
    run("put", "/d/b.txt", "--keg", k, input="b")
    run("rm", "-r", "/d", "--keg", k)
    assert run("ls", "/", "--rev", "3", "--keg", k)[1] == "d/\npolicy/\nusers/\n"
    kind, kid, size, name = run("ls", "-l", "/d", "--rev", "3", "--keg", k)[1].splitlines()[0].split("\t")
    assert (kind, size, name) == ("file", "1", "a.txt")
    log = run("log", "/d/a.txt", "--keg", k)[1].splitlines()
    assert [line.split("\t")[0] for line in log] == ["4", "2"]
    assert run("diff", "1", "3", "--keg", k)[1].splitlines() == [
        f"A\t/d/a.txt\t-\t{kid}", f"A\t/d/b.txt\t-\t{run('kid', '/d/b.txt', '--rev', '3', '--keg', k)[1].strip()}"]
    resolved = run("resolve", kid[:12], "--keg", k)[1]
    assert resolved.startswith(kid + "\tfile\t1\t")
    rev_kid = log[0].split("\t")[1]
    assert run("resolve", rev_kid, "--keg", k)[1].split("\t")[1:3] == ["revision", "4"]


def test_watch_prints_events_and_runs_a_command_per_event(k, tmp_path):
    for i in range(3):
        run("put", f"/w/{i}", "--keg", k, input=str(i))
    code, out, _ = run("watch", "/w", "--since", "0", "--count", "3", "--keg", k)
    assert [line.split("\t")[:3] for line in out.splitlines()] == [
        ["2", "create", "/w/0"], ["3", "create", "/w/1"], ["4", "create", "/w/2"]]
    log = tmp_path / "events.log"
    code, _, _ = run("watch", "/w/1", "--since", "0", "--timeout", "0.3", "--keg", k, "--",
                     "sh", "-c", f'echo "$KEG_REVISION $KEG_ACTION $KEG_PATH" >> {log}')
    assert code == 0 and log.read_text() == "3 create /w/1\n"


def test_watch_sees_puts_from_another_process(k):
    keg = keg_command()
    watcher = subprocess.Popen([*keg, "watch", "/live", "--count", "2", "--timeout", "20", "--keg", k],
                               stdout=subprocess.PIPE, text=True)
    import time
    deadline = time.monotonic() + 20
    # The watcher starts at the head it sees; write until it has reported two events.
    i = 0
    while watcher.poll() is None and time.monotonic() < deadline:
        subprocess.run([*keg, "put", f"/live/{i}", "--keg", k], input=b"x", check=True)
        i += 1
        time.sleep(0.1)
    out = watcher.communicate(timeout=20)[0]
    assert watcher.returncode == 0
    assert [line.split("\t")[1] for line in out.splitlines()] == ["create", "create"]


def test_help_answers_questions():
    out = CliRunner().invoke(cli, ["--help"]).output
    assert "Exit codes" in out and "KEG_DIR" in out
    tx_help = CliRunner().invoke(cli, ["tx", "--help"]).output
    assert '"compare"' in tx_help and "exit code is 3" in tx_help
