"""Shared fixtures: every test runs with a clean environment and its own keg."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import keg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Results must not depend on the developer's HOME, git or Keg settings."""
    for name in list(os.environ):
        if name.startswith(("GIT_", "KEG_")):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


@pytest.fixture
def keg_dir(tmp_path):
    """A path for a new keg."""
    return str(tmp_path / "keg")


@pytest.fixture
def store(keg_dir):
    """A new keg, not fsynced (durability has its own crash tests)."""
    s = keg.init(keg_dir, durable=False)
    yield s
    s.close()


def keg_command() -> list:
    """The installed ``keg`` console script, next to the running Python."""
    script = os.path.join(os.path.dirname(sys.executable), "keg")
    if os.path.exists(script):
        return [script]
    found = shutil.which("keg")
    assert found, "the keg command is not installed; run ./install.sh"
    return [found]


def git(keg_path: str, *args: str) -> subprocess.CompletedProcess:
    """Run stock git on a keg."""
    return subprocess.run(["git", "--git-dir", keg_path, *args], capture_output=True, text=True, check=False)
