"""The ``keg`` command line and the shell policies built on it."""
