"""Keg's own git encodings give exactly the ids libgit2 gives."""

import pygit2
from hypothesis import given, settings
from hypothesis import strategies as st

from keg.delta import apply_delta
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


MODES = {"file": MODE_BLOB, "exec": MODE_EXEC, "link": 0o120000, "tree": MODE_TREE}


def _git_order_bytes(entries: dict) -> bytes:
    """A tree's bytes built from scratch, as git builds them: ``entries`` is name -> (mode, oid)."""
    def key(name):
        return name + b"/" if entries[name][0] == MODE_TREE else name
    return b"".join(b"%o %s\x00%s" % (entries[n][0], n, entries[n][1]) for n in sorted(entries, key=key))


@settings(max_examples=120, deadline=None)
@given(st.dictionaries(names, st.sampled_from(sorted(MODES)), max_size=8), st.booleans(), st.data())
def test_a_sequence_of_updates_gives_git_s_bytes_and_leaves_earlier_versions_alone(tmp_path_factory, start, parse,
                                                                                   data):
    repo = pygit2.init_repository(str(tmp_path_factory.mktemp("r")), bare=True)
    objects = {}

    def oid(kind, version):  # real objects, so that libgit2 accepts the entries
        if (kind, version) not in objects:
            blob = repo.create_blob(b"v%d" % version)
            if kind == "tree":
                sub = repo.TreeBuilder()
                sub.insert("f", blob, pygit2.GIT_FILEMODE_BLOB)
                objects[kind, version] = sub.write()
            else:
                objects[kind, version] = blob
        return objects[kind, version]

    def expected_bytes(model):
        return _git_order_bytes({n.encode(): (MODES[k], bytes.fromhex(str(oid(k, v)))) for n, (k, v) in model.items()})

    def libgit2_tree(model):
        builder = repo.TreeBuilder()
        for n, (k, v) in model.items():
            builder.insert(n, oid(k, v), MODES[k])
        return builder.write()

    model = {n: (k, 0) for n, k in start.items()}
    tree = Tree().with_changes({n.encode(): (MODES[k], bytes.fromhex(str(oid(k, 0)))) for n, (k, _) in model.items()})
    if parse:
        tree = Tree.parse(tree.encode())
    versions = [(tree, dict(model))]
    for version in range(1, data.draw(st.integers(1, 10), label="steps") + 1):
        changes = {}
        for _ in range(data.draw(st.integers(1, 3), label="changes in this step")):
            op = data.draw(st.sampled_from(["replace", "replace", "retype", "insert", "delete"]), label="op")
            existing = sorted(set(model) - {n.decode() for n in changes})
            if op in ("replace", "retype", "delete") and existing:
                name = data.draw(st.sampled_from(existing), label="name")
            else:
                name = data.draw(names, label="name")
            kind = model.get(name, ("file", 0))[0]
            if op == "retype" or name not in model:
                kind = data.draw(st.sampled_from(sorted(MODES)), label="kind")
            changes[name.encode()] = None if op == "delete" else (MODES[kind], bytes.fromhex(str(oid(kind, version))))
            if op == "delete":
                model.pop(name, None)
            else:
                model[name] = (kind, version)
        tree = tree.with_changes(changes)
        if data.draw(st.booleans(), label="encode now"):
            tree.encode()
        versions.append((tree, dict(model)))
        assert tree.encode() == expected_bytes(model)
        theirs = libgit2_tree(model)
        assert object_id(OBJ_TREE, tree.encode()).hex() == str(theirs)
        assert tree.encode() == repo[theirs].read_raw()
    for earlier, earlier_model in versions:
        assert earlier.encode() == expected_bytes(earlier_model)
        assert {n.decode(): m for n, m, _ in earlier.items()} == {n: MODES[k] for n, (k, _) in earlier_model.items()}
        for n, (k, v) in earlier_model.items():
            assert earlier.get(n.encode()) == (MODES[k], bytes.fromhex(str(oid(k, v))))


def test_replacing_an_entry_in_place_shares_the_layout_and_splices_the_bytes():
    # The cost of a commit into a wide directory rests on this path (bench/run.py scale).
    entries = {b"m%04d" % i: (MODE_TREE, bytes([i % 256]) * 20) for i in range(300)}
    entries[b"readme"] = (MODE_BLOB, b"\x07" * 20)
    base = Tree.parse(_git_order_bytes(entries))
    before = base.encode()
    changed = base.with_changes({b"m0150": (MODE_TREE, b"\xaa" * 20), b"readme": (MODE_EXEC, b"\xbb" * 20)})
    entries.update({b"m0150": (MODE_TREE, b"\xaa" * 20), b"readme": (MODE_EXEC, b"\xbb" * 20)})
    assert changed.encode() == _git_order_bytes(entries)
    assert changed._keys is base._keys and changed._offsets is base._offsets
    assert base.encode() == before and base.get(b"m0150") == (MODE_TREE, bytes([150]) * 20)
    grown = changed.with_changes({b"m0150": (MODE_BLOB, b"\xcc" * 20)})  # directory -> file: it moves
    entries[b"m0150"] = (MODE_BLOB, b"\xcc" * 20)
    assert grown.encode() == _git_order_bytes(entries) and grown._keys is not changed._keys
    assert changed.get(b"m0150") == (MODE_TREE, b"\xaa" * 20)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.booleans(), st.data())
def test_a_tree_knows_the_delta_from_the_version_it_was_made_from(width, parse, data):
    # A commit stores a wide directory's new version as a delta against the old one; for same-length
    # replacements the tree writes that delta from what it replaced, comparing no bytes.
    entries = {b"e%03d" % i: (MODE_BLOB if i % 3 else MODE_TREE, bytes([i]) * 20) for i in range(width)}
    base = Tree.parse(_git_order_bytes(entries)) if parse else Tree().with_changes(entries)
    base.encode()
    tree, only_replacements = base, True
    for step in range(data.draw(st.integers(1, 6), label="steps")):
        name = data.draw(st.sampled_from(sorted(entries)), label="name")
        op = data.draw(st.sampled_from(["replace", "replace", "replace", "retype", "insert"]), label="op")
        if op == "replace":
            entries[name] = (entries[name][0], bytes([100 + step]) * 20)
            tree = tree.with_changes({name: entries[name]})
        elif op == "retype":
            only_replacements = False
            entries[name] = (MODE_EXEC if entries[name][0] == MODE_TREE else MODE_TREE, bytes([200 + step]) * 20)
            tree = tree.with_changes({name: entries[name]})
        else:
            only_replacements = False
            entries[name + b"x"] = (MODE_BLOB, bytes([50 + step]) * 20)
            tree = tree.with_changes({name + b"x": entries[name + b"x"]})
        if data.draw(st.booleans(), label="encode now"):
            tree.encode()
    delta = tree.delta_against(base)
    assert tree.encode() == _git_order_bytes(entries)
    if only_replacements:
        assert delta is not None and apply_delta(base.encode(), delta) == tree.encode()
        assert len(delta) < 40 * 7  # what changed, not the tree
    else:
        assert delta is None  # the tree's layout moved: the store compares bytes (make_delta) instead
    assert tree.delta_against(base) is None  # asked once: the tree no longer holds on to its base
    assert Tree().delta_against(base) is None and base.with_changes({}).delta_against(tree) is None
