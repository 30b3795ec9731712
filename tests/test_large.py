"""Large values as chunks, their garbage collection, and pointers to other kegs (DESIGN §3)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import urllib.error
import urllib.request

import pytest

import keg
from conftest import git, keg_command
from keg.chunks import chunk_hash
from keg.errors import BadRequest, CorruptKeg, NotFound
from keg import chunkworker, large
from keg.chunkworker import WorkerFailed
from keg.large import MARKER, Pointer, ingest
from keg.mounts import mount
from keg.transaction import Transaction, delete, parse_transaction, put, put_large, transaction_to_json
from master.client import RemoteKeg, _ChunkUploader
from test_cli import run

MiB = 1 << 20


def noise(size: int, seed: int = 1) -> bytes:
    """Incompressible, reproducible bytes."""
    out, block = bytearray(), seed.to_bytes(8, "little")
    while len(out) < size:
        block = hashlib.sha512(block).digest()
        out += block
    return bytes(out[:size])


@pytest.fixture
def data():
    return noise(5 * MiB) + b"text line\n" * (MiB // 10)


def chunk_files(keg_path: str) -> list:
    root = os.path.join(keg_path, "keg", "chunks")
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


def test_a_large_value_is_chunks_and_a_small_pointer_blob(store, data):
    result = store.apply(Transaction((put("/img/a.bin", data), put("/img/b.bin", data))))
    assert result.ok
    entry = store.stat("/img/a.bin")
    assert entry.large and entry.size == len(data) and entry.kind == "file"
    assert result.kids["/img/a.bin"] == result.kids["/img/b.bin"]  # same bytes, same KID
    assert store.read("/img/a.bin") == data
    with store.open("/img/b.bin") as f:
        assert f.read(100) == data[:100]
        assert f.read() == data[100:]
    store.checkpoint()
    blob_size = int(git(store.path, "cat-file", "-s", entry.kid[2:]).stdout)
    assert blob_size < len(data) // 200  # git holds the pointer (a line per chunk), not the bytes
    pointer = store.pointer("/img/a.bin")
    assert pointer.size == len(data) and len(pointer.chunks) >= 3
    assert len(chunk_files(store.path)) == len(set(name for name, _ in pointer.chunks))
    listed = {e.name: e for e in store.list("/img")}
    assert listed["a.bin"].size == len(data) and listed["a.bin"].to_json()["large"] is True


def test_text_chunks_are_compressed_and_random_ones_are_not(store):
    store.apply(Transaction((put("/t", b"all work and no play\n" * (3 * MiB // 21)), put("/r", noise(3 * MiB)))))
    names = {n for n, _ in store.pointer("/t").chunks}
    files = chunk_files(store.path)
    assert all(f.endswith(".zst") for f in files if os.path.basename(f)[:64] in names)
    assert any(not f.endswith(".zst") for f in files)
    assert store.read("/t").startswith(b"all work")


def test_a_value_that_looks_like_a_pointer_reads_back_as_written(store):
    fake = MARKER + b"size 3\nblake3 " + b"0" * 64 + b"\nchunks 0\n"
    assert store.apply(Transaction((put("/fake", fake),))).ok
    assert store.read("/fake") == fake
    assert store.stat("/fake").size == len(fake)


def test_put_stream_cuts_as_it_reads(store, data):
    class Trickle(io.RawIOBase):  # a pipe: short reads
        def __init__(self, payload):
            self.rest = payload

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), 4096, len(self.rest))
            b[:n] = self.rest[:n]
            self.rest = self.rest[n:]
            return n

    seen = []
    op = store.put_stream("/s", Trickle(data), progress=seen.append)
    assert op.large and sum(seen) == len(data)
    assert store.apply(Transaction((op,))).ok
    assert store.read("/s") == data
    small = store.put_stream("/small", io.BytesIO(b"tiny"))
    assert not small.large and small.data == b"tiny"


@pytest.fixture
def workers(monkeypatch):
    """Values past 1 MiB go to a chunk worker process (groups of 512 KiB); yields the workers started."""
    monkeypatch.setattr(large, "WORKER_AT", MiB)
    monkeypatch.setattr(large, "GROUP_BYTES", 512 << 10)
    started = []
    popen = chunkworker.subprocess.Popen

    def recording(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]
    monkeypatch.setattr(chunkworker.subprocess, "Popen", recording)
    return started


def test_a_worker_process_stores_the_chunks_of_a_large_value_as_this_one_would(store, tmp_path, data, workers):
    op = store.put_stream("/w.bin", io.BytesIO(data))
    assert len(workers) == large.WORKERS and all(w.returncode == 0 for w in workers)
    assert store.apply(Transaction((op,))).ok
    assert store.read("/w.bin") == data
    with keg.init(str(tmp_path / "alone"), durable=False) as alone:
        large.WORKER_AT = 1 << 60  # the same value cut and stored in this process only
        assert alone.put_stream("/w.bin", io.BytesIO(data)) == op
        assert sorted(os.path.basename(f) for f in chunk_files(alone.path)) == \
            sorted(os.path.basename(f) for f in chunk_files(store.path))
    assert len(workers) == large.WORKERS


def test_without_a_python_to_start_the_import_runs_in_this_process(store, data, monkeypatch):
    monkeypatch.setattr(large, "WORKER_AT", MiB)
    monkeypatch.setattr(large, "GROUP_BYTES", 512 << 10)
    monkeypatch.setattr(large, "_workers_fail", False)

    def no_python(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", args[0][0])
    monkeypatch.setattr(chunkworker.subprocess, "Popen", no_python)
    op = store.put_stream("/alone.bin", io.BytesIO(data))
    assert store.apply(Transaction((op,))).ok and store.read("/alone.bin") == data
    assert large._workers_fail


def test_an_empty_group_does_not_end_a_workers_stream(store, workers):
    batch = chunkworker.WorkerBatch(store.chunks)
    value = noise(70_000, 3)
    batch.put_many([], verified=True)  # what ingest hands over when a value ends on a group's edge
    batch.put_many([(chunk_hash(value), value)], verified=True)
    batch.sync()
    assert workers[0].returncode == 0 and store.chunks.get(chunk_hash(value)) == value


def test_an_import_that_fails_stops_its_worker_and_commits_nothing(store, data, workers):
    class Breaks(io.RawIOBase):
        def __init__(self):
            self.left = 3 * MiB

        def readable(self):
            return True

        def readinto(self, b):
            if self.left <= 0:
                raise OSError("the disk being imported went away")
            n = min(len(b), self.left)
            b[:n] = data[:n]
            self.left -= n
            return n

    head = store.head_revision
    with pytest.raises(OSError, match="went away"):
        store.put_stream("/broken.bin", Breaks())
    assert workers and all(w.poll() is not None for w in workers)  # killed and reaped, not left running
    assert store.head_revision == head


def test_a_worker_that_dies_is_an_error_that_says_so(store, data, workers):
    class KillsTheWorker(io.RawIOBase):
        def __init__(self):
            self.sent = 0

        def readable(self):
            return True

        def readinto(self, b):
            if workers and workers[0].poll() is None:
                workers[0].kill()
                workers[0].wait()
            n = min(len(b), len(data) - self.sent)
            b[:n] = data[self.sent:self.sent + n]
            self.sent += n
            return n

    with pytest.raises(WorkerFailed, match="chunk worker"):
        store.put_stream("/dies.bin", KillsTheWorker())


def test_a_damaged_chunk_is_named_on_read(store, keg_dir, data):
    store.apply(Transaction((put("/v.bin", data),)))
    store.checkpoint()  # visible to the keg command, another process
    victim = store.pointer("/v.bin").chunks[1][0]
    path = next(f for f in chunk_files(keg_dir) if os.path.basename(f).startswith(victim))
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(CorruptKeg) as err:
        store.read("/v.bin")
    assert "/v.bin" in str(err.value) and victim in str(err.value)
    code, out, stderr = run("cat", "--keg", keg_dir, "/v.bin")
    assert code == 4 and victim in stderr and "/v.bin" in stderr
    os.unlink(path)
    with pytest.raises(NotFound, match=victim):
        store.read("/v.bin")


def test_a_large_put_must_name_stored_chunks(store, data):
    head = store.head_revision
    pointer = ingest(store.chunks, io.BytesIO(data))
    missing = Pointer(pointer.size, pointer.blake3, pointer.chunks[:-1] + (("ab" * 32, pointer.chunks[-1][1]),))
    result = store.apply(Transaction((put("/ok", b"x"), put_large("/big", missing))))
    assert not result.ok and "upload them first" in str(result.error)
    assert store.head_revision == head
    assert store.apply(Transaction((put_large("/big", pointer),))).ok
    assert store.read("/big") == data


def test_large_and_link_ops_round_trip_through_json():
    pointer = Pointer(5, "a" * 64, (("b" * 64, 2), ("c" * 64, 3)))
    tx = Transaction((put_large("/x", pointer), parse_transaction(
        {"ops": [{"op": "link", "path": "/src/app", "kid": "K-" + "1" * 40}]}).ops[0]))
    again = parse_transaction(json.loads(json.dumps(transaction_to_json(tx))))
    assert again.ops == tx.ops
    for bad in ({"size": 6, "blake3": "a" * 64, "chunks": [["b" * 64, 2], ["c" * 64, 3]]},
                {"size": 5, "blake3": "nothex", "chunks": []},
                {"size": 5, "blake3": "a" * 64, "chunks": [["b" * 64, 0]]},
                [1, 2]):
        with pytest.raises(BadRequest):
            parse_transaction({"ops": [{"op": "put", "path": "/x", "large": bad}]})
    with pytest.raises(BadRequest, match="full KID"):
        parse_transaction({"ops": [{"op": "link", "path": "/x", "kid": "K-abcdef12"}]})
    with pytest.raises(BadRequest, match="not a KID"):
        parse_transaction({"ops": [{"op": "link", "path": "/x", "kid": "K-" + "a" * 64}]})


# --------------------------------------------------------------------- gc

def test_gc_keeps_history_and_fresh_uploads_and_drops_the_rest(store, data):
    other = noise(3 * MiB, seed=7)
    store.apply(Transaction((put("/a", data),)))
    store.apply(Transaction((put("/b", other),)))
    store.apply(Transaction((delete("/b"),)))
    before = len(chunk_files(store.path))
    assert store.gc_chunks(0)["chunks"] == 0  # /b is still in history
    assert store.read("/b", store.head_revision - 1) == other

    orphan = ingest(store.chunks, io.BytesIO(noise(3 * MiB, seed=9)))
    assert store.gc_chunks(3600)["chunks"] == 0  # uploaded for a commit that has not come yet: kept
    done = store.gc_chunks(0)
    assert done["chunks"] == len(orphan.chunks) and done["bytes"] > 0
    assert len(chunk_files(store.path)) == before
    result = store.apply(Transaction((put_large("/late", orphan),)))
    assert not result.ok and "not stored" in str(result.error)  # refused, never a dangling pointer
    assert store.read("/a") == data


def test_gc_command_through_a_master(master_server):
    remote = RemoteKeg(master_server.url, master_server.token)
    pointer = ingest(_ChunkUploader(remote), io.BytesIO(noise(2 * MiB, seed=3)))
    code, out, err = run("gc", "--url", master_server.url, "--token", master_server.token, "--grace", "0", "--json")
    assert code == 0, err
    assert json.loads(out)["chunks"] == len(pointer.chunks)
    code, _, err = run("gc", "--url", master_server.url, "--token", master_server.token, "--grace", "soon")
    assert code == 2 and "not a duration" in err


# ------------------------------------------------------------ over HTTP

def test_large_values_through_a_master(master_server, tmp_path, data):
    url, token = master_server.url, master_server.token
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    code, out, err = run("put", "--url", url, "--token", token, "/img/big.bin", str(src))
    assert code == 0, err
    kid = out.split("\t")[1]

    remote = RemoteKeg(url, token)
    uploader = _ChunkUploader(remote)
    again = ingest(uploader, io.BytesIO(data))
    assert uploader.sent == 0  # the master has every chunk: nothing is sent twice
    assert remote.apply(Transaction((put_large("/img/copy.bin", again),))).kids["/img/copy.bin"] == kid
    entry = remote.stat("/img/copy.bin")
    assert entry.large and entry.size == len(data)

    request = urllib.request.Request(url + "/v1/keg/img/big.bin", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request) as answer:
        assert answer.headers["Content-Length"] == str(len(data)) and answer.headers["Keg-Large"] == "1"
        assert answer.headers["ETag"] == f'"{kid}"'
        assert answer.read() == data
    done = subprocess.run([*keg_command(), "cat", "--url", url, "--token", token, "/img/big.bin"],
                          capture_output=True, check=False)
    assert done.returncode == 0 and done.stdout == data
    assert remote.pointer("/img/big.bin").size == len(data)


def test_a_group_of_chunks_is_stored_in_one_request_and_a_bad_group_changes_nothing(master_server):
    url, token = master_server.url, master_server.token
    remote = RemoteKeg(url, token)
    a, b = noise(100_000, 7), noise(50_000, 8)
    names = [chunk_hash(a), chunk_hash(b)]
    with pytest.raises(BadRequest, match="hashes to"):
        remote.chunk_put_many([(names[0], a), (names[1], b[:-1])])
    assert remote.chunk_missing(names) == names  # not even the good one was stored

    def post(body, headers):
        request = urllib.request.Request(url + "/v1/chunks", data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())
    whole = chunkworker.encode_group([(names[0], a)])
    status, answer = post(whole[:-10], {"Authorization": f"Bearer {token}"})
    assert status == 400 and "not a group of chunks" in answer["error"]
    assert post(whole, {})[0] == 401
    assert remote.chunk_missing(names) == names

    assert remote.chunk_put_many([(names[0], a), (names[1], b)]) == 2
    assert remote.chunk_put_many([(names[0], a)]) == 0
    assert remote.chunk_missing(names) == [] and remote.chunk_get(names[1]) == b

    # Reading a group back: one request, in the order asked, each verified by the client.
    assert remote.chunk_get_many([names[1], names[0]]) == [b, a]
    absent = chunk_hash(b"never stored")
    with pytest.raises(NotFound, match=absent):
        remote.chunk_get_many([names[0], absent])
    with pytest.raises(BadRequest, match="1 to 1024 names"):
        remote.chunk_get_many([names[0]] * 1025)


# ---------------------------------------------------------------- mounts

def make_repo(path, text: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b", "GIT_COMMITTER_NAME": "a",
           "GIT_COMMITTER_EMAIL": "a@b"}
    if not path.exists():
        subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    (path / "docs").mkdir(exist_ok=True)
    (path / "docs" / "README.md").write_text(text)
    subprocess.run(["git", "-C", str(path), "add", "."], check=True)
    subprocess.run(["git", "-C", str(path), "commit", "-qm", text], check=True, env=env)


def test_a_pointer_to_another_repository_reads_through(store, keg_dir, tmp_path):
    repo = tmp_path / "app"
    make_repo(repo, "one\n")
    result = mount(store, "/src/app", str(repo), "main")
    assert result.ok
    first = store.head_revision
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    entry = store.stat("/src/app")
    assert entry.kind == "pointer" and entry.kid == "K-" + commit.strip()
    assert store.read("/src/app/docs/README.md") == b"one\n"
    assert [e.name for e in store.list("/src/app")] == ["docs"]
    assert "/src/app\t" + str(repo) + "\tmain" in store.read("/mounts.tsv").decode()

    make_repo(repo, "two\n")
    assert mount(store, "/src/app", str(repo), "main").ok
    assert store.read("/src/app/docs/README.md") == b"two\n"
    assert store.read("/src/app/docs/README.md", first) == b"one\n"  # time travel through the pointer
    store.close()

    code, out, _ = run("ls", "-l", "--keg", keg_dir, "/src")
    assert out.startswith("pointer\tK-") and out.rstrip().endswith("app@")
    code, out, _ = run("cat", "--keg", keg_dir, "/src/app/docs/README.md")
    assert code == 0 and out == "two\n"
    assert git(keg_dir, "fsck").returncode == 0


def test_bad_mounts_change_nothing(store, tmp_path):
    head = store.head_revision
    with pytest.raises(BadRequest, match="not a location"):
        mount(store, "/m", "relative/path")
    with pytest.raises(BadRequest, match="not a location"):
        mount(store, "/m", "--upload-pack=touch /tmp/x")
    with pytest.raises(NotFound):
        mount(store, "/m", str(tmp_path / "nothing"))
    repo = tmp_path / "r"
    make_repo(repo, "x")
    with pytest.raises(keg.errors.KegError, match="cannot fetch"):
        mount(store, "/m", str(repo), "no-such-branch")
    assert store.head_revision == head
    result = store.apply(parse_transaction({"ops": [{"op": "link", "path": "/lost", "kid": "K-" + "2" * 40}]}))
    assert result.ok and store.stat("/lost").kind == "pointer"
    with pytest.raises(NotFound, match="not in this keg"):
        store.read("/lost/x")
