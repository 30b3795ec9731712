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
    script = "\n".join(["set -e", first, first_look, "set +e", guarded])
    bindir = os.path.dirname(sys.executable)
    env = {"HOME": str(tmp_path), "PATH": f"{bindir}:/usr/bin:/bin", "GIT_CONFIG_NOSYSTEM": "1"}
    # Run from the checkout, as README says; HOME (and so ~/keg) is the test's own.
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0].startswith("initialised keg at " + str(tmp_path / "keg"))
    assert out[1].startswith("admin token: kt_")
    assert out[3:5] == ["hello", "K-ce013625030ba8dba906f756967f9e9ca394464a"]
    assert "3" in out and any(line.startswith("3\tcreate\t/machines/m1/machine.json") for line in out)
    assert "compare failed" in done.stderr
