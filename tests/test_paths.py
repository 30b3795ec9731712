"""Paths are checked and normalised before anything is written."""

import pytest

from keg import paths
from keg.errors import BadPath


@pytest.mark.parametrize("raw, canonical", [
    ("/", "/"),
    ("/a", "/a"),
    ("/a/b.txt", "/a/b.txt"),
    ("/a/", "/a"),
    ("/ü/名前", "/ü/名前"),
    ("/.hidden/x", "/.hidden/x"),
])
def test_good_paths_normalise(raw, canonical):
    assert paths.normalize(raw) == canonical


@pytest.mark.parametrize("raw, message", [
    ("a/b", "absolute"),
    ("", "absolute"),
    ("/a//b", "empty segment"),
    ("/a/../b", "'..'"),
    ("/a/./b", "'.'"),
    ("/a/.git/config", ".git"),
    ("/.GIT", ".git"),
    ("/a\x00b", "NUL"),
    ("/a\nb", "control character"),
    ("/" + "x" * 256, "256 bytes"),
    ("/\udcff", "UTF-8"),
])
def test_bad_paths_are_refused_with_a_reason(raw, message):
    with pytest.raises(BadPath, match=message):
        paths.normalize(raw)


def test_overlong_path_is_refused():
    with pytest.raises(BadPath, match="too long"):
        paths.normalize("/" + "/".join(["abcdefgh"] * 600))
