"""Write docs/cli.md from the keg command's own --help texts: `python tools/gen_cli_doc.py`."""

import os
import sys

from click.testing import CliRunner

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from shell.cli import cli  # noqa: E402

HEADER = """# The keg command

Generated from the code by `python tools/gen_cli_doc.py`; a test fails when it is stale.

"""


def render() -> str:
    """The whole page."""
    runner = CliRunner()
    parts = [HEADER, "```\n", runner.invoke(cli, ["--help"], prog_name="keg").output, "```\n"]
    for name in sorted(cli.commands):
        parts += [f"\n## keg {name}\n\n```\n",
                  runner.invoke(cli, [name, "--help"], prog_name="keg").output, "```\n"]
    return "".join(parts)


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "cli.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render())
