"""The README's commands work as written, and the CLI reference matches the code."""

import os
import re
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))


def _shell_blocks(text):
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def test_cli_reference_is_generated_from_the_current_code():
    import gen_cli_doc
    with open(os.path.join(REPO, "docs", "cli.md"), encoding="utf-8") as f:
        assert f.read() == gen_cli_doc.render(), "docs/cli.md is stale: run python tools/gen_cli_doc.py"


def test_readme_commands_run_as_written(tmp_path):
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = _shell_blocks(f.read())
    setup, first_look, guarded = blocks[0], blocks[1], blocks[2]
    # The install step has run already (CI runs ./install.sh); run the rest of the first command.
    first = setup.splitlines()[0].replace("./install.sh && ", "")
    assert setup.splitlines()[1] == "./install.sh && .venv/bin/python -m pytest -q"
    bindir = os.path.dirname(sys.executable)
    env = {"HOME": str(tmp_path), "PATH": f"{bindir}:/usr/bin:/bin", "GIT_CONFIG_NOSYSTEM": "1"}
    # Run from the checkout, as README says; HOME (and so ~/keg) is the test's own.
    server = subprocess.Popen(["bash", "-c", first], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out = [server.stdout.readline(), server.stdout.readline()]
        assert out[0].startswith("initialised keg at " + str(tmp_path / "keg")), out
        assert out[1].startswith("admin token: kt_")
        token = out[1].split()[2]
        while "serving" not in (line := server.stderr.readline()):
            assert line, "the master did not start"
        assert "at http://127.0.0.1:7480" in line
        # The tour's first line exports the token the user was shown; give the real one.
        tour = first_look.replace("KEG_TOKEN=kt_…", f"KEG_TOKEN={token}")
        script = "\n".join(["set -e", tour, "set +e", guarded])
        done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert server.returncode in (0, -15)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("/hello.txt\tK-ce013625030ba8dba906f756967f9e9ca394464a\t2")
    assert lines[1:3] == ["hello", "K-ce013625030ba8dba906f756967f9e9ca394464a"]
    assert '{"cpus": 2}' in lines
    assert any(line.startswith("3\tcreate\t/machines/m1/machine.json") for line in lines)
    assert "compare failed" in done.stderr
