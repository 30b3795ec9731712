"""The Raft replica's chunk worker (master/raft_chunks.py): its child process, driven from a real asyncio loop.

The cluster-level behaviour (a stopped follower stalls no event loop) is in
tests/test_raft_cluster.py; here the worker's own cases, against peers that
are a closed port or a socket that never answers.
"""

from __future__ import annotations

import asyncio
import os
import socket

import blake3
import pytest

from conftest import free_port
from keg.chunks import ChunkStore
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
    assert "10.0.0.2:4321: [Errno 111] Connection refused" in message
    assert "10.0.0.3:4321: it did not answer a moment ago" in message
    assert worker.down == ["10.0.0.2:4321"]   # the one asked now; the other was already known to be down


def test_a_child_that_dies_fails_what_it_held_and_the_next_request_starts_another(worker):
    name, _ = chunk(b"held here")
    silent = socket.socket()   # accepts connections (the kernel does) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    loop = asyncio.new_event_loop()
    worker.attach(loop)
    try:
        pending = worker.push([name], [("10.0.0.2:4321", url, False)], 2, 3, Master())
        first = worker.proc
        loop.run_until_complete(asyncio.sleep(0.3))   # the child is waiting for the silent peer's answer
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
        silent.close()
        loop.close()


async def _until(pending: Pending) -> None:
    while not pending.done:
        await asyncio.sleep(0.02)


def test_close_stops_the_child_and_leaves_no_process(worker):
    name, _ = chunk(b"held here")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    loop = asyncio.new_event_loop()
    worker.attach(loop)
    try:
        worker.push([name], [("10.0.0.2:4321", f"http://127.0.0.1:{silent.getsockname()[1]}", False)], 2, 3,
                    Master())
        pid = worker.proc.pid
        worker.close()
        assert worker.proc is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)   # reaped, not left running nor a zombie
    finally:
        silent.close()
        loop.close()
