"""The Raft replica's chunk worker (master/raft_chunks.py): its child process, driven from a real asyncio loop.

The cluster-level behaviour (a stopped follower stalls no event loop) is in
tests/test_raft_cluster.py; here the worker's own cases, against peers that
are a closed port or a socket that never answers.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import blake3
import pytest

from conftest import free_port
from keg.chunks import ChunkStore
from keg.errors import KegBusy
from master.interface import Pending
from master.raft_chunks import ChunkWorker


class Master:
    """What a ``Pending`` needs of its master (nothing here: the loop resolves it)."""

    def flush(self) -> None:
        pass


@pytest.fixture
def worker(tmp_path):
    keg = tmp_path / "keg"
    ChunkStore(str(keg)).put(*chunk(b"held here"))
    down = []
    w = ChunkWorker(str(keg), "raftpeer_test", down.append)
    w.down = down
    yield w
    w.close()


def chunk(data: bytes) -> tuple:
    return blake3.blake3(data).hexdigest(), data


def run(worker, start, timeout: float = 10.0):
    """Run the worker on a fresh loop until the ``Pending`` that ``start()`` returns is resolved; its result."""
    loop = asyncio.new_event_loop()
    worker.attach(loop)
    try:
        pending = start()
        done = loop.create_future()
        pending.add_callback(lambda: done.done() or done.set_result(pending.result))
        return loop.run_until_complete(asyncio.wait_for(done, timeout))
    finally:
        loop.close()


def test_a_push_with_no_majority_names_each_replica_and_marks_the_unreachable_down(worker):
    name, _ = chunk(b"held here")
    closed = f"http://127.0.0.1:{free_port()}"
    result = run(worker, lambda: worker.push([name], [("10.0.0.2:4321", closed, False),
                                                      ("10.0.0.3:4321", closed, True)], 2, 3, Master()))
    assert not result.ok
    message = str(result.error)
    assert "stored on 1 of 3 replicas and a majority (2) is needed" in message
    assert "10.0.0.2:4321: [Errno" in message and "Connection refused" in message
    assert "10.0.0.3:4321: it did not answer a moment ago" in message
    assert worker.down == ["10.0.0.2:4321"]   # the one asked now; the other was already known to be down


def test_a_child_that_dies_fails_what_it_held_and_the_next_request_starts_another(worker):
    name, _ = chunk(b"held here")
    silent, url = silent_peer()
    connection = None
    loop = asyncio.new_event_loop()
    worker.attach(loop)
    try:
        pending = worker.push([name], [("10.0.0.2:4321", url, False)], 2, 3, Master())
        first = worker.proc
        silent.settimeout(10)
        connection, _ = silent.accept()   # the child has connected: it is waiting for the silent peer's answer
        assert not pending.done
        first.kill()
        loop.run_until_complete(asyncio.wait_for(_until(pending), 5))
        assert not pending.result.ok
        assert "the chunk transfer stopped (exit status -9)" in str(pending.result.error)
        assert worker.proc is None and worker.busy == 0
        again = worker.push([name], [("10.0.0.2:4321", f"http://127.0.0.1:{free_port()}", False)], 2, 3, Master())
        assert worker.proc is not None and worker.proc.pid != first.pid
        loop.run_until_complete(asyncio.wait_for(_until(again), 10))
        assert "Connection refused" in str(again.result.error)
    finally:
        if connection is not None:
            connection.close()
        silent.close()
        loop.close()


async def _until(pending: Pending) -> None:
    while not pending.done:
        await asyncio.sleep(0.02)


def test_close_stops_the_child_and_leaves_no_process(worker):
    name, _ = chunk(b"held here")
    silent, url = silent_peer()
    loop = asyncio.new_event_loop()
    worker.attach(loop)
    try:
        worker.push([name], [("10.0.0.2:4321", url, False)], 2, 3, Master())
        pid = worker.proc.pid
        worker.close()
        assert worker.proc is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)   # reaped, not left running nor a zombie
    finally:
        silent.close()
        loop.close()


def silent_peer():
    """A listening socket nobody answers on: connections are accepted by the kernel, requests wait forever."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    return silent, f"http://127.0.0.1:{silent.getsockname()[1]}"


def test_writes_queued_behind_a_silent_replica_do_not_each_wait_for_it(worker):
    """The first push waits out the silent replica (2 s) and then asks the other; the pushes queued behind it
    skip the silent one at once, as a replica that did not answer a moment ago."""
    name, _ = chunk(b"held here")
    silent, url = silent_peer()
    loop = asyncio.new_event_loop()
    worker.attach(loop)
    try:
        started = time.monotonic()
        closed = f"http://127.0.0.1:{free_port()}"
        pushes = [worker.push([name], [("10.0.0.2:4321", url, False), ("10.0.0.3:4321", closed, False)], 2, 3,
                              Master()) for _ in range(5)]
        for pending in pushes:
            loop.run_until_complete(asyncio.wait_for(_until(pending), 15))
        took = time.monotonic() - started
        assert 1.9 <= took < 3.9, took   # one wait for the silent replica, not five
        assert "10.0.0.2:4321: timed out" in str(pushes[0].result.error)
        assert all("10.0.0.2:4321: it did not answer a moment ago" in str(p.result.error) for p in pushes[1:])
    finally:
        silent.close()
        loop.close()


def test_a_full_queue_refuses_the_next_write_with_a_clear_error(worker, monkeypatch):
    name, _ = chunk(b"held here")
    silent, url = silent_peer()
    monkeypatch.setattr("master.raft_chunks.MAX_WAITING", 2)
    loop = asyncio.new_event_loop()
    worker.attach(loop)
    try:
        for _ in range(2):
            worker.push([name], [("10.0.0.2:4321", url, False)], 2, 3, Master())
        with pytest.raises(KegBusy, match="2 chunk transfers to the other replicas are waiting; send again"):
            worker.push([name], [("10.0.0.2:4321", url, False)], 2, 3, Master())
        worker.close()
        with pytest.raises(KegBusy, match="shutting down"):
            worker.push([name], [("10.0.0.2:4321", url, False)], 2, 3, Master())
    finally:
        silent.close()
        loop.close()
