"""The README's commands work as written, and the CLI reference matches the code."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))


def _shell_blocks(text):
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def test_cli_reference_is_generated_from_the_current_code():
    import gen_cli_doc
    with open(os.path.join(REPO, "docs", "cli.md"), encoding="utf-8") as f:
        assert f.read() == gen_cli_doc.render(), "docs/cli.md is stale: run python tools/gen_cli_doc.py"


def test_readme_commands_run_as_written():
    """The README, literally: `keg up` (the first command without the install, which CI ran) in a fresh
    HOME, then the tour's blocks in one shell: push the example app, read and write paths, a second
    release, time travel, rollback; then Ctrl-C leaves nothing running."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = _shell_blocks(f.read())
    setup, tour = blocks[0], blocks[1:]
    assert setup.splitlines()[1] == "./install.sh && .venv/bin/python -m pytest -q"
    first = setup.splitlines()[0].replace("./install.sh && ", "")
    home = tempfile.mkdtemp(prefix="keg-readme-")
    os.chmod(home, 0o711)        # containers' files live below HOME: runc needs it searchable
    env = {"HOME": home, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL": "ada@example.org",
           "GIT_COMMITTER_NAME": "Ada", "GIT_COMMITTER_EMAIL": "ada@example.org"}
    up = subprocess.Popen(["bash", "-c", first], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        while "Ctrl-C stops everything" not in (line := up.stdout.readline()):
            assert line, "keg up stopped:\n" + "".join(seen)
            seen.append(line)
        text = "".join(seen)
        assert re.search(r"^admin token: kt_\S+$", text, re.M), text
        assert "git remote add keg http://admin:" in text
        script = "set -e\n" + "\n".join(tour)
        done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900)
    finally:
        os.kill(up.pid, signal.SIGINT)      # Ctrl-C
        rest = up.communicate(timeout=180)[0]
    assert up.returncode == 0, rest
    assert "keg up: stopped" in rest
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count("Hello, Keg! This is release one.") == 2, out
    assert "Hello, Keg! This is release two." in out, out
    assert "remote: -----> Released v1" in done.stderr and "remote: -----> Released v2" in done.stderr
    assert '{"note": "written by hand"}' in out
    assert "* v1" in out and "hello-web" in out
    assert out.count('"number"') >= 1                      # app.json as it was at release 1
    leftovers = subprocess.run(["pgrep", "-f", home], capture_output=True, text=True).stdout.split()
    assert leftovers == [], leftovers
    with open("/proc/self/mounts") as f:
        assert home not in f.read()
    shutil.rmtree(home, ignore_errors=True)
