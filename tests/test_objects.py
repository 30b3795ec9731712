"""Keg's own git encodings give exactly the ids libgit2 gives."""

import pygit2
from hypothesis import given, settings
from hypothesis import strategies as st

from keg.objects import (MODE_BLOB, MODE_EXEC, MODE_TREE, OBJ_BLOB, OBJ_COMMIT, OBJ_TREE, Commit, Person, Tree,
                         object_id)

names = st.text(alphabet="ab.-_/0", min_size=1, max_size=6).filter(lambda s: "/" not in s and s not in (".", ".."))


def test_blob_id_matches_git(tmp_path):
    repo = pygit2.init_repository(str(tmp_path / "r"), bare=True)
    assert object_id(OBJ_BLOB, b"hi\n").hex() == str(repo.create_blob(b"hi\n"))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(names, st.sampled_from(["file", "exec", "tree"]), min_size=1, max_size=12))
def test_tree_ids_and_order_match_libgit2(tmp_path_factory, spec):
    repo = pygit2.init_repository(str(tmp_path_factory.mktemp("r")), bare=True)
    blob = repo.create_blob(b"x")
    sub = repo.TreeBuilder()
    sub.insert("f", blob, pygit2.GIT_FILEMODE_BLOB)
    sub_id = sub.write()
    builder = repo.TreeBuilder()
    changes = {}
    for name, kind in spec.items():
        if kind == "tree":
            builder.insert(name, sub_id, pygit2.GIT_FILEMODE_TREE)
            changes[name.encode()] = (MODE_TREE, bytes.fromhex(str(sub_id)))
        else:
            mode = MODE_EXEC if kind == "exec" else MODE_BLOB
            builder.insert(name, blob, mode)
            changes[name.encode()] = (mode, bytes.fromhex(str(blob)))
    expected = str(builder.write())
    ours = Tree().with_changes(changes)
    assert object_id(OBJ_TREE, ours.encode()).hex() == expected
    # parsing git's bytes and re-encoding is the identity
    assert Tree.parse(repo[expected].read_raw()).encode() == ours.encode()


def test_removing_entries_keeps_order(tmp_path):
    t = Tree().with_changes({b"a": (MODE_BLOB, b"\x01" * 20), b"a.b": (MODE_BLOB, b"\x02" * 20),
                             b"a-": (MODE_TREE, b"\x03" * 20)})
    t2 = t.with_changes({b"a.b": None})
    assert [n for n, _, _ in t2.items()] == [b"a", b"a-"]
    assert len(t) == 3 and len(t2) == 2


def test_commit_encoding_round_trips_through_libgit2(tmp_path):
    repo = pygit2.init_repository(str(tmp_path / "r"), bare=True)
    tree = repo.TreeBuilder().write()
    c = Commit(bytes.fromhex(str(tree)), (), Person("Ann", "ann@example.com"), Person("keg", "keg@localhost"),
               1_700_000_000, "put /a\n\nKeg-Revision: 2\n")
    oid = repo.odb.write(pygit2.GIT_OBJECT_COMMIT, c.encode())
    assert str(oid) == object_id(OBJ_COMMIT, c.encode()).hex()
    parsed = repo[oid]
    assert parsed.author.email == "ann@example.com" and parsed.commit_time == 1_700_000_000
    assert Commit.parse(c.encode()) == c


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(names, st.sampled_from(["file", "tree"]), min_size=0, max_size=10),
       st.dictionaries(names, st.sampled_from(["file", "exec", "tree", "remove"]), min_size=1, max_size=6))
def test_updating_a_parsed_tree_gives_the_same_bytes_and_names_as_building_it_anew(start, changes):
    def entry(kind, salt):
        mode = {"file": MODE_BLOB, "exec": MODE_EXEC, "tree": MODE_TREE}[kind]
        return (mode, bytes([salt]) * 20)
    base = Tree().with_changes({n.encode(): entry(k, 1) for n, k in start.items()})
    parsed = Tree.parse(base.encode())
    update = {n.encode(): None if k == "remove" else entry(k, 2) for n, k in changes.items()}
    spliced = parsed.with_changes(update)
    rebuilt = Tree(list(spliced._keys), list(spliced._encoded))
    assert spliced.encode() == rebuilt.encode()
    expected = dict(start)
    for n, k in changes.items():
        if k == "remove":
            expected.pop(n, None)
        else:
            expected[n] = k
    assert sorted(name.decode() for name, _, _ in spliced.items()) == sorted(expected)
