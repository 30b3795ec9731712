"""``python -m shell`` runs the ``keg`` command."""

from shell.cli import entry_point

entry_point()
