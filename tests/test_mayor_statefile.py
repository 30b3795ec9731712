"""mayor/statefile.py: the Mayor's state survives a save cut short, and the file stays bounded."""

from __future__ import annotations

import json

from mayor import statefile
from mayor.statefile import StateFile


def save(f: StateFile, obj: dict) -> None:
    f.save(json.dumps(obj).encode())


def test_the_newest_whole_line_wins_and_a_torn_one_is_dropped_then_overwritten(tmp_path):
    path = str(tmp_path / "state.json")
    f = StateFile(path)
    assert f.load() == {}
    for n in range(3):
        save(f, {"n": n})
    assert StateFile(path).load() == {"n": 2}
    with open(path, "ab") as out:
        out.write(b'{"n": 3, "incarnat')  # a crash in the middle of a save
    again = StateFile(path)
    assert again.load() == {"n": 2}
    save(again, {"n": 4})  # not appended to the torn line: the file is rewritten
    assert open(path, "rb").read() == b'{"n": 4}\n'
    assert StateFile(path).load() == {"n": 4}


def test_the_one_object_file_of_earlier_versions_is_read(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"failures": {"web": 2}}, sort_keys=True))  # no newline at its end
    f = StateFile(str(path))
    assert f.load() == {"failures": {"web": 2}}
    save(f, {"failures": {}})
    assert path.read_bytes() == b'{"failures": {}}\n'


def test_the_file_is_cut_back_to_its_newest_line_past_its_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(statefile, "MAX_BYTES", 200)
    path = tmp_path / "state.json"
    f = StateFile(str(path))
    f.load()
    sizes = []
    for n in range(50):
        save(f, {"n": n, "pad": "x" * 20})
        sizes.append(path.stat().st_size)
        assert StateFile(str(path)).load()["n"] == n
    assert max(sizes) <= 200 and sizes.count(sizes[0]) > 1  # cut back more than once
